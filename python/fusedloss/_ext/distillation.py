"""``distillation_loss`` and ``linear_distillation_loss`` on the ``fusedloss._C`` extension: the ``cpp`` backend
(CPU kernel). The ``cuda`` backend shares this module and declines: there is no CUDA kernel for distillation.

The row kernel is the extension's op ``fusedloss::distillation_rows`` (schema in csrc/distillation_ops.cpp, checks
in csrc/distillation_checks.h, CPU kernel csrc/cpu/distillation.cpp, math csrc/kernels/distillation.h): per row,
the divergence and, in the same sweep, the student's gradient times the row's factor. The reductions, the chunk
loop of the linear form and the autograd are the ``torch.library`` custom ops of
:mod:`fusedloss._distillation_ops` (``fusedloss::cpp_distillation_loss``, ``fusedloss::cpp_linear_distillation_loss``),
so ``torch.compile(fullgraph=True)`` traces through them; only the fake kernel of the row op is registered here.
"""

from __future__ import annotations

from typing import List, Optional

import torch

import fusedloss._C  # noqa: F401  (loads the extension, which registers the fusedloss:: ops)
from fusedloss._distillation_ops import accumulation_dtype, make_backend


@torch.library.register_fake("fusedloss::distillation_rows")
def _distillation_rows_fake(student, teacher, factors, beta, temperature, grad):
    return student.new_empty((student.shape[0],), dtype=accumulation_dtype(student.dtype))


_rows_op = torch.ops.fusedloss.distillation_rows.default


def _rows(student: torch.Tensor, teacher: torch.Tensor, factors: torch.Tensor, beta: float, temperature: float,
          grad: Optional[torch.Tensor]) -> torch.Tensor:
    return _rows_op(student, teacher, factors, beta, temperature, grad)


distillation_loss, linear_distillation_loss = make_backend("cpp", _rows)


def _reasons(device: torch.device) -> List[str]:
    return [] if device.type == "cpu" else ["no CUDA kernel for distillation"]


def distillation_loss_reasons(student, teacher, target, token_weight, beta, temperature, ignore_index,
                              reduction) -> List[str]:
    return _reasons(student.device)


def linear_distillation_loss_reasons(student_input, student_weight, teacher_input, teacher_weight, target,
                                     student_bias, teacher_bias, token_weight, beta, temperature, ignore_index,
                                     reduction, chunk_size) -> List[str]:
    return _reasons(student_input.device)
