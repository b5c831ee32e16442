"""loraport: carry LoRA adapters across base-model releases: the singular subspaces of both
bases (batched randomized SVD) decide where a LoRA still fits; there it is carried over
unchanged (the default) or projected onto the new base's subspaces (LoRA-X).

Public API (a contract for the tools that import loraport):
    rsvd(A, rank, *, oversample=8, power_iters=2, method="power", seed=None) -> (U, S, V)
    project_lora(up, down, U, V, *, rank=None) -> (up2, down2)
    subspace_similarity(U1, U2) -> Tensor
    cuda_built() -> bool
    port(lora, source, target, out=None, **options) -> PortReport   (the pipeline)
    resize(lora, out, *, rank | energy | sv_ratio, ...) -> ToolReport
    extract(base, tuned, out, *, rank | energy, ...) -> ToolReport
    merge(["a.safetensors:0.7", ...], out, *, rank=None, mode="svd"|"concat", ...) -> ToolReport
"""

import torch  # noqa: F401  (torch before the extension)

from ._ext import BUILD_INFO, cuda_built
from .ops import SVDResult, project_lora, rsvd, subspace_similarity
from .pipeline import PortReport, port
from .toolbox import ToolReport, extract, merge, resize

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO",
    "PortReport",
    "SVDResult",
    "ToolReport",
    "cuda_built",
    "extract",
    "merge",
    "port",
    "project_lora",
    "resize",
    "rsvd",
    "subspace_similarity",
    "__version__",
]
