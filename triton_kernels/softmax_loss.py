"""Triton backend of the ``softmax_loss`` op (docs/BACKENDS.md; semantics in docs/softmax.rst): cross entropy,
label smoothing, class weights, focal factor, z-loss and logit soft-capping. The forward saves per-row statistics
and the backward recomputes the softmax from them (flash-attention's split), so the gradient is written once, in
backward, already scaled by ``grad_output``.

Math, per row n of ``input (N, C)`` (everything in float32, whatever the input dtype)::

    s     = softcap * tanh(x / softcap)         (s = x without softcap)
    m     = max_c s_c,  log p = (s - m) - log Σ_c exp(s_c - m),  p = exp(log p),  lse = m + log Σ_c exp(s_c - m)
    a_c   = w_c * q_c,  q = (1 - ε) onehot(y) + ε / C   (soft targets: q = (1 - ε) t + ε / C)
    f_c   = (1 - p_c)^γ
    l     = Σ_c a_c f_c (lse - s_c) + z_loss * lse^2

With ``g(u) = (1 - e^u)^γ u`` the loss is ``-Σ_c a_c g(log p_c)`` and, since ``∂ log p_c / ∂ s_j = δ_cj - p_j``,

    ∂l/∂s_j = p_j (S + 2 z_loss lse) - G_j,   G_c = a_c g'(log p_c),  S = Σ_c G_c,
    g'(u)   = f (1 - γ p u / (1 - p))          (= 1 for γ = 0, so G = a and ∂l/∂s = p Σa - a)
    ∂l/∂x_j = ∂l/∂s_j * (1 - (s_j / softcap)^2)

``1 - p`` is ``-expm1(log p)`` (exact near p = 1), and entries with ``1 - p`` at or below float32's smallest
normal number take ``f = g' = 0``, as the reference does (fusedloss.reference.softmax.focal_factor).

Precision at large logits (every p keeps float32's relative precision whatever the logits' size):
``log p`` is formed as ``(s - m) - log Σ exp(s - m)``, never as ``s - lse`` (lse rounds to the ulp of its own
size: 3e-5 at lse = 300); the smoothed loss sums ``a_c (s_c - m)`` relative to the running max; and the soft-cap
derivative is ``4 e / (1 + e)^2`` with ``e = exp(-2 |x| / softcap)``, which decays to 0 where ``1 - tanh^2`` of a
rounded tanh would not (and tanh itself is within 2 ulps of the exact tanh of the float32 ``x / softcap``, given
an ``exp`` within 2 ulps). Those ulp-level statements assume correctly rounded (interpreter: numpy) or CUDA-grade
``exp``/``log``: on a GPU ``tl.exp``/``tl.log`` compile to ``ex2.approx``/``lg2.approx`` (a range-reduction
error that grows with the argument), so every ``exp``/``log`` here goes through ``_exp``/``_log``, which take
libdevice's ``expf`` (2 ulps) and ``logf`` (1 ulp) on a GPU. ``PRECISE`` is false only under the interpreter,
where libdevice functions do not run (numpy's exp/log are used there). The GPU bounds are derived from those
libdevice bounds, not yet measured on a GPU (docs/fidelity.md).

The target-class term ``p_y S - G_y`` is formed in float32 and only the finished gradient is cast to the input
dtype (rounding ``p_y - 1`` to bfloat16 first loses it, a bug reported in Liger-Kernel).

Passes over a row and bytes moved (for any ``grad_output``):

* Forward without a gradient (no_grad, or ``input`` not requiring grad): one read of the logits. Pass 1 finds
  the running max and sum of exponentials (online softmax, Milakov & Gimelshein 2018), the target-class terms
  and, without focal factor, the sums ``Σ a_c`` and ``Σ a_c (s_c - m)`` that give the smoothed / soft-target loss.
* Forward with a gradient wanted: the same single read, and it also writes per-row statistics to a small
  ``(N, 6)`` float32 buffer (``m``, ``log Σ exp(s - m)``, ``G_y``, ``1 - p_y``, the spread part of ``S``, the
  ``mean`` scale ``1 / divisor``); no ``(N, C)`` tensor is written.
* The one exception: γ > 0 with mass spread over every class (label smoothing or soft targets) on a row wider
  than one block reads the row a second time, because ``G_c`` depends on the final ``lse`` (an online form would
  need ``(1 - p_c)^γ`` rescaled with the running max, which does not factor).
* Backward: one kernel reads the logits once more, recomputes ``p`` from the saved ``m`` and log-sum, and writes
  ``∂loss/∂x`` with ``grad_output`` (a scalar, or per row for ``reduction="none"``) and the ``mean`` divisor
  folded in: one read and one write of ``(N, C)``. Forward + backward: 2 reads + 1 write (3 reads in the focal +
  spread case on vocabulary rows), whatever ``grad_output`` is; there is no separate scaling pass.
* ``softmax_loss_forward(..., grad)`` keeps the fused form (Liger-Kernel's "gradient in the forward pass") for
  callers that know the scale in forward (the chunk loop of ``linear_cross_entropy``): the same sweep, then a
  last sweep that writes the gradient (``grad`` may be the logits' own buffer).

When the row fits one block (C <= 4096) each pass works on one tile in registers (NER tag sets: several rows
per program), so a row is read once per kernel in every case. Vocabulary rows (C up to 262144 and beyond) take
one row per program and loop over blocks of 4096 with ``tl.range(..., num_stages=_NUM_STAGES)``, so the compiler
pipelines the next block's loads behind the current block's math. Ignored rows are neither read nor (in
backward) recomputed: their gradient is written as 0.

Row offsets are ``int64(row) * stride`` so ``N * C`` above 2^31 works. Padding lanes hold ``-1e30``, never
``-inf`` (``-inf - -inf`` is NaN, and the interpreter computes it). NaN or Inf in a row reaches only that row.

Registration: ``fusedloss::triton_softmax_loss_stats`` (functional, returns the loss and the statistics) and
``fusedloss::triton_softmax_loss_backward`` (functional, returns the gradient) are ``torch.library.custom_op``\\ s
with fake implementations and registered autograd, used while ``torch.compile`` traces, so
``torch.compile(fullgraph=True)`` runs through them; ``triton_op`` + ``wrap_triton`` would let Inductor see the
kernels but fails on CPU tensors under the interpreter (Dynamo's fake-tensor pass reaches the kernel's data
pointers). Eager calls skip the op registry (its Python layers cost tens of microseconds a call): a plain
``autograd.Function`` launches the kernels, and without a gradient to compute only the loss is computed.
``inplace_backward=True`` is eager only (a custom op may neither return an alias of its input nor mutate a leaf):
``input`` is saved for backward and the gradient is written over its storage there; its version counter is then
bumped, so a second backward through the same graph (``retain_graph=True``) raises instead of reading overwritten
logits. Without ``inplace_backward`` a second backward recomputes from the unchanged logits and accumulates
exactly as torch does.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Finite stand-in for -inf in padding lanes and initial maxima (constexpr: kernels may read no other globals).
_NEG = tl.constexpr(-1.0e30)
# float32's smallest normal number: below it (1 - p)^γ is taken as 0 (reference.softmax.focal_factor).
_TINY = tl.constexpr(1.1754943508222875e-38)
# libdevice's expf/logf on a GPU; the interpreter (where libdevice functions return None) uses numpy's.
_PRECISE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"))
# Per-row statistics saved by the forward for the backward: m, log Σ exp(s - m), G_y, 1 - p_y, spread S, scale.
_NUM_STATS = tl.constexpr(6)
# Software-pipelining depth of the block sweeps over vocabulary rows (tl.range's num_stages).
_NUM_STAGES = 2
# Block sizes, chosen from the sm_90 register report of ptxas (make triton-build-check: the kernels compiled
# offline for an H100; no GPU here to time them): blocks of 4096 on 16 warps (8 elements per thread) spill
# nothing with every option on; blocks of 8192 spill on 16 warps (16 elements per thread) and in float32 on 32
# warps too (64 registers per thread). Liger-Kernel's 32768-column blocks with 32 warps spill 120 bytes per
# thread here even without options (1.7 KB with all).
# Vocabulary rows: one row per program, blocks of 4096 columns, 16 warps.
_MAX_BLOCK_C = 4096
# Small C: a tile of rows x classes of about this many elements per program (QuACK-style row tiling), 4 warps.
_TILE_ELEMENTS = 1024
_MAX_TILE_ROWS = 64


# ----------------------------------------------------------------------------------------------
# Elementwise helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _exp(x):
    """``exp``: libdevice's ``expf`` (2 ulps) on a GPU, where ``tl.exp`` would be ``ex2.approx``."""
    if _PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x):
    """``log``: libdevice's ``logf`` (1 ulp) on a GPU, where ``tl.log`` would be ``lg2.approx``."""
    if _PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _expm1(u, e):
    """``exp(u) - 1`` to a few ulps for every u, given ``e = exp(u)``: Kahan's trick (the rounding errors of exp
    and log cancel) where ``|u| <= 1``; beyond, ``e - 1`` itself cancels at most a bit, while ``log(e)`` of a
    subnormal ``e`` (u below about -87) is off by much more and would spoil the ratio."""
    near_zero = (tl.abs(u) <= 1.0) & (e != 1.0)
    e_safe = tl.where(near_zero, e, 0.5)
    ratio = (e_safe - 1.0) * u / _log(e_safe)
    return tl.where(near_zero, ratio, tl.where(e == 1.0, u, e - 1.0))


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(s, ds/dx)`` with ``s = softcap * tanh(x / softcap)``, or ``(x, 1)`` without softcap.

    With ``z = x / softcap`` and ``e = exp(-2|z|)``: ``tanh|z|`` is Cephes' odd polynomial below 0.625 and
    ``(1 - e) / (1 + e)`` above (e < 0.29 there, no cancellation): within 2 ulps everywhere (libdevice's tanh is
    not in the interpreter). ``ds/dx = 1 - tanh^2 = 4e / (1 + e)^2`` decays to exactly 0 with ``e``, where
    ``1 - t*t`` of a rounded ``t`` has no correct digit once ``|z|`` passes about 9.
    """
    if HAS_SOFTCAP:
        z = x / softcap
        abs_z = tl.abs(z)
        e = _exp(-2.0 * abs_z)
        z2 = abs_z * abs_z
        poly = -5.70498872745e-3 * z2 + 2.06390887954e-2
        poly = poly * z2 - 5.37397155531e-2
        poly = poly * z2 + 1.33314422036e-1
        poly = poly * z2 - 3.33332819422e-1
        t = tl.where(abs_z < 0.625, poly * z2 * abs_z + abs_z, (1.0 - e) / (1.0 + e))
        return softcap * tl.where(z < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))
    else:
        return x, 1.0


@triton.jit
def _focal_terms(log_p, gamma):
    """``f = (1 - p)^γ`` and ``g'(log p) = f (1 - γ p log p / (1 - p))``, both 0 where ``1 - p <= tiny``."""
    p = _exp(log_p)
    one_minus_p = -_expm1(log_p, p)
    representable = one_minus_p > _TINY
    safe = tl.where(representable, one_minus_p, 1.0)
    factor = tl.where(representable, _exp(gamma * _log(safe)), 0.0)
    dfactor = factor * (1.0 - gamma * p * log_p / safe)
    return factor, dfactor


