// The softmax-loss ops of fusedloss._C (docs/BACKENDS.md, softmax_loss): schemas, argument checks and
// autograd, for every device. The device kernels of softmax_loss_forward are in csrc/cpu/softmax_loss.cpp
// and csrc/cuda/softmax_loss_binding.cpp; the fake (meta) kernels for torch.compile are in
// python/fusedloss/_ext/softmax_loss.py.
//
// fusedloss::softmax_loss is what the public functions call. Its autograd is registered here, in C++
// (as torchvision's ops/autograd/*.cpp do), so an eager call runs no Python between the public function
// and the kernel, and its arguments are checked here once. Without a gradient to compute (no_grad,
// inference_mode, an input that does not require grad) the kernel neither computes nor writes one.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_utils.h"

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // Loss of input (*, C) against target (int64 indices of shape input.shape[:-1], or probabilities of input's
  // shape): target's index shape for reduction "none", else a scalar; in input's dtype. mean_by_count is
  // focal_loss's mean (over non-ignored rows rather than their weights); weight then holds its alpha.
  m.def(
      "softmax_loss(Tensor input, Tensor target, Tensor? weight, int ignore_index, str reduction, "
      "float label_smoothing, float focal_gamma, float z_loss, float? softcap, bool mean_by_count, "
      "bool inplace_backward) -> Tensor");
  // The device kernel, on validated rows: input (N, C), target int64 (N,) or float (N, C). Returns the loss
  // ((N,) or a scalar) and, when compute_grad, the gradient of that loss with respect to input, already
  // divided by the mean's divisor, in input's dtype (backward only multiplies it by grad_output); without
  // compute_grad the second output is empty. With inplace_backward the gradient is written over input's
  // storage. Targets outside [0, C) (other than ignore_index) raise ValueError on the CPU.
  m.def(
      "softmax_loss_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, str reduction, "
      "float label_smoothing, float focal_gamma, float z_loss, float? softcap, bool mean_by_count, "
      "bool compute_grad, bool inplace_backward) -> (Tensor, Tensor)");
}

namespace fusedloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_softmax_loss_args(const at::Tensor& input, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                             c10::string_view reduction, double label_smoothing, double focal_gamma, double z_loss,
                             c10::optional<double> softcap, bool mean_by_count) {
  check_floating("input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension(s), got shape ", shape_str(input.sizes()));
  const int64_t num_classes = input.size(-1);
  TORCH_CHECK_VALUE(num_classes >= 1, "input must have at least one class (input.shape[-1] >= 1), got shape ",
                    shape_str(input.sizes()));
  if (is_floating(target)) {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "target holds class probabilities (",
                      dtype_str(target.scalar_type()), ") and must have input's shape ", shape_str(input.sizes()),
                      ", got ", shape_str(target.sizes()));
    // As torch: any negative ignore_index is accepted (and has no effect) with probabilities; a class index raises.
    TORCH_CHECK_VALUE(ignore_index < 0,
                      "ignore_index must be negative with class-probability targets (it does not apply to them), got ",
                      ignore_index);
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong,
                     "target must be int64 class indices or floating-point class probabilities, got ",
                     dtype_str(target.scalar_type()), " (convert indices with target.long())");
    const auto index_shape = input.sizes().slice(0, input.dim() - 1);
    if (target.sizes() != index_shape) {
      std::string hint;
      if (input.dim() >= 3 && target.dim() == input.dim() - 1 && target.size(0) == input.size(0) &&
          target.sizes().slice(1) == input.sizes().slice(2)) {
        hint =
            "; this looks like torch's layout with the class dimension at 1 (input (N, C, d1, ...)): "
            "fusedloss wants the class dimension last, pass input.movedim(1, -1)";
      }
      TORCH_CHECK_VALUE(false, "target of class indices must have shape input.shape[:-1] = ", shape_str(index_shape),
                        " (input ", shape_str(input.sizes()), ", class dimension last), got target ",
                        shape_str(target.sizes()), hint);
    }
  }
  check_same_device("target", target, "input", input);
  if (weight.has_value() && weight->defined()) {
    const char* name = mean_by_count ? "alpha" : "weight";
    check_floating(name, *weight);
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == num_classes, name, " must have shape (C,) = (",
                      num_classes, ",) with C = input.shape[-1], got ", shape_str(weight->sizes()));
    check_same_device(name, *weight, "input", input);
  }
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "mean" || reduction == "sum",
                    "reduction must be one of ('none', 'mean', 'sum'), got '", reduction, "'");
  check_real("label_smoothing", label_smoothing, 0.0, 1.0);
  check_real(mean_by_count ? "gamma" : "focal_gamma", focal_gamma, 0.0);
  check_real("z_loss", z_loss, 0.0);
  if (softcap.has_value()) check_real("softcap", *softcap, 0.0, -1, /*low_open=*/true);
}

