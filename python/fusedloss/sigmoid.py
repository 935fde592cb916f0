"""Sigmoid and multi-label losses, public API (docs/sigmoid.rst): functions and modules.

Each function validates its arguments (docs/errors.rst) and runs its op through ``fusedloss._dispatch``
(docs/backends.rst; internal signatures in docs/BACKENDS.md). Elementwise losses (``binary_cross_entropy_with_logits``,
``sigmoid_focal_loss``, ``ghmc_loss``) take any shape; the multi-label and multi-class ones take ``(*, C)``
with the class dimension last and return ``input.shape[:-1]`` for ``reduction="none"``.
Value checks (targets in range) run on CPU tensors only and never while ``torch.compile`` traces.
"""

from __future__ import annotations

import torch

from fusedloss import _dispatch
from fusedloss.softmax import (
    check_class_input,
    check_class_target,
    check_floating_tensor,
    check_int,
    check_real,
    check_reduction,
    check_same_device,
    values_checkable,
)

# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_backend(backend: object) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")


def _check_same_shape_target(input: torch.Tensor, target: object, *, floating_only: bool) -> None:
    """``target`` is a real tensor of ``input``'s shape and device (its values: :func:`_check_target_values`)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if floating_only and not target.is_floating_point():
        raise TypeError(
            f"target must be a floating-point tensor (as torch), got {target.dtype}: pass target.to(input.dtype)"
        )
    if target.is_complex():
        raise TypeError(f"target must be a real tensor, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"target must have input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
    check_same_device("target", target, input)


def _check_target_values(target: torch.Tensor, *, binary: bool = False) -> None:
    """Values in [0, 1] ({0, 1} if ``binary``), on CPU tensors outside tracing."""
    if values_checkable(target) and target.numel() > 0 and target.dtype != torch.bool:
        if binary:
            bad = (target != 0) & (target != 1)
            expected = "0 or 1 (multi-hot)"
        else:
            bad = (target < 0) | (target > 1)
            expected = "in [0, 1]"
        if bool(bad.any()):
            raise ValueError(f"target values must be {expected}, got {float(target[bad][0])!r}")


# Backends whose kernels check the target values in their own pass over the data.
_KERNEL_CHECKS_TARGET = frozenset({"cpp"})


def _call(op: str, backend: str, input: torch.Tensor, target: torch.Tensor, *args: object, binary: bool = False):
    """Runs ``op(input, target, *args)`` on the backend that dispatch picks, checking the target values first
    unless that backend's kernel checks them itself."""
    name, impl = _dispatch.resolve(op, backend, input.device, input, target, *args)
    if name not in _KERNEL_CHECKS_TARGET:
        _check_target_values(target, binary=binary)
    return impl(input, target, *args)


