"""The public CRF API (``fusedloss.crf``): the module against pytorch-crf 0.7.2, ``allowed_transitions`` against
AllenNLP's published tables, constraints, input validation (a ValueError or TypeError naming the argument) and
torch.compile. Runs the reference backend, so these tests check this layer; the fused backends are checked against
the reference elsewhere."""

import re
import warnings

import pytest
import torch
import torchcrf

import fusedloss
from fusedloss import _dispatch
from fusedloss.crf import CONSTRAINT_SCORE, CRF, allowed_transitions, crf_log_likelihood, crf_marginals, crf_viterbi

BACKEND = "reference"


def module_pair(num_tags, batch_first, seed=0, dtype=torch.float64):
    """A torchcrf.CRF and a fusedloss.CRF holding the same (non-default) parameters."""
    torch.manual_seed(seed)
    theirs = torchcrf.CRF(num_tags, batch_first=batch_first).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = CRF(num_tags, batch_first=batch_first, backend=BACKEND).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def batch(batch_first, lengths, seq_len, num_tags, mask_dtype=torch.bool, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(len(lengths), seq_len, num_tags, generator=generator, dtype=dtype)
    tags = torch.randint(0, num_tags, (len(lengths), seq_len), generator=generator)
    mask = (torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]).to(mask_dtype)
    if not batch_first:
        emissions, tags, mask = emissions.transpose(0, 1), tags.transpose(0, 1), mask.transpose(0, 1)
    return emissions, tags, mask


def torchcrf_call(fn, *args, **kwargs):
    with warnings.catch_warnings():  # pytorch-crf passes uint8 masks to torch.where, which warns
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, None])
def test_forward_and_gradients_match_torchcrf(batch_first, reduction, mask_dtype):
    theirs, ours = module_pair(5, batch_first)
    emissions, tags, mask = batch(batch_first, [7, 3, 1, 7, 5], 7, 5, mask_dtype or torch.bool)
    if mask_dtype is None:
        mask = None
    results = []
    for module in (theirs, ours):
        module.zero_grad()
        leaf = emissions.clone().requires_grad_()
        llh = torchcrf_call(module, leaf, tags, mask, reduction=reduction)
        llh.sum().backward()
        results.append((llh, leaf.grad, *(p.grad for p in module.parameters())))
    assert results[1][0].shape == results[0][0].shape
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [False, True])
# K = 20 is above the reference's threshold for storing backpointers (its backtrace recomputes them).
@pytest.mark.parametrize("num_tags,lengths,seq_len", [(5, [9, 4, 1, 9], 9), (1, [3, 1], 3), (4, [1, 1], 1),
                                                      (20, [8, 5, 1, 8], 8)])
def test_decode_matches_torchcrf(batch_first, num_tags, lengths, seq_len):
    theirs, ours = module_pair(num_tags, batch_first, seed=1)
    emissions, _, mask = batch(batch_first, lengths, seq_len, num_tags, seed=1)
    assert ours.decode(emissions, mask) == theirs.decode(emissions, mask)
    assert ours.decode(emissions) == theirs.decode(emissions)
    tags, scores = ours.viterbi(emissions, mask)
    assert tags.shape == mask.shape and scores.shape == (len(lengths),)
    # The score is that of the decoded path: its log-likelihood plus log Z.
    llh = ours(emissions, tags.clamp(min=0), mask, reduction="none")
    log_partition = theirs._compute_normalizer(*(x.transpose(0, 1) if batch_first else x for x in (emissions, mask)))
    torch.testing.assert_close(scores, (llh + log_partition).detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [False, True])
def test_marginals_match_the_gradient_of_torchcrf(batch_first):
    """-∂ llh / ∂ e = P(y_t = k) - onehot(tags): pytorch-crf's autograd gives the marginals independently."""
    theirs, ours = module_pair(4, batch_first, seed=2)
    emissions, tags, mask = batch(batch_first, [6, 2, 5], 6, 4, seed=2)
    emissions.requires_grad_()
    (grad,) = torch.autograd.grad(-theirs(emissions, tags, mask), emissions)
    onehot = torch.nn.functional.one_hot(tags, 4) * mask.unsqueeze(2)
    marginals = ours.marginals(emissions.detach(), mask)
    torch.testing.assert_close(marginals, grad + onehot, rtol=1e-10, atol=1e-10)


