"""Shared pytest setup: device parametrization and the skip rule for CUDA tests (skipped
cleanly when there is no GPU or the CUDA kernels were not built)."""

import contextlib
import logging

import pytest
import torch

import loraport
from loraport.engine_knobs import override_for_testing


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


@pytest.fixture(
    params=[("cpu", "cpu"), ("cpu", "cuda"), pytest.param(("cuda", "cuda"), marks=pytest.mark.cuda)],
    ids=["cpu", "cpu-cuda-flow", "cuda"],
)
def rsvd_device(request):
    """The device of an rsvd test, with the CPU op run twice: under its own policy and under the
    CUDA op's control flow (test knob cpu_policy=cuda; csrc/linalg.h, cuda_flow_policy: CholeskyQR
    failures collected and their matrices redone at the end of the op, no Householder QR for
    small blocks, the fp64 eigensolver for the Rayleigh-Ritz step), so machines without a GPU
    test the CUDA op's fallbacks too."""
    device, policy = request.param
    with override_for_testing(cpu_policy=policy):
        yield device


@pytest.fixture
def engine_knob():
    """set(**knobs): sets engine knobs (docs/engine-knobs.md) for the rest of the test through the
    op library's test hook; they are put back when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **knobs: stack.enter_context(override_for_testing(**knobs))


@pytest.fixture
def generator():
    """A fresh, seeded CPU generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many tiny ops: on the 2-core machine under load, 2
    threads made a [24, 16, 16] rsvd 40x slower (1.35 s vs 0.032 s, measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WarningsCollector(logging.Handler):
    """Collects the messages of WARNING and above from the logger it is added to (diffusers'
    logger does not propagate to pytest's caplog, so its warnings about unconsumed LoRA keys are
    read this way)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())
