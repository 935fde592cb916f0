"""Backend dispatch: which backend serves a call (the rules are in docs/backends.rst).

Every fused op has one implementation per backend: a function named like the op in the module
that ``_OP_TABLE`` loads for that backend. The module may define ``<op>_reasons`` with the same
signature as the op; it returns the reasons (words) why that backend cannot serve this call, an
empty list when it can. On top of that the dispatcher checks what holds for the backend as a
whole: whether it imports, whether it runs on the tensor's device.

``auto`` takes the first backend that can serve the call, in the order
CUDA tensor: triton, cuda, reference; CPU tensor: cpp, reference.
``FUSEDLOSS_BACKEND`` overrides ``auto``; it is read once, when fusedloss is imported. Naming a backend
that cannot serve the call raises :class:`BackendUnavailable` listing every reason.

Decisions are cached per call signature (:func:`resolve`): the op, the requested backend, the device,
whether grad mode is on, and per argument its kind (for a tensor: dtype, device, requires_grad,
number of dimensions and, for a floating tensor, the size of its last dimension; strings, bools and None
by value; numbers by type). A backend's ``<op>_reasons`` may depend on nothing else.

A backend module that sets ``CHECKS_ARGUMENTS = True`` (the ``fusedloss._C`` ops) checks every argument
itself and takes them unflattened; the public functions then skip their Python checks.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fusedloss._floor import TRITON_FLOOR, major_minor

BACKEND_NAMES = ("reference", "triton", "cpp", "cuda")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}

# Module loaders. Plain import statements, not importlib: torch.compile (Dynamo) traces an import
# statement when the first call of an op happens inside a compiled region, but not importlib.
def _reference_softmax():
    from fusedloss.reference import softmax

    return softmax


def _reference_sigmoid():
    from fusedloss.reference import sigmoid

    return sigmoid


def _reference_crf():
    from fusedloss.reference import crf

    return crf


def _triton_softmax():
    from fusedloss.triton_kernels import softmax_loss

    return softmax_loss


def _triton_crf():
    from fusedloss.triton_kernels import crf

    return crf


def _triton_sigmoid():
    from fusedloss.triton_kernels import sigmoid_loss

    return sigmoid_loss


def _reference_linear():
    from fusedloss.reference import linear

    return linear


def _triton_linear():
    from fusedloss.triton_kernels import linear_cross_entropy

    return linear_cross_entropy


def _ext_linear():
    from fusedloss._ext import linear

    return linear


def _reference_distillation():
    from fusedloss.reference import distillation

    return distillation


def _triton_distillation():
    from fusedloss.triton_kernels import distillation

    return distillation


def _ext_distillation():
    from fusedloss._ext import distillation

    return distillation


def _ext_softmax():
    from fusedloss._ext import softmax_loss

    return softmax_loss


def _ext_crf():
    from fusedloss._ext import crf

    return crf


def _ext_sigmoid():
    from fusedloss._ext import sigmoid

    return sigmoid


def _family(reference, triton=None, ext=None) -> Dict[str, Callable]:
    table = {"reference": reference}
    if triton is not None:
        table["triton"] = triton
    if ext is not None:
        table["cpp"] = table["cuda"] = ext
    return table


# op name -> backend name -> loader of the module that defines a function named like the op.
# The cpp and cuda backends share one module per family: the ops of the fusedloss._C extension
# have a CPU and a CUDA kernel and the torch dispatcher picks one by the tensors' device.
_OP_TABLE: Dict[str, Dict[str, Callable]] = {
    "softmax_loss": _family(_reference_softmax, _triton_softmax, _ext_softmax),
    "linear_cross_entropy": _family(_reference_linear, _triton_linear, _ext_linear),
    "distillation_loss": _family(_reference_distillation, _triton_distillation, _ext_distillation),
    "linear_distillation_loss": _family(_reference_distillation, _triton_distillation, _ext_distillation),
    "crf_log_likelihood": _family(_reference_crf, _triton_crf, _ext_crf),
    "crf_viterbi": _family(_reference_crf, _triton_crf, _ext_crf),
    "crf_marginals": _family(_reference_crf, _triton_crf, _ext_crf),
    "crf_partial_log_likelihood": _family(_reference_crf, _triton_crf, _ext_crf),
    "crf_log_partition": _family(_reference_crf, _triton_crf, _ext_crf),
    "crf_kbest_viterbi": _family(_reference_crf, _triton_crf, _ext_crf),
    "binary_cross_entropy_with_logits": _family(_reference_sigmoid, triton=_triton_sigmoid, ext=_ext_sigmoid),
    "sigmoid_focal_loss": _family(_reference_sigmoid, triton=_triton_sigmoid, ext=_ext_sigmoid),
    "multilabel_soft_margin_loss": _family(_reference_sigmoid, triton=_triton_sigmoid, ext=_ext_sigmoid),
    "multilabel_categorical_crossentropy": _family(_reference_sigmoid, triton=_triton_sigmoid, ext=_ext_sigmoid),
    "ghmc_loss": _family(_reference_sigmoid, triton=_triton_sigmoid, ext=_ext_sigmoid),
    "bi_tempered_logistic_loss": _family(_reference_sigmoid, triton=_triton_sigmoid, ext=_ext_sigmoid),
}


class BackendUnavailable(RuntimeError):
    """A named backend cannot serve a call; the message lists every reason."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_BACKEND_REASONS: Dict[str, Optional[str]] = {}


