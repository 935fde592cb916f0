"""The supported torch floor is declared once in the code and stated the same in setup.py, and the running
torch is at or above it (CI also runs this suite on the floor itself)."""

import os
import re
import sys

import torch

from fusedloss import _floor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_parsing():
    assert _floor.major_minor("2.13.0+cpu") == (2, 13)
    assert _floor.major_minor("2.5.1+cu124") == (2, 5)
    assert _floor.major_minor("2.6.0a0+git1234") == (2, 6)
    assert _floor.major_minor("2.10.0.dev20251001") == (2, 10)
    assert _floor.major_minor("2.4.1") < _floor.TORCH_FLOOR


def test_setup_declares_the_floor():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    declared = re.search(r'"torch>=(\d+)\.(\d+)"', setup)
    assert declared is not None, "setup.py must declare torch>=X.Y in install_requires"
    assert (int(declared[1]), int(declared[2])) == _floor.TORCH_FLOOR


def test_running_torch_is_supported():
    assert _floor.major_minor(torch.__version__) >= _floor.TORCH_FLOOR


def test_an_older_triton_makes_the_triton_backend_unavailable_with_the_reason(monkeypatch):
    import types

    from fusedloss import _dispatch

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.1.0"))
    reason = _dispatch._compute_backend_reason("triton")
    assert reason is not None and "needs triton >= 3.6, found 3.1.0" in reason
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch._compute_backend_reason("triton") is None
