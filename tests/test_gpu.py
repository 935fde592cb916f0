"""The triton and cuda backends on CUDA tensors, against torch.nn.functional, pytorch-crf and the float64 reference.

Skipped without a CUDA device, and under TRITON_INTERPRET=1 (which tests/conftest.py sets by default so that the
Triton kernels run on CPU): ``make gpu-check`` (scripts/gpu_check.sh) runs this file with TRITON_INTERPRET=0.
Tolerances: the error of a result against a float64 oracle may be at most twice the error of the
oracle's own code run in the same dtype, plus 4 eps of the result's dtype at the result's scale.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import fusedloss

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET=0 (make gpu-check)")

BACKENDS = ("triton", "cuda")
CUDA = torch.device("cuda")


def _generator(seed):
    return torch.Generator(device=CUDA).manual_seed(seed)


def assert_derived_close(got, low, ref64, name, magnitude=1.0):
    """max |got - ref64| <= 2 max |low - ref64| + 4 eps(got) max(|ref64|, magnitude)."""
    got64 = got.double()
    error = (got64 - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item(), magnitude)
    allowed = 2 * (low.double() - ref64).abs().max().item() + 4 * torch.finfo(got.dtype).eps * scale
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g}"


def test_backends_are_available():
    reasons = fusedloss.available_backends()
    assert all(reasons[b] is None for b in BACKENDS), reasons


# ------------------------------------------------------------------------------------------------ cross entropy

def _ce_case(n, c, dtype, seed=0):
    g = _generator(seed)
    x = (3 * torch.randn(n, c, generator=g, device=CUDA)).to(dtype)
    y = torch.randint(0, c, (n,), generator=g, device=CUDA)
    y[::7] = -100
    return x, y


def _loss_and_grad(fn, x, y, **kwargs):
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, y, **kwargs)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), leaf.grad


# Options with a torch.nn.functional equivalent (the low-precision oracle), and ones only the reference has.
_F_OPTIONS = {"plain": {}, "smoothing": {"label_smoothing": 0.1}, "none": {"reduction": "none"},
              "weight_sum": {"reduction": "sum", "weight": "weight"}}
_REFERENCE_OPTIONS = {"focal": {"focal_gamma": 2.0}, "z_loss": {"z_loss": 1e-3}, "softcap": {"softcap": 30.0}}
CE_SHAPES = [(33, 9), (64, 32000), (5, 50257)]  # a tile of small rows; one block; several blocks (odd C)


def _options(options, c):
    options = dict(options)
    if options.get("weight") == "weight":
        # Exact in every dtype tested, so that torch (which takes the weight in the input's dtype) sees the same.
        options["weight"] = (torch.rand(c, generator=_generator(3), device=CUDA) + 0.5).to(torch.bfloat16).float()
    return options


def _check_cross_entropy(backend, x, y, options, low_fn):
    def fused(inp, tgt, **kw):
        return fusedloss.cross_entropy(inp, tgt, backend=backend, **kw)

    def as64(kw):
        return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    def as_low(kw):  # torch takes the class weight in the input's dtype
        return {k: (v.to(x.dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    got = _loss_and_grad(fused, x, y, **options)
    ref64 = _loss_and_grad(lambda i, t, **kw: fusedloss.cross_entropy(i, t, backend="reference", **kw),
                           x.double(), y, **as64(options))
    low = _loss_and_grad(low_fn, x, y, **as_low(options))
    assert got[0].dtype == x.dtype and got[1].dtype == x.dtype
    assert_derived_close(got[0], low[0], ref64[0], "loss")
    assert_derived_close(got[1], low[1], ref64[1], "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(_F_OPTIONS) + list(_REFERENCE_OPTIONS))
def test_cross_entropy_bf16_options(backend, shape, option):
    x, y = _ce_case(*shape, torch.bfloat16)
    if option in _F_OPTIONS:
        options = _options(_F_OPTIONS[option], shape[1])
        low_fn = F.cross_entropy
    else:
        options = _REFERENCE_OPTIONS[option]
        low_fn = lambda i, t, **kw: fusedloss.cross_entropy(i, t, backend="reference", **kw)  # noqa: E731
    _check_cross_entropy(backend, x, y, options, low_fn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cross_entropy_dtypes(backend, shape, dtype):
    x, y = _ce_case(*shape, dtype, seed=1)
    _check_cross_entropy(backend, x, y, {"label_smoothing": 0.05}, F.cross_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_soft_targets(backend):
    x, _ = _ce_case(17, 1000, torch.float32, seed=2)
    probs = torch.softmax(torch.randn(17, 1000, generator=_generator(4), device=CUDA), -1)
    got = _loss_and_grad(lambda i, t: fusedloss.cross_entropy(i, t, backend=backend), x, probs)
    ref64 = _loss_and_grad(F.cross_entropy, x.double(), probs.double())
    low = _loss_and_grad(F.cross_entropy, x, probs)
    assert_derived_close(got[0], low[0], ref64[0], "loss")
    assert_derived_close(got[1], low[1], ref64[1], "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_more_than_2_31_elements(backend):
    """N x V above 2^31 (64-bit offsets): rows at the end of the tensor equal torch's on those rows alone."""
    vocab = 262144
    n = (1 << 31) // vocab + 1
    x = torch.empty(n, vocab, dtype=torch.bfloat16, device=CUDA).normal_(0, 2, generator=_generator(5))
    y = torch.randint(0, vocab, (n,), generator=_generator(6), device=CUDA)
    leaf = x.requires_grad_()
    losses = fusedloss.cross_entropy(leaf, y, reduction="none", backend=backend)
    losses.sum().backward()
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=CUDA)
    sample = x.detach()[rows]
    want = _loss_and_grad(lambda i, t: F.cross_entropy(i, t, reduction="none"), sample.double(), y[rows])
    low = _loss_and_grad(lambda i, t: F.cross_entropy(i, t, reduction="none"), sample, y[rows])
    assert_derived_close(losses.detach()[rows], low[0], want[0], "loss rows")
    assert_derived_close(leaf.grad[rows], low[1], want[1], "gradient rows")


