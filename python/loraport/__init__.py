"""loraport: carry LoRA adapters across base-model releases: the singular subspaces of both
bases (batched randomized SVD) decide where a LoRA still fits; there it is carried over
unchanged (the default) or projected onto the new base's subspaces (LoRA-X).

Public API (a contract for the tools that import loraport):
    rsvd(A, rank, *, oversample=8, power_iters=2, method="power", seed=None) -> (U, S, V)
    project_lora(up, down, U, V, *, rank=None) -> (up2, down2)
    subspace_similarity(U1, U2) -> Tensor
    cuda_built() -> bool
    port(lora, source, target, out=None, **options) -> PortReport   (the pipeline)
    port_experts(lora, source, {"high": ..., "low": ...}, out, expert_strength=...) -> {expert: PortReport}
    port_many([loras, folders, manifests], source, target, outdir, *, ray=None, workers=None,
              **options) -> CatalogReport                            (a catalog: loraport.catalog)
    resize(lora, out, *, rank | energy | sv_ratio, ...) -> ToolReport
    extract(base, tuned, out, *, rank | energy, ...) -> ToolReport
    merge(["a.safetensors:0.7", ...], out, *, rank=None, mode="svd"|"concat", ...) -> ToolReport
    convert(adapter, out, *, rank | energy, base=None, ...) -> ToolReport   (LoHa, LoKr, ... -> LoRA)
"""

import sys

from .startup import prepare_cli_process

prepare_cli_process(getattr(sys, "orig_argv", []))

import torch  # noqa: E402, F401  (torch before the extension)

from ._ext import BUILD_INFO, cuda_built
from .catalog import CatalogReport, port_many
from .convert import convert
from .ops import SVDResult, project_lora, rsvd, subspace_similarity
from .pipeline import PortReport, port
from .toolbox import ToolReport, extract, merge, resize
from .upgrade import port_experts

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO",
    "CatalogReport",
    "PortReport",
    "SVDResult",
    "ToolReport",
    "convert",
    "cuda_built",
    "extract",
    "merge",
    "port",
    "port_experts",
    "port_many",
    "project_lora",
    "resize",
    "rsvd",
    "subspace_similarity",
    "__version__",
]
