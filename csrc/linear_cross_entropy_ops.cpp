// The fused linear + cross entropy op of fusedloss._C (docs/BACKENDS.md, linear_cross_entropy), for
// every device: the rows are processed in chunks, so the (N, V) logits never exist. Per chunk of rows:
//
//   logits = x_chunk · Wᵀ (+ b)                 at::mm / at::addmm into one reused (chunk, V) buffer
//   loss, dlogits = softmax_loss_forward(...)   the fused row kernel (CPU or CUDA), gradient written in place
//   grad_input[chunk] = (dlogits · W) ⊙ f       f: the row factors below
//   grad_weight += dlogitsᵀ · (x_chunk ⊙ f)     accumulated in float32 (float64 for float64 input)
//   grad_bias   += dlogitsᵀ · f
//
// The row factor f_n is what d(loss)/d(l_n) is: t_n / divisor for "mean" (t the token weights, divisor
// Σ t_n w_{y_n} over the kept rows), t_n for "sum". Both are known in the forward pass, so the gradients are
// computed there and backward only multiplies them by grad_output. For "none", d(loss)/d(l_n) is grad_output[n]
// times t_n and only backward knows it: the forward computes the losses alone and backward runs the chunks again
// (one more x·Wᵀ). Accumulating grad_weight in bfloat16 is a known cause of divergence; here the accumulator is
// float32 and the chunk's product is formed in float32 (the chunk gradient is widened, a (chunk, V) temporary).
//
// Extra memory of forward + backward: the input gradients (grad_input (N, H); grad_weight (V, H) and grad_bias in
// the accumulation dtype, plus their copy in the weight's dtype for fp16/bf16) and the (chunk, V) logits buffer
// (twice that for fp16/bf16: the widened gradient). The arguments are checked and flattened to rows by the
// public function (fusedloss.linear); the fake kernel for torch.compile is in python/fusedloss/_ext/linear.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_utils.h"

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // input (N, H), linear_weight (V, H), target int64 (N,) or probabilities (N, V), linear_bias (V,) or None,
  // weight (V,) class weights or None, token_weight (N,) or None; chunk_size rows per chunk (>= 1).
  // Returns (N,) for reduction "none", else a scalar, in input's dtype.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, "
      "int ignore_index, str reduction, float label_smoothing, float focal_gamma, float z_loss, float? softcap, "
      "Tensor? token_weight, int chunk_size) -> Tensor");
}

namespace fusedloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RowOptions {
  c10::optional<at::Tensor> weight;
  int64_t ignore_index;
  double label_smoothing;
  double focal_gamma;
  double z_loss;
  c10::optional<double> softcap;
};

at::ScalarType accumulation_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

// The gradients to compute (undefined: not wanted), in the accumulation dtype for weight and bias.
struct Grads {
  at::Tensor input;
  at::Tensor weight;
  at::Tensor bias;
};

// Runs every chunk of rows. Returns the row losses (N,) in the accumulation dtype. With row factors f (N,)
// defined, also writes grad_input and adds the chunks' contributions to the weight and bias accumulators of
// `grads` (those defined), for the loss Σ_n f_n l_n.
at::Tensor run_chunks(const at::Tensor& x, const at::Tensor& linear_weight, const at::Tensor& target,
                      const c10::optional<at::Tensor>& linear_bias, const RowOptions& opt, int64_t chunk_size,
                      const at::Tensor& factors, Grads* grads) {
  static auto row_kernel = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fusedloss::softmax_loss_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                                   c10::string_view, double, double, double, c10::optional<double>, bool, bool, bool)>();
  const int64_t N = x.size(0);
  const int64_t V = linear_weight.size(0);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  at::Tensor losses = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return losses;
  const int64_t rows = std::min(std::max<int64_t>(chunk_size, 1), N);
  at::Tensor buffer = at::empty({rows, V}, x.options());
  const at::Tensor weight_t = linear_weight.t();
  const bool want_grad = factors.defined();
  const bool has_bias = linear_bias.has_value() && linear_bias->defined();
  const bool is_traced = traced(buffer) || traced(x);
  for (int64_t start = 0; start < N; start += rows) {
    const int64_t n = std::min(rows, N - start);
    at::Tensor logits = buffer.narrow(0, 0, n);
    const at::Tensor x_chunk = x.narrow(0, start, n);
    if (has_bias) {
      at::addmm_out(logits, *linear_bias, x_chunk, weight_t);
    } else {
      at::mm_out(logits, x_chunk, weight_t);
    }
    // The gradient of each row's loss goes over the logits (inplace_backward); scale 1 ("none"). While a tracer
    // records the ops (torch.compile) an op's output may not alias its input: the gradient then gets its own
    // buffer.
    auto [row_loss, row_grad] =
        row_kernel.call(logits, target.narrow(0, start, n), opt.weight, opt.ignore_index, "none",
                        opt.label_smoothing, opt.focal_gamma, opt.z_loss, opt.softcap, /*mean_by_count=*/false,
                        /*compute_grad=*/want_grad, /*inplace_backward=*/!is_traced);
    losses.narrow(0, start, n).copy_(row_loss);
    if (!want_grad) continue;
    if (is_traced) logits = row_grad;
    const at::Tensor f = factors.narrow(0, start, n).unsqueeze(1);
    if (grads->input.defined()) {
      at::Tensor grad_input = grads->input.narrow(0, start, n);
      at::mm_out(grad_input, logits, linear_weight);
      grad_input.mul_(f);
    }
    if (grads->weight.defined() || grads->bias.defined()) {
      const at::Tensor dlogits = logits.scalar_type() == acc ? logits : logits.to(acc);
      if (grads->weight.defined()) grads->weight.addmm_(dlogits.t(), x_chunk.to(acc) * f);
      if (grads->bias.defined()) grads->bias.addmv_(dlogits.t(), f.squeeze(1));
    }
  }
  return losses;
}

