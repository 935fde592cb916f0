"""Softmax losses, public API (SPEC 3): ``cross_entropy``, ``focal_loss`` and their modules.

The functions validate every argument (SPEC 7), flatten the leading dimensions to rows ``(N, C)``
with the class dimension last, and call the ``softmax_loss`` op of the chosen backend (SPEC 2,
docs/BACKENDS.md). Checks that read tensor values (target range) run only on CPU tensors and
never while ``torch.compile`` traces, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""

from __future__ import annotations

import math
import numbers

import torch

from fusedloss import _dispatch

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
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


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
        if ignore_index is not None and ignore_index != -100:  # as torch: probabilities have no index to ignore
            raise ValueError(
                f"ignore_index must stay at its default -100 with class-probability targets, got {ignore_index}"
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


def _check_softmax_options(
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


def _softmax_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: float | None,
    mean_by_count: bool,
    inplace_backward: bool,
    backend: str,
) -> torch.Tensor:
    """Flattens validated arguments to rows, runs the ``softmax_loss`` op, restores the ``none`` shape."""
    num_classes = input.shape[-1]
    rows = input.reshape(-1, num_classes)
    row_target = target.reshape(-1, num_classes) if target.is_floating_point() else target.reshape(-1)
    loss = _dispatch.call(
        "softmax_loss",
        backend,
        input.device,
        rows,
        row_target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        focal_gamma,
        z_loss,
        softcap,
        mean_by_count,
        inplace_backward,
    )
    if reduction == "none":
        loss = loss.reshape(input.shape[:-1])
    return loss


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    focal_gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax cross entropy with the class dimension last, plus focal factor, z-loss and logit soft-capping.

    Per row n, with ``s = softcap * tanh(input / softcap)`` (``s = input`` when ``softcap`` is None),
    ``p = softmax(s)``, ``q = (1 - ε) onehot(y_n) + ε / C`` (or the given probabilities smoothed the same
    way), ``w = weight`` (ones when None), ``γ = focal_gamma``::

        l_n = -Σ_c q_c w_c (1 - p_c)^γ log p_c  +  z_loss * logsumexp_c(s_c)^2

    Args:
        input: logits ``(N, C)`` or ``(*, C)`` (e.g. ``(B, T, C)``), float16/bfloat16/float32/float64, class
            dimension last (torch's ``(N, C, d1, ...)`` layout becomes ``input.movedim(1, -1)``).
        target: int64 class indices of shape ``input.shape[:-1]`` with values in ``[0, C)`` or ``ignore_index``,
            or class probabilities with ``input``'s shape (soft targets; ``ignore_index`` does not apply).
        weight: per-class weight ``(C,)`` or None.
        ignore_index: target value whose rows contribute 0 and are left out of the ``mean`` divisor.
        reduction: ``"none"`` (loss of ``target``'s index shape, 0 at ignored positions), ``"sum"``, or
            ``"mean"``: sum / Σ_n w_{y_n} over non-ignored rows (torch's rule; NaN when every row is ignored,
            as torch), sum / N for soft targets.
        label_smoothing: ε in [0, 1], torch's rule (also with ``weight``).
        focal_gamma: γ >= 0; 0 gives exactly ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient >= 0 of ``logsumexp(s)^2`` per non-ignored row (PaLM's auxiliary loss).
        softcap: None or > 0: cap on the logits' magnitude (Gemma 2).
        inplace_backward: let a fused backend write the gradient over ``input``'s storage (saves one ``(N, C)``
            tensor); ``input`` must not be used after the backward then.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"`` (SPEC 2).

    Returns:
        The loss in ``input``'s dtype (computed in float32 for half types): a scalar, or ``target``'s index
        shape for ``reduction="none"``.
    """
    input = check_class_input(input)
    ignore_index, label_smoothing, focal_gamma, z_loss, softcap = _check_softmax_options(
        ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, backend
    )
    check_bool("inplace_backward", inplace_backward)
    check_class_target(input, target, ignore_index)
    check_class_weight("weight", weight, input)
    return _softmax_loss(
        input,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        focal_gamma,
        z_loss,
        softcap,
        False,
        inplace_backward,
        backend,
    )


