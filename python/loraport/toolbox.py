"""The other SVD jobs people run on LoRAs, on loraport's engine: `resize` (lower a LoRA's rank),
`extract` (a LoRA from the difference of two checkpoints) and `merge` (several weighted LoRAs
into one). LoHa, LoKr, Tucker LoCon and full-difference
inputs are taken through their exact low-rank factors (loraport/convert.py, adapters.py). Each
returns a `ToolReport` and writes like `port`: the same formats and key maps,
atomic writes, never over an input, InputError on bad input.

The math (ΔW = scale · up @ down, the scale always folded into the factors; outputs have scale 1,
kohya files alpha = rank):
  * Low-rank truncation from factors (resize; merge "svd"): the exact SVD of ΔW from the SVD of
    the small p×p core of the factors (`lowrank.ProductSVD`, math in loraport/lowrank.py), never
    forming the m×n ΔW. Keeping the top k triplets is the best rank-k approximation of ΔW in
    Frobenius norm (Eckart–Young); the error is sqrt(Σ_{i>k} σ_i²). Layers of the same (m, p, n)
    go through one batched call.
  * Rank per layer: ``rank`` (a fixed rank, or the cap of the dynamic rules), ``energy`` (the
    fewest σ holding that fraction of ‖ΔW‖_F²), ``sv_ratio`` (σ_i ≥ σ_1 / sv_ratio, as kohya's
    resize_lora.py); never more than the layer's rank.
  * Merge: Σ_i w_i ΔW_i = [w_1 up_1, w_2 up_2, ...] @ [down_1; down_2; ...] (stacked factors):
    mode "concat" writes that exactly (rank = sum of ranks); mode "svd" truncates it as above.
    Inputs are brought to the first one's naming style with formats.convert_style (exact).
  * Extract: ΔW = W_tuned − W_base (conv weights flattened to [out, in·kernel]) formed one batch of
    same-shape layers at a time, read lazily from the checkpoints (basemodel.BaseModel, the next
    batch read on a background thread), decomposed with loraport.rsvd on ``device``: up = U_k S_k^½,
    down = S_k^½ V_kᵀ. With ``energy`` the rank is picked from rsvd's singular values against the
    exact ‖ΔW‖_F² of the dense difference; the reported error sqrt(1 − Σ_{i≤k} s_i² / ‖ΔW‖_F²) is
    exact for rsvd's output (U_k S_k V_kᵀ = U_k U_kᵀ ΔW)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, replace

import torch

from . import adapters, archs, formats, streaming
from .basemodel import BaseModel
from .errors import InputError, NothingToPort
from .lowrank import ProductSVD
from .ops import rsvd
from .options import DEFAULT_EXTRACT_MAX_RANK, DEFAULT_MAX_MEMORY, MERGE_MODES, ToolOptions  # noqa: F401  (re-exported)
from .reports import Action, ToolReport, ToolRow


@dataclass
class Factors:
    """One layer's update ΔW = up @ down (scale folded) and where its result goes."""

    template: formats.LoraModule  # component, name, key, shape and the output dtype (or an AdapterModule)
    up: torch.Tensor  # [m, p] float32
    down: torch.Tensor  # [p, n] float32
    row: ToolRow
    result: formats.LoraModule | None = None


def _module(template, up: torch.Tensor, down: torch.Tensor, dtype) -> formats.LoraModule:
    """A scale-1 LoraModule from factors up [m, k], down [k, in·kernel] in the layout of the
    template (a LoraModule or adapters.AdapterModule)."""
    return formats.module_from_factors(
        template.component, template.name, template.key, up, down, template.shape[1:], dtype, template.known
    )


