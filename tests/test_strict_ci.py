"""tests/_backends.py: a backend that cannot run is a skip on a developer's machine and a failure in CI.

The unit tests give the helper a made-up reason; the end-to-end test runs pytest on real test files in a child
process where an import hook makes ``fusedloss._C`` (or ``triton``) unimportable, with and without ``CI`` set.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import _backends
import fusedloss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value, expected", [(None, False), ("", False), ("0", False), ("false", False),
                                             ("False", False), ("no", False), ("true", True), ("1", True),
                                             ("yes", True)])
def test_ci_is_read_from_the_environment(value, expected):
    assert _backends.in_ci({} if value is None else {"CI": value}) is expected


@pytest.fixture
def cpp_missing(monkeypatch):
    reasons = dict(fusedloss.available_backends(), cpp="the fusedloss._C extension is not built (made up)")
    monkeypatch.setattr(fusedloss, "available_backends", lambda: reasons)


@pytest.mark.parametrize("in_ci", [False, True], ids=["local", "ci"])
def test_unavailable_backend_skips_locally_and_fails_in_ci(cpp_missing, monkeypatch, in_ci):
    monkeypatch.setattr(_backends, "IN_CI", in_ci)
    outcome = pytest.fail.Exception if in_ci else pytest.skip.Exception
    for check in (_backends.require_backend, _backends.require_backend_for_module):
        with pytest.raises(outcome, match="not built"):
            check("cpp")
    if in_ci:
        with pytest.raises(pytest.fail.Exception, match="must be usable in CI"):
            _backends.expect_backend("cpp")
    else:
        assert _backends.expect_backend("cpp") is False
    assert not _backends.available("cpp")
    # the reference backend is always there: nothing happens
    _backends.require_backend("reference")
    assert _backends.expect_backend("reference") is True


def test_ci_requires_the_backends_it_names(cpp_missing, monkeypatch):
    """FUSEDLOSS_CI_BACKENDS narrows what CI requires (the floor environment: cpp only, its Triton is too old)."""
    monkeypatch.setattr(_backends, "IN_CI", True)
    assert _backends.ci_requires("cpp", {}) and _backends.ci_requires("triton", {})
    assert _backends.ci_requires("cpp", {"FUSEDLOSS_CI_BACKENDS": "cpp"})
    assert not _backends.ci_requires("triton", {"FUSEDLOSS_CI_BACKENDS": "cpp"})
    monkeypatch.setenv("FUSEDLOSS_CI_BACKENDS", "triton")
    with pytest.raises(pytest.skip.Exception, match="not built"):
        _backends.require_backend("cpp")
    monkeypatch.setattr(_backends, "IN_CI", False)
    assert not _backends.ci_requires("cpp", {})


def test_triton_needs_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(fusedloss, "available_backends", lambda: {"triton": None})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in _backends.unavailable_reason("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.unavailable_reason("triton") is None


_BLOCKER = """
import importlib.abc, os, sys

BLOCKED = os.environ["FUSEDLOSS_TEST_BLOCK"].split(",")


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, Blocker())
"""

# A module-level mark (test_cpp_crf), a mark on a parameter (test_fidelity), a call in the test body
# (test_linear_cross_entropy) and the expectation of auto's choice (test_linear_cross_entropy).
_CPP_TESTS = ["tests/test_cpp_crf.py::test_tags_out_of_range_raise",
              "tests/test_fidelity.py::test_saturated_softcap_gradient_is_zero[cpp]",
              "tests/test_linear_cross_entropy.py::test_bad_inputs_name_the_argument[cpp]",
              "tests/test_linear_cross_entropy.py::test_backend_reasons"]


def _pytest(tmp_path, blocked, ci, tests):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "FUSEDLOSS_CI_BACKENDS")}
    env.update(PYTHONPATH=str(tmp_path), FUSEDLOSS_TEST_BLOCK=blocked, **({"CI": "true"} if ci else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *tests],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_extension_or_triton_skips_locally_and_fails_in_ci(tmp_path):
    local = _pytest(tmp_path, "fusedloss._C,triton", False, _CPP_TESTS + ["tests/test_triton_crf.py"])
    assert local.returncode == 0, local.stdout + local.stderr
    # test_backend_reasons expects auto to pick the reference without the extension: it runs and passes
    assert local.stdout.splitlines()[-1].startswith("1 passed, 4 skipped"), local.stdout

    ci = _pytest(tmp_path, "fusedloss._C", True, _CPP_TESTS)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    summary = ci.stdout.splitlines()[-1]
    assert "skipped" not in summary and "passed" not in summary, ci.stdout
    assert ci.stdout.count("the cpp backend must be usable in CI") >= len(_CPP_TESTS), ci.stdout

    ci_triton = _pytest(tmp_path, "triton", True, ["tests/test_triton_crf.py"])
    assert ci_triton.returncode != 0 and "the triton backend must be usable in CI" in ci_triton.stdout, ci_triton.stdout
