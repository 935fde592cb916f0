"""Fused linear + cross entropy (``fusedloss.linear_cross_entropy``) and token weights of the softmax losses, on
every backend.

Oracles: ``torch.nn.functional.linear`` + ``torch.nn.functional.cross_entropy`` (every option torch has), torch's
own ``F.linear_cross_entropy``, and the float64 reference softmax loss on materialized logits for what torch lacks
(focal factor, z-loss, softcap); values and the gradients of input, weight and bias, with a random grad_output.
The chunked backends run with chunk sizes that do not divide N and vocabularies that are no multiple of a block.
bf16 is compared against float64 with a derived tolerance: at most twice the error of PyTorch's own bf16
computation (F.linear + cross entropy in bf16) plus one rounding of the result.
"""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import expect_backend, require_backend
from _retain_graph import assert_backwards_match
from fusedloss import _dispatch
from fusedloss.bench.harness import peak_memory
from fusedloss.linear import default_chunk_size

FUSED = ["cpp", "triton"]
BACKENDS = ["reference"] + FUSED


def _problem(n=23, h=12, v=37, *, dtype=torch.float64, soft=False, ignore_every=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    if soft:
        target = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1).to(dtype)
    else:
        target = torch.randint(0, v, (n,), generator=g)
        if ignore_every:
            target[::ignore_every] = -100
    return x.to(dtype), w.to(dtype), (None if b is None else b.to(dtype)), target


def _grads(fn, x, w, b, seed=5):
    """Loss and the gradients of Σ loss·g (g random, per row for reduction none) w.r.t. x, w and b (if any)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    loss = fn(*leaves) if b is not None else fn(*leaves, None)
    g = 0.5 + torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(loss, leaves, g.to(loss.dtype))
    return [loss.detach().double()] + [gr.double() for gr in grads]


def _assert_all_close(ours, theirs, rtol=1e-9, atol=1e-11, what=("loss", "grad_input", "grad_weight", "grad_bias")):
    for name, a, b in zip(what, ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def _tol(backend):
    # cpp and the reference run float64; the Triton kernels compute in float32 (float32 inputs here).
    return dict(rtol=2e-5, atol=2e-6) if backend == "triton" else dict(rtol=1e-9, atol=1e-11)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


TORCH_CASES = list(itertools.product(["none", "sum", "mean"], [False, True], [0.0, 0.15], ["hard", "soft"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,class_weight,smoothing,kind", TORCH_CASES)
def test_matches_torch_linear_and_cross_entropy(backend, reduction, class_weight, smoothing, kind):
    require_backend(backend)
    dtype = _dtype(backend)
    # half of the cases without a bias
    x, w, b, target = _problem(dtype=dtype, soft=kind == "soft", bias=smoothing == 0.0)
    cw = (0.5 + torch.rand(w.shape[0], generator=torch.Generator().manual_seed(9), dtype=dtype)) if class_weight \
        else None

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, weight=cw, reduction=reduction,
                                              label_smoothing=smoothing, chunk_size=5, backend=backend)

    def torch_oracle(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), target, cw, reduction=reduction, label_smoothing=smoothing)

    _assert_all_close(_grads(ours, x, w, b), _grads(torch_oracle, x, w, b), **_tol(backend))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_torch_linear_cross_entropy(backend, reduction):
    """torch's own fused-head function (torch >= 2.13), no bias (it takes linear_bias too) and with."""
    require_backend(backend)
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch has no F.linear_cross_entropy")
    x, w, b, target = _problem(dtype=_dtype(backend), ignore_every=3)

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=7,
                                              backend=backend)

    def torch_lce(x, w, b):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, ignore_index=-100)

    _assert_all_close(_grads(ours, x, w, b), _grads(torch_lce, x, w, b), **_tol(backend))


