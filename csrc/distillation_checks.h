// Argument checks of the distillation row op (csrc/distillation_ops.cpp), shared by its device kernels.
#pragma once

#include <ATen/ATen.h>

#include "op_utils.h"

namespace fusedloss {

// Bad input gets a ValueError (TypeError for a wrong dtype) naming the argument, what was expected and what came.
inline void check_distillation_rows_args(const at::Tensor& student, const at::Tensor& teacher,
                                         const at::Tensor& factors, double beta, double temperature,
                                         const c10::optional<at::Tensor>& grad) {
  check_floating("student", student);
  check_floating("teacher", teacher);
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1,
                    "student must be rows (N, V) with V >= 1, got shape ", shape_str(student.sizes()));
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have student's shape ",
                    shape_str(student.sizes()), ", got ", shape_str(teacher.sizes()));
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "teacher must have student's dtype ",
                   dtype_str(student.scalar_type()), ", got ", dtype_str(teacher.scalar_type()));
  TORCH_CHECK_VALUE(student.stride(1) == 1 && teacher.stride(1) == 1,
                    "student and teacher must have unit stride along V");
  check_same_device("teacher", teacher, "student", student);
  check_floating("factors", factors);
  TORCH_CHECK_VALUE(factors.dim() == 1 && factors.size(0) == student.size(0), "factors must have shape (N,) = (",
                    student.size(0), ",), got ", shape_str(factors.sizes()));
  check_same_device("factors", factors, "student", student);
  check_real("beta", beta, 0.0, 1.0);
  check_real("temperature", temperature, 0.0, -1, /*low_open=*/true);
  if (grad.has_value() && grad->defined()) {
    TORCH_CHECK_VALUE(grad->sizes() == student.sizes() && grad->scalar_type() == student.scalar_type() &&
                          grad->stride(1) == 1,
                      "grad must have student's shape and dtype with unit stride along V, got ",
                      shape_str(grad->sizes()), " ", dtype_str(grad->scalar_type()));
    check_same_device("grad", *grad, "student", student);
  }
}

}  // namespace fusedloss
