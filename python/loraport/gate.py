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
between index j and j + 1 (``MIN_RANK`` <= j < cap, and j + 1 <= `seen_values`), k = j, else the
cap. Directions in a layer's noise floor differ between releases of one lineage, so counting them
in k dilutes a related layer towards chance (16 dominant directions: 0.527 at k = 64, 0.91 at
k = 16). The default gate's sketch is only as wide as the cap and its last Ritz values
underestimate the spectrum (spurious drops), so it, and its oracle, look for the drop among the
first ``SKETCH_WIDTH`` − ``UNSEEN_TAIL`` = 14 values: a drop after σ_14 or σ_15 counts as none
(k = 16, one or two noise-floor directions more, which lowers a related layer's margin by about
0.06–0.12 on the real-like spectra).

The default gate (variant copy, no subspace rank or energy given) caps k at ``GATE_RANK`` and
estimates the subspaces by randomized subspace iteration from one shared Gaussian sketch of
``SKETCH_WIDTH`` columns (source and target get the same test matrix, so a related pair's
estimation errors are alike), one product over the weight at a time, alternating sides: each
product makes an orthonormal basis of one side from the other side's basis (Halko et al. 2011,
Alg. 4.4, with an estimate of both sides after every product from the second on, `_half_step`).
Every layer takes ``FIRST_PRODUCTS`` = 2 products, which give the first estimate of both sides;
a layer whose first estimate passes by ``EARLY_PASS`` or more stops there. That estimate errs
towards failing: the Gaussian start's noise-floor directions, which differ between releases, are
not yet damped, and a spectrum's edge is not yet sharp, so k comes out too large (on the
real-like suite it never overestimated a margin, and scored related layers with a new noise
floor far too low: benchmarks/RESULTS.md); a layer is therefore never failed on one estimate.
Every other layer takes a third product and stops as soon as the estimate is far from the
threshold compared with how much the last product moved it (`settled`); a layer near the
threshold iterates up to ``MAX_PRODUCTS`` and is marked unsure if it still has not settled.
bf16 weights on a CPU with AVX512-BF16 are multiplied as read by loraport's kernels
(`bf16_products`), others through a float32 copy. A tensor bit-identical in both bases scores 1 without any product.
`loraport.reference.gate_exact` is the float64 oracle of the same rule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .finite import all_finite

_similarity = torch.ops.loraport.subspace_similarity  # [m, k1], [m, k2] -> []
# A·basis [m, l] (basis [n, l]) or, with transpose, Aᵀ·basis [n, l] (basis [m, l]), the basis
# rounded to A's dtype, summed in float32: bf16 on the AVX512-BF16 kernels, else ATen's GEMMs
_times = torch.ops.loraport.weight_times

DEFAULT_SUBSPACE_RANK = (
    64  # the cap of explicit-rank and energy ranks: `default_subspace_rank`
)
GATE_RANK = 16  # the default gate's cap on k (16 dominant directions: 0.91 at k = 16, 0.527 at 64)
SKETCH_WIDTH = 16  # the default gate's sketch columns: GATE_RANK, no oversampling (at 24 each product takes a third longer)
UNSEEN_TAIL = 2  # a sketch's last Ritz values where no spectrum drop is looked for
MIN_RANK = 2  # the spectrum never picks fewer directions (a single direction is too easily shared)
GAP = 2.0  # σ_j / σ_{j+1} that counts as the edge of the dominant directions
BAND = 0.05  # never stop closer to the threshold than this
SETTLE = 8.0  # stop when |margin| > SETTLE · (change over the last product)
FIRST_PRODUCTS = 2  # products every gated layer takes: the first estimate of both sides (what the subspace cache keeps)
EARLY_PASS = 0.3  # a first estimate's margin from which the layer passes without more products
START = "A·Ω"  # the first product (then the sides alternate): what a cached sketch's estimates came from
MAX_PRODUCTS = 24  # products over a weight before a layer is reported unsure
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


def sketch_width(m: int, n: int) -> int:
    """The default gate's sketch columns for [m, n] weights."""
    return min(SKETCH_WIDTH, m, n)


def seen_values(m: int, n: int) -> int:
    """How many leading singular values of [m, n] weights the default gate looks for a drop in:
    all of a sketch as wide as the short side (then it is exact), else all but the last
    ``UNSEEN_TAIL``, which subspace iteration underestimates (on the real-like suite at 3 or more
    products, a 16-column sketch cut at the exact gate's k wherever it looked at 14 values; at 15
    or 16 it found drops the exact spectra do not have: benchmarks/RESULTS.md)."""
    width = sketch_width(m, n)
    return width if width == min(m, n) else width - UNSEEN_TAIL


