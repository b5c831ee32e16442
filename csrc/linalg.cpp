// The algorithms of the three loraport ops, device-generic (ATen only).
//
// rsvd: Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1, with two changes that matter here:
//   * orthonormalization by mixed-precision CholeskyQR2 (Gram and Cholesky in fp64, Q = Y R^{-1}
//     as a GEMM in the working precision; Yamazaki, Tomov & Dongarra 2015) instead of
//     Householder QR: all BLAS-3, batched, and no host synchronization on CUDA. On the CPU a
//     well-conditioned Y gets its first Gram in fp32 (Orthonormalizer::first_pass_cholesky). A
//     factorization whose Gram is too ill-conditioned (exactly rank-deficient sketches) falls
//     back to Householder.
//   * the Rayleigh-Ritz step takes the SVD of the small R of B^T = A^T Q = P R (l x l) instead
//     of a dense SVD of the l x n matrix B.
//   * on a CPU with AVX2, both methods pair their products: A X and A^T (A X) share one read
//     of A (csrc/cpu/gram_pass_avx2.cpp), 3 reads instead of 6 at power_iters=2, with the
//     orthonormalization between them folded into the next one (power_range_fused,
//     krylov_range_fused).
// method="krylov" keeps every block of [A W, (A A^T) A W, ...] (Musco & Musco 2015, block
// Krylov) and reuses the A^T Q_i products it already computed for the Rayleigh-Ritz step, so it
// makes exactly as many passes over A as method="power" with the same power_iters (2q + 2),
// while searching a (q + 1)-times wider space. Its block may be narrower than the rank (the
// space only has to be as wide as the rank): the cost of a pass is proportional to the block
// width, and a narrow block with more iterations reaches a given subspace accuracy with fewer
// GEMM flops (benchmarks/RESULTS.md).
// Wide matrices (m < n) are decomposed as A^T, so the sketch is [min(m, n), l].
#include "linalg.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace loraport {
namespace {

using at::Tensor;

std::string shape_str(const Tensor& t) { return c10::str(t.sizes()); }

void check_float(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()),
                    "loraport.", op, ": ", arg, " must be a floating-point tensor "
                    "(float16, bfloat16, float32 or float64), got ", t.scalar_type());
}

void check_matrix(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 2, "loraport.", op, ": ", arg,
                    " must be [..., rows, cols] (at least 2-D), got shape ", shape_str(t));
  TORCH_CHECK_VALUE(t.size(-1) >= 1 && t.size(-2) >= 1, "loraport.", op, ": ", arg,
                    " must have at least one row and one column, got shape ", shape_str(t));
}

