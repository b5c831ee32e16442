"""The porting pipeline (LoRA-X): LoRA file -> key map -> layer groups (streamed) -> subspaces ->
projection -> writer, returning a `PortReport`.

Per adapted layer, with W_s, W_t the source and target base weights (conv weights flattened to
[out, in·kernel]; fused/split layouts mapped by archs.Arch.translate):
  * U, V: top-k left/right singular vectors of W_s and W_t from loraport.rsvd; layers of the same
    shape are stacked into one batched call, one group at a time (the next group is read on a
    background thread meanwhile); k = ``subspace_rank``, or with ``energy`` the smallest k whose
    singular values keep that fraction of ‖W‖_F² (searched up to ``subspace_rank``, default
    min(m, n)).
  * similarity = (sim(U_s, U_t) + sim(V_s, V_t)) / 2 with sim = ‖U_sᵀU_t‖_F² / k ∈ [0, 1]: the
    mean of the column- and row-space overlaps, since ΔW is projected on both sides.
  * below ``min_similarity``: "skipped" (left out of the output) or, with on_dissimilar="copy",
    "copied" unchanged; always reported.
  * otherwise ΔW = scale·up·down is projected with loraport.project_lora, never formed densely:
    variant "target": U_t U_tᵀ ΔW V_t V_tᵀ; "source-then-target": the same applied to
    U_s U_sᵀ ΔW V_s V_sᵀ. The scale is folded into the factors, so the output has scale 1
    (kohya: alpha = rank) and its ΔW equals the projected ΔW whatever the input's alpha
    convention. Output rank = min(``rank`` or r, r, k).
  * shapes: a target weight with more input channels (dim 1, same outputs and kernel; e.g.
    HunyuanVideo-I2V v1's img_in, 16 -> 33 channels) is "padded": the LoRA's down factor and the
    source weight get zero columns for the new channels (what diffusers does when it loads such a
    LoRA), then the layer is ported as usual (the projection may move some of the update onto
    the new channels). Any other difference is "shape-mismatch" and the layer is skipped.
    Modules missing in a base ("missing") or absent from the key map ("unknown") are skipped.
``dry_run`` maps every module and checks shapes from the file headers only (no SVD, no output)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from . import archs, formats
from .basemodel import BaseModel
from .errors import InputError
from .ops import project_lora, rsvd, subspace_similarity

VARIANTS = ("target", "source-then-target")
ON_DISSIMILAR = ("skip", "copy")
DEFAULT_SUBSPACE_RANK = 64  # gate-safe (k/n <= 1/4 on real widths); retention wants more: benchmarks/quality
DEFAULT_MIN_SIMILARITY = 0.5  # separates related (>= 0.86) from unrelated (<= 0.27) layers: benchmarks/quality
DEFAULT_MAX_MEMORY = 2 << 30


@dataclass
class LayerRow:
    """What happened to one LoRA module."""

    name: str  # key stem in the LoRA file
    module: str  # module name (LoRA's naming style)
    action: str  # ported | padded | copied | skipped | shape-mismatch | missing | unknown | planned
    rank_in: int
    rank_out: int | None = None
    shape: list[int] | None = None  # source base weight [out, in, *kernel]
    target_shape: list[int] | None = None
    subspace_rank: list[int] | None = None  # [k_source, k_target]
    similarity: float | None = None  # mean of left and right subspace similarity
    similarity_left: float | None = None
    similarity_right: float | None = None
    rel_change: float | None = None  # ‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F
    note: str = ""


@dataclass
class PortReport:
    """Per-layer rows plus run facts; `summary()` for totals, `to_json()` for files."""

    rows: list[LayerRow]
    arch: str
    format_in: str
    format_out: str | None
    lora: str
    source: str
    target: str
    out: str | None
    settings: dict
    seconds: dict = field(default_factory=dict)  # read, svd, project, write, total
    bytes_read: int = 0

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.action] = counts.get(r.action, 0) + 1
        sims = [r.similarity for r in self.rows if r.similarity is not None]
        changes = [r.rel_change for r in self.rows if r.rel_change is not None]
        return {
            "layers": len(self.rows),
            "actions": counts,
            "similarity_mean": sum(sims) / len(sims) if sims else None,
            "similarity_min": min(sims) if sims else None,
            "rel_change_mean": sum(changes) / len(changes) if changes else None,
            "gb_read": self.bytes_read / 1e9,
            "seconds": self.seconds,
        }

    def to_json(self, path=None) -> str:
        """The report as JSON (written atomically to ``path`` when given)."""
        doc = {k: v for k, v in asdict(self).items() if k != "rows"}
        doc["summary"] = self.summary()
        doc["layers"] = [asdict(r) for r in self.rows]
        text = json.dumps(doc, indent=2)
        if path is not None:

            def dump(tmp):
                with open(tmp, "w") as f:
                    f.write(text)

            formats.atomic_write(path, dump, protect=(self.lora, self.source, self.target))
        return text

    def table(self) -> str:
        """A human-readable summary: one line per non-ported layer, then totals."""
        lines = []
        for r in self.rows:
            if r.action not in ("ported", "planned"):
                sim = f" similarity {r.similarity:.3f}" if r.similarity is not None else ""
                lines.append(f"  {r.action:<14} {r.module}{sim} {r.note}".rstrip())
        s = self.summary()
        acts = ", ".join(f"{n} {a}" for a, n in sorted(s["actions"].items()))
        sim = (
            f"; similarity mean {s['similarity_mean']:.3f}, min {s['similarity_min']:.3f}"
            if s["similarity_mean"] is not None
            else ""
        )
        secs = self.seconds.get("total")
        tail = f"; {s['gb_read']:.3f} GB read" + (f" in {secs:.1f} s" if secs is not None else "")
        lines.append(f"{s['layers']} layers: {acts}{sim}{tail}")
        return "\n".join(lines)


@dataclass
class _Plan:
    """One LoRA module mapped onto both bases."""

    module: formats.LoraModule
    row: LayerRow
    src_pieces: list = field(default_factory=list)  # [(base name, row slice)]
    tgt_pieces: list = field(default_factory=list)
    src_shape: tuple = ()
    tgt_shape: tuple = ()
    result: formats.LoraModule | None = None  # the ported or copied module


def parse_bytes(value) -> int:
    """2147483648, "2GB", "512MiB", "1.5G" -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise ValueError(f"loraport: cannot read a size from {value!r} (e.g. 2GB, 512MiB)")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def _locate(arch, m: formats.LoraModule, style: str, base: BaseModel, base_style: str):
    """([(name, rows, archs.Piece)], shape) of the module's weight in ``base``, or (None, why)."""
    pieces = arch.translate(m.name, style, base_style)
    if pieces is None:
        return None, f"no {base_style}-style counterpart in the key map"
    out, rows_total, rest = [], 0, None
    for p in pieces:
        name = p.name + ".weight"
        if not base.has(m.component, name):
            return None, f"{base.label} has no '{name}'"
        shape = base.shape(m.component, name)
        try:
            rows = p.rows(shape[0])
        except ValueError as e:
            return None, str(e)
        if rest is not None and tuple(shape[1:]) != rest:
            return None, f"split weights of {m.name} differ in input shape"
        rest = tuple(shape[1:])
        out.append((name, rows if p.total > 1 else None, p))
        rows_total += rows.stop - rows.start
    return out, (rows_total, *rest)


