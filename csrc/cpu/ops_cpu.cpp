// CPU kernels of the loraport ops: the device-generic algorithms of csrc/linalg.cpp run on
// ATen's CPU BLAS, with a CPU policy (check each CholeskyQR at once, Householder QR for small
// blocks, the AVX2 kernels of csrc/cpu/kernels_avx2.h). Schemas: csrc/ops.cpp.
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "cpu/kernels_avx2.h"
#include "linalg.h"

namespace loraport {

bool avx2_kernels_available() {
#if defined(LORAPORT_WITH_AVX2)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

namespace {

// LORAPORT_GRAM_PASS=0 turns the fused pass off, LORAPORT_SKINNY_KERNELS=0 the small products
// (tests and benchmarks compare each with ATen's GEMMs).
bool enabled(const char* env_name) {
  const char* env = std::getenv(env_name);
  return avx2_kernels_available() && !(env && std::string_view(env) == "0");
}

// The operands skinny_avx2.cpp takes: CPU float32, X (and Y) [b, m, l] with unit column stride.
bool skinny_operand(const at::Tensor& X) {
  return X.dim() == 3 && X.scalar_type() == at::kFloat && X.stride(-1) == 1 && X.device().is_cpu();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& A, const at::Tensor& sketch,
                                                        int64_t rank, int64_t power_iters,
                                                        c10::string_view method) {
  RsvdPolicy policy;
  policy.check_each_qr = true;
  // Measured (1 thread, 24 x [16, 16], rank 6): 8.3 ms with CholeskyQR2 throughout, 2.2 ms
  // with Householder for small blocks; no measurable change on [8, 320, 320] and larger.
  policy.householder_max_elements = int64_t(1) << 16;
#if defined(LORAPORT_WITH_AVX2)
  if (enabled("LORAPORT_GRAM_PASS")) policy.gram_pass = &gram_pass_avx2;
  if (enabled("LORAPORT_SKINNY_KERNELS")) {
    policy.gram = [](const at::Tensor& Y) { return skinny_operand(Y) ? gram_avx2(Y) : at::Tensor(); };
    policy.gram_fp64 = [](const at::Tensor& Y) {
      return skinny_operand(Y) ? gram_fp64_avx2(Y) : at::Tensor();
    };
    // Back substitution took half of ATen's triangular solve's time at l = 72 and 37 (0.047 vs
    // 0.097 ms on [2, 72, 72]), 1.8x its time at l = 216: ATen's blocked solve takes l > 128.
    policy.upper_inverse = [](const at::Tensor& R, at::ScalarType dtype) {
      return R.size(-1) <= 128 ? upper_inverse_cpu(R, dtype) : at::Tensor();
    };
    policy.times_small = [](const at::Tensor& X, const at::Tensor& T, bool upper) {
      return skinny_operand(X) && T.scalar_type() == at::kFloat ? times_small_avx2(X, T, upper) : at::Tensor();
    };
  }
#endif
  return rsvd_forward(A, sketch, rank, power_iters, std::string_view(method.data(), method.size()), policy);
}

}  // namespace

TORCH_LIBRARY_IMPL(loraport, CPU, m) {
  m.impl("rsvd", &rsvd_cpu);
  m.impl("project_lora", &project_lora_forward);
  m.impl("subspace_similarity", &subspace_similarity_forward);
}

}  // namespace loraport
