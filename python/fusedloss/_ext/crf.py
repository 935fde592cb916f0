"""Linear-chain CRF ops on the ``fusedloss._C`` extension: the ``cpp`` backend (CPU kernels) and the ``cuda``
backend (CUDA kernels), chosen by the torch dispatcher from the tensors' device.

Arguments are batch first and already validated (docs/BACKENDS.md): emissions ``(B, T, K)``
float16/bfloat16/float32/float64, tags ``(B, T)`` int64 in [0, K), mask ``(B, T)`` bool (left-aligned,
``mask[:, 0]`` on), transitions ``(K, K)`` with ``[i, j]`` scoring i -> j, start and end transitions ``(K,)``;
constraints are already folded into the transitions as -1e4 entries. Results have the dtype
``promote_types(emissions.dtype, transitions.dtype)`` and are computed in float32 (float64 when either input
is float64). The math is in ``csrc/kernels/crf.h``:

- ``crf_log_likelihood``: ``score(tags) - log Z`` per sequence, ``(B,)``. The forward op runs the forward
  algorithm (matrix form with its underflow guard) and the gold score in one sweep and, when a gradient will be
  needed, keeps the forward variables alpha ``(B, T, K)`` in the compute dtype (normalized per step, with
  float64 offsets ``(B, T)``, so that long sequences keep float32 precision); the backward op runs the
  backward algorithm from them and produces, in the same sweep, ``grad · (gold indicators − marginals)`` for
  the emissions and the three transition tensors.
- ``crf_viterbi``: best path per sequence, tags ``(B, T)`` int64 padded with -1, and its score ``(B,)``.
- ``crf_marginals``: ``P(y_t = k)``, ``(B, T, K)``, 0 at masked positions (not differentiable).
- ``crf_partial_log_likelihood``: ``log Z_allowed − log Z`` for allowed tag sets ``(B, T, K)`` bool (emissions
  outside a set at -1e30), both recursions in one op and both sets of forward variables kept for backward, whose
  gradient is the constrained model's marginals minus the free one's; a sequence of single-tag sets takes the
  ``crf_log_likelihood`` path (the same bits).
- ``crf_log_partition``: ``log Z``, differentiable (its gradient is the marginals).
- ``crf_kbest_viterbi``: the k best paths ``(B, k, T)`` int64 (−1 past each sequence's end and for ranks past
  its K^L paths) and their scores ``(B, k)`` (−inf past K^L); ``k = 1`` is ``crf_viterbi``'s result.

The ops check their arguments themselves (csrc/crf_ops.cpp, with the messages of the public layer's checks),
and the autograd of ``crf_log_likelihood`` is registered in C++: an eager call runs no Python beyond this module's
one-line functions. Only the fake (meta) kernels are registered here, so ``torch.compile(fullgraph=True)`` traces
through the ops.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)

# The ops check every argument themselves (mask None means every position on).
CHECKS_ARGUMENTS = True

_MAX_VITERBI_TAGS = 32767  # backpointers are int16 above 256 tags
_FORWARD = "fusedloss::crf_log_likelihood_forward"
_log_likelihood_op = torch.ops.fusedloss.crf_log_likelihood.default
_viterbi_op = torch.ops.fusedloss.crf_viterbi.default
_marginals_op = torch.ops.fusedloss.crf_marginals.default
_partial_op = torch.ops.fusedloss.crf_partial_log_likelihood.default
_log_partition_op = torch.ops.fusedloss.crf_log_partition.default
_kbest_op = torch.ops.fusedloss.crf_kbest_viterbi.default
# k-best backpointers are int32 codes tag * k + rank.
_MAX_KBEST_CODES = 2**31 - 1


def _dtypes(emissions: torch.Tensor, transitions: torch.Tensor) -> Tuple[torch.dtype, torch.dtype]:
    """``(result dtype, compute dtype)``."""
    result = torch.promote_types(emissions.dtype, transitions.dtype)
    compute = torch.float64 if torch.float64 in (emissions.dtype, transitions.dtype) else torch.float32
    return result, compute


@torch.library.register_fake(_FORWARD)
def _forward_fake(emissions, tags, mask, transitions, start_transitions, end_transitions, save_for_backward):
    result, compute = _dtypes(emissions, transitions)
    batch = emissions.shape[0]
    alpha_shape = emissions.shape if save_for_backward else (0,)
    offsets_shape = emissions.shape[:2] if save_for_backward else (0,)
    return (emissions.new_empty((batch,), dtype=result), emissions.new_empty((batch,), dtype=torch.float64),
            emissions.new_empty(alpha_shape, dtype=compute), emissions.new_empty(offsets_shape, dtype=torch.float64))


@torch.library.register_fake("fusedloss::crf_log_likelihood_backward")
def _backward_fake(grad, emissions, tags, mask, transitions, start_transitions, end_transitions, log_partition,
                   alpha, alpha_offsets):
    return (torch.empty_like(emissions), torch.empty_like(transitions), torch.empty_like(start_transitions),
            torch.empty_like(end_transitions))


@torch.library.register_fake("fusedloss::crf_viterbi")
def _viterbi_fake(emissions, mask, transitions, start_transitions, end_transitions):
    result, _ = _dtypes(emissions, transitions)
    return (emissions.new_empty(emissions.shape[:2], dtype=torch.int64),
            emissions.new_empty((emissions.shape[0],), dtype=result))


@torch.library.register_fake("fusedloss::crf_marginals")
def _marginals_fake(emissions, mask, transitions, start_transitions, end_transitions):
    result, _ = _dtypes(emissions, transitions)
    return emissions.new_empty(emissions.shape, dtype=result)


@torch.library.register_fake("fusedloss::crf_log_likelihood")
def _log_likelihood_fake(emissions, tags, mask, transitions, start_transitions, end_transitions):
    result, _ = _dtypes(emissions, transitions)
    return emissions.new_empty((emissions.shape[0],), dtype=result)


def _saved_fake(emissions, transitions, save_for_backward, models):
    """The list the CPU forward keeps for backward, per model (free, then constrained): log Z (B,) float64, alpha
    (B, T, K) in the compute dtype, offsets (B, T) float64. Other devices keep nothing (they recompute)."""
    if not save_for_backward or emissions.device.type != "cpu":
        return []
    _, compute = _dtypes(emissions, transitions)
    batch, length = emissions.shape[:2]
    saved = []
    for _ in range(models):
        saved += [emissions.new_empty((batch,), dtype=torch.float64),
                  emissions.new_empty(emissions.shape, dtype=compute),
                  emissions.new_empty((batch, length), dtype=torch.float64)]
    return saved


def _value_fake(emissions, transitions):
    result, _ = _dtypes(emissions, transitions)
    return emissions.new_empty((emissions.shape[0],), dtype=result)


def _gradients_fake(emissions, transitions, start_transitions, end_transitions):
    return (torch.empty_like(emissions), torch.empty_like(transitions), torch.empty_like(start_transitions),
            torch.empty_like(end_transitions))


@torch.library.register_fake("fusedloss::crf_partial_log_likelihood_forward")
def _partial_forward_fake(emissions, allowed, mask, transitions, start_transitions, end_transitions,
                          save_for_backward):
    return _value_fake(emissions, transitions), _saved_fake(emissions, transitions, save_for_backward, 2)


@torch.library.register_fake("fusedloss::crf_partial_log_likelihood_backward")
def _partial_backward_fake(grad, emissions, allowed, mask, transitions, start_transitions, end_transitions, saved):
    return _gradients_fake(emissions, transitions, start_transitions, end_transitions)


@torch.library.register_fake("fusedloss::crf_log_partition_forward")
def _log_partition_forward_fake(emissions, mask, transitions, start_transitions, end_transitions,
                                save_for_backward):
    return _value_fake(emissions, transitions), _saved_fake(emissions, transitions, save_for_backward, 1)


@torch.library.register_fake("fusedloss::crf_log_partition_backward")
def _log_partition_backward_fake(grad, emissions, mask, transitions, start_transitions, end_transitions, saved):
    return _gradients_fake(emissions, transitions, start_transitions, end_transitions)


@torch.library.register_fake("fusedloss::crf_kbest_viterbi")
def _kbest_fake(emissions, mask, transitions, start_transitions, end_transitions, k):
    result, _ = _dtypes(emissions, transitions)
    batch, length = emissions.shape[:2]
    return (emissions.new_empty((batch, k, length), dtype=torch.int64),
            emissions.new_empty((batch, k), dtype=result))


@torch.library.register_fake("fusedloss::crf_partial_log_likelihood")
def _partial_fake(emissions, allowed, mask, transitions, start_transitions, end_transitions):
    return _value_fake(emissions, transitions)


@torch.library.register_fake("fusedloss::crf_log_partition")
def _log_partition_fake(emissions, mask, transitions, start_transitions, end_transitions):
    return _value_fake(emissions, transitions)


# Per-sequence log-likelihood score(tags) − log Z, (B,), differentiable w.r.t. the emissions and the three
# transition tensors (hand-written backward, autograd in C++); mask None: every position on. The op of
# docs/BACKENDS.md is the C++ op itself: no Python frame between the public function and it.
crf_log_likelihood = _log_likelihood_op


def _ones_if_none(mask, emissions: torch.Tensor) -> torch.Tensor:
    return torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device) if mask is None else mask


def crf_viterbi(emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor,
                start_transitions: torch.Tensor, end_transitions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best tag path per sequence and its score: ``(tags (B, T) int64 padded with −1, scores (B,))``; ties go
    to the lowest tag index."""
    return _viterbi_op(emissions, _ones_if_none(mask, emissions), transitions, start_transitions, end_transitions)