def _read(base: BaseModel, component: str, pieces, channels: int) -> torch.Tensor:
    """The module's weight as float32 [out, channels·kernel] (zero input channels appended up
    to ``channels``)."""
    # [out, in, *k]; piece.arrange puts the rows in the LoRA's layout (archs.Piece.swap_halves)
    w = torch.cat([piece.arrange(base.read(component, name, rows)).float() for name, rows, piece in pieces], 0)
    if w.shape[1] < channels:
        w = torch.cat([w, w.new_zeros(w.shape[0], channels - w.shape[1], *w.shape[2:])], 1)
    return w.flatten(1)


def _frob2(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """‖up @ down‖_F² from the r×r Gram matrices, in float64."""
    up, down = up.double(), down.double()
    return ((up.mT @ up) * (down @ down.mT)).sum()


def _rel_change(up_in, down_in, up_out, down_out) -> float:
    denom = _frob2(up_in, down_in)
    diff = _frob2(torch.cat([up_out, -up_in], 1), torch.cat([down_out, down_in], 0))
    return float(diff.clamp_min(0).sqrt() / denom.sqrt()) if denom > 0 else 0.0


def _energy_rank(S: torch.Tensor, total: torch.Tensor, energy: float) -> int:
    """Smallest k with sum(S[:k]²) >= energy · total (``total`` = ‖W‖_F²), at most len(S)."""
    kept = torch.cumsum(S.double().square(), 0)
    return min(int((kept < energy * total).sum()) + 1, S.numel())


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
    variant: str = "target",
    power_iters: int = 2,
    method: str = "power",
    oversample: int = 8,
    seed: int = 0,
    max_memory=DEFAULT_MAX_MEMORY,
    report=None,
    dry_run: bool = False,
    quiet: bool = False,
) -> PortReport:
    """Port ``lora`` (path or state dict) from base ``source`` to base ``target`` (paths to a
    safetensors file, sharded index, .pt checkpoint or diffusers folder, or state dicts), write
    it to ``out`` (in ``format``, default the input's) unless ``dry_run``, write the JSON report
    to ``report`` if given, and return the PortReport. See the module docstring for the method.
    ``max_memory`` (bytes or "2GB") bounds the float32 weights of one batched group on
    ``device``."""
    if variant not in VARIANTS:
        raise ValueError(f"loraport.port: variant must be one of {VARIANTS}, got {variant!r}")
    if on_dissimilar not in ON_DISSIMILAR:
        raise ValueError(f"loraport.port: on_dissimilar must be one of {ON_DISSIMILAR}, got {on_dissimilar!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"loraport.port: energy must be in (0, 1], got {energy!r}")
    if energy is None and subspace_rank is None:
        subspace_rank = DEFAULT_SUBSPACE_RANK
    for name, value in (("subspace_rank", subspace_rank), ("rank", rank)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"loraport.port: {name} must be a positive integer, got {value!r}")
    if out is None and not dry_run:
        raise ValueError("loraport.port: give out= (the output path) or dry_run=True")
    settings = dict(
        device=device, subspace_rank=subspace_rank, energy=energy, min_similarity=min_similarity,
        on_dissimilar=on_dissimilar, rank=rank, variant=variant, power_iters=power_iters,
        method=method, oversample=oversample, seed=seed, max_memory=parse_bytes(max_memory), dry_run=dry_run,
    )  # fmt: skip
    t_start = time.perf_counter()

    src, tgt = BaseModel(source), BaseModel(target)
    lf = formats.read_lora(lora, arch=arch, base_names=src.module_names())
    inputs = [lf.path, *src.files(), *tgt.files()]
    if not dry_run:
        out = os.path.abspath(os.fspath(out))
        formats.check_not_input(out, inputs)
        if not os.path.isdir(os.path.dirname(out)):
            raise InputError(f"{out}: output folder {os.path.dirname(out)} does not exist")
    styles = _base_styles(lf, src, tgt)
    plans = [_plan(m, lf, src, tgt, styles) for m in lf.modules]
    seconds = dict(read=0.0, svd=0.0, project=0.0, write=0.0)
    if not dry_run:
        _run([p for p in plans if p.row.action == "planned"], src, tgt, settings, seconds, quiet)

    rep = PortReport(
        rows=[p.row for p in plans], arch=lf.arch.name, format_in=lf.format,
        format_out=None if dry_run else (lf.format if format in (None, "auto") else format),
        lora=lf.label, source=src.label, target=tgt.label, out=None if dry_run else out,
        settings=settings, seconds=seconds, bytes_read=src.bytes_read + tgt.bytes_read,
    )  # fmt: skip
    if not dry_run:
        modules = [p.result for p in plans if p.result is not None]
        if not modules:
            if report is not None:
                rep.to_json(report)
            raise InputError(
                f"{lf.label}: no module was ported or copied ({rep.summary()['actions']}); nothing written to {out}"
            )
        t0 = time.perf_counter()
        result = formats.LoraFile(modules, lf.format, lf.arch, lf.style, dict(lf.metadata), None, lf.adapter_config)
        meta = {
            "loraport.source": os.path.basename(src.label),
            "loraport.target": os.path.basename(tgt.label),
            "loraport.variant": variant,
        }
        formats.write_lora(result, out, format=format, metadata=meta, protect=inputs)
        seconds["write"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    if report is not None:
        rep.to_json(report)
    return rep


def _base_styles(lf: formats.LoraFile, src: BaseModel, tgt: BaseModel) -> dict[str, str]:
    """The naming style of each base; InputError when a base is of another architecture."""
    a, styles = lf.arch, {}
    for which, base in (("source", src), ("target", tgt)):
        try:
            base_arch = archs.detect([], base.module_names()).name
        except ValueError:  # ambiguous or unknown on its own: judged by the template match below
            base_arch = a.name
        if base_arch != a.name and {base_arch, a.name} != {"sd15", "sdxl"}:
            raise InputError(f"{lf.label}: a {a.name} LoRA, but the {which} base {base.label} is a {base_arch} model")
        names = base.module_names()
        hits = {s: sum(1 for n in names if a.match(s, "model", n)) for s in a.styles}
        styles[which] = max(hits, key=hits.get)
        if not hits[styles[which]]:
            example = next(iter(base.names()), "(no tensors)")
            raise InputError(
                f"{base.label}: the {which} base has no {a.name} weights (first tensor '{example}') "
                f"but {lf.label} is a {a.name} LoRA"
            )
    return styles


def _plan(m: formats.LoraModule, lf: formats.LoraFile, src: BaseModel, tgt: BaseModel, styles) -> _Plan:
    """Map one module onto both bases and decide from the shapes what can be done with it."""
    row = LayerRow(m.key, m.name, "planned", m.rank)
    plan = _Plan(m, row)
    if not m.known:
        row.action, row.note = "unknown", f"not a module of the {lf.arch.name} key map"
        return plan
    sp, sshape = _locate(lf.arch, m, lf.style, src, styles["source"])
    tp, tshape = _locate(lf.arch, m, lf.style, tgt, styles["target"])
    if sp is None or tp is None:
        row.action, row.note = "missing", (sshape if sp is None else tshape)
        return plan
    plan.src_pieces, plan.tgt_pieces, plan.src_shape, plan.tgt_shape = sp, tp, sshape, tshape
    row.shape, row.target_shape = list(sshape), list(tshape)
    lora_shape = (m.up.shape[0], *m.down.shape[1:])
    if lora_shape != tuple(sshape):
        raise InputError(
            f"{lf.label}: module '{m.key}' is {list(lora_shape)} (up rows, down input dims) but "
            f"the source weight is {list(sshape)} in {src.label}: LoRA and source base do not match"
        )
    if tshape != sshape:
        widened = tshape[0] == sshape[0] and tshape[2:] == sshape[2:] and tshape[1] > sshape[1]
        if not widened:
            row.action, row.note = "shape-mismatch", f"source {list(sshape)} vs target {list(tshape)}"
        else:
            row.note = f"input channels {sshape[1]} -> {tshape[1]}: new channels zero in the input LoRA"
    return plan


def _run(work: list[_Plan], src: BaseModel, tgt: BaseModel, settings: dict, seconds: dict, quiet: bool) -> None:
    """Stream the planned layers: same-shape groups, cut to the memory budget, each read on a
    background thread while the previous one is computed."""
    from tqdm.auto import tqdm

    by_shape: dict[tuple, list[_Plan]] = {}
    for p in work:
        by_shape.setdefault((p.src_shape, p.tgt_shape), []).append(p)
    chunks = []
    for (_, tshape), group in by_shape.items():
        per_layer = 4 * 3 * math.prod(tshape)  # float32 source + target + rsvd workspace
        size = max(1, settings["max_memory"] // per_layer)
        chunks += [group[i : i + size] for i in range(0, len(group), size)]

    def load(chunk):
        t0 = time.perf_counter()
        channels = chunk[0].tgt_shape[1]
        # Sources then targets in one tensor, so both releases go through one batched rsvd call.
        weights = [_read(src, p.module.component, p.src_pieces, channels) for p in chunk]
        weights += [_read(tgt, p.module.component, p.tgt_pieces, channels) for p in chunk]
        return torch.stack(weights), time.perf_counter() - t0  # [2G, m, n]

    with tqdm(total=len(work), unit="layer", disable=quiet, desc="porting") as bar, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            weights, t_read = pending.result()
            pending = pool.submit(load, chunks[i + 1]) if i + 1 < len(chunks) else None
            seconds["read"] += t_read
            _port_chunk(chunk, weights, settings, seconds)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{(src.bytes_read + tgt.bytes_read) / 1e9:.2f} GB read")


def _port_chunk(chunk: list[_Plan], weights: torch.Tensor, settings: dict, seconds: dict):
    """Subspaces of one batch of same-shape layers, then similarity and projection per layer
    (sets each plan's row and result). weights: [2G, m, n] float32, G sources then G targets."""
    device = settings["device"]
    t0 = time.perf_counter()
    G, (m, n) = len(chunk), weights.shape[-2:]
    ws, wt = weights[:G], weights[G:]  # [G, m, n] each
    k_max = min(settings["subspace_rank"] or min(m, n), m, n)
    svd = dict(
        oversample=settings["oversample"],
        power_iters=settings["power_iters"],
        method=settings["method"],
        seed=settings["seed"],
    )
    U, S, V = rsvd(weights.to(device), k_max, **svd)  # [2G, m, k], [2G, k], [2G, n, k]
    (Us, Ut), (Ss, St), (Vs, Vt) = U.split(G), S.split(G), V.split(G)
    seconds["svd"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    energy = settings["energy"]
    for g, plan in enumerate(chunk):
        row, mod = plan.row, plan.module
        if energy is None:
            ks = kt = k_max
        else:
            ks = _energy_rank(Ss[g].cpu(), ws[g].double().square().sum(), energy)
            kt = _energy_rank(St[g].cpu(), wt[g].double().square().sum(), energy)
        us, vs, ut, vt = Us[g, :, :ks], Vs[g, :, :ks], Ut[g, :, :kt], Vt[g, :, :kt]
        left, right = float(subspace_similarity(us, ut)), float(subspace_similarity(vs, vt))
        row.subspace_rank, row.similarity_left, row.similarity_right = [ks, kt], left, right
        row.similarity = (left + right) / 2

        up, down = mod.factors()  # [out, r], [r, in·kernel] float32, scale folded
        channels, kernel = plan.tgt_shape[1], mod.kernel
        if mod.down.shape[1] < channels:  # new input channels: zero columns
            d = mod.down.float()  # [r, in, *kernel]
            down = torch.cat([d, d.new_zeros(d.shape[0], channels - d.shape[1], *kernel)], 1).flatten(1)
        up, down = up.to(device), down.to(device)

        if row.similarity < settings["min_similarity"]:
            if settings["on_dissimilar"] == "skip":
                row.action, row.rank_out = "skipped", None
                continue
            row.action, row.rank_out, row.rel_change = "copied", mod.rank, 0.0
            new_up, new_down = up, down
        else:
            r_out = min(settings["rank"] or mod.rank, mod.rank, kt)
            if settings["variant"] == "source-then-target":
                u1, d1 = project_lora(up, down, us, vs)
                new_up, new_down = project_lora(u1, d1, ut, vt, rank=r_out)
            else:
                new_up, new_down = project_lora(up, down, ut, vt, rank=r_out)
            row.action = "padded" if mod.down.shape[1] < channels else "ported"
            row.rank_out = new_up.shape[1]
            row.rel_change = _rel_change(up, down, new_up, new_down)
        r_out, dtype = new_up.shape[1], mod.up.dtype
        plan.result = formats.LoraModule(
            mod.component,
            mod.name,
            new_up.reshape(new_up.shape[0], r_out, *([1] * len(kernel))).to("cpu", dtype),  # [out, r', 1...]
            new_down.reshape(r_out, channels, *kernel).to("cpu", dtype),  # [r', in, *kernel]
            None,
            mod.key,
        )
    seconds["project"] += time.perf_counter() - t0
