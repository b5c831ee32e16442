"""The similarity gate: is a layer of the target base still related to the same layer of the
source base? `port` carries a LoRA over only where it is.

The gate for weights W_s, W_t [m, n] at subspace rank k, U, V the top-k left/right singular vectors:
    left = ‖U_sᵀU_t‖_F² / k,  right = ‖V_sᵀV_t‖_F² / k,  similarity = (left + right) / 2,
    pass  <=>  similarity >= t  and  min(left, right) >= t / 2       (t = min_similarity)
and margin = min(similarity − t, min(left, right) − t / 2) (pass <=> margin >= 0). The second
condition: an unrelated layer that shares one side with the source (the side facing a residual
stream, whose dominant directions every layer of a model sees) scores high there, up to 0.55 on
released 384-wide encoders at k = 64 and near 1 at the small k below, while its other side stays
at chance (about k / n), so its mean can reach t; a related layer is high on both sides (the
quality benchmark's related layers: mean >= 0.855, so each side >= 0.71). A layer whose new
input channels outnumber the old (a widened img_in) keeps a lower but not chance-level side.

k follows the spectrum (`spectrum_rank`): where the singular values drop by ``GAP`` or more
between index j and j + 1 (``MIN_RANK`` <= j < cap), k = j, else the cap. Directions in a layer's
noise floor differ between releases of one lineage, so counting them in k dilutes a related
layer towards chance (16 dominant directions: 0.527 at k = 64, 0.91 at k = 16).

The default gate (variant copy, no subspace rank or energy given) caps k at ``GATE_RANK`` and
estimates the subspaces by randomized subspace iteration from one shared Gaussian sketch of
k + oversample columns (source and target get the same test matrix, so a related pair's
estimation errors are alike), two products per step, and stops as soon as the estimate is far
from the threshold compared with how much the last step moved it (`settled`): most layers stop
after two steps (four products with a narrow sketch, a few times the cost of reading the
weight on a CPU); a layer near the threshold iterates up to ``MAX_STEPS`` and is marked unsure if
it still has not settled. A tensor bit-identical in both bases scores 1 without any product.
`loraport.reference.gate_exact` is the float64 oracle of the same rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import rsvd

_rsvd = (
    torch.ops.loraport.rsvd
)  # (A, sketch [short side, l], k, power_iters, method) -> U, S, V
_similarity = torch.ops.loraport.subspace_similarity  # [m, k1], [m, k2] -> []

DEFAULT_SUBSPACE_RANK = (
    64  # the cap of explicit-rank and energy ranks: `default_subspace_rank`
)
GATE_RANK = 16  # the default gate's cap on k (16 dominant directions: 0.91 at k = 16, 0.527 at 64)
MIN_RANK = 2  # the spectrum never picks fewer directions (a single direction is too easily shared)
GAP = 2.0  # σ_j / σ_{j+1} that counts as the edge of the dominant directions
BAND = 0.05  # never stop closer to the threshold than this
SETTLE = (
    4.0  # stop when |similarity − threshold| > SETTLE · (change over the last step)
)
FIRST_STEPS = 2  # steps every gated layer takes (and the subspace cache keeps): two estimates to compare
MAX_STEPS = 12  # iteration steps (two products each) before a layer is reported unsure
BORDERLINE = (
    0.1  # |similarity − threshold| under which the report lists a layer as borderline
)


def default_subspace_rank(m: int, n: int) -> int:
    """The largest subspace rank for [m, n] weights: 64, but at most a quarter of min(m, n).
    Similarity of random k-dim subspaces of R^n is about k/n; the quality benchmark measured
    related (>= 0.855) and unrelated (<= 0.268) layers apart at k = n/4 but overlapping at
    k = n; on real widths (>= 256) this is 64."""
    return max(1, min(DEFAULT_SUBSPACE_RANK, min(m, n) // 4))


def gate_rank(m: int, n: int) -> int:
    """The default gate's cap on k for [m, n] weights: min(GATE_RANK, default_subspace_rank)."""
    return min(GATE_RANK, default_subspace_rank(m, n))


