"""The ``cpp`` backend of the sigmoid and multi-label losses (csrc/cpu/sigmoid.cpp, csrc/sigmoid_ops.cpp).

Oracles, all evaluated in float64: ``torch.nn.functional`` (BCE with logits, multilabel soft margin, cross
entropy), torchvision's published sigmoid focal formula, the two sums of ZLPR, the GHM-C authors' loop over bins,
the bi-tempered authors' published values and, for the bi-tempered gradient, their closed form at the computed
probabilities. Values and gradients with a random ``grad_output``. Tolerance: error against float64 at
most twice the error of the same formula computed by PyTorch from the same low-precision input, plus one unit of
the dtype's epsilon times the largest magnitude (16 for float64, where the oracle's own error is 0).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_sigmoid_reference import (
    check_sigmoid_focal_gradient_finite_at_saturation,
    ACTIVATIONS,
    BAD,
    _ghmc_authors,
    _ghmc_data,
    _torchvision_sigmoid_focal_loss,
    _zlpr_gradient,
    _zlpr_loop,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fusedloss
from _backends import available, requires_backend
from _retain_graph import assert_backwards_match
from fusedloss import _dispatch
from fusedloss.bench import harness
from fusedloss.reference import sigmoid as reference

CPP = "cpp"

# Every test needs the extension: skipped without it, a failure in CI (tests/_backends.py).
pytestmark = requires_backend("cpp")

if available("cpp"):
    import fusedloss._ext.sigmoid  # noqa: F401  (the fake kernels of the device ops)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


GRAD_OUTPUT_MAX = 1.5


def _value_and_grad(fn, x, seed=0):
    """Loss and d(loss · grad_output)/dx with a fixed random grad_output in [0.5, 1.5) of the loss's shape."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    grad_output = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    return loss.detach(), grad


def _assert_close_as_torch(ours, torch_lowp, oracle, dtype, what, stored_scale=0.0):
    """|ours − oracle| <= 2·|torch_lowp − oracle| + k·eps(dtype)·max|oracle| (maxima over elements).

    ``stored_scale`` (gradients: max |grad_output|) adds one spacing of the dtype's subnormals times it: the
    kernel stores the gradient in the input dtype during forward and backward scales it by grad_output, two
    roundings where torch has one. It matters only for gradients below the dtype's smallest normal number
    (float16 gradients of order 1e-5), where one rounding is an absolute error of up to that spacing."""
    ours, torch_lowp, oracle = ours.double(), torch_lowp.double(), oracle.double()
    assert torch.equal(torch.isnan(ours), torch.isnan(oracle)), f"{what}: NaN pattern differs"
    if ours.numel() == 0:
        return
    finite = ~torch.isnan(oracle)
    err = (ours - oracle)[finite].abs().max().item()
    torch_err = (torch_lowp - oracle)[finite].abs().nan_to_num(0).max().item()
    scale = oracle[finite].abs().max().item()
    ulps = 16 if dtype == torch.float64 else 1
    finfo = torch.finfo(dtype)
    tol = 2 * torch_err + ulps * finfo.eps * max(scale, 1e-30) + stored_scale * finfo.smallest_normal * finfo.eps
    assert err <= tol, f"{what}: error {err:.3g} > tolerance {tol:.3g} (torch's own error {torch_err:.3g})"


def _check(ours_fn, torch_fn, x, oracle_fn=None):
    """ours_fn (cpp) against oracle_fn (default torch_fn) in float64; tolerance from torch_fn on x's dtype."""
    oracle_fn = torch_fn if oracle_fn is None else oracle_fn
    loss, grad = _value_and_grad(ours_fn, x)
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    loss64, grad64 = _value_and_grad(oracle_fn, x.double())
    loss_lowp, grad_lowp = _value_and_grad(torch_fn, x)
    _assert_close_as_torch(loss, loss_lowp, loss64, x.dtype, "loss")
    _assert_close_as_torch(grad, grad_lowp, grad64, x.dtype, "gradient", GRAD_OUTPUT_MAX)


def _logits(shape, dtype, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def _multi_hot(shape, dtype=torch.float32, seed=1, p=0.3):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p).to(dtype)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


# ----------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits: torch's
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape,weight_shape,pos_weight", [
    ((17, 7), None, False), ((17, 7), None, True), ((4, 3, 7), (7,), True), ((5, 423), (5, 1), True),
    ((11,), (), False), ((3, 1), (3, 1), True),
])
def test_bce_with_logits_matches_torch(dtype, reduction, shape, weight_shape, pos_weight):
    x = _logits(shape, dtype)
    generator = torch.Generator().manual_seed(2)
    y = torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)  # soft labels too
    weight = None if weight_shape is None else (torch.rand(weight_shape, generator=generator, dtype=torch.float64) + .5)
    pw = 3 * torch.rand(shape[-1], generator=generator, dtype=torch.float64) if pos_weight else None

    def ours(v):
        return fusedloss.binary_cross_entropy_with_logits(v, y, _cast(weight, dtype), reduction=reduction,
                                                          pos_weight=_cast(pw, dtype), backend=CPP)

    def theirs(v):
        return F.binary_cross_entropy_with_logits(v, y.to(v.dtype), _cast(weight, v.dtype), reduction=reduction,
                                                  pos_weight=_cast(pw, v.dtype))

    _check(ours, theirs, x)