def truncate(items: list[Factors], select, device: str, max_memory: int, seconds: dict, bar) -> None:
    """Best rank-k factors of every item's up @ down (k from ``select``), from the factors only:
    same-shape items stacked into one batched call, cut to ``max_memory``."""
    for (m, p, n), group in streaming.group(items, lambda it: (*it.up.shape, it.down.shape[1])).items():
        per_layer = 8 * 3 * (m + n) * p  # factors, float64 copies, products
        for chunk in streaming.cut(group, max_memory, lambda size, per_layer=per_layer: size * per_layer):
            t0 = time.perf_counter()
            up = torch.stack([it.up for it in chunk]).to(device)  # [G, m, p]
            down = torch.stack([it.down for it in chunk]).to(device)  # [G, p, n]
            svd = ProductSVD(up, down)
            S_host = svd.S.cpu()  # [G, p]
            ks = [select(s, s.square().sum()) for s in S_host]
            new_up, new_down = svd.factors(max(ks))  # [G, m, k_max], [G, k_max, n]
            share = (time.perf_counter() - t0) / len(chunk)
            for g, it in enumerate(chunk):
                s2, k = S_host[g].square(), ks[g]
                total = float(s2.sum())
                it.result = _module(it.template, new_up[g, :, :k], new_down[g, :k], adapters.dtype_of(it.template))
                it.row.rank_out, it.row.seconds = k, share
                it.row.energy = float(s2[:k].sum()) / total if total > 0 else 1.0
                it.row.rel_error = math.sqrt(float(s2[k:].sum()) / total) if total > 0 else 0.0
            seconds["svd"] = seconds.get("svd", 0.0) + share * len(chunk)
            bar.update(len(chunk))


def finish(rep: ToolReport, lf: formats.LoraFile, results, out, fmt, meta, protect, report, t_start) -> ToolReport:
    """Write the output LoRA and the report; NothingToPort (report still written) when no layer
    produced anything."""
    fmt = formats.output_format(fmt, lf.format)
    rep.format_out = fmt
    if not results:
        rep.seconds["total"] = time.perf_counter() - t_start
        if report is not None:
            rep.to_json(report)
        actions = rep.summary()["actions"]
        raise NothingToPort(f"{rep.inputs[0]}: {rep.job} produced no layer ({actions}); nothing written to {out}")
    t0 = time.perf_counter()
    lf.modules = results
    formats.write_lora(lf, out, format=fmt, metadata=meta, protect=protect)
    rep.seconds["write"] = time.perf_counter() - t0
    rep.seconds["total"] = time.perf_counter() - t_start
    if report is not None:
        rep.to_json(report)
    return rep


def resize(
    lora,
    out,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    base=None,
    format: str = "auto",
    arch: str = "auto",
    device: str = "cpu",
    max_memory=DEFAULT_MAX_MEMORY,
    report=None,
    quiet: bool = False,
) -> ToolReport:
    """Lower the rank of every layer of ``lora`` to the Frobenius-optimal rank-k approximation of
    its ΔW (scale included), k = ``rank``, or chosen per layer by ``energy`` / ``sv_ratio``
    (``rank`` then caps it); write it to ``out`` (in ``format``, default the input's). A DoRA
    layer stays DoRA: its low-rank part ΔW is truncated so, its magnitude m is kept as trained,
    and its row reports the error of the effective update m ⊙ (W + ΔW') / ‖W + ΔW'‖ − W, which
    needs the base model ``base`` (InputError for a DoRA file without one)."""
    options = ToolOptions.from_args("resize", rank=rank, energy=energy, sv_ratio=sv_ratio, device=device,
                                    max_memory=max_memory)  # fmt: skip
    from .convert import low_rank_job  # every adapter type's path; convert.py imports this module

    return low_rank_job(options, lora, out, base=base, arch=arch, format=format, report=report, quiet=quiet)


