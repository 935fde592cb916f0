// The linear-chain CRF ops of fusedloss._C (docs/BACKENDS.md, crf_*): schemas, argument checks and the
// autograd of the log-likelihood, for every device. Device kernels are in csrc/cpu/crf.cpp and
// csrc/cuda/crf_binding.cpp; the fake (meta) kernels for torch.compile are in python/fusedloss/_ext/crf.py.
// Arguments are batch first: emissions (B, T, K), tags (B, T) int64, mask (B, T) bool/uint8, left-aligned
// with mask[:, 0] on, transitions (K, K) with [i, j] scoring i -> j, start_transitions and end_transitions (K,).
//
// fusedloss::crf_log_likelihood is what the public functions call; its autograd is registered here, in C++,
// so that an eager call runs no Python between the public function and the kernel, and its arguments are
// checked here once (crf_viterbi, crf_marginals and crf_kbest_viterbi check theirs in their device kernels, with
// the same check_crf_args). Without a gradient to compute nothing is kept for backward. crf_partial_log_likelihood
// and crf_log_partition follow the same pattern.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>

#include "crf_checks.h"
#include "op_utils.h"

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // Per-sequence log-likelihood score(tags) - log Z, (B,), in promote_types(emissions, transitions),
  // differentiable with respect to the emissions and the three transition tensors. mask None: all on.
  // Tags past a sequence's end are not read.
  m.def(
      "crf_log_likelihood(Tensor emissions, Tensor tags, Tensor? mask, Tensor transitions, "
      "Tensor start_transitions, Tensor end_transitions) -> Tensor");
  // The device kernels, on checked arguments. The forward also returns log Z (B,) in float64 and, when
  // save_for_backward, the normalized forward variables alpha (B, T, K) in the compute dtype (float32, or
  // float64 when either input is float64) with their per-step offsets (B, T) in float64
  // (alpha_t = alpha[:, t] + offsets[:, t]; entries past a sequence's end are not written); without
  // save_for_backward both are empty. Tags outside [0, K) at unmasked positions raise ValueError on the CPU.
  m.def(
      "crf_log_likelihood_forward(Tensor emissions, Tensor tags, Tensor mask, Tensor transitions, "
      "Tensor start_transitions, Tensor end_transitions, bool save_for_backward) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of sum_b grad[b] * log_likelihood[b] w.r.t. emissions (0 at masked positions), transitions,
  // start and end transitions, each in its input's dtype. log_partition, alpha and alpha_offsets come from
  // the forward; an empty alpha makes the backward recompute the forward recursion per sequence.
  m.def(
      "crf_log_likelihood_backward(Tensor grad, Tensor emissions, Tensor tags, Tensor mask, Tensor transitions, "
      "Tensor start_transitions, Tensor end_transitions, Tensor log_partition, Tensor alpha, "
      "Tensor alpha_offsets) -> (Tensor, Tensor, Tensor, Tensor)");
  // Best path per sequence: tags (B, T) int64 padded with -1 past each sequence's end, and its score (B,).
  m.def(
      "crf_viterbi(Tensor emissions, Tensor mask, Tensor transitions, Tensor start_transitions, "
      "Tensor end_transitions) -> (Tensor, Tensor)");
  // Tag posteriors P(y_t = k), (B, T, K), 0 at masked positions.
  m.def(
      "crf_marginals(Tensor emissions, Tensor mask, Tensor transitions, Tensor start_transitions, "
      "Tensor end_transitions) -> Tensor");
  // Partial labels: log Z_allowed - log Z per sequence, (B,), where allowed (B, T, K) bool is the set of tags
  // the annotation allows at each position; differentiable like crf_log_likelihood. mask None: all on.
  m.def(
      "crf_partial_log_likelihood(Tensor emissions, Tensor allowed, Tensor? mask, Tensor transitions, "
      "Tensor start_transitions, Tensor end_transitions) -> Tensor");
  // Its device kernels, on checked arguments. The forward returns the value and what its device's backward
  // needs (a list private to the device; empty without save_for_backward, and a device may always return it
  // empty and recompute). The backward returns the gradients of sum_b grad[b] * value[b] w.r.t. emissions (0 at
  // masked positions), transitions, start and end transitions, each in its input's dtype.
  m.def(
      "crf_partial_log_likelihood_forward(Tensor emissions, Tensor allowed, Tensor mask, Tensor transitions, "
      "Tensor start_transitions, Tensor end_transitions, bool save_for_backward) -> (Tensor, Tensor[])");
  m.def(
      "crf_partial_log_likelihood_backward(Tensor grad, Tensor emissions, Tensor allowed, Tensor mask, "
      "Tensor transitions, Tensor start_transitions, Tensor end_transitions, Tensor[] saved) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // log Z per sequence, (B,), differentiable (its gradient: the marginals); device kernels as above.
  m.def(
      "crf_log_partition(Tensor emissions, Tensor? mask, Tensor transitions, Tensor start_transitions, "
      "Tensor end_transitions) -> Tensor");
  m.def(
      "crf_log_partition_forward(Tensor emissions, Tensor mask, Tensor transitions, Tensor start_transitions, "
      "Tensor end_transitions, bool save_for_backward) -> (Tensor, Tensor[])");
  m.def(
      "crf_log_partition_backward(Tensor grad, Tensor emissions, Tensor mask, Tensor transitions, "
      "Tensor start_transitions, Tensor end_transitions, Tensor[] saved) -> (Tensor, Tensor, Tensor, Tensor)");
  // The k best paths per sequence: paths (B, k, T) int64 (-1 past each sequence's end, and everywhere for
  // ranks past the sequence's K^L paths) and their scores (B, k) (-inf past K^L).
  m.def(
      "crf_kbest_viterbi(Tensor emissions, Tensor mask, Tensor transitions, Tensor start_transitions, "
      "Tensor end_transitions, int k) -> (Tensor, Tensor)");
}

namespace fusedloss {

namespace {

void check_float(const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK_VALUE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble, name,
                    " must be float16, bfloat16, float32 or float64, got ", dtype_str(type));
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& emissions) {
  TORCH_CHECK_VALUE(t.device() == emissions.device(), name, " must be on the device of emissions (",
                    emissions.device(), "), got ", t.device());
}

}  // namespace

void check_crf_args(const at::Tensor& emissions, const at::Tensor* tags, const at::Tensor* mask,
                    const at::Tensor& transitions, const at::Tensor& start_transitions,
                    const at::Tensor& end_transitions) {
  TORCH_CHECK_VALUE(emissions.dim() == 3, "emissions must be 3-D (batch, seq_len, num_tags), got shape ",
                    shape_str(emissions.sizes()));
  check_float("emissions", emissions);
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  TORCH_CHECK_VALUE(T >= 1 && K >= 1, "emissions must have seq_len >= 1 and num_tags >= 1, got shape ",
                    shape_str(emissions.sizes()));
  const std::pair<const char*, const at::Tensor*> parameters[] = {
      {"transitions", &transitions}, {"start_transitions", &start_transitions}, {"end_transitions", &end_transitions}};
  for (const auto& [name, value] : parameters) {
    const bool square = value == &transitions;
    const bool shape_ok = square ? value->dim() == 2 && value->size(0) == K && value->size(1) == K
                                 : value->dim() == 1 && value->size(0) == K;
    if (!shape_ok) {
      const std::string expected = square ? shape_str({K, K}) : shape_str({K});
      TORCH_CHECK_VALUE(false, name, " must have shape ", expected, " (num_tags from emissions), got ",
                        shape_str(value->sizes()));
    }
    check_float(name, *value);
    check_device(name, *value, emissions);
  }
  if (tags != nullptr) {
    // The dtype first, as the public layer checks: a bool (B, T, K) tensor is the other kind of tags (partial
    // labels, crf_partial_log_likelihood), so anything else hears of both.
    TORCH_CHECK_VALUE(tags->scalar_type() == at::kLong,
                      "tags must be int64 (batch, seq_len) tag indices or a bool (batch, seq_len, num_tags) tensor of "
                      "allowed tags, got ", dtype_str(tags->scalar_type()));
    TORCH_CHECK_VALUE(tags->dim() == 2 && tags->size(0) == B && tags->size(1) == T,
                      "tags must have shape (batch, seq_len) = ", shape_str({B, T}), " like emissions, got ",
                      shape_str(tags->sizes()));
    check_device("tags", *tags, emissions);
  }
  if (mask == nullptr) return;
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T,
                    "mask must have shape (batch, seq_len) = ", shape_str({B, T}), " like emissions, got ",
                    shape_str(mask->sizes()));
  TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte,
                    "mask must be bool or uint8, got ", dtype_str(mask->scalar_type()));
  check_device("mask", *mask, emissions);
  // Reading a CUDA mask would wait for the device; a traced one has no values.
  if (!mask->device().is_cpu() || traced(*mask)) return;
  const at::Tensor m = mask->contiguous();
  const uint8_t* on = static_cast<const uint8_t*>(m.const_data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    // pytorch-crf's words, as the public layer's (python/fusedloss/crf.py).
    TORCH_CHECK_VALUE(on[b * T] != 0, "mask of the first timestep must all be on");
    for (int64_t t = 1; t < T; ++t) {
      TORCH_CHECK_VALUE(!(on[b * T + t] && !on[b * T + t - 1]),
                        "mask must be left-aligned: a prefix of ones per sequence, got a 0 followed by a 1");
    }
  }
}

