"""The oldest torch fusedloss supports; imported first by ``fusedloss/__init__.py``.

setup.py declares the same floor and CI runs the test suite on it. torch.library custom ops with fake kernels
and registered autograd need torch 2.4, the public ``torch.distributed.tensor.DTensor`` 2.5. An older torch
fails at import, with the reason, instead of a backend silently falling back to the reference later.
"""

import torch

TORCH_FLOOR = (2, 5)


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


if _major_minor(torch.__version__) < TORCH_FLOOR:
    raise ImportError(
        f"fusedloss needs torch >= {TORCH_FLOOR[0]}.{TORCH_FLOOR[1]} (torch.library custom ops, "
        f"torch.distributed.tensor.DTensor), found torch {torch.__version__}"
    )
