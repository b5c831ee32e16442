// One call of cuSOLVER's batched eigensolver for the Rayleigh-Ritz step on CUDA
// (csrc/cuda/batched_eigh.cpp), which the CUDA policy (ops_cuda.cpp) hands to csrc/linalg/.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace loraport {

// The smallest n it takes: for n <= 32 ATen already calls a batched cuSOLVER routine.
constexpr int64_t kBatchedEighMinSize = 33;

// Symmetric fp64 G [b, n, n] on a GPU, b >= 2, n >= kBatchedEighMinSize -> {eigenvalues [b, n]
// ascending, eigenvectors [b, n, n] (columns)}, by one cusolverDnXsyevBatched call, where
// torch's at::linalg_eigh (up to torch 2.11 at least) runs cuSOLVER's syevd once per matrix.
// Every result is checked on the device before it is returned (residual, orthogonality, order,
// cuSOLVER's info) in one host synchronization, as ATen's eigensolver makes (a second only
// after a failed check). Undefined tensors where it does not apply or fails: the caller then
// uses at::linalg_eigh.
// LORAPORT_CUSOLVER_EIGH=0 turns it off; =require makes any fallback an error (the CUDA tests).
std::tuple<at::Tensor, at::Tensor> batched_eigh_cusolver(const at::Tensor& G);

}  // namespace loraport
