"""Fused linear + cross entropy for large vocabularies (docs/linear.rst): ``linear_cross_entropy`` and its module.

``linear_cross_entropy(input, linear_weight, target, ...)`` equals
``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` for every option of ``cross_entropy``,
values and gradients, without ever holding the ``(N, V)`` logits: the fused backends run the rows in chunks,
compute each chunk's logits into one reused buffer, turn them into their gradient in the same pass that computes
the loss, and fold that gradient into ``grad_input`` and into the float32 accumulators of ``grad_weight`` and
``grad_bias`` before the next chunk. The arguments are checked here for every backend and flattened to rows.
"""

from __future__ import annotations

import torch

from fusedloss import _dispatch
from fusedloss._validation import (
    check_class_target,
    check_class_weight,
    check_floating_tensor,
    check_int,
    check_same_device,
    check_softmax_options,
)
from fusedloss.softmax import check_token_weight

# Elements of the chunk's logits buffer, at least: below this the per-chunk calls cost more than they save.
_MIN_CHUNK_ELEMENTS = 1 << 20
# Rows per chunk = hidden size // this divisor, per device type (see default_chunk_size).
_HIDDEN_DIVISOR = {"cpu": 2, "cuda": 8}


def default_chunk_size(num_rows: int, hidden: int, num_classes: int, device_type: str = "cpu") -> int:
    """Rows per chunk when ``chunk_size`` is None: ``max(H // d, 2^20 // V, 16)`` rows, at most N, with d = 2 on
    the CPU and 8 on CUDA.

    The chunk's ``(rows, V)`` logits then take 1/d of the memory of the float32 ``(V, H)`` weight gradient, which
    any backward needs anyway, and at least 2^20 elements, so that small vocabularies run in one or a few chunks.
    Every chunk reads the whole weight and reads and writes the whole weight gradient, so fewer rows per chunk
    save memory and cost time where memory bandwidth is scarce: on a CPU (d = 2: at V = 32000, H = 512, 256 rows,
    31 MiB) more than on a GPU (d = 8: at H = 4096, 512 rows).
    """
    divisor = _HIDDEN_DIVISOR.get(device_type, 8)
    rows = max(hidden // divisor, _MIN_CHUNK_ELEMENTS // max(num_classes, 1), 16)
    return max(1, min(rows, num_rows))


def _check(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
           focal_gamma, z_loss, softcap, token_weight, chunk_size, backend):
    """Every argument, with messages that name it (docs/errors.rst). Returns the options as Python numbers and a
    zero-memory stand-in of the logits ``(*, V)`` for the shape checks of the softmax-loss arguments."""
    ignore_index, label_smoothing, focal_gamma, z_loss, softcap = check_softmax_options(
        ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, backend
    )
    input = check_floating_tensor("input", input, min_dim=1)
    linear_weight = check_floating_tensor("linear_weight", linear_weight)
    hidden = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != hidden:
        raise ValueError(
            f"linear_weight must have shape (V, H) with H = input.shape[-1] = {hidden}, "
            f"got {tuple(linear_weight.shape)} (input {tuple(input.shape)})"
        )
    num_classes = linear_weight.shape[0]
    if num_classes == 0:
        raise ValueError("linear_weight must have at least one row (one class), got shape (0, H)")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have input's dtype {input.dtype}, got {linear_weight.dtype}")
    check_same_device("linear_weight", linear_weight, input)
    if linear_bias is not None:
        linear_bias = check_floating_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (num_classes,):
            raise ValueError(
                f"linear_bias must have shape (V,) = ({num_classes},) with V = linear_weight.shape[0], "
                f"got {tuple(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have input's dtype {input.dtype}, got {linear_bias.dtype}")
        check_same_device("linear_bias", linear_bias, input)
    logits = input.new_empty(()).expand(*input.shape[:-1], num_classes)
    check_class_target(logits, target, ignore_index)
    check_class_weight("weight", weight, logits)
    if token_weight is not None:
        check_token_weight(token_weight, logits, target)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be None or a positive number of rows, got {chunk_size}")
    return ignore_index, label_smoothing, focal_gamma, z_loss, softcap, chunk_size


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross entropy of a linear layer's output, without materializing the logits.

    Equals ``fusedloss.cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight, ignore_index,
    reduction, label_smoothing, focal_gamma=..., z_loss=..., softcap=..., token_weight=...)``, values and
    gradients of ``input``, ``linear_weight`` and ``linear_bias``. Argument names follow torch's
    ``F.linear_cross_entropy`` where they overlap.

    Args:
        input: hidden states ``(*, H)``, float16/bfloat16/float32/float64 (e.g. ``(B, T, H)``).
        linear_weight: the head's weight ``(V, H)`` (an ``nn.Linear(H, V)``'s ``weight``), input's dtype.
        target: int64 class indices of shape ``input.shape[:-1]`` (or ``ignore_index``), or class probabilities of
            shape ``(*, V)``.
        linear_bias: the head's bias ``(V,)`` or None.
        weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, token_weight: as in
            :func:`fusedloss.cross_entropy`; no gradient flows to ``weight`` or ``token_weight``.
        chunk_size: rows per chunk, or None for :func:`default_chunk_size` (on a CPU, logits of half the weight
            gradient's memory; on CUDA an eighth; at least 2^20 logits).
        backend: ``"auto"``, ``"reference"`` (materializes the logits), ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Memory (fused backends): the gradients of the inputs (``grad_input``; ``grad_weight`` and ``grad_bias``
    accumulated in float32, float64 for float64 input, plus their copy in the weight's dtype for fp16/bf16) and
    one ``(chunk_size, V)`` logits buffer in input's dtype (and its float32 copy for fp16/bf16 while the weight
    gradient is accumulated). With ``reduction="mean"`` or ``"sum"`` the gradients are computed in the forward
    pass (backward multiplies them by ``grad_output``); with ``"none"`` backward runs the chunks again (one more
    ``input @ linear_weight.T``), since only it knows each row's ``grad_output``.

    Returns:
        A scalar, or the loss of ``input.shape[:-1]`` for ``reduction="none"``, in input's dtype.
    """
    ignore_index, label_smoothing, focal_gamma, z_loss, softcap, chunk_size = _check(
        input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, focal_gamma,
        z_loss, softcap, token_weight, chunk_size, backend
    )
    hidden, num_classes = input.shape[-1], linear_weight.shape[0]
    rows = input.reshape(-1, hidden)
    row_target = target.reshape(-1, num_classes) if target.is_floating_point() else target.reshape(-1)
    row_token_weight = None if token_weight is None else token_weight.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.shape[0], hidden, num_classes, input.device.type)
    args = (rows, linear_weight, row_target, linear_bias, weight, ignore_index, reduction, label_smoothing,
            focal_gamma, z_loss, softcap, row_token_weight, chunk_size)
    _, impl = _dispatch.resolve("linear_cross_entropy", backend, input.device, *args)
    loss = impl(*args)
    if reduction == "none":
        loss = loss.reshape(input.shape[:-1])
    return loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: the options are fixed at construction (a ``weight`` tensor is
    kept as a buffer named ``weight``) and ``forward(input, linear_weight, target, linear_bias=None)``."""

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        focal_gamma: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        ignore_index, label_smoothing, focal_gamma, z_loss, softcap = check_softmax_options(
            ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, backend
        )
        if weight is not None:
            check_floating_tensor("weight", weight)
            if weight.dim() != 1:
                raise ValueError(f"weight must have shape (V,), got {tuple(weight.shape)}")
        if chunk_size is not None and (check_int("chunk_size", chunk_size) < 1):
            raise ValueError(f"chunk_size must be None or a positive number of rows, got {chunk_size}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            focal_gamma=self.focal_gamma,
            z_loss=self.z_loss,
            softcap=self.softcap,
            token_weight=token_weight,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"focal_gamma={self.focal_gamma}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"chunk_size={self.chunk_size}, backend={self.backend!r}"
        )