@pytest.mark.parametrize("num_classes", [16, 48, 80, 83, 300])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_bce_every_cut_of_a_row_into_vectors(num_classes, reduction, scale):
    """Rows cut every way the AVX-512 loop cuts them (four vectors of 16 at a time, the last one to three side by
    side, a scalar tail, a second block of 256), at logits around 1 and of 1e4 (exp(-|x|) is 0 there), against
    torch; a target outside [0, 1] in a vector part or the tail still raises."""
    x = _logits((37, num_classes), torch.float32, scale=scale)
    generator = torch.Generator().manual_seed(3)
    y = torch.rand((37, num_classes), generator=generator, dtype=torch.float64).float()
    weight = torch.rand(num_classes, generator=generator) + 0.5
    pw = 3 * torch.rand(num_classes, generator=generator)

    def ours(v):
        return fusedloss.binary_cross_entropy_with_logits(v, y, weight, reduction=reduction, pos_weight=pw,
                                                          backend=CPP)

    def theirs(v):
        return F.binary_cross_entropy_with_logits(v, y.to(v.dtype), weight.to(v.dtype), reduction=reduction,
                                                  pos_weight=pw.to(v.dtype))

    _check(ours, theirs, x)
    for column in (5, num_classes - 1):
        bad = y.clone()
        bad[20, column] = 1.5
        with pytest.raises(ValueError, match="target values must be in \\[0, 1\\], got 1.5"):
            fusedloss.binary_cross_entropy_with_logits(x, bad, backend=CPP)


# ----------------------------------------------------------------------------------------------
# sigmoid_focal_loss: torchvision's formula
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 0.5), (0.25, 1.5)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sigmoid_focal_matches_torchvision_formula(dtype, alpha, gamma, reduction):
    x = _logits((9, 80), dtype)
    y = _multi_hot((9, 80), dtype)

    def ours(v):
        return fusedloss.sigmoid_focal_loss(v, y, alpha, gamma, reduction, backend=CPP)

    def theirs(v):
        return _torchvision_sigmoid_focal_loss(v, y.to(v.dtype), alpha, gamma, reduction)

    _check(ours, theirs, x)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_sigmoid_focal_gradient_finite_at_saturation(gamma):
    check_sigmoid_focal_gradient_finite_at_saturation(gamma, CPP)


# ----------------------------------------------------------------------------------------------
# multilabel_soft_margin_loss: torch's; ZLPR: its two sums
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("num_classes,weighted", [(1, False), (7, True), (423, False), (1000, True)])
def test_multilabel_soft_margin_matches_torch(dtype, reduction, num_classes, weighted):
    x = _logits((6, num_classes), dtype)
    y = _multi_hot((6, num_classes), dtype)
    weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + .5
    weight = weight if weighted else None

    def ours(v):
        return fusedloss.multilabel_soft_margin_loss(v, y, _cast(weight, dtype), reduction=reduction, backend=CPP)

    def theirs(v):
        return F.multilabel_soft_margin_loss(v, y.to(v.dtype), _cast(weight, v.dtype), reduction=reduction)

    _check(ours, theirs, x)


