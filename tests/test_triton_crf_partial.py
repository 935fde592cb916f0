"""Triton kernels of the partial-label likelihood, log Z and the k-best paths (triton_kernels/crf.py) under
TRITON_INTERPRET=1, against brute-force enumeration of every tag path in float64.

Shapes are tiny (T <= 4, K <= 5: at most a few hundred paths a sequence) but reach every branch: ragged masks,
odd K, K split into tiles and a partial batch tile (forced through the launchers' tiling arguments), the batch
tile that runs the step as a ``tl.dot``, the k-best kernel's several tiles of output and predecessor tags, k
beyond the number of paths (padding with -1 and -inf), ties, bfloat16 emissions, forbidden transitions and
emissions in the thousands.
"""

import itertools

import pytest
import torch

from _backends import require_backend_for_module

# The kernels' modules import triton: without a usable Triton backend the module is skipped, and in CI fails
# (tests/_backends.py).
require_backend_for_module("triton")

from fusedloss.triton_kernels import crf as triton_crf  # noqa: E402

CONSTRAINT_SCORE = -1.0e4  # forbidden transitions as the public layer folds them in
GRAD_NAMES = ("emissions", "transitions", "start_transitions", "end_transitions")


def make_inputs(batch, seq_len, num_tags, seed=0, scale=1.0, constrained=False):
    """Random scores, a ragged left-aligned mask (the first sequence full), and allowed sets of one to K tags at
    each unmasked position, all-true past each end."""
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, seq_len, num_tags, generator=generator) * scale
    transitions = torch.randn(num_tags, num_tags, generator=generator)
    start = torch.randn(num_tags, generator=generator)
    end = torch.randn(num_tags, generator=generator)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    allowed = torch.rand(batch, seq_len, num_tags, generator=generator) < 0.5
    first = torch.randint(0, num_tags, (batch, seq_len), generator=generator)
    allowed |= torch.nn.functional.one_hot(first, num_tags).bool()
    allowed |= ~mask[:, :, None]
    if constrained:
        # A chain: tag j is reached only from j and j - 1, and only tag 0 starts (as BIO constraints do).
        tags = torch.arange(num_tags)
        chain = (tags[:, None] == tags[None, :]) | (tags[:, None] + 1 == tags[None, :])
        transitions = torch.where(chain, transitions, CONSTRAINT_SCORE)
        start = torch.where(tags == 0, start, CONSTRAINT_SCORE)
    return emissions, allowed, mask, transitions, start, end


def all_paths(length, num_tags):
    return torch.tensor(list(itertools.product(range(num_tags), repeat=length)))


def path_scores(emissions, paths, transitions, start, end):
    """Scores (P,) of the tag paths ``paths (P, L)`` of one sequence with emissions ``(L', K)``, L <= L'."""
    length = paths.size(1)
    scores = start[paths[:, 0]] + end[paths[:, -1]] + emissions[torch.arange(length), paths].sum(1)
    return scores + transitions[paths[:, :-1], paths[:, 1:]].sum(1)


def brute_force(emissions, allowed, mask, transitions, start, end):
    """``(log Z_allowed - log Z, log Z)`` (B,) by enumeration, differentiable (float64 leaves give the oracle's
    gradients)."""
    partial, log_z = [], []
    for b in range(emissions.size(0)):
        length = int(mask[b].sum())
        paths = all_paths(length, transitions.size(0))
        scores = path_scores(emissions[b], paths, transitions, start, end)
        inside = allowed[b, torch.arange(length), paths].all(1)
        log_z.append(torch.logsumexp(scores, 0))
        partial.append(torch.logsumexp(scores[inside], 0) - log_z[-1])
    return torch.stack(partial), torch.stack(log_z)


def oracle(emissions, allowed, mask, transitions, start, end, grad_output, which):
    """The brute force's value (0: partial, 1: log Z) and the gradients of ``Σ grad_output · value``, float64."""
    leaves = [x.detach().double().requires_grad_() for x in (emissions, transitions, start, end)]
    value = brute_force(leaves[0], allowed, mask, *leaves[1:])[which]
    (value * grad_output.double()).sum().backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def kernel(op, emissions, allowed, mask, transitions, start, end, grad_output, block_b=None, block_k=None):
    """A custom op's value and its gradients through the registered autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    if op is triton_crf._partial_log_likelihood_op:
        value = op(leaves[0], allowed, mask, *leaves[1:], block_b, block_k)[0]
    else:
        value = op(leaves[0], mask, *leaves[1:], block_b, block_k)[0]
    (value * grad_output.to(value.dtype)).sum().backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, what, magnitude=1.0):
    """float32 accuracy: a few ulps of the result, and for gradients one rounding of the scores' magnitude."""
    tolerance = 8 * torch.finfo(torch.float32).eps * max(1.0, magnitude)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance,
                               msg=lambda message: f"{what}: {message}")


