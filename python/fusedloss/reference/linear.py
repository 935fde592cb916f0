"""Reference fused linear + cross entropy (docs/linear.rst; op contract in docs/BACKENDS.md,
``linear_cross_entropy``): the logits ``F.linear(input, linear_weight, linear_bias)`` materialized, then the
reference softmax loss. This is the definition the chunked backends are tested against; it takes ``(N, V)``
memory for the logits and more for autograd's intermediates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedloss.reference.softmax import softmax_loss, token_weighted_reduction


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    focal_gamma: float,
    z_loss: float,
    softcap: float | None,
    token_weight: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """``softmax_loss(input (N, H) @ linear_weightᵀ (+ linear_bias), target, ...)`` with per-row weights
    ``token_weight (N,)``; ``(N,)`` for ``reduction="none"``, else a scalar, in ``input``'s dtype.
    ``chunk_size`` is a memory option of the chunked backends and has no meaning here."""
    del chunk_size
    logits = F.linear(input, linear_weight, linear_bias)
    if token_weight is None:
        return softmax_loss(logits, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss,
                            softcap, False, False)
    row_loss = softmax_loss(logits, target, weight, ignore_index, "none", label_smoothing, focal_gamma, z_loss,
                            softcap, False, False)
    return token_weighted_reduction(row_loss, target, weight, ignore_index, reduction, token_weight, False,
                                    row_loss.dtype)
