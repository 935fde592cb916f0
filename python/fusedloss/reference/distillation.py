"""Reference distillation losses (docs/distillation.rst): the divergence between the student's and the teacher's
softmax, row by row, as plain PyTorch ops with autograd for the backward.

For one row with student logits ``z_S`` and teacher logits ``z_T`` (V classes), temperature ``τ`` and ``β``::

    log P_S = log_softmax(z_S / τ),   log P_T = log_softmax(z_T / τ)
    β = 0:  l = KL(P_T || P_S) = Σ_c P_T (log P_T − log P_S)             (forward KL)
    β = 1:  l = KL(P_S || P_T) = Σ_c P_S (log P_S − log P_T)             (reverse KL)
    else:   log M = logsumexp(log β + log P_T, log(1 − β) + log P_S)
            l = β KL(P_T || M) + (1 − β) KL(P_S || M)                     (generalized Jensen-Shannon)

the generalized JSD of on-policy distillation (GKD), without a ``τ²`` factor. The teacher is a constant: it is
detached, and no gradient reaches it. The arithmetic runs in float32 (float64 when either input is float64); this
backend materializes both rows' log-probabilities in that dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedloss.reference.softmax import token_weighted_reduction


def compute_dtype(student_dtype: torch.dtype, teacher_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (student_dtype, teacher_dtype) else torch.float32


def row_divergence(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """The per-row divergence ``(N,)`` of ``student (N, V)`` from ``teacher (N, V)``, in the compute dtype."""
    dtype = compute_dtype(student.dtype, teacher.dtype)
    log_ps = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    kl_teacher = F.kl_div(log_m, log_pt, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_m, log_ps, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def _reduce(row_loss: torch.Tensor, target: torch.Tensor | None, token_weight: torch.Tensor | None,
            ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if target is None:
        target = torch.zeros(row_loss.shape, dtype=torch.int64, device=row_loss.device)
        ignore_index = -1
    if token_weight is None:
        token_weight = torch.ones(row_loss.shape, dtype=torch.float64, device=row_loss.device)
    kept = target != ignore_index
    row_loss = torch.where(kept, row_loss, torch.zeros_like(row_loss))
    return token_weighted_reduction(row_loss, target, None, ignore_index, reduction, token_weight, False, dtype)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """The loss of ``student (N, V)`` against ``teacher (N, V)``: ``(N,)`` for ``reduction="none"`` (0 on rows whose
    ``target (N,)`` is ``ignore_index``), else ``Σ t_n l_n`` ("sum") or that over ``Σ t_n`` on kept rows ("mean",
    NaN when none is kept), ``t`` the token weights ``(N,)`` (ones when None); in the student's dtype."""
    row_loss = row_divergence(student, teacher, beta, temperature)
    return _reduce(row_loss, target, token_weight, ignore_index, reduction, student.dtype)


def linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
) -> torch.Tensor:
    """:func:`distillation_loss` of both heads' logits, materialized (``chunk_size`` has no meaning here). The
    teacher's head is computed without autograd."""
    del chunk_size
    student = F.linear(student_input, student_weight, student_bias)
    with torch.no_grad():
        teacher = F.linear(teacher_input, teacher_weight, teacher_bias)
    return distillation_loss(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction)
