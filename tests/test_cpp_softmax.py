"""The ``cpp`` backend of softmax_loss (``fusedloss._C``, csrc/cpu/softmax_loss.cpp) against float64 oracles.

Oracles: ``torch.nn.functional.cross_entropy`` (every option it has) and ``fusedloss.reference.softmax`` (focal,
z-loss, soft-cap), both evaluated in float64. Values and gradients (with a random ``grad_output``). Tolerance: the
kernel's error against float64 may be at most twice the error of PyTorch's own computation of the same loss from
the same low-precision input, plus one unit of the dtype's epsilon times the largest magnitude (the
dtype cannot represent the answer more closely than that; 16 units for float64, see _assert_close_as_torch).
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import available, requires_backend
from _retain_graph import assert_cross_entropy_backwards_match
from fusedloss import _dispatch
from fusedloss.reference import softmax as reference

# Every test needs the extension: skipped without it, a failure in CI (tests/_backends.py).
pytestmark = requires_backend("cpp")

if available("cpp"):
    from fusedloss._ext.softmax_loss import softmax_loss, softmax_loss_reasons

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _args(target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, focal_gamma=0.0,
          z_loss=0.0, softcap=None, mean_by_count=False, inplace_backward=False):
    return dict(target=target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap,
                mean_by_count=mean_by_count, inplace_backward=inplace_backward)


def _value_and_grad(fn, x, grad_output_seed=0, **kwargs):
    """Loss and dloss/dx of fn(x, **kwargs) with a fixed random grad_output (per row for reduction none)."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x, **kwargs)
    gen = torch.Generator().manual_seed(grad_output_seed)
    grad_output = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype) + 0.5
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    return loss.detach(), grad


def _cpp(x, **kwargs):
    return softmax_loss(x, **kwargs)


def _reference(x, **kwargs):
    return reference.softmax_loss(x, **kwargs)


def _to64(kwargs):
    out = dict(kwargs)
    for key in ("target", "weight"):
        if isinstance(out[key], torch.Tensor) and out[key].is_floating_point():
            out[key] = out[key].double()
    return out


def _assert_close_as_torch(ours, torch_lowp, oracle, dtype, what):
    """|ours − oracle| ≤ 2·|torch_lowp − oracle| + k·eps(dtype)·max|oracle|, elementwise maxima.

    k = 1, except for float64 input, where the oracle is torch's own computation (its error against itself is 0)
    and k = 16 ulps of the largest magnitude covers a different order of summation over up to 32003 classes.
    """
    ours, torch_lowp = ours.double(), torch_lowp.double()
    both_nan = torch.isnan(ours) & torch.isnan(oracle)
    assert torch.equal(torch.isnan(ours), torch.isnan(oracle)), f"{what}: NaN pattern differs"
    err = (ours - oracle).abs().masked_fill(both_nan, 0).max().item() if ours.numel() else 0.0
    torch_err = (torch_lowp - oracle).abs().masked_fill(both_nan, 0).nan_to_num(0).max().item() if ours.numel() else 0.0
    scale = oracle.abs().masked_fill(both_nan, 0).max().item() if ours.numel() else 0.0
    ulps = 16 if dtype == torch.float64 else 1
    tol = 2 * torch_err + ulps * torch.finfo(dtype).eps * max(scale, 1e-30)
    assert err <= tol, f"{what}: error {err:.3g} > tolerance {tol:.3g} (torch's own error {torch_err:.3g})"


def _check_against_oracle(x, torch_fn, oracle_fn, kwargs, torch_kwargs=None):
    """Our value and gradient vs the float64 oracle, tolerance from torch_fn computed on the same input."""
    torch_kwargs = kwargs if torch_kwargs is None else torch_kwargs
    dtype = x.dtype
    loss, grad = _value_and_grad(_cpp, x, **kwargs)
    assert loss.dtype == dtype and grad.dtype == dtype
    loss64, grad64 = _value_and_grad(oracle_fn, x.double(), **_to64(torch_kwargs))
    loss_lowp, grad_lowp = _value_and_grad(torch_fn, x, **torch_kwargs)
    _assert_close_as_torch(loss, loss_lowp, loss64, dtype, "loss")
    _assert_close_as_torch(grad, grad_lowp, grad64, dtype, "gradient")


