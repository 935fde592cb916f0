"""Triton sigmoid and multi-label kernels (triton_kernels/sigmoid_loss.py) on CPU tensors under TRITON_INTERPRET=1.

Oracles, as in tests/test_sigmoid_reference.py: ``torch.nn.functional`` (BCE with logits, multilabel soft margin,
cross entropy), torchvision's published sigmoid focal formula, the ZLPR loop, a numpy transcription of the GHM-C
authors' loop over bins, the bi-tempered authors' published values and, for the bi-tempered gradient, their closed
form evaluated at float64 probabilities; the float64 reference for everything else. Values and gradients, with a
random ``grad_output``; tolerances as in tests/test_triton_softmax.py (twice PyTorch's own error in the same
dtype plus one rounding and a float32 summation bound).

Layouts: the elementwise kernels run with blocks of 16 elements (several programs, a masked tail); the row kernels
with the launcher's tile, and with blocks of 16 columns (rows of 37 classes over three blocks, online rescaling).
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_sigmoid_reference import (
    ACTIVATIONS,
    BAD,
    X,
    Y,
    _ghmc_authors,
    _ghmc_data,
    _torchvision_sigmoid_focal_loss,
    _zlpr_gradient,
    _zlpr_loop,
)
from test_triton_softmax import _assert_close_derived, _max_err, _value_and_grad

import fusedloss
from _backends import require_backend_for_module
from fusedloss import _dispatch
from fusedloss.reference import sigmoid as reference

# The kernels' modules import triton: without a usable Triton backend the module is skipped, and in CI fails
# (tests/_backends.py).
require_backend_for_module("triton")

from fusedloss.triton_kernels import sigmoid_loss as triton_sigmoid  # noqa: E402
from fusedloss.triton_kernels import softmax_loss as triton_softmax  # noqa: E402

TRITON = "triton"
LAYOUTS = {"tile": [], "blocks": [(triton_softmax, "_MAX_BLOCK_C", 16), (triton_softmax, "_TILE_ELEMENTS", 32),
                                  (triton_sigmoid, "_BI_TEMPERED_MAX_BLOCK_C", 16)]}


@pytest.fixture(autouse=True)
def small_element_blocks(monkeypatch):
    monkeypatch.setattr(triton_sigmoid, "_BLOCK", 16)


@pytest.fixture(params=list(LAYOUTS))
def layout(request, monkeypatch):
    for module, name, value in LAYOUTS[request.param]:
        monkeypatch.setattr(module, name, value)
    return request.param


def _logits(shape, seed=0, scale=3.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _binary(shape, seed=1):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.6).double()


def _check(fn_ours, fn_oracle, x64, dtype=torch.float32, what=""):
    """Ours on ``dtype`` against the oracle in float64, PyTorch's own error = the oracle run in ``dtype``."""
    oracle = _value_and_grad(fn_oracle, x64)
    pytorch = _value_and_grad(fn_oracle, x64.to(dtype))
    ours = _value_and_grad(fn_ours, x64.to(dtype))
    assert ours[0].shape == oracle[0].shape, what
    _assert_close_derived(ours[0], oracle[0], pytorch[0], dtype, x64.numel(), f"loss {what}")
    _assert_close_derived(ours[1], oracle[1], pytorch[1], dtype, x64.numel(), f"gradient {what}")


