"""The memory model: rsvd's own bound on what one call allocates (the op
loraport::rsvd_workspace_bytes, csrc/linalg/rsvd.cpp, which loraport.pipeline.group_bytes sizes its
chunks with) against the allocations MEASURED during the call: the peak of the bytes allocated
and not yet freed, from the profiler's memory events on the CPU (both CPU policies) and from the
caching allocator's peak statistics on CUDA. The bound must hold and stay within 4x of the
measured peak (an estimate that grossly overcounts would shrink every chunk for nothing)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import loraport


def _cpu_peak_bytes(call) -> int:
    """Peak bytes allocated by ``call`` and not yet freed, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()  # negative for a free
        peak = max(peak, held)
    return peak


def _cuda_peak_bytes(call) -> int:
    """Peak bytes the caching allocator gave ``call`` beyond what was allocated before, after one
    call outside the measurement: the first call on a stream makes cuBLAS and cuSOLVER allocate
    their workspaces, which they keep for the process: a one-time cost outside one call's
    workspace (it failed the bound of the first case alone on an H200)."""
    call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


CASES = [  # (batch, m, n, dtype, rank, width, power_iters, method)
    (4, 1536, 384, torch.float32, 24, 32, 2, "power"),
    (3, 384, 1536, torch.float32, 24, 16, 2, "krylov"),  # wide; a Krylov space of 3 blocks of 16
    (4, 1024, 512, torch.bfloat16, 32, 40, 1, "power"),
    (2, 800, 400, torch.float64, 16, 24, 2, "krylov"),
]


@pytest.mark.slow
@pytest.mark.parametrize("batch, m, n, dtype, rank, width, power_iters, method", CASES)
def test_rsvd_allocates_within_its_workspace_bound(batch, m, n, dtype, rank, width, power_iters, method, rsvd_device, generator):
    A = torch.randn(batch, m, n, generator=generator).to(dtype).to(rsvd_device)  # [batch, m, n]
    sketch = torch.randn(min(m, n), width, generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    sketch = sketch.to(rsvd_device)  # [min(m, n), width]
    call = lambda: torch.ops.loraport.rsvd(A, sketch, rank, power_iters, method)  # noqa: E731
    measured = (_cuda_peak_bytes if rsvd_device == "cuda" else _cpu_peak_bytes)(call)
    bound = torch.ops.loraport.rsvd_workspace_bytes(batch, m, n, dtype, rank, width, power_iters, method)
    assert bound / 4 <= measured <= bound, (measured, bound)


@pytest.mark.slow
def test_bf16_upcast_chunks_follow_the_knob(engine_knob, generator):
    """With the upcast bound at one matrix, the bound counts one float32 copy in flight, not the
    batch, and the measured peak follows it."""
    batch, m, n, rank, width = 6, 1024, 512, 16, 24
    A = torch.randn(batch, m, n, generator=generator).bfloat16()  # [batch, m, n]
    sketch = torch.randn(n, width, generator=generator)  # [n, width]
    whole = torch.ops.loraport.rsvd_workspace_bytes(batch, m, n, torch.bfloat16, rank, width, 2, "power")
    engine_knob(upcast_chunk_bytes=str(m * n * 4))
    one = torch.ops.loraport.rsvd_workspace_bytes(batch, m, n, torch.bfloat16, rank, width, 2, "power")
    assert one < whole / 3
    measured = _cpu_peak_bytes(lambda: torch.ops.loraport.rsvd(A, sketch, rank, 2, "power"))
    assert one / 4 <= measured <= one, (measured, one)


def test_krylov_blocks_is_the_ops_rule():
    """loraport.ops.krylov_blocks is the op's rule (power_iters + 1 blocks, at most min(m, n) /
    width), and rsvd refuses a rank wider than that space."""
    assert loraport.ops.krylov_blocks(300, 48, 2) == 3
    assert loraport.ops.krylov_blocks(100, 48, 5) == 2  # 100 // 48
    assert loraport.ops.krylov_blocks(30, 48, 5) == 1
    with pytest.raises(ValueError, match="a Krylov space of 96 columns"):
        torch.ops.loraport.rsvd(torch.randn(100, 120), torch.randn(100, 48), 97, 5, "krylov")