def _cross_entropy(x, target, weight, ignore_index, reduction, label_smoothing, **_):
    return F.cross_entropy(x, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def _make(n, c, dtype, target_kind, seed=0, weighted=False, ignore_some=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if target_kind == "soft":
        target = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), -1).to(dtype)
    else:
        target = torch.randint(0, c, (n,), generator=gen)
        if ignore_some and n > 2:
            target[1] = -100
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    return x, target, weight


# --- against torch.nn.functional.cross_entropy: every option it has, every dtype ----------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [1, 2, 9, 423])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind,weighted,label_smoothing", [
    ("hard", False, 0.0), ("hard", True, 0.0), ("hard", False, 0.1), ("hard", True, 0.2),
    ("soft", False, 0.0), ("soft", True, 0.1),
])
def test_matches_cross_entropy(dtype, num_classes, reduction, target_kind, weighted, label_smoothing):
    x, target, weight = _make(17, num_classes, dtype, target_kind, weighted=weighted)
    kwargs = _args(target, weight, reduction=reduction, label_smoothing=label_smoothing)
    _check_against_oracle(x, _cross_entropy, _cross_entropy, kwargs)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(weighted=True),
                                     dict(focal_gamma=2.0), dict(focal_gamma=1.0, weighted=True, z_loss=1e-3),
                                     dict(focal_gamma=0.5), dict(softcap=20.0)], ids=str)
