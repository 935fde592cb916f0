"""Whether the tests of a backend run, skip or fail where that backend cannot run.

On a developer's machine a backend may be missing for a good reason (the ``fusedloss._C`` extension not built,
triton not installed): its tests are skipped, with the reason. In CI (the environment variable ``CI`` set, as CI
services set it; empty, ``0``, ``false`` and ``no`` count as unset) the extension is built and triton is installed,
so a backend that cannot run there is a broken build: every test of that backend fails with the reason instead of
skipping and letting the run pass.

Which backends CI requires: ``FUSEDLOSS_CI_BACKENDS`` (comma-separated, default ``cpp,triton``). The floor
environment of .ci/run (the oldest supported torch, whose own Triton is older than the triton backend needs) sets
it to ``cpp``: there the Triton tests skip with that reason, and a missing extension still fails.

A backend is usable here when ``fusedloss.available_backends()`` names no reason against it and it serves CPU
tensors, which is what these tests run on (the Triton kernels only under ``TRITON_INTERPRET=1``, which
tests/conftest.py sets before triton is imported).

- ``require_backend(name)`` in a test or fixture: returns when the backend is usable, else skips (fails in CI).
- ``requires_backend(name)``: the same as a mark, checked before the test runs (tests/conftest.py); for a test,
  a parameter (``pytest.param("cpp", marks=requires_backend("cpp"))``) or a whole module (``pytestmark``).
- ``require_backend_for_module(name)`` at the top of a test module that cannot even be imported without the
  backend: skips the module, and in CI fails its collection (which fails the run).
- ``available(name)``: a plain bool, to guard a module-level import in a module whose tests carry the mark.
- ``expect_backend(name)``: for a test whose expectation depends on the backend being there (which backend
  ``auto`` picks): True when usable, False when not, and a failure in CI when not.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest

import fusedloss


def in_ci(environ=os.environ) -> bool:
    """Whether ``environ`` says the tests run in CI."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


IN_CI = in_ci()


def ci_requires(name: str, environ=os.environ) -> bool:
    """Whether a CI run must have the backend ``name`` (see the module docstring)."""
    required = environ.get("FUSEDLOSS_CI_BACKENDS", "cpp,triton")
    return IN_CI and name in {part.strip() for part in required.split(",")}


def unavailable_reason(name: str) -> Optional[str]:
    """Why the backend ``name`` cannot run these tests here, or None."""
    reason = fusedloss.available_backends()[name]
    if reason is None and name == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # importable, and a CUDA device is there, but the tests' tensors are on the CPU
        reason = "TRITON_INTERPRET is not set, so the Triton kernels cannot run on CPU tensors"
    return reason


def available(name: str) -> bool:
    return unavailable_reason(name) is None


def _message(name: str, reason: str) -> str:
    if ci_requires(name):
        return f"the {name} backend must be usable in CI (CI={os.environ.get('CI')!r}), but it is not: {reason}"
    return f"{name} backend unavailable: {reason}"


def require_backend(name: str) -> None:
    reason = unavailable_reason(name)
    if reason is None:
        return
    if ci_requires(name):
        pytest.fail(_message(name, reason), pytrace=False)
    # allow_module_level: the same call also serves at the top of a module (require_backend_for_module)
    pytest.skip(_message(name, reason), allow_module_level=True)


def requires_backend(name: str) -> pytest.MarkDecorator:
    return pytest.mark.requires_backend(name)


require_backend_for_module = require_backend


def expect_backend(name: str) -> bool:
    reason = unavailable_reason(name)
    if reason is not None and ci_requires(name):
        pytest.fail(_message(name, reason), pytrace=False)
    return reason is None