def spectrum_rank(S_s: torch.Tensor, S_t: torch.Tensor, cap: int, seen: int | None = None) -> int:
    """k <= cap from the two spectra (S [>= cap] descending): the mean of the spectra, each
    scaled by its largest value, is cut at its largest drop σ_j / σ_{j+1} >= GAP with
    MIN_RANK <= j < cap and j + 1 <= ``seen`` (None: all); without one, k = cap."""
    n = min(S_s.numel(), S_t.numel(), cap + 1)
    if cap <= MIN_RANK or n <= MIN_RANK:
        return min(cap, n)
    n = n if seen is None else min(n, seen)
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
    """The estimated margin's sign will not change with more products: it is further from 0 than
    BAND and than SETTLE times what the last product moved it (subspace iteration converges
    geometrically, so what is left to move is at most c / (1 − c) times the last move for a
    contraction c per product; SETTLE = 8 covers c = 0.89 per product, 0.79 per power step)."""
    return abs(current) > max(BAND, SETTLE * abs(current - previous))


def margin(left: float, right: float, threshold: float) -> float:
    """How far the layer is from the gate's decision: >= 0 passes (module docstring)."""
    return min((left + right) / 2 - threshold, min(left, right) - threshold / 2)


@dataclass
class GateResult:
    left: float
    right: float
    k: int
    products: int  # products over each weight (0: identical tensors)
    unsure: bool = False  # still not settled after MAX_PRODUCTS


@dataclass
class Sketch:
    """One base weight's last two subspace-iteration estimates: U [2, m, l], S [2, l],
    V [2, n, l], index 0 the earlier (after ``FIRST_PRODUCTS`` products, the only estimate yet:
    both indices hold it, and the subspace cache keeps it once); ``products``: the products over
    the weight that made them (which tells the side the last one computed)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    products: int

    @staticmethod
    def first(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> Sketch:
        """The sketch after ``FIRST_PRODUCTS`` products from its one estimate U [m, l], S [l],
        V [n, l] (what the cache stores of it)."""
        both = [t.expand(2, *t.shape) for t in (U, S, V)]  # index 0 and 1 one view of each, no copy
        return Sketch(*both, FIRST_PRODUCTS)

    def to(self, device) -> Sketch:
        """The same sketch on ``device``."""
        return Sketch(self.U.to(device), self.S.to(device), self.V.to(device), self.products)


def bf16_products(dtype: torch.dtype, device) -> bool:
    """Whether the gate multiplies bf16 weights as they are rather than a float32 copy: on a
    CPU where loraport's AVX512-BF16 kernels run (``torch.ops.loraport.bf16_kernels()``:
    compiled in, the CPU has AVX512-BF16, the knob ``LORAPORT_BF16_KERNELS`` not 0), which
    sum in float32 and make no copy. Rounding the other factor to bf16 moves the estimated
    subspaces by about 2⁻⁹, a similarity change under 1e-3, far inside ``BAND``."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu" and torch.ops.loraport.bf16_kernels()


