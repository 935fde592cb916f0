"""The oldest torch (and Triton, for the triton backend) fusedloss supports; imported first by ``__init__.py``.

setup.py declares the same torch floor and CI runs the test suite on it. torch.library custom ops with fake
kernels and registered autograd need torch 2.4, the public ``torch.distributed.tensor.DTensor`` 2.5. An older
torch fails at import, with the reason, instead of a backend silently falling back to the reference later.

The triton backend needs Triton 3.6 or later: its kernels are tested with 3.6 and later, and the 3.1 and 3.2 that
torch 2.5 and 2.6 install cannot run them. With an older Triton that backend reports itself unavailable (with
that reason) and ``auto`` takes the next one.
"""

from typing import Tuple

import torch

TORCH_FLOOR = (2, 5)
TRITON_FLOOR = (3, 6)


def major_minor(version: str) -> Tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``; a pre-release or dev suffix on a part is dropped (``"6a0"`` -> 6)."""
    parts = [int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split("+")[0].split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


if major_minor(torch.__version__) < TORCH_FLOOR:
    raise ImportError(
        f"fusedloss needs torch >= {TORCH_FLOOR[0]}.{TORCH_FLOOR[1]} (torch.library custom ops, "
        f"torch.distributed.tensor.DTensor), found torch {torch.__version__}"
    )
