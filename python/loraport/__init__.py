"""loraport: carry LoRA adapters across base-model releases (LoRA-X projection onto the new
base's singular subspaces, found with batched randomized SVD).

Public API (a contract for the tools that import loraport):
    rsvd(A, rank, *, oversample=8, power_iters=2, method="power", seed=None) -> (U, S, V)
    project_lora(up, down, U, V, *, rank=None) -> (up2, down2)
    subspace_similarity(U1, U2) -> Tensor
    cuda_built() -> bool
    port(lora, source, target, out=None, **options) -> PortReport   (the pipeline)
"""

import torch  # noqa: F401  (torch before the extension)

from ._ext import BUILD_INFO, cuda_built
from .ops import SVDResult, project_lora, rsvd, subspace_similarity
from .pipeline import PortReport, port

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO",
    "PortReport",
    "SVDResult",
    "cuda_built",
    "port",
    "project_lora",
    "rsvd",
    "subspace_similarity",
    "__version__",
]
