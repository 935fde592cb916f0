"""Reference linear-chain CRF: log-likelihood, Viterbi and tag marginals as plain PyTorch ops, with autograd for
the backward (docs/BACKENDS.md, ``crf_log_likelihood``, ``crf_viterbi``, ``crf_marginals``).

For one sequence of length L (its mask is a prefix of L ones), emissions ``e`` (L, K), transition scores
``A[i, j]`` (i -> j), start scores ``s`` and end scores ``f``, a tag path ``y`` scores::

    score(y) = s[y_0] + Σ_{t<L} e[t, y_t] + Σ_{0<t<L} A[y_{t-1}, y_t] + f[y_{L-1}]

and the model is ``P(y | e) = exp(score(y) - log Z)`` with ``log Z = logsumexp_y score(y)``, computed by the
forward algorithm in log space::

    α_0[j] = s[j] + e[0, j]
    α_t[j] = logsumexp_i(α_{t-1}[i] + A[i, j]) + e[t, j]          (0 < t < L)
    log Z  = logsumexp_j(α_{L-1}[j] + f[j])

and the backward algorithm ``β_{L-1}[i] = f[i]``, ``β_t[i] = logsumexp_j(A[i, j] + e[t+1, j] + β_{t+1}[j])``, so
that the tag marginals are ``P(y_t = k) = exp(α_t[k] + β_t[k] - log Z)``. Viterbi is the same recursion with
max for logsumexp, plus backpointers.

Every function is vectorized over the batch: the only Python loop runs over time steps. Positions past a
sequence's end carry the recursion state unchanged (``torch.where`` on the mask), which is how ragged batches
run in one pass. Arguments are batch first, already validated by the public layer (``fusedloss.crf``):
emissions ``(B, T, K)`` float16/bfloat16/float32/float64, tags ``(B, T)`` int64 in [0, K), mask ``(B, T)`` bool
left-aligned with ``mask[:, 0]`` all true, transitions ``(K, K)``, start and end transitions ``(K,)``. Results
have the dtype ``promote_types(emissions.dtype, transitions.dtype)`` and are computed in float32 for half types
(float64 when either input is float64).
"""

from __future__ import annotations

from typing import Tuple

import torch

# Up to this many tags the Viterbi recursion stores backpointers; above it the backtrace recomputes them on the
# path (see crf_viterbi). Measured on a CPU: `max` with indices costs ~1.3x `amax` at K = 9 and ~5x at K = 37.
_STORE_BACKPOINTERS_MAX_TAGS = 16


def _dtypes(emissions: torch.Tensor, transitions: torch.Tensor) -> Tuple[torch.dtype, torch.dtype]:
    """``(result dtype, compute dtype)``: the promoted dtype, and at least float32 for the arithmetic."""
    result_dtype = torch.promote_types(emissions.dtype, transitions.dtype)
    return result_dtype, torch.promote_types(result_dtype, torch.float32)


def _prepare(emissions, mask, transitions, start_transitions, end_transitions):
    """Cast to the compute dtype; emissions past each sequence's end become 0 so that nothing there (not even a
    NaN) reaches a value or a gradient."""
    result_dtype, compute_dtype = _dtypes(emissions, transitions)
    emissions = torch.where(mask.unsqueeze(2), emissions.to(compute_dtype), 0.0)
    return (
        result_dtype,
        emissions,
        transitions.to(compute_dtype),
        start_transitions.to(compute_dtype),
        end_transitions.to(compute_dtype),
    )


def _forward_algorithm(emissions: torch.Tensor, transitions: torch.Tensor,
                       start_transitions: torch.Tensor) -> torch.Tensor:
    """The forward variables ``α_t``, stacked to ``(B, T, K)``. The recursion runs on past each sequence's
    end (over zero emissions) instead of branching on the mask; only ``α_t`` for ``t < L`` is ever read."""
    # Entry [j, i] of the transposed matrix scores i -> j: the logsumexp below reduces over the contiguous axis.
    transitions_to_from = transitions.t().contiguous()
    emissions_at = emissions.unbind(1)
    alpha = start_transitions + emissions_at[0]
    alphas = [alpha]
    for emission in emissions_at[1:]:
        alpha = torch.logsumexp(alpha.unsqueeze(1) + transitions_to_from, dim=2) + emission
        alphas.append(alpha)
    return torch.stack(alphas, 1)


