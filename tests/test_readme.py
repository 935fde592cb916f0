"""The README's API example runs as written (a user copies it first)."""

import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_api_example_runs():
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(block for block in blocks if "fusedloss.CRF(" in block)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(example, README, "exec"), namespace)
    assert torch.isfinite(namespace["nll"]) and len(namespace["paths"]) == 4
    assert namespace["tag_ids"].shape == (4, 12) and namespace["posteriors"].shape == (4, 12, 5)
    torch.testing.assert_close(namespace["posteriors"].sum(-1)[0], torch.ones(12))