OPTIONS = [
    dict(focal_gamma=2.0),
    dict(focal_gamma=0.5, label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(z_loss=1e-3, label_smoothing=0.2, softcap=6.0, focal_gamma=1.0),
    dict(token_weight=True),
    dict(token_weight=True, weight=True, label_smoothing=0.1, focal_gamma=2.0),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_options_match_reference_on_logits(backend, reduction, options, kind):
    """Focal, z-loss, softcap and token weights against the reference cross entropy of the materialized logits."""
    require_backend(backend)
    dtype = _dtype(backend)
    x, w, b, target = _problem(n=19, v=29, dtype=dtype, soft=kind == "soft", seed=2)
    options = dict(options)
    g = torch.Generator().manual_seed(11)
    if options.get("token_weight"):
        options["token_weight"] = torch.rand(x.shape[0], generator=g, dtype=torch.float64).to(dtype)
    if options.get("weight"):
        options["weight"] = (0.5 + torch.rand(w.shape[0], generator=g, dtype=torch.float64)).to(dtype)

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=4,
                                              backend=backend, **options)

    def oracle(x, w, b):
        return fusedloss.cross_entropy(F.linear(x.double(), w.double(), b.double()), target.double()
                                       if kind == "soft" else target, reduction=reduction, backend="reference",
                                       **{k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items()})

    _assert_all_close(_grads(ours, x, w, b), _grads(oracle, x, w, b), **_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_shape_and_module(backend):
    """(B, T, H) input, (B, T) targets and token weights; reduction none keeps (B, T); the module form."""
    require_backend(backend)
    dtype = _dtype(backend)
    x, w, b, target = _problem(n=24, dtype=dtype)
    x3, target3 = x.reshape(4, 6, -1), target.reshape(4, 6)
    tw = torch.rand(4, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)
    loss = fusedloss.linear_cross_entropy(x3, w, target3, linear_bias=b, reduction="none", token_weight=tw,
                                          backend=backend)
    assert loss.shape == (4, 6)
    expected = F.cross_entropy(F.linear(x3, w, b).movedim(-1, 1), target3, reduction="none") * tw
    torch.testing.assert_close(loss, expected, **_tol(backend))
    module = fusedloss.nn.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=5, backend=backend)
    torch.testing.assert_close(module(x3, w, target3, b),
                               F.cross_entropy(F.linear(x, w, b), target, label_smoothing=0.1), **_tol(backend))
    assert "chunk_size=5" in repr(module)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("chunk_size", [1, 3, 23, 100, None])
def test_chunk_sizes_and_all_ignored(backend, chunk_size):
    require_backend(backend)
    x, w, b, target = _problem(dtype=_dtype(backend))

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk_size, backend=backend)

    def oracle(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), target)

    _assert_all_close(_grads(ours, x, w, b), _grads(oracle, x, w, b), **_tol(backend))
    ignored = torch.full_like(target, -100)
    for reduction in ("mean", "sum", "none"):
        mine = _grads(lambda x, w, b, r=reduction: fusedloss.linear_cross_entropy(
            x, w, ignored, linear_bias=b, reduction=r, chunk_size=chunk_size, backend=backend), x, w, b)
        torchs = _grads(lambda x, w, b, r=reduction: F.cross_entropy(F.linear(x, w, b), ignored, reduction=r),
                        x, w, b)
        _assert_all_close(mine, torchs, **_tol(backend))  # NaN mean as torch, zero gradients


@pytest.mark.parametrize("backend", FUSED)
def test_only_some_inputs_require_grad_and_no_grad(backend):
    require_backend(backend)
    x, w, b, target = _problem(dtype=_dtype(backend))
    w_leaf = w.clone().requires_grad_()
    loss = fusedloss.linear_cross_entropy(x, w_leaf, target, linear_bias=b, chunk_size=6, backend=backend)
    loss.backward()
    w_ref = w.clone().requires_grad_()
    F.cross_entropy(F.linear(x, w_ref, b), target).backward()
    torch.testing.assert_close(w_leaf.grad, w_ref.grad, **_tol(backend))
    with torch.no_grad():
        value = fusedloss.linear_cross_entropy(x, w_leaf, target, linear_bias=b, backend=backend)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach(), **_tol(backend))
    # a second backward through a mean graph scales the saved gradients again only with retain_graph
    x_leaf = x.clone().requires_grad_()
    loss = fusedloss.linear_cross_entropy(x_leaf, w, target, backend=backend) * 3.0
    loss.backward()
    x_ref = x.clone().requires_grad_()
    (F.cross_entropy(F.linear(x_ref, w), target) * 3.0).backward()
    torch.testing.assert_close(x_leaf.grad, x_ref.grad, **_tol(backend))


