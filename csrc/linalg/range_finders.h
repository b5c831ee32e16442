// The range finders of rsvd: an orthonormal basis [b, m, L] of (most of) A's range and
// B^T = A^T basis [b, n, L], by power iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) or
// block Krylov (Musco & Musco 2015), each with one GEMM per product or, on a CPU with AVX2,
// with the products paired so that A X and A^T (A X) share one read of A
// (RsvdPolicy::gram_pass; csrc/cpu/gram_pass_avx2.cpp): 3 reads instead of 6 at power_iters=2,
// with the orthonormalization between them folded into the next one. The fused variants also
// return which matrices were too ill-conditioned for them; rsvd redoes those with the plain ones.
#pragma once

#include <tuple>
#include <utility>

#include "linalg/orthonormalize.h"

namespace loraport::detail {

// Power iteration: Q [b, m, l] of (A A^T)^q A sketch and B^T = A^T Q [b, n, l] (2q + 2 passes).
std::pair<Tensor, Tensor> power_range(const Tensor& A, const Tensor& sketch, int64_t power_iters, Orthonormalizer& orth);
std::tuple<Tensor, Tensor, Tensor> power_range_fused(const Tensor& A, const Tensor& sketch, int64_t power_iters,
                                                     Orthonormalizer& orth, const RsvdPolicy& policy);

// Block Krylov: the basis [b, m, L] of span[Q0, Q1, ...], L = blocks * l, and B^T [b, n, L].
std::pair<Tensor, Tensor> krylov_range(const Tensor& A, const Tensor& sketch, int64_t blocks, Orthonormalizer& orth);
std::tuple<Tensor, Tensor, Tensor> krylov_range_fused(const Tensor& A, const Tensor& sketch, int64_t blocks,
                                                      Orthonormalizer& orth, const RsvdPolicy& policy);

// Whether the policy's fused pass takes A [b, m, n] (fp32, row-major either way, not tiny).
bool gram_pass_applies(const RsvdPolicy& policy, const Tensor& A);

}  // namespace loraport::detail