@triton.jit
def _load_logits(x_rows, cols, load_mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """One ``[ROWS, BLOCK_C]`` block of ``s`` (float32, ``-1e30`` in masked lanes) and ``ds/dx``."""
    x = tl.load(x_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
    s, dsdx = _capped(x, softcap, HAS_SOFTCAP)
    return tl.where(load_mask, s, _NEG), dsdx


@triton.jit
def _spread_mass(t_rows, W, cols, col_ok, load_mask, target_mass, smoothing_per_class,
                 HARD_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The part of ``a = w q`` spread over all classes: ``w ε/C`` (hard targets) or ``w ((1-ε) t + ε/C)`` (soft)."""
    a = tl.where(load_mask, smoothing_per_class, 0.0)
    if not HARD_TARGET:
        a += target_mass * tl.load(t_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        a *= tl.load(W + cols, mask=col_ok, other=0.0)[None, :]
    return a


@triton.jit
def _row_targets(T, stride_t, rows, row_ok, ignore_index, HARD_TARGET: tl.constexpr):
    """``(y, kept)``: the target index (hard targets; the row index for soft ones) and whether the row counts."""
    if HARD_TARGET:
        y = tl.load(T + rows * stride_t, mask=row_ok, other=ignore_index)
        kept = row_ok & (y != ignore_index)
    else:
        y = rows
        kept = row_ok
    return y, kept


@triton.jit
def _store_grad(g_rows, cols, store_mask, kept, s, dsdx, a, m, log_sum, spread_grad, z_grad, target_grad, y,
                one_minus_p_y, scale, gamma, HARD_TARGET: tl.constexpr, SPREAD: tl.constexpr,
                HAS_FOCAL: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """Writes ``(p (S + 2 z lse) - G) * ds/dx * scale`` for one block (``scale`` per row); ignored rows get 0.

    The parts of ``S`` (hard target ``G_y``, spread mass) and the z-loss term ``2 z lse p`` are formed one by one,
    as autograd of the reference does, and the target class takes ``-(1 - p_y) G_y`` with ``1 - p_y`` the sum of
    the other classes' probabilities (``p_y - 1`` of a rounded ``p_y`` has an error of ``ulp(1) / (1 - p_y)``
    relative): one coefficient of ``p`` would round the small parts away where ``p`` is close to 1.
    """
    log_p = (s - m[:, None]) - log_sum[:, None]
    p = _exp(log_p)
    grad = tl.zeros_like(p)
    if HARD_TARGET:
        grad += tl.where(cols[None, :] == y[:, None], -one_minus_p_y[:, None], p) * target_grad[:, None]
    if SPREAD:
        if HAS_FOCAL:
            grad += p * spread_grad[:, None] - a * _focal_terms(log_p, gamma)[1]
        else:
            grad += p * spread_grad[:, None] - a
    if HAS_Z_LOSS:
        grad += p * z_grad[:, None]
    grad = tl.where(kept[:, None], grad * dsdx * scale[:, None], 0.0)
    tl.store(g_rows + cols[None, :], grad.to(g_rows.dtype.element_ty), mask=store_mask)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softmax_loss_fwd_kernel(
    X, stride_x, T, stride_t, W, LOSS, GRAD, stride_g, STATS, DIVISOR,
    n_rows, n_cols, ignore_index, target_mass, smoothing_per_class, focal_gamma, z_loss, softcap,
    HARD_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPREAD: tl.constexpr, HAS_FOCAL: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SCALE_BY_DIVISOR: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SAVE_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Per-row loss into ``LOSS (N,)`` float32; if ``SAVE_STATS`` the row statistics of the backward into
    ``STATS (N, 6)`` float32; if ``WRITE_GRAD`` (the fused form) ``∂loss/∂x`` into ``GRAD`` (may be ``X``).

    A program owns ``ROWS`` rows; ``SINGLE_BLOCK`` (``C <= BLOCK_C``) keeps the whole ``[ROWS, BLOCK_C]`` tile in
    registers, otherwise the row is swept in blocks (online softmax). ``T`` holds int64 indices ``(N,)`` for hard
    targets or probabilities ``(N, C)`` for soft ones. ``SPREAD``: ``a`` has mass on every class (smoothing or
    soft targets). ``DIVISOR`` (a 0-d float32 tensor) is the ``reduction="mean"`` divisor of the gradient.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    t_rows = T + rows[:, None] * stride_t
    col_base = tl.arange(0, BLOCK_C)

    y, kept = _row_targets(T, stride_t, rows, row_ok, ignore_index, HARD_TARGET)
    if HARD_TARGET:
        # Out-of-range targets are rejected by the public layer on CPU; here they only must not be dereferenced.
        y_ok = kept & (y >= 0) & (y < n_cols)
        x_y = tl.load(X + rows * stride_x + y, mask=y_ok, other=0.0).to(tl.float32)
        s_y = _capped(x_y, softcap, HAS_SOFTCAP)[0]
        if HAS_WEIGHT:
            w_y = tl.load(W + y, mask=y_ok, other=0.0)
        else:
            w_y = tl.where(y_ok, 1.0, 0.0)
    # Ignored rows are never read: with padding tokens common in language-model batches this saves bandwidth.
    kept_2d = kept[:, None]

    # Pass 1: max and sum of exponentials (and, without focal factor, the sums that give the spread loss).
    if SINGLE_BLOCK:
        col_ok = col_base < n_cols
        load_mask = kept_2d & col_ok[None, :]
        s, dsdx = _load_logits(x_rows, col_base, load_mask, softcap, HAS_SOFTCAP)
        m = tl.max(s, axis=1)
        e = _exp(s - m[:, None])
        d = tl.sum(e, axis=1)
        log_sum = _log(d)
        if HARD_TARGET and (WRITE_GRAD or SAVE_STATS):
            others = tl.sum(tl.where(col_base[None, :] == y[:, None], 0.0, e), axis=1)
        if SPREAD:
            a = _spread_mass(t_rows, W, col_base, col_ok, load_mask, target_mass, smoothing_per_class,
                             HARD_TARGET, HAS_WEIGHT)
            neg_log_p = log_sum[:, None] - (s - m[:, None])
            if HAS_FOCAL:
                factor, dfactor = _focal_terms(-neg_log_p, focal_gamma)
                spread_loss = tl.sum(a * factor * neg_log_p, axis=1)
                spread_grad = tl.sum(a * dfactor, axis=1)
            else:
                spread_loss = tl.sum(a * neg_log_p, axis=1)
                spread_grad = tl.sum(a, axis=1)
        else:
            a = 0.0
    else:
        m = tl.full([ROWS], _NEG, tl.float32)
        d = tl.zeros([ROWS], tl.float32)
        others = tl.zeros([ROWS], tl.float32)  # hard targets: Σ_{c != y} exp(s_c - m)
        mass = tl.zeros([ROWS], tl.float32)
        mass_dot_s = tl.zeros([ROWS], tl.float32)  # Σ a_c (s_c - m), kept relative to the running max m
        for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
            cols = start + col_base
            col_ok = cols < n_cols
            load_mask = kept_2d & col_ok[None, :]
            s = _load_logits(x_rows, cols, load_mask, softcap, HAS_SOFTCAP)[0]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            e = _exp(s - m_new[:, None])
            rescale = _exp(m - m_new)
            d = d * rescale + tl.sum(e, axis=1)
            if HARD_TARGET and (WRITE_GRAD or SAVE_STATS):  # 1 - p_y: only the gradient needs it
                others = others * rescale + tl.sum(tl.where(cols[None, :] == y[:, None], 0.0, e), axis=1)
            if SPREAD:
                if not HAS_FOCAL:
                    a = _spread_mass(t_rows, W, cols, col_ok, load_mask, target_mass, smoothing_per_class,
                                     HARD_TARGET, HAS_WEIGHT)
                    mass_dot_s += mass * (m - m_new) + tl.sum(a * (s - m_new[:, None]), axis=1)
                    mass += tl.sum(a, axis=1)
            m = m_new
        log_sum = _log(d)
        if SPREAD:
            if HAS_FOCAL:
                # Pass 2 (the only second read of a forward): G_c needs the final lse. With hard targets it is not
                # pipelined: the target terms and the focal terms leave no registers for a second stage at 16 warps
                # (ptxas spilled 8 bytes on sm_90); with soft targets the pipelined form is the one that does not.
                spread_loss = tl.zeros([ROWS], tl.float32)
                spread_grad = tl.zeros([ROWS], tl.float32)
                for start in tl.range(0, n_cols, BLOCK_C, num_stages=1 if HARD_TARGET else NUM_STAGES):
                    cols = start + col_base
                    col_ok = cols < n_cols
                    load_mask = kept_2d & col_ok[None, :]
                    s = _load_logits(x_rows, cols, load_mask, softcap, HAS_SOFTCAP)[0]
                    a = _spread_mass(t_rows, W, cols, col_ok, load_mask, target_mass, smoothing_per_class,
                                     HARD_TARGET, HAS_WEIGHT)
                    neg_log_p = log_sum[:, None] - (s - m[:, None])
                    factor, dfactor = _focal_terms(-neg_log_p, focal_gamma)
                    spread_loss += tl.sum(a * factor * neg_log_p, axis=1)
                    spread_grad += tl.sum(a * dfactor, axis=1)
            else:
                spread_loss = log_sum * mass - mass_dot_s
                spread_grad = mass

    # Ignored rows were not read (their max is -1e30): give them finite statistics, their results are masked out
    # below. log p = (s - m) - log_sum, never s - lse: lse rounds to the ulp of its own size (3e-5 at lse = 300),
    # which would cost every p its relative precision; lse itself only enters the z-loss.
    m = tl.where(kept, m, 0.0)
    log_sum = tl.where(kept, log_sum, 0.0)
    lse = m + log_sum

    # Row scalars: the loss, and the coefficients of p in the gradient: G_y, the spread part of S, 2 z lse.
    loss = tl.zeros([ROWS], tl.float32)
    target_grad = tl.zeros([ROWS], tl.float32)
    z_grad = tl.zeros([ROWS], tl.float32)
    one_minus_p_y = tl.zeros([ROWS], tl.float32)
    if HARD_TARGET:
        hard_mass = target_mass * w_y
        if WRITE_GRAD or SAVE_STATS:
            one_minus_p_y = tl.where(kept, others / d, 0.0)
        log_p_y = (s_y - m) - log_sum
        if HAS_FOCAL:
            factor_y, dfactor_y = _focal_terms(log_p_y, focal_gamma)
            loss -= hard_mass * factor_y * log_p_y
            target_grad = hard_mass * dfactor_y
        else:
            loss -= hard_mass * log_p_y
            target_grad = hard_mass
    if SPREAD:
        loss += spread_loss
    else:
        spread_grad = tl.zeros([ROWS], tl.float32)
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
        z_grad = 2.0 * z_loss * lse
    tl.store(LOSS + rows, tl.where(kept, loss, 0.0), mask=row_ok)

    if SCALE_BY_DIVISOR:
        scale = tl.zeros([ROWS], tl.float32) + 1.0 / tl.load(DIVISOR)
    else:
        scale = tl.full([ROWS], 1.0, tl.float32)
    if SAVE_STATS:
        stat_rows = STATS + rows * _NUM_STATS
        tl.store(stat_rows + 0, m, mask=row_ok)
        tl.store(stat_rows + 1, log_sum, mask=row_ok)
        tl.store(stat_rows + 2, target_grad, mask=row_ok)
        tl.store(stat_rows + 3, one_minus_p_y, mask=row_ok)
        tl.store(stat_rows + 4, spread_grad, mask=row_ok)
        tl.store(stat_rows + 5, scale, mask=row_ok)

    if WRITE_GRAD:
        g_rows = GRAD + rows[:, None] * stride_g
        if SINGLE_BLOCK:
            store_mask = row_ok[:, None] & (col_base < n_cols)[None, :]
            _store_grad(g_rows, col_base, store_mask, kept, s, dsdx, a, m, log_sum, spread_grad, z_grad, target_grad,
                        y, one_minus_p_y, scale, focal_gamma, HARD_TARGET, SPREAD, HAS_FOCAL, HAS_Z_LOSS)
        else:
            for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
                cols = start + col_base
                col_ok = cols < n_cols
                load_mask = kept_2d & col_ok[None, :]
                s, dsdx = _load_logits(x_rows, cols, load_mask, softcap, HAS_SOFTCAP)
                if SPREAD:
                    a = _spread_mass(t_rows, W, cols, col_ok, load_mask, target_mass, smoothing_per_class,
                                     HARD_TARGET, HAS_WEIGHT)
                else:
                    a = 0.0
                _store_grad(g_rows, cols, row_ok[:, None] & col_ok[None, :], kept, s, dsdx, a, m, log_sum,
                            spread_grad, z_grad, target_grad, y, one_minus_p_y, scale, focal_gamma, HARD_TARGET,
                            SPREAD, HAS_FOCAL, HAS_Z_LOSS)


@triton.jit
def _softmax_loss_bwd_kernel(
    X, stride_x, T, stride_t, W, GRAD, stride_g, STATS, GRAD_OUT, stride_go,
    n_rows, n_cols, ignore_index, target_mass, smoothing_per_class, focal_gamma, z_loss, softcap,
    HARD_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPREAD: tl.constexpr, HAS_FOCAL: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PER_ROW: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """``GRAD = grad_output * ∂loss/∂x`` from the logits and the forward's ``STATS``: one read of each kept row of
    ``X`` and one write of ``GRAD`` (may be ``X``: each block is read before it is written, by the same program).

    ``GRAD_OUT`` is a scalar, or per row (``PER_ROW``, stride ``stride_go``, 0 for an expanded one); the saved
    scale (``1 / divisor`` for ``mean``) multiplies it. Same layouts as the forward kernel.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    t_rows = T + rows[:, None] * stride_t
    g_rows = GRAD + rows[:, None] * stride_g
    col_base = tl.arange(0, BLOCK_C)
    y, kept = _row_targets(T, stride_t, rows, row_ok, ignore_index, HARD_TARGET)
    kept_2d = kept[:, None]

    stat_rows = STATS + rows * _NUM_STATS
    m = tl.load(stat_rows + 0, mask=row_ok, other=0.0)
    log_sum = tl.load(stat_rows + 1, mask=row_ok, other=0.0)
    target_grad = tl.load(stat_rows + 2, mask=row_ok, other=0.0)
    one_minus_p_y = tl.load(stat_rows + 3, mask=row_ok, other=0.0)
    spread_grad = tl.load(stat_rows + 4, mask=row_ok, other=0.0)
    scale = tl.load(stat_rows + 5, mask=row_ok, other=0.0)
    if PER_ROW:
        scale *= tl.load(GRAD_OUT + rows * stride_go, mask=row_ok, other=0.0).to(tl.float32)
    else:
        scale *= tl.load(GRAD_OUT).to(tl.float32)
    z_grad = 2.0 * z_loss * (m + log_sum)

    # One sweep whatever the layout (a single iteration when the row fits one block): the straight-line form of
    # the single-block case spilled at 16 warps on sm_90, the loop does not.
    for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
        cols = start + col_base
        col_ok = cols < n_cols
        load_mask = kept_2d & col_ok[None, :]
        s, dsdx = _load_logits(x_rows, cols, load_mask, softcap, HAS_SOFTCAP)
        if SPREAD:
            a = _spread_mass(t_rows, W, cols, col_ok, load_mask, target_mass, smoothing_per_class,
                             HARD_TARGET, HAS_WEIGHT)
        else:
            a = 0.0
        _store_grad(g_rows, cols, row_ok[:, None] & col_ok[None, :], kept, s, dsdx, a, m, log_sum, spread_grad,
                    z_grad, target_grad, y, one_minus_p_y, scale, focal_gamma, HARD_TARGET, SPREAD, HAS_FOCAL,
                    HAS_Z_LOSS)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Columns of the per-row statistics buffer the forward saves for the backward.
NUM_STATS = int(_NUM_STATS)


def _layout(n_rows: int, n_cols: int, block_c: Optional[int], rows_per_program: Optional[int]) -> tuple[int, int, int]:
    """``(ROWS, BLOCK_C, num_warps)``: a tile of rows for small C, one row and wide blocks for vocabularies.

    ``block_c`` / ``rows_per_program`` override the choice (tests force small blocks so that the multi-block
    path runs with small C); both must be powers of two.
    """
    if block_c is None:
        block_c = min(max(triton.next_power_of_2(n_cols), 2), _MAX_BLOCK_C)
    if rows_per_program is None:
        rows_per_program = max(1, min(_TILE_ELEMENTS // block_c, _MAX_TILE_ROWS, triton.next_power_of_2(n_rows)))
    num_warps = min(16, max(4, rows_per_program * block_c // 256))  # 8 elements per thread
    return rows_per_program, block_c, num_warps


def _mean_divisor(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, n_cols: int,
                  mean_by_count: bool) -> torch.Tensor:
    """The ``mean`` divisor as a 0-d float32 device tensor (no host sync): Σ w_y over kept rows, their count, or N."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=torch.float32, device=target.device)
    kept = target != ignore_index
    if weight is None or mean_by_count:
        return kept.sum(dtype=torch.float32)
    valid = kept & (target >= 0) & (target < n_cols)
    return torch.where(valid, weight[torch.where(valid, target, 0)], 0.0).sum()


def _kernel_operands(target: torch.Tensor, weight: Optional[torch.Tensor]):
    """``(target, weight)`` as the kernels read them: soft targets with unit column stride, weight float32."""
    if target.is_floating_point() and target.stride(-1) != 1:
        target = target.contiguous()
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
    return target, weight


def softmax_loss_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    mean_by_count: bool,
    grad: Optional[torch.Tensor],
    *,
    stats: Optional[torch.Tensor] = None,
    block_c: Optional[int] = None,
    rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """Runs the forward kernel; returns the reduced loss in ``input``'s dtype.

    ``input (N, C)`` fp32/fp16/bf16 with unit stride along C (rows may be strided). ``grad``: None, or (the fused
    form) an ``(N, C)`` tensor with unit column stride that receives ``∂loss/∂input`` (already divided by the
    ``mean`` divisor; it may be ``input`` itself). ``stats``: None, or a contiguous ``(N, NUM_STATS)`` float32
    buffer that receives the row statistics :func:`softmax_loss_backward` needs. ``block_c`` /
    ``rows_per_program``: see :func:`_layout`.
    """
    n_rows, n_cols = input.shape
    hard_target = not target.is_floating_point()
    target, weight = _kernel_operands(target, weight)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    need_divisor = reduction == "mean"
    divisor = _mean_divisor(target, weight, ignore_index, n_cols, mean_by_count) if need_divisor else row_loss
    if n_rows > 0:
        rows, block, num_warps = _layout(n_rows, n_cols, block_c, rows_per_program)
        _softmax_loss_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            input, input.stride(0), target, target.stride(0), weight if weight is not None else row_loss,
            row_loss, grad if grad is not None else input, grad.stride(0) if grad is not None else 0,
            stats if stats is not None else row_loss, divisor,
            n_rows, n_cols, ignore_index, 1.0 - label_smoothing, label_smoothing / n_cols, focal_gamma, z_loss,
            softcap if softcap is not None else 1.0,
            HARD_TARGET=hard_target, HAS_WEIGHT=weight is not None,
            SPREAD=label_smoothing > 0 or not hard_target, HAS_FOCAL=focal_gamma != 0, HAS_Z_LOSS=z_loss != 0,
            HAS_SOFTCAP=softcap is not None, SCALE_BY_DIVISOR=need_divisor, WRITE_GRAD=grad is not None,
            SAVE_STATS=stats is not None, ROWS=rows, BLOCK_C=block, SINGLE_BLOCK=n_cols <= block,
            NUM_STAGES=_NUM_STAGES, num_warps=num_warps,
        )
    if reduction == "none":
        return row_loss.to(input.dtype)
    # Summed in float64: the same result for any row order, and what the other backends return.
    if reduction == "sum":
        return row_loss.sum(dtype=torch.float64).to(input.dtype)
    return (row_loss.sum(dtype=torch.float64) / divisor).to(input.dtype)


def softmax_loss_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    grad: torch.Tensor,
    *,
    block_c: Optional[int] = None,
    rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """Writes ``grad_output * ∂loss/∂input`` into ``grad`` (returned) in one kernel: one read of ``input``, one
    write of ``grad``.

    ``stats``: what :func:`softmax_loss_forward` saved for this ``input`` and these options; ``grad_output``: 0-d,
    or ``(N,)`` (any stride) per row for ``reduction="none"``; ``grad``: ``(N, C)`` with unit column stride, may
    be ``input`` itself (``inplace_backward``).
    """
    n_rows, n_cols = input.shape
    if n_rows == 0:
        return grad
    hard_target = not target.is_floating_point()
    target, weight = _kernel_operands(target, weight)
    rows, block, num_warps = _layout(n_rows, n_cols, block_c, rows_per_program)
    per_row = grad_output.dim() == 1
    _softmax_loss_bwd_kernel[(triton.cdiv(n_rows, rows),)](
        input, input.stride(0), target, target.stride(0), weight if weight is not None else stats,
        grad, grad.stride(0), stats, grad_output, grad_output.stride(0) if per_row else 0,
        n_rows, n_cols, ignore_index, 1.0 - label_smoothing, label_smoothing / n_cols, focal_gamma, z_loss,
        softcap if softcap is not None else 1.0,
        HARD_TARGET=hard_target, HAS_WEIGHT=weight is not None, SPREAD=label_smoothing > 0 or not hard_target,
        HAS_FOCAL=focal_gamma != 0, HAS_Z_LOSS=z_loss != 0, HAS_SOFTCAP=softcap is not None, PER_ROW=per_row,
        ROWS=rows, BLOCK_C=block, NUM_STAGES=_NUM_STAGES, num_warps=num_warps,
    )
    return grad


def launch_configurations() -> list[dict]:
    """Every kernel build the launchers above can ask for, for offline compile checks (tests/test_triton_build.py).

    Each entry: ``name``, ``kernel``, ``signature`` (types of the non-constexpr arguments), ``constexprs`` and
    ``num_warps``. The layouts come from :func:`_layout` over every power-of-two row count and class count it
    distinguishes (and a class count above ``_MAX_BLOCK_C``: the multi-block sweep); each layout is built with
    every option on (the most registers) for hard and for soft targets, in bfloat16 (and float32 at the widest
    layout): the forward in its three modes (loss only, loss + statistics, the fused loss + gradient) and the
    backward with a scalar and a per-row ``grad_output``.
    """
    layouts = set()
    for n_cols in [1 << e for e in range(1, _MAX_BLOCK_C.bit_length())] + [_MAX_BLOCK_C + 1]:
        for n_rows in [1 << e for e in range(0, 7)]:
            rows, block, num_warps = _layout(n_rows, n_cols, None, None)
            layouts.add((rows, block, n_cols <= block, num_warps))
    options = dict(HAS_WEIGHT=True, SPREAD=True, HAS_FOCAL=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True)
    forward_modes = {"loss": dict(WRITE_GRAD=False, SAVE_STATS=False), "stats": dict(WRITE_GRAD=False, SAVE_STATS=True),
                     "fused": dict(WRITE_GRAD=True, SAVE_STATS=False)}
    builds = []
    for rows, block, single, num_warps in sorted(layouts):
        dtypes = ("bf16", "fp32") if not single or block == _MAX_BLOCK_C else ("bf16",)
        layout = dict(ROWS=rows, BLOCK_C=block, SINGLE_BLOCK=single, NUM_STAGES=_NUM_STAGES)
        where = f"rows={rows} block={block}{'' if single else ' multi-block'}"
        for dtype in dtypes:
            for hard in (True, False):
                kind = "hard" if hard else "soft"
                common = {"X": f"*{dtype}", "stride_x": "i64", "T": "*i64" if hard else f"*{dtype}",
                          "stride_t": "i64", "W": "*fp32", "GRAD": f"*{dtype}", "stride_g": "i64", "STATS": "*fp32",
                          "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32", "target_mass": "fp32",
                          "smoothing_per_class": "fp32", "focal_gamma": "fp32", "z_loss": "fp32", "softcap": "fp32"}
                for mode, flags in forward_modes.items():
                    builds.append(dict(
                        name=f"forward {mode} {dtype} {kind} {where}", kernel=_softmax_loss_fwd_kernel,
                        signature=dict(common, LOSS="*fp32", DIVISOR="*fp32"),
                        constexprs=dict(HARD_TARGET=hard, SCALE_BY_DIVISOR=True, **options, **flags, **layout),
                        num_warps=num_warps))
                for per_row in (True, False):
                    builds.append(dict(
                        name=f"backward {dtype} {kind} per_row={per_row} {where}", kernel=_softmax_loss_bwd_kernel,
                        signature=dict(common, GRAD_OUT=f"*{dtype}", stride_go="i64"),
                        constexprs=dict(HARD_TARGET=hard, PER_ROW=per_row, ROWS=rows, BLOCK_C=block,
                                        NUM_STAGES=_NUM_STAGES, **options),
                        num_warps=num_warps))
    return builds


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedloss::triton_softmax_loss_stats", mutates_args=())
def _softmax_loss_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    mean_by_count: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)``: ``stats`` are the ``(N, NUM_STATS)`` float32 row statistics of the backward, or an empty
    ``(0,)`` tensor when no gradient is wanted (the forward then only reads the logits)."""
    if input.stride(-1) != 1:
        input = input.contiguous()
    stats = (input.new_empty((input.shape[0], NUM_STATS), dtype=torch.float32) if compute_grad
             else input.new_empty(0, dtype=torch.float32))
    loss = softmax_loss_forward(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                z_loss, softcap, mean_by_count, None, stats=stats if compute_grad else None)
    return loss, stats


@_softmax_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, mean_by_count,
      compute_grad):
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    stats = (input.new_empty((input.shape[0], NUM_STATS), dtype=torch.float32) if compute_grad
             else input.new_empty(0, dtype=torch.float32))
    return loss, stats


@torch.library.custom_op("fusedloss::triton_softmax_loss_backward", mutates_args=())
def _softmax_loss_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
) -> torch.Tensor:
    """``grad_output * ∂loss/∂input`` as a new contiguous ``(N, C)`` tensor (see :func:`softmax_loss_backward`)."""
    if input.stride(-1) != 1:
        input = input.contiguous()
    grad = torch.empty_like(input, memory_format=torch.contiguous_format)
    return softmax_loss_backward(grad_output, input, target, weight, stats, ignore_index, label_smoothing,
                                 focal_gamma, z_loss, softcap, grad)


@_softmax_loss_backward_op.register_fake
def _(grad_output, input, target, weight, stats, ignore_index, label_smoothing, focal_gamma, z_loss, softcap):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, _reduction, label_smoothing, focal_gamma, z_loss, softcap, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(input, target, weight, output[1])
    ctx.options = (ignore_index, label_smoothing, focal_gamma, z_loss, softcap)


def _backward(ctx, grad_loss, _grad_of_stats):
    input, target, weight, stats = ctx.saved_tensors
    grad = torch.ops.fusedloss.triton_softmax_loss_backward(grad_loss, input, target, weight, stats, *ctx.options)
    return (grad,) + (None,) * 10


_softmax_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _SoftmaxLoss(torch.autograd.Function):
    """Eager path (no custom-op layer, which costs tens of microseconds a call): the forward kernel computes the
    loss and saves row statistics; backward writes the gradient into a new buffer, or over ``input``'s storage
    with ``inplace``."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
                mean_by_count, inplace):
        stats = torch.empty((input.shape[0], NUM_STATS), dtype=torch.float32, device=input.device)
        loss = softmax_loss_forward(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                    z_loss, softcap, mean_by_count, None, stats=stats)
        ctx.save_for_backward(input, target, weight, stats)
        ctx.options = (ignore_index, label_smoothing, focal_gamma, z_loss, softcap)
        ctx.inplace = inplace
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        input, target, weight, stats = ctx.saved_tensors
        grad = (input.detach() if ctx.inplace
                else torch.empty_like(input, memory_format=torch.contiguous_format))
        softmax_loss_backward(grad_loss, input, target, weight, stats, *ctx.options, grad)
        if ctx.inplace:
            # The logits are gone: a second backward through the same graph (retain_graph=True) must raise (the
            # saved input's version moved) rather than recompute from the gradient.
            torch.autograd.graph.increment_version(input)
        return (grad,) + (None,) * 10


# ----------------------------------------------------------------------------------------------
# The op of docs/BACKENDS.md
# ----------------------------------------------------------------------------------------------


def softmax_loss_reasons(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    mean_by_count: bool,
    inplace_backward: bool,
) -> list[str]:
    """Why the Triton kernels cannot serve this call (empty when they can)."""
    reasons = []
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"computes in float32 for float32/float16/bfloat16 input, got {input.dtype} "
                       "(use the reference or cpp backend for float64)")
    if target.is_floating_point() and target.requires_grad:
        reasons.append("does not compute the gradient with respect to soft targets (target.requires_grad=True)")
    if weight is not None and weight.requires_grad:
        reasons.append("does not compute the gradient with respect to weight (weight.requires_grad=True)")
    return reasons


def softmax_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    mean_by_count: bool,
    inplace_backward: bool,
) -> torch.Tensor:
    """Softmax loss of ``input (N, C)`` (fp32/fp16/bf16) against int64 ``(N,)`` indices or ``(N, C)`` probabilities.

    Same contract and result as ``fusedloss.reference.softmax.softmax_loss`` (see the module docstring for the
    math): ``(N,)`` for ``reduction="none"``, else a scalar, in ``input``'s dtype. The forward saves row
    statistics only when autograd will need them (``input.requires_grad`` and grad mode on); the backward
    recomputes the softmax from them and writes the gradient.

    ``inplace_backward=True`` makes the backward write the gradient over ``input``'s storage (no extra ``(N, C)``
    memory; ``input`` holds the gradient after backward and must not be used, nor saved for backward by the op
    that produced it; ``input`` must not be changed between forward and backward either: autograd checks). It
    falls back to a separate gradient buffer when ``input``'s last dimension is not contiguous, and under
    ``torch.compile`` (the compiler owns the buffers there and a hidden write into an input is not allowed).
    """
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        loss, _ = torch.ops.fusedloss.triton_softmax_loss_stats(input, target, weight, ignore_index, reduction,
                                                                label_smoothing, focal_gamma, z_loss, softcap,
                                                                mean_by_count, compute_grad)
        return loss
    inplace = inplace_backward and input.stride(-1) == 1
    if input.stride(-1) != 1:
        input = input.contiguous()
    if not compute_grad:
        return softmax_loss_forward(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                    z_loss, softcap, mean_by_count, None)
    return _SoftmaxLoss.apply(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss,
                              softcap, mean_by_count, inplace)
