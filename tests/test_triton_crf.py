"""Triton CRF kernels (triton_kernels/crf.py) under TRITON_INTERPRET=1, against oracles nobody here wrote.

Oracles: pytorch-crf (``torchcrf.CRF``) run in float64 for the log-likelihood, its gradients and the Viterbi
tags; ``fusedloss.reference.crf`` in float64 for Viterbi scores and marginals; brute-force enumeration of every
tag path for marginals. Tolerances: the kernel's error against the float64 oracle may be at
most twice the error of PyTorch's own computation at the test's dtype (pytorch-crf or the reference run on the
same inputs), plus a few units in the last place of the result's magnitude so that an exact baseline does not
demand an exact kernel, and for probabilities and gradients one rounding of the emissions' magnitude (see
``assert_within_oracle_error``).

Shapes are tiny (the interpreter is slow) but reach every branch: K = 1, T = 1, ragged masks, a K split into
tiles (forced through the launcher's ``block_k``), the batch tile that runs the step as a ``tl.dot`` (``block_b = 16``),
a partial batch tile, and the underflow guard of the matrix-form step (large emissions with forbidden
transitions).
"""

import itertools

import pytest
import torch
import torchcrf

import fusedloss
from _backends import require_backend_for_module
from fusedloss.reference import crf as reference

# The kernels' modules import triton: without a usable Triton backend the module is skipped, and in CI fails
# (tests/_backends.py).
require_backend_for_module("triton")

from fusedloss.triton_kernels import crf as triton_crf  # noqa: E402

CONSTRAINT_SCORE = -1.0e4  # docs/BACKENDS.md: forbidden transitions as folded in by the public layer

# (B, T, K, block_b, block_k): None takes the launcher's default tiling.
CASES = [
    pytest.param(3, 4, 5, None, None, id="ragged-one-tile"),
    pytest.param(2, 1, 5, None, None, id="T1"),
    pytest.param(3, 3, 1, None, None, id="K1"),
    pytest.param(2, 3, 5, 1, 4, id="K-tiled"),
    pytest.param(17, 3, 20, 16, 16, id="dot-tile-K-tiled-partial-batch"),
]


def make_inputs(batch, seq_len, num_tags, seed=0, scale=1.0, constrained=False):
    """Random emissions and transition scores, ragged left-aligned mask (the first sequence is full), tags that
    are 0 past each end (as the public layer writes them)."""
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, seq_len, num_tags, generator=generator) * scale
    transitions = torch.randn(num_tags, num_tags, generator=generator)
    start = torch.randn(num_tags, generator=generator)
    end = torch.randn(num_tags, generator=generator)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    tags = torch.randint(0, num_tags, (batch, seq_len), generator=generator) * mask
    if constrained:
        # A chain: tag j is reached only from j and j - 1 (like I-X only after B-X or I-X), and only tag 0
        # starts. With emissions in the hundreds the best predecessor of a column is then often far below the
        # row max, which underflows the matrix-form step; gold tags follow the allowed moves.
        tags_range = torch.arange(num_tags)
        allowed = (tags_range[:, None] == tags_range[None, :]) | (tags_range[:, None] + 1 == tags_range[None, :])
        transitions = torch.where(allowed, transitions, CONSTRAINT_SCORE)
        start = torch.where(tags_range == 0, start, CONSTRAINT_SCORE)
        steps = torch.randint(0, 2, (batch, seq_len), generator=generator)
        steps[:, 0] = 0
        tags = torch.clamp(steps.cumsum(1), max=num_tags - 1) * mask
    return emissions, tags, mask, transitions, start, end


def eps(dtype):
    return torch.finfo(dtype).eps


def assert_within_oracle_error(actual, baseline, exact, what, log_magnitude=0.0):
    """``|actual - exact| <= 2 |baseline - exact| + (4 + log_magnitude) eps(actual.dtype) max(1, |exact|)``
    (max norms).

    ``log_magnitude`` is for probabilities and gradients: ``exp`` of a log-domain quantity of size M (the
    emissions) carries a relative error of about eps·M in any float32 implementation, one rounding of a number
    that size, and two implementations differ element by element in where they pay it, so one such rounding
    is allowed on top of twice PyTorch's own error.
    """
    exact = exact.detach().double()
    error = (actual.detach().double() - exact).abs().max().item()
    baseline_error = (baseline.detach().double() - exact).abs().max().item()
    floor = (4 + float(log_magnitude)) * eps(actual.dtype) * max(1.0, exact.abs().max().item())
    assert error <= 2 * baseline_error + floor, (
        f"{what}: error {error:.3g} against float64, PyTorch's own {baseline_error:.3g}, floor {floor:.3g}"
    )


