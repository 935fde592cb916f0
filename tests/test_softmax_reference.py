"""Softmax losses on the reference backend against oracles written elsewhere.

Oracles: ``torch.nn.functional.cross_entropy`` (every argument combination, low precision),
``kornia.losses.focal_loss`` (where its alpha convention coincides), explicit transcriptions of the
per-row formula for focal + smoothing + weights, z-loss and softcap, and ``torch.autograd.gradcheck``.
"""

import itertools

import kornia
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference.softmax import softmax_loss

REF = "reference"


def _logits(shape, dtype=torch.float64, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()


def _hard_target(shape, num_classes, ignore_index=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=generator)
    if ignore_index is not None:
        target.view(-1)[::3] = ignore_index
    return target


def _soft_target(shape, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), dim=-1)


def _torch_layout(logits):
    """torch wants the class dimension at 1: (B, T, C) -> (B, C, T)."""
    return logits if logits.dim() == 2 else logits.movedim(-1, 1)


def _value_and_grad(fn, logits):
    loss = fn(logits)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss.detach(), grad


# ----------------------------------------------------------------------------------------------
# Equality with F.cross_entropy (focal_gamma = 0, z_loss = 0, no softcap)
# ----------------------------------------------------------------------------------------------

COMBOS = list(
    itertools.product(
        [False, True],  # weight
        [False, True],  # some targets ignored (hard targets) / custom ignore_index
        ["none", "sum", "mean"],
        [0.0, 0.1],  # label_smoothing
        ["hard", "soft"],
        [(7, 5), (2, 3, 4)],  # (N, C), (B, T, C)
    )
)


@pytest.mark.parametrize("use_weight,ignore,reduction,smoothing,kind,shape", COMBOS)
def test_cross_entropy_equals_torch(use_weight, ignore, reduction, smoothing, kind, shape):
    num_classes = shape[-1]
    logits = _logits(shape)
    weight = torch.rand(num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    weight = weight if use_weight else None
    # a valid class as ignore_index: torch skips those rows too; probability targets accept only the default
    ignore_index = 2 if ignore and kind == "hard" else -100
    if kind == "hard":
        target = _hard_target(shape[:-1], num_classes, ignore_index if ignore else None)
        torch_target = target
    else:
        target = _soft_target(shape)
        torch_target = _torch_layout(target)
    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    ours, ours_grad = _value_and_grad(lambda x: fusedloss.cross_entropy(x, target, backend=REF, **kwargs), logits)
    theirs, theirs_grad = _value_and_grad(lambda x: F.cross_entropy(_torch_layout(x), torch_target, **kwargs), logits)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_targets_ignored_like_torch(reduction, smoothing, use_weight):
    logits = _logits((4, 3))
    target = torch.full((4,), -100)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) if use_weight else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)
    ours, ours_grad = _value_and_grad(lambda x: fusedloss.cross_entropy(x, target, backend=REF, **kwargs), logits)
    theirs, theirs_grad = _value_and_grad(lambda x: F.cross_entropy(x, target, **kwargs), logits)
    if reduction == "mean":
        assert torch.isnan(theirs) and torch.isnan(ours)
    else:
        assert not ours.any()
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, equal_nan=True, rtol=0, atol=0)


def _max_error(value, exact):
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision_within_twice_torch_error(dtype, reduction):
    """Error against float64 at most twice torch's own error in ``dtype``, plus the output's rounding."""
    shape, num_classes = (3, 17, 53), 53
    logits64 = _logits(shape, scale=4.0).detach()
    logits = logits64.to(dtype).requires_grad_()
    exact_input = logits.detach().double().requires_grad_()  # the same rounded inputs, computed exactly
    target = _hard_target(shape[:-1], num_classes, ignore_index=-100)
    weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(4)) + 0.5
    kwargs = dict(ignore_index=-100, reduction=reduction, label_smoothing=0.1)

    exact, exact_grad = _value_and_grad(
        lambda x: F.cross_entropy(_torch_layout(x), target, weight.double(), **kwargs), exact_input
    )
    torch_low, torch_low_grad = _value_and_grad(
        lambda x: F.cross_entropy(_torch_layout(x), target, weight.to(dtype), **kwargs), logits
    )
    ours, ours_grad = _value_and_grad(
        lambda x: fusedloss.cross_entropy(x, target, weight, backend=REF, **kwargs), logits
    )
    assert ours.dtype == dtype and ours_grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    value_tol = 2 * _max_error(torch_low, exact) + eps * exact.abs().max().item()
    grad_tol = 2 * _max_error(torch_low_grad, exact_grad) + eps * exact_grad.abs().max().item()
    assert _max_error(ours, exact) <= value_tol
    assert _max_error(ours_grad, exact_grad) <= grad_tol


