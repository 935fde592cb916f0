"""Backend dispatch: availability with reasons, explicit backends, the environment override, auto."""

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

import fusedloss
from _backends import expect_backend
from fusedloss import _dispatch
from fusedloss.reference.softmax import softmax_loss as reference_softmax_loss

CPU = torch.device("cpu")


def _softmax_args(num_rows=4, num_classes=5):
    """The 11 positional arguments of the softmax_loss op (docs/BACKENDS.md)."""
    logits = torch.randn(num_rows, num_classes)
    target = torch.randint(0, num_classes, (num_rows,))
    return (logits, target, None, -100, "mean", 0.0, 0.0, 0.0, None, False, False)


def test_available_backends_names_and_reasons():
    available = fusedloss.available_backends()
    assert set(available) == {"reference", "triton", "cpp", "cuda"}
    assert available["reference"] is None
    for name, reason in available.items():
        assert reason is None or (isinstance(reason, str) and reason), name
    if not torch.cuda.is_available():
        assert available["cuda"] is not None  # CUDA cannot run here, whether or not _C was built with it
    extension_present = importlib.util.find_spec("fusedloss._C") is not None
    if not extension_present:
        assert "not built" in available["cpp"]


def test_backend_unavailable_is_a_runtime_error_listing_reasons():
    assert issubclass(fusedloss.BackendUnavailable, RuntimeError)
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(fusedloss.BackendUnavailable) as info:
        fusedloss.cross_entropy(logits, target, backend="cuda")
    message = str(info.value)
    assert "softmax_loss" in message and "cuda:" in message
    assert ("CUDA" in message) or ("not built" in message)  # the reason, in words


def test_op_without_a_kernel_in_the_named_backend(monkeypatch):
    x, y = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    op = "multilabel_categorical_crossentropy"
    monkeypatch.setitem(_dispatch._OP_TABLE, op, {"reference": _dispatch._OP_TABLE[op]["reference"]})
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})  # forget decisions made with the real table
    with pytest.raises(fusedloss.BackendUnavailable, match="cpp: has no kernel"):
        fusedloss.multilabel_categorical_crossentropy(x, y, backend="cpp")
    name, _ = _dispatch.resolve(op, "auto", CPU, x, y, "mean")
    assert name == "reference"  # an op with only the reference: auto falls back to it


def test_unknown_backend_name_is_a_value_error():
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="backend"):
        fusedloss.cross_entropy(logits, target, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        fusedloss.sigmoid_focal_loss(logits, torch.rand(3, 4), backend="gpu")
    with pytest.raises(TypeError, match="backend"):
        _dispatch.resolve("softmax_loss", None, CPU, *_softmax_args())


def test_auto_on_cpu_picks_cpp_when_built_else_reference(monkeypatch):
    """A float32 CPU call with default options, which the cpp kernel serves: cpp when the extension is built,
    else the reference (written out, not asked of the dispatcher)."""
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    args = _softmax_args()
    name, impl = _dispatch.resolve("softmax_loss", "auto", CPU, *args)
    assert name == ("cpp" if expect_backend("cpp") else "reference")
    # whatever auto picked computes the oracle's number
    torch.testing.assert_close(impl(*args), reference_softmax_loss(*args), rtol=1e-5, atol=1e-6)


@pytest.fixture
def fake_backends(monkeypatch):
    """Every backend usable, each with a softmax_loss that returns its own name and declines the calls whose
    last argument (an extra: the comma-separated names that decline, a string so that the decision cache keys
    on it) names it."""
    monkeypatch.setattr(_dispatch, "_IMPLS", {})
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton can serve CPU tensors too: auto must still skip it there
    table = {}
    for name in _dispatch.BACKEND_NAMES:
        monkeypatch.setitem(_dispatch._BACKEND_REASONS, name, None)
        module = types.SimpleNamespace(
            softmax_loss=lambda *args, name=name: name,
            softmax_loss_reasons=lambda *args, name=name: ["declines"] if name in args[-1].split(",") else [])
        table[name] = lambda module=module: module
    monkeypatch.setitem(_dispatch._OP_TABLE, "softmax_loss", table)

    def auto(device, declined=()):
        return _dispatch.resolve("softmax_loss", "auto", torch.device(device), *_softmax_args(), ",".join(declined))[0]

    return auto


def test_auto_order_on_cuda_tensors_is_triton_cuda_reference(fake_backends):
    assert fake_backends("cuda") == "triton"
    assert fake_backends("cuda", {"triton"}) == "cuda"
    assert fake_backends("cuda", {"triton", "cuda"}) == "reference"
    assert fake_backends("cuda", {"cuda"}) == "triton"


def test_auto_order_on_cpu_tensors_is_cpp_reference(fake_backends):
    assert fake_backends("cpu") == "cpp"
    assert fake_backends("cpu", {"cpp"}) == "reference"  # not triton, although it would take the call
    with pytest.raises(fusedloss.BackendUnavailable, match="(?s)cpp: declines.*reference: declines"):
        fake_backends("cpu", {"cpp", "reference"})


def test_environment_variable_overrides_the_auto_order(fake_backends, monkeypatch):
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", "triton")
    assert fake_backends("cpu") == "triton"
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", "reference")
    assert fake_backends("cuda") == "reference"
    with pytest.raises(fusedloss.BackendUnavailable, match="reference: declines"):
        fake_backends("cuda", {"reference"})  # the named backend only, no fallback


def _set_env_backend(monkeypatch, value):
    """FUSEDLOSS_BACKEND as read at import (it is read once), with the cached decisions forgotten."""
    monkeypatch.setattr(_dispatch, "_ENV_BACKEND", value or "auto")
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})