def test_state_dict_round_trip_both_ways():
    theirs = torchcrf.CRF(6)
    ours = CRF(6, constraints=allowed_transitions("BIO", ["O", "B-A", "I-A", "B-B", "I-B", "O"][:6]))
    ours.load_state_dict(theirs.state_dict())
    for name, p in theirs.named_parameters():
        assert torch.equal(getattr(ours, name), p)
    fresh = torchcrf.CRF(6)
    fresh.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, p in fresh.named_parameters():
        assert torch.equal(getattr(ours, name), p)


def test_module_looks_like_torchcrf():
    theirs, ours = torchcrf.CRF(7, batch_first=True), CRF(7, batch_first=True)
    assert repr(ours) == repr(theirs) == "CRF(num_tags=7)"
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert ours.num_tags == 7 and ours.batch_first
    big = CRF(200)
    for p in big.parameters():
        assert p.min() >= -0.1 and p.max() <= 0.1 and p.std() > 0.05  # uniform(-0.1, 0.1)
    assert fusedloss.CRF is CRF and fusedloss.nn.CRF is CRF


BAD_MODULE_CALLS = [
    ("emissions", lambda e, t, m: (e[0], t, m)),
    ("emissions", lambda e, t, m: (e[..., :4], t, m)),
    ("tags", lambda e, t, m: (e, t[:, :2], m)),
    ("mask", lambda e, t, m: (e, t, m[:2])),
    ("mask", lambda e, t, m: (e, t, torch.zeros_like(m))),
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", range(len(BAD_MODULE_CALLS)))
def test_module_errors_are_those_of_torchcrf(batch_first, case):
    argument, make_bad = BAD_MODULE_CALLS[case]
    theirs, ours = module_pair(5, batch_first)
    emissions, tags, mask = make_bad(*batch(batch_first, [4, 4, 4], 4, 5))
    calls = [lambda module: module(emissions, tags, mask)]
    if argument != "tags":
        calls.append(lambda module: module.decode(emissions, mask))
    for call in calls:
        with pytest.raises(ValueError) as expected:
            call(theirs)
        with pytest.raises(ValueError) as actual:
            call(ours)
        assert str(actual.value) == str(expected.value)


def test_module_bad_reduction_and_num_tags():
    theirs, ours = module_pair(3, False)
    emissions, tags, _ = batch(False, [2], 2, 3)
    with pytest.raises(ValueError, match="invalid reduction: avg"):
        ours(emissions, tags, reduction="avg")
    with pytest.raises(ValueError, match="invalid number of tags: 0"):
        CRF(0)


def test_k1_and_t1():
    _, ours = module_pair(1, True)
    emissions, tags, mask = batch(True, [1, 1], 1, 1)
    assert ours(emissions, tags, mask, reduction="none").abs().max() < 1e-12  # one path: probability 1
    assert ours.decode(emissions, mask) == [[0], [0]]
    assert torch.equal(ours.marginals(emissions, mask), torch.ones(2, 1, 1, dtype=torch.float64))


# AllenNLP's published expectations (tests/modules/conditional_random_field_test.py, test_allowed_transitions):
# pairs (from, to) with index K for START and K + 1 for END.
ALLENNLP_EXAMPLES = {
    ("BIO", ("O", "B-X", "I-X", "B-Y", "I-Y")): {
        (0, 0), (0, 1), (0, 3), (0, 6), (1, 0), (1, 1), (1, 2), (1, 3), (1, 6), (2, 0), (2, 1), (2, 2), (2, 3),
        (2, 6), (3, 0), (3, 1), (3, 3), (3, 4), (3, 6), (4, 0), (4, 1), (4, 3), (4, 4), (4, 6), (5, 0), (5, 1),
        (5, 3),
    },
    ("BIOUL", ("O", "B-X", "I-X", "L-X", "U-X", "B-Y", "I-Y", "L-Y", "U-Y")): {
        (0, 0), (0, 1), (0, 4), (0, 5), (0, 8), (0, 10), (1, 2), (1, 3), (2, 2), (2, 3), (3, 0), (3, 1), (3, 4),
        (3, 5), (3, 8), (3, 10), (4, 0), (4, 1), (4, 4), (4, 5), (4, 8), (4, 10), (5, 6), (5, 7), (6, 6), (6, 7),
        (7, 0), (7, 1), (7, 4), (7, 5), (7, 8), (7, 10), (8, 0), (8, 1), (8, 4), (8, 5), (8, 8), (8, 10), (9, 0),
        (9, 1), (9, 4), (9, 5), (9, 8),
    },
    ("IOB1", ("O", "B-X", "I-X", "B-Y", "I-Y")): {
        (0, 0), (0, 2), (0, 4), (0, 6), (1, 0), (1, 1), (1, 2), (1, 4), (1, 6), (2, 0), (2, 1), (2, 2), (2, 4),
        (2, 6), (3, 0), (3, 2), (3, 3), (3, 4), (3, 6), (4, 0), (4, 2), (4, 3), (4, 4), (4, 6), (5, 0), (5, 2),
        (5, 4),
    },
    ("BMES", ("B-X", "M-X", "E-X", "S-X", "B-Y", "M-Y", "E-Y", "S-Y")): {
        (0, 1), (0, 2), (1, 1), (1, 2), (2, 0), (2, 3), (2, 4), (2, 7), (2, 9), (3, 0), (3, 3), (3, 4), (3, 7),
        (3, 9), (4, 5), (4, 6), (5, 5), (5, 6), (6, 0), (6, 3), (6, 4), (6, 7), (6, 9), (7, 0), (7, 3), (7, 4),
        (7, 7), (7, 9), (8, 0), (8, 3), (8, 4), (8, 7),
    },
}


def as_pairs(allowed, allowed_start, allowed_end):
    num_tags = allowed.size(0)
    pairs = {tuple(ij) for ij in allowed.nonzero().tolist()}
    pairs |= {(num_tags, j) for j in allowed_start.nonzero().flatten().tolist()}
    pairs |= {(i, num_tags + 1) for i in allowed_end.nonzero().flatten().tolist()}
    return pairs


@pytest.mark.parametrize("scheme,labels", list(ALLENNLP_EXAMPLES))
def test_allowed_transitions_match_allennlp_examples(scheme, labels):
    triple = allowed_transitions(scheme, list(labels))
    assert [t.dtype for t in triple] == [torch.bool] * 3
    assert as_pairs(*triple) == ALLENNLP_EXAMPLES[scheme, labels]


@pytest.mark.parametrize("alias,scheme,labels", [
    ("iob2", "BIO", ("O", "B-X", "I-X", "B-Y", "I-Y")),
    ("bio", "BIO", ("O", "B-X", "I-X", "B-Y", "I-Y")),
    ("BILOU", "BIOUL", ("O", "B-X", "I-X", "L-X", "U-X", "B-Y", "I-Y", "L-Y", "U-Y")),
    ("bioes", "BIOUL", ("O", "B-X", "I-X", "L-X", "U-X", "B-Y", "I-Y", "L-Y", "U-Y")),
])
def test_scheme_aliases(alias, scheme, labels):
    assert as_pairs(*allowed_transitions(alias, list(labels))) == ALLENNLP_EXAMPLES[scheme, labels]


def test_bioes_spelling_with_e_and_s():
    """BIOES labels (E = end, S = single) follow the BIOUL rules, written out by hand here."""
    labels = ["O", "B-PER", "I-PER", "E-PER", "S-PER"]
    allowed, allowed_start, allowed_end = allowed_transitions("BIOES", labels)
    expected = torch.tensor([
        # O  B  I  E  S      (to)
        [1, 1, 0, 0, 1],  # O
        [0, 0, 1, 1, 0],  # B-PER
        [0, 0, 1, 1, 0],  # I-PER
        [1, 1, 0, 0, 1],  # E-PER
        [1, 1, 0, 0, 1],  # S-PER
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert allowed_start.tolist() == [True, True, False, False, True]
    assert allowed_end.tolist() == [True, False, False, True, True]


def test_bio_entity_types_do_not_mix():
    allowed, _, _ = allowed_transitions("BIO", ["B-PER", "I-PER", "B-LOC", "I-LOC", "O"])
    assert allowed[0, 1] and not allowed[0, 3] and not allowed[3, 1] and allowed[2, 3] and not allowed[4, 1]


@pytest.mark.parametrize("scheme,labels,named", [
    ("BIOX", ["O"], "BIOX"),
    ("BIO", ["O", "X-PER"], "X-PER"),
    ("BIO", ["O", "B-"], "B-"),
    ("BIO", ["O", ""], "labels[1]"),
    ("BMES", ["O", "B-X"], "labels[0]"),
    ("IOB1", ["O", "BPER"], "BPER"),
])
def test_allowed_transitions_bad_input(scheme, labels, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        allowed_transitions(scheme, labels)


def test_allennlp_constrained_viterbi_example():
    """AllenNLP's test_constrained_viterbi_tags: its logits, transitions and constraints, its expected paths."""
    logits = torch.tensor([
        [[0, 0, 0.5, 0.5, 0.2], [0, 0, 0.3, 0.3, 0.1], [0, 0, 0.9, 10, 1]],
        [[0, 0, 0.2, 0.5, 0.2], [0, 0, 3, 0.3, 0.1], [0, 0, 0.9, 1, 1]],
    ])
    allowed = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4), (4, 0)]:
        allowed[i, j] = True
    crf = CRF(5, batch_first=True, constraints=(allowed, torch.ones(5, dtype=torch.bool),
                                                torch.ones(5, dtype=torch.bool)), backend=BACKEND)
    with torch.no_grad():
        crf.transitions.copy_(torch.tensor([
            [0.1, 0.2, 0.3, 0.4, 0.5], [0.8, 0.3, 0.1, 0.7, 0.9], [-0.3, 2.1, -5.6, 3.4, 4.0],
            [0.2, 0.4, 0.6, -0.3, -0.4], [1.0, 1.0, 1.0, 1.0, 1.0],
        ]))
        crf.start_transitions.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6]))
        crf.end_transitions.copy_(torch.tensor([-0.1, -0.2, 0.3, -0.4, -0.4]))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert crf.decode(logits, mask) == [[2, 3, 3], [2, 3]]


