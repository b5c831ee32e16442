"""Fake (meta) kernels: output shapes and dtypes of every loraport op without computing, so
the ops trace under torch.compile and pass torch.library.opcheck. Keep in step with the
schemas in csrc/ops.cpp."""

from __future__ import annotations

import torch


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_fake("loraport::rsvd")
def _rsvd_fake(A, sketch, rank, power_iters, method):
    *batch, m, n = A.shape
    dtype = _work_dtype(A)
    return (
        A.new_empty((*batch, m, rank), dtype=dtype),
        A.new_empty((*batch, rank), dtype=dtype),
        A.new_empty((*batch, n, rank), dtype=dtype),
    )


@torch.library.register_fake("loraport::product_svd")
def _product_svd_fake(up, down):
    *batch, _, p = up.shape
    return (
        up.new_empty((*batch, p, p), dtype=torch.float64),
        up.new_empty((*batch, p), dtype=torch.float64),
        up.new_empty((*batch, p, p), dtype=torch.float64),
    )


@torch.library.register_fake("loraport::project_lora")
def _project_lora_fake(up, down, U, V, rank):
    dtype = torch.promote_types(up.dtype, down.dtype)
    *batch, m, _ = up.shape
    n = down.shape[-1]
    return up.new_empty((*batch, m, rank), dtype=dtype), up.new_empty((*batch, rank, n), dtype=dtype)


@torch.library.register_fake("loraport::subspace_similarity")
def _subspace_similarity_fake(U1, U2):
    return U1.new_empty(U1.shape[:-2], dtype=_work_dtype(U1, U2))


@torch.library.register_fake("loraport::weight_times")
def _weight_times_fake(A, basis, transpose):
    return A.new_empty((A.shape[1] if transpose else A.shape[0], basis.shape[1]), dtype=torch.float32)
