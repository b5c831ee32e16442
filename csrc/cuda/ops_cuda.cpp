// CUDA kernels of the loraport ops: the device-generic algorithms of csrc/linalg/ on
// cuBLAS/cuSOLVER (torch's current stream), plus, in a build with nvcc (LORAPORT_CUDA_KERNELS),
// our own fused fp32-in/fp64-accumulate Gram and triangular-inverse kernels
// (csrc/cuda/kernels.cu) for CholeskyQR. This file is plain C++: without nvcc it is compiled
// against the CUDA headers of torch's nvidia wheels and the ops run on ATen's kernels alone.
// The policy never synchronizes with the host inside a factorization; rsvd checks once per
// call whether any CholeskyQR broke down.
#include <torch/library.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/batched_eigh.h"
#include "linalg.h"
#ifdef LORAPORT_CUDA_KERNELS
#include "cuda/kernels.h"
#endif

namespace loraport {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& A, const at::Tensor& sketch,
                                                         int64_t rank, int64_t power_iters,
                                                         c10::string_view method) {
  const c10::cuda::CUDAGuard guard(A.device());
  RsvdPolicy policy = cuda_flow_policy();
  // The Rayleigh-Ritz SVD stays on the GPU (cuda_flow_policy's Eigh). On the host
  // (LORAPORT_RAYLEIGH_RITZ=host) these cases were faster in two leases and slower in the one
  // between: loraport.rsvd, median ms, GPU eigh / host, three H100 leases of 2026-11-28
  // (benchmarks/gpu_profile.py; RESULTS.md):
  // 4 x [12288, 3072] power rank 64 (L = 72): 16.2 / 14.0, 18.2 / 22.0, 15.8 / 12.4;
  // 256 x [512, 128] rank 16 (L = 24): 27.8 / 23.3, 26.0 / 79.6, 18.6 / 17.9; and it was slower
  // in all three at L = 192 and 384. Its speed varied with the host machine, whose cores a
  // pipeline reading the next layers meanwhile keeps busy too.
  policy.eigh = &batched_eigh_cusolver;  // one cuSOLVER call for the batch (batched_eigh.h)
#ifdef LORAPORT_CUDA_KERNELS
  if (kernels_run_on(A.device().index())) {  // else (a GPU this build lacks): ATen's Gram and triangular solve
    policy.gram_fp64 = [](const at::Tensor& Y) {
      return Y.scalar_type() == at::kFloat ? gram_fp64_cuda(Y) : at::Tensor();  // fp64 Y: linalg/orthonormalize.cpp's ATen Gram
    };
    policy.upper_inverse = [](const at::Tensor& R, at::ScalarType dtype) {
      return R.size(-1) <= kUpperInverseMaxSize ? upper_inverse_cuda(R, dtype) : at::Tensor();  // beyond: ATen
    };
  }
#endif
  return rsvd_forward(A, sketch, rank, power_iters, std::string_view(method.data(), method.size()), policy);
}

std::tuple<at::Tensor, at::Tensor> project_lora_cuda(const at::Tensor& up, const at::Tensor& down,
                                                     const at::Tensor& U, const at::Tensor& V, int64_t rank) {
  const c10::cuda::CUDAGuard guard(up.device());
  return project_lora_forward(up, down, U, V, rank);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> product_svd_cuda(const at::Tensor& up, const at::Tensor& down) {
  const c10::cuda::CUDAGuard guard(up.device());
  return product_svd_forward(up, down);
}

at::Tensor subspace_similarity_cuda(const at::Tensor& U1, const at::Tensor& U2) {
  const c10::cuda::CUDAGuard guard(U1.device());
  return subspace_similarity_forward(U1, U2);
}

at::Tensor weight_times_cuda(const at::Tensor& A, const at::Tensor& basis, bool transpose) {
  const c10::cuda::CUDAGuard guard(A.device());
  return weight_times_forward(A, basis, transpose);
}

}  // namespace

TORCH_LIBRARY_IMPL(loraport, CUDA, m) {
  m.impl("rsvd", &rsvd_cuda);
  m.impl("product_svd", &product_svd_cuda);
  m.impl("project_lora", &project_lora_cuda);
  m.impl("subspace_similarity", &subspace_similarity_cuda);
  m.impl("weight_times", &weight_times_cuda);
}

}  // namespace loraport