SCHEMES = [
    ("BIO", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
    ("BIOES", ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]),
    ("BMES", ["B-X", "M-X", "E-X", "S-X"]),
]


@pytest.mark.parametrize("scheme,labels", SCHEMES)
def test_constrained_decode_never_emits_forbidden_transitions(scheme, labels):
    allowed, allowed_start, allowed_end = allowed_transitions(scheme, labels)
    crf = CRF(len(labels), batch_first=True, constraints=(allowed, allowed_start, allowed_end), backend=BACKEND)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    emissions, _, mask = batch(True, [12, 7, 1, 2, 12, 5], 12, len(labels), seed=3, dtype=torch.float32)
    emissions = emissions * 100  # emissions that would win over any unconstrained transition score
    unconstrained_violations = 0
    for path in crf.decode(emissions, mask):
        assert allowed_start[path[0]] and allowed_end[path[-1]]
        assert all(allowed[a, b] for a, b in zip(path, path[1:]))
    # The test can fail: without constraints the same emissions decode to forbidden paths.
    free = CRF(len(labels), batch_first=True, backend=BACKEND)
    free.load_state_dict(crf.state_dict())
    for path in free.decode(emissions, mask):
        unconstrained_violations += not (allowed_start[path[0]] and allowed_end[path[-1]])
        unconstrained_violations += sum(not allowed[a, b] for a, b in zip(path, path[1:]))
    assert unconstrained_violations > 0


