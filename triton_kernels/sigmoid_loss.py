"""Triton backend of the sigmoid and multi-label ops (docs/BACKENDS.md): binary cross entropy with logits, sigmoid
focal loss, multi-label soft margin, ZLPR, GHM-C and the bi-tempered logistic loss, each with the gradient written by
the forward kernels.

Every kernel computes in float32 (float16/bfloat16/float32 input; float64 is declined, the reference and cpp
backends serve it) and writes the loss and ``∂loss/∂input`` (already divided by the ``mean`` divisor) in one launch
or, for GHM-C and long bi-tempered rows, a few. The backward only multiplies the stored gradient by ``grad_output``
in place: a scalar (skipped on the device when it is exactly 1), one value per row (row losses, ``"none"``) or per
element (elementwise losses, ``"none"``). Nothing about the gradient is computed or allocated when autograd will not
need it.

Math (x the logit, y the target, e = exp(-|x|) in (0, 1] so that nothing overflows):

- ``σ(|x|) = 1 / (1 + e)``, ``σ(-|x|) = e / (1 + e)``, ``softplus(±x) = max(±x, 0) + log1p(e)`` (``-log σ(∓x)``).
- BCE: ``l = w [P y softplus(-x) + (1 - y) softplus(x)]``, ``∂l/∂x = w [(1 - y) σ(x) - P y σ(-x)]``.
- Sigmoid focal (torchvision): ``q = 1 - p_t = σ(x)(1 - y) + σ(-x) y``, ``l = α_t q^γ BCE``,
  ``∂l/∂x = α_t [γ q^(γ-1) σ(x) σ(-x) (1 - 2y) BCE + q^γ ∂BCE/∂x]``; entries with ``q`` at or below float32's smallest
  normal number take factor and derivative 0 (``fusedloss.reference.softmax.focal_power``).
- Multi-label soft margin: the row mean of the weighted BCE, in the same pass.
- ZLPR: two running log-sum-exps per row, ``L_neg = log(1 + Σ_{y=0} e^s)`` and ``L_pos = log(1 + Σ_{y=1} e^-s)``, each
  seeded with the implicit 0 term (max 0, sum 1) and rescaled online across blocks; ``∂l/∂s = e^(s - L_neg)`` on
  negatives and ``-e^(-s - L_pos)`` on positives.
- GHM-C: pass 1 bins ``g = |σ(x) - y|`` of the valid entries against the authors' float32 edges (``tl.histogram`` per
  program, then one atomic add per bin); a one-program kernel turns the counts into the per-bin weight
  ``1 / (acc_i n)`` (= ``tot / acc_i / n / tot``) and the updated moving counts; pass 2 writes ``Σ w BCE`` per program
  and the gradient ``w ∂BCE/∂x``.
- Bi-tempered (Amid et al.): per row, ``μ = max x``; the normalizer λ by exactly ``num_iters`` fixed-point steps on
  the scale ``Z^(1-t2)`` (t2 > 1), ``num_iters`` bisection steps (t2 < 1) or logsumexp (t2 = 1), as the authors'
  ``compute_normalization``; ``p = exp_t(x - λ, t2)``; the loss of the reference and the authors' closed-form
  gradient ``(p - q) p^(t2-t1) - e Σ_c (p_c - q_c) p_c^(t2-t1)``, ``e = p^t2 / Σ p^t2``; t1 = t2 = 1 is
  ``-Σ q log softmax(x)`` with gradient ``p Σq - q``. A row that fits one block (C <= 4096) stays in registers for all
  iterations; longer rows are swept once per iteration.

Rows use the softmax kernels' layout (``softmax_loss._layout``: a tile of rows for small C, one row and blocks of
8192 columns, 4096 for the bi-tempered loss, for long rows). Offsets are int64. Padding lanes hold ``-1e30``, never
``-inf``, and every row sum masks them out, so NaN or Inf in a row (or an element) reaches only that row (element).

Registration: in eager mode each op runs through a plain ``torch.autograd.Function`` (no trip through the
torch.library dispatcher and its Python autograd wrapper per call); while
``torch.compile`` traces, through ``torch.library.custom_op``\\ s (``fusedloss::triton_binary_loss`` and the others
below) with fake implementations and registered autograd, so ``torch.compile(fullgraph=True)`` has no graph break.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from fusedloss.reference.sigmoid import ghmc_bin_edges
from fusedloss.triton_kernels.softmax_loss import _layout

# Finite stand-in for -inf in padding lanes (constexpr: kernels may read no other globals).
_NEG = tl.constexpr(-1.0e30)
# float32's smallest normal number: the focal factor q^γ is 0 at or below it (reference.softmax.focal_power).
_TINY = tl.constexpr(1.1754943508222875e-38)
# Elementwise kernels (BCE, focal, GHM-C): elements per program (BCE / focal: a tile of rows x columns).
_BLOCK = 1024
# Bi-tempered rows hold logits, labels and probabilities at once. From the sm_90 ptxas report (kernels compiled
# offline, no GPU here to time them): a single block of the softmax layout's 8192 columns spills 32 bytes per thread
# (soft targets, 16 warps), 4096 columns do not; rows longer than that sweep blocks of 4096 with 8 warps (16 warps
# spill 8 to 16 bytes there, 8 use 123 registers and none).
_BI_TEMPERED_MAX_BLOCK_C = 4096
_BI_TEMPERED_SWEEP_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Elementwise helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _log1p(e):
    """``log(1 + e)`` for ``e >= 0`` to a few ulps (Kahan: the rounding of ``1 + e`` cancels; libdevice's log1p is
    not in the interpreter)."""
    u = 1.0 + e
    rounded = u == 1.0
    return tl.where(rounded, e, tl.log(u) * (e / tl.where(rounded, 1.0, u - 1.0)))


@triton.jit
def _sigmoid_terms(x):
    """``(σ(x), σ(-x), softplus(x), softplus(-x))`` from ``e = exp(-|x|)``: no overflow, full relative precision."""
    e = tl.exp(-tl.abs(x))
    sigmoid_abs = 1.0 / (1.0 + e)
    sigmoid_neg_abs = e * sigmoid_abs
    log1p_e = _log1p(e)
    positive = x >= 0
    sigmoid = tl.where(positive, sigmoid_abs, sigmoid_neg_abs)
    sigmoid_neg = tl.where(positive, sigmoid_neg_abs, sigmoid_abs)
    return sigmoid, sigmoid_neg, log1p_e + tl.where(positive, x, 0.0), log1p_e + tl.where(positive, 0.0, -x)


@triton.jit
def _bce_terms(x, y, pos_weight):
    """``(l, ∂l/∂x)`` of ``l = P y softplus(-x) + (1 - y) softplus(x)``, and ``(σ(x), σ(-x))``."""
    sigmoid, sigmoid_neg, softplus, softplus_neg = _sigmoid_terms(x)
    positive_mass = pos_weight * y
    loss = positive_mass * softplus_neg + (1.0 - y) * softplus
    dloss = (1.0 - y) * sigmoid - positive_mass * sigmoid_neg
    return loss, dloss, sigmoid, sigmoid_neg


@triton.jit
def _pow(base, exponent):
    """``base^exponent`` for ``base >= 0`` (``0^0 = 1``, ``0^k = 0`` for k > 0); NaN stays NaN."""
    positive = base > 0
    power = tl.exp(exponent * tl.log(tl.where(positive, base, 1.0)))
    return tl.where(positive, power, tl.where(base == 0, tl.where(exponent == 0, 1.0, 0.0), base))


@triton.jit
def _exp_t(u, one_minus_t):
    """Tempered exponential ``relu(1 + (1 - t) u)^(1 / (1 - t))`` (t != 1; the relu keeps NaN)."""
    base = 1.0 + one_minus_t * u
    return _pow(tl.where(base < 0, 0.0, base), 1.0 / one_minus_t)


@triton.jit
def _log_t(u, one_minus_t):
    """Tempered logarithm ``(u^(1 - t) - 1) / (1 - t)`` (t != 1)."""
    return (_pow(u, one_minus_t) - 1.0) / one_minus_t


@triton.jit
def _ghmc_bins(x, y, valid, EDGES, bins):
    """Bin index of ``g = |σ(x) - y|`` with the edges of ``EDGES`` (``edges[i] <= g < edges[i+1]``, exactly the
    authors' comparisons: ``floor(g bins)`` corrected by one step against the stored float32 edges) and whether the
    entry is binned (valid and inside the edges; a NaN g is in no bin). Also returns the BCE terms."""
    loss, dloss, sigmoid, sigmoid_neg = _bce_terms(x, y, 1.0)
    g = tl.abs(sigmoid - y)
    binned = valid & (g >= 0.0) & (g < tl.load(EDGES + bins))
    guess = tl.minimum(tl.maximum((tl.where(binned, g, 0.0) * bins).to(tl.int32), 0), bins - 1)
    below = g < tl.load(EDGES + guess)
    above = g >= tl.load(EDGES + guess + 1)
    index = tl.where(below, guess - 1, tl.where(above, guess + 1, guess))
    return tl.minimum(tl.maximum(index, 0), bins - 1), binned, loss, dloss


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _binary_fwd_kernel(
    X, T, W, stride_w_row, stride_w_col, PW, stride_pw_row, stride_pw_col, LOSS, GRAD,
    n_rows, n_cols, alpha, gamma, grad_scale,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_GAMMA: tl.constexpr, REDUCE: tl.constexpr, WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """BCE with logits (``FOCAL`` false) or sigmoid focal loss over a contiguous ``X`` seen as ``(n_rows, n_cols)``.

    A program owns one ``[ROWS, BLOCK_C]`` tile (row-major over the tiles: one division per program, none per
    element), so the broadcast ``W`` / ``PW`` (weight and pos_weight, strides may be 0) are indexed directly.
    ``REDUCE``: ``LOSS`` gets one float32 partial sum per program, else the per-element loss (``X``'s dtype).
    """
    pid = tl.program_id(0)
    column_blocks = tl.cdiv(n_cols, BLOCK_C)
    pid_row = pid // column_blocks
    pid_col = pid % column_blocks
    rows = pid_row.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = pid_col * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offsets, mask=in_range, other=0.0).to(tl.float32)
    y = tl.load(T + offsets, mask=in_range, other=0.0).to(tl.float32)
    if HAS_POS_WEIGHT:
        pos_weight_at = PW + rows[:, None] * stride_pw_row + cols[None, :] * stride_pw_col
        pos_weight = tl.load(pos_weight_at, mask=in_range, other=0.0).to(tl.float32)
    else:
        pos_weight = 1.0
    loss, dloss, sigmoid, sigmoid_neg = _bce_terms(x, y, pos_weight)
    if FOCAL:
        if HAS_GAMMA:
            one_minus_p_t = sigmoid * (1.0 - y) + sigmoid_neg * y
            representable = one_minus_p_t > _TINY
            safe = tl.where(representable, one_minus_p_t, 1.0)
            factor = tl.where(representable, tl.exp(gamma * tl.log(safe)), 0.0)
            dfactor = gamma * (factor / safe) * (sigmoid * sigmoid_neg) * (1.0 - 2.0 * y)
            dloss = dfactor * loss + factor * dloss
            loss = factor * loss
        if HAS_ALPHA:
            alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
            loss = alpha_t * loss
            dloss = alpha_t * dloss
    if HAS_WEIGHT:
        weight_at = W + rows[:, None] * stride_w_row + cols[None, :] * stride_w_col
        weight = tl.load(weight_at, mask=in_range, other=0.0).to(tl.float32)
        loss = weight * loss
        dloss = weight * dloss
    if REDUCE:
        tile_sum = tl.sum(tl.sum(tl.where(in_range, loss, 0.0), axis=1), axis=0)
        tl.store(LOSS + pid, tile_sum)
    else:
        tl.store(LOSS + offsets, loss.to(LOSS.dtype.element_ty), mask=in_range)
    if WRITE_GRAD:
        tl.store(GRAD + offsets, (dloss * grad_scale).to(GRAD.dtype.element_ty), mask=in_range)


@triton.jit
def _soft_margin_fwd_kernel(
    X, stride_x, T, stride_t, W, LOSS, GRAD, stride_g, n_rows, n_cols, inv_cols, grad_scale,
    HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Multi-label soft margin: ``LOSS[n] = (1/C) Σ_c w_c BCE(x_nc, y_nc)`` (float32) and its gradient, one sweep."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    t_rows = T + rows[:, None] * stride_t
    g_rows = GRAD + rows[:, None] * stride_g
    total = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(t_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        loss, dloss, _, _ = _bce_terms(x, y, 1.0)
        if HAS_WEIGHT:
            weight = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            loss = weight * loss
            dloss = weight * dloss
        total += tl.sum(tl.where(mask, loss, 0.0), axis=1)
        if WRITE_GRAD:
            tl.store(g_rows + cols[None, :], (dloss * (inv_cols * grad_scale)).to(GRAD.dtype.element_ty), mask=mask)
    tl.store(LOSS + rows, total * inv_cols, mask=row_ok)


@triton.jit
def _zlpr_scores(x_rows, t_rows, cols, mask):
    """One block of ZLPR: ``(s, positive, negative scores, negated positive scores)``, ``-1e30`` outside each group."""
    s = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    positive = tl.load(t_rows + cols[None, :], mask=mask, other=0) != 0
    return s, positive, tl.where(mask & ~positive, s, _NEG), tl.where(mask & positive, -s, _NEG)


@triton.jit
def _online_logsumexp(m, d, block):
    """Merge a block into the running ``(max, Σ exp(· - max))`` of each row (Milakov & Gimelshein)."""
    m_new = tl.maximum(m, tl.max(block, axis=1))
    return m_new, d * tl.exp(m - m_new) + tl.sum(tl.exp(block - m_new[:, None]), axis=1)


@triton.jit
def _zlpr_store_grad(g_rows, cols, mask, s, positive, lse_neg, lse_pos, grad_scale):
    grad = tl.where(positive, -tl.exp(-s - lse_pos[:, None]), tl.exp(s - lse_neg[:, None]))
    tl.store(g_rows + cols[None, :], (grad * grad_scale).to(g_rows.dtype.element_ty), mask=mask)


@triton.jit
def _zlpr_fwd_kernel(
    X, stride_x, T, stride_t, LOSS, GRAD, stride_g, n_rows, n_cols, grad_scale,
    WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """ZLPR per row into ``LOSS`` (float32) and its gradient; ``SINGLE_BLOCK`` keeps the row in registers."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    t_rows = T + rows[:, None] * stride_t
    g_rows = GRAD + rows[:, None] * stride_g
    col_base = tl.arange(0, BLOCK_C)
    # The implicit 0 score of each group: running max 0, running sum e^0 = 1.
    m_neg = tl.zeros([ROWS], tl.float32)
    d_neg = tl.full([ROWS], 1.0, tl.float32)
    m_pos = tl.zeros([ROWS], tl.float32)
    d_pos = tl.full([ROWS], 1.0, tl.float32)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (col_base < n_cols)[None, :]
        s, positive, negative_scores, positive_scores = _zlpr_scores(x_rows, t_rows, col_base, mask)
        m_neg, d_neg = _online_logsumexp(m_neg, d_neg, negative_scores)
        m_pos, d_pos = _online_logsumexp(m_pos, d_pos, positive_scores)
    else:
        for start in range(0, n_cols, BLOCK_C):
            cols = start + col_base
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            _, _, negative_scores, positive_scores = _zlpr_scores(x_rows, t_rows, cols, mask)
            m_neg, d_neg = _online_logsumexp(m_neg, d_neg, negative_scores)
            m_pos, d_pos = _online_logsumexp(m_pos, d_pos, positive_scores)
    lse_neg = m_neg + tl.log(d_neg)
    lse_pos = m_pos + tl.log(d_pos)
    tl.store(LOSS + rows, lse_neg + lse_pos, mask=row_ok)
    if WRITE_GRAD:
        if SINGLE_BLOCK:
            _zlpr_store_grad(g_rows, col_base, mask, s, positive, lse_neg, lse_pos, grad_scale)
        else:
            for start in range(0, n_cols, BLOCK_C):
                cols = start + col_base
                mask = row_ok[:, None] & (cols < n_cols)[None, :]
                s, positive, _, _ = _zlpr_scores(x_rows, t_rows, cols, mask)
                _zlpr_store_grad(g_rows, cols, mask, s, positive, lse_neg, lse_pos, grad_scale)


@triton.jit
def _ghmc_histogram_kernel(X, T, VALID, EDGES, COUNT, n_elements, bins,
                           HAS_VALID: tl.constexpr, BINS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """``COUNT[i] +=`` the binned entries of bin i (int64), ``COUNT[bins] +=`` the valid entries."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n_elements
    x = tl.load(X + offsets, mask=valid, other=0.0).to(tl.float32)
    y = tl.load(T + offsets, mask=valid, other=0.0).to(tl.float32)
    if HAS_VALID:
        valid = valid & (tl.load(VALID + offsets, mask=valid, other=0) != 0)
    index, binned, _, _ = _ghmc_bins(x, y, valid, EDGES, bins)
    counts = tl.histogram(index, BINS_PAD, mask=binned)
    bin_ids = tl.arange(0, BINS_PAD)
    tl.atomic_add(COUNT + bin_ids, counts.to(tl.int64), mask=bin_ids < bins)
    tl.atomic_add(COUNT + bins, tl.sum(valid.to(tl.int64), axis=0))


@triton.jit
def _ghmc_weights_kernel(COUNT, ACC_SUM, NEW_ACC_SUM, WEIGHT, bins, momentum, one_minus_momentum,
                         HAS_MOMENTUM: tl.constexpr, BINS_PAD: tl.constexpr):
    """One program: ``WEIGHT[i] = tot / acc_i / n / tot`` (0 for empty bins) and the updated moving counts."""
    bin_ids = tl.arange(0, BINS_PAD)
    in_range = bin_ids < bins
    count = tl.load(COUNT + bin_ids, mask=in_range, other=0).to(tl.float32)
    total = tl.maximum(tl.load(COUNT + bins).to(tl.float32), 1.0)
    non_empty = count > 0
    acc_sum = tl.load(ACC_SUM + bin_ids, mask=in_range, other=0.0)
    if HAS_MOMENTUM:
        acc_sum = tl.where(non_empty, momentum * acc_sum + one_minus_momentum * count, acc_sum)
        density = acc_sum
    else:
        density = count
    tl.store(NEW_ACC_SUM + bin_ids, acc_sum, mask=in_range)
    num_non_empty = tl.maximum(tl.sum(non_empty.to(tl.float32), axis=0), 1.0)
    weight = tl.where(non_empty, total / tl.where(non_empty, tl.maximum(density, _TINY), 1.0), 0.0) / num_non_empty
    tl.store(WEIGHT + bin_ids, weight / total, mask=in_range)


@triton.jit
def _ghmc_loss_kernel(X, T, VALID, EDGES, WEIGHT, PARTIAL, GRAD, n_elements, bins,
                      HAS_VALID: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """``PARTIAL[program] = Σ w BCE`` over its entries (w already divided by tot) and ``GRAD = w ∂BCE/∂x``."""
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n_elements
    x = tl.load(X + offsets, mask=in_range, other=0.0).to(tl.float32)
    y = tl.load(T + offsets, mask=in_range, other=0.0).to(tl.float32)
    valid = in_range
    if HAS_VALID:
        valid = valid & (tl.load(VALID + offsets, mask=in_range, other=0) != 0)
    index, binned, loss, dloss = _ghmc_bins(x, y, valid, EDGES, bins)
    # Weight 0 outside the bins, multiplied in as the authors do: a NaN or Inf loss there still reaches the sum.
    weight = tl.load(WEIGHT + index, mask=binned, other=0.0)
    tl.store(PARTIAL + pid, tl.sum(tl.where(in_range, weight * loss, 0.0), axis=0))
    if WRITE_GRAD:
        tl.store(GRAD + offsets, (weight * dloss).to(GRAD.dtype.element_ty), mask=in_range)


@triton.jit
def _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET: tl.constexpr):
    """One block of the bi-tempered loss: logits ``a`` (``-1e30`` in padding) and smoothed labels ``q`` (0 there)."""
    a = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HARD_TARGET:
        q = tl.where(cols[None, :] == y[:, None], target_mass, 0.0) + spread
    else:
        q = target_mass * tl.load(t_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) + spread
    return tl.where(mask, a, _NEG), tl.where(mask, q, 0.0)


@triton.jit
def _bt_partition(a, mask, mu, shift, one_minus_t2, FIXED_POINT: tl.constexpr):
    """Block part of ``Σ exp_t(â)`` with ``â = (a - μ) · shift`` (fixed point) or ``a - μ - shift`` (bisection)."""
    if FIXED_POINT:
        normalized = (a - mu[:, None]) * shift[:, None]
    else:
        normalized = (a - mu[:, None]) - shift[:, None]
    return tl.sum(tl.where(mask, _exp_t(normalized, one_minus_t2), 0.0), axis=1)


@triton.jit
def _bt_probs(a, mask, lam, one_minus_t2, T2_MODE: tl.constexpr):
    """``p = exp_t(a - λ, t2)`` (``exp`` at t2 = 1), 0 in padding."""
    if T2_MODE == 0:
        p = tl.exp(a - lam[:, None])
    else:
        p = _exp_t(a - lam[:, None], one_minus_t2)
    return tl.where(mask, p, 0.0)


@triton.jit
def _bt_row_terms(a, q, p, mask, lam, t1, t2, one_minus_t1, two_minus_t1,
                  CROSS_ENTROPY: tl.constexpr, T1_IS_ONE: tl.constexpr):
    """Block sums of the loss and of what the gradient needs: ``(loss, Σ p^t2, Σ (p - q) p^(t2-t1))``, or for
    cross entropy ``(-Σ q log p, Σ q, 0)``."""
    if CROSS_ENTROPY:
        loss = tl.sum(tl.where(mask, -q * (a - lam[:, None]), 0.0), axis=1)
        return loss, tl.sum(q, axis=1), tl.zeros_like(loss)
    else:
        if T1_IS_ONE:
            log_q = tl.log(q + 1e-10)
            log_p = tl.log(p)
        else:
            log_q = _log_t(q + 1e-10, one_minus_t1)
            log_p = _log_t(p, one_minus_t1)
        per_class = q * (log_q - log_p) - (_pow(q, two_minus_t1) - _pow(p, two_minus_t1)) / two_minus_t1
        loss = tl.sum(tl.where(mask, per_class, 0.0), axis=1)
        escort = tl.sum(tl.where(mask, _pow(p, t2), 0.0), axis=1)
        forgotten = tl.sum(tl.where(mask, (p - q) * _pow(p, t2 - t1), 0.0), axis=1)
        return loss, escort, forgotten


@triton.jit
def _bt_store_grad(g_rows, cols, mask, q, p, t1, t2, escort_sum, forgotten_sum, grad_scale,
                   CROSS_ENTROPY: tl.constexpr):
    if CROSS_ENTROPY:
        grad = p * escort_sum[:, None] - q  # escort_sum holds Σ q here
    else:
        escorts = _pow(p, t2) / escort_sum[:, None]
        grad = (p - q) * _pow(p, t2 - t1) - escorts * forgotten_sum[:, None]
    tl.store(g_rows + cols[None, :], (grad * grad_scale).to(g_rows.dtype.element_ty), mask=mask)


@triton.jit
def _bi_tempered_fwd_kernel(
    X, stride_x, T, stride_t, LOSS, GRAD, stride_g, n_rows, n_cols,
    t1, t2, target_mass, spread, num_iters, grad_scale,
    HARD_TARGET: tl.constexpr, T2_MODE: tl.constexpr, CROSS_ENTROPY: tl.constexpr, T1_IS_ONE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """Bi-tempered loss per row into ``LOSS`` (float32) and the authors' gradient into ``GRAD``.

    ``T2_MODE``: 0 for t2 = 1 (logsumexp), 1 for t2 > 1 (fixed point), 2 for t2 < 1 (bisection). ``T`` holds int64
    indices ``(N,)`` (``HARD_TARGET``) or probabilities ``(N, C)``; labels are ``target_mass · t + spread``.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    t_rows = T + rows[:, None] * stride_t
    g_rows = GRAD + rows[:, None] * stride_g
    col_base = tl.arange(0, BLOCK_C)
    if HARD_TARGET:
        y = tl.load(T + rows * stride_t, mask=row_ok, other=-1)
    else:
        y = rows
    one_minus_t1 = 1.0 - t1
    one_minus_t2 = 1.0 - t2
    two_minus_t1 = 2.0 - t1

    # μ = row max (and, at t2 = 1, the running sum of exp for logsumexp).
    mu = tl.full([ROWS], _NEG, tl.float32)
    exp_sum = tl.zeros([ROWS], tl.float32)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (col_base < n_cols)[None, :]
        a, q = _bt_block(x_rows, t_rows, y, col_base, mask, target_mass, spread, HARD_TARGET)
        mu = tl.max(a, axis=1)
        if T2_MODE == 0:
            exp_sum = tl.sum(tl.where(mask, tl.exp(a - mu[:, None]), 0.0), axis=1)
    else:
        for start in range(0, n_cols, BLOCK_C):
            cols = start + col_base
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            a = _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET)[0]
            if T2_MODE == 0:
                mu, exp_sum = _online_logsumexp(mu, exp_sum, a)
            else:
                mu = tl.maximum(mu, tl.max(a, axis=1))

    # λ, by exactly num_iters steps as the authors' compute_normalization.
    if T2_MODE == 0:
        lam = mu + tl.log(exp_sum)
    elif T2_MODE == 1:
        scale = tl.full([ROWS], 1.0, tl.float32)
        partition = tl.zeros([ROWS], tl.float32)
        for _ in range(num_iters + 1):
            if SINGLE_BLOCK:
                partition = _bt_partition(a, mask, mu, scale, one_minus_t2, True)
            else:
                partition = tl.zeros([ROWS], tl.float32)
                for start in range(0, n_cols, BLOCK_C):
                    cols = start + col_base
                    mask = row_ok[:, None] & (cols < n_cols)[None, :]
                    a = _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET)[0]
                    partition += _bt_partition(a, mask, mu, scale, one_minus_t2, True)
            scale = _pow(partition, one_minus_t2)
        # After the last sweep partition = Z(â) of the final â, as their closing exp_t sum.
        lam = mu - _log_t(1.0 / partition, one_minus_t2)
    else:
        threshold = -1.0 / one_minus_t2
        effective_dim = tl.zeros([ROWS], tl.float32)
        if SINGLE_BLOCK:
            effective_dim = tl.sum(tl.where(mask & (a - mu[:, None] > threshold), 1.0, 0.0), axis=1)
        else:
            for start in range(0, n_cols, BLOCK_C):
                cols = start + col_base
                mask = row_ok[:, None] & (cols < n_cols)[None, :]
                a = _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET)[0]
                effective_dim += tl.sum(tl.where(mask & (a - mu[:, None] > threshold), 1.0, 0.0), axis=1)
        effective_dim = tl.where(row_ok, effective_dim, 1.0)
        lower = tl.zeros([ROWS], tl.float32)
        upper = -_log_t(1.0 / effective_dim, one_minus_t2)
        for _ in range(num_iters):
            middle = (upper + lower) / 2.0
            if SINGLE_BLOCK:
                partition = _bt_partition(a, mask, mu, middle, one_minus_t2, False)
            else:
                partition = tl.zeros([ROWS], tl.float32)
                for start in range(0, n_cols, BLOCK_C):
                    cols = start + col_base
                    mask = row_ok[:, None] & (cols < n_cols)[None, :]
                    a = _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET)[0]
                    partition += _bt_partition(a, mask, mu, middle, one_minus_t2, False)
            below_one = partition < 1.0
            lower = tl.where(below_one, lower, middle)
            upper = tl.where(below_one, middle, upper)
        lam = (upper + lower) / 2.0 + mu

    # Loss and the row sums of the gradient.
    if SINGLE_BLOCK:
        p = _bt_probs(a, mask, lam, one_minus_t2, T2_MODE)
        loss, escort_sum, forgotten_sum = _bt_row_terms(a, q, p, mask, lam, t1, t2, one_minus_t1, two_minus_t1,
                                                        CROSS_ENTROPY, T1_IS_ONE)
    else:
        loss = tl.zeros([ROWS], tl.float32)
        escort_sum = tl.zeros([ROWS], tl.float32)
        forgotten_sum = tl.zeros([ROWS], tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + col_base
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            a, q = _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET)
            p = _bt_probs(a, mask, lam, one_minus_t2, T2_MODE)
            block_loss, block_escort, block_forgotten = _bt_row_terms(a, q, p, mask, lam, t1, t2, one_minus_t1,
                                                                      two_minus_t1, CROSS_ENTROPY, T1_IS_ONE)
            loss += block_loss
            escort_sum += block_escort
            forgotten_sum += block_forgotten
    tl.store(LOSS + rows, loss, mask=row_ok)

    if WRITE_GRAD:
        if SINGLE_BLOCK:
            _bt_store_grad(g_rows, col_base, mask, q, p, t1, t2, escort_sum, forgotten_sum, grad_scale, CROSS_ENTROPY)
        else:
            for start in range(0, n_cols, BLOCK_C):
                cols = start + col_base
                mask = row_ok[:, None] & (cols < n_cols)[None, :]
                a, q = _bt_block(x_rows, t_rows, y, cols, mask, target_mass, spread, HARD_TARGET)
                p = _bt_probs(a, mask, lam, one_minus_t2, T2_MODE)
                _bt_store_grad(g_rows, cols, mask, q, p, t1, t2, escort_sum, forgotten_sum, grad_scale,
                               CROSS_ENTROPY)


