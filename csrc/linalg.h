// Device-generic math behind the loraport ops, written against ATen only: the same code runs
// on CPU tensors (MKL/OpenBLAS GEMMs) and CUDA tensors (cuBLAS on torch's current stream). The
// per-device files (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp) choose a policy and register kernels.
// The implementation, by responsibility, in csrc/linalg/: rsvd.cpp (the op's control flow),
// range_finders.cpp (power and block Krylov), orthonormalize.cpp (CholeskyQR2 with a
// Householder fallback), rayleigh_ritz.cpp (the small SVD), lowrank_ops.cpp (project_lora,
// subspace_similarity).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string_view>
#include <tuple>
#include <utility>

namespace loraport {

enum class Method { Power, Krylov };

// How a device runs the shared algorithm.
struct RsvdPolicy {
  // CPU: inspect every CholeskyQR at once and redo a failed matrix with Householder QR.
  // CUDA: never synchronize mid-op; collect failures on the device and check once at the end.
  bool check_each_qr = true;
  // Householder QR (one LAPACK call) for Y with at most this many elements: on small matrices
  // CholeskyQR2's two dozen small ops cost more than the factorization itself. 0 = never.
  int64_t householder_max_elements = 0;
  // The Rayleigh-Ritz SVD of the small L x L factor:
  //   Svd: one SVD in the working precision (LAPACK on the CPU);
  //   Eigh: the fp64 eigendecomposition of its Gram matrix, then the QR of the Ritz vectors'
  //     images by the op's CholeskyQR2 (small_svd_by_eigh in linalg/rayleigh_ritz.cpp), on the tensor's
  //     device. On CUDA, cuSOLVER's fp32 Jacobi SVD left its
  //     singular vectors orthogonal to only 2e-5 (L = 72) and 1e-4 (L = 216), which
  //     U = basis Ur inherits, and its fp64 SVD took 1.4-1.6x as long; the fp64 eigensolver
  //     took 0.8-0.9x and 0.4x as long as the fp32 SVD (H200, [4, L, L], two runs, 2026-11-27;
  //     benchmarks/gpu_profile.py);
  //   EighOnHost: the same on the CPU with Householder QR (LAPACK, one matrix after another), the
  //     factor copied there and the results back. The copy synchronizes with the host, as
  //     ATen's CUDA eigensolver does for its error check, so the op makes no extra sync. Its speed
  //     on a GPU machine varied from lease to lease (measurements in ops_cuda.cpp).
  // float64 work takes Svd whatever the policy says (rsvd_forward: Eigh squares the factor's
  // condition number). The knob LORAPORT_RAYLEIGH_RITZ=svd|eigh|host overrides both (config.h;
  // the CPU tests run each choice with it).
  enum class SmallSvd { Svd, Eigh, EighOnHost };
  SmallSvd rayleigh_ritz = SmallSvd::Svd;
  // fp64 symmetric G [b, L, L] -> {eigenvalues ascending [b, L], eigenvectors [b, L, L]} for the
  // Eigh choice; undefined tensors where the hook does not take G. Null or undefined =
  // at::linalg_eigh. CUDA: cuSOLVER's batched eigensolver (csrc/cuda/batched_eigh.cpp).
  std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor& G)> eigh;
  // Y [b, m, l] (fp32 or fp64) -> Y^T Y [b, l, l] in fp64; an undefined tensor where the hook
  // does not take Y. Null or undefined = ATen (copy to fp64 + GEMM).
  std::function<at::Tensor(const at::Tensor&)> gram_fp64;
  // R [b, l, l] fp64 upper-triangular -> R^{-1} in the given dtype, for CholeskyQR's Q = Y R^{-1};
  // an undefined tensor where it does not take R. Null or undefined = ATen (a batched triangular
  // solve against the identity).
  std::function<at::Tensor(const at::Tensor& R, at::ScalarType dtype)> upper_inverse;
  // Y [b, m, l] -> Y^T Y [b, l, l] in Y's dtype, and X [b, m, l] times a small T [b, l, k]
  // (`upper`: T is upper-triangular, e.g. CholeskyQR's R^{-1}); an undefined tensor where the hook
  // does not take the operands. Null or undefined = ATen. CPU with AVX2: csrc/cpu/skinny_avx2.cpp.
  std::function<at::Tensor(const at::Tensor& Y)> gram;
  std::function<at::Tensor(const at::Tensor& X, const at::Tensor& T, bool upper)> times_small;
  // CPU with AVX2: {Y, W} = {A X, A^T Y} for an fp32 A [b, m, n], row- or column-major, in one
  // read of A (csrc/cpu/gram_pass_avx2.cpp), so the power method makes 3 reads of A instead of 6
  // at power_iters=2. Null = every product is its own GEMM.
  std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor& A, const at::Tensor& X)> gram_pass;
};

