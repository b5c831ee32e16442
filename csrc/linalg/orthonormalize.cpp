// Orthonormalization for rsvd (orthonormalize.h): mixed-precision CholeskyQR2 with a
// Householder fallback, and the small products around it, through the device policy's hooks.
#include "linalg/orthonormalize.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace loraport::detail {
namespace {

// Y^T Y [b, l, l] of Y [b, m, l], in Y's dtype (RsvdPolicy::gram where it takes Y).
Tensor gram_of(const Tensor& Y, const RsvdPolicy& policy) {
  Tensor G = policy.gram ? policy.gram(Y) : Tensor();
  return G.defined() ? G : at::matmul(Y.mT(), Y);
}

// The largest spread of R's diagonal that CholeskyQR's second pass accepts, and that the CPU's
// fp32 first Gram accepts (Orthonormalizer::cholesky_qr_pass, first_pass_cholesky).
constexpr double kMaxPass2Spread = 1e2;
constexpr double kFp32GramSpread = 30;

// Cholesky factor R of the Gram G [b, l, l] (fp64) of an m-row matrix, shifted for pass 1.
std::tuple<Tensor, Tensor> cholesky_of(Tensor G, int64_t m, bool shift) {
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

// Y^T Y in fp64, accumulated over row tiles of ~4 MiB: no fp64 copy of the whole Y (an
// n x L Rayleigh-Ritz basis would otherwise mean allocating and faulting in tens of MB).
Tensor gram_fp64_aten(const Tensor& Y) {
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

}  // namespace

// max |R_ii| / min |R_ii| of upper-triangular R [b, l, l]: a cheap lower estimate of cond(R).
Tensor diagonal_spread(const Tensor& R) {
  Tensor diag = R.diagonal(0, -2, -1).abs();
  return diag.amax(-1) / diag.amin(-1);  // [b]; inf or nan for a zero pivot (callers test "not <= bound")
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

Orthonormalizer::Orthonormalizer(const RsvdPolicy& policy, int64_t batch, const at::TensorOptions& opts)
    : policy_(policy) {
  if (!policy_.check_each_qr) failed_ = at::zeros({batch}, opts.dtype(at::kBool));
}

std::tuple<Tensor, Tensor> Orthonormalizer::operator()(const Tensor& Y) {
  if (use_householder(Y)) return at::linalg_qr(Y, "reduced");
  auto [Q1, R1, bad1] = cholesky_qr_pass(Y, /*shift=*/true);
  auto [Q, R2, bad2] = cholesky_qr_pass(Q1, /*shift=*/false);
  Tensor R = at::matmul(R2, R1);
  return repaired(Y, Q, R, bad1.logical_or(bad2));
}

std::tuple<Tensor, Tensor> Orthonormalizer::refine(const Tensor& X) {
  if (use_householder(X)) return at::linalg_qr(X, "reduced");
  auto [Q, R, bad] = cholesky_qr_pass(X, /*shift=*/false);
  return repaired(X, Q, R, bad);
}

bool Orthonormalizer::use_householder(const Tensor& Y) const {
  return householder_only_ || Y.size(-2) * Y.size(-1) <= policy_.householder_max_elements;
}

// CPU: redo the matrices of the batch whose factorization failed with Householder QR now
// (cheap, and only those). CUDA: remember them for one check at the end of the op.
std::tuple<Tensor, Tensor> Orthonormalizer::repaired(const Tensor& Y, Tensor Q, Tensor R, const Tensor& failed) {
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
std::tuple<Tensor, Tensor, Tensor> Orthonormalizer::cholesky_qr_pass(const Tensor& Y, bool shift) {
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
std::tuple<Tensor, Tensor> Orthonormalizer::first_pass_cholesky(const Tensor& Y) {
  const int64_t m = Y.size(-2);
  if (policy_.check_each_qr && Y.scalar_type() == at::kFloat) {
    auto [Rd, bad] = cholesky_of(gram_of(Y, policy_).to(at::kDouble), m, true);
    if (!bad.logical_or(diagonal_spread(Rd).le(kFp32GramSpread).logical_not()).any().item<bool>()) return {Rd, bad};
  }
  const Tensor G = policy_.gram_fp64 ? policy_.gram_fp64(Y) : Tensor();
  return cholesky_of(G.defined() ? G : gram_fp64_aten(Y), m, true);
}

}  // namespace loraport::detail
