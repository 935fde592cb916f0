"""Sigmoid and multi-label losses on the reference backend against oracles written elsewhere.

Oracles: ``torch.nn.functional`` (BCE with logits, multilabel soft margin), torchvision's published
``sigmoid_focal_loss`` formula, a loop transcription of ZLPR, a numpy transcription of the GHM-C
authors' loop over bins, the bi-tempered authors' published test values, and ``gradcheck``.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference.sigmoid import exp_t, tempered_normalization, tempered_softmax

REF = "reference"


def _randn(shape, seed=0, scale=2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()


def _binary(shape, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) > 0.6).to(dtype)


def _value_and_grad(fn, x):
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _assert_same(fn_ours, fn_theirs, x, rtol=1e-12, atol=1e-12):
    ours, ours_grad = _value_and_grad(fn_ours, x)
    theirs, theirs_grad = _value_and_grad(fn_theirs, x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits, multilabel_soft_margin_loss: torch's own
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weight_shape", [None, (5,), (2, 1, 5)])
@pytest.mark.parametrize("with_pos_weight", [False, True])
def test_bce_with_logits_equals_torch(reduction, weight_shape, with_pos_weight):
    x = _randn((2, 3, 5))
    y = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # soft labels too
    generator = torch.Generator().manual_seed(3)
    weight = None if weight_shape is None else torch.rand(weight_shape, generator=generator, dtype=torch.float64)
    pos_weight = torch.rand(5, generator=generator, dtype=torch.float64) * 3 if with_pos_weight else None
    kwargs = dict(weight=weight, pos_weight=pos_weight, reduction=reduction)
    _assert_same(
        lambda v: fusedloss.binary_cross_entropy_with_logits(v, y, backend=REF, **kwargs),
        lambda v: F.binary_cross_entropy_with_logits(v, y, **kwargs),
        x,
    )


def _max_error(value, exact):
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    """Error against float64 at most twice torch's own error in ``dtype``, plus the output's rounding."""
    x = _randn((4, 37), scale=4.0).detach().to(dtype).requires_grad_()
    exact_input = x.detach().double().requires_grad_()
    y = _binary((4, 37), dtype=dtype)
    pos_weight = torch.linspace(0.5, 2.0, 37)
    bce_kwargs = dict(pos_weight=pos_weight, reduction="none")
    for name, ours_fn, torch_fn in [
        (
            "bce",
            lambda v: fusedloss.binary_cross_entropy_with_logits(v, y, backend=REF, **bce_kwargs),
            lambda v: F.binary_cross_entropy_with_logits(
                v, y.to(v.dtype), pos_weight=pos_weight.to(v.dtype), reduction="none"
            ),
        ),
        (
            "multilabel_soft_margin",
            lambda v: fusedloss.multilabel_soft_margin_loss(v, y, reduction="none", backend=REF),
            lambda v: F.multilabel_soft_margin_loss(v, y.to(v.dtype), reduction="none"),
        ),
    ]:  # fmt: skip
        exact, exact_grad = _value_and_grad(torch_fn, exact_input)
        torch_low, torch_low_grad = _value_and_grad(torch_fn, x)
        ours, ours_grad = _value_and_grad(ours_fn, x)
        assert ours.dtype == dtype, name
        eps = torch.finfo(dtype).eps
        assert _max_error(ours, exact) <= 2 * _max_error(torch_low, exact) + eps * exact.abs().max().item(), name
        grad_tol = 2 * _max_error(torch_low_grad, exact_grad) + eps * exact_grad.abs().max().item()
        assert _max_error(ours_grad, exact_grad) <= grad_tol, name


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_multilabel_soft_margin_equals_torch(reduction, with_weight):
    x = _randn((6, 4))
    y = _binary((6, 4))
    weight = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64) if with_weight else None
    _assert_same(
        lambda v: fusedloss.multilabel_soft_margin_loss(v, y, weight, reduction=reduction, backend=REF),
        lambda v: F.multilabel_soft_margin_loss(v, y, weight, reduction=reduction),
        x,
    )
    # (B, T, C) is rows of C: the same numbers in target's index shape; integer multi-hot targets as torch
    x3 = _randn((2, 3, 4))
    _assert_same(
        lambda v: fusedloss.multilabel_soft_margin_loss(v, _binary((2, 3, 4)).long(), weight, reduction=reduction,
                                                        backend=REF),
        lambda v: F.multilabel_soft_margin_loss(v.reshape(6, 4), _binary((6, 4)), weight, reduction=reduction).reshape(
            (2, 3) if reduction == "none" else ()
        ),
        x3,
    )


# ----------------------------------------------------------------------------------------------
# sigmoid_focal_loss: torchvision's formula
# ----------------------------------------------------------------------------------------------


def _torchvision_sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss as its documentation and source (torchvision/ops/focal_loss.py) state it:
    p = sigmoid(inputs); ce = BCE-with-logits(inputs, targets, "none"); p_t = p·t + (1-p)(1-t);
    loss = ce·(1-p_t)^gamma; if alpha >= 0: loss = (alpha·t + (1-alpha)(1-t))·loss; then none / mean / sum.
    (torchvision is not installable here, so the formula is restated.)"""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 0.5)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_focal_loss_equals_torchvision_formula(alpha, gamma, reduction):
    x = _randn((3, 4, 5))
    y = _binary((3, 4, 5))
    _assert_same(
        lambda v: fusedloss.sigmoid_focal_loss(v, y, alpha, gamma, reduction, backend=REF),
        lambda v: _torchvision_sigmoid_focal_loss(v, y, alpha, gamma, reduction),
        x,
        rtol=1e-10,
        atol=1e-14,
    )


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_sigmoid_focal_gradient_finite_at_saturation(gamma):
    check_sigmoid_focal_gradient_finite_at_saturation(gamma, REF)