def _zlpr_torch(scores, target, reduction):
    """ZLPR as torch ops in scores' own dtype: the two log-sum-exps with an appended 0."""
    positive = target.bool()
    zero = torch.zeros_like(scores[..., :1])
    neg = torch.cat([scores.masked_fill(positive, float("-inf")), zero], -1).logsumexp(-1)
    pos = torch.cat([(-scores).masked_fill(~positive, float("-inf")), zero], -1).logsumexp(-1)
    loss = neg + pos
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("num_classes", [1, 7, 423, 1000])
def test_zlpr_matches_torch_and_its_two_sums(dtype, reduction, num_classes):
    x = _logits((6, num_classes), dtype, scale=5.0)
    y = _multi_hot((6, num_classes), dtype)
    y[0] = 0  # no positives
    y[1] = 1  # no negatives

    def ours(v):
        return fusedloss.multilabel_categorical_crossentropy(v, y, reduction, backend=CPP)

    _check(ours, lambda v: _zlpr_torch(v, y, reduction), x)
    if dtype == torch.float64:  # the loop formula of test_sigmoid_reference, independently of torch's logsumexp
        loss, grad = _value_and_grad(ours, x, seed=0)
        rows = _zlpr_loop(x, y)
        torch.testing.assert_close(loss, {"none": rows, "mean": rows.mean()}[reduction])
        grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
        row_scale = grad_output.reshape(-1, 1) if reduction == "none" else grad_output / 6
        torch.testing.assert_close(grad, row_scale * _zlpr_gradient(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zlpr_long_row_rescales_online(dtype):
    """Rows of 10000 classes cross many blocks of the sweep, with the running maxima rising in later blocks.
    In float64 the oracle is the two sums as ratios (torch's exp(s − lse) loses digits to the cancellation
    s − lse near lse ≈ 60, which the kernel's (s − max) − log Σ avoids)."""
    x = _logits((3, 10000), torch.float64, scale=4.0)
    x[:, 9000:] += torch.linspace(0, 60, 1000, dtype=torch.float64)
    y = _multi_hot((3, 10000), torch.float64, p=0.01)

    def ours(v):
        return fusedloss.multilabel_categorical_crossentropy(v, y, "none", backend=CPP)

    if dtype == torch.float32:
        _check(ours, lambda v: _zlpr_torch(v, y.to(v.dtype), "none"), x.float())
        return
    loss, grad = _value_and_grad(ours, x)
    grad_output = torch.rand(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    torch.testing.assert_close(loss, _zlpr_loop(x, y), rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, grad_output.unsqueeze(-1) * _zlpr_gradient(x, y), rtol=1e-13, atol=1e-300)


# ----------------------------------------------------------------------------------------------
# GHM-C: the authors' loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bins", [1, 10, 30])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ghmc_equals_authors_loop(bins, masked, dtype):
    x, y, label_weight = _ghmc_data(bins)
    x = x.to(dtype)
    mask = label_weight if masked else torch.ones_like(label_weight)
    loss, grad = _value_and_grad(
        lambda v: fusedloss.ghmc_loss(v, y, label_weight if masked else None, bins, backend=CPP), x)
    expected, expected_grad = _ghmc_authors(x.double().numpy(), y.numpy(), mask.numpy(), bins, 0.0, None)
    grad_output = torch.rand((), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), **tol)
    torch.testing.assert_close(grad.double(), grad_output * torch.from_numpy(expected_grad), **tol)


def test_ghmc_module_momentum_state_follows_authors():
    module = fusedloss.nn.GHMCLoss(bins=10, momentum=0.75, backend=CPP)
    acc_sum = np.zeros(10, dtype=np.float32)
    for step in range(3):
        x, y, label_weight = _ghmc_data(10 + step)
        loss = module(x, y, label_weight)
        expected, _ = _ghmc_authors(x.numpy(), y.numpy(), label_weight.numpy(), 10, 0.75, acc_sum)
        torch.testing.assert_close(module.acc_sum, torch.from_numpy(acc_sum), rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ghmc_half_matches_reference(dtype):
    """Same bins as the reference from the same half input (g computed in float32 by both)."""
    x = _logits((64, 80), dtype)
    y = _multi_hot((64, 80), dtype)
    _check(lambda v: fusedloss.ghmc_loss(v, y, bins=30, backend=CPP),
           lambda v: fusedloss.ghmc_loss(v, y, bins=30, backend="reference"), x)


# ----------------------------------------------------------------------------------------------
# Bi-tempered logistic loss: the authors' published values and closed-form gradient
# ----------------------------------------------------------------------------------------------

def test_bi_tempered_published_values():
    labels = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.2, 0.8, 0.0]])
    activations = torch.tensor(ACTIVATIONS)
    loss = fusedloss.bi_tempered_logistic_loss(activations, labels, 0.5, 1.5, reduction="none", backend=CPP)
    torch.testing.assert_close(loss, torch.tensor([0.02301914, 0.18972909, 0.93874922]), rtol=1e-6, atol=1e-6)
    loss = fusedloss.bi_tempered_logistic_loss(activations, labels, 0.5, 0.8, num_iters=20, reduction="none",
                                               backend=CPP)
    torch.testing.assert_close(loss, torch.tensor([0.21646356, 0.41836615, 1.33997854]), rtol=1e-6, atol=1e-6)
    expected = torch.tensor([0.76652711, 0.08627685, 1.35443510])
    dense = fusedloss.bi_tempered_logistic_loss(activations, torch.eye(3), 0.5, 1.5, 0.1, reduction="none",
                                                backend=CPP)
    sparse = fusedloss.bi_tempered_logistic_loss(activations, torch.arange(3), 0.5, 1.5, 0.1, reduction="none",
                                                 backend=CPP)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse, dense)
    for t1, t2, value in [(1.0, 1.0, 1.6583576), (0.9, 1.1, 0.45677936), (0.8, 1.2, 0.34298314),
                          (0.7, 1.3, 0.26295574)]:
        loss = fusedloss.bi_tempered_logistic_loss(torch.tensor([[-0.5, 0.1, 2.0]]), torch.tensor([[0.2, 0.5, 0.3]]),
                                                   t1, t2, num_iters=5, backend=CPP)
        torch.testing.assert_close(loss, torch.tensor(value), rtol=0, atol=1e-5)


