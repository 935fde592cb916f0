"""CRF for partial annotation, through the public API on every backend that runs here: the partial-label
("fuzzy") log-likelihood, ``crf_log_partition`` and k-best Viterbi, against brute-force enumeration of every tag
path (values, every gradient, paths, ranks and padding), plus one-hot equivalence, constraints, extreme scales,
half precision, the module's layouts, bad inputs and torch.compile."""

import itertools
import math

import pytest
import torch

import fusedloss
from fusedloss.crf import CONSTRAINT_SCORE, CRF, allowed_transitions, crf_log_likelihood, crf_log_partition
from fusedloss.crf import crf_marginals, crf_viterbi
from tests._backends import requires_backend

BACKENDS = [pytest.param(name, marks=requires_backend(name)) for name in ("reference", "cpp", "triton")]
# Backends whose one-hot result is bit-identical to crf_log_likelihood (they take the gold-score path for it).
EXACT_ONE_HOT = ("reference", "cpp")


def native(backend):
    """The most precise dtype a backend computes in: the Triton CRF kernels are float32 only (float64 calls go to
    the reference or cpp)."""
    return torch.float32 if backend == "triton" else torch.float64


def skip_float64(backend, dtype):
    if dtype == torch.float64 and native(backend) != torch.float64:
        pytest.skip("the Triton CRF kernels accumulate in float32 and decline float64")


def all_paths(length, num_tags):
    return torch.tensor(list(itertools.product(range(num_tags), repeat=length)), dtype=torch.int64)


def path_scores(emissions, transitions, start, end, paths):
    """score(y) of every path (P, L) of one sequence with emissions (L, K); differentiable."""
    length = paths.shape[1]
    score = start[paths[:, 0]] + end[paths[:, -1]]
    score = score + emissions[torch.arange(length), paths].sum(1)
    if length > 1:
        score = score + transitions[paths[:, :-1], paths[:, 1:]].sum(1)
    return score


def brute_force(emissions, transitions, start, end, mask, allowed=None):
    """Per sequence: (log Z, log Z over the paths inside ``allowed``, [(score, path), ...] sorted best first, ties
    to the path that is lexicographically smaller read from its end: the documented order), in float64; the first
    two differentiable."""
    log_z, log_z_allowed, ranked = [], [], []
    num_tags = emissions.shape[2]
    for b in range(emissions.shape[0]):
        length = int(mask[b].sum())
        paths = all_paths(length, num_tags)
        scores = path_scores(emissions[b, :length].double(), transitions.double(), start.double(), end.double(),
                             paths)
        log_z.append(torch.logsumexp(scores, 0))
        if allowed is not None:
            inside = allowed[b, torch.arange(length), paths].all(1)
            log_z_allowed.append(torch.logsumexp(scores[inside], 0))
        order = sorted(range(len(paths)), key=lambda p: (-float(scores[p].detach()), paths[p].tolist()[::-1]))
        ranked.append([(float(scores[p].detach()), paths[p].tolist()) for p in order])
    stack = torch.stack
    return stack(log_z), (stack(log_z_allowed) if allowed is not None else None), ranked


def problem(batch=4, seq_len=4, num_tags=3, lengths=(4, 2, 1, 3), dtype=torch.float64, seed=0, scale=1.0,
            density=0.5):
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, seq_len, num_tags, generator=generator, dtype=torch.float64) * scale
    transitions = torch.randn(num_tags, num_tags, generator=generator, dtype=torch.float64)
    start = torch.randn(num_tags, generator=generator, dtype=torch.float64)
    end = torch.randn(num_tags, generator=generator, dtype=torch.float64)
    mask = torch.arange(seq_len)[None] < torch.tensor(lengths[:batch])[:, None]
    allowed = torch.rand(batch, seq_len, num_tags, generator=generator) < density
    allowed[torch.arange(batch), :, torch.randint(0, num_tags, (batch,), generator=generator)] = True
    allowed[1, 0] = True  # an unlabeled position
    return [x.to(dtype) for x in (emissions, transitions, start, end)] + [mask, allowed]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(value, inputs):
    return torch.autograd.grad(value, inputs)