def test_environment_variable_overrides_auto(monkeypatch):
    args = _softmax_args()
    _set_env_backend(monkeypatch, "reference")
    assert _dispatch.resolve("softmax_loss", "auto", CPU, *args)[0] == "reference"
    # an explicit backend argument is not overridden
    assert _dispatch.resolve("softmax_loss", "reference", CPU, *args)[0] == "reference"
    _set_env_backend(monkeypatch, "cuda")
    with pytest.raises(fusedloss.BackendUnavailable, match="cuda"):
        fusedloss.cross_entropy(args[0], args[1])
    _set_env_backend(monkeypatch, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        fusedloss.cross_entropy(args[0], args[1])
    _set_env_backend(monkeypatch, "")  # empty means auto
    assert _dispatch.resolve("softmax_loss", "auto", CPU, *args)[0] == ("cpp" if expect_backend("cpp") else "reference")


def test_environment_variable_is_read_at_import():
    """A process started with FUSEDLOSS_BACKEND=reference runs auto calls on the reference backend."""
    code = (
        "import torch, fusedloss\n"
        "from fusedloss import _dispatch\n"
        "args = (torch.randn(3, 4), torch.tensor([0, 1, 2]), None, -100, 'mean', 0.0, 0.0, 0.0, None, False, False)\n"
        "print(_dispatch.resolve('softmax_loss', 'auto', torch.device('cpu'), *args)[0])\n"
    )
    env = {**os.environ, "FUSEDLOSS_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_decisions_are_cached_per_call_signature(monkeypatch):
    """The second call with the same kinds of arguments does not ask the backends again; another dtype does."""
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    asked = []
    original = _dispatch._reasons

    def counting(op, name, *rest):
        asked.append(name)
        return original(op, name, *rest)

    monkeypatch.setattr(_dispatch, "_reasons", counting)
    args = _softmax_args()
    first = _dispatch.resolve("softmax_loss", "auto", CPU, *args)
    count = len(asked)
    assert count >= 1
    other_values = (torch.randn(7, 5), torch.tensor([2, 0, 1, 1, 0, 4, 3])) + args[2:]  # same kinds, other values
    assert _dispatch.resolve("softmax_loss", "auto", CPU, *other_values) == first
    assert len(asked) == count
    _dispatch.resolve("softmax_loss", "auto", CPU, args[0].double(), *args[1:])
    assert len(asked) > count


def test_per_call_reasons_decline_a_backend(monkeypatch):
    """A backend module's ``<op>_reasons`` declines one call; a named backend then says why."""

    def refuse_float64(*args):
        return ["does not take float64 here"] if args[0].dtype == torch.float64 else []

    module = types.SimpleNamespace(softmax_loss=reference_softmax_loss, softmax_loss_reasons=refuse_float64)
    monkeypatch.setattr(_dispatch, "_IMPLS", {})  # forget loaded modules, restored after the test
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setitem(_dispatch._OP_TABLE["softmax_loss"], "reference", lambda: module)
    args64 = (torch.randn(2, 3, dtype=torch.float64),) + _softmax_args(2, 3)[1:]
    assert _dispatch.why_not("softmax_loss", "reference", CPU, *args64) == ["does not take float64 here"]
    assert _dispatch.why_not("softmax_loss", "reference", CPU, *_softmax_args(2, 3)) == []
    with pytest.raises(fusedloss.BackendUnavailable, match="reference: does not take float64 here"):
        _dispatch.resolve("softmax_loss", "reference", CPU, *args64)


def test_auto_compiles_without_graph_breaks_past_a_declining_backend(monkeypatch):
    """``auto`` walks past a backend that declines a call with words made from the call's tensors
    inside torch.compile(fullgraph=True): the search must not build its error text while tracing."""

    def declines(input, *args):
        return [f"pretends not to take {input.dtype} inputs of shape {tuple(input.shape)}"]

    module = types.SimpleNamespace(softmax_loss=reference_softmax_loss, softmax_loss_reasons=declines)
    monkeypatch.setattr(_dispatch, "_IMPLS", {})
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setitem(_dispatch._BACKEND_REASONS, "cpp", None)
    monkeypatch.setitem(_dispatch._OP_TABLE["softmax_loss"], "cpp", lambda: module)
    torch._dynamo.reset()

    def loss(x, y):
        return fusedloss.cross_entropy(x, y)

    x = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 4, 2, 1])
    explanation = torch._dynamo.explain(loss)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="eager")(x, y),
                               torch.nn.functional.cross_entropy(x, y))