# (B, T, K, block_b, block_k): None takes the launcher's default tiling.
CASES = [
    pytest.param(3, 4, 3, None, None, id="ragged-odd-K"),
    pytest.param(2, 1, 4, None, None, id="T1"),
    pytest.param(3, 3, 1, None, None, id="K1"),
    pytest.param(3, 3, 5, 2, 2, id="K-tiled-partial-batch-tile"),
    pytest.param(17, 3, 5, 16, 16, id="dot-tile"),
]


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", CASES)
def test_partial_log_likelihood_and_gradients_match_brute_force(batch, seq_len, num_tags, block_b, block_k):
    emissions, allowed, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=1)
    grad_output = torch.randn(batch, generator=torch.Generator().manual_seed(2))
    value, grads = kernel(triton_crf._partial_log_likelihood_op, emissions, allowed, mask, transitions, start, end,
                          grad_output, block_b, block_k)
    value64, grads64 = oracle(emissions, allowed, mask, transitions, start, end, grad_output, 0)
    assert value.dtype == torch.float32 and value.shape == (batch,)
    assert_close(value, value64, "partial log-likelihood", value64.abs().max().item())
    for name, grad, grad64 in zip(GRAD_NAMES, grads, grads64):
        assert grad.dtype == torch.float32
        assert_close(grad, grad64, f"grad of {name}", emissions.abs().max().item())
    assert torch.all(grads[0][~mask] == 0)
    # The sets past each end are never read: all-false there changes nothing.
    emptied = allowed & mask[:, :, None]
    again, grads_again = kernel(triton_crf._partial_log_likelihood_op, emissions, emptied, mask, transitions, start,
                                end, grad_output, block_b, block_k)
    assert torch.equal(again, value) and all(torch.equal(a, b) for a, b in zip(grads_again, grads))


@pytest.mark.parametrize("batch, seq_len, num_tags, block_b, block_k", CASES)
def test_log_partition_and_gradients_match_brute_force(batch, seq_len, num_tags, block_b, block_k):
    emissions, allowed, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=3)
    grad_output = torch.randn(batch, generator=torch.Generator().manual_seed(4))
    value, grads = kernel(triton_crf._log_partition_op, emissions, allowed, mask, transitions, start, end,
                          grad_output, block_b, block_k)
    value64, grads64 = oracle(emissions, allowed, mask, transitions, start, end, grad_output, 1)
    assert_close(value, value64, "log Z", value64.abs().max().item())
    for name, grad, grad64 in zip(GRAD_NAMES, grads, grads64):
        assert_close(grad, grad64, f"grad of {name}", emissions.abs().max().item())
    # With a unit incoming gradient the emission gradient is the marginals.
    _, unit_grads = kernel(triton_crf._log_partition_op, emissions, allowed, mask, transitions, start, end,
                           torch.ones(batch), block_b, block_k)
    marginals = triton_crf._marginals_op(emissions, mask, transitions, start, end, block_b, block_k)
    torch.testing.assert_close(unit_grads[0], marginals, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_b, block_k", [(None, None), (2, 2)], ids=["default", "tiled"])
def test_one_tag_allowed_sets_give_the_log_likelihood(block_b, block_k):
    """Allowed sets of one tag each are a full annotation: the value is that path's log-likelihood and the
    gradients those of crf_log_likelihood."""
    emissions, _, mask, transitions, start, end = make_inputs(3, 4, 3, seed=5)
    tags = torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(6)) * mask
    allowed = torch.nn.functional.one_hot(tags, 3).bool() | ~mask[:, :, None]
    grad_output = torch.randn(3, generator=torch.Generator().manual_seed(7))
    value, grads = kernel(triton_crf._partial_log_likelihood_op, emissions, allowed, mask, transitions, start, end,
                          grad_output, block_b, block_k)
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    ll = triton_crf._log_likelihood_op(leaves[0], tags, mask, *leaves[1:], block_b, block_k)[0]
    (ll * grad_output).sum().backward()
    torch.testing.assert_close(value, ll.detach(), rtol=1e-5, atol=1e-5)
    for name, grad, leaf in zip(GRAD_NAMES, grads, leaves):
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_bfloat16_emissions_accumulate_in_float32():
    emissions, allowed, mask, transitions, start, end = make_inputs(3, 3, 4, seed=8)
    emissions = emissions.to(torch.bfloat16)
    grad_output = torch.randn(3, generator=torch.Generator().manual_seed(9))
    for op, which in ((triton_crf._partial_log_likelihood_op, 0), (triton_crf._log_partition_op, 1)):
        value, grads = kernel(op, emissions, allowed, mask, transitions, start, end, grad_output)
        # The oracle sees the same bfloat16 values; the kernel computes in float32 and rounds the emission
        # gradient to bfloat16.
        value64, grads64 = oracle(emissions, allowed, mask, transitions, start, end, grad_output, which)
        assert value.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
        assert_close(value, value64, "value", value64.abs().max().item())
        torch.testing.assert_close(grads[0].double(), grads64[0], rtol=1e-2, atol=1e-2)
        for name, grad, grad64 in zip(GRAD_NAMES[1:], grads[1:], grads64[1:]):
            assert_close(grad, grad64, f"grad of {name}", emissions.abs().max().item())
    # bfloat16 transitions promote to float32 as well.
    value = triton_crf.crf_log_partition(emissions, mask, transitions.bfloat16(), start, end)
    assert value.dtype == torch.bfloat16