def tolerance(dtype):
    return {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-4)}[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Partial-label log-likelihood


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(4, 4, 3), (3, 3, 4), (2, 4, 1)])
def test_partial_log_likelihood_and_gradients_match_brute_force(backend, dtype, shape):
    skip_float64(backend, dtype)
    batch, seq_len, num_tags = shape
    emissions, transitions, start, end, mask, allowed = problem(batch, seq_len, num_tags, dtype=dtype,
                                                                seed=sum(shape))
    inputs = leaves(emissions, transitions, start, end)
    ours = crf_log_likelihood(inputs[0], allowed, *inputs[1:], mask=mask, reduction="none", backend=backend)
    assert ours.dtype == dtype and ours.shape == (batch,)
    weights = torch.linspace(0.5, 1.5, batch, dtype=dtype)
    our_grads = grads((ours * weights).sum(), inputs)

    oracle_inputs = leaves(*(t.double() for t in (emissions, transitions, start, end)))
    log_z, log_z_allowed, _ = brute_force(*oracle_inputs, mask, allowed)
    expected = log_z_allowed - log_z
    expected_grads = grads((expected * weights.double()).sum(), oracle_inputs)
    torch.testing.assert_close(ours.double(), expected, **tolerance(dtype))
    for name, got, want in zip(("emissions", "transitions", "start", "end"), our_grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **tolerance(dtype), msg=lambda m, name=name: f"{name}: {m}")
    assert bool((our_grads[0][~mask] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_sets_give_the_ordinary_log_likelihood(backend):
    emissions, transitions, start, end, mask, _ = problem(dtype=torch.float32, seed=3)
    tags = torch.randint(0, 3, mask.shape, generator=torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(tags, 3).bool()
    one_hot[~mask] = False  # sets past the end are never read (the public layer fills them)
    values, gradients = [], []
    for tag_argument in (tags, one_hot):
        inputs = leaves(emissions, transitions, start, end)
        value = crf_log_likelihood(inputs[0], tag_argument, *inputs[1:], mask=mask, reduction="none",
                                   backend=backend)
        values.append(value)
        gradients.append(grads(value.sum(), inputs))
    if backend in EXACT_ONE_HOT:
        assert torch.equal(values[0], values[1])
    else:
        torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlabeled_sequences_have_zero_loss_and_gradient(backend):
    dtype = native(backend)
    emissions, transitions, start, end, mask, _ = problem(dtype=dtype, seed=4)
    everything = torch.ones(*emissions.shape, dtype=torch.bool)
    inputs = leaves(emissions, transitions, start, end)
    value = crf_log_likelihood(inputs[0], everything, *inputs[1:], mask=mask, reduction="none", backend=backend)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=atol)
    for gradient in grads(value.sum(), inputs):
        torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "token_mean"])
