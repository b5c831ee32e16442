"""`all_finite`: whether a tensor holds no NaN or Inf, in one pass over it."""

from __future__ import annotations

import math

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN, +Inf or -Inf (always for an empty or non-floating tensor).
    One reduction, torch.aminmax: a NaN makes both results NaN and an infinity is the minimum or
    the maximum. torch.isfinite(t).all() makes a bool tensor through several elementwise kernels
    and ran 30-50x slower on the CPU (benchmarks/RESULTS.md). One host sync on a GPU."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return all(math.isfinite(x) for x in torch.stack(torch.aminmax(t)).tolist())
