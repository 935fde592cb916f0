// The sigmoid and multi-label loss ops of fusedloss._C (docs/BACKENDS.md): schemas, argument
// checks, and autograd, registered in C++ (as torchvision's ops/autograd/*.cpp).
//
// Each loss has two ops:
//   fusedloss::<loss>(...)                          the public op; kernels for Autograd and
//                                                   CompositeExplicitAutograd (no gradient)
//   fusedloss::<loss>_forward(..., compute_grad)    the device op: (loss, [new_acc_sum,] grad), kernels
//                                                   per device (csrc/cpu/sigmoid.cpp), fake in Python
// The device op computes d loss / d input in the same pass as the loss (already divided by the
// mean's divisor); backward only multiplies it by grad_output. Without a gradient to compute
// (grad mode off, input not requiring grad, inference mode) the device op writes none.
//
// The public op checks its arguments once, here: TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface in
// Python as TypeError / ValueError naming the argument. Target values are checked by the kernels
// in their pass over the data.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include <string>
#include <tuple>
#include <vector>

#include "op_utils.h"

namespace fusedloss {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// Argument checks (shapes are compared as SymInts, so the checks also run while torch.compile
// traces with symbolic shapes)
// ---------------------------------------------------------------------------------------------

void check_real_target(const Tensor& target) {
  TORCH_CHECK_TYPE(!target.is_complex(), "target must be a real tensor, got ", target.scalar_type());
}

void check_same_device(const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " must be on the same device as input (", input.device(),
                    "), got ", t.device());
}

void check_same_shape(const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK_VALUE(t.sym_sizes().equals(input.sym_sizes()), name, " must have input's shape ", input.sym_sizes(),
                    ", got ", t.sym_sizes());
  check_same_device(name, t, input);
}

void check_reduction(c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "mean" || reduction == "sum",
                    "reduction must be one of ('none', 'mean', 'sum'), got '", reduction, "'");
}

void check_class_input(const Tensor& input) {
  check_floating("input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension(s), got shape ", input.sym_sizes());
  TORCH_CHECK_VALUE(input.sym_size(-1) >= 1, "input must have at least one class (input.shape[-1] >= 1), got shape ",
                    input.sym_sizes());
}

// weight broadcasts to input's shape (numpy rules).
void check_broadcast_weight(const char* name, const c10::optional<Tensor>& weight, const Tensor& input) {
  if (!weight.has_value() || !weight->defined()) return;
  check_floating(name, *weight);
  bool broadcasts = weight->dim() <= input.dim();
  for (int64_t d = 1; broadcasts && d <= weight->dim(); ++d) {
    const c10::SymInt& size = weight->sym_size(-d);
    broadcasts = size == 1 || size == input.sym_size(-d);
  }
  TORCH_CHECK_VALUE(broadcasts, name, " must broadcast to input's shape ", input.sym_sizes(), ", got shape ",
                    weight->sym_sizes());
  check_same_device(name, *weight, input);
}

void check_class_weight(const c10::optional<Tensor>& weight, const Tensor& input) {
  if (!weight.has_value() || !weight->defined()) return;
  check_floating("weight", *weight);
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->sym_size(0) == input.sym_size(-1),
                    "weight must have shape (C,) = (", input.sym_size(-1), ",), got ", weight->sym_sizes());
  check_same_device("weight", *weight, input);
}

// The gradient flows to input only: a target or weight that requires grad would silently get
// none, so such a call is refused (the reference backend differentiates them).
void check_no_grad(const char* name, const c10::optional<Tensor>& t) {
  TORCH_CHECK(!t.has_value() || !t->defined() || !t->requires_grad(), "the fused ", name,
              " gets no gradient: it must not require grad (use backend='reference' to differentiate it)");
}

