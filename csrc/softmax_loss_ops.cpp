// Schemas of the softmax-loss ops of fusedloss._C (docs/BACKENDS.md, softmax_loss). Kernels are
// registered per device in csrc/cpu/softmax_loss.cpp and csrc/cuda/softmax_loss_binding.cpp; the
// autograd and fake (meta) registrations are in python/fusedloss/_ext/softmax_loss.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // Loss of input (N, C) against target (int64 (N,) indices or float (N, C) probabilities) and,
  // when compute_grad, the gradient of that loss with respect to input, already divided by the
  // mean's divisor (reduction "mean"), in input's dtype; backward only multiplies it by grad_output.
  // Without compute_grad the second output is empty. With inplace_backward the gradient is written
  // over input's storage (the second output shares it).
  m.def(
      "softmax_loss_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, str reduction, "
      "float label_smoothing, float focal_gamma, float z_loss, float? softcap, bool mean_by_count, "
      "bool compute_grad, bool inplace_backward) -> (Tensor, Tensor)");
}