def test_every_tag_set_size(options):
    """Every class count from 2 to 70, then sizes around the paths' limits up to 1024 (row tiles serve up to 64
    classes, up to 512 in the AVX-512 variant, full float32 tiles through vector transposes, a partial last tile
    and ignored rows inside full tiles element by element; per-row sweeps above, in blocks of 512 with a masked last
    vector), 43 rows (partial tiles of 8 and 16 rows), against float64 with torch's float32 error as the
    tolerance."""
    options = dict(options)
    weighted = options.pop("weighted", False)
    for num_classes in [*range(2, 71), 127, 133, 255, 256, 257, 300, 512, 513, 529, 1024]:
        x, target, weight = _make(43, num_classes, torch.float32, "hard", seed=num_classes, weighted=weighted)
        target[[9, 20, 42]] = -100  # ignored rows in full tiles and in the partial one
        kwargs = _args(target, weight, **options)
        if options.get("focal_gamma") or options.get("softcap") or options.get("z_loss"):
            _check_against_oracle(x, _reference, _reference, kwargs)
        else:
            _check_against_oracle(x, _cross_entropy, _cross_entropy, kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_vocabulary(dtype):
    """C = 32003 (rows longer than any block, a prime tail) with smoothing and weights."""
    x, target, weight = _make(3, 32003, dtype, "hard", weighted=True, ignore_some=False)
    _check_against_oracle(x, _cross_entropy, _cross_entropy, _args(target, weight, label_smoothing=0.1))


# --- against the reference: focal, z-loss, soft-cap (and their combinations with everything else) ---------------

OPTIONS = [  # (label_smoothing, focal_gamma, z_loss, softcap)
    (0.0, 2.0, 0.0, None), (0.0, 0.5, 0.0, None), (0.1, 2.0, 0.0, None), (0.0, 0.0, 1e-2, None),
    (0.0, 0.0, 0.0, 5.0), (0.1, 1.5, 1e-3, 10.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [1, 2, 9, 423])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("target_kind,weighted", [("hard", False), ("hard", True), ("soft", True)])
def test_matches_reference(dtype, num_classes, options, target_kind, weighted):
    label_smoothing, focal_gamma, z_loss, softcap = options
    x, target, weight = _make(13, num_classes, dtype, target_kind, seed=1, weighted=weighted)
    for reduction in ("mean", "sum", "none"):
        kwargs = _args(target, weight, reduction=reduction, label_smoothing=label_smoothing,
                       focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap)
        _check_against_oracle(x, _reference, _reference, kwargs)


@pytest.mark.parametrize("mean_by_count", [False, True])
def test_focal_mean_by_count(mean_by_count):
    x, target, weight = _make(20, 9, torch.float64, "hard", seed=2, weighted=True)
    kwargs = _args(target, weight, focal_gamma=2.0, mean_by_count=mean_by_count)
    _check_against_oracle(x, _reference, _reference, kwargs)


def test_soft_target_in_compute_dtype():
    """bf16 logits with float32 probabilities (read in float32, no conversion)."""
    x, target, _ = _make(8, 50, torch.bfloat16, "soft", seed=3)
    kwargs = _args(target.float(), label_smoothing=0.1)
    _check_against_oracle(x, _cross_entropy, _cross_entropy, kwargs)


# --- edge cases --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    x = torch.randn(5, 7, dtype=torch.float64)
    target = torch.full((5,), -100)
    loss, grad = _value_and_grad(_cpp, x, **_args(target, reduction=reduction))
    expected, expected_grad = _value_and_grad(_cross_entropy, x, **_args(target, reduction=reduction))
    torch.testing.assert_close(loss, expected, equal_nan=True)  # mean: 0/0 = nan, as torch
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("grad_output", [1.0, 1.7])
def test_inplace_backward(grad_output):
    """Same loss and gradient, bit for bit, with the gradient written over the input's storage."""
    x, target, weight = _make(16, 423, torch.float32, "hard", seed=4, weighted=True)
    kwargs = _args(target, weight, label_smoothing=0.1)
    results = []
    for inplace in (False, True):
        logits = x.clone().requires_grad_()
        hidden = logits * 1  # a non-leaf, as the logits of a model are
        loss = softmax_loss(hidden, **{**kwargs, "inplace_backward": inplace})
        assert torch.equal(hidden.detach(), x) != inplace, "the input is overwritten exactly when asked"
        (grad,) = torch.autograd.grad(loss * grad_output, logits)
        results.append((loss.detach(), grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_inplace_backward_bumps_version():
    """An op that saved the overwritten input for its backward raises instead of computing garbage."""
    x = torch.randn(4, 9, requires_grad=True)
    logits = x * 1
    squares = logits.pow(2).sum()  # saves logits
    loss = softmax_loss(logits, **_args(torch.tensor([0, 1, 2, 3]), inplace_backward=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squares).backward()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_stays_in_its_row(reduction):
    """NaN in a row makes that row's loss and gradient NaN; every other row's loss and gradient is bit for bit
    what the same call gives without the NaN (the rows are computed independently; the mean's divisor does not
    read the logits)."""
    clean = torch.randn(6, 33, generator=torch.Generator().manual_seed(4))
    x = clean.clone()
    x[2, 5] = float("nan")
    target = torch.arange(6)
    options = _args(target, reduction=reduction, label_smoothing=0.1, focal_gamma=2.0, z_loss=1e-3, softcap=20.0)
    loss, grad = _value_and_grad(_cpp, x, **options)
    clean_loss, clean_grad = _value_and_grad(_cpp, clean, **options)
    assert torch.isnan(grad[2]).all()
    others = torch.tensor([0, 1, 3, 4, 5])
    if reduction == "none":
        assert torch.isnan(loss[2])
        torch.testing.assert_close(loss[others], clean_loss[others], rtol=0, atol=0)
    else:
        assert torch.isnan(loss)
    torch.testing.assert_close(grad[others], clean_grad[others], rtol=0, atol=0)


@pytest.mark.parametrize("num_classes", [5, 16, 37])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"focal_gamma": 2.0}, {"softcap": 30.0}])
def test_ignored_rows_of_non_finite_logits_give_zeros(num_classes, options):
    """Ignored rows contribute exactly 0 to the loss and get a 0 gradient even when their logits are NaN or
    infinite (their exps are NaN), in full tiles of rows and in the partial last one; the kept rows match torch."""
    gen = torch.Generator().manual_seed(num_classes)
    x = torch.randn(35, num_classes, generator=gen) * 3
    target = torch.randint(0, num_classes, (35,), generator=gen)
    ignored = torch.tensor([1, 4, 15, 16, 30, 34])  # rows in the first and second full tiles and the last one
    target[ignored] = -100
    x[1] = float("nan")
    x[4, 0] = float("inf")
    x[15] = float("-inf")
    x[16, 2] = float("nan")
    x[30, num_classes - 1] = float("inf")
    def rows_and_grad(fn, logits, row_target):  # per-row losses and the gradient of their sum
        logits = logits.detach().clone().requires_grad_()
        rows = fn(logits, **_args(row_target, reduction="none", **options))
        (g,) = torch.autograd.grad(rows.sum(), logits)
        return rows.detach(), g

    loss, grad = rows_and_grad(_cpp, x, target)
    assert torch.equal(loss[ignored], torch.zeros(len(ignored)))
    assert torch.equal(grad[ignored], torch.zeros(len(ignored), num_classes))
    kept = target != -100
    # torch.nn.functional in float64 where it has the options; focal and soft-cap: the float64 reference (checked
    # against torch.nn.functional and kornia in test_softmax_reference.py).
    oracle = _reference if options.get("focal_gamma") or options.get("softcap") else _cross_entropy
    oracle_loss, oracle_grad = rows_and_grad(oracle, x[kept].double(), target[kept])
    torch.testing.assert_close(loss[kept], oracle_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[kept], oracle_grad.float(), rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    base = torch.randn(40, 30, dtype=torch.float64)
    x = base.t()  # (30, 40), column-major
    target = torch.randint(0, 40, (30,))
    _check_against_oracle(x, _cross_entropy, _cross_entropy, _args(target, label_smoothing=0.05))


def test_no_grad_needed():
    x, target, _ = _make(8, 20, torch.float32, "hard")
    with torch.no_grad():
        loss = softmax_loss(x.requires_grad_(), **_args(target))
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), target))


