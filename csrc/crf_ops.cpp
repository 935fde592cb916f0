// Schemas of the linear-chain CRF ops of fusedloss._C (docs/BACKENDS.md, crf_*). Kernels are registered
// per device in csrc/cpu/crf.cpp and csrc/cuda/crf_binding.cpp; the autograd and fake (meta)
// registrations are in python/fusedloss/_ext/crf.py. Arguments are batch first and already validated:
// emissions (B, T, K), tags (B, T) int64 in [0, K), mask (B, T) bool, left-aligned with mask[:, 0] true,
// transitions (K, K), start_transitions and end_transitions (K,).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // Per-sequence log-likelihood score(tags) - log Z, (B,), in promote_types(emissions, transitions).
  // Also returns log Z (B,) in float64 and, when save_for_backward, the normalized forward variables
  // alpha (B, T, K) in the compute dtype (float32, or float64 when either input is float64) with their
  // per-step offsets (B, T) in float64 (alpha_t = alpha[:, t] + offsets[:, t]; entries past a sequence's end
  // are not written); without save_for_backward both are empty.
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
}