@torch.compiler.assume_constant_result
def _backend_reason(name: str) -> Optional[str]:
    """Why a backend cannot run at all on this machine, or None (computed once per process;
    torch.compile takes the answer as a constant instead of tracing the imports it does)."""
    if name not in _BACKEND_REASONS:
        _BACKEND_REASONS[name] = _compute_backend_reason(name)
    return _BACKEND_REASONS[name]


def _compute_backend_reason(name: str) -> Optional[str]:
    if name == "reference":
        return None
    if name == "triton":
        try:
            triton = importlib.import_module("triton")
        except Exception as exc:  # ImportError, or a broken install
            return f"triton is not importable ({type(exc).__name__}: {exc})"
        version = getattr(triton, "__version__", "0")
        if major_minor(version) < TRITON_FLOOR:
            return (f"needs triton >= {TRITON_FLOOR[0]}.{TRITON_FLOOR[1]}, found {version} (older releases, such as "
                    "the 3.1 and 3.2 that torch 2.5 and 2.6 install, cannot run its kernels)")
        if not torch.cuda.is_available() and not _triton_interpret():
            return "no CUDA device (CPU tensors need TRITON_INTERPRET=1, set before triton is imported)"
        return None
    if name in ("cpp", "cuda"):
        try:
            ext = importlib.import_module("fusedloss._C")
        except Exception as exc:
            return f"the fusedloss._C extension is not built ({type(exc).__name__}: {exc})"
        if name == "cuda":
            if not getattr(ext, "WITH_CUDA", False):
                return "fusedloss._C was built without CUDA"
            if not torch.cuda.is_available():
                return "no CUDA device"
        return None
    raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")


def available_backends() -> Dict[str, Optional[str]]:
    """``{backend name: None if usable here, else the reason it is not}``."""
    return {name: _backend_reason(name) for name in BACKEND_NAMES}


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
        return f"runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got a {device.type} tensor"
    if name == "cpp" and device.type != "cpu":
        return f"runs on CPU tensors, got a {device.type} tensor"
    if name == "cuda" and device.type != "cuda":
        return f"runs on CUDA tensors, got a {device.type} tensor"
    return None


_IMPLS: Dict[Tuple[str, str], Tuple[Callable, Optional[Callable]]] = {}
# The implementations whose module checks every argument itself (CHECKS_ARGUMENTS = True), compared by identity:
# an op overload's __hash__ is Python code, and torch.compile (torch 2.5) cannot trace id().
_SELF_CHECKING: List[Callable] = []
# (implementation, the same op called without boxing): a module's ``<op>_unboxed``, for plain tensors outside
# torch.compile and torch function modes (see :func:`unboxed`).
_UNBOXED: List[Tuple[Callable, Callable]] = []


def _load(op: str, name: str) -> Tuple[Callable, Optional[Callable]]:
    key = (op, name)
    if key not in _IMPLS:
        module = _OP_TABLE[op][name]()
        impl = getattr(module, op)
        if getattr(module, "CHECKS_ARGUMENTS", False):
            _SELF_CHECKING.append(impl)
        if getattr(module, op + "_unboxed", None) is not None:
            _UNBOXED.append((impl, getattr(module, op + "_unboxed")))
        _IMPLS[key] = (impl, getattr(module, op + "_reasons", None))
    return _IMPLS[key]


def checks_arguments(impl: Callable) -> bool:
    """Whether ``impl`` checks its arguments itself (and takes them unflattened)."""
    for checked in _SELF_CHECKING:
        if impl is checked:
            return True
    return False


