// The cpp backend's distillation row kernel (docs/BACKENDS.md, distillation_loss): one fused sweep per row
// (csrc/kernels/distillation.h), rows in parallel with at::parallel_for, in the vector ISA picked at run time
// (cpu/isa.h). The teacher is read in its own dtype; no (N, V) float32 temporary.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>

#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "distillation_checks.h"
#include "kernels/distillation.h"

namespace fusedloss {
namespace {

template <typename acc_t, typename scalar_t>
struct DistillationRowsJob {
  const scalar_t* student;
  const scalar_t* teacher;
  const acc_t* factors;
  const distillation::Params<acc_t>* prm;
  int64_t stride_s;
  int64_t stride_t;
  int64_t stride_g;
  scalar_t* grad;  // or null
  acc_t* losses;

  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    for (int64_t n = begin; n < end; ++n) {
      losses[n] = distillation::process_row<acc_t, scalar_t>(
          student + row_offset(n, stride_s), teacher + row_offset(n, stride_t), *prm, factors[n],
          grad == nullptr ? nullptr : grad + row_offset(n, stride_g));
    }
  }
};

at::Tensor distillation_rows_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& factors_arg,
                                 double beta, double temperature, const c10::optional<at::Tensor>& grad_arg) {
  check_distillation_rows_args(student, teacher, factors_arg, beta, temperature, grad_arg);
  const int64_t N = student.size(0);
  const int64_t V = student.size(1);
  const at::ScalarType acc_type = at::toOpMathType(student.scalar_type());
  const at::Tensor factors = factors_arg.to(acc_type).contiguous();
  at::Tensor losses = at::empty({N}, student.options().dtype(acc_type));
  const bool write_grad = grad_arg.has_value() && grad_arg->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distillation_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    distillation::Params<acc_t> prm;
    prm.num_classes = V;
    prm.mode = beta == 0.0 ? 0 : (beta == 1.0 ? 1 : 2);
    prm.beta = static_cast<acc_t>(beta);
    prm.log_beta = prm.mode == 2 ? static_cast<acc_t>(std::log(beta)) : acc_t(0);
    prm.log_1m_beta = prm.mode == 2 ? static_cast<acc_t>(std::log1p(-beta)) : acc_t(0);
    prm.inv_tau = static_cast<acc_t>(1.0 / temperature);
    const DistillationRowsJob<acc_t, scalar_t> job{
        student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), factors.const_data_ptr<acc_t>(),
        &prm, student.stride(0), teacher.stride(0), write_grad ? grad_arg->stride(0) : 0,
        write_grad ? grad_arg->data_ptr<scalar_t>() : nullptr, losses.data_ptr<acc_t>()};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V));
    cpu::run_parallel(job, N, grain);
  });
  return losses;
}

std::tuple<at::Tensor, at::Tensor> distillation_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                            const at::Tensor& factors, double beta,
                                                            double temperature, bool compute_grad) {
  at::Tensor grad = compute_grad ? cpu::gradient_buffer(student) : at::empty({0}, student.options());
  at::Tensor losses = distillation_rows_cpu(student, teacher, factors, beta, temperature,
                                            compute_grad ? c10::optional<at::Tensor>(grad) : c10::nullopt);
  return {losses, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("distillation_rows", &distillation_rows_cpu);
  m.impl("distillation_forward", &distillation_forward_cpu);
}

}  // namespace fusedloss
