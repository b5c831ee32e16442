// The hand-written CUDA kernels of csrc/cuda/kernels.cu, as the CUDA policy (ops_cuda.cpp) calls them.
#pragma once

#include <ATen/ATen.h>

namespace loraport {

// Whether this build's kernels have an image (SASS for the GPU, or PTX it can compile) for
// `device`; asked once per device, before the first launch. False: one warning naming the GPU
// and the build's architectures, and the caller uses ATen's kernels there.
bool kernels_run_on(c10::DeviceIndex device);

// Y [b, m, l] float32 -> Y^T Y [b, l, l] float64, accumulated in fp64 from the fp32 data.
at::Tensor gram_fp64_cuda(const at::Tensor& Y);

// The largest l that upper_inverse_cuda takes: the columns it builds, 4 warps x l doubles a
// block, stay in 32 KiB of shared memory.
constexpr int64_t kUpperInverseMaxSize = 1024;

// R [b, l, l] float64 upper-triangular -> R^{-1} [b, l, l] in out_dtype (float or double).
at::Tensor upper_inverse_cuda(const at::Tensor& R, at::ScalarType out_dtype);

}  // namespace loraport