def spectrum_rank(S_s: torch.Tensor, S_t: torch.Tensor, cap: int) -> int:
    """k <= cap from the two spectra (S [>= cap] descending): the mean of the spectra, each
    scaled by its largest value, is cut at its largest drop σ_j / σ_{j+1} >= GAP with
    MIN_RANK <= j < cap; without one, k = cap."""
    n = min(S_s.numel(), S_t.numel(), cap + 1)
    if cap <= MIN_RANK or n <= MIN_RANK:
        return min(cap, n)
    s = (
        S_s[:n].double() / S_s[0].double().clamp_min(1e-300)
        + S_t[:n].double() / S_t[0].double().clamp_min(1e-300)
    ) / 2
    ratios = s[MIN_RANK - 1 : n - 1] / s[MIN_RANK:n].clamp_min(
        1e-300
    )  # ratios[i]: σ_j / σ_{j+1}, j = MIN_RANK + i
    if ratios.numel() == 0:
        return cap
    best = int(torch.argmax(ratios))
    return MIN_RANK + best if float(ratios[best]) >= GAP else cap


def side_similarities(Us, Vs, Ut, Vt, k: int) -> tuple[float, float]:
    """(left, right) = (‖U_sᵀU_t‖_F² / k, ‖V_sᵀV_t‖_F² / k) over the first k columns, one sync."""
    left, right = torch.stack(
        [_similarity(Us[:, :k], Ut[:, :k]), _similarity(Vs[:, :k], Vt[:, :k])]
    ).tolist()
    return left, right


def settled(previous: float, current: float) -> bool:
    """The estimated margin's sign will not change with more steps: it is further from 0 than
    BAND and than SETTLE times what the last step moved it (subspace iteration converges
    geometrically; SETTLE = 4 covers a contraction of 0.8 per step)."""
    return abs(current) > max(BAND, SETTLE * abs(current - previous))


def margin(left: float, right: float, threshold: float) -> float:
    """How far the layer is from the gate's decision: >= 0 passes (module docstring)."""
    return min((left + right) / 2 - threshold, min(left, right) - threshold / 2)


@dataclass
class GateResult:
    left: float
    right: float
    k: int
    steps: int  # subspace-iteration steps taken (0: identical tensors)
    unsure: bool = False  # still not settled after MAX_STEPS


@dataclass
class Sketch:
    """One base weight's last two subspace-iteration estimates (what the subspace cache keeps
    for the gate): U [2, m, l], S [2, l], V [2, n, l], index 0 the earlier step."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    steps: int


def bf16_products(dtype: torch.dtype, device) -> bool:
    """Whether the gate iterates on bf16 weights as they are (`_step_bf16`) rather than on a
    float32 copy with the rsvd op: bf16 weights on a CPU that multiplies bf16 in hardware
    (AVX512-BF16 or AMX), where oneDNN's bf16 GEMMs outrun the op's float32 ones and no copy is made."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def first_steps(mats: list[torch.Tensor], width: int, seed: int) -> list[Sketch]:
    """Two steps for every matrix [m, n] of ``mats`` (all one shape and dtype: float32 or float64
    for the rsvd op, bf16 for `_step_bf16`): the first from the shared Gaussian sketch drawn from
    ``seed`` (the same test matrix for every weight of this shape), the second started from the
    first's short-side vectors."""
    out = []
    for A in mats:
        if A.dtype == torch.bfloat16:
            gen = torch.Generator().manual_seed(seed)
            start = torch.randn(min(A.shape), min(width, *A.shape), generator=gen)  # [short side, l]
            U0, S0, V0 = _step_bf16(A, start.to(A.device))
        else:
            U0, S0, V0 = (x[0] for x in rsvd(A[None], width, oversample=0, power_iters=0, seed=seed))
        U1, S1, V1 = _step(A, U0, V0, U0.shape[-1])  # width clamped to the short side
        out.append(Sketch(torch.stack([U0, U1]), torch.stack([S0, S1]), torch.stack([V0, V1]), 2))
    return out