# ----------------------------------------------------------------------------------------------
# Focal factor, z-loss, softcap
# ----------------------------------------------------------------------------------------------


def _explicit_formula(logits, target, weight, smoothing, gamma, z_loss, softcap, ignore_index=-100):
    """The per-row loss written out with one-hot targets, 0 if ignored:
    -Σ_c q_c w_c (1 - p_c)^γ log p_c + z·logsumexp(s)²."""
    num_classes = logits.shape[-1]
    capped = softcap * torch.tanh(logits / softcap) if softcap else logits
    log_probs = torch.log_softmax(capped, -1)  # exp(s) / Σ exp(s) overflows for the saturated rows tested below
    probs = log_probs.exp()
    kept = target != ignore_index
    onehot = F.one_hot(torch.where(kept, target, 0), num_classes).to(logits.dtype)
    smoothed = (1 - smoothing) * onehot + smoothing / num_classes
    w = torch.ones(num_classes, dtype=logits.dtype) if weight is None else weight
    row = -(smoothed * w * (1 - probs) ** gamma * log_probs).sum(-1)
    row = row + z_loss * torch.logsumexp(capped, -1) ** 2
    return torch.where(kept, row, torch.zeros_like(row))


@pytest.mark.parametrize(
    "gamma,z_loss,softcap,smoothing", [(2.0, 0.0, None, 0.1), (0.5, 1e-2, 3.0, 0.0), (1.0, 1e-3, 1.5, 0.2)]
)
def test_options_against_explicit_formula(gamma, z_loss, softcap, smoothing):
    logits = _logits((6, 7))
    target = _hard_target((6,), 7, ignore_index=-100)
    weight = torch.linspace(0.2, 2.0, 7, dtype=torch.float64)
    ours, ours_grad = _value_and_grad(
        lambda x: fusedloss.cross_entropy(
            x, target, weight, reduction="none", label_smoothing=smoothing,
            focal_gamma=gamma, z_loss=z_loss, softcap=softcap, backend=REF,
        ),
        logits,
    )  # fmt: skip
    theirs, theirs_grad = _value_and_grad(
        lambda x: _explicit_formula(x, target, weight, smoothing, gamma, z_loss, softcap), logits
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)


