"""Fused linear + cross entropy on the Triton backend (docs/linear.rst; op contract in docs/BACKENDS.md
``linear_cross_entropy``).

The chunk loop of ``csrc/linear_cross_entropy_ops.cpp`` around torch matmuls, with the in-place Triton row kernel
of :mod:`fusedloss.triton_kernels.softmax_loss`. Per chunk of rows::

    logits = x_chunk @ W.T (+ b)                  one reused (chunk, V) buffer
    loss, dlogits = row kernel                    gradient written over the logits
    grad_input[chunk] = (dlogits @ W) * f         f: d(loss)/d(l_n) per row
    grad_weight += dlogits.T @ (x_chunk * f)      float32 accumulator (bf16/fp16 input too)
    grad_bias   += dlogits.T @ f

``f_n`` is ``t_n / divisor`` for "mean" (``t`` the token weights, 0 on ignored rows; divisor ``Σ_n t_n w_{y_n}``)
and ``t_n`` for "sum": known in the forward pass, which therefore computes the gradients (backward multiplies
them by ``grad_output``). For "none" only backward knows ``f_n = grad_output[n] t_n``: it runs the chunks again.
The loop is registered as ``torch.library`` custom ops with their autograd, so ``torch.compile`` sees one op.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedloss._chunking import add_product, reduce_rows, reduction_factors
from fusedloss.reference.softmax import kept_weights_and_divisor
from fusedloss.triton_kernels.softmax_loss import softmax_loss_forward, softmax_loss_reasons


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_weights(target: torch.Tensor, num_rows: int, weight: Optional[torch.Tensor], ignore_index: int,
                 token_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, divisor)`` in float64: the token weights (ones when None), 0 on ignored rows, and the mean's divisor
    ``Σ_n t_n w_{y_n}`` (``Σ_n t_n`` without class weights or for soft targets). No host synchronization."""
    t = (token_weight.to(torch.float64) if token_weight is not None
         else torch.ones(num_rows, dtype=torch.float64, device=target.device))
    return kept_weights_and_divisor(t, target, weight, ignore_index)


def run_chunks(
    x: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    chunk_size: int,
    factors: Optional[torch.Tensor],
    want: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Runs every chunk; returns ``(row losses (N,) in the accumulation dtype, grad_input, grad_weight,
    grad_bias)`` for the loss ``Σ_n factors_n l_n`` (gradients None when not wanted or ``factors`` is None)."""
    num_rows = x.shape[0]
    num_classes = linear_weight.shape[0]
    acc = _accumulation_dtype(x.dtype)
    losses = torch.empty(num_rows, dtype=acc, device=x.device)
    want_grad = factors is not None
    grad_input = torch.empty_like(x) if want_grad and want[0] else None
    grad_weight = torch.zeros(linear_weight.shape, dtype=acc, device=x.device) if want_grad and want[1] else None
    grad_bias = (torch.zeros(num_classes, dtype=acc, device=x.device)
                 if want_grad and want[2] and linear_bias is not None else None)
    rows = max(1, min(chunk_size, num_rows))
    buffer = torch.empty(rows, num_classes, dtype=x.dtype, device=x.device) if num_rows else None
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        logits = buffer[: end - start]
        x_chunk = x[start:end]
        if linear_bias is not None:
            torch.addmm(linear_bias, x_chunk, linear_weight.t(), out=logits)
        else:
            torch.mm(x_chunk, linear_weight.t(), out=logits)
        losses[start:end] = softmax_loss_forward(
            logits, target[start:end], weight, ignore_index, "none", label_smoothing, focal_gamma, z_loss, softcap,
            False, logits if want_grad else None,
        )
        if not want_grad:
            continue
        f = factors[start:end, None]
        if grad_input is not None:
            torch.mm(logits, linear_weight, out=grad_input[start:end])
            grad_input[start:end] *= f
        if grad_weight is not None:
            add_product(grad_weight, logits.t(), x_chunk.to(acc) * f)
        if grad_bias is not None:
            grad_bias.addmv_(logits.t().to(acc), f[:, 0])
    return losses, grad_input, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("fusedloss::triton_linear_cross_entropy", mutates_args=())
def _forward_op(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    token_weight: Optional[torch.Tensor],
    chunk_size: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_input, grad_weight, grad_bias)``; the gradients (of the loss itself, for "mean" and "sum")
    are empty when not asked for. Weight and bias gradients are in the accumulation dtype."""
    x = input.contiguous()
    acc = _accumulation_dtype(x.dtype)
    t, divisor = _row_weights(target, x.shape[0], weight, ignore_index, token_weight)
    want = (grad_input, grad_weight, grad_bias)
    factors = reduction_factors(t, divisor, reduction, acc) if any(want) else None
    losses, gx, gw, gb = run_chunks(x, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
                                    focal_gamma, z_loss, softcap, chunk_size, factors, want)
    loss = reduce_rows(losses, t, divisor, reduction, x.dtype)
    return (loss, _empty(x) if gx is None else gx, _empty(x) if gw is None else gw,
            _empty(x) if gb is None else gb)


@_forward_op.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, focal_gamma,
      z_loss, softcap, token_weight, chunk_size, grad_input, grad_weight, grad_bias):
    acc = _accumulation_dtype(input.dtype)
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    gx = input.new_empty(input.shape) if grad_input else input.new_empty(0)
    gw = input.new_empty(linear_weight.shape, dtype=acc) if grad_weight else input.new_empty(0)
    gb = input.new_empty((linear_weight.shape[0],), dtype=acc) if grad_bias and linear_bias is not None \
        else input.new_empty(0)
    return loss, gx, gw, gb


