"""Triton softmax-loss kernels (triton_kernels/softmax_loss.py) on CPU tensors under TRITON_INTERPRET=1.

Oracles: ``torch.nn.functional.cross_entropy`` in float64 (every option it has), ``kornia.losses.focal_loss``,
and the float64 reference ``fusedloss.reference.softmax.softmax_loss`` (focal factor, z-loss, softcap, which torch
lacks), values and gradients. Tolerances: the kernel's error against the float64 oracle may be at
most twice the error of PyTorch's own computation in the same dtype (the reference run on the low-precision
input: float32 arithmetic, result rounded to the dtype), plus an a-priori floor so that a case where PyTorch
happens to be exact does not demand exactness: one rounding of the result to the dtype and the bound of a
float32 pairwise summation over the logits, ``(eps_dtype + ceil(log2(N C)) eps_float32) * max|oracle|``.
"""

import itertools
import math

import kornia
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import require_backend_for_module
from _retain_graph import assert_backwards_match, assert_cross_entropy_backwards_match, grads_after_backwards
from fusedloss import _dispatch
from fusedloss.reference.softmax import softmax_loss as reference_softmax_loss

# The kernels' modules import triton: without a usable Triton backend the module is skipped, and in CI fails
# (tests/_backends.py).
require_backend_for_module("triton")

from fusedloss.triton_kernels import softmax_loss as triton_softmax  # noqa: E402
from fusedloss.triton_kernels.softmax_loss import softmax_loss, softmax_loss_reasons  # noqa: E402

# Layouts of the forward and backward kernels: the launcher's choice for small C (the whole row in registers, a
# tile of rows per program), and one forced by shrinking the block limit so that rows of a few dozen classes span
# several blocks (online softmax; a tile of rows per program, or one row per program when N = 1). The vocabulary
# layout proper (one row per program, several blocks) runs in test_large_class_count_spans_blocks.
LAYOUTS = {"tile": {}, "blocks": {"_MAX_BLOCK_C": 16}}


@pytest.fixture(params=list(LAYOUTS))
def layout(request, monkeypatch):
    for name, value in LAYOUTS[request.param].items():
        monkeypatch.setattr(triton_softmax, name, value)
    return request.param


def _logits(n, c, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=generator, dtype=torch.float64)


def _target(n, c, soft=False, ignore_every=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if soft:
        return torch.softmax(torch.randn(n, c, generator=generator, dtype=torch.float64), dim=-1)
    target = torch.randint(0, c, (n,), generator=generator)
    if ignore_every:
        target[1::ignore_every] = -100
    return target


def _weight(c, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(c, generator=generator, dtype=torch.float64)


def _value_and_grad(fn, logits, grad_output_seed=4):
    """Loss and ∂(Σ loss * g)/∂logits with a fixed non-uniform g (per row for reduction='none')."""
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits)
    generator = torch.Generator().manual_seed(grad_output_seed)
    grad_output = (0.5 + torch.rand(loss.shape, generator=generator, dtype=torch.float64)).to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, logits, grad_output)
    return loss.detach().double(), grad.double()


def _max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _assert_close_derived(ours, oracle, pytorch_same_dtype, dtype, num_logits, what):
    """The tolerance rule: err(ours) <= 2 err(PyTorch in this dtype) + the a-priori floor of the module docstring."""
    summation = math.ceil(math.log2(max(num_logits, 2))) * torch.finfo(torch.float32).eps
    floor = (torch.finfo(dtype).eps + summation) * (oracle.abs().max().item() if oracle.numel() else 0.0)
    bound = 2 * _max_err(pytorch_same_dtype, oracle) + floor
    err = _max_err(ours, oracle)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error x2 + floor)"


def _check_against_reference(x64, target, weight, reduction, dtype, **options):
    """Triton on ``dtype`` input vs the float64 reference, values and gradients, derived tolerance."""
    args = dict(ignore_index=-100, reduction=reduction, label_smoothing=0.0, focal_gamma=0.0, z_loss=0.0,
                softcap=None, mean_by_count=False, inplace_backward=False)
    args.update(options)
    soft = target.is_floating_point()

    def run(fn, logits):
        t = target.to(logits.dtype) if soft else target
        w = None if weight is None else weight.to(torch.float32 if logits.dtype != torch.float64 else torch.float64)
        return fn(logits, t, w, **args)

    oracle = _value_and_grad(lambda x: run(reference_softmax_loss, x), x64)
    pytorch = _value_and_grad(lambda x: run(reference_softmax_loss, x), x64.to(dtype))
    ours = _value_and_grad(lambda x: run(softmax_loss, x), x64.to(dtype))
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1]).all()
    _assert_close_derived(ours[0], oracle[0], pytorch[0], dtype, x64.numel(), "loss")
    _assert_close_derived(ours[1], oracle[1], pytorch[1], dtype, x64.numel(), "gradient")


