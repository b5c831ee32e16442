"""Loads loraport's compiled op library (``loraport/_C.so``) and checks that it was built
against the torch that is installed now, so a mismatch reads "built for torch X, you have Y"
instead of an undefined-symbol trace."""

from __future__ import annotations

import pathlib

import torch

_LIBRARY = pathlib.Path(__file__).with_name("_C.so")
_REBUILD = "rebuild it with: pip install --no-build-isolation --force-reinstall ."


def _load() -> dict[str, str]:
    if not _LIBRARY.exists():
        raise ImportError(f"loraport: the compiled ops library {_LIBRARY} is missing; {_REBUILD}")
    try:
        torch.ops.load_library(str(_LIBRARY))
    except OSError as error:
        raise ImportError(
            f"loraport: {_LIBRARY} does not load into torch {torch.__version__} ({error}); "
            f"it was probably built against another torch: {_REBUILD}"
        ) from error
    info = dict(item.split("=", 1) for item in torch.ops.loraport.build_info().split(";"))
    if info["torch"] != torch.__version__:
        raise ImportError(
            f"loraport was built for torch {info['torch']}, you have torch {torch.__version__}; {_REBUILD}"
        )
    return info


BUILD_INFO: dict[str, str] = _load()


def cuda_built() -> bool:
    """True when the CUDA kernels were compiled into this build (a GPU is not needed to ask)."""
    return bool(BUILD_INFO["cuda"])