def test_partial_reductions_follow_the_per_sequence_values(backend, reduction):
    emissions, transitions, start, end, mask, allowed = problem(seed=5, dtype=native(backend))
    per_sequence = crf_log_likelihood(emissions, allowed, transitions, start, end, mask, "none", backend=backend)
    reduced = crf_log_likelihood(emissions, allowed, transitions, start, end, mask, reduction, backend=backend)
    expected = {"sum": per_sequence.sum(), "mean": per_sequence.mean(),
                "token_mean": per_sequence.sum() / mask.sum()}[reduction]
    torch.testing.assert_close(reduced, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_labels_with_scheme_constraints(backend):
    """BIO constraints folded in by the module: values and gradients against brute force over the same scores,
    and no NaN though forbidden transitions sit at CONSTRAINT_SCORE."""
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    dtype = native(backend)
    crf = CRF(4, batch_first=True, constraints=allowed_transitions("BIO", labels), backend=backend).to(dtype)
    torch.nn.init.normal_(crf.transitions)
    emissions, _, _, _, mask, allowed = problem(batch=3, seq_len=4, num_tags=4, lengths=(4, 3, 2), seed=6,
                                                dtype=dtype)
    emissions = emissions.requires_grad_()
    value = crf(emissions, allowed, mask, reduction="none")
    ours = grads(value.sum(), [emissions, crf.transitions, crf.start_transitions, crf.end_transitions])

    oracle = CRF(4, batch_first=True, constraints=allowed_transitions("BIO", labels), backend="reference").double()
    oracle.load_state_dict({name: value.double() for name, value in crf.state_dict().items()})
    oracle_emissions = emissions.detach().double().requires_grad_()
    log_z, log_z_allowed, _ = brute_force(oracle_emissions, *oracle._scores(), mask, allowed)
    expected = log_z_allowed - log_z
    theirs = grads(expected.sum(), [oracle_emissions, oracle.transitions, oracle.start_transitions,
                                    oracle.end_transitions])
    torch.testing.assert_close(value.double(), expected, **tolerance(dtype))
    for got, want in zip(ours, theirs):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), want, **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_labels_at_extreme_emission_scales(backend):
    """Emissions of a thousand: the sets decide which tags are possible, values and gradients stay finite and
    match float64 brute force to float32's resolution of the scores."""
    emissions, transitions, start, end, mask, allowed = problem(dtype=torch.float32, seed=7, scale=1000.0)
    inputs = leaves(emissions, transitions, start, end)
    value = crf_log_likelihood(inputs[0], allowed, *inputs[1:], mask=mask, reduction="none", backend=backend)
    ours = grads(value.sum(), inputs)
    oracle_inputs = leaves(*(t.double() for t in (emissions, transitions, start, end)))
    log_z, log_z_allowed, _ = brute_force(*oracle_inputs, mask, allowed)
    expected = log_z_allowed - log_z
    theirs = grads(expected.sum(), oracle_inputs)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0.05)
    for got, want in zip(ours, theirs):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_partial_labels_in_half_precision(backend, dtype):
    """Half emissions accumulate in float32: the result is the float64 brute force of the rounded inputs to
    float32's error, returned in the half dtype (its own rounding: half an ulp of the value)."""
    emissions, transitions, start, end, mask, allowed = problem(seed=8)
    emissions = emissions.to(dtype)
    value = crf_log_likelihood(emissions, allowed, transitions.float(), start.float(), end.float(), mask, "none",
                               backend=backend)
    assert value.dtype == torch.float32  # promote_types(half, float32)
    log_z, log_z_allowed, _ = brute_force(emissions.double(), transitions, start, end, mask, allowed)
    torch.testing.assert_close(value.double(), log_z_allowed - log_z, rtol=1e-5, atol=1e-4)
    half_only = crf_log_likelihood(emissions, allowed, transitions.to(dtype), start.to(dtype), end.to(dtype), mask,
                                   "none", backend=backend)
    assert half_only.dtype == dtype
    log_z, log_z_allowed, _ = brute_force(emissions.double(), transitions.to(dtype).double(),
                                          start.to(dtype).double(), end.to(dtype).double(), mask, allowed)
    expected = (log_z_allowed - log_z)
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(1)
    assert bool(((half_only.double() - expected).abs() <= ulp + 1e-4).all())


def test_module_partial_labels_time_first_equal_batch_first():
    emissions, transitions, start, end, mask, allowed = problem(seed=9)
    crf = CRF(3, backend="reference").double()
    with torch.no_grad():
        crf.transitions.copy_(transitions)
        crf.start_transitions.copy_(start)
        crf.end_transitions.copy_(end)
    time_first = crf(emissions.transpose(0, 1), allowed.transpose(0, 1), mask.transpose(0, 1), reduction="none")
    batch_first = crf_log_likelihood(emissions, allowed, transitions, start, end, mask, "none")
    torch.testing.assert_close(time_first, batch_first)