@triton.jit
def _scale_grad_kernel(GRAD, GRAD_OUT, stride_go, n_elements, n_cols, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """``GRAD *= grad_output`` in place over a flat contiguous ``GRAD``: one scalar, or ``GRAD_OUT[row]`` per row of
    ``n_cols`` (``PER_ROW``). A scalar of exactly 1 (``loss.backward()``) skips the traffic."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n_elements
    if PER_ROW:
        factor = tl.load(GRAD_OUT + (offsets // n_cols) * stride_go, mask=in_range, other=0.0).to(tl.float32)
        grad = tl.load(GRAD + offsets, mask=in_range, other=0.0).to(tl.float32)
        tl.store(GRAD + offsets, (grad * factor).to(GRAD.dtype.element_ty), mask=in_range)
    else:
        factor = tl.load(GRAD_OUT).to(tl.float32)
        if factor != 1.0:
            grad = tl.load(GRAD + offsets, mask=in_range, other=0.0).to(tl.float32)
            tl.store(GRAD + offsets, (grad * factor).to(GRAD.dtype.element_ty), mask=in_range)


# ----------------------------------------------------------------------------------------------
# Launchers: each returns (loss, grad[, new_acc_sum]); grad is ∂loss/∂input (input's shape, contiguous), or an
# empty tensor when compute_grad is False
# ----------------------------------------------------------------------------------------------


def _grad_buffer(input: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    return torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad else input.new_empty(0)


def _reduce_rows(row_loss: torch.Tensor, input: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row float32 losses to the op's result in ``input``'s dtype."""
    if reduction == "none":
        return row_loss.to(input.dtype)
    if reduction == "sum":
        return row_loss.sum().to(input.dtype)
    return (row_loss.sum() / row_loss.numel()).to(input.dtype)


def _mean_scale(reduction: str, count: int) -> float:
    return 1.0 / count if reduction == "mean" and count > 0 else 1.0


def _unit_columns(tensor: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` with unit column stride (rows may be strided); bool viewed as uint8 (no copy)."""
    if tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.contiguous()
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor


def _broadcast_rows(weight: Optional[torch.Tensor], shape: torch.Size, n_rows: int, n_cols: int):
    """``weight`` broadcast to ``shape`` seen as ``(n_rows, n_cols)``: ``(tensor, row stride, column stride)``, a view
    (strides 0 along broadcast dimensions) whenever the broadcast allows it, as for ``(C,)``, scalar or full shapes."""
    if weight is None:
        return None, 0, 0
    rows = weight.expand(shape).reshape(n_rows, n_cols)
    return rows, rows.stride(0), rows.stride(1)


def _element_tile(n_rows: int, n_cols: int) -> tuple[int, int]:
    """``(ROWS, BLOCK_C)`` of the elementwise BCE / focal kernel: tiles of about ``_BLOCK`` elements."""
    block_c = min(max(triton.next_power_of_2(n_cols), 2), _BLOCK)
    return max(1, min(_BLOCK // block_c, triton.next_power_of_2(max(n_rows, 1)))), block_c


def _binary_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor],
    alpha: float,
    gamma: float,
    focal: bool,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE with logits (``focal=False``: weight, pos_weight) or sigmoid focal loss (alpha, gamma) of any shape."""
    x = _flat(input)
    n_elements = x.numel()
    n_cols = x.shape[-1] if x.dim() > 0 else 1
    n_rows = n_elements // n_cols if n_cols > 0 else 0
    weight_rows, stride_w_row, stride_w_col = _broadcast_rows(weight, x.shape, n_rows, n_cols)
    pos_weight_rows, stride_pw_row, stride_pw_col = _broadcast_rows(pos_weight, x.shape, n_rows, n_cols)
    grad = _grad_buffer(x, compute_grad)
    rows, block_c = _element_tile(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, rows) * triton.cdiv(n_cols, block_c),)
    reduce = reduction != "none"
    loss = torch.empty(grid[0], dtype=torch.float32, device=x.device) if reduce else torch.empty_like(x)
    if n_elements > 0:
        _binary_fwd_kernel[grid](
            x, _flat(target), weight_rows if weight is not None else x, stride_w_row, stride_w_col,
            pos_weight_rows if pos_weight is not None else x, stride_pw_row, stride_pw_col, loss,
            grad if compute_grad else x, n_rows, n_cols, alpha, gamma, _mean_scale(reduction, n_elements),
            HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None, FOCAL=focal,
            HAS_ALPHA=alpha >= 0, HAS_GAMMA=gamma != 0, REDUCE=reduce, WRITE_GRAD=compute_grad,
            ROWS=rows, BLOCK_C=block_c,
        )
    if not reduce:
        return loss, grad
    total = loss.sum()
    if reduction == "mean":
        total = total / n_elements
    return total.to(input.dtype), grad


def _row_launch(n_rows: int, n_cols: int, max_block_c: Optional[int] = None) -> tuple[tuple[int], int, int, int]:
    """``(grid, ROWS, BLOCK_C, num_warps)`` of the softmax kernels' row layout, blocks capped at ``max_block_c``."""
    block_c = None if max_block_c is None else min(max(triton.next_power_of_2(n_cols), 2), max_block_c)
    rows, block, num_warps = _layout(n_rows, n_cols, block_c, None)
    return (triton.cdiv(n_rows, rows),), rows, block, num_warps


def _bi_tempered_launch(n_rows: int, n_cols: int) -> tuple[tuple[int], int, int, int]:
    grid, rows, block, num_warps = _row_launch(n_rows, n_cols, _BI_TEMPERED_MAX_BLOCK_C)
    return grid, rows, block, (num_warps if n_cols <= block else min(num_warps, _BI_TEMPERED_SWEEP_WARPS))


def _multilabel_soft_margin_loss(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: str, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x, t = _unit_columns(input), _unit_columns(target)
    n_rows, n_cols = x.shape
    grad = _grad_buffer(x, compute_grad)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        grid, rows, block, num_warps = _row_launch(n_rows, n_cols)
        _soft_margin_fwd_kernel[grid](
            x, x.stride(0), t, t.stride(0), weight if weight is not None else x, row_loss,
            grad if compute_grad else x, grad.stride(0) if compute_grad else 0, n_rows, n_cols, 1.0 / n_cols,
            _mean_scale(reduction, n_rows),
            HAS_WEIGHT=weight is not None, WRITE_GRAD=compute_grad, ROWS=rows, BLOCK_C=block, num_warps=num_warps,
        )
    return _reduce_rows(row_loss, input, reduction), grad


def _multilabel_categorical_crossentropy(
    input: torch.Tensor, target: torch.Tensor, reduction: str, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x, t = _unit_columns(input), _unit_columns(target)
    n_rows, n_cols = x.shape
    grad = _grad_buffer(x, compute_grad)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        grid, rows, block, num_warps = _row_launch(n_rows, n_cols)
        _zlpr_fwd_kernel[grid](
            x, x.stride(0), t, t.stride(0), row_loss, grad if compute_grad else x,
            grad.stride(0) if compute_grad else 0, n_rows, n_cols, _mean_scale(reduction, n_rows),
            WRITE_GRAD=compute_grad, ROWS=rows, BLOCK_C=block, SINGLE_BLOCK=n_cols <= block, num_warps=num_warps,
        )
    return _reduce_rows(row_loss, input, reduction), grad


_EDGES: Dict[tuple[int, torch.device], torch.Tensor] = {}


def _ghmc_edges(bins: int, device: torch.device) -> torch.Tensor:
    """The reference's float32 bin edges on ``device``, built once per (bins, device)."""
    key = (bins, device)
    if key not in _EDGES:
        _EDGES[key] = ghmc_bin_edges(bins).to(device)
    return _EDGES[key]


def _ghmc_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor],
    bins: int,
    momentum: float,
    acc_sum: torch.Tensor,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, t = _flat(input), _flat(target)
    valid = _flat(valid) if valid is not None else None
    n_elements = x.numel()
    edges = _ghmc_edges(bins, x.device)
    bins_pad = max(triton.next_power_of_2(bins), 2)
    programs = triton.cdiv(n_elements, _BLOCK)
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=x.device)  # per bin, then the number of valid entries
    if n_elements > 0:
        _ghmc_histogram_kernel[(programs,)](
            x, t, valid if valid is not None else x, edges, counts, n_elements, bins,
            HAS_VALID=valid is not None, BINS_PAD=bins_pad, BLOCK=_BLOCK,
        )
    new_acc_sum = torch.empty(bins, dtype=torch.float32, device=x.device)
    weight = torch.empty(bins, dtype=torch.float32, device=x.device)
    _ghmc_weights_kernel[(1,)](
        counts, acc_sum.to(torch.float32).contiguous(), new_acc_sum, weight, bins, momentum, 1.0 - momentum,
        HAS_MOMENTUM=momentum > 0, BINS_PAD=bins_pad,
    )
    grad = _grad_buffer(x, compute_grad)
    partial = torch.zeros(max(programs, 1), dtype=torch.float32, device=x.device)
    if n_elements > 0:
        _ghmc_loss_kernel[(programs,)](
            x, t, valid if valid is not None else x, edges, weight, partial, grad if compute_grad else x,
            n_elements, bins, HAS_VALID=valid is not None, WRITE_GRAD=compute_grad, BLOCK=_BLOCK,
        )
    return partial.sum().to(input.dtype), grad, new_acc_sum.to(acc_sum.dtype)


def _bi_tempered_logistic_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    t1: float,
    t2: float,
    label_smoothing: float,
    num_iters: int,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _unit_columns(input)
    hard_target = not target.is_floating_point()
    t = target if hard_target else _unit_columns(target)
    n_rows, n_cols = x.shape
    if label_smoothing > 0:  # the authors' rule: the true class keeps 1 - ε, every other class gets ε / (C - 1)
        target_mass, spread = 1.0 - n_cols / (n_cols - 1) * label_smoothing, label_smoothing / (n_cols - 1)
    else:
        target_mass, spread = 1.0, 0.0
    grad = _grad_buffer(x, compute_grad)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        grid, rows, block, num_warps = _bi_tempered_launch(n_rows, n_cols)
        _bi_tempered_fwd_kernel[grid](
            x, x.stride(0), t, t.stride(0), row_loss, grad if compute_grad else x,
            grad.stride(0) if compute_grad else 0, n_rows, n_cols, t1, t2, target_mass, spread, num_iters,
            _mean_scale(reduction, n_rows),
            HARD_TARGET=hard_target, T2_MODE=0 if t2 == 1.0 else (1 if t2 > 1.0 else 2),
            CROSS_ENTROPY=t1 == 1.0 and t2 == 1.0, T1_IS_ONE=t1 == 1.0, WRITE_GRAD=compute_grad,
            ROWS=rows, BLOCK_C=block, SINGLE_BLOCK=n_cols <= block, num_warps=num_warps,
        )
    return _reduce_rows(row_loss, input, reduction), grad


def _scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``grad *= grad_output`` in place: a 0-d scalar, one value per element (``grad_output`` of ``grad``'s shape,
    elementwise ``"none"``), or one value per row of ``grad (N, C)`` (row losses, ``"none"``)."""
    if grad.numel() == 0:
        return
    if grad_output.dim() > 0 and grad_output.shape == grad.shape:
        grad.mul_(grad_output)
        return
    per_row = grad_output.dim() > 0
    _scale_grad_kernel[(triton.cdiv(grad.numel(), _BLOCK),)](
        grad, grad_output, grad_output.stride(0) if per_row else 0, grad.numel(), grad.shape[-1] if per_row else 1,
        PER_ROW=per_row, BLOCK=_BLOCK,
    )
    # The kernel writes through a raw pointer: tell autograd, so that a second backward through the same graph
    # (retain_graph=True) raises instead of scaling the buffer twice.
    torch.autograd.graph.increment_version(grad)


# ----------------------------------------------------------------------------------------------
# Autograd: a plain autograd.Function in eager mode, custom ops while torch.compile traces
# ----------------------------------------------------------------------------------------------


class _FusedLoss(torch.autograd.Function):
    """Eager path: ``launcher`` writes the gradient in the forward pass; backward scales it by ``grad_output``."""

    @staticmethod
    def forward(ctx, launcher, input, *args):
        loss, grad, *extra = launcher(input, *args, True)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(*extra)
        ctx.num_args = len(args)
        return (loss, *extra)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        # Scaled in place: no second gradient-sized buffer.
        (grad,) = ctx.saved_tensors
        _scale_grad_(grad, grad_loss)
        return (None, grad) + (None,) * ctx.num_args


@torch.library.custom_op("fusedloss::triton_sigmoid_scale_grad", mutates_args=("grad",))
def _scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``grad *= grad_output`` in place (see :func:`_scale_grad_`)."""
    _scale_grad_(grad, grad_output)


@_scale_grad_op.register_fake
def _(grad, grad_output):
    return None


def _custom_op(name: str, launcher, loss_shape, returns_acc_sum: bool = False):
    """``launcher`` as the custom op ``fusedloss::<name>`` with a fake (``loss_shape(input, *args)``; GHM-C also
    returns the new ``acc_sum``, shaped as its second-to-last argument) and registered autograd."""
    op = torch.library.custom_op(f"fusedloss::{name}", launcher, mutates_args=())

    def fake(input, *args):
        loss = input.new_empty(loss_shape(input, *args))
        grad = _grad_buffer(input, args[-1])
        if returns_acc_sum:
            return loss, grad, torch.empty_like(args[-2])
        return loss, grad

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(output[1])
        ctx.num_args = len(inputs)

    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        torch.ops.fusedloss.triton_sigmoid_scale_grad(grad, grad_loss)
        return (grad,) + (None,) * (ctx.num_args - 1)

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    return getattr(torch.ops.fusedloss, name)


def _row_loss_shape(input, *args):
    reduction = args[-2]
    return (input.shape[0],) if reduction == "none" else ()


_binary_op = _custom_op(
    "triton_binary_loss", _binary_loss, lambda input, *args: input.shape if args[-2] == "none" else ()
)
_soft_margin_op = _custom_op("triton_multilabel_soft_margin_loss", _multilabel_soft_margin_loss, _row_loss_shape)
_zlpr_op = _custom_op("triton_multilabel_categorical_crossentropy", _multilabel_categorical_crossentropy,
                      _row_loss_shape)
_ghmc_op = _custom_op("triton_ghmc_loss", _ghmc_loss, lambda input, *args: (), returns_acc_sum=True)
_bi_tempered_op = _custom_op("triton_bi_tempered_logistic_loss", _bi_tempered_logistic_loss, _row_loss_shape)


def _run(launcher, op, input: torch.Tensor, *args) -> tuple:
    """``(loss, *extra)`` of one op; the gradient is computed only when autograd will use it."""
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        loss, _, *extra = op(input, *args, compute_grad)
        return (loss, *extra)
    if compute_grad:
        return _FusedLoss.apply(launcher, input, *args)
    loss, _, *extra = launcher(input, *args, False)
    return (loss, *extra)


# ----------------------------------------------------------------------------------------------
# The ops of docs/BACKENDS.md and why a call may be declined
# ----------------------------------------------------------------------------------------------


def _common_reasons(input: torch.Tensor, **no_grad_for: Optional[torch.Tensor]) -> list[str]:
    reasons = []
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"computes in float32 for float32/float16/bfloat16 input, got {input.dtype} "
                       "(use the reference or cpp backend for float64)")
    for name, tensor in no_grad_for.items():
        if tensor is not None and tensor.requires_grad:
            reasons.append(f"does not compute the gradient with respect to {name} ({name}.requires_grad=True)")
    return reasons


def binary_cross_entropy_with_logits_reasons(input, target, weight, pos_weight, reduction) -> list[str]:
    return _common_reasons(input, target=target, weight=weight, pos_weight=pos_weight)


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor],
    reduction: str,
) -> torch.Tensor:
    """Same contract and result as ``fusedloss.reference.sigmoid.binary_cross_entropy_with_logits``."""
    return _run(_binary_loss, _binary_op, input, target, weight, pos_weight, -1.0, 0.0, False, reduction)[0]


def sigmoid_focal_loss_reasons(input, target, alpha, gamma, reduction) -> list[str]:
    return _common_reasons(input, target=target)


def sigmoid_focal_loss(
    input: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float, reduction: str
) -> torch.Tensor:
    """Same contract and result as ``fusedloss.reference.sigmoid.sigmoid_focal_loss`` (torchvision's formula)."""
    return _run(_binary_loss, _binary_op, input, target, None, None, alpha, gamma, True, reduction)[0]


def multilabel_soft_margin_loss_reasons(input, target, weight, reduction) -> list[str]:
    return _common_reasons(input, target=target, weight=weight)


def multilabel_soft_margin_loss(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: str
) -> torch.Tensor:
    """Same contract and result as ``fusedloss.reference.sigmoid.multilabel_soft_margin_loss`` on ``(N, C)``."""
    return _run(_multilabel_soft_margin_loss, _soft_margin_op, input, target, weight, reduction)[0]


def multilabel_categorical_crossentropy_reasons(input, target, reduction) -> list[str]:
    return _common_reasons(input)


def multilabel_categorical_crossentropy(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Same contract and result as ``fusedloss.reference.sigmoid.multilabel_categorical_crossentropy`` (ZLPR)."""
    return _run(_multilabel_categorical_crossentropy, _zlpr_op, input, target, reduction)[0]


def ghmc_loss_reasons(input, target, valid, bins, momentum, acc_sum) -> list[str]:
    return _common_reasons(input, target=target)


def ghmc_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor],
    bins: int,
    momentum: float,
    acc_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and result as ``fusedloss.reference.sigmoid.ghmc_loss``: ``(loss, new_acc_sum)``."""
    loss, new_acc_sum = _run(_ghmc_loss, _ghmc_op, input, target, valid, bins, momentum, acc_sum)
    return loss, new_acc_sum


def bi_tempered_logistic_loss_reasons(input, target, t1, t2, label_smoothing, num_iters, reduction) -> list[str]:
    # t1 = t2 = 1 is cross entropy with autograd in the reference, which differentiates soft targets too.
    soft_target = target if target.is_floating_point() and t1 == 1.0 and t2 == 1.0 else None
    return _common_reasons(input, target=soft_target)


def bi_tempered_logistic_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    t1: float,
    t2: float,
    label_smoothing: float,
    num_iters: int,
    reduction: str,
) -> torch.Tensor:
    """Same contract and result as ``fusedloss.reference.sigmoid.bi_tempered_logistic_loss``, with the authors'
    closed-form gradient (no gradient for ``target``)."""
    return _run(_bi_tempered_logistic_loss, _bi_tempered_op, input, target, t1, t2, label_smoothing, num_iters,
                reduction)[0]


def launch_configurations() -> list[dict]:
    """Every kernel build the launchers above can ask for, for offline compile checks (tests/test_triton_build.py):
    each entry ``name``, ``kernel``, ``signature`` (types of the non-constexpr arguments), ``constexprs`` and
    ``num_warps``. Row kernels at a tile of rows (80 columns), the widest single block, and several blocks; the
    elementwise kernels at the launcher's tile; 16-bit inputs (the float32 math is the same for all dtypes)."""
    types = dict(X="*bf16", T="*u8", W="*fp32", PW="*fp32", LOSS="*fp32", GRAD="*bf16", VALID="*u8", EDGES="*fp32",
                 COUNT="*i64", WEIGHT="*fp32", PARTIAL="*fp32", ACC_SUM="*fp32", NEW_ACC_SUM="*fp32",
                 GRAD_OUT="*fp32", n_rows="i32", n_cols="i32", bins="i32", num_iters="i32")
    element = dict(BLOCK=_BLOCK)
    rows, block_c = _element_tile(8192, 80)
    builds = [
        (_binary_fwd_kernel, dict(HAS_WEIGHT=True, HAS_POS_WEIGHT=True, FOCAL=False, HAS_ALPHA=False,
                                  HAS_GAMMA=False, REDUCE=True, WRITE_GRAD=True, ROWS=rows, BLOCK_C=block_c), 4),
        (_binary_fwd_kernel, dict(HAS_WEIGHT=False, HAS_POS_WEIGHT=False, FOCAL=True, HAS_ALPHA=True, HAS_GAMMA=True,
                                  REDUCE=False, WRITE_GRAD=True, ROWS=1, BLOCK_C=_BLOCK), 4),
        (_ghmc_histogram_kernel, dict(HAS_VALID=True, BINS_PAD=32, **element), 4),
        (_ghmc_weights_kernel, dict(HAS_MOMENTUM=True, BINS_PAD=32), 4),
        (_ghmc_loss_kernel, dict(HAS_VALID=True, WRITE_GRAD=True, **element), 4),
        (_scale_grad_kernel, dict(PER_ROW=True, **element), 4),
    ]
    for n_cols in (80, 8192, 100000):
        _, rows, block, warps = _row_launch(8192, n_cols)
        layout = dict(ROWS=rows, BLOCK_C=block)
        builds.append((_soft_margin_fwd_kernel, dict(HAS_WEIGHT=True, WRITE_GRAD=True, **layout), warps))
        builds.append((_zlpr_fwd_kernel, dict(WRITE_GRAD=True, SINGLE_BLOCK=n_cols <= block, **layout), warps))
    for n_cols in (80, _BI_TEMPERED_MAX_BLOCK_C, 100000):
        _, rows, block, warps = _bi_tempered_launch(8192, n_cols)
        layout = dict(ROWS=rows, BLOCK_C=block)
        for mode in (0, 1, 2):
            builds.append((_bi_tempered_fwd_kernel, dict(HARD_TARGET=False, T2_MODE=mode, CROSS_ENTROPY=mode == 0,
                                                         T1_IS_ONE=mode == 0, WRITE_GRAD=True,
                                                         SINGLE_BLOCK=n_cols <= block, **layout), warps))
    configurations = []
    for kernel, constexprs, num_warps in builds:
        signature = {name: types.get(name, "i64" if "stride" in name or name == "n_elements" else "fp32")
                     for name in kernel.arg_names if name not in constexprs}
        label = " ".join(f"{k}={v}" for k, v in constexprs.items() if k in ("ROWS", "BLOCK_C", "BLOCK", "T2_MODE"))
        configurations.append(dict(name=f"{kernel.__name__} {label}", kernel=kernel, signature=signature,
                                   constexprs=constexprs, num_warps=num_warps))
    return configurations