def test_second_backward_through_graph_raises():
    """The stored gradient is scaled in place by backward: a second backward raises rather than scaling twice."""
    x = torch.randn(4, 9, requires_grad=True)
    loss = softmax_loss(x, **_args(torch.tensor([0, 1, 2, 3]))) * 2
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


@pytest.mark.parametrize("scales", [(3.0, 3.0), (1.0, 3.0), (1.0, 1.0, 1.0)], ids=str)
def test_backwards_through_one_graph_match_torch_or_raise(scales):
    """Successive backwards through one graph with these grad_output scales: after each, torch's accumulated
    gradient, or a RuntimeError (a saved tensor modified in place); never another number."""
    assert_cross_entropy_backwards_match("cpp", scales)


def test_target_out_of_range_raises():
    """The op checks the range in its own row loop: a target out of range is a ValueError naming target."""
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"target values must be class indices in \[0, 5\).*got 5"):
        softmax_loss(x, **_args(torch.tensor([0, 5, 1])))


def test_threads_give_identical_results():
    x, target, weight = _make(64, 1000, torch.float32, "hard", seed=5, weighted=True)
    kwargs = _args(target, weight, label_smoothing=0.1, focal_gamma=1.0, z_loss=1e-3, softcap=20.0)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_value_and_grad(_cpp, x, **kwargs))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_auto_dispatch_picks_cpp():
    x, target, _ = _make(4, 9, torch.float32, "hard")
    args = (x, target, None, -100, "mean", 0.0, 0.0, 0.0, None, False, False)
    name, _ = _dispatch.resolve("softmax_loss", "auto", x.device, *args)
    assert name == "cpp"


