"""`convert`: any adapter file (LoHa, LoKr, Tucker LoCon, full differences, DoRA, plain LoRA) to
a plain LoRA whose ΔW is the best rank-k approximation of each layer's (Eckart–Young), k = ``rank``
or the fewest singular values holding ``energy`` of ‖ΔW‖_F². `toolbox.resize` goes through the
same paths, so it accepts these types too (a DoRA stays a DoRA there: `low_rank_modules`).

Per layer, from the structure wherever it helps (loraport/adapters.py has the ΔW formulas):
  * plain LoRA, Tucker LoCon (rank r) and LoHa (rank <= p = r1·r2, exact face-splitting factors):
    exact low-rank factors, then the SVD of their product from the p×p core (lowrank.ProductSVD,
    batched over same-shape layers: toolbox.truncate). Never forms the m×n ΔW.
  * LoKr: the SVD of w1 ⊗ w2 is the Kronecker product of the factors' SVDs (adapters.kron_svd):
    σ = s1_i·s2_j, u = u1_i ⊗ u2_j, v = v1_i ⊗ v2_j; the top k are taken from the two small SVDs.
  * full differences, DoRA (whose update W' − W needs the base weight W: ``base``) and LoHa layers
    whose p is large against the layer and the rsvd's width (`loha_is_dense`: there the p×p work
    costs more):
    the dense ΔW goes through loraport.rsvd, same-shape layers batched in chunks of at most
    ``max_memory`` (as `extract`), each chunk's ΔW formed only when it runs. With ``energy`` the
    rank is picked against the exact ‖ΔW‖_F² (at most ``rank``, default 128). A full difference's
    bias (`diff_b`) has no place in a plain LoRA and is left out; the report says so.
Each layer's report row has the kept energy Σ_{i<=k} σ_i² / ‖ΔW‖_F² and the relative error
‖ΔW_k − ΔW‖_F / ‖ΔW‖_F (exact for the factor and Kronecker paths; for rsvd, exact for its output
U_k S_k V_kᵀ = U_k U_kᵀ ΔW)."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import adapters, formats, streaming
from .basemodel import BaseModel
from .errors import InputError
from .finite import all_finite
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


# A LoHa layer [out, in·kernel] whose structured rank p = r1·r2 is above this multiple of
# sqrt(out·in·w / (out + in)), w the columns the dense path's rsvd holds (`dense_width`), takes that
# path (ΔW formed, then rsvd) instead of its exact factors. Why that form: the factor path's
# product SVD costs about (out + in)·p² float64 operations (plus p³ for the small decompositions),
# the dense path about out·in·w (the rsvd's passes over ΔW), so they cross where p² ∝ out·in·w /
# (out + in); a crossover stated against w alone, or as a share of min(out, in), moves with the
# layer's size. Below w the dense path is slow anyway (a ΔW of rank p < w gives rsvd rank-deficient
# blocks, which its CholeskyQR hands to Householder QR). The multiple is fitted to the crossovers
# measured on layers 384 x 384 to 9216 x 3072 at output ranks 32 and 96 (benchmarks/loha_paths.py,
# benchmarks/RESULTS.md): 0.6 to 0.9 of that root.
LOHA_DENSE_MULTIPLE = 0.75
DENSE_OVERSAMPLE, DENSE_POWER_ITERS = 8, 2  # the dense path's rsvd settings


def _krylov_fits(k: int, m: int, n: int) -> bool:
    """Whether the dense path's rsvd takes block Krylov for rank ``k`` on an m x n ΔW: where its
    whole Krylov space fits in min(m, n) (extract's rule), else power iteration."""
    return (DENSE_POWER_ITERS + 1) * (min(k, m, n) + DENSE_OVERSAMPLE) <= min(m, n)


def dense_width(k: int, m: int, n: int) -> int:
    """Columns of the range the dense path's rsvd builds for rank ``k`` on an m x n ΔW: the block
    Krylov space (power_iters + 1 blocks of k + oversample), or one block for power iteration."""
    block = min(k, m, n) + DENSE_OVERSAMPLE
    return (DENSE_POWER_ITERS + 1) * block if _krylov_fits(k, m, n) else min(block, m, n)


def loha_is_dense(m, k: int, shape=None) -> bool:
    """Whether a LoHa module goes through the dense path for output rank (cap) ``k``
    (`LOHA_DENSE_MULTIPLE`); ``shape``: its weight's [out, in, *kernel] (default the module's own)."""
    if not (adapters.is_adapter(m) and m.kind == "loha"):
        return False
    out, cols = (shape or m.shape)[0], math.prod((shape or m.shape)[1:])
    p = m.tensors["hada_w1_b"].shape[0] * m.tensors["hada_w2_b"].shape[0]  # r1·r2
    return p > LOHA_DENSE_MULTIPLE * math.sqrt(out * cols * dense_width(k, out, cols) / (out + cols))


@dataclass
class _Dense:
    """A layer decomposed by rsvd on its dense ΔW, which is formed only when its chunk runs."""

    module: object  # the module whose name, key, component and dtype the result gets
    shape: tuple  # the weight's [out, in, *kernel]: the result's layout
    make: Callable[[], torch.Tensor]  # ΔW [out, in·kernel] float32
    row: ToolRow
    index: int  # the result's place in low_rank_modules' list


def _diff_delta(m) -> torch.Tensor:
    """A full difference's ΔW [out, in·kernel] float32."""
    return m.tensors["diff"].flatten(1).float()


def _loha_delta(m) -> torch.Tensor:
    """A LoHa's dense ΔW [out, in·kernel] float32: scale · (A1 B1) ⊙ (A2 B2)."""
    t = {r: v.float() for r, v in m.tensors.items()}
    (a1, b1), (a2, b2) = adapters.low_rank_pair(t, 1), adapters.low_rank_pair(t, 2)
    return (a1 @ b1).mul_(a2 @ b2).mul_(m.scale)


def _base_weight(m, lf, base: BaseModel | None, base_style, why: str) -> tuple[list, tuple]:
    """(pieces, shape) of the base weight of DoRA module ``m`` (``why``: the job that needs it),
    checked to fit; InputError naming the file and module when there is no base or no fitting
    weight."""
    if base is None:
        raise InputError(f"{lf.label}: module '{m.key}' is {m.type_name}: {why}")
    pieces, shape = locate(lf.arch, m, lf.style, base, base_style)
    if pieces is None:
        raise InputError(f"{lf.label}: module '{m.key}': {shape}")
    if not m.fits(shape):
        raise InputError(f"{lf.label}: module '{m.key}' is {list(m.shape)} but the base weight is {list(shape)}")
    return pieces, tuple(shape)


def _read_weight(base: BaseModel, m, pieces, shape) -> torch.Tensor:
    """The base weight [out, in, *kernel] float64 (row halves swapped where the layouts differ)."""
    W = torch.empty(shape)
    read_into(W, base, m.component, pieces)
    return W.double()


def _dora_delta(W: torch.Tensor, m, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """DoRA's effective update m ⊙ (W + ΔW) / ‖W + ΔW‖ − W, float64 [out, in, *kernel], for the
    base weight W and ΔW = up @ down (up [out, k], down [k, in·kernel])."""
    V = W + (up.double() @ down.double()).reshape(W.shape)
    norm = adapters.axis_norms(V, m.magnitude_axis)  # [out] or [in]
    ratio = m.tensors["magnitude"].double() / norm
    if m.magnitude_axis == "out":
        return ratio.reshape(-1, *[1] * (V.dim() - 1)) * V - W
    return ratio.reshape(1, -1, *[1] * (V.dim() - 2)) * V - W


def _kron_layer(m, select, row: ToolRow) -> formats.LoraModule:
    """A LoKr module's best rank-k factors from the Kronecker SVD of its factors: every singular
    value s1_i·s2_j to choose k, then singular vectors for the top k only (with a full lokr_w2 there
    are min(out, in) of them, [out + in, min(out, in)] float64 if all were built)."""
    t = m.tensors
    w1, w2 = adapters.lokr_w1(t).double(), adapters.lokr_w2_flat(t).double()
    every = torch.outer(torch.linalg.svdvals(w1), torch.linalg.svdvals(w2)).flatten() * abs(m.scale)  # [p]
    s2 = torch.sort(every, descending=True).values.square()
    total = float(s2.sum())
    k = select(s2.sqrt(), s2.sum())
    U, S, V = adapters.kron_svd(w1, w2, k)  # [out, k], [k], [in·kernel, k]
    root = (S * abs(m.scale)).sqrt()
    row.rank_in, row.rank_out = every.numel(), k
    row.energy = float(s2[:k].sum()) / total if total > 0 else 1.0
    row.rel_error = math.sqrt(max(0.0, 1 - row.energy))
    up = U * root * math.copysign(1.0, m.scale)
    return plain_module(m, up.float(), (root[:, None] * V.mT).float())


def _dense_layers(jobs: list[_Dense], results, select, k_cap: int, energy, device, max_memory, seconds, bar,
                  label: str) -> None:  # fmt: skip
    """Batched rsvd of dense ΔW: same-shape ``jobs`` stacked in chunks that fit ``max_memory``
    (the stack, rsvd's workspace and its copy), each ΔW formed when its chunk runs; results[job.index]
    gets each layer's plain LoRA module. InputError naming ``label`` (the file) and the module
    when a ΔW is not finite in float32."""
    groups = streaming.group(jobs, lambda job: (job.shape[0], math.prod(job.shape[1:])))
    for (m_rows, n_cols), group in groups.items():
        per_layer = 4 * 3 * m_rows * n_cols  # ΔW, rsvd workspace and its copy
        for chunk in streaming.cut(group, max_memory, lambda size, per_layer=per_layer: size * per_layer):
            t0 = time.perf_counter()
            stack = torch.empty(len(chunk), m_rows, n_cols)  # [G, m, n] float32
            for g, job in enumerate(chunk):
                stack[g] = job.make()
                if not all_finite(stack[g]):  # finite factors, but a huge alpha or magnitude
                    raise InputError(f"{label}: module '{job.module.key}': its update overflows float32")
            totals = [float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 for d in stack]
            t1 = time.perf_counter()
            k_top = min(k_cap, m_rows, n_cols)
            method = "krylov" if _krylov_fits(k_top, m_rows, n_cols) else "power"
            U, S, V = rsvd(stack.to(device), k_top, method=method, power_iters=DENSE_POWER_ITERS,
                           oversample=DENSE_OVERSAMPLE, seed=0)  # fmt: skip
            del stack
            S_host = S.double().cpu()
            t2 = time.perf_counter()
            seconds["form"] = seconds.get("form", 0.0) + t1 - t0
            seconds["svd"] = seconds.get("svd", 0.0) + t2 - t1
            share = (t2 - t0) / len(chunk)
            for g, job in enumerate(chunk):
                row, total = job.row, totals[g]
                k = select(S_host[g], torch.tensor(total))
                root = S[g, :k].sqrt()
                kept = float(S_host[g, :k].square().sum())
                row.rank_in, row.rank_out, row.seconds = min(m_rows, n_cols), k, share
                row.energy = min(1.0, kept / total) if total > 0 else 1.0
                row.rel_error = math.sqrt(max(0.0, 1.0 - kept / total)) if total > 0 else 0.0
                if energy is not None and row.energy < energy * (1 - 1e-6) and k == k_top:
                    row.note = (row.note + "; " if row.note else "") + (
                        f"energy {row.energy:.4f} < {energy} at the rank cap {k_top}")  # fmt: skip
                results[job.index] = plain_module(job.module, U[g, :, :k] * root, root[:, None] * V[g, :, :k].mT,
                                                  job.shape[1:])  # fmt: skip
            bar.update(len(chunk))


def low_rank_modules(lf, select, *, action, rank, energy, device, max_memory, seconds, bar, base=None,
                     base_style=None, dora="effective"):  # fmt: skip
    """(rows, modules) of every module of ``lf`` truncated per ``select`` by the path its type
    allows (module docstring); rows get ``action``. A DoRA module (its base weight needed from
    ``base``): ``dora="effective"`` gives a plain LoRA of its effective update (convert);
    ``dora="keep"`` truncates its low-rank part and keeps its magnitude as trained, a DoRA
    module again, whose row reports the error of the effective update (resize)."""
    rows, results, factored, dense, doras = [], [None] * len(lf.modules), [], [], []
    k_cap = rank or DEFAULT_EXTRACT_MAX_RANK  # the dense path's rank (cap)

    def route(i: int, m, row: ToolRow) -> None:
        """Put module ``m`` (no DoRA magnitude) on its path; its result goes to results[i]."""
        if adapters.is_adapter(m) and m.kind == "full":
            if "diff_b" in m.tensors:
                row.note = "bias difference left out (a plain LoRA has no bias)"
            dense.append(_Dense(m, tuple(m.tensors["diff"].shape), functools.partial(_diff_delta, m), row, i))
        elif adapters.is_adapter(m) and m.kind == "lokr":
            t0 = time.perf_counter()
            results[i] = _kron_layer(m, select, row)
            row.seconds = time.perf_counter() - t0
            seconds["svd"] = seconds.get("svd", 0.0) + row.seconds
            bar.update(1)
        else:
            in_shape = _in_shape(m, lf, base, base_style)
            if loha_is_dense(m, k_cap, (m.shape[0], *in_shape)):
                dense.append(_Dense(m, (m.shape[0], *in_shape), functools.partial(_loha_delta, m), row, i))
                return
            up, down = adapters.factors(m)  # [out, p], [p, in·kernel] exact, scale folded
            row.rank_in = up.shape[1]
            # a flat LoHa gets the base's kernel
            layout = m if in_shape == m.shape[1:] else plain_module(m, up[:, :1], down[:1], in_shape)
            factored.append((i, Factors(layout, up, down, row)))

    for i, m in enumerate(lf.modules):
        row = ToolRow(m.name, action, None, shape=list(m.shape))
        rows.append(row)
        if adapters.magnitude_axis(m) and dora == "keep":
            pieces, shape = _base_weight(m, lf, base, base_style,
                                         "resize keeps its magnitude and measures the effective weight "
                                         "m·(W + ΔW')/‖W + ΔW'‖ against the base weight W: give --base BASE")  # fmt: skip
            doras.append((i, m, pieces, shape))
            route(i, adapters.without_magnitude(m), row)
        elif adapters.magnitude_axis(m):
            pieces, shape = _base_weight(m, lf, base, base_style,
                                         "its update depends on the base weight; convert it with the base model "
                                         "(loraport convert --base)")  # fmt: skip

            def make(m=m, pieces=pieces, shape=shape):
                up, down = adapters.factors(adapters.without_magnitude(m))
                return _dora_delta(_read_weight(base, m, pieces, shape), m, up, down).flatten(1).float()

            dense.append(_Dense(m, shape, make, row, i))
        else:
            route(i, m, row)
    truncate([it for _, it in factored], select, device, max_memory, seconds, bar)
    for i, it in factored:
        results[i] = it.result
    if dense:
        _dense_layers(dense, results, select, k_cap, energy, device, max_memory, seconds, bar, lf.label)
    for i, m, pieces, shape in doras:
        results[i] = _keep_magnitude(m, results[i], base, pieces, shape, rows[i])
    return rows, results


def _keep_magnitude(m, plain: formats.LoraModule, base: BaseModel, pieces, shape, row: ToolRow):
    """The DoRA module of ``m``'s magnitude (as trained) on the truncated low-rank part ``plain``;
    row.rel_error becomes that of the effective update, ‖Δ_eff' − Δ_eff‖_F / ‖Δ_eff‖_F with
    Δ_eff = m ⊙ (W + ΔW) / ‖W + ΔW‖ − W, against the base weight W."""
    t0 = time.perf_counter()
    W = _read_weight(base, m, pieces, shape)
    before = _dora_delta(W, m, *adapters.factors(adapters.without_magnitude(m)))
    after = _dora_delta(W, m, *plain.factors())
    norm = float(torch.linalg.vector_norm(before))
    row.rel_error = float(torch.linalg.vector_norm(after - before)) / norm if norm > 0 else 0.0
    row.seconds += time.perf_counter() - t0
    tensors = {"up": plain.up, "down": plain.down, "magnitude": m.tensors["magnitude"]}
    return adapters.AdapterModule(m.component, m.name, "locon", tensors, float(plain.rank), m.key, m.known,
                                  magnitude_axis=m.magnitude_axis, magnitude_ndim=m.magnitude_ndim)  # fmt: skip


def _in_shape(m, lf, base, base_style):
    """(in, *kernel) of m's weight: its own shape, or the base's for a LoHa without Tucker, whose
    file keeps only in·kernel columns (without a base such a conv layer's down stays
    [k, in·kernel], which ComfyUI reshapes to the weight but diffusers does not)."""
    if not (adapters.is_adapter(m) and m.flat_kernel) or base is None:
        return m.shape[1:]
    pieces, shape = locate(lf.arch, m, lf.style, base, base_style)
    return tuple(shape[1:]) if pieces is not None else m.shape[1:]


def read_with_base(adapter, base, arch):
    """(LoraFile, BaseModel or None, the base's naming style, input paths) of an adapter file
    read with its base model's names (``base`` None: without one); InputError when the base
    holds no weights of the adapter's architecture."""
    b = BaseModel(base) if base is not None else None
    lf = formats.read_lora(adapter, arch=arch, base_names=b.module_names() if b else ())
    base_style = lf.arch.base_style(b.module_names()) if b else None
    if b is not None and base_style is None:
        raise InputError(f"{b.label}: no {lf.arch.name} weights for {lf.label}")
    return lf, b, base_style, [lf.path, *(b.files() if b else [])]


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
    return low_rank_job(options, adapter, out, base=base, arch=arch, format=format, report=report, quiet=quiet)


def low_rank_job(options: ToolOptions, lora, out, *, base, arch, format, report, quiet) -> ToolReport:
    """The run of `convert` and `toolbox.resize` (``options.job``), which differ in what a DoRA
    layer becomes (`low_rank_modules`' ``dora``) and in what their report and metadata say:
    read with the base, check the output, every module by its type's path, write."""
    convert_job = options.job == "convert"
    select, device = options.select(), options.device
    t_start = time.perf_counter()
    lf, b, base_style, inputs = read_with_base(lora, base, arch)
    out = formats.check_output(out, inputs)
    fmt = formats.output_format(format, lf.format)
    formats.check_format(fmt, lf.arch, [m.component for m in lf.modules], lf.label)
    keep_dora = not convert_job and any(adapters.magnitude_axis(m) for m in lf.modules)
    options = replace(options, base=None if b is None else b.label, dora_magnitude="keep" if keep_dora else None)
    seconds: dict = {}
    with streaming.progress(len(lf.modules), "converting" if convert_job else "resizing", quiet) as bar:
        rows, results = low_rank_modules(
            lf, select, action=Action.CONVERTED if convert_job else Action.RESIZED, rank=options.rank,
            energy=options.energy, device=device, max_memory=options.max_memory, seconds=seconds, bar=bar, base=b,
            base_style=base_style, dora="effective" if convert_job else "keep",
        )  # fmt: skip
    labels = [label for label in inputs if label] if convert_job else [lf.label, *inputs[1:]]
    rep = ToolReport(rows, options.job, lf.arch.name, fmt if convert_job else format, labels, out, options.settings(), seconds)
    rep.bytes_read = b.bytes_read if b else 0
    rule = {k: getattr(options, k) for k in ("rank", "energy", "sv_ratio") if getattr(options, k) is not None}
    meta = {"loraport.job": options.job, f"loraport.{options.job}": json.dumps(rule)}
    result = formats.LoraFile([], lf.format, lf.arch, lf.style, dict(lf.metadata), None, lf.adapter_config)
    return finish(rep, result, results, out, format, meta, inputs, report, t_start)
