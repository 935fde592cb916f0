"""Reference sigmoid and multi-label losses (docs/sigmoid.rst), as plain PyTorch ops (docs/BACKENDS.md).

Every function computes in float32 for float16/bfloat16/float32 input (float64 for float64) and returns
the input's dtype. Inputs arrive validated and flattened by the public layer (``fusedloss.sigmoid``):
the class dimension is last, targets have the input's shape (or ``(N,)`` indices where stated).
"""

from __future__ import annotations

import torch

from fusedloss.reference.softmax import _compute_dtype, focal_power


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """torch's ``binary_cross_entropy_with_logits``: elementwise, with ``w`` = weight and ``P`` = pos_weight,

        l = -w [P y log σ(x) + (1 - y) log σ(-x)]

    ``weight`` and ``pos_weight`` broadcast against ``input`` (pos_weight along the class dimension, last).
    ``reduction``: "none" (input's shape), "sum", "mean" over every element.
    """
    dtype = _compute_dtype(input.dtype)
    logits, target = input.to(dtype), target.to(dtype)
    positive_term = target * torch.nn.functional.logsigmoid(logits)
    if pos_weight is not None:
        positive_term = pos_weight.to(dtype) * positive_term
    loss = -(positive_term + (1 - target) * torch.nn.functional.logsigmoid(-logits))
    if weight is not None:
        loss = weight.to(dtype) * loss
    return _reduce(loss, reduction).to(input.dtype)


