"""The porting pipeline: LoRA file -> key map -> layer groups (streamed) -> subspaces (LoRA-X) ->
similarity gate -> copy or projection -> writer, returning a `PortReport`.

Per adapted layer, with W_s, W_t the source and target base weights (conv weights flattened to
[out, in·kernel]; fused/split layouts mapped by archs.Arch.translate):
  * the similarity gate (loraport.gate): left/right overlaps of the top-k singular subspaces of
    W_s and W_t, similarity = their mean, pass when it is >= ``min_similarity`` and both sides
    are >= half of it; each row gets its margin. Default (variant copy, no ``subspace_rank`` or
    ``energy``): `gate.gate_layers`, k from the spectrum up to min(16, min(m, n) // 4), a sketch
    of 16 columns iterated until the decision settles (``power_iters``, ``oversample`` and
    ``method`` are the rsvd's settings and do not apply to it). Otherwise U, V come from loraport.rsvd (layers
    of one shape stacked into one batched call, one group at a time, the next group read on a
    background thread meanwhile) at k = ``subspace_rank``, or with ``energy`` the smallest k
    whose singular values keep that fraction of ‖W‖_F² (searched up to ``subspace_rank``,
    default min(64, min(m, n) // 4): `default_subspace_rank`).
  * failing the gate: "skipped" (left out of the output) or, with on_dissimilar="copy",
    "copied" unchanged; always reported.
  * otherwise, by ``variant``: "copy" (the default) carries ΔW = scale·up·down over unchanged
    (renamed to the target's keys, padded as below); "target" projects it with
    loraport.project_lora, never formed densely, to U_t U_tᵀ ΔW V_t V_tᵀ; "source-then-target"
    applies that to U_s U_sᵀ ΔW V_s V_sᵀ. "copy" is the default because it kept the most of a
    LoRA's effect in the quality benchmark (benchmarks/quality/README.md): a projection only
    removes the parts of ΔW outside the bases' dominant subspaces, which is where a LoRA trained
    the usual way acts, so at any k < min(m, n) it kept less, and at full rank it equals the copy.
    The scale is folded into the factors, so the output has scale 1 (kohya: alpha = rank) and its
    ΔW equals the carried or projected ΔW whatever the input's alpha convention. Output rank =
    min(``rank`` or r, r) for "copy" (optimal truncation when ``rank`` < r), min(``rank`` or r,
    r, k) for the projections.
  * shapes: a target weight with more input channels (dim 1, same outputs and kernel; e.g.
    HunyuanVideo-I2V v1's img_in, 16 -> 33 channels) is "padded": the LoRA's down factor and the
    source weight get zero columns for the new channels (what diffusers does when it loads such a
    LoRA), and the target's subspaces are those of its old channels (new ones zeroed), so the gate
    compares the part the LoRA acts on and the new channels get no update in any variant. Any other difference is "shape-mismatch" and the layer is skipped.
    Modules missing in a base ("missing") or absent from the key map ("unknown") are skipped.
LoHa, LoKr, Tucker LoCon, DoRA and full-difference modules take the same gate and are carried in
their own type, padded where exact or else "refused" (`adapters.port_module`, `adapters.pad_refusal`).
``dry_run`` maps every module and checks shapes from the file headers only (no SVD, no output).
Streaming (loraport.streaming, shared with the toolbox): chunks of same-shape layers are sized by
`group_bytes` to ``max_memory`` (`plan_chunks`) and read one ahead on a background thread into two
staging slots (`run_plans`); with ``cache_dir`` each base weight's U, S, V and ‖W‖_F² (or the
default gate's sketch) come from (or go to) loraport.cache, and a weight found there is neither
read nor decomposed. The modules are mapped onto the bases by loraport.plans, the options are
options.PortOptions, and the result is a reports.PortReport."""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import time
from dataclasses import dataclass, field

import torch

