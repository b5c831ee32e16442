// The two small ops on factors and bases: project_lora (the LoRA-X projection U U^T (up down)
// V V^T as factors, never forming an m x n matrix) and subspace_similarity.
#include <algorithm>
#include <utility>

#include "linalg.h"
#include "linalg/checks.h"

namespace loraport {

using at::Tensor;
using namespace detail;

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
  // C = (U^T up)(down V) = P1 P2^T has rank <= r: factor both thin sides by QR and take the
  // exact SVD of the small core R1 R2^T, so no k x k (let alone m x n) matrix is formed.
  const Tensor P1 = at::matmul(Uw.mT(), up.to(work));       // [..., k, r]
  const Tensor P2 = at::matmul(Vw.mT(), down.to(work).mT());  // [..., k, r]
  auto [Q1, R1] = at::linalg_qr(P1, "reduced");              // [..., k, c], [..., c, r], c = min(k, r)
  auto [Q2, R2] = at::linalg_qr(P2, "reduced");
  auto [Um, Sm, Vmh] = at::linalg_svd(at::matmul(R1, R2.mT()), /*full_matrices=*/false);  // [..., c, c]
  const Tensor root = Sm.narrow(-1, 0, rank).sqrt();                                      // [..., rank]
  // Singular values split evenly: up2 = U Q1 Um sqrt(S), down2 = sqrt(S) Vm^T Q2^T V^T.
  const Tensor left = at::matmul(Q1, Um.narrow(-1, 0, rank)) * root.unsqueeze(-2);             // [..., k, rank]
  const Tensor right = at::matmul(Q2, Vmh.narrow(-2, 0, rank).mT()) * root.unsqueeze(-2);      // [..., k, rank]
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

}  // namespace loraport
