// rsvd: the randomized SVD of a batch (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), the
// op's checks, its chunked upcast of float16/bfloat16 input and its device-generic control flow:
// a range finder (range_finders.h), orthonormalization by CholeskyQR2 (orthonormalize.h), and
// the Rayleigh-Ritz step on the SVD of the small R of B^T = A^T Q = P R (l x l; rayleigh_ritz.h)
// instead of a dense SVD of the l x n matrix B. Wide matrices (m < n) are decomposed as A^T, so
// the sketch is [min(m, n), l]. Krylov blocks may be narrower than the rank (the space only has
// to be as wide as the rank): the cost of a pass is proportional to the block width, and a
// narrow block with more iterations reaches a given subspace accuracy with fewer GEMM flops
// (benchmarks/RESULTS.md).
#include <algorithm>
#include <string>
#include <vector>

#include "config.h"
#include "linalg.h"
#include "linalg/checks.h"
#include "linalg/range_finders.h"
#include "linalg/rayleigh_ritz.h"

namespace loraport {

using at::Tensor;
using namespace detail;

namespace {

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

// The bound on rsvd's float32 copy of float16/bfloat16 input: it is upcast this many bytes of
// matrices at a time, through one staging buffer.
constexpr int64_t kUpcastChunkBytes = int64_t(256) << 20;

// How many matrices of a float16/bfloat16 batch of b [m, n] rsvd upcasts to float32 at a time:
// as many as kUpcastChunkBytes (or the knob LORAPORT_UPCAST_CHUNK_BYTES) holds, at least one.
int64_t upcast_batch(int64_t b, int64_t m, int64_t n, const EngineConfig& config) {
  const int64_t bound = config.upcast_chunk_bytes > 0 ? config.upcast_chunk_bytes : kUpcastChunkBytes;
  return std::min(b, std::max<int64_t>(1, bound / std::max<int64_t>(1, m * n * int64_t(sizeof(float)))));
}

}  // namespace

int64_t krylov_blocks(int64_t power_iters, int64_t min_dim, int64_t block) {
  TORCH_CHECK_VALUE(power_iters >= 0 && min_dim >= 1 && block >= 1, "loraport.krylov_blocks: needs power_iters >= 0, "
                    "min_dim >= 1 and block >= 1, got ", power_iters, ", ", min_dim, ", ", block);
  return std::max<int64_t>(1, std::min(power_iters + 1, min_dim / block));
}

// Per matrix in flight (b = the batch, or the upcast chunk of float16/bfloat16 input), in the
// working precision's e bytes: the basis [m, L], B^T [n, L] and its orthonormal factor P [n, L]
// (3(m + n)L, which also covers the Krylov loop's projection temporaries), CholeskyQR2's input,
// Q1 and Q ([max(m, n), l] each) and its float64 copy for the Gram matrix (8 max(m, n) l); plus
// the float32 staging buffer of an upcast chunk and the outputs U, S, V of the whole batch. Small
// terms (the sketch, l x l Grams, the Householder redo of a matrix whose CholeskyQR broke down)
// are left out: tests/test_memory_model.py checks the sum against measured peaks.
int64_t rsvd_workspace_bytes(int64_t batch, int64_t m, int64_t n, at::ScalarType dtype, int64_t rank, int64_t width,
                             int64_t power_iters, std::string_view method_name) {
  const Method method = parse_method(method_name);
  TORCH_CHECK_VALUE(batch >= 0 && m >= 1 && n >= 1 && rank >= 1 && width >= 1 && power_iters >= 0,
                    "loraport.rsvd_workspace_bytes: needs batch >= 0 and m, n, rank, width >= 1, power_iters >= 0, "
                    "got batch=", batch, ", m=", m, ", n=", n, ", rank=", rank, ", width=", width, ", power_iters=",
                    power_iters);
  TORCH_CHECK_VALUE(at::isFloatingType(dtype), "loraport.rsvd_workspace_bytes: dtype must be a floating-point type, got ",
                    dtype);
  const at::ScalarType work = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t e = int64_t(c10::elementSize(work));
  const int64_t l = std::min({width, m, n}), long_side = std::max(m, n);
  const int64_t L = method == Method::Krylov ? l * krylov_blocks(power_iters, std::min(m, n), l) : l;
  const bool upcast = dtype != work;
  const int64_t in_flight = upcast ? upcast_batch(batch, m, n, engine_config()) : batch;
  const int64_t staging = upcast ? in_flight * m * n * e : 0;
  const int64_t workspace = in_flight * (e * (3 * (m + n) * L + 3 * long_side * l) + 8 * long_side * l);
  const int64_t outputs = batch * e * (m + n + 1) * rank;
  return staging + workspace + outputs;
}

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
  using RayleighRitz = EngineConfig::RayleighRitz;
  const EngineConfig config = engine_config();
  if (config.rayleigh_ritz != RayleighRitz::Default) {
    policy.rayleigh_ritz = config.rayleigh_ritz == RayleighRitz::Svd    ? SmallSvd::Svd
                           : config.rayleigh_ritz == RayleighRitz::Eigh ? SmallSvd::Eigh
                                                                        : SmallSvd::EighOnHost;
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

  const int64_t chunk = upcast ? upcast_batch(b, m, n, config) : b;
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

}  // namespace loraport