@pytest.mark.parametrize("scheme,labels", SCHEMES)
def test_constraints_keep_values_and_gradients_finite(scheme, labels):
    constraints = allowed_transitions(scheme, labels)
    crf = CRF(len(labels), batch_first=True, constraints=constraints, backend=BACKEND)
    emissions, _, mask = batch(True, [10, 4, 1], 10, len(labels), seed=4, dtype=torch.float32)
    emissions = (emissions * 300).requires_grad_()
    # Gold paths that break the constraints too: their log-likelihood is about CONSTRAINT_SCORE, not -inf.
    tags = torch.randint(0, len(labels), (3, 10), generator=torch.Generator().manual_seed(5))
    llh = crf(emissions, tags, mask, reduction="none")
    llh.sum().backward()
    assert torch.isfinite(llh).all() and (llh < -1000).any()
    for tensor in (emissions.grad, *(p.grad for p in crf.parameters())):
        assert torch.isfinite(tensor).all()
    assert torch.isfinite(crf.marginals(emissions, mask)).all()
    # Forbidden entries get no gradient: their score is the constant CONSTRAINT_SCORE.
    assert (crf.transitions.grad[~constraints[0]] == 0).all()


def test_constraints_are_buffers_that_follow_the_module():
    constraints = allowed_transitions("BIO", ["O", "B-X", "I-X"])
    crf = CRF(3, constraints=constraints).double()
    assert crf.allowed.dtype == torch.bool and torch.equal(crf.allowed, constraints[0])
    assert "allowed" not in crf.state_dict()
    transitions, start, end = crf._scores()
    assert transitions.dtype == torch.float64 and transitions[0, 2] == CONSTRAINT_SCORE and start[2] == CONSTRAINT_SCORE
    with pytest.raises(ValueError, match="constraints"):
        CRF(4, constraints=constraints)
    with pytest.raises(TypeError, match="constraints"):
        CRF(3, constraints=constraints[0])


