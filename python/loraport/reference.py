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


def matrix_with_spectrum(
    m: int, n: int, singular_values: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A float64 m x n matrix with the given singular values and random singular vectors."""
    k = singular_values.numel()
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q
    return (U * singular_values.double()) @ V.mT


def gate_exact(ws: torch.Tensor, wt: torch.Tensor, cap: int) -> tuple[float, float, int]:
    """The similarity gate from exact float64 SVDs (the oracle of loraport.gate): (left, right, k)
    with k = gate.spectrum_rank of the exact spectra at ``cap`` (decide with gate.margin)."""
    from .gate import spectrum_rank

    Us, Ss, Vs = svd_truncated(ws.flatten(1), cap + 1)
    Ut, St, Vt = svd_truncated(wt.flatten(1), cap + 1)
    k = spectrum_rank(Ss, St, cap)
    return float(subspace_similarity(Us[:, :k], Ut[:, :k])), float(subspace_similarity(Vs[:, :k], Vt[:, :k])), k