# ----------------------------------------------------------------------------------------------
# Equality with torch.nn.functional.cross_entropy: every option torch has, every reduction
# ----------------------------------------------------------------------------------------------

TORCH_OPTIONS = list(itertools.product([False, True], [0.0, 0.1], ["hard", "soft"]))  # weight, smoothing, target


@pytest.mark.parametrize("num_classes", [1, 2, 9, 423])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_torch_cross_entropy(num_classes, reduction):
    n = 7
    x64 = _logits(n, num_classes)
    for use_weight, smoothing, kind in TORCH_OPTIONS:
        target = _target(n, num_classes, soft=kind == "soft")
        weight = _weight(num_classes) if use_weight else None

        def torch_ce(x, target=target, weight=weight, kind=kind, smoothing=smoothing):
            w = None if weight is None else weight.to(x.dtype)
            t = target.to(x.dtype) if kind == "soft" else target
            return F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)

        def ours(x, target=target, weight=weight, kind=kind, smoothing=smoothing):
            w = None if weight is None else weight.to(x.dtype)
            t = target.to(x.dtype) if kind == "soft" else target
            return softmax_loss(x, t, w, -100, reduction, smoothing, 0.0, 0.0, None, False, False)

        oracle = _value_and_grad(torch_ce, x64)
        pytorch = _value_and_grad(torch_ce, x64.float())
        mine = _value_and_grad(ours, x64.float())
        what = f"weight={use_weight} smoothing={smoothing} {kind}"
        _assert_close_derived(mine[0], oracle[0], pytorch[0], torch.float32, x64.numel(), f"loss ({what})")
        _assert_close_derived(mine[1], oracle[1], pytorch[1], torch.float32, x64.numel(), f"gradient ({what})")


# ----------------------------------------------------------------------------------------------
# Every option of the softmax losses against the float64 reference, in every kernel layout
# ----------------------------------------------------------------------------------------------

# (weight, label_smoothing, soft targets, focal_gamma, z_loss, softcap, mean_by_count)
REFERENCE_OPTIONS = [
    (False, 0.0, False, 2.0, 0.0, None, True),  # focal loss, seed formula
    (True, 0.0, False, 0.5, 0.0, None, True),  # focal with per-class alpha, γ < 1
    (True, 0.1, False, 2.0, 1e-2, None, False),  # focal + smoothing (the extra pass) + weights + z-loss
    (False, 0.2, True, 1.5, 0.0, 5.0, False),  # focal on soft targets, softcap
    (True, 0.0, False, 0.0, 1e-2, 3.0, False),  # z-loss + softcap
    (True, 0.1, True, 0.0, 0.0, None, False),  # soft targets with weights and smoothing
]


@pytest.mark.parametrize("options", REFERENCE_OPTIONS, ids=lambda o: "w{}-eps{}-soft{}-g{}-z{}-cap{}-n{}".format(*o))
def test_options_match_reference(layout, options):
    use_weight, smoothing, soft, gamma, z_loss, softcap, by_count = options
    # With blocks of 16, C = 2 and 9 fit one block (the tile path again): only C = 40 spans blocks.
    for num_classes in (2, 9, 40) if layout == "tile" else (40,):
        x64 = _logits(7, num_classes, seed=num_classes)
        target = _target(7, num_classes, soft=soft)
        weight = _weight(num_classes) if use_weight else None
        for reduction in ("none", "mean"):
            _check_against_reference(x64, target, weight, reduction, torch.float32, label_smoothing=smoothing,
                                     focal_gamma=gamma, z_loss=z_loss, softcap=softcap, mean_by_count=by_count)


@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_row_counts(layout, num_rows):
    x64 = _logits(num_rows, 37, seed=num_rows)
    target = _target(num_rows, 37, ignore_every=5)
    _check_against_reference(x64, target, _weight(37), "sum", torch.float32, label_smoothing=0.1, focal_gamma=1.0)


