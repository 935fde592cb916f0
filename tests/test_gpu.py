"""Every Triton and CUDA family on CUDA tensors, against float64 oracles: values and gradients, fp32 and bf16.

Skipped without a CUDA device, and under TRITON_INTERPRET=1 (which tests/conftest.py sets by default so that the
Triton kernels run on CPU): ``make gpu-check`` (scripts/gpu_check.sh) runs this file with TRITON_INTERPRET=0. It has
never run on a GPU.

Families (test name prefixes): ``test_softmax_`` (cross entropy and focal loss: every option, hard and soft
targets, ``reduction="none"`` with a per-row grad_output, grad_output != 1 for the scalar reductions, N x C above
2^31), ``test_linear_`` (the fused linear head), ``test_crf_`` (log-likelihood and gradients, Viterbi, marginals,
the ``tl.dot`` batch tile, T = 4096, unchecked mask and tag values; Triton's partial-label likelihood, log Z and
k-best paths), ``test_sigmoid_`` (BCE with logits with pos_weight, sigmoid focal, multilabel soft margin, ZLPR, GHM-C,
bi-tempered), ``test_distributed_`` (the vocabulary-parallel losses on a world of one) and ``test_compile_``
(torch.compile(fullgraph=True) of one small model per family). Each runs on every backend that serves CUDA
tensors: ``triton``, and ``cuda`` where the extension was built with CUDA (it declines the sigmoid family, which is
checked too).

Oracles: the ``reference`` backend (``fusedloss.reference``) run in float64 on the same CUDA tensors,
torch.nn.functional and pytorch-crf. Tolerances: the error of a result against the float64 oracle may be at most
twice the error of the oracle's own code run in the result's dtype (PyTorch's own error), plus 4 eps of the result's
dtype at the result's scale, plus one float32 rounding per halving of a summed reduction (log2 of the number of
terms) for results that sum many terms.

With FUSEDLOSS_GPU_CHECK_OUT naming a folder, every comparison appends one JSON line to
``test_gpu_errors.jsonl`` there (test, family, backend, quantity, dtype, max error against float64, the allowed
error): scripts/gpu_check_summary.py reads it into the summary table.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fusedloss

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET=0 (make gpu-check)")

CUDA = torch.device("cuda")
ERRORS_ENV = "FUSEDLOSS_GPU_CHECK_OUT"
ERRORS_FILE = "test_gpu_errors.jsonl"


def _cuda_backend_reason():
    try:
        return fusedloss.available_backends()["cuda"]
    except Exception as exc:  # noqa: BLE001 (reported as the reason)
        return f"{type(exc).__name__}: {exc}"


# The cuda backend only where the extension was built with CUDA kernels (make gpu-check builds it first).
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available() and _cuda_backend_reason() is not None,
    reason=f"cuda backend unavailable: {_cuda_backend_reason() if torch.cuda.is_available() else ''}"))]
DTYPES = [torch.float32, torch.bfloat16]
_DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

FAMILIES = (("test_softmax", "softmax losses"), ("test_linear", "linear head"), ("test_crf", "CRF"),
            ("test_sigmoid", "sigmoid and multi-label"), ("test_distributed", "vocab-parallel (world of 1)"),
            ("test_compile", "torch.compile"))
_CASE = {}


@pytest.fixture(autouse=True)
def _current_case(request):
    """What the error records of this test are filed under: its name, family and backend."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    name = getattr(request.node, "originalname", None) or request.node.name
    family = next((f for prefix, f in FAMILIES if name.startswith(prefix)), "other")
    if family == "torch.compile":
        family = f"torch.compile: {params.get('family', '?')}"
    _CASE.clear()
    _CASE.update(test=request.node.name, family=family, backend=str(params.get("backend", "auto")))
    yield
    _CASE.clear()


