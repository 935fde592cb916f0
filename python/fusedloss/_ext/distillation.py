"""``distillation_loss`` and ``linear_distillation_loss`` on the ``fusedloss._C`` extension: the ``cpp`` backend
(CPU kernels). The ``cuda`` backend shares this module and declines: there is no CUDA kernel for distillation.

- ``distillation_loss`` is the extension's op ``fusedloss::distillation_loss`` itself (csrc/distillation_ops.cpp),
  with its autograd registered in C++ as softmax_loss's is: its forward runs the device kernel
  ``fusedloss::distillation_forward`` (csrc/cpu/distillation.cpp, math csrc/kernels/distillation.h), which returns
  each row's divergence and, in the same sweeps, the student's gradient times the row's factor; backward scales
  that gradient by ``grad_output`` in place. Without a gradient to compute, none is computed.
- ``linear_distillation_loss`` is the chunk loop of :mod:`fusedloss._distillation_ops` over the row op
  ``fusedloss::distillation_rows``, which writes the gradient over the chunk's student logits; it is registered as
  the ``torch.library`` custom op ``fusedloss::cpp_linear_distillation_loss`` with its autograd.

Only the fake kernels of the extension's ops are registered here, so ``torch.compile(fullgraph=True)`` traces
through them.
"""

from __future__ import annotations

from typing import List, Optional

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)
from fusedloss._distillation_ops import accumulation_dtype, make_backend


@torch.library.register_fake("fusedloss::distillation_rows")
def _distillation_rows_fake(student, teacher, factors, beta, temperature, grad):
    return student.new_empty((student.shape[0],), dtype=accumulation_dtype(student.dtype))


@torch.library.register_fake("fusedloss::distillation_forward")
def _distillation_forward_fake(student, teacher, factors, beta, temperature, compute_grad):
    losses = student.new_empty((student.shape[0],), dtype=accumulation_dtype(student.dtype))
    return losses, student.new_empty(student.shape) if compute_grad else student.new_empty((0,))


@torch.library.register_fake("fusedloss::distillation_loss")
def _distillation_loss_fake(student, teacher, target, token_weight, beta, temperature, ignore_index, reduction):
    return student.new_empty((student.shape[0],) if reduction == "none" else ())


_rows_op = torch.ops.fusedloss.distillation_rows.default


def _rows(student: torch.Tensor, teacher: torch.Tensor, factors: torch.Tensor, beta: float, temperature: float,
          grad: Optional[torch.Tensor]) -> torch.Tensor:
    return _rows_op(student, teacher, factors, beta, temperature, grad)


# distillation_loss(student (N, V), teacher (N, V), target (N,) or None, token_weight (N,) or None, beta,
# temperature, ignore_index, reduction) -> (N,) or a scalar, in student's dtype (docs/BACKENDS.md).
distillation_loss = torch.ops.fusedloss.distillation_loss.default
_, linear_distillation_loss = make_backend("cpp", _rows, logits_op=False)


def _reasons(device: torch.device) -> List[str]:
    return [] if device.type == "cpu" else ["no CUDA kernel for distillation"]


def distillation_loss_reasons(student, teacher, target, token_weight, beta, temperature, ignore_index,
                              reduction) -> List[str]:
    return _reasons(student.device)


def linear_distillation_loss_reasons(student_input, student_weight, teacher_input, teacher_weight, target,
                                     student_bias, teacher_bias, token_weight, beta, temperature, ignore_index,
                                     reduction, chunk_size) -> List[str]:
    return _reasons(student_input.device)
