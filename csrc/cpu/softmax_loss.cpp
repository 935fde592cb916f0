// The cpp backend of softmax_loss (docs/BACKENDS.md): one fused pass per row computes the loss and
// writes the gradient (csrc/kernels/softmax_loss.h), rows in parallel with at::parallel_for, in the vector
// ISA picked at run time (baseline x86-64, AVX2 + FMA or AVX-512: cpu/isa.h).
// Extra memory: the gradient (N, C) in input's dtype (none with inplace_backward) and the (N,)
// row losses in the compute dtype; no (N, C) float32 temporary.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "kernels/softmax_loss.h"

namespace fusedloss {
namespace {

// Rows [begin, end) of one call; run() is compiled per vector ISA (cpu/isa.h), run_wide() (16 float lanes) in the
// AVX-512 variant. kFma: fused multiply-adds in the AVX2 and AVX-512 variants (the exp polynomial is most of the
// work and FMA halves its operations; results differ from the baseline variant's in the last bits, within the
// fidelity bounds). Not for one class, whose gradient torch gives
// as exact zeros (p = 1) that a fused a·b − c no longer cancels to.
template <typename acc_t, typename scalar_t, typename target_t, bool kFma>
struct RowsJob {
  const scalar_t* x;
  const int64_t* indices;  // hard targets, or null
  const target_t* probs;   // soft targets, or null
  const acc_t* weight;     // or null
  const softmax_loss::Params<acc_t>* prm;
  scalar_t* grad;  // or null
  acc_t scale;
  acc_t* losses;

  static constexpr bool kContract = kFma;
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const { run_lanes<8, false>(begin, end); }
  FUSEDLOSS_INLINE void run_avx2(int64_t begin, int64_t end) const { run_lanes<8, kFma>(begin, end); }
  FUSEDLOSS_INLINE void run_wide(int64_t begin, int64_t end) const { run_lanes<16, true>(begin, end); }

  // kPermute: the 8-lane table exp (AVX2 and up; not for one class, whose results must be the baseline's bits).
  template <int W, bool kPermute>
  FUSEDLOSS_INLINE void run_lanes(int64_t begin, int64_t end) const {
    const int64_t C = prm->num_classes;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t offset = row_offset(n, C);
      losses[n] = softmax_loss::process_row<acc_t, scalar_t, target_t, W, kPermute>(
          x + offset, indices == nullptr ? 0 : indices[n], probs == nullptr ? nullptr : probs + offset, weight, *prm,
          grad == nullptr ? nullptr : grad + offset, scale);
    }
  }
};

// Units [begin, end) of kTileUnitRows hard-target rows (the last one partial), as tiles of 8 rows (run) or 16
// (run_wide: the AVX-512 variant, one register per class); kFma as for RowsJob.
template <typename acc_t, typename scalar_t, bool kFma>
struct TilesJob {
  const scalar_t* x;
  const int64_t* indices;
  int64_t num_rows;
  const acc_t* weight;
  const softmax_loss::Params<acc_t>* prm;
  scalar_t* grad;
  acc_t scale;
  acc_t* losses;

  static constexpr bool kContract = kFma;
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    run_tiles<softmax_loss::kTileRows, false>(begin, end);
  }
  FUSEDLOSS_INLINE void run_avx2(int64_t begin, int64_t end) const {
    run_tiles<softmax_loss::kTileRows, kFma>(begin, end);
  }
  FUSEDLOSS_INLINE void run_wide(int64_t begin, int64_t end) const { run_tiles<16, true>(begin, end); }

  // kPermute as for RowsJob.
  template <int R, bool kPermute>
  FUSEDLOSS_INLINE void run_tiles(int64_t begin, int64_t end) const {
    // 16 rows of float32 at 16, 32, 48 or 64 classes (the tag-set sizes where ATen's vectorized log_softmax has no
    // tail and is at its fastest): the tile with its class count fixed at compile time, 8-12% faster.
    if constexpr (kFma && R == 16 && std::is_same<acc_t, float>::value && std::is_same<scalar_t, float>::value) {
      switch (prm->num_classes) {
        case 16: return run_tiles_of<R, 16, kPermute>(begin, end);
        case 32: return run_tiles_of<R, 32, kPermute>(begin, end);
        case 48: return run_tiles_of<R, 48, kPermute>(begin, end);
        case 64: return run_tiles_of<R, 64, kPermute>(begin, end);
        default: break;
      }
    }
    run_tiles_of<R, 0, kPermute>(begin, end);
  }