void check_bce_args(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                    const c10::optional<Tensor>& pos_weight, c10::string_view reduction) {
  check_floating("input", input);
  TORCH_CHECK_TYPE(target.is_floating_point(), "target must be a floating-point tensor (as torch), got ",
                   target.scalar_type(), ": pass target.to(input.dtype)");
  check_same_shape("target", target, input);
  check_broadcast_weight("weight", weight, input);
  check_broadcast_weight("pos_weight", pos_weight, input);
  check_reduction(reduction);
}

void check_focal_args(const Tensor& input, const Tensor& target, double alpha, double gamma,
                      c10::string_view reduction) {
  check_floating("input", input);
  TORCH_CHECK_TYPE(target.is_floating_point(), "target must be a floating-point tensor (as torch), got ",
                   target.scalar_type(), ": pass target.to(input.dtype)");
  check_same_shape("target", target, input);
  TORCH_CHECK_VALUE(alpha <= 1.0, "alpha must be a finite number in [-inf, 1], got ", alpha);
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma < INFINITY, "gamma must be a finite number in [0, inf), got ", gamma);
  check_reduction(reduction);
}

void check_multilabel_args(const Tensor& input, const Tensor& target, c10::string_view reduction) {
  check_class_input(input);
  check_real_target(target);
  check_same_shape("target", target, input);
  check_reduction(reduction);
}

void check_ghmc_args(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& valid, int64_t bins,
                     double momentum, const Tensor& acc_sum) {
  check_floating("input", input);
  check_real_target(target);
  check_same_shape("target", target, input);
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK_TYPE(valid->scalar_type() == at::kBool, "valid must be a bool tensor, got ", valid->scalar_type());
    check_same_shape("valid", *valid, input);
  }
  TORCH_CHECK_VALUE(bins >= 1, "bins must be >= 1, got ", bins);
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0, "momentum must be in [0, 1), got ", momentum);
  TORCH_CHECK_VALUE(acc_sum.dim() == 1 && acc_sum.sym_size(0) == bins && acc_sum.scalar_type() == at::kFloat,
                    "acc_sum must be a float32 tensor of shape (bins,) = (", bins, ",), got ", acc_sum.scalar_type(),
                    " ", acc_sum.sym_sizes());
  check_same_device("acc_sum", acc_sum, input);
}

void check_bi_tempered_args(const Tensor& input, const Tensor& target, double t1, double t2, double label_smoothing,
                            int64_t num_iters, c10::string_view reduction) {
  check_class_input(input);
  if (target.is_floating_point()) {
    check_same_shape("target", target, input);
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong,
                     "target must be int64 class indices or floating-point probabilities, got ", target.scalar_type());
    const auto sizes = input.sym_sizes();
    TORCH_CHECK_VALUE(target.sym_sizes().equals(sizes.slice(0, sizes.size() - 1)),
                      "target of class indices must have shape input.shape[:-1] = ", sizes.slice(0, sizes.size() - 1),
                      ", got ", target.sym_sizes());
    check_same_device("target", target, input);
  }
  TORCH_CHECK_VALUE(t1 >= 0.0 && t1 <= 1.0, "t1 must be a finite number in [0, 1], got ", t1);
  TORCH_CHECK_VALUE(t2 > 0.0 && t2 < INFINITY, "t2 must be a finite number in (0, inf), got ", t2);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be a finite number in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(label_smoothing == 0.0 || input.sym_size(-1) >= 2,
                    "label_smoothing > 0 needs at least 2 classes, got input of shape ", input.sym_sizes());
  TORCH_CHECK_VALUE(num_iters >= 1, "num_iters must be >= 1, got ", num_iters);
  check_reduction(reduction);
}

// ---------------------------------------------------------------------------------------------
// Device ops, called below autograd
// ---------------------------------------------------------------------------------------------

