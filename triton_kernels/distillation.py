"""Triton backend of ``distillation_loss`` and ``linear_distillation_loss`` (docs/distillation.rst; op contract
in docs/BACKENDS.md).

The row kernel, one program per row of ``student (N, V)`` / ``teacher (N, V)`` (float32 arithmetic whatever the
input dtype), in blocks of at most 4096 columns, with ``a = z_S / τ``, ``b = z_T / τ``::

    pass 1: online max and sum of exponentials of a and of b (both rows read once)
            log P_S = (a − max_a) − log Σ exp(a − max_a),  log P_T likewise
    pass 2: the loss; for β = 0, l = Σ P_T (log P_T − log P_S), and the gradient dl/dz_S = (P_S − P_T) / τ
            is written in the same pass;
            β = 1: l = Σ P_S (log P_S − log P_T);
            else:  log M = logsumexp(log β + log P_T, log(1 − β) + log P_S) (max + log1p(exp(−|u − v|))),
                   A = Σ P_T (log P_T − log M), B = Σ P_S (log P_S − log M), l = β A + (1 − β) B
    pass 3 (β > 0): with g = dl/dP_S (g = log P_S − log P_T for β = 1, the +1 cancels; g = (1 − β)(log P_S −
            log M) otherwise, the terms through M cancel), dl/dz_S = P_S (g − Σ P_S g) / τ, where Σ P_S g is l
            for β = 1 and (1 − β) B otherwise.

Every gradient is multiplied by the row's factor ``d(loss)/d(l_n)``; the gradient may be written over the student's
logits (each block is read before it is written). The teacher is read in its dtype; padding lanes hold -1e30.
The chunk loop of the linear form and the ``torch.library`` registration are in
:mod:`fusedloss._distillation_ops`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fusedloss._distillation_ops import make_backend

_NEG = tl.constexpr(-1.0e30)
_MAX_BLOCK = 4096


@triton.jit
def _distillation_rows_kernel(S, T, FACTORS, GRAD, LOSS, V, stride_s, stride_t, stride_g, inv_tau, beta, log_beta,
                              log_1m_beta, MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = GRAD + row * stride_g
    factor = tl.load(FACTORS + row).to(tl.float32)
    cols0 = tl.arange(0, BLOCK)

    # pass 1: online max / sum of exp of both rows
    m_s = tl.full((), _NEG, tl.float32)
    m_t = tl.full((), _NEG, tl.float32)
    d_s = tl.zeros((), tl.float32)
    d_t = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + cols0
        mask = cols < V
        a = tl.where(mask, tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau, _NEG)
        b = tl.where(mask, tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau, _NEG)
        new_s = tl.maximum(m_s, tl.max(a, axis=0))
        new_t = tl.maximum(m_t, tl.max(b, axis=0))
        d_s = d_s * tl.exp(m_s - new_s) + tl.sum(tl.where(mask, tl.exp(a - new_s), 0.0), axis=0)
        d_t = d_t * tl.exp(m_t - new_t) + tl.sum(tl.where(mask, tl.exp(b - new_t), 0.0), axis=0)
        m_s = new_s
        m_t = new_t
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)

    # pass 2: the loss (and the gradient for β = 0)
    acc_a = tl.zeros((BLOCK,), tl.float32)
    acc_b = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + cols0
        mask = cols < V
        a = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
        b = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
        lps = (a - m_s) - log_d_s
        lpt = (b - m_t) - log_d_t
        ps = tl.exp(lps)
        pt = tl.exp(lpt)
        if MODE == 0:
            acc_a += tl.where(mask, pt * (lpt - lps), 0.0)
            if WRITE_GRAD:
                grad = (ps - pt) * (inv_tau * factor)
                tl.store(g_row + cols, grad.to(GRAD.dtype.element_ty), mask=mask)
        elif MODE == 1:
            acc_a += tl.where(mask, ps * (lps - lpt), 0.0)
        else:
            u = log_beta + lpt
            v = log_1m_beta + lps
            lm = tl.maximum(u, v) + tl.log(1.0 + tl.exp(-tl.abs(u - v)))
            acc_a += tl.where(mask, pt * (lpt - lm), 0.0)
            acc_b += tl.where(mask, ps * (lps - lm), 0.0)
    sum_a = tl.sum(acc_a, axis=0)
    sum_b = tl.sum(acc_b, axis=0)
    if MODE == 2:
        loss = beta * sum_a + (1.0 - beta) * sum_b
    else:
        loss = sum_a
    tl.store(LOSS + row, loss)

    # pass 3: the gradient for β > 0, which needs Σ P_S g first
    if MODE != 0:
        if WRITE_GRAD:
            for off in range(0, V, BLOCK):
                cols = off + cols0
                mask = cols < V
                a = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
                b = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
                lps = (a - m_s) - log_d_s
                lpt = (b - m_t) - log_d_t
                ps = tl.exp(lps)
                if MODE == 1:
                    grad = ps * (lps - lpt - loss) * (inv_tau * factor)
                else:
                    u = log_beta + lpt
                    v = log_1m_beta + lps
                    lm = tl.maximum(u, v) + tl.log(1.0 + tl.exp(-tl.abs(u - v)))
                    grad = ps * (lps - lm - sum_b) * ((1.0 - beta) * inv_tau * factor)
                tl.store(g_row + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


def distillation_rows(student: torch.Tensor, teacher: torch.Tensor, factors: torch.Tensor, beta: float,
                      temperature: float, grad: Optional[torch.Tensor]) -> torch.Tensor:
    """The row kernel of :mod:`fusedloss._distillation_ops`: per-row losses (N,) in float32; writes
    ``factors[n] · dl_n/dz_S`` into ``grad`` when given (which may be ``student``). Rows of factor 0 give loss 0."""
    num_rows, num_classes = student.shape
    losses = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return losses
    mode = 0 if beta == 0 else (1 if beta == 1 else 2)
    block = min(_MAX_BLOCK, triton.next_power_of_2(num_classes))
    write_grad = grad is not None
    g = grad if write_grad else student
    _distillation_rows_kernel[(num_rows,)](
        student, teacher, factors, g, losses, num_classes, student.stride(0), teacher.stride(0), g.stride(0),
        1.0 / temperature, beta, math.log(beta) if 0 < beta < 1 else 0.0,
        math.log1p(-beta) if 0 < beta < 1 else 0.0, MODE=mode, WRITE_GRAD=write_grad, BLOCK=block,
        num_warps=16 if block >= 4096 else 4,
    )
    return torch.where(factors != 0, losses, 0.0)


_distillation_loss, _linear_distillation_loss = make_backend("triton", distillation_rows)


def _reasons(dtype: torch.dtype) -> list[str]:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return [f"computes in float32 for float32/float16/bfloat16 input, got {dtype} "
                "(use the reference or cpp backend for float64)"]
    return []


def distillation_loss_reasons(student, teacher, target, token_weight, beta, temperature, ignore_index,
                              reduction) -> list[str]:
    return _reasons(student.dtype)


def linear_distillation_loss_reasons(student_input, student_weight, teacher_input, teacher_weight, target,
                                     student_bias, teacher_bias, token_weight, beta, temperature, ignore_index,
                                     reduction, chunk_size) -> list[str]:
    return _reasons(student_input.dtype)


def distillation_loss(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction):
    """``distillation_loss`` of docs/BACKENDS.md on rows ``(N, V)``."""
    return _distillation_loss(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction)


def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                             teacher_bias, token_weight, beta, temperature, ignore_index, reduction, chunk_size):
    """``linear_distillation_loss`` of docs/BACKENDS.md on rows ``(N, H_s)`` / ``(N, H_t)``."""
    return _linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                     student_bias, teacher_bias, token_weight, beta, temperature, ignore_index,
                                     reduction, chunk_size)


def launch_configurations() -> list[dict]:
    """Every kernel build the launcher above can ask for, for offline compile checks (tests/test_triton_build.py):
    the three modes with and without the gradient, at the widest block (vocabulary rows, 16 warps) and a small one;
    bfloat16 rows (the float32 math is the same for every dtype)."""
    types = dict(S="*bf16", T="*bf16", FACTORS="*fp32", GRAD="*bf16", LOSS="*fp32", V="i32", stride_s="i64",
                 stride_t="i64", stride_g="i64", inv_tau="fp32", beta="fp32", log_beta="fp32", log_1m_beta="fp32")
    configurations = []
    for block in (_MAX_BLOCK, 128):
        warps = 16 if block >= 4096 else 4
        for mode in (0, 1, 2):
            for write_grad in (True, False):
                constexprs = dict(MODE=mode, WRITE_GRAD=write_grad, BLOCK=block)
                signature = {name: types[name] for name in _distillation_rows_kernel.arg_names
                             if name not in constexprs}
                configurations.append(dict(
                    name=f"_distillation_rows_kernel MODE={mode} WRITE_GRAD={write_grad} BLOCK={block}",
                    kernel=_distillation_rows_kernel, signature=signature, constexprs=constexprs, num_warps=warps))
    return configurations