# Functional API: one test per bad input: the exception type and the argument named.
def functional_args(batch_size=2, seq_len=3, num_tags=4):
    generator = torch.Generator().manual_seed(0)
    return dict(
        emissions=torch.randn(batch_size, seq_len, num_tags, generator=generator),
        tags=torch.randint(0, num_tags, (batch_size, seq_len), generator=generator),
        transitions=torch.randn(num_tags, num_tags, generator=generator),
        start_transitions=torch.randn(num_tags, generator=generator),
        end_transitions=torch.randn(num_tags, generator=generator),
        mask=torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
    )


BAD_INPUTS = [
    ("emissions", [[0.0]], TypeError),
    ("emissions", torch.randn(2, 3), ValueError),
    ("emissions", torch.randn(2, 3, 4, 1), ValueError),
    ("emissions", torch.ones(2, 3, 4, dtype=torch.int64), ValueError),
    ("emissions", torch.randn(2, 0, 4), ValueError),
    ("tags", [[0, 1, 2]], TypeError),
    ("tags", torch.zeros(2, 3, dtype=torch.int32), ValueError),
    ("tags", torch.zeros(3, 2, dtype=torch.int64), ValueError),
    ("tags", torch.tensor([[0, 1, 4], [0, 0, 0]]), ValueError),
    ("tags", torch.tensor([[0, 1, 2], [-1, 0, 0]]), ValueError),
    ("mask", torch.ones(2, 3, dtype=torch.float32), ValueError),
    ("mask", torch.ones(2, 4, dtype=torch.bool), ValueError),
    ("mask", torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool), ValueError),
    ("mask", torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.uint8), ValueError),
    ("mask", "all", TypeError),
    ("transitions", torch.randn(4, 3), ValueError),
    ("transitions", torch.randn(4), ValueError),
    ("transitions", torch.zeros(4, 4, dtype=torch.int64), ValueError),
    ("transitions", None, TypeError),
    ("start_transitions", torch.randn(3), ValueError),
    ("start_transitions", torch.zeros(4, dtype=torch.int64), ValueError),
    ("end_transitions", torch.randn(4, 1), ValueError),
    ("end_transitions", 0.0, TypeError),
    ("reduction", "avg", ValueError),
]