@torch.library.custom_op("fusedloss::triton_linear_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    token_weight: Optional[torch.Tensor],
    chunk_size: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients for reduction "none": the chunks again, with ``f_n = grad_loss[n] t_n``."""
    x = input.contiguous()
    acc = _accumulation_dtype(x.dtype)
    t, _ = _row_weights(target, x.shape[0], weight, ignore_index, token_weight)
    factors = (grad_loss.reshape(-1).to(torch.float64) * t).to(acc)
    _, gx, gw, gb = run_chunks(x, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
                               focal_gamma, z_loss, softcap, chunk_size, factors, (grad_input, grad_weight, grad_bias))
    return (_empty(x) if gx is None else gx, _empty(x) if gw is None else gw.to(linear_weight.dtype),
            _empty(x) if gb is None else gb.to(linear_weight.dtype))


@_backward_op.register_fake
def _(grad_loss, input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, focal_gamma,
      z_loss, softcap, token_weight, chunk_size, grad_input, grad_weight, grad_bias):
    gx = input.new_empty(input.shape) if grad_input else input.new_empty(0)
    gw = linear_weight.new_empty(linear_weight.shape) if grad_weight else input.new_empty(0)
    gb = linear_weight.new_empty((linear_weight.shape[0],)) if grad_bias and linear_bias is not None \
        else input.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, focal_gamma,
     z_loss, softcap, token_weight, chunk_size, *_) = inputs
    ctx.none = reduction == "none"
    ctx.weight_dtype = linear_weight.dtype
    ctx.options = (ignore_index, label_smoothing, focal_gamma, z_loss, softcap)
    ctx.chunk_size = chunk_size
    ctx.has_bias = linear_bias is not None
    ctx.mark_non_differentiable(*output[1:])
    if ctx.none:
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, token_weight)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    grads = [None] * 16
    if ctx.none:
        input, linear_weight, target, linear_bias, weight, token_weight = ctx.saved_tensors
        gx, gw, gb = torch.ops.fusedloss.triton_linear_cross_entropy_backward(
            grad_loss, input, linear_weight, target, linear_bias, weight, *ctx.options, token_weight, ctx.chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3],
        )
    else:
        gx, gw, gb = (g * grad_loss if g.numel() else g for g in ctx.saved_tensors)
        gw, gb = gw.to(ctx.weight_dtype), gb.to(ctx.weight_dtype)
    grads[0] = gx if ctx.needs_input_grad[0] else None
    grads[1] = gw if ctx.needs_input_grad[1] else None
    grads[3] = gb if ctx.has_bias and ctx.needs_input_grad[3] else None
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The op of docs/BACKENDS.md
# ----------------------------------------------------------------------------------------------


def linear_cross_entropy_reasons(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    token_weight: Optional[torch.Tensor],
    chunk_size: int,
) -> list[str]:
    """Why this backend cannot serve the call: those of its row kernel (the logits have input's dtype)."""
    return softmax_loss_reasons(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                z_loss, softcap, False, False)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    token_weight: Optional[torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """Loss of ``input (N, H) @ linear_weight.T (+ linear_bias)`` against ``target`` without the ``(N, V)`` logits;
    ``(N,)`` for ``reduction="none"``, else a scalar, in input's dtype (see the module docstring)."""
    grad_on = torch.is_grad_enabled() and reduction != "none"
    loss, *_ = torch.ops.fusedloss.triton_linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, focal_gamma,
        z_loss, softcap, token_weight, chunk_size, grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad, grad_on and linear_bias is not None and linear_bias.requires_grad,
    )
    return loss