def parse_weighted(entry) -> tuple[str, float]:
    """"a.safetensors:0.7" -> ("a.safetensors", 0.7); a (path, weight) pair or a bare path
    (weight 1) pass through."""
    if isinstance(entry, (tuple, list)):
        return os.fspath(entry[0]), float(entry[1])
    text = os.fspath(entry)
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def merge(
    loras,
    out,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    mode: str = "svd",
    format: str = "auto",
    arch: str = "auto",
    device: str = "cpu",
    max_memory=DEFAULT_MAX_MEMORY,
    report=None,
    quiet: bool = False,
) -> ToolReport:
    """Merge weighted LoRAs (``loras``: "path:weight" strings or (path, weight) pairs) into one
    LoRA of the first one's arch, naming style and format: ΔW = Σ w_i ΔW_i per module. Mode
    "concat" is exact (stacked factors, rank = sum of ranks); mode "svd" keeps its best rank-k
    approximation, k = ``rank`` (default: the largest rank in the input files) or chosen by
    ``energy`` / ``sv_ratio``. A module present in only some inputs is merged from those (the
    others contribute nothing) and reported."""
    entries = [parse_weighted(e) for e in loras]
    options = ToolOptions.from_args("merge", mode=mode, rank=rank, energy=energy, sv_ratio=sv_ratio, loras=entries,
                                    device=device, max_memory=max_memory)  # fmt: skip
    select, device = options.select(), options.device
    t_start = time.perf_counter()
    files = [formats.read_lora(path, arch=arch) for path, _ in entries]
    first = files[0]
    out = formats.check_output(out, [lf.path for lf in files])
    for lf in files[1:]:
        if lf.arch.name != first.arch.name:
            raise InputError(f"{lf.label}: a {lf.arch.name} LoRA, but {first.label} is a {first.arch.name} LoRA")
    formats.check_format(formats.output_format(format, first.format), first.arch,
                         [m.component for lf in files for m in lf.modules], first.label)  # fmt: skip
    if mode == "svd" and rank is None and energy is None and sv_ratio is None:
        select = options.select(max(m.rank for lf in files for m in lf.modules))
    options = replace(options, loras=[[lf.label, w] for lf, (_, w) in zip(files, entries, strict=True)])

    # module (component, name) -> [(input index, module in the first input's naming style)]
    by_module: dict[tuple[str, str], list[tuple[int, formats.LoraModule]]] = {}
    for i, lf in enumerate(files):
        for m in formats.convert_style(lf, first.style):
            by_module.setdefault((m.component, m.name), []).append((i, m))
    items, results, rows = [], [], []
    for parts in by_module.values():
        m0 = parts[0][1]
        layout = m0.shape  # [out, in, *kernel]
        ups, downs = [], []
        for i, m in parts:
            if m.shape != layout:
                raise InputError(
                    f"{files[i].label}: module '{m.key}' is {list(m.shape)} but "
                    f"{list(layout)} in {files[parts[0][0]].label}: the LoRAs are for different models"
                )
            if adapters.magnitude_axis(m):
                raise InputError(
                    f"{files[i].label}: module '{m.key}' is {m.type_name}: its update depends on the base "
                    "weight, so it has no low-rank factors to merge; convert it first (loraport convert --base)"
                )
            up, down = adapters.factors(m)  # [out, r_i], [r_i, in·kernel]; exact for LoHa, LoKr, ...
            ups.append(up * entries[i][1])
            downs.append(down)
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)  # [out, Σr], [Σr, in·kernel]
        row = ToolRow(m0.name, Action.CONCATENATED if mode == "concat" else Action.MERGED, up.shape[1], shape=list(layout))
        rows.append(row)
        if len(parts) < len(files):
            row.note = "in " + ", ".join(os.path.basename(files[i].label) for i, _ in parts) + " only"
        if mode == "concat":
            row.rank_out, row.energy, row.rel_error = up.shape[1], 1.0, 0.0
            results.append(_module(m0, up, down, adapters.dtype_of(m0)))
        else:
            items.append(Factors(m0, up, down, row))
    rep = ToolReport(rows, "merge", first.arch.name, format, [lf.label for lf in files], out, options.settings())
    if items:
        with streaming.progress(len(items), "merging", quiet) as bar:
            truncate(items, select, device, options.max_memory, rep.seconds, bar)
        results = [it.result for it in items]
    meta = {
        "loraport.job": "merge",
        "loraport.merge": json.dumps([[os.path.basename(p), w] for p, w in entries]),
        "loraport.merge_mode": mode,
    }
    result = formats.LoraFile([], first.format, first.arch, first.style, {}, None, None)
    return finish(rep, result, results, out, format, meta, [lf.path for lf in files], report, t_start)


@dataclass
class _Layer:
    """One base weight to extract a LoRA for."""

    component: str
    name: str  # module name (the base's naming style)
    shape: tuple  # [out, in, *kernel]
    dtype: torch.dtype  # the tuned weight's
    row: ToolRow


