// The small products around the CPU's fused pass, for tall-skinny fp32 matrices (AVX2 + FMA):
//   gram_avx2:         G = Y^T Y        Y [b, m, l] -> [b, l, l]   (CholeskyQR's Gram, fp32)
//   gram_fp64_avx2:    the same accumulated in fp64 (the Gram of an ill-conditioned Y)
//   times_small_avx2:  C = X T          X [b, m, l], T [b, l, k]   (Q = Y R^{-1}, U = Q Ur)
//   upper_inverse_cpu: R^{-1} of a small fp64 upper-triangular R (CholeskyQR's R)
//
// Why: an rsvd on the CPU makes ~20 of these products per call (4 CholeskyQR2 factorizations of
// 2 Grams and 2 products each, plus the Rayleigh-Ritz products) and as many small triangular
// solves. In the op, MKL ran the fp32 Gram and Y R^{-1} of 2 x [3072, 72] in 0.45-0.55 ms and
// 0.41-0.51 ms, these kernels in 0.24-0.35 and 0.24-0.34 ms (2-core EPYC VM, 2026-11-28): both
// products have structure a GEMM call ignores. G is symmetric (only the tiles that hold its upper
// triangle are computed) and R^{-1} is upper-triangular (panel j of X R^{-1} needs only the first
// (j + 1) panel widths of X's columns). The fp64 Gram through ATen first converts Y to fp64
// (a copy) and then runs a dgemm: 2.6 ms in the op's profile.
//
// Threads: over the batch, and within a matrix over contiguous row ranges (each part of a Gram
// accumulates its own [l, l] partial sum, added at the end).
#include "cpu/kernels_avx2.h"
#include "cpu/microkernel_avx2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace loraport {
namespace {

using namespace avx2;

// Y^T Y [b, l, l] of an fp32 Y [b, m, l] (unit column stride), accumulated in Acc: float, or
// double (products of floats are exact in fp64, so that Gram is the fp64 one of the same Y).
template <typename Acc>
at::Tensor gram(const at::Tensor& Y) {
  TORCH_CHECK(Y.dim() == 3 && Y.scalar_type() == at::kFloat && Y.stride(-1) == 1 && Y.device().is_cpu(),
              "gram: Y must be a CPU float32 [b, m, l] with unit column stride");
  const int64_t b = Y.size(0), m = Y.size(1), l = Y.size(2), ldy = Y.stride(1);
  const int64_t lp = round_up(l, Lanes<Acc>::n), l4 = round_up(l, kMR);  // l4 <= lp
  const std::vector<Panel> panels = panels_of<Acc>(lp);
  // Rows of Y per step: the chunk (27 KiB at l = 72) stays in L1 while every tile sweeps it.
  const int64_t chunk_rows = 384 / sizeof(Acc);
  // Rows are read lp wide: in place where that is the fp32 row itself, else from a zero-padded
  // (and converted) copy of the chunk (reading past a row's end could leave the allocation).
  const bool pack = !std::is_same_v<Acc, float> || lp != l;
  const int64_t parts = parts_per_matrix(b, m, 256), items = b * parts;
  std::vector<Acc> partial(items * l4 * lp, Acc(0));                  // [items, l4, lp]
  std::vector<Acc> chunks(pack ? items * chunk_rows * lp : 0, Acc(0));  // [items, chunk_rows, lp]
  const float* base = Y.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t matrix = item / parts, part = item % parts;
      const float* y = base + matrix * Y.stride(0);
      Acc* g = partial.data() + item * l4 * lp;
      Acc* chunk = chunks.data() + item * chunk_rows * lp;
      const int64_t row1 = m * (part + 1) / parts;
      for (int64_t k0 = m * part / parts; k0 < row1; k0 += chunk_rows) {
        const int64_t kk = std::min(chunk_rows, row1 - k0);
        const Acc* rows = chunk;
        int64_t ld = lp;
        if (pack) {
          for (int64_t k = 0; k < kk; ++k)
            std::copy(y + (k0 + k) * ldy, y + (k0 + k) * ldy + l, chunk + k * lp);
        } else if constexpr (std::is_same_v<Acc, float>) {
          rows = y + k0 * ldy, ld = ldy;
        }
        // G[i..i+4, panel] += sum_k Y[k, i..i+4]^T Y[k, panel], for the tiles that reach the
        // diagonal or lie right of it.
        for (int64_t i = 0; i < l4; i += kMR)
          for (const Panel& p : panels)
            if (p.col + p.width > i)
              micro_any<Acc>(p.width, rows + i, 1, ld, rows + p.col, ld, kk, g + i * lp + p.col, lp, true);
      }
    }
  });
  at::Tensor G = at::empty({b, l, l}, Y.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  Acc* out = G.data_ptr<Acc>();
  for (int64_t matrix = 0; matrix < b; ++matrix) {
    Acc* gm = out + matrix * l * l;
    const Acc* first = partial.data() + matrix * parts * l4 * lp;
    for (int64_t i = 0; i < l; ++i)
      for (int64_t j = i; j < l; ++j) {
        Acc s = first[i * lp + j];
        for (int64_t part = 1; part < parts; ++part) s += first[part * l4 * lp + i * lp + j];
        gm[i * l + j] = gm[j * l + i] = s;
      }
  }
  return G;
}

}  // namespace

at::Tensor gram_avx2(const at::Tensor& Y) { return gram<float>(Y); }