def check_sigmoid_focal_gradient_finite_at_saturation(gamma, backend):
    """(1 - p_t)^γ has an infinite derivative at p_t = 1 for γ < 1 (torchvision's formula gives NaN there)."""
    x = torch.tensor([60.0, -60.0, 800.0, -800.0, 0.3], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    loss = fusedloss.sigmoid_focal_loss(x, y, 0.25, gamma, "sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:4], torch.zeros(4), rtol=0, atol=1e-30)
    exact = _torchvision_sigmoid_focal_loss(x.detach().double()[4:], y.double()[4:], 0.25, gamma, "sum")
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# ZLPR (multilabel_categorical_crossentropy)
# ----------------------------------------------------------------------------------------------


def _zlpr_loop(scores, target):
    """Su (2020), written as its two sums per row: log(1 + Σ_neg e^s) + log(1 + Σ_pos e^-s)."""
    rows = []
    for s_row, y_row in zip(scores.tolist(), target.tolist()):
        negatives = 1.0 + sum(math.exp(s) for s, y in zip(s_row, y_row) if y == 0)
        positives = 1.0 + sum(math.exp(-s) for s, y in zip(s_row, y_row) if y == 1)
        rows.append(math.log(negatives) + math.log(positives))
    return torch.tensor(rows, dtype=torch.float64)


def _zlpr_gradient(scores, target):
    """d/ds of the two sums: e^s / (1 + Σ_neg e^s) on negatives, -e^-s / (1 + Σ_pos e^-s) on positives."""
    negative, positive = target == 0, target == 1
    neg_exp = torch.where(negative, scores.exp(), 0.0)
    pos_exp = torch.where(positive, (-scores).exp(), 0.0)
    return neg_exp / (1 + neg_exp.sum(-1, keepdim=True)) - pos_exp / (1 + pos_exp.sum(-1, keepdim=True))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_zlpr_equals_loop_formula(reduction):
    x = _randn((5, 6))
    y = _binary((5, 6))
    y[0] = 0  # a row without positives
    y[1] = 1  # a row without negatives
    loss = fusedloss.multilabel_categorical_crossentropy(x, y, reduction, backend=REF)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    rows = _zlpr_loop(x.detach(), y)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
    row_scale = torch.full((5, 1), 1 / 5 if reduction == "mean" else 1.0, dtype=torch.float64)
    torch.testing.assert_close(grad, row_scale * _zlpr_gradient(x.detach(), y), rtol=1e-12, atol=1e-12)


def test_zlpr_bool_target_and_batch_shape():
    x = _randn((2, 3, 4))
    y = _binary((2, 3, 4))
    loss = fusedloss.multilabel_categorical_crossentropy(x, y.bool(), "none", backend=REF)
    assert loss.shape == (2, 3)
    torch.testing.assert_close(loss.detach().reshape(-1), _zlpr_loop(x.detach().reshape(6, 4), y.reshape(6, 4)))


# ----------------------------------------------------------------------------------------------
# GHM-C: the authors' loop over bins
# ----------------------------------------------------------------------------------------------


def _ghmc_authors(pred, target, label_weight, bins, momentum, acc_sum):
    """numpy transcription of GHMC.forward (mmdetection mmdet/models/losses/ghm_loss.py, same as
    libuyu/GHM_Detection): float32 edges i/bins with the last + 1e-6, weights tot/num_in_bin (or tot/acc_sum
    with momentum, acc_sum a float32 array updated in place) divided by the number of non-empty bins,
    loss = Σ weights·BCE / tot. Returns the loss and its gradient weights·(σ(x) - y)/tot."""
    edges = np.arange(bins + 1, dtype=np.float32) / np.float32(bins)
    edges[-1] += np.float32(1e-6)
    sigmoid = 1.0 / (1.0 + np.exp(-pred))
    g = np.abs(sigmoid - target)
    weights = np.zeros_like(pred)
    valid = label_weight > 0
    tot = max(float(valid.sum()), 1.0)
    n = 0
    for i in range(bins):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        num_in_bin = int(inds.sum())
        if num_in_bin > 0:
            if momentum > 0:
                acc_sum[i] = np.float32(momentum) * acc_sum[i] + np.float32(1 - momentum) * np.float32(num_in_bin)
                weights[inds] = tot / acc_sum[i]
            else:
                weights[inds] = tot / num_in_bin
            n += 1
    if n > 0:
        weights = weights / n
    bce = np.maximum(pred, 0) - pred * target + np.log1p(np.exp(-np.abs(pred)))
    return (weights * bce).sum() / tot, weights * (sigmoid - target) / tot


def _ghmc_data(seed):
    generator = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(8, 6, generator=generator, dtype=torch.float64)
    x[0, :3] = 0.0  # g = 0.5 exactly: on an edge
    y = (torch.rand(8, 6, generator=generator) > 0.7).double()
    label_weight = (torch.rand(8, 6, generator=generator) > 0.2).double() * 2.5  # values are not multiplied in
    return x, y, label_weight


@pytest.mark.parametrize("bins", [1, 10, 30])
@pytest.mark.parametrize("masked", [False, True])
def test_ghmc_equals_authors_loop(bins, masked):
    x, y, label_weight = _ghmc_data(bins)
    mask = label_weight if masked else torch.ones_like(x)
    x.requires_grad_()
    loss = fusedloss.ghmc_loss(x, y, label_weight if masked else None, bins, backend=REF)
    (grad,) = torch.autograd.grad(loss, x)
    expected, expected_grad = _ghmc_authors(x.detach().numpy(), y.numpy(), mask.numpy(), bins, 0.0, None)
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, torch.from_numpy(expected_grad), rtol=1e-12, atol=1e-15)


def test_ghmc_module_momentum_state_follows_authors():
    module = fusedloss.nn.GHMCLoss(bins=10, momentum=0.75, backend=REF)
    assert set(module.state_dict()) == {"acc_sum"}
    acc_sum = np.zeros(10, dtype=np.float32)
    for step in range(3):
        x, y, label_weight = _ghmc_data(10 + step)
        loss = module(x, y, label_weight)
        expected, _ = _ghmc_authors(x.numpy(), y.numpy(), label_weight.numpy(), 10, 0.75, acc_sum)
        torch.testing.assert_close(module.acc_sum, torch.from_numpy(acc_sum), rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_ghmc_function_with_momentum_is_a_fresh_module_step():
    x, y, label_weight = _ghmc_data(7)
    fresh = fusedloss.nn.GHMCLoss(bins=10, momentum=0.5, backend=REF)(x, y, label_weight)
    stateless = fusedloss.ghmc_loss(x, y, label_weight, 10, 0.5, backend=REF)
    torch.testing.assert_close(stateless, fresh, rtol=0, atol=0)
    torch.testing.assert_close(stateless, 2 * fusedloss.ghmc_loss(x, y, label_weight, 10, 0.0, backend=REF))


# ----------------------------------------------------------------------------------------------
# Bi-tempered logistic loss: the authors' published test values (google-research/bi-tempered-loss,
# tensorflow/loss_test.py), computed there in float32
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = [[-0.5, 0.1, 2.0], [0.1, 1.5, -5.0], [4.0, -3.0, -6.0]]


def test_bi_tempered_published_loss_values():
    labels = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.2, 0.8, 0.0]])
    activations = torch.tensor(ACTIVATIONS)
    loss = fusedloss.bi_tempered_logistic_loss(activations, labels, 0.5, 1.5, reduction="none", backend=REF)
    torch.testing.assert_close(loss, torch.tensor([0.02301914, 0.18972909, 0.93874922]), rtol=1e-6, atol=1e-6)
    loss = fusedloss.bi_tempered_logistic_loss(
        activations, labels, 0.5, 0.8, num_iters=20, reduction="none", backend=REF
    )
    torch.testing.assert_close(loss, torch.tensor([0.21646356, 0.41836615, 1.33997854]), rtol=1e-6, atol=1e-6)