def _extract_layers(arch: archs.Arch, base: BaseModel, tuned: BaseModel, include, exclude, conv: bool):
    """The key-map modules of ``base`` to extract (2-d weights, and conv ones when ``conv``),
    filtered by the ``include`` / ``exclude`` regexes; rows for those missing or reshaped in
    ``tuned``."""
    layers = []
    for comp in base.components():
        for name in base.module_names(comp):
            weight = name + ".weight"
            shape = base.shape(comp, weight)
            if len(shape) < 2 or (len(shape) > 2 and not conv) or arch.style_of(comp, name) is None:
                continue
            if (include and not re.search(include, name)) or (exclude and re.search(exclude, name)):
                continue
            row = ToolRow(name, Action.EXTRACTED, shape=list(shape))
            if not tuned.has(comp, weight):
                row.action, row.note = Action.MISSING, f"{tuned.label} has no '{weight}'"
            elif tuned.shape(comp, weight) != shape:
                row.action = Action.SHAPE_MISMATCH
                row.note = f"base {list(shape)} vs tuned {list(tuned.shape(comp, weight))}"
            layers.append(_Layer(comp, name, shape, tuned.dtype(comp, weight), row))
    return layers


def extract(
    base,
    tuned,
    out,
    *,
    rank: int | None = None,
    energy: float | None = None,
    conv: bool = True,
    include: str | None = None,
    exclude: str | None = None,
    min_rel_diff: float = 0.0,
    format: str = "kohya",
    arch: str = "auto",
    dtype=None,
    device: str = "cpu",
    method: str = "auto",
    power_iters: int = 2,
    oversample: int = 8,
    seed: int = 0,
    max_memory=DEFAULT_MAX_MEMORY,
    report=None,
    quiet: bool = False,
) -> ToolReport:
    """A LoRA of ``W_tuned − W_base`` for every key-map module of the base (``include`` /
    ``exclude``: regexes on the module names; ``conv``: conv weights too, flattened), written to
    ``out`` in ``format`` with the arch's key names. Rank ``rank``, or per layer the fewest
    singular values holding ``energy`` of ‖ΔW‖_F² (at most ``rank``, default 128). Layers whose
    ‖ΔW‖_F / ‖W_base‖_F is below ``min_rel_diff`` (or zero) are "unchanged" and left out. The
    factors are stored in ``dtype`` (default: the tuned weight's). ``method="auto"``: rsvd's block
    Krylov where its whole Krylov space ((power_iters + 1)·(k + oversample) columns) fits in
    min(m, n), else power iteration: on slowly decaying spectra (fine-tune differences) Krylov's
    error is within 0.2 % of optimal where power iteration's is about 1 %, for the same passes
    over ΔW (measured at 768 wide, rank 64, q = 2), but on small layers the op truncates the
    Krylov space to its first block."""
    options = ToolOptions.from_args(
        "extract", rank=rank, energy=energy, conv=conv, include=include, exclude=exclude, min_rel_diff=min_rel_diff,
        device=device, method=method, power_iters=power_iters, oversample=oversample, seed=seed,
        max_memory=max_memory,
    )  # fmt: skip
    format = formats.output_format(format, "kohya")
    select, device = options.select(DEFAULT_EXTRACT_MAX_RANK), options.device
    t_start = time.perf_counter()
    b, t = BaseModel(base), BaseModel(tuned)
    inputs = [*b.files(), *t.files()]
    out = formats.check_output(out, inputs)
    arch = archs.resolve(arch, b.label, base_names=b.module_names())
    style = arch.base_style(b.module_names())
    if style is None:
        raise InputError(f"{b.label}: no {arch.name} weights (first tensor '{next(iter(b.names()), '')}')")
    layers = _extract_layers(arch, b, t, include, exclude, conv)
    work = [la for la in layers if la.row.action == Action.EXTRACTED]
    formats.check_format(format, arch, [la.component for la in work], t.label)
    rep = ToolReport([la.row for la in layers], "extract", arch.name, format, [b.label, t.label], out, options.settings())
    k_cap = rank or DEFAULT_EXTRACT_MAX_RANK
    svd = dict(oversample=oversample, power_iters=power_iters, seed=seed)

    chunks = []
    for shape, group in streaming.group(work, lambda la: la.shape).items():
        per_layer = 4 * 3 * math.prod(shape)  # ΔW, rsvd workspace, reads
        chunks += streaming.cut(group, options.max_memory, lambda size, per_layer=per_layer: size * per_layer)
    slot_bytes = max((4 * len(c) * math.prod(c[0].shape) for c in chunks), default=0)  # one chunk's ΔW a slot

    def load(chunk, slot):
        """ΔW of the chunk's layers that changed enough, stacked in staging slot ``slot``:
        ([G', m, n] float32, ‖ΔW‖_F² per layer), and the read time."""
        t0 = time.perf_counter()
        shape = chunk[0].shape
        diffs = stream.staging.take(slot, (len(chunk), shape[0], math.prod(shape[1:])), torch.float32)  # filled in place
        totals = []
        for la in chunk:
            w_base = b.read(la.component, la.name + ".weight").float()
            diff = diffs[len(totals)]
            diff.copy_(t.read(la.component, la.name + ".weight").flatten(1)).sub_(w_base.flatten(1))
            total = float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            norm = float(torch.linalg.vector_norm(w_base, dtype=torch.float64))
            la.row.rel_diff = math.sqrt(total) / norm if norm > 0 else math.inf
            if total == 0 or la.row.rel_diff < min_rel_diff:
                la.row.action = Action.UNCHANGED
                la.row.note = f"relative difference {la.row.rel_diff:.3g} < {min_rel_diff:g}" if total else "identical"
                continue
            totals.append(total)
        return (diffs[: len(totals)] if totals else None), totals, slot, time.perf_counter() - t0

    results = []
    stream = streaming.Stream(slot_bytes, device)
    with streaming.progress(len(work), "extracting", quiet) as bar, stream:
        for chunk, (diffs, totals, slot, t_read) in stream.each(chunks, load):
            rep.seconds["read"] = rep.seconds.get("read", 0.0) + t_read
            bar.update(len(chunk))
            bar.set_postfix_str(f"{(b.bytes_read + t.bytes_read) / 1e9:.2f} GB read")
            if diffs is None:
                continue
            t0 = time.perf_counter()
            m, n = diffs.shape[-2:]
            fits = (power_iters + 1) * (min(k_cap, m, n) + oversample) <= min(m, n)
            how = ("krylov" if fits else "power") if method == "auto" else method
            U, S, V = rsvd(stream.staging.to_device(slot, diffs, device), k_cap, method=how, **svd)  # [G, m, k], [G, k], [G, n, k]
            S_host = S.double().cpu()
            ks = [select(s, torch.tensor(total)) for s, total in zip(S_host, totals, strict=True)]
            done = [la for la in chunk if la.row.action == Action.EXTRACTED]
            share = (time.perf_counter() - t0) / len(done)
            rep.seconds["svd"] = rep.seconds.get("svd", 0.0) + share * len(done)
            for g, la in enumerate(done):
                k, root = ks[g], S[g, : ks[g]].sqrt()  # [k]
                kept = float(S_host[g, :k].square().sum())
                up, down = U[g, :, :k] * root, root[:, None] * V[g, :, :k].mT  # [m, k], [k, n]
                layout = formats.LoraModule(la.component, la.name, up, torch.empty(0, *la.shape[1:]), None, la.name)
                results.append(_module(layout, up, down, dtype or la.dtype))
                la.row.rank_out, la.row.seconds = k, share
                la.row.energy = min(1.0, kept / totals[g])
                la.row.rel_error = math.sqrt(max(0.0, 1.0 - kept / totals[g]))
                if energy is not None and kept < energy * totals[g] * (1 - 1e-6) and k == k_cap:
                    la.row.note = f"energy {kept / totals[g]:.4f} < {energy} at the rank cap {k_cap}"
    rep.bytes_read = b.bytes_read + t.bytes_read
    meta = {
        "loraport.job": "extract",
        "loraport.base": os.path.basename(b.label),
        "loraport.tuned": os.path.basename(t.label),
    }
    result = formats.LoraFile([], format, arch, style, {}, None, None)
    return finish(rep, result, results, out, format, meta, inputs, report, t_start)