template <typename Signature>
c10::TypedOperatorHandle<Signature> device_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Each loss as a callable struct: forward(args..., compute_grad) returns the outputs followed by
// the gradient (undefined-sized when not computed).
struct Bce {
  static std::vector<Tensor> forward(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                                     const c10::optional<Tensor>& pos_weight, const std::string& reduction,
                                     bool compute_grad) {
    static const auto op = device_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                const c10::optional<Tensor>&,
                                                                const c10::optional<Tensor>&, c10::string_view, bool)>(
        "fusedloss::binary_cross_entropy_with_logits_forward");
    auto [loss, grad] = op.call(input, target, weight, pos_weight, reduction, compute_grad);
    return {loss, grad};
  }
};

struct SigmoidFocal {
  static std::vector<Tensor> forward(const Tensor& input, const Tensor& target, double alpha, double gamma,
                                     const std::string& reduction, bool compute_grad) {
    static const auto op =
        device_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, double, c10::string_view, bool)>(
            "fusedloss::sigmoid_focal_loss_forward");
    auto [loss, grad] = op.call(input, target, alpha, gamma, reduction, compute_grad);
    return {loss, grad};
  }
};

struct MultilabelSoftMargin {
  static std::vector<Tensor> forward(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                                     const std::string& reduction, bool compute_grad) {
    static const auto op = device_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                const c10::optional<Tensor>&, c10::string_view, bool)>(
        "fusedloss::multilabel_soft_margin_loss_forward");
    auto [loss, grad] = op.call(input, target, weight, reduction, compute_grad);
    return {loss, grad};
  }
};

struct Zlpr {
  static std::vector<Tensor> forward(const Tensor& input, const Tensor& target, const std::string& reduction,
                                     bool compute_grad) {
    static const auto op = device_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::string_view, bool)>(
        "fusedloss::multilabel_categorical_crossentropy_forward");
    auto [loss, grad] = op.call(input, target, reduction, compute_grad);
    return {loss, grad};
  }
};

struct Ghmc {
  static std::vector<Tensor> forward(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& valid,
                                     int64_t bins, double momentum, const Tensor& acc_sum, bool compute_grad) {
    static const auto op = device_op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t, double, const Tensor&, bool)>(
        "fusedloss::ghmc_loss_forward");
    auto [loss, new_acc_sum, grad] = op.call(input, target, valid, bins, momentum, acc_sum, compute_grad);
    return {loss, new_acc_sum, grad};
  }
};

struct BiTempered {
  static std::vector<Tensor> forward(const Tensor& input, const Tensor& target, double t1, double t2,
                                     double label_smoothing, int64_t num_iters, const std::string& reduction,
                                     bool compute_grad) {
    static const auto op = device_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, double, double,
                                                                int64_t, c10::string_view, bool)>(
        "fusedloss::bi_tempered_logistic_loss_forward");
    auto [loss, grad] = op.call(input, target, t1, t2, label_smoothing, num_iters, reduction, compute_grad);
    return {loss, grad};
  }
};

// ---------------------------------------------------------------------------------------------
// Autograd: the saved gradient times grad_output
// ---------------------------------------------------------------------------------------------

template <typename Op>
class SavedGradFunction : public torch::autograd::Function<SavedGradFunction<Op>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<Tensor> outputs = Op::forward(input, args..., /*compute_grad=*/true);
    const Tensor grad = outputs.back();
    outputs.pop_back();
    if (outputs.size() > 1) ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    ctx->save_for_backward({grad});
    ctx->saved_data["num_inputs"] = static_cast<int64_t>(1 + sizeof...(Args));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(ctx->saved_data["num_inputs"].toInt());
    if (grad_outputs[0].defined()) grads[0] = scale_saved_grad(ctx->get_saved_variables()[0], grad_outputs[0]);
    return grads;
  }
};

bool needs_grad(const Tensor& input) { return at::GradMode::is_enabled() && input.requires_grad(); }

// ---------------------------------------------------------------------------------------------
// Public ops: Autograd and CompositeExplicitAutograd kernels
// ---------------------------------------------------------------------------------------------