def _step(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, width: int):
    """One more subspace-iteration step (two products over A [m, n]) from the previous
    estimate: it sketches the tall orientation from its short side, so it starts from V
    (m >= n) or U (m < n)."""
    start = V if A.shape[0] >= A.shape[1] else U  # [short side, l]
    if A.dtype == torch.bfloat16:
        return _step_bf16(A, start)
    return _rsvd(A, start.contiguous(), width, 0, "power")


def _step_bf16(A: torch.Tensor, start: torch.Tensor):
    """The rsvd op's power step on bf16 A [m, n] with bf16 GEMMs (float32 accumulation, bf16
    results): Y = A·start, Q = orth(Y), B = QᵀA = U_B S V_Bᵀ, U = Q·U_B (tall A; a wide A the
    same on Aᵀ). The start and Q are rounded to bf16 and the products' results too, a relative
    error of 2⁻⁹ per element: it moves the estimated subspaces by about that angle, a similarity
    change under 1e-3, far inside the gate's BAND. Returns U [m, l], S [l], V [n, l] float32."""
    bf16 = torch.bfloat16
    start = start.to(bf16)  # [short side, l]
    tall = A.shape[0] >= A.shape[1]
    Y = (A @ start if tall else (start.T @ A).T).float()  # [long side, l]
    if not bool(torch.isfinite(Y).all()):  # any NaN/Inf in A reaches Y (the rsvd op: S)
        raise ValueError("loraport.gate: a weight contains NaN or Inf")
    Q = torch.linalg.qr(Y).Q  # [long side, l]
    if tall:
        B = (Q.T.to(bf16) @ A).float()  # [l, n]
        Ub, S, V = _small_svd(B)
        return Q @ Ub, S, V
    B = (A @ Q.to(bf16)).float()  # [m, l]
    V, S, Ub = _small_svd(B.T)  # B = Ub S Vᵀ  =>  A ≈ Ub S (Q V)ᵀ
    return Ub, S, Q @ V


def _small_svd(B: torch.Tensor):
    """SVD of a short, wide B [l, n] float32 from the eigenpairs of B·Bᵀ [l, l] in float64 (the
    full SVD of B costs more than the products that made it): U_B [l, l], S [l], V = Bᵀ U_B / S
    [n, l], descending. Directions with S ≈ 0 (rank-deficient B) get V = 0: the gate uses only
    its top k < l."""
    B64 = B.double()
    evals, Ub = torch.linalg.eigh(B64 @ B64.T)  # ascending
    evals, Ub = evals.flip(0).clamp_min(0), Ub.flip(1)
    S = evals.sqrt()  # [l]
    V = (B64.T @ Ub) / torch.where(S > S[0] * 1e-7, S, torch.inf)  # [n, l]
    return Ub.float(), S.float(), V.float()


def refine(A: torch.Tensor, sketch: Sketch) -> Sketch:
    """``sketch`` advanced by one step over its weight A [m, n]."""
    U, S, V = _step(A, sketch.U[1], sketch.V[1], sketch.U.shape[-1])
    return Sketch(
        torch.stack([sketch.U[1], U]),
        torch.stack([sketch.S[1], S]),
        torch.stack([sketch.V[1], V]),
        sketch.steps + 1,
    )


def _decide(
    source: Sketch, target: Sketch, cap: int, threshold: float, weights=None
) -> tuple[GateResult, bool]:
    """The gate from the two sketches (same number of steps), iterating further while it has not
    settled and ``weights`` (a callable returning (W_s, W_t) [m, n] float) can supply the
    weights; returns (result, settled). Without weights an unsettled result is returned as is."""
    A = None
    while True:
        k = spectrum_rank(source.S[1], target.S[1], cap)
        before = margin(
            *side_similarities(source.U[0], source.V[0], target.U[0], target.V[0], k),
            threshold,
        )
        left, right = side_similarities(
            source.U[1], source.V[1], target.U[1], target.V[1], k
        )
        done = settled(before, margin(left, right, threshold))
        if done or source.steps >= MAX_STEPS or weights is None:
            return GateResult(
                left,
                right,
                k,
                source.steps,
                unsure=not done and source.steps >= MAX_STEPS,
            ), done
        if A is None:
            A = weights()
        source, target = refine(A[0], source), refine(A[1], target)


