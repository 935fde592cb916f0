"""The reference CRF (``fusedloss.reference.crf``) against oracles nobody here wrote: brute-force enumeration
of every tag path for tiny CRFs, pytorch-crf for long sequences and low precision, and finite differences
(``torch.autograd.gradcheck``) for the gradients."""

import itertools
import math

import pytest
import torch
import torchcrf

from fusedloss.reference import crf as reference


def random_crf(batch, seq_len, num_tags, lengths=None, dtype=torch.float64, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    emissions = (scale * torch.randn(batch, seq_len, num_tags, generator=generator, dtype=torch.float64)).to(dtype)
    transitions = torch.randn(num_tags, num_tags, generator=generator, dtype=torch.float64).to(dtype)
    start = torch.randn(num_tags, generator=generator, dtype=torch.float64).to(dtype)
    end = torch.randn(num_tags, generator=generator, dtype=torch.float64).to(dtype)
    tags = torch.randint(0, num_tags, (batch, seq_len), generator=generator)
    if lengths is None:
        lengths = [seq_len] * batch
    mask = torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]
    return emissions, tags.masked_fill(~mask, 0), mask, transitions, start, end


def path_score(emissions, path, transitions, start, end):
    """score(y) of one sequence, written out term by term in Python floats."""
    total = float(start[path[0]]) + float(end[path[-1]])
    total += sum(float(emissions[t, tag]) for t, tag in enumerate(path))
    total += sum(float(transitions[a, b]) for a, b in zip(path, path[1:]))
    return total


def brute_force(emissions, mask, transitions, start, end):
    """Per sequence: (log Z, {path: score}) over every tag path of its length."""
    results = []
    num_tags = emissions.size(2)
    for b in range(emissions.size(0)):
        length = int(mask[b].sum())
        scores = {
            path: path_score(emissions[b], path, transitions, start, end)
            for path in itertools.product(range(num_tags), repeat=length)
        }
        top = max(scores.values())
        log_partition = top + math.log(sum(math.exp(s - top) for s in scores.values()))
        results.append((log_partition, scores))
    return results


# (batch lengths, seq_len, num_tags): ragged batches, T = 1, K = 1.
TINY = [([3, 1, 2], 3, 3), ([4, 4], 4, 2), ([1, 1], 1, 3), ([2, 3], 3, 1), ([4, 2, 1, 3], 4, 3)]