at::ScalarType compute_dtype(std::initializer_list<Tensor> ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

Method parse_method(std::string_view method) {
  if (method == "power") return Method::Power;
  if (method == "krylov") return Method::Krylov;
  TORCH_CHECK_VALUE(false, "loraport.rsvd: method must be \"power\" or \"krylov\", got \"",
                    std::string(method), "\"");
}

// Flip each singular pair so that the largest-magnitude entry of every U column is positive
// (on an exact tie between a positive and a negative entry, the positive one): a deterministic
// sign convention, so CPU and CUDA (and reruns) agree up to rounding. Two reductions, not an
// argmax over |U| (0.09 against 0.69 ms on [2, 3072, 64], CPU).
void normalize_signs(Tensor& U /*[b,m,k]*/, Tensor& V /*[b,n,k]*/) {
  Tensor positive = U.amax(-2, /*keepdim=*/true).ge(U.amin(-2, /*keepdim=*/true).neg());  // [b, 1, k]
  Tensor sign = at::where(positive, 1.0, -1.0).to(U.scalar_type());
  U.mul_(sign);
  V.mul_(sign);
}

// max |R_ii| / min |R_ii| of upper-triangular R [b, l, l]: a cheap lower estimate of cond(R).
Tensor diagonal_spread(const Tensor& R) {
  Tensor diag = R.diagonal(0, -2, -1).abs();
  return diag.amax(-1) / diag.amin(-1);  // [b]; inf or nan for a zero pivot (callers test "not <= bound")
}

// Y^T Y [b, l, l] of Y [b, m, l], in Y's dtype (RsvdPolicy::gram where it takes Y).
Tensor gram_of(const Tensor& Y, const RsvdPolicy& policy) {
  Tensor G = policy.gram ? policy.gram(Y) : Tensor();
  return G.defined() ? G : at::matmul(Y.mT(), Y);
}

// X T [b, m, k] for X [b, m, l] and a small T [b, l, k] (RsvdPolicy::times_small where it takes
// them); upper: T is upper-triangular.
Tensor times_small(const Tensor& X, const Tensor& T, bool upper, const RsvdPolicy& policy) {
  Tensor C = policy.times_small ? policy.times_small(X, T, upper) : Tensor();
  return C.defined() ? C : at::matmul(X, T);
}

// X R^{-1} [b, m, l] for X [b, m, l] and an upper-triangular R [b, l, l]: R is inverted in fp64
// (by RsvdPolicy::upper_inverse where it takes R, else by ATen's triangular solve against the
// identity), and the product is a GEMM in X's precision (on the CPU a batched triangular solve
// with a tall right-hand side ran at ~1/5 of the GEMM rate, profile of 2 x [3072, 3072], block 48).
Tensor times_upper_inverse(const Tensor& X, const Tensor& R, const RsvdPolicy& policy) {
  const Tensor Rd = R.to(at::kDouble);
  Tensor inverse = policy.upper_inverse ? policy.upper_inverse(Rd, X.scalar_type()) : Tensor();
  if (!inverse.defined())
    inverse = at::linalg_solve_triangular(Rd, at::eye(Rd.size(-1), Rd.options()), /*upper=*/true).to(X.scalar_type());
  return times_small(X, inverse, /*upper=*/true, policy);
}

// Y = Q R with orthonormal Q, for a batch of tall-skinny Y [b, m, l] (m >= l).
class Orthonormalizer {
 public:
  Orthonormalizer(const RsvdPolicy& policy, int64_t batch, const at::TensorOptions& opts)
      : policy_(policy) {
    if (!policy_.check_each_qr) failed_ = at::zeros({batch}, opts.dtype(at::kBool));
  }

  std::tuple<Tensor, Tensor> operator()(const Tensor& Y) {
    if (use_householder(Y)) return at::linalg_qr(Y, "reduced");
    auto [Q1, R1, bad1] = cholesky_qr_pass(Y, /*shift=*/true);
    auto [Q, R2, bad2] = cholesky_qr_pass(Q1, /*shift=*/false);
    Tensor R = at::matmul(R2, R1);
    return repaired(Y, Q, R, bad1.logical_or(bad2));
  }

  // X = Q R for an X that is already orthonormal up to small perturbations (a block of
  // orthonormal columns after projecting rounding-level components off another basis): one
  // CholeskyQR pass with the working-precision Gram restores orthogonality to unit roundoff
  // (its error is ~u * cond(X)^2), at a third of CholeskyQR2's cost. An X that turns out far
  // from orthonormal fails the pass's spread check and is redone with Householder QR.
  std::tuple<Tensor, Tensor> refine(const Tensor& X) {
    if (use_householder(X)) return at::linalg_qr(X, "reduced");
    auto [Q, R, bad] = cholesky_qr_pass(X, /*shift=*/false);
    return repaired(X, Q, R, bad);
  }

  // CUDA policy: which matrices of the batch hit a failed factorization (on the device).
  const Tensor& failed() const { return failed_; }
  void use_householder_only() { householder_only_ = true; }

 private:
  bool use_householder(const Tensor& Y) const {
    return householder_only_ || Y.size(-2) * Y.size(-1) <= policy_.householder_max_elements;
  }

  // CPU: redo the matrices of the batch whose factorization failed with Householder QR now
  // (cheap, and only those). CUDA: remember them for one check at the end of the op.
  std::tuple<Tensor, Tensor> repaired(const Tensor& Y, Tensor Q, Tensor R, const Tensor& failed) {
    if (!policy_.check_each_qr) {
      failed_.logical_or_(failed);
      return {Q, R};
    }
    if (failed.any().item<bool>()) {
      Tensor idx = failed.nonzero().squeeze(-1);
      auto [Qh, Rh] = at::linalg_qr(Y.index_select(0, idx), "reduced");
      Q.index_copy_(0, idx, Qh);
      R.index_copy_(0, idx, Rh);
    }
    return {Q, R};
  }

  // One CholeskyQR step: R from the fp64 Gram, Q = Y R^{-1} in Y's precision. The shift of
  // pass 1 (Fukaya et al. 2020, shifted CholeskyQR, with fp64 unit roundoff) keeps the
  // Cholesky defined for numerically rank-deficient Y; pass 2 then restores orthogonality.
  std::tuple<Tensor, Tensor, Tensor> cholesky_qr_pass(const Tensor& Y, bool shift) {
    // Pass 1 needs the fp64 Gram (cond(Y) up to ~1/u32); pass 2 sees a nearly orthonormal Q1,
    // whose Gram is accurate in the working precision at a fraction of the fp64 GEMM's cost.
    auto [Rd, bad] = !shift ? cholesky_of(gram_of(Y, policy_).to(at::kDouble), Y.size(-2), false)
                            : first_pass_cholesky(Y);
    // Pass 2 sees a nearly orthonormal Q1 unless Y was numerically rank-deficient; there a
    // spread of R's diagonal means Q would keep an orthogonality error ~ u * spread.
    if (!shift) bad.logical_or_(diagonal_spread(Rd).le(kMaxPass2Spread).logical_not());
    // Q = Y R^{-1} as a GEMM with the explicit inverse. Its rounding error, ~u * cond(R)
    // relative, is the order of a triangular solve's, and pass 2 removes it.
    Tensor Q = times_upper_inverse(Y, Rd, policy_);
    return {Q, Rd.to(Y.scalar_type()), bad};
  }

  // R (fp64, upper, G = R^T R) of pass 1 and which matrices failed. On the CPU an fp32 Y first
  // tries the fp32 Gram (a third of the fp64 one's cost: no fp64 copy, twice the GEMM rate):
  // its error ~u32 * l * ||Y||^2 leaves Q1 an orthogonality error ~u32 * l * cond(Y)^2, which
  // pass 2 removes while that is well below 1. A diagonal spread of R below kFp32GramSpread
  // (cond(Y) >= spread, and an fp32 Gram makes any Y with cond(Y) >~ 1/sqrt(u32 * l) look at least
  // that spread) is accepted; otherwise the batch is redone from the fp64 Gram. CUDA skips the
  // attempt: deciding would synchronize with the host.
  std::tuple<Tensor, Tensor> first_pass_cholesky(const Tensor& Y) {
    const int64_t m = Y.size(-2);
    if (policy_.check_each_qr && Y.scalar_type() == at::kFloat) {
      auto [Rd, bad] = cholesky_of(gram_of(Y, policy_).to(at::kDouble), m, true);
      if (!bad.logical_or(diagonal_spread(Rd).le(kFp32GramSpread).logical_not()).any().item<bool>()) return {Rd, bad};
    }
    const Tensor G = policy_.gram_fp64 ? policy_.gram_fp64(Y) : Tensor();
    return cholesky_of(G.defined() ? G : gram_fp64_aten(Y), m, true);
  }

  // Cholesky factor R of the Gram G [b, l, l] (fp64) of an m-row matrix, shifted for pass 1.
  static std::tuple<Tensor, Tensor> cholesky_of(Tensor G, int64_t m, bool shift) {
    const int64_t l = G.size(-1);
    if (shift) {
      const double u = std::numeric_limits<double>::epsilon() / 2;
      Tensor trace = G.diagonal(0, -2, -1).sum(-1);  // [b]
      Tensor s = trace * (u * double(m * l + l * (l + 1))) + std::numeric_limits<double>::min();
      G.diagonal(0, -2, -1).add_(s.unsqueeze(-1));
    }
    auto [L, info] = at::linalg_cholesky_ex(G, /*upper=*/false, /*check_errors=*/false);
    Tensor Rd = L.mT();  // [b, l, l] upper, G = R^T R
    Tensor bad = info.ne(0).logical_or(Rd.isfinite().logical_not().flatten(1).any(-1));
    return {Rd, bad};
  }

  static constexpr double kMaxPass2Spread = 1e2;
  static constexpr double kFp32GramSpread = 30;

  // Y^T Y in fp64, accumulated over row tiles of ~4 MiB: no fp64 copy of the whole Y (an
  // n x L Rayleigh-Ritz basis would otherwise mean allocating and faulting in tens of MB).
  static Tensor gram_fp64_aten(const Tensor& Y) {
    const int64_t rows = Y.size(-2), l = Y.size(-1);
    const int64_t tile = std::max<int64_t>(256, (int64_t(4) << 20) / (8 * l));
    if (rows <= tile) {
      Tensor Yd = Y.to(at::kDouble);
      return at::matmul(Yd.mT(), Yd);
    }
    Tensor G = at::zeros({Y.size(0), l, l}, Y.options().dtype(at::kDouble));  // [b, l, l]
    for (int64_t s = 0; s < rows; s += tile) {
      Tensor Yd = Y.narrow(-2, s, std::min(tile, rows - s)).to(at::kDouble);  // [b, tile, l]
      G.baddbmm_(Yd.mT(), Yd);
    }
    return G;
  }

  const RsvdPolicy& policy_;
  Tensor failed_;
  bool householder_only_ = false;
};

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

// Blocks of the Krylov space [Q0, Q1, ...]: power_iters + 1, but never wider than the matrix.
int64_t krylov_blocks(int64_t power_iters, int64_t min_dim, int64_t block) {
  return std::max<int64_t>(1, std::min(power_iters + 1, min_dim / block));
}

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

// The largest estimated condition number (diagonal spread of its R) of a product that the
// fused pass feeds on unorthonormalized: there the fp32 rounding of the second product, ~u
// relative to its largest column, is ~u * cond relative to the weakest direction of the block,
// instead of ~u * sqrt(cond) with a separate orthonormalization. 1e4 keeps that under 1e-3,
// far below the iteration's own error in those directions (overlap 0.9 at q = 2).
constexpr double kGramPassMaxCond = 1e4;

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

bool gram_pass_applies(const RsvdPolicy& policy, const Tensor& A) {
  if (!policy.gram_pass || A.scalar_type() != at::kFloat) return false;
  // Row-major storage, either orientation; below 64K elements the extra passes cost nothing.
  const bool row_major = A.stride(-1) == 1 || A.stride(-2) == 1;
  return row_major && A.size(-2) * A.size(-1) >= (int64_t(1) << 16);
}

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
// OpenMP; LAPACK inside OpenMP workers livelocked in MKL's sgeqrf, commit 7e6a3b4), and the fp64
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

// The rsvd of one batch already in the working precision. A: [b, m, n] with m >= n (the op
// hands wide matrices over transposed), sketch: [n, l]. Signs are left to the caller.
std::tuple<Tensor, Tensor, Tensor> rsvd_batch(const Tensor& A, const Tensor& sketch, int64_t rank,
                                              int64_t power_iters, Method method,
                                              Orthonormalizer& orth, const RsvdPolicy& policy) {
  const int64_t m = A.size(-2), n = A.size(-1), l = sketch.size(-1);
  Tensor basis, Bt;                                               // [b, m, L], [b, n, L]
  const int64_t blocks = method == Method::Krylov ? krylov_blocks(power_iters, std::min(m, n), l) : 0;
  if (gram_pass_applies(policy, A)) {
    Tensor rejected;
    std::tie(basis, Bt, rejected) = method == Method::Power ? power_range_fused(A, sketch, power_iters, orth, policy)
                                                            : krylov_range_fused(A, sketch, blocks, orth, policy);
    if (rejected.any().item<bool>()) {
      const Tensor idx = rejected.nonzero().squeeze(-1);
      // In A's own layout (a wide A is a column-major view): the same GEMMs as the plain path.
      const Tensor Ar = A.stride(-1) == 1 ? A.index_select(0, idx) : A.mT().index_select(0, idx).mT();
      auto [Qp, Btp] = method == Method::Power ? power_range(Ar, sketch, power_iters, orth)
                                               : krylov_range(Ar, sketch, blocks, orth);
      basis.index_copy_(0, idx, Qp);
      Bt.index_copy_(0, idx, Btp);
    }
  } else if (method == Method::Power) {
    std::tie(basis, Bt) = power_range(A, sketch, power_iters, orth);
  } else {
    std::tie(basis, Bt) = krylov_range(A, sketch, blocks, orth);
  }
  // Rayleigh-Ritz: A ~= basis basis^T A = basis Bt^T = basis R^T P^T with Bt = P R.
  auto [P, R] = orth(Bt);                                          // [b, n, L], [b, L, L]
  const at::ScalarType work = A.scalar_type();
  Tensor X = R.mT();                                               // [b, L, L]
  // Deferred checks (CUDA): a matrix whose factorization failed is redone at the end of the op,
  // and until then its factor may hold NaN or Inf, on which the small SVD or eigensolver would
  // raise (an all-zero A does that). Zero it instead; the redo replaces its results.
  if (!policy.check_each_qr) X = X.masked_fill(orth.failed().view({-1, 1, 1}), 0);
  auto [Ur, S, Vr] = rayleigh_ritz_svd(X, rank, policy, orth);
  Tensor U = times_small(basis, Ur.to(work), /*upper=*/false, policy);  // [b, m, rank]
  Tensor V = times_small(P, Vr.to(work), /*upper=*/false, policy);      // [b, n, rank]
  return {U, S.to(work), V};
}

}  // namespace

