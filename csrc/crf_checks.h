// Argument checks of the CRF ops (defined in csrc/crf_ops.cpp), shared by the op that checks before
// dispatching (crf_log_likelihood) and the device kernels of the ops that are called directly
// (crf_viterbi, crf_marginals, crf_kbest_viterbi). Bad input gets a ValueError (TypeError for a wrong type) that names the
// argument, what was expected and what came. tags and mask may be
// null (not an argument of that op / all on); the mask's values are read on CPU tensors only.
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedloss {

void check_crf_args(const at::Tensor& emissions, const at::Tensor* tags, const at::Tensor* mask,
                    const at::Tensor& transitions, const at::Tensor& start_transitions,
                    const at::Tensor& end_transitions);

// allowed (B, T, K) bool of the partial-label ops, on emissions' device; on CPU tensors (not traced) every
// unmasked position (mask may be null: all on) must allow at least one tag. Call after check_crf_args.
void check_crf_allowed(const at::Tensor& emissions, const at::Tensor& allowed, const at::Tensor* mask);

// k of crf_kbest_viterbi: k >= 1, and num_tags * k within the int32 backpointers (tag * k + rank).
void check_kbest_k(int64_t k, int64_t num_tags);

}  // namespace fusedloss