def torchcrf_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output):
    """pytorch-crf's per-sequence log-likelihood and the gradients of ``Σ_b grad_output[b] ll[b]``, computed in
    the dtype of ``transitions``."""
    num_tags = transitions.size(0)
    model = torchcrf.CRF(num_tags, batch_first=True).to(transitions.dtype)
    with torch.no_grad():
        model.transitions.copy_(transitions)
        model.start_transitions.copy_(start)
        model.end_transitions.copy_(end)
    emissions = emissions.detach().to(transitions.dtype).requires_grad_()
    ll = model(emissions, tags, mask, reduction="none")
    (ll * grad_output.to(ll.dtype)).sum().backward()
    leaves = (emissions, model.transitions, model.start_transitions, model.end_transitions)
    # With T = 1 no transition is used and autograd leaves its gradient as None.
    return ll.detach(), tuple(torch.zeros_like(x) if x.grad is None else x.grad for x in leaves)


def triton_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output, block_b=None, block_k=None):
    """The custom op's per-sequence log-likelihood and its gradients through the registered autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    ll = triton_crf._log_likelihood_op(leaves[0], tags, mask, *leaves[1:], block_b, block_k)[0]
    (ll * grad_output.to(ll.dtype)).sum().backward()
    return ll.detach(), tuple(x.grad for x in leaves)


GRAD_NAMES = ("emissions", "transitions", "start_transitions", "end_transitions")


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", CASES)
def test_log_likelihood_and_gradients_match_pytorch_crf(batch, seq_len, num_tags, block_b, block_k):
    emissions, tags, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags)
    grad_output = torch.randn(batch, generator=torch.Generator().manual_seed(1))
    ll, grads = triton_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output, block_b, block_k)
    ll32, grads32 = torchcrf_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output)
    ll64, grads64 = torchcrf_log_likelihood(emissions, tags, mask, transitions.double(), start.double(),
                                            end.double(), grad_output)
    assert ll.dtype == torch.float32 and ll.shape == (batch,)
    assert_within_oracle_error(ll, ll32, ll64, "log-likelihood")
    for name, grad, grad32, grad64 in zip(GRAD_NAMES, grads, grads32, grads64):
        assert grad.dtype == torch.float32
        assert_within_oracle_error(grad, grad32, grad64, f"grad of {name}", emissions.abs().max())
    # Nothing past a sequence's end gets a gradient.
    assert torch.all(grads[0][~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_emissions_accumulate_in_float32(dtype):
    emissions, tags, mask, transitions, start, end = make_inputs(3, 4, 5, seed=2)
    emissions = emissions.to(dtype)
    grad_output = torch.randn(3, generator=torch.Generator().manual_seed(3))
    ll, grads = triton_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output)
    assert ll.dtype == torch.float32 and grads[0].dtype == dtype
    # PyTorch's own computation at this dtype: the reference on the same half emissions (float32 arithmetic,
    # gradient rounded to the emissions' dtype).
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    ll_half = reference.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:])
    (ll_half * grad_output).sum().backward()
    ll64, grads64 = torchcrf_log_likelihood(emissions, tags, mask, transitions.double(), start.double(),
                                            end.double(), grad_output)
    assert_within_oracle_error(ll, ll_half, ll64, "log-likelihood")
    for name, grad, leaf, grad64 in zip(GRAD_NAMES, grads, leaves, grads64):
        assert_within_oracle_error(grad, leaf.grad, grad64, f"grad of {name}", emissions.abs().max())


@pytest.mark.parametrize("block_b, block_k, num_tags", [(None, None, 5), (16, 16, 20)], ids=["default", "dot"])
def test_underflow_guard_keeps_large_emissions_exact(block_b, block_k, num_tags):
    """Emissions in the hundreds with forbidden transitions: without the exact fallback of the matrix-form step
    log Z is -inf or inf here (checked by disabling the guard)."""
    batch = 2 if block_b is None else 16
    emissions, tags, mask, transitions, start, end = make_inputs(batch, 4, num_tags, seed=4, scale=100.0,
                                                                 constrained=True)
    grad_output = torch.ones(batch)
    ll, grads = triton_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output, block_b, block_k)
    ll32, grads32 = torchcrf_log_likelihood(emissions, tags, mask, transitions, start, end, grad_output)
    ll64, grads64 = torchcrf_log_likelihood(emissions, tags, mask, transitions.double(), start.double(),
                                            end.double(), grad_output)
    assert torch.isfinite(ll).all() and all(torch.isfinite(g).all() for g in grads)
    assert_within_oracle_error(ll, ll32, ll64, "log-likelihood")
    for name, grad, grad32, grad64 in zip(GRAD_NAMES, grads, grads32, grads64):
        assert_within_oracle_error(grad, grad32, grad64, f"grad of {name}", emissions.abs().max())
    marginals = triton_crf._marginals_op(emissions, mask, transitions, start, end, block_b, block_k)
    marginals32 = reference.crf_marginals(emissions, mask, transitions, start, end)
    marginals64 = reference.crf_marginals(emissions.double(), mask, transitions.double(), start.double(),
                                          end.double())
    assert_within_oracle_error(marginals, marginals32, marginals64, "marginals", emissions.abs().max())


def brute_force_marginals(emissions, length, transitions, start, end):
    """``P(y_t = k)`` (length, K) of one sequence by enumerating all K^length tag paths, float64."""
    num_tags = transitions.size(0)
    paths = torch.tensor(list(itertools.product(range(num_tags), repeat=length)))
    scores = start[paths[:, 0]] + end[paths[:, -1]] + emissions[torch.arange(length), paths].sum(1)
    scores = scores + transitions[paths[:, :-1], paths[:, 1:]].sum(1)
    probabilities = torch.softmax(scores, 0)
    return torch.stack([torch.zeros(num_tags, dtype=torch.float64).index_add_(0, paths[:, t], probabilities)
                        for t in range(length)])


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", CASES)
def test_marginals_match_brute_force_and_reference(batch, seq_len, num_tags, block_b, block_k):
    emissions, _, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=5)
    marginals = triton_crf._marginals_op(emissions, mask, transitions, start, end, block_b, block_k)
    marginals32 = reference.crf_marginals(emissions, mask, transitions, start, end)
    args64 = [x.double() for x in (emissions, transitions, start, end)]
    marginals64 = reference.crf_marginals(args64[0], mask, *args64[1:])
    assert marginals.shape == (batch, seq_len, num_tags) and marginals.dtype == torch.float32
    assert_within_oracle_error(marginals, marginals32, marginals64, "marginals", emissions.abs().max())
    assert torch.all(marginals[~mask] == 0)
    if num_tags ** seq_len <= 1024:  # enumeration stays cheap: check the first two sequences against it
        for b in range(min(batch, 2)):
            length = int(mask[b].sum())
            exact = brute_force_marginals(args64[0][b], length, *args64[1:])
            assert_within_oracle_error(marginals[b, :length], marginals32[b, :length], exact, f"marginals[{b}]",
                                       emissions.abs().max())


def torchcrf_decode(emissions, mask, transitions, start, end):
    model = torchcrf.CRF(transitions.size(0), batch_first=True).double()
    with torch.no_grad():
        model.transitions.copy_(transitions)
        model.start_transitions.copy_(start)
        model.end_transitions.copy_(end)
    return model.decode(emissions.double(), mask)


VITERBI_CASES = CASES + [
    pytest.param(2, 3, 130, None, None, id="uint8-backpointers"),
    pytest.param(1, 2, 300, None, 128, id="int16-backpointers"),
]


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", VITERBI_CASES)
def test_viterbi_matches_pytorch_crf_and_reference(batch, seq_len, num_tags, block_b, block_k):
    emissions, _, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=6)
    tags, scores = triton_crf._viterbi_op(emissions, mask, transitions, start, end, block_b, block_k)
    assert tags.dtype == torch.int64 and tags.shape == (batch, seq_len)
    assert scores.dtype == torch.float32 and scores.shape == (batch,)
    expected = torchcrf_decode(emissions, mask, transitions, start, end)
    assert [row[row >= 0].tolist() for row in tags] == expected
    assert torch.all(tags[~mask] == -1)
    _, scores32 = reference.crf_viterbi(emissions, mask, transitions, start, end)
    _, scores64 = reference.crf_viterbi(emissions.double(), mask, transitions.double(), start.double(), end.double())
    assert_within_oracle_error(scores, scores32, scores64, "Viterbi scores")


@pytest.mark.parametrize("block_k", [None, 2], ids=["one-tile", "tiled"])
def test_viterbi_ties_take_the_lowest_tag(block_k):
    """All paths score the same: torch.argmax's convention picks tag 0 everywhere, across tiles too."""
    emissions = torch.zeros(2, 3, 5)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    zeros = torch.zeros(5)
    tags, scores = triton_crf._viterbi_op(emissions, mask, torch.zeros(5, 5), zeros, zeros, None, block_k)
    assert tags.tolist() == [[0, 0, 0], [0, 0, -1]]
    assert scores.tolist() == [0.0, 0.0]


