"""``softmax_loss`` on the ``fusedloss._C`` extension: the ``cpp`` backend (CPU kernel) and the ``cuda``
backend (CUDA kernel), chosen by the torch dispatcher from the tensors' device.

The op ``fusedloss::softmax_loss`` (csrc/softmax_loss_ops.cpp) checks its arguments, flattens ``(*, C)`` to rows
and runs the device kernel ``fusedloss::softmax_loss_forward``, which returns the loss and, in the same pass over
each row, the gradient ``dL/dinput`` (already divided by the mean's divisor) in ``input``'s dtype. Its autograd
is registered in C++: backward multiplies that gradient by ``grad_output`` (a scalar, or one value per row for
``reduction="none"``) in place, or returns it as it is when ``grad_output`` is 1. Forward plus backward allocate
one ``(N, C)`` tensor in the input dtype, none with ``inplace_backward=True`` (the gradient is written over
``input``'s storage, whose autograd version is then bumped so that an op that saved it raises), and none
without a gradient to compute (no_grad, inference_mode, an input that does not require grad). The math is in
``csrc/kernels/softmax_loss.h``.

Only the fake (meta) kernels are registered here, for ``torch.compile``; under the compiler
``inplace_backward`` is ignored (a compiled graph may reuse ``input``) and backward scales out of place.
"""

from __future__ import annotations

from typing import List, Optional

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)

# The op checks every argument itself, with the messages of fusedloss._validation.
CHECKS_ARGUMENTS = True

@torch.library.register_fake("fusedloss::softmax_loss")
def _softmax_loss_fake(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss,
                       softcap, mean_by_count, inplace_backward):
    return input.new_empty(input.shape[:-1] if reduction == "none" else ())


@torch.library.register_fake("fusedloss::softmax_loss_forward")
def _softmax_loss_forward_fake(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                               z_loss, softcap, mean_by_count, compute_grad, inplace_backward):
    loss = input.new_empty((input.shape[0],)) if reduction == "none" else input.new_empty(())
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty((0,))
    return loss, grad


# The op of docs/BACKENDS.md is the C++ op itself (no Python frame between the public function and it):
# softmax_loss(input (*, C), target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
# mean_by_count, inplace_backward) -> loss of input.shape[:-1] (reduction "none") or a scalar, in input's dtype,
# computed in float32 (float64 for float64 input). Per row, with s = softcap·tanh(x/softcap) (or x),
# p = softmax(s), q = (1 − ε)·onehot(y) + ε/C (or the smoothed probabilities) and w the class weights:
# l = −Σ_c q_c w_c (1 − p_c)^γ log p_c + z_loss·logsumexp(s)². inplace_backward=True writes the gradient over
# input's storage.
softmax_loss = torch.ops.fusedloss.softmax_loss.default
# The same op through the dispatcher's unboxed entry (fusedloss._C.softmax_loss): no IValue boxing of the
# arguments, for plain tensors outside torch.compile and torch function modes (fusedloss._dispatch.unboxed).
softmax_loss_unboxed = fusedloss._C.softmax_loss


def softmax_loss_reasons(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    mean_by_count: bool,
    inplace_backward: bool,
) -> List[str]:
    """Why the extension's kernel cannot serve this call (empty when it can). Bad arguments are not reasons:
    the op raises for them."""
    reasons = []
    if target.is_floating_point() and target.requires_grad:
        reasons.append("computes no gradient for soft targets (target requires grad)")
    if weight is not None and weight.requires_grad:
        reasons.append("computes no gradient for weight (weight requires grad)")
    return reasons
