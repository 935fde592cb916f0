"""Numerical fidelity at large logits and emissions: randomized differential tests of every backend.

Each case draws shapes, options, a layout and a scale (logits up to 1e4, CRF emissions up to 1e3), runs a backend
in float32, and compares its values and gradients with a float64 evaluation of the reference backend. The rule
(after flash-attention's tests): the backend's error, ``max |out - ref64| / max |ref64|``, is at most
twice the error of PyTorch's own float32 computation of the same thing (the reference backend run in float32) plus
a floor of 1e-6 (benchmarks/fidelity.py: ``within_rule``, the script that prints the README's table). The
reference backend itself is held to the same rule against ``torch.nn.functional.cross_entropy`` and pytorch-crf,
implementations nobody here wrote, on the options they have.

Half of the hard targets are the row's argmax (an overconfident model that is mostly right): p_y close to 1 is
where ``1 - p_y``, ``log p_y`` and the soft-cap derivative lose precision first.

The default seed budget keeps the file near a minute on a 2-core CPU (the Triton kernels run in the interpreter,
so their cases are small); ``FUSEDLOSS_FIDELITY_SEEDS=N`` runs N cases per backend and family instead.
"""

import importlib.util
import os
import pathlib
import random

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import requires_backend

_FIDELITY_MODULE = importlib.util.spec_from_file_location(
    "fidelity", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_FIDELITY_MODULE)
_FIDELITY_MODULE.loader.exec_module(fidelity)

_EXTRA_SEEDS = os.environ.get("FUSEDLOSS_FIDELITY_SEEDS")


def _seeds(default: int):
    return range(int(_EXTRA_SEEDS) if _EXTRA_SEEDS else default)


def _assert_rule(errors, names, outputs):
    """Every backend in ``names`` within the rule against ``errors["torch fp32"]``, output by output."""
    reference = errors["torch fp32"]
    for name in names:
        for what, error, bound in zip(outputs, errors[name], reference):
            assert fidelity.within_rule(error, bound), (
                f"{name} {what}: error {error:.2e} against float64 > {fidelity.RULE_FACTOR:g} x torch fp32's "
                f"{bound:.2e} + {fidelity.FLOOR:g}")


# ---------------------------------------------------------------------------------------------
# Random softmax-loss cases
# ---------------------------------------------------------------------------------------------


def _view(layout: str, shape):
    """``(storage shape, view)``: the input is a view of a larger float64 tensor in this layout."""
    n, c = shape
    if layout == "transposed":  # unit stride along the rows, not the classes
        return (c, n), lambda t: t.t()
    if layout == "strided":  # every other class of a wider tensor
        return (n, 2 * c), lambda t: t[:, ::2]
    return (n, c), fidelity._identity


