// The distillation ops of fusedloss._C (docs/BACKENDS.md, distillation_loss): schemas, checks and autograd.
// The CPU kernels are in csrc/cpu/distillation.cpp (math in csrc/kernels/distillation.h) and check the rows'
// arguments (csrc/distillation_checks.h); the fake kernels are in python/fusedloss/_ext/distillation.py.
//
// fusedloss::distillation_loss is what the cpp backend's distillation_loss calls, on rows the public function
// (python/fusedloss/distillation.py) has checked and flattened. Its autograd is registered here, in C++, as
// softmax_loss's is: forward computes the loss and, in the same sweeps, the gradient with respect to the student
// already multiplied by d(loss)/d(l_n); backward scales the saved gradient by grad_output (scale_saved_grad: in
// place, so a second backward through the same graph raises instead of giving another number). The teacher gets
// no gradient. The linear form runs its chunk loop in Python over fusedloss::distillation_rows, which writes the
// gradient into a given buffer (the chunk's logits).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "distillation_checks.h"
#include "op_utils.h"

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // Rows student (N, V) and teacher (N, V) of one dtype (unit stride along V), factors (N,) floating. Returns the
  // per-row divergence (N,) in the compute dtype (float32, float64 for float64) and, when grad is given (an
  // (N, V) tensor of student's dtype, unit stride along V; it may be student itself), writes
  // factors[n] · dl_n/dstudent[n] into it. Rows of factor 0 give loss 0 (and gradient 0). β in [0, 1]:
  // 0 forward KL, 1 reverse KL, else the generalized Jensen-Shannon divergence; temperature > 0.
  m.def(
      "distillation_rows(Tensor student, Tensor teacher, Tensor factors, float beta, float temperature, "
      "Tensor(a!)? grad) -> Tensor");
  // The functional device kernel: (losses (N,) in the compute dtype, gradient (N, V) in student's dtype or an
  // empty tensor without compute_grad).
  m.def(
      "distillation_forward(Tensor student, Tensor teacher, Tensor factors, float beta, float temperature, "
      "bool compute_grad) -> (Tensor, Tensor)");
  // The loss of docs/BACKENDS.md on rows: target (N,) integer or None (rows equal to ignore_index left out),
  // token_weight (N,) or None; (N,) for reduction "none", else a scalar; in student's dtype.
  m.def(
      "distillation_loss(Tensor student, Tensor teacher, Tensor? target, Tensor? token_weight, float beta, "
      "float temperature, int ignore_index, str reduction) -> Tensor");
}

namespace fusedloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_distillation_loss_args(const at::Tensor& student, const c10::optional<at::Tensor>& target,
                                  const c10::optional<at::Tensor>& token_weight, c10::string_view reduction) {
  const int64_t N = student.dim() == 2 ? student.size(0) : -1;
  if (target.has_value() && target->defined()) {
    TORCH_CHECK_TYPE(!is_floating(*target) && target->scalar_type() != at::kBool && !target->is_complex(),
                     "target must be an integer tensor (int64 class indices), got ",
                     dtype_str(target->scalar_type()));
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == N, "target must have one entry per row, shape (",
                      N, ",), got ", shape_str(target->sizes()));
    check_same_device("target", *target, "student", student);
  }
  if (token_weight.has_value() && token_weight->defined()) {
    check_floating("token_weight", *token_weight);
    TORCH_CHECK_VALUE(token_weight->dim() == 1 && token_weight->size(0) == N,
                      "token_weight must have one weight per row, shape (", N, ",), got ",
                      shape_str(token_weight->sizes()));
    check_same_device("token_weight", *token_weight, "student", student);
  }
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "mean" || reduction == "sum",
                    "reduction must be one of ('none', 'mean', 'sum'), got '", reduction, "'");
}