def _at_last_position(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[b, L_b - 1]`` for ``values (B, T, ...)``: each sequence's entry at its last position."""
    last_index = (mask.sum(1) - 1).view(-1, 1, *([1] * (values.dim() - 2)))
    return values.gather(1, last_index.expand(-1, 1, *values.shape[2:])).squeeze(1)


def _gold_score(emissions, tags, mask, transitions, start_transitions, end_transitions) -> torch.Tensor:
    """``score(y)`` of the given tag paths, ``(B,)``; emissions are already 0 past each sequence's end."""
    emission_score = emissions.gather(2, tags.unsqueeze(2)).squeeze(2).sum(1)
    transition_score = torch.where(mask[:, 1:], transitions[tags[:, :-1], tags[:, 1:]], 0.0).sum(1)
    last_tags = _at_last_position(tags, mask)
    return start_transitions[tags[:, 0]] + emission_score + transition_score + end_transitions[last_tags]


def _log_partition(emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor,
                   start_transitions: torch.Tensor, end_transitions: torch.Tensor) -> torch.Tensor:
    """``log Z`` per sequence, ``(B,)``, in the compute dtype, from prepared arguments."""
    alphas = _forward_algorithm(emissions, transitions, start_transitions)
    return torch.logsumexp(_at_last_position(alphas, mask) + end_transitions, dim=1)


def crf_log_likelihood(
    emissions: torch.Tensor,
    tags: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
) -> torch.Tensor:
    """Per-sequence log-likelihood ``score(tags) - log Z``, ``(B,)``, differentiable w.r.t. the emissions and the
    three transition tensors."""
    result_dtype, emissions, transitions, start_transitions, end_transitions = _prepare(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    gold = _gold_score(emissions, tags, mask, transitions, start_transitions, end_transitions)
    log_partition = _log_partition(emissions, mask, transitions, start_transitions, end_transitions)
    return (gold - log_partition).to(result_dtype)


def crf_marginals(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
) -> torch.Tensor:
    """Tag posteriors ``P(y_t = k | emissions)``, ``(B, T, K)``, by the forward-backward recursions in log space;
    0 at masked positions. Each unmasked row sums to 1."""
    result_dtype, emissions, transitions, start_transitions, end_transitions = _prepare(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    alphas = _forward_algorithm(emissions, transitions, start_transitions)
    log_partition = torch.logsumexp(_at_last_position(alphas, mask) + end_transitions, dim=1)

    emissions_at = emissions.unbind(1)
    end_scores = end_transitions.expand_as(alphas[:, 0])
    beta = end_scores
    betas = [beta]
    for t in range(emissions.size(1) - 2, -1, -1):
        # (K, K) + (B, 1, K): entry [b, i, j] scores moving from i at t to j at t+1 and every path after it.
        step = torch.logsumexp(transitions + (emissions_at[t + 1] + beta).unsqueeze(1), dim=2)
        # Where t+1 is past the end, t is the last position (or past it): β_t = f.
        beta = torch.where(mask[:, t + 1].unsqueeze(1), step, end_scores)
        betas.append(beta)
    betas.reverse()

    log_marginals = alphas + torch.stack(betas, 1) - log_partition[:, None, None]
    return torch.where(mask.unsqueeze(2), log_marginals.exp(), 0.0).to(result_dtype)


def crf_viterbi(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best tag path per sequence and its score: ``(tags (B, T) int64 padded with -1 past each sequence's end,
    scores (B,))``. Ties go to the lowest tag index (``max``/``argmax`` return the first maximal index).

    The max-plus recursion is ``δ_t[j] = max_i(δ_{t-1}[i] + A[i, j]) + e[t, j]``, and the backtrace follows
    ``argmax_i(δ_{t-1}[i] + A[i, j])`` from the best last tag. For small K the recursion stores these
    backpointers (``max`` with indices costs about what ``amax`` does) and the backtrace is one gather per
    step; for larger K, ``max`` with indices over B·K² values costs several times ``amax`` (about 5x at K = 37
    on a CPU), so the recursion keeps only δ and the backtrace recomputes the argmax for the path's tag alone,
    B·K values per step. The score is that of the returned path, ``score(y)``, so it is differentiable like
    the log-likelihood.
    """
    result_dtype, emissions, transitions, start_transitions, end_transitions = _prepare(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    batch_size, seq_len, num_tags = emissions.shape
    store_backpointers = num_tags <= _STORE_BACKPOINTERS_MAX_TAGS
    with torch.no_grad():
        transitions_to_from = transitions.t().contiguous()  # [j, i] scores i -> j
        # Time first, and split into per-step views once: indexing a view per step costs as much as an op.
        emissions_at = emissions.transpose(0, 1).contiguous().unbind(0)
        delta = start_transitions + emissions_at[0]
        deltas = [delta]  # δ_t for every t; like α it runs on past each sequence's end
        backpointers = [delta.new_zeros(delta.shape, dtype=torch.int64)]  # backpointers[t]: t-1 given t
        # One (B, K, K) buffer for all steps: a fresh tensor of that size per step costs more than the max.
        candidates = delta.new_empty(batch_size, num_tags, num_tags)
        for emission in emissions_at[1:]:
            torch.add(delta.unsqueeze(1), transitions_to_from, out=candidates)
            if store_backpointers:
                delta, best_previous = candidates.max(dim=2)
                backpointers.append(best_previous)
            else:
                delta = candidates.amax(dim=2)
            delta = delta.add_(emission)
            deltas.append(delta)
        lengths = mask.sum(1)
        final_delta = torch.stack(deltas)[lengths - 1, torch.arange(batch_size, device=lengths.device)]
        current = (final_delta + end_transitions).argmax(1, keepdim=True)  # (B, 1)

        # Backtrace for the whole batch: at step t, `current` is the path's tag at t for sequences longer than
        # t, and their last tag for the others (which have not started their backtrace yet).
        inside = mask.t().unsqueeze(2)  # inside[t]: (B, 1), t < length
        path = [current]
        if store_backpointers:
            # Past each sequence's end the backpointers are the identity, so the tag stays put: one gather a step.
            identity = torch.arange(num_tags, device=delta.device)
            backpointers_at = torch.where(inside, torch.stack(backpointers), identity).unbind(0)
            for t in range(seq_len - 1, 0, -1):
                current = backpointers_at[t].gather(1, current)
                path.append(current)
        else:
            inside_at = inside.unbind(0)
            for t in range(seq_len - 1, 0, -1):
                column = torch.index_select(transitions_to_from, 0, current.view(-1))
                previous = column.add_(deltas[t - 1]).argmax(1, keepdim=True)
                current = torch.where(inside_at[t], previous, current)
                path.append(current)
        path.reverse()
        best_path = torch.cat(path, 1)
    score = _gold_score(emissions, best_path, mask, transitions, start_transitions, end_transitions)
    return best_path.masked_fill(~mask, -1), score.to(result_dtype)


# Emission score of a tag outside a position's allowed set (partial labels): a large finite negative whose exp is
# exactly 0 in float32 and float64, so that no recursion sees -inf (and nothing becomes NaN).
PARTIAL_LABEL_SCORE = -1e30


def crf_log_partition(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
) -> torch.Tensor:
    """``log Z = logsumexp_y score(y)`` per sequence, ``(B,)``; differentiable (its gradient is the tag and
    pairwise marginals)."""
    result_dtype, emissions, transitions, start_transitions, end_transitions = _prepare(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    return _log_partition(emissions, mask, transitions, start_transitions, end_transitions).to(result_dtype)


def crf_partial_log_likelihood(
    emissions: torch.Tensor,
    allowed: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
) -> torch.Tensor:
    """Marginal log-likelihood of partial labels, ``(B,)``: ``log Z_allowed - log Z``, where ``log Z_allowed``
    sums over the paths whose tag at every unmasked position lies in ``allowed (B, T, K)`` (the "fuzzy CRF").

    ``log Z_allowed`` is the forward algorithm with the emissions outside the allowed sets at
    ``PARTIAL_LABEL_SCORE``. A sequence whose sets hold one tag each takes the gold-score path instead, so that
    one-hot sets give exactly :func:`crf_log_likelihood`.
    """
    result_dtype, emissions, transitions, start_transitions, end_transitions = _prepare(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    allowed = allowed | ~mask.unsqueeze(2)
    constrained = torch.where(allowed, emissions, PARTIAL_LABEL_SCORE)
    log_partition = _log_partition(emissions, mask, transitions, start_transitions, end_transitions)
    numerator = _log_partition(constrained, mask, transitions, start_transitions, end_transitions)
    # One-hot sets (past the end every set is full: only unmasked positions count).
    one_hot = ((allowed.sum(2) == 1) | ~mask).all(1)
    tags = allowed.to(torch.uint8).argmax(2).masked_fill(~mask, 0)
    gold = _gold_score(emissions, tags, mask, transitions, start_transitions, end_transitions)
    numerator = torch.where(one_hot, gold, numerator)
    return (numerator - log_partition).to(result_dtype)


def crf_kbest_viterbi(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best distinct paths per sequence (list Viterbi): ``(paths (B, k, T) int64, scores (B, k))``, sorted
    by score, paths padded with -1 past each sequence's end; where a sequence has fewer than k paths (K^L < k)
    the remaining ranks are -1 with score -inf.

    Per step and tag the recursion keeps the k best partial scores ``δ_t[j, r]`` with backpointers (previous
    tag, previous rank); the candidates for tag j are ``δ_{t-1}[i, r] + A[i, j]`` over every (i, r), ranked by
    score, then by the lower i, then by the lower r (a stable descending sort of the candidates in (i, r)
    order), and the final k by ``δ[j, r] + f[j]``, then the lower j, then the lower r. Slots with no partial
    path hold -inf. The scores are those of the returned paths, ``score(y)``, so they are differentiable.
    """
    result_dtype, emissions, transitions, start_transitions, end_transitions = _prepare(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    batch_size, seq_len, num_tags = emissions.shape
    with torch.no_grad():
        emissions_at = emissions.transpose(0, 1).unbind(0)
        mask_at = mask.t().unbind(0)
        delta = emissions.new_full((batch_size, num_tags, k), float("-inf"))
        delta[:, :, 0] = start_transitions + emissions_at[0]
        tags_grid = torch.arange(num_tags, device=emissions.device).view(1, num_tags, 1).expand(batch_size, -1, k)
        ranks_grid = torch.arange(k, device=emissions.device).view(1, 1, k).expand(batch_size, num_tags, -1)
        backpointers = []  # backpointers[t - 1]: (previous tag, previous rank) of each (tag, rank) at step t
        for t in range(1, seq_len):
            # candidates[b, j, i * k + r] = δ[b, i, r] + A[i, j]
            candidates = (delta.unsqueeze(3) + transitions.view(1, num_tags, 1, num_tags)).permute(0, 3, 1, 2)
            candidates = candidates.reshape(batch_size, num_tags, num_tags * k)
            best, index = candidates.sort(dim=2, descending=True, stable=True)
            best, index = best[:, :, :k], index[:, :, :k]
            inside = mask_at[t].view(batch_size, 1, 1)
            delta = torch.where(inside, best + emissions_at[t].unsqueeze(2), delta)
            # Past the end the state stays: each (tag, rank) points at itself.
            backpointers.append((torch.where(inside, index // k, tags_grid),
                                 torch.where(inside, index % k, ranks_grid)))
        final = (delta + end_transitions.view(1, num_tags, 1)).reshape(batch_size, num_tags * k)
        final_scores, final_index = final.sort(dim=1, descending=True, stable=True)
        final_scores, final_index = final_scores[:, :k], final_index[:, :k]
        tag, rank = final_index // k, final_index % k  # (B, k)
        path = [tag]
        for t in range(seq_len - 1, 0, -1):
            previous_tag, previous_rank = backpointers[t - 1]
            flat = tag * k + rank
            tag = previous_tag.reshape(batch_size, -1).gather(1, flat)
            rank = previous_rank.reshape(batch_size, -1).gather(1, flat)
            path.append(tag)
        path.reverse()
        paths = torch.stack(path, 2)  # (B, k, T)
        valid = final_scores > float("-inf")
    # Scores of the returned paths (differentiable, like crf_viterbi's), -inf for the missing ranks.
    flat_paths = paths.masked_fill(~valid.unsqueeze(2), 0).reshape(batch_size * k, seq_len)
    flat_mask = mask.repeat_interleave(k, dim=0)
    scores = _gold_score(emissions.repeat_interleave(k, dim=0), flat_paths, flat_mask, transitions,
                         start_transitions, end_transitions).view(batch_size, k)
    scores = torch.where(valid, scores, float("-inf"))
    paths = paths.masked_fill(~(valid.unsqueeze(2) & mask.unsqueeze(1)), -1)
    return paths, scores.to(result_dtype)