def test_nan_stays_in_its_sequence_and_masked_positions_are_never_read():
    """NaN propagates to what it affects and no further: a NaN emission at an unmasked position poisons its own
    sequence's values and emission gradients (and the shared transition gradients), nothing of the other sequences;
    one past a sequence's end changes nothing at all."""
    emissions, tags, mask, transitions, start, end = make_inputs(3, 3, 4, seed=13)
    mask[1, 2] = False
    clean = emissions.clone()
    clean_ll, clean_grads = triton_log_likelihood(clean, tags, mask, transitions, start, end, torch.ones(3))
    emissions[1, 2, 0] = float("nan")  # masked
    emissions[2, 1, 3] = float("nan")  # unmasked
    ll, grads = triton_log_likelihood(emissions, tags, mask, transitions, start, end, torch.ones(3))
    assert torch.isnan(ll[2]) and torch.equal(ll[:2], clean_ll[:2])
    assert torch.isnan(grads[0][2]).any() and torch.equal(grads[0][:2], clean_grads[0][:2])
    tags_out, scores = triton_crf._viterbi_op(emissions, mask, transitions, start, end, None, None)
    marginals = triton_crf._marginals_op(emissions, mask, transitions, start, end, None, None)
    clean_tags, clean_scores = triton_crf._viterbi_op(clean, mask, transitions, start, end, None, None)
    clean_marginals = triton_crf._marginals_op(clean, mask, transitions, start, end, None, None)
    assert torch.equal(tags_out[:2], clean_tags[:2]) and torch.equal(scores[:2], clean_scores[:2])
    assert torch.isnan(marginals[2]).any()
    assert torch.equal(marginals[:2], clean_marginals[:2])


