// The engine knobs (table: docs/engine-knobs.md), parsed in one place into one EngineConfig. The
// environment is read once, on the first op call that asks; the ops read the parsed config, never
// the environment. Tests and benchmarks change a knob for a while through the test hook
// set_knob_for_testing (the op loraport::_testing_set_knob; Python: loraport.engine_knobs).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace loraport {

struct EngineConfig {
  // LORAPORT_RAYLEIGH_RITZ=svd|eigh|host: rsvd's Rayleigh-Ritz SVD on every device
  // (RsvdPolicy::SmallSvd); Default: the device policy's choice (SVD for float64 work).
  enum class RayleighRitz { Default, Svd, Eigh, Host };
  RayleighRitz rayleigh_ritz = RayleighRitz::Default;
  // LORAPORT_UPCAST_CHUNK_BYTES: bound on rsvd's float32 copy of float16/bfloat16 input; 0 = the
  // policy's (RsvdPolicy::upcast_chunk_bytes).
  int64_t upcast_chunk_bytes = 0;
  // LORAPORT_GRAM_PASS=0 / LORAPORT_SKINNY_KERNELS=0: the CPU's AVX2 fused pass / small products
  // off (ATen's GEMMs instead).
  bool gram_pass = true;
  bool skinny_kernels = true;
  // LORAPORT_BF16_KERNELS=0: the CPU's weight_times on bf16 weights through ATen (an exact float32
  // copy and its GEMM) instead of the AVX512-BF16 kernels.
  bool bf16_kernels = true;
  // LORAPORT_CUSOLVER_EIGH=0|1|require: cuSOLVER's batched eigensolver off, on (falling back to
  // at::linalg_eigh where it does not apply), or on with any fallback an error.
  enum class CusolverEigh { Off, On, Require };
  CusolverEigh cusolver_eigh = CusolverEigh::On;
  // Knob "cpu_policy" (test hook only, no environment variable): "cuda" makes the CPU op run
  // the CUDA op's control flow (linalg.h, cuda_flow_policy), so CPU-only machines test it.
  bool cpu_runs_cuda_flow = false;
};

// A copy of the current config (the environment parsed on first use).
EngineConfig engine_config();

// TEST HOOK. Sets knob `name` (a knob's name in docs/engine-knobs.md: "rayleigh_ritz",
// "upcast_chunk_bytes", "gram_pass", "skinny_kernels", "bf16_kernels", "cusolver_eigh", "cpu_policy") to `value`
// as its environment variable would ("" = unset: the default), for every later op call in the
// process, and returns the value it had ("" = unset). Production code never calls it.
std::string set_knob_for_testing(std::string_view name, std::string_view value);

}  // namespace loraport
