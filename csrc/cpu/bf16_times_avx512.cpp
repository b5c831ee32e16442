// The default gate's products over bf16 weights with AVX512-BF16 (vdpbf16ps: 16 float32 sums of
// two bf16 products each per instruction), compiled with -mavx512bf16 and called only on CPUs
// that report it (bf16_kernels_available):
//   left:   Y = A B    A [m, n] bf16 row-major, B [n, l] -> Y [m, l] float32
//   right:  Z = Aᵀ C   A [m, n] bf16 row-major, C [m, l] -> Z [n, l] float32
// B and C are rounded to bf16 (nearest even) and packed in pairs along the summed dimension,
// the layout vdpbf16ps reads; the sums are float32.
//
// Why not oneDNN's bf16 GEMM (torch.mm): for these shapes at l = 16 (the default gate's sketch)
// it runs Aᵀ C at about half our speed, and A B at about ours (faster on a square A, slower on a
// wide one), on 2 Zen 4 cores whose bf16 peak is about 390 GFLOP/s; and it rounds the result to
// bf16. Here one row of Y is held in the fewest zmm and ymm registers that fit l (16: one zmm;
// 24: a zmm and a ymm; no padding to 32), and Aᵀ C reads A once, row pairs interleaved in
// registers, with the sums of 32 columns of A for 12 of the l columns of C held in registers
// through a block of 32 rows. Measured numbers: benchmarks/RESULTS.md.
//
// Threads: torch's OpenMP pool (at::parallel_for), over blocks of rows of A for the left product
// and over 32-column lines of A for the right one (each thread writes its own part of the
// output).
#include "cpu/kernels_avx512bf16.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace loraport {

bool bf16_kernels_available() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

namespace {

constexpr int64_t kRows = 12;  // rows of A per register block of the left product (24 accumulators at l = 24)

// (lo, hi) rounded to bf16, lo in the low half: one pair as vdpbf16ps reads it.
inline uint32_t bf16_pair(float lo, float hi) {
  return uint32_t(c10::BFloat16(lo).x) | (uint32_t(c10::BFloat16(hi).x) << 16);
}

// X [rows, l] float32 (contiguous) as pairs of rows: P [ceil(rows / 2), width] with
// P[p][j] = (X[2p][j], X[2p + 1][j]), zero beyond l and beyond the last row.
std::vector<uint32_t> pack_row_pairs(const float* X, int64_t rows, int64_t l, int64_t width) {
  const int64_t pairs = (rows + 1) / 2;
  std::vector<uint32_t> P(pairs * width, 0u);
  for (int64_t p = 0; p < pairs; ++p) {
    const float* lo = X + 2 * p * l;
    const float* hi = 2 * p + 1 < rows ? lo + l : nullptr;
    for (int64_t j = 0; j < l; ++j) P[p * width + j] = bf16_pair(lo[j], hi ? hi[j] : 0.f);
  }
  return P;
}

inline uint32_t load_pair(const uint16_t* a) {
  uint32_t bits;
  std::memcpy(&bits, a, sizeof bits);
  return bits;
}

// Y rows [R, l] = A rows [R, n] · B, B as Bp [ceil(n / 2), 16 NZ + 8 Y8] pairs. The l columns
// are NZ zmm and, where Y8, one ymm per row.
template <int NZ, bool Y8, int R>
void left_rows(const uint16_t* A, int64_t lda, int64_t n, const uint32_t* Bp, float* Y, int64_t l) {
  constexpr int64_t width = 16 * NZ + (Y8 ? 8 : 0);
  __m512 acc[R][NZ > 0 ? NZ : 1];
  __m256 acc8[R];
  for (int r = 0; r < R; ++r) {
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
    acc8[r] = _mm256_setzero_ps();
  }
  auto step = [&](int64_t p, auto pair_of_row) {
    __m512bh b[NZ > 0 ? NZ : 1];
    for (int z = 0; z < NZ; ++z) b[z] = (__m512bh)_mm512_loadu_si512(Bp + p * width + 16 * z);
    __m256bh b8;
    if constexpr (Y8) b8 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bp + p * width + 16 * NZ));
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(int(pair_of_row(r)));  // one broadcast for both registers
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], (__m512bh)a, b[z]);
      if constexpr (Y8) acc8[r] = _mm256_dpbf16_ps(acc8[r], (__m256bh)_mm512_castsi512_si256(a), b8);
    }
  };
  const int64_t pairs = n / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    if ((p & 15) == 0)  // one line of each row per 16 pairs: fetch the line 8 lines ahead
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(A + r * lda + 2 * p + 256), _MM_HINT_T0);
    step(p, [&](int r) { return load_pair(A + r * lda + 2 * p); });
  }
  if (n % 2)  // the last column alone, paired with a zero
    step(pairs, [&](int r) { return uint32_t(A[r * lda + n - 1]); });
  for (int r = 0; r < R; ++r) {
    for (int z = 0; z < NZ; ++z) {
      const int64_t j = 16 * z, left = l - j;
      if (left <= 0) break;
      _mm512_mask_storeu_ps(Y + r * l + j, left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1), acc[r][z]);
    }
    if constexpr (Y8) {
      const int64_t j = 16 * NZ, left = l - j;
      if (left > 0) _mm256_mask_storeu_ps(Y + r * l + j, left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1), acc8[r]);
    }
  }
}

