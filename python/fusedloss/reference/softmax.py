"""Reference softmax losses: cross entropy with label smoothing, class weights, focal factor, z-loss and
logit soft-capping, as plain PyTorch ops with autograd for the backward (docs/BACKENDS.md, ``softmax_loss``).

For one row with logits ``x`` (C classes), per-class weights ``w`` (ones when absent), smoothing ``ε`` and
focusing parameter ``γ``::

    s     = softcap * tanh(x / softcap)            (s = x without softcap)
    log p = log_softmax(s)
    q     = (1 - ε) * onehot(y) + ε / C            (or the given probabilities, smoothed the same way)
    l     = -Σ_c q_c * w_c * (1 - p_c)^γ * log p_c  +  z_loss * logsumexp(s)^2

With ``γ = 0``, ``z_loss = 0`` and no softcap this is ``torch.nn.functional.cross_entropy`` term by term,
including its rule for label smoothing with weights and its ``mean`` divisor.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; half types and float32 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def focal_power(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """``base^γ`` for the focal factor ``(1 - p)^γ``, with finite gradients everywhere.

    For ``0 < γ < 1`` the derivative ``γ base^(γ - 1)`` is infinite at ``base = 0`` (p = 1) and
    overflows just above it, while the loss term ``(1 - p)^γ log p`` has derivative 0 there. Entries
    with ``base`` below the smallest normal number therefore take the factor 0 through a ``where``
    whose other branch never sees them: the loss changes by less than that number times ``-log p``
    (about ``1 - p`` itself), and no inf or NaN reaches the gradient.
    """
    representable = base > torch.finfo(base.dtype).tiny
    safe_base = torch.where(representable, base, torch.ones_like(base))
    return torch.where(representable, safe_base.pow(gamma), torch.zeros_like(base))


def softmax_loss(
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
) -> torch.Tensor:
    """Softmax loss of ``input (N, C)`` against ``target``: int64 ``(N,)`` indices or float ``(N, C)`` probabilities.

    Returns ``(N,)`` for ``reduction="none"`` (0 at rows whose target is ``ignore_index``), else a scalar:
    ``sum``, or ``mean`` = sum / Σ_n w_{y_n} over non-ignored rows (NaN when every row is ignored, as torch),
    sum / number of non-ignored rows when ``mean_by_count``, sum / N for soft targets. The result has the dtype
    of ``input``; the arithmetic runs in float32 (float64 for float64 input). ``inplace_backward`` is a memory
    option of fused backends and has no meaning here.
    """
    del inplace_backward
    compute_dtype = _compute_dtype(input.dtype)
    logits = input.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    num_classes = logits.shape[-1]

    # class_cost[n, c] = -w_c (1 - p_c)^γ log p_c: the loss of row n if all its target mass sat on class c.
    class_cost = -log_probs
    if focal_gamma != 0:  # γ = 0 skips the factor, so the result is cross entropy bit for bit
        # 1 - p as -expm1(log p): exact when p is close to 1, where 1 - exp(log p) cancels
        class_cost = class_cost * focal_power(-torch.expm1(log_probs), focal_gamma)
    if weight is not None:
        weight = weight.to(compute_dtype)
        class_cost = class_cost * weight

    if target.is_floating_point():
        target_probs = target.to(compute_dtype)
        if label_smoothing > 0:
            target_probs = (1.0 - label_smoothing) * target_probs + label_smoothing / num_classes
        row_loss = (target_probs * class_cost).sum(dim=-1)
        if z_loss > 0:
            row_loss = row_loss + z_loss * torch.logsumexp(logits, dim=-1).square()
        divisor = torch.tensor(float(row_loss.shape[0]), dtype=compute_dtype, device=input.device)
    else:
        kept = target != ignore_index
        safe_target = torch.where(kept, target, torch.zeros_like(target)).unsqueeze(-1)
        row_loss = class_cost.gather(-1, safe_target).squeeze(-1)
        if label_smoothing > 0:
            row_loss = (1.0 - label_smoothing) * row_loss + (label_smoothing / num_classes) * class_cost.sum(dim=-1)
        if z_loss > 0:
            row_loss = row_loss + z_loss * torch.logsumexp(logits, dim=-1).square()
        row_loss = torch.where(kept, row_loss, torch.zeros_like(row_loss))
        if weight is not None and not mean_by_count:
            divisor = torch.where(kept, weight[safe_target.squeeze(-1)], torch.zeros_like(row_loss)).sum()
        else:
            divisor = kept.sum().to(compute_dtype)

    if reduction == "none":
        return row_loss.to(input.dtype)
    if reduction == "sum":
        return row_loss.sum().to(input.dtype)
    return (row_loss.sum() / divisor).to(input.dtype)


def kept_weights_and_divisor(t: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t on the kept rows, 0 on rows whose target is ignore_index; Σ_n t_n w_{y_n} over the kept rows)`` for
    per-row weights ``t`` (float64; w = ones without class weights; soft targets keep every row and divide by
    ``Σ_n t_n``): the divisor of ``reduction="mean"`` with token weights (docs/softmax.rst). No host synchronization."""
    if target.is_floating_point():
        return t, t.sum()
    kept = target != ignore_index
    t = torch.where(kept, t, torch.zeros_like(t))
    if weight is None:
        return t, t.sum()
    class_weight = weight.detach().to(torch.float64)[torch.where(kept, target, torch.zeros_like(target))]
    return t, (t * class_weight).sum()


def token_weighted_reduction(
    row_loss: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    token_weight: torch.Tensor,
    mean_by_count: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The token-weighted reduction (docs/softmax.rst) of per-row losses ``row_loss`` (0 at ignored rows) with
    per-row weights ``t``.

    ``none``: ``t_n l_n``; ``sum``: ``Σ_n t_n l_n``; ``mean``: that sum over ``Σ_n t_n w_{y_n}`` over the kept rows
    (``w = 1`` without class weights or when ``mean_by_count``, focal_loss's mean); soft targets: over ``Σ_n t_n``.
    Sums run in float64; the result has ``dtype``. ``token_weight`` gets no gradient. Every row's gradient is
    ``t_n / divisor`` times its own; when every row is ignored the mean is NaN (as torch) and the gradient 0.
    """
    t = token_weight.detach().to(torch.float64)
    kept = None if target.is_floating_point() else target != ignore_index
    _, divisor = kept_weights_and_divisor(t, target, None if mean_by_count else weight, ignore_index)
    loss64 = row_loss.to(torch.float64)
    if reduction == "none":
        return (loss64 * t).to(dtype)
    if reduction == "sum":
        return (loss64 * t).sum().to(dtype)
    scale = t / divisor
    if kept is not None:
        # Ignored rows have loss and gradient 0; a 0 divisor (every row ignored) must not turn them into 0·inf.
        scale = torch.where(kept, scale, torch.zeros_like(scale))
    # The value is (Σ t_n l_n) / divisor (0/0 = NaN when nothing is kept, as torch), rounded as the reduction
    # without token weights rounds; the gradient is that of Σ_n scale_n l_n, finite even then.
    weighted = (loss64 * scale).sum()
    value = (loss64 * t).sum() / divisor
    return (value.detach() + (weighted - weighted.detach())).to(dtype)
