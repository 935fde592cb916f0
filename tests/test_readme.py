"""Every ```python block of the README runs as written, in order, in one namespace (a user copies them first).

The README states its claims as assertions inside the examples (``torch.testing.assert_close(loss,
F.cross_entropy(...))``), so running the blocks checks the claims. A block that is not meant to run starts with
the line ``# not run:`` (and says why); non-Python commands use other fences (```bash).
"""

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
NOT_RUN = "# not run:"


def _python_blocks():
    text = open(README, encoding="utf-8").read()
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((line, match.group(1)))
    return blocks


def test_readme_has_python_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 4, "the README shows one example per family (softmax, fused head, sigmoid, CRF)"
    runnable = [code for _, code in blocks if not code.startswith(NOT_RUN)]
    for family in ("fusedloss.cross_entropy(", "fusedloss.linear_cross_entropy(", "fusedloss.sigmoid_focal_loss(",
                   "fusedloss.CRF("):
        assert any(family in code for code in runnable), f"no runnable README example calls {family}"
    # Every claim the examples make is checked where it is made.
    assert sum(code.count("assert") for code in runnable) >= 10


def test_readme_python_blocks_run_in_order():
    if any("import torchcrf" in code for _, code in _python_blocks()):
        pytest.importorskip("torchcrf")
    namespace: dict = {"__name__": "__readme__"}
    torch.manual_seed(0)
    for line, code in _python_blocks():
        if code.startswith(NOT_RUN):
            continue
        # Padding with newlines makes tracebacks point at the README's own line numbers.
        exec(compile("\n" * (line - 1) + code, README, "exec"), namespace)