# ------------------------------------------------------------------------------------------------ linear head

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_bf16(backend, reduction):
    """Fused head against F.linear + F.cross_entropy in float64 and in bf16, values and all three gradients."""
    g = _generator(8)
    n, h, v = 1000, 256, 50257
    x = torch.randn(n, h, generator=g, device=CUDA)
    w = torch.randn(v, h, generator=g, device=CUDA) / h**0.5
    b = torch.randn(v, generator=g, device=CUDA)
    y = torch.randint(0, v, (n,), generator=g, device=CUDA)
    y[::5] = -100

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        loss = fn(*leaves)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=CUDA).reshape(loss.shape).to(dtype))
        return [loss.detach()] + [t.grad for t in leaves]

    def eager(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), y, reduction=reduction, label_smoothing=0.1)

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                              chunk_size=384, backend=backend)

    want, low, got = run(eager, torch.float64), run(eager, torch.bfloat16), run(ours, torch.bfloat16)
    for name, a, lo, ref in zip(("loss", "grad_input", "grad_weight", "grad_bias"), got, low, want):
        assert_derived_close(a, lo, ref, name)


# ------------------------------------------------------------------------------------------------ CRF

def _crf_case(b, t, k, seed=0, scale=1.0, constrained=False):
    g = _generator(seed)
    emissions = scale * torch.randn(b, t, k, generator=g, device=CUDA)
    tags = torch.randint(0, k, (b, t), generator=g, device=CUDA)
    lengths = torch.randint(1, t + 1, (b,), generator=g, device=CUDA)
    lengths[0] = t
    mask = torch.arange(t, device=CUDA)[None, :] < lengths[:, None]
    transitions = torch.randn(k, k, generator=g, device=CUDA)
    start, end = torch.randn(k, generator=g, device=CUDA), torch.randn(k, generator=g, device=CUDA)
    if constrained and k > 1:
        forbidden = (torch.rand(k, k, generator=g, device=CUDA) < 0.3) & ~torch.eye(k, dtype=torch.bool, device=CUDA)
        transitions = transitions.masked_fill(forbidden, fusedloss.crf.CONSTRAINT_SCORE)
    return emissions, tags, mask, transitions, start, end