def sigmoid_focal_loss(
    input: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float, reduction: str
) -> torch.Tensor:
    """torchvision's ``sigmoid_focal_loss`` (Lin et al., 2017), elementwise:

        p_t = p y + (1 - p)(1 - y),  p = σ(x)
        l   = α_t (1 - p_t)^γ · BCE(x, y),  α_t = α y + (1 - α)(1 - y)  (α_t = 1 when α < 0)

    ``1 - p_t = p (1 - y) + (1 - p) y`` is formed from ``σ(x)`` and ``σ(-x)`` so it stays exact near
    saturation; γ = 0 skips the factor. ``reduction``: "none", "sum", "mean" over every element.
    """
    dtype = _compute_dtype(input.dtype)
    logits, target = input.to(dtype), target.to(dtype)
    loss = binary_cross_entropy_with_logits(logits, target, None, None, "none")
    if gamma != 0:
        one_minus_p_t = torch.sigmoid(logits) * (1 - target) + torch.sigmoid(-logits) * target
        loss = loss * focal_power(one_minus_p_t, gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return _reduce(loss, reduction).to(input.dtype)


def multilabel_soft_margin_loss(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """torch's ``multilabel_soft_margin_loss`` on ``input (N, C)``, multi-hot ``target (N, C)``, per row:

        l_n = -(1/C) Σ_c w_c [y_c log σ(x_c) + (1 - y_c) log σ(-x_c)]

    ``reduction``: "none" -> ``(N,)``, "sum", "mean" over rows.
    """
    loss = binary_cross_entropy_with_logits(input, target, weight, None, "none")
    loss = loss.to(_compute_dtype(input.dtype)).mean(dim=-1)
    return _reduce(loss, reduction).to(input.dtype)


def multilabel_categorical_crossentropy(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """ZLPR (Su, 2020; bert4keras ``multilabel_categorical_crossentropy``) on ``input (N, C)``, multi-hot target:

        l_n = log(1 + Σ_{c: y_c = 0} e^{s_c}) + log(1 + Σ_{c: y_c = 1} e^{-s_c})

    every positive scored above 0 and every negative below it; predict the labels with ``s > 0``. The ``1 +``
    is the logsumexp of the scores with an appended 0. ``reduction``: "none" -> ``(N,)``, "sum", "mean" over rows.
    """
    dtype = _compute_dtype(input.dtype)
    scores = input.to(dtype)
    positive = target.to(torch.bool)
    excluded = torch.tensor(float("-inf"), dtype=dtype, device=input.device)
    zero_column = torch.zeros_like(scores[..., :1])
    negative_scores = torch.cat([torch.where(positive, excluded, scores), zero_column], dim=-1)
    positive_scores = torch.cat([torch.where(positive, -scores, excluded), zero_column], dim=-1)
    loss = torch.logsumexp(negative_scores, dim=-1) + torch.logsumexp(positive_scores, dim=-1)
    return _reduce(loss, reduction).to(input.dtype)


def ghmc_bin_edges(bins: int) -> torch.Tensor:
    """The authors' edges ``i / bins`` for i = 0..bins in float32, the last moved to ``1 + 1e-6`` so g = 1 is inside."""
    edges = torch.arange(bins + 1, dtype=torch.float32) / bins
    edges[-1] += 1e-6
    return edges


def ghmc_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None,
    bins: int,
    momentum: float,
    acc_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GHM-C (Li et al., AAAI 2019) as in the authors' code (libuyu/GHM_Detection, mmdetection's ``GHMC``).

    ``input``, ``target`` (binary, float) of one shape; ``valid`` a bool mask of that shape or None (all valid);
    ``acc_sum`` the ``(bins,)`` float32 moving count per bin (used only when ``momentum > 0``).

        g      = |σ(x) - y|                      (no gradient flows through g)
        bin i  = entries with edges[i] <= g < edges[i+1] among the valid ones, count_i
        tot    = max(number of valid entries, 1),  n = number of non-empty bins
        acc_i  = momentum · acc_i + (1 - momentum) · count_i   for non-empty bins when momentum > 0, else count_i
        w      = tot / acc_{bin(g)} / n   (0 for invalid entries)
        loss   = Σ w · BCE(x, y) / tot

    Returns ``(loss, new_acc_sum)``: a scalar in the input's dtype and the updated ``acc_sum`` (unchanged when
    ``momentum == 0``).
    """
    dtype = _compute_dtype(input.dtype)
    logits, target = input.to(dtype), target.to(dtype)
    valid = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid
    gradient_norm = (torch.sigmoid(logits.detach()) - target).abs()
    # bucketize(right=True) - 1 is the i with edges[i] <= g < edges[i+1], the authors' comparisons exactly;
    # a NaN g lands outside [0, bins) and, as in their loop, in no bin (its NaN loss still reaches the sum)
    bin_index = (
        torch.bucketize(gradient_norm, ghmc_bin_edges(bins).to(device=input.device, dtype=dtype), right=True) - 1
    )
    binned = valid & (bin_index >= 0) & (bin_index < bins)
    bin_index = bin_index.clamp(0, bins - 1)
    bin_count = torch.zeros(bins, dtype=dtype, device=input.device).scatter_add(
        0, bin_index.reshape(-1), binned.reshape(-1).to(dtype)
    )
    total = valid.sum().to(dtype).clamp(min=1.0)
    non_empty = bin_count > 0
    if momentum > 0:
        acc_sum = torch.where(non_empty, momentum * acc_sum + (1 - momentum) * bin_count.to(acc_sum.dtype), acc_sum)
        bin_density = acc_sum.to(dtype)
    else:
        bin_density = bin_count
    bin_weight = torch.where(non_empty, total / bin_density.clamp(min=torch.finfo(dtype).tiny), 0.0)
    bin_weight = bin_weight / non_empty.sum().to(dtype).clamp(min=1.0)
    weights = torch.where(binned, bin_weight[bin_index], 0.0)
    bce = binary_cross_entropy_with_logits(logits, target, None, None, "none")
    return ((weights * bce).sum() / total).to(input.dtype), acc_sum


def log_t(u: torch.Tensor, t: float) -> torch.Tensor:
    """Tempered logarithm ``(u^(1-t) - 1) / (1 - t)``; ``log u`` at t = 1."""
    return torch.log(u) if t == 1.0 else (u.pow(1.0 - t) - 1.0) / (1.0 - t)


def exp_t(u: torch.Tensor, t: float) -> torch.Tensor:
    """Tempered exponential ``relu(1 + (1 - t) u)^(1/(1-t))``; ``exp u`` at t = 1."""
    return torch.exp(u) if t == 1.0 else torch.relu(1.0 + (1.0 - t) * u).pow(1.0 / (1.0 - t))


def tempered_normalization(activations: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """``λ (N, 1)`` with ``Σ_c exp_t(a_c - λ, t) ≈ 1``, the authors' ``compute_normalization``.

    t > 1: their fixed point ``â ← (a - μ) · Z(â)^(1-t)``, Z = Σ exp_t(â), ``num_iters`` times from ``â = a - μ``,
    then ``λ = -log_t(1/Z, t) + μ``. t < 1 (finite support): ``num_iters`` bisection steps on ``λ - μ`` between 0
    and ``-log_t(1/d, t)``, d the number of classes with ``a - μ > -1/(1-t)``. t = 1: logsumexp.
    """
    if t == 1.0:
        return torch.logsumexp(activations, dim=-1, keepdim=True)
    mu = activations.amax(dim=-1, keepdim=True)
    shifted = activations - mu
    if t > 1.0:
        normalized = shifted
        for _ in range(num_iters):
            partition = exp_t(normalized, t).sum(dim=-1, keepdim=True)
            normalized = shifted * partition.pow(1.0 - t)
        partition = exp_t(normalized, t).sum(dim=-1, keepdim=True)
        return -log_t(1.0 / partition, t) + mu
    effective_dim = (shifted > -1.0 / (1.0 - t)).sum(dim=-1, keepdim=True).to(activations.dtype)
    lower = torch.zeros_like(mu)
    upper = -log_t(1.0 / effective_dim, t)
    for _ in range(num_iters):
        middle = (upper + lower) / 2.0
        below_one = exp_t(shifted - middle, t).sum(dim=-1, keepdim=True) < 1.0
        lower = torch.where(below_one, lower, middle)
        upper = torch.where(below_one, middle, upper)
    return (upper + lower) / 2.0 + mu


def tempered_softmax(activations: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """``exp_t(a - λ(a), t)``: probabilities with heavier tails (t > 1) or finite support (t < 1)."""
    return exp_t(activations - tempered_normalization(activations, t, num_iters), t)


class _BiTemperedLoss(torch.autograd.Function):
    """Per-row bi-tempered loss with the authors' explicit gradient.

    The normalization λ is an iterative approximation (bisection has no useful derivative at all), so the
    gradient is the exact one of the loss at the computed probabilities, as the authors' ``custom_gradient``:
    ``d = (p - q) p^(t2-t1) - e Σ_c (p_c - q_c) p_c^(t2-t1)``, escorts ``e = p^t2 / Σ p^t2``.
    """

    @staticmethod
    def forward(ctx, activations, labels, t1, t2, num_iters):
        probs = tempered_softmax(activations, t2, num_iters)
        two_minus_t1 = 2.0 - t1
        per_class = (
            labels * (log_t(labels + 1e-10, t1) - log_t(probs, t1))
            - (labels.pow(two_minus_t1) - probs.pow(two_minus_t1)) / two_minus_t1
        )
        ctx.save_for_backward(probs, labels)
        ctx.temperatures = (t1, t2)
        return per_class.sum(dim=-1)

    @staticmethod
    def backward(ctx, grad_output):
        probs, labels = ctx.saved_tensors
        t1, t2 = ctx.temperatures
        forgotten = (probs - labels) * probs.pow(t2 - t1)
        escorts = probs.pow(t2)
        escorts = escorts / escorts.sum(dim=-1, keepdim=True)
        derivative = forgotten - escorts * forgotten.sum(dim=-1, keepdim=True)
        return grad_output.unsqueeze(-1) * derivative, None, None, None, None


def bi_tempered_logistic_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    t1: float,
    t2: float,
    label_smoothing: float,
    num_iters: int,
    reduction: str,
) -> torch.Tensor:
    """Bi-tempered logistic loss (Amid et al., NeurIPS 2019), the authors' TensorFlow reference.

    ``input (N, C)``; ``target`` int64 ``(N,)`` indices or float ``(N, C)`` probabilities q. Smoothing (theirs):
    ``q ← (1 - C/(C-1) ε) q + ε/(C-1)``: the true class keeps 1 - ε, every other class gets ε/(C-1). With
    ``p = tempered_softmax(x, t2)`` (``num_iters`` normalization steps), per row:

        l = Σ_c [ q_c (log_t(q_c + 1e-10, t1) - log_t(p_c, t1)) - (q_c^(2-t1) - p_c^(2-t1)) / (2 - t1) ]

    t1 = t2 = 1 is softmax cross entropy ``-Σ q log softmax(x)`` (as theirs, without the entropy of q).
    ``reduction``: "none" -> ``(N,)``, "sum", "mean" over rows.
    """
    dtype = _compute_dtype(input.dtype)
    activations = input.to(dtype)
    num_classes = activations.shape[-1]
    if target.is_floating_point():
        labels = target.to(dtype)
    else:
        labels = torch.nn.functional.one_hot(target, num_classes).to(dtype)
    if label_smoothing > 0:
        labels = (1 - num_classes / (num_classes - 1) * label_smoothing) * labels + label_smoothing / (num_classes - 1)
    if t1 == 1.0 and t2 == 1.0:
        loss = -(labels * torch.log_softmax(activations, dim=-1)).sum(dim=-1)
    else:
        loss = _BiTemperedLoss.apply(activations, labels, t1, t2, num_iters)
    return _reduce(loss, reduction).to(input.dtype)