def test_large_class_count_spans_blocks(monkeypatch):
    """The vocabulary layout: one row per program, C = 423 over blocks of 128 (a partial last block), every option."""
    monkeypatch.setattr(triton_softmax, "_MAX_BLOCK_C", 128)
    monkeypatch.setattr(triton_softmax, "_TILE_ELEMENTS", 128)
    x64 = _logits(4, 423, seed=5)
    _check_against_reference(x64, _target(4, 423), _weight(423), "mean", torch.float32, label_smoothing=0.1,
                             focal_gamma=2.0, z_loss=1e-3, softcap=20.0)
    _check_against_reference(x64, _target(4, 423, soft=True), None, "none", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(layout, dtype):
    x64 = _logits(16, 33, seed=6)
    target = _target(16, 33)
    _check_against_reference(x64, target, None, "none", dtype)
    _check_against_reference(x64, target, _weight(33), "mean", dtype, label_smoothing=0.1, focal_gamma=2.0,
                             z_loss=1e-3, softcap=10.0)


def test_bf16_target_class_gradient_is_not_rounded_away():
    """A confident row (p_y close to 1) in bf16: p_y - 1 must be formed in float32 before the cast.

    Rounding p_y to bf16 first gives p_y - 1 = 0 exactly; the true gradient is about -2e-3.
    """
    x = torch.zeros(1, 4)
    x[0, 0] = 8.0
    target = torch.tensor([0])
    x_ref = x.double().requires_grad_()
    (oracle,) = torch.autograd.grad(F.cross_entropy(x_ref, target, reduction="sum"), x_ref)
    x_bf16 = x.bfloat16().requires_grad_()
    loss = softmax_loss(x_bf16, target, None, -100, "sum", 0.0, 0.0, 0.0, None, False, False)
    (ours,) = torch.autograd.grad(loss, x_bf16)
    assert ours[0, 0] != 0
    # One bf16 ulp: GPUs round the float32 -> bfloat16 cast to nearest, the interpreter truncates.
    torch.testing.assert_close(ours.double(), oracle, rtol=2 ** -7, atol=0)


# ----------------------------------------------------------------------------------------------
# Public API, special rows, in-place gradient, reasons
# ----------------------------------------------------------------------------------------------


def test_public_cross_entropy_on_token_logits():
    """(B, T, C) logits through fusedloss.cross_entropy(backend='triton') against torch's (B, C, T) layout."""
    x64 = _logits(2 * 5, 9, seed=7).reshape(2, 5, 9)
    target = _target(10, 9).reshape(2, 5)
    weight = _weight(9)
    for reduction in ("none", "mean"):
        def torch_ce(x, reduction=reduction):
            return F.cross_entropy(x.movedim(-1, 1), target, weight.to(x.dtype), reduction=reduction,
                                   label_smoothing=0.1)

        def ours(x, reduction=reduction):
            return fusedloss.cross_entropy(x, target, weight.to(x.dtype), reduction=reduction, label_smoothing=0.1,
                                           backend="triton")

        oracle = _value_and_grad(torch_ce, x64)
        pytorch = _value_and_grad(torch_ce, x64.float())
        mine = _value_and_grad(ours, x64.float())
        assert mine[0].shape == (2, 5) if reduction == "none" else mine[0].shape == ()
        _assert_close_derived(mine[0], oracle[0], pytorch[0], torch.float32, x64.numel(), "loss")
        _assert_close_derived(mine[1], oracle[1], pytorch[1], torch.float32, x64.numel(), "gradient")


def test_public_focal_loss_matches_kornia():
    """fusedloss.focal_loss(backend='triton') against kornia, whose alpha weights class 0 by 1 - α, the others by α.

    kornia's ``none`` gives one value per (row, class) (zero off the target); its row sums over the number of
    non-ignored rows are our ``mean`` (kornia's own mean also divides by C).
    """
    x64 = _logits(12, 6, seed=8)
    target = _target(12, 6, ignore_every=4)
    kept = target != -100
    alpha = torch.tensor([0.75] + [0.25] * 5)

    def kornia_focal(x):
        per_class = kornia.losses.focal_loss(x[kept], target[kept], alpha=0.25, gamma=2.0, reduction="none")
        return per_class.sum() / kept.sum()

    oracle = _value_and_grad(kornia_focal, x64)
    pytorch = _value_and_grad(kornia_focal, x64.float())
    mine = _value_and_grad(lambda x: fusedloss.focal_loss(x, target, gamma=2.0, alpha=alpha, backend="triton"),
                           x64.float())
    _assert_close_derived(mine[0], oracle[0], pytorch[0], torch.float32, x64.numel(), "loss")
    _assert_close_derived(mine[1], oracle[1], pytorch[1], torch.float32, x64.numel(), "gradient")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_targets_ignored(reduction):
    """As torch: 0 per row, sum 0, mean NaN (0/0), and a zero gradient."""
    x = _logits(4, 5).float()
    target = torch.full((4,), -100)
    expected = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    loss, grad = _value_and_grad(
        lambda z: softmax_loss(z, target, None, -100, reduction, 0.1, 2.0, 1e-3, None, False, False), x)
    torch.testing.assert_close(loss, expected.double(), equal_nan=True)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_grad_output_per_row():
    """reduction='none' with a non-uniform grad_output: row n's gradient is scaled by grad_output[n] only."""
    x = _logits(6, 11).float().requires_grad_()
    target = _target(6, 11)
    grad_output = torch.tensor([0.0, 1.0, -2.0, 3.5, 1.0, 0.25])
    loss = softmax_loss(x, target, None, -100, "none", 0.0, 0.0, 0.0, None, False, False)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    x_ref = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(x_ref, target, reduction="none"), x_ref, grad_output.double())
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)
    # An expanded (stride 0) grad_output, as loss.sum().backward() passes.
    loss = softmax_loss(x, target, None, -100, "none", 0.0, 0.0, 0.0, None, False, False)
    (grad_sum,) = torch.autograd.grad(loss.sum() * 3.0, x)
    (expected_sum,) = torch.autograd.grad(3.0 * F.cross_entropy(x_ref, target, reduction="none").sum(), x_ref)
    torch.testing.assert_close(grad_sum.double(), expected_sum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inplace_backward_writes_gradient_into_input(reduction):
    x64 = _logits(2 * 4, 13, seed=9)
    target = _target(8, 13)
    x_ref = x64.clone().requires_grad_()
    loss_ref = F.cross_entropy(x_ref, target, reduction=reduction, label_smoothing=0.1)
    grad_output = torch.linspace(0.5, 2.0, loss_ref.numel(), dtype=torch.float64).reshape(loss_ref.shape)
    (expected,) = torch.autograd.grad(loss_ref, x_ref, grad_output)

    leaf = x64.float().reshape(2, 4, 13).requires_grad_()
    storage = leaf.detach()  # shares the storage the kernel overwrites
    loss = fusedloss.cross_entropy(leaf, target.reshape(2, 4), reduction=reduction, label_smoothing=0.1,
                                   inplace_backward=True, backend="triton")
    torch.testing.assert_close(loss.reshape(loss_ref.shape).double(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
    loss.backward(grad_output.float().reshape(loss.shape))
    torch.testing.assert_close(leaf.grad.reshape(8, 13).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(storage.reshape(8, 13).double(), expected, rtol=1e-5, atol=1e-6)


def test_nan_row_stays_in_its_row(layout):
    """NaN in a row makes that row's loss and gradient NaN; every other row's loss and gradient is bit for bit what
    the same call gives without the NaN (rows share a program in the tile layout, so this is the check that one
    row's NaN does not leak into another's), and matches the float64 reference."""
    x64 = _logits(5, 9, seed=10)
    target = _target(5, 9, ignore_every=0)
    clean = x64.float()
    x = clean.clone()
    x[2, 4] = float("nan")
    keep = torch.tensor([0, 1, 3, 4])
    for reduction in ("none", "mean"):
        def loss_fn(z, reduction=reduction):
            return softmax_loss(z, target, None, -100, reduction, 0.1, 2.0, 1e-3, 8.0, False, False)

        loss, grad = _value_and_grad(loss_fn, x)
        clean_loss, clean_grad = _value_and_grad(loss_fn, clean)
        assert grad[2].isnan().all(), reduction
        torch.testing.assert_close(grad[keep], clean_grad[keep], rtol=0, atol=0, msg=lambda m, r=reduction: f"{r}: {m}")
        if reduction == "none":
            assert loss[2].isnan()
            torch.testing.assert_close(loss[keep], clean_loss[keep], rtol=0, atol=0)
        else:
            assert loss.isnan()
    oracle = _value_and_grad(
        lambda z: reference_softmax_loss(z, target[keep], None, -100, "none", 0.1, 2.0, 1e-3, 8.0, False, False),
        x64[keep])
    loss, _ = _value_and_grad(
        lambda z: softmax_loss(z, target, None, -100, "none", 0.1, 2.0, 1e-3, 8.0, False, False), x)
    torch.testing.assert_close(loss[keep], oracle[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scales", [(3.0, 3.0), (1.0, 3.0), (1.0, 1.0, 1.0)], ids=str)
def test_backwards_through_one_graph_match_torch_or_raise(scales):
    """Successive backwards through one graph with these grad_output scales: after each, torch's accumulated
    gradient, or a RuntimeError (a saved tensor modified in place); never another number."""
    assert_cross_entropy_backwards_match("triton", scales)


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_non_contiguous_classes(inplace_backward):
    """A transposed input (class stride N) is copied to rows; inplace_backward falls back to a gradient buffer."""
    x64 = _logits(6, 5, seed=12).t()  # (5, 6) with strides (1, 5)
    target = _target(5, 6)
    x = x64.float().requires_grad_()
    loss = softmax_loss(x, target, None, -100, "sum", 0.1, 0.0, 0.0, None, False, inplace_backward)
    loss.backward()
    x_ref = x64.detach().clone().requires_grad_()
    expected = F.cross_entropy(x_ref, target, reduction="sum", label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.detach().double(), x64)  # the input was not overwritten


def test_row_offsets_beyond_int32():
    """Row n starts at n * stride > 2^31 elements: the kernels must index with int64 (virtual memory only)."""
    num_classes, stride = 9, 2 ** 30 + 11
    try:
        storage = torch.empty(2 * stride + num_classes, dtype=torch.float16)
    except RuntimeError as exc:  # no address space for 4 GiB of untouched pages
        pytest.skip(f"cannot reserve the address space: {exc}")
    x = storage.as_strided((3, num_classes), (stride, 1))
    x.copy_(_logits(3, num_classes, seed=11).half())
    target = torch.tensor([1, 8, 0])
    x_leaf = x.detach().requires_grad_()
    loss = softmax_loss(x_leaf, target, None, -100, "sum", 0.0, 0.0, 0.0, None, False, False)
    (grad,) = torch.autograd.grad(loss, x_leaf)
    x_ref = x.detach().double().requires_grad_()
    expected = F.cross_entropy(x_ref, target, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, x_ref)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-3, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=2e-3)
    inplace_loss = softmax_loss(x_leaf, target, None, -100, "sum", 0.0, 0.0, 0.0, None, False, True)
    inplace_loss.backward()
    torch.testing.assert_close(x.double(), expected_grad, rtol=0, atol=2e-3)


def test_reasons_in_words():
    x = torch.zeros(2, 3, dtype=torch.float64)
    target = torch.tensor([0, 1])
    args = (None, -100, "mean", 0.0, 0.0, 0.0, None, False, False)
    assert softmax_loss_reasons(x.float(), target, *args) == []
    (reason,) = softmax_loss_reasons(x, target, *args)
    assert "float64" in reason
    soft = torch.full((2, 3), 1 / 3).requires_grad_()
    assert "soft targets" in softmax_loss_reasons(x.float(), soft, *args)[0]
    with pytest.raises(fusedloss.BackendUnavailable, match="float64"):
        fusedloss.cross_entropy(x, target, backend="triton")
    assert _dispatch.why_not("softmax_loss", "triton", x.device, x.float(), target, *args) == []


def test_no_gradient_buffer_without_autograd():
    """Without a gradient wanted the op returns empty statistics (the kernel only computes the loss)."""
    x = _logits(3, 5).float()
    target = _target(3, 5, ignore_every=0)
    loss, stats = torch.ops.fusedloss.triton_softmax_loss_stats(x, target, None, -100, "sum", 0.0, 0.0, 0.0, None,
                                                                False, False)
    assert stats.numel() == 0
    assert math.isclose(loss.item(), F.cross_entropy(x, target, reduction="sum").item(), rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients for every grad_output, and what each pass reads and writes
# ----------------------------------------------------------------------------------------------

GRAD_OUTPUTS = ["1", "3.5", "per-row"]


def _grad_output_for(kind, loss):
    """1 or 3.5 (a scalar loss), or fixed random per-row values (reduction='none')."""
    if kind == "per-row":
        generator = torch.Generator().manual_seed(13)
        return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) * 4 - 1).to(loss.dtype)
    return torch.tensor(float(kind), dtype=loss.dtype)


@pytest.mark.parametrize("grad_output", GRAD_OUTPUTS)
def test_gradient_for_each_grad_output_matches_torch(layout, grad_output):
    """∂(grad_output · loss)/∂x against F.cross_entropy in float64, for every option torch has, with grad_output
    1, 3.5 and per row (reduction='none'); no scaling pass exists to get any of them wrong."""
    num_classes = 9 if layout == "tile" else 40
    n = 7
    x64 = _logits(n, num_classes, seed=21)
    reductions = ("none",) if grad_output == "per-row" else ("sum", "mean")
    for (use_weight, smoothing, kind), reduction in itertools.product(TORCH_OPTIONS, reductions):
        target = _target(n, num_classes, soft=kind == "soft")
        weight = _weight(num_classes) if use_weight else None

        def grad_of(fn, x, target=target, weight=weight, kind=kind, smoothing=smoothing, reduction=reduction):
            x = x.detach().clone().requires_grad_()
            w = None if weight is None else weight.to(x.dtype)
            t = target.to(x.dtype) if kind == "soft" else target
            loss = fn(x, t, w, reduction, smoothing)
            (grad,) = torch.autograd.grad(loss, x, _grad_output_for(grad_output, loss))
            return grad.double()

        def torch_ce(x, t, w, reduction, smoothing):
            return F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)

        def ours(x, t, w, reduction, smoothing):
            return softmax_loss(x, t, w, -100, reduction, smoothing, 0.0, 0.0, None, False, False)

        what = f"gradient (weight={use_weight} smoothing={smoothing} {kind} {reduction} grad_output={grad_output})"
        _assert_close_derived(grad_of(ours, x64.float()), grad_of(torch_ce, x64), grad_of(torch_ce, x64.float()),
                              torch.float32, x64.numel(), what)


@pytest.mark.parametrize("grad_output", GRAD_OUTPUTS)
@pytest.mark.parametrize("options", REFERENCE_OPTIONS[2:5], ids=["focal-smooth-z", "focal-soft-cap", "z-cap"])
def test_gradient_for_each_grad_output_matches_reference(layout, options, grad_output):
    """The options torch lacks (focal factor, z-loss, softcap) with grad_output 1, 3.5 and per row."""
    use_weight, smoothing, soft, gamma, z_loss, softcap, by_count = options
    num_classes = 9 if layout == "tile" else 40
    x64 = _logits(7, num_classes, seed=22)
    target = _target(7, num_classes, soft=soft)
    weight = _weight(num_classes) if use_weight else None
    reduction = "none" if grad_output == "per-row" else "mean"

    def grad_of(fn, x):
        x = x.detach().clone().requires_grad_()
        t = target.to(x.dtype) if soft else target
        w = None if weight is None else weight.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        loss = fn(x, t, w, -100, reduction, smoothing, gamma, z_loss, softcap, by_count, False)
        (grad,) = torch.autograd.grad(loss, x, _grad_output_for(grad_output, loss))
        return grad.double()

    _assert_close_derived(grad_of(softmax_loss, x64.float()), grad_of(reference_softmax_loss, x64),
                          grad_of(reference_softmax_loss, x64.float()), torch.float32, x64.numel(), "gradient")


class _Traffic:
    """Counts, under the interpreter, every kernel launch and the elements each launch loads and stores (masked-off
    lanes excluded), so a test can say which tensor's bytes a pass moved and how often."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.launches = []
        builder = interpreter.interpreter_builder
        original_call = interpreter.GridExecutor.__call__
        original_load, original_store = builder.create_masked_load, builder.create_masked_store
        traffic = self

        def call(executor, *args, **kwargs):
            traffic.launches.append(dict(kernel=executor.fn.__name__, loads=[], stores=[]))
            return original_call(executor, *args, **kwargs)

        def load(ptrs, mask, *args):
            traffic.launches[-1]["loads"].append(ptrs.data[mask.data].astype("int64").ravel())
            return original_load(ptrs, mask, *args)

        def store(ptrs, value, mask, *args):
            traffic.launches[-1]["stores"].append(ptrs.data[mask.data].astype("int64").ravel())
            return original_store(ptrs, value, mask, *args)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
        monkeypatch.setattr(builder, "create_masked_load", load)
        monkeypatch.setattr(builder, "create_masked_store", store)

    def take(self):
        launches, self.launches = self.launches, []
        return launches

    @staticmethod
    def addresses(launch, kind, tensor):
        """Sorted element addresses of ``tensor``'s storage range that ``launch`` loaded or stored."""
        import numpy as np

        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        hits = [a[(a >= start) & (a < end)] for a in launch[kind]]
        return np.sort(np.concatenate(hits)) if hits else np.zeros(0, dtype="int64")

    @staticmethod
    def element_addresses(tensor, rows):
        """Sorted addresses of every element of ``tensor``'s given rows."""
        import numpy as np

        cols = torch.arange(tensor.shape[1]) * tensor.stride(1)
        offsets = rows[:, None] * tensor.stride(0) + cols[None, :]
        return np.sort((tensor.data_ptr() + offsets.flatten() * tensor.element_size()).numpy().astype("int64"))


# (name, layout overrides, options): a tile of rows in registers; vocabulary rows swept in 3 blocks; the one forward
# that reads twice (γ > 0 with smoothing on a row wider than a block).
TRAFFIC_CASES = {
    "tile": ({}, dict(label_smoothing=0.1, focal_gamma=2.0, z_loss=1e-3, softcap=5.0), 1),
    "vocabulary": ({"_MAX_BLOCK_C": 16, "_TILE_ELEMENTS": 16}, dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0), 1),
    "vocabulary-focal-smoothing": ({"_MAX_BLOCK_C": 16, "_TILE_ELEMENTS": 16},
                                   dict(label_smoothing=0.1, focal_gamma=2.0), 2),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
@pytest.mark.parametrize("grad_output", GRAD_OUTPUTS)
@pytest.mark.parametrize("case", list(TRAFFIC_CASES))
def test_each_pass_moves_the_logits_once(monkeypatch, case, grad_output, inplace):
    """Forward with a gradient wanted: one launch that reads every kept logit once (twice in the focal + spread
    case on vocabulary rows; plus the target logit) and writes no (N, C) tensor. Backward, for grad_output 1, 3.5
    and per row: exactly one launch, which reads every kept logit once and writes every gradient element once
    (over the logits with inplace_backward). A scaling pass over the gradient would show up as a second launch."""
    overrides, options, forward_reads = TRAFFIC_CASES[case]
    for name, value in overrides.items():
        monkeypatch.setattr(triton_softmax, name, value)
    n, c = 6, 40
    target = _target(n, c)  # rows 1 and 4 ignored
    kept_rows = torch.nonzero(target != -100).flatten()
    x = _logits(n, c, seed=23).float().requires_grad_()
    reduction = "none" if grad_output == "per-row" else "mean"
    args = dict(ignore_index=-100, reduction=reduction, label_smoothing=0.0, focal_gamma=0.0, z_loss=0.0,
                softcap=None, mean_by_count=False, inplace_backward=inplace)
    args.update(options)
    x_ref = x.detach().double().requires_grad_()
    loss_ref = reference_softmax_loss(x_ref, target, None, **args)
    (expected_grad,) = torch.autograd.grad(loss_ref, x_ref, _grad_output_for(grad_output, loss_ref))

    traffic = _Traffic(monkeypatch)
    leaf = x.detach().clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf the in-place backward may overwrite
    loss = softmax_loss(logits, target, None, **args)
    (forward,) = traffic.take()
    assert forward["kernel"] == "_softmax_loss_fwd_kernel"
    reads = _Traffic.addresses(forward, "loads", logits)
    assert len(reads) == forward_reads * len(kept_rows) * c + len(kept_rows), case
    assert set(reads) == set(_Traffic.element_addresses(logits, kept_rows))
    assert len(_Traffic.addresses(forward, "stores", logits)) == 0
    stored = sum(len(a) for a in forward["stores"])
    assert stored <= n * (triton_softmax.NUM_STATS + 1), f"the forward stored {stored} elements"

    (grad,) = torch.autograd.grad(loss, logits, _grad_output_for(grad_output, loss))
    (backward,) = traffic.take()
    assert backward["kernel"] == "_softmax_loss_bwd_kernel"
    reads = _Traffic.addresses(backward, "loads", logits)
    assert list(reads) == list(_Traffic.element_addresses(logits, kept_rows))  # each kept logit once
    writes = _Traffic.addresses(backward, "stores", grad)
    assert list(writes) == list(_Traffic.element_addresses(grad, torch.arange(n)))  # each element once
    assert len(_Traffic.addresses(backward, "loads", grad)) == (len(reads) if inplace else 0)
    assert (grad.data_ptr() == logits.data_ptr()) == inplace
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


class _LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every new tensor (not a view or in-place result of an argument) of at least ``min_numel`` elements."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel = min_numel
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.min_numel
                    and t.untyped_storage().data_ptr() not in storages):
                self.found.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("how", ["no_grad", "requires_grad=False", "requires_grad"])
def test_forward_launches_one_kernel_and_allocates_no_gradient(monkeypatch, how):
    """A forward reads the logits once in one launch and makes no (N, C) buffer: without a gradient nothing else
    is written than the row losses; with one, the row statistics (the gradient is written by backward)."""
    monkeypatch.setattr(triton_softmax, "_MAX_BLOCK_C", 16)
    monkeypatch.setattr(triton_softmax, "_TILE_ELEMENTS", 16)
    n, c = 5, 40
    target = _target(n, c)
    kept_rows = torch.nonzero(target != -100).flatten()
    x = _logits(n, c, seed=24).float().requires_grad_(how == "requires_grad")
    traffic = _Traffic(monkeypatch)
    allocations = _LargeAllocations(n * c)
    with torch.set_grad_enabled(how != "no_grad"), allocations:
        loss = softmax_loss(x, target, None, -100, "none", 0.1, 0.0, 1e-3, 4.0, False, False)
    (forward,) = traffic.take()
    assert allocations.found == []
    assert forward["kernel"] == "_softmax_loss_fwd_kernel"
    reads = _Traffic.addresses(forward, "loads", x)
    assert len(reads) == len(kept_rows) * c + len(kept_rows)  # each kept logit once, plus the target logit
    assert set(reads) == set(_Traffic.element_addresses(x, kept_rows))
    stored = sum(len(a) for a in forward["stores"])
    assert stored == (n * (1 + triton_softmax.NUM_STATS) if how == "requires_grad" else n)
    expected = F.cross_entropy(x.detach().double(), target, reduction="none", label_smoothing=0.1)
    assert loss.requires_grad == (how == "requires_grad")
    assert torch.isfinite(loss).all() and loss.shape == expected.shape


@pytest.mark.parametrize("scales", [(1.0, 1.0), (3.5, 1.0), (1.0, 3.5, 2.0)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_retained_graph_backwards_accumulate_like_torch(reduction, scales):
    """Without inplace_backward the logits survive backward, so every further backward through the same graph
    recomputes from them and .grad accumulates exactly as torch's (scalar and per-row grad_output)."""
    x = _logits(6, 11, seed=25).float()
    target = _target(6, 11)
    assert_backwards_match(
        lambda z: softmax_loss(z, target, None, -100, reduction, 0.1, 0.0, 0.0, None, False, False),
        lambda z: F.cross_entropy(z, target, reduction=reduction, label_smoothing=0.1), (x,), scales,
        may_raise=False, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_retained_graph_with_inplace_backward_raises(reduction):
    """With inplace_backward the first backward overwrites the logits: the second must raise (the saved input's
    version moved), never recompute from the gradient."""
    x = _logits(6, 11, seed=26).float()
    target = _target(6, 11)

    def ours(z):
        logits = z * 1.0  # the in-place backward overwrites this non-leaf, not the leaf
        return softmax_loss(logits, target, None, -100, reduction, 0.1, 0.0, 0.0, None, False, True)

    got, error = grads_after_backwards(ours, (x,), (1.0, 3.5))
    assert len(got) == 1 and error is not None and "modified by an inplace operation" in str(error)
    assert_backwards_match(ours, lambda z: F.cross_entropy(z, target, reduction=reduction, label_smoothing=0.1),
                           (x,), (1.0, 3.5), may_raise=True, rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck():
    """Schema, fake implementations and registered autograd of the forward (loss + statistics) and backward ops
    agree with the kernels, for hard and soft targets, scalar and per-row grad_output."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = _logits(5, 7, seed=27).float()
    hard, soft = _target(5, 7), _target(5, 7, soft=True).float()
    weight = _weight(7).float()
    for target, reduction in ((hard, "mean"), (soft, "none")):
        args = (target, weight, -100, reduction, 0.1, 2.0, 1e-3, 5.0, False)
        torch.library.opcheck(triton_softmax._softmax_loss_op, (x.clone().requires_grad_(), *args, True),
                              test_utils=checks)
        torch.library.opcheck(triton_softmax._softmax_loss_op, (x, *args, False), test_utils=checks)
        _, stats = triton_softmax._softmax_loss_op(x, *args, True)
        grad_output = torch.rand(5) if reduction == "none" else torch.tensor(3.5)
        torch.library.opcheck(triton_softmax._softmax_loss_backward_op,
                              (grad_output, x, target, weight, stats, -100, 0.1, 2.0, 1e-3, 5.0), test_utils=checks)
