// The Rayleigh-Ritz step of rsvd (rayleigh_ritz.h): the SVD of the small factor X = R^T of
// B^T = A^T basis = P R, by LAPACK/cuSOLVER's SVD or by the fp64 eigendecomposition of its Gram
// matrix followed by a QR of the Ritz vectors' images (accuracy argument at small_svd_by_eigh).
#include "linalg/rayleigh_ritz.h"

#include <functional>
#include <limits>
#include <vector>

namespace loraport::detail {
namespace {

// The top `rank` singular triplets of a batch of small square X [b, L, L]: Ur [b, L, rank],
// S [b, rank], Vr [b, L, rank], by one SVD in X's precision.
std::tuple<Tensor, Tensor, Tensor> small_svd(const Tensor& X, int64_t rank) {
  auto [Ur, S, Vrh] = at::linalg_svd(X, /*full_matrices=*/false);
  return {Ur.narrow(-1, 0, rank), S.narrow(-1, 0, rank), Vrh.narrow(-2, 0, rank).mT()};
}

// W = Q R with orthonormal Q [b, L, k] for the Ritz vectors' images W [b, L, k] (small_svd_by_eigh).
using Orthonormalize = std::function<std::tuple<Tensor, Tensor>(const Tensor& W)>;
using EighHook = decltype(RsvdPolicy::eigh);

// cuSOLVER's batched eigensolver (cusolverDnXsyevBatched, under at::linalg_eigh) failed with
// CUSOLVER_STATUS_INTERNAL_ERROR on one batch of 66000 8 x 8 matrices (H200, CUDA 13.0, torch
// 2.11); larger batches go through in slices of this many matrices.
constexpr int64_t kSmallSvdMaxBatch = 4096;

// The eigendecomposition of symmetric G [b, L, L] (eigenvalues ascending) by `hook`
// (RsvdPolicy::eigh) where it takes G, else at::linalg_eigh, in slices of kSmallSvdMaxBatch.
std::tuple<Tensor, Tensor> eigh_in_slices(const Tensor& G, const EighHook& hook) {
  auto eigh = [&hook](const Tensor& slice) -> std::tuple<Tensor, Tensor> {
    if (hook) {
      auto [values, vectors] = hook(slice);
      if (values.defined()) return {values, vectors};
    }
    return at::linalg_eigh(slice);
  };
  if (G.size(0) <= kSmallSvdMaxBatch) return eigh(G);
  std::vector<Tensor> values, vectors;
  for (const Tensor& slice : G.split(kSmallSvdMaxBatch)) {
    auto [e, v] = eigh(slice);
    values.push_back(e), vectors.push_back(v);
  }
  return {at::cat(values), at::cat(vectors)};
}

// small_svd's triplets from the fp64 eigendecomposition X^T X = Vr S^2 Vr^T (RsvdPolicy::SmallSvd::Eigh).
// Vr is orthonormal to fp64 rounding. W = X Vr = Ur S has orthogonal columns of norms sigma_i,
// each accurate to ~u64 * sigma_1 (the eigenvalues' absolute error is ~u64 * sigma_1^2);
// `orthonormalize` factors W, its columns scaled to unit norm, as Q R, and Q is Ur (up to the
// signs of R's diagonal, which are undone): orthonormal to fp64 rounding, and for sigma_i below
// ~u64 * sigma_1, where X v_i is noise, an orthonormal completion that U S V^T does not see.
// The scaling leaves Q as it is and makes the factored matrix's condition number ~1 except
// across such noise columns (then CholeskyQR's checks send the matrix to Householder QR). S
// (sqrt of the eigenvalues) is descending; its relative error is ~u64 * (sigma_1 / sigma_i)^2.
// On CUDA `orthonormalize` is the op's CholeskyQR2 (a few batched kernels): ATen's QR of a batch
// there runs cuSOLVER's orgqr once per matrix, one launch after another.
std::tuple<Tensor, Tensor, Tensor> small_svd_by_eigh(const Tensor& X, int64_t rank, const EighHook& eigh,
                                                     const Orthonormalize& orthonormalize) {
  const Tensor Xd = X.to(at::kDouble);                             // [b, L, L]
  auto [evals, evecs] = eigh_in_slices(at::matmul(Xd.mT(), Xd), eigh);  // ascending
  const int64_t L = X.size(-1);
  Tensor Vr = evecs.narrow(-1, L - rank, rank).flip(-1);           // [b, L, rank], descending
  Tensor S = evals.narrow(-1, L - rank, rank).flip(-1).clamp_min(0).sqrt();  // [b, rank]
  Tensor W = at::matmul(Xd, Vr);                                   // [b, L, rank]
  W.div_(at::linalg_vector_norm(W, 2, {-2}, /*keepdim=*/true).clamp_min_(std::numeric_limits<double>::min()));
  auto [Q, Rq] = orthonormalize(W);                                // [b, L, rank], [b, rank, rank]
  Tensor sign = at::where(Rq.diagonal(0, -2, -1).lt(0), -1.0, 1.0);  // [b, rank]
  return {Q * sign.unsqueeze(-2), S, Vr};
}

// small_svd_by_eigh on the CPU for a factor X [b, L, L] on another device
// (RsvdPolicy::SmallSvd::EighOnHost), with Householder QR there: X is copied to the host (the
// one synchronization), ATen runs LAPACK one matrix after another (this file is compiled without
// OpenMP; LAPACK inside OpenMP workers livelocked in MKL's sgeqrf), and the fp64
// triplets go back from pinned memory without waiting (a pageable copy would synchronize once
// more per tensor).
std::tuple<Tensor, Tensor, Tensor> small_svd_by_eigh_on_host(const Tensor& X, int64_t rank) {
  const Tensor Xh = X.to(at::kCPU, at::kDouble);                  // [b, L, L]
  auto [u, s, v] = small_svd_by_eigh(Xh, rank, EighHook(), [](const Tensor& W) { return at::linalg_qr(W, "reduced"); });
  if (X.device().is_cpu()) return {u, s, v};  // the CPU tests' way in: nothing to copy back
  const int64_t b = Xh.size(0), L = Xh.size(-1);
  const auto opts = Xh.options().pinned_memory(true);
  Tensor Ur = at::empty({b, L, rank}, opts), S = at::empty({b, rank}, opts), Vr = at::empty({b, L, rank}, opts);
  Ur.copy_(u);
  S.copy_(s);
  Vr.copy_(v);
  return {Ur.to(X.device(), /*non_blocking=*/true), S.to(X.device(), /*non_blocking=*/true),
          Vr.to(X.device(), /*non_blocking=*/true)};
}
}  // namespace

// The Rayleigh-Ritz SVD of X [b, L, L] by the policy's choice (RsvdPolicy::SmallSvd); `orth` is
// the op's orthonormalizer (its CholeskyQR2, checks and fallback) for the Eigh choice.
std::tuple<Tensor, Tensor, Tensor> rayleigh_ritz_svd(const Tensor& X, int64_t rank, const RsvdPolicy& policy,
                                                     Orthonormalizer& orth) {
  using SmallSvd = RsvdPolicy::SmallSvd;
  switch (policy.rayleigh_ritz) {
    case SmallSvd::Svd:
      return small_svd(X, rank);
    case SmallSvd::EighOnHost:
      return small_svd_by_eigh_on_host(X, rank);
    case SmallSvd::Eigh:
      return small_svd_by_eigh(X, rank, policy.eigh, [&orth](const Tensor& W) { return orth(W); });
  }
  TORCH_CHECK(false, "unreachable");
}

}  // namespace loraport::detail
