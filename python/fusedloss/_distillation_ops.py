"""The fused distillation losses around a backend's row kernel (docs/distillation.rst; op contract in
docs/BACKENDS.md, ``distillation_loss`` and ``linear_distillation_loss``).

A fused backend (cpp, triton) provides one row kernel::

    rows(student (N, V), teacher (N, V), factors (N,), beta, temperature, grad) -> losses (N,)

which returns each row's divergence in the accumulation dtype (float32, float64 for float64 input) and, when
``grad`` is a tensor, writes ``factors[n] · dl_n/dz_S[n]`` into it (``grad`` may be ``student`` itself: the kernel
reads a row's logits before it writes its gradient). Rows whose factor is exactly 0 get loss 0 and gradient 0 (the
ignored rows; the kernel may skip them). The teacher is read in its own dtype and never differentiated.

:func:`make_backend` builds, around that kernel, the two ops of docs/BACKENDS.md as ``torch.library`` custom ops
with fake kernels and autograd (``torch.compile(fullgraph=True)`` sees one op each); the cpp backend takes only the
linear one, its ``distillation_loss`` being a C++ op with C++ autograd (csrc/distillation_ops.cpp) that follows the
same rules:

- ``distillation_loss``: the gradient is computed in the forward pass, already multiplied by ``d(loss)/d(l_n)``
  (``t_n / Σ t`` for "mean", ``t_n`` for "sum" and "none"); backward multiplies it by ``grad_output`` (a scalar, or
  per row) in place (:func:`scale_saved_grad`), so that a second backward through the same graph raises instead of
  giving another number.
- ``linear_distillation_loss``: the chunk loop of the fused linear head. Per chunk of rows, the student's logits
  ``x_S W_Sᵀ (+ b_S)`` and the teacher's ``x_T W_Tᵀ (+ b_T)`` go into one reused ``(chunk, V)`` buffer each, the
  row kernel writes the student's gradient over its buffer, and that gradient is folded into ``grad_input`` and
  the float32 (float64) accumulators of ``grad_weight`` and ``grad_bias``. For "mean" and "sum" the gradients are
  computed in forward (backward scales them by ``grad_output``, in place as above); for "none" backward runs the
  chunks again with ``f_n = grad_output[n] t_n``. The teacher's head gets no gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fusedloss._chunking import add_product, reduce_rows, reduction_factors


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_weights(target: Optional[torch.Tensor], token_weight: Optional[torch.Tensor], num_rows: int,
                ignore_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, Σ t)`` in float64: the token weights (ones when None), 0 on rows whose target is ``ignore_index``, and
    the divisor of "mean". No host synchronization."""
    t = (token_weight.detach().to(torch.float64) if token_weight is not None
         else torch.ones(num_rows, dtype=torch.float64, device=device))
    if target is not None:
        t = torch.where(target != ignore_index, t, torch.zeros_like(t))
    return t, t.sum()


def _kept_factors(target, token_weight, num_rows, ignore_index, device, reduction, acc):
    t, divisor = row_weights(target, token_weight, num_rows, ignore_index, device)
    return t, divisor, reduction_factors(t, divisor, reduction, acc)


