"""Knowledge-distillation losses (docs/distillation.rst): ``distillation_loss`` on logits, the fused-head
``linear_distillation_loss`` on hidden states, and their modules.

The arguments are checked here for every backend (:mod:`fusedloss._validation` style: ``TypeError`` or
``ValueError`` naming the argument, what was expected and what came), flattened to rows and handed to the backend's
op (docs/BACKENDS.md). Checks never read tensor values, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""

from __future__ import annotations

import torch

from fusedloss import _dispatch
from fusedloss._validation import (
    check_floating_tensor,
    check_int,
    check_real,
    check_reduction,
    check_same_device,
)

# Rows per chunk of the linear form when chunk_size is None: the fused linear head's rule.
from fusedloss.linear import default_chunk_size


def _check_options(beta, temperature, ignore_index, reduction, backend) -> tuple[float, float, int]:
    beta = check_real("beta", beta, low=0.0, high=1.0)
    temperature = check_real("temperature", temperature, low=0.0, low_open=True)
    ignore_index = check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return beta, temperature, ignore_index


def _check_rows(target, token_weight, row_shape: tuple, device: torch.device, shape_name: str) -> None:
    """``target``: None or integer class indices of shape ``row_shape``; ``token_weight``: None or a floating tensor
    of that shape; both on ``device``."""
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be None or a torch.Tensor, got {type(target).__name__}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor (int64 class indices), got {target.dtype}")
        if tuple(target.shape) != row_shape:
            raise ValueError(f"target must have one entry per row, shape {shape_name} = {row_shape}, "
                             f"got {tuple(target.shape)}")
        if target.device != device:
            raise ValueError(f"target must be on the same device as the logits ({device}), got {target.device}")
    if token_weight is not None:
        check_floating_tensor("token_weight", token_weight)
        if tuple(token_weight.shape) != row_shape:
            raise ValueError(f"token_weight must have one weight per row, shape {shape_name} = {row_shape}, "
                             f"got {tuple(token_weight.shape)}")
        if token_weight.device != device:
            raise ValueError(
                f"token_weight must be on the same device as the logits ({device}), got {token_weight.device}")


def _check_logits(student_logits, teacher_logits) -> None:
    check_floating_tensor("student_logits", student_logits, min_dim=1)
    check_floating_tensor("teacher_logits", teacher_logits, min_dim=1)
    if student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have at least one class (shape[-1] >= 1), got shape "
                         f"{tuple(student_logits.shape)}")
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"teacher_logits must have student_logits's shape {tuple(student_logits.shape)} (same rows, "
                         f"same vocabulary), got {tuple(teacher_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits must have student_logits's dtype {student_logits.dtype}, got "
                        f"{teacher_logits.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on the same device as student_logits ({student_logits.device}), "
                         f"got {teacher_logits.device}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    token_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Divergence of the student's softmax from the teacher's, per row, for knowledge distillation.

    Per row n, with ``P_S = softmax(student_logits / temperature)`` and ``P_T = softmax(teacher_logits /
    temperature)`` (computed in float32, float64 for float64 input)::

        beta == 0:  l_n = KL(P_T || P_S)                                  (forward KL)
        beta == 1:  l_n = KL(P_S || P_T)                                  (reverse KL)
        otherwise:  l_n = beta·KL(P_T || M) + (1 − beta)·KL(P_S || M),   M = beta·P_T + (1 − beta)·P_S

    the generalized Jensen-Shannon divergence of GKD (TRL's ``GKDTrainer.generalized_jsd_loss``, Liger-Kernel's JSD).
    There is no ``temperature**2`` factor (as in TRL and Liger-Kernel); for Hinton et al.'s scaling, which keeps the
    gradients' size independent of the temperature, multiply the loss by ``temperature**2``.

    Args:
        student_logits: ``(N, V)`` or ``(*, V)`` (e.g. ``(B, T, V)``), float16/bfloat16/float32/float64, class
            dimension last. The only tensor that gets a gradient.
        teacher_logits: the teacher's logits, of ``student_logits``'s shape and dtype. A constant: no gradient is
            computed for it, even when it requires one (its ``.grad`` stays None).
        target: None, or integer indices of shape ``student_logits.shape[:-1]``: rows whose target equals
            ``ignore_index`` are left out (loss 0 in "none", no gradient, not counted by "mean"). Other values are
            not read.
        beta: in [0, 1], see above.
        temperature: > 0, divides both models' logits.
        ignore_index: the target value of rows to leave out.
        token_weight: None or a floating tensor of ``student_logits.shape[:-1]``: row n's loss and gradient are
            multiplied by ``t_n``; no gradient flows to it.
        reduction: ``"none"`` (the loss of ``student_logits.shape[:-1]``), ``"sum"`` (``Σ t_n l_n``) or ``"mean"``
            (``Σ t_n l_n / Σ t_n`` over kept rows; NaN with a zero gradient when no row is kept, as
            ``cross_entropy``).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"`` (which has no distillation kernel
            and declines).

    Returns:
        The loss in ``student_logits``'s dtype.
    """
    beta, temperature, ignore_index = _check_options(beta, temperature, ignore_index, reduction, backend)
    _check_logits(student_logits, teacher_logits)
    row_shape = tuple(student_logits.shape[:-1])
    _check_rows(target, token_weight, row_shape, student_logits.device, "student_logits.shape[:-1]")
    num_classes = student_logits.shape[-1]
    args = (student_logits.reshape(-1, num_classes), teacher_logits.reshape(-1, num_classes),
            None if target is None else target.reshape(-1),
            None if token_weight is None else token_weight.reshape(-1), beta, temperature, ignore_index, reduction)
    _, impl = _dispatch.resolve("distillation_loss", backend, student_logits.device, *args)
    loss = impl(*args)
    if reduction == "none":
        loss = loss.reshape(row_shape)
    return loss