void check_crf_allowed(const at::Tensor& emissions, const at::Tensor& allowed, const at::Tensor* mask) {
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  // The words of the public layer, whose tags argument is either tag indices or these sets.
  TORCH_CHECK_VALUE(allowed.scalar_type() == at::kBool,
                    "tags must be int64 (batch, seq_len) tag indices or a bool (batch, seq_len, num_tags) tensor of "
                    "allowed tags, got ",
                    dtype_str(allowed.scalar_type()));
  TORCH_CHECK_VALUE(allowed.dim() == 3 && allowed.size(0) == B && allowed.size(1) == T && allowed.size(2) == K,
                    "tags must have shape (batch, seq_len, num_tags) = ", shape_str({B, T, K}),
                    " like emissions, got ", shape_str(allowed.sizes()));
  check_device("allowed", allowed, emissions);
  if (!allowed.device().is_cpu() || traced(allowed) || (mask != nullptr && traced(*mask))) return;
  const at::Tensor a = allowed.contiguous();
  const uint8_t* on = static_cast<const uint8_t*>(a.const_data_ptr());
  const at::Tensor m = mask != nullptr ? mask->contiguous() : at::Tensor();
  const uint8_t* unmasked = mask != nullptr ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      if (unmasked != nullptr && unmasked[b * T + t] == 0) continue;
      const uint8_t* row = on + (b * T + t) * K;
      bool any = false;
      for (int64_t k = 0; k < K && !any; ++k) any = row[k] != 0;
      TORCH_CHECK_VALUE(any, "tags (allowed tag sets) must allow at least one tag at every unmasked position, got "
                        "an empty set at sequence ", b, ", position ", t);
    }
  }
}