# ----------------------------------------------------------------------------------------------
# Elementwise: BCE with logits (torch) and sigmoid focal (torchvision's formula)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_bce_with_logits_equals_torch(reduction):
    x64 = _logits((3, 3, 5))  # tiles of 2 rows x 8 columns: masked rows and columns
    soft = torch.rand(3, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    for weight_shape, with_pos_weight in [(None, False), ((5,), True), ((3, 1, 5), True), ((3, 3, 5), False)]:
        weight = None if weight_shape is None else torch.rand(weight_shape, generator=generator, dtype=torch.float64)
        pos_weight = 3 * torch.rand(5, generator=generator, dtype=torch.float64) if with_pos_weight else None

        def run(fn, v, weight=weight, pos_weight=pos_weight, **backend):
            weight = None if weight is None else weight.to(v.dtype)
            pos_weight = None if pos_weight is None else pos_weight.to(v.dtype)
            return fn(v, soft.to(v.dtype), weight=weight, pos_weight=pos_weight, reduction=reduction, **backend)

        _check(lambda v: run(fusedloss.binary_cross_entropy_with_logits, v, backend=TRITON),
               lambda v: run(F.binary_cross_entropy_with_logits, v), x64, what=f"weight {weight_shape}")


def test_bce_shapes_without_a_class_dimension():
    """0-d, 1-d (one row of column blocks) and empty inputs, as torch (the mean of nothing is NaN)."""
    for x64 in (torch.tensor(1.5, dtype=torch.float64), _logits((40,), seed=4), torch.zeros(0, 3, dtype=torch.float64)):
        y = torch.rand(x64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        for reduction in ("none", "mean"):
            ours = fusedloss.binary_cross_entropy_with_logits(x64.float(), y.float(), reduction=reduction,
                                                              backend=TRITON)
            expected = F.binary_cross_entropy_with_logits(x64, y, reduction=reduction)
            assert ours.shape == expected.shape
            torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 0.5)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sigmoid_focal_equals_torchvision_formula(alpha, gamma, reduction):
    x64 = _logits((3, 4, 5))
    y = _binary((3, 4, 5))
    _check(lambda v: fusedloss.sigmoid_focal_loss(v, y.to(v.dtype), alpha, gamma, reduction, backend=TRITON),
           lambda v: _torchvision_sigmoid_focal_loss(v, y.to(v.dtype), alpha, gamma, reduction), x64)


def test_elementwise_extreme_logits():
    """±100 (and ±20, where 1 + e^-|x| rounds to 1): BCE exact to float32 rounding, focal finite and 0 at saturation."""
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0, 20.0, -20.0, 0.0]]).double()
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5]]).double()
    pos_weight = torch.full((7,), 2.0, dtype=torch.float64)
    loss, grad = _value_and_grad(
        lambda v: fusedloss.binary_cross_entropy_with_logits(v, y.float(), pos_weight=pos_weight.float(),
                                                             reduction="none", backend=TRITON), x.float())
    oracle = _value_and_grad(
        lambda v: F.binary_cross_entropy_with_logits(v, y, pos_weight=pos_weight, reduction="none"), x)
    # relative (e^-20 ~ 2e-9 losses too), down to float32's normal range (2 e^-100 is subnormal)
    tiny = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(loss, oracle[0], rtol=2e-7, atol=tiny)
    torch.testing.assert_close(grad, oracle[1], rtol=2e-7, atol=tiny)
    for gamma in (0.25, 2.0):
        loss, grad = _value_and_grad(
            lambda v, gamma=gamma: fusedloss.sigmoid_focal_loss(v, y.float(), 0.25, gamma, "none", backend=TRITON),
            x.float())
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[0, :2], torch.zeros(2))  # q = e^-100 is below float32's normal range
        exact = _torchvision_sigmoid_focal_loss(x, y, 0.25, gamma, "none")
        torch.testing.assert_close(loss, exact, rtol=1e-6, atol=1e-30)


# ----------------------------------------------------------------------------------------------
# Row losses: multilabel soft margin (torch), ZLPR (loop formula)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows", [1, 7])
def test_multilabel_soft_margin_equals_torch(layout, num_rows):
    x64 = _logits((num_rows, 37), seed=num_rows)
    y = _binary((num_rows, 37))
    weight = 0.5 + torch.rand(37, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for reduction, w in [("none", weight), ("sum", None), ("mean", weight)]:
        _check(lambda v, w=w, r=reduction: fusedloss.multilabel_soft_margin_loss(
                   v, y.bool(), None if w is None else w.to(v.dtype), reduction=r, backend=TRITON),
               lambda v, w=w, r=reduction: F.multilabel_soft_margin_loss(
                   v, y.to(v.dtype), None if w is None else w.to(v.dtype), reduction=r), x64, what=reduction)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_zlpr_equals_loop_formula(layout, reduction):
    x64 = _logits((6, 37))
    y = _binary((6, 37))
    y[0] = 0  # a row without positives
    y[1] = 1  # a row without negatives
    x64[2, :4] = torch.tensor([100.0, -100.0, 60.0, -60.0])  # extreme scores: the implicit 0 term matters
    x = x64.float().requires_grad_()
    loss = fusedloss.multilabel_categorical_crossentropy(x, y.long(), reduction, backend=TRITON)
    grad_output = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    rows = _zlpr_loop(x.detach().double(), y)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-6)
    row_scale = grad_output.double().reshape(-1, 1) / (6 if reduction == "mean" else 1)
    torch.testing.assert_close(grad.double(), row_scale * _zlpr_gradient(x.detach().double(), y), rtol=2e-6,
                               atol=1e-7)
    # and against the float64 reference with the derived tolerance, on ordinary scores
    x64 = _logits((6, 37), seed=6)
    _check(lambda v: fusedloss.multilabel_categorical_crossentropy(v, y.bool(), reduction, backend=TRITON),
           lambda v: reference.multilabel_categorical_crossentropy(v, y, reduction), x64)


