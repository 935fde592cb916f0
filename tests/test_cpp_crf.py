"""The ``cpp`` backend of the CRF ops (``fusedloss._ext.crf``, kernels in csrc/kernels/crf.h) against the float64
reference (``fusedloss.reference.crf``) and pytorch-crf 0.7.2: log-likelihood values and the gradients of all
four inputs, Viterbi tags and scores, decode, marginals; constraints from ``allowed_transitions``, ragged
masks, K = 1, T = 1, K = 300 (int16 backpointers), fp16/bf16 emissions, emissions in the hundreds at T = 2000,
determinism across thread counts, and ``torch.compile``.

Tolerances: a low-precision result passes when its error against the float64 reference is at most
twice the error of the reference computed in that same precision, plus a few units of rounding of the
result's size (so that a reference that happens to be exact does not make the bound 0).
"""

import pytest
import torch

import fusedloss
from _backends import available, requires_backend
from fusedloss.reference import crf as ref

# Every test needs the extension: skipped without it, a failure in CI (tests/_backends.py).
pytestmark = requires_backend("cpp")

if available("cpp"):
    from fusedloss._ext import crf as cpp

torchcrf = pytest.importorskip("torchcrf")

CONSTRAINT_SCORE = -1e4


def make_case(batch, length, num_tags, *, seed=0, ragged=True, scale=1.0, dtype=torch.float32):
    """Emissions (B, T, K), tags, a left-aligned mask with random lengths (the first sequence full), and
    transition parameters in float32."""
    gen = torch.Generator().manual_seed(seed)
    emissions = (scale * torch.randn(batch, length, num_tags, generator=gen)).to(dtype)
    tags = torch.randint(0, num_tags, (batch, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen) if ragged else torch.full((batch,), length)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tags = tags.masked_fill(~mask, 0)
    transitions = torch.randn(num_tags, num_tags, generator=gen) * 0.5
    start = torch.randn(num_tags, generator=gen) * 0.5
    end = torch.randn(num_tags, generator=gen) * 0.5
    return emissions, tags, mask, transitions, start, end


def constrain(transitions, start, end, scheme, labels):
    """Fold ``allowed_transitions`` into the parameters as the public layer does (-1e4 entries)."""
    allowed, allowed_start, allowed_end = fusedloss.allowed_transitions(scheme, labels)
    return (transitions.masked_fill(~allowed, CONSTRAINT_SCORE), start.masked_fill(~allowed_start, CONSTRAINT_SCORE),
            end.masked_fill(~allowed_end, CONSTRAINT_SCORE))


def log_likelihood_and_grads(fn, emissions, tags, mask, transitions, start, end, grad_seed=1):
    """``fn``'s log-likelihood and the gradients of ``sum_b g_b * llh_b`` for random g w.r.t. the four inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    llh = fn(leaves[0], tags, mask, *leaves[1:])
    g = torch.randn(llh.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    llh.backward(g.to(llh.dtype))
    return [llh.detach()] + [x.grad for x in leaves]


def assert_derived_close(got, ref_low, ref64, name, magnitude=1.0):
    """|got − ref64| ≤ 2 |ref_low − ref64| + 4 eps(got) · max(|ref64|, magnitude), elementwise maxima.

    ``magnitude``: the size of the log-space scores a result is a difference of. Forward–backward marginals
    (and so the gradients) are exp(α + β − log Z), whose exponent cancels numbers of size |log Z|: a kernel
    that keeps α and β in the compute dtype is exact to eps · |log Z| there, while the reference's autograd
    (local softmaxes) does not pay it, so its own error alone would be too tight a bound.
    """
    got64, low64 = got.double(), ref_low.double()
    error = (got64 - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item(), magnitude)
    allowed = 2 * (low64 - ref64).abs().max().item() + 4 * torch.finfo(got.dtype).eps * scale
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g}"


def log_partition_size(emissions, mask, transitions, start, end):
    """max_b |log Z_b| in float64 (a tolerance scale; log Z itself is checked through the log-likelihood)."""
    tags = torch.zeros(mask.shape, dtype=torch.int64)
    log_z = torch.ops.fusedloss.crf_log_likelihood_forward(*double(emissions), tags, mask,
                                                           *double(transitions, start, end), False)[1]
    return log_z.abs().max().item()


def double(*xs):
    return [x.double() for x in xs]


SHAPES = [(3, 7, 5), (1, 1, 1), (4, 1, 3), (2, 6, 1), (5, 13, 9), (2, 4, 300)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_likelihood_and_gradients_match_reference(shape, dtype):
    emissions, tags, mask, transitions, start, end = make_case(*shape)
    args = [x.to(dtype) for x in (emissions, transitions, start, end)]
    got = log_likelihood_and_grads(cpp.crf_log_likelihood, args[0], tags, mask, *args[1:])
    want64 = log_likelihood_and_grads(ref.crf_log_likelihood, *double(emissions), tags, mask,
                                      *double(transitions, start, end))
    names = ["log-likelihood", "d emissions", "d transitions", "d start", "d end"]
    if dtype == torch.float64:
        for name, a, b in zip(names, got, want64):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    else:
        want32 = log_likelihood_and_grads(ref.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
        size = log_partition_size(emissions, mask, transitions, start, end)
        for name, a, low, b in zip(names, got, want32, want64):
            assert a.dtype == torch.float32, name
            assert_derived_close(a, low, b, name, size)
    assert torch.all(got[1][~mask] == 0), "emission gradient past the end is 0"


@pytest.mark.parametrize("shape", [(4, 9, 6), (1, 1, 1), (3, 5, 1)], ids=lambda s: "B%d_T%d_K%d" % s)
def test_against_pytorch_crf(shape):
    """Values, gradients of all four parameters and decode, against torchcrf.CRF (batch_first)."""
    emissions, tags, mask, transitions, start, end = make_case(*shape, seed=3)
    crf = torchcrf.CRF(shape[2], batch_first=True)
    with torch.no_grad():
        crf.transitions.copy_(transitions)
        crf.start_transitions.copy_(start)
        crf.end_transitions.copy_(end)
    em = emissions.clone().requires_grad_()
    want = crf(em, tags, mask, reduction="none")
    want.sum().backward()
    got = log_likelihood_and_grads(cpp.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-5, atol=1e-5)
    # backward of sum(): the random g of log_likelihood_and_grads is replaced by ones here.
    leaves = [x.clone().requires_grad_() for x in (emissions, transitions, start, end)]
    cpp.crf_log_likelihood(leaves[0], tags, mask, *leaves[1:]).sum().backward()
    for leaf, want_grad in zip(leaves, (em.grad, crf.transitions.grad, crf.start_transitions.grad,
                                        crf.end_transitions.grad)):
        # pytorch-crf never touches transitions when T = 1 (grad None): the gradient is 0.
        want_grad = torch.zeros_like(leaf) if want_grad is None else want_grad
        torch.testing.assert_close(leaf.grad, want_grad, rtol=1e-5, atol=1e-5)
    paths, _ = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    decoded = [row[:n] for row, n in zip(paths.tolist(), mask.sum(1).tolist())]
    assert decoded == crf.decode(emissions, mask)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_viterbi_matches_reference(shape):
    emissions, _, mask, transitions, start, end = make_case(*shape, seed=5)
    got_tags, got_scores = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    want_tags, want_scores = ref.crf_viterbi(*double(emissions), mask, *double(transitions, start, end))
    assert torch.equal(got_tags, want_tags)
    assert torch.all(got_tags[~mask] == -1)
    assert got_scores.dtype == torch.float32
    torch.testing.assert_close(got_scores.double(), want_scores, rtol=1e-5, atol=1e-5)
    got64 = cpp.crf_viterbi(*double(emissions), mask, *double(transitions, start, end))
    assert torch.equal(got64[0], want_tags)
    torch.testing.assert_close(got64[1], want_scores, rtol=1e-12, atol=1e-12)


# Batches that the AVX-512 and AVX2 variants decode W = 16 or 8 sequences at a time, one per vector lane: full and
# partial groups, a last group too small for a batch run, ragged lengths (1 and T among them), and tag counts below,
# at and above one vector of tags.
@pytest.mark.parametrize("batch,length,num_tags", [(4, 7, 5), (16, 12, 9), (37, 21, 9), (21, 9, 1), (19, 6, 2),
                                                   (33, 11, 17), (20, 5, 40)])
@pytest.mark.parametrize("kind", ["random", "ties", "forbidden", "emissions of 1000", "float16", "nan"])
def test_batched_viterbi_matches_pytorch_crf_and_one_sequence_at_a_time(batch, length, num_tags, kind):
    emissions, _, mask, transitions, start, end = make_case(batch, length, num_tags, seed=11)
    mask[1, 1:] = False  # one sequence of length 1
    if kind == "ties":
        emissions, transitions, start, end = (x.mul(2).round() for x in (emissions, transitions, start, end))
    elif kind == "forbidden":  # −inf transitions and emissions: forbidden, not NaN
        gen = torch.Generator().manual_seed(12)
        transitions = transitions.masked_fill(torch.rand(transitions.shape, generator=gen) < 0.4, float("-inf"))
        emissions = emissions.masked_fill(torch.rand(emissions.shape, generator=gen) < 0.2, float("-inf"))
        start = start.masked_fill(torch.rand(start.shape, generator=gen) < 0.3, float("-inf"))
    elif kind == "emissions of 1000":
        emissions = emissions * 1000
    elif kind == "float16":
        emissions = emissions.half()
    elif kind == "nan":  # a NaN or +inf in one sequence makes its score NaN and leaves the others alone
        emissions[2, 0, 0], emissions[3 % batch, min(2, length - 1), num_tags - 1] = float("nan"), float("inf")
    paths, scores = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    threads = torch.get_num_threads()
    try:  # one thread: every sequence in one range (two threads split a batch of 4 into two runs of 2)
        torch.set_num_threads(1)
        one_thread = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread[0], paths) and torch.equal(one_thread[1].isnan(), scores.isnan())
    assert torch.equal(one_thread[1].nan_to_num(), scores.nan_to_num())
    # Each sequence alone (a one-sequence decode never takes the batch run): the same bits.
    for b in range(batch):
        one_path, one_score = cpp.crf_viterbi(emissions[b:b + 1], mask[b:b + 1], transitions, start, end)
        assert torch.equal(one_path[0], paths[b]), b
        assert torch.equal(one_score, scores[b:b + 1]) or (one_score.isnan().all() and scores[b].isnan()), b
    assert torch.all(paths[~mask] == -1)
    finite = ~scores.isnan()
    if kind == "nan":
        assert not finite[2] and finite.sum() >= batch - 2
    if kind != "forbidden":  # pytorch-crf's decode of a sequence with no allowed path is undefined
        crf = torchcrf.CRF(num_tags, batch_first=True)
        with torch.no_grad():
            crf.transitions.copy_(transitions)
            crf.start_transitions.copy_(start)
            crf.end_transitions.copy_(end)
        theirs = crf.decode(emissions.float(), mask)
        ours = [row[:n] for row, n in zip(paths.tolist(), mask.sum(1).tolist())]
        # Their float32 sums round in another order: exact ties may go either way there.
        if kind not in ("ties", "nan"):
            assert ours == theirs
    # Against the float64 reference: the same path, or (near a tie, rounded otherwise in float32) one whose float64
    # score, log-likelihood + log Z, is as good.
    e64, a64, s64, z64 = double(emissions, transitions, start, end)
    want_tags, want_scores = ref.crf_viterbi(e64, mask, a64, s64, z64)
    ours64 = (ref.crf_log_likelihood(e64, paths.clamp(min=0), mask, a64, s64, z64)
              + ref.crf_log_partition(e64, mask, a64, s64, z64))
    for b in torch.nonzero(finite & want_scores.isfinite()).flatten().tolist():
        if not torch.equal(paths[b], want_tags[b]):
            assert kind != "random", b
            torch.testing.assert_close(ours64[b], want_scores[b], rtol=1e-6, atol=1e-3 * (1 + want_scores[b].abs()))
    torch.testing.assert_close(scores[finite].double(), want_scores[finite], rtol=1e-5, atol=1e-2)


def test_viterbi_ties_go_to_the_lowest_tag():
    emissions = torch.zeros(1, 4, 3)
    zeros = torch.zeros(3)
    tags, scores = cpp.crf_viterbi(emissions, torch.ones(1, 4, dtype=torch.bool), torch.zeros(3, 3), zeros, zeros)
    assert tags.tolist() == [[0, 0, 0, 0]] and scores.item() == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_marginals_match_reference(shape):
    emissions, _, mask, transitions, start, end = make_case(*shape, seed=7)
    got = cpp.crf_marginals(emissions, mask, transitions, start, end)
    want64 = ref.crf_marginals(*double(emissions), mask, *double(transitions, start, end))
    want32 = ref.crf_marginals(emissions, mask, transitions, start, end)
    assert got.dtype == torch.float32 and torch.all(got[~mask] == 0)
    assert_derived_close(got, want32, want64, "marginals", log_partition_size(emissions, mask, transitions, start, end))
    got64 = cpp.crf_marginals(*double(emissions), mask, *double(transitions, start, end))
    torch.testing.assert_close(got64, want64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheme,labels", [
    ("BIO", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
    ("BIOES", ["O", "B-X", "I-X", "E-X", "S-X", "B-Y", "I-Y", "E-Y", "S-Y"]),
])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_constraints(scheme, labels, scale):
    """Forbidden transitions: exact values and gradients (no NaN), paths that obey the scheme. With emissions
    x100 the allowed predecessors of a tag often lie far below the best tag: the guarded exact path."""
    emissions, tags, mask, transitions, start, end = make_case(4, 11, len(labels), seed=11, scale=scale)
    transitions, start, end = constrain(transitions, start, end, scheme, labels)
    # Gold tags: a Viterbi path (allowed by construction) so the log-likelihood is finite and meaningful.
    tags = ref.crf_viterbi(*double(emissions), mask, *double(transitions, start, end))[0].clamp(min=0)
    got = log_likelihood_and_grads(cpp.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
    want64 = log_likelihood_and_grads(ref.crf_log_likelihood, *double(emissions), tags, mask,
                                      *double(transitions, start, end))
    want32 = log_likelihood_and_grads(ref.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
    size = log_partition_size(emissions, mask, transitions, start, end)
    for name, a, low, b in zip(["llh", "d emissions", "d transitions", "d start", "d end"], got, want32, want64):
        assert torch.isfinite(a).all(), name
        assert_derived_close(a, low, b, name, size)
    allowed, allowed_start, allowed_end = fusedloss.allowed_transitions(scheme, labels)
    assert torch.all(got[2][~allowed] == 0), "no pairwise mass on forbidden transitions of non-gold paths"
    paths, _ = cpp.crf_viterbi(emissions, mask, transitions, start, end)
    for row, n in zip(paths.tolist(), mask.sum(1).tolist()):
        assert allowed_start[row[0]] and allowed_end[row[n - 1]]
        assert all(allowed[a, b] for a, b in zip(row[: n - 1], row[1:n]))
    marginals = cpp.crf_marginals(emissions, mask, transitions, start, end)
    assert_derived_close(marginals, ref.crf_marginals(emissions, mask, transitions, start, end),
                         ref.crf_marginals(*double(emissions), mask, *double(transitions, start, end)), "marginals",
                         size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_emissions(dtype):
    """16-bit emissions accumulate in float32: result float32 (promoted with float32 transitions), emission
    gradient in the emissions' dtype; errors against float64 within twice the reference's own."""
    emissions, tags, mask, transitions, start, end = make_case(4, 17, 7, seed=13, dtype=dtype)
    got = log_likelihood_and_grads(cpp.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
    want_low = log_likelihood_and_grads(ref.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
    want64 = log_likelihood_and_grads(ref.crf_log_likelihood, *double(emissions), tags, mask,
                                      *double(transitions, start, end))
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    size = log_partition_size(emissions, mask, transitions, start, end)
    for name, a, low, b in zip(["llh", "d emissions", "d transitions", "d start", "d end"], got, want_low, want64):
        assert_derived_close(a, low, b, name, size)
    half_params = [x.to(dtype) for x in (transitions, start, end)]
    marginals = cpp.crf_marginals(emissions, mask, *half_params)
    assert marginals.dtype == dtype
    assert_derived_close(marginals, ref.crf_marginals(emissions, mask, *half_params),
                         ref.crf_marginals(*double(emissions), mask, *double(*half_params)), "marginals", size)


def test_large_emissions_long_sequence():
    """Emissions in the hundreds at T = 2000: log Z stays exact (the matrix form would underflow unguarded),
    and the float32 log-likelihood is as close to float64 as the reference's own float32 computation."""
    emissions, tags, mask, transitions, start, end = make_case(2, 2000, 9, seed=17, scale=100.0, ragged=False)
    tags = emissions.argmax(2)
    got, log_z, _, _ = torch.ops.fusedloss.crf_log_likelihood_forward(emissions, tags, mask, transitions, start, end,
                                                                     False)
    want64 = ref.crf_log_likelihood(*double(emissions), tags, mask, *double(transitions, start, end))
    want32 = ref.crf_log_likelihood(emissions, tags, mask, transitions, start, end)
    assert_derived_close(got, want32, want64, "log-likelihood")
    # log Z ~ 3e5 against a float64 sum of the emissions of the float64 best path (log Z is within log of the
    # number of paths of it) and against the float64 kernel.
    log_z64 = torch.ops.fusedloss.crf_log_likelihood_forward(*double(emissions), tags, mask,
                                                             *double(transitions, start, end), False)[1]
    best64 = ref.crf_viterbi(*double(emissions), mask, *double(transitions, start, end))[1]
    assert torch.all(log_z64 >= best64) and torch.all(log_z64 <= best64 + 2000 * torch.log(torch.tensor(9.0)))
    assert torch.isfinite(log_z).all()
    # Viterbi scores (|score| ~ 3e5) are normalized per step as well.
    scores = cpp.crf_viterbi(emissions, mask, transitions, start, end)[1]
    torch.testing.assert_close(scores.double(), best64, rtol=torch.finfo(torch.float32).eps, atol=0)
    # The float32 kernel sums the per-step offsets in float64, so each step rounds only its own increment
    # (eps · |increment|): at most eps · |log Z| in all, where a float32 running log Z would round ~3e5 at
    # every one of the 2000 steps (about 50 times that).
    torch.testing.assert_close(log_z, log_z64, rtol=torch.finfo(torch.float32).eps, atol=0)


def test_nan_stays_in_its_sequence():
    """NaN in an input propagates to the outputs it affects and no further: a NaN emission at an unmasked position
    makes that sequence's outputs NaN (and the transition gradients, which every sequence adds to); every other
    sequence's log-likelihood, emission gradient, Viterbi path and score and marginals are bit for bit what the same
    call gives without the NaN. A NaN past a sequence's end changes nothing at all."""
    clean, tags, mask, transitions, start, end = make_case(3, 6, 4, seed=31)
    mask[2, 4:] = False
    emissions = clean.clone()
    emissions[2, 5, 0] = float("nan")  # masked
    emissions[0, 2, 1] = float("nan")  # unmasked

    def outputs(em):
        llh, d_emissions, d_transitions, _, _ = log_likelihood_and_grads(cpp.crf_log_likelihood, em, tags, mask,
                                                                         transitions, start, end)
        paths, scores = cpp.crf_viterbi(em, mask, transitions, start, end)
        return {"log-likelihood": llh, "emission gradient": d_emissions, "transition gradient": d_transitions,
                "path": paths, "path score": scores, "marginals": cpp.crf_marginals(em, mask, transitions, start, end)}

    got, want = outputs(emissions), outputs(clean)
    assert got["log-likelihood"].isnan().tolist() == [True, False, False]
    assert got["emission gradient"][0].isnan().any() and got["marginals"][0].isnan().any()
    assert got["path score"][0].isnan() and got["transition gradient"].isnan().any()
    for name in ("log-likelihood", "emission gradient", "path", "path score", "marginals"):
        torch.testing.assert_close(got[name][1:], want[name][1:], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_thread_count_does_not_change_results():
    emissions, tags, mask, transitions, start, end = make_case(7, 23, 37, seed=19)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = log_likelihood_and_grads(cpp.crf_log_likelihood, emissions, tags, mask, transitions, start, end)
            out += list(cpp.crf_viterbi(emissions, mask, transitions, start, end))
            out.append(cpp.crf_marginals(emissions, mask, transitions, start, end))
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_backward_recomputes_alpha_when_not_saved():
    """An empty alpha makes the backward op recompute the forward recursion: the same gradients bit for bit."""
    emissions, tags, mask, transitions, start, end = make_case(5, 12, 6, seed=23)
    _, log_z, alpha, offsets = torch.ops.fusedloss.crf_log_likelihood_forward(emissions, tags, mask, transitions,
                                                                              start, end, True)
    grad = torch.randn(5)
    saved = torch.ops.fusedloss.crf_log_likelihood_backward(grad, emissions, tags, mask, transitions, start, end,
                                                            log_z, alpha, offsets)
    empty = torch.empty(0)
    recomputed = torch.ops.fusedloss.crf_log_likelihood_backward(grad, emissions, tags, mask, transitions, start,
                                                                 end, log_z, empty, empty.double())
    for a, b in zip(saved, recomputed):
        assert torch.equal(a, b)


def test_no_grad_saves_nothing():
    emissions, tags, mask, transitions, start, end = make_case(2, 5, 3)
    out = torch.ops.fusedloss.crf_log_likelihood_forward(emissions, tags, mask, transitions, start, end, False)
    assert out[2].numel() == 0 and out[3].numel() == 0


def test_tags_out_of_range_raise():
    """The forward kernel checks the tags it reads: a tag out of range is bad input, a ValueError naming tags."""
    emissions, tags, mask, transitions, start, end = make_case(2, 5, 3)
    tags[1, 0] = 3
    with pytest.raises(ValueError, match=r"tags must be in \[0, 3\) at unmasked positions"):
        cpp.crf_log_likelihood(emissions, tags, mask, transitions, start, end)


def test_opcheck_registrations():
    """Schema, fake kernel and autograd registration as torch.library checks them: every test of opcheck on the
    public op (its autograd is in C++), the schema and fake kernels of the device ops."""
    emissions, tags, mask, transitions, start, end = make_case(2, 4, 3)
    for m in (mask, None):
        torch.library.opcheck(torch.ops.fusedloss.crf_log_likelihood.default,
                              (emissions.clone().requires_grad_(), tags, m, transitions.clone().requires_grad_(),
                               start, end))
    torch.library.opcheck(torch.ops.fusedloss.crf_log_likelihood.default,
                          (emissions, tags, mask, transitions, start, end))
    torch.library.opcheck(torch.ops.fusedloss.crf_log_likelihood_forward.default,
                          (emissions, tags, mask, transitions, start, end, True),
                          test_utils=("test_schema", "test_faketensor"))
    for op in (torch.ops.fusedloss.crf_viterbi.default, torch.ops.fusedloss.crf_marginals.default):
        torch.library.opcheck(op, (emissions.detach(), mask, transitions.detach(), start, end),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the ops (fake kernels, registered autograd) with the same results."""
    emissions, tags, mask, transitions, start, end = make_case(3, 6, 4, seed=29)

    def loss(em, trans):
        return -cpp.crf_log_likelihood(em, tags, mask, trans, start, end).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        em, trans = emissions.clone().requires_grad_(), transitions.clone().requires_grad_()
        value = fn(em, trans)
        value.backward()
        results.append((value.detach(), em.grad, trans.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_dispatch_picks_cpp_for_cpu_tensors():
    emissions, _, mask, transitions, start, end = make_case(2, 3, 3)
    name, _ = fusedloss._dispatch.resolve("crf_viterbi", "auto", emissions.device, emissions, mask, transitions,
                                          start, end)
    assert name == "cpp"