def test_bi_tempered_published_label_smoothing_and_sparse_labels():
    activations = torch.tensor(ACTIVATIONS)
    expected = torch.tensor([0.76652711, 0.08627685, 1.35443510])
    dense = fusedloss.bi_tempered_logistic_loss(activations, torch.eye(3), 0.5, 1.5, 0.1, reduction="none", backend=REF)
    sparse = fusedloss.bi_tempered_logistic_loss(
        activations, torch.arange(3), 0.5, 1.5, 0.1, reduction="none", backend=REF
    )
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse, dense)
    # their rule: the true class keeps 1 - ε, every other class gets ε / (C - 1)
    smoothed = torch.full((3, 3), 0.05) + 0.85 * torch.eye(3)
    explicit = fusedloss.bi_tempered_logistic_loss(activations, smoothed, 0.5, 1.5, reduction="none", backend=REF)
    torch.testing.assert_close(sparse, explicit)


def test_bi_tempered_published_dynamic_temperatures():
    labels = torch.tensor([[0.2, 0.5, 0.3]])
    activations = torch.tensor([[-0.5, 0.1, 2.0]])
    for t1, t2, expected in [
        (1.0, 1.0, 1.6583576),
        (0.9, 1.1, 0.45677936),
        (0.8, 1.2, 0.34298314),
        (0.7, 1.3, 0.26295574),
    ]:
        loss = fusedloss.bi_tempered_logistic_loss(activations, labels, t1, t2, num_iters=5, backend=REF)
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=0, atol=1e-5)