# The same op through the dispatcher's unboxed entry (fusedloss._C.crf_viterbi, mask None as here), for plain
# tensors outside torch.compile and torch function modes (fusedloss._dispatch.unboxed).
crf_viterbi_unboxed = fusedloss._C.crf_viterbi


def crf_marginals(emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor,
                  start_transitions: torch.Tensor, end_transitions: torch.Tensor) -> torch.Tensor:
    """Tag posteriors ``P(y_t = k | emissions)``, ``(B, T, K)``, 0 at masked positions."""
    return _marginals_op(emissions, _ones_if_none(mask, emissions), transitions, start_transitions, end_transitions)


def crf_log_likelihood_reasons(emissions, tags, mask, transitions, start_transitions, end_transitions) -> List[str]:
    """Why the extension's kernels cannot serve this call (empty when they can; bad arguments are not reasons:
    the op raises for them)."""
    return []


def crf_viterbi_reasons(emissions, mask, transitions, start_transitions, end_transitions) -> List[str]:
    """Why the extension's kernels cannot serve this call (empty when they can)."""
    if isinstance(emissions, torch.Tensor) and emissions.dim() == 3 and emissions.shape[2] > _MAX_VITERBI_TAGS:
        return [f"Viterbi backpointers are int16: at most {_MAX_VITERBI_TAGS} tags, got {emissions.shape[2]}"]
    return []


