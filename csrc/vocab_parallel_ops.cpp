// Ops of the local work of the vocabulary-parallel losses (python/fusedloss/distributed.py). The math is
// in csrc/kernels/vocab_parallel.h, the CPU kernels in csrc/cpu/vocab_parallel.cpp. The Python layer checks and
// prepares every argument; these ops are not differentiable themselves (the autograd.Function of
// fusedloss.distributed calls them in its forward and backward).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // logits (N, C_r) of one shard -> per row (max, sum of exp relative to it, sum of (max - s)) in the compute
  // dtype (float32; float64 for float64 logits), s the soft-capped logits.
  m.def("vocab_parallel_row_stats(Tensor logits, float? softcap) -> (Tensor, Tensor, Tensor)");
  // The gradient of the shard (N, C_r) in the compute dtype, written into out: lse, coefficient (A + 2 z lse),
  // target_coef and scale are (N,) in the compute dtype, local_target (N,) int64 (-1: not in this shard),
  // weight_shard (C_r,) in the compute dtype or None.
  m.def(
      "vocab_parallel_shard_grad(Tensor logits, Tensor lse, Tensor coefficient, Tensor target_coef, "
      "Tensor local_target, Tensor scale, float smoothing_per_class, Tensor? weight_shard, float? softcap, "
      "Tensor(a!) out) -> ()");
}
