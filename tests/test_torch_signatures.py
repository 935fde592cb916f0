"""Drop-in means torch's positional order: every function documented as "exactly torch's" takes torch's
parameters in torch's order (the deprecated ``size_average``/``reduce`` slots included, mapped as torch maps
them), and a call written positionally for torch gives torch's result. Probability targets accept what torch
accepts (any negative ``ignore_index``)."""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import requires_backend

BACKENDS = ["reference", pytest.param("cpp", marks=requires_backend("cpp"))]

# (ours, torch's): torch's parameters must be the leading positional parameters of ours, same names and defaults.
DROP_INS = [
    (fusedloss.cross_entropy, F.cross_entropy),
    (fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    (fusedloss.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss),
]


@pytest.mark.parametrize("ours, theirs", DROP_INS, ids=lambda f: getattr(f, "__name__", ""))
def test_positional_parameters_are_torchs(ours, theirs):
    torch_params = list(inspect.signature(theirs).parameters.values())
    our_params = list(inspect.signature(ours).parameters.values())[: len(torch_params)]
    assert [p.name for p in our_params] == [p.name for p in torch_params]
    assert [p.default for p in our_params] == [p.default for p in torch_params]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in our_params)
    extra = list(inspect.signature(ours).parameters.values())[len(torch_params):]
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in extra), "fusedloss options must be keyword-only"


def _both(fn_ours, fn_theirs):
    """Values of both calls, and the warnings each raised (torch warns on size_average/reduce)."""
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        ours = fn_ours()
    with warnings.catch_warnings(record=True) as theirs_warned:
        warnings.simplefilter("always")
        theirs = fn_theirs()
    return ours, theirs, len(ours_warned) > 0, len(theirs_warned) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "legacy",
    [(None, None), (False, None), (None, False), (True, True), (False, True)],
    ids=["plain", "size_average=False", "reduce=False", "both-true", "sum-by-flags"],
)
def test_cross_entropy_torch_positional_call(backend, legacy):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=generator)
    y[3] = 2
    w = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
    size_average, reduce = legacy
    ours, theirs, ours_warned, theirs_warned = _both(
        lambda: fusedloss.cross_entropy(x, y, w, size_average, 2, reduce, "sum", 0.1, backend=backend),
        lambda: F.cross_entropy(x, y, w, size_average, 2, reduce, "sum", 0.1),
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours_warned == theirs_warned


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_probability_targets_accept_negative_ignore_index(backend):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(4, 6, generator=generator, dtype=torch.float64), -1)
    for ignore_index in (-1, -100, -7):
        ours = fusedloss.cross_entropy(x, probs, ignore_index=ignore_index, label_smoothing=0.1, backend=backend)
        theirs = F.cross_entropy(x, probs, ignore_index=ignore_index, label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        (ours_grad,) = torch.autograd.grad(ours, x)
        (theirs_grad,) = torch.autograd.grad(theirs, x)
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)
    # torch raises for a class index as ignore_index with probabilities; so do we (ValueError naming it)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, probs, ignore_index=2)
    with pytest.raises(ValueError, match="ignore_index"):
        fusedloss.cross_entropy(x, probs, ignore_index=2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy", [(None, None), (None, False), (False, True)], ids=["plain", "none", "sum"])
def test_binary_cross_entropy_with_logits_torch_positional_call(backend, legacy):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.rand(6, 4, generator=generator, dtype=torch.float64)
    w = torch.rand(4, generator=generator, dtype=torch.float64)
    pos_weight = torch.rand(4, generator=generator, dtype=torch.float64) * 3
    size_average, reduce = legacy
    ours, theirs, ours_warned, theirs_warned = _both(
        lambda: fusedloss.binary_cross_entropy_with_logits(x, y, w, size_average, reduce, "mean", pos_weight,
                                                           backend=backend),
        lambda: F.binary_cross_entropy_with_logits(x, y, w, size_average, reduce, "mean", pos_weight),
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours_warned == theirs_warned


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy", [(None, None), (None, False), (False, True)], ids=["plain", "none", "sum"])
def test_multilabel_soft_margin_loss_torch_positional_call(backend, legacy):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (6, 4), generator=generator).double()
    w = torch.rand(4, generator=generator, dtype=torch.float64)
    size_average, reduce = legacy
    ours, theirs, ours_warned, theirs_warned = _both(
        lambda: fusedloss.multilabel_soft_margin_loss(x, y, w, size_average, reduce, "sum", backend=backend),
        lambda: F.multilabel_soft_margin_loss(x, y, w, size_average, reduce, "sum"),
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours_warned == theirs_warned


def test_sigmoid_focal_loss_torchvision_positional_order():
    """torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none"): the same
    positional order and defaults (argument names input/target, as every other fusedloss function)."""
    params = list(inspect.signature(fusedloss.sigmoid_focal_loss).parameters.values())
    assert [(p.name, p.default) for p in params[:5]] == [
        ("input", inspect.Parameter.empty), ("target", inspect.Parameter.empty),
        ("alpha", 0.25), ("gamma", 2.0), ("reduction", "none"),
    ]