@pytest.mark.parametrize("block_b, block_k", [(None, None), (16, 16)], ids=["default", "dot"])
def test_forbidden_transitions_and_large_emissions_stay_finite_and_exact(block_b, block_k):
    """Emissions in the thousands with -1e4 transitions: the scaled recursions stay finite (the matrix-form
    step's underflow guard), and the values and gradients match the enumeration."""
    batch = 3 if block_b is None else 17
    emissions, allowed, mask, transitions, start, end = make_inputs(batch, 3, 4, seed=10, scale=1000.0,
                                                                    constrained=True)
    grad_output = torch.ones(batch)
    for op, which in ((triton_crf._partial_log_likelihood_op, 0), (triton_crf._log_partition_op, 1)):
        value, grads = kernel(op, emissions, allowed, mask, transitions, start, end, grad_output, block_b, block_k)
        value64, grads64 = oracle(emissions, allowed, mask, transitions, start, end, grad_output, which)
        assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
        assert_close(value, value64, "value", value64.abs().max().item())
        for name, grad, grad64 in zip(GRAD_NAMES, grads, grads64):
            assert_close(grad, grad64, f"grad of {name}", emissions.abs().max().item())


def list_viterbi(emissions, length, transitions, start, end, k):
    """The k-best list of one sequence by the list-Viterbi recursion with the documented order (score, then the
    lower previous tag, then the lower previous rank; finally score, then the lower last tag and rank), in
    float64 Python: the oracle for ties, where sorting the enumeration leaves the order open."""
    num_tags = transitions.size(0)
    lists = [[(float(start[j] + emissions[0, j]), [j])] for j in range(num_tags)]
    for t in range(1, length):
        new_lists = []
        for j in range(num_tags):
            candidates = [(score + float(transitions[i, j]), i, r, path)
                          for i in range(num_tags) for r, (score, path) in enumerate(lists[i])]
            candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
            new_lists.append([(score + float(emissions[t, j]), path + [j]) for score, _, _, path in candidates[:k]])
        lists = new_lists
    final = [(score + float(end[j]), j, r, path) for j in range(num_tags) for r, (score, path) in enumerate(lists[j])]
    final.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(score, path) for score, _, _, path in final[:k]]


def assert_kbest(paths, scores, emissions, mask, transitions, start, end, k, ties=False):
    """Paths and scores against the sorted enumeration (or, with ties, the list-Viterbi oracle); ranks beyond
    the K^L paths are -1 everywhere with score -inf."""
    batch, seq_len, num_tags = emissions.shape
    assert paths.shape == (batch, k, seq_len) and paths.dtype == torch.int64 and scores.shape == (batch, k)
    args64 = [x.double() for x in (emissions, transitions, start, end)]
    for b in range(batch):
        length = int(mask[b].sum())
        if ties:
            expected = list_viterbi(args64[0][b], length, *args64[1:], k)
        else:
            candidates = all_paths(length, num_tags)
            all_scores = path_scores(args64[0][b], candidates, *args64[1:])
            order = torch.sort(all_scores, descending=True, stable=True).indices[:k]
            expected = [(all_scores[i].item(), candidates[i].tolist()) for i in order]
        for r in range(k):
            if r < len(expected):
                score, path = expected[r]
                assert paths[b, r, :length].tolist() == path, f"sequence {b}, rank {r}"
                assert (paths[b, r, length:] == -1).all()
                assert abs(scores[b, r].item() - score) <= 8 * torch.finfo(torch.float32).eps * max(1.0, abs(score))
            else:
                assert (paths[b, r] == -1).all() and scores[b, r].item() == float("-inf"), f"sequence {b}, rank {r}"


