// The distillation row op of fusedloss._C (docs/BACKENDS.md, distillation_loss): its schema. The CPU kernel is
// in csrc/cpu/distillation.cpp (math in csrc/kernels/distillation.h) and checks the arguments
// (csrc/distillation_checks.h); the fake kernel, the reductions, the chunk loop of the linear form and the autograd (torch.library custom ops, shared with the
// Triton backend) are in python/fusedloss/_ext/distillation.py and python/fusedloss/_distillation_ops.py.
#include <torch/library.h>

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
}

// Not differentiable by itself (the custom ops around it carry the autograd): autograd falls through to the
// device kernel, which checks the arguments (csrc/distillation_checks.h).
TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("distillation_rows", torch::CppFunction::makeFallthrough());
}