void check_kbest_k(int64_t k, int64_t num_tags) {
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(num_tags * k <= std::numeric_limits<int32_t>::max(),
                    "crf_kbest_viterbi: backpointers are int32 (tag * k + rank), so num_tags * k must be at most ",
                    std::numeric_limits<int32_t>::max(), ", got ", num_tags, " * ", k);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor mask_or_ones(const c10::optional<at::Tensor>& mask, const at::Tensor& emissions) {
  if (mask.has_value() && mask->defined()) return *mask;
  return at::ones({emissions.size(0), emissions.size(1)}, emissions.options().dtype(at::kBool));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_forward(const at::Tensor& emissions,
                                                                       const at::Tensor& tags, const at::Tensor& mask,
                                                                       const at::Tensor& transitions,
                                                                       const at::Tensor& start, const at::Tensor& end,
                                                                       bool save_for_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedloss::crf_log_likelihood_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(emissions, tags, mask, transitions, start, end, save_for_backward);
}

class CrfLogLikelihoodFunction : public torch::autograd::Function<CrfLogLikelihoodFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& emissions, const at::Tensor& tags,
                            const at::Tensor& mask, const at::Tensor& transitions, const at::Tensor& start,
                            const at::Tensor& end) {
    auto [log_likelihood, log_partition, alpha, offsets] =
        crf_forward(emissions, tags, mask, transitions, start, end, /*save_for_backward=*/true);
    ctx->save_for_backward({emissions, tags, mask, transitions, start, end, log_partition, alpha, offsets});
    return log_likelihood;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fusedloss::crf_log_likelihood_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&)>();
    const variable_list saved = ctx->get_saved_variables();
    if (!grad_outputs[0].defined()) return variable_list(6);
    auto [grad_emissions, grad_transitions, grad_start, grad_end] = op.call(
        grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8]);
    return {grad_emissions, at::Tensor(), at::Tensor(), grad_transitions, grad_start, grad_end};
  }
};

