"""`convert`: any adapter file (LoHa, LoKr, Tucker LoCon, full differences, DoRA, plain LoRA) to
a plain LoRA whose ΔW is the best rank-k approximation of each layer's (Eckart–Young), k = ``rank``
or the fewest singular values holding ``energy`` of ‖ΔW‖_F². `toolbox.resize` goes through the
same path, so it accepts these types too.

Per layer, from the structure wherever it helps (loraport/adapters.py has the ΔW formulas):
  * plain LoRA, Tucker LoCon (rank r) and LoHa (rank <= r1·r2, exact face-splitting factors):
    exact low-rank factors, then the SVD of their product from the p×p core (lowrank.ProductSVD,
    batched over same-shape layers: toolbox.truncate). Never forms the m×n ΔW.
  * LoKr: the SVD of w1 ⊗ w2 is the Kronecker product of the factors' SVDs (adapters.kron_svd):
    σ = s1_i·s2_j, u = u1_i ⊗ u2_j, v = v1_i ⊗ v2_j; the top k are taken from the two small SVDs.
  * full differences, and DoRA (whose update W' − W needs the base weight W: ``base``): no low-rank
    structure, so the dense ΔW goes through loraport.rsvd, same-shape layers batched in chunks of
    at most ``max_memory`` (as `extract`). With ``energy`` the rank is picked against the exact
    ‖ΔW‖_F² (at most ``rank``, default 128). A full difference's bias (`diff_b`) has no place in a
    plain LoRA and is left out; the report says so.
Each layer's report row has the kept energy Σ_{i<=k} σ_i² / ‖ΔW‖_F² and the relative error
‖ΔW_k − ΔW‖_F / ‖ΔW‖_F (exact for the factor and Kronecker paths; for rsvd, exact for its output
U_k S_k V_kᵀ = U_k U_kᵀ ΔW)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import torch

from . import adapters, formats, streaming
from .basemodel import BaseModel
from .errors import InputError
from .ops import rsvd
from .options import DEFAULT_EXTRACT_MAX_RANK, DEFAULT_MAX_MEMORY, ToolOptions
from .plans import locate
from .reports import Action, ToolReport, ToolRow
from .streaming import read_into
from .toolbox import Factors, finish, truncate


def plain_module(m, up: torch.Tensor, down: torch.Tensor, in_shape=None) -> formats.LoraModule:
    """A scale-1 plain LoraModule with m's name from factors up [out, k], down [k, in·kernel], in
    the dtype of m's tensors; ``in_shape`` (in, *kernel) defaults to m's."""
    dtype = adapters.dtype_of(m)
    return formats.module_from_factors(m.component, m.name, m.key, up, down, in_shape or m.shape[1:], dtype, m.known)


def _dense_delta(m, base: BaseModel | None, arch, style, base_style, label) -> tuple[torch.Tensor, tuple]:
    """(ΔW [out, in·kernel] float32, weight shape) of a full difference or a DoRA module (W' − W with
    the base weight W); InputError when a DoRA module has no base weight to go with."""
    if m.kind == "full" and not m.magnitude_axis:
        return m.tensors["diff"].flatten(1).float(), tuple(m.tensors["diff"].shape)
    if base is None:
        raise InputError(
            f"{label}: module '{m.key}' is {m.type_name}: its update depends on the base weight; "
            "convert it with the base model (loraport convert --base)"
        )
    pieces, shape = locate(arch, m, style, base, base_style)
    if pieces is None:
        raise InputError(f"{label}: module '{m.key}': {shape}")
    if not m.fits(shape):
        raise InputError(f"{label}: module '{m.key}' is {list(m.shape)} but the base weight is {list(shape)}")
    W = torch.empty(shape)  # [out, in, *kernel], row halves swapped where the layouts differ
    read_into(W, base, m.component, pieces)
    W = W.double()
    up, down = adapters.factors(adapters.without_magnitude(m))
    delta = (up.double() @ down.double()).reshape(W.shape)
    V = W + delta
    norm = adapters.axis_norms(V, m.magnitude_axis)  # [out] or [in]
    mag = m.tensors["magnitude"].double()
    scale = (mag / norm).reshape(-1, *[1] * (V.dim() - 1)) if m.magnitude_axis == "out" else (
        (mag / norm).reshape(1, -1, *[1] * (V.dim() - 2)))  # fmt: skip
    return (scale * V - W).flatten(1).float(), tuple(W.shape)


def _kron_layer(m, select, row: ToolRow) -> formats.LoraModule:
    """A LoKr module's best rank-k factors from the Kronecker SVD of its factors."""
    t = m.tensors
    U, S, V = adapters.kron_svd(adapters.lokr_w1(t), adapters.lokr_w2_flat(t))
    S = S * abs(m.scale)  # [p] descending
    U = U * math.copysign(1.0, m.scale)
    k = select(S, S.square().sum())
    root = S[:k].sqrt()
    s2 = S.square()
    total = float(s2.sum())
    row.rank_in, row.rank_out = S.numel(), k
    row.energy = float(s2[:k].sum()) / total if total > 0 else 1.0
    row.rel_error = math.sqrt(max(0.0, 1 - row.energy))
    return plain_module(m, (U[:, :k] * root).float(), (root[:, None] * V[:, :k].mT).float())


