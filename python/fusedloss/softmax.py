"""Softmax losses, public API (docs/softmax.rst): ``cross_entropy``, ``focal_loss`` and their modules.

A call resolves its backend (docs/backends.rst; cached per call signature) and hands its arguments to the backend's
``softmax_loss`` op (docs/BACKENDS.md). The ``fusedloss._C`` op (cpp, cuda) checks every argument itself, in
C++, and flattens ``(*, C)`` to rows there: the eager path runs no Python beyond these functions. For the
reference and Triton backends the arguments are checked here (:mod:`fusedloss._validation`, same messages)
and flattened to rows ``(N, C)``. Checks that read tensor values (target range) run only on CPU tensors and
never while ``torch.compile`` traces, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""

from __future__ import annotations

import torch

from fusedloss import _dispatch
from fusedloss.reference.softmax import token_weighted_reduction
from fusedloss._validation import (  # noqa: F401  (check_* are also imported from here by fusedloss.sigmoid)
    check_bool,
    check_class_input,
    check_class_target,
    check_class_weight,
    check_floating_tensor,
    check_int,
    check_real,
    check_reduction,
    check_same_device,
    check_softmax_options,
    values_checkable,
)

# Python types the ops' schemas take as they are (anything else goes through the Python checks, which convert
# numpy scalars and name the argument of a wrong type).
_REAL = (int, float)


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
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resolves the backend and runs its ``softmax_loss`` op; arguments are checked once, by the op itself
    (fusedloss._C) or here. With ``token_weight`` the op gives the per-row losses and
    :func:`token_weighted_reduction` weighs and reduces them (the same on every backend)."""
    # Options of the types the ops' schemas take as they are.
    exact_options = (
        type(ignore_index) is int
        and type(reduction) is str
        and type(label_smoothing) in _REAL
        and type(focal_gamma) in _REAL
        and type(z_loss) in _REAL
        and (softcap is None or type(softcap) in _REAL)
        and type(inplace_backward) is bool
    )
    key = None  # the decision's cache key, for calls of plain types outside tracing
    if (
        exact_options
        and token_weight is None
        and type(input) is torch.Tensor
        and type(target) is torch.Tensor
        and (weight is None or type(weight) is torch.Tensor)
        and type(backend) is str
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
    ):
        # A call like one made before: the unboxed op the general path below found for it (it checks every
        # argument itself). About half of a one-row call's Python time went to the general path's steps.
        # What the backends' softmax_loss_reasons read (docs/BACKENDS.md): dtypes and requires_grad. Written out
        # here and below, not in a helper: a Python call is a tenth of this path's time.
        key = ("softmax_loss", backend, input.device, torch.is_grad_enabled(), input.dtype, target.dtype,
               target.requires_grad, weight is not None and weight.requires_grad)
        fast = _dispatch._RESOLVED.get((_dispatch.UNBOXED, key))
        if fast is not None:
            return fast(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
                        mean_by_count, inplace_backward)
    if token_weight is not None:
        if not isinstance(input, torch.Tensor) or input.dim() == 0:
            check_class_input(input)  # raises
        check_token_weight(token_weight, input, target)
        check_reduction(reduction)
        row_loss = _softmax_loss(input, target, weight, ignore_index, "none", label_smoothing, focal_gamma, z_loss,
                                 softcap, mean_by_count, inplace_backward, backend)
        return token_weighted_reduction(row_loss, target, weight, ignore_index, reduction, token_weight,
                                        mean_by_count, row_loss.dtype)
    if not (
        exact_options
        and isinstance(input, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and (weight is None or isinstance(weight, torch.Tensor))
    ):
        # Numpy scalars become Python numbers; a wrong type raises TypeError naming the argument.
        ignore_index, label_smoothing, focal_gamma, z_loss, softcap = check_softmax_options(
            ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, backend,
            focal_gamma_name="gamma" if mean_by_count else "focal_gamma",
        )
        check_bool("inplace_backward", inplace_backward)
        check_class_input(input)
        check_class_target(input, target, ignore_index)
        check_class_weight("alpha" if mean_by_count else "weight", weight, input)
    args = (input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
            mean_by_count, inplace_backward)
    device = input.device
    traced = type(backend) is not str or torch.compiler.is_compiling()
    try:
        if traced:
            _, impl = _dispatch.resolve("softmax_loss", backend, device, *args)
        else:
            if key is None:  # the same key as above
                key = ("softmax_loss", backend, device, torch.is_grad_enabled(), input.dtype, target.dtype,
                       target.requires_grad, weight is not None and weight.requires_grad)
            _, impl = _dispatch.resolve_keyed(key, "softmax_loss", backend, device, args)
    except _dispatch.BackendUnavailable:
        _check(*args)  # a bad argument is the better answer than "no backend can run this"
        raise
    if _dispatch.checks_arguments(impl):
        if (
            not traced
            and type(input) is torch.Tensor
            and type(target) is torch.Tensor
            and (weight is None or type(weight) is torch.Tensor)
            and not torch._C._is_torch_function_mode_enabled()
        ):
            fast = _dispatch.unboxed(impl)
            if fast is not None:
                # Remembered (in the dispatcher's cache, so that whatever forgets its decisions forgets this too)
                # for the fast path at the top, which takes calls of exact argument types only.
                _dispatch.remember((_dispatch.UNBOXED, key), fast)
                return fast(*args)
        return impl(*args)
    _check(*args)
    num_classes = input.shape[-1]
    rows = input.reshape(-1, num_classes)
    row_target = target.reshape(-1, num_classes) if target.is_floating_point() else target.reshape(-1)
    loss = impl(rows, row_target, *args[2:])
    if reduction == "none":
        loss = loss.reshape(input.shape[:-1])
    return loss


def _check(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
           mean_by_count, inplace_backward) -> None:
    """The Python checks of every argument, for backends that do not check them."""
    focal_gamma_name = "gamma" if mean_by_count else "focal_gamma"
    check_softmax_options(ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, "auto",
                          focal_gamma_name=focal_gamma_name)
    check_bool("inplace_backward", inplace_backward)
    input = check_class_input(input)
    check_class_target(input, target, ignore_index)
    check_class_weight("alpha" if mean_by_count else "weight", weight, input)


def check_token_weight(token_weight: object, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``token_weight``: a floating tensor of ``target``'s shape (hard targets) or ``input.shape[:-1]`` (soft)."""
    token_weight = check_floating_tensor("token_weight", token_weight)
    shape = tuple(input.shape[:-1])
    if tuple(token_weight.shape) != shape:
        raise ValueError(
            f"token_weight must have one weight per row, shape input.shape[:-1] = {shape}, got "
            f"{tuple(token_weight.shape)}"
        )
    check_same_device("token_weight", token_weight, input)
    return token_weight


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
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
    token_weight: torch.Tensor | None = None,
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
        size_average: torch's deprecated reduction flag, mapped as torch maps it (with torch's warning); leave it
            None and use ``reduction``.
        ignore_index: target value whose rows contribute 0 and are left out of the ``mean`` divisor. With
            probability targets it does not apply and must be negative, as in torch.
        reduce: torch's deprecated reduction flag, see ``size_average``.
        reduction: ``"none"`` (loss of ``target``'s index shape, 0 at ignored positions), ``"sum"``, or
            ``"mean"``: sum / Σ_n w_{y_n} over non-ignored rows (torch's rule; NaN when every row is ignored,
            as torch), sum / N for soft targets.
        label_smoothing: ε in [0, 1], torch's rule (also with ``weight``).
        focal_gamma: γ >= 0; 0 gives exactly ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient >= 0 of ``logsumexp(s)^2`` per non-ignored row (PaLM's auxiliary loss).
        softcap: None or > 0: cap on the logits' magnitude (Gemma 2).
        token_weight: None or a floating tensor of ``input.shape[:-1]`` (one weight per row, e.g. per token):
            row n's loss and gradient are multiplied by ``t_n``, and ``mean`` divides by ``Σ_n t_n w_{y_n}`` over
            non-ignored rows (``Σ_n t_n`` for soft targets). All ones gives the result without it. No gradient
            flows to ``token_weight``.
        inplace_backward: let a fused backend write the gradient over ``input``'s storage (saves one ``(N, C)``
            tensor); ``input`` must not be used after the backward then.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"`` (docs/backends.rst: which
            backend serves which call, and why one declines).

    The positional order is torch's own, ``(input, target, weight, size_average, ignore_index, reduce, reduction,
    label_smoothing)``, so a call written for ``torch.nn.functional.cross_entropy`` runs unchanged; the fusedloss
    options are keyword-only.

    Returns:
        The loss in ``input``'s dtype (computed in float32 for half types): a scalar, or ``target``'s index
        shape for ``reduction="none"``.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return _softmax_loss(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss,
                         softcap, False, inplace_backward, backend, token_weight)


