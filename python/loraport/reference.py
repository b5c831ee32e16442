"""Pure-PyTorch twins of the loraport ops, written for clarity, run in float64: the oracles of
the test suite and the yardsticks of the benchmarks. Never imported by the fast paths."""

from __future__ import annotations

import torch


def svd_truncated(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-``rank`` SVD in float64 (torch.linalg.svd): U [..., m, k], S [..., k], V [..., n, k]."""
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :].mT


def optimal_error(A: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart-Young: min ||A - X||_F over rank-``rank`` X, i.e. sqrt(sum of sigma_i^2, i > rank)."""
    S = torch.linalg.svdvals(A.double())
    return S[..., rank:].square().sum(-1).sqrt()


def reconstruction_error(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """||A - U diag(S) V^T||_F in float64, per matrix."""
    approx = (U.double() * S.double().unsqueeze(-2)) @ V.double().mT
    return torch.linalg.matrix_norm(A.double() - approx)


def rsvd(
    A: torch.Tensor, sketch: torch.Tensor, rank: int, power_iters: int, method: str = "power"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Textbook randomized SVD with Householder QR in float64, given the same sketch as the op
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1; block Krylov: Musco & Musco 2015). Like the
    op, a wide A (m < n) is decomposed as A^T with sketch [m, l]."""
    if A.shape[-2] < A.shape[-1]:
        V, S, U = rsvd(A.mT, sketch, rank, power_iters, method)
        return U, S, V
    A = A.double()
    orth = lambda X: torch.linalg.qr(X).Q  # noqa: E731
    Q = orth(A @ sketch.double())
    blocks = [Q]
    for _ in range(power_iters):
        Q = orth(A @ orth(A.mT @ Q))
        blocks.append(Q)
    if method == "krylov":
        width = min(A.shape[-2:])
        Q = orth(torch.cat(blocks, -1)[..., : max(1, width // Q.shape[-1]) * Q.shape[-1]])
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return (Q @ Ub)[..., :rank], S[..., :rank], Vh[..., :rank, :].mT


def project_lora_dense(up: torch.Tensor, down: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The LoRA-X projection as the dense matrix U U^T (up @ down) V V^T, float64 [..., m, n]."""
    U, V = U.double(), V.double()
    return U @ (U.mT @ (up.double() @ down.double()) @ V) @ V.mT


def best_rank(dense: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a dense float64 matrix (Eckart-Young)."""
    U, S, V = svd_truncated(dense, rank)
    return (U * S.unsqueeze(-2)) @ V.mT


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """||U1^T U2||_F^2 / min(k1, k2) in float64."""
    k = min(U1.shape[-1], U2.shape[-1])
    return (U1.double().mT @ U2.double()).square().sum((-2, -1)) / k


def weight_times(A: torch.Tensor, basis: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The oracle of ``loraport::weight_times`` in float64: A·basis, or Aᵀ·basis with
    ``transpose``, the basis rounded to A's dtype first as the op does."""
    a = A.double().mT if transpose else A.double()
    return a @ basis.to(A.dtype).double()


def matrix_with_spectrum(
    m: int, n: int, singular_values: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A float64 m x n matrix with the given singular values and random singular vectors."""
    k = singular_values.numel()
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q
    return (U * singular_values.double()) @ V.mT


def adapter_delta(t: dict, scale: float, shape) -> torch.Tensor:
    """ΔW [out, in, *kernel] in float64 of an adapter's tensors ``t`` (roles as in
    loraport.adapters: up/down/mid, hada_*, lokr_*, diff) written as LyCORIS writes it:
    tucker_weight_from_conv, HadaWeight(Tucker), make_kron with rebuild_tucker."""
    t = {k: v.double() for k, v in t.items()}
    if "diff" in t:
        return t["diff"]
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            w1 = torch.einsum("ij...,jr,ip->pr...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = torch.einsum("ij...,jr,ip->pr...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2 * scale).reshape(shape)
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("ij...,ip,jr->pr...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            b = t["lokr_w2_b"]
            w2 = (t["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(-1, *b.shape[1:])
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        return torch.kron(w1.contiguous(), w2.contiguous()) * scale
    up, down = t["up"], t["down"]
    if "mid" in t:
        return torch.einsum("mn...,im,nj->ij...", t["mid"], up.flatten(1), down.flatten(1)) * scale
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def dora_weight(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """DoRA's adapted weight m ⊙ (W + ΔW) / ‖W + ΔW‖ in float64 (W, ΔW [out, in, *kernel]), the
    norm per output row (axis "out": PEFT, LyCORIS wd_on_output) or per input channel ("in")."""
    V = W.double() + delta.double()
    if axis == "out":
        norm = V.flatten(1).norm(dim=1).reshape(-1, *[1] * (V.dim() - 1))
        return magnitude.double().reshape(norm.shape) * V / norm
    norm = V.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (V.dim() - 2))
    return magnitude.double().reshape(norm.shape) * V / norm


def gate_exact(ws: torch.Tensor, wt: torch.Tensor, cap: int) -> tuple[float, float, int]:
    """The similarity gate from exact float64 SVDs (the oracle of loraport.gate): (left, right, k)
    with k = gate.spectrum_rank of the exact spectra at ``cap``, looking at as many values as the
    default gate does (gate.seen_values; decide with gate.margin)."""
    from .gate import seen_values, spectrum_rank

    Us, Ss, Vs = svd_truncated(ws.flatten(1), cap + 1)
    Ut, St, Vt = svd_truncated(wt.flatten(1), cap + 1)
    k = spectrum_rank(Ss, St, cap, seen_values(ws.shape[0], ws[0].numel()))
    return float(subspace_similarity(Us[:, :k], Ut[:, :k])), float(subspace_similarity(Vs[:, :k], Vt[:, :k])), k
