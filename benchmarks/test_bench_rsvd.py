"""pytest-benchmark cases for the engine core (not part of the default test run):

    python -m pytest benchmarks/ --benchmark-only [--benchmark-compare]

Each case times one op at a Hunyuan-Video-derived shape (scaled down 4x so a 2-core CPU runs the
suite in about a minute) beside its peer on the same input. For full-size tables with accuracy
columns use the runner: python -m benchmarks.rsvd."""

import pytest
import torch

import loraport

SHAPES = [(768, 768), (2304, 768), (768, 3072)]  # 3072x3072, 9216x3072, 3072x12288 / 4


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def matrices(request):
    m, n = request.param
    g = torch.Generator().manual_seed(0)
    scale = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    return torch.randn(2, m, n, generator=g) * scale


@pytest.mark.parametrize("method", ["power", "krylov"])
def test_loraport_rsvd(benchmark, matrices, method):
    U, S, V = benchmark(loraport.rsvd, matrices, 32, power_iters=2, method=method, seed=0)
    assert U.shape[-1] == 32


def test_torch_svd_lowrank(benchmark, matrices):
    U, S, V = benchmark(torch.svd_lowrank, matrices, q=40, niter=2)
    assert U.shape[-1] == 40


def test_loraport_project_lora(benchmark, matrices):
    m, n = matrices.shape[-2:]
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(2, m, 64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(2, n, 64, generator=g)).Q
    up, down = torch.randn(2, m, 16, generator=g), torch.randn(2, 16, n, generator=g)
    up2, down2 = benchmark(loraport.project_lora, up, down, U, V)
    assert up2.shape == (2, m, 16)