def _bi_tempered_closed_form(x, labels, t1, t2, num_iters, label_smoothing):
    """Loss per row and the authors' gradient (their custom_gradient) at p = tempered_softmax after num_iters
    steps, in float64: d = (p − q) p^(t2−t1) − e Σ (p − q) p^(t2−t1), e = p^t2 / Σ p^t2."""
    x = x.double()
    num_classes = x.shape[-1]
    q = F.one_hot(labels, num_classes).double() if labels.dtype == torch.int64 else labels.double()
    if label_smoothing > 0:
        q = (1 - num_classes / (num_classes - 1) * label_smoothing) * q + label_smoothing / (num_classes - 1)
    if t1 == 1.0 and t2 == 1.0:
        p = torch.softmax(x, -1)
        return -(q * torch.log_softmax(x, -1)).sum(-1), p * q.sum(-1, keepdim=True) - q
    p = reference.tempered_softmax(x, t2, num_iters)
    log_t = lambda u, t: torch.log(u) if t == 1.0 else (u.pow(1 - t) - 1) / (1 - t)  # noqa: E731
    loss = (q * (log_t(q + 1e-10, t1) - log_t(p, t1)) - (q.pow(2 - t1) - p.pow(2 - t1)) / (2 - t1)).sum(-1)
    forgotten = (p - q) * p.pow(t2 - t1)
    escorts = p.pow(t2) / p.pow(t2).sum(-1, keepdim=True)
    return loss, forgotten - escorts * forgotten.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t1,t2,num_iters", [(0.8, 1.2, 5), (0.5, 4.0, 5), (0.7, 0.8, 20), (0.5, 1.0, 5),
                                             (1.0, 1.0, 5), (1.0, 1.5, 5)])
@pytest.mark.parametrize("target_kind,label_smoothing", [("index", 0.0), ("index", 0.1), ("probs", 0.05)])
def test_bi_tempered_matches_closed_form(dtype, t1, t2, num_iters, target_kind, label_smoothing):
    n, c = 7, 37
    x = _logits((n, c), dtype, scale=2.0)
    generator = torch.Generator().manual_seed(4)
    if target_kind == "index":
        target = torch.randint(0, c, (n,), generator=generator)
    else:
        target = torch.softmax(torch.randn(n, c, generator=generator, dtype=torch.float64), -1).to(dtype)
    loss, grad = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, target, t1, t2, label_smoothing, num_iters, "none",
                                                      backend=CPP), x)
    loss64, grad64 = _bi_tempered_closed_form(x, target, t1, t2, num_iters, label_smoothing)
    grad_output = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    grad64 = grad_output.unsqueeze(-1) * grad64
    # PyTorch's own error: the reference backend (torch ops) from the same input, through the same iterations
    loss_lowp, grad_lowp = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, target, t1, t2, label_smoothing, num_iters, "none",
                                                      backend="reference"), x)
    if dtype == torch.float64:
        # the oracle is exact to rounding; the float64 kernel's transcendental functions are the C library's
        torch.testing.assert_close(loss, loss64, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, grad64, rtol=1e-10, atol=1e-12)
        return
    _assert_close_as_torch(loss, loss_lowp, loss64, dtype, "loss")
    _assert_close_as_torch(grad, grad_lowp, grad64, dtype, "gradient", GRAD_OUTPUT_MAX)


# Each branch of the vector-lane row (the CPU's AVX-512 variant; elsewhere the same calls run the scalar row): an
# integer 1/(1 − t2) (0.8, 1.2), the log and exp of a non-integer one for t2 > 1 and for t2 < 1 (classes outside the
# support), the last sweep's powers of b^(1/D) with every numerator negative (D = 1: 0.8, 1.2; D = 6: 0.5, 4.0), every
# one positive (0.5, 0.8: D = 2) and of both signs (0.9, 0.5: D = 5), and with no common denominator (0.77, 1.37).
BI_TEMPERED_BRANCHES = [(0.8, 1.2), (0.5, 4.0), (0.3, 0.7), (0.5, 0.8), (0.9, 0.5), (0.77, 1.37)]


