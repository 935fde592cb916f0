// CPU kernels of the vocabulary-parallel losses' local work (csrc/vocab_parallel_ops.cpp): rows in parallel,
// the row math of csrc/kernels/vocab_parallel.h in the vector ISA picked at run time (cpu/isa.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#include "cpu/isa.h"
#include "kernels/vocab_parallel.h"

namespace fusedloss {
namespace {

template <typename acc_t>
vocab_parallel::Cap<acc_t> make_cap(c10::optional<double> softcap) {
  return {softcap.has_value(), static_cast<acc_t>(softcap.value_or(0.0)),
          static_cast<acc_t>(softcap.has_value() ? 1.0 / *softcap : 0.0)};
}

template <typename acc_t, typename scalar_t>
struct StatsJob {
  const scalar_t* x;
  int64_t num_classes;
  vocab_parallel::Cap<acc_t> cap;
  acc_t* row_max;
  acc_t* sum_exp;
  acc_t* gap_sum;

  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    for (int64_t n = begin; n < end; ++n) {
      vocab_parallel::row_stats<acc_t, scalar_t>(x + row_offset(n, num_classes), num_classes, cap, row_max + n,
                                                 sum_exp + n, gap_sum + n);
    }
  }
};

template <typename acc_t, typename scalar_t>
struct GradJob {
  const scalar_t* x;
  int64_t num_classes;
  vocab_parallel::Cap<acc_t> cap;
  const acc_t* lse;
  const acc_t* coefficient;
  const acc_t* target_coef;
  const int64_t* local_target;
  const acc_t* scale;
  acc_t smoothing_per_class;
  const acc_t* weight;
  acc_t* grad;

  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    for (int64_t n = begin; n < end; ++n) {
      const vocab_parallel::GradRow<acc_t> row{lse[n], coefficient[n], target_coef[n], local_target[n], scale[n]};
      vocab_parallel::row_grad<acc_t, scalar_t>(x + row_offset(n, num_classes), num_classes, cap, row,
                                                smoothing_per_class, weight, grad + row_offset(n, num_classes));
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats_cpu(const at::Tensor& logits_arg,
                                                             c10::optional<double> softcap) {
  TORCH_CHECK(logits_arg.dim() == 2, "vocab_parallel_row_stats: logits must be (N, C_r)");
  const at::Tensor logits = logits_arg.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto options = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor row_max = at::empty({N}, options), sum_exp = at::empty({N}, options), gap = at::empty({N}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "vocab_parallel_row_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatsJob<acc_t, scalar_t> job{logits.const_data_ptr<scalar_t>(), C, make_cap<acc_t>(softcap),
                                        row_max.data_ptr<acc_t>(), sum_exp.data_ptr<acc_t>(), gap.data_ptr<acc_t>()};
    cpu::run_parallel(job, N, cpu::rows_per_task(C));
  });
  return {row_max, sum_exp, gap};
}

void shard_grad_cpu(const at::Tensor& logits_arg, const at::Tensor& lse, const at::Tensor& coefficient,
                    const at::Tensor& target_coef, const at::Tensor& local_target, const at::Tensor& scale,
                    double smoothing_per_class, const c10::optional<at::Tensor>& weight_shard,
                    c10::optional<double> softcap, at::Tensor& out) {
  TORCH_CHECK(logits_arg.dim() == 2, "vocab_parallel_shard_grad: logits must be (N, C_r)");
  const at::Tensor logits = logits_arg.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::ScalarType acc = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK(out.scalar_type() == acc && out.sizes() == logits.sizes() && out.is_contiguous(),
              "vocab_parallel_shard_grad: out must be a contiguous (N, C_r) tensor of the compute dtype");
  auto rows = [&](const at::Tensor& t, at::ScalarType type) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N && t.scalar_type() == type,
                "vocab_parallel_shard_grad: per-row tensors must be (N,) of the compute dtype (int64 targets)");
    return t.contiguous();
  };
  const at::Tensor lse_c = rows(lse, acc), coef_c = rows(coefficient, acc), tc_c = rows(target_coef, acc);
  const at::Tensor y_c = rows(local_target, at::kLong), scale_c = rows(scale, acc);
  at::Tensor weight;
  if (weight_shard.has_value() && weight_shard->defined()) {
    weight = weight_shard->to(acc).contiguous();
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "vocab_parallel_shard_grad: weight_shard must be (C_r,)");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "vocab_parallel_shard_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradJob<acc_t, scalar_t> job{logits.const_data_ptr<scalar_t>(), C, make_cap<acc_t>(softcap),
                                       lse_c.const_data_ptr<acc_t>(), coef_c.const_data_ptr<acc_t>(),
                                       tc_c.const_data_ptr<acc_t>(), y_c.const_data_ptr<int64_t>(),
                                       scale_c.const_data_ptr<acc_t>(), static_cast<acc_t>(smoothing_per_class),
                                       weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr,
                                       out.data_ptr<acc_t>()};
    cpu::run_parallel(job, N, cpu::rows_per_task(C));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("vocab_parallel_row_stats", &row_stats_cpu);
  m.impl("vocab_parallel_shard_grad", &shard_grad_cpu);
}

}  // namespace fusedloss