def _alpha_weight(alpha: None | float | torch.Tensor, input: torch.Tensor) -> torch.Tensor | None:
    """``alpha`` (None, a float for every class, or a ``(C,)`` tensor) as the per-class weight of ``softmax_loss``."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor):  # checked with the other arguments
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
    token_weight: torch.Tensor | None = None,
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
        reduction: ``"none"``, ``"sum"``, or ``"mean"``: sum / number of non-ignored rows (a count, not Σα as
            ``cross_entropy``'s class weights would give; NaN when every row is ignored). kornia's
            ``focal_loss`` averages over all N·C elements of its one-hot loss instead, so with no ignored row its
            mean is this one divided by C; torchvision has no softmax focal loss (only :func:`sigmoid_focal_loss`).
        label_smoothing: ε in [0, 1].
        token_weight: None or a floating tensor of ``input.shape[:-1]``: row n's loss and gradient are multiplied
            by ``t_n`` and ``mean`` divides by ``Σ_n t_n`` over non-ignored rows. No gradient flows to it.
        backend: see :func:`cross_entropy`.

    ``focal_loss(alpha=None, gamma=0)`` equals :func:`cross_entropy`.
    """
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        check_class_input(input)  # raises
    weight = _alpha_weight(alpha, input)
    return _softmax_loss(input, target, weight, ignore_index, reduction, label_smoothing, gamma, 0.0, None, True,
                         False, backend, token_weight)


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
        ignore_index, label_smoothing, focal_gamma, z_loss, softcap = check_softmax_options(
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

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            focal_gamma=self.focal_gamma,
            z_loss=self.z_loss,
            softcap=self.softcap,
            token_weight=token_weight,
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
        ignore_index, label_smoothing, gamma, _, _ = check_softmax_options(
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

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        return focal_loss(
            input,
            target,
            self.gamma,
            self.alpha,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            token_weight=token_weight,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, backend={self.backend!r}"
        )
