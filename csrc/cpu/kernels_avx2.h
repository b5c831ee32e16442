// The CPU's fp32 AVX2 + FMA kernels, called only on CPUs that have both (RsvdPolicy hooks set in
// csrc/cpu/ops_cpu.cpp; tests: tests/test_ops.py, test_rsvd_gram_pass_* and
// test_rsvd_skinny_kernels_*; benchmark: benchmarks/rsvd.py).
//   gram_pass_avx2.cpp: the fused power-iteration pass, Y = M X and W = M^T Y in one read of M.
//   skinny_avx2.cpp: the small products around it (Y^T Y and X T for tall-skinny Y, X) and the
//     inverse of CholeskyQR's small triangular factor.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace loraport {

// True when the kernels were compiled in and this CPU has AVX2 and FMA.
bool avx2_kernels_available();

// M: [b, r, c] float32 with unit column stride (row-major) or unit row stride (column-major:
// the transposed view of a row-major wide matrix); any batch stride, e.g. an expanded batch.
// X: [c, l] or [b, c, l] float32, any strides. Returns {Y [b, r, l], W [b, c, l]} with Y = M X
// and W = M^T Y, both float32 (views of padded buffers: not necessarily contiguous).
std::pair<at::Tensor, at::Tensor> gram_pass_avx2(const at::Tensor& M, const at::Tensor& X);

// Y: [b, m, l] float32 with unit column stride. Returns Y^T Y [b, l, l], exactly symmetric:
// float32, or accumulated in and returned as float64.
at::Tensor gram_avx2(const at::Tensor& Y);
at::Tensor gram_fp64_avx2(const at::Tensor& Y);

// R: [b, l, l] float64 upper-triangular (its lower triangle is not read). Returns R^{-1} in
// dtype, by back substitution in fp64 (O(l^3 / 3) flops per matrix: for small l).
at::Tensor upper_inverse_cpu(const at::Tensor& R, at::ScalarType dtype);

// X: [b, m, l] float32 with unit column stride; T: [b, l, k] or [l, k] float32, any strides.
// Returns X T [b, m, k] (a view of a padded buffer). upper: T is upper-triangular (l == k), and
// only its upper triangle is read.
at::Tensor times_small_avx2(const at::Tensor& X, const at::Tensor& T, bool upper);

}  // namespace loraport