at::Tensor crf_log_likelihood_autograd(const at::Tensor& emissions, const at::Tensor& tags,
                                       const c10::optional<at::Tensor>& mask_arg, const at::Tensor& transitions,
                                       const at::Tensor& start, const at::Tensor& end) {
  const at::Tensor* mask_ptr = mask_arg.has_value() && mask_arg->defined() ? &*mask_arg : nullptr;
  check_crf_args(emissions, &tags, mask_ptr, transitions, start, end);
  const at::Tensor mask = mask_or_ones(mask_arg, emissions);
  const bool needs_grad = at::GradMode::is_enabled() && (emissions.requires_grad() || transitions.requires_grad() ||
                                                         start.requires_grad() || end.requires_grad());
  if (needs_grad) return CrfLogLikelihoodFunction::apply(emissions, tags, mask, transitions, start, end);
  return std::get<0>(crf_forward(emissions, tags, mask, transitions, start, end, false));
}

// Below autograd (inference_mode, or a redispatch): nothing kept for backward.
at::Tensor crf_log_likelihood_no_grad(const at::Tensor& emissions, const at::Tensor& tags,
                                      const c10::optional<at::Tensor>& mask_arg, const at::Tensor& transitions,
                                      const at::Tensor& start, const at::Tensor& end) {
  const at::Tensor* mask_ptr = mask_arg.has_value() && mask_arg->defined() ? &*mask_arg : nullptr;
  check_crf_args(emissions, &tags, mask_ptr, transitions, start, end);
  return std::get<0>(crf_forward(emissions, tags, mask_or_ones(mask_arg, emissions), transitions, start, end, false));
}

using SavedList = std::vector<at::Tensor>;
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, SavedList> partial_forward(const at::Tensor& emissions, const at::Tensor& allowed,
                                                  const at::Tensor& mask, const at::Tensor& transitions,
                                                  const at::Tensor& start, const at::Tensor& end,
                                                  bool save_for_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedloss::crf_partial_log_likelihood_forward", "")
                       .typed<std::tuple<at::Tensor, SavedList>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(emissions, allowed, mask, transitions, start, end, save_for_backward);
}

std::tuple<at::Tensor, SavedList> log_partition_forward(const at::Tensor& emissions, const at::Tensor& mask,
                                                        const at::Tensor& transitions, const at::Tensor& start,
                                                        const at::Tensor& end, bool save_for_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedloss::crf_log_partition_forward", "")
                       .typed<std::tuple<at::Tensor, SavedList>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(emissions, mask, transitions, start, end, save_for_backward);
}

// Saved variables: the op's six (partial) or five (log partition) tensor inputs, then the device's list.
class CrfPartialFunction : public torch::autograd::Function<CrfPartialFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& emissions, const at::Tensor& allowed,
                            const at::Tensor& mask, const at::Tensor& transitions, const at::Tensor& start,
                            const at::Tensor& end) {
    auto [value, saved] = partial_forward(emissions, allowed, mask, transitions, start, end, true);
    variable_list to_save = {emissions, allowed, mask, transitions, start, end};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    return value;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fusedloss::crf_partial_log_likelihood_backward", "")
                         .typed<Gradients(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList)>();
    const variable_list saved = ctx->get_saved_variables();
    if (!grad_outputs[0].defined()) return variable_list(6);
    const SavedList device_saved(saved.begin() + 6, saved.end());
    auto [grad_emissions, grad_transitions, grad_start, grad_end] =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], device_saved);
    return {grad_emissions, at::Tensor(), at::Tensor(), grad_transitions, grad_start, grad_end};
  }
};

class CrfLogPartitionFunction : public torch::autograd::Function<CrfLogPartitionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& emissions, const at::Tensor& mask,
                            const at::Tensor& transitions, const at::Tensor& start, const at::Tensor& end) {
    auto [value, saved] = log_partition_forward(emissions, mask, transitions, start, end, true);
    variable_list to_save = {emissions, mask, transitions, start, end};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    return value;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fusedloss::crf_log_partition_backward", "")
                         .typed<Gradients(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, at::TensorList)>();
    const variable_list saved = ctx->get_saved_variables();
    if (!grad_outputs[0].defined()) return variable_list(5);
    const SavedList device_saved(saved.begin() + 5, saved.end());
    auto [grad_emissions, grad_transitions, grad_start, grad_end] =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], device_saved);
    return {grad_emissions, at::Tensor(), grad_transitions, grad_start, grad_end};
  }
};