def test_z_loss_and_softcap_add_to_torch_cross_entropy():
    """softcap is cross entropy of the capped logits; z-loss adds z·logsumexp² per kept row, divided like the rest."""
    logits = _logits((2, 5, 9), scale=5.0)
    target = _hard_target((2, 5), 9, ignore_index=-100)
    cap, z = 4.0, 1e-2

    def oracle(x):
        capped = cap * torch.tanh(x / cap)
        kept = (target != -100).to(x.dtype)
        z_term = z * (torch.logsumexp(capped, -1) ** 2 * kept).sum() / kept.sum()
        return F.cross_entropy(_torch_layout(capped), target) + z_term

    ours, ours_grad = _value_and_grad(
        lambda x: fusedloss.cross_entropy(x, target, z_loss=z, softcap=cap, backend=REF), logits
    )
    theirs, theirs_grad = _value_and_grad(oracle, logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_focal_gamma_zero_is_cross_entropy(reduction):
    logits = _logits((3, 4, 6))
    target = _hard_target((3, 4), 6, ignore_index=-100)
    ours, ours_grad = _value_and_grad(
        lambda x: fusedloss.focal_loss(x, target, gamma=0.0, reduction=reduction, backend=REF), logits
    )
    same_op, same_op_grad = _value_and_grad(
        lambda x: fusedloss.cross_entropy(x, target, reduction=reduction, backend=REF), logits
    )
    torch.testing.assert_close(ours, same_op, rtol=0, atol=0)  # the focal factor is skipped, not multiplied by 1
    torch.testing.assert_close(ours_grad, same_op_grad, rtol=0, atol=0)
    # torch's class-dim-1 kernel sums in another order: equal up to float64 rounding
    theirs, theirs_grad = _value_and_grad(
        lambda x: F.cross_entropy(_torch_layout(x), target, reduction=reduction), logits
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("gamma", [0.01, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_gradient_finite_when_probability_is_one(gamma, dtype):
    """(1 - p)^γ has an infinite derivative at p = 1 for γ < 1; the loss (1 - p)^γ log p has derivative 0 there."""
    logits = torch.tensor([[0.0, 800.0, 0.0], [1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    target = torch.tensor([1, 0])
    loss = fusedloss.cross_entropy(
        logits, target, reduction="none", focal_gamma=gamma, label_smoothing=0.1, backend=REF
    )
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # Row 0: the target class has p = 1 exactly; its cost and gradient vanish, smoothing mass on p ≈ 0 classes remains.
    exact = _explicit_formula(logits.detach().double(), target, None, 0.1, gamma, 0.0, None)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_against_kornia(alpha, gamma):
    """kornia weights class 0 by 1 - α and the others by α: our (C,) alpha tensor expresses the same weights."""
    logits = _logits((2, 5, 4))
    target = _hard_target((2, 5), 4, ignore_index=-100)
    our_alpha = None if alpha is None else torch.tensor([1 - alpha, alpha, alpha, alpha], dtype=torch.float64)
    ours, ours_grad = _value_and_grad(
        lambda x: fusedloss.focal_loss(x, target, gamma, our_alpha, reduction="none", backend=REF), logits
    )
    theirs, theirs_grad = _value_and_grad(
        lambda x: kornia.losses.focal_loss(_torch_layout(x), target, alpha, gamma, reduction="none").sum(1), logits
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)
    # mean divides by the non-ignored rows (kornia's mean also counts classes and ignored pixels: not compared)
    mean = fusedloss.focal_loss(logits, target, gamma, our_alpha, backend=REF)
    torch.testing.assert_close(mean, theirs.sum() / (target != -100).sum(), rtol=1e-12, atol=0)


def test_focal_loss_mean_is_kornia_mean_times_classes():
    """kornia's mean averages over N·C elements, ours over the N rows (the docstring names the difference)."""
    logits = _logits((6, 4))
    target = _hard_target((6,), 4)
    ours = fusedloss.focal_loss(logits, target, 2.0, backend=REF)
    theirs = kornia.losses.focal_loss(logits, target, None, 2.0, reduction="mean")
    torch.testing.assert_close(ours, theirs * 4, rtol=1e-12, atol=0)


def test_focal_loss_scalar_alpha_weights_every_class():
    logits = _logits((5, 3))
    target = _hard_target((5,), 3)
    scaled = fusedloss.focal_loss(logits, target, 2.0, 0.25, reduction="sum", backend=REF)
    plain = fusedloss.focal_loss(logits, target, 2.0, None, reduction="sum", backend=REF)
    torch.testing.assert_close(scaled, 0.25 * plain, rtol=1e-14, atol=0)


def test_gradcheck_reference_every_option():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    hard = torch.tensor([0, 3, -100, 1, 2])
    soft = torch.softmax(torch.randn(5, 4, dtype=torch.float64, generator=generator), -1)
    weight = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    for target, reduction, gamma, cap in [(hard, "mean", 2.0, 3.0), (hard, "none", 0.5, None), (soft, "sum", 1.5, 2.0)]:
        assert torch.autograd.gradcheck(
            lambda x, t=target, r=reduction, g=gamma, c=cap: softmax_loss(
                x, t, weight, -100, r, 0.1, g, 1e-2, c, False, False
            ),
            (logits,),
        )


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, modules, compile
# ----------------------------------------------------------------------------------------------


def test_none_reduction_keeps_target_shape_and_dtype():
    logits = _logits((2, 3, 4), dtype=torch.bfloat16)
    loss = fusedloss.cross_entropy(logits, _hard_target((2, 3), 4), reduction="none", backend=REF)
    assert loss.shape == (2, 3) and loss.dtype == torch.bfloat16
    unbatched = fusedloss.cross_entropy(_logits((4,)), torch.tensor(2), reduction="none", backend=REF)
    assert unbatched.shape == ()


def test_cross_entropy_module_is_a_drop_in_for_torch():
    weight = torch.tensor([1.0, 2.0, 0.5])
    logits = _logits((6, 3), dtype=torch.float32)
    target = _hard_target((6,), 3, ignore_index=-1)
    ours = fusedloss.nn.CrossEntropyLoss(weight, ignore_index=-1, label_smoothing=0.05, backend=REF)
    theirs = torch.nn.CrossEntropyLoss(weight, ignore_index=-1, label_smoothing=0.05)
    torch.testing.assert_close(ours(logits, target), theirs(logits, target))
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight"}
    theirs.load_state_dict(ours.state_dict())
    with pytest.warns(UserWarning):
        legacy = fusedloss.nn.CrossEntropyLoss(size_average=False, backend=REF)
    assert legacy.reduction == "sum"


def test_focal_loss_module_matches_function():
    alpha = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    module = fusedloss.nn.FocalLoss(gamma=1.5, alpha=alpha, reduction="sum", backend=REF)
    assert "alpha" in module.state_dict()
    logits = _logits((4, 3))
    target = _hard_target((4,), 3)
    torch.testing.assert_close(
        module(logits, target), fusedloss.focal_loss(logits, target, 1.5, alpha, reduction="sum")
    )


def test_compiles_fullgraph_forward_and_backward():
    """fullgraph=True fails on any graph break in validation or dispatch. Graph breaks happen in Dynamo's capture,
    which the "eager" backend runs in full; Inductor's code generation would only cost test time here."""
    logits = _logits((2, 3, 5), dtype=torch.float32)
    target = _hard_target((2, 3), 5, ignore_index=-100)

    def loss_fn(x, y):
        return fusedloss.cross_entropy(x, y, label_smoothing=0.1, focal_gamma=2.0, z_loss=1e-3, backend=REF)

    compiled, compiled_grad = _value_and_grad(
        lambda x: torch.compile(loss_fn, fullgraph=True, backend="eager")(x, target), logits
    )
    eager, eager_grad = _value_and_grad(lambda x: loss_fn(x, target), logits)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ----------------------------------------------------------------------------------------------
# Bad input: exception type, and the message names the argument
# ----------------------------------------------------------------------------------------------

X = torch.randn(2, 3, 4)
Y = torch.randint(0, 4, (2, 3))

BAD_CROSS_ENTROPY = [
    ("input is a list", dict(input=[[0.0, 1.0]]), TypeError, "input"),
    ("integer input", dict(input=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "input"),
    ("0-dim input", dict(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "input"),
    ("zero classes", dict(input=torch.randn(2, 0), target=torch.zeros(2, dtype=torch.int64)), ValueError, "input"),
    ("int32 target", dict(target=Y.int()), TypeError, "target"),
    ("bool target", dict(target=Y > 0), TypeError, "target"),
    ("target shape", dict(target=torch.randint(0, 4, (2, 4))), ValueError, "(2, 3)"),
    ("soft target shape", dict(target=torch.rand(2, 3, 5)), ValueError, "(2, 3, 5)"),
    ("ignore_index with soft target", dict(target=torch.rand(2, 3, 4), ignore_index=0), ValueError, "ignore_index"),
    ("target >= C", dict(target=torch.full((2, 3), 4)), ValueError, "target"),
    ("negative target", dict(target=torch.full((2, 3), -1)), ValueError, "target"),
    ("weight shape", dict(weight=torch.ones(5)), ValueError, "weight"),
    ("integer weight", dict(weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight"),
    ("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("label_smoothing > 1", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("label_smoothing < 0", dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("label_smoothing nan", dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    ("focal_gamma < 0", dict(focal_gamma=-1.0), ValueError, "focal_gamma"),
    ("focal_gamma str", dict(focal_gamma="2"), TypeError, "focal_gamma"),
    ("z_loss < 0", dict(z_loss=-1e-4), ValueError, "z_loss"),
    ("softcap 0", dict(softcap=0.0), ValueError, "softcap"),
    ("softcap < 0", dict(softcap=-30.0), ValueError, "softcap"),
    ("inplace_backward int", dict(inplace_backward=1), TypeError, "inplace_backward"),
    ("unknown backend", dict(backend="gpu"), ValueError, "backend"),
]


# auto runs the cpp op where it is built (its checks are C++); reference runs the Python checks.
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case,override,error,named", BAD_CROSS_ENTROPY, ids=[c[0] for c in BAD_CROSS_ENTROPY])
def test_cross_entropy_rejects(case, override, error, named, backend):
    kwargs = dict(input=X, target=Y, backend=backend)
    kwargs.update(override)
    with pytest.raises(error, match=named.replace("(", r"\(").replace(")", r"\)")):
        fusedloss.cross_entropy(**kwargs)


def test_target_shape_error_names_both_shapes_and_class_dim_layout():
    with pytest.raises(ValueError) as info:
        fusedloss.cross_entropy(torch.randn(2, 4, 3), torch.randint(0, 4, (2, 3)))  # torch's (N, C, d1) layout
    message = str(info.value)
    assert "(2, 4, 3)" in message and "(2, 3)" in message and "movedim(1, -1)" in message


BAD_FOCAL = [
    ("gamma < 0", dict(gamma=-0.5), ValueError, "gamma"),
    ("alpha < 0", dict(alpha=-0.25), ValueError, "alpha"),
    ("alpha shape", dict(alpha=torch.ones(3)), ValueError, "alpha"),
    ("alpha string", dict(alpha="0.25"), TypeError, "alpha"),
    ("reduction", dict(reduction=None), ValueError, "reduction"),
    ("target >= C", dict(target=torch.full((2, 3), 9)), ValueError, "target"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case,override,error,named", BAD_FOCAL, ids=[c[0] for c in BAD_FOCAL])
def test_focal_loss_rejects(case, override, error, named, backend):
    kwargs = dict(input=X, target=Y, backend=backend)
    kwargs.update(override)
    with pytest.raises(error, match=named):
        fusedloss.focal_loss(**kwargs)


def test_modules_reject_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        fusedloss.nn.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        fusedloss.nn.CrossEntropyLoss(softcap=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        fusedloss.nn.FocalLoss(gamma=-2.0)