// The CUDA policy's device-independent choices, to which ops_cuda.cpp adds its kernels: no host
// synchronization inside a factorization (failures are collected and their matrices redone
// once, at the end), no Householder QR for small blocks, the fp64 eigensolver for the
// Rayleigh-Ritz step. The CPU op runs with exactly this under the test knob cpu_policy=cuda, so that the
// CPU tests cover the CUDA op's control flow (the fallbacks above all) on machines without a GPU.
RsvdPolicy cuda_flow_policy();

// Blocks of the Krylov space [Q0, Q1, ...] that rsvd's method "krylov" builds from blocks of
// `block` columns: power_iters + 1, but never wider than the matrix (min_dim = min(m, n)).
int64_t krylov_blocks(int64_t power_iters, int64_t min_dim, int64_t block);

// Bytes that one rsvd call on `batch` [m, n] matrices of `dtype` allocates at its peak, with
// sketch width `width` (the Krylov block) and `rank` outputs: an estimate from above of its
// workspace, float32 upcast chunk and outputs (csrc/linalg/rsvd.cpp says what it counts).
int64_t rsvd_workspace_bytes(int64_t batch, int64_t m, int64_t n, at::ScalarType dtype, int64_t rank, int64_t width,
                             int64_t power_iters, std::string_view method);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_forward(
    const at::Tensor& A, const at::Tensor& sketch, int64_t rank, int64_t power_iters,
    std::string_view method, const RsvdPolicy& policy);

// The SVD of a batch of low-rank products up down (up [..., m, p], down [..., p, n]) from the
// factors, in their coordinates: A, B [..., p, p] and S [..., p] (descending), all float64, with
// up down = (up A) diag(S) (down^T B)^T, up A and down^T B orthonormal (or zero) columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor> product_svd_forward(const at::Tensor& up, const at::Tensor& down);

std::tuple<at::Tensor, at::Tensor> project_lora_forward(
    const at::Tensor& up, const at::Tensor& down, const at::Tensor& U, const at::Tensor& V,
    int64_t rank);

at::Tensor subspace_similarity_forward(const at::Tensor& U1, const at::Tensor& U2);

// weight_times on ATen's GEMMs (every device; the CPU op takes bf16 weights to
// csrc/cpu/kernels_avx512bf16.h where it can): A basis [m, l] (basis [n, l]) or, with transpose,
// Aᵀ basis [n, l] (basis [m, l]), basis rounded to A's dtype, summed and returned in float32
// (A in float64: in float64, returned as float32).
at::Tensor weight_times_forward(const at::Tensor& A, const at::Tensor& basis, bool transpose);

// The checks weight_times makes on every device.
void check_weight_times(const at::Tensor& A, const at::Tensor& basis, bool transpose);

// Whether the CPU's weight_times runs bf16 weights on loraport's AVX512-BF16 kernels: compiled
// in, this CPU has AVX512-BF16, and the knob LORAPORT_BF16_KERNELS is not 0 (the op bf16_kernels).
bool bf16_kernels_in_use();

}  // namespace loraport