// (loss in its final form, gradient (N, V) or undefined).
std::tuple<at::Tensor, at::Tensor> run_distillation(const at::Tensor& student, const at::Tensor& teacher,
                                                    const c10::optional<at::Tensor>& target,
                                                    const c10::optional<at::Tensor>& token_weight, double beta,
                                                    double temperature, int64_t ignore_index,
                                                    c10::string_view reduction, bool compute_grad) {
  check_distillation_loss_args(student, target, token_weight, reduction);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("fusedloss::distillation_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&, double, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t N = student.size(0);
  const auto f64 = student.options().dtype(at::kDouble);
  // t: the token weights (ones), 0 on ignored rows; the mean's divisor Σ t. No host synchronization.
  at::Tensor t = token_weight.has_value() && token_weight->defined() ? token_weight->to(at::kDouble)
                                                                     : at::ones({N}, f64);
  if (target.has_value() && target->defined()) t = at::where(target->ne(ignore_index), t, at::zeros_like(t));
  const at::Tensor divisor = t.sum();
  const at::Tensor kept = t.ne(0);
  at::Tensor factors = reduction == "mean" ? at::where(kept, t / divisor, at::zeros_like(t)) : t;
  factors = factors.to(at::toOpMathType(student.scalar_type()));
  auto [losses, grad] = forward.call(student.contiguous(), teacher.contiguous(), factors, beta, temperature,
                                     compute_grad);
  const at::Tensor weighted = at::where(kept, losses.to(at::kDouble) * t, at::zeros_like(t));
  at::Tensor loss;
  if (reduction == "none") {
    loss = weighted;
  } else if (reduction == "sum") {
    loss = weighted.sum();
  } else {
    loss = weighted.sum() / divisor;  // 0/0 = NaN when every row is ignored, as cross_entropy
  }
  return {loss.to(student.scalar_type()), grad};
}

class DistillationLossFunction : public torch::autograd::Function<DistillationLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& token_weight,
                            double beta, double temperature, int64_t ignore_index, c10::string_view reduction) {
    auto [loss, grad] = run_distillation(student, teacher, target, token_weight, beta, temperature, ignore_index,
                                         reduction, /*compute_grad=*/true);
    ctx->save_for_backward({grad});
    ctx->saved_data["none"] = reduction == "none";
    ctx->saved_data["sizes"] = student.sizes();
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list grads(8);
    if (!grad_loss.defined()) return grads;
    const bool none = ctx->saved_data["none"].toBool();
    const at::Tensor grad =
        scale_saved_grad(ctx->get_saved_variables()[0], none ? grad_loss.reshape({-1}) : grad_loss);
    grads[0] = grad.view(ctx->saved_data["sizes"].toIntVector());  // the teacher (grads[1]) gets none
    return grads;
  }
};

at::Tensor distillation_loss_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                      const c10::optional<at::Tensor>& target,
                                      const c10::optional<at::Tensor>& token_weight, double beta, double temperature,
                                      int64_t ignore_index, c10::string_view reduction) {
  if (!(at::GradMode::is_enabled() && student.requires_grad())) {
    at::Tensor loss = std::get<0>(run_distillation(student, teacher, target, token_weight, beta, temperature,
                                                   ignore_index, reduction, false));
    return loss;
  }
  // The teacher is a constant: detached, so that autograd neither differentiates nor records it.
  return DistillationLossFunction::apply(student, teacher.detach(), target, token_weight, beta, temperature,
                                         ignore_index, reduction);
}

// Below autograd (inference_mode, or a redispatch): no gradient.
at::Tensor distillation_loss_no_grad(const at::Tensor& student, const at::Tensor& teacher,
                                     const c10::optional<at::Tensor>& target,
                                     const c10::optional<at::Tensor>& token_weight, double beta, double temperature,
                                     int64_t ignore_index, c10::string_view reduction) {
  return std::get<0>(run_distillation(student, teacher, target, token_weight, beta, temperature, ignore_index,
                                      reduction, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("distillation_loss", &distillation_loss_autograd);
  // The device kernels are not differentiable by themselves: their gradient output is what backward uses.
  m.impl("distillation_rows", torch::CppFunction::makeFallthrough());
  m.impl("distillation_forward", torch::CppFunction::makeFallthrough());
}
TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("distillation_loss", &distillation_loss_no_grad); }
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { m.impl("distillation_loss", &distillation_loss_no_grad); }

}  // namespace fusedloss
