// The AVX2 + FMA register-tile microkernel, panel packing and work split shared by the CPU's kernels
// (csrc/cpu/gram_pass_avx2.cpp, csrc/cpu/skinny_avx2.cpp). Include only from translation units
// compiled with -mavx2 -mfma (CMakeLists.txt), which call into them only on CPUs that have both.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace loraport::avx2 {

constexpr int64_t kMR = 4;          // output rows per microkernel tile

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// How many parts each of b matrices is split into so that torch's threads all get work: parts
// of at least min_rows rows (1 inside a parallel region, where at::parallel_for runs inline).
inline int64_t parts_per_matrix(int64_t b, int64_t rows, int64_t min_rows) {
  if (at::in_parallel_region()) return 1;
  const int64_t threads = at::get_num_threads();
  if (b >= threads) return 1;
  return std::clamp<int64_t>((threads + b - 1) / b, 1, std::max<int64_t>(1, rows / min_rows));
}

// One ymm register of T: 8 floats or 4 doubles.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = __m256;
  static constexpr int64_t n = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V x, V y, V acc) { return _mm256_fmadd_ps(x, y, acc); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
};
template <>
struct Lanes<double> {
  using V = __m256d;
  static constexpr int64_t n = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V fma(V x, V y, V acc) { return _mm256_fmadd_pd(x, y, acc); }
  static void store(double* p, V x) { _mm256_storeu_pd(p, x); }
};

// C[4, n NV] (=|+=) sum_k a(r, k) b(k, :), n = Lanes<T>::n, a(r, k) = a[r * ars + k * aks], b's rows
// contiguous with stride ldb, C's rows with stride ldc.
template <typename T, int NV>
inline void micro(const T* __restrict a, int64_t ars, int64_t aks, const T* __restrict b, int64_t ldb,
                  int64_t depth, T* __restrict c, int64_t ldc, bool accumulate) {
  static_assert(NV >= 1 && NV <= 3, "tile width 1, 2 or 3 registers");
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int64_t n = L::n;
  auto load = [&](int64_t r, int v) { return accumulate ? L::load(c + r * ldc + n * v) : L::zero(); };
  V c00 = load(0, 0), c10 = load(1, 0), c20 = load(2, 0), c30 = load(3, 0);
  V c01, c11, c21, c31, c02, c12, c22, c32;
  if constexpr (NV >= 2) c01 = load(0, 1), c11 = load(1, 1), c21 = load(2, 1), c31 = load(3, 1);
  if constexpr (NV >= 3) c02 = load(0, 2), c12 = load(1, 2), c22 = load(2, 2), c32 = load(3, 2);
  const T* a0 = a;
  const T* a1 = a + ars;
  const T* a2 = a + 2 * ars;
  const T* a3 = a + 3 * ars;
  for (int64_t k = 0; k < depth; ++k) {
    const V b0 = L::load(b);
    V b1, b2;
    if constexpr (NV >= 2) b1 = L::load(b + n);
    if constexpr (NV >= 3) b2 = L::load(b + 2 * n);
    b += ldb;
#define LORAPORT_ROW(R)                                            \
  {                                                                \
    const V x = L::broadcast(a##R);                                \
    a##R += aks;                                                   \
    c##R##0 = L::fma(x, b0, c##R##0);                              \
    if constexpr (NV >= 2) c##R##1 = L::fma(x, b1, c##R##1);       \
    if constexpr (NV >= 3) c##R##2 = L::fma(x, b2, c##R##2);       \
  }
    LORAPORT_ROW(0) LORAPORT_ROW(1) LORAPORT_ROW(2) LORAPORT_ROW(3)
#undef LORAPORT_ROW
  }
  auto store = [&](int64_t r, int v, V x) { L::store(c + r * ldc + n * v, x); };
  store(0, 0, c00), store(1, 0, c10), store(2, 0, c20), store(3, 0, c30);
  if constexpr (NV >= 2) store(0, 1, c01), store(1, 1, c11), store(2, 1, c21), store(3, 1, c31);
  if constexpr (NV >= 3) store(0, 2, c02), store(1, 2, c12), store(2, 2, c22), store(3, 2, c32);
}

struct Panel {
  int64_t col;    // first output column
  int64_t width;  // 1, 2 or 3 registers: 8, 16 or 24 floats, 4, 8 or 12 doubles
};

// Column panels of up to 3 registers of T over lp columns (lp a multiple of Lanes<T>::n).
template <typename T = float>
inline std::vector<Panel> panels_of(int64_t lp) {
  std::vector<Panel> out;
  for (int64_t j = 0; j < lp;) {
    const int64_t w = std::min<int64_t>(3 * Lanes<T>::n, lp - j);
    out.push_back({j, w});
    j += w;
  }
  return out;
}

template <typename T>
inline void micro_any(int64_t width, const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, int64_t depth,
                      T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t n = Lanes<T>::n;
  if (width == 3 * n) micro<T, 3>(a, ars, aks, b, ldb, depth, c, ldc, accumulate);
  else if (width == 2 * n) micro<T, 2>(a, ars, aks, b, ldb, depth, c, ldc, accumulate);
  else micro<T, 1>(a, ars, aks, b, ldb, depth, c, ldc, accumulate);
}

// Packs rows [k0, k0 + kk) of X [rows, l] (strides sx0, sx1) into panels: out[p] is [kk, width]
// row-major at out + col * kk, zero beyond column l.
inline void pack_panels(const float* x, int64_t sx0, int64_t sx1, int64_t l, int64_t k0, int64_t kk,
                 const std::vector<Panel>& panels, float* out) {
  for (const Panel& p : panels) {
    float* dst = out + p.col * kk;
    for (int64_t k = 0; k < kk; ++k) {
      const float* src = x + (k0 + k) * sx0;
      for (int64_t j = 0; j < p.width; ++j) {
        const int64_t col = p.col + j;
        dst[k * p.width + j] = col < l ? src[col * sx1] : 0.f;
      }
    }
  }
}

}  // namespace loraport::avx2