class Upcast:
    """The float32 copy of one layer's two weights that the gate iterates on, kept between layers
    of a run: a fresh allocation per layer would pay the page faults of a new mapping each time."""

    def __init__(self, numel: int = 0, device="cpu"):
        """``numel``: the largest 2·m·n the run will ask for, allocated now (growing it later would
        fault in a new mapping again)."""
        self.buffer: torch.Tensor | None = torch.empty(numel, device=device) if numel else None

    def take(self, m: int, n: int, device) -> torch.Tensor:
        """[2, m, n] float32 on ``device``, contents undefined."""
        need = 2 * m * n
        b = self.buffer
        if b is None or b.numel() < need or b.device != torch.device(device):
            self.buffer = b = None  # release the old one first
            self.buffer = b = torch.empty(need, device=device)
        return b[:need].view(2, m, n)


def identical(ws: torch.Tensor, wt: torch.Tensor) -> bool:
    """Bit-identical weights (any dtype): a cheap prefix check first, then every element."""
    a, b = ws.reshape(-1), wt.reshape(-1)
    head = min(a.numel(), 4096)
    return bool(torch.equal(a[:head], b[:head])) and bool(torch.equal(a, b))


def gate_layers(
    layers: int, m: int, n: int, weights: torch.Tensor, index: dict, found: dict, read, cache, keys: dict,
    upcast: Upcast | None = None, *, cap: int, oversample: int, seed: int, threshold: float, device, decide: bool = True,
) -> list[GateResult]:  # fmt: skip
    """The gate for ``layers`` layers of [m, n] weights (the pipeline's chunk): identical weights
    score 1; otherwise two steps (or a sketch from the cache) and more while not settled.
    weights: [M, m, *] as read; index: (layer, side) -> position in weights; found: (layer, side)
    -> Sketch from the cache; read(layer, side): a weight not in ``weights`` (a cached side that
    needs more steps); cache/keys: where each side's first two steps are stored (cache may be None);
    upcast: the float32 buffer (None: a new one; unused where `bf16_products`); decide=False: only the first steps, into the cache (returns [])."""
    width = min(cap + oversample, m, n)
    sides = ("source", "target")
    results = []
    for g in range(layers):
        if all((g, side) in index for side in sides) and identical(
            weights[index[g, "source"]], weights[index[g, "target"]]
        ):
            results.append(GateResult(1.0, 1.0, cap, 0))
            continue
        native = bf16_products(weights.dtype, device)  # iterate on the weights as read
        A = None if native else (upcast or Upcast()).take(m, n, device)  # else both in float32
        mats: list = [None, None]

        def both(which=(0, 1)):
            """The two weights [m, n] to iterate on (those in ``which`` fetched now)."""
            for i in which:
                if mats[i] is None:
                    job = (g, sides[i])
                    w = (weights[index[job]] if job in index else read(*job)).flatten(1)
                    mats[i] = w if native else A[i].copy_(w)  # upcast
            return mats

        sketches = {side: found[g, side] for side in sides if (g, side) in found}
        missing = [i for i, side in enumerate(sides) if side not in sketches]
        if missing:
            both(missing)
            for i, sketch in zip(missing, first_steps([mats[i] for i in missing], width, seed)):
                sketches[sides[i]] = sketch
                if cache is not None and (g, sides[i]) in keys:
                    cache.put_tensors(keys[g, sides[i]], {"U": sketch.U, "S": sketch.S, "V": sketch.V})
        if decide:
            results.append(_decide(sketches["source"], sketches["target"], cap, threshold, weights=both)[0])
    return results