def _dense_layers(jobs, select, k_cap: int, energy, device, max_memory, seconds, bar) -> None:
    """Batched rsvd of dense ΔW: ``jobs`` [(module, ΔW [m, n] float32, shape, row, results list, index)],
    same-shape ones stacked in chunks that fit ``max_memory`` (ΔW, rsvd workspace and its copy)."""
    for (m_rows, n_cols), group in streaming.group(jobs, lambda job: tuple(job[1].shape)).items():
        per_layer = 4 * 3 * m_rows * n_cols  # ΔW, rsvd workspace and its copy
        for chunk in streaming.cut(group, max_memory, lambda size, per_layer=per_layer: size * per_layer):
            t0 = time.perf_counter()
            stack = torch.stack([j[1] for j in chunk]).to(device)  # [G, m, n]
            totals = [float(torch.linalg.vector_norm(j[1], dtype=torch.float64)) ** 2 for j in chunk]
            k_top = min(k_cap, m_rows, n_cols)
            fits = 3 * (k_top + 8) <= min(m_rows, n_cols)  # Krylov space within min(m, n): extract's rule
            U, S, V = rsvd(stack, k_top, method="krylov" if fits else "power", power_iters=2, oversample=8, seed=0)
            S_host = S.double().cpu()
            share = (time.perf_counter() - t0) / len(chunk)
            seconds["svd"] = seconds.get("svd", 0.0) + share * len(chunk)
            for g, (m, _, shape, row, results, index) in enumerate(chunk):
                total = totals[g]
                k = select(S_host[g], torch.tensor(total))
                root = S[g, :k].sqrt()
                kept = float(S_host[g, :k].square().sum())
                row.rank_in, row.rank_out, row.seconds = min(m_rows, n_cols), k, share
                row.energy = min(1.0, kept / total) if total > 0 else 1.0
                row.rel_error = math.sqrt(max(0.0, 1.0 - kept / total)) if total > 0 else 0.0
                if energy is not None and row.energy < energy * (1 - 1e-6) and k == k_top:
                    row.note = (row.note + "; " if row.note else "") + (
                        f"energy {row.energy:.4f} < {energy} at the rank cap {k_top}")  # fmt: skip
                results[index] = plain_module(m, U[g, :, :k] * root, root[:, None] * V[g, :, :k].mT, shape[1:])
            bar.update(len(chunk))