  template <int R, int kC, bool kPermute>
  FUSEDLOSS_INLINE void run_tiles_of(int64_t begin, int64_t end) const {
    constexpr int64_t kUnit = softmax_loss::kTileUnitRows;
    static_assert(kUnit % R == 0, "a unit is whole tiles");
    const int64_t C = prm->num_classes;
    const int64_t last = std::min(end * kUnit, num_rows);
    for (int64_t n = begin * kUnit; n < last; n += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, num_rows - n));
      const int64_t offset = row_offset(n, C);
      softmax_loss::process_row_tile<acc_t, scalar_t, R, kC, kPermute>(
          x + offset, indices + n, rows, weight, *prm, grad == nullptr ? nullptr : grad + offset, scale, losses + n);
    }
  }
};

// Over the hard targets [begin, end): *count = how many are not ignore_index, *out_of_range = how many of those
// are outside [0, C). Branch-free, in the vector ISA of the CPU (cpu/isa.h): a branch per row, or the baseline
// ISA's scalar 64-bit compares, cost 1-2 us of a 4096-row call.
struct TargetScanJob {
  const int64_t* indices;
  int64_t ignore_index;
  int64_t num_classes;
  int64_t* count;
  int64_t* out_of_range;

  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    int64_t kept_rows = 0, bad_rows = 0;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = indices[n];
      const int64_t kept = y != ignore_index;
      kept_rows += kept;
      bad_rows += kept & (static_cast<uint64_t>(y) >= static_cast<uint64_t>(num_classes));
    }
    *count = kept_rows;
    *out_of_range = bad_rows;
  }
};

template <typename scalar_t, typename target_t>
void run_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
              const softmax_loss::Params<at::opmath_type<scalar_t>>& prm, double grad_scale, at::Tensor& grad,
              at::Tensor& row_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = input.size(0);
  const int64_t C = prm.num_classes;
  const bool soft = target.is_floating_point();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t* indices = soft ? nullptr : target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  scalar_t* g = grad.numel() > 0 ? grad.data_ptr<scalar_t>() : nullptr;
  acc_t* losses = row_loss.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(grad_scale);
  const int64_t tile_max_classes =
      cpu::has_avx2_fma() ? softmax_loss::kTileMaxClasses : softmax_loss::kTileMaxClassesNarrow;
  if (!soft && softmax_loss::tile_rows_apply(prm, tile_max_classes)) {
    constexpr int64_t R = softmax_loss::kTileUnitRows;
    const int64_t tiles = (N + R - 1) / R, grain = std::max<int64_t>(1, cpu::rows_per_task(C) / R);
    if (C > 1) {
      cpu::run_parallel(TilesJob<acc_t, scalar_t, true>{x, indices, N, w, &prm, g, scale, losses}, tiles, grain);
    } else {
      cpu::run_parallel(TilesJob<acc_t, scalar_t, false>{x, indices, N, w, &prm, g, scale, losses}, tiles, grain);
    }
    return;
  }
  const target_t* probs = soft ? target.const_data_ptr<target_t>() : nullptr;
  if (C > 1) {
    cpu::run_parallel(RowsJob<acc_t, scalar_t, target_t, true>{x, indices, probs, w, &prm, g, scale, losses}, N,
                      cpu::rows_per_task(C));
  } else {
    cpu::run_parallel(RowsJob<acc_t, scalar_t, target_t, false>{x, indices, probs, w, &prm, g, scale, losses}, N,
                      cpu::rows_per_task(C));
  }
}

// The float64 sum of values[0, n) in row order, in one thread: the same result for any number of threads, and the
// same as the float64 sum of the per-row losses that token_weight's reduction takes (with all-ones weights the
// result is the reduction without them, bit for bit; another order, such as partial sums by row mod 8, broke that).
// Not inlined, so that the running sum stays in a register: inlined into the dispatch lambda, GCC added straight
// into the variable the lambda captures by reference, through memory on every add (10-12 us of a 4096-row call;
// in a register about 2 us).
template <typename T>
__attribute__((noinline)) double serial_sum_float64(const T* values, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(values[i]);
  return total;
}