def unboxed(impl: Callable) -> Optional[Callable]:
    """The unboxed entry of ``impl`` (an extension op called through torch.ops), or None. The caller uses it only
    for arguments that are plain tensors, outside torch.compile and torch function modes: it skips the
    ``__torch_function__`` handling of torch.ops (nothing else: autograd and dispatch modes run in the
    dispatcher)."""
    for op, fn in _UNBOXED:
        if impl is op:
            return fn
    return None


def _reasons(
    op: str, name: str, device: torch.device, args: tuple, kwargs: dict
) -> Tuple[List[str], Optional[Callable]]:
    backend_reason = _backend_reason(name)
    if backend_reason is not None:
        return [backend_reason], None
    if name not in _OP_TABLE[op]:
        return [f"has no kernel for {op}"], None
    device_reason = _device_reason(name, device)
    if device_reason is not None:
        return [device_reason], None
    try:
        impl, reasons_fn = _load(op, name)
    except (ImportError, AttributeError) as exc:
        return [f"does not implement {op} ({type(exc).__name__}: {exc})"], None
    reasons = list(reasons_fn(*args, **kwargs)) if reasons_fn is not None else []
    return reasons, (None if reasons else impl)


# FUSEDLOSS_BACKEND, read once (at import).
_ENV_BACKEND = os.environ.get("FUSEDLOSS_BACKEND", "") or "auto"

_RESOLVED: Dict[tuple, Tuple[str, Callable]] = {}
_MAX_RESOLVED = 4096


def _traits(value) -> object:
    """What a backend's decision may depend on, for one argument (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        last = value.shape[-1] if value.dim() and value.is_floating_point() else -1
        return (value.dtype, value.device, value.requires_grad, value.dim(), last)
    if value is None or isinstance(value, (str, bool)):
        return value
    return type(value)


def resolve(op: str, backend: str, device: torch.device, *args, **kwargs) -> Tuple[str, Callable]:
    """Choose the backend for one call of ``op``; returns ``(name, implementation)``.

    Cached per call signature (module docstring), except while torch.compile traces."""
    if torch.compiler.is_compiling() or not isinstance(backend, str):
        return _resolve(op, backend, device, args, kwargs)
    key = (op, backend, device, torch.is_grad_enabled(), *map(_traits, args))
    if kwargs:
        key += tuple((name, _traits(value)) for name, value in kwargs.items())
    return resolve_keyed(key, op, backend, device, args)


def resolve_keyed(key: tuple, op: str, backend: str, device: torch.device, args: tuple) -> Tuple[str, Callable]:
    """:func:`resolve` with the cache key computed by the caller: a hot public function builds it from just what
    its backends' ``<op>_reasons`` read (cheaper than the generic traits of every argument). The key must hold
    ``op``, ``backend``, the device and grad mode besides. Not for traced code (the caller checks)."""
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _resolve(op, backend, device, args, {})
        remember(key, hit)
    return hit


# First item of the keys under which public functions keep the unboxed entry a call signature resolved to:
# (UNBOXED, the decision's key).
UNBOXED = "unboxed"


def remember(key: tuple, value: object) -> None:
    """Keeps ``value`` under ``key`` in the decisions' cache (a public function's own shortcut for calls it has
    seen: forgotten with the decisions)."""
    if len(_RESOLVED) >= _MAX_RESOLVED:
        _RESOLVED.clear()
    _RESOLVED[key] = value


def _resolve(op: str, backend: str, device: torch.device, args: tuple, kwargs: dict) -> Tuple[str, Callable]:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = _ENV_BACKEND
    if backend == "auto":
        order = _AUTO_ORDER.get(device.type, ("reference",))
    elif backend in BACKEND_NAMES:
        order = (backend,)
    else:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    all_reasons = []
    for name in order:
        reasons, impl = _reasons(op, name, device, args, kwargs)
        if impl is not None:
            return name, impl
        all_reasons.append((name, reasons))
    # The words are joined only here: torch.compile traces the search above when a backend ahead
    # of the chosen one declines, and it cannot trace str.join.
    lines = [f"{name}: " + "; ".join(reasons) for name, reasons in all_reasons]
    raise BackendUnavailable(f"no backend can run {op} for this call:\n  " + "\n  ".join(lines))


def call(op: str, backend: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the backend chosen by :func:`resolve`."""
    _, impl = resolve(op, backend, device, *args, **kwargs)
    return impl(*args, **kwargs)


def why_not(op: str, backend: str, device: torch.device, *args, **kwargs) -> List[str]:
    """The reasons ``backend`` cannot serve this call of ``op`` (empty when it can)."""
    return _reasons(op, backend, device, args, kwargs)[0]
