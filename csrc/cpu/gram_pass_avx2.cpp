// Fused pass Y = M X, W = M^T Y over an fp32 M in ONE read of M (AVX2 + FMA).
//
// Why: on the 2-core EPYC CI machine an rsvd pass is a GEMM of a 28-113 MB matrix with a
// 40-72 column block, 2 * 72 flops per 4-byte element. MKL runs it at 80-110 GFLOP/s against
// a 197 GFLOP/s FMA peak (measured with this file's microkernel on L1-resident data) and a
// ~6.7 GB/s read bandwidth: memory and compute are of the same order, and MKL packs M for each
// product separately. This kernel streams each block of kb rows of M from memory once, computes
// Y_blk = M_blk X broadcasting M_blk's rows where they lie, writes a packed copy of M_blk's
// transpose on the way, then W += M_blk^T Y_blk from that copy. A column-major M (the
// transposed view of a wide matrix's row-major storage) is handled the same way, its row blocks
// being column slices of the storage: each is first copied into a contiguous block, from which
// both parts read. Either way W has the short side's rows (3072 for every Hunyuan Video
// shape), so the thread's W stays small. rsvd end to end: benchmarks/RESULTS.md.
//
// Layout: X is packed into column panels of 24, 16 or 8 (zero-padded to lp = round_up(l, 8));
// the microkernel (csrc/cpu/microkernel_avx2.h) keeps a 4 x (8 NV) tile of the output in 4 NV
// ymm registers. Rows of M are split over torch's OpenMP threads in contiguous ranges
// (contiguous reads of a row-major M); each thread accumulates its own W (c x lp, ~0.9 MB at
// c = 3072, lp = 72), summed at the end.
#include "cpu/kernels_avx2.h"
#include "cpu/microkernel_avx2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace loraport {
namespace {

using namespace avx2;

constexpr int64_t kDepthBlock = 512;  // depth slice of the Y = M X product (keeps X's panel slice in L2)

// Copies rows [0, rows) (rows <= kMR) of an M slice [rows, cols] (row stride lda, cols a
// multiple of 8 except at M's right edge) into the block's packed transpose: column j of row k
// goes to mpk[(j / 4) * kk * 4 + k * 4 + j % 4], so that the W part reads the 4 columns it
// broadcasts, row after row, from one contiguous stream ([c4 / 4][kk][4]). The rows are rows
// row_in_block .. row_in_block + rows of the block; columns past the matrix's edge are zero.
void pack_rows_transposed(const float* m, int64_t lda, int64_t rows, int64_t cols, int64_t row_in_block, int64_t kk,
                          float* mpk /*at column group 0 of this slice*/) {
  int64_t j = 0;
  if (rows == kMR) {
    for (; j + 8 <= cols; j += 8) {  // 4 rows x 8 columns -> two groups of [4 rows][4 columns]
      const __m256 r0 = _mm256_loadu_ps(m + j), r1 = _mm256_loadu_ps(m + lda + j);
      const __m256 r2 = _mm256_loadu_ps(m + 2 * lda + j), r3 = _mm256_loadu_ps(m + 3 * lda + j);
      float* g0 = mpk + (j / 4) * kk * 4 + row_in_block * 4;
      float* g1 = g0 + kk * 4;
      _mm256_storeu_ps(g0, _mm256_permute2f128_ps(r0, r1, 0x20));
      _mm256_storeu_ps(g0 + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
      _mm256_storeu_ps(g1, _mm256_permute2f128_ps(r0, r1, 0x31));
      _mm256_storeu_ps(g1 + 8, _mm256_permute2f128_ps(r2, r3, 0x31));
    }
  }
  for (; j < round_up(cols, kMR); ++j)
    for (int64_t k = 0; k < rows; ++k) mpk[(j / 4) * kk * 4 + (row_in_block + k) * 4 + j % 4] = j < cols ? m[k * lda + j] : 0.f;
}

// Rows of M per fused step: the W part updates the thread's whole W (c x lp) once per block,
// from the block's packed transpose or copy (c x row_block floats). Row-major: at c <= 4096,
// 32 rows (<= 512 KiB) stay in L2; a wider M spills to L3 either way, and 64 rows halve its W
// updates (no choice measurably faster: 32, 64 or 96 rows on 2 x [3072, 3072] and
// 2 x [12288, 3072], 2026-11-28). Column-major: the copy of a block visits one 4 KiB page per
// column of M for 4 row_block bytes, so 64 rows halve its page walks: the pass alone on
// 2 x [3072, 12288] (the storage of a wide matrix) took 142-147 ms at 64 to 256 rows against
// 154-160 ms at 32, and 220 against 239 ms at 64 and 32 rows on 2 x [3072, 15360] (fastest of
// 9 to 15 interleaved calls; 144 ms with the copy always reading the same, cached block).
int64_t row_block_for(int64_t c, bool col_major) { return col_major || c > 4096 ? 64 : 32; }

// One matrix: Y [r4, lp] (r4 = round_up(r, 4)), W [c, lp] = M^T Y. M [r, c] is row-major
// (element (i, k) at M[i * ld + k]) or column-major (at M[i + k * ld]: the storage of a wide
// matrix, seen as its tall transpose).
void gram_pass_one(const float* M, int64_t ld, bool col_major, int64_t r, int64_t c,
                   const float* xpk /*panels of [c, w]*/, const std::vector<Panel>& panels, int64_t lp, float* Y,
                   float* W) {
  const int64_t c4 = round_up(c, kMR);
  const int64_t row_block = row_block_for(c, col_major);
  // Contiguous row ranges, multiples of kMR except at the end, at least 64 rows each: one per
  // thread of torch's OpenMP pool. (On plain std::threads the pass competed for the two cores
  // with the pool's workers, which spin for a while after each ATen/MKL call: 10-15 ms more
  // per pass on 2 x [3072, 3072] right after a small GEMM.)
  const int64_t parts = parts_per_matrix(1, r, 64);
  struct Scratch {
    std::vector<float> W;          // [c4, lp] this part's share of M^T Y
    std::vector<float> ypk;        // the Y block, packed into panels
    std::vector<float> mpk;        // row-major M: the block's packed transpose [c4 / 4][row_block][4]
    std::vector<float> edge_rows;  // row-major M: the last r % 4 rows, zero-padded
    std::vector<float> block;      // column-major M: the block, contiguous [c4, row_block] (zero rows past c)
  };
  // Allocated here, so that the workers never allocate (nor throw).
  std::vector<Scratch> scratch(parts);
  for (Scratch& sc : scratch) {
    sc.W.assign(c4 * lp, 0.f);
    sc.ypk.resize(row_block * lp);
    if (col_major) {
      sc.block.assign(c4 * row_block, 0.f);
    } else {
      sc.mpk.resize(c4 * row_block);
      sc.edge_rows.resize(kMR * kDepthBlock);
    }
  }
  // Y rows [k0, k0 + kk) = M rows @ X, over depth slices of M's columns; the first panel's
  // sweep also packs the slice for the W part while it is in L1.
  auto y_part_row_major = [&](Scratch& sc, int64_t k0, int64_t kk) {
    for (int64_t d0 = 0; d0 < c; d0 += kDepthBlock) {
      const int64_t dd = std::min(kDepthBlock, c - d0);
      for (const Panel& p : panels) {
        const float* b = xpk + p.col * c + d0 * p.width;
        for (int64_t i = k0; i < k0 + kk; i += kMR) {
          float* y = Y + i * lp + p.col;
          const int64_t rows = std::min(kMR, r - i);
          if (p.col == 0) pack_rows_transposed(M + i * ld + d0, ld, rows, dd, i - k0, kk, sc.mpk.data() + d0 * kk);
          if (rows == kMR) {
            micro_any(p.width, M + i * ld + d0, ld, 1, b, p.width, dd, y, lp, d0 > 0);
          } else {  // fewer than 4 rows left in the matrix: compute on a zero-padded copy
            std::fill(sc.edge_rows.begin(), sc.edge_rows.end(), 0.f);
            for (int64_t e = 0; e < rows; ++e) std::memcpy(&sc.edge_rows[e * dd], M + (i + e) * ld + d0, dd * sizeof(float));
            micro_any(p.width, sc.edge_rows.data(), dd, 1, b, p.width, dd, y, lp, d0 > 0);
          }
        }
      }
    }
  };
  // Column-major M: rows [k0, k0 + kk) of M are a column slice of the storage, kk floats in each
  // of its c rows. One sweep copies them into the contiguous block [c4, kk4] (rows past c stay
  // zero), from which both parts read: the Y part broadcasts 4 adjacent values of a block row at
  // each depth step, the W part 4 block rows along the depth. (Only the matrix's last block can
  // have kk < kk4: its last tile then reads stale columns, which land in Y's padding rows.)
  auto y_part_col_major = [&](Scratch& sc, int64_t k0, int64_t kk) {
    const int64_t kk4 = round_up(kk, kMR);
    float* blk = sc.block.data();
    for (int64_t d = 0; d < c; ++d) std::memcpy(blk + d * kk4, M + d * ld + k0, kk * sizeof(float));
    for (int64_t d0 = 0; d0 < c; d0 += kDepthBlock) {
      const int64_t dd = std::min(kDepthBlock, c - d0);
      for (const Panel& p : panels) {
        const float* b = xpk + p.col * c + d0 * p.width;
        for (int64_t i = 0; i < kk4; i += kMR)
          micro_any(p.width, blk + d0 * kk4 + i, 1, kk4, b, p.width, dd, Y + (k0 + i) * lp + p.col, lp, d0 > 0);
      }
    }
  };
  auto run_part = [&](int64_t part) {
    Scratch& sc = scratch[part];
    const int64_t row0 = (r * part / parts) / kMR * kMR;
    const int64_t row1 = part + 1 == parts ? r : (r * (part + 1) / parts) / kMR * kMR;
    for (int64_t k0 = row0; k0 < row1; k0 += row_block) {
      const int64_t kk = std::min(row_block, row1 - k0);
      if (col_major) y_part_col_major(sc, k0, kk);
      else y_part_row_major(sc, k0, kk);
      // W += M_blk^T Y_blk: 4 rows of W per tile, broadcasting 4 values per row of the block
      // from one contiguous stream (the packed transpose, or the column-major block's rows).
      pack_panels(Y, lp, 1, lp, k0, kk, panels, sc.ypk.data());
      const int64_t kk4 = round_up(kk, kMR);
      for (int64_t j = 0; j < c; j += kMR) {
        const float* a = col_major ? sc.block.data() + j * kk4 : sc.mpk.data() + j * kk;
        const int64_t ars = col_major ? kk4 : 1, aks = col_major ? 1 : kMR;
        for (const Panel& p : panels)
          micro_any(p.width, a, ars, aks, sc.ypk.data() + p.col * kk, p.width, kk, sc.W.data() + j * lp + p.col, lp, true);
      }
    }
  };
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) run_part(part);
  });
  // W = sum of the parts' shares (rows < c).
  for (int64_t j = 0; j < c; ++j) {
    float* w = W + j * lp;
    std::memcpy(w, scratch[0].W.data() + j * lp, lp * sizeof(float));
    for (int64_t part = 1; part < parts; ++part) {
      const float* src = scratch[part].W.data() + j * lp;
      for (int64_t q = 0; q < lp; ++q) w[q] += src[q];
    }
  }
}

}  // namespace

