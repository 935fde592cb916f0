"""Linear-chain CRF: functional API, the ``CRF`` module and tagging-scheme constraints (docs/crf.rst).

For one sequence of length L with emissions ``e`` (L, K), transitions ``A[i, j]`` (score of i -> j), start
scores ``s`` and end scores ``f``, a tag path ``y`` scores
``score(y) = s[y_0] + Σ_t e[t, y_t] + Σ_{t>0} A[y_{t-1}, y_t] + f[y_{L-1}]`` and the log-likelihood is
``score(y) - logsumexp_y' score(y')``.

The functional API is batch first: emissions ``(B, T, K)`` float16/bfloat16/float32/float64, tags ``(B, T)``
int64, mask ``(B, T)`` bool or uint8, left-aligned (a prefix of ones per sequence) with the first step on.
This layer validates every argument (docs/errors.rst), writes 0 into the tags at masked positions, and calls one
internal op per function through :mod:`fusedloss._dispatch` (docs/BACKENDS.md); the op returns per-sequence
values and the reduction happens here. Checks that read tensor values (mask layout, tag range) run on CPU
tensors only, so that CUDA calls never wait for the device, and never while ``torch.compile`` traces.

``CRF`` is a drop-in replacement for ``torchcrf.CRF`` (pytorch-crf 0.7.2): same constructor, parameters,
initialization, ``forward``/``decode`` semantics, errors and state_dict, plus ``viterbi``, ``marginals`` and
``constraints``. Forbidden transitions score ``CONSTRAINT_SCORE`` (a large finite negative, AllenNLP's value:
its exp is exactly 0 in float32 and float64) so that no kernel sees -inf and nothing becomes NaN. Decoding
therefore never emits a forbidden transition unless the emissions of a path differ by more than about
``-CONSTRAINT_SCORE`` = 10⁴ from those of every allowed path.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from fusedloss import _dispatch

CONSTRAINT_SCORE = -1e4

# pytorch-crf's words; the fusedloss._C ops raise the same (csrc/crf_ops.cpp).
_FIRST_STEP_OFF = "mask of the first timestep must all be on"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("none", "sum", "mean", "token_mean")

# Scheme name (upper case) -> the AllenNLP rule set that applies.
_SCHEMES = {
    "BIO": "BIO",
    "IOB2": "BIO",
    "IOB1": "IOB1",
    "BIOES": "BIOUL",
    "BIOUL": "BIOUL",
    "BILOU": "BIOUL",
    "BMES": "BMES",
}
# Rule set -> accepted prefix letters -> the letter the rules use. BIOES spells L (last) as E and U (unit) as S.
_PREFIXES = {
    "BIO": {"B": "B", "I": "I", "O": "O"},
    "IOB1": {"B": "B", "I": "I", "O": "O"},
    "BIOUL": {"B": "B", "I": "I", "O": "O", "L": "L", "U": "U", "E": "L", "S": "U"},
    "BMES": {"B": "B", "M": "M", "E": "E", "S": "S"},
}


def _parse_label(rules: str, scheme: str, index: int, label) -> Tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", "")``; a bare prefix such as ``"B"`` has entity ``""``."""
    if not isinstance(label, str):
        raise TypeError(f"labels[{index}] must be a str, got {type(label).__name__}")
    prefixes = _PREFIXES[rules]
    prefix, rest = label[:1], label[1:]
    well_formed = prefix in prefixes and (rest == "" or (rest[:1] == "-" and len(rest) > 1 and prefix != "O"))
    if not well_formed:
        expected = " or ".join(f"'{p}'" if p == "O" else f"'{p}-<type>'" for p in prefixes)
        raise ValueError(f"labels[{index}] = {label!r} is not a {scheme} label: expected {expected}")
    return prefixes[prefix], rest[1:]