def _check_head(name: str, input, weight, bias, input_name: str, weight_name: str, bias_name: str) -> None:
    check_floating_tensor(input_name, input, min_dim=1)
    check_floating_tensor(weight_name, weight)
    hidden = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"{weight_name} must have shape (V, H) with H = {input_name}.shape[-1] = {hidden}, got "
                         f"{tuple(weight.shape)} ({input_name} {tuple(input.shape)})")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have at least one row (one class), got shape {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{weight_name} must have {input_name}'s dtype {input.dtype}, got {weight.dtype}")
    check_same_device(weight_name, weight, input)
    if bias is not None:
        check_floating_tensor(bias_name, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape (V,) = ({weight.shape[0]},) with V = "
                             f"{weight_name}.shape[0], got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"{bias_name} must have {input_name}'s dtype {input.dtype}, got {bias.dtype}")
        check_same_device(bias_name, bias, input)


def linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    token_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`distillation_loss` of two linear heads' logits, without materializing either.

    Equals ``distillation_loss(F.linear(student_input, student_weight, student_bias), F.linear(teacher_input,
    teacher_weight, teacher_bias), target, ...)``, values and gradients of ``student_input``, ``student_weight`` and
    ``student_bias``. The teacher's input, weight and bias get no gradient.

    Args:
        student_input: the student's last hidden states ``(*, H_s)``, float16/bfloat16/float32/float64.
        student_weight: the student's head ``(V, H_s)`` (an ``nn.Linear(H_s, V)``'s weight), student_input's dtype.
        teacher_input: the teacher's hidden states ``(*, H_t)``, same leading shape as ``student_input`` and the
            same dtype; ``H_t`` may differ from ``H_s``.
        teacher_weight: the teacher's head ``(V, H_t)``: the same vocabulary V.
        target, beta, temperature, ignore_index, token_weight, reduction: as in :func:`distillation_loss`.
        student_bias, teacher_bias: ``(V,)`` or None.
        chunk_size: rows per chunk, or None for :func:`fusedloss.linear.default_chunk_size` of the larger hidden
            size.
        backend: ``"auto"``, ``"reference"`` (materializes both heads' logits), ``"cpp"`` or ``"triton"``.

    Memory (fused backends): one ``(chunk_size, V)`` logits buffer per model, the student's gradients
    (``grad_weight`` and ``grad_bias`` accumulated in float32 for half inputs). With "mean" or "sum" the gradients
    are computed in the forward pass; with "none" backward runs the chunks again.
    """
    beta, temperature, ignore_index = _check_options(beta, temperature, ignore_index, reduction, backend)
    _check_head("student", student_input, student_weight, student_bias, "student_input", "student_weight",
                "student_bias")
    _check_head("teacher", teacher_input, teacher_weight, teacher_bias, "teacher_input", "teacher_weight",
                "teacher_bias")
    if tuple(teacher_input.shape[:-1]) != tuple(student_input.shape[:-1]):
        raise ValueError(f"teacher_input must have student_input's rows, shape[:-1] = "
                         f"{tuple(student_input.shape[:-1])}, got {tuple(teacher_input.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight must have student_weight's vocabulary V = {student_weight.shape[0]} rows, "
                         f"got {teacher_weight.shape[0]}")
    if teacher_input.dtype != student_input.dtype:
        raise TypeError(f"teacher_input must have student_input's dtype {student_input.dtype}, got "
                        f"{teacher_input.dtype}")
    check_same_device("teacher_input", teacher_input, student_input)
    row_shape = tuple(student_input.shape[:-1])
    _check_rows(target, token_weight, row_shape, student_input.device, "student_input.shape[:-1]")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be None or a positive number of rows, got {chunk_size}")
    x_s = student_input.reshape(-1, student_input.shape[-1])
    x_t = teacher_input.reshape(-1, teacher_input.shape[-1])
    num_classes = student_weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(x_s.shape[0], max(x_s.shape[1], x_t.shape[1]), num_classes,
                                        student_input.device.type)
    args = (x_s, student_weight, x_t, teacher_weight, None if target is None else target.reshape(-1), student_bias,
            teacher_bias, None if token_weight is None else token_weight.reshape(-1), beta, temperature,
            ignore_index, reduction, chunk_size)
    _, impl = _dispatch.resolve("linear_distillation_loss", backend, student_input.device, *args)
    loss = impl(*args)
    if reduction == "none":
        loss = loss.reshape(row_shape)
    return loss


class DistillationLoss(torch.nn.Module):
    """Module form of :func:`distillation_loss`: the options are fixed at construction;
    ``forward(student_logits, teacher_logits, target=None, token_weight=None)``."""

    def __init__(self, *, beta: float = 0.0, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.beta, self.temperature, self.ignore_index = _check_options(beta, temperature, ignore_index, reduction,
                                                                        backend)
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, target, beta=self.beta,
                                 temperature=self.temperature, ignore_index=self.ignore_index,
                                 token_weight=token_weight, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class LinearDistillationLoss(torch.nn.Module):
    """Module form of :func:`linear_distillation_loss`: the options are fixed at construction;
    ``forward(student_input, student_weight, teacher_input, teacher_weight, target=None, student_bias=None,
    teacher_bias=None, token_weight=None)``."""

    def __init__(self, *, beta: float = 0.0, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", chunk_size: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.beta, self.temperature, self.ignore_index = _check_options(beta, temperature, ignore_index, reduction,
                                                                        backend)
        if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
            raise ValueError(f"chunk_size must be None or a positive number of rows, got {chunk_size}")
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, target: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        return linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                        student_bias=student_bias, teacher_bias=teacher_bias, beta=self.beta,
                                        temperature=self.temperature, ignore_index=self.ignore_index,
                                        token_weight=token_weight, reduction=self.reduction,
                                        chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, backend={self.backend!r}")