def test_nan_stays_in_its_row_or_element():
    """NaN reaches its own element (elementwise losses) or row (row losses) and nothing else: everything else is
    bit for bit what the same call gives without the NaN, and matches the oracle."""
    x64 = _logits((5, 9), seed=10)
    y = _binary((5, 9))
    clean = x64.float()
    x = clean.clone()
    x[2, 4] = float("nan")
    keep = torch.tensor([0, 1, 3, 4])
    for ours_fn, oracle_fn, elementwise in [
        (lambda v: fusedloss.multilabel_soft_margin_loss(v, y.float(), reduction="none", backend=TRITON),
         lambda v: F.multilabel_soft_margin_loss(v, y[keep], reduction="none"), False),
        (lambda v: fusedloss.multilabel_categorical_crossentropy(v, y, "none", backend=TRITON),
         lambda v: reference.multilabel_categorical_crossentropy(v, y[keep], "none"), False),
        (lambda v: fusedloss.bi_tempered_logistic_loss(v, y.float() / 9, 0.5, 1.5, reduction="none", backend=TRITON),
         lambda v: reference.bi_tempered_logistic_loss(v, y[keep] / 9, 0.5, 1.5, 0.0, 5, "none"), False),
        (lambda v: fusedloss.bi_tempered_logistic_loss(v, y.float() / 9, 0.7, 0.8, reduction="none", backend=TRITON),
         lambda v: reference.bi_tempered_logistic_loss(v, y[keep] / 9, 0.7, 0.8, 0.0, 5, "none"), False),
        (lambda v: fusedloss.sigmoid_focal_loss(v, y.float(), backend=TRITON),
         lambda v: _torchvision_sigmoid_focal_loss(v, y[keep], 0.25, 2.0, "none"), True),
    ]:
        x_leaf, clean_leaf = x.clone().requires_grad_(), clean.clone().requires_grad_()
        loss, clean_loss = ours_fn(x_leaf), ours_fn(clean_leaf)
        (grad,) = torch.autograd.grad(loss.sum(), x_leaf)
        (clean_grad,) = torch.autograd.grad(clean_loss.sum(), clean_leaf)
        if elementwise:
            poisoned = torch.zeros(5, 9, dtype=torch.bool)
            poisoned[2, 4] = True
            assert torch.equal(loss.isnan(), poisoned) and torch.equal(grad.isnan(), poisoned)
            torch.testing.assert_close(loss[~poisoned], clean_loss[~poisoned], rtol=0, atol=0)
            torch.testing.assert_close(grad[~poisoned], clean_grad[~poisoned], rtol=0, atol=0)
        else:
            assert loss[2].isnan() and grad[2, 4].isnan()
        torch.testing.assert_close(loss[keep], clean_loss[keep], rtol=0, atol=0)
        torch.testing.assert_close(grad[keep], clean_grad[keep], rtol=0, atol=0)
        x_ref = x64[keep].clone().requires_grad_()
        expected = oracle_fn(x_ref)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x_ref)
        torch.testing.assert_close(loss[keep].double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[keep].double(), expected_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# GHM-C: the authors' loop over bins
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [1, 10, 30])
@pytest.mark.parametrize("masked", [False, True])
def test_ghmc_equals_authors_loop(bins, masked):
    x, y, label_weight = _ghmc_data(bins)
    x = x.float().double()  # the values the kernel sees, so that binning compares like with like
    mask = label_weight if masked else torch.ones_like(x)
    x_leaf = x.float().requires_grad_()
    loss = fusedloss.ghmc_loss(x_leaf, y.bool(), label_weight if masked else None, bins, backend=TRITON)
    loss.backward(torch.tensor(1.5))
    expected, expected_grad = _ghmc_authors(x.numpy(), y.numpy(), mask.numpy(), bins, 0.0, None)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-6, atol=0)
    torch.testing.assert_close(x_leaf.grad.double(), 1.5 * torch.from_numpy(expected_grad), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("bins", [10, 30])
def test_ghmc_bins_entries_on_and_next_to_the_edges(bins):
    """g exactly on each float32 edge i/bins and one ulp either side (x = -100: σ(x) = 0 in float32, so g = y):
    binning must follow the authors' comparisons with the float32 edges, not floor(g · bins). The authors' loop runs
    in float32 here, as their code does on float32 tensors."""
    edges = reference.ghmc_bin_edges(bins)[1:-1]
    y = torch.cat([edges, torch.nextafter(edges, torch.zeros(())), torch.nextafter(edges, torch.ones(())),
                   torch.tensor([0.0, 1.0, 0.5])])
    x = torch.full_like(y, -100.0, requires_grad=True)
    loss = fusedloss.ghmc_loss(x, y, bins=bins, backend=TRITON)
    loss.backward()
    expected, expected_grad = _ghmc_authors(x.detach().numpy(), y.numpy(), np.ones(len(y), np.float32), bins, 0.0,
                                            None)
    torch.testing.assert_close(x.grad, torch.from_numpy(expected_grad), rtol=1e-6, atol=1e-30)  # σ(-100) underflows
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=0)