def _torchcrf(transitions, start, end):
    import torchcrf

    module = torchcrf.CRF(transitions.shape[0], batch_first=True).to(device=CUDA, dtype=transitions.dtype)
    with torch.no_grad():
        module.transitions.copy_(transitions)
        module.start_transitions.copy_(start)
        module.end_transitions.copy_(end)
    return module


def _weights(llh):
    return torch.randn(llh.shape, generator=_generator(9), device=CUDA).to(llh.dtype)


def _pytorch_crf(emissions, tags, mask, transitions, start, end):
    """pytorch-crf's log-likelihood per sequence, and the gradients of its weighted sum w.r.t. the four inputs."""
    module = _torchcrf(transitions, start, end)
    leaf = emissions.detach().clone().requires_grad_()
    llh = module(leaf, tags, mask, reduction="none")
    llh.backward(_weights(llh))
    return [llh.detach(), leaf.grad, module.transitions.grad, module.start_transitions.grad,
            module.end_transitions.grad]


def _fused_crf(backend, emissions, tags, mask, transitions, start, end):
    """The same from fusedloss.crf_log_likelihood on ``backend``."""
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    llh = fusedloss.crf_log_likelihood(leaves[0], tags, *leaves[1:], mask, reduction="none", backend=backend)
    llh.backward(_weights(llh))
    return [llh.detach()] + [x.grad for x in leaves]


def _check_crf_log_likelihood(backend, case, emission_dtype=torch.float32):
    emissions, tags, mask, transitions, start, end = case
    emissions = emissions.to(emission_dtype)
    got = _fused_crf(backend, emissions, tags, mask, transitions, start, end)
    ref64 = _pytorch_crf(emissions.double(), tags, mask, transitions.double(), start.double(), end.double())
    low = _pytorch_crf(emissions.float(), tags, mask, transitions, start, end)
    # Marginals are exp(alpha + beta - log Z): their exponents cancel numbers of the size of the path scores.
    magnitude = ref64[0].abs().max().item() + emissions.double().abs().sum((1, 2)).max().item()
    for name, g, lo, r in zip(("log-likelihood", "emissions", "transitions", "start", "end"), got, low, ref64):
        assert torch.isfinite(g).all(), name
        assert_derived_close(g, lo, r, name, magnitude)