def _is_transition_allowed(rules: str, from_tag: str, from_entity: str, to_tag: str, to_entity: str) -> bool:
    """AllenNLP's ``is_transition_allowed`` (allennlp/modules/conditional_random_field.py); ``START`` and ``END``
    stand for the sequence boundaries."""
    if to_tag == "START" or from_tag == "END":
        return False
    same_entity = from_entity == to_entity
    if rules == "BIO":
        if from_tag == "START":
            return to_tag in ("O", "B")
        if to_tag == "END":
            return from_tag in ("O", "B", "I")
        # Anything may go to O or B-x; I-x only continues B-x or I-x.
        return to_tag in ("O", "B") or (to_tag == "I" and from_tag in ("B", "I") and same_entity)
    if rules == "IOB1":
        if from_tag == "START":
            return to_tag in ("O", "I")
        if to_tag == "END":
            return from_tag in ("O", "B", "I")
        # Anything may go to O or I-x; B-x only separates two adjacent entities of type x.
        return to_tag in ("O", "I") or (to_tag == "B" and from_tag in ("B", "I") and same_entity)
    if rules == "BIOUL":
        if from_tag == "START":
            return to_tag in ("O", "B", "U")
        if to_tag == "END":
            return from_tag in ("O", "L", "U")
        # Outside an entity (after O, L-x, U-x) comes O, B-y or U-y; inside (after B-x, I-x) comes I-x or L-x.
        return (from_tag in ("O", "L", "U") and to_tag in ("O", "B", "U")) or (
            from_tag in ("B", "I") and to_tag in ("I", "L") and same_entity
        )
    # BMES
    if from_tag == "START":
        return to_tag in ("B", "S")
    if to_tag == "END":
        return from_tag in ("E", "S")
    return (to_tag in ("B", "S") and from_tag in ("E", "S")) or (
        to_tag in ("M", "E") and from_tag in ("B", "M") and same_entity
    )


