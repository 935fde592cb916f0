"""The path from a public function to the fusedloss._C kernels, which must cost about what torch's own call costs:
autograd registered in C++, arguments checked once (by the op), no gradient computed without a gradient to compute,
and torch.compile / opcheck through the public functions on the cpp backend.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _backends import requires_backend
from fusedloss import _dispatch

# Every test needs the extension: skipped without it, a failure in CI (tests/_backends.py).
pytestmark = requires_backend("cpp")

PACKAGE_DIR = os.path.dirname(fusedloss.__file__)


def _python_calls(fn):
    """The Python functions called while ``fn`` runs, as ``(file, function)`` pairs."""
    calls = []

    def profiler(frame, event, arg):
        if event == "call":
            calls.append((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _op_layer_calls(calls):
    """The calls into fusedloss or torch's op and custom-op layers (torch.library's Python autograd wrappers
    live there); torch's own entry to the autograd engine (Tensor.backward) is not counted."""
    torch_dir = os.path.dirname(torch.__file__)
    op_layers = tuple(os.path.join(torch_dir, name) for name in ("_library", "library.py", "_ops.py", "_custom_op"))
    return [(file, name) for file, name in calls if file.startswith((PACKAGE_DIR,) + op_layers)]


def _token_batch(num_classes=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, num_classes, generator=gen).requires_grad_()
    target = torch.randint(0, num_classes, (2, 5), generator=gen)
    target[0, 0] = -100
    return logits, target


def test_backward_runs_no_python():
    """The autograd of the C++ ops is C++: loss.backward() enters no Python of fusedloss or of torch's op layers."""
    logits, target = _token_batch()
    loss = fusedloss.cross_entropy(logits, target, label_smoothing=0.1)
    assert "SoftmaxLossFunction" in loss.grad_fn.name()
    assert _op_layer_calls(_python_calls(lambda: loss.backward(torch.tensor(2.0)))) == []

    crf = fusedloss.CRF(4, batch_first=True)
    emissions = torch.randn(3, 6, 4, requires_grad=True)
    llh = crf(emissions, torch.randint(0, 4, (3, 6)), reduction="none")
    assert "CrfLogLikelihoodFunction" in llh.grad_fn.name()
    assert _op_layer_calls(_python_calls(lambda: llh.backward(torch.ones(3)))) == []


def test_forward_runs_no_python_beyond_the_public_function():
    """From cross_entropy to the kernel: the public function, the dispatch cache and the op's call (its unboxed
    entry for plain tensors), nothing of torch.library's Python autograd layer and no Python checks (the op checks
    its arguments)."""
    logits, target = _token_batch()
    fusedloss.cross_entropy(logits, target)  # the first call resolves the backend and loads modules
    calls = _python_calls(lambda: fusedloss.cross_entropy(logits, target))
    ours = {name for file, name in calls if file.startswith(PACKAGE_DIR)}
    assert ours <= {"cross_entropy", "_softmax_loss", "resolve_keyed", "checks_arguments", "unboxed"}, ours
    others = {(os.path.basename(file), name) for file, name in calls
              if not file.startswith(PACKAGE_DIR) and file != __file__}
    # torch.compiler.is_compiling() (which asks is_scripting()) keeps the cache out of traced code.
    assert others <= {("_ops.py", "__call__"), ("__init__.py", "is_compiling"), ("_jit_internal.py", "is_scripting")}, \
        others


def _bytes_allocated(fn):
    """Bytes the CPU allocator handed out while ``fn`` ran (torch.profiler's memory records)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no requires_grad"])
def test_no_gradient_is_computed_without_a_gradient_to_compute(mode):
    """Without a gradient to compute the kernels allocate no (N, C) gradient: the bytes allocated stay far below
    one (N, C) float32 tensor, where a call that computes the gradient allocates at least that much."""
    logits = torch.randn(512, 1024)
    target = torch.randint(0, 1024, (512,))
    gradient_bytes = logits.numel() * logits.element_size()
    with_grad = _bytes_allocated(lambda: fusedloss.cross_entropy(logits.requires_grad_(), target))
    assert with_grad >= gradient_bytes
    logits.requires_grad_(mode != "no requires_grad")
    contexts = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    context = contexts.get(mode, torch.enable_grad)

    losses = []

    def call():
        with context():
            losses.append(fusedloss.cross_entropy(logits, target, label_smoothing=0.1))

    assert _bytes_allocated(call) < gradient_bytes / 8
    torch.testing.assert_close(losses[0], F.cross_entropy(logits.detach(), target, label_smoothing=0.1))


def test_crf_keeps_nothing_for_backward_without_a_gradient():
    crf = fusedloss.CRF(64, batch_first=True)
    emissions = torch.randn(8, 256, 64)
    tags = torch.randint(0, 64, (8, 256))
    alpha_bytes = emissions.numel() * 4
    assert _bytes_allocated(lambda: crf(emissions.requires_grad_(), tags)) >= alpha_bytes
    with torch.no_grad():
        assert _bytes_allocated(lambda: crf(emissions, tags)) < alpha_bytes / 8
    with torch.inference_mode():  # below autograd: the op's CPU kernel
        assert _bytes_allocated(lambda: crf(emissions, tags)) < alpha_bytes / 8
        torch.testing.assert_close(crf(emissions, tags), crf(emissions.detach(), tags))


def test_crf_token_mean_dtype_is_pytorch_crfs():
    """pytorch-crf divides by mask.float().sum(): half emissions give a float32 token_mean, with or without mask."""
    crf = fusedloss.CRF(3, batch_first=True).half()
    emissions = torch.randn(2, 4, 3).half()
    tags = torch.randint(0, 3, (2, 4))
    for mask in (None, torch.ones(2, 4, dtype=torch.bool)):
        assert crf(emissions, tags, mask, reduction="token_mean").dtype == torch.float32


def test_bad_input_is_checked_by_the_op_with_the_python_messages():
    """The op's checks (C++) and the Python checks of the other backends raise the same error."""
    logits, target = _token_batch()
    cases = [
        dict(target=target.int()),
        dict(target=target[:, :3]),
        dict(weight=torch.ones(4)),
        dict(label_smoothing=1.5),
        dict(softcap=-1.0),
        dict(reduction="avg"),
        dict(target=torch.full((2, 5), 9)),
    ]
    for override in cases:
        kwargs = {"input": logits, "target": target, **override}
        errors = []
        for backend in ("cpp", "reference"):
            with pytest.raises((ValueError, TypeError)) as info:
                fusedloss.cross_entropy(**kwargs, backend=backend)
            errors.append(info.value)
        cpp_error, reference_error = errors
        assert type(cpp_error) is type(reference_error), override
        # same argument named first (messages of the range check differ in the example they give)
        assert str(cpp_error).split(" ")[0] == str(reference_error).split(" ")[0], (cpp_error, reference_error)