def test_ghmc_module_momentum_state_follows_authors():
    module = fusedloss.nn.GHMCLoss(bins=10, momentum=0.75, backend=TRITON)
    acc_sum = np.zeros(10, dtype=np.float32)
    for step in range(3):
        x, y, label_weight = _ghmc_data(10 + step)
        x = x.float()
        loss = module(x, y.float(), label_weight.float())
        expected, _ = _ghmc_authors(x.double().numpy(), y.numpy(), label_weight.numpy(), 10, 0.75, acc_sum)
        torch.testing.assert_close(module.acc_sum, torch.from_numpy(acc_sum), rtol=1e-6, atol=0)
        torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# Bi-tempered: the authors' published values and closed-form gradient
# ----------------------------------------------------------------------------------------------


def test_bi_tempered_published_values():
    labels = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.2, 0.8, 0.0]])
    activations = torch.tensor(ACTIVATIONS)
    for t1, t2, num_iters, expected in [(0.5, 1.5, 5, [0.02301914, 0.18972909, 0.93874922]),
                                        (0.5, 0.8, 20, [0.21646356, 0.41836615, 1.33997854])]:
        loss = fusedloss.bi_tempered_logistic_loss(activations, labels, t1, t2, num_iters=num_iters, reduction="none",
                                                   backend=TRITON)
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    expected = torch.tensor([0.76652711, 0.08627685, 1.35443510])
    dense = fusedloss.bi_tempered_logistic_loss(activations, torch.eye(3), 0.5, 1.5, 0.1, reduction="none",
                                                backend=TRITON)
    sparse = fusedloss.bi_tempered_logistic_loss(activations, torch.arange(3), 0.5, 1.5, 0.1, reduction="none",
                                                 backend=TRITON)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse, dense)
    for t1, t2, expected in [(1.0, 1.0, 1.6583576), (0.9, 1.1, 0.45677936), (0.8, 1.2, 0.34298314),
                             (0.7, 1.3, 0.26295574)]:
        loss = fusedloss.bi_tempered_logistic_loss(activations[:1], torch.tensor([[0.2, 0.5, 0.3]]), t1, t2,
                                                   backend=TRITON)
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=0, atol=1e-5)


def _authors_gradient(x64, labels, t1, t2, num_iters):
    """The authors' closed form at the float64 probabilities: (p - q) p^(t2-t1) - e Σ (p - q) p^(t2-t1)."""
    p = reference.tempered_softmax(x64, t2, num_iters)
    forgotten = (p - labels) * p.pow(t2 - t1)
    escorts = p.pow(t2) / p.pow(t2).sum(-1, keepdim=True)
    return forgotten - escorts * forgotten.sum(-1, keepdim=True)


