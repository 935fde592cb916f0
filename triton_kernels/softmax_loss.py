"""Triton backend of the ``softmax_loss`` op (docs/BACKENDS.md; semantics in docs/softmax.rst): cross entropy,
label smoothing, class weights, focal factor, z-loss and logit soft-capping, with the gradient written by the
forward kernel.

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
rounded tanh would not (and tanh itself is within 2 ulps).

The target-class term ``p_y S - G_y`` is formed in float32 and only the finished gradient is cast to the input
dtype (rounding ``p_y - 1`` to bfloat16 first loses it, a bug reported in Liger-Kernel).

Passes over a row (Liger-Kernel's "gradient in the forward pass"): pass 1 finds the running max and sum of
exponentials (online softmax, Milakov & Gimelshein 2018) and, without focal factor, the sums ``Σ a_c`` and
``Σ a_c s_c`` that give the smoothed / soft-target loss; only γ > 0 with mass spread over every class
(label smoothing or soft targets) needs a second pass, because ``G_c`` depends on the final ``lse``; the last
pass writes the gradient, already divided by the ``mean`` divisor. When the row fits one block (C <= 4096) all of
it happens on one tile in registers, so the logits are read once (NER tag sets: several rows per program);
vocabulary rows (C up to 262144 and beyond) take one row per program and loop over blocks of 4096, reading the
logits twice (three times for γ > 0 with smoothing or soft targets) and writing the gradient once, as
Liger-Kernel does. The backward kernel only
multiplies the stored gradient by ``grad_output`` in place (a scalar, or per row for ``reduction="none"``), and
a program skips reading and writing when the scalar is exactly 1 (checked on the device: no host sync).

Row offsets are ``int64(row) * stride`` so ``N * C`` above 2^31 works. Padding lanes hold ``-1e30``, never
``-inf`` (``-inf - -inf`` is NaN, and the interpreter computes it). NaN or Inf in a row reaches only that row.

Registration: ``fusedloss::triton_softmax_loss`` (functional, returns the loss and the gradient buffer) and
``fusedloss::triton_softmax_loss_scale_grad`` (scales the buffer in place) are ``torch.library.custom_op``\\ s
with fake implementations and registered autograd, used while ``torch.compile`` traces, so
``torch.compile(fullgraph=True)`` runs through them; ``triton_op`` + ``wrap_triton`` would let Inductor see the
kernels but fails on CPU tensors under the interpreter (Dynamo's fake-tensor pass reaches the kernel's data
pointers). Eager calls skip the op registry (its Python layers cost tens of microseconds a call): a plain
``autograd.Function`` launches the kernels, and without a gradient to compute only the loss is computed.
``inplace_backward=True`` is eager only, because a custom op may neither return an alias of its input nor mutate a
leaf.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Finite stand-in for -inf in padding lanes and initial maxima (constexpr: kernels may read no other globals).
_NEG = tl.constexpr(-1.0e30)
# float32's smallest normal number: below it (1 - p)^γ is taken as 0 (reference.softmax.focal_factor).
_TINY = tl.constexpr(1.1754943508222875e-38)
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
def _expm1(u, e):
    """``exp(u) - 1`` to a few ulps for every u, given ``e = exp(u)``: Kahan's trick (the rounding errors of exp
    and log cancel) where ``|u| <= 1``; beyond, ``e - 1`` itself cancels at most a bit, while ``log(e)`` of a
    subnormal ``e`` (u below about -87) is off by much more and would spoil the ratio."""
    near_zero = (tl.abs(u) <= 1.0) & (e != 1.0)
    e_safe = tl.where(near_zero, e, 0.5)
    ratio = (e_safe - 1.0) * u / tl.log(e_safe)
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
        e = tl.exp(-2.0 * abs_z)
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
    p = tl.exp(log_p)
    one_minus_p = -_expm1(log_p, p)
    representable = one_minus_p > _TINY
    safe = tl.where(representable, one_minus_p, 1.0)
    factor = tl.where(representable, tl.exp(gamma * tl.log(safe)), 0.0)
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
def _store_grad(g_rows, cols, store_mask, kept, s, dsdx, a, m, log_sum, spread_grad, z_grad, target_grad, y,
                one_minus_p_y, scale, gamma, HARD_TARGET: tl.constexpr, SPREAD: tl.constexpr,
                HAS_FOCAL: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """Writes ``(p (S + 2 z lse) - G) * ds/dx * scale`` for one block; ignored rows get exactly 0.

    The parts of ``S`` (hard target ``G_y``, spread mass) and the z-loss term ``2 z lse p`` are formed one by one,
    as autograd of the reference does, and the target class takes ``-(1 - p_y) G_y`` with ``1 - p_y`` the sum of
    the other classes' probabilities (``p_y - 1`` of a rounded ``p_y`` has an error of ``ulp(1) / (1 - p_y)``
    relative): one coefficient of ``p`` would round the small parts away where ``p`` is close to 1.
    """
    log_p = (s - m[:, None]) - log_sum[:, None]
    p = tl.exp(log_p)
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
    grad = tl.where(kept[:, None], grad * dsdx * scale, 0.0)
    tl.store(g_rows + cols[None, :], grad.to(g_rows.dtype.element_ty), mask=store_mask)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softmax_loss_fwd_kernel(
    X, stride_x, T, stride_t, W, LOSS, GRAD, stride_g, DIVISOR,
    n_rows, n_cols, ignore_index, target_mass, smoothing_per_class, focal_gamma, z_loss, softcap,
    HARD_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPREAD: tl.constexpr, HAS_FOCAL: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SCALE_BY_DIVISOR: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """Per-row loss into ``LOSS (N,)`` float32 and, if ``WRITE_GRAD``, ``∂loss/∂x`` into ``GRAD`` (may be ``X``).

    A program owns ``ROWS`` rows; ``SINGLE_BLOCK`` (``C <= BLOCK_C``) keeps the whole ``[ROWS, BLOCK_C]`` tile in
    registers, otherwise the row is swept in blocks (online softmax). ``T`` holds int64 indices ``(N,)`` for hard
    targets or probabilities ``(N, C)`` for soft ones. ``SPREAD``: ``a`` has mass on every class (smoothing or
    soft targets). ``DIVISOR`` (a 0-d float32 tensor) scales the gradient for ``reduction="mean"``.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows[:, None] * stride_x
    t_rows = T + rows[:, None] * stride_t
    col_base = tl.arange(0, BLOCK_C)

    if HARD_TARGET:
        y = tl.load(T + rows * stride_t, mask=row_ok, other=ignore_index)
        kept = row_ok & (y != ignore_index)
        # Out-of-range targets are rejected by the public layer on CPU; here they only must not be dereferenced.
        y_ok = kept & (y >= 0) & (y < n_cols)
        x_y = tl.load(X + rows * stride_x + y, mask=y_ok, other=0.0).to(tl.float32)
        s_y = _capped(x_y, softcap, HAS_SOFTCAP)[0]
        if HAS_WEIGHT:
            w_y = tl.load(W + y, mask=y_ok, other=0.0)
        else:
            w_y = tl.where(y_ok, 1.0, 0.0)
    else:
        y = rows
        kept = row_ok
    # Ignored rows are never read: with padding tokens common in language-model batches this saves bandwidth.
    kept_2d = kept[:, None]

    # Pass 1: max and sum of exponentials (and, without focal factor, the sums that give the spread loss).
    if SINGLE_BLOCK:
        col_ok = col_base < n_cols
        load_mask = kept_2d & col_ok[None, :]
        s, dsdx = _load_logits(x_rows, col_base, load_mask, softcap, HAS_SOFTCAP)
        m = tl.max(s, axis=1)
        e = tl.exp(s - m[:, None])
        d = tl.sum(e, axis=1)
        log_sum = tl.log(d)
        if HARD_TARGET:
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
        for start in range(0, n_cols, BLOCK_C):
            cols = start + col_base
            col_ok = cols < n_cols
            load_mask = kept_2d & col_ok[None, :]
            s = _load_logits(x_rows, cols, load_mask, softcap, HAS_SOFTCAP)[0]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            e = tl.exp(s - m_new[:, None])
            d = d * tl.exp(m - m_new) + tl.sum(e, axis=1)
            if HARD_TARGET:
                others = others * tl.exp(m - m_new) + tl.sum(tl.where(cols[None, :] == y[:, None], 0.0, e), axis=1)
            if SPREAD:
                if not HAS_FOCAL:
                    a = _spread_mass(t_rows, W, cols, col_ok, load_mask, target_mass, smoothing_per_class,
                                     HARD_TARGET, HAS_WEIGHT)
                    mass_dot_s += mass * (m - m_new) + tl.sum(a * (s - m_new[:, None]), axis=1)
                    mass += tl.sum(a, axis=1)
            m = m_new
        log_sum = tl.log(d)
        if SPREAD:
            if HAS_FOCAL:
                # Pass 2: G_c needs the final lse, so the focal spread terms take one more sweep.
                spread_loss = tl.zeros([ROWS], tl.float32)
                spread_grad = tl.zeros([ROWS], tl.float32)
                for start in range(0, n_cols, BLOCK_C):
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

    if WRITE_GRAD:
        if SCALE_BY_DIVISOR:
            scale = 1.0 / tl.load(DIVISOR)
        else:
            scale = 1.0
        g_rows = GRAD + rows[:, None] * stride_g
        if SINGLE_BLOCK:
            store_mask = row_ok[:, None] & (col_base < n_cols)[None, :]
            _store_grad(g_rows, col_base, store_mask, kept, s, dsdx, a, m, log_sum, spread_grad, z_grad, target_grad,
                        y, one_minus_p_y, scale, focal_gamma, HARD_TARGET, SPREAD, HAS_FOCAL, HAS_Z_LOSS)
        else:
            for start in range(0, n_cols, BLOCK_C):
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
def _scale_grad_kernel(GRAD, stride_g, GRAD_OUT, stride_go, n_rows, n_cols,
                       PER_ROW: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``GRAD[n, :] *= grad_output`` in place: one scalar, or ``grad_output[n]`` when ``PER_ROW``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    g_rows = GRAD + rows[:, None] * stride_g
    col_base = tl.arange(0, BLOCK_C)
    if PER_ROW:
        factor = tl.load(GRAD_OUT + rows * stride_go, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        for start in range(0, n_cols, BLOCK_C):
            cols = start + col_base
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            grad = tl.load(g_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(g_rows + cols[None, :], (grad * factor).to(GRAD.dtype.element_ty), mask=mask)
    else:
        factor = tl.load(GRAD_OUT).to(tl.float32)
        # loss.backward() passes exactly 1: the stored gradient is already final, so skip the traffic.
        if factor != 1.0:
            for start in range(0, n_cols, BLOCK_C):
                cols = start + col_base
                mask = row_ok[:, None] & (cols < n_cols)[None, :]
                grad = tl.load(g_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(g_rows + cols[None, :], (grad * factor).to(GRAD.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


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
    block_c: Optional[int] = None,
    rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """Runs the forward kernel; returns the reduced loss in ``input``'s dtype.

    ``input (N, C)`` fp32/fp16/bf16 with unit stride along C (rows may be strided); ``grad``: None (no
    gradient), or an ``(N, C)`` tensor with unit column stride that receives ``∂loss/∂input`` (already divided by
    the ``mean`` divisor); it may be ``input`` itself. ``block_c`` / ``rows_per_program``: see :func:`_layout`.
    """
    n_rows, n_cols = input.shape
    hard_target = not target.is_floating_point()
    if not hard_target and target.stride(-1) != 1:
        target = target.contiguous()
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    need_divisor = reduction == "mean"
    divisor = _mean_divisor(target, weight, ignore_index, n_cols, mean_by_count) if need_divisor else row_loss
    if n_rows > 0:
        rows, block, num_warps = _layout(n_rows, n_cols, block_c, rows_per_program)
        _softmax_loss_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            input, input.stride(0), target, target.stride(0), weight if weight is not None else row_loss,
            row_loss, grad if grad is not None else input, grad.stride(0) if grad is not None else 0, divisor,
            n_rows, n_cols, ignore_index, 1.0 - label_smoothing, label_smoothing / n_cols, focal_gamma, z_loss,
            softcap if softcap is not None else 1.0,
            HARD_TARGET=hard_target, HAS_WEIGHT=weight is not None,
            SPREAD=label_smoothing > 0 or not hard_target, HAS_FOCAL=focal_gamma != 0, HAS_Z_LOSS=z_loss != 0,
            HAS_SOFTCAP=softcap is not None, SCALE_BY_DIVISOR=need_divisor, WRITE_GRAD=grad is not None,
            ROWS=rows, BLOCK_C=block, SINGLE_BLOCK=n_cols <= block, num_warps=num_warps,
        )
    if reduction == "none":
        return row_loss.to(input.dtype)
    # Summed in float64: the same result for any row order, and what the other backends return.
    if reduction == "sum":
        return row_loss.sum(dtype=torch.float64).to(input.dtype)
    return (row_loss.sum(dtype=torch.float64) / divisor).to(input.dtype)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, *, block_c: Optional[int] = None,
                rows_per_program: Optional[int] = None) -> None:
    """``grad (N, C) *= grad_output`` in place; ``grad_output`` is 0-d, or ``(N,)`` (any stride) per row."""
    n_rows, n_cols = grad.shape
    if n_rows == 0:
        return
    rows, block, num_warps = _layout(n_rows, n_cols, block_c, rows_per_program)
    per_row = grad_output.dim() == 1
    _scale_grad_kernel[(triton.cdiv(n_rows, rows),)](
        grad, grad.stride(0), grad_output, grad_output.stride(0) if per_row else 0, n_rows, n_cols,
        PER_ROW=per_row, ROWS=rows, BLOCK_C=block, num_warps=num_warps,
    )
    # The kernel writes through a raw pointer: tell autograd, so that a second backward through the same graph
    # (retain_graph=True) raises instead of scaling the buffer twice (and .grad, which may hold it, with it).
    torch.autograd.graph.increment_version(grad)


def launch_configurations() -> list[dict]:
    """Every kernel build the launchers above can ask for, for offline compile checks (tests/test_triton_build.py).

    Each entry: ``name``, ``kernel``, ``signature`` (types of the non-constexpr arguments), ``constexprs`` and
    ``num_warps``. The layouts come from :func:`_layout` over every power-of-two row count and class count it
    distinguishes (and a class count above ``_MAX_BLOCK_C``: the multi-block sweep); each layout is built with
    every option on (the most registers) for hard and for soft targets, in bfloat16 (and float32 at the widest
    layout).
    """
    layouts = set()
    for n_cols in [1 << e for e in range(1, _MAX_BLOCK_C.bit_length())] + [_MAX_BLOCK_C + 1]:
        for n_rows in [1 << e for e in range(0, 7)]:
            rows, block, num_warps = _layout(n_rows, n_cols, None, None)
            layouts.add((rows, block, n_cols <= block, num_warps))
    builds = []
    for rows, block, single, num_warps in sorted(layouts):
        dtypes = ("bf16", "fp32") if not single or block == _MAX_BLOCK_C else ("bf16",)
        for dtype in dtypes:
            layout = dict(ROWS=rows, BLOCK_C=block)
            for hard in (True, False):
                signature = {"X": f"*{dtype}", "stride_x": "i64", "T": "*i64" if hard else f"*{dtype}",
                             "stride_t": "i64", "W": "*fp32", "LOSS": "*fp32", "GRAD": f"*{dtype}", "stride_g": "i64",
                             "DIVISOR": "*fp32", "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32",
                             "target_mass": "fp32", "smoothing_per_class": "fp32", "focal_gamma": "fp32",
                             "z_loss": "fp32", "softcap": "fp32"}
                constexprs = dict(HARD_TARGET=hard, HAS_WEIGHT=True, SPREAD=True, HAS_FOCAL=True, HAS_Z_LOSS=True,
                                  HAS_SOFTCAP=True, SCALE_BY_DIVISOR=True, WRITE_GRAD=True, SINGLE_BLOCK=single,
                                  **layout)
                builds.append(dict(name=f"forward {dtype} {'hard' if hard else 'soft'} rows={rows} block={block}"
                                        f"{'' if single else ' multi-block'}",
                                   kernel=_softmax_loss_fwd_kernel, signature=signature, constexprs=constexprs,
                                   num_warps=num_warps))
            for per_row in (True, False):
                signature = {"GRAD": f"*{dtype}", "stride_g": "i64", "GRAD_OUT": "*fp32", "stride_go": "i64",
                             "n_rows": "i32", "n_cols": "i32"}
                builds.append(dict(name=f"scale_grad {dtype} per_row={per_row} rows={rows} block={block}",
                                   kernel=_scale_grad_kernel, signature=signature,
                                   constexprs=dict(PER_ROW=per_row, **layout), num_warps=num_warps))
    return builds


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedloss::triton_softmax_loss", mutates_args=())
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
    """``(loss, grad)``: ``grad`` is ``∂loss/∂input``, contiguous ``(N, C)``, or empty ``(0,)`` if not asked for."""
    if input.stride(-1) != 1:
        input = input.contiguous()
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad else input.new_empty(0)
    loss = softmax_loss_forward(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                z_loss, softcap, mean_by_count, grad if compute_grad else None)
    return loss, grad


@_softmax_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, mean_by_count,
      compute_grad):
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad else input.new_empty(0)
    return loss, grad


@torch.library.custom_op("fusedloss::triton_softmax_loss_scale_grad", mutates_args=("grad",))
def _scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``grad *= grad_output`` in place (see :func:`scale_grad_`)."""
    scale_grad_(grad, grad_output)


@_scale_grad_op.register_fake
def _(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    # The stored gradient is scaled in place: no second (N, C) buffer (the memory rule of docs/softmax.rst).
    # Its version counter moves, so a second backward through the same graph (retain_graph=True) raises instead
    # of scaling twice.
    (grad,) = ctx.saved_tensors
    torch.ops.fusedloss.triton_softmax_loss_scale_grad(grad, grad_loss)
    return (grad,) + (None,) * 10


_softmax_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _SoftmaxLoss(torch.autograd.Function):
    """Eager path (no custom-op layer, which costs tens of microseconds a call): the forward kernel writes the
    gradient into a new buffer, or over ``input``'s storage with ``inplace``; backward scales it in place."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
                mean_by_count, inplace):
        grad = input.detach() if inplace else torch.empty_like(input, memory_format=torch.contiguous_format)
        loss = softmax_loss_forward(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                    z_loss, softcap, mean_by_count, grad)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: no second (N, C) buffer. The saved tensor's version moves, so a second backward through the
        # same graph (retain_graph=True) raises instead of scaling twice.
        (grad,) = ctx.saved_tensors
        scale_grad_(grad, grad_loss)
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
    math): ``(N,)`` for ``reduction="none"``, else a scalar, in ``input``'s dtype. The gradient is computed by the
    forward kernel only when autograd will need it (``input.requires_grad`` and grad mode on).

    ``inplace_backward=True`` writes the gradient over ``input``'s storage (no extra ``(N, C)`` memory; ``input``
    holds the gradient afterwards and must not be used, nor saved for backward by the op that produced it). It
    falls back to a separate gradient buffer when ``input``'s last dimension is not contiguous, and under
    ``torch.compile`` (the compiler owns the buffers there and a hidden write into an input is not allowed).
    """
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        loss, _ = torch.ops.fusedloss.triton_softmax_loss(input, target, weight, ignore_index, reduction,
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
