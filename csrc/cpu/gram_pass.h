// The CPU's fused pass of the power iteration: Y = M X and W = M^T Y in one read of M.
// Kernel: csrc/cpu/gram_pass_avx2.cpp (compiled with AVX2 + FMA, called only on CPUs that have
// them); used by rsvd through RsvdPolicy::gram_pass (csrc/linalg.h); tests: tests/test_ops.py
// (test_rsvd_gram_pass_*); benchmark: benchmarks/rsvd.py.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace loraport {

// True when the kernel was compiled in and this CPU has AVX2 and FMA.
bool gram_pass_available();

// M: [b, r, c] float32 with unit column stride (row-major) or unit row stride (column-major:
// the transposed view of a row-major wide matrix); any batch stride, e.g. an expanded batch.
// X: [c, l] or [b, c, l] float32, any strides. Returns {Y [b, r, l], W [b, c, l]} with Y = M X
// and W = M^T Y, both float32 (views of padded buffers: not necessarily contiguous).
std::pair<at::Tensor, at::Tensor> gram_pass_avx2(const at::Tensor& M, const at::Tensor& X);

}  // namespace loraport