@pytest.mark.parametrize("block_k", [None, 2], ids=["one-tile", "tiled"])
def test_viterbi_score_of_a_sequence_with_a_nan_is_nan(block_k):
    """tl.max skips NaN: the kernel flags a NaN that reaches a sequence's scores itself. A NaN emission at a masked
    step is never read; a NaN in start, end or the transitions makes every sequence's score NaN (the transitions
    only where a sequence has a second step), as in the reference."""
    emissions, tags, mask, transitions, start, end = make_inputs(4, 3, 4, seed=13)
    mask[3, 1:] = False
    emissions[2, 1, 3] = float("nan")
    emissions[3, 2, 0] = float("nan")  # masked
    cases = [(emissions, transitions, start, end, [False, False, True, False])]
    # sequence 3 has one step: it takes no transition
    for name, expected in (("transitions", [True, True, True, False]), ("start", [True] * 4), ("end", [True] * 4)):
        poisoned = {"transitions": transitions.clone(), "start": start.clone(), "end": end.clone()}
        poisoned[name].view(-1)[1] = float("nan")
        cases.append((emissions, poisoned["transitions"], poisoned["start"], poisoned["end"], expected))
    for e, a, s, z, expected_nan in cases:
        _, scores = triton_crf._viterbi_op(e, mask, a, s, z, None, block_k)
        _, reference_scores = reference.crf_viterbi(e.double(), mask, a.double(), s.double(), z.double())
        assert reference_scores.isnan().tolist() == expected_nan
        assert scores.isnan().tolist() == expected_nan