def test_public_functions_compile_without_graph_breaks_on_cpp():
    """torch.compile(fullgraph=True) of cross_entropy, focal_loss and the CRF on the cpp backend: no graph break,
    eager's values and gradients (aot_eager traces the C++ autograd through the fake kernels)."""
    crf = fusedloss.CRF(5, batch_first=True, backend="cpp")

    def losses(logits, target, emissions, tags, mask):
        return (fusedloss.cross_entropy(logits, target, label_smoothing=0.1, backend="cpp"),
                fusedloss.focal_loss(logits, target, gamma=2.0, alpha=0.5, backend="cpp"),
                crf(emissions, tags, mask, reduction="mean"))

    logits, target = _token_batch(5)
    emissions = torch.randn(2, 5, 5, requires_grad=True)
    tags = torch.randint(0, 5, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(losses)(logits, target, emissions, tags, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (losses, compiled):
        logits.grad = emissions.grad = None
        values = fn(logits, target, emissions, tags, mask)
        sum(v * (i + 1) for i, v in enumerate(values)).backward()
        results.append((*[v.detach() for v in values], logits.grad.clone(), emissions.grad.clone()))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_dispatch_is_resolved_once_per_call_signature(monkeypatch):
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    logits, target = _token_batch()
    fusedloss.cross_entropy(logits, target)
    resolved = dict(_dispatch._RESOLVED)
    # One decision, and cross_entropy's shortcut to the unboxed op it chose (kept beside it, forgotten with it).
    decisions = [hit for key, hit in resolved.items() if key[0] == "softmax_loss"]
    assert len(decisions) == 1 and decisions[0][0] == "cpp"
    assert [hit for key, hit in resolved.items() if key[0] != "softmax_loss"] == [fusedloss._C.softmax_loss]
    fusedloss.cross_entropy(logits * 2, target.flip(0))
    assert _dispatch._RESOLVED == resolved


class _Record(torch.overrides.TorchFunctionMode):
    """A torch function mode that appends every function it sees to ``seen``."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_viterbi_unboxed_entry_is_the_op():
    """A decode with plain tensors and the module's parameters goes through the op's unboxed entry (mask None: every
    position on); it gives what torch.ops gives, and a torch function mode still sees the op."""
    crf = fusedloss.CRF(5, batch_first=True)
    emissions = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(7)[None] < torch.tensor([7, 4, 1])[:, None]
    scores = (crf.transitions, crf.start_transitions, crf.end_transitions)
    for m in (mask, None):
        expected = torch.ops.fusedloss.crf_viterbi.default(emissions, torch.ones(3, 7, dtype=torch.bool) if m is None
                                                           else m, *scores)
        for _ in range(2):  # the second call takes the remembered shortcut
            tags, score = fusedloss.crf_viterbi(emissions, *scores, mask=m)
            assert torch.equal(tags, expected[0]) and torch.equal(score, expected[1])
    assert fusedloss._C.crf_viterbi in _dispatch._RESOLVED.values()
    seen = []
    with _Record(seen):
        tags, _ = fusedloss.crf_viterbi(emissions, *scores, mask=mask)
    assert torch.ops.fusedloss.crf_viterbi.default in seen
    assert crf.decode(emissions, mask) == [row[:n] for row, n in zip(tags.tolist(), (7, 4, 1))]


def test_torch_function_modes_and_subclasses_see_the_op():
    """Plain tensors take the op's unboxed entry (no boxing of the arguments by torch.ops); a torch function mode
    and a tensor subclass still see the op called through torch.ops, with the same result."""
    logits, target = _token_batch()
    expected = fusedloss.cross_entropy(logits, target)
    seen = []
    with _Record(seen):
        loss = fusedloss.cross_entropy(logits, target)
    assert torch.ops.fusedloss.softmax_loss.default in seen
    assert torch.equal(loss, expected)

    class Logits(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    sub = logits.detach().as_subclass(Logits).requires_grad_()
    loss = fusedloss.cross_entropy(sub, target)
    assert torch.ops.fusedloss.softmax_loss.default in Logits.calls
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), expected.detach())
    loss.backward()
    assert sub.grad is not None