def crf_marginals_reasons(emissions, mask, transitions, start_transitions, end_transitions) -> List[str]:
    """Why the extension's kernels cannot serve this call (empty when they can)."""
    if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad
            for x in (emissions, transitions, start_transitions, end_transitions)):
        return ["marginals are not differentiable here (an input requires grad)"]
    return []


def crf_partial_log_likelihood(emissions: torch.Tensor, allowed: torch.Tensor, mask, transitions: torch.Tensor,
                               start_transitions: torch.Tensor, end_transitions: torch.Tensor) -> torch.Tensor:
    """Partial-label log-likelihood ``log Z_allowed − log Z`` per sequence, ``(B,)``, for allowed tag sets
    ``(B, T, K)`` bool; differentiable w.r.t. the emissions and the three transition tensors. mask None: all on."""
    return _partial_op(emissions, allowed, mask, transitions, start_transitions, end_transitions)


def crf_log_partition(emissions: torch.Tensor, mask, transitions: torch.Tensor, start_transitions: torch.Tensor,
                      end_transitions: torch.Tensor) -> torch.Tensor:
    """``log Z`` per sequence, ``(B,)``, differentiable w.r.t. the emissions and the three transition tensors."""
    return _log_partition_op(emissions, mask, transitions, start_transitions, end_transitions)


def crf_kbest_viterbi(emissions: torch.Tensor, mask, transitions: torch.Tensor, start_transitions: torch.Tensor,
                      end_transitions: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best tag paths per sequence and their scores: ``(paths (B, k, T) int64, scores (B, k))``, paths
    padded with −1 (entirely for ranks past the sequence's K^L paths, whose scores are −inf)."""
    return _kbest_op(emissions, _ones_if_none(mask, emissions), transitions, start_transitions, end_transitions, k)


def crf_partial_log_likelihood_reasons(emissions, allowed, mask, transitions, start_transitions,
                                       end_transitions) -> List[str]:
    """Why the extension's kernels cannot serve this call (empty when they can)."""
    return []


def crf_log_partition_reasons(emissions, mask, transitions, start_transitions, end_transitions) -> List[str]:
    """Why the extension's kernels cannot serve this call (empty when they can)."""
    return []


def crf_kbest_viterbi_reasons(emissions, mask, transitions, start_transitions, end_transitions, k) -> List[str]:
    """Why the extension's kernels cannot serve this call (empty when they can)."""
    if (isinstance(emissions, torch.Tensor) and emissions.dim() == 3 and isinstance(k, int) and k >= 1
            and emissions.shape[2] * k > _MAX_KBEST_CODES):
        return [f"k-best backpointers are int32 (tag * k + rank): num_tags * k must be at most {_MAX_KBEST_CODES}, "
                f"got {emissions.shape[2]} * {k}"]
    return []