RsvdPolicy cuda_flow_policy() {
  RsvdPolicy policy;
  policy.check_each_qr = false;
  policy.householder_max_elements = 0;
  policy.rayleigh_ritz = RsvdPolicy::SmallSvd::Eigh;
  return policy;
}

std::tuple<Tensor, Tensor, Tensor> rsvd_forward(const Tensor& A, const Tensor& sketch,
                                                int64_t rank, int64_t power_iters,
                                                std::string_view method_name,
                                                const RsvdPolicy& device_policy) {
  check_matrix("rsvd", "A", A);
  check_float("rsvd", "A", A);
  check_float("rsvd", "sketch", sketch);
  const Method method = parse_method(method_name);
  const int64_t m = A.size(-2), n = A.size(-1), short_side = std::min(m, n);
  TORCH_CHECK_VALUE(sketch.dim() == 2 && sketch.size(0) == short_side,
                    "loraport.rsvd: sketch must be [min(m, n), l] = [", short_side, ", l] for A of shape ",
                    shape_str(A), ", got ", shape_str(sketch));
  const int64_t l = sketch.size(1);
  TORCH_CHECK_VALUE(rank >= 1, "loraport.rsvd: rank must be >= 1, got ", rank);
  TORCH_CHECK_VALUE(power_iters >= 0, "loraport.rsvd: power_iters must be >= 0, got ", power_iters);
  TORCH_CHECK_VALUE(l <= short_side, "loraport.rsvd: the sketch width must be <= min(m, n), got width ", l,
                    " for A of shape ", shape_str(A));
  if (method == Method::Power) {
    TORCH_CHECK_VALUE(rank <= l, "loraport.rsvd: method \"power\" needs rank <= sketch width, got rank=", rank,
                      ", sketch width ", l);
  } else {
    const int64_t space = krylov_blocks(power_iters, short_side, l) * l;
    TORCH_CHECK_VALUE(rank <= space, "loraport.rsvd: method \"krylov\" needs rank <= (power_iters + 1) * block "
                      "(and at most min(m, n) / block blocks); got rank=", rank, ", block ", l, ", power_iters ",
                      power_iters, ": a Krylov space of ", space, " columns");
  }
  TORCH_CHECK_VALUE(A.device() == sketch.device(), "loraport.rsvd: A and sketch must be on the same device, got ",
                    A.device(), " and ", sketch.device());

  const at::ScalarType work = compute_dtype({A});
  RsvdPolicy policy = device_policy;
  using SmallSvd = RsvdPolicy::SmallSvd;
  if (const char* env = std::getenv("LORAPORT_RAYLEIGH_RITZ")) {
    const std::string_view choice(env);
    TORCH_CHECK_VALUE(choice == "svd" || choice == "eigh" || choice == "host",
                      "LORAPORT_RAYLEIGH_RITZ must be svd, eigh or host, got ", choice);
    policy.rayleigh_ritz = choice == "svd" ? SmallSvd::Svd : choice == "eigh" ? SmallSvd::Eigh : SmallSvd::EighOnHost;
  } else if (work == at::kDouble) {
    // The eigendecomposition of the factor's Gram squares its condition number: singular values
    // below ~sqrt(u64) sigma_1 come out with an absolute error ~u64 sigma_1^2 / sigma_i, invisible
    // next to float32's own rounding but 200x the optimal rank-65 error of a float64 A with
    // spectrum 0.7^j (1.7e-8 against 8.5e-11 of ||A||; CPU, 2026-12-01). float64 work takes the SVD.
    policy.rayleigh_ritz = SmallSvd::Svd;
  }
  const auto opts = A.options().dtype(work);
  std::vector<int64_t> batch_shape(A.sizes().begin(), A.sizes().end() - 2);
  const int64_t b = c10::multiply_integers(batch_shape);
  auto out_shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s = batch_shape;
    s.insert(s.end(), tail);
    return s;
  };
  auto outputs = [&](const Tensor& U, const Tensor& S, const Tensor& V) {
    return std::make_tuple(U.reshape(out_shape({m, rank})), S.reshape(out_shape({rank})), V.reshape(out_shape({n, rank})));
  };
  if (b == 0) return outputs(at::empty({b, m, rank}, opts), at::empty({b, rank}, opts), at::empty({b, n, rank}, opts));

  // Work on the tall orientation (a transposed view of a wide A; BLAS takes either layout):
  // the Krylov basis then lives on the long side and the Rayleigh-Ritz factorization of
  // A^T basis, the costliest step after the GEMMs, on the short side.
  const bool wide = m < n;
  const Tensor Abmn = A.reshape({b, m, n});
  const Tensor A3 = wide ? Abmn.mT() : Abmn;  // [b, long, short]
  const Tensor sk = sketch.to(work);                                          // [short, l]

  const bool upcast = A.scalar_type() != work;

  // LORAPORT_UPCAST_CHUNK_BYTES overrides the policy's bound (tests use it to run the loop).
  int64_t chunk_bytes = policy.upcast_chunk_bytes;
  if (const char* env = std::getenv("LORAPORT_UPCAST_CHUNK_BYTES")) chunk_bytes = std::max<int64_t>(1, std::atoll(env));
  const int64_t elem = c10::elementSize(work);
  const int64_t chunk = A.scalar_type() == work ? b : std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, m * n * elem));
  // The batch, `chunk` matrices at a time. bf16/fp16 go through one staging buffer, refilled
  // chunk after chunk: a fresh allocation per chunk cost 8x the conversion itself in first-touch
  // page faults on the CPU (0.36 s vs 0.045 s for 4 x [21504, 3072]).
  const Tensor staging = upcast ? at::empty({std::min(chunk, b), m, n}, opts) : Tensor();
  // In one chunk the chunk's results are the outputs; several fill these.
  Tensor U, S, V;
  if (chunk < b) U = at::empty({b, m, rank}, opts), S = at::empty({b, rank}, opts), V = at::empty({b, n, rank}, opts);
  for (int64_t s = 0; s < b; s += chunk) {
    const int64_t c = std::min(chunk, b - s);
    Tensor Ac = A3.narrow(0, s, c);  // a view when A is already fp32/fp64
    if (upcast) {
      Tensor dst = staging.narrow(0, 0, c);  // [c, m, n], A's own orientation
      dst.copy_(Abmn.narrow(0, s, c));
      Ac = wide ? dst.mT() : dst;  // [c, long, short]
    }
    Orthonormalizer orth(policy, c, opts);
    auto [Uc, Sc, Vc] = rsvd_batch(Ac, sk, rank, power_iters, method, orth, policy);
    if (!policy.check_each_qr && orth.failed().any().item<bool>()) {
      // The CUDA path's own host synchronization (ATen's eigensolver adds one for its error
      // check): redo the (rare) matrices whose CholeskyQR broke down with Householder QR.
      Tensor idx = orth.failed().nonzero().squeeze(-1);
      Orthonormalizer householder(policy, idx.numel(), opts);
      householder.use_householder_only();
      auto [Uh, Sh, Vh] = rsvd_batch(Ac.index_select(0, idx), sk, rank, power_iters, method, householder, policy);
      Uc.index_copy_(0, idx, Uh);
      Sc.index_copy_(0, idx, Sh);
      Vc.index_copy_(0, idx, Vh);
    }
    if (wide) std::swap(Uc, Vc);  // the SVD of A^T is V S U^T
    normalize_signs(Uc, Vc);
    if (c == b) return outputs(Uc.contiguous(), Sc.contiguous(), Vc.contiguous());
    U.narrow(0, s, c).copy_(Uc);
    S.narrow(0, s, c).copy_(Sc);
    V.narrow(0, s, c).copy_(Vc);
  }
  return outputs(U, S, V);
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
