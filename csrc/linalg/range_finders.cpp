// The range finders of rsvd (range_finders.h): power iteration and block Krylov, plain (one
// GEMM per product, any device) and fused (the CPU's paired products in one read of A).
// method="krylov" keeps every block of [A W, (A A^T) A W, ...] and reuses the A^T Q_i products
// it already computed for the Rayleigh-Ritz step, so it makes exactly as many passes over A as
// method="power" with the same power_iters (2q + 2), while searching a (q + 1)-times wider space.
#include "linalg/range_finders.h"

#include <cmath>

namespace loraport::detail {
namespace {

// X -= P (P^T X): project the columns of X [b, m, c] off the orthonormal columns of P [b, m, p],
// in place (X must be a temporary the caller owns). Returns the coefficients P^T X [b, p, c].
Tensor project_out_(Tensor& X, const Tensor& P) {
  Tensor C = at::matmul(P.mT(), X);
  X.baddbmm_(P, C, /*beta=*/1, /*alpha=*/-1);
  return C;
}

// A^T Q [b, n, l] for A [b, m, n], computed as (Q^T A)^T and returned as that transposed view:
// with MKL the row-major Q^T A ran 10-50 % faster than A^T Q on tall Hunyuan shapes (e.g.
// 112 vs 74 GFLOP/s on 2 x [9216, 3072], width 48), and every consumer takes either layout.
Tensor adjoint_times(const Tensor& A, const Tensor& Q) { return at::matmul(Q.mT(), A).mT(); }

// The largest estimated condition number (diagonal spread of its R) of a product that the
// fused pass feeds on unorthonormalized: there the fp32 rounding of the second product, ~u
// relative to its largest column, is ~u * cond relative to the weakest direction of the block,
// instead of ~u * sqrt(cond) with a separate orthonormalization. 1e4 keeps that under 1e-3,
// far below the iteration's own error in those directions (overlap 0.9 at q = 2).
constexpr double kGramPassMaxCond = 1e4;

}  // namespace

// Power iteration (Halko et al. Alg. 4.4): the range basis Q [b, m, l] of (A A^T)^q A sketch
// and B^T = A^T Q [b, n, l], one GEMM per product (2q + 2 passes over A).
std::pair<Tensor, Tensor> power_range(const Tensor& A, const Tensor& sketch, int64_t power_iters, Orthonormalizer& orth) {
  Tensor Q = std::get<0>(orth(at::matmul(A, sketch)));            // [b, m, l]
  for (int64_t i = 0; i < power_iters; ++i) {
    Tensor Z = std::get<0>(orth(adjoint_times(A, Q)));            // [b, n, l]
    Q = std::get<0>(orth(at::matmul(A, Z)));                      // [b, m, l]
  }
  return {Q, adjoint_times(A, Q)};
}

// power_range with the CPU's fused pass {A X, A^T (A X)} in one read of A
// (RsvdPolicy::gram_pass; A row-major, or column-major: the storage of a wide matrix, which the
// op hands over as a transposed view). The products of the power iteration alternate A., A^T.;
// each pair shares one read of A, and the second product is applied to the unorthonormalized
// first one, X instead of orth(X) = X R^{-1}: the same range, hence the same iteration, for
// every intermediate. Pairs (A X, A^T A X) starting from the sketch: q + 1 reads at power_iters
// = q (2q + 2 products, as many as power_range); the last pair's A^T Y is turned into
// A^T Q = (A^T Y) R^{-1} with Y = Q R. The intermediates A^T A X are orthonormalized on the
// short side. Returns the basis, B^T, and [b] bool: the matrices whose products were too
// ill-conditioned for the fused pass (fast-decaying spectra), which the caller redoes with
// power_range.
std::tuple<Tensor, Tensor, Tensor> power_range_fused(const Tensor& A, const Tensor& sketch, int64_t power_iters,
                                                     Orthonormalizer& orth, const RsvdPolicy& policy) {
  Tensor rejected = at::zeros({A.size(0)}, A.options().dtype(at::kBool));
  auto reject_above = [&](const Tensor& R, double bound) {
    rejected.logical_or_(diagonal_spread(R).le(bound).logical_not());
  };
  Tensor X = sketch;                                              // [n, l], then [b, n, l]
  for (int64_t i = 0; i < power_iters; ++i) {
    Tensor W = policy.gram_pass(A, X).second;                     // A^T A X [b, n, l]
    auto [P, R] = orth(W);
    reject_above(R, kGramPassMaxCond);
    X = P;
  }
  auto [Y, W] = policy.gram_pass(A, X);                           // A X [b, m, l], A^T A X [b, n, l]
  auto [Q, R] = orth(Y);                                          // Y = Q R
  // A^T Q = W R^{-1}: its rounding error is ~u * cond(Y)^2 relative to its weakest column.
  reject_above(R, std::sqrt(kGramPassMaxCond));
  return {Q, times_upper_inverse(W, R, policy), rejected};
}

// Block Krylov (Musco & Musco 2015): the orthonormal basis [b, m, L] of span[Q0, Q1, ...],
// L = blocks * l, Q0 = orth(A sketch), Q_{i+1} = orth((I - P P^T) A orth(A^T Q_i)) with
// P = [Q0 .. Qi] (block classical Gram-Schmidt with reorthogonalization), and B^T = A^T basis
// [b, n, L], made of the images A^T Q_i the iteration computes anyway. 2 * blocks products.
std::pair<Tensor, Tensor> krylov_range(const Tensor& A, const Tensor& sketch, int64_t blocks, Orthonormalizer& orth) {
  const int64_t b = A.size(0), m = A.size(-2), n = A.size(-1), l = sketch.size(-1), L = blocks * l;
  // Both live in buffers of the final width, P being a leading slice of the basis.
  Tensor basis = at::empty({b, m, L}, A.options());
  Tensor images_t = at::empty({b, L, n}, A.options());            // B = [A^T Q0 .. A^T Qq]^T
  basis.narrow(-1, 0, l).copy_(std::get<0>(orth(at::matmul(A, sketch))));
  for (int64_t i = 0; i < blocks; ++i) {
    const Tensor Qi = basis.narrow(-1, i * l, l);
    images_t.narrow(-2, i * l, l).copy_(at::matmul(Qi.mT(), A));  // (A^T Q_i)^T, see adjoint_times
    if (i + 1 == blocks) break;
    Tensor Z = std::get<0>(orth(images_t.narrow(-2, i * l, l).mT()));  // [b, n, l]
    const Tensor P = basis.narrow(-1, 0, (i + 1) * l);
    // Project twice before normalizing: once the space has converged, A Z lies almost
    // inside span(P) and one projection leaves rounding-level components along P that
    // normalization would blow up to O(1) (Giraud et al. 2005, "twice is enough"). The
    // normalized block gets one more projection and a one-pass re-orthonormalization.
    Tensor Y = at::matmul(A, Z);                                   // [b, m, l]
    project_out_(Y, P);
    project_out_(Y, P);
    Tensor Qn = std::get<0>(orth(Y));
    project_out_(Qn, P);
    basis.narrow(-1, (i + 1) * l, l).copy_(std::get<0>(orth.refine(Qn)));
  }
  return {basis, images_t.mT()};
}

// krylov_range with the CPU's fused pass: each block's two products, Y = A Z and A^T Y, share
// one read of A (blocks reads instead of 2 * blocks). The new block Q = Y T - P D comes out of
// the same Gram-Schmidt steps as in krylov_range, and every step applied to Y is applied to its
// image as well: A^T Q = (A^T Y) T - (A^T P) D, A^T P being the images already kept. That image
// carries the fp32 rounding of A^T Y, ~u ||A|| ||Y||, times ||T|| ~ 1 / (the part of Y outside
// span(P)): an amplification max ||Y_j|| / min |R_ii| (R of the projected Y) above
// sqrt(kGramPassMaxCond) = 100, as in the last step of power_range_fused, rejects the matrix
// (converged or fast-decaying spectra), which the caller then redoes with krylov_range.
std::tuple<Tensor, Tensor, Tensor> krylov_range_fused(const Tensor& A, const Tensor& sketch, int64_t blocks,
                                                      Orthonormalizer& orth, const RsvdPolicy& policy) {
  const int64_t b = A.size(0), m = A.size(-2), n = A.size(-1), l = sketch.size(-1), L = blocks * l;
  Tensor basis = at::empty({b, m, L}, A.options());
  Tensor images = at::empty({b, n, L}, A.options());              // B^T = A^T basis
  Tensor rejected = at::zeros({b}, A.options().dtype(at::kBool));
  // X -= P C with C = P^T X, and the image V of X likewise: V -= (A^T P) C.
  auto project_both = [&](Tensor& X, Tensor& V, const Tensor& P, const Tensor& IP) {
    V.baddbmm_(IP, project_out_(X, P), /*beta=*/1, /*alpha=*/-1);
  };
  Tensor Z = sketch;                                              // [n, l], then [b, n, l]
  for (int64_t i = 0; i < blocks; ++i) {
    auto [Y, V] = policy.gram_pass(A, Z);                         // A Z [b, m, l], A^T A Z [b, n, l]
    const Tensor y_norm = at::linalg_vector_norm(Y, 2, {-2}).amax(-1);  // [b]
    const Tensor P = basis.narrow(-1, 0, i * l), IP = images.narrow(-1, 0, i * l);
    if (i > 0) {  // the Gram-Schmidt steps of krylov_range, on Y and its image together
      project_both(Y, V, P, IP);
      project_both(Y, V, P, IP);
    }
    auto [Q, R] = orth(Y);                                        // Q = Y R^{-1}, so A^T Q = V R^{-1}
    V = times_upper_inverse(V, R, policy);
    rejected.logical_or_((y_norm / R.diagonal(0, -2, -1).abs().amin(-1)).le(std::sqrt(kGramPassMaxCond)).logical_not());
    if (i > 0) {
      project_both(Q, V, P, IP);
      auto [Qr, Rr] = orth.refine(Q);
      V = times_upper_inverse(V, Rr, policy);  // Rr = I up to rounding, unless refine fell back to Householder
      Q = Qr;
    }
    basis.narrow(-1, i * l, l).copy_(Q);
    images.narrow(-1, i * l, l).copy_(V);
    if (i + 1 < blocks) Z = std::get<0>(orth(V));                 // orth(A^T Q_i) [b, n, l]
  }
  return {basis, images, rejected};
}

// Below 64K elements the fused pass's extra bookkeeping costs more than the read it saves.
bool gram_pass_applies(const RsvdPolicy& policy, const Tensor& A) {
  if (!policy.gram_pass || A.scalar_type() != at::kFloat) return false;
  // Row-major storage, either orientation; below 64K elements the extra passes cost nothing.
  const bool row_major = A.stride(-1) == 1 || A.stride(-2) == 1;
  return row_major && A.size(-2) * A.size(-1) >= (int64_t(1) << 16);
}

}  // namespace loraport::detail
