// CPU kernels of the loraport ops: the device-generic algorithms of csrc/linalg.cpp run on
// ATen's CPU BLAS, with a CPU policy (check each CholeskyQR at once, Householder QR for small
// blocks, the fused AVX2 pass of csrc/cpu/gram_pass_avx2.cpp). Schemas: csrc/ops.cpp.
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "cpu/gram_pass.h"
#include "linalg.h"

namespace loraport {

bool gram_pass_available() {
#if defined(LORAPORT_WITH_AVX2)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

namespace {

// LORAPORT_GRAM_PASS=0 turns the fused pass off (tests and benchmarks compare the two paths).
bool gram_pass_enabled() {
  const char* env = std::getenv("LORAPORT_GRAM_PASS");
  return gram_pass_available() && !(env && std::string_view(env) == "0");
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
  if (gram_pass_enabled()) policy.gram_pass = &gram_pass_avx2;
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
