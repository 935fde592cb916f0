"""``linear_cross_entropy`` on the ``fusedloss._C`` extension: the ``cpp`` backend (CPU) and the ``cuda`` backend,
chosen by the torch dispatcher from the tensors' device.

The op ``fusedloss::linear_cross_entropy`` (csrc/linear_cross_entropy_ops.cpp) runs the rows in chunks: per chunk
``at::mm`` / ``at::addmm`` into one reused ``(chunk, V)`` buffer, the fused softmax-loss row kernel of the device
writing the logits' gradient over that buffer, then ``grad_input`` of the chunk and the float32 accumulation of
``grad_weight`` and ``grad_bias``. Its autograd is registered in C++. The public function checks the arguments and
flattens them to rows; only the fake kernel for ``torch.compile`` is registered here.
"""

from __future__ import annotations

from typing import List, Optional

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)
from fusedloss._ext.softmax_loss import softmax_loss_reasons


@torch.library.register_fake("fusedloss::linear_cross_entropy")
def _linear_cross_entropy_fake(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                               label_smoothing, focal_gamma, z_loss, softcap, token_weight, chunk_size):
    return input.new_empty((input.shape[0],) if reduction == "none" else ())


# linear_cross_entropy(input (N, H), linear_weight (V, H), target, linear_bias, weight, ignore_index, reduction,
# label_smoothing, focal_gamma, z_loss, softcap, token_weight (N,) or None, chunk_size) -> (N,) or a scalar.
linear_cross_entropy = torch.ops.fusedloss.linear_cross_entropy.default


def linear_cross_entropy_reasons(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: Optional[float],
    token_weight: Optional[torch.Tensor],
    chunk_size: int,
) -> List[str]:
    """Why this backend cannot serve the call: those of its row kernel (the logits have input's dtype)."""
    return softmax_loss_reasons(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                                z_loss, softcap, False, False)