# ----------------------------------------------------------------------------------------------
# bf16: float32 accumulation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_within_derived_tolerance(backend, reduction):
    require_backend(backend)
    x, w, b, target = _problem(n=40, h=16, v=45, seed=4)

    def run(fn, dtype):
        return _grads(lambda x, w, b: fn(x, w, b), x.to(dtype), w.to(dtype), b.to(dtype))

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=6,
                                              backend=backend, label_smoothing=0.1)

    def eager(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), target, reduction=reduction, label_smoothing=0.1)

    oracle, pytorch_bf16, mine = run(eager, torch.float64), run(eager, torch.bfloat16), run(ours, torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    for name, o, p, m in zip(("loss", "grad_input", "grad_weight", "grad_bias"), oracle, pytorch_bf16, mine):
        bound = 2 * (p - o).abs().max().item() + eps * o.abs().max().item()
        err = (m - o).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("backend", FUSED)
def test_bf16_weight_gradient_accumulates_in_float32(backend):
    """512 chunks of one row each add into grad_weight. A bf16 accumulator loses the small late contributions
    (its spacing near the running total exceeds them); the float32 accumulator stays within float32 error of the
    float64 sum of the same bf16 products."""
    require_backend(backend)
    n, h, v = 512, 4, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(v, h, generator=g) * 0.1).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), generator=g)
    w_leaf = w.clone().requires_grad_()
    fusedloss.linear_cross_entropy(x, w_leaf, target, reduction="sum", chunk_size=1, backend=backend).backward()
    # float64 oracle from the same bf16 inputs; the per-row logit gradients are rounded to bf16 as the kernel's are
    logits = x.double() @ w.double().t()
    dlogits = (torch.softmax(logits, -1) - F.one_hot(target, v)).to(torch.bfloat16).double()
    exact = dlogits.t() @ x.double()
    bf16_accumulator = torch.zeros(v, h, dtype=torch.bfloat16)
    for row in range(n):
        bf16_accumulator += torch.outer(dlogits[row], x[row].double()).to(torch.bfloat16)
    err_ours = (w_leaf.grad.double() - exact).abs().max().item()
    err_bf16 = (bf16_accumulator.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err_ours <= torch.finfo(torch.bfloat16).eps * scale  # the final rounding to bf16, nothing more
    assert err_bf16 > 4 * err_ours


# ----------------------------------------------------------------------------------------------
# Memory: the logits never exist
# ----------------------------------------------------------------------------------------------


def test_cpp_peak_memory_is_gradients_plus_one_chunk():
    require_backend("cpp")
    n, h, v, chunk = 512, 32, 8192, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)

    def reset():
        x.grad = None
        w.grad = None

    fused = peak_memory(lambda: fusedloss.linear_cross_entropy(x, w, target, chunk_size=chunk).backward(), reset,
                        torch.device("cpu"))
    eager = peak_memory(lambda: F.cross_entropy(F.linear(x, w), target).backward(), reset, torch.device("cpu"))
    gradients = (n * h + v * h) * 4 / 2**20
    chunk_mib = chunk * v * 4 / 2**20
    logits_mib = n * v * 4 / 2**20
    assert fused <= gradients + 1.5 * chunk_mib + 0.5, (fused, gradients, chunk_mib)
    assert fused < logits_mib < eager


def test_default_chunk_size():
    assert default_chunk_size(2048, 512, 32000, "cpu") == 256
    assert default_chunk_size(8192, 4096, 128256, "cuda") == 512
    assert default_chunk_size(4096, 64, 9, "cpu") == 4096  # small vocabularies: one chunk
    assert default_chunk_size(3, 4096, 128256, "cuda") == 3


# ----------------------------------------------------------------------------------------------
# Token weights on cross_entropy and focal_loss, every backend
# ----------------------------------------------------------------------------------------------