template <int NZ, bool Y8>
void left_product(const uint16_t* A, int64_t m, int64_t n, const uint32_t* Bp, float* Y, int64_t l) {
  const int64_t blocks = (m + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t row = b * kRows;
      const int64_t stop = std::min(m, row + kRows);
      if (stop - row == kRows) {
        left_rows<NZ, Y8, kRows>(A + row * n, n, n, Bp, Y + row * l, l);
        continue;
      }
      for (; row + 4 <= stop; row += 4) left_rows<NZ, Y8, 4>(A + row * n, n, n, Bp, Y + row * l, l);  // the last block
      for (; row < stop; ++row) left_rows<NZ, Y8, 1>(A + row * n, n, n, Bp, Y + row * l, l);
    }
  });
}

constexpr int64_t kBlockRows = 32;  // rows of A per block of the right product (read once into cache, used by every stripe)

// Zt[j0 + j, col0 + q] += the sums over rows [row0, row1) of A[r, c] C[r, j0 + j] for J values of
// j and the 32 columns c of A from col0 (one cache line of a row; past n read as zero), rows in
// pairs (Cp [ceil(m / 2), width] pairs of C; row0 even), q = line_position(c - col0): the pairs
// of two rows are made by vpunpck{l,h}wd (one cycle each, where a word permute across the
// register costs several), which interleave within 128-bit lanes, so each of the two registers
// holds 16 of the 32 columns, in runs of 4. Each broadcast pair of C feeds two vdpbf16ps.
// ``first``: Zt starts at zero. Prefetches the next block's rows of these columns and the line
// two on of this block's rows.
template <int J>
void right_stripes(const uint16_t* A, int64_t m, int64_t n, int64_t row0, int64_t row1, int64_t col0,
                   const uint32_t* Cp, int64_t width, int64_t j0, float* Zt, int64_t ldz, bool first) {
  const int64_t cols = std::min<int64_t>(32, n - col0);
  const __mmask32 mask = cols == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << cols) - 1);
  __m512 acc[J][2];
#pragma GCC unroll 24
  for (int j = 0; j < J; ++j)
    for (int h = 0; h < 2; ++h) acc[j][h] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(Zt + (j0 + j) * ldz + col0 + 16 * h);
  if (j0 == 0) {  // the next block's line of these columns, and this block's line two lines on
    for (int64_t r = row1; r < std::min(m, row1 + kBlockRows); ++r)
      _mm_prefetch(reinterpret_cast<const char*>(A + r * n + col0), _MM_HINT_T1);
    if (col0 + 64 < n)  // the 32 rows' lines are 32 streams, more than the hardware prefetcher follows
      for (int64_t r = row0; r < row1; ++r) _mm_prefetch(reinterpret_cast<const char*>(A + r * n + col0 + 64), _MM_HINT_T0);
  }
  auto rows = [&](const uint16_t* r0, const uint16_t* r1, const uint32_t* c) {  // r1 null: a zero row
    const __m512i a0 = _mm512_maskz_loadu_epi16(mask, r0);
    const __m512i a1 = r1 ? _mm512_maskz_loadu_epi16(mask, r1) : _mm512_setzero_si512();
    const __m512bh both[2] = {(__m512bh)_mm512_unpacklo_epi16(a0, a1), (__m512bh)_mm512_unpackhi_epi16(a0, a1)};
#pragma GCC unroll 24  // the 2J sums stay in registers
    for (int j = 0; j < J; ++j) {
      const __m512bh cj = (__m512bh)_mm512_set1_epi32(int(c[j]));
      acc[j][0] = _mm512_dpbf16_ps(acc[j][0], both[0], cj);
      acc[j][1] = _mm512_dpbf16_ps(acc[j][1], both[1], cj);
    }
  };
  const int64_t pair1 = std::min(row1, m - m % 2) / 2;
  for (int64_t p = row0 / 2; p < pair1; ++p) rows(A + 2 * p * n + col0, A + (2 * p + 1) * n + col0, Cp + p * width + j0);
  if (m % 2 && row1 >= m)  // the last row alone, paired with a zero row (its pairs in Cp have a zero high half)
    rows(A + (m - 1) * n + col0, nullptr, Cp + (m / 2) * width + j0);