@pytest.mark.parametrize("name,value,error", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, value, error):
    args = functional_args()
    args[name] = value
    with pytest.raises(error, match=name):
        crf_log_likelihood(**args, backend=BACKEND)
    if name not in ("tags", "reduction"):
        del args["tags"]
        for fn in (crf_viterbi, crf_marginals):
            with pytest.raises(error, match=name):
                fn(**args, backend=BACKEND)


def test_tags_past_the_end_are_ignored():
    """Tags at masked positions may hold anything (e.g. -100 padding): they are not read."""
    args = functional_args()
    expected = crf_log_likelihood(**args, reduction="none", backend=BACKEND)
    args["tags"] = args["tags"].clone()
    args["tags"][1, 2] = -100
    torch.testing.assert_close(crf_log_likelihood(**args, reduction="none", backend=BACKEND), expected)


def test_functional_reductions_and_layout():
    args = functional_args()
    llh = crf_log_likelihood(**args, reduction="none", backend=BACKEND)
    assert llh.shape == (2,)
    torch.testing.assert_close(crf_log_likelihood(**args, backend=BACKEND), llh.sum())
    torch.testing.assert_close(crf_log_likelihood(**args, reduction="mean", backend=BACKEND), llh.mean())
    torch.testing.assert_close(crf_log_likelihood(**args, reduction="token_mean", backend=BACKEND), llh.sum() / 5)
    del args["tags"]
    tags, scores = crf_viterbi(**args, backend=BACKEND)
    assert tags.shape == (2, 3) and tags[1, 2] == -1 and scores.shape == (2,)
    marginals = crf_marginals(**args, backend=BACKEND)
    torch.testing.assert_close(marginals.sum(2), args["mask"].float())


def test_backend_argument_reaches_the_dispatcher(monkeypatch):
    """``backend`` goes to fusedloss._dispatch: "auto" honours FUSEDLOSS_BACKEND, an unknown name is refused."""
    args = functional_args()
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", "reference")  # FUSEDLOSS_BACKEND as read at import
    torch.testing.assert_close(crf_log_likelihood(**args), crf_log_likelihood(**args, backend=BACKEND))
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", "fortran")
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    with pytest.raises(ValueError, match="backend"):
        crf_log_likelihood(**args)
    with pytest.raises(ValueError, match="backend"):
        CRF(4, backend="fortran").decode(args["emissions"])


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the module's public code (the eager backend: only tracing matters)."""
    crf = CRF(3, batch_first=True, constraints=allowed_transitions("BIO", ["O", "B-X", "I-X"]), backend=BACKEND)
    emissions, tags, mask = batch(True, [4, 2], 4, 3, dtype=torch.float32)

    def step(emissions, tags, mask):
        return crf(emissions, tags, mask, reduction="token_mean"), crf.viterbi(emissions, mask), crf.marginals(
            emissions, mask
        )

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for actual, expected in zip(compiled(emissions, tags, mask), step(emissions, tags, mask)):
        torch.testing.assert_close(actual, expected)


def test_module_as_a_data_parallel_replica():
    """A DataParallel replica holds the transition tensors as plain attributes (its _parameters is emptied): the
    module reads them there too."""
    crf = fusedloss.CRF(5, batch_first=True)
    replica = crf._replicate_for_data_parallel()
    for name in ("transitions", "start_transitions", "end_transitions"):
        setattr(replica, name, getattr(crf, name) * 1.0)
    assert "transitions" not in replica._parameters
    emissions = torch.randn(2, 4, 5)
    tags = torch.randint(0, 5, (2, 4))
    assert replica.decode(emissions) == crf.decode(emissions)
    torch.testing.assert_close(replica(emissions, tags), crf(emissions, tags))
