"""The SVD of a low-rank product ΔW = up @ down from its factors, never forming the m×n ΔW; used
by `toolbox` (resize, merge "svd") and `pipeline` (the copy variant's ``rank``).

With up = Q_u R_u and downᵀ = Q_d R_d (Q orthonormal, R p×p), ΔW = Q_u (R_u R_dᵀ) Q_dᵀ, so the SVD
of the small p×p core C = R_u R_dᵀ = U_c Σ V_cᵀ is the exact SVD ΔW = (Q_u U_c) Σ (Q_d V_c)ᵀ, and
its top k triplets give the best rank-k approximation (Eckart–Young). R comes from the float64
Gram matrix (`orthogonal_factor`) and Q = X R⁺ is applied implicitly: two m·p² Gram products, a
p×p eigendecomposition and SVD, and one product per output factor."""

from __future__ import annotations

import torch


def orthogonal_factor(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X = Q R with Q = X W orthonormal, without forming Q: from the float64 Gram matrix
    XᵀX = V Λ Vᵀ, R = Λ^½ Vᵀ and W = V Λ^-½ (pseudo-inverse: directions with λ <= p·eps·λ_max,
    i.e. rank-deficient stacks such as a LoRA merged with itself, get 0). X: [G, m, p];
    returns W, R: [G, p, p] float64. Tens of times faster than Householder QR of a tall X on a
    CPU; accurate to float64 rounding of the Gram, far below the factors' own precision."""
    X = X.double()
    lam, V = torch.linalg.eigh(X.mT @ X)  # [G, p] ascending, [G, p, p]
    lam = lam.clamp_min(0)
    root = lam.sqrt()
    keep = lam > lam[..., -1:] * X.shape[-1] * torch.finfo(torch.float64).eps
    inv_root = torch.where(keep, 1 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))
    return V * inv_root[..., None, :], root[..., :, None] * V.mT


class ProductSVD:
    """The SVD of ΔW = up @ down (up [G, m, p], down [G, p, n], batched over G) from the factors:
    ``S`` [G, p] float64, descending; `factors` gives the best rank-k factors."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up, down
        self.Wu, Ru = orthogonal_factor(up)  # up = (up Wu) Ru
        self.Wd, Rd = orthogonal_factor(down.mT)  # downᵀ = (downᵀ Wd) Rd
        # ΔW = Qu (Ru Rdᵀ) Qdᵀ with orthonormal Qu, Qd: the p×p core's SVD is ΔW's SVD.
        self.Uc, self.S, self.Vch = torch.linalg.svd(Ru @ Rd.mT, full_matrices=False)  # [G, p, p], [G, p], [G, p, p]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """up' [G, m, k] = Q_u U_c[:, :k] Σ_k^½ and down' [G, k, n] = Σ_k^½ V_c[:, :k]ᵀ Q_dᵀ, in the
        factors' dtype (singular values split evenly, as project_lora does)."""
        root = self.S[:, :k].sqrt()  # [G, k]
        new_up = self.up @ (self.Wu @ (self.Uc[..., :k] * root[:, None, :])).to(self.up.dtype)
        new_down = ((self.Vch[:, :k, :] * root[..., None]) @ self.Wd.mT).to(self.down.dtype) @ self.down
        return new_up, new_down