# (B, T, K, k, block_j, block_i)
KBEST_CASES = [
    pytest.param(3, 3, 3, 4, None, None, id="ragged-odd-K"),
    pytest.param(3, 3, 3, 29, 2, 1, id="past-K^L-several-tiles"),
    pytest.param(2, 4, 2, 18, None, None, id="past-K^L"),
    pytest.param(2, 2, 5, 7, 4, 2, id="K-tiled"),
    pytest.param(2, 1, 3, 5, None, None, id="T1"),
    pytest.param(2, 3, 1, 3, None, None, id="K1"),
]


@pytest.mark.parametrize("batch, seq_len, num_tags, k, block_j, block_i", KBEST_CASES)
def test_kbest_viterbi_matches_the_sorted_enumeration(batch, seq_len, num_tags, k, block_j, block_i):
    emissions, _, mask, transitions, start, end = make_inputs(batch, seq_len, num_tags, seed=11)
    paths, scores = triton_crf._kbest_viterbi_op(emissions, mask, transitions, start, end, k, block_j, block_i)
    assert scores.dtype == torch.float32
    assert_kbest(paths, scores, emissions, mask, transitions, start, end, k)


@pytest.mark.parametrize("block_j, block_i", [(None, None), (2, 1)], ids=["one-tile", "tiled"])
def test_kbest_ties_follow_the_documented_order(block_j, block_i):
    """Integer scores make many paths tie: the order is the list-Viterbi recursion's, across tiles too."""
    generator = torch.Generator().manual_seed(12)
    emissions = torch.randint(-1, 2, (3, 3, 3), generator=generator).float()
    transitions = torch.randint(-1, 2, (3, 3), generator=generator).float()
    zeros = torch.zeros(3)
    mask = torch.tensor([[True] * 3, [True, True, False], [True] * 3])
    emissions[2] = 0.0
    paths, scores = triton_crf._kbest_viterbi_op(emissions, mask, transitions, zeros, zeros, 12, block_j, block_i)
    assert_kbest(paths, scores, emissions, mask, transitions, zeros, zeros, 12, ties=True)


def test_kbest_with_k_1_is_the_viterbi_path():
    emissions, _, mask, transitions, start, end = make_inputs(4, 4, 5, seed=13)
    paths, scores = triton_crf.crf_kbest_viterbi(emissions, mask, transitions, start, end, 1)
    best, best_scores = triton_crf.crf_viterbi(emissions, mask, transitions, start, end)
    assert torch.equal(paths[:, 0], best) and torch.equal(scores[:, 0], best_scores)


def test_kbest_with_forbidden_transitions_bfloat16_and_large_emissions():
    """Paths through -1e4 transitions are still paths, ranked last; bfloat16 emissions read as float32;
    emissions in the thousands give no NaN."""
    emissions, _, mask, transitions, start, end = make_inputs(2, 3, 3, seed=14, constrained=True)
    paths, scores = triton_crf.crf_kbest_viterbi(emissions, mask, transitions, start, end, 29)
    assert_kbest(paths, scores, emissions, mask, transitions, start, end, 29)
    half = emissions.bfloat16()
    paths, scores = triton_crf.crf_kbest_viterbi(half, mask, transitions, start, end, 5)
    assert scores.dtype == torch.float32
    assert_kbest(paths, scores, half.float(), mask, transitions, start, end, 5)
    large = emissions * 1000
    paths, scores = triton_crf.crf_kbest_viterbi(large, mask, transitions, start, end, 6)
    assert not scores.isnan().any()
    assert_kbest(paths, scores, large, mask, transitions, start, end, 6)


def test_reasons():
    emissions, allowed, mask, transitions, start, end = make_inputs(2, 2, 3)
    assert triton_crf.crf_partial_log_likelihood_reasons(emissions, allowed, mask, transitions, start, end) == []
    assert triton_crf.crf_log_partition_reasons(emissions, mask, transitions, start, end) == []
    assert triton_crf.crf_kbest_viterbi_reasons(emissions, mask, transitions, start, end, 64) == []
    reasons = triton_crf.crf_partial_log_likelihood_reasons(emissions.double(), allowed, mask, transitions, start,
                                                            end)
    assert len(reasons) == 1 and "float64" in reasons[0]
    reasons = triton_crf.crf_log_partition_reasons(emissions, mask, transitions.double(), start, end)
    assert len(reasons) == 1 and "transitions" in reasons[0]
    reasons = triton_crf.crf_kbest_viterbi_reasons(emissions, mask, transitions, start, end, 65)
    assert len(reasons) == 1 and "k = 65" in reasons[0]


