// Argument checks and the working-precision rule shared by the loraport ops (csrc/linalg/*.cpp):
// error messages name the op, the argument and what was received.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

namespace loraport::detail {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_float(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()),
                    "loraport.", op, ": ", arg, " must be a floating-point tensor "
                    "(float16, bfloat16, float32 or float64), got ", t.scalar_type());
}

inline void check_matrix(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 2, "loraport.", op, ": ", arg,
                    " must be [..., rows, cols] (at least 2-D), got shape ", shape_str(t));
  TORCH_CHECK_VALUE(t.size(-1) >= 1 && t.size(-2) >= 1, "loraport.", op, ": ", arg,
                    " must have at least one row and one column, got shape ", shape_str(t));
}

// The arithmetic precision of an op: float64 if any input is float64, else float32 (float16 and
// bfloat16 inputs are upcast; arithmetic is never done in them).
inline at::ScalarType compute_dtype(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

}  // namespace loraport::detail