def _softmax_case(seed: int, small: bool):
    """One random call: ``(description, storage x, view, target, kwargs, reduction, grad_output, loss_fn)``."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    n = rng.choice([1, 2, 5, 16] if small else [1, 3, 16, 33, 64])
    c = rng.choice([1, 2, 3, 9, 37, 133] if small else [1, 2, 3, 9, 37, 64, 65, 133, 600, 1100])
    scale = 10 ** rng.uniform(0, 4)
    layout = rng.choice(["contiguous", "transposed", "strided"])
    reduction = rng.choice(["none", "sum", "mean"])
    soft = rng.random() < 0.25
    storage_shape, view = _view(layout, (n, c))
    x = scale * torch.randn(storage_shape, generator=generator, dtype=torch.float64)
    logits = view(x)
    kwargs = {}
    loss_fn = fusedloss.cross_entropy
    if soft:
        target = torch.softmax(3 * torch.randn(n, c, generator=generator, dtype=torch.float64), -1)
    else:
        target = torch.randint(0, c, (n,), generator=generator)
        target = torch.where(torch.rand(n, generator=generator) < 0.5, logits.argmax(-1), target)
        if rng.random() < 0.5:
            ignore_index = rng.choice([-100, rng.randrange(c)])
            target = torch.where(torch.rand(n, generator=generator) < 0.2, ignore_index, target)
            kwargs["ignore_index"] = ignore_index
    if rng.random() < 0.3:
        kwargs["label_smoothing"] = rng.choice([0.05, 0.1, 0.3])
    if not soft and rng.random() < 0.25:
        loss_fn = fusedloss.focal_loss  # the seed formula -α_y (1 - p_y)^γ log p_y, mean by count
        kwargs["gamma"] = rng.choice([0.5, 1.0, 2.0, 3.0])
        kwargs["alpha"] = rng.choice([None, 0.25, torch.rand(c, generator=generator, dtype=torch.float64) + 0.1])
    else:
        if rng.random() < 0.4:
            kwargs["weight"] = torch.rand(c, generator=generator, dtype=torch.float64) + 0.5
        if rng.random() < 0.4:
            kwargs["focal_gamma"] = rng.choice([0.5, 1.0, 2.0, 3.0])
        if rng.random() < 0.3:
            kwargs["z_loss"] = rng.choice([1e-4, 1e-2])
        if rng.random() < 0.35:
            kwargs["softcap"] = rng.choice([5.0, 30.0, 50.0])
    grad_output = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5
    description = (f"seed {seed}: {loss_fn.__name__} N={n} C={c} scale={scale:.3g} {layout} {reduction} "
                   f"{'soft' if soft else 'hard'} {sorted(kwargs)}")
    return description, x, view, target, kwargs, reduction, grad_output, loss_fn


def _check_softmax(backend: str, seed: int, small: bool):
    description, x, view, target, kwargs, reduction, grad_output, loss_fn = _softmax_case(seed, small)
    errors = fidelity.softmax_errors([backend], x, target, kwargs, reduction, grad_output, loss_fn, view)
    try:
        _assert_rule(errors, [backend], ("value", "gradient"))
    except AssertionError as error:
        raise AssertionError(f"{description}: {error}") from None


@requires_backend("cpp")
@pytest.mark.parametrize("seed", _seeds(60))
def test_cpp_softmax_random(seed):
    _check_softmax("cpp", seed, small=False)


@requires_backend("triton")
@pytest.mark.parametrize("seed", _seeds(24))
def test_triton_softmax_random(seed):
    _check_softmax("triton", 1000 + seed, small=True)


@requires_backend("triton")
@pytest.mark.parametrize("seed", _seeds(6))
def test_triton_softmax_random_blocks(seed, monkeypatch):
    """The online (several blocks per row) layout of the Triton kernel, forced with 16-class blocks."""
    from fusedloss.triton_kernels import softmax_loss as triton_softmax

    monkeypatch.setattr(triton_softmax, "_MAX_BLOCK_C", 16)
    _check_softmax("triton", 2000 + seed, small=True)


@pytest.mark.parametrize("seed", _seeds(12))
def test_reference_softmax_random_against_torch(seed):
    """The reference in float32 within the rule against F.cross_entropy in float32, on the options torch has."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    n, c = rng.choice([1, 16, 64]), rng.choice([2, 9, 133, 1100])
    x = 10 ** rng.uniform(0, 4) * torch.randn(n, c, generator=generator, dtype=torch.float64)
    if rng.random() < 0.3:
        target = torch.softmax(3 * torch.randn(n, c, generator=generator, dtype=torch.float64), -1)
    else:
        target = torch.where(torch.rand(n, generator=generator) < 0.5, x.argmax(-1),
                             torch.randint(0, c, (n,), generator=generator))
        target[torch.rand(n, generator=generator) < 0.2] = -100
    kwargs = {"reduction": rng.choice(["none", "sum", "mean"]), "label_smoothing": rng.choice([0.0, 0.1])}
    if rng.random() < 0.5:
        kwargs["weight"] = torch.rand(c, generator=generator, dtype=torch.float64) + 0.5
    grad_output = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5

    def run(fn, dtype):
        leaf = x.detach().to(dtype).requires_grad_()
        loss = fn(leaf, fidelity._cast(target, dtype), **{k: fidelity._cast(v, dtype) for k, v in kwargs.items()})
        loss.backward(grad_output.to(dtype) if kwargs["reduction"] == "none" else None)
        return loss.detach(), leaf.grad

    def ours(*args, **kw):
        return fusedloss.cross_entropy(*args, backend="reference", **kw)

    exact = run(F.cross_entropy, torch.float64)
    ours64 = run(ours, torch.float64)
    for got, want in zip(ours64, exact):  # the float64 oracle of every other test is torch's own function
        assert fidelity.rel_error(got, want) < 1e-12
    errors = {"torch fp32": [fidelity.rel_error(o, e) for o, e in zip(run(F.cross_entropy, torch.float32), exact)],
              "reference": [fidelity.rel_error(o, e) for o, e in zip(run(ours, torch.float32), exact)]}
    _assert_rule(errors, ["reference"], ("value", "gradient"))