@pytest.mark.parametrize("num_classes", [1, 2, 15, 16, 17, 31, 33, 100, 129, 300])
@pytest.mark.parametrize("t1,t2", BI_TEMPERED_BRANCHES)
@pytest.mark.parametrize("target_kind,scale", [("index", 3.0), ("probs", 3.0), ("index", 100.0)])
def test_bi_tempered_every_cut_of_a_row_into_vectors(num_classes, t1, t2, target_kind, scale):
    """Rows cut every way the vector loops cut them (the normalization's sweeps take 8 vectors of 16 at a time, then
    4, 2, 1, the last one partial; the last sweep 32 classes at a time, past the row masked), against the float64
    closed form with the tolerance of torch's own error."""
    if t1 > t2:  # p^(t2 − t1) is infinite for a class outside the support (p = 0): logits that keep all inside
        scale = 0.01
    x = _logits((23, num_classes), torch.float32, scale=scale)
    generator = torch.Generator().manual_seed(4)
    if target_kind == "index":
        target = torch.randint(0, num_classes, (23,), generator=generator)
    else:
        target = torch.softmax(torch.randn(23, num_classes, generator=generator, dtype=torch.float64), -1).float()
    loss, grad = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, target, t1, t2, 0.0, 5, "none", backend=CPP), x)
    loss64, grad64 = _bi_tempered_closed_form(x, target, t1, t2, 5, 0.0)
    grad_output = torch.rand(23, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    loss_lowp, grad_lowp = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, target, t1, t2, 0.0, 5, "none", backend="reference"), x)
    _assert_close_as_torch(loss, loss_lowp, loss64, torch.float32, "loss")
    _assert_close_as_torch(grad, grad_lowp, grad_output.unsqueeze(-1) * grad64, torch.float32, "gradient",
                           GRAD_OUTPUT_MAX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t1,t2", BI_TEMPERED_BRANCHES)
def test_bi_tempered_nan_or_inf_makes_its_row_nan(dtype, t1, t2):
    """A NaN or ±inf logit makes its row's loss and gradient NaN, as in the reference (torch's relu passes NaN), and
    leaves the other rows as they were. For t2 < 1 the NaN class once got p = 0 and its row a finite loss."""
    x = _logits((4, 37), dtype, scale=0.01 if t1 > t2 else 3.0)  # as above
    clean_loss, clean_grad = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, torch.arange(4), t1, t2, reduction="none", backend=CPP), x)
    x[1, 5], x[2, 7], x[3, 9] = float("nan"), float("inf"), float("-inf")
    loss, grad = _value_and_grad(
        lambda v: fusedloss.bi_tempered_logistic_loss(v, torch.arange(4), t1, t2, reduction="none", backend=CPP), x)
    expected = fusedloss.bi_tempered_logistic_loss(x, torch.arange(4), t1, t2, reduction="none", backend="reference")
    assert torch.equal(torch.isnan(loss), torch.isnan(expected)), (loss, expected)
    assert torch.isnan(loss[1:3]).all() and torch.isnan(grad[1:3]).all()
    assert torch.equal(loss[0], clean_loss[0]) and torch.equal(grad[0], clean_grad[0])
    if not torch.isnan(expected[3]):  # -inf: that class's p is 0, the row stays finite
        torch.testing.assert_close(loss[3], expected[3])


# ----------------------------------------------------------------------------------------------
# Shapes and values that break kernels: single row, all positive/negative rows, ±100, NaN
# ----------------------------------------------------------------------------------------------

def _all_losses(y, labels):
    return {
        "bce": lambda v: fusedloss.binary_cross_entropy_with_logits(v, y, pos_weight=torch.full((v.shape[-1],), 2.0,
                                                                                               dtype=v.dtype),
                                                                   reduction="none", backend=CPP),
        "focal": lambda v: fusedloss.sigmoid_focal_loss(v, y, backend=CPP),
        "soft_margin": lambda v: fusedloss.multilabel_soft_margin_loss(v, y, reduction="none", backend=CPP),
        "zlpr": lambda v: fusedloss.multilabel_categorical_crossentropy(v, y, "none", backend=CPP),
        "bi_tempered": lambda v: fusedloss.bi_tempered_logistic_loss(v, labels, 0.8, 1.2, reduction="none",
                                                                     backend=CPP),
    }


def _reference_of(name, y, labels):
    return {
        "bce": lambda v: F.binary_cross_entropy_with_logits(v, y, pos_weight=torch.full((v.shape[-1],), 2.0,
                                                                                        dtype=v.dtype),
                                                            reduction="none"),
        "focal": lambda v: _torchvision_sigmoid_focal_loss(v, y, 0.25, 2.0, "none"),
        "soft_margin": lambda v: F.multilabel_soft_margin_loss(v, y, reduction="none"),
        "zlpr": lambda v: _zlpr_torch(v, y, "none"),
        "bi_tempered": lambda v: fusedloss.bi_tempered_logistic_loss(v, labels, 0.8, 1.2, reduction="none",
                                                                     backend="reference"),
    }[name]


