"""The sigmoid and multi-label losses on the ``fusedloss._C`` extension: the ``cpp`` backend (CPU kernels).

Each function calls the extension's public op ``fusedloss::<loss>``, which checks its arguments, runs the
device op ``fusedloss::<loss>_forward`` (loss and, in the same pass, ``dL/dinput``; csrc/cpu/sigmoid.cpp,
math in csrc/kernels/sigmoid.h) and registers the backward in C++ (csrc/sigmoid_ops.cpp): backward multiplies
the saved gradient by ``grad_output``. Without a gradient to compute (``torch.no_grad``, inference mode, input
not requiring grad) no gradient is written. Forward plus backward allocate one gradient in input's dtype.

Python registers only the fake (meta) kernels of the device ops, so that ``torch.compile(fullgraph=True)``
traces through them. Signatures are those of docs/BACKENDS.md.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)

_OPS = torch.ops.fusedloss


def _empty_grad(input: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    return input.new_empty(input.shape) if compute_grad else input.new_empty((0,))


def _elementwise_loss(input: torch.Tensor, reduction: str) -> torch.Tensor:
    return input.new_empty(input.shape) if reduction == "none" else input.new_empty(())


def _row_loss(input: torch.Tensor, reduction: str) -> torch.Tensor:
    return input.new_empty(input.shape[:-1]) if reduction == "none" else input.new_empty(())


@torch.library.register_fake("fusedloss::binary_cross_entropy_with_logits_forward")
def _bce_fake(input, target, weight, pos_weight, reduction, compute_grad):
    return _elementwise_loss(input, reduction), _empty_grad(input, compute_grad)


@torch.library.register_fake("fusedloss::sigmoid_focal_loss_forward")
def _sigmoid_focal_fake(input, target, alpha, gamma, reduction, compute_grad):
    return _elementwise_loss(input, reduction), _empty_grad(input, compute_grad)


@torch.library.register_fake("fusedloss::multilabel_soft_margin_loss_forward")
def _multilabel_soft_margin_fake(input, target, weight, reduction, compute_grad):
    return _row_loss(input, reduction), _empty_grad(input, compute_grad)


@torch.library.register_fake("fusedloss::multilabel_categorical_crossentropy_forward")
def _zlpr_fake(input, target, reduction, compute_grad):
    return _row_loss(input, reduction), _empty_grad(input, compute_grad)


@torch.library.register_fake("fusedloss::ghmc_loss_forward")
def _ghmc_fake(input, target, valid, bins, momentum, acc_sum, compute_grad):
    return input.new_empty(()), acc_sum.new_empty(acc_sum.shape), _empty_grad(input, compute_grad)


@torch.library.register_fake("fusedloss::bi_tempered_logistic_loss_forward")
def _bi_tempered_fake(input, target, t1, t2, label_smoothing, num_iters, reduction, compute_grad):
    return _row_loss(input, reduction), _empty_grad(input, compute_grad)


# ----------------------------------------------------------------------------------------------
# The ops of docs/BACKENDS.md
# ----------------------------------------------------------------------------------------------


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor],
    reduction: str,
) -> torch.Tensor:
    return _OPS.binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction)


def sigmoid_focal_loss(
    input: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float, reduction: str
) -> torch.Tensor:
    return _OPS.sigmoid_focal_loss(input, target, alpha, gamma, reduction)


def multilabel_soft_margin_loss(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: str
) -> torch.Tensor:
    return _OPS.multilabel_soft_margin_loss(input, target, weight, reduction)


def multilabel_categorical_crossentropy(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return _OPS.multilabel_categorical_crossentropy(input, target, reduction)


def ghmc_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor],
    bins: int,
    momentum: float,
    acc_sum: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _OPS.ghmc_loss(input, target, valid, bins, momentum, acc_sum)


def bi_tempered_logistic_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    t1: float,
    t2: float,
    label_smoothing: float,
    num_iters: int,
    reduction: str,
) -> torch.Tensor:
    return _OPS.bi_tempered_logistic_loss(input, target, t1, t2, label_smoothing, num_iters, reduction)


# ----------------------------------------------------------------------------------------------
# What the kernels cannot serve: CUDA tensors (CPU kernels only so far), gradients for anything but input
# (the reference differentiates them)
# ----------------------------------------------------------------------------------------------


def _no_grad_reasons(input: torch.Tensor, **tensors: Optional[torch.Tensor]) -> List[str]:
    reasons = [] if input.device.type == "cpu" else [f"has CPU kernels only, got a {input.device.type} tensor"]
    return reasons + [
        f"computes no gradient for {name} ({name} requires grad)"
        for name, tensor in tensors.items()
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad
    ]


def binary_cross_entropy_with_logits_reasons(input, target, weight, pos_weight, reduction) -> List[str]:
    return _no_grad_reasons(input, target=target, weight=weight, pos_weight=pos_weight)


def sigmoid_focal_loss_reasons(input, target, alpha, gamma, reduction) -> List[str]:
    return _no_grad_reasons(input, target=target)


def multilabel_soft_margin_loss_reasons(input, target, weight, reduction) -> List[str]:
    return _no_grad_reasons(input, target=target, weight=weight)


def multilabel_categorical_crossentropy_reasons(input, target, reduction) -> List[str]:
    return _no_grad_reasons(input, target=target)


def ghmc_loss_reasons(input, target, valid, bins, momentum, acc_sum) -> List[str]:
    return _no_grad_reasons(input, target=target)


def bi_tempered_logistic_loss_reasons(input, target, t1, t2, label_smoothing, num_iters, reduction) -> List[str]:
    return _no_grad_reasons(input, target=target)