bool any_requires_grad(const at::Tensor& emissions, const at::Tensor& transitions, const at::Tensor& start,
                       const at::Tensor& end) {
  return at::GradMode::is_enabled() && (emissions.requires_grad() || transitions.requires_grad() ||
                                        start.requires_grad() || end.requires_grad());
}

const at::Tensor* mask_pointer(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? &*mask : nullptr;
}

at::Tensor crf_partial_log_likelihood_autograd(const at::Tensor& emissions, const at::Tensor& allowed,
                                               const c10::optional<at::Tensor>& mask_arg,
                                               const at::Tensor& transitions, const at::Tensor& start,
                                               const at::Tensor& end) {
  check_crf_args(emissions, nullptr, mask_pointer(mask_arg), transitions, start, end);
  check_crf_allowed(emissions, allowed, mask_pointer(mask_arg));
  const at::Tensor mask = mask_or_ones(mask_arg, emissions);
  if (any_requires_grad(emissions, transitions, start, end)) {
    return CrfPartialFunction::apply(emissions, allowed, mask, transitions, start, end);
  }
  return std::get<0>(partial_forward(emissions, allowed, mask, transitions, start, end, false));
}

at::Tensor crf_partial_log_likelihood_no_grad(const at::Tensor& emissions, const at::Tensor& allowed,
                                              const c10::optional<at::Tensor>& mask_arg,
                                              const at::Tensor& transitions, const at::Tensor& start,
                                              const at::Tensor& end) {
  check_crf_args(emissions, nullptr, mask_pointer(mask_arg), transitions, start, end);
  check_crf_allowed(emissions, allowed, mask_pointer(mask_arg));
  return std::get<0>(
      partial_forward(emissions, allowed, mask_or_ones(mask_arg, emissions), transitions, start, end, false));
}

at::Tensor crf_log_partition_autograd(const at::Tensor& emissions, const c10::optional<at::Tensor>& mask_arg,
                                      const at::Tensor& transitions, const at::Tensor& start, const at::Tensor& end) {
  check_crf_args(emissions, nullptr, mask_pointer(mask_arg), transitions, start, end);
  const at::Tensor mask = mask_or_ones(mask_arg, emissions);
  if (any_requires_grad(emissions, transitions, start, end)) {
    return CrfLogPartitionFunction::apply(emissions, mask, transitions, start, end);
  }
  return std::get<0>(log_partition_forward(emissions, mask, transitions, start, end, false));
}

at::Tensor crf_log_partition_no_grad(const at::Tensor& emissions, const c10::optional<at::Tensor>& mask_arg,
                                     const at::Tensor& transitions, const at::Tensor& start, const at::Tensor& end) {
  check_crf_args(emissions, nullptr, mask_pointer(mask_arg), transitions, start, end);
  return std::get<0>(log_partition_forward(emissions, mask_or_ones(mask_arg, emissions), transitions, start, end,
                                           false));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("crf_log_likelihood", &crf_log_likelihood_autograd);
  m.impl("crf_partial_log_likelihood", &crf_partial_log_likelihood_autograd);
  m.impl("crf_log_partition", &crf_log_partition_autograd);
  // Not differentiable by themselves (the device kernels of crf_log_likelihood; Viterbi paths; marginals).
  for (const char* name : {"crf_log_likelihood_forward", "crf_log_likelihood_backward", "crf_viterbi",
                           "crf_marginals", "crf_partial_log_likelihood_forward",
                           "crf_partial_log_likelihood_backward", "crf_log_partition_forward",
                           "crf_log_partition_backward", "crf_kbest_viterbi"}) {
    m.impl(name, torch::CppFunction::makeFallthrough());
  }
}
TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("crf_log_likelihood", &crf_log_likelihood_no_grad);
  m.impl("crf_partial_log_likelihood", &crf_partial_log_likelihood_no_grad);
  m.impl("crf_log_partition", &crf_log_partition_no_grad);
}
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("crf_log_likelihood", &crf_log_likelihood_no_grad);
  m.impl("crf_partial_log_likelihood", &crf_partial_log_likelihood_no_grad);
  m.impl("crf_log_partition", &crf_log_partition_no_grad);
}

}  // namespace fusedloss