Tensor bce_with_logits_autograd(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                                const c10::optional<Tensor>& pos_weight, c10::string_view reduction) {
  check_bce_args(input, target, weight, pos_weight, reduction);
  const std::string red(reduction);
  if (!needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Bce::forward(input, target, weight, pos_weight, red, false)[0];
  }
  check_no_grad("target", target);
  check_no_grad("weight", weight);
  check_no_grad("pos_weight", pos_weight);
  return SavedGradFunction<Bce>::apply(input, target, weight, pos_weight, red)[0];
}

Tensor bce_with_logits_no_grad(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& pos_weight, c10::string_view reduction) {
  check_bce_args(input, target, weight, pos_weight, reduction);
  return Bce::forward(input, target, weight, pos_weight, std::string(reduction), false)[0];
}

Tensor sigmoid_focal_autograd(const Tensor& input, const Tensor& target, double alpha, double gamma,
                              c10::string_view reduction) {
  check_focal_args(input, target, alpha, gamma, reduction);
  const std::string red(reduction);
  if (!needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return SigmoidFocal::forward(input, target, alpha, gamma, red, false)[0];
  }
  check_no_grad("target", target);
  return SavedGradFunction<SigmoidFocal>::apply(input, target, alpha, gamma, red)[0];
}

Tensor sigmoid_focal_no_grad(const Tensor& input, const Tensor& target, double alpha, double gamma,
                             c10::string_view reduction) {
  check_focal_args(input, target, alpha, gamma, reduction);
  return SigmoidFocal::forward(input, target, alpha, gamma, std::string(reduction), false)[0];
}

Tensor multilabel_soft_margin_autograd(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                                       c10::string_view reduction) {
  check_multilabel_args(input, target, reduction);
  check_class_weight(weight, input);
  const std::string red(reduction);
  if (!needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return MultilabelSoftMargin::forward(input, target, weight, red, false)[0];
  }
  check_no_grad("target", target);
  check_no_grad("weight", weight);
  return SavedGradFunction<MultilabelSoftMargin>::apply(input, target, weight, red)[0];
}

Tensor multilabel_soft_margin_no_grad(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& weight,
                                      c10::string_view reduction) {
  check_multilabel_args(input, target, reduction);
  check_class_weight(weight, input);
  return MultilabelSoftMargin::forward(input, target, weight, std::string(reduction), false)[0];
}

Tensor zlpr_autograd(const Tensor& input, const Tensor& target, c10::string_view reduction) {
  check_multilabel_args(input, target, reduction);
  const std::string red(reduction);
  if (!needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Zlpr::forward(input, target, red, false)[0];
  }
  return SavedGradFunction<Zlpr>::apply(input, target, red)[0];
}

Tensor zlpr_no_grad(const Tensor& input, const Tensor& target, c10::string_view reduction) {
  check_multilabel_args(input, target, reduction);
  return Zlpr::forward(input, target, std::string(reduction), false)[0];
}

std::tuple<Tensor, Tensor> ghmc_autograd(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& valid,
                                         int64_t bins, double momentum, const Tensor& acc_sum) {
  check_ghmc_args(input, target, valid, bins, momentum, acc_sum);
  if (!needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto outputs = Ghmc::forward(input, target, valid, bins, momentum, acc_sum, false);
    return {outputs[0], outputs[1]};
  }
  check_no_grad("target", target);
  auto outputs = SavedGradFunction<Ghmc>::apply(input, target, valid, bins, momentum, acc_sum);
  return {outputs[0], outputs[1]};
}

std::tuple<Tensor, Tensor> ghmc_no_grad(const Tensor& input, const Tensor& target, const c10::optional<Tensor>& valid,
                                        int64_t bins, double momentum, const Tensor& acc_sum) {
  check_ghmc_args(input, target, valid, bins, momentum, acc_sum);
  auto outputs = Ghmc::forward(input, target, valid, bins, momentum, acc_sum, false);
  return {outputs[0], outputs[1]};
}

