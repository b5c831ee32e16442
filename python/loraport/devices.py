"""Which device a job runs on: ``resolve_device("cpu" | "cuda" | "cuda:N" | "auto")``, asked once
by every entry point (port, resize, extract, merge) before it reads anything, so that a wrong or
absent device is one line (InputError, exit status 2 in the CLI) instead of a traceback from a
worker thread halfway through."""

from __future__ import annotations

import re

import torch

from ._ext import cuda_built
from .errors import InputError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
DEVICE_HELP = f"{DEVICE_CHOICES} (default auto: the GPU when torch sees one and this build runs on it, else cpu)"


def available_devices() -> list[str]:
    """The devices a loraport job can use here: "cpu", and "cuda:i" for each GPU that torch sees
    when this loraport build registers its ops for CUDA."""
    gpus = torch.cuda.device_count() if cuda_built() and torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(gpus))]


def _why_no_cuda() -> str:
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build"
    if not cuda_built():
        return "this loraport build is CPU-only (rebuild it against this CUDA torch: scripts/setup.sh)"
    return f"torch {torch.__version__} sees no CUDA GPU"


def resolve_device(device) -> str:
    """"cpu", "cuda:N" for ``device`` ("cpu", "cuda" (= the current GPU), "cuda:N", "auto" (a
    GPU when torch sees one and this build runs on it, else the CPU) or a torch.device);
    InputError (a ValueError) naming the device and what is available otherwise."""
    text = str(device) if isinstance(device, (str, torch.device)) else None
    available = available_devices()
    if text == "auto":
        return f"cuda:{torch.cuda.current_device()}" if len(available) > 1 else "cpu"
    if text == "cpu":
        return "cpu"
    listing = f"available here: {', '.join(available)}"
    match = re.fullmatch(r"cuda(?::(\d+))?", text or "")
    if match is None:
        raise InputError(f"device {device!r} is not one of {DEVICE_CHOICES}; {listing}")
    if len(available) == 1:
        raise InputError(f"device {text!r} is not available: {_why_no_cuda()}; {listing}")
    index = torch.cuda.current_device() if match[1] is None else int(match[1])
    if f"cuda:{index}" not in available:
        gpus = len(available) - 1
        raise InputError(f"device {text!r} is not available: this machine has {gpus} CUDA GPU(s); {listing}")
    return f"cuda:{index}"