at::Tensor gram_fp64_avx2(const at::Tensor& Y) { return gram<double>(Y); }

at::Tensor upper_inverse_cpu(const at::Tensor& R_in, at::ScalarType dtype) {
  TORCH_CHECK(R_in.dim() == 3 && R_in.size(1) == R_in.size(2) && R_in.scalar_type() == at::kDouble && R_in.device().is_cpu(),
              "upper_inverse_cpu: R must be a CPU float64 [b, l, l]");
  const at::Tensor R = R_in.contiguous();
  const int64_t b = R.size(0), l = R.size(2);
  at::Tensor X = at::zeros({b, l, l}, R.options());
  const double* r = R.data_ptr<double>();
  double* x = X.data_ptr<double>();
  at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t matrix = b0; matrix < b1; ++matrix) {
      const double* rm = r + matrix * l * l;
      double* xm = x + matrix * l * l;
      // Back substitution by rows, from the bottom (R X = I): X[i, :] = (e_i - sum_{k > i}
      // R[i, k] X[k, :]) / R[i, i], each row zero left of its diagonal; the inner loop runs
      // along a row of X and vectorizes.
      for (int64_t i = l - 1; i >= 0; --i) {
        double* xi = xm + i * l;
        xi[i] = 1.0;
        for (int64_t k = i + 1; k < l; ++k) {
          const double rik = rm[i * l + k];
          const double* xk = xm + k * l;
          for (int64_t j = k; j < l; ++j) xi[j] -= rik * xk[j];
        }
        const double inverse_pivot = 1.0 / rm[i * l + i];
        for (int64_t j = i; j < l; ++j) xi[j] *= inverse_pivot;
      }
    }
  });
  return X.to(dtype);
}

at::Tensor times_small_avx2(const at::Tensor& X, const at::Tensor& T, bool upper) {
  TORCH_CHECK(X.dim() == 3 && X.scalar_type() == at::kFloat && X.stride(-1) == 1 && X.device().is_cpu(),
              "times_small_avx2: X must be a CPU float32 [b, m, l] with unit column stride");
  const int64_t b = X.size(0), m = X.size(1), l = X.size(2), ldx = X.stride(1);
  TORCH_CHECK((T.dim() == 2 || (T.dim() == 3 && T.size(0) == b)) && T.size(-2) == l &&
                  T.scalar_type() == at::kFloat && T.device().is_cpu(),
              "times_small_avx2: T must be a CPU float32 [l, k] or [b, l, k]");
  const int64_t k = T.size(-1), kp = round_up(k, 8);
  TORCH_CHECK(!upper || k == l, "times_small_avx2: an upper-triangular T must be square");
  const std::vector<Panel> panels = panels_of(kp);
  // T's panels ([l, width] each, zero-padded right of column k; for an upper-triangular T,
  // zero below the diagonal whatever T holds there).
  const int64_t tb = T.dim() == 3 ? b : 1;
  std::vector<float> tpk(tb * l * kp);
  for (int64_t t = 0; t < tb; ++t) {
    const at::Tensor Tt = T.dim() == 3 ? T[t] : T;
    float* dst = tpk.data() + t * l * kp;
    pack_panels(Tt.data_ptr<float>(), Tt.stride(0), Tt.stride(1), k, 0, l, panels, dst);
    if (upper)
      for (const Panel& p : panels)
        for (int64_t r = 0; r < l; ++r)
          for (int64_t j = 0; j < p.width; ++j)
            if (r > p.col + j) dst[p.col * l + r * p.width + j] = 0.f;
  }
  at::Tensor C = at::empty({b, m, kp}, X.options());
  const int64_t parts = parts_per_matrix(b, m, 64), items = b * parts;
  const float* xbase = X.data_ptr<float>();
  float* cbase = C.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> edge_in(kMR * l), edge_out(kMR * kp);  // the last m % 4 rows, zero-padded
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t matrix = item / parts, part = item % parts;
      const float* x = xbase + matrix * X.stride(0);
      const float* t = tpk.data() + (tb == 1 ? 0 : matrix * l * kp);
      float* c = cbase + matrix * m * kp;
      const int64_t row0 = (m * part / parts) / kMR * kMR;
      const int64_t row1 = part + 1 == parts ? m : (m * (part + 1) / parts) / kMR * kMR;
      for (int64_t i = row0; i < row1; i += kMR) {
        const int64_t rows = std::min(kMR, row1 - i);
        const float* a = x + i * ldx;
        int64_t lda = ldx;
        float* out = c + i * kp;
        if (rows < kMR) {
          std::fill(edge_in.begin(), edge_in.end(), 0.f);
          for (int64_t e = 0; e < rows; ++e) std::memcpy(&edge_in[e * l], a + e * ldx, l * sizeof(float));
          a = edge_in.data(), lda = l, out = edge_out.data();
        }
        for (const Panel& p : panels) {
          // Upper-triangular T: rows of T below p.col + p.width are zero in this panel.
          const int64_t depth = upper ? std::min(l, p.col + p.width) : l;
          micro_any(p.width, a, lda, 1, t + p.col * l, p.width, depth, out + p.col, kp, false);
        }
        if (rows < kMR) std::memcpy(c + i * kp, edge_out.data(), rows * kp * sizeof(float));
      }
    }
  });
  return C.narrow(-1, 0, k);
}

}  // namespace loraport