Tensor bi_tempered_autograd(const Tensor& input, const Tensor& target, double t1, double t2, double label_smoothing,
                            int64_t num_iters, c10::string_view reduction) {
  check_bi_tempered_args(input, target, t1, t2, label_smoothing, num_iters, reduction);
  const std::string red(reduction);
  if (!needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return BiTempered::forward(input, target, t1, t2, label_smoothing, num_iters, red, false)[0];
  }
  check_no_grad("target", target);
  return SavedGradFunction<BiTempered>::apply(input, target, t1, t2, label_smoothing, num_iters, red)[0];
}

Tensor bi_tempered_no_grad(const Tensor& input, const Tensor& target, double t1, double t2, double label_smoothing,
                           int64_t num_iters, c10::string_view reduction) {
  check_bi_tempered_args(input, target, t1, t2, label_smoothing, num_iters, reduction);
  return BiTempered::forward(input, target, t1, t2, label_smoothing, num_iters, std::string(reduction), false)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // Public ops (docs/BACKENDS.md signatures). Row losses take input (*, C) and return
  // input.shape[:-1] for reduction "none"; the elementwise ones return input's shape.
  m.def("binary_cross_entropy_with_logits(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "str reduction) -> Tensor");
  m.def("sigmoid_focal_loss(Tensor input, Tensor target, float alpha, float gamma, str reduction) -> Tensor");
  m.def("multilabel_soft_margin_loss(Tensor input, Tensor target, Tensor? weight, str reduction) -> Tensor");
  m.def("multilabel_categorical_crossentropy(Tensor input, Tensor target, str reduction) -> Tensor");
  m.def("ghmc_loss(Tensor input, Tensor target, Tensor? valid, int bins, float momentum, Tensor acc_sum) "
        "-> (Tensor, Tensor)");
  m.def("bi_tempered_logistic_loss(Tensor input, Tensor target, float t1, float t2, float label_smoothing, "
        "int num_iters, str reduction) -> Tensor");
  // Device ops: the loss (and GHM-C's updated acc_sum) and, when compute_grad, d loss / d input in
  // input's dtype (already divided by the mean's divisor); an empty tensor otherwise.
  m.def("binary_cross_entropy_with_logits_forward(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "str reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("sigmoid_focal_loss_forward(Tensor input, Tensor target, float alpha, float gamma, str reduction, "
        "bool compute_grad) -> (Tensor, Tensor)");
  m.def("multilabel_soft_margin_loss_forward(Tensor input, Tensor target, Tensor? weight, str reduction, "
        "bool compute_grad) -> (Tensor, Tensor)");
  m.def("multilabel_categorical_crossentropy_forward(Tensor input, Tensor target, str reduction, "
        "bool compute_grad) -> (Tensor, Tensor)");
  m.def("ghmc_loss_forward(Tensor input, Tensor target, Tensor? valid, int bins, float momentum, Tensor acc_sum, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def("bi_tempered_logistic_loss_forward(Tensor input, Tensor target, float t1, float t2, float label_smoothing, "
        "int num_iters, str reduction, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("binary_cross_entropy_with_logits", &bce_with_logits_autograd);
  m.impl("sigmoid_focal_loss", &sigmoid_focal_autograd);
  m.impl("multilabel_soft_margin_loss", &multilabel_soft_margin_autograd);
  m.impl("multilabel_categorical_crossentropy", &zlpr_autograd);
  m.impl("ghmc_loss", &ghmc_autograd);
  m.impl("bi_tempered_logistic_loss", &bi_tempered_autograd);
}

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("binary_cross_entropy_with_logits", &bce_with_logits_no_grad);
  m.impl("sigmoid_focal_loss", &sigmoid_focal_no_grad);
  m.impl("multilabel_soft_margin_loss", &multilabel_soft_margin_no_grad);
  m.impl("multilabel_categorical_crossentropy", &zlpr_no_grad);
  m.impl("ghmc_loss", &ghmc_no_grad);
  m.impl("bi_tempered_logistic_loss", &bi_tempered_no_grad);
}

}  // namespace fusedloss