// Per-row weights of the reduction, in float64: t_n (token weights, ones when None) on kept rows, 0 on rows whose
// target is ignore_index; and the mean's divisor Σ_n t_n w_{y_n} (w = class weights, ones when None; soft
// targets: Σ_n t_n).
std::tuple<at::Tensor, at::Tensor> row_weights(const at::Tensor& target, int64_t num_rows, int64_t num_classes,
                                               const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                               const c10::optional<at::Tensor>& token_weight) {
  const auto opts = target.options().dtype(at::kDouble);
  at::Tensor t = token_weight.has_value() && token_weight->defined() ? token_weight->to(at::kDouble)
                                                                     : at::ones({num_rows}, opts);
  if (at::isFloatingType(target.scalar_type())) return {t, t.sum()};
  t = at::where(target != ignore_index, t, at::zeros({}, opts));
  if (!(weight.has_value() && weight->defined())) return {t, t.sum()};
  const at::Tensor class_weight = weight->to(at::kDouble).index_select(0, target.clamp(0, num_classes - 1));
  return {t, (t * class_weight).sum()};
}

// d(loss)/d(l_n) for "mean" and "sum", in the accumulation dtype (0 on ignored rows, also when every row is).
at::Tensor reduction_factors(const at::Tensor& t, const at::Tensor& divisor, c10::string_view reduction,
                             at::ScalarType acc) {
  if (reduction != "mean") return t.to(acc);
  return at::where(t != 0, t / divisor, at::zeros({}, t.options())).to(acc);
}

at::Tensor reduce(const at::Tensor& losses, const at::Tensor& t, const at::Tensor& divisor,
                  c10::string_view reduction, at::ScalarType dtype) {
  const at::Tensor weighted = losses.to(at::kDouble) * t;
  if (reduction == "none") return weighted.to(dtype);
  at::Tensor total = weighted.sum();
  if (reduction == "mean") total = total / divisor;  // 0/0 = NaN when every row is ignored, as torch
  return total.to(dtype);
}

bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& linear_weight,
                            const at::Tensor& target, const c10::optional<at::Tensor>& linear_bias,
                            const c10::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
                            double label_smoothing, double focal_gamma, double z_loss, c10::optional<double> softcap,
                            const c10::optional<at::Tensor>& token_weight, int64_t chunk_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const RowOptions opt{weight, ignore_index, label_smoothing, focal_gamma, z_loss, softcap};
    const at::Tensor x = input.contiguous();
    const int64_t N = x.size(0);
    const at::ScalarType acc = accumulation_type(x.scalar_type());
    auto [t, divisor] = row_weights(target, N, linear_weight.size(0), weight, ignore_index, token_weight);
    ctx->saved_data["none"] = reduction == "none";
    ctx->saved_data["weight_dtype"] = linear_weight.scalar_type();
    if (reduction == "none") {
      // Backward knows d(loss)/d(l_n) = grad_output[n]·t_n only then: it runs the chunks again.
      ctx->save_for_backward({x, linear_weight, target, linear_bias.value_or(at::Tensor()), weight.value_or(at::Tensor()),
                              t});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["focal_gamma"] = focal_gamma;
      ctx->saved_data["z_loss"] = z_loss;
      ctx->saved_data["softcap"] = softcap.has_value() ? c10::IValue(*softcap) : c10::IValue();
      ctx->saved_data["chunk_size"] = chunk_size;
      const at::Tensor losses = run_chunks(x, linear_weight, target, linear_bias, opt, chunk_size, {}, nullptr);
      return reduce(losses, t, divisor, reduction, x.scalar_type());
    }
    Grads grads;
    if (input.requires_grad()) grads.input = at::empty_like(x);
    if (linear_weight.requires_grad()) grads.weight = at::zeros(linear_weight.sizes(), x.options().dtype(acc));
    if (defined(linear_bias) && linear_bias->requires_grad()) {
      grads.bias = at::zeros(linear_bias->sizes(), x.options().dtype(acc));
    }
    const at::Tensor losses = run_chunks(x, linear_weight, target, linear_bias, opt, chunk_size,
                                         reduction_factors(t, divisor, reduction, acc), &grads);
    ctx->save_for_backward({grads.input, grads.weight, grads.bias});
    return reduce(losses, t, divisor, reduction, x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list result(13);
    if (!grad_loss.defined()) return result;
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    const auto saved = ctx->get_saved_variables();
    if (!ctx->saved_data["none"].toBool()) {
      for (int i = 0; i < 3; ++i) {
        if (!saved[i].defined()) continue;
        const at::Tensor grad = scale_saved_grad(saved[i], grad_loss);
        result[i == 2 ? 3 : i] = i == 0 ? grad : grad.to(weight_dtype);
      }
      return result;
    }
    const at::Tensor &x = saved[0], &linear_weight = saved[1], &target = saved[2], &t = saved[5];
    const c10::optional<at::Tensor> linear_bias =
        saved[3].defined() ? c10::optional<at::Tensor>(saved[3]) : c10::nullopt;
    const c10::optional<at::Tensor> weight = saved[4].defined() ? c10::optional<at::Tensor>(saved[4]) : c10::nullopt;
    const c10::IValue softcap = ctx->saved_data["softcap"];
    const RowOptions opt{weight,
                         ctx->saved_data["ignore_index"].toInt(),
                         ctx->saved_data["label_smoothing"].toDouble(),
                         ctx->saved_data["focal_gamma"].toDouble(),
                         ctx->saved_data["z_loss"].toDouble(),
                         softcap.isNone() ? c10::nullopt : c10::optional<double>(softcap.toDouble())};
    const at::ScalarType acc = accumulation_type(x.scalar_type());
    Grads grads;
    if (ctx->needs_input_grad(0)) grads.input = at::empty_like(x);
    if (ctx->needs_input_grad(1)) grads.weight = at::zeros(linear_weight.sizes(), x.options().dtype(acc));
    if (linear_bias.has_value() && ctx->needs_input_grad(3)) {
      grads.bias = at::zeros(linear_bias->sizes(), x.options().dtype(acc));
    }
    const at::Tensor factors = (grad_loss.reshape({-1}).to(at::kDouble) * t).to(acc);
    run_chunks(x, linear_weight, target, linear_bias, opt, ctx->saved_data["chunk_size"].toInt(), factors, &grads);
    result[0] = grads.input;
    if (grads.weight.defined()) result[1] = grads.weight.to(weight_dtype);
    if (grads.bias.defined()) result[3] = grads.bias.to(weight_dtype);
    return result;
  }
};

at::Tensor linear_cross_entropy_no_grad(const at::Tensor& input, const at::Tensor& linear_weight,
                                        const at::Tensor& target, const c10::optional<at::Tensor>& linear_bias,
                                        const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                        c10::string_view reduction, double label_smoothing, double focal_gamma,
                                        double z_loss, c10::optional<double> softcap,
                                        const c10::optional<at::Tensor>& token_weight, int64_t chunk_size) {
  const RowOptions opt{weight, ignore_index, label_smoothing, focal_gamma, z_loss, softcap};
  const at::Tensor x = input.contiguous();
  auto [t, divisor] = row_weights(target, x.size(0), linear_weight.size(0), weight, ignore_index, token_weight);
  const at::Tensor losses = run_chunks(x, linear_weight, target, linear_bias, opt, chunk_size, {}, nullptr);
  return reduce(losses, t, divisor, reduction, x.scalar_type());
}

at::Tensor linear_cross_entropy_autograd(const at::Tensor& input, const at::Tensor& linear_weight,
                                         const at::Tensor& target, const c10::optional<at::Tensor>& linear_bias,
                                         const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                         c10::string_view reduction, double label_smoothing, double focal_gamma,
                                         double z_loss, c10::optional<double> softcap,
                                         const c10::optional<at::Tensor>& token_weight, int64_t chunk_size) {
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (input.requires_grad() || linear_weight.requires_grad() ||
                           (defined(linear_bias) && linear_bias->requires_grad()));
  if (!wants_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_cross_entropy_no_grad(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                        label_smoothing, focal_gamma, z_loss, softcap, token_weight, chunk_size);
  }
  return LinearCrossEntropyFunction::apply(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                           label_smoothing, focal_gamma, z_loss, softcap, token_weight, chunk_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_autograd); }
TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_no_grad); }
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_no_grad); }

}  // namespace fusedloss