@pytest.mark.parametrize("case", ["single_row", "all_positive_and_all_negative", "extreme"])
def test_edge_rows(case):
    if case == "single_row":
        x = _logits((1, 13), torch.float64)
        y = _multi_hot((1, 13), torch.float64)
    else:
        x = _logits((2, 13), torch.float64)
        y = torch.stack([torch.ones(13), torch.zeros(13)]).double()
    if case == "extreme":
        x = torch.tensor([100.0, -100.0], dtype=torch.float64).repeat(2, 7)[:, :13].clone()
        y = _multi_hot((2, 13), torch.float64, p=0.5)
    labels = torch.zeros(x.shape[0], dtype=torch.int64)
    for dtype in (torch.float64, torch.float32):
        for name, ours in _all_losses(y.to(dtype), labels).items():
            loss, grad = _value_and_grad(ours, x.to(dtype))
            loss64, grad64 = _value_and_grad(_reference_of(name, y, labels), x)
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loss.double(), loss64, **tol, msg=lambda m, n=name: f"{n}: {m}")
            torch.testing.assert_close(grad.double(), grad64, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_non_contiguous_and_batched_inputs():
    """Transposed (non-contiguous) input and target, and (B, T, C) rows, give what contiguous (N, C) rows give."""
    x = _logits((9, 6), torch.float32).t()
    y = _multi_hot((9, 6)).t()
    labels = torch.tensor([0, 4, 8, 2, 1, 3])
    for name, fn in _all_losses(y, labels).items():
        loss, grad = _value_and_grad(fn, x)
        expected, expected_grad = _value_and_grad(lambda v, f=fn: f(v.contiguous()), x.contiguous())
        torch.testing.assert_close(loss, expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0, msg=name)
    x3, y3 = _logits((2, 3, 7), torch.float32), _multi_hot((2, 3, 7))
    for fn in (fusedloss.multilabel_soft_margin_loss, fusedloss.multilabel_categorical_crossentropy):
        loss = fn(x3, y3, reduction="none", backend=CPP)
        assert loss.shape == (2, 3)
        torch.testing.assert_close(loss.reshape(-1), fn(x3.reshape(6, 7), y3.reshape(6, 7), reduction="none",
                                                        backend=CPP))


def test_nan_stays_in_its_row():
    """NaN reaches its own element (elementwise losses) or row (row losses) and nothing else: everything else is
    bit for bit what the same call gives without the NaN."""
    clean = _logits((4, 9), torch.float32)
    x = clean.clone()
    x[1, 3] = float("nan")
    y = _multi_hot((4, 9))
    labels = torch.tensor([0, 4, 8, 2])
    for name, ours in _all_losses(y, labels).items():
        loss, grad = _value_and_grad(ours, x)
        clean_loss, clean_grad = _value_and_grad(ours, clean)
        if loss.dim() == 2:  # elementwise: only the NaN element
            poisoned = torch.zeros(4, 9, dtype=torch.bool)
            poisoned[1, 3] = True
            assert torch.equal(torch.isnan(loss), poisoned), name
            assert torch.equal(torch.isnan(grad), poisoned), name
            loss, clean_loss = loss[~poisoned], clean_loss[~poisoned]
            grad, clean_grad = grad[~poisoned], clean_grad[~poisoned]
        else:
            assert torch.equal(torch.isnan(loss), torch.tensor([False, True, False, False])), name
            assert torch.isnan(grad[1, 3]), name
            loss, clean_loss = loss[[0, 2, 3]], clean_loss[[0, 2, 3]]
            grad, clean_grad = grad[[0, 2, 3]], clean_grad[[0, 2, 3]]
        torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0, msg=lambda m, name=name: f"{name} loss: {m}")
        torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0, msg=lambda m, name=name: f"{name} grad: {m}")
    loss, grad = _value_and_grad(lambda v: fusedloss.ghmc_loss(v, y, bins=10, backend=CPP), x)
    assert torch.isnan(loss)  # the authors' sum reaches the NaN entry (in no bin, weight 0, 0·NaN)


