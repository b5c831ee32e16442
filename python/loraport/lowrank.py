"""The SVD of a low-rank product ΔW = up @ down from its factors, never forming the m×n ΔW; used
by `toolbox` (resize, merge "svd") and `pipeline` (the copy variant's ``rank``).

The decomposition is the op ``loraport::product_svd`` (csrc/linalg/lowrank_ops.cpp), the same one
`loraport.project_lora` takes its core from: with up = Q_u R_u and downᵀ = Q_d R_d (Q orthonormal,
R p×p, from float64 Gram matrices), ΔW = Q_u (R_u R_dᵀ) Q_dᵀ, so the SVD of the small p×p core
C = R_u R_dᵀ = U_c Σ V_cᵀ is the exact SVD ΔW = (Q_u U_c) Σ (Q_d V_c)ᵀ, and its top k triplets give
the best rank-k approximation (Eckart–Young)."""

from __future__ import annotations

import torch

from . import (
    _ext,  # noqa: F401  (loads the op library)
    _fake,  # noqa: F401  (registers the fake kernels)
)


class ProductSVD:
    """The SVD of ΔW = up @ down (up [G, m, p], down [G, p, n], batched over G) from the factors:
    ``S`` [G, p] float64, descending; `factors` gives the best rank-k factors."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up, down
        # ΔW = (up A) diag(S) (downᵀ B)ᵀ with orthonormal up A, downᵀ B: A, B [G, p, p] float64
        self.A, self.S, self.B = torch.ops.loraport.product_svd(up, down)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """up' [G, m, k] = up A_k Σ_k^½ and down' [G, k, n] = Σ_k^½ B_kᵀ down, in the factors'
        dtype (singular values split evenly, as project_lora does)."""
        root = self.S[:, :k].sqrt()  # [G, k]
        new_up = self.up @ (self.A[..., :k] * root[:, None, :]).to(self.up.dtype)
        new_down = (self.B[..., :k] * root[:, None, :]).mT.to(self.down.dtype) @ self.down
        return new_up, new_down