std::tuple<at::Tensor, at::Tensor> softmax_loss_forward_cpu(const at::Tensor& input_arg, const at::Tensor& target_arg,
                                                            const c10::optional<at::Tensor>& weight_arg,
                                                            int64_t ignore_index, c10::string_view reduction,
                                                            double label_smoothing, double focal_gamma, double z_loss,
                                                            c10::optional<double> softcap, bool mean_by_count,
                                                            bool compute_grad, bool inplace_backward) {
  TORCH_CHECK(input_arg.dim() == 2, "softmax_loss_forward: input must be (N, C), got ", input_arg.sizes());
  TORCH_CHECK(reduction == "none" || reduction == "mean" || reduction == "sum",
              "softmax_loss_forward: reduction must be none, mean or sum, got ", reduction);
  const at::Tensor input = input_arg.contiguous();
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const bool soft = target_arg.is_floating_point();
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor target = target_arg.contiguous();
  if (soft) {
    TORCH_CHECK(target.sizes() == input.sizes(), "softmax_loss_forward: soft target must have input's shape");
    // The kernel reads probabilities in input's dtype or in the compute dtype; anything else is
    // converted once, to the compute dtype (what the reference computes in).
    if (target.scalar_type() != input.scalar_type() && target.scalar_type() != acc_type) target = target.to(acc_type);
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == N,
                "softmax_loss_forward: target must be int64 (N,)");
  }
  at::Tensor weight;
  if (weight_arg.has_value() && weight_arg->defined()) {
    weight = weight_arg->to(acc_type).contiguous();
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "softmax_loss_forward: weight must be (C,)");
  }

  // The divisor of "mean", and a bounds check of the indices before any row reads x[target].
  double divisor = static_cast<double>(N);
  if (!soft) {
    const int64_t* indices = target.const_data_ptr<int64_t>();
    const at::Tensor weight64 = weight.defined() ? weight.to(at::kDouble) : at::Tensor();
    const double* w = weight64.defined() ? weight64.const_data_ptr<double>() : nullptr;
    // Counted in int64 when every row weighs 1: a float64 sum would be a chain of dependent adds
    // (4 cycles a row, a few percent of a C = 9 call).
    const bool by_count = w == nullptr || mean_by_count;
    int64_t count = 0, out_of_range = 0;
    cpu::run(TargetScanJob{indices, ignore_index, C, &count, &out_of_range}, 0, N);
    for (int64_t n = 0; out_of_range != 0 && n < N; ++n) {
      const int64_t y = indices[n];
      TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < C), "target values must be class indices in [0, ", C,
                        ") or ignore_index=", ignore_index, ", got ", y, " at row ", n, " of the flattened target");
    }
    divisor = static_cast<double>(count);
    if (!by_count) {
      divisor = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t y = indices[n];
        if (y != ignore_index) divisor += w[y];
      }
    }
  }
  const double grad_scale = reduction == "mean" ? 1.0 / divisor : 1.0;

  at::Tensor grad;
  if (!compute_grad) {
    grad = at::empty({0}, input.options());
  } else if (inplace_backward) {
    // A new tensor over input's storage (not an autograd view of it): the caller gave it up.
    grad = at::empty({0}, input.options());
    grad.set_(input.storage(), input.storage_offset(), input.sizes(), input.strides());
  } else {
    grad = cpu::gradient_buffer(input);
  }
  at::Tensor row_loss = at::empty({N}, input.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "softmax_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    softmax_loss::Params<acc_t> prm;
    prm.num_classes = C;
    prm.ignore_index = ignore_index;
    prm.label_smoothing = static_cast<acc_t>(label_smoothing);
    prm.focal_gamma = static_cast<acc_t>(focal_gamma);
    prm.z_loss = static_cast<acc_t>(z_loss);
    prm.softcap = softcap.has_value() ? static_cast<acc_t>(*softcap) : acc_t(0);
    prm.inv_softcap = softcap.has_value() ? static_cast<acc_t>(1.0 / *softcap) : acc_t(0);
    if (soft && target.scalar_type() != input.scalar_type()) {
      run_rows<scalar_t, acc_t>(input, target, weight, prm, grad_scale, grad, row_loss);
    } else {
      run_rows<scalar_t, scalar_t>(input, target, weight, prm, grad_scale, grad, row_loss);
    }
  });

  if (reduction == "none") return {row_loss.to(input.scalar_type()), grad};
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "softmax_loss_reduce_cpu", [&] {
    total = serial_sum_float64(row_loss.const_data_ptr<scalar_t>(), N);
  });
  if (reduction == "mean") total /= divisor;
  return {at::scalar_tensor(total, input.options()), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("softmax_loss_forward", &softmax_loss_forward_cpu);
}

}  // namespace fusedloss
