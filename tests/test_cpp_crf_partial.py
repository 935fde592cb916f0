"""The ``cpp`` backend's partial-label CRF ops (``fusedloss._ext.crf``): ``crf_partial_log_likelihood``,
``crf_log_partition`` and ``crf_kbest_viterbi`` against brute-force enumeration of every tag path in float64
(values, and gradients of all four inputs by torch.autograd through the enumeration), single-tag sets against
``crf_log_likelihood`` bit for bit, k = 1 against ``crf_viterbi``, ragged masks, forbidden transitions, large
emissions, float32/float64/bfloat16, long sequences against float64, determinism across thread counts, bad
inputs, gradcheck, opcheck and ``torch.compile``.
"""

import itertools

import pytest
import torch

from _backends import available, requires_backend

pytestmark = requires_backend("cpp")

if available("cpp"):
    from fusedloss._ext import crf as cpp

CONSTRAINT_SCORE = -1e4


def make_case(batch, length, num_tags, *, seed=0, scale=1.0, dtype=torch.float32, singles=0.3):
    """Emissions, allowed sets (a fraction ``singles`` of positions with one tag, the others random non-empty
    subsets), a ragged left-aligned mask (the first sequence full) and transition parameters in float32."""
    gen = torch.Generator().manual_seed(seed)
    emissions = (scale * torch.randn(batch, length, num_tags, generator=gen)).to(dtype)
    allowed = torch.rand(batch, length, num_tags, generator=gen) < 0.5
    tags = torch.randint(0, num_tags, (batch, length), generator=gen)
    allowed[torch.arange(batch)[:, None], torch.arange(length)[None, :], tags] = True  # never empty
    single = torch.rand(batch, length, generator=gen) < singles
    allowed = torch.where(single[..., None], torch.nn.functional.one_hot(tags, num_tags).bool(), allowed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    transitions = torch.randn(num_tags, num_tags, generator=gen) * 0.5
    start = torch.randn(num_tags, generator=gen) * 0.5
    end = torch.randn(num_tags, generator=gen) * 0.5
    return emissions, allowed, mask, transitions, start, end


def path_scores(emissions, transitions, start, end, length):
    """Every tag path of one sequence's first ``length`` positions, (P, L) in itertools order, and their scores
    (differentiable)."""
    num_tags = emissions.shape[-1]
    paths = torch.tensor(list(itertools.product(range(num_tags), repeat=length)), dtype=torch.long)
    scores = start[paths[:, 0]] + end[paths[:, -1]] + emissions[torch.arange(length), paths].sum(1)
    if length > 1:
        scores = scores + transitions[paths[:, :-1], paths[:, 1:]].sum(1)
    return paths, scores


def brute_log_z(emissions, mask, transitions, start, end, allowed=None):
    """log Z (or log Z over the paths inside ``allowed``) per sequence by enumeration, differentiable."""
    out = []
    for b in range(emissions.shape[0]):
        length = int(mask[b].sum())
        paths, scores = path_scores(emissions[b], transitions, start, end, length)
        if allowed is not None:
            keep = allowed[b, torch.arange(length), paths].all(1)
            scores = scores[keep]
        out.append(torch.logsumexp(scores, 0))
    return torch.stack(out)


def brute_partial(emissions, allowed, mask, transitions, start, end):
    return (brute_log_z(emissions, mask, transitions, start, end, allowed)
            - brute_log_z(emissions, mask, transitions, start, end))


def value_and_grads(fn, inputs, grad_seed=1):
    """``fn(*inputs)`` and the gradients of ``sum_b g_b value_b`` (random g) w.r.t. the float inputs emissions,
    transitions, start, end (positions 0, -3, -2, -1)."""
    leaves = [x.detach().clone().requires_grad_() if i in (0, len(inputs) - 3, len(inputs) - 2, len(inputs) - 1)
              else x for i, x in enumerate(inputs)]
    value = fn(*leaves)
    g = torch.randn(value.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    value.backward(g.to(value.dtype))
    # An input the value does not depend on (transitions at T = 1) gets a zero gradient.
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (leaves[0], *leaves[-3:])]
    return [value.detach()] + grads


def as64(*xs):
    return [x.double() if x.is_floating_point() else x for x in xs]


# By the dtype of the result compared (the transition gradients are float32 here whatever the emissions).
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 3), (4, 3, 4), (2, 1, 2), (2, 4, 1)])
def test_partial_values_and_gradients(dtype, shape):
    emissions, allowed, mask, transitions, start, end = make_case(*shape, seed=sum(shape), dtype=dtype)
    got = value_and_grads(cpp.crf_partial_log_likelihood, (emissions, allowed, mask, transitions, start, end))
    want = value_and_grads(brute_partial, as64(emissions, allowed, mask, transitions, start, end))
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL[a.dtype])
    assert torch.all(got[1][~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_single_tag_sets_equal_log_likelihood(dtype):
    """One-hot sets take the log-likelihood path: the same bits as crf_log_likelihood, values and gradients."""
    emissions, _, mask, transitions, start, end = make_case(5, 6, 4, seed=3, dtype=dtype)
    tags = torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(4)).masked_fill(~mask, 0)
    allowed = torch.nn.functional.one_hot(tags, 4).bool() | ~mask[..., None]  # masked positions: anything
    got = value_and_grads(cpp.crf_partial_log_likelihood, (emissions, allowed, mask, transitions, start, end))
    want = value_and_grads(cpp.crf_log_likelihood, (emissions, tags, mask, transitions, start, end))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Mixed with other sequences: the single-tag rows keep their values.
    mixed = allowed.clone()
    mixed[1:3] = True
    value = cpp.crf_partial_log_likelihood(emissions, mixed, mask, transitions, start, end)
    assert torch.equal(value[[0, 3, 4]], want[0][[0, 3, 4]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_log_partition(dtype):
    emissions, _, mask, transitions, start, end = make_case(4, 4, 3, seed=7, dtype=dtype)
    got = value_and_grads(cpp.crf_log_partition, (emissions, mask, transitions, start, end))
    want = value_and_grads(brute_log_z, as64(emissions, mask, transitions, start, end))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL[a.dtype])
    # With g = 1 the emission gradient is the tag marginals.
    em = emissions.clone().requires_grad_()
    cpp.crf_log_partition(em, mask, transitions, start, end).sum().backward()
    torch.testing.assert_close(em.grad, cpp.crf_marginals(emissions, mask, transitions, start, end).to(dtype),
                               **TOL[dtype])


def test_mask_none_and_all_true_sets():
    """mask None means all on; all-true sets give 0 (log Z_allowed = log Z) and a zero gradient."""
    emissions, allowed, _, transitions, start, end = make_case(3, 4, 3, seed=8, dtype=torch.float64)
    full = torch.ones(3, 4, dtype=torch.bool)
    assert torch.equal(cpp.crf_partial_log_likelihood(emissions, allowed, None, transitions, start, end),
                       cpp.crf_partial_log_likelihood(emissions, allowed, full, transitions, start, end))
    assert torch.equal(cpp.crf_log_partition(emissions, None, transitions, start, end),
                       cpp.crf_log_partition(emissions, full, transitions, start, end))
    everything = torch.ones(3, 4, 3, dtype=torch.bool)
    got = value_and_grads(cpp.crf_partial_log_likelihood, (emissions, everything, None, transitions, start, end))
    for x in got:
        torch.testing.assert_close(x, torch.zeros_like(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", ["partial", "log_partition"])
def test_constrained_transitions(op):
    """Forbidden transitions at -1e4 (some allowed sets reachable only through them): finite, matches."""
    emissions, allowed, mask, transitions, start, end = make_case(4, 4, 4, seed=11, dtype=torch.float64)
    transitions = transitions.double().clone()
    transitions[0, 1] = transitions[1, 2] = transitions[2, 0] = transitions[3, 3] = CONSTRAINT_SCORE
    start = start.double().masked_fill(torch.tensor([False, False, True, False]), CONSTRAINT_SCORE)
    end = end.double()
    if op == "partial":
        allowed[0, :2] = torch.nn.functional.one_hot(torch.tensor([0, 1]), 4).bool()  # forced through 0 -> 1
        args = (emissions, allowed, mask, transitions, start, end)
        fn, ref = cpp.crf_partial_log_likelihood, brute_partial
    else:
        args = (emissions, mask, transitions, start, end)
        fn, ref = cpp.crf_log_partition, brute_log_z
    for dtype in (torch.float64, torch.float32):
        cast = [x.to(dtype) if x.is_floating_point() else x for x in args]
        got = value_and_grads(fn, cast)
        want = value_and_grads(ref, args)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                       atol=1e-2 if dtype == torch.float32 else 1e-8)


def test_large_emissions():
    """Emissions of scale 1000: no NaN, values and gradients as the float64 enumeration."""
    emissions, allowed, mask, transitions, start, end = make_case(4, 4, 3, seed=13, scale=1000.0)
    for fn, ref, args in ((cpp.crf_partial_log_likelihood, brute_partial,
                           (emissions, allowed, mask, transitions, start, end)),
                          (cpp.crf_log_partition, brute_log_z, (emissions, mask, transitions, start, end))):
        got = value_and_grads(fn, args)
        want = value_and_grads(ref, as64(*args))
        for a, b in zip(got, want):
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-2)


def brute_kbest(emissions, mask, transitions, start, end, k):
    """The documented order: score descending, then, from the last tag backwards, the lower tag (the lower tag
    then the lower rank of the prefix at every step): lexicographic order of the reversed path."""
    batch, length = mask.shape
    paths = torch.full((batch, k, length), -1, dtype=torch.long)
    scores = torch.full((batch, k), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        n = int(mask[b].sum())
        candidates, s = path_scores(emissions[b].double(), transitions.double(), start.double(), end.double(), n)
        order = sorted(range(len(s)), key=lambda p: (-s[p].item(), candidates[p].flip(0).tolist()))[:k]
        paths[b, :len(order), :n] = candidates[order]
        scores[b, :len(order)] = s[order]
    return paths, scores


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 3), (3, 3, 4), (2, 2, 2), (2, 4, 1)])
def test_kbest_against_enumeration(dtype, shape):
    batch, length, num_tags = shape
    emissions, _, mask, transitions, start, end = make_case(*shape, seed=17 + sum(shape), dtype=dtype)
    transitions = transitions.to(dtype)
    for k in (2, 5, num_tags ** length + 2):
        paths, scores = cpp.crf_kbest_viterbi(emissions, mask, transitions, start, end, k)
        want_paths, want_scores = brute_kbest(emissions, mask, transitions, start, end, k)
        assert paths.shape == (batch, k, length) and scores.shape == (batch, k) and scores.dtype == dtype
        tol = dict(rtol=0, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-2, atol=5e-2)
        torch.testing.assert_close(scores.double(), want_scores, **tol)
        if dtype == torch.float64:
            assert torch.equal(paths, want_paths)
        else:  # rounded scores may reorder near ties: compare the padding and the ranks without near neighbours
            assert torch.equal(paths < 0, want_paths < 0)
            gap = (want_scores[:, 1:] - want_scores[:, :-1]).abs().nan_to_num(float("inf"))
            lone = torch.ones_like(want_scores, dtype=torch.bool)
            lone[:, 1:] &= gap > 0.2
            lone[:, :-1] &= gap > 0.2
            assert torch.equal(paths[lone], want_paths[lone])
    best_paths, best_scores = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    paths, scores = cpp.crf_kbest_viterbi(emissions, mask, transitions, start, end, 1)
    assert torch.equal(paths[:, 0], best_paths) and torch.equal(scores[:, 0], best_scores)