def _alpha_weight(alpha: None | float | torch.Tensor, input: torch.Tensor) -> torch.Tensor | None:
    """``alpha`` (None, a float for every class, or a ``(C,)`` tensor) as the per-class weight of ``softmax_loss``."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor):
        check_class_weight("alpha", alpha, input)
        return alpha
    alpha = check_real("alpha", alpha, low=0.0)
    return torch.full((input.shape[-1],), alpha, dtype=input.dtype, device=input.device)


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: None | float | torch.Tensor = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017) with the class dimension last.

    Per row n: ``l_n = -Σ_c q_c α_c (1 - p_c)^γ log p_c`` with ``p = softmax(input)`` and
    ``q = (1 - ε) onehot(y_n) + ε / C``; without smoothing this is the seed formula ``-α_y (1 - p_y)^γ log p_y``.

    Args:
        input: logits ``(*, C)``, float16/bfloat16/float32/float64.
        target: int64 indices of shape ``input.shape[:-1]`` (or probabilities of ``input``'s shape).
        gamma: focusing parameter γ >= 0.
        alpha: None (every class 1), a float >= 0 for every class, or a floating ``(C,)`` tensor per class.
        ignore_index: target value whose rows contribute 0 and are not counted.
        reduction: ``"none"``, ``"sum"``, or ``"mean"``: sum / number of non-ignored rows (a count, not Σα,
            as kornia and torchvision do; NaN when every row is ignored).
        label_smoothing: ε in [0, 1].
        backend: see :func:`cross_entropy`.

    ``focal_loss(alpha=None, gamma=0)`` equals :func:`cross_entropy`.
    """
    input = check_class_input(input)
    ignore_index, label_smoothing, gamma, _, _ = _check_softmax_options(
        ignore_index, reduction, label_smoothing, gamma, 0.0, None, backend, focal_gamma_name="gamma"
    )
    check_class_target(input, target, ignore_index)
    weight = _alpha_weight(alpha, input)
    return _softmax_loss(
        input, target, weight, ignore_index, reduction, label_smoothing, gamma, 0.0, None, True, False, backend
    )


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` with the class dimension last, plus ``focal_gamma``, ``z_loss``,
    ``softcap`` and ``backend`` (see :func:`cross_entropy`). ``weight`` is a buffer named ``weight`` as in torch,
    so state dicts load either way; ``size_average``/``reduce`` are torch's deprecated reduction arguments.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        focal_gamma: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        if weight is not None:
            check_floating_tensor("weight", weight)
            if weight.dim() != 1:
                raise ValueError(f"weight must have shape (C,), got {tuple(weight.shape)}")
        ignore_index, label_smoothing, focal_gamma, z_loss, softcap = _check_softmax_options(
            ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, backend
        )
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = check_bool("inplace_backward", inplace_backward)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            focal_gamma=self.focal_gamma,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"focal_gamma={self.focal_gamma}, z_loss={self.z_loss}, softcap={self.softcap}, backend={self.backend!r}"
        )


class FocalLoss(torch.nn.Module):
    """Module form of :func:`focal_loss`; a tensor ``alpha`` is kept as a buffer named ``alpha``."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: None | float | torch.Tensor = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        ignore_index, label_smoothing, gamma, _, _ = _check_softmax_options(
            ignore_index, reduction, label_smoothing, gamma, 0.0, None, backend, focal_gamma_name="gamma"
        )
        if isinstance(alpha, torch.Tensor):
            check_floating_tensor("alpha", alpha)
            if alpha.dim() != 1:
                raise ValueError(f"alpha must be None, a float or a (C,) tensor, got shape {tuple(alpha.shape)}")
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = None if alpha is None else check_real("alpha", alpha, low=0.0)
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(
            input,
            target,
            self.gamma,
            self.alpha,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, backend={self.backend!r}"
        )
