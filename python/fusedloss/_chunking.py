"""What the fused linear heads' chunk loops share (the Triton ``linear_cross_entropy`` and every backend's
``linear_distillation_loss``): the per-row factors of a reduction, the reduction of per-row losses, and the
weight-gradient product accumulated in float32 (float64) without rounding to half precision first."""

from __future__ import annotations

import warnings

import torch


def reduction_factors(t: torch.Tensor, divisor: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``d(loss)/d(l_n)`` for row weights ``t`` (0 on ignored rows): ``t_n / divisor`` for "mean" (0 on ignored rows,
    also when every row is ignored), ``t_n`` for "sum" and "none"."""
    if reduction != "mean":
        return t.to(dtype)
    return torch.where(t != 0, t / divisor, 0.0).to(dtype)


def reduce_rows(losses: torch.Tensor, t: torch.Tensor, divisor: torch.Tensor, reduction: str,
                dtype: torch.dtype) -> torch.Tensor:
    """``Σ_n t_n l_n`` (over ``divisor`` for "mean", per row for "none") in float64, returned in ``dtype``. A row of
    weight 0 (an ignored row) contributes exactly 0, even where its loss is not finite; the mean over no kept row
    is 0/0 = NaN, as torch's."""
    weighted = torch.where(t != 0, losses.to(torch.float64) * t, 0.0)
    if reduction == "none":
        return weighted.to(dtype)
    total = weighted.sum()
    if reduction == "mean":
        total = total / divisor
    return total.to(dtype)


def add_product(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``accumulator += a @ b`` formed in the accumulator's dtype (float32, or float64), never rounded to bf16/fp16
    first. For half-precision CUDA tensors a half GEMM with a float32 output (torch >= 2.8) avoids widened copies;
    where torch lacks it the product runs widened, and a warning says so once."""
    if a.is_cuda and a.dtype != accumulator.dtype:
        try:
            torch.addmm(accumulator, a, b.to(a.dtype), out_dtype=accumulator.dtype, out=accumulator)
            return
        except (RuntimeError, TypeError) as error:
            _warn_widened_gemm(error)
    accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))


_WIDENED_GEMM_WARNED = False


def _warn_widened_gemm(error: BaseException) -> None:
    """Once per process: the weight gradient's GEMM runs widened to float32 (no tensor cores for half inputs, up to
    an order of magnitude slower) because this torch has no half-precision GEMM with a float32 output."""
    global _WIDENED_GEMM_WARNED
    if _WIDENED_GEMM_WARNED:
        return
    _WIDENED_GEMM_WARNED = True
    warnings.warn(
        "fusedloss (fused linear head): torch.addmm(..., out_dtype=torch.float32) is not available here "
        f"({type(error).__name__}: {error}); the weight gradient is accumulated with a float32 GEMM on widened "
        "inputs instead, which is correct but much slower for float16/bfloat16 on a GPU (torch >= 2.8 has the "
        "half-precision GEMM with a float32 output)",
        RuntimeWarning,
        stacklevel=3,
    )
