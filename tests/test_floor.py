"""The supported torch floor is declared once in the code and stated the same in setup.py, and the running
torch is at or above it (CI also runs this suite on the floor itself)."""

import os
import re

import torch

from fusedloss import _floor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_parsing():
    assert _floor._major_minor("2.13.0+cpu") == (2, 13)
    assert _floor._major_minor("2.5.1+cu124") == (2, 5)
    assert _floor._major_minor("2.6.0a0+git1234") == (2, 6)
    assert _floor._major_minor("2.10.0.dev20251001") == (2, 10)
    assert _floor._major_minor("2.4.1") < _floor.TORCH_FLOOR


def test_setup_declares_the_floor():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    declared = re.search(r'"torch>=(\d+)\.(\d+)"', setup)
    assert declared is not None, "setup.py must declare torch>=X.Y in install_requires"
    assert (int(declared[1]), int(declared[2])) == _floor.TORCH_FLOOR


def test_running_torch_is_supported():
    assert _floor._major_minor(torch.__version__) >= _floor.TORCH_FLOOR