# ---------------------------------------------------------------------------------------------------------------
# log Z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_partition_and_its_gradient_match_brute_force(backend, dtype):
    skip_float64(backend, dtype)
    emissions, transitions, start, end, mask, _ = problem(batch=4, seq_len=4, num_tags=4, dtype=dtype, seed=10)
    inputs = leaves(emissions, transitions, start, end)
    ours = crf_log_partition(*inputs, mask=mask, backend=backend)
    assert ours.dtype == dtype and ours.shape == (4,)
    weights = torch.linspace(-1.0, 2.0, 4, dtype=dtype)
    our_grads = grads((ours * weights).sum(), inputs)
    oracle_inputs = leaves(*(t.double() for t in (emissions, transitions, start, end)))
    log_z, _, _ = brute_force(*oracle_inputs, mask)
    torch.testing.assert_close(ours.double(), log_z, **tolerance(dtype))
    for got, want in zip(our_grads, grads((log_z * weights.double()).sum(), oracle_inputs)):
        torch.testing.assert_close(got.double(), want, **tolerance(dtype))
    # The gradient with respect to the emissions is the tag marginals.
    plain = crf_log_partition(*inputs, mask=mask, backend=backend)
    marginals = crf_marginals(*(t.detach() for t in inputs), mask=mask, backend="reference")
    torch.testing.assert_close(grads(plain.sum(), inputs[0])[0], marginals, **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_path_probabilities_from_log_partition_sum_to_one(backend):
    """exp(score - log Z) over every path (k-best with k = K^L) sums to 1: the path confidences are
    probabilities."""
    dtype = native(backend)
    emissions, transitions, start, end, mask, _ = problem(batch=2, seq_len=3, num_tags=3, lengths=(3, 2), seed=11,
                                                          dtype=dtype)
    _, scores = crf_viterbi(emissions, transitions, start, end, mask, k=27, backend=backend)
    log_z = crf_log_partition(emissions, transitions, start, end, mask, backend=backend)
    total = (scores - log_z[:, None]).exp().sum(1)  # -inf ranks (the length-2 sequence has 9 paths) add 0
    torch.testing.assert_close(total, torch.ones_like(total), **tolerance(dtype))


# ---------------------------------------------------------------------------------------------------------------
# k-best Viterbi


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [2, 5, 30])
def test_kbest_paths_and_scores_match_brute_force(backend, dtype, k):
    skip_float64(backend, dtype)
    emissions, transitions, start, end, mask, _ = problem(batch=4, seq_len=4, num_tags=3, lengths=(4, 2, 1, 3),
                                                          dtype=dtype, seed=12 + k)
    paths, scores = crf_viterbi(emissions, transitions, start, end, mask, k=k, backend=backend)
    assert paths.shape == (4, k, 4) and paths.dtype == torch.int64
    assert scores.shape == (4, k) and scores.dtype == dtype
    _, _, ranked = brute_force(emissions, transitions, start, end, mask)
    for b, sequence in enumerate(ranked):
        length = int(mask[b].sum())
        found = min(k, len(sequence))
        expected_scores = torch.tensor([score for score, _ in sequence[:found]], dtype=torch.float64)
        torch.testing.assert_close(scores[b, :found].double(), expected_scores, **tolerance(dtype))
        for rank in range(found):
            assert paths[b, rank, :length].tolist() == sequence[rank][1], (b, rank)
        assert bool((paths[b, :, length:] == -1).all())
        assert bool((paths[b, found:] == -1).all())
        assert bool((scores[b, found:] == -math.inf).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kbest_rank_zero_is_the_viterbi_path(backend):
    emissions, transitions, start, end, mask, _ = problem(batch=4, seq_len=4, num_tags=4, dtype=torch.float32,
                                                          seed=13)
    best, best_score = crf_viterbi(emissions, transitions, start, end, mask, backend=backend)
    paths, scores = crf_viterbi(emissions, transitions, start, end, mask, k=3, backend=backend)
    assert torch.equal(paths[:, 0], best)
    torch.testing.assert_close(scores[:, 0], best_score)
    same, same_score = crf_viterbi(emissions, transitions, start, end, mask, k=1, backend=backend)
    assert torch.equal(same, best) and torch.equal(same_score, best_score)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kbest_ties_go_to_the_lower_previous_tag(backend):
    """All scores equal: every path ties, and the documented order (lower previous tag, then lower rank, at every
    step; lower last tag at the end) ranks them lexicographically by their tags read from the end."""
    emissions = torch.zeros(1, 3, 2)
    zeros = torch.zeros(2)
    paths, scores = crf_viterbi(emissions, torch.zeros(2, 2), zeros, zeros, k=8, backend=backend)
    expected = sorted(itertools.product(range(2), repeat=3), key=lambda p: p[::-1])
    assert [tuple(p) for p in paths[0].tolist()] == expected
    assert bool((scores == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kbest_honours_scheme_constraints(backend):
    """With BIO constraints every path among the k best is allowed while enough allowed paths exist."""
    labels = ["O", "B-PER", "I-PER"]
    allowed, allowed_start, allowed_end = allowed_transitions("BIO", labels)
    crf = CRF(3, batch_first=True, constraints=(allowed, allowed_start, allowed_end), backend=backend)
    emissions = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(14)) * 3
    emissions[:, :, 2] += 4  # I-PER everywhere would win without the constraints
    paths, scores = crf.viterbi(emissions, k=6)
    for sequence in paths.tolist():
        for path in sequence:
            assert allowed_start[path[0]] and allowed_end[path[-1]]
            assert all(allowed[a, b] for a, b in zip(path, path[1:])), path
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert bool((scores > CONSTRAINT_SCORE / 2).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kbest_at_extreme_emission_scales(backend):
    emissions, transitions, start, end, mask, _ = problem(dtype=torch.float32, seed=15, scale=1000.0)
    paths, scores = crf_viterbi(emissions, transitions, start, end, mask, k=4, backend=backend)
    _, _, ranked = brute_force(emissions, transitions, start, end, mask)
    for b, sequence in enumerate(ranked):
        length = int(mask[b].sum())
        found = min(4, len(sequence))
        assert bool(torch.isfinite(scores[b, :found]).all())
        torch.testing.assert_close(scores[b, :found].double(),
                                   torch.tensor([s for s, _ in sequence[:found]], dtype=torch.float64),
                                   rtol=1e-6, atol=0.01)
        assert paths[b, 0, :length].tolist() == sequence[0][1]


def test_module_kbest_layouts():
    emissions, transitions, start, end, mask, _ = problem(seed=16)
    for batch_first in (True, False):
        crf = CRF(3, batch_first=batch_first, backend="reference").double()
        with torch.no_grad():
            crf.transitions.copy_(transitions)
            crf.start_transitions.copy_(start)
            crf.end_transitions.copy_(end)
        layout = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
        paths, scores = crf.viterbi(layout(emissions), layout(mask), k=3)
        expected_paths, expected_scores = crf_viterbi(emissions, transitions, start, end, mask, k=3)
        if batch_first:
            assert torch.equal(paths, expected_paths)
        else:
            assert paths.shape == (4, 4, 3)  # (T, B, k)
            assert torch.equal(paths.permute(1, 2, 0), expected_paths)
        torch.testing.assert_close(scores, expected_scores)
        log_z = crf.log_partition(layout(emissions), layout(mask))
        torch.testing.assert_close(log_z, crf_log_partition(emissions, transitions, start, end, mask))


# ---------------------------------------------------------------------------------------------------------------
# Bad input, gradcheck, torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_partial_labels_raise(backend):
    emissions, transitions, start, end, mask, allowed = problem(seed=17, dtype=native(backend))
    empty = allowed.clone()
    empty[2, 0] = False
    with pytest.raises(ValueError, match=r"tags \(allowed tag sets\) must allow at least one tag.*sequence 2, "
                                         r"position 0"):
        crf_log_likelihood(emissions, empty, transitions, start, end, mask, backend=backend)
    past_end = allowed.clone()
    past_end[2, 3] = False  # sequence 2 has length 1: sets past its end are never read
    crf_log_likelihood(emissions, past_end, transitions, start, end, mask, backend=backend)
    with pytest.raises(ValueError, match=r"tags must have shape \(batch, seq_len, num_tags\)"):
        crf_log_likelihood(emissions, allowed[:, :, :2], transitions, start, end, mask, backend=backend)
    with pytest.raises(ValueError, match="tags must be int64"):
        crf_log_likelihood(emissions, allowed.to(torch.uint8), transitions, start, end, mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_k_raises(backend):
    emissions, transitions, start, end, mask, _ = problem(seed=18, dtype=native(backend))
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        crf_viterbi(emissions, transitions, start, end, mask, k=0, backend=backend)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="k must be an int"):
            crf_viterbi(emissions, transitions, start, end, mask, k=bad, backend=backend)
    with pytest.raises(ValueError, match="k must be >= 1"):
        CRF(3, backend=backend).viterbi(emissions.float().transpose(0, 1), k=-1)


def test_module_rejects_sets_of_the_wrong_shape():
    crf = CRF(3, batch_first=True)
    emissions = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="tags"):
        crf(emissions, torch.ones(2, 4, 4, dtype=torch.bool))


def test_reference_gradcheck():
    emissions, transitions, start, end, mask, allowed = problem(batch=3, seq_len=3, num_tags=3, lengths=(3, 2, 1),
                                                                seed=19)
    inputs = leaves(emissions, transitions, start, end)
    assert torch.autograd.gradcheck(
        lambda e, a, s, f: crf_log_likelihood(e, allowed, a, s, f, mask, "none", backend="reference"), inputs)
    assert torch.autograd.gradcheck(
        lambda e, a, s, f: crf_log_partition(e, a, s, f, mask, backend="reference"), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_partial_labels_and_log_partition(backend):
    emissions, transitions, start, end, mask, allowed = problem(dtype=torch.float32, seed=20)
    allowed = allowed | ~mask.unsqueeze(2)

    def loss(e, a, s, f):
        partial = crf_log_likelihood(e, allowed, a, s, f, mask, "sum", backend=backend)
        return partial + 0.5 * crf_log_partition(e, a, s, f, mask, backend=backend).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_inputs, compiled_inputs = leaves(emissions, transitions, start, end), leaves(emissions, transitions,
                                                                                          start, end)
    eager = loss(*eager_inputs)
    value = compiled(*compiled_inputs)
    torch.testing.assert_close(value, eager)
    for got, want in zip(grads(value, compiled_inputs), grads(eager, eager_inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_kbest(backend):
    emissions, transitions, start, end, mask, _ = problem(dtype=torch.float32, seed=21)
    torch._dynamo.reset()
    compiled = torch.compile(lambda e: crf_viterbi(e, transitions, start, end, mask, k=3, backend=backend),
                             fullgraph=True, backend="aot_eager")
    paths, scores = compiled(emissions)
    expected_paths, expected_scores = crf_viterbi(emissions, transitions, start, end, mask, k=3, backend=backend)
    assert torch.equal(paths, expected_paths)
    torch.testing.assert_close(scores, expected_scores)


def test_top_level_exports():
    assert fusedloss.crf_log_partition is crf_log_partition