# (t1, t2, label_smoothing, soft targets, num_iters): every normalization mode, t1 = 1 and t1 < 1
BI_TEMPERED = [(0.8, 1.2, 0.0, False, 5), (0.5, 4.0, 0.1, True, 5), (0.7, 0.8, 0.1, False, 12),
               (0.5, 1.0, 0.0, True, 5), (1.0, 1.5, 0.0, True, 5)]


@pytest.mark.parametrize("options", BI_TEMPERED, ids=lambda o: "t1={}-t2={}-eps={}-soft={}-iters={}".format(*o))
def test_bi_tempered_matches_reference_and_authors_gradient(layout, options):
    t1, t2, smoothing, soft, num_iters = options
    x64 = _logits((5, 37), seed=7, scale=2.0)
    if soft:
        target = torch.softmax(_logits((5, 37), seed=8), -1)
    else:
        target = torch.randint(0, 37, (5,), generator=torch.Generator().manual_seed(9))
    args = (t1, t2, smoothing, num_iters, "none")
    ours = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, target.float() if soft else target, *args, backend=TRITON),
        x64.float())
    pytorch = _value_and_grad(lambda v: reference.bi_tempered_logistic_loss(v, target.float() if soft else target,
                                                                            *args), x64.float())
    # Values: the float64 reference. Gradient: the authors' closed form at float64 probabilities, times the same
    # grad_output as _value_and_grad draws.
    labels = target if soft else F.one_hot(target, 37).double()
    if smoothing:
        labels = (1 - 37 / 36 * smoothing) * labels + smoothing / 36
    grad_output = (0.5 + torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).float()
    oracle_loss = reference.bi_tempered_logistic_loss(x64, target, *args)
    oracle_grad = grad_output.double()[:, None] * _authors_gradient(x64, labels, t1, t2, num_iters)
    _assert_close_derived(ours[0], oracle_loss, pytorch[0], torch.float32, x64.numel(), "loss")
    _assert_close_derived(ours[1], oracle_grad, pytorch[1], torch.float32, x64.numel(), "gradient")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bi_tempered_t1_t2_one_is_cross_entropy(layout, reduction):
    x64 = _logits((7, 37), seed=11)
    index = torch.randint(0, 37, (7,), generator=torch.Generator().manual_seed(12))
    soft = torch.softmax(_logits((7, 37), seed=13), -1)
    _check(lambda v: fusedloss.bi_tempered_logistic_loss(v, index, 1.0, 1.0, 0.1, reduction=reduction, backend=TRITON),
           lambda v: F.cross_entropy(v, index, reduction=reduction, label_smoothing=0.1 * 37 / 36), x64, what="index")
    _check(lambda v: fusedloss.bi_tempered_logistic_loss(v, soft.to(v.dtype), 1.0, 1.0, reduction=reduction,
                                                         backend=TRITON),
           lambda v: F.cross_entropy(v, soft.to(v.dtype), reduction=reduction), x64, what="soft")


