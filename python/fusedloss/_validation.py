"""Argument checks of the public functions (docs/errors.rst), for the backends that do not check their arguments
themselves (the reference and Triton backends; the ``fusedloss._C`` ops check theirs in C++ with the same
messages). Each check raises ``TypeError`` or ``ValueError`` naming the argument, what was expected and what
came.
"""

from __future__ import annotations

import math
import numbers

import torch

_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------
# Validation helpers, shared with fusedloss.sigmoid
# ----------------------------------------------------------------------------------------------


def check_reduction(reduction: object, allowed: tuple[str, ...] = _REDUCTIONS) -> None:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """``value`` as a float, checked to be a finite real number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real admits numpy scalars
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if not math.isfinite(value) or below or above:
        lower = "-inf" if low is None else f"{low:g}"
        upper = "inf" if high is None else f"{high:g}"
        interval = ("(" if low_open or low is None else "[") + f"{lower}, {upper}" + ("]" if high is not None else ")")
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_floating_tensor(name: str, value: object, *, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {value.dtype}"
        )
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_same_device(name: str, value: torch.Tensor, input: torch.Tensor) -> None:
    if value.device != input.device:
        raise ValueError(f"{name} must be on the same device as input ({input.device}), got {value.device}")


def check_class_weight(name: str, weight: torch.Tensor | None, input: torch.Tensor) -> None:
    """``weight`` is None or a floating ``(C,)`` tensor on input's device, C = ``input.shape[-1]``."""
    if weight is None:
        return
    check_floating_tensor(name, weight)
    num_classes = input.shape[-1]
    if tuple(weight.shape) != (num_classes,):
        raise ValueError(
            f"{name} must have shape (C,) = ({num_classes},) with C = input.shape[-1], got {tuple(weight.shape)}"
        )
    check_same_device(name, weight, input)


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values is allowed: CPU tensors outside ``torch.compile`` tracing.

    Reading values of a CUDA tensor would synchronize the device; while tracing it would break the graph.
    """
    return tensor.is_cpu and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# Softmax-loss validation
# ----------------------------------------------------------------------------------------------


def check_class_target(input: torch.Tensor, target: object, ignore_index: int | None) -> None:
    """Target is int64 class indices of shape ``input.shape[:-1]`` or probabilities of ``input.shape``.

    Indices must lie in ``[0, C)`` or equal ``ignore_index`` (None: no index is ignored).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    input_shape, target_shape = tuple(input.shape), tuple(target.shape)
    if target.is_floating_point():
        if target_shape != input_shape:
            raise ValueError(
                f"target holds class probabilities ({target.dtype}) and must have input's shape {input_shape}, "
                f"got {target_shape}"
            )
        # As torch: probabilities have no index to ignore, so any negative ignore_index (which no class index can
        # equal) is accepted and has no effect; a class index raises (torch: "ignore_index is not supported for
        # floating point target").
        if ignore_index is not None and ignore_index >= 0:
            raise ValueError(
                f"ignore_index must be negative with class-probability targets (it does not apply to them), "
                f"got {ignore_index}"
            )
    elif target.dtype != torch.int64:
        raise TypeError(
            f"target must be int64 class indices or floating-point class probabilities, got {target.dtype} "
            "(convert indices with target.long())"
        )
    elif target_shape != input_shape[:-1]:
        message = (
            f"target of class indices must have shape input.shape[:-1] = {input_shape[:-1]} "
            f"(input {input_shape}, class dimension last), got target {target_shape}"
        )
        if input.dim() >= 3 and target_shape == input_shape[:1] + input_shape[2:]:
            message += (
                "; this looks like torch's layout with the class dimension at 1 (input (N, C, d1, ...)): "
                "fusedloss wants the class dimension last, pass input.movedim(1, -1)"
            )
        raise ValueError(message)
    check_same_device("target", target, input)
    if not target.is_floating_point() and values_checkable(target) and target.numel() > 0:
        num_classes = input.shape[-1]
        out_of_range = (target < 0) | (target >= num_classes)
        if ignore_index is not None:
            out_of_range &= target != ignore_index
        if bool(out_of_range.any()):
            bad = target[out_of_range]
            allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
            raise ValueError(
                f"target values must be class indices in {allowed}, got {bad.numel()} value(s) outside, "
                f"e.g. {int(bad[0])}"
            )


def check_class_input(input: object) -> torch.Tensor:
    input = check_floating_tensor("input", input, min_dim=1)
    if input.shape[-1] == 0:
        raise ValueError(f"input must have at least one class (input.shape[-1] >= 1), got shape {tuple(input.shape)}")
    return input


def check_softmax_options(
    ignore_index: object,
    reduction: object,
    label_smoothing: object,
    focal_gamma: object,
    z_loss: object,
    softcap: object,
    backend: object,
    focal_gamma_name: str = "focal_gamma",
) -> tuple[int, float, float, float, float | None]:
    """Validates the scalar options; returns ``(ignore_index, label_smoothing, focal_gamma, z_loss, softcap)``
    as Python int and floats (what the ops' schemas take)."""
    ignore_index = check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    focal_gamma = check_real(focal_gamma_name, focal_gamma, low=0.0)
    z_loss = check_real("z_loss", z_loss, low=0.0)
    if softcap is not None:
        softcap = check_real("softcap", softcap, low=0.0, low_open=True)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return ignore_index, label_smoothing, focal_gamma, z_loss, softcap
