"""Typed Python API of the loraport ops: argument checks with clear errors, sketch generation
from a seed, then one call into the compiled op (schemas in csrc/ops.cpp)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import (
    _ext,  # noqa: F401  (loads the op library)
    _fake,  # noqa: F401  (registers the fake kernels)
)
from .finite import all_finite

METHODS = ("power", "krylov")


class SVDResult(NamedTuple):
    """A ~= U diag(S) V^T. U: [..., m, k], S: [..., k] descending, V: [..., n, k]."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def _check_tensor(op: str, name: str, t: object, *, finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"loraport.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(
            f"loraport.{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 "
            f"or float64), got {t.dtype}"
        )
    if t.dim() < 2 or t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError(
            f"loraport.{op}: {name} must be [..., rows, cols] with rows, cols >= 1, got {list(t.shape)}"
        )
    if finite and not all_finite(t):
        raise ValueError(f"loraport.{op}: {name} contains NaN or Inf")
    return t


def _check_int(op: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"loraport.{op}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def krylov_blocks(short_side: int, width: int, power_iters: int) -> int:
    """Blocks of the Krylov space rsvd builds from blocks of ``width`` columns on a matrix whose
    short side is ``short_side``: power_iters + 1, but never wider than the matrix. Asked from
    the op library (loraport::krylov_blocks, csrc/linalg/rsvd.cpp), whose rsvd applies it."""
    return torch.ops.loraport.krylov_blocks(power_iters, short_side, width)


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    method: str = "power",
    seed: int | None = None,
    block_size: int | None = None,
) -> SVDResult:
    """Truncated SVD of every matrix in ``A`` ([..., m, n]) by randomized subspace iteration.

    ``rank`` is clamped to ``min(m, n)``; the sketch has ``min(rank + oversample, m, n)``
    columns and is drawn on ``A``'s device from ``seed`` (same seed, device and thread count: same
    result).
    ``method="power"`` is Halko-Martinsson-Tropp subspace iteration; ``method="krylov"`` keeps
    the whole block Krylov space at the same number of passes over ``A`` (2 * power_iters + 2)
    and finds more accurate singular subspaces on slowly decaying spectra. float16/bfloat16
    inputs are upcast chunk by chunk inside the op; arithmetic is float32 (float64 for float64
    input), and so are the outputs. The batch of matrices shares one sketch.

    ``block_size`` (krylov only) sets the width of each Krylov block, default ``rank +
    oversample``; it may be smaller than ``rank`` as long as the space is wide enough,
    ``(power_iters + 1) * block_size >= rank``. A pass costs in proportion to the block width,
    so a narrow block with more iterations reaches a given subspace accuracy with fewer flops
    (e.g. rank 64: block 48 with power_iters=3, or block 32 with power_iters=5; see
    benchmarks/RESULTS.md).
    """
    # Finiteness is checked on S afterwards: any NaN/Inf in A reaches S through A @ sketch, and a
    # full isfinite pass over A would cost as much as the decomposition's GEMMs.
    A = _check_tensor("rsvd", "A", A, finite=False)
    rank = _check_int("rsvd", "rank", rank, 1)
    oversample = _check_int("rsvd", "oversample", oversample, 0)
    power_iters = _check_int("rsvd", "power_iters", power_iters, 0)
    if method not in METHODS:
        raise ValueError(f"loraport.rsvd: method must be one of {METHODS}, got {method!r}")
    m, n = A.shape[-2:]
    short_side = min(m, n)
    k = min(rank, short_side)
    if block_size is None:
        width = min(k + oversample, short_side)
    elif method != "krylov":
        raise ValueError('loraport.rsvd: block_size is a setting of method="krylov" (power uses rank + oversample)')
    else:
        width = min(_check_int("rsvd", "block_size", block_size, 1), short_side)
        blocks = krylov_blocks(short_side, width, power_iters)
        if blocks * width < k:
            raise ValueError(
                f"loraport.rsvd: a Krylov space of {blocks} blocks of {width} columns is narrower than rank {k}; "
                f"raise block_size or power_iters so that (power_iters + 1) * block_size >= rank"
            )
    generator = torch.Generator(device=A.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(_check_int("rsvd", "seed", seed, 0))
    sketch_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    # The op sketches the tall orientation (A, or A^T when m < n) from its short side.
    sketch = torch.randn(short_side, width, generator=generator, device=A.device, dtype=sketch_dtype)  # [min(m,n), l]
    not_finite = (
        "loraport.rsvd: A contains NaN or Inf (or values so large that its products overflow float32)"
    )
    try:
        result = SVDResult(*torch.ops.loraport.rsvd(A, sketch, k, power_iters, method))
    except torch.linalg.LinAlgError as error:  # the CPU's small SVD refuses non-finite input
        raise ValueError(not_finite) from error
    if not all_finite(result.S):
        raise ValueError(not_finite)
    return result


def project_lora(
    up: torch.Tensor,
    down: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of U U^T (up @ down) V V^T, the LoRA-X projection, never forming an m x n matrix.

    up: [..., m, r], down: [..., r, n], U: [..., m, k], V: [..., n, k] with orthonormal columns.
    Returns (up2 [..., m, rank], down2 [..., rank, n]), the best rank-``rank`` factorization of
    the projected update (exact when ``rank`` >= its rank), singular values split evenly between
    the two factors. ``rank`` defaults to min(r, k), which is always exact. Output dtype: that of
    up/down; arithmetic in float32 (float64 if any input is float64).
    """
    for name, t in (("up", up), ("down", down), ("U", U), ("V", V)):
        _check_tensor("project_lora", name, t)
    r, k = up.shape[-1], U.shape[-1]
    rank = min(r, k) if rank is None else _check_int("project_lora", "rank", rank, 1)
    return tuple(torch.ops.loraport.project_lora(up, down, U, V, rank))


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """||U1^T U2||_F^2 / min(k1, k2) in [0, 1] for orthonormal bases U1 [..., m, k1] and
    U2 [..., m, k2]: 1 when the smaller subspace lies inside the other, k/m for random ones."""
    _check_tensor("subspace_similarity", "U1", U1)
    _check_tensor("subspace_similarity", "U2", U2)
    return torch.ops.loraport.subspace_similarity(U1, U2)