def _traced(*tensors: torch.Tensor) -> bool:
    """Whether a tracer sees these tensors, so their values cannot be read and nothing may be done in place (the
    C++ ops' rule, csrc/op_utils.h): torch.compile's Dynamo, or a dispatch mode or fake tensors, which is how
    AOTAutograd traces a backward (on torch 2.5 ``is_compiling()`` is False there)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in tensors)


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad · grad_output`` for a gradient saved by the forward pass, without a second gradient-sized buffer in
    eager mode: the usual ``loss.backward()`` passes the scalar 1 and gets the saved tensor itself; another
    ``grad_output`` scales it in place. Either way its version counter moves, so that a second backward through the
    same graph (``retain_graph=True``) raises ("modified by an inplace operation") instead of returning a tensor
    that ``.grad`` already holds or scaling it twice. Out of place while ``torch.compile`` traces or when a
    gradient of the gradient is wanted."""
    if _traced(grad, grad_output) or grad_output.requires_grad or grad.requires_grad:
        return grad * grad_output
    if grad_output.dim() == 0 and grad_output.device.type == "cpu" and float(grad_output) == 1.0:
        torch.autograd.graph.increment_version(grad)
        return grad
    return grad.mul_(grad_output)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def make_backend(prefix: str, rows: Callable, logits_op: bool = True) -> tuple[Optional[Callable], Callable]:
    """Registers ``fusedloss::<prefix>_distillation_loss`` (unless ``logits_op`` is False: the cpp backend has that op
    in C++) and ``fusedloss::<prefix>_linear_distillation_loss`` (with their fake kernels and autograd) around the
    row kernel ``rows``; returns the two ops of docs/BACKENDS.md (None for the first without ``logits_op``)."""
    linear = _make_linear(prefix, rows)
    return (_make_logits(prefix, rows) if logits_op else None), linear