def test_kbest_ties_and_constraints():
    """All scores equal: the tie order. Forbidden transitions: still paths, ranked by their low scores; k = 1 is
    Viterbi's result at a longer length too."""
    zeros = torch.zeros(1, 3, 3, dtype=torch.float64)
    z3, z33 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    paths, _ = cpp.crf_kbest_viterbi(zeros, mask, z33, z3, z3, 27)
    want, _ = brute_kbest(zeros, mask, z33, z3, z3, 27)
    assert torch.equal(paths, want)
    emissions, _, mask, transitions, start, end = make_case(3, 3, 3, seed=19, dtype=torch.float64)
    transitions = transitions.double().fill_diagonal_(CONSTRAINT_SCORE)
    paths, scores = cpp.crf_kbest_viterbi(emissions, mask, transitions, start, end, 27)
    want_paths, want_scores = brute_kbest(emissions, mask, transitions, start, end, 27)
    assert torch.equal(paths, want_paths)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-9)
    emissions, _, mask, transitions, start, end = make_case(4, 50, 6, seed=23, scale=30.0)
    best_paths, best_scores = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    paths, scores = cpp.crf_kbest_viterbi(emissions, mask, transitions, start, end, 1)
    assert torch.equal(paths[:, 0], best_paths) and torch.equal(scores[:, 0], best_scores)
    paths, scores = cpp.crf_kbest_viterbi(emissions, None, transitions, start, end, 4)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_backward_without_saved_list():
    """The backward ops recompute the forward recursions when given an empty list (what a device may return)."""
    emissions, allowed, mask, transitions, start, end = make_case(3, 5, 4, seed=29)
    g = torch.randn(3)
    ops = torch.ops.fusedloss
    for forward, backward, args in (
            (ops.crf_partial_log_likelihood_forward, ops.crf_partial_log_likelihood_backward,
             (emissions, allowed, mask, transitions, start, end)),
            (ops.crf_log_partition_forward, ops.crf_log_partition_backward,
             (emissions, mask, transitions, start, end))):
        value, saved = forward(*args, True)
        value_nosave, nothing = forward(*args, False)
        assert nothing == [] and torch.equal(value, value_nosave)
        for a, b in zip(backward(g, *args, saved), backward(g, *args, [])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
    emissions, allowed, mask, transitions, start, end = make_case(2, 3, 3, seed=31)
    empty = allowed.clone()
    empty[1, 0] = False
    with pytest.raises(ValueError, match=r"must allow at least one tag at every unmasked position, got an empty set "
                                         r"at sequence 1, position 0"):
        cpp.crf_partial_log_likelihood(emissions, empty, mask, transitions, start, end)
    masked = allowed.clone()
    masked[~mask] = False  # empty sets past a sequence's end are fine
    cpp.crf_partial_log_likelihood(emissions, masked, mask, transitions, start, end)
    with pytest.raises(ValueError, match=r"tags must have shape \(batch, seq_len, num_tags\) = \(2, 3, 3\) like "
                                         r"emissions, got \(2, 3\)"):
        cpp.crf_partial_log_likelihood(emissions, allowed[..., 0], mask, transitions, start, end)
    with pytest.raises(ValueError, match=r"tags must be int64 \(batch, seq_len\) tag indices or a bool .* got "
                                         r"torch.float32"):
        cpp.crf_partial_log_likelihood(emissions, allowed.float(), mask, transitions, start, end)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        cpp.crf_kbest_viterbi(emissions, mask, transitions, start, end, 0)
    with pytest.raises(ValueError, match="transitions must have shape"):
        cpp.crf_log_partition(emissions, mask, transitions[:2], start, end)
    with pytest.raises(ValueError, match="mask of the first timestep"):
        cpp.crf_kbest_viterbi(emissions, torch.zeros_like(mask), transitions, start, end, 2)
    assert cpp.crf_kbest_viterbi_reasons(emissions, mask, transitions, start, end, 2) == []
    assert cpp.crf_kbest_viterbi_reasons(emissions, mask, transitions, start, end, 2**30) != []
    assert cpp.crf_partial_log_likelihood_reasons(emissions, allowed, mask, transitions, start, end) == []
    assert cpp.crf_log_partition_reasons(emissions, mask, transitions, start, end) == []


def test_gradcheck():
    emissions, allowed, mask, transitions, start, end = make_case(2, 3, 3, seed=37, dtype=torch.float64)
    leaves = [x.double().requires_grad_() for x in (emissions, transitions, start, end)]
    assert torch.autograd.gradcheck(
        lambda e, a, s, f: cpp.crf_partial_log_likelihood(e, allowed, mask, a, s, f), leaves)
    assert torch.autograd.gradcheck(lambda e, a, s, f: cpp.crf_log_partition(e, mask, a, s, f), leaves)


def test_opcheck_registrations():
    emissions, allowed, mask, transitions, start, end = make_case(2, 4, 3)
    ops = torch.ops.fusedloss
    for m in (mask, None):
        torch.library.opcheck(ops.crf_partial_log_likelihood.default,
                              (emissions.clone().requires_grad_(), allowed, m, transitions.clone().requires_grad_(),
                               start, end))
        torch.library.opcheck(ops.crf_log_partition.default,
                              (emissions.clone().requires_grad_(), m, transitions, start, end))
    checks = ("test_schema", "test_faketensor")
    for save in (True, False):
        torch.library.opcheck(ops.crf_partial_log_likelihood_forward.default,
                              (emissions, allowed, mask, transitions, start, end, save), test_utils=checks)
        torch.library.opcheck(ops.crf_log_partition_forward.default,
                              (emissions, mask, transitions, start, end, save), test_utils=checks)
    torch.library.opcheck(ops.crf_kbest_viterbi.default, (emissions, mask, transitions, start, end, 3),
                          test_utils=checks)


def test_torch_compile_fullgraph():
    emissions, allowed, mask, transitions, start, end = make_case(3, 5, 4, seed=41)

    def loss(em, trans):
        return (-cpp.crf_partial_log_likelihood(em, allowed, mask, trans, start, end).sum()
                + 0.5 * cpp.crf_log_partition(em, mask, trans, start, end).sum())

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        em, trans = emissions.clone().requires_grad_(), transitions.clone().requires_grad_()
        value = fn(em, trans)
        value.backward()
        results.append((value.detach(), em.grad, trans.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_long_sequences_float32_against_float64():
    """T = 500 with emissions in the hundreds and half the positions labelled: float32 (float16 emissions too)
    stays close to the float64 computation, and the result is the same bits at 1 and 2 threads."""
    emissions, allowed, mask, transitions, start, end = make_case(4, 500, 5, seed=43, scale=100.0, singles=0.5)
    args = (emissions, allowed, mask, transitions, start, end)
    want = value_and_grads(cpp.crf_partial_log_likelihood, as64(*args))
    got = value_and_grads(cpp.crf_partial_log_likelihood, args)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=0.05)
    half = value_and_grads(cpp.crf_partial_log_likelihood, (emissions.half(),) + args[1:])
    half_want = value_and_grads(cpp.crf_partial_log_likelihood, as64(emissions.half(), *args[1:]))
    torch.testing.assert_close(half[0].double(), half_want[0], rtol=1e-4, atol=0.05)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = value_and_grads(cpp.crf_partial_log_likelihood, args)
        torch.set_num_threads(2)
        two = value_and_grads(cpp.crf_partial_log_likelihood, args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