# ------------------------------------------ values the public layer does not check on CUDA tensors (docs/crf.rst)

# The ops are called directly, as the public layer calls them on CUDA tensors, where it reads no mask or tag value
# (that would wait for the device): an all-off mask and a tag outside [0, K) get the documented values, and every
# other sequence is bit for bit what a clean run gives it. Sequence 1 is the bad one; in the dot tile it shares a
# tile with fifteen good ones.
UNCHECKED_CASES = [
    pytest.param(4, 3, 5, None, None, id="one-tile"),
    pytest.param(4, 3, 5, 1, 2, id="K-tiled"),
    pytest.param(17, 3, 20, 16, 16, id="dot-tile-partial-batch"),
]
BAD = 1


def with_arbitrary_tags_past_the_end(tags, mask, num_tags):
    """``tags`` with values outside [0, K) past each sequence's end (-100 and K + 3), which a direct call may pass
    (the public layer writes 0 there): they must never be read as tags."""
    junk = torch.where(torch.arange(tags.size(1)) % 2 == 0, -100, num_tags + 3).expand_as(tags)
    return torch.where(mask, tags, junk)


def assert_other_sequences_exact(ll, grads, clean_ll, clean_grads):
    """The bad sequence's log-likelihood is NaN and its emission gradient zero; every other value, the summed
    transition gradients included, equals the clean run's bit for bit (the clean run gives the bad sequence
    grad_output 0, so it adds exactly zero to the sums too)."""
    others = torch.arange(ll.size(0)) != BAD
    assert torch.isnan(ll[BAD]) and torch.equal(ll[others], clean_ll[others])
    assert torch.equal(grads[0][BAD], torch.zeros_like(grads[0][BAD]))
    for name, grad, clean in zip(GRAD_NAMES, grads, clean_grads):
        assert torch.equal(grad, clean), f"grad of {name}"  # == compares values: -0.0 == 0.0


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", UNCHECKED_CASES)
def test_an_all_off_mask_gives_nan_and_leaves_the_other_sequences_exact(batch, seq_len, num_tags, block_b, block_k):
    """Length 0: NaN log-likelihood with a zero gradient, NaN marginals at every position, a path of -1 and a NaN
    score; the kernels read no tag of it (there is none: tags[-1] would be the previous sequence's)."""
    emissions, tags, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=21)
    bad_mask = mask.clone()
    bad_mask[BAD] = False
    bad_tags = with_arbitrary_tags_past_the_end(tags, bad_mask, num_tags)
    clean_grad_output = torch.ones(batch)
    clean_grad_output[BAD] = 0.0
    ll, grads = triton_log_likelihood(emissions, bad_tags, bad_mask, transitions, start, end, torch.ones(batch),
                                      block_b, block_k)
    clean_ll, clean_grads = triton_log_likelihood(emissions, tags, mask, transitions, start, end, clean_grad_output,
                                                  block_b, block_k)
    assert_other_sequences_exact(ll, grads, clean_ll, clean_grads)

    others = torch.arange(batch) != BAD
    paths, scores = triton_crf._viterbi_op(emissions, bad_mask, transitions, start, end, block_b, block_k)
    clean_paths, clean_scores = triton_crf._viterbi_op(emissions, mask, transitions, start, end, block_b, block_k)
    assert paths[BAD].tolist() == [-1] * seq_len and torch.isnan(scores[BAD])
    assert torch.equal(paths[others], clean_paths[others]) and torch.equal(scores[others], clean_scores[others])
    marginals = triton_crf._marginals_op(emissions, bad_mask, transitions, start, end, block_b, block_k)
    clean_marginals = triton_crf._marginals_op(emissions, mask, transitions, start, end, block_b, block_k)
    assert torch.isnan(marginals[BAD]).all()
    assert torch.equal(marginals[others], clean_marginals[others])


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", UNCHECKED_CASES)
@pytest.mark.parametrize("position, value", [(0, "-1"), (1, "K"), (2, "2**40")], ids=["first", "middle", "last"])
def test_a_tag_out_of_range_gives_nan_and_leaves_the_other_sequences_exact(batch, seq_len, num_tags, block_b, block_k,
                                                                           position, value):
    """A tag outside [0, K) at the first, a middle or the last step: NaN log-likelihood and a zero gradient for its
    sequence (nothing of it in the transition gradients), and it indexes nothing (2**40 would be far out of any
    buffer)."""
    emissions, tags, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=22)
    mask[BAD] = True  # three steps: the last is position 2
    tags[BAD] = torch.randint(0, num_tags, (seq_len,), generator=torch.Generator().manual_seed(23))
    bad_tags = with_arbitrary_tags_past_the_end(tags, mask, num_tags)
    bad_tags[BAD, position] = {"-1": -1, "K": num_tags, "2**40": 2 ** 40}[value]
    clean_grad_output = torch.ones(batch)
    clean_grad_output[BAD] = 0.0
    ll, grads = triton_log_likelihood(emissions, bad_tags, mask, transitions, start, end, torch.ones(batch),
                                      block_b, block_k)
    clean_ll, clean_grads = triton_log_likelihood(emissions, tags, mask, transitions, start, end, clean_grad_output,
                                                  block_b, block_k)
    assert_other_sequences_exact(ll, grads, clean_ll, clean_grads)