def test_custom_ops_pass_opcheck():
    emissions, allowed, mask, transitions, start, end = make_inputs(2, 2, 3, seed=15)
    leaves = [x.requires_grad_() for x in (emissions, transitions, start, end)]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(triton_crf._partial_log_likelihood_op,
                          (leaves[0], allowed, mask, *leaves[1:], None, None), test_utils=checks)
    torch.library.opcheck(triton_crf._log_partition_op, (leaves[0], mask, *leaves[1:], None, None),
                          test_utils=checks)
    plain = [x.detach() for x in leaves]
    torch.library.opcheck(triton_crf._kbest_viterbi_op, (plain[0], mask, *plain[1:], 3, None, None),
                          test_utils=checks)


def test_torch_compile_fullgraph_with_backward():
    """The three entry points compile without graph breaks and give the eager values and gradients (aot_eager:
    Dynamo and AOT autograd over the custom ops' fake and autograd registrations)."""
    emissions, allowed, mask, transitions, start, end = make_inputs(2, 3, 3, seed=16)

    def loss(emissions, transitions, start, end):
        partial = triton_crf.crf_partial_log_likelihood(emissions, allowed, mask, transitions, start, end)
        log_z = triton_crf.crf_log_partition(emissions, mask, transitions, start, end)
        paths, scores = triton_crf.crf_kbest_viterbi(emissions, mask, transitions, start, end, 3)
        return -partial.sum() + 0.5 * log_z.sum(), paths, scores

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
        value, paths, scores = fn(*leaves)
        value.backward()
        results.append((value.detach(), paths, scores, [leaf.grad for leaf in leaves]))
    (value, paths, scores, grads), (compiled_value, compiled_paths, compiled_scores, compiled_grads) = results
    torch.testing.assert_close(compiled_value, value, rtol=0, atol=0)
    assert torch.equal(compiled_paths, paths) and torch.equal(compiled_scores, scores)
    for grad, compiled_grad in zip(grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("block_b, block_k", [(None, None), (2, 2)], ids=["default", "tiled"])
def test_an_all_off_mask_gives_nan_for_its_sequence_only(block_b, block_k):
    """A sequence of length 0 (unchecked on CUDA tensors): NaN value and a zero gradient, paths of -1 and NaN
    scores; the other sequences get exactly what a batch where it contributes nothing gives them."""
    emissions, allowed, mask, transitions, start, end = make_inputs(3, 3, 3, seed=17)
    bad_mask = mask.clone()
    bad_mask[1] = False
    clean_grad_output = torch.tensor([1.0, 0.0, 1.0])
    for op in (triton_crf._partial_log_likelihood_op, triton_crf._log_partition_op):
        value, grads = kernel(op, emissions, allowed, bad_mask, transitions, start, end, torch.ones(3), block_b,
                              block_k)
        clean, clean_grads = kernel(op, emissions, allowed, mask, transitions, start, end, clean_grad_output,
                                    block_b, block_k)
        assert torch.isnan(value[1]) and torch.equal(value[[0, 2]], clean[[0, 2]])
        assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))
        for grad, clean_grad in zip(grads, clean_grads):
            assert torch.equal(grad, clean_grad)
    paths, scores = triton_crf._kbest_viterbi_op(emissions, bad_mask, transitions, start, end, 4, None, None)
    clean_paths, clean_scores = triton_crf._kbest_viterbi_op(emissions, mask, transitions, start, end, 4, None, None)
    assert (paths[1] == -1).all() and scores[1].isnan().all()
    assert torch.equal(paths[[0, 2]], clean_paths[[0, 2]]) and torch.equal(scores[[0, 2]], clean_scores[[0, 2]])


def test_kbest_scores_of_a_sequence_with_a_nan_are_nan():
    """The selection's max skips NaN: a NaN emission at an unmasked step makes its sequence's scores NaN, one past
    the end changes nothing, and the other sequences keep theirs."""
    emissions, _, mask, transitions, start, end = make_inputs(3, 3, 3, seed=18)
    mask[2, 2] = False
    clean_paths, clean_scores = triton_crf.crf_kbest_viterbi(emissions, mask, transitions, start, end, 4)
    emissions[0, 1, 2] = float("nan")
    emissions[2, 2, 0] = float("nan")  # masked
    paths, scores = triton_crf.crf_kbest_viterbi(emissions, mask, transitions, start, end, 4)
    assert scores[0].isnan().all()
    assert torch.equal(scores[1:], clean_scores[1:]) and torch.equal(paths[1:], clean_paths[1:])