def test_threads_give_identical_results():
    x = _logits((300, 1000), torch.float32)
    y = _multi_hot((300, 1000))
    labels = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(0))
    fns = list(_all_losses(y, labels).values()) + [lambda v: fusedloss.ghmc_loss(v, y, bins=30, backend=CPP)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([_value_and_grad(fn, x) for fn in fns])
    finally:
        torch.set_num_threads(threads)
    for (a, ga), (b, gb) in zip(*results):
        assert torch.equal(a, b) and torch.equal(ga, gb)


# ----------------------------------------------------------------------------------------------
# Bad input, gradients not allocated, dispatch
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,fn,override,error,named", BAD, ids=[case[0] for case in BAD])
def test_rejects_bad_input(case, fn, override, error, named):
    kwargs = dict(input=torch.randn(3, 4), target=(torch.rand(3, 4) > 0.5).float(), backend=CPP)
    if fn is fusedloss.bi_tempered_logistic_loss:
        kwargs.update(t1=0.5, t2=1.5)
    kwargs.update(override)
    with pytest.raises(error, match=named):
        fn(**kwargs)


X = torch.randn(3, 4)
Y = (torch.rand(3, 4) > 0.5).float()
OPS = torch.ops.fusedloss
OP_BAD = [
    ("bce integer input", lambda: OPS.binary_cross_entropy_with_logits(X.long(), Y, None, None, "mean"), TypeError,
     "input"),
    ("bce target shape", lambda: OPS.binary_cross_entropy_with_logits(X, Y[:2], None, None, "mean"), ValueError,
     "target"),
    ("bce pos_weight shape", lambda: OPS.binary_cross_entropy_with_logits(X, Y, None, torch.ones(3), "mean"),
     ValueError, "pos_weight"),
    ("bce reduction", lambda: OPS.binary_cross_entropy_with_logits(X, Y, None, None, "avg"), ValueError, "reduction"),
    ("focal gamma", lambda: OPS.sigmoid_focal_loss(X, Y, 0.25, -1.0, "none"), ValueError, "gamma"),
    ("soft margin weight", lambda: OPS.multilabel_soft_margin_loss(X, Y, torch.ones(3), "mean"), ValueError,
     "weight"),
    ("zlpr 0-dim", lambda: OPS.multilabel_categorical_crossentropy(X[0, 0], Y[0, 0], "mean"), ValueError, "input"),
    ("zlpr soft target", lambda: OPS.multilabel_categorical_crossentropy(X, Y * 0.5, "mean"), ValueError, "target"),
    ("ghmc bins", lambda: OPS.ghmc_loss(X, Y, None, 0, 0.0, torch.zeros(0)), ValueError, "bins"),
    ("ghmc acc_sum", lambda: OPS.ghmc_loss(X, Y, None, 10, 0.0, torch.zeros(9)), ValueError, "acc_sum"),
    ("ghmc valid dtype", lambda: OPS.ghmc_loss(X, Y, Y, 10, 0.0, torch.zeros(10)), TypeError, "valid"),
    ("bitemp t1", lambda: OPS.bi_tempered_logistic_loss(X, torch.tensor([0, 1, 2]), 1.5, 1.0, 0.0, 5, "mean"),
     ValueError, "t1"),
    ("bitemp int32 target", lambda: OPS.bi_tempered_logistic_loss(X, torch.tensor([0, 1, 2]).int(), 0.5, 1.5, 0.0,
                                                                   5, "mean"), TypeError, "target"),
    ("bitemp target >= C", lambda: OPS.bi_tempered_logistic_loss(X, torch.tensor([0, 1, 4]), 0.5, 1.5, 0.0, 5,
                                                                  "mean"), ValueError, "target"),
]


@pytest.mark.parametrize("case,call,error,named", OP_BAD, ids=[case[0] for case in OP_BAD])
def test_ops_check_their_arguments(case, call, error, named):
    """The C++ ops check their own arguments (for callers of torch.ops.fusedloss, and under torch.compile)."""
    with pytest.raises(error, match=named):
        call()


class _ComputeGradLog(TorchDispatchMode):
    """Records the compute_grad flag of every fusedloss device op that runs."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fusedloss" and func.__name__.split(".")[0].endswith("_forward"):
            self.flags.append(args[-1])
        return func(*args, **(kwargs or {}))


def test_no_gradient_without_grad():
    x = _logits((5, 8), torch.float32)
    y = _multi_hot((5, 8))
    labels = torch.zeros(5, dtype=torch.int64)
    fns = list(_all_losses(y, labels).values()) + [lambda v: fusedloss.ghmc_loss(v, y, backend=CPP)]
    for fn in fns:
        for context, requires_grad, expected in [(torch.no_grad, True, False), (torch.enable_grad, False, False),
                                                 (torch.enable_grad, True, True)]:
            with _ComputeGradLog() as log, context():
                fn(x.clone().requires_grad_(requires_grad))
            assert log.flags == [expected]


def test_no_gradient_under_inference_mode():
    """Inference mode reaches the public ops' no-gradient kernel: the call allocates far less than a gradient."""
    x = _logits((256, 256), torch.float32)
    y = _multi_hot((256, 256))
    labels = torch.zeros(256, dtype=torch.int64)
    gradient_mib = x.numel() * x.element_size() / 2**20
    calls = [
        lambda: fusedloss.binary_cross_entropy_with_logits(x, y, backend=CPP),
        lambda: fusedloss.sigmoid_focal_loss(x, y, reduction="sum", backend=CPP),
        lambda: fusedloss.multilabel_soft_margin_loss(x, y, backend=CPP),
        lambda: fusedloss.multilabel_categorical_crossentropy(x, y, backend=CPP),
        lambda: fusedloss.ghmc_loss(x, y, backend=CPP),
        lambda: fusedloss.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, backend=CPP),
    ]
    for call in calls:
        with torch.inference_mode():
            assert harness.peak_memory(call, lambda: None, x.device) < gradient_mib / 4