CRF_SHAPES = [(1, 1, 1), (4, 7, 5), (3, 20, 9), (5, 33, 73), (2, 9, 300)]  # K=300: tables in global memory


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CRF_SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_log_likelihood_and_gradients(backend, shape):
    _check_crf_log_likelihood(backend, _crf_case(*shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_bf16_emissions(backend):
    _check_crf_log_likelihood(backend, _crf_case(4, 17, 9, seed=1), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_constraints_with_large_emissions(backend):
    """Forbidden transitions and emissions in the hundreds: the underflow guard's exact columns and rows."""
    _check_crf_log_likelihood(backend, _crf_case(4, 12, 9, seed=2, scale=100.0, constrained=True))


def _check_viterbi(backend, case):
    """The best paths equal pytorch-crf's in float64; the scores equal those paths' float64 scores."""
    emissions, _, mask, transitions, start, end = case
    paths, scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend=backend)
    module = _torchcrf(transitions.double(), start.double(), end.double())
    want = module.decode(emissions.double(), mask)
    lengths = mask.sum(1).tolist()
    assert [paths[b, :lengths[b]].tolist() for b in range(len(lengths))] == want
    assert (paths[~mask] == -1).all()
    with torch.no_grad():
        best = module._compute_score(emissions.double().transpose(0, 1), paths.clamp(min=0).t(), mask.t())
    scale = emissions.abs().sum((1, 2)).max().item() + transitions.abs().max().item() * emissions.shape[1]
    torch.testing.assert_close(scores.double(), best, rtol=0, atol=8 * torch.finfo(torch.float32).eps * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CRF_SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_viterbi_matches_pytorch_crf(backend, shape):
    _check_viterbi(backend, _crf_case(*shape, seed=3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CRF_SHAPES[1:], ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_marginals_match_reference(backend, shape):
    emissions, _, mask, transitions, start, end = _crf_case(*shape, seed=4)
    got = fusedloss.crf_marginals(emissions, transitions, start, end, mask, backend=backend)
    ref64 = fusedloss.crf_marginals(emissions.double(), transitions.double(), start.double(), end.double(), mask,
                                    backend="reference")
    low = fusedloss.crf_marginals(emissions, transitions, start, end, mask, backend="reference")
    assert_derived_close(got, low, ref64, "marginals", emissions.abs().sum((1, 2)).max().item())
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tags", [9, 73])
def test_crf_long_sequences(backend, num_tags):
    """T = 4096: log-likelihood and gradients against pytorch-crf in float64, and the best path."""
    case = _crf_case(2, 4096, num_tags, seed=5)
    _check_crf_log_likelihood(backend, case)
    _check_viterbi(backend, case)


def _gjsd(student, teacher, beta, temperature):
    """TRL's generalized_jsd_loss per row, in the tensors' own dtype (the eager oracle of the distillation losses)."""
    log_ps = F.log_softmax(student / temperature, -1)
    log_pt = F.log_softmax(teacher / temperature, -1)
    if beta == 0:
        return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_ps + torch.log1p(torch.tensor(-beta, dtype=log_ps.dtype)),
                                         log_pt + torch.log(torch.tensor(beta, dtype=log_ps.dtype))]), dim=0)
    return (beta * F.kl_div(log_m, log_pt, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(log_m, log_ps, reduction="none", log_target=True)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distillation_loss_triton(beta, dtype):
    """distillation_loss on the Triton backend (cuda declines) against the formula in float64 and in the dtype,
    values and the student's gradient, at a vocabulary of several 4096-column blocks."""
    g = _generator(11)
    s = 3 * torch.randn(256, 32000, generator=g, device=CUDA)
    t = 3 * torch.randn(256, 32000, generator=g, device=CUDA)
    y = torch.randint(0, 32000, (256,), generator=g, device=CUDA)
    y[::7] = -100
    kept = (y != -100).to(torch.float64)

    def run(fn, dt):
        leaf = s.to(dt).requires_grad_()
        loss = fn(leaf, t.to(dt))
        loss.backward()
        return loss.detach(), leaf.grad

    def eager(a, b):
        return (_gjsd(a, b, beta, 2.0) * kept.to(a.dtype)).sum() / kept.sum().to(a.dtype)

    def ours(a, b):
        return fusedloss.distillation_loss(a, b, y, beta=beta, temperature=2.0, backend="triton")

    want, low, got = run(eager, torch.float64), run(eager, dtype), run(ours, dtype)
    for name, a, lo, ref in zip(("loss", "grad"), got, low, want):
        assert_derived_close(a, lo, ref, name)
    with pytest.raises(fusedloss.BackendUnavailable, match="no CUDA kernel for distillation|built without CUDA"):
        fusedloss.distillation_loss(s, t, backend="cuda")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_distillation_loss_triton(reduction):
    """The fused linear form on CUDA against both heads' F.linear + the formula in float64."""
    g = _generator(12)
    n, hs, ht, v = 500, 128, 192, 32000
    xs = torch.randn(n, hs, generator=g, device=CUDA)
    ws = torch.randn(v, hs, generator=g, device=CUDA) / hs**0.5
    xt = torch.randn(n, ht, generator=g, device=CUDA)
    wt = torch.randn(v, ht, generator=g, device=CUDA) / ht**0.5
    leaves = [xs.clone().requires_grad_(), ws.clone().requires_grad_()]
    loss = fusedloss.linear_distillation_loss(*leaves[:1], leaves[1], xt, wt, beta=0.5, reduction=reduction,
                                              chunk_size=96, backend="triton")
    ref = [xs.double().requires_grad_(), ws.double().requires_grad_()]
    rows = _gjsd(F.linear(*ref), F.linear(xt.double(), wt.double()), 0.5, 1.0)
    expected = rows if reduction == "none" else rows.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), device=CUDA).reshape(loss.shape)
    loss.backward(grad_out)
    expected.backward(grad_out.double())
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