SOFTMAX_BACKENDS = ["reference", "cpp", "triton"]


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("class_weight", [False, True])
def test_cross_entropy_token_weight(backend, reduction, class_weight):
    require_backend(backend)
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 7, (3, 5), generator=g)
    target[0, :2] = -100
    t = torch.rand(3, 5, generator=g, dtype=torch.float64).to(dtype)
    cw = (0.5 + torch.rand(7, generator=g, dtype=torch.float64)).to(dtype) if class_weight else None

    def ours(x):
        return fusedloss.cross_entropy(x, target, cw, reduction=reduction, label_smoothing=0.1, token_weight=t,
                                       backend=backend)

    def oracle(x):
        rows = F.cross_entropy(x.movedim(-1, 1), target, cw, reduction="none", label_smoothing=0.1) * t
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        kept = target != -100
        wy = cw[target.clamp(min=0)] if cw is not None else torch.ones_like(t)
        return rows.sum() / (t * wy * kept).sum()

    x_ours, x_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(x_ours), oracle(x_oracle)
    torch.testing.assert_close(a, b, **_tol(backend))
    go = torch.rand(a.shape, generator=g, dtype=torch.float64).to(dtype)
    a.backward(go)
    b.backward(go)
    torch.testing.assert_close(x_ours.grad, x_oracle.grad, **_tol(backend))


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
def test_focal_loss_token_weight_and_all_ones(backend):
    require_backend(backend)
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(17, 6, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 6, (17,), generator=g)
    target[3] = -100
    t = torch.rand(17, generator=g, dtype=torch.float64).to(dtype)
    rows = fusedloss.focal_loss(x, target, gamma=2.0, alpha=0.25, reduction="none", backend=backend)
    mean = fusedloss.focal_loss(x, target, gamma=2.0, alpha=0.25, token_weight=t, backend=backend)
    torch.testing.assert_close(mean, (rows * t).sum() / t[target != -100].sum(), **_tol(backend))
    ones = torch.ones_like(t)
    for reduction in ("none", "sum", "mean"):
        plain = fusedloss.cross_entropy(x, target, reduction=reduction, backend=backend)
        weighted = fusedloss.cross_entropy(x, target, reduction=reduction, token_weight=ones, backend=backend)
        assert torch.equal(plain, weighted), reduction
    soft = torch.softmax(torch.randn(17, 6, generator=g, dtype=torch.float64), -1).to(dtype)
    torch.testing.assert_close(
        fusedloss.cross_entropy(x, soft, token_weight=t, backend=backend),
        (fusedloss.cross_entropy(x, soft, reduction="none", backend="reference") * t).sum() / t.sum(),
        **_tol(backend))


def test_token_weight_gets_no_gradient_and_all_ignored():
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.rand(4, requires_grad=True)
    target = torch.full((4,), -100)
    loss = fusedloss.cross_entropy(x, target, token_weight=t)
    assert torch.isnan(loss)
    loss.backward()
    assert t.grad is None and torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# retain_graph and gradients of gradients
# ----------------------------------------------------------------------------------------------
#
# For "mean" and "sum" the fused backends compute the gradients in the forward pass and save them; backward
# scales them by grad_output (tests/_retain_graph.py says what a second backward must then do).

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (3.0, 3.0), (1.0, 3.0), (3.0, 1.0), (1.0, 1.0, 1.0)], ids=str)
def test_backward_twice_with_retain_graph(backend, reduction, scales):
    """grad_output scales of successive backwards through one graph: the gradients of input, weight and bias after
    each are F.linear + F.cross_entropy's (accumulated), or a backward raises where the cpp op says it may (it
    scales the saved "mean"/"sum" gradients in place, csrc/op_utils.h)."""
    require_backend(backend)
    x, w, b, target = _problem(n=9, h=4, v=11, dtype=_dtype(backend))

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                              chunk_size=4, backend=backend)

    def torch_oracle(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), target, reduction=reduction, label_smoothing=0.1)

    assert_backwards_match(ours, torch_oracle, (x, w, b), scales,
                           may_raise=backend == "cpp" and reduction != "none",
                           names=("input", "weight", "bias"), **_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_of_the_gradient(backend, reduction):
    """Second order, as F.linear + F.cross_entropy gives it, or a RuntimeError; never a wrong number. Two kinds:
    with respect to grad_output (what the double-backward trick of torch.autograd.functional.jvp differentiates:
    the fused backends keep the saved gradient out of place then), and with respect to input and weight (a
    gradient penalty: the fused backends' saved gradient is a constant of the graph, so only the reference can
    give it)."""
    require_backend(backend)
    x, w, b, target = _problem(n=9, h=4, v=11, dtype=_dtype(backend))
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(x.dtype)

    def ours(x, w):
        return fusedloss.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=4,
                                              backend=backend)

    def torch_oracle(x, w):
        return F.cross_entropy(F.linear(x, w, b), target, reduction=reduction)

    def jvp(loss_fn):
        _, out = torch.autograd.functional.jvp(lambda x_: loss_fn(x_, w), x, tangent)
        return [out.double()]

    def gradient_penalty(loss_fn):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        loss = loss_fn(*leaves)
        grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss), create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        return [g.double() for g in torch.autograd.grad(penalty, leaves)]

    for name, second_order in (("jvp", jvp), ("gradient penalty", gradient_penalty)):
        expected = second_order(torch_oracle)
        try:
            got = second_order(ours)
        except RuntimeError as error:
            assert backend != "reference", f"{name}: {error}"
            assert not (name == "jvp" and reduction != "none"), f"{name}: {error}"
            continue
        _assert_all_close(got, expected, **_tol(backend), what=[f"{name} {i}" for i in range(len(expected))])