def _make_logits(prefix: str, rows: Callable) -> Callable:
    """``distillation_loss`` as the custom op ``fusedloss::<prefix>_distillation_loss``."""

    @torch.library.custom_op(f"fusedloss::{prefix}_distillation_loss", mutates_args=())
    def loss_op(
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: Optional[torch.Tensor],
        token_weight: Optional[torch.Tensor],
        beta: float,
        temperature: float,
        ignore_index: int,
        reduction: str,
        compute_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, gradient of the loss with respect to student or an empty tensor)``."""
        student = student.contiguous()
        teacher = teacher.contiguous()
        acc = accumulation_dtype(student.dtype)
        t, divisor, factors = _kept_factors(target, token_weight, student.shape[0], ignore_index, student.device,
                                            reduction, acc)
        grad = torch.empty_like(student) if compute_grad else None
        losses = rows(student, teacher, factors, beta, temperature, grad)
        loss = reduce_rows(losses, t, divisor, reduction, student.dtype)
        return loss, _empty(student) if grad is None else grad

    @loss_op.register_fake
    def _(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction, compute_grad):
        loss = student.new_empty((student.shape[0],) if reduction == "none" else ())
        grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
        return loss, grad

    def loss_setup_context(ctx, inputs, output):
        ctx.none = inputs[7] == "none"
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    def loss_backward(ctx, grad_loss, _unused):
        (grad,) = ctx.saved_tensors
        if not grad.numel() or not ctx.needs_input_grad[0]:
            return (None,) * 9
        return (scale_saved_grad(grad, grad_loss.reshape(-1, 1) if ctx.none else grad_loss),) + (None,) * 8

    loss_op.register_autograd(loss_backward, setup_context=loss_setup_context)

    def distillation_loss(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction):
        compute_grad = torch.is_grad_enabled() and student.requires_grad
        loss, _ = loss_op(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction,
                          compute_grad)
        return loss

    return distillation_loss


def _make_linear(prefix: str, rows: Callable) -> Callable:
    """``linear_distillation_loss`` as the custom op ``fusedloss::<prefix>_linear_distillation_loss`` (and its
    backward for "none")."""

    def run_chunks(x_s, w_s, b_s, x_t, w_t, b_t, beta, temperature, chunk_size, factors, want):
        """Every chunk; ``(row losses (N,) in the accumulation dtype, grad_input, grad_weight, grad_bias)`` of the
        loss ``Σ_n factors_n l_n`` (the gradients None when not wanted)."""
        num_rows, num_classes = x_s.shape[0], w_s.shape[0]
        acc = accumulation_dtype(x_s.dtype)
        want_grad = any(want)
        losses = torch.empty(num_rows, dtype=acc, device=x_s.device)
        grad_input = torch.empty_like(x_s) if want[0] else None
        grad_weight = torch.zeros(w_s.shape, dtype=acc, device=x_s.device) if want[1] else None
        grad_bias = torch.zeros(num_classes, dtype=acc, device=x_s.device) if want[2] and b_s is not None else None
        step = max(1, min(chunk_size, num_rows))
        s_buffer = torch.empty(step, num_classes, dtype=x_s.dtype, device=x_s.device) if num_rows else None
        t_buffer = torch.empty(step, num_classes, dtype=x_t.dtype, device=x_t.device) if num_rows else None
        for start in range(0, num_rows, step):
            end = min(start + step, num_rows)
            s_logits, t_logits = s_buffer[: end - start], t_buffer[: end - start]
            xs_chunk = x_s[start:end]
            if b_s is not None:
                torch.addmm(b_s, xs_chunk, w_s.t(), out=s_logits)
            else:
                torch.mm(xs_chunk, w_s.t(), out=s_logits)
            if b_t is not None:
                torch.addmm(b_t, x_t[start:end], w_t.t(), out=t_logits)
            else:
                torch.mm(x_t[start:end], w_t.t(), out=t_logits)
            losses[start:end] = rows(s_logits, t_logits, factors[start:end], beta, temperature,
                                     s_logits if want_grad else None)
            if not want_grad:
                continue
            if grad_input is not None:
                torch.mm(s_logits, w_s, out=grad_input[start:end])
            if grad_weight is not None:
                add_product(grad_weight, s_logits.t(), xs_chunk)
            if grad_bias is not None:
                grad_bias += s_logits.sum(0, dtype=acc)
        return losses, grad_input, grad_weight, grad_bias

    @torch.library.custom_op(f"fusedloss::{prefix}_linear_distillation_loss", mutates_args=())
    def linear_op(
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        target: Optional[torch.Tensor],
        student_bias: Optional[torch.Tensor],
        teacher_bias: Optional[torch.Tensor],
        token_weight: Optional[torch.Tensor],
        beta: float,
        temperature: float,
        ignore_index: int,
        reduction: str,
        chunk_size: int,
        grad_input: bool,
        grad_weight: bool,
        grad_bias: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, grad_input, grad_weight, grad_bias)``; the gradients (of the loss itself, for "mean" and "sum")
        are empty when not asked for; weight and bias gradients in the accumulation dtype."""
        x_s, x_t = student_input.contiguous(), teacher_input.contiguous()
        acc = accumulation_dtype(x_s.dtype)
        want = (grad_input, grad_weight, grad_bias)
        t, divisor, factors = _kept_factors(target, token_weight, x_s.shape[0], ignore_index, x_s.device,
                                            reduction, acc)
        losses, gx, gw, gb = run_chunks(x_s, student_weight, student_bias, x_t, teacher_weight, teacher_bias,
                                        beta, temperature, chunk_size, factors, want)
        loss = reduce_rows(losses, t, divisor, reduction, x_s.dtype)
        return (loss, _empty(x_s) if gx is None else gx, _empty(x_s) if gw is None else gw,
                _empty(x_s) if gb is None else gb)

    @linear_op.register_fake
    def _(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias,
          token_weight, beta, temperature, ignore_index, reduction, chunk_size, grad_input, grad_weight, grad_bias):
        acc = accumulation_dtype(student_input.dtype)
        x = student_input
        loss = x.new_empty((x.shape[0],) if reduction == "none" else ())
        gx = x.new_empty(x.shape) if grad_input else x.new_empty(0)
        gw = x.new_empty(student_weight.shape, dtype=acc) if grad_weight else x.new_empty(0)
        gb = (x.new_empty((student_weight.shape[0],), dtype=acc) if grad_bias and student_bias is not None
              else x.new_empty(0))
        return loss, gx, gw, gb

    @torch.library.custom_op(f"fusedloss::{prefix}_linear_distillation_loss_backward", mutates_args=())
    def linear_backward_op(
        grad_loss: torch.Tensor,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        target: Optional[torch.Tensor],
        student_bias: Optional[torch.Tensor],
        teacher_bias: Optional[torch.Tensor],
        token_weight: Optional[torch.Tensor],
        beta: float,
        temperature: float,
        ignore_index: int,
        chunk_size: int,
        grad_input: bool,
        grad_weight: bool,
        grad_bias: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradients for reduction "none": the chunks again, with ``f_n = grad_loss[n] t_n``."""
        x_s, x_t = student_input.contiguous(), teacher_input.contiguous()
        acc = accumulation_dtype(x_s.dtype)
        t, _ = row_weights(target, token_weight, x_s.shape[0], ignore_index, x_s.device)
        factors = (grad_loss.reshape(-1).to(torch.float64) * t).to(acc)
        _, gx, gw, gb = run_chunks(x_s, student_weight, student_bias, x_t, teacher_weight, teacher_bias, beta,
                                   temperature, chunk_size, factors, (grad_input, grad_weight, grad_bias))
        return (_empty(x_s) if gx is None else gx, _empty(x_s) if gw is None else gw.to(student_weight.dtype),
                _empty(x_s) if gb is None else gb.to(student_weight.dtype))

    @linear_backward_op.register_fake
    def _(grad_loss, student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
          teacher_bias, token_weight, beta, temperature, ignore_index, chunk_size, grad_input, grad_weight, grad_bias):
        x = student_input
        gx = x.new_empty(x.shape) if grad_input else x.new_empty(0)
        gw = student_weight.new_empty(student_weight.shape) if grad_weight else x.new_empty(0)
        gb = (student_weight.new_empty((student_weight.shape[0],)) if grad_bias and student_bias is not None
              else x.new_empty(0))
        return gx, gw, gb

    def linear_setup_context(ctx, inputs, output):
        (x_s, w_s, x_t, w_t, target, b_s, b_t, token_weight, beta, temperature, ignore_index, reduction,
         chunk_size, *_) = inputs
        ctx.none = reduction == "none"
        ctx.weight_dtype = w_s.dtype
        ctx.options = (beta, temperature, ignore_index, chunk_size)
        ctx.has_bias = b_s is not None
        ctx.mark_non_differentiable(*output[1:])
        if ctx.none:
            ctx.save_for_backward(x_s, w_s, x_t, w_t, target, b_s, b_t, token_weight)
        else:
            ctx.save_for_backward(*output[1:])

    def linear_backward(ctx, grad_loss, *_unused):
        grads = [None] * 16
        want_bias = ctx.has_bias and ctx.needs_input_grad[5]
        if ctx.none:
            x_s, w_s, x_t, w_t, target, b_s, b_t, token_weight = ctx.saved_tensors
            beta, temperature, ignore_index, chunk_size = ctx.options
            gx, gw, gb = linear_backward_op(grad_loss, x_s, w_s, x_t, w_t, target, b_s, b_t, token_weight, beta,
                                            temperature, ignore_index, chunk_size, ctx.needs_input_grad[0],
                                            ctx.needs_input_grad[1], want_bias)
        else:
            gx, gw, gb = (scale_saved_grad(g, grad_loss) if g.numel() else g for g in ctx.saved_tensors)
            gw, gb = gw.to(ctx.weight_dtype), gb.to(ctx.weight_dtype)
        grads[0] = gx if ctx.needs_input_grad[0] else None
        grads[1] = gw if ctx.needs_input_grad[1] else None
        grads[5] = gb if want_bias else None
        return tuple(grads)

    linear_op.register_autograd(linear_backward, setup_context=linear_setup_context)

    def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                                 teacher_bias, token_weight, beta, temperature, ignore_index, reduction, chunk_size):
        grad_on = torch.is_grad_enabled() and reduction != "none"
        loss, *_ = linear_op(
            student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias,
            token_weight, beta, temperature, ignore_index, reduction, chunk_size,
            grad_on and student_input.requires_grad, grad_on and student_weight.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad,
        )
        return loss

    return linear_distillation_loss