#pragma GCC unroll 24
  for (int j = 0; j < J; ++j)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(Zt + (j0 + j) * ldz + col0 + 16 * h, acc[j][h]);
}

// Where right_stripes leaves column c of a 32-column line: vpunpcklwd takes elements 0-3 of each
// 128-bit lane (columns 0-3, 8-11, 16-19, 24-27), vpunpckhwd elements 4-7.
constexpr int64_t line_position(int64_t c) { return (c / 4) % 2 * 16 + c / 8 * 4 + c % 4; }

}  // namespace

at::Tensor bf16_times_avx512(const at::Tensor& A, const at::Tensor& basis, bool transpose) {
  TORCH_CHECK(A.dim() == 2 && A.scalar_type() == at::kBFloat16 && A.is_contiguous() && A.device().is_cpu(),
              "bf16_times_avx512: A must be a contiguous CPU bfloat16 [m, n]");
  const int64_t m = A.size(0), n = A.size(1), l = basis.size(1);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == (transpose ? m : n), "bf16_times_avx512: basis has the wrong rows");
  const at::Tensor b = basis.to(at::kFloat).contiguous();
  const auto* a = reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>());
  if (!transpose) {
    // l = 16 NZ + 8 Y8 lanes, the smallest such width that holds l (l <= 32 here; wider: in
    // slices of 32 columns, each a full pass over A)
    at::Tensor Y = at::empty({m, l}, A.options().dtype(at::kFloat));
    for (int64_t j0 = 0; j0 < l; j0 += 32) {
      const int64_t part = std::min<int64_t>(32, l - j0);
      const int64_t width = part <= 8 ? 8 : part <= 16 ? 16 : part <= 24 ? 24 : 32;
      const at::Tensor slice = b.narrow(1, j0, part).contiguous();
      const std::vector<uint32_t> Bp = pack_row_pairs(slice.data_ptr<float>(), n, part, width);
      at::Tensor Yp = part == l ? Y : at::empty({m, part}, Y.options());
      float* y = Yp.data_ptr<float>();
      switch (width) {
        case 8: left_product<0, true>(a, m, n, Bp.data(), y, part); break;
        case 16: left_product<1, false>(a, m, n, Bp.data(), y, part); break;
        case 24: left_product<1, true>(a, m, n, Bp.data(), y, part); break;
        default: left_product<2, false>(a, m, n, Bp.data(), y, part); break;
      }
      if (part != l) Y.narrow(1, j0, part).copy_(Yp);
    }
    return Y;
  }
  const int64_t width = (l + 3) / 4 * 4;
  const std::vector<uint32_t> Cp = pack_row_pairs(b.data_ptr<float>(), m, l, width);
  const int64_t lines = (n + 31) / 32;  // 32-column parts of A's rows: one cache line each
  // Zᵀ [width, ldz] by line positions; rows padded off a multiple of 4 KB (else, for the usual
  // widths, the 2J rows of Zt a block updates would all share one L1 set)
  const int64_t ldz = 32 * lines + 16;
  at::Tensor Zt = at::empty({width, ldz}, A.options().dtype(at::kFloat));
  float* zt = Zt.data_ptr<float>();
  // each thread its own columns, all rows, a block of rows at a time
  at::parallel_for(0, lines, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t row0 = 0; row0 < m; row0 += kBlockRows) {
      const int64_t row1 = std::min(m, row0 + kBlockRows);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j0 = 0; j0 < width; j0 += 12) {
          switch (std::min<int64_t>(12, width - j0)) {
            case 4: right_stripes<4>(a, m, n, row0, row1, 32 * t, Cp.data(), width, j0, zt, ldz, row0 == 0); break;
            case 8: right_stripes<8>(a, m, n, row0, row1, 32 * t, Cp.data(), width, j0, zt, ldz, row0 == 0); break;
            default: right_stripes<12>(a, m, n, row0, row1, 32 * t, Cp.data(), width, j0, zt, ldz, row0 == 0); break;
          }
        }
    }
  });
  at::Tensor Z = at::empty({n, l}, A.options().dtype(at::kFloat));  // Zt's first l rows, in column order
  float* z = Z.data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t q = c / 32 * 32 + line_position(c % 32);
      for (int64_t j = 0; j < l; ++j) z[c * l + j] = zt[j * ldz + q];
    }
  });
  return Z;
}

}  // namespace loraport
