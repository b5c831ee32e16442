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

import os
import sys


def _is_cli_process(argv: list[str]) -> bool:
    """True for `loraport ...` (the console script) and `python -m loraport ...`: processes that
    are loraport's own, whose allocator settings it may choose."""
    args = argv[1:]
    return (len(args) >= 2 and args[0] == "-m" and args[1] == "loraport") or (
        bool(args) and os.path.basename(args[0]) == "loraport"
    )


def _interrupted_early(signum, frame):
    sys.stderr.write("loraport: interrupted; nothing written\n")
    os._exit(130)


if _is_cli_process(getattr(sys, "orig_argv", [])):
    # torch's CPU allocator then backs tensors of 2 MB and more with transparent huge pages
    # (read once, at torch's first allocation, so before `import torch`). The port allocates a
    # fresh float copy of every stacked base-weight chunk; measured on a quarter-size
    # Hunyuan-shaped port (benchmarks/RESULTS.md): 13.6M -> 0.61M page faults, 53-55 -> 29-35 s
    # kernel time, 102 -> 82-95 s wall. Library users can set it themselves (README).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # OpenMP's worker threads then sleep between parallel regions instead of spinning (libgomp
    # reads it when torch loads it): the port's reader thread copies the next chunk out of the
    # page cache on the same cores while the gate computes, and spinning workers took 22% of
    # both cores' samples in a profile of the default port (benchmarks/RESULTS.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Ctrl-C while torch is being imported: the CLI's one line and status 130, not a traceback
    # (cli.main puts Python's own handler back, and catches the KeyboardInterrupt it raises).
    import signal

    signal.signal(signal.SIGINT, _interrupted_early)

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