@pytest.mark.parametrize("lengths,seq_len,num_tags", TINY)
def test_log_likelihood_matches_enumeration(lengths, seq_len, num_tags):
    emissions, tags, mask, transitions, start, end = random_crf(len(lengths), seq_len, num_tags, lengths)
    llh = reference.crf_log_likelihood(emissions, tags, mask, transitions, start, end)
    for b, (log_partition, scores) in enumerate(brute_force(emissions, mask, transitions, start, end)):
        gold = tuple(tags[b, : lengths[b]].tolist())
        assert llh[b].item() == pytest.approx(scores[gold] - log_partition, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("lengths,seq_len,num_tags", TINY)
def test_viterbi_matches_enumeration(lengths, seq_len, num_tags):
    emissions, _, mask, transitions, start, end = random_crf(len(lengths), seq_len, num_tags, lengths, seed=1)
    best_tags, best_scores = reference.crf_viterbi(emissions, mask, transitions, start, end)
    assert best_tags.dtype == torch.int64 and best_tags.shape == (len(lengths), seq_len)
    for b, (_, scores) in enumerate(brute_force(emissions, mask, transitions, start, end)):
        best_path = max(scores, key=scores.get)
        assert best_tags[b].tolist() == list(best_path) + [-1] * (seq_len - lengths[b])
        assert best_scores[b].item() == pytest.approx(scores[best_path], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("lengths,seq_len,num_tags", TINY)
def test_marginals_match_enumeration(lengths, seq_len, num_tags):
    emissions, _, mask, transitions, start, end = random_crf(len(lengths), seq_len, num_tags, lengths, seed=2)
    marginals = reference.crf_marginals(emissions, mask, transitions, start, end)
    expected = torch.zeros_like(marginals)
    for b, (log_partition, scores) in enumerate(brute_force(emissions, mask, transitions, start, end)):
        for path, score in scores.items():
            for t, tag in enumerate(path):
                expected[b, t, tag] += math.exp(score - log_partition)
    torch.testing.assert_close(marginals, expected, rtol=1e-12, atol=1e-12)


def test_constrained_paths_match_enumeration_of_allowed_paths():
    """With forbidden transitions at -1e4, log Z, Viterbi and marginals are those of the allowed paths only."""
    emissions, tags, mask, transitions, start, end = random_crf(3, 4, 3, [4, 3, 1], seed=3)
    allowed = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    allowed_start = torch.tensor([1, 0, 1], dtype=torch.bool)
    allowed_end = torch.tensor([1, 1, 0], dtype=torch.bool)
    constrained = (
        torch.where(allowed, transitions, -1e4),
        torch.where(allowed_start, start, -1e4),
        torch.where(allowed_end, end, -1e4),
    )

    def is_allowed(path):
        inner = all(allowed[a, b] for a, b in zip(path, path[1:]))
        return bool(allowed_start[path[0]] and allowed_end[path[-1]] and inner)

    tags = torch.tensor([[0, 1, 2, 0], [2, 2, 0, 0], [0, 0, 0, 0]])  # allowed gold paths
    llh = reference.crf_log_likelihood(emissions, tags, mask, *constrained)
    best_tags, best_scores = reference.crf_viterbi(emissions, mask, *constrained)
    marginals = reference.crf_marginals(emissions, mask, *constrained)
    for b, (_, scores) in enumerate(brute_force(emissions, mask, transitions, start, end)):
        scores = {path: s for path, s in scores.items() if is_allowed(path)}
        top = max(scores.values())
        log_partition = top + math.log(sum(math.exp(s - top) for s in scores.values()))
        length = int(mask[b].sum())
        gold = tuple(tags[b, :length].tolist())
        assert llh[b].item() == pytest.approx(scores[gold] - log_partition, rel=1e-12)
        best_path = max(scores, key=scores.get)
        assert best_tags[b, :length].tolist() == list(best_path)
        assert best_scores[b].item() == pytest.approx(scores[best_path], rel=1e-12)
        expected = torch.zeros(length, 3, dtype=torch.float64)
        for path, score in scores.items():
            for t, tag in enumerate(path):
                expected[t, tag] += math.exp(score - log_partition)
        torch.testing.assert_close(marginals[b, :length], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_tags", [4, 20])  # stored and recomputed backpointers
def test_viterbi_ties_go_to_the_lowest_index(num_tags):
    emissions = torch.zeros(2, 3, num_tags)
    transitions, start, end = torch.zeros(num_tags, num_tags), torch.zeros(num_tags), torch.zeros(num_tags)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    best_tags, best_scores = reference.crf_viterbi(emissions, mask, transitions, start, end)
    assert best_tags.tolist() == [[0, 0, 0], [0, 0, -1]]
    emissions[:, :, 1:3] = 1.0  # tags 1 and 2 tie everywhere
    assert reference.crf_viterbi(emissions, mask, transitions, start, end)[0].tolist() == [[1, 1, 1], [1, 1, -1]]


def test_gradcheck_log_likelihood():
    emissions, tags, mask, transitions, start, end = random_crf(3, 4, 3, [4, 2, 1], seed=4)
    inputs = [t.clone().requires_grad_() for t in (emissions, transitions, start, end)]

    def llh(emissions, transitions, start, end):
        return reference.crf_log_likelihood(emissions, tags, mask, transitions, start, end)

    assert torch.autograd.gradcheck(llh, inputs)


def test_gradcheck_marginals():
    emissions, _, mask, transitions, start, end = random_crf(2, 3, 3, [3, 2], seed=5)
    inputs = [t.clone().requires_grad_() for t in (emissions, transitions)]

    def marginals(emissions, transitions):
        return reference.crf_marginals(emissions, mask, transitions, start, end)

    assert torch.autograd.gradcheck(marginals, inputs)


def test_marginals_are_the_gradient_of_log_partition():
    """∂ log Z / ∂ e[t, k] = P(y_t = k), with log Z from pytorch-crf's autograd: an independent derivation."""
    emissions, _, mask, transitions, start, end = random_crf(4, 6, 5, [6, 3, 1, 5], seed=6)
    crf = torchcrf.CRF(5, batch_first=True).double()
    with torch.no_grad():
        crf.transitions.copy_(transitions), crf.start_transitions.copy_(start), crf.end_transitions.copy_(end)
    emissions.requires_grad_()
    log_partition = crf._compute_normalizer(emissions.transpose(0, 1), mask.transpose(0, 1)).sum()
    (expected,) = torch.autograd.grad(log_partition, emissions)
    marginals = reference.crf_marginals(emissions.detach(), mask, transitions, start, end)
    torch.testing.assert_close(marginals, expected * mask.unsqueeze(2), rtol=1e-12, atol=1e-12)


def float64_error(compute, inputs64, dtype):
    """|compute(inputs in dtype) - compute(inputs in float64)|, max over the output."""
    low = compute(*[x.to(dtype) if x.is_floating_point() else x for x in inputs64])
    return (low.double() - compute(*inputs64)).abs().max().item()


def torchcrf_log_likelihood(emissions, tags, mask, transitions, start, end):
    crf = torchcrf.CRF(emissions.size(2), batch_first=True).to(emissions.dtype)
    with torch.no_grad():
        crf.transitions.copy_(transitions), crf.start_transitions.copy_(start), crf.end_transitions.copy_(end)
    return crf(emissions, tags, mask, reduction="none")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_emissions_accumulate_in_float32(half):
    """Half emissions with float32 transitions: the result is float32 and as accurate as pytorch-crf in float32
    on the same (rounded) inputs, i.e. float32 accumulation, far better than a computation in the half type."""
    emissions, tags, mask, transitions, start, end = random_crf(4, 64, 7, [64, 50, 9, 1], scale=3.0, seed=7)
    emissions = emissions.to(half).double()  # the values a half tensor can hold, exactly
    inputs64 = (emissions, tags, mask, transitions, start, end)
    expected = reference.crf_log_likelihood(*inputs64)

    params32 = [x.float() for x in (transitions, start, end)]
    result = reference.crf_log_likelihood(emissions.to(half), tags, mask, *params32)
    assert result.dtype == torch.float32
    float32_error = float64_error(torchcrf_log_likelihood, inputs64, torch.float32)
    assert (result.double() - expected).abs().max().item() <= 2 * float32_error + 1e-6

    # All in the half type: float32 arithmetic, then one rounding to the half type.
    params_half = [x.to(half) for x in (transitions, start, end)]
    result = reference.crf_log_likelihood(emissions.to(half), tags, mask, *params_half)
    assert result.dtype == half
    transitions_rounded = [x.to(half).double() for x in (transitions, start, end)]
    expected = reference.crf_log_likelihood(emissions, tags, mask, *transitions_rounded)
    half_rounding = torch.finfo(half).eps * expected.abs()
    assert ((result.double() - expected).abs() <= half_rounding + 2 * float32_error + 1e-6).all()
    # The test can tell: pytorch-crf computing in the half type itself is far off.
    assert float64_error(torchcrf_log_likelihood, inputs64, half) > 10 * (2 * float32_error + 1e-6)


def test_long_sequence_with_large_emissions():
    """T = 4096, emissions in the hundreds: log Z stays finite and as accurate as pytorch-crf's float32."""
    emissions, tags, mask, transitions, start, end = random_crf(2, 4096, 5, [4096, 3001], scale=100.0, seed=8)
    inputs64 = (emissions, tags, mask, transitions, start, end)
    inputs32 = tuple(x.float() if x.is_floating_point() else x for x in inputs64)
    with torch.no_grad():
        expected = torchcrf_log_likelihood(*inputs64)
        float32_error = (torchcrf_log_likelihood(*inputs32).double() - expected).abs().max().item()
        result = reference.crf_log_likelihood(*inputs32)
        assert torch.isfinite(result).all()
        assert (result.double() - expected).abs().max().item() <= 2 * float32_error + 1e-3
        torch.testing.assert_close(reference.crf_log_likelihood(*inputs64), expected, rtol=1e-12, atol=1e-9)


def test_nan_past_the_end_stays_there():
    """NaN in emissions at masked positions reaches no value and no gradient: every output (log-likelihood, the
    gradients of all four inputs, marginals, Viterbi path and score) is bit for bit what the same call gives with
    finite emissions there."""
    clean, tags, mask, transitions, start, end = random_crf(2, 5, 3, [5, 2], seed=9)
    emissions = clean.clone()
    emissions[1, 3] = float("nan")

    def outputs(em):
        params = [x.clone().requires_grad_() for x in (em, transitions, start, end)]
        llh = reference.crf_log_likelihood(params[0], tags, mask, *params[1:])
        llh.sum().backward()
        paths, scores = reference.crf_viterbi(em, mask, transitions, start, end)
        return [llh.detach()] + [p.grad for p in params] + [
            reference.crf_marginals(em, mask, transitions, start, end), paths, scores]

    names = ("log-likelihood", "emission gradient", "transition gradient", "start gradient", "end gradient",
             "marginals", "path", "path score")
    for name, got, want in zip(names, outputs(emissions), outputs(clean)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_result_dtype_is_promoted():
    emissions, tags, mask, transitions, start, end = random_crf(2, 3, 3, seed=10)
    llh = reference.crf_log_likelihood(emissions.float(), tags, mask, transitions, start, end)
    assert llh.dtype == torch.float64
    best_tags, best_scores = reference.crf_viterbi(emissions.bfloat16(), mask, transitions.float(), start, end)
    assert best_scores.dtype == torch.float32
    assert reference.crf_marginals(emissions.half(), mask, transitions.half(), start, end).dtype == torch.float16
