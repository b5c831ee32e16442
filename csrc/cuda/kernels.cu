// Hand-written CUDA kernels (kept lean: ATen core headers only, one translation unit).
//
// gram_fp64: G = Y^T Y for a batch of tall-skinny fp32 Y [b, m, l], accumulated in fp64
// straight from the fp32 data. cuBLAS has no fp32-input/fp64-compute GEMM, so the alternative
// is an fp64 copy of Y plus a DGEMM; this kernel reads Y once. It is the first step of the
// mixed-precision CholeskyQR in csrc/linalg/orthonormalize.cpp.
//
// upper_inverse: R^{-1} for a batch of small upper-triangular fp64 R [b, l, l], the second
// step of CholeskyQR (Q = Y R^{-1} is then one GEMM). ATen's route, a batched triangular solve
// against the identity, took 1.5 ms of a 14 ms rsvd call in ~96 cuBLAS kernels (H200, 4 x
// [12288, 3072], rank 64; RESULTS.md); here it is one launch.
#include "kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <unordered_map>

namespace loraport {
namespace {

constexpr int kTile = 16;      // output tile: kTile x kTile entries of G per block
constexpr int kRowStep = 32;   // rows of Y staged in shared memory per step

// grid: (tiles along i, tiles along j, b * row_splits); block: (kTile, kTile).
// Each block accumulates G[i0:i0+16, j0:j0+16] over one slice of rows and adds it to G
// atomically (fp64 atomicAdd, sm_60+). Only tiles with j0 >= i0 are computed; the lower
// triangle is mirrored.
__global__ void gram_fp64_kernel(const float* __restrict__ Y,  // [b, m, l] contiguous
                                 double* __restrict__ G,       // [b, l, l] zero-initialized
                                 int64_t m, int64_t l, int64_t rows_per_split, int row_splits) {
  const int tile_i = blockIdx.x, tile_j = blockIdx.y;
  if (tile_j < tile_i) return;
  const int64_t batch = blockIdx.z / row_splits;
  const int64_t row_begin = int64_t(blockIdx.z % row_splits) * rows_per_split;
  const int64_t row_end = min(m, row_begin + rows_per_split);
  const float* Yb = Y + batch * m * l;
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t i = int64_t(tile_i) * kTile + ty, j = int64_t(tile_j) * kTile + tx;

  __shared__ float rows_i[kRowStep][kTile];  // Y[r, i0 + c]
  __shared__ float rows_j[kRowStep][kTile];  // Y[r, j0 + c]
  double acc = 0.0;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowStep) {
    // 256 threads stage 2 x 32 x 16 floats: two rows each per array.
    for (int rr = ty; rr < kRowStep; rr += kTile) {
      const int64_t r = r0 + rr;
      const int64_t ci = int64_t(tile_i) * kTile + tx, cj = int64_t(tile_j) * kTile + tx;
      rows_i[rr][tx] = (r < row_end && ci < l) ? Yb[r * l + ci] : 0.f;
      rows_j[rr][tx] = (r < row_end && cj < l) ? Yb[r * l + cj] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < kRowStep; ++rr) acc += double(rows_i[rr][ty]) * double(rows_j[rr][tx]);
    __syncthreads();
  }
  if (i < l && j < l) {
    double* Gb = G + batch * l * l;
    atomicAdd(&Gb[i * l + j], acc);
    if (tile_i != tile_j) atomicAdd(&Gb[j * l + i], acc);
  }
}

constexpr int kWarpsPerBlock = 4;  // upper_inverse: one warp per column of the inverse

// grid: (column groups of kWarpsPerBlock, batch); block: 32 * kWarpsPerBlock threads. Warp w
// computes column j of X = R^{-1} by back substitution (X is upper triangular too):
//   X[j][j] = 1 / R[j][j];  X[i][j] = -(sum_{k=i+1..j} R[i][k] X[k][j]) / R[i][i], i = j-1 .. 0,
// the sum split over the lanes and reduced with shuffles; the column being built lives in
// shared memory. R is row-major (contiguous), so the lanes read a row of R together.
template <typename out_t>
__global__ void upper_inverse_kernel(const double* __restrict__ R,  // [b, l, l] contiguous
                                     out_t* __restrict__ X,         // [b, l, l] contiguous
                                     int l) {
  extern __shared__ double columns[];  // [kWarpsPerBlock][l]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * kWarpsPerBlock + warp;
  if (j >= l) return;  // the whole warp: only warp-level synchronization follows
  const double* Rb = R + int64_t(blockIdx.y) * l * l;
  double* x = columns + warp * l;  // x[k] = X[k][j], k <= j
  if (lane == 0) x[j] = 1.0 / Rb[int64_t(j) * l + j];
  __syncwarp();
  for (int i = j - 1; i >= 0; --i) {
    const double* row = Rb + int64_t(i) * l;
    double partial = 0.0;
    for (int k = i + 1 + lane; k <= j; k += 32) partial += row[k] * x[k];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    if (lane == 0) x[i] = -partial / row[i];
    __syncwarp();
  }
  out_t* Xb = X + int64_t(blockIdx.y) * l * l;
  for (int i = lane; i < l; i += 32) Xb[int64_t(i) * l + j] = i <= j ? out_t(x[i]) : out_t(0);
}

}  // namespace

