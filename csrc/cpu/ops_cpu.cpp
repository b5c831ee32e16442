// CPU kernels of the loraport ops: the device-generic algorithms of csrc/linalg/ run on
// ATen's CPU BLAS, with a CPU policy (check each CholeskyQR at once, Householder QR for small
// blocks, the AVX2 kernels of csrc/cpu/kernels_avx2.h). Schemas: csrc/ops.cpp.
#include <torch/library.h>

#include <string_view>

#include "config.h"
#include "cpu/kernels_avx2.h"
#include "cpu/kernels_avx512bf16.h"
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

bool bf16_kernels_in_use() {
#if defined(LORAPORT_WITH_AVX512BF16)
  return engine_config().bf16_kernels && bf16_kernels_available();
#else
  return false;
#endif
}

namespace {

at::Tensor weight_times_cpu(const at::Tensor& A, const at::Tensor& basis, bool transpose) {
#if defined(LORAPORT_WITH_AVX512BF16)
  if (A.scalar_type() == at::kBFloat16 && bf16_kernels_in_use()) {
    check_weight_times(A, basis, transpose);
    return bf16_times_avx512(A.contiguous(), basis, transpose);
  }
#endif
  return weight_times_forward(A, basis, transpose);
}

// The operands skinny_avx2.cpp takes: CPU float32, X (and Y) [b, m, l] with unit column stride.
bool skinny_operand(const at::Tensor& X) {
  return X.dim() == 3 && X.scalar_type() == at::kFloat && X.stride(-1) == 1 && X.device().is_cpu();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& A, const at::Tensor& sketch,
                                                        int64_t rank, int64_t power_iters,
                                                        c10::string_view method) {
  const std::string_view method_name(method.data(), method.size());
  const EngineConfig config = engine_config();
  // Test knob cpu_policy=cuda: the CUDA op's control flow without its kernels (linalg.h, cuda_flow_policy).
  if (config.cpu_runs_cuda_flow) return rsvd_forward(A, sketch, rank, power_iters, method_name, cuda_flow_policy());
  RsvdPolicy policy;
  policy.check_each_qr = true;
  // Householder for blocks of at most 2048 elements: ATen's batched QR runs LAPACK one matrix
  // after another on one thread, CholeskyQR2 is a few batched products on both. Medians of 9
  // interleaved calls, 2 threads (2-core EPYC VM, 2026-12-01; this bound / CholeskyQR2 for every
  // block / the earlier bound of 2^16): 24 x [16, 16] rank 6: 3.1 / 6.1 / 3.1 ms; 64 x [64, 64]
  // rank 8: 12.6 / 13.6 / 12.8 ms; 8 x [128, 128] rank 16: 6.5 / 6.4 / 7.2 ms; 256 x [512, 128]
  // rank 16: 145 / 150 / 194 ms; 16 x [640, 640] rank 64: 104 / 100 / 109 ms.
  policy.householder_max_elements = 2048;
#if defined(LORAPORT_WITH_AVX2)
  // The knobs LORAPORT_GRAM_PASS=0 and LORAPORT_SKINNY_KERNELS=0 turn the fused pass and the small
  // products off (tests and benchmarks compare each with ATen's GEMMs).
  if (config.gram_pass && avx2_kernels_available()) policy.gram_pass = &gram_pass_avx2;
  if (config.skinny_kernels && avx2_kernels_available()) {
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
  return rsvd_forward(A, sketch, rank, power_iters, method_name, policy);
}

}  // namespace

TORCH_LIBRARY_IMPL(loraport, CPU, m) {
  m.impl("rsvd", &rsvd_cpu);
  m.impl("product_svd", &product_svd_forward);
  m.impl("project_lora", &project_lora_forward);
  m.impl("subspace_similarity", &subspace_similarity_forward);
  m.impl("weight_times", &weight_times_cpu);
}

}  // namespace loraport
