// The CPU's AVX512-BF16 kernels: the default gate's products over bf16 weights
// (bf16_times_avx512.cpp), called only on CPUs that report AVX512-BF16 (the op weight_times,
// csrc/cpu/ops_cpu.cpp; tests: tests/test_ops.py, test_weight_times_*; benchmark: benchmarks/gate.py).
#pragma once

#include <ATen/ATen.h>

namespace loraport {

// True when the kernels were compiled in and this CPU has AVX-512 F/BW/VL and BF16.
bool bf16_kernels_available();

// A: [m, n] contiguous CPU bfloat16; basis: [n, l] (or [m, l] with transpose) of any floating
// dtype, rounded to bf16. Returns A basis [m, l] (or Aᵀ basis [n, l]) float32, contiguous,
// summed in float32.
at::Tensor bf16_times_avx512(const at::Tensor& A, const at::Tensor& basis, bool transpose);

}  // namespace loraport
