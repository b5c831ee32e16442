"""Shared pytest setup: device parametrization and the skip rule for CUDA tests (skipped
cleanly when there is no GPU or the CUDA kernels were not built)."""

import pytest
import torch

import loraport


def cuda_ready() -> bool:
    return torch.cuda.is_available() and loraport.cuda_built()


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    reason = "needs a CUDA GPU and loraport's CUDA build" + (
        "" if loraport.cuda_built() else " (this build is CPU-only)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def generator():
    """A fresh, seeded CPU generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