def test_reasons_decline_what_it_cannot_do():
    """Gradients it does not compute are reasons; bad arguments are not (the op raises for them)."""
    x, target, _ = _make(4, 9, torch.float32, "soft")
    assert softmax_loss_reasons(x, target, None, -100, "mean", 0.0, 0.0, 0.0, None, False, False) == []
    assert softmax_loss_reasons(x.int(), target, None, -100, "mean", 0.0, 0.0, 0.0, None, False, False) == []
    assert softmax_loss_reasons(x, target.requires_grad_(), None, -100, "mean", 0.0, 0.0, 0.0, None, False, False)


# --- torch.library registration ----------------------------------------------------------------------------------

def test_opcheck():
    """Every opcheck test on the public op (autograd registered in C++), with and without a gradient, for (B, T, C)
    logits and reduction none; schema and fake kernel of the device op."""
    x, target, weight = _make(6, 11, torch.float32, "hard", weighted=True)
    for requires_grad in (False, True):
        for reduction, shape in (("mean", (6, 11)), ("none", (2, 3, 11))):
            torch.library.opcheck(
                torch.ops.fusedloss.softmax_loss.default,
                (x.detach().reshape(shape).requires_grad_(requires_grad), target.reshape(shape[:-1]), weight, -100,
                 reduction, 0.1, 2.0, 1e-3, 5.0, False, False),
            )
    for compute_grad in (False, True):
        torch.library.opcheck(
            torch.ops.fusedloss.softmax_loss_forward.default,
            (x.detach(), target, weight, -100, "mean", 0.1, 2.0, 1e-3, 5.0, False, compute_grad, False),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph():
    x, target, weight = _make(8, 37, torch.float32, "hard", weighted=True)

    def loss_fn(logits):
        return softmax_loss(logits * 2, target, weight, -100, "mean", 0.1, 2.0, 1e-3, None, False, False)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss, grad = _value_and_grad(lambda t: compiled(t), x)
    expected, expected_grad = _value_and_grad(lambda t: loss_fn(t), x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_public_api_runs_on_cpp():
    """fusedloss.cross_entropy(backend="cpp") on token-classification logits (B, T, C) equals torch's."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 11, (2, 5), generator=gen)
    target[0, 1] = -100
    kwargs = dict(label_smoothing=0.1, reduction="mean")
    loss, grad = _value_and_grad(lambda t: fusedloss.cross_entropy(t, target, backend="cpp", **kwargs), x)
    expected, expected_grad = _value_and_grad(
        lambda t: F.cross_entropy(t.reshape(-1, 11), target.reshape(-1), **kwargs), x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------------------------
# Reuse of large gradient buffers (csrc/cpu/grad_buffer.h)
# ----------------------------------------------------------------------------------------------

# 32 MiB of float32: the smallest gradient whose pages the cpp backend keeps for the next call.
_LARGE = (4096, 2048)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "distillation"])
def test_large_gradient_buffer_is_reused_only_once_released(loss):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*_LARGE, generator=gen).requires_grad_()
    target = torch.randint(0, _LARGE[1], (_LARGE[0],), generator=gen)
    other = torch.randn(*_LARGE, generator=gen)

    def step():
        x.grad = None
        if loss == "cross_entropy":
            fusedloss.cross_entropy(x, target, backend="cpp").backward()
        elif loss == "bce":
            fusedloss.binary_cross_entropy_with_logits(x, other.sigmoid(), backend="cpp").backward()
        else:
            fusedloss.distillation_loss(x, other, backend="cpp").backward()
        return x.grad

    held = step()
    expected = held.clone()
    held_view = held[:10]
    second = step()  # `held` is still referenced: new pages, and `held` keeps its values
    assert second.data_ptr() != held.data_ptr()
    assert torch.equal(held, expected) and torch.equal(second, expected)
    del held, held_view
    address = second.data_ptr()
    del second
    third = step()  # nothing referenced the last buffer: its pages are reused, with the same results
    assert third.data_ptr() == address
    assert torch.equal(third, expected)
    view = third.view(-1)
    del third
    fourth = step()  # a view keeps the pages referenced
    assert fourth.data_ptr() != view.data_ptr()
    assert torch.equal(view.view(_LARGE), expected) and torch.equal(fourth, expected)
