"""Triton kernels of the linear-chain CRF: log-likelihood with a hand-written backward, Viterbi, marginals, and
for partial annotation the partial-label log-likelihood, log Z and the k best paths.

The ``triton`` backend of the internal ops ``crf_log_likelihood``, ``crf_viterbi``, ``crf_marginals``,
``crf_partial_log_likelihood``, ``crf_log_partition`` and ``crf_kbest_viterbi`` (docs/BACKENDS.md). Arguments
are batch first and already validated by the public layer: emissions ``(B, T, K)`` float16/bfloat16/float32, tags
``(B, T)`` int64 in [0, K), allowed tag sets ``(B, T, K)`` bool (read only at unmasked positions), mask ``(B, T)``
bool left-aligned with ``mask[:, 0]`` all true, transitions ``A (K, K)`` (``A[i, j]`` scores i -> j), start
``s (K,)`` and end ``f (K,)`` transitions, constraints already folded in as ``-1e4`` entries. Everything is
computed in float32; results have the dtype ``promote_types(emissions.dtype, transitions.dtype)``. float64 is
declined (see the ``*_reasons`` functions): the kernels accumulate in float32 and the reference and cpp backends
serve float64.

The math, for a sequence of length L (a prefix of ones in its mask)::

    α_0[j] = s[j] + e[0, j],   α_t[j] = logsumexp_i(α_{t-1}[i] + A[i, j]) + e[t, j]   (0 < t < L)
    log Z  = logsumexp_j(α_{L-1}[j] + f[j])
    β_{L-1}[i] = f[i],         β_{t-1}[i] = logsumexp_j(A[i, j] + e[t, j] + β_t[j])
    P(y_t = j) = exp(α_t[j] + β_t[j] - log Z)
    P(y_{t-1} = i, y_t = j) = exp(α_{t-1}[i] + A[i, j] + e[t, j] + β_t[j] - log Z)

and the log-likelihood ``ll = score(y) - log Z`` has the gradients (g = the sequence's grad_output)::

    ∂/∂e[t, j] = g (1[y_t = j] - P(y_t = j))                          (t < L, else 0)
    ∂/∂A[i, j] = g Σ_{0<t<L} (1[y_{t-1} = i, y_t = j] - P(y_{t-1} = i, y_t = j))
    ∂/∂s[j]    = ∂/∂e[0, j],     ∂/∂f[j] = ∂/∂e[L-1, j]

Layout of the work: one program owns a tile of ``BLOCK_B`` sequences and loops over time inside the kernel;
the K tags are processed in tiles of ``BLOCK_K`` (several tiles when K does not fit a block). The recursion
state of step t-1 lives in a float32 buffer that the same program wrote (α is kept for all t, as the backward
needs it), so a step reads it tile by tile; a barrier between steps makes one step's writes visible to the
next step's reads. The stored variables are scaled: each step subtracts the previous row max, so they stay
the size of one step's scores however long the sequence (pytorch-crf's α grow like T times the emissions, and
so do their rounding errors), and the backward normalizes each step's marginals on its own instead of
subtracting log Z from α + β.

Forward step in matrix form (the scaled forward algorithm): with ``m = max_i a[i]``, ``c_j = max_i A[i, j]`` and
``E[i, j] = exp(A[i, j] - c_j)`` computed once per call, ``logsumexp_i(a[i] - m + A[i, j]) =
log Σ_i exp(a[i] - m) E[i, j] + c_j``: K exps and a ``(BLOCK_B, K) x (K, K)`` product per step, one ``tl.dot``
for batch tiles of 16 and more (``input_precision="ieee"``: full float32, on the FMA units; "tf32x3" would
move it to tensor cores at an accuracy cost to be measured on a GPU). Where a column's sum falls under
``_UNDERFLOW_GUARD`` (its best predecessor is far below m: large emissions with forbidden transitions) the
column is recomputed exactly as an online logsumexp. The backward step is the same operation with ``Aᵀ``.

Viterbi is the max-plus recursion (no exp) with backpointers in int8/uint8/int16 by K, backtracked inside the
kernel.

The partial-label log-likelihood ``log Z_allowed - log Z`` is the forward kernel run twice in one program (the
recursion with the emissions outside each position's allowed set at ``-1e30``, then the free one), and its
gradient, the constrained minus the free marginals, the backward kernel run twice in one program, the second pass
subtracting from the first's output. log Z is the forward kernel without the gold path, and its gradient the
backward kernel's marginals times the incoming gradient. The k best paths come from the list-Viterbi kernel, one
sequence per program: per step and tag the k best partial scores with backpointers (previous tag, rank) in a
(B, T, K, k) int16/int32 buffer, selected in k rounds of max over the (previous tag, rank) candidates, and
backtracked inside the kernel.

Values nobody checked: on CUDA tensors the public layer does not read masks and tags back (that would wait for
the device), so the kernels give defined results for any of them and never form an address outside a sequence's
own rows. A sequence whose mask is all off (length 0) gets a NaN log-likelihood and a zero gradient, NaN
marginals at every position, a path of -1 and a NaN score; a tag outside [0, K) at one of its steps a NaN
log-likelihood and a zero gradient (a bad tag is replaced by 0 before it indexes anything, and the backward
launcher gives the sequence length 0). The other sequences' values are exactly those of a batch without the bad
one. GPU performance is unmeasured (no GPU was available when this was written): the block sizes are those
that compile for sm_90 without register spills (make triton-build-check), the batch tile threshold a first guess
for an H100.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Finite stand-in for -inf in padding lanes: -inf would turn max-subtraction into inf - inf = NaN.
_NEG = tl.constexpr(-1.0e30)
# A column sum of the matrix-form step below this has lost its largest term to float32 underflow (each term
# is at most 1 and there are at most K of them, so a sum >= 1e-20 keeps a term >= 1e-20 / K, far from the
# float32 subnormal range); such columns are recomputed exactly.
_UNDERFLOW_GUARD = tl.constexpr(1.0e-20)
# What an emission outside a position's allowed set becomes in the constrained recursion of the partial-label
# likelihood (docs/BACKENDS.md): its exp is exactly 0, and no arithmetic meets an infinity.
_PARTIAL_LABEL_SCORE = tl.constexpr(-1.0e30)
# List Viterbi: a rank that holds no path scores _NO_PATH, below any path's score (which can reach -1e30 when
# emissions hold _PARTIAL_LABEL_SCORE), and a candidate already taken or outside the tile _TAKEN, below both;
# both finite, and far enough from the float32 limit that adding a transition score keeps them finite.
_NO_PATH = tl.constexpr(-2.0e38)
_TAKEN = tl.constexpr(-3.0e38)
# An index no candidate has (lanes outside the tile, empty list entries).
_NO_INDEX_VALUE = 2**31 - 1
_NO_INDEX = tl.constexpr(_NO_INDEX_VALUE)
# The transition-gradient accumulator holds one (K, K) float32 matrix per group of programs; it is capped at
# this many floats so that large K times many programs stays within memory (programs then share by atomics).
_PAIR_ACCUMULATOR_FLOATS = 1 << 24
# The most paths the k-best kernel keeps per tag (its ranks are one block, selected in k rounds a step).
_KBEST_MAX = 64


@triton.jit
def _logsumexp_step(
    state_ptr,
    row_offsets,
    row_max,
    rows_ok,
    mat_ptr,
    expmat_ptr,
    colmax_ptr,
    cols,
    cols_ok,
    K,
    NUM_K_TILES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """``out[b, x] = logsumexp_y(state[b, y] - row_max[b] + mat[y, x])`` for one tile of columns x,
    ``(BLOCK_B, BLOCK_K)``: the step relative to the state's row max, so values stay the size of one step.

    ``state`` rows start at ``state_ptr + row_offsets``; ``row_max`` is each row's max over y;
    ``expmat = exp(mat - colmax)`` with ``colmax[x] = max_y mat[y, x]``.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for y_tile in range(NUM_K_TILES):
        ys = y_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        ys_ok = ys < K
        state = tl.load(state_ptr + row_offsets[:, None] + ys[None, :], mask=rows_ok[:, None] & ys_ok[None, :],
                        other=_NEG)
        scaled = tl.exp(state - row_max[:, None])
        expmat = tl.load(expmat_ptr + ys[:, None] * K + cols[None, :], mask=ys_ok[:, None] & cols_ok[None, :],
                         other=0.0)
        if USE_DOT:
            acc += tl.dot(scaled, expmat, input_precision="ieee")
        else:
            acc += tl.sum(scaled[:, :, None] * expmat[None, :, :], axis=1)
    colmax = tl.load(colmax_ptr + cols, mask=cols_ok, other=0.0)
    # Padding rows and columns must not trigger the guard; an underflowed sum is replaced below, so its log
    # is taken of the guard value instead of 0.
    acc = tl.where(rows_ok[:, None] & cols_ok[None, :], acc, 1.0)
    out = tl.log(tl.maximum(acc, _UNDERFLOW_GUARD)) + colmax[None, :]
    if tl.min(acc) < _UNDERFLOW_GUARD:
        # Exact online logsumexp over the y tiles, only for tiles where some column underflowed.
        run_max = tl.full((BLOCK_B, BLOCK_K), _NEG, dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        for y_tile in range(NUM_K_TILES):
            ys = y_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            ys_ok = ys < K
            state = tl.load(state_ptr + row_offsets[:, None] + ys[None, :], mask=rows_ok[:, None] & ys_ok[None, :],
                            other=_NEG)
            mat = tl.load(mat_ptr + ys[:, None] * K + cols[None, :], mask=ys_ok[:, None] & cols_ok[None, :],
                          other=_NEG)
            scores = (state - row_max[:, None])[:, :, None] + mat[None, :, :]
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(scores - new_max[:, None, :]), axis=1)
            run_max = new_max
        exact = run_max + tl.log(tl.where(rows_ok[:, None] & cols_ok[None, :], run_sum, 1.0))
        out = tl.where(acc < _UNDERFLOW_GUARD, exact, out)
    return out


