"""examples/distill_causal_lm.py --quick at tiny sizes: it runs, and the fused and the eager (TRL formula) students
follow the same loss curve."""

import os
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import distill_causal_lm  # noqa: E402


def test_quick_run_at_tiny_sizes(capsys):
    results = distill_causal_lm.main([
        "--quick", "--steps", "3", "--teacher-steps", "2", "--vocab", "300", "--teacher-hidden", "32",
        "--teacher-layers", "1", "--teacher-heads", "2", "--student-hidden", "16", "--student-layers", "1",
        "--student-heads", "2", "--seq-len", "12", "--batch", "2", "--device", "cpu",
    ])
    out = capsys.readouterr().out
    assert "ms / step" in out and "student's loss" in out
    fused, eager = results["fusedloss"]["losses"], results["eager"]["losses"]
    assert len(fused) == 3
    for a, b in zip(fused, eager):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
