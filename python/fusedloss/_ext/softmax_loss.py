"""``softmax_loss`` on the ``fusedloss._C`` extension: the ``cpp`` backend (CPU kernel) and the ``cuda``
backend (CUDA kernel), chosen by the torch dispatcher from the tensors' device.

The C++ op ``fusedloss::softmax_loss_forward`` returns the loss and, in the same pass over each row, the
gradient ``dL/dinput`` (already divided by the mean's divisor), in ``input``'s dtype. Backward multiplies that
gradient by ``grad_output`` (a scalar, or one value per row for ``reduction="none"``) in place: forward plus
backward allocate one ``(N, C)`` tensor in the input dtype, and none with ``inplace_backward=True``, where the
gradient is written over ``input``'s storage. The math is in ``csrc/kernels/softmax_loss.h``.

Registered with ``torch.library`` (a fake kernel for shapes and an autograd formula), so
``torch.compile(fullgraph=True)`` traces through it; under the compiler ``inplace_backward`` is ignored
(a compiled graph may reuse ``input``) and backward scales out of place.
"""

from __future__ import annotations

from typing import List, Optional

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OP = "fusedloss::softmax_loss_forward"


@torch.library.register_fake(_OP)
def _softmax_loss_forward_fake(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                               z_loss, softcap, mean_by_count, compute_grad, inplace_backward):
    loss = input.new_empty((input.shape[0],)) if reduction == "none" else input.new_empty(())
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[4]
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The gradient output gets no incoming gradient; without this autograd would allocate an (N, C) zero one.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * 12
    scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
    if torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor:
        # Traced (torch.compile, or fake tensors): functional, and no data-dependent branch.
        grad_input = grad * scale
    elif ctx.reduction != "none" and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        # The usual loss.backward(): the stored gradient is the answer (checking costs nothing on the CPU).
        grad_input = grad
    else:
        # In place: no second (N, C) buffer. The saved tensor's version changes, so a second backward
        # through this graph (retain_graph=True) raises instead of scaling twice.
        grad_input = grad.mul_(scale)
    return (grad_input,) + (None,) * 11


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def softmax_loss(
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
) -> torch.Tensor:
    """Fused softmax loss of ``input (N, C)`` against ``target`` (int64 ``(N,)`` or float ``(N, C)``).

    Per row, with ``s = softcap·tanh(x/softcap)`` (or ``x``), ``p = softmax(s)``, ``q = (1 − ε)·onehot(y) + ε/C``
    (or the smoothed probabilities) and ``w`` the class weights:
    ``l = −Σ_c q_c w_c (1 − p_c)^γ log p_c + z_loss·logsumexp(s)²``; reductions as docs/BACKENDS.md.
    Returns ``(N,)`` (reduction ``"none"``) or a scalar, in ``input``'s dtype, computed in float32 (float64 for
    float64 input). ``inplace_backward=True`` writes the gradient over ``input``'s storage: its contents are
    gone after this call, and its autograd version is bumped so that an op that saved it for backward raises.
    """
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    compiling = torch.compiler.is_compiling()
    inplace = bool(inplace_backward) and compute_grad and not compiling
    loss, _ = torch.ops.fusedloss.softmax_loss_forward(
        input, target, weight, int(ignore_index), reduction, float(label_smoothing), float(focal_gamma),
        float(z_loss), None if softcap is None else float(softcap), bool(mean_by_count), compute_grad, inplace,
    )
    if inplace and input.is_contiguous():
        torch.autograd.graph.increment_version(input)
    return loss


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
    """Why the extension's kernel cannot serve this call (empty when it can)."""
    reasons = []
    if input.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"input dtype {input.dtype} is not float16, bfloat16, float32 or float64")
    if input.dim() != 2:
        reasons.append(f"input must be (N, C), got shape {tuple(input.shape)}")
    if target.is_floating_point() and target.requires_grad:
        reasons.append("computes no gradient for soft targets (target requires grad)")
    if weight is not None and weight.requires_grad:
        reasons.append("computes no gradient for weight (weight requires grad)")
    if reduction not in ("none", "mean", "sum"):
        reasons.append(f"reduction must be none, mean or sum, got {reduction!r}")
    return reasons