def allowed_transitions(scheme: str, labels: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which transitions a tagging scheme allows, with AllenNLP's rules.

    ``scheme``: ``"BIO"`` (alias ``"IOB2"``), ``"IOB1"``, ``"BIOES"`` (aliases ``"BIOUL"``, ``"BILOU"``; both
    spellings of the end and single-token prefixes, E/L and S/U, are accepted) or ``"BMES"``, in any case.
    ``labels``: the K tag names in index order, ``"O"`` or ``"<prefix>-<type>"`` such as ``"B-PER"``.

    Returns bool tensors ``(allowed (K, K), allowed_start (K,), allowed_end (K,))``: ``allowed[i, j]`` says
    whether tag j may follow tag i, ``allowed_start[j]`` whether a sequence may begin with j,
    ``allowed_end[i]`` whether it may end with i. Pass the triple as ``CRF(..., constraints=...)``.
    Unknown scheme or a label that does not fit it: ``ValueError`` naming it.
    """
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a str, got {type(scheme).__name__}")
    rules = _SCHEMES.get(scheme.upper())
    if rules is None:
        raise ValueError(f"scheme must be one of {sorted(_SCHEMES)} (any case), got {scheme!r}")
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a sequence of str, got {type(labels).__name__}")
    parsed = [_parse_label(rules, scheme, index, label) for index, label in enumerate(labels)]
    allowed = [[_is_transition_allowed(rules, *src, *dst) for dst in parsed] for src in parsed]
    allowed_start = [_is_transition_allowed(rules, "START", "", *dst) for dst in parsed]
    allowed_end = [_is_transition_allowed(rules, *src, "END", "") for src in parsed]
    num_tags = len(parsed)
    return (
        torch.tensor(allowed, dtype=torch.bool).reshape(num_tags, num_tags),
        torch.tensor(allowed_start, dtype=torch.bool).reshape(num_tags),
        torch.tensor(allowed_end, dtype=torch.bool).reshape(num_tags),
    )


def _shape(tensor: torch.Tensor) -> Tuple[int, ...]:
    return tuple(tensor.shape)


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_float(name: str, value: torch.Tensor) -> None:
    if value.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def _check_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} must be on the device of emissions ({device}), got {value.device}")


def _inspect_values(emissions: torch.Tensor) -> bool:
    """Whether checks that read tensor values run: only on CPU tensors, and never while torch.compile traces."""
    return emissions.is_cpu and not torch.compiler.is_compiling()


def _validate(
    emissions: torch.Tensor,
    tags: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check every argument (shapes, dtypes, devices, mask layout, tag range); returns ``(mask as bool, start,
    end)`` with the boundary scores in the dtype of ``transitions``."""
    _check_tensor("emissions", emissions)
    if emissions.dim() != 3:
        raise ValueError(f"emissions must be 3-D (batch, seq_len, num_tags), got shape {_shape(emissions)}")
    _check_float("emissions", emissions)
    batch_size, seq_len, num_tags = emissions.shape
    if seq_len == 0 or num_tags == 0:
        raise ValueError(f"emissions must have seq_len >= 1 and num_tags >= 1, got shape {_shape(emissions)}")
    device = emissions.device

    for name, value, shape in (
        ("transitions", transitions, (num_tags, num_tags)),
        ("start_transitions", start_transitions, (num_tags,)),
        ("end_transitions", end_transitions, (num_tags,)),
    ):
        _check_tensor(name, value)
        if _shape(value) != shape:
            raise ValueError(f"{name} must have shape {shape} (num_tags from emissions), got {_shape(value)}")
        _check_float(name, value)
        _check_device(name, value, device)

    if tags is not None:
        _check_tensor("tags", tags)
        if tags.dtype == torch.bool:
            if _shape(tags) != (batch_size, seq_len, num_tags):
                raise ValueError(
                    f"tags must have shape (batch, seq_len, num_tags) = {(batch_size, seq_len, num_tags)} like "
                    f"emissions, got {_shape(tags)}"
                )
        elif tags.dtype != torch.int64:
            raise ValueError(f"tags must be int64 (batch, seq_len) tag indices or a bool (batch, seq_len, num_tags) "
                             f"tensor of allowed tags, got {tags.dtype}")
        elif _shape(tags) != (batch_size, seq_len):
            raise ValueError(
                f"tags must have shape (batch, seq_len) = {(batch_size, seq_len)} like emissions, got {_shape(tags)}"
            )
        _check_device("tags", tags, device)

    if mask is None:
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    else:
        _check_tensor("mask", mask)
        if _shape(mask) != (batch_size, seq_len):
            raise ValueError(
                f"mask must have shape (batch, seq_len) = {(batch_size, seq_len)} like emissions, got {_shape(mask)}"
            )
        if mask.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"mask must be bool or uint8, got {mask.dtype}")
        _check_device("mask", mask, device)
        mask = mask.bool()
        if _inspect_values(emissions):
            if not bool(mask[:, 0].all()):
                raise ValueError(_FIRST_STEP_OFF)
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError("mask must be left-aligned: a prefix of ones per sequence, got a 0 followed by a 1")

    if tags is not None and tags.dtype == torch.bool and _inspect_values(emissions):
        empty = mask & ~tags.any(2)
        if bool(empty.any()):
            sequence, position = (int(i) for i in empty.nonzero()[0])
            raise ValueError("tags (allowed tag sets) must allow at least one tag at every unmasked position, got an "
                             f"empty set at sequence {sequence}, position {position}")
    elif tags is not None and _inspect_values(emissions):
        out_of_range = mask & ((tags < 0) | (tags >= num_tags))
        if bool(out_of_range.any()):
            bad = tags[out_of_range][0]
            raise ValueError(f"tags must be in [0, {num_tags}) at unmasked positions, got {int(bad)}")

    return mask, start_transitions.to(transitions.dtype), end_transitions.to(transitions.dtype)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _run(op: str, backend: str, emissions, tags, mask, transitions, start_transitions, end_transitions, *extra):
    """Resolves the backend of ``op`` and runs it; the arguments are checked once, by the op itself
    (fusedloss._C) or here. ``tags`` is None for the ops that take none; ``extra`` (k of the k-best Viterbi)
    goes last, already checked."""
    with_tags = () if tags is None else (tags,)
    # Plain tensors and parameters (which take no part in __torch_function__), outside torch.compile and torch
    # function modes: a backend whose op has an unboxed entry is called through it, skipping torch.ops.
    plain = (
        type(emissions) is torch.Tensor
        and type(transitions) in _PLAIN
        and type(start_transitions) in _PLAIN
        and type(end_transitions) in _PLAIN
        and (mask is None or type(mask) is torch.Tensor)
        and (tags is None or type(tags) is torch.Tensor)
        and type(backend) is str
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
    )
    args = (emissions, *with_tags, mask, transitions, start_transitions, end_transitions, *extra)
    key = None
    if plain:
        # What the backends' crf_*_reasons read (docs/BACKENDS.md): dtypes, K, requires_grad.
        key = (op, backend, emissions.device, torch.is_grad_enabled(), emissions.dtype, transitions.dtype,
               emissions.shape[-1] if emissions.dim() else 0, emissions.requires_grad, transitions.requires_grad,
               start_transitions.requires_grad, end_transitions.requires_grad, *extra)
        # A call like one made before: the unboxed entry found for it below.
        fast = _dispatch._RESOLVED.get((_dispatch.UNBOXED, key))
        if fast is not None:
            return fast(*args)
    elif not (
        isinstance(emissions, torch.Tensor)
        and isinstance(transitions, torch.Tensor)
        and isinstance(start_transitions, torch.Tensor)
        and isinstance(end_transitions, torch.Tensor)
        and (mask is None or isinstance(mask, torch.Tensor))
        and (tags is None or isinstance(tags, torch.Tensor))
    ):
        _validate(emissions, tags, mask, transitions, start_transitions, end_transitions)  # raises TypeError
    device = emissions.device
    try:
        if key is None:
            _, impl = _dispatch.resolve(op, backend, device, *args)
        else:
            _, impl = _dispatch.resolve_keyed(key, op, backend, device, args)
    except _dispatch.BackendUnavailable:
        _validate(emissions, tags, mask, transitions, start_transitions, end_transitions)
        raise
    if _dispatch.checks_arguments(impl):
        fast = _dispatch.unboxed(impl) if key is not None else None
        if fast is not None:
            # Remembered in the dispatcher's cache (forgotten with its decisions) for the shortcut above.
            _dispatch.remember((_dispatch.UNBOXED, key), fast)
            return fast(*args)
        return impl(*args)
    mask, start_transitions, end_transitions = _validate(
        emissions, tags, mask, transitions, start_transitions, end_transitions
    )
    if tags is not None and tags.dtype == torch.bool:
        # Past each sequence's end every tag is allowed, so that no kernel meets an empty set there.
        with_tags = (tags | ~mask.unsqueeze(2),)
    elif tags is not None:
        # Backends may index with every tag, so the (arbitrary) tags past each sequence's end become 0.
        with_tags = (tags.masked_fill(~mask, 0),)
    return impl(emissions, *with_tags, mask, transitions, start_transitions, end_transitions, *extra)