std::pair<at::Tensor, at::Tensor> gram_pass_avx2(const at::Tensor& M, const at::Tensor& X) {
  const bool col_major = M.stride(-1) != 1;
  TORCH_CHECK(M.dim() == 3 && M.scalar_type() == at::kFloat && (M.stride(-1) == 1 || M.stride(-2) == 1) &&
                  M.device().is_cpu(),
              "gram_pass: M must be a CPU float32 [b, r, c] with unit column or row stride");
  const int64_t b = M.size(0), r = M.size(1), c = M.size(2);
  TORCH_CHECK((X.dim() == 2 || (X.dim() == 3 && X.size(0) == b)) && X.size(-2) == c && X.scalar_type() == at::kFloat,
              "gram_pass: X must be float32 [c, l] or [b, c, l]");
  const int64_t l = X.size(-1), lp = round_up(l, 8), r4 = round_up(r, kMR);
  const std::vector<Panel> panels = panels_of(lp);
  at::Tensor Y = at::empty({b, r4, lp}, M.options());
  at::Tensor W = at::empty({b, c, lp}, M.options());
  std::vector<float> xpk(c * lp);
  for (int64_t i = 0; i < b; ++i) {
    const at::Tensor Xi = X.dim() == 3 ? X[i] : X;
    if (i == 0 || X.dim() == 3)
      pack_panels(Xi.data_ptr<float>(), Xi.stride(0), Xi.stride(1), l, 0, c, panels, xpk.data());
    gram_pass_one(M.data_ptr<float>() + i * M.stride(0), col_major ? M.stride(2) : M.stride(1), col_major, r, c,
                  xpk.data(), panels, lp,
                  Y.data_ptr<float>() + i * r4 * lp, W.data_ptr<float>() + i * c * lp);
  }
  return {Y.narrow(1, 0, r).narrow(2, 0, l), W.narrow(2, 0, l)};
}

}  // namespace loraport