def _record(name, dtype, error, allowed):
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return
    line = dict(_CASE, quantity=name, dtype=_DTYPE_IDS.get(dtype, str(dtype).replace("torch.", "")),
                error=error, allowed=allowed, ok=bool(error <= allowed))
    with open(os.path.join(folder, ERRORS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")


def _generator(seed):
    return torch.Generator(device=CUDA).manual_seed(seed)


def assert_derived_close(got, low, ref64, name, magnitude=1.0, terms=1):
    """max |got - ref64| <= 2 max |low - ref64| + (4 eps(got) + ceil(log2 terms) eps(fp32)) max(|ref64|, magnitude).

    ``low`` is the oracle's own code run in ``got``'s dtype; ``terms`` the number of values a reduction sums."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got64 = got.double()
    error = (got64 - ref64).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0, magnitude)
    low_error = (low.double() - ref64).abs().max().item() if low.numel() else 0.0
    summation = math.ceil(math.log2(max(terms, 2))) * torch.finfo(torch.float32).eps if terms > 1 else 0.0
    allowed = 2 * low_error + (4 * torch.finfo(got.dtype).eps + summation) * scale
    _record(name, got.dtype, error, allowed)
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g} (PyTorch's own {low_error:.3g})"


def _grad_output(loss):
    """0.75 for a scalar loss, else values in [0.5, 1.5] per element: exact in bf16, fp32 and fp64 alike."""
    if loss.dim() == 0:
        return torch.full((), 0.75, dtype=loss.dtype, device=loss.device)
    values = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).to(torch.bfloat16)
    return values.reshape(loss.shape).to(loss.dtype)


def _value_and_grad(fn, x, *args, **kwargs):
    """``fn(leaf, *args, **kwargs)`` and the gradient of ``Σ grad_output * loss`` w.r.t. ``leaf`` (a copy of x)."""
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, *args, **kwargs)
    loss.backward(_grad_output(loss))
    return loss.detach(), leaf.grad


def _check(fused, oracle, x, low_oracle=None, what="", terms=None):
    """``fused`` on ``x`` against ``oracle`` on ``x.double()`` (float64), PyTorch's own error = ``low_oracle`` (default
    ``oracle``) on ``x``; values and gradients, the same dtype as ``x``."""
    got = _value_and_grad(fused, x)
    ref64 = _value_and_grad(oracle, x.double())
    low = _value_and_grad(low_oracle or oracle, x)
    assert got[0].dtype == x.dtype and got[1].dtype == x.dtype, what
    terms = x.numel() if terms is None else terms
    assert_derived_close(got[0], low[0], ref64[0], f"loss {what}".strip(), terms=terms)
    assert_derived_close(got[1], low[1], ref64[1], f"gradient {what}".strip(), terms=terms)


def test_backends_are_available():
    reasons = fusedloss.available_backends()
    assert reasons["triton"] is None, reasons
    assert reasons["cuda"] is None, f"the cuda backend is unavailable (was the extension built?): {reasons}"


# ------------------------------------------------------------------------------------------------ softmax losses

# (N, C): a tile of small rows; one block of a 32000 vocabulary (several blocks); several blocks with an odd C.
SOFTMAX_SHAPES = [(33, 9), (64, 32000), (5, 50257)]
# Options with a torch.nn.functional.cross_entropy equivalent (PyTorch's own error from F in the low dtype) and
# options only the reference has (PyTorch's own error from the reference run in the low dtype).
_F_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "none": {"reduction": "none"},
    "sum": {"reduction": "sum"},
    "weight_mean": {"weight": "weight"},
    "weight_sum_smoothing": {"reduction": "sum", "weight": "weight", "label_smoothing": 0.1},
    "ignore_index_3": {"ignore_index": 3},
}
_REFERENCE_OPTIONS = {
    "focal": {"focal_gamma": 2.0},
    "focal_smoothing_none": {"focal_gamma": 2.0, "label_smoothing": 0.1, "reduction": "none"},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 30.0},
    "everything_none": {"weight": "weight", "label_smoothing": 0.1, "focal_gamma": 0.5, "z_loss": 1e-3,
                        "softcap": 30.0, "reduction": "none"},
}


# The options fp32 runs (each is one more kernel build per shape); together they turn on every kernel option.
_FP32_OPTIONS = ("plain", "none", "weight_sum_smoothing", "focal_smoothing_none", "everything_none")


def _softmax_case(n, c, dtype, seed=0):
    g = _generator(seed)
    x = (3 * torch.randn(n, c, generator=g, device=CUDA)).to(dtype)
    y = torch.randint(0, c, (n,), generator=g, device=CUDA)
    y[::7] = -100
    return x, y


def _options(options, c, dtype):
    options = dict(options)
    if options.get("weight") == "weight":
        # Exact in every dtype tested, so that torch (which takes the weight in the input's dtype) sees the same.
        options["weight"] = (torch.rand(c, generator=_generator(3), device=CUDA) + 0.5).to(torch.bfloat16).float()
    return options


def _as(options, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}


def _check_cross_entropy(backend, x, y, options, low_fn):
    def fused(inp):
        return fusedloss.cross_entropy(inp, y, backend=backend, **options)

    def reference(inp):
        return fusedloss.cross_entropy(inp, y, backend="reference", **_as(options, inp.dtype))

    def low(inp):  # torch takes the class weight in the input's dtype
        return low_fn(inp, y, **_as(options, inp.dtype))

    _check(fused, reference, x, low, terms=x.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(_F_OPTIONS) + list(_REFERENCE_OPTIONS))
def test_softmax_cross_entropy_options(backend, dtype, shape, option):
    if dtype == torch.float32 and option not in _FP32_OPTIONS:
        pytest.skip(f"fp32 runs the options {_FP32_OPTIONS} (fewer kernel builds); bf16 runs every option")
    x, y = _softmax_case(*shape, dtype)
    if option in _F_OPTIONS:
        options, low_fn = _options(_F_OPTIONS[option], shape[1], dtype), F.cross_entropy
    else:
        options = _options(_REFERENCE_OPTIONS[option], shape[1], dtype)
        low_fn = lambda i, t, **kw: fusedloss.cross_entropy(i, t, backend="reference", **kw)  # noqa: E731
    if options.get("ignore_index") == 3:
        y = torch.where(y == -100, 3, y)
    _check_cross_entropy(backend, x, y, options, low_fn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_fp16(backend):
    """float16 too (with smoothing), at a vocabulary shape."""
    x, y = _softmax_case(16, 32000, torch.float16, seed=1)
    _check_cross_entropy(backend, x, y, {"label_smoothing": 0.05}, F.cross_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(17, 1000), (4, 50257)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "reduction": "none"}], ids=["mean", "smooth_none"])
def test_softmax_soft_targets(backend, dtype, shape, options):
    """Class probabilities as targets (F.cross_entropy's soft-target form), in the input's dtype."""
    x, _ = _softmax_case(*shape, dtype, seed=2)
    probs = torch.softmax(torch.randn(*shape, generator=_generator(4), device=CUDA), -1).to(dtype)

    def fused(inp):
        return fusedloss.cross_entropy(inp, probs, backend=backend, **options)

    def torch_loss(inp):
        return F.cross_entropy(inp, probs.to(inp.dtype), **options)

    _check(fused, torch_loss, x, terms=shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softmax_focal_loss(backend, dtype, reduction):
    """fusedloss.focal_loss (mean over the count of kept rows, a per-class alpha) against the reference."""
    x, y = _softmax_case(40, 5000, dtype, seed=5)
    alpha = (torch.rand(5000, generator=_generator(6), device=CUDA) + 0.25).to(torch.bfloat16).float()

    def run(backend_name):
        return lambda inp: fusedloss.focal_loss(inp, y, gamma=2.0, alpha=alpha.to(inp.dtype), reduction=reduction,
                                                label_smoothing=0.05, backend=backend_name)

    _check(run(backend), run("reference"), x, terms=5000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_more_than_2_31_elements(backend):
    """N x V above 2^31 (64-bit offsets), reduction none with a per-row grad_output: rows at the start, middle and
    end of the tensor equal torch's on those rows alone."""
    vocab = 262144
    n = (1 << 31) // vocab + 1
    x = torch.empty(n, vocab, dtype=torch.bfloat16, device=CUDA).normal_(0, 2, generator=_generator(5))
    y = torch.randint(0, vocab, (n,), generator=_generator(6), device=CUDA)
    leaf = x.requires_grad_()
    losses = fusedloss.cross_entropy(leaf, y, reduction="none", backend=backend)
    grad_output = _grad_output(losses)
    losses.backward(grad_output)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=CUDA)

    def torch_rows(dtype):
        sample = x.detach()[rows].to(dtype).requires_grad_()
        row_losses = F.cross_entropy(sample, y[rows], reduction="none")
        row_losses.backward(grad_output[rows].to(dtype))
        return row_losses.detach(), sample.grad

    want, low = torch_rows(torch.float64), torch_rows(torch.bfloat16)
    assert_derived_close(losses.detach()[rows], low[0], want[0], "loss rows", terms=vocab)
    assert_derived_close(leaf.grad[rows], low[1], want[1], "gradient rows", terms=vocab)


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
        loss.backward(_grad_output(loss))
        return [loss.detach()] + [t.grad for t in leaves]

    def eager(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), y, reduction=reduction, label_smoothing=0.1)

    def ours(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                              chunk_size=384, backend=backend)

    want, low, got = run(eager, torch.float64), run(eager, torch.bfloat16), run(ours, torch.bfloat16)
    for name, a, lo, ref in zip(("loss", "grad_input", "grad_weight", "grad_bias"), got, low, want):
        assert a.dtype == torch.bfloat16, name
        assert_derived_close(a, lo, ref, name, terms=max(v, n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_fp32_options(backend):
    """float32, class weights, z-loss and soft-capping (the reference's options) at a 32000 vocabulary."""
    g = _generator(9)
    n, h, v = 300, 128, 32000
    x = torch.randn(n, h, generator=g, device=CUDA)
    w = torch.randn(v, h, generator=g, device=CUDA) / h**0.5
    y = torch.randint(0, v, (n,), generator=g, device=CUDA)
    y[::6] = -100
    weight = (torch.rand(v, generator=g, device=CUDA) + 0.5).to(torch.bfloat16).float()
    options = dict(weight=weight, z_loss=1e-3, softcap=20.0, label_smoothing=0.05)

    def run(backend_name, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w)]
        loss = fusedloss.linear_cross_entropy(*leaves, y, chunk_size=128, backend=backend_name,
                                              **_as(options, dtype))
        loss.backward(_grad_output(loss))
        return [loss.detach()] + [t.grad for t in leaves]

    want, low, got = run("reference", torch.float64), run("reference", torch.float32), run(backend, torch.float32)
    for name, a, lo, ref in zip(("loss", "grad_input", "grad_weight"), got, low, want):
        assert_derived_close(a, lo, ref, name, terms=max(v, n))


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


def _weights(batch, dtype=torch.float32):
    """grad_output per sequence: random, the same values in every dtype."""
    return torch.randn(batch, generator=_generator(9), device=CUDA).to(torch.bfloat16).to(dtype)


def _pytorch_crf(emissions, tags, mask, transitions, start, end):
    """pytorch-crf's log-likelihood per sequence, and the gradients of its weighted sum w.r.t. the four inputs."""
    module = _torchcrf(transitions, start, end)
    leaf = emissions.detach().clone().requires_grad_()
    llh = module(leaf, tags, mask, reduction="none")
    llh.backward(_weights(llh.shape[0], llh.dtype))
    grads = [leaf.grad, module.transitions.grad, module.start_transitions.grad, module.end_transitions.grad]
    return [llh.detach()] + [torch.zeros_like(p) if g is None else g for g, p in
                             zip(grads, (leaf, module.transitions, module.start_transitions, module.end_transitions))]


def _fused_crf(backend, emissions, tags, mask, transitions, start, end, grad_output=None):
    """The same from fusedloss.crf_log_likelihood on ``backend``."""
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    llh = fusedloss.crf_log_likelihood(leaves[0], tags, *leaves[1:], mask, reduction="none", backend=backend)
    llh.backward(_weights(llh.shape[0], llh.dtype) if grad_output is None else grad_output.to(llh.dtype))
    return [llh.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]


def _crf_magnitude(ref_llh, emissions):
    # Marginals are exp(alpha + beta - log Z): their exponents cancel numbers of the size of the path scores.
    return ref_llh.abs().max().item() + emissions.double().abs().sum((1, 2)).max().item()


def _check_crf_log_likelihood(backend, case, emission_dtype=torch.float32, fused=None):
    emissions, tags, mask, transitions, start, end = case
    emissions = emissions.to(emission_dtype)
    got = (fused or _fused_crf)(backend, emissions, tags, mask, transitions, start, end)
    ref64 = _pytorch_crf(emissions.double(), tags, mask, transitions.double(), start.double(), end.double())
    low = _pytorch_crf(emissions.float(), tags, mask, transitions, start, end)
    magnitude = _crf_magnitude(ref64[0], emissions)
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


def _triton_log_likelihood_op():
    """The Triton CRF's log-likelihood op, whose last two arguments are the launcher's block_b and block_k (reached
    as tests/test_triton_crf.py reaches it, so that a rename fails there, offline, too)."""
    from fusedloss.triton_kernels import crf

    return crf._log_likelihood_op


def _triton_tiled(block_b, block_k=None):
    """_fused_crf through the Triton op with the launcher's tiling forced."""
    def run(backend, emissions, tags, mask, transitions, start, end):
        leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
        llh = _triton_log_likelihood_op()(leaves[0], tags, mask, *leaves[1:], block_b, block_k)[0]
        llh.backward(_weights(llh.shape[0], llh.dtype))
        return [llh.detach()] + [x.grad for x in leaves]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
def test_crf_dot_batch_tile(backend, dtype):
    """K = 16 and B = 2048: the default tiling of the Triton launcher runs each step as one tl.dot over a tile of
    16 sequences (the public API picks it); the cuda backend gets the same call."""
    _check_crf_log_likelihood(backend, _crf_case(2048, 48, 16, seed=11), dtype)


@pytest.mark.parametrize("block_b", [16, 32])
def test_crf_dot_batch_tile_forced(block_b):
    """The tl.dot path through the launcher's block_b argument, a partial last tile (B = 2050)."""
    _check_crf_log_likelihood("triton", _crf_case(2050, 24, 16, seed=12), fused=_triton_tiled(block_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_dot_batch_tile_long_sequences(backend):
    """B = 2048, T = 4096, K = 16 (the tl.dot tile on Triton): per-sequence log-likelihood and emission gradients
    of a sample of sequences against pytorch-crf on those sequences alone, and the best paths."""
    emissions, tags, mask, transitions, start, end = _crf_case(2048, 4096, 16, seed=13)
    grad_output = _weights(2048)
    got = _fused_crf(backend, emissions, tags, mask, transitions, start, end, grad_output)
    sample = torch.tensor([0, 1, 17, 1024, 2047], device=CUDA)

    def oracle(dtype):
        module = _torchcrf(transitions.to(dtype), start.to(dtype), end.to(dtype))
        leaf = emissions[sample].to(dtype).requires_grad_()
        llh = module(leaf, tags[sample], mask[sample], reduction="none")
        llh.backward(grad_output[sample].to(dtype))
        return llh.detach(), leaf.grad

    ref64, low = oracle(torch.float64), oracle(torch.float32)
    magnitude = _crf_magnitude(ref64[0], emissions[sample])
    assert_derived_close(got[0][sample], low[0], ref64[0], "log-likelihood", magnitude)
    assert_derived_close(got[1][sample], low[1], ref64[1], "emissions", magnitude)
    paths, _ = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend=backend)
    module = _torchcrf(transitions.double(), start.double(), end.double())
    want = module.decode(emissions[sample].double(), mask[sample])
    lengths = mask[sample].sum(1).tolist()
    assert [paths[b, :n].tolist() for b, n in zip(sample.tolist(), lengths)] == want


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
    error = (scores.double() - best).abs().max().item()
    allowed = 8 * torch.finfo(torch.float32).eps * scale
    _record("viterbi score", scores.dtype, error, allowed)
    assert error <= allowed, f"viterbi score: error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CRF_SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_viterbi_matches_pytorch_crf(backend, shape):
    _check_viterbi(backend, _crf_case(*shape, seed=3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CRF_SHAPES[1:] + [(64, 20, 16)], ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_marginals_match_reference(backend, shape):
    emissions, _, mask, transitions, start, end = _crf_case(*shape, seed=4)
    got = fusedloss.crf_marginals(emissions, transitions, start, end, mask, backend=backend)
    ref64 = fusedloss.crf_marginals(emissions.double(), transitions.double(), start.double(), end.double(), mask,
                                    backend="reference")
    low = fusedloss.crf_marginals(emissions, transitions, start, end, mask, backend="reference")
    assert_derived_close(got, low, ref64, "marginals", emissions.abs().sum((1, 2)).max().item())
    assert (got[~mask] == 0).all()


# The partial-annotation ops through the public layer on each CUDA backend: a small table of shapes, one tile and
# several, K = 73 in tiles of 64.
PARTIAL_SHAPES = [(4, 7, 5), (3, 20, 9), (5, 33, 73)]


def _log_partition_torch(emissions, mask, transitions, start, end):
    """log Z (B,) by the forward algorithm in PyTorch ops, in the inputs' dtype (differentiable)."""
    alpha = start + emissions[:, 0]
    for t in range(1, emissions.shape[1]):
        step = torch.logsumexp(alpha[:, :, None] + transitions[None], 1) + emissions[:, t]
        alpha = torch.where(mask[:, t, None], step, alpha)
    return torch.logsumexp(alpha + end, 1)


def _partial_torch(which, emissions, allowed, mask, transitions, start, end):
    """``log Z_allowed - log Z`` (which = "partial") or ``log Z`` and the gradients of its weighted sum."""
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    value = _log_partition_torch(leaves[0], mask, *leaves[1:])
    if which == "partial":
        constrained = leaves[0].masked_fill(~allowed, -1.0e30)
        value = _log_partition_torch(constrained, mask, *leaves[1:]) - value
    value.backward(_weights(value.shape[0], value.dtype))
    return [value.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["partial", "log_partition"])
@pytest.mark.parametrize("shape", PARTIAL_SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_partial_log_likelihood_and_log_partition(backend, which, shape):
    emissions, tags, mask, transitions, start, end = _crf_case(*shape, seed=6, constrained=True)
    allowed = torch.rand(emissions.shape, generator=_generator(7), device=CUDA) < 0.4
    allowed |= F.one_hot(tags, shape[2]).bool() | ~mask[:, :, None]
    leaves = [x.detach().clone().requires_grad_() for x in (emissions, transitions, start, end)]
    if which == "partial":
        value = fusedloss.crf_log_likelihood(leaves[0], allowed, *leaves[1:], mask, "none", backend=backend)
    else:
        value = fusedloss.crf_log_partition(*leaves, mask, backend=backend)
    value.backward(_weights(value.shape[0], value.dtype))
    got = [value.detach()] + [x.grad for x in leaves]
    ref64 = _partial_torch(which, emissions.double(), allowed, mask, transitions.double(), start.double(),
                           end.double())
    low = _partial_torch(which, emissions, allowed, mask, transitions, start, end)
    magnitude = emissions.abs().sum((1, 2)).max().item()
    for name, a, lo, ref in zip(("value", "emissions", "transitions", "start", "end"), got, low, ref64):
        assert_derived_close(a, lo, ref, f"{which} {name}", magnitude, terms=shape[0] * shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", PARTIAL_SHAPES, ids=lambda s: "B%d_T%d_K%d" % s)
def test_crf_kbest_viterbi(backend, shape):
    """Rank 0 of k = 2 is the Viterbi path; for k = 6 the paths are distinct, padded with -1, their scores descend
    and equal their float64 path scores."""
    emissions, _, mask, transitions, start, end = _crf_case(*shape, seed=8)
    paths, scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, k=2, backend=backend)
    best, best_scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend=backend)
    assert torch.equal(paths[:, 0], best)
    torch.testing.assert_close(scores[:, 0], best_scores)
    k = 6
    paths, scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, k=k, backend=backend)
    assert (paths[~mask[:, None, :].expand_as(paths)] == -1).all()
    module = _torchcrf(transitions.double(), start.double(), end.double())
    lengths = mask.sum(1)
    for b in range(shape[0]):
        count = min(k, shape[2] ** int(lengths[b]))
        assert (scores[b, count:] == float("-inf")).all() and (paths[b, count:] == -1).all()
        assert (scores[b, 1:count] <= scores[b, :count - 1]).all()
        rows = paths[b, :count]
        assert len({tuple(row.tolist()) for row in rows}) == count
        with torch.no_grad():
            want = module._compute_score(emissions[b:b + 1].double().expand(count, -1, -1).transpose(0, 1),
                                         rows.clamp(min=0).t(), mask[b:b + 1].expand(count, -1).t())
        scale = emissions[b].abs().sum().item() + transitions.abs().max().item() * shape[1]
        error = (scores[b, :count].double() - want).abs().max().item()
        allowed = 8 * torch.finfo(torch.float32).eps * scale
        _record("k-best scores", scores.dtype, error, allowed)
        assert error <= allowed, f"k-best scores: error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tags", [9, 73])
def test_crf_long_sequences(backend, num_tags):
    """T = 4096: log-likelihood and gradients against pytorch-crf in float64, and the best path."""
    case = _crf_case(2, 4096, num_tags, seed=5)
    _check_crf_log_likelihood(backend, case)
    _check_viterbi(backend, case)


BAD = 1  # the sequence given a bad value


def _assert_only_the_bad_sequence_changes(got, clean):
    """docs/crf.rst, unchecked values on CUDA tensors: the bad sequence's log-likelihood is NaN and its emission
    gradient zero; every other sequence's log-likelihood and emission gradient equal the clean run's (which gives
    the bad sequence grad_output 0) bit for bit, and the summed transition gradients equal it to rounding (the
    cuda kernels may sum in another order)."""
    others = torch.arange(got[0].shape[0], device=CUDA) != BAD
    assert torch.isnan(got[0][BAD]), f"log-likelihood of the bad sequence: {got[0][BAD].item()}"
    assert torch.equal(got[0][others], clean[0][others]), "log-likelihood of the other sequences"
    assert torch.equal(got[1][BAD], torch.zeros_like(got[1][BAD])), "emission gradient of the bad sequence"
    assert torch.equal(got[1][others], clean[1][others]), "emission gradients of the other sequences"
    for name, g, c in zip(("transitions", "start", "end"), got[2:], clean[2:]):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, c, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


_UNCHECKED_SHAPES = {"one-tile": (6, 9, 5), "dot-tile": (2048, 8, 16)}  # the second: Triton's tl.dot batch tile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiling", list(_UNCHECKED_SHAPES))
def test_crf_all_off_mask_gives_nan_for_its_sequence_only(backend, tiling):
    """An all-off mask row on CUDA (not checked there): NaN log-likelihood and zero gradient, NaN marginals, a path
    of -1 and a NaN score for that sequence; the other sequences exactly as without it."""
    emissions, tags, mask, transitions, start, end = _crf_case(*_UNCHECKED_SHAPES[tiling], seed=21)
    bad_mask = mask.clone()
    bad_mask[BAD] = False
    clean_weights = _weights(mask.shape[0])
    clean_weights[BAD] = 0.0
    got = _fused_crf(backend, emissions, tags, bad_mask, transitions, start, end)
    clean = _fused_crf(backend, emissions, tags, mask, transitions, start, end, clean_weights)
    _assert_only_the_bad_sequence_changes(got, clean)

    others = torch.arange(mask.shape[0], device=CUDA) != BAD
    paths, scores = fusedloss.crf_viterbi(emissions, transitions, start, end, bad_mask, backend=backend)
    clean_paths, clean_scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend=backend)
    assert (paths[BAD] == -1).all() and torch.isnan(scores[BAD])
    assert torch.equal(paths[others], clean_paths[others]) and torch.equal(scores[others], clean_scores[others])
    marginals = fusedloss.crf_marginals(emissions, transitions, start, end, bad_mask, backend=backend)
    clean_marginals = fusedloss.crf_marginals(emissions, transitions, start, end, mask, backend=backend)
    assert torch.isnan(marginals[BAD]).all()
    assert torch.equal(marginals[others], clean_marginals[others])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiling", list(_UNCHECKED_SHAPES))
@pytest.mark.parametrize("value", [-1, "K", 2**40], ids=["minus1", "K", "2pow40"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_crf_tag_out_of_range_gives_nan_for_its_sequence_only(backend, tiling, value, position):
    """A tag outside [0, K) at an unmasked step on CUDA (not checked there): NaN log-likelihood and zero gradient
    for that sequence, nothing of it in the transition gradients, the other sequences exactly as without it."""
    emissions, tags, mask, transitions, start, end = _crf_case(*_UNCHECKED_SHAPES[tiling], seed=22)
    num_tags, seq_len = emissions.shape[2], emissions.shape[1]
    mask[BAD] = True
    step = {"first": 0, "middle": seq_len // 2, "last": seq_len - 1}[position]
    bad_tags = tags.clone()
    bad_tags[BAD, step] = num_tags if value == "K" else value
    clean_weights = _weights(mask.shape[0])
    clean_weights[BAD] = 0.0
    got = _fused_crf(backend, emissions, bad_tags, mask, transitions, start, end)
    clean = _fused_crf(backend, emissions, tags, mask, transitions, start, end, clean_weights)
    _assert_only_the_bad_sequence_changes(got, clean)


# ------------------------------------------------------------------------------------------------ sigmoid family

SIGMOID_SHAPES = [(33, 80), (256, 1000)]


def _multi_hot(shape, dtype, seed=1):
    return (torch.rand(shape, generator=_generator(seed), device=CUDA) < 0.2).to(dtype)


def _sigmoid_cases():
    """name -> (loss(backend) -> fn(input, target), target kind, reductions); each loss takes its options."""
    def bce(backend, reduction, weighted):
        def fn(x, y):
            c = x.shape[-1]
            pos_weight = torch.linspace(0.5, 3.0, c, device=CUDA).to(torch.bfloat16).to(x.dtype)
            weight = torch.linspace(0.25, 1.0, c, device=CUDA).to(torch.bfloat16).to(x.dtype) if weighted else None
            if backend == "torch":
                return F.binary_cross_entropy_with_logits(x, y, weight, pos_weight=pos_weight, reduction=reduction)
            return fusedloss.binary_cross_entropy_with_logits(x, y, weight, pos_weight=pos_weight,
                                                              reduction=reduction, backend=backend)
        return fn

    def focal(backend, reduction, alpha=0.25, gamma=2.0):
        return lambda x, y: fusedloss.sigmoid_focal_loss(x, y, alpha, gamma, reduction, backend=backend)

    def soft_margin(backend, reduction):
        def fn(x, y):
            weight = torch.linspace(0.5, 2.0, x.shape[-1], device=CUDA).to(torch.bfloat16).to(x.dtype)
            if backend == "torch":
                return F.multilabel_soft_margin_loss(x, y, weight, reduction=reduction)
            return fusedloss.multilabel_soft_margin_loss(x, y, weight, reduction=reduction, backend=backend)
        return fn

    def zlpr(backend, reduction):
        return lambda x, y: fusedloss.multilabel_categorical_crossentropy(x, y, reduction, backend=backend)

    def ghmc(backend, reduction, bins=10, momentum=0.0):
        def fn(x, y):
            valid = (torch.arange(x.numel(), device=CUDA).reshape(x.shape) % 11 != 0).float()
            return fusedloss.ghmc_loss(x, y, valid, bins, momentum, backend=backend)
        return fn

    def bi_tempered(backend, reduction, t1=0.8, t2=1.2, smoothing=0.1):
        def fn(x, y):
            labels = torch.randint(0, x.shape[-1], x.shape[:-1], generator=_generator(7), device=CUDA)
            return fusedloss.bi_tempered_logistic_loss(x, labels, t1, t2, smoothing, 5, reduction, backend=backend)
        return fn

    def bi_tempered_soft(backend, reduction, t1=0.5, t2=4.0):
        def fn(x, y):
            probs = torch.softmax(torch.randn(x.shape, generator=_generator(8), device=CUDA), -1).to(x.dtype)
            return fusedloss.bi_tempered_logistic_loss(x, probs, t1, t2, 0.0, 5, reduction, backend=backend)
        return fn

    return {
        # name: (loss factory, torch's own function as PyTorch's low-precision code, reductions)
        "bce_pos_weight": (lambda b, r: bce(b, r, False), True, ("mean", "none")),
        "bce_weight_pos_weight": (lambda b, r: bce(b, r, True), True, ("sum",)),
        "sigmoid_focal": (focal, False, ("mean", "none")),
        "sigmoid_focal_alpha_off": (lambda b, r: focal(b, r, alpha=-1.0, gamma=0.5), False, ("sum",)),
        "multilabel_soft_margin": (soft_margin, True, ("mean", "none")),
        "zlpr": (zlpr, False, ("mean", "none")),
        "ghmc": (ghmc, False, ("mean",)),
        "ghmc_momentum": (lambda b, r: ghmc(b, r, bins=30, momentum=0.75), False, ("mean",)),
        "bi_tempered": (bi_tempered, False, ("mean", "none")),
        "bi_tempered_soft": (bi_tempered_soft, False, ("mean",)),
    }


_SIGMOID_CASES = _sigmoid_cases()
_SIGMOID_PARAMS = [(name, reduction) for name, (_, _, reductions) in _SIGMOID_CASES.items()
                   for reduction in reductions]


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SIGMOID_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss, reduction", _SIGMOID_PARAMS, ids=[f"{n}-{r}" for n, r in _SIGMOID_PARAMS])
@pytest.mark.parametrize("backend", ["triton"])
def test_sigmoid_family(backend, loss, reduction, shape, dtype):
    """Each loss of the family on Triton against the reference in float64; PyTorch's own error from torch's function
    where it has one (BCE with logits, multilabel soft margin), else from the reference in the same dtype."""
    factory, has_torch, _ = _SIGMOID_CASES[loss]
    x = (3 * torch.randn(shape, generator=_generator(0), device=CUDA)).to(dtype)
    y = _multi_hot(shape, dtype)

    def bound(backend_name):
        fn = factory(backend_name, reduction)
        return lambda inp: fn(inp, y.to(inp.dtype))

    _check(bound(backend), bound("reference"), x, bound("torch") if has_torch else None, loss)


def test_sigmoid_family_cuda_backend_declines():
    """The cuda backend has no kernels for the sigmoid family: naming it raises BackendUnavailable with a reason
    (and auto serves CUDA tensors with Triton)."""
    if _cuda_backend_reason() is not None:
        pytest.skip(f"cuda backend unavailable: {_cuda_backend_reason()}")
    x = torch.randn(8, 16, device=CUDA, requires_grad=True)
    y = _multi_hot((8, 16), torch.float32)
    with pytest.raises(fusedloss.BackendUnavailable):
        fusedloss.sigmoid_focal_loss(x, y, backend="cuda")
    with pytest.raises(fusedloss.BackendUnavailable):
        fusedloss.binary_cross_entropy_with_logits(x, y, backend="cuda")
    auto = fusedloss.sigmoid_focal_loss(x, y, reduction="sum")
    triton = fusedloss.sigmoid_focal_loss(x, y, reduction="sum", backend="triton")
    assert torch.equal(auto, triton)


# ------------------------------------------------------------------------------------------------ vocab-parallel

@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank (file store, no network), destroyed after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("options", [
    {"reduction": "none", "label_smoothing": 0.1, "focal_gamma": 2.0},  # the third all-reduce
    {"reduction": "mean", "z_loss": 1e-3, "softcap": 30.0, "weight": "weight"},
], ids=["focal_smoothing_none", "z_softcap_weight_mean"])
def test_distributed_vocab_parallel_cross_entropy(world_of_one, backend, dtype, options):
    """The local work of the vocabulary-parallel loss on CUDA tensors (one rank holds the whole vocabulary): equal
    to fusedloss.cross_entropy's reference in float64; the fused backends decline it with BackendUnavailable."""
    from fusedloss.distributed import vocab_parallel_cross_entropy

    x, y = _softmax_case(96, 32000, dtype, seed=31)
    options = _options(options, 32000, dtype)

    def parallel(inp):
        return vocab_parallel_cross_entropy(inp, y, group=world_of_one, backend=backend, **options)

    def reference(inp):
        return fusedloss.cross_entropy(inp, y, backend="reference", **_as(options, inp.dtype))

    _check(parallel, reference, x, terms=32000)
    for fused in ("triton", "cuda"):
        with pytest.raises(fusedloss.BackendUnavailable):
            vocab_parallel_cross_entropy(x, y, group=world_of_one, backend=fused)


@pytest.mark.parametrize("backend", ["auto"])
def test_distributed_vocab_parallel_linear_cross_entropy(world_of_one, backend):
    """The linear form in bf16 on one rank against F.linear + F.cross_entropy in float64 and bf16."""
    from fusedloss.distributed import vocab_parallel_linear_cross_entropy

    g = _generator(32)
    n, h, v = 200, 128, 16000
    x = torch.randn(n, h, generator=g, device=CUDA)
    w = torch.randn(v, h, generator=g, device=CUDA) / h**0.5
    b = torch.randn(v, generator=g, device=CUDA)
    y = torch.randint(0, v, (n,), generator=g, device=CUDA)
    y[::9] = -100

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        loss = fn(*leaves)
        loss.backward(_grad_output(loss))
        return [loss.detach()] + [t.grad for t in leaves]

    def eager(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), y, label_smoothing=0.1)

    def parallel(x, w, b):
        return vocab_parallel_linear_cross_entropy(x, w, y, linear_bias_shard=b, group=world_of_one,
                                                   label_smoothing=0.1, chunk_size=64, backend=backend)

    want, low, got = run(eager, torch.float64), run(eager, torch.bfloat16), run(parallel, torch.bfloat16)
    for name, a, lo, ref in zip(("loss", "grad_input", "grad_weight", "grad_bias"), got, low, want):
        assert_derived_close(a, lo, ref, name, terms=max(v, n))


# ------------------------------------------------------------------------------------------------ torch.compile

NUM_TAGS = 16


class _Model(torch.nn.Module):
    """features (B, T, H) -> tanh -> linear -> scores (B, T, NUM_TAGS) -> the family's loss (for the linear head
    the linear layer and the loss are one fused op)."""

    def __init__(self, hidden, backend, family):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, NUM_TAGS)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(NUM_TAGS, hidden, generator=_generator(40)))
            self.proj.bias.copy_(torch.randn(NUM_TAGS, generator=_generator(41)))
        self.crf = fusedloss.CRF(NUM_TAGS, batch_first=True, backend=backend) if family == "crf" else None
        self.backend, self.family = backend, family

    def forward(self, features, target, mask):
        hidden = torch.tanh(features)
        if self.family == "linear":
            return fusedloss.linear_cross_entropy(hidden, self.proj.weight, target, linear_bias=self.proj.bias,
                                                  label_smoothing=0.1, chunk_size=64, backend=self.backend)
        scores = self.proj(hidden)
        if self.family == "softmax":
            return fusedloss.cross_entropy(scores, target, label_smoothing=0.1, z_loss=1e-3, reduction="none",
                                           backend=self.backend)
        if self.family == "crf":
            return -self.crf(scores, target.clamp(min=0), mask, reduction="token_mean")
        multi_hot = F.one_hot(target.clamp(min=0), NUM_TAGS).float()
        return fusedloss.sigmoid_focal_loss(scores, multi_hot, reduction="mean", backend=self.backend)


def _model_loss_and_grads(model, features, target, mask):
    model.zero_grad(set_to_none=True)
    features = features.detach().clone().requires_grad_()
    loss = model(features, target, mask)
    loss.backward(_grad_output(loss))
    return [loss.detach(), features.grad] + [p.grad.clone() for p in model.parameters()]


_COMPILE_CASES = [(f, b) for f in ("softmax", "linear", "crf", "sigmoid") for b in ("triton", "cuda")
                  if not (f == "sigmoid" and b == "cuda")]


@pytest.mark.parametrize("family, backend", [
    pytest.param(f, b, marks=BACKENDS[1].marks if b == "cuda" else ()) for f, b in _COMPILE_CASES
], ids=[f"{f}-{b}" for f, b in _COMPILE_CASES])
def test_compile_fullgraph_matches_eager_and_float64(family, backend):
    """torch.compile(fullgraph=True) (Inductor) of a small model per family on CUDA: the loss and every gradient
    equal eager's on the same backend, and are within the derived tolerance of the model in float64 (reference)."""
    torch._dynamo.reset()
    g = _generator(42)
    features = torch.randn(8, 24, 32, generator=g, device=CUDA)
    target = torch.randint(0, NUM_TAGS, (8, 24), generator=g, device=CUDA)
    target[1, 20:] = -100
    lengths = torch.randint(1, 25, (8,), generator=g, device=CUDA)
    lengths[0] = 24
    mask = torch.arange(24, device=CUDA)[None, :] < lengths[:, None]
    model = _Model(32, backend, family).to(CUDA)
    eager = _model_loss_and_grads(model, features, target, mask)
    compiled = _model_loss_and_grads(torch.compile(model, fullgraph=True, backend="inductor"), features, target, mask)
    # The float64 oracle and PyTorch's own float32 error: the same model on the reference backend.
    reference = [_Model(32, "reference", family).to(CUDA, dtype) for dtype in (torch.float64, torch.float32)]
    for m in reference:
        m.load_state_dict(model.state_dict())
    want = _model_loss_and_grads(reference[0], features.double(), target, mask)
    low = _model_loss_and_grads(reference[1], features, target, mask)
    names = ["loss", "features gradient"] + [f"{name} gradient" for name, _ in model.named_parameters()]
    for name, e, c, w, lo in zip(names, eager, compiled, want, low):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert_derived_close(c, lo, w, f"compiled {name}", terms=features.numel())


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