def test_second_backward_through_graph_raises():
    x = _logits((4, 6), torch.float32).requires_grad_()
    loss = fusedloss.multilabel_categorical_crossentropy(x, _multi_hot((4, 6)), "none", backend=CPP)
    loss.backward(torch.full((4,), 2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward(torch.full((4,), 2.0))


@pytest.mark.parametrize("scales", [(3.0, 3.0), (1.0, 3.0), (1.0, 1.0, 1.0)], ids=str)
def test_backwards_through_one_graph_match_torch_or_raise(scales):
    """Successive backwards through one graph with these grad_output scales: after each, torch's accumulated
    gradient, or a RuntimeError (a saved tensor modified in place); never another number."""
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(2))
    y = (x > 0).float()

    def ours(x):
        return fusedloss.multilabel_categorical_crossentropy(x, y, backend=CPP)

    def oracle(x):
        return reference.multilabel_categorical_crossentropy(x, y, "mean")

    assert_backwards_match(ours, oracle, (x,), scales, may_raise=True)


def test_declines_gradients_it_does_not_compute():
    x = _logits((3, 4), torch.float32).requires_grad_()
    y = _multi_hot((3, 4)).requires_grad_()
    assert _dispatch.resolve("sigmoid_focal_loss", "auto", x.device, x, y, 0.25, 2.0, "mean")[0] == "reference"
    with pytest.raises(fusedloss.BackendUnavailable, match="target requires grad"):
        fusedloss.sigmoid_focal_loss(x, y, backend=CPP)
    with pytest.raises(RuntimeError, match="target"):
        torch.ops.fusedloss.sigmoid_focal_loss(x, y, 0.25, 2.0, "mean")


def test_auto_picks_cpp_on_cpu():
    x, y = torch.randn(3, 4), _multi_hot((3, 4))
    calls = {
        "binary_cross_entropy_with_logits": (x, y, None, None, "mean"),
        "sigmoid_focal_loss": (x, y, 0.25, 2.0, "none"),
        "multilabel_soft_margin_loss": (x, y, None, "mean"),
        "multilabel_categorical_crossentropy": (x, y, "mean"),
        "ghmc_loss": (x, y, None, 10, 0.0, torch.zeros(10)),
        "bi_tempered_logistic_loss": (x, torch.tensor([0, 1, 2]), 0.8, 1.2, 0.0, 5, "mean"),
    }
    for op, args in calls.items():
        assert _dispatch.resolve(op, "auto", x.device, *args)[0] == "cpp", op


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------

def _op_calls():
    x = _logits((5, 7), torch.float32)
    y = _multi_hot((5, 7))
    pw = torch.linspace(0.5, 2.0, 7)
    return [
        (OPS.binary_cross_entropy_with_logits, (x, y, None, pw, "mean")),
        (OPS.binary_cross_entropy_with_logits, (x, y, torch.rand(5, 1), None, "none")),
        (OPS.sigmoid_focal_loss, (x, y, 0.25, 2.0, "none")),
        (OPS.multilabel_soft_margin_loss, (x, y, torch.rand(7), "sum")),
        (OPS.multilabel_categorical_crossentropy, (x, y, "none")),
        (OPS.ghmc_loss, (x, y, y > 0, 10, 0.5, torch.ones(10))),
        (OPS.bi_tempered_logistic_loss, (x, torch.tensor([0, 1, 6, 3, 2]), 0.8, 1.2, 0.1, 5, "mean")),
        (OPS.bi_tempered_logistic_loss, (x, torch.softmax(y, -1), 0.5, 0.8, 0.0, 5, "none")),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _op_calls()[index]
    forward = getattr(OPS, op._qualified_op_name.split("::")[1] + "_forward")
    for requires_grad in (False, True):
        torch.library.opcheck(op, (args[0].detach().clone().requires_grad_(requires_grad),) + args[1:])
        # the device op runs below autograd (the public op's kernels call it), with or without a gradient
        torch.library.opcheck(forward, args + (requires_grad,))


def test_torch_compile_fullgraph_every_public_function():
    """Every public function on cpp inside one compiled graph (any graph break is an error), forward and backward
    through AOTAutograd, equals eager."""
    torch._dynamo.reset()
    x = _logits((6, 9), torch.float32)
    y = _multi_hot((6, 9))
    labels = torch.tensor([0, 3, 1, 8, 2, 5])
    pw = torch.linspace(0.5, 2.0, 9)

    def total(v):
        return (
            fusedloss.binary_cross_entropy_with_logits(v, y, pos_weight=pw, backend=CPP)
            + fusedloss.sigmoid_focal_loss(v, y, reduction="none", backend=CPP).sum()
            + fusedloss.multilabel_soft_margin_loss(v, y, backend=CPP)
            + fusedloss.multilabel_categorical_crossentropy(v, y, "none", backend=CPP).mean()
            + fusedloss.ghmc_loss(v, y, bins=10, backend=CPP)
            + fusedloss.bi_tempered_logistic_loss(v * 2, labels, 0.5, 1.5, 0.1, backend=CPP)
        )

    compiled, compiled_grad = _value_and_grad(torch.compile(total, fullgraph=True, backend="aot_eager"), x)
    eager, eager_grad = _value_and_grad(total, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