bool kernels_run_on(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<c10::DeviceIndex, bool> answers;  // device -> an image of ours runs there
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = answers.find(device); it != answers.end()) return it->second;
  const c10::cuda::CUDAGuard guard(device);
  // The fatbinary holds neither SASS for this GPU nor PTX it can compile: the runtime says so
  // here, for one kernel of this translation unit (they all share its architectures), instead
  // of at the first launch.
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, gram_fp64_kernel);
  const bool no_image = status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction;
  if (status != cudaSuccess && !no_image) C10_CUDA_CHECK(status);
  const bool runs = status == cudaSuccess;
  if (!runs) {
    (void)cudaGetLastError();  // clear the error, so that ATen's next launch check does not report it
    cudaDeviceProp properties;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
    TORCH_WARN("loraport: this build's CUDA kernels have no image for cuda:", int(device), " (", properties.name,
               ", sm_", properties.major, properties.minor, "): it was compiled for ", LORAPORT_CUDA_ARCHS,
               ". The loraport ops use ATen's CUDA kernels on this GPU instead (correct, slower); rebuild with "
               "LORAPORT_CUDA_ARCHS=", properties.major, properties.minor, " for ours.");
  }
  answers.emplace(device, runs);
  return runs;
}

at::Tensor gram_fp64_cuda(const at::Tensor& Y_in) {
  TORCH_CHECK(Y_in.is_cuda() && Y_in.scalar_type() == at::kFloat && Y_in.dim() == 3,
              "gram_fp64_cuda: expected a [b, m, l] float32 CUDA tensor");
  const at::Tensor Y = Y_in.contiguous();
  const int64_t b = Y.size(0), m = Y.size(1), l = Y.size(2);
  at::Tensor G = at::zeros({b, l, l}, Y.options().dtype(at::kDouble));
  if (b == 0 || m == 0 || l == 0) return G;
  const int tiles = int((l + kTile - 1) / kTile);
  // Enough row slices to fill the GPU when the batch is small, each at least 512 rows long.
  const int row_splits = int(std::max<int64_t>(1, std::min<int64_t>(64, m / 512)));
  const int64_t rows_per_split = (m + row_splits - 1) / row_splits;
  const int64_t max_batch_per_launch = 65535 / row_splits;  // gridDim.z limit
  for (int64_t b0 = 0; b0 < b; b0 += max_batch_per_launch) {
    const int64_t nb = std::min(max_batch_per_launch, b - b0);
    const dim3 grid(tiles, tiles, unsigned(nb * row_splits)), block(kTile, kTile);
    gram_fp64_kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        Y.data_ptr<float>() + b0 * m * l, G.data_ptr<double>() + b0 * l * l, m, l, rows_per_split, row_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return G;
}

at::Tensor upper_inverse_cuda(const at::Tensor& R_in, at::ScalarType out_dtype) {
  TORCH_CHECK(R_in.is_cuda() && R_in.scalar_type() == at::kDouble && R_in.dim() == 3 && R_in.size(-1) == R_in.size(-2),
              "upper_inverse_cuda: expected a [b, l, l] float64 CUDA tensor");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kDouble, "upper_inverse_cuda: float or double output");
  const int64_t b = R_in.size(0), l = R_in.size(-1);
  TORCH_CHECK(l <= kUpperInverseMaxSize, "upper_inverse_cuda: l = ", l, " > ", kUpperInverseMaxSize);
  const at::Tensor R = R_in.contiguous();
  at::Tensor X = at::empty({b, l, l}, R.options().dtype(out_dtype));
  if (b == 0) return X;
  const dim3 block(32 * kWarpsPerBlock);
  const size_t shared = sizeof(double) * kWarpsPerBlock * l;
  const int64_t max_batch_per_launch = 65535;  // gridDim.y limit
  for (int64_t b0 = 0; b0 < b; b0 += max_batch_per_launch) {
    const dim3 grid(unsigned((l + kWarpsPerBlock - 1) / kWarpsPerBlock), unsigned(std::min(max_batch_per_launch, b - b0)));
    const auto stream = at::cuda::getCurrentCUDAStream();
    const double* Rp = R.data_ptr<double>() + b0 * l * l;
    if (out_dtype == at::kFloat) {
      upper_inverse_kernel<float><<<grid, block, shared, stream>>>(Rp, X.data_ptr<float>() + b0 * l * l, int(l));
    } else {
      upper_inverse_kernel<double><<<grid, block, shared, stream>>>(Rp, X.data_ptr<double>() + b0 * l * l, int(l));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return X;
}

}  // namespace loraport
