"""fusedloss.distillation_loss and linear_distillation_loss on every backend, against a float64 oracle of the
formula written here (not the reference backend): values, student gradients, ignored rows, token weights,
reductions, half precision, the linear form, bad input, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import require_backend
from _retain_graph import assert_backwards_match

BACKENDS = ["reference", "cpp", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "reference":
        require_backend(request.param)
    return request.param


def oracle_rows(student, teacher, beta, temperature):
    """Per-row divergence in float64, straight from the definition: Σ p (log p − log q) with the mixture
    M = β P_T + (1 − β) P_S formed from the probabilities (log-probabilities from float64 log_softmax, so that
    logits of size 100 stay finite)."""
    log_ps = torch.log_softmax(student.double() / temperature, -1)
    log_pt = torch.log_softmax(teacher.detach().double() / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0:
        return (pt * (log_pt - log_ps)).sum(-1)
    if beta == 1:
        return (ps * (log_ps - log_pt)).sum(-1)
    m = beta * pt + (1 - beta) * ps
    # where both probabilities underflow, M's log from the larger log-probability (M >= max(β P_T, (1-β) P_S))
    floor = torch.maximum(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    log_m = torch.where(m > 0, torch.where(m > 0, m, torch.ones_like(m)).log(), floor)
    return beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)


def oracle(student, teacher, target=None, *, beta=0.0, temperature=1.0, ignore_index=-100, token_weight=None,
           reduction="mean"):
    rows = oracle_rows(student, teacher, beta, temperature)
    w = torch.ones_like(rows) if token_weight is None else token_weight.double()
    if target is not None:
        w = torch.where(target != ignore_index, w, torch.zeros_like(w))
    weighted = torch.where(w != 0, rows * w, torch.zeros_like(rows))
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / w.sum()


def _problem(shape=(13, 37), dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    target[..., ::4] = -100
    token_weight = torch.rand(shape[:-1], generator=g, dtype=torch.float64).to(dtype) + 0.5
    return student, teacher, target, token_weight


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)


def _check(backend, student, teacher, *, tol, **options):
    s = student.detach().clone().requires_grad_()
    loss = fusedloss.distillation_loss(s, teacher, backend=backend, **options)
    s64 = student.detach().double().requires_grad_()
    expected = oracle(s64, teacher.double(), **options)
    torch.testing.assert_close(loss.double(), expected, **tol)
    g = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    loss.backward(g.to(loss.dtype))
    expected.backward(g)
    torch.testing.assert_close(s.grad.double(), s64.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_matches_oracle(backend, dtype, beta, temperature):
    student, teacher, target, token_weight = _problem(dtype=dtype)
    if backend == "triton" and dtype == torch.float64:  # the Triton kernels compute in float32
        with pytest.raises(fusedloss.BackendUnavailable, match="float64"):
            fusedloss.distillation_loss(student, teacher, beta=beta, backend=backend)
        return
    for reduction in ("none", "sum", "mean"):
        _check(backend, student, teacher, tol=_tol(dtype), target=target, beta=beta, temperature=temperature,
               reduction=reduction)
    _check(backend, student, teacher, tol=_tol(dtype), beta=beta, temperature=temperature)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_token_weights_and_3d_rows(backend, reduction, beta):
    student, teacher, target, token_weight = _problem(shape=(3, 5, 29))
    _check(backend, student, teacher, tol=_tol(torch.float32), target=target, token_weight=token_weight, beta=beta,
           temperature=2.0, reduction=reduction)


def test_large_vocabulary_rows(backend):
    # more than one 4096-column block per row in the Triton kernel, and the cpp kernel's blocking
    student, teacher, target, _ = _problem(shape=(3, 5000), seed=1)
    for beta in (0.0, 0.5, 1.0):
        _check(backend, student, teacher, tol=_tol(torch.float32), target=target, beta=beta, reduction="sum")


def test_teacher_gets_no_gradient(backend):
    student, teacher, target, _ = _problem()
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    for beta in (0.0, 0.5):
        loss = fusedloss.distillation_loss(s, t, target, beta=beta, backend=backend)
        loss.backward()
    assert t.grad is None
    assert s.grad is not None


def test_all_ignored_mean_is_nan_with_zero_gradient(backend):
    student, teacher, _, _ = _problem()
    target = torch.full(student.shape[:-1], -100)
    s = student.clone().requires_grad_()
    loss = fusedloss.distillation_loss(s, teacher, target, beta=0.5, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_no_grad_and_module(backend):
    student, teacher, target, token_weight = _problem(shape=(2, 4, 11))
    module = fusedloss.nn.DistillationLoss(beta=0.5, temperature=2.0, reduction="none", backend=backend)
    with torch.no_grad():
        loss = module(student, teacher, target, token_weight)
    assert loss.shape == (2, 4)
    expected = oracle(student, teacher, target, beta=0.5, temperature=2.0, token_weight=token_weight,
                      reduction="none")
    torch.testing.assert_close(loss.double(), expected, **_tol(torch.float32))
    assert "beta=0.5" in repr(module)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_half_precision_within_torchs_own_error(backend, dtype, beta):
    """Inputs rounded to the half dtype; the result is compared with float64 of those inputs. The tolerance is
    derived from torch's own error in that dtype: the eager formula run on the half tensors (torch computes
    log_softmax in the half dtype), times 2, plus the rounding of the result to the dtype."""
    student, teacher, target, _ = _problem(shape=(16, 301), dtype=dtype, seed=2)
    s = student.clone().requires_grad_()
    loss = fusedloss.distillation_loss(s, teacher, target, beta=beta, temperature=2.0, reduction="none",
                                       backend=backend)
    s64 = student.double().requires_grad_()
    expected = oracle(s64, teacher.double(), target, beta=beta, temperature=2.0, reduction="none")
    sh = student.clone().requires_grad_()
    torch_half = _eager_formula(sh, teacher, beta, 2.0)
    torch_half = torch.where(target != -100, torch_half, torch.zeros_like(torch_half))
    eps = torch.finfo(dtype).eps
    torch_err = (torch_half.double() - expected).abs().max().item()
    assert (loss.double() - expected).abs().max().item() <= 2 * torch_err + eps * expected.abs().max().item() + 1e-6
    g = torch.ones_like(expected)
    expected.backward(g)
    loss.backward(g.to(dtype))
    torch_half.backward(g.to(dtype))
    torch_grad_err = (sh.grad.double() - s64.grad).abs().max().item()
    ours_err = (s.grad.double() - s64.grad).abs().max().item()
    assert ours_err <= 2 * torch_grad_err + eps * s64.grad.abs().max().item() + 1e-6


def _eager_formula(student, teacher, beta, temperature):
    """TRL's generalized_jsd_loss per row, in the tensors' own dtype."""
    log_ps = F.log_softmax(student / temperature, -1)
    log_pt = F.log_softmax(teacher / temperature, -1)
    if beta == 0:
        return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_ps + math.log(1 - beta), log_pt + math.log(beta)]), dim=0)
    return (beta * F.kl_div(log_m, log_pt, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(log_m, log_ps, reduction="none", log_target=True)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_logits_stay_finite_and_accurate(backend, beta):
    student, teacher, target, _ = _problem(shape=(8, 97), scale=100.0, seed=4)
    # the same argmax in half the rows: tiny divergences next to huge logits
    teacher[::2] = student[::2] + 0.01 * teacher[::2]
    for temperature in (0.5, 1.0):
        _check(backend, student, teacher, tol=dict(rtol=1e-4, atol=1e-4), target=target, beta=beta,
               temperature=temperature, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_with_retain_graph(backend, reduction):
    student, teacher, target, _ = _problem()

    def ours(s):
        return fusedloss.distillation_loss(s, teacher, target, beta=0.5, reduction=reduction, backend=backend)

    def ref(s):
        return oracle(s, teacher, target, beta=0.5, reduction=reduction)

    # the fused backends scale their saved gradient in place: a second backward raises, never a wrong number
    assert_backwards_match(ours, ref, [student], [1.0, 2.5], may_raise=backend != "reference", rtol=1e-4,
                           atol=2e-5)
    assert_backwards_match(ours, ref, [student], [2.5, 1.0], may_raise=backend != "reference", rtol=1e-4,
                           atol=2e-5)


def test_reference_gradcheck():
    student, teacher, target, token_weight = _problem(shape=(4, 7), dtype=torch.float64)
    for beta in (0.0, 0.3, 1.0):
        for reduction in ("none", "mean"):
            torch.autograd.gradcheck(
                lambda s, beta=beta, reduction=reduction: fusedloss.distillation_loss(
                    s, teacher, target, beta=beta, temperature=1.5, token_weight=token_weight, reduction=reduction,
                    backend="reference"),
                (student.clone().requires_grad_(),))


# ----------------------------------------------------------------------------------------------
# The linear form
# ----------------------------------------------------------------------------------------------


def _linear_problem(n=23, hs=12, ht=20, v=41, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    xs, ws, xt, wt = r(n, hs), r(v, hs, s=0.5), r(n, ht), r(v, ht, s=0.5)
    bs, bt = (r(v), r(v)) if bias else (None, None)
    target = torch.randint(0, v, (n,), generator=g)
    target[::5] = -100
    token_weight = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return xs, ws, bs, xt, wt, bt, target, token_weight


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_materialized_formula(backend, reduction, beta, bias):
    xs, ws, bs, xt, wt, bt, target, token_weight = _linear_problem(bias=bias)
    for chunk_size in (5, 64, None):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (xs, ws, bs)]
        teacher = [t.clone().requires_grad_() if t is not None else None for t in (xt, wt, bt)]
        loss = fusedloss.linear_distillation_loss(
            leaves[0], leaves[1], teacher[0], teacher[1], target, student_bias=leaves[2], teacher_bias=teacher[2],
            beta=beta, temperature=2.0, token_weight=token_weight, reduction=reduction, chunk_size=chunk_size,
            backend=backend)
        ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (xs, ws, bs)]
        expected = oracle(F.linear(*ref_leaves), F.linear(xt.double(), wt.double(), None if bt is None
                                                                  else bt.double()),
                          target, beta=beta, temperature=2.0, token_weight=token_weight, reduction=reduction)
        tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss.double(), expected, **tol)
        g = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
        loss.backward(g.float())
        expected.backward(g)
        for ours, ref in zip(leaves, ref_leaves):
            if ours is not None:
                torch.testing.assert_close(ours.grad.double(), ref.grad, **tol)
        assert all(t is None or t.grad is None for t in teacher)


def test_linear_one_row_3d_and_float64(backend):
    if backend == "triton":
        dtype = torch.float32
    else:
        dtype = torch.float64
    xs, ws, bs, xt, wt, bt, target, token_weight = _linear_problem(n=1, dtype=dtype)
    loss = fusedloss.linear_distillation_loss(xs, ws, xt, wt, None, beta=0.5, backend=backend)
    expected = oracle(F.linear(xs.double(), ws.double()), F.linear(xt.double(), wt.double()), beta=0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    xs, ws, bs, xt, wt, bt, target, token_weight = _linear_problem(n=12, dtype=dtype)
    module = fusedloss.nn.LinearDistillationLoss(beta=1.0, reduction="none", chunk_size=5, backend=backend)
    loss = module(xs.reshape(3, 4, -1), ws, xt.reshape(3, 4, -1), wt, target.reshape(3, 4))
    assert loss.shape == (3, 4)
    expected = oracle(F.linear(xs.double(), ws.double()), F.linear(xt.double(), wt.double()), target, beta=1.0,
                      reduction="none")
    torch.testing.assert_close(loss.double().reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_linear_bf16_accumulates_in_float32(backend):
    xs, ws, bs, xt, wt, bt, target, _ = _linear_problem(n=40, dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (xs, ws, bs)]
    loss = fusedloss.linear_distillation_loss(leaves[0], leaves[1], xt, wt, target, student_bias=leaves[2],
                                              teacher_bias=bt, beta=0.5, chunk_size=7, backend=backend)
    loss.backward()
    ref = [t.double().requires_grad_() for t in (xs, ws, bs)]
    expected = oracle(F.linear(*ref), F.linear(xt.double(), wt.double(), bt.double()), target, beta=0.5)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=2e-3)
    for ours, r in zip(leaves, ref):
        assert ours.grad.dtype == torch.bfloat16
        torch.testing.assert_close(ours.grad.double(), r.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_backward_twice_with_retain_graph(backend, reduction):
    xs, ws, bs, xt, wt, bt, target, _ = _linear_problem()

    def ours(x, w, b):
        return fusedloss.linear_distillation_loss(x, w, xt, wt, target, student_bias=b, teacher_bias=bt, beta=0.5,
                                                  reduction=reduction, chunk_size=6, backend=backend)

    def ref(x, w, b):
        return oracle(F.linear(x, w, b), F.linear(xt, wt, bt), target, beta=0.5, reduction=reduction)

    for scales in ([1.0, 2.5], [2.5, 1.0]):
        assert_backwards_match(ours, ref, [xs, ws, bs], scales, may_raise=backend != "reference", rtol=1e-4,
                               atol=1e-5)


def test_linear_all_ignored(backend):
    xs, ws, bs, xt, wt, bt, _, _ = _linear_problem()
    target = torch.full((xs.shape[0],), -100)
    x = xs.clone().requires_grad_()
    loss = fusedloss.linear_distillation_loss(x, ws, xt, wt, target, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# Bad input, dispatch, compile
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    s, t, target, tw = _problem()
    bad = [
        (dict(beta=1.5), ValueError, "beta"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(target=target[:-1]), ValueError, "target"),
        (dict(target=target.float()), TypeError, "target"),
        (dict(token_weight=tw[:-1]), ValueError, "token_weight"),
        (dict(teacher_logits=t[:, :-1]), ValueError, "teacher_logits"),
        (dict(student_logits=s.long()), TypeError, "student_logits"),
        (dict(teacher_logits=t.double()), TypeError, "teacher_logits"),
    ]
    for options, error, name in bad:
        args = dict(student_logits=s, teacher_logits=t)
        args.update(options)
        with pytest.raises(error, match=name):
            fusedloss.distillation_loss(args.pop("student_logits"), args.pop("teacher_logits"), **args)
    xs, ws, bs, xt, wt, bt, target, _ = _linear_problem()
    with pytest.raises(ValueError, match="teacher_weight"):
        fusedloss.linear_distillation_loss(xs, ws, xt, wt[:-1])
    with pytest.raises(ValueError, match="student_weight"):
        fusedloss.linear_distillation_loss(xs, ws[:, :-1], xt, wt)
    with pytest.raises(ValueError, match="teacher_input"):
        fusedloss.linear_distillation_loss(xs, ws, xt[:-1], wt)
    with pytest.raises(ValueError, match="chunk_size"):
        fusedloss.linear_distillation_loss(xs, ws, xt, wt, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        fusedloss.nn.DistillationLoss(beta=2.0)


def test_dispatch():
    s, t, _, _ = _problem()
    args = (s, t, None, None, 0.0, 1.0, -100, "mean")
    reasons = fusedloss._dispatch.why_not("distillation_loss", "cuda", s.device, *args)
    assert reasons
    if fusedloss.available_backends()["cpp"] is None:
        assert fusedloss._dispatch.resolve("distillation_loss", "auto", s.device, *args)[0] == "cpp"


COMPILE_CASES = [("cpp", "aot_eager"), ("cpp", "inductor"), ("triton", "aot_eager"), ("triton", "inductor")]


@pytest.mark.parametrize("backend_name,compiler", COMPILE_CASES)
def test_compile_fullgraph_heads(backend_name, compiler):
    require_backend(backend_name)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 33))
    teacher_head = torch.randn(33, 12)

    def logits_model(x, xt, target):
        return fusedloss.distillation_loss(student(x), xt @ teacher_head.t(), target, beta=0.5, temperature=2.0,
                                           backend=backend_name)

    def linear_model(x, xt, target):
        hidden = student[1](student[0](x))
        return fusedloss.linear_distillation_loss(hidden, student[2].weight, xt, teacher_head, target,
                                                  student_bias=student[2].bias, beta=0.5, chunk_size=4,
                                                  backend=backend_name)

    x, xt = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    target = torch.randint(0, 33, (2, 5))
    target[0, 0] = -100
    for fn in (logits_model, linear_model):
        student.zero_grad()
        eager = fn(x, xt, target)
        eager.backward()
        eager_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)(x, xt, target)
        compiled.backward()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        for p, g in zip(student.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