def test_tempered_softmax_published_values_and_normalization():
    probabilities = tempered_softmax(torch.tensor(ACTIVATIONS), 4.0, 5)
    expected = [
        [0.3205458, 0.32714278, 0.3523402],
        [0.3430056, 0.36491093, 0.29220778],
        [0.41369352, 0.30534995, 0.28299212],
    ]
    torch.testing.assert_close(probabilities, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    activations = torch.randn(4, 2000, generator=torch.Generator().manual_seed(0))
    for t in [0.99, 1.01, 0.1, 2.0]:
        total = exp_t(activations - tempered_normalization(activations, t, 20), t).sum(-1)
        torch.testing.assert_close(total, torch.ones(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bi_tempered_t1_t2_one_is_cross_entropy(reduction):
    x = _randn((2, 3, 5))
    index_target = torch.randint(0, 5, (2, 3), generator=torch.Generator().manual_seed(4))
    _assert_same(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, index_target, 1.0, 1.0, reduction=reduction, backend=REF),
        lambda v: F.cross_entropy(v.movedim(-1, 1), index_target, reduction=reduction),
        x,
    )
    soft = torch.softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    _assert_same(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, soft, 1.0, 1.0, reduction=reduction, backend=REF),
        lambda v: F.cross_entropy(v.movedim(-1, 1), soft.movedim(-1, 1), reduction=reduction),
        x,
    )


# ----------------------------------------------------------------------------------------------
# gradcheck in float64 for every loss (the bi-tempered gradient is exact at a converged normalization)
# ----------------------------------------------------------------------------------------------


def test_gradcheck_every_loss():
    x = _randn((3, 4), seed=5, scale=1.0)
    y = _binary((3, 4))
    soft = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)), -1)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    losses = {
        "bce": lambda v: fusedloss.binary_cross_entropy_with_logits(v, y, weight, pos_weight=2 * weight, backend=REF),
        "sigmoid_focal": lambda v: fusedloss.sigmoid_focal_loss(v, y, 0.25, 1.5, "sum", backend=REF),
        "multilabel_soft_margin": lambda v: fusedloss.multilabel_soft_margin_loss(v, y, weight, backend=REF),
        "zlpr": lambda v: fusedloss.multilabel_categorical_crossentropy(v, y, "none", backend=REF),
        "ghmc": lambda v: fusedloss.ghmc_loss(v, y, bins=10, backend=REF),
        "bi_tempered t2>1": lambda v: fusedloss.bi_tempered_logistic_loss(
            v, labels, 0.5, 1.5, 0.1, num_iters=50, reduction="none", backend=REF
        ),
        "bi_tempered t2<1": lambda v: fusedloss.bi_tempered_logistic_loss(v, soft, 0.7, 0.8, num_iters=60, backend=REF),
        "bi_tempered t1=t2=1": lambda v: fusedloss.bi_tempered_logistic_loss(v, labels, 1.0, 1.0, backend=REF),
    }
    for name, loss in losses.items():
        assert torch.autograd.gradcheck(loss, (x,)), name