@triton.jit
def _crf_forward_kernel(
    emissions_ptr,
    tags_ptr,
    allowed_ptr,
    lengths_ptr,
    trans_ptr,
    exptrans_ptr,
    colmax_ptr,
    start_ptr,
    end_ptr,
    alpha_ptr,
    alpha_max_ptr,
    ll_ptr,
    B,
    T,
    K,
    HAS_TAGS: tl.constexpr,
    NUM_PASSES: tl.constexpr,
    NUM_K_TILES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Forward algorithm and gold-path score in one pass over the emissions.

    Writes the scaled forward variables ``a (NUM_PASSES * B, T, K)`` float32 with ``α_t = a_t + C_t``, ``C_0 = 0``,
    ``C_t = C_{t-1} + m_{t-1}``, ``m_t = max_j a_t[j]`` written to ``alpha_max (NUM_PASSES * B, T)`` (past a
    sequence's end α stays α_{L-1}), and to ``ll`` (B,) float32, with
    ``log Z = C_{T-1} + logsumexp_j(a_{T-1}[j] + f[j])``: ``score(tags) - log Z`` with ``HAS_TAGS``; else with
    ``NUM_PASSES = 2`` ``log Z_allowed - log Z``, where pass 0 (rows 0..B-1 of the buffers) runs the recursion
    with the emissions outside ``allowed (B, T, K)`` replaced by ``_PARTIAL_LABEL_SCORE`` and pass 1 the free one;
    else ``log Z``. An empty sequence gets NaN.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=rows_ok, other=1)
    emission_rows = rows.to(tl.int64) * T * K
    tag_rows = rows.to(tl.int64) * T
    nonempty = rows_ok & (lengths > 0)
    log_z = tl.zeros((BLOCK_B,), dtype=tl.float32)
    log_z_allowed = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if HAS_TAGS:
        gold = tl.zeros((BLOCK_B,), dtype=tl.float32)
        bad = tl.zeros((BLOCK_B,), dtype=tl.int32)

    # The two recursions of the partial-label likelihood run one after the other in the same program: one launch,
    # and the second pass reads the emissions the first brought into the cache. A loop, not unrolled: unrolled,
    # the compiler keeps values of the first pass live into the second, which spills with several tag tiles
    # (make triton-build-check); with one pass it is the plain body.
    for p in range(NUM_PASSES):
        # Pass 0 of two is the constrained one (p as a vector: the interpreter rejects a load mask combined from a
        # Python bool).
        constrained = (tl.full((BLOCK_B,), p, dtype=tl.int32) == 0) & nonempty
        alpha_rows = (rows.to(tl.int64) + p * B) * T * K
        alpha_max_rows = (rows.to(tl.int64) + p * B) * T
        # t = 0: a_0 = α_0 = s + e_0.
        row_max = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
        for x_tile in range(NUM_K_TILES):
            cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            cols_ok = cols < K
            ok = rows_ok[:, None] & cols_ok[None, :]
            emission = tl.load(emissions_ptr + emission_rows[:, None] + cols[None, :], mask=ok, other=0.0)
            emission = emission.to(tl.float32)
            if NUM_PASSES == 2:
                allowed = tl.load(allowed_ptr + emission_rows[:, None] + cols[None, :],
                                  mask=ok & constrained[:, None], other=1)
                emission = tl.where(allowed != 0, emission, _PARTIAL_LABEL_SCORE)
            start = tl.load(start_ptr + cols, mask=cols_ok, other=0.0)
            alpha = emission + start[None, :]
            tl.store(alpha_ptr + alpha_rows[:, None] + cols[None, :], alpha, mask=ok)
            row_max = tl.maximum(row_max, tl.max(tl.where(ok, alpha, _NEG), axis=1))
        tl.store(alpha_max_ptr + alpha_max_rows, row_max, mask=rows_ok)
        offset = tl.zeros((BLOCK_B,), dtype=tl.float32)
        if HAS_TAGS:
            # Tags are unchecked on CUDA tensors: one outside [0, K) at a step of the sequence marks it `bad` (its
            # log-likelihood is NaN) and is replaced by 0 before it indexes anything. An empty sequence has no
            # step. In range, a tag fits int32, which keeps the loop-carried tag off the stack on sm_90.
            tag = tl.load(tags_ptr + tag_rows, mask=rows_ok, other=0)
            tag_ok = (tag >= 0) & (tag < K)
            bad = tl.where(nonempty & ~tag_ok, 1, 0)
            tag = tl.where(tag_ok, tag, 0).to(tl.int32)
            gold = tl.load(start_ptr + tag, mask=nonempty, other=0.0)
            gold += tl.load(emissions_ptr + emission_rows + tag, mask=nonempty, other=0.0).to(tl.float32)
        tl.debug_barrier()

        for t in range(1, T):
            active = rows_ok & (t < lengths)
            if HAS_TAGS:
                previous_tag = tag
                tag = tl.load(tags_ptr + tag_rows + t, mask=rows_ok, other=0)
                tag_ok = (tag >= 0) & (tag < K)
                bad |= tl.where(active & ~tag_ok, 1, 0)
                tag = tl.where(tag_ok, tag, 0).to(tl.int32)
                step_score = tl.load(emissions_ptr + emission_rows + t * K + tag, mask=active,
                                     other=0.0).to(tl.float32)
                step_score += tl.load(trans_ptr + previous_tag * K + tag, mask=active, other=0.0)
                gold += tl.where(active, step_score, 0.0)
            previous_offsets = alpha_rows + (t - 1) * K
            new_max = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
            for x_tile in range(NUM_K_TILES):
                cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                cols_ok = cols < K
                ok = rows_ok[:, None] & cols_ok[None, :]
                step = _logsumexp_step(alpha_ptr, previous_offsets, row_max, rows_ok, trans_ptr, exptrans_ptr,
                                       colmax_ptr, cols, cols_ok, K, NUM_K_TILES, BLOCK_K, BLOCK_B, USE_DOT)
                emission = tl.load(emissions_ptr + emission_rows[:, None] + t * K + cols[None, :], mask=ok,
                                   other=0.0)
                emission = emission.to(tl.float32)
                if NUM_PASSES == 2:
                    # Read only at unmasked positions (past the end the set is all-true anyway).
                    allowed = tl.load(allowed_ptr + emission_rows[:, None] + t * K + cols[None, :],
                                      mask=ok & (active & constrained)[:, None], other=1)
                    emission = tl.where(allowed != 0, emission, _PARTIAL_LABEL_SCORE)
                previous = tl.load(alpha_ptr + previous_offsets[:, None] + cols[None, :], mask=ok, other=0.0)
                # Past the end α is carried: a_t = a_{t-1} - m_{t-1} keeps α_t = α_{t-1} under the new offset.
                alpha = tl.where(active[:, None], step + emission, previous - row_max[:, None])
                tl.store(alpha_ptr + alpha_rows[:, None] + t * K + cols[None, :], alpha, mask=ok)
                new_max = tl.maximum(new_max, tl.max(tl.where(ok, alpha, _NEG), axis=1))
            offset += row_max
            row_max = new_max
            tl.store(alpha_max_ptr + alpha_max_rows + t, row_max, mask=rows_ok)
            tl.debug_barrier()

        # log Z = C_{T-1} + logsumexp_j(a_{T-1}[j] + f[j]), online over the tiles.
        last_offsets = alpha_rows + (T - 1) * K
        z_max = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
        z_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for x_tile in range(NUM_K_TILES):
            cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            cols_ok = cols < K
            ok = rows_ok[:, None] & cols_ok[None, :]
            final = tl.load(alpha_ptr + last_offsets[:, None] + cols[None, :], mask=ok, other=_NEG)
            final += tl.load(end_ptr + cols, mask=cols_ok, other=0.0)[None, :]
            tile_max = tl.maximum(z_max, tl.max(final, axis=1))
            z_sum = z_sum * tl.exp(z_max - tile_max) + tl.sum(tl.exp(final - tile_max[:, None]), axis=1)
            z_max = tile_max
        log_z = offset + z_max + tl.log(tl.where(rows_ok, z_sum, 1.0))
        log_z_allowed = tl.where(constrained, log_z, log_z_allowed)

    if HAS_TAGS:
        # The last step's tag (none for an empty sequence: no read at tags[-1]); its range was checked above.
        last_tag = tl.load(tags_ptr + tag_rows + tl.maximum(lengths - 1, 0), mask=nonempty, other=0)
        last_tag = tl.where((last_tag >= 0) & (last_tag < K), last_tag, 0)
        gold += tl.load(end_ptr + last_tag, mask=nonempty, other=0.0)
        ll = tl.where((bad != 0) | ~nonempty, float("nan"), gold - log_z)
    elif NUM_PASSES == 2:
        ll = tl.where(nonempty, log_z_allowed - log_z, float("nan"))
    else:
        ll = tl.where(nonempty, log_z, float("nan"))
    tl.store(ll_ptr + rows, ll, mask=rows_ok)


@triton.jit
def _crf_backward_kernel(
    emissions_ptr,
    tags_ptr,
    allowed_ptr,
    lengths_ptr,
    trans_ptr,
    exptrans_ptr,
    colmax_ptr,
    trans_t_ptr,
    exptrans_t_ptr,
    rowmax_ptr,
    end_ptr,
    alpha_ptr,
    alpha_max_ptr,
    grad_ptr,
    v_ptr,
    out_ptr,
    pair_ptr,
    B,
    T,
    K,
    NUM_PAIR_GROUPS,
    MARGINALS: tl.constexpr,
    HAS_TAGS: tl.constexpr,
    NUM_PASSES: tl.constexpr,
    NUM_K_TILES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Backward algorithm from t = T-1 down to 0, with the tag marginals at each step.

    β is scaled like α: ``b_{L-1} = f``, ``b_{t-1}[i] = logsumexp_j(A[i, j] + v_t[j] - n_t)`` with
    ``v_t = b_t + e_t`` (kept in the scratch ``v (B, 4, K)``) and ``n_t = max_j v_t[j]``. The offsets of a and
    b are never needed: each step normalizes on its own, ``P(y_t = j) = softmax_j(a_t[j] + b_t[j])`` and
    ``P(y_{t-1} = i, y_t = j) = exp(a_{t-1}[i] - m_{t-1} + A[i, j] + v_t[j] - z_t)`` with
    ``z_t = logsumexp_j(r_t[j] + v_t[j])``, ``r_t`` the forward step recomputed from ``a_{t-1}`` (kept in the
    third row of the scratch), evaluated as ``(a_{t-1}[i] - m_{t-1} + A[i, j] - r_t[j]) + (r_t[j] + v_t[j] - z_t)``
    (log P(i | j) + log P(j)) so that no term the size of an emission is added and then subtracted. Values stay
    the size of one step however long the sequence (no cancellation of α + β against log Z), and a peaked
    distribution gives probabilities of exactly 1.

    With ``MARGINALS``: ``out[b, t, j] = P(y_t = j)`` (0 past the end; NaN everywhere for an empty sequence, which
    has no distribution). Otherwise the gradient, with ``g_b`` the sequence's incoming gradient: with ``HAS_TAGS``
    (log-likelihood) ``out[b, t, j] = g_b (1[y_t = j] - P(y_t = j))``, without (log partition)
    ``g_b P(y_t = j)``, and with ``NUM_PASSES = 2`` (partial labels: pass 0 the constrained model, whose α are
    the first B rows of ``alpha``, pass 1 the free one) ``g_b (P_allowed(y_t = j) - P(y_t = j))``. The pair
    marginals ``g_b P(y_{t-1} = i, y_t = j)`` (with the sign of the pass), summed over the tile's sequences and
    over t, are added to ``pair[pid % NUM_PAIR_GROUPS]`` (K, K); a sequence of length 0 gets zeros and adds
    nothing (the launcher gives length 0 to sequences with a tag out of range). Tags are only compared, never
    used as an index.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=rows_ok, other=1)
    if not MARGINALS:
        grad = tl.load(grad_ptr + rows, mask=rows_ok, other=0.0)
    emission_rows = rows.to(tl.int64) * T * K
    tag_rows = rows.to(tl.int64) * T
    v_rows = rows.to(tl.int64) * 4 * K
    r_offsets = v_rows + 2 * K
    pair_base = pair_ptr + (pid % NUM_PAIR_GROUPS).to(tl.int64) * K * K

    # A loop, not unrolled, as in the forward kernel; p as a vector for the interpreter's load masks.
    for p in range(NUM_PASSES):
        alpha_rows = (rows.to(tl.int64) + p * B) * T * K
        alpha_max_rows = (rows.to(tl.int64) + p * B) * T
        constrained = tl.full((BLOCK_B,), p, dtype=tl.int32) == 0
        second = rows_ok & ~constrained
        # The second pass subtracts its term from the first's, which `out` holds.
        sign = 1.0 - 2.0 * p
        if NUM_PASSES == 2:
            # Before the second pass both v rows go back to zeros, the state the first step (t = T-1) of a pass
            # expects.
            for x_tile in range(NUM_K_TILES):
                cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                ok = second[:, None] & (cols < K)[None, :]
                zeros = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
                tl.store(v_ptr + v_rows[:, None] + cols[None, :], zeros, mask=ok)
                tl.store(v_ptr + v_rows[:, None] + K + cols[None, :], zeros, mask=ok)
            tl.debug_barrier()
        v_max = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for step_index in range(T):
            t = T - 1 - step_index
            active = rows_ok & (t < lengths)
            next_offsets = v_rows + ((t + 1) % 2) * K
            this_offsets = v_rows + (t % 2) * K
            # a_t + b_t waits between the two passes over the tags in `out`, or, where `out` holds the first
            # pass's gradient, in the fourth scratch row.
            if NUM_PASSES == 2:
                joint_rows = v_ptr + v_rows + 3 * K
            else:
                joint_rows = out_ptr + emission_rows + t * K
            # Pass 1: b_t, v_t, and z = logsumexp_j(a_t[j] + b_t[j]). For the gradient of the log-likelihood,
            # z_others sums the terms of every tag but the gold one: 1 - P(gold) = z_others / z_sum, exact where
            # 1 - exp(log P(gold)) would carry ulp(1) / (1 - P) of relative error.
            new_max = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
            z_max = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
            z_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
            z_others = tl.zeros((BLOCK_B,), dtype=tl.float32)
            if HAS_TAGS:
                tag = tl.load(tags_ptr + tag_rows + t, mask=rows_ok, other=0)
            for x_tile in range(NUM_K_TILES):
                cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                cols_ok = cols < K
                ok = rows_ok[:, None] & cols_ok[None, :]
                in_sequence = active[:, None] & cols_ok[None, :]
                # At t = T-1 the scratch holds zeros and every sequence takes b = f: the step result is unused.
                step = _logsumexp_step(v_ptr, next_offsets, v_max, rows_ok, trans_t_ptr, exptrans_t_ptr, rowmax_ptr,
                                       cols, cols_ok, K, NUM_K_TILES, BLOCK_K, BLOCK_B, USE_DOT)
                end = tl.load(end_ptr + cols, mask=cols_ok, other=0.0)
                beta = tl.where((t == lengths - 1)[:, None], end[None, :], step)
                alpha = tl.load(alpha_ptr + alpha_rows[:, None] + t * K + cols[None, :], mask=ok, other=0.0)
                joint = tl.where(in_sequence, alpha + beta, _NEG)
                tl.store(joint_rows[:, None] + cols[None, :], joint, mask=ok)
                tile_max = tl.maximum(z_max, tl.max(joint, axis=1))
                terms = tl.exp(joint - tile_max[:, None])
                z_sum = z_sum * tl.exp(z_max - tile_max) + tl.sum(terms, axis=1)
                if HAS_TAGS:
                    z_others = z_others * tl.exp(z_max - tile_max) + tl.sum(
                        tl.where(cols[None, :] == tag[:, None], 0.0, terms), axis=1)
                z_max = tile_max
                emission = tl.load(emissions_ptr + emission_rows[:, None] + t * K + cols[None, :], mask=ok,
                                   other=0.0).to(tl.float32)
                if NUM_PASSES == 2:
                    allowed = tl.load(allowed_ptr + emission_rows[:, None] + t * K + cols[None, :],
                                      mask=in_sequence & constrained[:, None], other=1)
                    emission = tl.where(allowed != 0, emission, _PARTIAL_LABEL_SCORE)
                # Past the end v is 0: finite, and never read for an active step.
                v = tl.where(in_sequence, beta + emission, 0.0)
                tl.store(v_ptr + this_offsets[:, None] + cols[None, :], v, mask=ok)
                new_max = tl.maximum(new_max, tl.max(tl.where(ok, v, _NEG), axis=1))
            v_max = new_max
            log_norm = z_max + tl.log(tl.where(active, z_sum, 1.0))
            if HAS_TAGS:
                gold_residual = z_others / tl.where(active, z_sum, 1.0)  # 1 - P(y_t = gold)
            tl.debug_barrier()
            # Pass 2: the marginals (or the emission gradient) from the stored a_t + b_t.
            for x_tile in range(NUM_K_TILES):
                cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                cols_ok = cols < K
                ok = rows_ok[:, None] & cols_ok[None, :]
                in_sequence = active[:, None] & cols_ok[None, :]
                out_ptrs = out_ptr + emission_rows[:, None] + t * K + cols[None, :]
                joint = tl.load(joint_rows[:, None] + cols[None, :], mask=ok, other=_NEG)
                marginal = tl.where(in_sequence, tl.exp(joint - log_norm[:, None]), 0.0)
                if MARGINALS:
                    marginal = tl.where((lengths > 0)[:, None], marginal, float("nan"))
                    tl.store(out_ptrs, marginal, mask=ok)
                else:
                    if HAS_TAGS:
                        residual = tl.where(tag[:, None] == cols[None, :], gold_residual[:, None], -marginal)
                    else:
                        residual = sign * marginal
                    value = grad[:, None] * residual
                    if NUM_PASSES == 2:
                        value += tl.load(out_ptrs, mask=ok & second[:, None], other=0.0)
                    tl.store(out_ptrs, tl.where(in_sequence, value, 0.0), mask=ok)
            if not MARGINALS:
                if t > 0:
                    # Σ_b g_b P(y_{t-1} = i, y_t = j) for the tile, exact in log space (K² exps per step).
                    previous_offsets = alpha_rows + (t - 1) * K
                    previous_max = tl.load(alpha_max_ptr + alpha_max_rows + t - 1, mask=rows_ok, other=0.0)
                    pair_max = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
                    pair_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
                    for j_tile in range(NUM_K_TILES):
                        tags_j = j_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                        tags_j_ok = tags_j < K
                        forward_step = _logsumexp_step(alpha_ptr, previous_offsets, previous_max, rows_ok, trans_ptr,
                                                       exptrans_ptr, colmax_ptr, tags_j, tags_j_ok, K, NUM_K_TILES,
                                                       BLOCK_K, BLOCK_B, USE_DOT)
                        tl.store(v_ptr + r_offsets[:, None] + tags_j[None, :], forward_step,
                                 mask=rows_ok[:, None] & tags_j_ok[None, :])
                        v = tl.load(v_ptr + this_offsets[:, None] + tags_j[None, :],
                                    mask=rows_ok[:, None] & tags_j_ok[None, :], other=0.0)
                        joint = tl.where(active[:, None] & tags_j_ok[None, :], forward_step + v, _NEG)
                        tile_max = tl.maximum(pair_max, tl.max(joint, axis=1))
                        pair_sum = pair_sum * tl.exp(pair_max - tile_max) + tl.sum(
                            tl.exp(joint - tile_max[:, None]), 1)
                        pair_max = tile_max
                    pair_norm = pair_max + tl.log(tl.where(active, pair_sum, 1.0))
                    weight = tl.where(active, grad * sign, 0.0)
                    tl.debug_barrier()
                    for i_tile in range(NUM_K_TILES):
                        tags_i = i_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                        tags_i_ok = tags_i < K
                        alpha = tl.load(alpha_ptr + previous_offsets[:, None] + tags_i[None, :],
                                        mask=rows_ok[:, None] & tags_i_ok[None, :], other=_NEG)
                        alpha = alpha - previous_max[:, None]
                        for j_tile in range(NUM_K_TILES):
                            tags_j = j_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                            tags_j_ok = tags_j < K
                            pair_ok = tags_i_ok[:, None] & tags_j_ok[None, :]
                            trans = tl.load(trans_ptr + tags_i[:, None] * K + tags_j[None, :], mask=pair_ok,
                                            other=_NEG)
                            j_ok = rows_ok[:, None] & tags_j_ok[None, :]
                            v = tl.load(v_ptr + this_offsets[:, None] + tags_j[None, :], mask=j_ok, other=0.0)
                            forward_step = tl.load(v_ptr + r_offsets[:, None] + tags_j[None, :], mask=j_ok,
                                                   other=0.0)
                            log_marginal_j = (forward_step + v) - pair_norm[:, None]
                            log_pair = (alpha[:, :, None] + trans[None, :, :] - forward_step[:, None, :])
                            log_pair += log_marginal_j[:, None, :]
                            # Past the end the exponent is garbage: replace it before exp, which could overflow.
                            log_pair = tl.where(active[:, None, None], log_pair, _NEG)
                            pair = tl.exp(log_pair) * weight[:, None, None]
                            tl.atomic_add(pair_base + tags_i[:, None] * K + tags_j[None, :], tl.sum(pair, axis=0),
                                          mask=pair_ok)
        # The next pass's first step reads the v rows and the pair terms of this one must be complete.
        tl.debug_barrier()


@triton.jit
def _crf_viterbi_kernel(
    emissions_ptr,
    lengths_ptr,
    trans_ptr,
    start_ptr,
    end_ptr,
    score_ptr,
    backpointers_ptr,
    tags_out_ptr,
    best_ptr,
    B,
    T,
    K,
    NUM_K_TILES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Max-plus recursion ``δ_t[j] = max_i(δ_{t-1}[i] + A[i, j]) + e[t, j]`` with backpointers, then the
    backtrace inside the kernel.

    ``score (B, 2, K)`` float32 scratch holds δ_{t-1} and δ_t; ``backpointers (B, T, K)`` int8/uint8/int16/int32;
    writes ``tags_out (B, T)`` int64 padded with -1 and ``best (B,)`` float32 (-1 everywhere and NaN for an empty
    sequence). Ties take the lowest index.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=rows_ok, other=1)
    emission_rows = rows.to(tl.int64) * T * K
    score_rows = rows.to(tl.int64) * 2 * K
    # tl.max and tl.argmax skip NaN, so a NaN score would vanish from the max-plus recursion: every NaN that reaches
    # a sequence's scores (emissions at its unmasked steps, start, end, transitions when it has a second step) is
    # flagged here, and that sequence's best score is NaN, as in the other backends.
    has_nan = tl.zeros((BLOCK_B,), dtype=tl.int32)
    trans_nan = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for y_tile in range(NUM_K_TILES):
        ys = y_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        for x_tile in range(NUM_K_TILES):
            cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            trans = tl.load(trans_ptr + ys[:, None] * K + cols[None, :], mask=(ys < K)[:, None] & (cols < K)[None, :],
                            other=0.0)
            trans_nan |= tl.max(tl.max(tl.where(trans != trans, 1, 0), axis=1), axis=0)

    for x_tile in range(NUM_K_TILES):
        cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        cols_ok = cols < K
        ok = rows_ok[:, None] & cols_ok[None, :]
        emission = tl.load(emissions_ptr + emission_rows[:, None] + cols[None, :], mask=ok, other=0.0)
        start = tl.load(start_ptr + cols, mask=cols_ok, other=0.0)
        first = emission.to(tl.float32) + start[None, :]
        has_nan |= tl.max(tl.where(ok & (first != first), 1, 0), axis=1)
        tl.store(score_ptr + score_rows[:, None] + cols[None, :], first, mask=ok)
    tl.debug_barrier()

    for t in range(1, T):
        active = rows_ok & (t < lengths)
        previous_offsets = score_rows + ((t - 1) % 2) * K
        for x_tile in range(NUM_K_TILES):
            cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            cols_ok = cols < K
            ok = rows_ok[:, None] & cols_ok[None, :]
            best = tl.full((BLOCK_B, BLOCK_K), _NEG, dtype=tl.float32)
            best_previous = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.int32)
            for y_tile in range(NUM_K_TILES):
                ys = y_tile * BLOCK_K + tl.arange(0, BLOCK_K)
                ys_ok = ys < K
                previous = tl.load(score_ptr + previous_offsets[:, None] + ys[None, :],
                                   mask=rows_ok[:, None] & ys_ok[None, :], other=_NEG)
                trans = tl.load(trans_ptr + ys[:, None] * K + cols[None, :], mask=ys_ok[:, None] & cols_ok[None, :],
                                other=_NEG)
                scores = previous[:, :, None] + trans[None, :, :]
                tile_best = tl.max(scores, axis=1)
                tile_argbest = tl.argmax(scores, axis=1, tie_break_left=True) + y_tile * BLOCK_K
                # Strictly greater: an earlier tile (lower index) keeps a tie.
                better = tile_best > best
                best = tl.where(better, tile_best, best)
                best_previous = tl.where(better, tile_argbest, best_previous)
            emission = tl.load(emissions_ptr + emission_rows[:, None] + t * K + cols[None, :], mask=ok, other=0.0)
            carried = tl.load(score_ptr + previous_offsets[:, None] + cols[None, :], mask=ok, other=0.0)
            score = tl.where(active[:, None], best + emission.to(tl.float32), carried)
            has_nan |= tl.max(tl.where(ok & active[:, None] & (score != score), 1, 0), axis=1)
            tl.store(score_ptr + score_rows[:, None] + (t % 2) * K + cols[None, :], score, mask=ok)
            tl.store(backpointers_ptr + emission_rows[:, None] + t * K + cols[None, :],
                     best_previous.to(backpointers_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()

    last_offsets = score_rows + ((T - 1) % 2) * K
    best = tl.full((BLOCK_B,), _NEG, dtype=tl.float32)
    current = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for x_tile in range(NUM_K_TILES):
        cols = x_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        cols_ok = cols < K
        ok = rows_ok[:, None] & cols_ok[None, :]
        final = tl.load(score_ptr + last_offsets[:, None] + cols[None, :], mask=ok, other=_NEG)
        final += tl.load(end_ptr + cols, mask=cols_ok, other=0.0)[None, :]
        has_nan |= tl.max(tl.where(ok & (final != final), 1, 0), axis=1)
        final = tl.where(ok, final, _NEG)
        tile_best = tl.max(final, axis=1)
        tile_argbest = tl.argmax(final, axis=1, tie_break_left=True) + x_tile * BLOCK_K
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        current = tl.where(better, tile_argbest, current)
    has_nan |= tl.where(lengths > 1, trans_nan, 0)
    has_nan |= tl.where(lengths <= 0, 1, 0)  # an empty sequence has no path (all -1 below) and a NaN score
    tl.store(best_ptr + rows, tl.where(has_nan != 0, float("nan"), best), mask=rows_ok)

    tag_rows = rows.to(tl.int64) * T
    for step_index in range(T):
        t = T - 1 - step_index
        active = rows_ok & (t < lengths)
        tl.store(tags_out_ptr + tag_rows + t, tl.where(active, current, -1).to(tl.int64), mask=rows_ok)
        # t as a vector: the interpreter rejects a load mask combined from a Python bool.
        follow = active & (tl.full((BLOCK_B,), t, dtype=tl.int32) > 0)
        previous = tl.load(backpointers_ptr + emission_rows + t * K + current, mask=follow, other=0).to(tl.int32)
        current = tl.where(follow, previous, current)


@triton.jit
def _kbest_select(
    state_ptr,
    state_base,
    num_ranks,
    mat_ptr,
    stride_i,
    stride_j,
    cols,
    cols_ok,
    K,
    KBEST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
    NUM_I_TILES: tl.constexpr,
):
    """The ``KBEST`` best of ``state[i, r] + mat[i, x]`` over (i, r) for each column x of a tile: ``(scores,
    indices)`` both ``(BLOCK_J, BLOCK_R)``, rank q in lane q, ``index = i * KBEST + r``.

    ``state (K, KBEST)`` holds each tag's sorted list; ranks from ``num_ranks`` on are no path. Candidates are
    ranked by score, then by the lower index (the lower i, then the lower r): each of KBEST rounds takes the max
    and, among equal maxima, the lowest index, then knocks that candidate out. Over several tiles of i the running
    list is merged with the next tile the same way; its entries come from lower i, so ties still go to them.
    """
    ranks = tl.arange(0, BLOCK_R)
    best = tl.full((BLOCK_J, BLOCK_R), _TAKEN, dtype=tl.float32)
    best_index = tl.full((BLOCK_J, BLOCK_R), _NO_INDEX, dtype=tl.int32)
    flat = tl.arange(0, BLOCK_I * BLOCK_R)
    for i_tile in range(NUM_I_TILES):
        tags_i = i_tile * BLOCK_I + flat // BLOCK_R
        ranks_i = flat % BLOCK_R
        candidate_ok = (tags_i < K) & (ranks_i < KBEST)
        previous = tl.load(state_ptr + state_base + tags_i * KBEST + ranks_i, mask=candidate_ok, other=0.0)
        previous = tl.where(ranks_i < num_ranks, previous, _NO_PATH)
        mat = tl.load(mat_ptr + tags_i[None, :] * stride_i + cols[:, None] * stride_j,
                      mask=cols_ok[:, None] & candidate_ok[None, :], other=0.0)
        candidates = tl.where(candidate_ok[None, :], previous[None, :] + mat, _TAKEN)
        index = tl.where(candidate_ok, tags_i * KBEST + ranks_i, _NO_INDEX)
        merged = tl.full((BLOCK_J, BLOCK_R), _TAKEN, dtype=tl.float32)
        merged_index = tl.full((BLOCK_J, BLOCK_R), _NO_INDEX, dtype=tl.int32)
        for q in range(KBEST):
            top = tl.maximum(tl.max(best, axis=1), tl.max(candidates, axis=1))
            pick = tl.minimum(tl.min(tl.where(best == top[:, None], best_index, _NO_INDEX), axis=1),
                              tl.min(tl.where(candidates == top[:, None], index[None, :], _NO_INDEX), axis=1))
            merged = tl.where(ranks[None, :] == q, top[:, None], merged)
            merged_index = tl.where(ranks[None, :] == q, pick[:, None], merged_index)
            best = tl.where(best_index == pick[:, None], _TAKEN, best)
            candidates = tl.where(index[None, :] == pick[:, None], _TAKEN, candidates)
        best = merged
        best_index = merged_index
    return best, best_index


@triton.jit
def _crf_kbest_kernel(
    emissions_ptr,
    lengths_ptr,
    trans_ptr,
    start_ptr,
    end_ptr,
    state_ptr,
    backpointers_ptr,
    paths_ptr,
    scores_ptr,
    T,
    K,
    KBEST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    NUM_J_TILES: tl.constexpr,
    BLOCK_I: tl.constexpr,
    NUM_I_TILES: tl.constexpr,
):
    """List Viterbi of one sequence per program: the KBEST best paths and their scores.

    ``state (B, 2, K, KBEST)`` float32 scratch holds the sorted partial scores of step t-1 and t for each tag;
    ``backpointers (B, T, K, KBEST)`` int16/int32 the index ``i * KBEST + r`` (previous tag, its rank) of each
    entry. A tag's list at step t holds ``min(KBEST, K^t)`` paths (``num_ranks``); the ranks above are no path
    and never chosen before a path. Writes ``paths (B, KBEST, T)`` int64 padded with -1 and ``scores (B, KBEST)``
    float32; ranks from ``min(KBEST, K^L)`` on get -1 everywhere and -inf, an empty sequence -1 and NaN.
    """
    b = tl.program_id(0)
    length = tl.load(lengths_ptr + b)
    emission_row = b.to(tl.int64) * T * K
    state_row = b.to(tl.int64) * 2 * K * KBEST
    ranks = tl.arange(0, BLOCK_R)
    ranks_ok = ranks < KBEST
    # The length as a vector: the interpreter rejects a load mask combined with a scalar.
    length_j = tl.zeros((BLOCK_J,), dtype=tl.int32) + length

    # t = 0: one path per tag, s + e_0.
    for j_tile in range(NUM_J_TILES):
        cols = j_tile * BLOCK_J + tl.arange(0, BLOCK_J)
        cols_ok = cols < K
        emission = tl.load(emissions_ptr + emission_row + cols, mask=cols_ok & (length_j > 0), other=0.0)
        first = tl.load(start_ptr + cols, mask=cols_ok, other=0.0) + emission.to(tl.float32)
        first = tl.where(ranks[None, :] == 0, first[:, None], _NO_PATH)
        tl.store(state_ptr + state_row + cols[:, None] * KBEST + ranks[None, :], first,
                 mask=cols_ok[:, None] & ranks_ok[None, :])
    num_ranks = tl.minimum(length, 1)  # paths per list, saturating at KBEST
    tl.debug_barrier()

    for t in range(1, T):
        active = t < length
        active_j = t < length_j
        previous_base = state_row + ((t - 1) % 2) * K * KBEST
        this_base = state_row + (t % 2) * K * KBEST
        for j_tile in range(NUM_J_TILES):
            cols = j_tile * BLOCK_J + tl.arange(0, BLOCK_J)
            cols_ok = cols < K
            store_ok = cols_ok[:, None] & ranks_ok[None, :]
            best, best_index = _kbest_select(state_ptr, previous_base, num_ranks, trans_ptr, K, 1, cols, cols_ok, K,
                                             KBEST, BLOCK_R, BLOCK_J, BLOCK_I, NUM_I_TILES)
            emission = tl.load(emissions_ptr + emission_row + t * K + cols, mask=cols_ok & active_j, other=0.0)
            carried = tl.load(state_ptr + previous_base + cols[:, None] * KBEST + ranks[None, :], mask=store_ok,
                              other=0.0)
            # Past the end the lists are carried to the buffer that the final step reads.
            score = tl.where(active_j[:, None], best + emission.to(tl.float32)[:, None], carried)
            tl.store(state_ptr + this_base + cols[:, None] * KBEST + ranks[None, :], score, mask=store_ok)
            pointer_row = (b.to(tl.int64) * T + t) * K * KBEST
            tl.store(backpointers_ptr + pointer_row + cols[:, None] * KBEST + ranks[None, :],
                     best_index.to(backpointers_ptr.dtype.element_ty), mask=store_ok & active_j[:, None])
        num_ranks = tl.where(active, tl.minimum(num_ranks * K, KBEST), num_ranks)
        tl.debug_barrier()

    # The final KBEST over (last tag, rank) of δ + f: the same selection with f as a one-column matrix.
    cols = tl.arange(0, BLOCK_J)
    final, final_index = _kbest_select(state_ptr, state_row + ((T - 1) % 2) * K * KBEST, num_ranks, end_ptr, 1, 0,
                                       cols, cols == 0, K, KBEST, BLOCK_R, BLOCK_J, BLOCK_I, NUM_I_TILES)
    score = tl.sum(tl.where(cols[:, None] == 0, final, 0.0), axis=0)
    index = tl.sum(tl.where(cols[:, None] == 0, final_index, 0), axis=0)
    # K^L paths in all: K lists of min(KBEST, K^(L-1)) each.
    found = (ranks < num_ranks * K) & ranks_ok
    length_r = tl.zeros((BLOCK_R,), dtype=tl.int32) + length
    score = tl.where(found, score, float("-inf"))
    tl.store(scores_ptr + b * KBEST + ranks, tl.where(length_r > 0, score, float("nan")), mask=ranks_ok)

    tag = tl.where(found, index // KBEST, 0)
    rank = tl.where(found, index % KBEST, 0)
    path_rows = b.to(tl.int64) * KBEST * T + ranks * T
    for step_index in range(T):
        t = T - 1 - step_index
        active = found & (t < length_r)
        tl.store(paths_ptr + path_rows + t, tl.where(active, tag, -1).to(tl.int64), mask=ranks_ok)
        # t as a vector: the interpreter rejects a load mask combined from a Python bool.
        follow = active & (tl.full((BLOCK_R,), t, dtype=tl.int32) > 0)
        pointer_row = (b.to(tl.int64) * T + t) * K * KBEST
        pointer = tl.load(backpointers_ptr + pointer_row + tag * KBEST + rank, mask=follow, other=0).to(tl.int32)
        tag = tl.where(follow, pointer // KBEST, tag)
        rank = tl.where(follow, pointer % KBEST, rank)


# ----------------------------------------------------------------------------------------------- launchers


def _tiling(batch: int, num_tags: int, block_b: Optional[int], block_k: Optional[int]) -> tuple[int, int, bool]:
    """``(BLOCK_B, BLOCK_K, USE_DOT)``.

    Defaults: one sequence per program (the time loop is serial, so parallelism comes from the batch) unless
    the batch alone fills an H100 with 16-sequence tiles and the tags fit one 16-tag tile, which then run the
    step as one ``tl.dot``; K in one block up to 32 tags, in tiles of 32 up to 64 tags and of 64 above: the
    tilings that spill no registers on sm_90 (make triton-build-check; one tile of 64 spills, three of 32 too,
    and the ``tl.dot`` path over several 16-tag tiles keeps an 8-48 byte stack, so it is not picked by default).
    ``block_b``/``block_k`` override them (tests force the tiled and dot paths at small sizes).
    """
    if block_b is None:
        block_b = 16 if num_tags == 16 and batch >= 2048 else 1
    use_dot = block_b >= 16 and (block_k or num_tags) >= 16
    if block_k is None:
        block_k = 16 if use_dot else (min(triton.next_power_of_2(num_tags), 32) if num_tags <= 64 else 64)
    return block_b, block_k, use_dot


def _num_warps(block_b: int, block_k: int, use_dot: bool = False) -> int:
    """About 256 values of the largest (BLOCK_B, BLOCK_K, BLOCK_K) tile per warp, 1 to 8 warps (16 for tiles of 64
    tags: on 8 they spill on sm_90): a small tag set needs few threads, and fewer warps make the barrier between
    time steps cheaper. The ``tl.dot`` path runs on 4 warps: with more, each thread's register budget shrinks and
    its tiles spill."""
    if use_dot:
        return 4
    return max(1, min(16 if block_k >= 64 else 8, block_b * block_k * block_k // 256))


def _launch_options(block_b: int, block_k: int, use_dot: bool, wide: bool = False, num_tiles: int = 1) -> dict:
    """``num_warps`` and, on the ``tl.dot`` path, ``num_stages=1`` for the forward and backward kernels.

    ``wide`` (the backward of log Z and of the partial-label likelihood, which keep a few more values through
    each step than the log-likelihood's) doubles the warps up to 16, except for three or more tiles of 64 tags,
    which take 4 (255 registers): at the log-likelihood's count some tilings spill on sm_90, and so do three tiles
    of 64 on 8 or 16 warps (make triton-build-check; register allocation is not monotonic in the warps).

    Each time step loads the state of the previous step (α_{t-1}, or v_t) from the global buffer the same program
    stored it to one step before, with only ``tl.debug_barrier`` between the store and the load. With the default
    num_stages the software pipeliner may turn loads that feed a ``tl.dot`` into asynchronous copies issued ahead
    of their place in the loop, and nothing makes it keep them after a store to global memory: such a copy could
    read the previous step's state before it is written. One stage keeps every load where the program has it.
    (Triton 3.9 pipelines none of these loads for sm_90 with the default either, no ``cp.async`` in the PTX, so
    this costs nothing today; it keeps the kernels right under a compiler that would.) The other paths have no
    ``tl.dot`` and keep the default.
    """
    num_warps = _num_warps(block_b, block_k, use_dot)
    if wide and not use_dot:
        num_warps = 4 if block_k >= 64 and num_tiles >= 3 else min(16, 2 * num_warps)
    options = dict(num_warps=num_warps)
    if use_dot:
        options["num_stages"] = 1
    return options


def _viterbi_tiling(num_tags: int, block_b: Optional[int], block_k: Optional[int]) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_K)`` of the Viterbi kernel: K in blocks of up to 64 tags; the max-plus step has no
    matrix-product form, so the batch tile keeps the (BLOCK_B, BLOCK_K, BLOCK_K) tile near 4096 values."""
    if block_k is None:
        block_k = min(triton.next_power_of_2(num_tags), 64)
    if block_b is None:
        block_b = max(1, min(16, 4096 // (block_k * block_k)))
    return block_b, block_k


def _kbest_tiling(num_tags: int, k: int, block_j: Optional[int], block_i: Optional[int]) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_J, BLOCK_I)`` of the k-best kernel: the ranks in one block, output tags in tiles of up to
    16, and predecessor tags in tiles of up to 32 that keep the (BLOCK_J, BLOCK_I · BLOCK_R) candidate tile at
    most 2048 values (larger ones spill on sm_90; unmeasured on a GPU). ``block_j``/``block_i`` override them
    (tests force several tiles)."""
    block_r = triton.next_power_of_2(k)
    if block_j is None:
        block_j = min(triton.next_power_of_2(num_tags), 16)
    if block_i is None:
        block_i = max(1, min(triton.next_power_of_2(num_tags), 32, 2048 // (block_j * block_r)))
    return block_r, block_j, block_i


def _kbest_num_warps(block_r: int, block_j: int, block_i: int) -> int:
    """About 256 candidates per warp, at most 4 warps: with 8, ptxas holds the selection loop to 64 registers a
    thread and spills."""
    return max(1, min(4, block_j * block_i * block_r // 256))


def _kbest(emissions, mask, transitions, start_transitions, end_transitions, k, block_j=None, block_i=None):
    """Launch the k-best kernel: ``(paths (B, k, T) int64, scores (B, k) float32)``."""
    batch, seq_len, num_tags = emissions.shape
    block_r, block_j, block_i = _kbest_tiling(num_tags, k, block_j, block_i)
    device = emissions.device
    paths = torch.empty((batch, k, seq_len), dtype=torch.int64, device=device)
    scores = torch.empty((batch, k), dtype=torch.float32, device=device)
    if batch == 0 or seq_len == 0:
        return paths, scores
    state = torch.empty((batch, 2, num_tags, k), dtype=torch.float32, device=device)
    pointer_dtype = torch.int16 if num_tags * k <= torch.iinfo(torch.int16).max else torch.int32
    pointers = torch.empty((batch, seq_len, num_tags, k), dtype=pointer_dtype, device=device)
    lengths = mask.sum(1, dtype=torch.int32)
    transitions32 = transitions.to(torch.float32).contiguous()
    start32 = start_transitions.to(torch.float32).contiguous()
    end32 = end_transitions.to(torch.float32).contiguous()
    _crf_kbest_kernel[(batch,)](
        emissions.contiguous(), lengths, transitions32, start32, end32, state, pointers, paths, scores, seq_len,
        num_tags, KBEST=k, BLOCK_R=block_r, BLOCK_J=block_j, NUM_J_TILES=triton.cdiv(num_tags, block_j),
        BLOCK_I=block_i, NUM_I_TILES=triton.cdiv(num_tags, block_i),
        num_warps=_kbest_num_warps(block_r, block_j, block_i),
    )
    # tl.max skips NaN, so a NaN would vanish from the selection: a sequence whose scores a NaN reaches (emissions
    # at its unmasked steps, start, end, transitions when it has a second step) gets NaN scores, as the Viterbi
    # kernel gives. Device-side tensor ops: nothing is read back.
    has_nan = (emissions.isnan() & mask[:, :, None]).flatten(1).any(1)
    has_nan |= start32.isnan().any() | end32.isnan().any()
    has_nan |= transitions32.isnan().any() & (lengths > 1)
    scores = torch.where(has_nan[:, None], float("nan"), scores)
    return paths, scores


def _pointer_dtype(num_tags: int) -> torch.dtype:
    """Backpointers in the narrowest integer type that holds a tag index: B·T·K bytes for K <= 256."""
    if num_tags <= 127:
        return torch.int8
    if num_tags <= 256:
        return torch.uint8
    if num_tags <= 32767:
        return torch.int16
    return torch.int32


def _compute_dtypes_reason(emissions: torch.Tensor, transitions: torch.Tensor) -> list[str]:
    reasons = []
    for name, tensor in (("emissions", emissions), ("transitions", transitions)):
        if tensor.dtype == torch.float64:
            reasons.append(f"{name} are float64: the Triton CRF kernels accumulate in float32 "
                           "(the reference and cpp backends serve float64)")
    return reasons


def _transition_matrices(transitions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, exp(A - colmax), colmax)`` in float32, contiguous: the operands of the matrix-form step."""
    trans = transitions.to(torch.float32).contiguous()
    colmax = trans.amax(0)
    return trans, torch.exp(trans - colmax).contiguous(), colmax.contiguous()


def _forward(emissions, tags, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None,
             allowed=None):
    """Launch the forward kernel: ``(value (B,) float32, alpha (P·B, T, K) float32, alpha_max (P·B, T) float32)``,
    the scaled forward variables and their row maxima, P = 2 with ``allowed`` (the constrained recursion's rows
    first) and 1 without. ``value`` is ``score(tags) - log Z`` with ``tags``, ``log Z_allowed - log Z`` with
    ``allowed``, else ``log Z``."""
    batch, seq_len, num_tags = emissions.shape
    block_b, block_k, use_dot = _tiling(batch, num_tags, block_b, block_k)
    device = emissions.device
    num_passes = 1 if allowed is None else 2
    alpha = torch.empty((num_passes * batch, seq_len, num_tags), dtype=torch.float32, device=device)
    alpha_max = torch.empty((num_passes * batch, seq_len), dtype=torch.float32, device=device)
    ll = torch.empty((batch,), dtype=torch.float32, device=device)
    if batch == 0:
        return ll, alpha, alpha_max
    trans, exptrans, colmax = _transition_matrices(transitions)
    lengths = mask.sum(1, dtype=torch.int32)
    grid = (triton.cdiv(batch, block_b),)
    _crf_forward_kernel[grid](
        emissions.contiguous(), tags.contiguous() if tags is not None else lengths, _allowed_bytes(allowed, lengths),
        lengths, trans, exptrans, colmax,
        start_transitions.to(torch.float32).contiguous(), end_transitions.to(torch.float32).contiguous(),
        alpha, alpha_max, ll, batch, seq_len, num_tags,
        HAS_TAGS=tags is not None, NUM_PASSES=num_passes, NUM_K_TILES=triton.cdiv(num_tags, block_k),
        BLOCK_K=block_k, BLOCK_B=block_b, USE_DOT=use_dot, **_launch_options(block_b, block_k, use_dot),
    )
    return ll, alpha, alpha_max


def _allowed_bytes(allowed, placeholder):
    """``allowed`` as uint8 (one byte per tag, what a bool tensor holds), or a placeholder for the unused
    pointer."""
    if allowed is None:
        return placeholder
    return allowed.contiguous().view(torch.uint8)


def _backward(grad, emissions, tags, mask, transitions, end_transitions, alpha, alpha_max, block_b=None,
              block_k=None, allowed=None):
    """Launch the backward kernel.

    Without ``grad``: the marginals ``P(y_t = k)`` (B, T, K) float32. With ``grad`` (B,):
    ``(∂e (B, T, K), ∂A (K, K), ∂s (K,), ∂f (K,))`` in float32 of the value the forward launcher computed with the
    same ``tags``/``allowed`` (the log-likelihood, the partial-label likelihood or log Z), scaled by ``grad``.
    """
    batch, seq_len, num_tags = emissions.shape
    block_b, block_k, use_dot = _tiling(batch, num_tags, block_b, block_k)
    device = emissions.device
    out = torch.zeros((batch, seq_len, num_tags), dtype=torch.float32, device=device)
    marginals_only = grad is None
    num_programs = triton.cdiv(batch, block_b)
    num_groups = max(1, min(num_programs, _PAIR_ACCUMULATOR_FLOATS // (num_tags * num_tags)))
    pair = torch.zeros((0 if marginals_only else num_groups, num_tags, num_tags), dtype=torch.float32, device=device)
    lengths = mask.sum(1, dtype=torch.int32)
    if tags is not None:
        # Tags are unchecked on CUDA tensors (reading them back would wait for the device): a sequence with a tag
        # outside [0, K) at one of its steps gets a zero gradient, as an empty one does. The kernel sees it as
        # empty (length 0), its gold counts get weight 0, and no tag out of range is used as an index below.
        tag_ok = (tags >= 0) & (tags < num_tags)
        steps = torch.arange(seq_len, device=device) < lengths[:, None]
        lengths = torch.where((tag_ok | ~steps).all(1), lengths, 0)
    if batch > 0:
        trans, exptrans, colmax = _transition_matrices(transitions)
        trans_t, exptrans_t, rowmax = _transition_matrices(trans.t())
        # v_t ping-pong (rows 0, 1), r_t (row 2) and a_t + b_t of the two-pass backward (row 3).
        scratch = torch.zeros((batch, 4, num_tags), dtype=torch.float32, device=device)
        grad32 = grad.to(torch.float32).contiguous() if grad is not None else alpha_max
        _crf_backward_kernel[(num_programs,)](
            emissions.contiguous(), tags.contiguous() if tags is not None else lengths,
            _allowed_bytes(allowed, lengths), lengths, trans, exptrans, colmax, trans_t, exptrans_t, rowmax,
            end_transitions.to(torch.float32).contiguous(), alpha, alpha_max, grad32, scratch, out,
            pair if not marginals_only else scratch, batch, seq_len, num_tags, num_groups,
            MARGINALS=marginals_only, HAS_TAGS=tags is not None, NUM_PASSES=1 if allowed is None else 2,
            NUM_K_TILES=triton.cdiv(num_tags, block_k), BLOCK_K=block_k, BLOCK_B=block_b, USE_DOT=use_dot,
            **_launch_options(block_b, block_k, use_dot, wide=not marginals_only and tags is None,
                              num_tiles=triton.cdiv(num_tags, block_k)),
        )
    if marginals_only:
        return out
    if tags is None:
        # The kernel's pair terms are the whole transition gradient (signed per pass for the partial labels).
        grad_trans = pair.sum(0)
    else:
        # Gold-path counts of the transitions, scaled per sequence, minus the expected counts from the kernel
        # (steps 1 to L-1 of each sequence; none for the sequences given length 0 above).
        weights = torch.where(torch.arange(1, seq_len, device=device) < lengths[:, None],
                              grad.to(torch.float32)[:, None], 0.0)
        safe_tags = torch.where(tag_ok, tags, 0)
        flat_pairs = safe_tags[:, :-1] * num_tags + safe_tags[:, 1:]
        grad_trans = torch.zeros(num_tags * num_tags, dtype=torch.float32, device=device)
        grad_trans.index_add_(0, flat_pairs.reshape(-1), weights.reshape(-1))
        grad_trans = grad_trans.view(num_tags, num_tags) - pair.sum(0)
    # ∂s is ∂e at t = 0 and ∂f is ∂e at each sequence's last position, summed over the batch.
    grad_start = out[:, 0].sum(0)
    grad_end = out[torch.arange(batch, device=device), (lengths.long() - 1).clamp(min=0)].sum(0)
    return out, grad_trans, grad_start, grad_end


def _viterbi(emissions, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    """Launch the Viterbi kernel: ``(tags (B, T) int64 padded with -1, best scores (B,) float32)``."""
    batch, seq_len, num_tags = emissions.shape
    block_b, block_k = _viterbi_tiling(num_tags, block_b, block_k)
    device = emissions.device
    tags = torch.empty((batch, seq_len), dtype=torch.int64, device=device)
    best = torch.empty((batch,), dtype=torch.float32, device=device)
    if batch == 0:
        return tags, best
    backpointers = torch.empty((batch, seq_len, num_tags), dtype=_pointer_dtype(num_tags), device=device)
    score = torch.empty((batch, 2, num_tags), dtype=torch.float32, device=device)
    _crf_viterbi_kernel[(triton.cdiv(batch, block_b),)](
        emissions.contiguous(), mask.sum(1, dtype=torch.int32), transitions.to(torch.float32).contiguous(),
        start_transitions.to(torch.float32).contiguous(), end_transitions.to(torch.float32).contiguous(),
        score, backpointers, tags, best, batch, seq_len, num_tags,
        NUM_K_TILES=triton.cdiv(num_tags, block_k), BLOCK_K=block_k, BLOCK_B=block_b,
        num_warps=_num_warps(block_b, block_k),
    )
    return tags, best


def launch_configurations() -> list[dict]:
    """Every kernel build the launchers above can ask for, for offline compile checks (tests/test_triton_build.py).

    Each entry: ``name``, ``kernel``, ``signature`` (types of the non-constexpr arguments), ``constexprs``,
    ``num_warps`` and, where the launcher sets it (the ``tl.dot`` path), ``num_stages``. The tilings come from
    :func:`_tiling` and :func:`_viterbi_tiling` over tag counts that reach every block size (one tile and
    several) and every backpointer type, and batches below and above the ``tl.dot`` threshold; each with and
    without tags (marginals), emissions in bfloat16, and float16/float32 at the largest tiles.
    """
    tag_counts = (1, 2, 3, 5, 9, 16, 17, 33, 64, 73, 100, 133, 200, 300, 40000)
    tilings, viterbi_tilings = set(), set()
    for num_tags in tag_counts:
        for batch in (1, 4096):
            block_b, block_k, use_dot = _tiling(batch, num_tags, None, None)
            if num_tags <= 133:  # tile counts 1 to 3 (of 64 above 64 tags; the dot path: one tile of 16)
                tilings.add((block_b, block_k, use_dot, triton.cdiv(num_tags, block_k)))
        block_b, block_k = _viterbi_tiling(num_tags, None, None)
        viterbi_tilings.add((block_b, block_k, triton.cdiv(num_tags, block_k), _pointer_dtype(num_tags)))
    pointer_types = {torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32"}
    f32 = "*fp32"
    builds = []
    for block_b, block_k, use_dot, tiles in sorted(tilings):
        largest = block_b * block_k == max(b * k for b, k, _, _ in tilings)
        for dtype in ("bf16", "fp16", "fp32") if largest else ("bf16",):
            layout = dict(NUM_K_TILES=tiles, BLOCK_K=block_k, BLOCK_B=block_b, USE_DOT=use_dot)
            label = f"{dtype} BLOCK_B={block_b} BLOCK_K={block_k} tiles={tiles}{' dot' if use_dot else ''}"
            # (HAS_TAGS, NUM_PASSES): log-likelihood, log Z or marginals, partial labels.
            for has_tags, passes in ((True, 1), (False, 1), (False, 2)):
                signature = {"emissions_ptr": f"*{dtype}", "tags_ptr": "*i64" if has_tags else "*i32",
                             "allowed_ptr": "*u8" if passes == 2 else "*i32",
                             "lengths_ptr": "*i32", "trans_ptr": f32, "exptrans_ptr": f32, "colmax_ptr": f32,
                             "start_ptr": f32, "end_ptr": f32, "alpha_ptr": f32, "alpha_max_ptr": f32, "ll_ptr": f32,
                             "B": "i32", "T": "i32", "K": "i32"}
                builds.append(dict(name=f"forward {label} tags={has_tags} passes={passes}",
                                   kernel=_crf_forward_kernel, signature=signature,
                                   constexprs=dict(HAS_TAGS=has_tags, NUM_PASSES=passes, **layout),
                                   **_launch_options(block_b, block_k, use_dot)))
            # (MARGINALS, HAS_TAGS, NUM_PASSES): marginals, log-likelihood, log Z and partial-label gradients.
            for marginals, has_tags, passes in ((False, True, 1), (True, False, 1), (False, False, 1),
                                                (False, False, 2)):
                signature = {"emissions_ptr": f"*{dtype}", "tags_ptr": "*i64" if has_tags else "*i32",
                             "allowed_ptr": "*u8" if passes == 2 else "*i32",
                             "lengths_ptr": "*i32", "trans_ptr": f32, "exptrans_ptr": f32, "colmax_ptr": f32,
                             "trans_t_ptr": f32, "exptrans_t_ptr": f32, "rowmax_ptr": f32, "end_ptr": f32,
                             "alpha_ptr": f32, "alpha_max_ptr": f32, "grad_ptr": f32, "v_ptr": f32, "out_ptr": f32,
                             "pair_ptr": f32, "B": "i32", "T": "i32", "K": "i32", "NUM_PAIR_GROUPS": "i32"}
                builds.append(dict(name=f"backward {label} marginals={marginals} tags={has_tags} passes={passes}",
                                   kernel=_crf_backward_kernel, signature=signature,
                                   constexprs=dict(MARGINALS=marginals, HAS_TAGS=has_tags, NUM_PASSES=passes,
                                                   **layout),
                                   **_launch_options(block_b, block_k, use_dot,
                                                     wide=not marginals and not has_tags, num_tiles=tiles)))
    for block_b, block_k, tiles, pointer_dtype in sorted(viterbi_tilings, key=str):
        signature = {"emissions_ptr": "*bf16", "lengths_ptr": "*i32", "trans_ptr": f32, "start_ptr": f32,
                     "end_ptr": f32, "score_ptr": f32, "backpointers_ptr": pointer_types[pointer_dtype],
                     "tags_out_ptr": "*i64", "best_ptr": f32, "B": "i32", "T": "i32", "K": "i32"}
        builds.append(dict(name=f"viterbi bf16 BLOCK_B={block_b} BLOCK_K={block_k} tiles={tiles} "
                                f"{pointer_types[pointer_dtype][1:]}", kernel=_crf_viterbi_kernel,
                           signature=signature, constexprs=dict(NUM_K_TILES=tiles, BLOCK_K=block_k, BLOCK_B=block_b),
                           num_warps=_num_warps(block_b, block_k)))
    # k-best: the tilings of _kbest_tiling over k from 2 to the largest served, tag counts in one tile and several
    # of each tag dimension, and both backpointer types.
    kbest_builds = set()
    for k in (2, 5, 16, _KBEST_MAX):
        for num_tags in (3, 9, 17, 64, 600):
            block_r, block_j, block_i = _kbest_tiling(num_tags, k, None, None)
            pointers = "*i16" if num_tags * k <= torch.iinfo(torch.int16).max else "*i32"
            kbest_builds.add((k, block_r, block_j, triton.cdiv(num_tags, block_j), block_i,
                              triton.cdiv(num_tags, block_i), pointers))
    for k, block_r, block_j, j_tiles, block_i, i_tiles, pointers in sorted(kbest_builds):
        signature = {"emissions_ptr": "*bf16", "lengths_ptr": "*i32", "trans_ptr": f32, "start_ptr": f32,
                     "end_ptr": f32, "state_ptr": f32, "backpointers_ptr": pointers, "paths_ptr": "*i64",
                     "scores_ptr": f32, "T": "i32", "K": "i32"}
        builds.append(dict(name=f"kbest bf16 k={k} BLOCK_J={block_j}x{j_tiles} BLOCK_I={block_i}x{i_tiles} "
                                f"{pointers[1:]}", kernel=_crf_kbest_kernel, signature=signature,
                           constexprs=dict(KBEST=k, BLOCK_R=block_r, BLOCK_J=block_j, NUM_J_TILES=j_tiles,
                                           BLOCK_I=block_i, NUM_I_TILES=i_tiles),
                           num_warps=_kbest_num_warps(block_r, block_j, block_i)))
    return builds


# ------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fusedloss::triton_crf_log_likelihood", mutates_args=())
def _log_likelihood_op(
    emissions: torch.Tensor,
    tags: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ll (B,) in the result dtype, alpha (B, T, K) float32, alpha_max (B, T) float32)``; the scaled
    forward variables are kept for the backward. ``block_b``/``block_k`` override the tiling (tests)."""
    ll, alpha, alpha_max = _forward(emissions, tags, mask, transitions, start_transitions, end_transitions,
                                    block_b, block_k)
    return ll.to(torch.promote_types(emissions.dtype, transitions.dtype)), alpha, alpha_max


@_log_likelihood_op.register_fake
def _(emissions, tags, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    batch, seq_len, num_tags = emissions.shape
    result_dtype = torch.promote_types(emissions.dtype, transitions.dtype)
    return (
        emissions.new_empty((batch,), dtype=result_dtype),
        emissions.new_empty((batch, seq_len, num_tags), dtype=torch.float32),
        emissions.new_empty((batch, seq_len), dtype=torch.float32),
    )


@torch.library.custom_op("fusedloss::triton_crf_log_likelihood_backward", mutates_args=())
def _log_likelihood_backward_op(
    grad: torch.Tensor,
    emissions: torch.Tensor,
    tags: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    alpha: torch.Tensor,
    alpha_max: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``ll`` scaled by ``grad`` (B,): ``(∂emissions, ∂transitions, ∂start, ∂end)``, each in the
    dtype of its input."""
    return _log_likelihood_backward(grad, emissions, tags, mask, transitions, start_transitions, end_transitions,
                                    alpha, alpha_max, block_b, block_k)


def _log_likelihood_backward(grad, emissions, tags, mask, transitions, start_transitions, end_transitions, alpha,
                             alpha_max, block_b=None, block_k=None):
    grad_emissions, grad_trans, grad_start, grad_end = _backward(
        grad, emissions, tags, mask, transitions, end_transitions, alpha, alpha_max, block_b, block_k
    )
    return (
        grad_emissions.to(emissions.dtype),
        grad_trans.to(transitions.dtype),
        grad_start.to(start_transitions.dtype),
        grad_end.to(end_transitions.dtype),
    )


@_log_likelihood_backward_op.register_fake
def _(grad, emissions, tags, mask, transitions, start_transitions, end_transitions, alpha, alpha_max,
      block_b=None, block_k=None):
    return (
        torch.empty_like(emissions),
        torch.empty_like(transitions),
        torch.empty_like(start_transitions),
        torch.empty_like(end_transitions),
    )


def _log_likelihood_setup_context(ctx, inputs, output):
    emissions, tags, mask, transitions, start_transitions, end_transitions, ctx.block_b, ctx.block_k = inputs
    _, alpha, alpha_max = output
    ctx.save_for_backward(emissions, tags, mask, transitions, start_transitions, end_transitions, alpha, alpha_max)


def _log_likelihood_autograd(ctx, grad_ll, grad_alpha, grad_alpha_max):
    # The scaled α are internal outputs (nothing downstream uses them), so only grad_ll carries a gradient.
    grads = _log_likelihood_backward_op(grad_ll, *ctx.saved_tensors, ctx.block_b, ctx.block_k)
    grad_emissions, grad_trans, grad_start, grad_end = grads
    return grad_emissions, None, None, grad_trans, grad_start, grad_end, None, None


_log_likelihood_op.register_autograd(_log_likelihood_autograd, setup_context=_log_likelihood_setup_context)


@torch.library.custom_op("fusedloss::triton_crf_viterbi", mutates_args=())
def _viterbi_op(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _viterbi_result(emissions, mask, transitions, start_transitions, end_transitions, block_b, block_k)


def _viterbi_result(emissions, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    tags, best = _viterbi(emissions, mask, transitions, start_transitions, end_transitions, block_b, block_k)
    return tags, best.to(torch.promote_types(emissions.dtype, transitions.dtype))


@_viterbi_op.register_fake
def _(emissions, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    batch, seq_len, _ = emissions.shape
    result_dtype = torch.promote_types(emissions.dtype, transitions.dtype)
    return (emissions.new_empty((batch, seq_len), dtype=torch.int64), emissions.new_empty((batch,), dtype=result_dtype))


@torch.library.custom_op("fusedloss::triton_crf_marginals", mutates_args=())
def _marginals_op(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    return _marginals_result(emissions, mask, transitions, start_transitions, end_transitions, block_b, block_k)


def _marginals_result(emissions, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    _, alpha, alpha_max = _forward(emissions, None, mask, transitions, start_transitions, end_transitions,
                                   block_b, block_k)
    marginals = _backward(None, emissions, None, mask, transitions, end_transitions, alpha, alpha_max, block_b,
                          block_k)
    return marginals.to(torch.promote_types(emissions.dtype, transitions.dtype))


@_marginals_op.register_fake
def _(emissions, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    return torch.empty_like(emissions, dtype=torch.promote_types(emissions.dtype, transitions.dtype))


def _gradients(grad, emissions, tags, allowed, mask, transitions, start_transitions, end_transitions, alpha,
               alpha_max, block_b=None, block_k=None):
    """The backward launch of a value with a gradient, each gradient in the dtype of its input."""
    grad_emissions, grad_trans, grad_start, grad_end = _backward(
        grad, emissions, tags, mask, transitions, end_transitions, alpha, alpha_max, block_b, block_k, allowed
    )
    return (
        grad_emissions.to(emissions.dtype),
        grad_trans.to(transitions.dtype),
        grad_start.to(start_transitions.dtype),
        grad_end.to(end_transitions.dtype),
    )


def _fake_gradients(emissions, transitions, start_transitions, end_transitions):
    return (
        torch.empty_like(emissions),
        torch.empty_like(transitions),
        torch.empty_like(start_transitions),
        torch.empty_like(end_transitions),
    )


def _fake_forward(emissions, transitions, num_passes):
    batch, seq_len, num_tags = emissions.shape
    result_dtype = torch.promote_types(emissions.dtype, transitions.dtype)
    return (
        emissions.new_empty((batch,), dtype=result_dtype),
        emissions.new_empty((num_passes * batch, seq_len, num_tags), dtype=torch.float32),
        emissions.new_empty((num_passes * batch, seq_len), dtype=torch.float32),
    )


@torch.library.custom_op("fusedloss::triton_crf_partial_log_likelihood", mutates_args=())
def _partial_log_likelihood_op(
    emissions: torch.Tensor,
    allowed: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log Z_allowed - log Z (B,) in the result dtype, alpha (2B, T, K) float32, alpha_max (2B, T) float32)``:
    the scaled forward variables of the constrained and the free recursion, kept for the backward."""
    value, alpha, alpha_max = _forward(emissions, None, mask, transitions, start_transitions, end_transitions,
                                       block_b, block_k, allowed)
    return value.to(torch.promote_types(emissions.dtype, transitions.dtype)), alpha, alpha_max


@_partial_log_likelihood_op.register_fake
def _(emissions, allowed, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    return _fake_forward(emissions, transitions, 2)


@torch.library.custom_op("fusedloss::triton_crf_partial_log_likelihood_backward", mutates_args=())
def _partial_log_likelihood_backward_op(
    grad: torch.Tensor,
    emissions: torch.Tensor,
    allowed: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    alpha: torch.Tensor,
    alpha_max: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad`` (B,) times the constrained minus the free marginals: ``(∂emissions, ∂transitions, ∂start,
    ∂end)``."""
    return _gradients(grad, emissions, None, allowed, mask, transitions, start_transitions, end_transitions, alpha,
                      alpha_max, block_b, block_k)


@_partial_log_likelihood_backward_op.register_fake
def _(grad, emissions, allowed, mask, transitions, start_transitions, end_transitions, alpha, alpha_max,
      block_b=None, block_k=None):
    return _fake_gradients(emissions, transitions, start_transitions, end_transitions)


def _partial_setup_context(ctx, inputs, output):
    emissions, allowed, mask, transitions, start_transitions, end_transitions, ctx.block_b, ctx.block_k = inputs
    _, alpha, alpha_max = output
    ctx.save_for_backward(emissions, allowed, mask, transitions, start_transitions, end_transitions, alpha,
                          alpha_max)


def _partial_autograd(ctx, grad_value, grad_alpha, grad_alpha_max):
    grads = _partial_log_likelihood_backward_op(grad_value, *ctx.saved_tensors, ctx.block_b, ctx.block_k)
    grad_emissions, grad_trans, grad_start, grad_end = grads
    return grad_emissions, None, None, grad_trans, grad_start, grad_end, None, None


_partial_log_likelihood_op.register_autograd(_partial_autograd, setup_context=_partial_setup_context)


@torch.library.custom_op("fusedloss::triton_crf_log_partition", mutates_args=())
def _log_partition_op(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log Z (B,) in the result dtype, alpha (B, T, K) float32, alpha_max (B, T) float32)``."""
    value, alpha, alpha_max = _forward(emissions, None, mask, transitions, start_transitions, end_transitions,
                                       block_b, block_k)
    return value.to(torch.promote_types(emissions.dtype, transitions.dtype)), alpha, alpha_max


@_log_partition_op.register_fake
def _(emissions, mask, transitions, start_transitions, end_transitions, block_b=None, block_k=None):
    return _fake_forward(emissions, transitions, 1)


@torch.library.custom_op("fusedloss::triton_crf_log_partition_backward", mutates_args=())
def _log_partition_backward_op(
    grad: torch.Tensor,
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    alpha: torch.Tensor,
    alpha_max: torch.Tensor,
    block_b: Optional[int] = None,
    block_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad`` (B,) times the marginals: ``(∂emissions, ∂transitions, ∂start, ∂end)``."""
    return _gradients(grad, emissions, None, None, mask, transitions, start_transitions, end_transitions, alpha,
                      alpha_max, block_b, block_k)


@_log_partition_backward_op.register_fake
def _(grad, emissions, mask, transitions, start_transitions, end_transitions, alpha, alpha_max, block_b=None,
      block_k=None):
    return _fake_gradients(emissions, transitions, start_transitions, end_transitions)


def _log_partition_setup_context(ctx, inputs, output):
    emissions, mask, transitions, start_transitions, end_transitions, ctx.block_b, ctx.block_k = inputs
    _, alpha, alpha_max = output
    ctx.save_for_backward(emissions, mask, transitions, start_transitions, end_transitions, alpha, alpha_max)


def _log_partition_autograd(ctx, grad_value, grad_alpha, grad_alpha_max):
    grads = _log_partition_backward_op(grad_value, *ctx.saved_tensors, ctx.block_b, ctx.block_k)
    grad_emissions, grad_trans, grad_start, grad_end = grads
    return grad_emissions, None, grad_trans, grad_start, grad_end, None, None


_log_partition_op.register_autograd(_log_partition_autograd, setup_context=_log_partition_setup_context)


@torch.library.custom_op("fusedloss::triton_crf_kbest_viterbi", mutates_args=())
def _kbest_viterbi_op(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    k: int,
    block_j: Optional[int] = None,
    block_i: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(paths (B, k, T) int64, scores (B, k) in the result dtype)``; ``block_j``/``block_i`` override the
    tiling (tests)."""
    return _kbest_result(emissions, mask, transitions, start_transitions, end_transitions, k, block_j, block_i)


def _kbest_result(emissions, mask, transitions, start_transitions, end_transitions, k, block_j=None, block_i=None):
    paths, scores = _kbest(emissions, mask, transitions, start_transitions, end_transitions, k, block_j, block_i)
    return paths, scores.to(torch.promote_types(emissions.dtype, transitions.dtype))


@_kbest_viterbi_op.register_fake
def _(emissions, mask, transitions, start_transitions, end_transitions, k, block_j=None, block_i=None):
    batch, seq_len, _ = emissions.shape
    result_dtype = torch.promote_types(emissions.dtype, transitions.dtype)
    return (emissions.new_empty((batch, k, seq_len), dtype=torch.int64),
            emissions.new_empty((batch, k), dtype=result_dtype))


# ------------------------------------------------------------------------------ backend entry points


class _LogLikelihood(torch.autograd.Function):
    """Eager path of the log-likelihood (no custom-op layer, which costs tens of microseconds a call)."""

    @staticmethod
    def forward(ctx, emissions, tags, mask, transitions, start_transitions, end_transitions):
        ll, alpha, alpha_max = _forward(emissions, tags, mask, transitions, start_transitions, end_transitions,
                                        None, None)
        ctx.save_for_backward(emissions, tags, mask, transitions, start_transitions, end_transitions, alpha,
                              alpha_max)
        return ll.to(torch.promote_types(emissions.dtype, transitions.dtype))

    @staticmethod
    def backward(ctx, grad_ll):
        grad_emissions, grad_trans, grad_start, grad_end = _log_likelihood_backward(grad_ll, *ctx.saved_tensors)
        return grad_emissions, None, None, grad_trans, grad_start, grad_end


def crf_log_likelihood(emissions, tags, mask, transitions, start_transitions, end_transitions) -> torch.Tensor:
    """Per-sequence log-likelihood ``score(tags) - log Z`` (B,), differentiable w.r.t. the emissions and the
    three transition tensors (docs/BACKENDS.md). Eager calls launch through a plain ``autograd.Function``; the
    custom op is what ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return _log_likelihood_op(emissions, tags, mask, transitions, start_transitions, end_transitions)[0]
    return _LogLikelihood.apply(emissions, tags, mask, transitions, start_transitions, end_transitions)


def crf_log_likelihood_reasons(emissions, tags, mask, transitions, start_transitions, end_transitions) -> list[str]:
    return _compute_dtypes_reason(emissions, transitions)


def crf_viterbi(emissions, mask, transitions, start_transitions, end_transitions) -> tuple[torch.Tensor, torch.Tensor]:
    """Best path per sequence: ``(tags (B, T) int64 padded with -1, scores (B,))``; ties take the lowest tag."""
    if torch.compiler.is_compiling():
        return _viterbi_op(emissions, mask, transitions, start_transitions, end_transitions)
    return _viterbi_result(emissions, mask, transitions, start_transitions, end_transitions)


def crf_viterbi_reasons(emissions, mask, transitions, start_transitions, end_transitions) -> list[str]:
    return _compute_dtypes_reason(emissions, transitions)


def crf_marginals(emissions, mask, transitions, start_transitions, end_transitions) -> torch.Tensor:
    """Tag posteriors ``P(y_t = k)`` (B, T, K), 0 at masked positions."""
    if torch.compiler.is_compiling():
        return _marginals_op(emissions, mask, transitions, start_transitions, end_transitions)
    return _marginals_result(emissions, mask, transitions, start_transitions, end_transitions)


def crf_marginals_reasons(emissions, mask, transitions, start_transitions, end_transitions) -> list[str]:
    reasons = _compute_dtypes_reason(emissions, transitions)
    # The marginals kernel has no backward: a call that autograd would differentiate goes to another backend
    # instead of returning a tensor with no gradient.
    if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad
            for x in (emissions, transitions, start_transitions, end_transitions)):
        reasons.append("marginals are not differentiable here (an input requires grad)")
    return reasons


class _PartialLogLikelihood(torch.autograd.Function):
    """Eager path of the partial-label log-likelihood (as :class:`_LogLikelihood`)."""

    @staticmethod
    def forward(ctx, emissions, allowed, mask, transitions, start_transitions, end_transitions):
        value, alpha, alpha_max = _forward(emissions, None, mask, transitions, start_transitions, end_transitions,
                                           None, None, allowed)
        ctx.save_for_backward(emissions, allowed, mask, transitions, start_transitions, end_transitions, alpha,
                              alpha_max)
        return value.to(torch.promote_types(emissions.dtype, transitions.dtype))

    @staticmethod
    def backward(ctx, grad_value):
        emissions, allowed, mask, transitions, start, end, alpha, alpha_max = ctx.saved_tensors
        grads = _gradients(grad_value, emissions, None, allowed, mask, transitions, start, end, alpha, alpha_max)
        grad_emissions, grad_trans, grad_start, grad_end = grads
        return grad_emissions, None, None, grad_trans, grad_start, grad_end


def crf_partial_log_likelihood(emissions, allowed, mask, transitions, start_transitions,
                               end_transitions) -> torch.Tensor:
    """Per-sequence ``log Z_allowed - log Z`` (B,) for partial labels ``allowed (B, T, K)`` bool, differentiable
    w.r.t. the emissions and the three transition tensors (docs/BACKENDS.md): both recursions run in one forward
    launch, and the gradient (constrained minus free marginals) in one backward launch."""
    if torch.compiler.is_compiling():
        return _partial_log_likelihood_op(emissions, allowed, mask, transitions, start_transitions,
                                          end_transitions)[0]
    return _PartialLogLikelihood.apply(emissions, allowed, mask, transitions, start_transitions, end_transitions)


def crf_partial_log_likelihood_reasons(emissions, allowed, mask, transitions, start_transitions,
                                       end_transitions) -> list[str]:
    return _compute_dtypes_reason(emissions, transitions)


class _LogPartition(torch.autograd.Function):
    """Eager path of log Z (as :class:`_LogLikelihood`)."""

    @staticmethod
    def forward(ctx, emissions, mask, transitions, start_transitions, end_transitions):
        value, alpha, alpha_max = _forward(emissions, None, mask, transitions, start_transitions, end_transitions)
        ctx.save_for_backward(emissions, mask, transitions, start_transitions, end_transitions, alpha, alpha_max)
        return value.to(torch.promote_types(emissions.dtype, transitions.dtype))

    @staticmethod
    def backward(ctx, grad_value):
        emissions, mask, transitions, start, end, alpha, alpha_max = ctx.saved_tensors
        grads = _gradients(grad_value, emissions, None, None, mask, transitions, start, end, alpha, alpha_max)
        grad_emissions, grad_trans, grad_start, grad_end = grads
        return grad_emissions, None, grad_trans, grad_start, grad_end


def crf_log_partition(emissions, mask, transitions, start_transitions, end_transitions) -> torch.Tensor:
    """Per-sequence ``log Z`` (B,), differentiable; its gradient is the marginals times the incoming gradient."""
    if torch.compiler.is_compiling():
        return _log_partition_op(emissions, mask, transitions, start_transitions, end_transitions)[0]
    return _LogPartition.apply(emissions, mask, transitions, start_transitions, end_transitions)


def crf_log_partition_reasons(emissions, mask, transitions, start_transitions, end_transitions) -> list[str]:
    return _compute_dtypes_reason(emissions, transitions)


def crf_kbest_viterbi(emissions, mask, transitions, start_transitions, end_transitions,
                      k) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best paths per sequence: ``(paths (B, k, T) int64 padded with -1, scores (B, k))``, best first; ranks
    beyond the sequence's K^L paths are -1 with score -inf. Scores are not differentiable."""
    # Detached inputs make outputs that need no backward (the op has none), also when a traced graph with
    # trainable inputs is differentiated.
    emissions, transitions = emissions.detach(), transitions.detach()
    start_transitions, end_transitions = start_transitions.detach(), end_transitions.detach()
    if torch.compiler.is_compiling():
        return _kbest_viterbi_op(emissions, mask, transitions, start_transitions, end_transitions, k)
    return _kbest_result(emissions, mask, transitions, start_transitions, end_transitions, k)


def crf_kbest_viterbi_reasons(emissions, mask, transitions, start_transitions, end_transitions, k) -> list[str]:
    reasons = _compute_dtypes_reason(emissions, transitions)
    if k > _KBEST_MAX:
        # The kernel selects the k best by k rounds of max per step and tag, with the ranks in one block.
        reasons.append(f"k = {k} paths: the Triton k-best kernel keeps at most {_KBEST_MAX} per tag")
    if emissions.dim() == 3 and emissions.shape[-1] * k > _NO_INDEX_VALUE - 1:
        reasons.append(f"{emissions.shape[-1]} tags times k = {k} do not fit the kernel's int32 backpointers")
    return reasons
