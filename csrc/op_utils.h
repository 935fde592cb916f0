// Helpers shared by the op files (csrc/*_ops.cpp): argument checks whose messages name the argument,
// what was expected and what came (SPEC 7), and the test for "this call is being traced".
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE reach Python as ValueError / TypeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

namespace fusedloss {

// A shape as Python prints a tuple: (2, 3), (3,), ().
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << '(';
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A dtype as Python prints it: torch.float32.
inline std::string dtype_str(c10::ScalarType type) {
  std::string name = c10::toString(type);
  static const std::pair<const char*, const char*> kNames[] = {
      {"Float", "float32"}, {"Double", "float64"}, {"Half", "float16"}, {"BFloat16", "bfloat16"},
      {"Long", "int64"},    {"Int", "int32"},      {"Short", "int16"},  {"Char", "int8"},
      {"Byte", "uint8"},    {"Bool", "bool"}};
  for (const auto& [aten, python] : kNames) {
    if (name == aten) return std::string("torch.") + python;
  }
  return name;
}

inline bool is_floating(const at::Tensor& t) { return at::isFloatingType(t.scalar_type()); }

inline void check_floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_floating(t), name,
                   " must be a floating-point tensor (float16, bfloat16, float32, float64), got ",
                   dtype_str(t.scalar_type()));
}

inline void check_same_device(const char* name, const at::Tensor& t, const char* other_name,
                              const at::Tensor& other) {
  TORCH_CHECK_VALUE(t.device() == other.device(), name, " must be on the same device as ", other_name, " (",
                    other.device(), "), got ", t.device());
}

// A finite real in [low, high] (high < 0: no upper bound); low_open makes the interval (low, high].
inline void check_real(const char* name, double value, double low, double high = -1, bool low_open = false) {
  const bool below = low_open ? !(value > low) : !(value >= low);
  const bool above = high >= 0 && !(value <= high);
  if (std::isfinite(value) && !below && !above) return;
  std::ostringstream interval;
  interval << (low_open ? '(' : '[') << low << ", ";
  if (high >= 0) {
    interval << high << ']';
  } else {
    interval << "inf)";
  }
  TORCH_CHECK_VALUE(false, name, " must be a finite number in ", interval.str(), ", got ", value);
}

// Whether a tensor is seen by a tracer (torch.compile's fake/functional tensors, a dispatch mode):
// then its values cannot be read and in-place shortcuts must not be taken.
inline bool traced(const at::Tensor& t) {
  return c10::impl::TorchDispatchModeTLS::any_modes_set() ||
         t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

}  // namespace fusedloss