def _check_broadcast_weight(name: str, weight: object, input: torch.Tensor) -> None:
    """``weight`` is None or a floating tensor on input's device that broadcasts to ``input.shape``."""
    if weight is None:
        return
    check_floating_tensor(name, weight)
    try:
        broadcast = torch.broadcast_shapes(weight.shape, input.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != input.shape:
        raise ValueError(
            f"{name} must broadcast to input's shape {tuple(input.shape)}, got shape {tuple(weight.shape)}"
        )
    check_same_device(name, weight, input)


def _check_elementwise_input(input: object) -> torch.Tensor:
    return check_floating_tensor("input", input)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``(*, C)`` -> ``(N, C)``."""
    return tensor.reshape(-1, tensor.shape[-1])


def _restore(loss: torch.Tensor, input: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Exactly ``torch.nn.functional.binary_cross_entropy_with_logits``, with torch's positional order: elementwise

        l = -w [P y log σ(x) + (1 - y) log σ(-x)]

    Args:
        input: logits of any shape, float16/bfloat16/float32/float64.
        target: floating tensor of ``input``'s shape, values in [0, 1].
        weight: w, floating, broadcastable to ``input``'s shape, or None.
        size_average: torch's deprecated reduction flag, mapped as torch maps it (with torch's warning).
        reduce: torch's deprecated reduction flag, see ``size_average``.
        reduction: "none" (``input``'s shape), "sum", "mean" over every element.
        pos_weight: P, weight of the positive term, broadcastable to ``input`` (``(C,)`` for the class dimension,
            last), or None.
        backend: see ``fusedloss.cross_entropy``.

    Returns the loss in ``input``'s dtype (computed in float32 for half types).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    input = _check_elementwise_input(input)
    _check_same_shape_target(input, target, floating_only=True)
    _check_broadcast_weight("weight", weight, input)
    _check_broadcast_weight("pos_weight", pos_weight, input)
    check_reduction(reduction)
    _check_backend(backend)
    return _call("binary_cross_entropy_with_logits", backend, input, target, weight, pos_weight, reduction)


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The values and gradients of ``torchvision.ops.sigmoid_focal_loss`` (Lin et al., 2017), with the arguments
    named ``input`` and ``target`` (torchvision: ``inputs`` and ``targets``; positional calls are the same).
    Elementwise, with p = σ(x):

        p_t = p y + (1 - p)(1 - y),  α_t = α y + (1 - α)(1 - y),  l = α_t (1 - p_t)^γ BCE(x, y)

    Args:
        input: logits of any shape (floating); target: floating tensor of the same shape, values in [0, 1].
        alpha: α in [0, 1] balancing positives and negatives; a negative α disables the weighting (α_t = 1).
        gamma: γ >= 0; 0 gives binary cross entropy (times α_t).
        reduction: "none" (default, as torchvision: ``input``'s shape), "sum", "mean" over every element.
        backend: see ``fusedloss.cross_entropy``.
    """
    input = _check_elementwise_input(input)
    _check_same_shape_target(input, target, floating_only=True)
    alpha = check_real("alpha", alpha, high=1.0)
    gamma = check_real("gamma", gamma, low=0.0)
    check_reduction(reduction)
    _check_backend(backend)
    return _call("sigmoid_focal_loss", backend, input, target, alpha, gamma, reduction)


def multilabel_soft_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Exactly ``torch.nn.functional.multilabel_soft_margin_loss`` (torch's positional order), per row of
    ``(*, C)``:

        l = -(1/C) Σ_c w_c [y_c log σ(x_c) + (1 - y_c) log σ(-x_c)]

    Args:
        input: logits ``(*, C)``; target: ``input``'s shape, values in [0, 1] (floating, integer or bool).
        weight: ``(C,)`` floating per-class weight, or None.
        size_average: torch's deprecated reduction flag, mapped as torch maps it (with torch's warning).
        reduce: torch's deprecated reduction flag, see ``size_average``.
        reduction: "none" -> ``input.shape[:-1]``, "sum", "mean" over rows.
        backend: see ``fusedloss.cross_entropy``.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    input = check_class_input(input)
    _check_same_shape_target(input, target, floating_only=False)
    _check_class_weight(weight, input)
    check_reduction(reduction)
    _check_backend(backend)
    loss = _call("multilabel_soft_margin_loss", backend, _rows(input), _rows(target), weight, reduction)
    return _restore(loss, input, reduction)


def _check_class_weight(weight: object, input: torch.Tensor) -> None:
    if weight is None:
        return
    check_floating_tensor("weight", weight)
    if tuple(weight.shape) != (input.shape[-1],):
        raise ValueError(f"weight must have shape (C,) = ({input.shape[-1]},), got {tuple(weight.shape)}")
    check_same_device("weight", weight, input)


def multilabel_categorical_crossentropy(
    input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", *, backend: str = "auto"
) -> torch.Tensor:
    """ZLPR, the multi-label categorical cross entropy of Su (2020), per row of ``(*, C)``:

        l = log(1 + Σ_{c: y_c = 0} e^{s_c}) + log(1 + Σ_{c: y_c = 1} e^{-s_c})

    It pushes every positive score above 0 and every negative below: predict the labels with ``s > 0``.

    Args:
        input: scores ``(*, C)``.
        target: multi-hot of ``input``'s shape (0/1, any real or bool dtype).
        reduction: "none" -> ``input.shape[:-1]``, "sum", "mean" over rows.
        backend: see ``fusedloss.cross_entropy``.
    """
    input = check_class_input(input)
    _check_same_shape_target(input, target, floating_only=False)
    check_reduction(reduction)
    _check_backend(backend)
    loss = _call("multilabel_categorical_crossentropy", backend, _rows(input), _rows(target), reduction, binary=True)
    return _restore(loss, input, reduction)


def _check_ghmc_options(bins: object, momentum: object) -> tuple[int, float]:
    bins = check_int("bins", bins)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    momentum = check_real("momentum", momentum, low=0.0)
    if momentum >= 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return bins, momentum


def _ghmc_call(
    input: object,
    target: object,
    label_weight: object,
    bins: int,
    momentum: float,
    acc_sum: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    input = _check_elementwise_input(input)
    _check_same_shape_target(input, target, floating_only=False)
    valid = None
    if label_weight is not None:
        if not isinstance(label_weight, torch.Tensor):
            raise TypeError(f"label_weight must be a torch.Tensor or None, got {type(label_weight).__name__}")
        if tuple(label_weight.shape) != tuple(input.shape):
            raise ValueError(
                f"label_weight must have input's shape {tuple(input.shape)}, got {tuple(label_weight.shape)}"
            )
        check_same_device("label_weight", label_weight, input)
        valid = label_weight > 0
    _check_backend(backend)
    if acc_sum is None:
        acc_sum = torch.zeros(bins, dtype=torch.float32, device=input.device)
    return _call("ghmc_loss", backend, input, target, valid, bins, momentum, acc_sum)


def ghmc_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    label_weight: torch.Tensor | None = None,
    bins: int = 10,
    momentum: float = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """GHM-C loss (Li et al., AAAI 2019), the authors' reference (libuyu/GHM_Detection, mmdetection ``GHMC``).

    With ``g = |σ(x) - y|`` (no gradient), the valid entries binned by g into ``bins`` equal intervals of [0, 1]
    (last edge 1 + 1e-6), ``tot`` = max(#valid, 1), n = #non-empty bins, each entry weighs
    ``tot / count(its bin) / n`` and ``loss = Σ weight · BCE(x, y) / tot`` (a scalar).

    Args:
        input: logits of any shape (floating).
        target: ``input``'s shape, binary (or in [0, 1]), any real/bool dtype.
        label_weight: validity mask of ``input``'s shape: entries with ``label_weight > 0`` count, the others are
            left out; its values are not multiplied in (as the authors). None: every entry is valid.
        bins: number of bins >= 1.
        momentum: in [0, 1). This function keeps no state: with ``momentum > 0`` it is the first call of a fresh
            :class:`GHMCLoss` (moving counts start at 0, so ``acc = (1 - momentum) · count`` and every weight is
            ``1 / (1 - momentum)`` times the ``momentum = 0`` weight). Use :class:`GHMCLoss` to carry the moving
            average across calls.
        backend: see ``fusedloss.cross_entropy``.
    """
    bins, momentum = _check_ghmc_options(bins, momentum)
    return _ghmc_call(input, target, label_weight, bins, momentum, None, backend)[0]


def bi_tempered_logistic_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    t1: float,
    t2: float,
    label_smoothing: float = 0.0,
    num_iters: int = 5,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Bi-tempered logistic loss (Amid et al., NeurIPS 2019), the authors' TensorFlow reference.

    With tempered ``log_t(u) = (u^(1-t) - 1)/(1 - t)``, ``exp_t(u) = relu(1 + (1 - t)u)^(1/(1-t))``,
    ``p = exp_t(x - λ(x), t2)`` normalized to sum 1 (λ by ``num_iters`` fixed-point steps for t2 > 1, bisection
    steps for t2 < 1), per row:

        l = Σ_c [ q_c (log_t(q_c + 1e-10, t1) - log_t(p_c, t1)) - (q_c^(2-t1) - p_c^(2-t1)) / (2 - t1) ]

    t1 = t2 = 1 is softmax cross entropy. The gradient is the authors' closed form at the computed p.

    Args:
        input: logits ``(*, C)``.
        target: int64 indices of shape ``input.shape[:-1]`` or probabilities q of ``input``'s shape (no gradient).
        t1: temperature of the log in [0, 1] (< 1 bounds the loss).
        t2: temperature of the softmax, > 0 (> 1 heavy tails).
        label_smoothing: ε in [0, 1], the authors' rule: the true class gets 1 - ε, every other ε/(C - 1)
            (applied as ``q ← (1 - C/(C-1) ε) q + ε/(C-1)``; needs C >= 2).
        num_iters: normalization steps >= 1.
        reduction: "none" -> ``input.shape[:-1]``, "sum", "mean" over rows.
        backend: see ``fusedloss.cross_entropy``.
    """
    input = check_class_input(input)
    check_class_target(input, target, None)
    t1 = check_real("t1", t1, low=0.0, high=1.0)
    t2 = check_real("t2", t2, low=0.0, low_open=True)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if label_smoothing > 0 and input.shape[-1] < 2:
        raise ValueError(f"label_smoothing > 0 needs at least 2 classes, got input of shape {tuple(input.shape)}")
    num_iters = check_int("num_iters", num_iters)
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    check_reduction(reduction)
    _check_backend(backend)
    rows_target = _rows(target) if target.is_floating_point() else target.reshape(-1)
    loss = _dispatch.call(
        "bi_tempered_logistic_loss", backend, input.device,
        _rows(input), rows_target, t1, t2, label_smoothing, num_iters, reduction,
    )  # fmt: skip
    return _restore(loss, input, reduction)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class SigmoidFocalLoss(torch.nn.Module):
    """Module form of :func:`sigmoid_focal_loss`. Its default reduction is ``"mean"`` (as torch.nn loss modules),
    where the function keeps torchvision's ``"none"``."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        self.alpha = check_real("alpha", alpha, high=1.0)
        self.gamma = check_real("gamma", gamma, low=0.0)
        check_reduction(reduction)
        _check_backend(backend)
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"


class MultilabelCategoricalCrossEntropy(torch.nn.Module):
    """Module form of :func:`multilabel_categorical_crossentropy` (ZLPR)."""

    def __init__(self, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        check_reduction(reduction)
        _check_backend(backend)
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multilabel_categorical_crossentropy(input, target, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class BiTemperedLogisticLoss(torch.nn.Module):
    """Module form of :func:`bi_tempered_logistic_loss`."""

    def __init__(
        self,
        t1: float,
        t2: float,
        label_smoothing: float = 0.0,
        num_iters: int = 5,
        reduction: str = "mean",
        *,
        backend: str = "auto",
    ):
        super().__init__()
        self.t1 = check_real("t1", t1, low=0.0, high=1.0)
        self.t2 = check_real("t2", t2, low=0.0, low_open=True)
        self.label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.num_iters = check_int("num_iters", num_iters)
        if num_iters < 1:
            raise ValueError(f"num_iters must be >= 1, got {num_iters}")
        check_reduction(reduction)
        _check_backend(backend)
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bi_tempered_logistic_loss(
            input, target, self.t1, self.t2, self.label_smoothing, self.num_iters, self.reduction, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"t1={self.t1}, t2={self.t2}, label_smoothing={self.label_smoothing}, num_iters={self.num_iters}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


class GHMCLoss(torch.nn.Module):
    """GHM-C loss with the authors' moving-average state (mmdetection's ``GHMC``): see :func:`ghmc_loss`.

    With ``momentum > 0`` the module keeps ``acc_sum (bins,)`` (a float32 buffer, as mmdetection) and every call
    updates, for each non-empty bin, ``acc_sum[i] = momentum · acc_sum[i] + (1 - momentum) · count_i`` before
    weighting by ``tot / acc_sum[i] / n``. ``loss_weight`` scales the result (mmdetection's argument).
    ``forward(input, target, label_weight=None)``.
    """

    def __init__(self, bins: int = 10, momentum: float = 0.0, loss_weight: float = 1.0, *, backend: str = "auto"):
        super().__init__()
        self.bins, self.momentum = _check_ghmc_options(bins, momentum)
        self.loss_weight = check_real("loss_weight", loss_weight)
        _check_backend(backend)
        self.backend = backend
        if self.momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins, dtype=torch.float32))
        else:
            self.acc_sum = None

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, label_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss, acc_sum = _ghmc_call(input, target, label_weight, self.bins, self.momentum, self.acc_sum, self.backend)
        if self.acc_sum is not None:
            with torch.no_grad():
                self.acc_sum.copy_(acc_sum)
        return loss * self.loss_weight

    def extra_repr(self) -> str:
        return f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, backend={self.backend!r}"


__all__ = [
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "multilabel_soft_margin_loss",
    "multilabel_categorical_crossentropy",
    "ghmc_loss",
    "bi_tempered_logistic_loss",
    "SigmoidFocalLoss",
    "MultilabelCategoricalCrossEntropy",
    "BiTemperedLogisticLoss",
    "GHMCLoss",
]