# ---------------------------------------------------------------------------------------------
# Random CRF cases
# ---------------------------------------------------------------------------------------------


def _crf_case(seed: int, small: bool):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    b = rng.choice([1, 2, 3] if small else [1, 2, 5, 8])
    t = rng.choice([1, 2, 6] if small else [1, 2, 7, 16, 24])
    k = rng.choice([1, 2, 5, 17] if small else [1, 2, 5, 17, 73])
    scale = 10 ** rng.uniform(0, 3)
    inputs = list(fidelity.crf_inputs(b, t, k, scale, generator, torch.device("cpu")))
    transition_scale = rng.choice([0.1, 1.0])
    for index in (3, 4, 5):
        inputs[index] = inputs[index] * transition_scale
    if rng.random() < 0.3:  # BIO-style constraints: forbidden transitions at CONSTRAINT_SCORE
        forbidden = torch.rand(k, k, generator=generator) < 0.3
        inputs[3] = inputs[3].masked_fill(forbidden, fusedloss.crf.CONSTRAINT_SCORE)
    view = fidelity._identity
    if rng.random() < 0.5:  # batch-second storage: emissions not contiguous
        inputs[0] = inputs[0].transpose(0, 1).contiguous()
        view = lambda e: e.transpose(0, 1)  # noqa: E731
    description = f"seed {seed}: B={b} T={t} K={k} scale={scale:.3g} transitions x{transition_scale}"
    return description, inputs, view


def _check_crf(backend: str, seed: int, small: bool):
    description, inputs, view = _crf_case(seed, small)
    errors = fidelity.crf_errors([backend], *inputs, view=view)
    errors = {name: list(e.values()) for name, e in errors.items()}
    try:
        _assert_rule(errors, [backend], fidelity.CRF_OUTPUTS)
    except AssertionError as error:
        raise AssertionError(f"{description}: {error}") from None


@requires_backend("cpp")
@pytest.mark.parametrize("seed", _seeds(24))
def test_cpp_crf_random(seed):
    _check_crf("cpp", seed, small=False)


@requires_backend("triton")
@pytest.mark.parametrize("seed", _seeds(3))
def test_triton_crf_random(seed):
    _check_crf("triton", 3000 + seed, small=True)


@pytest.mark.parametrize("seed", _seeds(6))
def test_reference_crf_random_against_pytorch_crf(seed):
    """The reference's log-likelihood and its emission gradient in float32 within the rule against pytorch-crf
    in float32 (both against pytorch-crf in float64)."""
    torchcrf = pytest.importorskip("torchcrf")
    _, (emissions, tags, mask, transitions, start, end, grad_output), view = _crf_case(seed, small=False)
    emissions = view(emissions)
    k = emissions.shape[-1]

    def run(module_fn, dtype):
        leaf = emissions.detach().to(dtype).requires_grad_()
        llh = module_fn(dtype)(leaf, tags, mask, reduction="none")
        llh.backward(grad_output.to(dtype))
        return llh.detach(), leaf.grad

    def peer(dtype):
        crf = torchcrf.CRF(k, batch_first=True).to(dtype)
        crf.load_state_dict({"transitions": transitions, "start_transitions": start, "end_transitions": end})
        return crf

    def ours(dtype):
        crf = fusedloss.CRF(k, batch_first=True, backend="reference").to(dtype)
        crf.load_state_dict({"transitions": transitions, "start_transitions": start, "end_transitions": end})
        return crf

    exact = run(peer, torch.float64)
    # The log-likelihood relative to the size of the scores it is the difference of (see fidelity.crf_errors).
    _, best_score = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend="reference")
    scales = (max(float(exact[0].abs().max()), float(best_score.abs().max())), None)
    errors = {name: [fidelity.rel_error(o, e, s) for o, e, s in zip(run(fn, torch.float32), exact, scales)]
              for name, fn in (("torch fp32", peer), ("reference", ours))}
    _assert_rule(errors, ["reference"], ("log-likelihood", "gradient"))