def _svd_tall(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P [N, l] float32 (N >= l) = U·diag(S)·Wᵀ: U [N, l] float32 orthonormal, S [l] descending,
    W [l, l] float64, from the eigenvectors of the float64 Gram matrix PᵀP (cheaper than a QR of
    P: one pass over P and an l x l eigenproblem). PᵀP squares P's condition number, so where it
    passes 1e6 (eigenvalue ratio 1e-12: a rank-deficient sketch) the Householder QR of P and the
    SVD of its R factor are used instead. Raises ValueError when P is not finite."""
    P64 = P.double()
    G = P64.T @ P64  # [l, l]
    if not all_finite(G):  # any NaN/Inf in A reaches A·Ω (a Gaussian Ω has no zeros)
        raise ValueError("loraport.gate: a weight contains NaN or Inf")
    lam, W = torch.linalg.eigh(G)  # ascending
    lam, W = lam.flip(0), W.flip(1)
    if float(lam[-1]) > 1e-12 * float(lam[0]):
        S = lam.sqrt()
        return (P64 @ (W / S)).float(), S.float(), W
    Q, R = torch.linalg.qr(P)  # [N, l], [l, l]
    X, S, Wh = torch.linalg.svd(R.double())
    return Q @ X.float(), S.float(), Wh.mT


def _half_step(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, left_fresh: bool):
    """One product over A [m, n] from the fresh basis (U [m, l] when ``left_fresh``, else
    V [n, l]; orthonormal) to a basis of the other side, and both sides' estimate from its SVD:
    V fresh: A·V = U_P S W_Pᵀ, A ≈ U_P S (V W_P)ᵀ  =>  U = U_P, V ← V·W_P; U fresh: the same on
    Aᵀ. Returns U [m, l], S [l], V [n, l] float32, S descending."""
    P_basis, S, W = _svd_tall(_times(A, U if left_fresh else V, transpose=left_fresh))  # [other side, l], [l], [l, l]
    W = W.float()
    return (U @ W, S, P_basis) if left_fresh else (P_basis, S, V @ W)


def _left_fresh(products: int) -> bool:
    """Whether the last of ``products`` products computed the left side: the first is A·Ω (a
    left basis) and the sides alternate."""
    return products % 2 == 1


@lru_cache(maxsize=16)
def _gaussian_start(n: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """The shared Gaussian test matrix [n, width] float32 drawn from ``seed``, drawn once per
    shape and device rather than once per weight."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=gen).to(device)


def first_products(mats: list[torch.Tensor], width: int, seed: int) -> list[Sketch]:
    """``FIRST_PRODUCTS`` products over every matrix [m, n] of ``mats`` (bf16 multiplied as
    is, else float32): A·Ω from the shared Gaussian start drawn from ``seed`` (the same [n, width]
    test matrix for every weight of this shape; A·Ω rather than Aᵀ·Ω for a wide A too, since
    `_times` runs A·B near the CPU's bf16 peak and Aᵀ·B well below it), then Aᵀ·U: the first
    estimate of both sides."""
    out = []
    for A in mats:
        m, n = A.shape
        start = _gaussian_start(n, min(width, m, n), seed, A.device)  # [n, l]
        U, _, _ = _svd_tall(_times(A, start, transpose=False))  # [m, l]
        U, S, V = _half_step(A, U, None, left_fresh=True)  # [m, l], [l], [n, l]
        out.append(Sketch.first(U, S, V))
    return out


def refine(A: torch.Tensor, sketch: Sketch) -> Sketch:
    """``sketch`` advanced by one product over its weight A [m, n]."""
    U, S, V = _half_step(A, sketch.U[1], sketch.V[1], _left_fresh(sketch.products))
    return Sketch(torch.stack([sketch.U[1], U]), torch.stack([sketch.S[1], S]), torch.stack([sketch.V[1], V]),
                  sketch.products + 1)  # fmt: skip


def _decide(
    source: Sketch, target: Sketch, cap: int, threshold: float, weights=None
) -> tuple[GateResult, bool]:
    """The gate from the two sketches (same number of products), iterating further while it has not
    settled and ``weights`` (a callable returning (W_s, W_t) [m, n] float) can supply the
    weights; returns (result, settled). Without weights an unsettled result is returned as is."""
    A = None
    seen = seen_values(source.U.shape[1], source.V.shape[1])  # U [2, m, l], V [2, n, l]
    while True:
        k = spectrum_rank(source.S[1], target.S[1], cap, seen)
        left, right = side_similarities(source.U[1], source.V[1], target.U[1], target.V[1], k)
        now = margin(left, right, threshold)
        if source.products == FIRST_PRODUCTS:  # one estimate: it may only pass, and clearly (module docstring)
            done = now >= EARLY_PASS
        else:
            before = margin(*side_similarities(source.U[0], source.V[0], target.U[0], target.V[0], k), threshold)
            done = settled(before, now)
        if done or source.products >= MAX_PRODUCTS or weights is None:
            unsure = not done and source.products >= MAX_PRODUCTS
            return GateResult(left, right, k, source.products, unsure), done
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
    upcast: Upcast | None = None, *, cap: int, seed: int, threshold: float, device, decide: bool = True,
    dtype: torch.dtype | None = None,
) -> list[GateResult]:  # fmt: skip
    """The gate for ``layers`` layers of [m, n] weights (the pipeline's chunk): identical weights
    score 1; otherwise ``FIRST_PRODUCTS`` products (or a sketch from the cache) and more while not settled.
    weights: [M, m, *] as read (or a list of M [m, *]; then ``dtype`` is theirs); index: (layer, side) -> position in weights; found: (layer, side)
    -> Sketch from the cache; read(layer, side): a weight not in ``weights`` (a cached side that
    needs more products); cache/keys: where each side's first estimates are stored (cache may be None);
    upcast: the float32 buffer (None: a new one; unused where `bf16_products`); decide=False: only the first products, into the cache (returns [])."""
    width = sketch_width(m, n)
    sides = ("source", "target")
    native = bf16_products(dtype or weights.dtype, device)  # iterate on the weights as read
    results = []
    for g in range(layers):
        if all((g, side) in index for side in sides) and identical(
            weights[index[g, "source"]], weights[index[g, "target"]]
        ):
            results.append(GateResult(1.0, 1.0, cap, 0))
            continue
        A = None if native else (upcast or Upcast()).take(m, n, device)  # else both in float32
        mats: list = [None, None]

        def both(which=(0, 1)):
            """The two weights [m, n] to iterate on (those in ``which`` fetched now)."""
            for i in which:
                if mats[i] is None:
                    job = (g, sides[i])
                    w = (weights[index[job]] if job in index else read(*job)).flatten(1)
                    # upcast; a weight read now is on the host: moved in its dtype first, as torch
                    # would convert a host-to-GPU copy on the host
                    mats[i] = w if native else A[i].copy_(w.to(A.device))
            return mats

        sketches = {side: found[g, side].to(device) for side in sides if (g, side) in found}  # cache entries load on the host
        missing = [i for i, side in enumerate(sides) if side not in sketches]
        if missing:
            both(missing)
            for i, sketch in zip(missing, first_products([mats[i] for i in missing], width, seed)):
                sketches[sides[i]] = sketch
                if cache is not None and (g, sides[i]) in keys:
                    cache.put_tensors(keys[g, sides[i]], {"U": sketch.U[1], "S": sketch.S[1], "V": sketch.V[1]})
        if decide:
            results.append(_decide(sketches["source"], sketches["target"], cap, threshold, weights=both)[0])
    return results