def test_bi_tempered_single_row_and_extreme_logits():
    x64 = torch.tensor([[100.0, -100.0, 3.0, 0.0, -7.5]])
    for t1, t2 in [(0.8, 1.2), (0.5, 4.0), (0.7, 0.8)]:
        loss, grad = _value_and_grad(
            lambda v, t1=t1, t2=t2: fusedloss.bi_tempered_logistic_loss(v, torch.tensor([2]), t1, t2, num_iters=20,
                                                                        reduction="none", backend=TRITON), x64.float())
        expected = reference.bi_tempered_logistic_loss(x64.double(), torch.tensor([2]), t1, t2, 0.0, 20, "none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Half precision: twice PyTorch's own error (the reference computes in float32 and rounds)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x64 = _logits((6, 37), seed=14)
    y = _binary((6, 37))
    pos_weight = torch.linspace(0.5, 2.0, 37, dtype=torch.float64)
    labels = torch.randint(0, 37, (6,), generator=torch.Generator().manual_seed(15))
    cases = {
        "bce": (lambda fn, v: fn(v, y.to(v.dtype), None, pos_weight.to(v.dtype), "none"),
                reference.binary_cross_entropy_with_logits, triton_sigmoid.binary_cross_entropy_with_logits),
        "focal": (lambda fn, v: fn(v, y.to(v.dtype), 0.25, 2.0, "mean"),
                  reference.sigmoid_focal_loss, triton_sigmoid.sigmoid_focal_loss),
        "soft margin": (lambda fn, v: fn(v, y, None, "none"),
                        reference.multilabel_soft_margin_loss, triton_sigmoid.multilabel_soft_margin_loss),
        "zlpr": (lambda fn, v: fn(v, y, "none"), reference.multilabel_categorical_crossentropy,
                 triton_sigmoid.multilabel_categorical_crossentropy),
        "bi-tempered": (lambda fn, v: fn(v, labels, 0.8, 1.2, 0.1, 5, "none"), reference.bi_tempered_logistic_loss,
                        triton_sigmoid.bi_tempered_logistic_loss),
        # GHM-C bins by g = |σ(x) - y|: the oracle takes the logits as rounded to dtype, so that every backend bins
        # the same numbers (rounding moves entries across edges and changes the weights by whole factors).
        "ghmc": (lambda fn, v: fn(v.to(dtype).to(v.dtype), y, None, 10, 0.0, torch.zeros(10))[0],
                 reference.ghmc_loss, triton_sigmoid.ghmc_loss),
    }
    for name, (call, reference_fn, triton_fn) in cases.items():
        assert call(triton_fn, x64.to(dtype)).dtype == dtype, name
        _check(lambda v, call=call, fn=triton_fn: call(fn, v),
               lambda v, call=call, fn=reference_fn: call(fn, v), x64, dtype, what=name)


# ----------------------------------------------------------------------------------------------
# Autograd plumbing: no gradient work without autograd, torch.compile, reasons, bad input
# ----------------------------------------------------------------------------------------------


def test_gradient_is_computed_only_when_autograd_needs_it(monkeypatch):
    asked = []
    launcher = triton_sigmoid._binary_loss
    monkeypatch.setattr(triton_sigmoid, "_binary_loss", lambda *args: asked.append(args[-1]) or launcher(*args))
    x, y = _logits((3, 4)).float(), _binary((3, 4)).float()
    fusedloss.binary_cross_entropy_with_logits(x, y, backend=TRITON)
    with torch.no_grad():
        fusedloss.binary_cross_entropy_with_logits(x.requires_grad_(), y, backend=TRITON)
    loss = fusedloss.binary_cross_entropy_with_logits(x, y, backend=TRITON)
    assert asked == [False, False, True]
    loss.backward()  # grad_output exactly 1: the stored gradient is final
    x_ref = x.detach().double().requires_grad_()
    F.binary_cross_entropy_with_logits(x_ref, y.double()).backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-6, atol=1e-9)
    loss_value, grad = torch.ops.fusedloss.triton_multilabel_categorical_crossentropy(x.detach(), y, "sum", False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss_value, reference.multilabel_categorical_crossentropy(x.detach(), y, "sum"))


def test_compiles_fullgraph_on_triton():
    """Every public function on the triton backend in one fullgraph=True graph (a graph break is an error), through
    AOTAutograd (the fakes and the registered autograd of the custom ops), equal to eager."""
    torch._dynamo.reset()
    x64 = _logits((3, 5), seed=16)
    y = _binary((3, 5)).float()
    labels = torch.tensor([0, 4, 1])

    def total(v):
        return (
            fusedloss.binary_cross_entropy_with_logits(v, y, pos_weight=torch.full((5,), 2.0), backend=TRITON)
            + fusedloss.sigmoid_focal_loss(v, y, reduction="mean", backend=TRITON)
            + fusedloss.multilabel_soft_margin_loss(v, y, reduction="none", backend=TRITON).sum()
            + fusedloss.multilabel_categorical_crossentropy(v, y, backend=TRITON)
            + fusedloss.ghmc_loss(v, y, bins=5, backend=TRITON)
            + fusedloss.bi_tempered_logistic_loss(v, labels, 0.5, 1.5, backend=TRITON)
        )

    compiled = _value_and_grad(torch.compile(total, fullgraph=True, backend="aot_eager"), x64.float())
    eager = _value_and_grad(total, x64.float())
    torch.testing.assert_close(compiled, eager)