def crf_log_likelihood(
    emissions: torch.Tensor,
    tags: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "sum",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-likelihood ``score(tags) - log Z`` of each sequence, batch first.

    Shapes: emissions ``(B, T, K)``, tags ``(B, T)`` int64, transitions ``(K, K)``, start/end ``(K,)``,
    mask ``(B, T)`` bool/uint8 (None: every position on). Reductions as pytorch-crf: ``none`` -> ``(B,)``,
    ``sum``, ``mean`` (over sequences), ``token_mean`` (sum / number of unmasked positions). The dtype is
    ``promote_types(emissions.dtype, transitions.dtype)``; half types accumulate in float32. Differentiable
    w.r.t. the emissions and the three transition tensors. Tags past each sequence's end are not read.

    Partial labels: ``tags`` may instead be a bool ``(B, T, K)`` tensor, the set of tags the annotation
    allows at each position (all true: unlabeled). The log-likelihood is then the marginal over every path
    inside the sets, ``logsumexp`` of their scores minus ``log Z`` (the "fuzzy CRF" of incompletely annotated
    data); one-hot sets give exactly the ordinary log-likelihood. An empty set at an unmasked position raises
    ``ValueError`` (checked on CPU tensors).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_tensor("tags", tags)
    op = "crf_partial_log_likelihood" if tags.dtype == torch.bool else "crf_log_likelihood"
    llh = _run(op, backend, emissions, tags, mask, transitions, start_transitions, end_transitions)
    if reduction == "none":
        return llh
    if reduction == "sum":
        return llh.sum()
    if reduction == "mean":
        return llh.mean()
    if mask is not None:
        return llh.sum() / mask.float().sum()  # pytorch-crf's: float32 (or float64) for half emissions
    return llh.sum().to(torch.promote_types(llh.dtype, torch.float32)) / (emissions.shape[0] * emissions.shape[1])


def crf_viterbi(
    emissions: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    k: int = 1,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Most likely tag path of each sequence, batch first: ``(tags (B, T) int64, scores (B,))``.

    Tags are padded with -1 after each sequence's end; ``scores`` is the best path's ``score(y)`` (dtype
    ``promote_types(emissions.dtype, transitions.dtype)``). Ties go to the lowest tag index.

    ``k > 1``: the k best distinct paths, ``(paths (B, k, T), scores (B, k))`` sorted by score (``paths[:, 0]``
    is the best path). A sequence of length L has K^L paths; when that is fewer than k, the remaining ranks are
    -1 with score ``-inf``. ``exp(score - crf_log_partition(...))`` is a path's probability. Ties go to the lower
    previous tag, then its lower rank.
    """
    if type(k) is not int and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return _run("crf_viterbi", backend, emissions, None, mask, transitions, start_transitions, end_transitions)
    return _run("crf_kbest_viterbi", backend, emissions, None, mask, transitions, start_transitions,
                end_transitions, k)


def crf_log_partition(
    emissions: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``log Z = logsumexp_y score(y)`` of each sequence, ``(B,)``, batch first; differentiable w.r.t. the
    emissions and the three transition tensors (its gradient is the marginals). ``exp(score(y) - log Z)`` is
    the probability of a path, for instance of each path :func:`crf_viterbi` returns."""
    return _run("crf_log_partition", backend, emissions, None, mask, transitions, start_transitions,
                end_transitions)


def crf_marginals(
    emissions: torch.Tensor,
    transitions: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Tag posteriors ``P(y_t = k | emissions)``, ``(B, T, K)``, batch first; 0 at masked positions."""
    return _run("crf_marginals", backend, emissions, None, mask, transitions, start_transitions, end_transitions)


class CRF(nn.Module):
    """Linear-chain conditional random field, a drop-in replacement for ``torchcrf.CRF`` (pytorch-crf 0.7.2).

    Args:
        num_tags: K, the number of tags.
        batch_first: inputs are ``(batch, seq_len, ...)`` when True, ``(seq_len, batch, ...)`` otherwise.
        constraints: optional ``(allowed (K, K), allowed_start (K,), allowed_end (K,))`` bool tensors, as
            returned by :func:`allowed_transitions`; forbidden transitions score ``CONSTRAINT_SCORE`` in
            ``forward``, ``decode``, ``viterbi`` and ``marginals``. Kept as non-persistent buffers, so the
            state_dict holds the three parameters only and loads into ``torchcrf.CRF`` and back.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"`` (see the backends page).

    Parameters (pytorch-crf's names, shapes and init uniform(-0.1, 0.1)): ``start_transitions (K,)``,
    ``end_transitions (K,)``, ``transitions (K, K)`` with ``transitions[i, j]`` the score of i -> j.
    """

    def __init__(
        self,
        num_tags: int,
        batch_first: bool = False,
        *,
        constraints: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        backend: str = "auto",
    ) -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.backend = backend
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        allowed, allowed_start, allowed_end = self._check_constraints(constraints)
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("allowed_start", allowed_start, persistent=False)
        self.register_buffer("allowed_end", allowed_end, persistent=False)
        self.reset_parameters()

    def _check_constraints(self, constraints) -> Tuple[Optional[torch.Tensor], ...]:
        if constraints is None:
            return None, None, None
        if not isinstance(constraints, (tuple, list)) or len(constraints) != 3:
            raise TypeError(
                "constraints must be a tuple (allowed, allowed_start, allowed_end) as returned by "
                f"allowed_transitions, got {type(constraints).__name__}"
            )
        checked = []
        for name, value, shape in zip(
            ("allowed", "allowed_start", "allowed_end"),
            constraints,
            ((self.num_tags, self.num_tags), (self.num_tags,), (self.num_tags,)),
        ):
            _check_tensor(f"constraints ({name})", value)
            if _shape(value) != shape or value.dtype != torch.bool:
                raise ValueError(
                    f"constraints ({name}) must be a bool tensor of shape {shape}, "
                    f"got {value.dtype} of shape {_shape(value)}"
                )
            checked.append(value.clone())
        return tuple(checked)

    def reset_parameters(self) -> None:
        """Initialize the three transition parameters from uniform(-0.1, 0.1), as pytorch-crf."""
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_tags={self.num_tags})"

    def _scores(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(transitions, start, end)`` with forbidden entries at ``CONSTRAINT_SCORE`` (their gradient is 0)."""
        # Straight from the module's dicts: each attribute through nn.Module.__getattr__ cost about 0.4 us, a
        # fifth of a one-sentence decode. (A DataParallel replica holds its tensors as plain attributes instead.)
        params = self._parameters
        if self._buffers.get("allowed") is None and "transitions" in params:
            return params["transitions"], params["start_transitions"], params["end_transitions"]
        if self.allowed is None:
            return self.transitions, self.start_transitions, self.end_transitions
        return (
            torch.where(self.allowed, self.transitions, CONSTRAINT_SCORE),
            torch.where(self.allowed_start, self.start_transitions, CONSTRAINT_SCORE),
            torch.where(self.allowed_end, self.end_transitions, CONSTRAINT_SCORE),
        )

    def _validate(
        self,
        emissions: torch.Tensor,
        tags: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        """pytorch-crf's checks with its messages, in its layout; the functional API checks the rest."""
        _check_tensor("emissions", emissions)
        if emissions.dim() != 3:
            raise ValueError(f"emissions must have dimension of 3, got {emissions.dim()}")
        if emissions.size(2) != self.num_tags:
            raise ValueError(f"expected last dimension of emissions is {self.num_tags}, got {emissions.size(2)}")
        if tags is not None:
            _check_tensor("tags", tags)
            if tags.dtype == torch.bool and tags.dim() == 3:  # partial labels: allowed tag sets
                if emissions.shape != tags.shape:
                    raise ValueError(
                        "the shape of a bool tags (allowed tag sets) tensor must match emissions, "
                        f"got {tuple(emissions.shape)} and {tuple(tags.shape)}"
                    )
            elif emissions.shape[:2] != tags.shape:
                raise ValueError(
                    "the first two dimensions of emissions and tags must match, "
                    f"got {tuple(emissions.shape[:2])} and {tuple(tags.shape)}"
                )
        if mask is not None:
            _check_tensor("mask", mask)
            if emissions.shape[:2] != mask.shape:
                raise ValueError(
                    "the first two dimensions of emissions and mask must match, "
                    f"got {tuple(emissions.shape[:2])} and {tuple(mask.shape)}"
                )

    def _batch_first(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None or self.batch_first:
            return tensor
        return tensor.transpose(0, 1)

    def forward(
        self,
        emissions: torch.Tensor,
        tags: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        reduction: str = "sum",
    ) -> torch.Tensor:
        """Log-likelihood of ``tags`` given ``emissions`` (``(T, B, K)``, or ``(B, T, K)`` if batch_first);
        reductions ``none`` (``(B,)``), ``sum``, ``mean``, ``token_mean`` exactly as pytorch-crf.

        ``tags`` is ``(T, B)`` (``(B, T)``) int64, or for partial labels a bool ``(T, B, K)`` (``(B, T, K)``)
        tensor of the tags allowed at each position: the marginal log-likelihood of every path inside the sets
        (see :func:`crf_log_likelihood`)."""
        self._validate(emissions, tags=tags, mask=mask)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"invalid reduction: {reduction}")
        return crf_log_likelihood(
            self._batch_first(emissions), self._batch_first(tags), *self._scores(),
            mask=self._batch_first(mask), reduction=reduction, backend=self.backend,
        )

    def viterbi(
        self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None, k: int = 1
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Best paths as a tensor in the module's layout (``(T, B)``, or ``(B, T)`` if batch_first), padded
        with -1 after each sequence's end, and their scores ``(B,)``.

        ``k > 1``: the k best paths, ``(T, B, k)`` (``(B, k, T)`` if batch_first), and their scores ``(B, k)``,
        sorted; ranks a sequence does not have (K^L < k) are -1 with score ``-inf`` (see :func:`crf_viterbi`)."""
        self._validate(emissions, mask=mask)
        tags, scores = crf_viterbi(
            self._batch_first(emissions), *self._scores(), mask=self._batch_first(mask), k=k, backend=self.backend
        )
        if k > 1 and not self.batch_first:
            return tags.permute(2, 0, 1), scores
        return self._batch_first(tags), scores

    def log_partition(self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log Z`` of each sequence, ``(B,)``, differentiable; ``exp(score - log Z)`` of a path's score (from
        :meth:`viterbi`) is its probability."""
        self._validate(emissions, mask=mask)
        return crf_log_partition(
            self._batch_first(emissions), *self._scores(), mask=self._batch_first(mask), backend=self.backend
        )

    def decode(self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None) -> List[List[int]]:
        """Best tag path of each sequence as lists, like pytorch-crf; one device-to-host copy for the batch."""
        # The op checks every argument; pytorch-crf's checks (and their messages) run only when it raised, so
        # that a sentence's decode does not pay for them (a tenth of its time).
        # (The op's runner directly, in the batch-first layout inline: crf_viterbi's k checks and two method calls
        # were 0.5 us of a one-sentence decode's 7.)
        try:
            em, on = emissions, mask
            if not self.batch_first:
                em, on = emissions.transpose(0, 1), None if mask is None else mask.transpose(0, 1)
            tags, _ = _run("crf_viterbi", self.backend, em, None, on, *self._scores())
        except Exception:
            self._validate(emissions, mask=mask)
            raise
        # -1 pads a path after its sequence's end: a row that does not end in -1 is whole.
        return [row[: row.index(-1)] if row[-1] == -1 else row for row in tags.tolist()]

    def marginals(self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tag posteriors ``P(y_t = k)`` in the module's layout (``(T, B, K)``, or ``(B, T, K)`` if batch_first),
        0 at masked positions."""
        self._validate(emissions, mask=mask)
        marginals = crf_marginals(
            self._batch_first(emissions), *self._scores(), mask=self._batch_first(mask), backend=self.backend
        )
        return self._batch_first(marginals)