# ----------------------------------------------------------------------------------------------
# Bad input, compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs_name_the_argument(backend):
    require_backend(backend)
    x, w, b, target = _problem(dtype=torch.float32)
    cases = [
        (dict(linear_weight=w[:, :-1]), ValueError, "linear_weight"),
        (dict(linear_weight=w[0]), ValueError, "linear_weight"),
        (dict(linear_weight=w.double()), TypeError, "linear_weight"),
        (dict(linear_bias=b[:-1]), ValueError, "linear_bias"),
        (dict(linear_bias=b.double()), TypeError, "linear_bias"),
        (dict(target=target[:-1]), ValueError, "target"),
        (dict(target=target.int()), TypeError, "target"),
        (dict(target=torch.full_like(target, 37)), ValueError, "target"),
        (dict(weight=torch.ones(3)), ValueError, "weight"),
        (dict(token_weight=torch.ones(3)), ValueError, "token_weight"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), TypeError, "chunk_size"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(input=x.long()), TypeError, "input"),
    ]
    for change, error, name in cases:
        args = dict(input=x, linear_weight=w, target=target, linear_bias=b)
        args.update(change)
        with pytest.raises(error, match=name):
            fusedloss.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"),
                                           backend=backend, **args)


def test_backend_reasons():
    x, w, b, target = _problem(dtype=torch.float64)
    with pytest.raises(fusedloss.BackendUnavailable, match="triton"):
        fusedloss.linear_cross_entropy(x, w, target, backend="triton")
    name, _ = _dispatch.resolve("linear_cross_entropy", "auto", x.device, x, w, target, None, None, -100, "mean",
                                0.0, 0.0, 0.0, None, None, 8)
    assert name == ("cpp" if expect_backend("cpp") else "reference")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_compile_fullgraph_model_head(backend):
    require_backend(backend)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 16)
            self.head = torch.nn.Linear(16, 41)

        def forward(self, x, target):
            hidden = torch.tanh(self.body(x))
            return fusedloss.linear_cross_entropy(hidden, self.head.weight, target, linear_bias=self.head.bias,
                                                  label_smoothing=0.1, chunk_size=7, backend=backend)

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 9, 8)
    target = torch.randint(0, 41, (2, 9))
    target[0, 0] = -100
    eager_loss = model(x, target)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_widened_weight_gradient_gemm_warns_once(monkeypatch):
    """Where torch has no half-precision GEMM with a float32 output, the Triton head's weight gradient falls back to
    a float32 GEMM on widened inputs: correct, but much slower on a GPU, so it says so once instead of silently."""
    from fusedloss import _chunking as head

    monkeypatch.setattr(head, "_WIDENED_GEMM_WARNED", False)
    a = torch.randn(3, 4, dtype=torch.bfloat16)
    b = torch.randn(4, 5)
    accumulator = torch.zeros(3, 5)

    class _FakeCuda:  # add_product tries the out_dtype GEMM only for CUDA tensors; make it fail like an old torch
        is_cuda = True
        dtype = a.dtype

        def to(self, dtype):
            return a.to(dtype)

    def failing_addmm(*args, **kwargs):
        raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")

    monkeypatch.setattr(torch, "addmm", failing_addmm)
    with pytest.warns(RuntimeWarning, match="float32 GEMM on widened inputs"):
        head.add_product(accumulator, _FakeCuda(), b)
    torch.testing.assert_close(accumulator, a.float() @ b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head.add_product(accumulator, _FakeCuda(), b)  # the second time: no warning
    torch.testing.assert_close(accumulator, 2 * (a.float() @ b))
