// Helpers shared by the op files (csrc/*_ops.cpp): argument checks whose messages name the argument,
// what was expected and what came (bad input is an error, never a crash or a silently wrong number), and
// the test for "this call is being traced".
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE reach Python as ValueError / TypeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

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

// grad · grad_output for the ops that compute their gradient in the forward pass and save it: grad_output
// broadcast over the dimensions the loss reduced (a scalar, or one value per leading index of grad for
// reduction none). The usual loss.backward() passes the scalar 1: then the saved gradient is the answer.
// Otherwise it is scaled in place when it is a plain tensor (no second gradient-sized buffer), out of place while
// tracing or when a gradient of the gradient is wanted. Either way the saved tensor leaves as (or becomes) the
// returned gradient, which autograd may keep as a leaf's .grad and accumulate into: its version counter moves
// in both cases, so a second backward through the same graph (retain_graph=True) raises ("modified by an
// inplace operation") instead of scaling or returning a tensor that .grad already holds (g + 3g would be 6g).
inline at::Tensor scale_saved_grad(at::Tensor grad, const at::Tensor& grad_output) {
  const bool is_traced = traced(grad) || traced(grad_output);
  if (!is_traced && grad_output.dim() == 0 && grad_output.device().is_cpu() && !grad_output.requires_grad() &&
      grad_output.item<double>() == 1.0) {
    grad.unsafeGetTensorImpl()->bump_version();
    return grad;
  }
  at::Tensor scale = grad_output;
  if (grad_output.dim() != 0) {
    std::vector<c10::SymInt> sizes(grad_output.sym_sizes().begin(), grad_output.sym_sizes().end());
    sizes.resize(grad.dim(), c10::SymInt(1));
    scale = grad_output.view_symint(sizes);
  }
  if (is_traced || grad.requires_grad() || scale.requires_grad()) return grad.mul(scale);
  return grad.mul_(scale);
}

}  // namespace fusedloss
