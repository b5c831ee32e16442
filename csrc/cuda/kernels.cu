// Hand-written CUDA kernels (kept lean: ATen core headers only, one translation unit).
//
// gram_fp64: G = Y^T Y for a batch of tall-skinny fp32 Y [b, m, l], accumulated in fp64
// straight from the fp32 data. cuBLAS has no fp32-input/fp64-compute GEMM, so the alternative
// is an fp64 copy of Y plus a DGEMM; this kernel reads Y once. It is the first step of the
// mixed-precision CholeskyQR in csrc/linalg.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

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

}  // namespace

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

}  // namespace loraport