def test_float64_is_declined_with_reasons():
    emissions, tags, mask, transitions, start, end = make_inputs(2, 2, 3)
    assert triton_crf.crf_log_likelihood_reasons(emissions, tags, mask, transitions, start, end) == []
    reasons = triton_crf.crf_viterbi_reasons(emissions.double(), mask, transitions, start, end)
    assert len(reasons) == 1 and "float64" in reasons[0] and "emissions" in reasons[0]
    reasons = triton_crf.crf_marginals_reasons(emissions, mask, transitions.double(), start, end)
    assert len(reasons) == 1 and "transitions" in reasons[0]


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and the registered autograd agree with the real kernels (the
    compiled path itself is tested through the public module below)."""
    emissions, tags, mask, transitions, start, end = make_inputs(2, 2, 3, seed=7)
    leaves = [x.requires_grad_() for x in (emissions, transitions, start, end)]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(triton_crf._log_likelihood_op, (leaves[0], tags, mask, *leaves[1:], None, None),
                          test_utils=checks)
    plain = [x.detach() for x in leaves]
    torch.library.opcheck(triton_crf._viterbi_op, (plain[0], mask, *plain[1:], None, None), test_utils=checks)
    torch.library.opcheck(triton_crf._marginals_op, (plain[0], mask, *plain[1:], None, None), test_utils=checks)


# ------------------------------------------------------------------ through the public module (fusedloss.CRF)


def paired_models(num_tags, batch_first, dtype, seed=8):
    """A ``fusedloss.CRF`` on the triton backend and a ``torchcrf.CRF`` in ``dtype`` with the same parameters
    (loaded through the state_dict: the two modules have the same parameter names and shapes)."""
    torch.manual_seed(seed)
    ours = fusedloss.CRF(num_tags, batch_first=batch_first, backend="triton")
    theirs = torchcrf.CRF(num_tags, batch_first=batch_first)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs.to(dtype)


@pytest.mark.parametrize("batch_first, reduction", [(True, "token_mean"), (False, "mean")])
def test_public_crf_module_matches_pytorch_crf(batch_first, reduction):
    emissions, tags, mask, _, _, _ = make_inputs(3, 4, 5, seed=9)
    if not batch_first:
        emissions, tags, mask = emissions.transpose(0, 1), tags.transpose(0, 1), mask.transpose(0, 1)
    ours, theirs32 = paired_models(5, batch_first, torch.float32)
    _, theirs64 = paired_models(5, batch_first, torch.float64)
    results = []
    for model, dtype in ((ours, torch.float32), (theirs32, torch.float32), (theirs64, torch.float64)):
        leaf = emissions.detach().to(dtype).clone().requires_grad_()
        loss = model(leaf, tags, mask, reduction=reduction)
        loss.backward()
        grads = [leaf.grad] + [getattr(model, name).grad for name in GRAD_NAMES[1:]]
        results.append((loss.detach(), grads))
    (loss, grads), (loss32, grads32), (loss64, grads64) = results
    assert_within_oracle_error(loss, loss32, loss64, f"{reduction} log-likelihood")
    for name, grad, grad32, grad64 in zip(GRAD_NAMES, grads, grads32, grads64):
        assert_within_oracle_error(grad, grad32, grad64, f"grad of {name}", emissions.abs().max())
    assert ours.decode(emissions, mask) == theirs64.decode(emissions.double(), mask)


def test_public_crf_with_bio_constraints_matches_reference():
    """Constraints from fusedloss.allowed_transitions reach the kernels as -1e4 entries: the log-likelihood,
    its gradients, the Viterbi path (which must respect them) and the marginals agree with the reference."""
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    constraints = fusedloss.allowed_transitions("BIO", labels)
    emissions, _, mask, _, _, _ = make_inputs(3, 4, 5, seed=10, scale=3.0)
    tags = torch.tensor([[1, 2, 0, 3], [3, 4, 4, 0], [0, 1, 0, 0]]) * mask
    outputs = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        torch.manual_seed(11)
        model = fusedloss.CRF(5, batch_first=True, constraints=constraints, backend=backend).to(dtype)
        leaf = emissions.detach().to(dtype).clone().requires_grad_()
        model(leaf, tags, mask, reduction="sum").backward()
        grads = [leaf.grad] + [getattr(model, name).grad for name in GRAD_NAMES[1:]]
        with torch.no_grad():
            loss = model(leaf, tags, mask, reduction="none")
            path, path_score = model.viterbi(leaf, mask)
            marginals = model.marginals(leaf, mask)
        outputs[backend, dtype] = (loss, grads, path, path_score, marginals)
    ours, baseline, exact = outputs["triton", torch.float32], outputs["reference", torch.float32], \
        outputs["reference", torch.float64]
    assert_within_oracle_error(ours[0], baseline[0], exact[0], "log-likelihood")
    for name, grad, grad32, grad64 in zip(GRAD_NAMES, ours[1], baseline[1], exact[1]):
        assert torch.isfinite(grad).all()
        assert_within_oracle_error(grad, grad32, grad64, f"grad of {name}", emissions.abs().max())
    assert torch.equal(ours[2], exact[2])
    allowed, allowed_start, allowed_end = constraints
    for row in ours[2]:
        path = row[row >= 0]
        assert allowed_start[path[0]] and allowed_end[path[-1]] and allowed[path[:-1], path[1:]].all()
    assert_within_oracle_error(ours[3], baseline[3], exact[3], "Viterbi scores")
    assert_within_oracle_error(ours[4], baseline[4], exact[4], "marginals", emissions.abs().max())


def test_torch_compile_fullgraph_of_a_tagger_with_crf():
    """A model with fusedloss.CRF(backend="triton") compiles without graph breaks (fullgraph=True raises on
    one) and gives the eager loss and gradients. aot_eager runs Dynamo and AOT autograd over the custom ops'
    fake and autograd registrations like Inductor does, without its C++ code generation for the Linear (tens
    of seconds on this CPU)."""

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = torch.nn.Linear(6, 4)
            self.crf = fusedloss.CRF(4, batch_first=True, backend="triton")

        def forward(self, features, tags, mask):
            return -self.crf(self.projection(features), tags, mask, reduction="mean")

    torch.manual_seed(12)
    model = Tagger()
    features = torch.randn(2, 3, 6)
    tags = torch.randint(0, 4, (2, 3))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    eager_loss = model(features, tags, mask)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss = torch.compile(model, fullgraph=True, backend="aot_eager")(features, tags, mask)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=0)
    for eager_grad, parameter in zip(eager_grads, model.parameters()):
        torch.testing.assert_close(parameter.grad, eager_grad, rtol=0, atol=0)


def test_marginals_that_autograd_would_differentiate_are_declined():
    """The marginals kernel has no backward: with an input that requires grad it declines (auto then takes the
    reference) instead of returning a tensor without a gradient."""
    emissions, tags, mask, transitions, start, end = make_inputs(2, 3, 4, seed=3)
    assert triton_crf.crf_marginals_reasons(emissions, mask, transitions, start, end) == []
    emissions.requires_grad_()
    reasons = triton_crf.crf_marginals_reasons(emissions, mask, transitions, start, end)
    assert any("requires grad" in reason for reason in reasons)
    with torch.no_grad():
        assert triton_crf.crf_marginals_reasons(emissions, mask, transitions, start, end) == []
    with pytest.raises(fusedloss.BackendUnavailable, match="requires grad"):
        fusedloss.crf_marginals(emissions, transitions, start, end, mask, backend="triton")