// Checks the arguments, flattens them to rows and runs the device kernel.
// Returns (loss in its final shape, gradient (N, C) or empty).
std::tuple<at::Tensor, at::Tensor> run_softmax_loss(const at::Tensor& input, const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                    c10::string_view reduction, double label_smoothing,
                                                    double focal_gamma, double z_loss, c10::optional<double> softcap,
                                                    bool mean_by_count, bool compute_grad, bool inplace_backward) {
  check_softmax_loss_args(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss,
                          softcap, mean_by_count);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("fusedloss::softmax_loss_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                                c10::string_view, double, double, double, c10::optional<double>, bool, bool, bool)>();
  const int64_t num_classes = input.size(-1);
  const at::Tensor rows = input.dim() == 2 ? input : input.reshape({-1, num_classes});
  const at::Tensor row_target = is_floating(target) ? (target.dim() == 2 ? target : target.reshape({-1, num_classes}))
                                                    : (target.dim() == 1 ? target : target.reshape({-1}));
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [loss, grad] = forward.call(rows, row_target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                   z_loss, softcap, mean_by_count, compute_grad, inplace_backward);
  if (reduction == "none" && input.dim() != 2) loss = loss.reshape(input.sizes().slice(0, input.dim() - 1));
  return {loss, grad};
}

class SoftmaxLossFunction : public torch::autograd::Function<SoftmaxLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
                            double label_smoothing, double focal_gamma, double z_loss, c10::optional<double> softcap,
                            bool mean_by_count, bool inplace_backward) {
    // Under a tracer the graph may reuse input, so the gradient gets its own buffer.
    const bool inplace = inplace_backward && !traced(input);
    auto [loss, grad] = run_softmax_loss(input, target, weight, ignore_index, reduction, label_smoothing,
                                         focal_gamma, z_loss, softcap, mean_by_count, /*compute_grad=*/true, inplace);
    // Saved in input's shape (the kernel's rows viewed back), so that backward needs nothing else: grad_output is
    // a scalar, or input.shape[:-1] for reduction none, broadcast over the class dimension either way. (The
    // reduction and the shape in ctx->saved_data cost two string-keyed inserts and lookups a call.)
    ctx->save_for_backward({input.dim() == 2 ? grad : grad.view_symint(input.sym_sizes())});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list grads(11);
    if (!grad_loss.defined()) return grads;
    grads[0] = scale_saved_grad(ctx->get_saved_variables()[0], grad_loss);
    return grads;
  }
};

at::Tensor softmax_loss_autograd(const at::Tensor& input, const at::Tensor& target,
                                 const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                 c10::string_view reduction, double label_smoothing, double focal_gamma, double z_loss,
                                 c10::optional<double> softcap, bool mean_by_count, bool inplace_backward) {
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    return std::get<0>(run_softmax_loss(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                        z_loss, softcap, mean_by_count, false, false));
  }
  at::Tensor loss = SoftmaxLossFunction::apply(input, target, weight, ignore_index, reduction, label_smoothing,
                                               focal_gamma, z_loss, softcap, mean_by_count, inplace_backward);
  // The gradient went over input's storage: an op that saved input for its backward must now raise.
  if (inplace_backward && !traced(input) && input.is_contiguous()) torch::autograd::impl::bump_version(input);
  return loss;
}

// Below autograd (inference_mode, or a redispatch): no gradient.
at::Tensor softmax_loss_no_grad(const at::Tensor& input, const at::Tensor& target,
                                const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                c10::string_view reduction, double label_smoothing, double focal_gamma, double z_loss,
                                c10::optional<double> softcap, bool mean_by_count, bool /*inplace_backward*/) {
  return std::get<0>(run_softmax_loss(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                      z_loss, softcap, mean_by_count, false, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("softmax_loss", &softmax_loss_autograd);
  // The device kernel is not differentiable by itself: its gradient output is what backward uses.
  m.impl("softmax_loss_forward", torch::CppFunction::makeFallthrough());
}
TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("softmax_loss", &softmax_loss_no_grad); }
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { m.impl("softmax_loss", &softmax_loss_no_grad); }

}  // namespace fusedloss
