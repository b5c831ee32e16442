// The small ops on factors and bases: product_svd (the one SVD of a low-rank product from its
// factors, which project_lora and Python's lowrank.ProductSVD both use), project_lora (the LoRA-X
// projection U U^T (up down) V V^T as factors, never forming an m x n matrix) and
// subspace_similarity.
#include <algorithm>
#include <limits>
#include <utility>

#include "linalg.h"
#include "linalg/checks.h"

namespace loraport {

using at::Tensor;
using namespace detail;

namespace {

// X = Q R with Q = X W orthonormal, without forming Q, for X [..., a, p]: from the float64 Gram
// X^T X = E diag(lam) E^T, R = diag(lam)^(1/2) E^T and W = E diag(lam)^(-1/2), a pseudo-inverse:
// directions with lam <= p * eps * lam_max (exactly rank-deficient factors, such as a LoRA merged
// with itself) get a zero column in W and a zero row in R. Returns W, R [..., p, p] float64.
// Two Gram products and a p x p eigendecomposition: tens of times faster than Householder QR of a
// tall X on a CPU, and accurate to the float64 rounding of the Gram, far below the precision of
// float32 or bfloat16 factors.
std::pair<Tensor, Tensor> orthogonal_factor(const Tensor& X) {
  const Tensor Xd = X.to(at::kDouble);
  auto [lam, E] = at::linalg_eigh(at::matmul(Xd.mT(), Xd));  // [..., p] ascending, [..., p, p]
  lam.clamp_min_(0);
  const Tensor root = lam.sqrt();
  const double cutoff = double(X.size(-1)) * std::numeric_limits<double>::epsilon();
  const Tensor keep = lam.gt(lam.narrow(-1, lam.size(-1) - 1, 1) * cutoff);
  const Tensor inverse_root =
      at::where(keep, root.clamp_min(std::numeric_limits<double>::min()).reciprocal(), at::zeros_like(root));
  return {E * inverse_root.unsqueeze(-2), root.unsqueeze(-1) * E.mT()};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> product_svd_forward(const Tensor& up, const Tensor& down) {
  const char* op = "product_svd";
  check_matrix(op, "up", up);
  check_matrix(op, "down", down);
  check_float(op, "up", up);
  check_float(op, "down", down);
  TORCH_CHECK_VALUE(up.size(-1) == down.size(-2) && up.sizes().slice(0, up.dim() - 2) == down.sizes().slice(0, down.dim() - 2),
                    "loraport.product_svd: up [..., m, p] and down [..., p, n] must share the batch dims and p, got ",
                    shape_str(up), " and ", shape_str(down));
  // up = Qu Ru and down^T = Qd Rd with orthonormal Qu = up Wu, Qd = down^T Wd, so
  // up down = Qu (Ru Rd^T) Qd^T, and the SVD of the p x p core Ru Rd^T = Uc S Vc^T is the exact
  // SVD up down = (up Wu Uc) S (down^T Wd Vc)^T (its top k triplets the best rank-k approximation).
  auto [Wu, Ru] = orthogonal_factor(up);                                              // [..., p, p]
  auto [Wd, Rd] = orthogonal_factor(down.mT());
  auto [Uc, S, Vch] = at::linalg_svd(at::matmul(Ru, Rd.mT()), /*full_matrices=*/false);  // [..., p, p], [..., p]
  return {at::matmul(Wu, Uc), S, at::matmul(Wd, Vch.mT())};
}

std::tuple<Tensor, Tensor> project_lora_forward(const Tensor& up, const Tensor& down, const Tensor& U,
                                                const Tensor& V, int64_t rank) {
  const char* op = "project_lora";
  for (auto [name, t] : {std::pair{"up", &up}, {"down", &down}, {"U", &U}, {"V", &V}}) {
    check_matrix(op, name, *t);
    check_float(op, name, *t);
  }
  const int64_t m = up.size(-2), r = up.size(-1), n = down.size(-1), k = U.size(-1);
  TORCH_CHECK_VALUE(down.size(-2) == r, "loraport.project_lora: up [..., m, r] and down [..., r, n] disagree on r: up ",
                    shape_str(up), ", down ", shape_str(down));
  TORCH_CHECK_VALUE(U.size(-2) == m, "loraport.project_lora: U must be [..., m, k] with m = ", m, " (rows of up), got ",
                    shape_str(U));
  TORCH_CHECK_VALUE(V.size(-2) == n && V.size(-1) == k, "loraport.project_lora: V must be [..., n, k] = [..., ", n, ", ",
                    k, "], got ", shape_str(V));
  auto batch = [](const Tensor& t) { return t.sizes().slice(0, t.dim() - 2); };
  TORCH_CHECK_VALUE(batch(up) == batch(down) && batch(up) == batch(U) && batch(up) == batch(V),
                    "loraport.project_lora: up, down, U and V must have the same batch dims, got ", shape_str(up), ", ",
                    shape_str(down), ", ", shape_str(U), ", ", shape_str(V));
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(r, k), "loraport.project_lora: rank must be in [1, min(r, k)] = [1, ",
                    std::min(r, k), "], got ", rank);

  const at::ScalarType work = compute_dtype({up, down, U, V});
  const at::ScalarType out_dtype = at::promote_types(up.scalar_type(), down.scalar_type());
  const Tensor Uw = U.to(work), Vw = V.to(work);
  // C = (U^T up)(down V) = P1 P2^T has rank <= r: product_svd of the thin sides P1 [..., k, r]
  // and P2^T gives its exact SVD C = (P1 A) S (P2 B)^T, so no k x k (let alone m x n) matrix is
  // formed. P1 A and P2 B are small and taken in float64: A and B carry 1 / sigma(P) for weak
  // directions of P, and a float32 product would cancel there.
  const Tensor P1 = at::matmul(Uw.mT(), up.to(work));       // [..., k, r]
  const Tensor P2 = at::matmul(Vw.mT(), down.to(work).mT());  // [..., k, r]
  auto [A, S, B] = product_svd_forward(P1, P2.mT());         // [..., r, r], [..., r], [..., r, r] float64
  const Tensor root = S.narrow(-1, 0, rank).sqrt();          // [..., rank]
  // Singular values split evenly: up2 = U P1 A sqrt(S), down2 = sqrt(S) B^T P2^T V^T.
  const Tensor left = at::matmul(P1.to(at::kDouble), A.narrow(-1, 0, rank) * root.unsqueeze(-2)).to(work);   // [..., k, rank]
  const Tensor right = at::matmul(P2.to(at::kDouble), B.narrow(-1, 0, rank) * root.unsqueeze(-2)).to(work);  // [..., k, rank]
  Tensor up2 = at::matmul(Uw, left).to(out_dtype).contiguous();                                 // [..., m, rank]
  Tensor down2 = at::matmul(right.mT(), Vw.mT()).to(out_dtype).contiguous();                    // [..., rank, n]
  return {up2, down2};
}

Tensor subspace_similarity_forward(const Tensor& U1, const Tensor& U2) {
  check_matrix("subspace_similarity", "U1", U1);
  check_matrix("subspace_similarity", "U2", U2);
  check_float("subspace_similarity", "U1", U1);
  check_float("subspace_similarity", "U2", U2);
  TORCH_CHECK_VALUE(U1.size(-2) == U2.size(-2) && U1.sizes().slice(0, U1.dim() - 2) == U2.sizes().slice(0, U2.dim() - 2),
                    "loraport.subspace_similarity: U1 [..., m, k1] and U2 [..., m, k2] must share the batch dims and m, "
                    "got ", shape_str(U1), " and ", shape_str(U2));
  const at::ScalarType work = compute_dtype({U1, U2});
  const int64_t kmin = std::min(U1.size(-1), U2.size(-1));
  Tensor overlap = at::matmul(U1.to(work).mT(), U2.to(work));  // [..., k1, k2]
  return overlap.square().sum({-2, -1}).div_(double(kmin)).clamp_(0.0, 1.0);
}

void check_weight_times(const Tensor& A, const Tensor& basis, bool transpose) {
  TORCH_CHECK_VALUE(A.dim() == 2 && basis.dim() == 2, "loraport.weight_times: A [m, n] and basis [", transpose ? "m" : "n",
                    ", l] must be matrices, got ", shape_str(A), " and ", shape_str(basis));
  check_float("weight_times", "A", A);
  check_float("weight_times", "basis", basis);
  TORCH_CHECK_VALUE(basis.size(0) == A.size(transpose ? 0 : 1), "loraport.weight_times: basis must have ",
                    transpose ? "A's rows" : "A's columns", " as rows, got A ", shape_str(A), " and basis ",
                    shape_str(basis));
}

Tensor weight_times_forward(const Tensor& A, const Tensor& basis, bool transpose) {
  check_weight_times(A, basis, transpose);
  // float16/bfloat16 upcast (exactly) so that the sums are float32 on every device
  const at::ScalarType work = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor b = basis.to(A.scalar_type()).to(work);
  const Tensor a = A.to(work);
  return (transpose ? at::matmul(a.mT(), b) : at::matmul(a, b)).to(at::kFloat).contiguous();
}

}  // namespace loraport