from . import adapters, formats, gate, staging, streaming
from .basemodel import BaseModel
from .cache import SubspaceCache
from .check import check
from .errors import InputError, NothingToPort
from .gate import DEFAULT_SUBSPACE_RANK, default_subspace_rank  # noqa: F401  (re-exported for cli, toolbox)
from .lowrank import ProductSVD
from .ops import rsvd
from .options import (  # noqa: F401  (the option constants and parse_bytes re-exported)
    DEFAULT_MAX_MEMORY,
    DEFAULT_MIN_SIMILARITY,
    ON_DISSIMILAR,
    VARIANTS,
    PortOptions,
    energy_rank,
    parse_bytes,
)
from .plans import Plan, base_styles, plan_module
from .reports import Action, LayerRow, PortReport  # noqa: F401  (LayerRow re-exported)
from .staging import StagingBuffers
from .streaming import group_bytes, read_into, stack_dtype, staging_bytes  # noqa: F401  (re-exported)
from .strength import Strength
from .upgrade import refuse_other_size

_similarity = torch.ops.loraport.subspace_similarity  # [m, k1], [m, k2] -> [] (see port_chunk)
_project = torch.ops.loraport.project_lora  # (up, down, U, V, rank) -> (up2, down2)


def _frob2(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """‖up @ down‖_F² from the r×r Gram matrices, in float64."""
    up, down = up.double(), down.double()
    return ((up.mT @ up) * (down @ down.mT)).sum()


def _rel_change(up_in, down_in, up_out, down_out) -> float:
    denom = _frob2(up_in, down_in)
    diff = _frob2(torch.cat([up_out, -up_in], 1), torch.cat([down_out, down_in], 0))
    return float(diff.clamp_min(0).sqrt() / denom.sqrt()) if denom > 0 else 0.0


def port(
    lora,
    source,
    target,
    out=None,
    *,
    device: str = "cpu",
    subspace_rank: int | None = None,
    energy: float | None = None,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    on_dissimilar: str = "skip",
    rank: int | None = None,
    format: str = "auto",
    arch: str = "auto",
    variant: str = VARIANTS[0],
    power_iters: int = 2,
    method: str = "power",
    block_size: int | None = None,
    oversample: int = 8,
    seed: int = 0,
    max_memory=DEFAULT_MAX_MEMORY,
    max_vram=None,
    cache_dir=None,
    report=None,
    dry_run: bool = False,
    quiet: bool = False,
    strength=None,
    dora_magnitude: str = adapters.DORA_MAGNITUDE[0],
) -> PortReport:
    """Port ``lora`` (path or state dict) from base ``source`` to base ``target`` (paths to a
    safetensors file, sharded index, .pt checkpoint or diffusers folder, or state dicts), write
    it to ``out`` (in ``format``, default the input's) unless ``dry_run``, write the JSON report
    to ``report`` if given, and return the PortReport. See the module docstring for the method.
    ``max_memory`` (bytes or "2GB"; ``max_vram`` is an alias) bounds what one chunk of layers
    holds at once on ``device`` (host memory on the CPU), as estimated by `group_bytes`.
    ``cache_dir``: folder of the subspace cache (loraport.cache); bases given as state dicts are
    never cached. ``block_size`` (method="krylov" only): width of each Krylov block, as in
    `loraport.rsvd`; a layer whose subspace rank needs a wider Krylov space than
    (power_iters + 1) blocks of it uses the default width, rank + oversample. ``strength``: a
    float or (regex, S) rules scaling each output module's ΔW exactly (loraport.strength). LoHa,
    LoKr, Tucker LoCon, full-difference and DoRA modules (loraport.adapters) are carried in their
    own type (variant "copy" only); ``dora_magnitude`` ("keep" or "rescale") is
    `adapters.port_module`'s."""
    options = PortOptions.from_args(
        device=device, subspace_rank=subspace_rank, energy=energy, min_similarity=min_similarity,
        on_dissimilar=on_dissimilar, rank=rank, variant=variant, power_iters=power_iters,
        method=method, block_size=block_size, oversample=oversample, seed=seed,
        max_memory=max_memory if max_vram is None else max_vram, dry_run=dry_run, cache_dir=cache_dir,
        strength=strength, dora_magnitude=dora_magnitude,
    )  # fmt: skip
    if out is None and not dry_run:
        raise InputError("loraport.port: give out= (the output path) or dry_run=True")
    t_start = time.perf_counter()

    src, tgt = BaseModel(source), BaseModel(target)
    # a CPU port computes on the cores a page-cache read would copy with; the default gate places
    # each weight for a direct read on any device (loraport.positioned, `run_plans`' load)
    src.direct_io = tgt.direct_io = torch.device(options.device).type == "cpu" or options.default_gate
    lf = formats.read_lora(lora, arch=arch, base_names=src.module_names())
    top = max(m.rank for m in lf.modules)
    if rank is not None and rank > top:
        raise InputError(f"{lf.label}: rank {rank} is above the LoRA's largest rank {top}; the output rank is at most the input's")
    format_out = formats.output_format(format, lf.format)
    inputs = [lf.path, *src.files(), *tgt.files()]
    if not dry_run:
        out = formats.check_output(out, inputs)
    styles = base_styles(lf, src, tgt, forced=arch != "auto")
    plans = [plan_module(m, lf, src, tgt, styles) for m in lf.modules]
    refuse_other_size([p.row for p in plans], lf.label, src.label, tgt.label)
    # before any SVD: can the modules that will be written (not the missing ones) take format_out?
    written = [p.module.component for p in plans if p.row.action == Action.PLANNED]
    formats.check_format(format_out, lf.arch, written, lf.label)
    adapters.check_port(lf, [p.module for p in plans if p.row.action == Action.PLANNED], format_out, variant, rank)
    seconds = dict(read=0.0, svd=0.0, project=0.0, write=0.0, cache=0.0)
    if not dry_run:
        run_plans([p for p in plans if p.row.action == Action.PLANNED], src, tgt, options, seconds, quiet)

    rep = PortReport(
        rows=[p.row for p in plans], arch=lf.arch.name, format_in=lf.format,
        format_out=None if dry_run else format_out,
        lora=lf.label, source=src.label, target=tgt.label, out=None if dry_run else out,
        settings=options.to_dict(), seconds=seconds, bytes_read=src.bytes_read + tgt.bytes_read,
    )  # fmt: skip
    if not dry_run:
        modules = [p.result for p in plans if p.result is not None]
        if not modules:
            if report is not None:
                rep.to_json(report)
            raise NothingToPort(
                f"{lf.label}: no module was ported or copied ({rep.summary()['actions']}); nothing written to {out}"
            )
        t0 = time.perf_counter()
        result = formats.LoraFile(modules, lf.format, lf.arch, lf.style, dict(lf.metadata), None, lf.adapter_config)
        meta = {
            "loraport.source": os.path.basename(src.label),
            "loraport.target": os.path.basename(tgt.label),
            "loraport.variant": variant,
            "loraport.strength": json.dumps(options.strength),
        }
        formats.write_lora(result, out, format=format, metadata=meta, protect=inputs)
        seconds["write"] = time.perf_counter() - t0
        rep.check = check(out, target, arch=lf.arch.name).to_dict()
    seconds["total"] = time.perf_counter() - t_start
    if report is not None:
        rep.to_json(report)
    return rep


@dataclass
class Chunk:
    """Same-shape layers ported together: one batched rsvd over the weights not in the cache."""

    plans: list[Plan]
    dtype: torch.dtype  # stacking dtype of the weights read
    rank: int  # subspace rank k computed (the largest kept)
    block_size: int | None  # rsvd's Krylov block width (`_krylov_block`), None: its default


def plan_chunks(work: list[Plan], src: BaseModel, tgt: BaseModel, options: PortOptions) -> list[Chunk]:
    """Group the layers by shape and dtype and cut each group into the largest chunks whose
    `group_bytes` fits ``max_memory``; InputError when not even one layer fits."""
    def key(p: Plan) -> tuple:
        c = p.component
        dtypes = [src.dtype(c, name) for name, *_ in p.src_pieces] + [tgt.dtype(c, name) for name, *_ in p.tgt_pieces]
        return p.src_shape, p.tgt_shape, stack_dtype(dtypes)

    budget, chunks = options.max_memory, []
    for (_, tshape, dtype), group in streaming.group(work, key).items():
        m, n = tshape[0], math.prod(tshape[1:])
        k = options.subspace_rank_for(m, n)
        block = options.krylov_block(k, m, n)

        def need(layers):
            return max(group_bytes(
                layers, m, n, k=k, oversample=options.oversample, power_iters=options.power_iters,
                method=options.method, elem=dtype.itemsize, lora_rank=max(p.row.rank_in for p in group),
                device=options.device, block_size=block, gate=options.default_gate,
            ), staging_bytes(layers, m, n, elem=dtype.itemsize, aligned=options.default_gate))  # fmt: skip

        if need(1) > budget:
            raise InputError(
                f"{group[0].row.module}: one layer of shape [{m}, {n}] needs about {need(1) / 2**20:.1f} MiB "
                f"at subspace rank {k} (two {dtype} weights + rsvd workspace), more than max memory "
                f"{budget / 2**20:.1f} MiB; raise --max-vram or lower --subspace-rank"
            )
        chunks += [Chunk(plans, dtype, k, block) for plans in streaming.cut(group, budget, need)]
    return chunks


@dataclass
class _Loaded:
    """What the reader thread prepared for one chunk."""

    found: dict  # (layer index, side) -> (U, S, V, ‖W‖_F²), or a gate.Sketch, from the cache
    todo: list  # [(layer index, side)] to decompose, in the order of ``weights``
    slot: int  # the staging slot ``weights`` lies in
    weights: torch.Tensor | list  # [len(todo), out, channels, *kernel] or as many [out, channels, *kernel] (`load`), views of the staging slot
    frob2: list  # ‖W‖_F² per weight in ``weights``
    keys: dict  # (layer index, side) -> cache key (bases with a fingerprint only)
    seconds_read: float = 0.0
    seconds_cache: float = 0.0
    norms: dict = field(default_factory=dict)  # DoRA layer index -> {side: weight norms on its magnitude's axis}

    def release(self) -> None:
        """Drop the weights: `streaming.Stream.each` calls it on the reading thread, which then
        pays for unmapping the mapped ones instead of the gate's thread."""
        self.weights = None


def run_plans(
    work: list[Plan], src: BaseModel, tgt: BaseModel, options: PortOptions, seconds: dict, quiet: bool,
    subspaces_only: bool = False,
) -> None:  # fmt: skip
    """Stream the planned layers: same-shape chunks sized by `group_bytes` to ``max_memory``,
    each read (or taken from the subspace cache) on a background thread while the previous one
    is computed. ``subspaces_only``: fill the cache and stop there (no LoRA is involved)."""
    cache = SubspaceCache(options.cache_dir) if options.cache_dir else None
    bases = {"source": src, "target": tgt}
    fingerprints = {side: b.fingerprint() for side, b in bases.items()} if cache else {}
    chunks = plan_chunks(work, src, tgt, options)
    t_start = time.perf_counter()
    # One chunk's weights at most per slot; staging_bytes kept two of them within max_memory.
    # The default gate places each weight for a direct read without a bounce copy (`load`), and
    # on the CPU takes a weight already in the page cache as a read-only mapping instead.
    aligned = options.default_gate
    mappable = aligned and torch.device(options.device).type == "cpu"
    slot_bytes = max(((staging.aligned_bytes if aligned else operator.mul)(2 * len(c.plans), math.prod(c.plans[0].tgt_shape) * c.dtype.itemsize)
                      for c in chunks), default=0)  # fmt: skip
    stream = streaming.Stream(slot_bytes, options.device)

    def load(chunk: Chunk, slot: int) -> _Loaded:
        t0 = time.perf_counter()
        shape = chunk.plans[0].tgt_shape
        m, n = shape[0], math.prod(shape[1:])
        found, keys, todo = {}, {}, []
        fast = options.default_gate
        width = gate.sketch_width(m, n)
        for g, p in enumerate(chunk.plans):
            # rescaling a DoRA magnitude needs the weights' norms, so those weights are read
            norms_needed = options.dora_magnitude == "rescale" and adapters.magnitude_axis(p.module)
            for side in ("source", "target"):
                if fingerprints.get(side) is not None:
                    keys[g, side] = p.cache_key(side, fingerprints[side], options)
                    if norms_needed:
                        hit = None
                    elif fast:
                        hit = cache.get_tensors(keys[g, side], {"U": [m, width], "S": [width], "V": [n, width]})
                        hit = None if hit is None else gate.Sketch.first(**hit)
                    else:
                        hit = cache.get(keys[g, side], m, n, chunk.rank)
                    if hit is not None:
                        found[g, side] = hit
                        continue
                todo.append((g, side))
        t1 = time.perf_counter()
        mapped = {}  # todo index -> the weight mapping the page cache (the default gate on the CPU: no copy)
        if aligned:  # [m, *] each, at the address its file offset asks for (no bounce copy)
            meta = torch.empty(shape, dtype=chunk.dtype, device="meta")
            for i, (g, side) in enumerate(todo if mappable else ()):
                p = chunk.plans[g]
                w = streaming.mapped_weight(meta, bases[side], p.component, p.pieces(side), p.gated_channels(side))
                if w is not None:
                    mapped[i] = w
            residues = [streaming.file_residue(meta, bases[side], chunk.plans[g].component, chunk.plans[g].pieces(side))
                        for i, (g, side) in enumerate(todo) if i not in mapped]  # fmt: skip
            staged = iter(stream.staging.take_aligned(slot, shape, chunk.dtype, residues))
            weights = [mapped[i] if i in mapped else next(staged) for i in range(len(todo))]
        else:
            weights = stream.staging.take(slot, (len(todo), *shape), chunk.dtype)  # [M, m, *]
        frob2, norms = [], {}
        for i, (g, side) in enumerate(todo):
            p = chunk.plans[g]
            if i in mapped:
                frob2.append(None)  # the default gate: no sums
            else:
                frob2.append(read_into(weights[i], bases[side], p.component, p.pieces(side), p.gated_channels(side), not fast))
            if adapters.magnitude_axis(p.module):
                norms.setdefault(g, {})[side] = adapters.axis_norms(weights[i], adapters.magnitude_axis(p.module))
        return _Loaded(found, todo, slot, weights, frob2, keys, time.perf_counter() - t1, t1 - t0, norms)

    def read_weight(plan: Plan, side: str, dtype: torch.dtype) -> torch.Tensor:
        """One base weight read now, [out, channels, *kernel]: the default gate refining a layer
        whose sketch came from the cache, or naming the tensor that holds NaN/Inf."""
        out = torch.empty(plan.tgt_shape, dtype=dtype)
        read_into(out, bases[side], plan.component, plan.pieces(side), plan.gated_channels(side))
        return out

    # the default gate's float32 copy of a layer's two weights, one buffer for the run (none where it iterates on bf16)
    upcast = gate.Upcast(
        max((2 * math.prod(c.plans[0].tgt_shape) for c in chunks
             if not gate.bf16_products(c.dtype, options.device)), default=0) if options.default_gate else 0,
        options.device,
    )  # fmt: skip

    cached_subspaces = 0  # for the progress bar
    writing = cache.writing_behind() if cache is not None else contextlib.nullcontext()
    with streaming.progress(len(work), "porting", quiet) as bar, stream, writing:
        for chunk, loaded in stream.each(chunks, load, release=_Loaded.release):
            seconds["read"] += loaded.seconds_read
            seconds["cache"] += loaded.seconds_cache
            try:
                port_chunk(chunk, loaded, cache, stream.staging, options, seconds, subspaces_only, read_weight, upcast)
            except ValueError:  # NaN/Inf found by the default gate's first product: name the tensor
                for g, side in loaded.todo:
                    read_weight(chunk.plans[g], side, chunk.dtype)  # InputError for the broken one
                raise
            bar.update(len(chunk.plans))
            gb = (src.bytes_read + tgt.bytes_read) / 1e9
            cached_subspaces += sum(p.row.subspaces_from_cache for p in chunk.plans)
            hits = cached_subspaces // 2
            rate = gb / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix_str(f"{gb:.2f} GB read, {rate:.2f} GB/s" + (f", {hits} layers cached" if cache else ""))


def port_chunk(
    chunk: Chunk, loaded: _Loaded, cache, staging: StagingBuffers, options: PortOptions, seconds: dict,
    subspaces_only: bool, read_weight, upcast,
):  # fmt: skip
    """The gate for one chunk of same-shape layers (`_gate_chunk`, or subspaces from one batched
    rsvd over the weights not in the cache), then, unless ``subspaces_only``, copy or projection
    per layer (sets each plan's row and result)."""
    if options.default_gate:
        _gate_chunk(chunk, loaded, cache, staging, options, seconds, subspaces_only, read_weight, upcast)
        return
    device = options.device
    t0 = time.perf_counter()
    k_max = chunk.rank
    subspaces = dict(loaded.found)  # (layer index, side) -> (U [m, k], S [k], V [n, k], ‖W‖_F²)
    if loaded.todo:
        weights = staging.to_device(loaded.slot, loaded.weights.flatten(2), device)  # [M, m, n]
        U, S, V = rsvd(weights, k_max, block_size=chunk.block_size, **options.svd())  # [M, m, k], [M, k], [M, n, k]
        del weights
        for i, job in enumerate(loaded.todo):
            subspaces[job] = (U[i], S[i], V[i], loaded.frob2[i])
    seconds["svd"] += time.perf_counter() - t0
    if cache is not None:
        t0 = time.perf_counter()
        for job in loaded.todo:
            if job in loaded.keys:
                cache.put(loaded.keys[job], *subspaces[job])
        seconds["cache"] += time.perf_counter() - t0
    for g, plan in enumerate(chunk.plans):
        plan.row.subspaces_from_cache = sum((g, side) in loaded.found for side in ("source", "target"))
    if subspaces_only:
        return

    t0 = time.perf_counter()
    energy = options.energy
    for g, plan in enumerate(chunk.plans):
        Us, Ss, Vs, frob2_s = subspaces[g, "source"]
        Ut, St, Vt, frob2_t = subspaces[g, "target"]
        if energy is None:
            ks = kt = k_max
        else:
            ks = energy_rank(Ss.cpu(), frob2_s, energy)
            kt = energy_rank(St.cpu(), frob2_t, energy)
        us, vs = Us[:, :ks].to(device), Vs[:, :ks].to(device)
        ut, vt = Ut[:, :kt].to(device), Vt[:, :kt].to(device)
        # The ops directly, not the checking wrappers: every input here is already known to be
        # finite (LoRA factors on read, rsvd's S, cache entries), and each wrapper check would be
        # a full isfinite scan and a host sync per tensor per layer. One sync for both values.
        left, right = torch.stack([_similarity(us, ut), _similarity(vs, vt)]).tolist()
        plan.row.subspace_rank = [ks, kt]
        _carry(plan, left, right, (us, vs, ut, vt), loaded.norms.get(g), options)
    seconds["project"] += time.perf_counter() - t0


def _gate_chunk(
    chunk: Chunk, loaded: _Loaded, cache, staging: StagingBuffers, options: PortOptions, seconds: dict,
    subspaces_only: bool, read_weight, upcast,
):  # fmt: skip
    """`port_chunk` for the default gate (`gate.gate_layers`): no subspaces, only the decision."""
    t0 = time.perf_counter()
    shape = chunk.plans[0].tgt_shape
    index = {job: i for i, job in enumerate(loaded.todo)}  # (layer index, side) -> weight in loaded.weights
    weights = loaded.weights  # [m, *] each, in the staging slot (or mapped, on the CPU)
    if torch.device(options.device).type != "cpu":
        # Asynchronous copies from the pinned slot, in the weights' own dtype: a copy_ into the
        # gate's float32 buffer would convert on the host first (torch converts a host-to-GPU
        # copy between dtypes on the source side) and send twice the bytes, synchronously.
        weights = [staging.to_device(loaded.slot, w, options.device) for w in weights]
    results = gate.gate_layers(
        len(chunk.plans), shape[0], math.prod(shape[1:]), weights, index, loaded.found,
        lambda g, side: read_weight(chunk.plans[g], side, chunk.dtype), cache, loaded.keys, upcast,
        cap=chunk.rank, seed=options.seed, dtype=chunk.dtype,
        threshold=options.min_similarity, device=options.device, decide=not subspaces_only,
    )  # fmt: skip
    seconds["svd"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    for g, plan in enumerate(chunk.plans):
        plan.row.subspaces_from_cache = sum((g, side) in loaded.found for side in ("source", "target"))
    if subspaces_only:
        return
    for g, (plan, res) in enumerate(zip(chunk.plans, results)):
        row = plan.row
        row.subspace_rank, row.gate_products = [res.k, res.k], res.products
        if res.products == 0:
            row.note = "identical in both bases"
        elif res.unsure:
            row.note = f"gate unsure after {res.products} products"
        _carry(plan, res.left, res.right, None, loaded.norms.get(g), options)
    seconds["project"] += time.perf_counter() - t0


def _carry(plan: Plan, left: float, right: float, subspaces, norms, options: PortOptions) -> None:
    """The gate's verdict on one layer from its side similarities, and the module it gets: the
    copy, a projection onto ``subspaces`` (us [m, ks], vs [n, ks], ut [m, kt], vt [n, kt]; None
    for the copy variant), the adapter in its own type, or nothing (sets the plan's row and
    result). norms: a DoRA layer's base weight norms per side."""
    row, mod, device = plan.row, plan.module, options.device
    row.similarity_left, row.similarity_right = left, right
    row.similarity = (left + right) / 2
    row.margin = gate.margin(left, right, options.min_similarity)
    if adapters.is_adapter(mod):  # carried in its own type: copied, padded, DoRA magnitude per options
        if row.margin >= 0 or options.on_dissimilar == "copy":
            plan.result = adapters.port_module(plan, norms, options)
        else:
            row.action = Action.SKIPPED
        return
    up, down = mod.factors()  # [out, r], [r, in·kernel] float32, scale folded
    channels, kernel = plan.tgt_shape[1], mod.kernel
    if mod.down.shape[1] < channels:  # new input channels: zero columns
        d = mod.down.float()  # [r, in, *kernel]
        down = torch.cat([d, d.new_zeros(d.shape[0], channels - d.shape[1], *kernel)], 1).flatten(1)
    up, down = up.to(device), down.to(device)

    if row.margin < 0:
        if options.on_dissimilar == "skip":
            row.action, row.rank_out = Action.SKIPPED, None
            return
        row.action, row.rank_out, row.rel_change = Action.COPIED, mod.rank, 0.0
        new_up, new_down = up, down
    else:
        r_out = min(options.rank or mod.rank, mod.rank)
        if options.variant == "copy":
            if r_out < mod.rank:  # the best rank-r_out factors (Eckart–Young), from the factors
                new_up, new_down = (f[0] for f in ProductSVD(up[None], down[None]).factors(r_out))
            else:
                new_up, new_down = up, down
        elif options.variant == "source-then-target":
            us, vs, ut, vt = subspaces
            u1, d1 = _project(up, down, us, vs, min(mod.rank, us.shape[1]))
            new_up, new_down = _project(u1, d1, ut, vt, min(r_out, ut.shape[1]))
        else:
            _, _, ut, vt = subspaces
            new_up, new_down = _project(up, down, ut, vt, min(r_out, ut.shape[1]))
        row.action = Action.PADDED if mod.down.shape[1] < channels else Action.PORTED
        row.rank_out = new_up.shape[1]
        row.rel_change = 0.0 if new_up is up else _rel_change(up, down, new_up, new_down)
    factor = Strength.from_dict(options.strength)(mod.name)
    if factor != 1.0:  # in float32, before the cast to the output dtype: one rounding
        new_up = new_up * factor
        row.note = (row.note + f" strength {factor:g}").strip()
    plan.result = formats.module_from_factors(
        mod.component, mod.name, mod.key, new_up, new_down, (channels, *kernel), mod.up.dtype
    )