# ----------------------------------------------------------------------------------------------
# Modules and compile
# ----------------------------------------------------------------------------------------------


def test_modules_match_functions():
    x = _randn((4, 5))
    y = _binary((4, 5))
    labels = torch.tensor([0, 4, 2, 1])
    torch.testing.assert_close(
        fusedloss.nn.SigmoidFocalLoss(backend=REF)(x, y), fusedloss.sigmoid_focal_loss(x, y, reduction="mean")
    )
    torch.testing.assert_close(
        fusedloss.nn.MultilabelCategoricalCrossEntropy(backend=REF)(x, y),
        fusedloss.multilabel_categorical_crossentropy(x, y),
    )
    torch.testing.assert_close(
        fusedloss.nn.BiTemperedLogisticLoss(0.8, 1.2, 0.1, backend=REF)(x, labels),
        fusedloss.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, 0.1),
    )
    torch.testing.assert_close(
        fusedloss.nn.GHMCLoss(bins=5, loss_weight=2.0, backend=REF)(x, y), 2 * fusedloss.ghmc_loss(x, y, bins=5)
    )


def test_compiles_fullgraph():
    """No graph break in any public function (Dynamo's capture; the "eager" backend skips code generation)."""
    x = _randn((3, 4), dtype=torch.float32)
    y = _binary((3, 4), dtype=torch.float32)
    labels = torch.tensor([0, 3, 1])

    def total(v):
        return (
            fusedloss.binary_cross_entropy_with_logits(v, y, backend=REF)
            + fusedloss.sigmoid_focal_loss(v, y, reduction="mean", backend=REF)
            + fusedloss.multilabel_soft_margin_loss(v, y, backend=REF)
            + fusedloss.multilabel_categorical_crossentropy(v, y, backend=REF)
            + fusedloss.ghmc_loss(v, y, backend=REF)
            + fusedloss.bi_tempered_logistic_loss(v, labels, 0.5, 1.5, backend=REF)
        )

    compiled, compiled_grad = _value_and_grad(torch.compile(total, fullgraph=True, backend="eager"), x)
    eager, eager_grad = _value_and_grad(total, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument
# ----------------------------------------------------------------------------------------------

X = torch.randn(3, 4)
Y = (torch.rand(3, 4) > 0.5).float()
L = torch.tensor([0, 1, 3])

BAD = [
    ("bce integer input", fusedloss.binary_cross_entropy_with_logits, dict(input=X.long()), TypeError, "input"),
    ("bce integer target", fusedloss.binary_cross_entropy_with_logits, dict(target=Y.long()), TypeError, "target"),
    ("bce target shape", fusedloss.binary_cross_entropy_with_logits, dict(target=Y[:2]), ValueError, "target"),
    ("bce target > 1", fusedloss.binary_cross_entropy_with_logits, dict(target=Y + 1), ValueError, "target"),
    ("bce weight shape", fusedloss.binary_cross_entropy_with_logits, dict(weight=torch.ones(3)), ValueError, "weight"),
    ("bce pos_weight dtype", fusedloss.binary_cross_entropy_with_logits, dict(pos_weight=torch.ones(4, dtype=torch.long)), TypeError, "pos_weight"),  # noqa: E501
    ("bce reduction", fusedloss.binary_cross_entropy_with_logits, dict(reduction="avg"), ValueError, "reduction"),
    ("focal gamma < 0", fusedloss.sigmoid_focal_loss, dict(gamma=-1.0), ValueError, "gamma"),
    ("focal alpha > 1", fusedloss.sigmoid_focal_loss, dict(alpha=1.5), ValueError, "alpha"),
    ("focal alpha str", fusedloss.sigmoid_focal_loss, dict(alpha="0.25"), TypeError, "alpha"),
    ("focal bool target", fusedloss.sigmoid_focal_loss, dict(target=Y.bool()), TypeError, "target"),
    ("focal reduction", fusedloss.sigmoid_focal_loss, dict(reduction="batchmean"), ValueError, "reduction"),
    ("mlsm weight shape", fusedloss.multilabel_soft_margin_loss, dict(weight=torch.ones(3)), ValueError, "weight"),
    ("mlsm 0-dim input", fusedloss.multilabel_soft_margin_loss, dict(input=torch.tensor(1.0), target=torch.tensor(1.0)), ValueError, "input"),  # noqa: E501
    ("mlsm target shape", fusedloss.multilabel_soft_margin_loss, dict(target=Y.T), ValueError, "target"),
    ("zlpr soft target", fusedloss.multilabel_categorical_crossentropy, dict(target=Y * 0.5), ValueError, "target"),
    ("zlpr target list", fusedloss.multilabel_categorical_crossentropy, dict(target=[[1, 0]]), TypeError, "target"),
    ("ghmc bins 0", fusedloss.ghmc_loss, dict(bins=0), ValueError, "bins"),
    ("ghmc bins float", fusedloss.ghmc_loss, dict(bins=10.0), TypeError, "bins"),
    ("ghmc momentum 1", fusedloss.ghmc_loss, dict(momentum=1.0), ValueError, "momentum"),
    ("ghmc label_weight shape", fusedloss.ghmc_loss, dict(label_weight=torch.ones(4)), ValueError, "label_weight"),
    ("ghmc label_weight list", fusedloss.ghmc_loss, dict(label_weight=[1.0]), TypeError, "label_weight"),
    ("ghmc target 2", fusedloss.ghmc_loss, dict(target=2 * Y), ValueError, "target"),
    ("bitemp t1 > 1", fusedloss.bi_tempered_logistic_loss, dict(target=L, t1=1.5), ValueError, "t1"),
    ("bitemp t2 0", fusedloss.bi_tempered_logistic_loss, dict(target=L, t2=0.0), ValueError, "t2"),
    ("bitemp num_iters 0", fusedloss.bi_tempered_logistic_loss, dict(target=L, num_iters=0), ValueError, "num_iters"),
    ("bitemp num_iters float", fusedloss.bi_tempered_logistic_loss, dict(target=L, num_iters=5.0), TypeError, "num_iters"),  # noqa: E501
    ("bitemp smoothing > 1", fusedloss.bi_tempered_logistic_loss, dict(target=L, label_smoothing=2.0), ValueError, "label_smoothing"),  # noqa: E501
    ("bitemp smoothing one class", fusedloss.bi_tempered_logistic_loss, dict(input=X[:, :1], target=torch.zeros(3, dtype=torch.long), label_smoothing=0.1), ValueError, "label_smoothing"),  # noqa: E501
    ("bitemp target >= C", fusedloss.bi_tempered_logistic_loss, dict(target=torch.tensor([0, 1, 4])), ValueError, "target"),  # noqa: E501
    ("bitemp int32 target", fusedloss.bi_tempered_logistic_loss, dict(target=L.int()), TypeError, "target"),
    ("bitemp target shape", fusedloss.bi_tempered_logistic_loss, dict(target=L[:2]), ValueError, "target"),
]  # fmt: skip


@pytest.mark.parametrize("case,fn,override,error,named", BAD, ids=[case[0] for case in BAD])
def test_rejects_bad_input(case, fn, override, error, named):
    kwargs = dict(input=X, target=Y)
    if fn is fusedloss.bi_tempered_logistic_loss:
        kwargs.update(t1=0.5, t2=1.5)
    kwargs.update(override)
    with pytest.raises(error, match=named):
        fn(**kwargs)


def test_modules_reject_bad_options_at_construction():
    with pytest.raises(ValueError, match="momentum"):
        fusedloss.nn.GHMCLoss(momentum=-0.1)
    with pytest.raises(ValueError, match="t1"):
        fusedloss.nn.BiTemperedLogisticLoss(t1=2.0, t2=1.0)
    with pytest.raises(ValueError, match="reduction"):
        fusedloss.nn.MultilabelCategoricalCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        fusedloss.nn.SigmoidFocalLoss(gamma=-2.0)