def low_rank_modules(lf, select, *, action, rank, energy, device, max_memory, seconds, bar, base=None, base_style=None):
    """(rows, plain LoraModules) of every module of ``lf`` truncated per ``select`` by the path
    its type allows (module docstring); rows get ``action``."""
    rows, results, factored, dense = [], [None] * len(lf.modules), [], []
    for i, m in enumerate(lf.modules):
        row = ToolRow(m.name, action, None, shape=list(m.shape))
        rows.append(row)
        if adapters.is_adapter(m) and (m.magnitude_axis or m.kind == "full"):
            delta, shape = _dense_delta(m, base, lf.arch, lf.style, base_style, lf.label)
            if "diff_b" in m.tensors:
                row.note = "bias difference left out (a plain LoRA has no bias)"
            dense.append((m, delta, shape, row, results, i))
        elif adapters.is_adapter(m) and m.kind == "lokr":
            t0 = time.perf_counter()
            results[i] = _kron_layer(m, select, row)
            row.seconds = time.perf_counter() - t0
            seconds["svd"] = seconds.get("svd", 0.0) + row.seconds
            bar.update(1)
        else:
            up, down = adapters.factors(m)  # [out, p], [p, in·kernel] exact, scale folded
            row.rank_in = up.shape[1]
            layout = m if _in_shape(m, lf, base, base_style) == m.shape[1:] else plain_module(
                m, up[:, :1], down[:1], _in_shape(m, lf, base, base_style))  # a flat LoHa in the base's kernel
            factored.append((i, Factors(layout, up, down, row)))
    truncate([it for _, it in factored], select, device, max_memory, seconds, bar)
    for i, it in factored:
        results[i] = it.result
    if dense:
        _dense_layers(dense, select, rank or DEFAULT_EXTRACT_MAX_RANK, energy, device, max_memory, seconds, bar)
    return rows, results


def _in_shape(m, lf, base, base_style):
    """(in, *kernel) of m's weight: its own shape, or the base's for a LoHa without Tucker, whose
    file keeps only in·kernel columns (without a base such a conv layer's down stays
    [k, in·kernel], which ComfyUI reshapes to the weight but diffusers does not)."""
    if not (adapters.is_adapter(m) and m.flat_kernel) or base is None:
        return m.shape[1:]
    pieces, shape = locate(lf.arch, m, lf.style, base, base_style)
    return tuple(shape[1:]) if pieces is not None else m.shape[1:]


def convert(
    adapter,
    out,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base=None,
    format: str = "auto",
    arch: str = "auto",
    device: str = "cpu",
    max_memory=DEFAULT_MAX_MEMORY,
    report=None,
    quiet: bool = False,
) -> ToolReport:
    """Write ``adapter`` (any type loraport reads) as a plain LoRA at ``out`` (``format``, default
    the input's) whose every layer is the best rank-k approximation of its ΔW: k = ``rank``, or
    the fewest singular values holding ``energy`` of ‖ΔW‖_F² (``rank`` then caps it). ``base``:
    the base model, needed for DoRA (its update depends on W) and for conv LoHa without Tucker
    factors (whose kernel size only the base knows). ``max_memory`` bounds each batch of dense
    layers (full differences, DoRA) on ``device``."""
    options = ToolOptions.from_args("convert", rank=rank, energy=energy, device=device, max_memory=max_memory)
    select, device = options.select(), options.device
    t_start = time.perf_counter()
    b = BaseModel(base) if base is not None else None
    lf = formats.read_lora(adapter, arch=arch, base_names=b.module_names() if b else ())
    inputs = [lf.path, *(b.files() if b else [])]
    out = formats.check_output(out, inputs)
    fmt = formats.output_format(format, lf.format)
    formats.check_format(fmt, lf.arch, [m.component for m in lf.modules], lf.label)
    base_style = lf.arch.base_style(b.module_names()) if b else None
    if b is not None and base_style is None:
        raise InputError(f"{b.label}: no {lf.arch.name} weights for {lf.label}")
    options = replace(options, base=None if b is None else b.label)
    seconds: dict = {}
    with streaming.progress(len(lf.modules), "converting", quiet) as bar:
        rows, results = low_rank_modules(
            lf, select, action=Action.CONVERTED, rank=rank, energy=energy, device=device, max_memory=options.max_memory,
            seconds=seconds, bar=bar, base=b, base_style=base_style,
        )  # fmt: skip
    rep = ToolReport(rows, "convert", lf.arch.name, fmt, [label for label in inputs if label], out, options.settings(), seconds)
    rep.bytes_read = b.bytes_read if b else 0
    rule = {k: v for k, v in dict(rank=rank, energy=energy).items() if v is not None}
    meta = {"loraport.job": "convert", "loraport.convert": json.dumps(rule)}
    result = formats.LoraFile([], lf.format, lf.arch, lf.style, dict(lf.metadata), None, lf.adapter_config)
    return finish(rep, result, results, out, format, meta, inputs, report, t_start)