# ---------------------------------------------------------------------------------------------
# The cases that were reported, as regression tests
# ---------------------------------------------------------------------------------------------


def _reported_softmax(backend, options, scale, n=257, c=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, target, kwargs, grad_output = fidelity.softmax_inputs(n, c, scale, options, generator, torch.device("cpu"))
    for reduction in ("none", "mean"):
        errors = fidelity.softmax_errors([backend], x, target, kwargs, reduction, grad_output)
        _assert_rule(errors, [backend], (f"{reduction} value", f"{reduction} gradient"))


@requires_backend("triton")
@pytest.mark.parametrize("options", [{"focal_gamma": 2.0}, {"focal_gamma": 0.5, "label_smoothing": 0.1}],
                         ids=["gamma2", "gamma0.5-smoothing"])
def test_triton_focal_at_logit_scale_100(options):
    """Was 1.7e-3 (value) and 1.5e-3 (gradient) against the reference's 6.7e-8 and 4.0e-7: log p = s - lse."""
    _reported_softmax("triton", options, 100.0)


@requires_backend("triton")
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}], ids=["plain", "smoothing"])
def test_triton_cross_entropy_gradient_at_logit_scale_100(options):
    """Was 4.7e-6 against the reference's 3.6e-7."""
    _reported_softmax("triton", options, 100.0)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_backend("triton")),
                                     pytest.param("cpp", marks=requires_backend("cpp"))])
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_softcap_at_large_logits(backend, scale):
    """Triton was 4.6e-3 (value) and 1.2e-2 (gradient) at scale 1000, cpp 2e-5 to 3e-4 (gradient)."""
    _reported_softmax(backend, {"softcap": 30.0}, scale, n=64, c=37)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_backend("triton")),
                                     pytest.param("cpp", marks=requires_backend("cpp"))])
def test_saturated_softcap_gradient_is_zero(backend):
    """At x = -1540 with softcap 30, ds/dx = 1 - tanh^2(51.3) ~ 1e-44: the gradient there is 0 to float32, not
    the -0.00999 that 1 - t^2 of a rounded (or subnormal-broken) tanh gave."""
    x = torch.tensor([[-1540.0, 12.0, 3.0, 4000.0, -20.0]], requires_grad=True)
    fusedloss.cross_entropy(x, torch.tensor([2]), softcap=30.0, backend=backend).backward()
    exact = torch.tensor([[-1540.0, 12.0, 3.0, 4000.0, -20.0]], dtype=torch.float64, requires_grad=True)
    fusedloss.cross_entropy(exact, torch.tensor([2]), softcap=30.0, backend="reference").backward()
    assert abs(x.grad[0, 0].item()) < 1e-30 and abs(x.grad[0, 3].item()) < 1e-30
    assert fidelity.rel_error(x.grad, exact.grad) < 1e-6


@requires_backend("cpp")
@pytest.mark.parametrize("num_tags", [5, 73])
def test_cpp_crf_at_emission_scale_1000(num_tags):
    """Was 1e-4 to 4.2e-4 (gradient): every step rounded the emission into the running scores."""
    generator = torch.Generator().manual_seed(0)
    inputs = list(fidelity.crf_inputs(8, 20, num_tags, 1e3, generator, torch.device("cpu")))
    inputs[2] = torch.ones_like(inputs[2])
    errors = fidelity.crf_errors(["cpp"], *inputs)
    errors = {name: list(e.values()) for name, e in errors.items()}
    _assert_rule(errors, ["cpp"], fidelity.CRF_OUTPUTS)