def test_reasons_and_auto_on_cuda_tensors():
    x, y = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3)
    (reason,) = triton_sigmoid.multilabel_categorical_crossentropy_reasons(x, y, "mean")
    assert "float64" in reason
    with pytest.raises(fusedloss.BackendUnavailable, match="float64"):
        fusedloss.sigmoid_focal_loss(x, y.double(), backend=TRITON)
    weight = torch.ones(3, requires_grad=True)
    assert "weight" in triton_sigmoid.multilabel_soft_margin_loss_reasons(x.float(), y, weight, "mean")[0]
    # The dispatcher's auto order for a CUDA tensor puts triton first (decided from the device, not the data).
    name, _ = _dispatch.resolve("ghmc_loss", "auto", torch.device("cuda"), x.float(), y, None, 10, 0.0,
                                torch.zeros(10))
    assert name == TRITON


@pytest.mark.parametrize("case,fn,override,error,named", BAD, ids=[case[0] for case in BAD])
def test_rejects_bad_input_on_triton(case, fn, override, error, named):
    kwargs = dict(input=X, target=Y, backend=TRITON)
    if fn is fusedloss.bi_tempered_logistic_loss:
        kwargs.update(t1=0.5, t2=1.5)
    kwargs.update(override)
    with pytest.raises(error, match=named):
        fn(**kwargs)


def test_expanded_grad_output_and_second_backward():
    """``loss.sum().backward()`` hands a stride-0 grad_output to reduction='none'; the gradient buffer is scaled in
    place once, so a second backward through the graph raises instead of scaling twice."""
    x64 = _logits((4, 6), seed=17)
    y = _binary((4, 6))
    for ours, oracle in [
        (lambda v: fusedloss.multilabel_soft_margin_loss(v, y.float(), reduction="none", backend=TRITON),
         lambda v: F.multilabel_soft_margin_loss(v, y, reduction="none")),
        (lambda v: fusedloss.binary_cross_entropy_with_logits(v, y.float(), reduction="none", backend=TRITON),
         lambda v: F.binary_cross_entropy_with_logits(v, y, reduction="none")),
    ]:
        x = x64.float().requires_grad_()
        loss = ours(x)
        (3.0 * loss.sum()).backward(retain_graph=True)
        x_ref = x64.clone().requires_grad_()
        (3.0 * oracle(x_ref).sum()).backward()
        assert _max_err(x.grad.double(), x_ref.grad) < 1e-6
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.sum().backward()


def test_row_offsets_beyond_int32():
    """Row n starts at n * stride > 2^31 elements: the row kernels must index with int64 (virtual memory only)."""
    num_classes, stride = 9, 2 ** 30 + 11
    try:
        storage = torch.empty(2 * stride + num_classes, dtype=torch.float16)
    except RuntimeError as exc:  # no address space for 4 GiB of untouched pages
        pytest.skip(f"cannot reserve the address space: {exc}")
    x = storage.as_strided((3, num_classes), (stride, 1))
    x.copy_(_logits((3, num_classes), seed=18).half())
    y = _binary((3, num_classes))
    labels = torch.tensor([1, 8, 0])
    x64 = x.double()
    for ours, oracle in [
        (lambda v: fusedloss.multilabel_soft_margin_loss(v, y.half(), reduction="sum", backend=TRITON),
         lambda v: F.multilabel_soft_margin_loss(v, y, reduction="sum")),
        (lambda v: fusedloss.multilabel_categorical_crossentropy(v, y, "sum", backend=TRITON),
         lambda v: reference.multilabel_categorical_crossentropy(v, y, "sum")),
        (lambda v: fusedloss.bi_tempered_logistic_loss(v, labels, 0.8, 1.2, reduction="sum", backend=TRITON),
         lambda v: reference.bi_tempered_logistic_loss(v, labels, 0.8, 1.2, 0.0, 5, "sum")),
    ]:
        x_leaf = x.detach().requires_grad_()
        loss = ours(x_leaf)
        (grad,) = torch.autograd.grad(loss, x_leaf)
        x_ref = x64.clone().requires_grad_()
        expected = oracle(x_ref)
        (expected_grad,) = torch.autograd.grad(expected, x_ref)
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-3, atol=0)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=2e-3)


# The sm_90 build check of these kernels (no spills at the launchers' layouts) is the generic one of every Triton
# module: sigmoid_loss.launch_configurations() and tests/test_triton_build.py (make triton-build-check).
