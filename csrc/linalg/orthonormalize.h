// Orthonormalization for rsvd: Y = Q R for batches of tall-skinny Y by mixed-precision
// CholeskyQR2 (Gram and Cholesky in fp64, Q = Y R^{-1} as a GEMM in the working precision;
// Yamazaki, Tomov & Dongarra 2015) instead of Householder QR: all BLAS-3, batched, and no host
// synchronization on CUDA. On the CPU a well-conditioned fp32 Y gets its first Gram in fp32
// (Orthonormalizer::first_pass_cholesky). A factorization whose Gram is too ill-conditioned
// (exactly rank-deficient sketches) falls back to Householder QR: at once on the CPU, at the end
// of the op on CUDA (RsvdPolicy::check_each_qr). Also the small products around it, through the
// device policy's hooks (RsvdPolicy::gram, times_small, upper_inverse, gram_fp64).
#pragma once

#include <tuple>

#include "linalg.h"

namespace loraport::detail {

using at::Tensor;

// max |R_ii| / min |R_ii| of upper-triangular R [b, l, l]: a cheap lower estimate of cond(R).
Tensor diagonal_spread(const Tensor& R);

// X T [b, m, k] for X [b, m, l] and a small T [b, l, k] (RsvdPolicy::times_small where it takes
// them); upper: T is upper-triangular.
Tensor times_small(const Tensor& X, const Tensor& T, bool upper, const RsvdPolicy& policy);

// X R^{-1} [b, m, l] for X [b, m, l] and an upper-triangular R [b, l, l] (see orthonormalize.cpp).
Tensor times_upper_inverse(const Tensor& X, const Tensor& R, const RsvdPolicy& policy);

// Y = Q R with orthonormal Q, for a batch of tall-skinny Y [b, m, l] (m >= l).
class Orthonormalizer {
 public:
  Orthonormalizer(const RsvdPolicy& policy, int64_t batch, const at::TensorOptions& opts);

  // CholeskyQR2 (Householder QR for small blocks or after use_householder_only).
  std::tuple<Tensor, Tensor> operator()(const Tensor& Y);

  // X = Q R for an X that is already orthonormal up to small perturbations (a block of
  // orthonormal columns after projecting rounding-level components off another basis): one
  // CholeskyQR pass with the working-precision Gram restores orthogonality to unit roundoff
  // (its error is ~u * cond(X)^2), at a third of CholeskyQR2's cost. An X that turns out far
  // from orthonormal fails the pass's spread check and is redone with Householder QR.
  std::tuple<Tensor, Tensor> refine(const Tensor& X);

  // CUDA policy: which matrices of the batch hit a failed factorization (on the device).
  const Tensor& failed() const { return failed_; }
  void use_householder_only() { householder_only_ = true; }

 private:
  bool use_householder(const Tensor& Y) const;
  std::tuple<Tensor, Tensor> repaired(const Tensor& Y, Tensor Q, Tensor R, const Tensor& failed);
  std::tuple<Tensor, Tensor, Tensor> cholesky_qr_pass(const Tensor& Y, bool shift);
  std::tuple<Tensor, Tensor> first_pass_cholesky(const Tensor& Y);

  const RsvdPolicy& policy_;
  Tensor failed_;
  bool householder_only_ = false;
};

}  // namespace loraport::detail
