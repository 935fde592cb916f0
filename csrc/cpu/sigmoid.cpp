// The cpp backend of the sigmoid and multi-label losses (docs/BACKENDS.md): one pass over the
// elements (GHM-C: a histogram pass, then one weighted pass) writes the loss and the gradient of
// the loss with respect to input (csrc/kernels/sigmoid.h), rows in parallel with at::parallel_for.
// Sums are taken per fixed chunk of rows and the chunk sums added in order, so results do not
// depend on the number of threads. Extra memory: the gradient in input's dtype, one float64 per
// chunk, and for the bi-tempered loss 2·C compute-dtype values per task.
// Target values are checked in the same pass (ValueError naming target, as the reference layer).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "kernels/sigmoid.h"

namespace fusedloss {
namespace {

using sigmoid_loss::LossGrad;

// Rows per chunk of the parallel loops and of the ordered sums: about 8K elements (4096 x 80 elements made 11
// chunks of 32K, split 6 / 5 over two threads).
int64_t rows_per_chunk(int64_t num_classes) {
  constexpr int64_t kElementsPerChunk = 8192;
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, num_classes));
}

// One chunk of rows as a job of cpu::run, so that it runs in the best vector ISA variant of this CPU (cpu/isa.h):
// the chunk lambdas and the row math are always inlined into each variant. kContract: the AVX2 and AVX-512 variants
// fuse multiply-adds (the exp and log polynomials are most of the work, and their chains of dependent multiplies
// and adds half as long), so they differ from the baseline variant in the last bits.
template <typename ChunkFn>
struct ChunkJob {
  const ChunkFn* chunk_fn;
  double* result;
  static constexpr bool kContract = true;
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const { *result = (*chunk_fn)(begin, end); }
};

// A chunk function with a second version for the AVX-512 variant (cpu/isa.h: run_wide), written on 16 float lanes.
template <typename ChunkFn, typename WideFn>
struct WideChunkJob : ChunkJob<ChunkFn> {
  const WideFn* wide_fn;
  FUSEDLOSS_INLINE void run_wide(int64_t begin, int64_t end) const { *this->result = (*wide_fn)(begin, end); }
};

// wide_fn: null, or the chunk function's version for the AVX-512 variant.
template <typename ChunkFn, typename WideFn = std::nullptr_t>
double run_chunk(const ChunkFn& chunk_fn, int64_t begin, int64_t end, const WideFn* wide_fn = nullptr) {
  double result = 0;
  if constexpr (std::is_same<WideFn, std::nullptr_t>::value) {
    cpu::run(ChunkJob<ChunkFn>{&chunk_fn, &result}, begin, end);
  } else {
    cpu::run(WideChunkJob<ChunkFn, WideFn>{{&chunk_fn, &result}, wide_fn}, begin, end);
  }
  return result;
}

// Runs chunk_fn(first_row, end_row) -> double over fixed chunks of rows in parallel and returns the
// sum of the chunk results, added in chunk order (wide_fn as for run_chunk).
template <typename ChunkFn, typename WideFn = std::nullptr_t>
double sum_over_row_chunks(int64_t num_rows, int64_t num_classes, const ChunkFn& chunk_fn,
                           const WideFn* wide_fn = nullptr) {
  const int64_t chunk_rows = rows_per_chunk(num_classes);
  const int64_t num_chunks = (num_rows + chunk_rows - 1) / chunk_rows;
  std::vector<double> partial(num_chunks, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * chunk_rows;
      partial[chunk] = run_chunk(chunk_fn, first, std::min(num_rows, first + chunk_rows), wide_fn);
    }
  });
  double total = 0;
  for (double value : partial) total += value;
  return total;
}

// The (rows, C) view of an elementwise loss's input: C = last dimension (1 for a 0-dim tensor).
int64_t last_dim(const at::Tensor& input) { return input.dim() == 0 ? 1 : input.size(-1); }

[[noreturn]] void fail_target_value(double value, const char* expected) {
  TORCH_CHECK_VALUE(false, "target values must be ", expected, ", got ", value);
}

// Targets are read in input's dtype or in the compute dtype; any other dtype (bool, integers,
// another float type) is converted once to the compute dtype.
at::Tensor target_for(const at::Tensor& target, const at::Tensor& input) {
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  if (target.scalar_type() == input.scalar_type() || target.scalar_type() == acc_type) return target.contiguous();
  return target.to(acc_type).contiguous();
}

// A weight that broadcasts to input's shape, as the kernel reads it: a per-class vector (C,) when
// it varies at most along the last dimension, otherwise materialized at input's shape.
struct BroadcastWeight {
  at::Tensor values;  // compute dtype, contiguous
  bool per_class = false;
};

BroadcastWeight broadcast_weight(const c10::optional<at::Tensor>& weight, const at::Tensor& input) {
  BroadcastWeight out;
  if (!weight.has_value() || !weight->defined()) return out;
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const int64_t C = last_dim(input);
  bool leading_ones = true;
  for (int64_t d = 0; d + 1 < weight->dim(); ++d) leading_ones = leading_ones && weight->size(d) == 1;
  if (input.dim() > 0 && leading_ones) {
    out.per_class = true;
    out.values = weight->reshape({-1}).expand({C}).to(acc_type).contiguous();
  } else {
    out.values = weight->expand(input.sizes()).to(acc_type).contiguous();
  }
  return out;
}

template <typename acc_t>
const acc_t* row_weight(const BroadcastWeight& weight, int64_t offset) {
  if (!weight.values.defined()) return nullptr;
  const acc_t* base = weight.values.const_data_ptr<acc_t>();
  return weight.per_class ? base : base + offset;
}

std::tuple<at::Tensor, at::Tensor> finish(const at::Tensor& input, c10::string_view reduction, double total,
                                          double count, at::Tensor loss_none, at::Tensor grad) {
  if (reduction == "none") return {loss_none, grad};
  if (reduction == "mean") total /= count;
  return {at::scalar_tensor(total, input.options()), grad};
}

at::Tensor new_grad(const at::Tensor& input, bool compute_grad) {
  return compute_grad ? cpu::gradient_buffer(input) : at::empty({0}, input.options());
}

// ---------------------------------------------------------------------------------------------
// Elementwise losses: binary_cross_entropy_with_logits, sigmoid_focal_loss
// ---------------------------------------------------------------------------------------------

// Elements per block of a row: the block's losses stay in a local buffer (L1) and are summed in
// kLanes independent partial sums, so that the loop over the block is straight vector code.
constexpr int64_t kBlock = 256;
constexpr int kLanes = 8;

template <typename acc_t>
FUSEDLOSS_INLINE double lane_sum(const acc_t* values, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += values[i + k];
  // The lanes added pairwise (a chain of 8 dependent float64 adds was 10 % of a 4096 x 80 BCE call).
  double total = ((double(lanes[0]) + double(lanes[1])) + (double(lanes[2]) + double(lanes[3]))) +
                 ((double(lanes[4]) + double(lanes[5])) + (double(lanes[6]) + double(lanes[7])));
  static_assert(kLanes == 8, "the pairwise sum above adds 8 lanes");
  for (; i < len; ++i) total += values[i];
  return total;
}

#ifdef FUSEDLOSS_CPU_AVX2
// K vectors of 16 elements of elementwise_pass's AVX-512 path: lanes() on them, the losses added to sum (and
// written to loss_out unless null), the gradient times scale written to g (kGrad), the least and the largest y
// kept in low and high (NaN is neither, as in the element loop's test). Selects, not a mask of comparisons: GCC
// lowered `mask |= (y < 0) | (y > 1)` to 32 scalar compares per vector here.
template <int K, bool kGrad, typename Lanes>
FUSEDLOSS_INLINE void lanes_step(const Lanes& lanes, const float* x, const float* y, const float* w, const float* pw,
                                 float scale, float* loss_out, float* g, FloatLanes<16>::type& sum,
                                 FloatLanes<16>::type& low, FloatLanes<16>::type& high) {
  typedef FloatLanes<16>::type V;
  V xv[K], yv[K], wv[K], pwv[K], loss[K], gv[K];
  FUSEDLOSS_EACH(k, K) {
    std::memcpy(&xv[k], x + 16 * k, sizeof(V));
    std::memcpy(&yv[k], y + 16 * k, sizeof(V));
    std::memcpy(&wv[k], w + 16 * k, sizeof(V));
    std::memcpy(&pwv[k], pw + 16 * k, sizeof(V));
    low = yv[k] < low ? yv[k] : low;
    high = yv[k] > high ? yv[k] : high;
  }
  lanes(xv, yv, wv, pwv, loss, gv);
  FUSEDLOSS_EACH(k, K) {
    sum += loss[k];
    if (loss_out != nullptr) std::memcpy(loss_out + 16 * k, &loss[k], sizeof(V));
    if constexpr (kGrad) {
      const V scaled = gv[k] * scale;
      std::memcpy(g + 16 * k, &scaled, sizeof(V));
    }
  }
}
#endif

// One pass over (rows, C): element(x, y, w, pos_weight) -> LossGrad, with the two broadcast weights
// (1 where absent); writes the loss (reduction none) and, with kGrad, the gradient times
// grad_scale; checks 0 <= y <= 1; calls on_row(n, row sum) and returns the sum of every loss.
// lanes: null, or element on 16 float lanes for float32 input and target in the AVX-512 variant:
// lanes(x, y, w, pos_weight, loss, grad) on arrays of K vectors (1 to 4) at once.
template <bool kGrad, typename scalar_t, typename target_t, typename Element, typename OnRow,
          typename Lanes = std::nullptr_t>
double elementwise_pass(const at::Tensor& input, const at::Tensor& target, const BroadcastWeight& weight,
                        const BroadcastWeight& pos_weight, const Element& element, double grad_scale,
                        at::Tensor& loss_none, at::Tensor& grad, const OnRow& on_row, const Lanes& lanes = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = last_dim(input);
  const int64_t rows = C == 0 ? 0 : input.numel() / C;
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const target_t* y = target.const_data_ptr<target_t>();
  scalar_t* loss_out = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
  scalar_t* g = kGrad ? grad.data_ptr<scalar_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(grad_scale);
  // An absent weight reads a row of ones: the block loop has no branch.
  const std::vector<acc_t> ones(weight.values.defined() && pos_weight.values.defined() ? 0 : C, acc_t(1));
  auto check_row = [&](int64_t offset) {
    for (int64_t c = 0; c < C; ++c) {
      const double yv = static_cast<double>(y[offset + c]);
      if (yv < 0 || yv > 1) fail_target_value(yv, "in [0, 1]");
    }
  };
  auto chunk = [&](int64_t first, int64_t end) FUSEDLOSS_LAMBDA_INLINE {
    acc_t loss_block[kBlock];
    double chunk_sum = 0;
    for (int64_t n = first; n < end; ++n) {
      const int64_t offset = row_offset(n, C);
      const acc_t* w = weight.values.defined() ? row_weight<acc_t>(weight, offset) : ones.data();
      const acc_t* pw = pos_weight.values.defined() ? row_weight<acc_t>(pos_weight, offset) : ones.data();
      double row_sum = 0;  // float64: the sum of a long row keeps float32 precision
      int out_of_range = 0;
      for (int64_t start = 0; start < C; start += kBlock) {
        const int64_t len = std::min(kBlock, C - start);
        const scalar_t* xb = x + offset + start;
        const target_t* yb = y + offset + start;
        const acc_t* wb = w + start;
        const acc_t* pwb = pw + start;
        scalar_t* gb = kGrad ? g + offset + start : nullptr;
        for (int64_t i = 0; i < len; ++i) {
          const acc_t yv = static_cast<acc_t>(yb[i]);
          out_of_range += (yv < acc_t(0)) | (yv > acc_t(1));
          const LossGrad<acc_t> r = element(static_cast<acc_t>(xb[i]), yv, wb[i], pwb[i]);
          loss_block[i] = r.loss;
          if constexpr (kGrad) gb[i] = static_cast<scalar_t>(r.grad * scale);
        }
        if (loss_out != nullptr)
          for (int64_t i = 0; i < len; ++i) loss_out[offset + start + i] = static_cast<scalar_t>(loss_block[i]);
        row_sum += lane_sum(loss_block, len);
      }
      if (out_of_range != 0) check_row(offset);
      on_row(n, row_sum);
      chunk_sum += row_sum;
    }
    return chunk_sum;
  };
#ifdef FUSEDLOSS_CPU_AVX2
  if constexpr (!std::is_same<Lanes, std::nullptr_t>::value && std::is_same<scalar_t, float>::value &&
                std::is_same<target_t, float>::value) {
    typedef FloatLanes<16>::type V;
    auto wide_chunk = [&](int64_t first, int64_t end) FUSEDLOSS_LAMBDA_INLINE {
      double chunk_sum = 0;
      for (int64_t n = first; n < end; ++n) {
        const int64_t offset = row_offset(n, C);
        const float* w = weight.values.defined() ? row_weight<float>(weight, offset) : ones.data();
        const float* pw = pos_weight.values.defined() ? row_weight<float>(pos_weight, offset) : ones.data();
        double row_sum = 0;  // float64, as in chunk
        V low = {}, high = V{} + 1.0f;  // the least and the largest target of the row, 0 and 1 to start
        int tail_out_of_range = 0;
        for (int64_t start = 0; start < C; start += kBlock) {
          const int64_t len = std::min(kBlock, C - start);
          const int64_t at = offset + start;
          V sum = {};
          int64_t i = 0;
          // K whole vectors from element i on, side by side.
          auto vectors = [&](auto k_vectors) FUSEDLOSS_LAMBDA_INLINE {
            constexpr int K = decltype(k_vectors)::value;
            lanes_step<K, kGrad>(lanes, x + at + i, y + at + i, w + start + i, pw + start + i, scale,
                                 loss_out == nullptr ? nullptr : loss_out + at + i, kGrad ? g + at + i : nullptr, sum,
                                 low, high);
            i += 16 * K;
          };
          while (i + 64 <= len) vectors(std::integral_constant<int, 4>());
          switch ((len - i) / 16) {  // the last 1 to 3
            case 3: vectors(std::integral_constant<int, 3>()); break;
            case 2: vectors(std::integral_constant<int, 2>()); break;
            case 1: vectors(std::integral_constant<int, 1>()); break;
            default: break;
          }
          float tail = 0;
          for (; i < len; ++i) {
            const float yv = y[at + i];
            tail_out_of_range += (yv < 0.0f) | (yv > 1.0f);
            const LossGrad<float> r = element(x[at + i], yv, w[start + i], pw[start + i]);
            tail += r.loss;
            if (loss_out != nullptr) loss_out[at + i] = r.loss;
            if constexpr (kGrad) g[at + i] = r.grad * scale;
          }
          // The 16 lanes as 8 (halves added, one vector operation), then pairwise in float64 as lane_sum.
          typedef float Half __attribute__((vector_size(32)));
          const Half half = __builtin_shufflevector(sum, sum, 0, 1, 2, 3, 4, 5, 6, 7) +
                            __builtin_shufflevector(sum, sum, 8, 9, 10, 11, 12, 13, 14, 15);
          float lanes8[8];
          std::memcpy(lanes8, &half, sizeof(lanes8));
          row_sum += lane_sum(lanes8, 8) + tail;
        }
        // Lane reductions, then one test (lane by lane, GCC compared 32 scalars).
        const float least = -softmax_loss::reduce_lanes<true, 16>(-low);
        const float largest = softmax_loss::reduce_lanes<true, 16>(high);
        if (tail_out_of_range != 0 || least < 0.0f || largest > 1.0f) check_row(offset);
        on_row(n, row_sum);
        chunk_sum += row_sum;
      }
      return chunk_sum;
    };
    return sum_over_row_chunks(rows, C, chunk, &wide_chunk);
  }
#endif
  return sum_over_row_chunks(rows, C, chunk);
}

// elementwise_pass with and without the gradient (none is computed when it is not wanted).
template <typename scalar_t, typename target_t, typename Element, typename OnRow, typename Lanes = std::nullptr_t>
double elementwise(const at::Tensor& input, const at::Tensor& target, const BroadcastWeight& weight,
                   const BroadcastWeight& pos_weight, const Element& element, double grad_scale,
                   at::Tensor& loss_none, at::Tensor& grad, const OnRow& on_row, const Lanes& lanes = nullptr) {
  if (grad.numel() > 0)
    return elementwise_pass<true, scalar_t, target_t>(input, target, weight, pos_weight, element, grad_scale,
                                                      loss_none, grad, on_row, lanes);
  return elementwise_pass<false, scalar_t, target_t>(input, target, weight, pos_weight, element, grad_scale,
                                                     loss_none, grad, on_row, lanes);
}

constexpr auto kNoRowCallback = [](int64_t, double) FUSEDLOSS_LAMBDA_INLINE {};

// Dispatches input's dtype and target's (input's or the compute dtype) and runs fn<scalar_t, target_t>().
template <typename Fn>
void dispatch_input_and_target(const at::Tensor& input, const at::Tensor& target, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sigmoid_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (target.scalar_type() == input.scalar_type()) {
      fn(scalar_t(), scalar_t());
    } else {
      fn(scalar_t(), acc_t());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_forward_cpu(const at::Tensor& input_arg, const at::Tensor& target_arg,
                                                               const c10::optional<at::Tensor>& weight_arg,
                                                               const c10::optional<at::Tensor>& pos_weight_arg,
                                                               c10::string_view reduction, bool compute_grad) {
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_for(target_arg, input);
  const BroadcastWeight weight = broadcast_weight(weight_arg, input);
  const BroadcastWeight pos_weight = broadcast_weight(pos_weight_arg, input);
  const double count = static_cast<double>(input.numel());
  at::Tensor grad = new_grad(input, compute_grad);
  at::Tensor loss_none = reduction == "none" ? at::empty_like(input, at::MemoryFormat::Contiguous) : at::Tensor();
  double total = 0;
  dispatch_input_and_target(input, target, [&](auto scalar, auto target_value) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(target_value);
    using acc_t = at::opmath_type<scalar_t>;
    auto element = [](acc_t x, acc_t y, acc_t w, acc_t pw) FUSEDLOSS_LAMBDA_INLINE {
      const LossGrad<acc_t> r = sigmoid_loss::bce(x, y, pw);
      return LossGrad<acc_t>{w * r.loss, w * r.grad};
    };
    auto lanes = [](const auto& x, const auto& y, const auto& w, const auto& pw, auto& loss,
                    auto& grad) FUSEDLOSS_LAMBDA_INLINE { sigmoid_loss::bce_lanes16(x, y, w, pw, loss, grad); };
    total = elementwise<scalar_t, target_t>(input, target, weight, pos_weight, element,
                                            reduction == "mean" ? 1.0 / count : 1.0, loss_none, grad, kNoRowCallback,
                                            lanes);
  });
  return finish(input, reduction, total, count, loss_none, grad);
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_forward_cpu(const at::Tensor& input_arg,
                                                                  const at::Tensor& target_arg, double alpha,
                                                                  double gamma, c10::string_view reduction,
                                                                  bool compute_grad) {
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_for(target_arg, input);
  const double count = static_cast<double>(input.numel());
  at::Tensor grad = new_grad(input, compute_grad);
  at::Tensor loss_none = reduction == "none" ? at::empty_like(input, at::MemoryFormat::Contiguous) : at::Tensor();
  double total = 0;
  dispatch_input_and_target(input, target, [&](auto scalar, auto target_value) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(target_value);
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = static_cast<acc_t>(alpha);
    const acc_t g = static_cast<acc_t>(gamma);
    const double grad_scale = reduction == "mean" ? 1.0 / count : 1.0;
    auto run = [&](auto power) {
      auto element = [&](acc_t x, acc_t y, acc_t, acc_t) FUSEDLOSS_LAMBDA_INLINE {
        return sigmoid_loss::sigmoid_focal<decltype(power)::value>(x, y, a, g);
      };
      total = elementwise<scalar_t, target_t>(input, target, BroadcastWeight(), BroadcastWeight(), element,
                                              grad_scale, loss_none, grad, kNoRowCallback);
    };
    using sigmoid_loss::FocalPower;
    if (gamma == 0) {
      run(std::integral_constant<FocalPower, FocalPower::kNone>());
    } else if (gamma == 2) {
      run(std::integral_constant<FocalPower, FocalPower::kSquare>());
    } else {
      run(std::integral_constant<FocalPower, FocalPower::kGeneral>());
    }
  });
  return finish(input, reduction, total, count, loss_none, grad);
}

// ---------------------------------------------------------------------------------------------
// Row losses: multilabel_soft_margin_loss, multilabel_categorical_crossentropy (ZLPR)
// ---------------------------------------------------------------------------------------------

// Runs row_fn(n, offset) -> row loss (acc_t) over the rows of (N, C); writes the (N,) losses for
// reduction none and returns the sum.
template <typename scalar_t, typename RowFn>
double row_pass(int64_t N, int64_t C, const RowFn& row_fn, at::Tensor& loss_none) {
  scalar_t* loss_out = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
  return sum_over_row_chunks(N, C, [&](int64_t first, int64_t end) FUSEDLOSS_LAMBDA_INLINE {
    double chunk_sum = 0;
    for (int64_t n = first; n < end; ++n) {
      const auto loss = row_fn(n, row_offset(n, C));
      if (loss_out != nullptr) loss_out[n] = static_cast<scalar_t>(loss);
      chunk_sum += static_cast<double>(loss);
    }
    return chunk_sum;
  });
}

at::Tensor new_row_losses(const at::Tensor& input, c10::string_view reduction) {
  return reduction == "none" ? at::empty(input.sizes().slice(0, input.dim() - 1), input.options()) : at::Tensor();
}

// Per row: l = (1/C) Σ_c w_c BCE(x_c, y_c),  dl/dx_c = w_c (σ(x_c) − y_c) / C: the elementwise pass
// with a per-class weight, each row's sum divided by C.
std::tuple<at::Tensor, at::Tensor> multilabel_soft_margin_loss_forward_cpu(const at::Tensor& input_arg,
                                                                           const at::Tensor& target_arg,
                                                                           const c10::optional<at::Tensor>& weight_arg,
                                                                           c10::string_view reduction,
                                                                           bool compute_grad) {
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_for(target_arg, input);
  const int64_t C = input.size(-1);
  const int64_t N = C == 0 ? 0 : input.numel() / C;
  const BroadcastWeight weight = broadcast_weight(weight_arg, input);
  at::Tensor grad = new_grad(input, compute_grad);
  at::Tensor loss_none = new_row_losses(input, reduction);
  at::Tensor elementwise_none;  // not written: rows are reduced
  double total = 0;
  dispatch_input_and_target(input, target, [&](auto scalar, auto tv) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* row_losses = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
    const double inv_c = 1.0 / static_cast<double>(C);
    auto element = [](acc_t x, acc_t y, acc_t w, acc_t) FUSEDLOSS_LAMBDA_INLINE {
      const LossGrad<acc_t> r = sigmoid_loss::bce(x, y, acc_t(1));
      return LossGrad<acc_t>{w * r.loss, w * r.grad};
    };
    auto on_row = [&](int64_t n, double row_sum) FUSEDLOSS_LAMBDA_INLINE {
      if (row_losses != nullptr) row_losses[n] = static_cast<scalar_t>(row_sum * inv_c);
    };
    const double grad_scale = (reduction == "mean" ? 1.0 / static_cast<double>(N) : 1.0) * inv_c;
    total = elementwise<scalar_t, target_t>(input, target, weight, BroadcastWeight(), element, grad_scale,
                                            elementwise_none, grad, on_row) * inv_c;
  });
  return finish(input, reduction, total, static_cast<double>(N), loss_none, grad);
}

// Per row, two running log-sum-exps (negatives: s, positives: −s), each seeded with the implicit 0:
//   l = lse_neg + lse_pos,   dl/ds_c = exp(v_c − lse_group(c)) · (−1 for positives)
std::tuple<at::Tensor, at::Tensor> multilabel_categorical_crossentropy_forward_cpu(const at::Tensor& input_arg,
                                                                                   const at::Tensor& target_arg,
                                                                                   c10::string_view reduction,
                                                                                   bool compute_grad) {
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_for(target_arg, input);
  const int64_t C = input.size(-1);
  const int64_t N = C == 0 ? 0 : input.numel() / C;
  at::Tensor grad = new_grad(input, compute_grad);
  at::Tensor loss_none = new_row_losses(input, reduction);
  double total = 0;
  dispatch_input_and_target(input, target, [&](auto scalar, auto tv) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const target_t* y = target.const_data_ptr<target_t>();
    scalar_t* g = grad.numel() > 0 ? grad.data_ptr<scalar_t>() : nullptr;
    const acc_t scale = static_cast<acc_t>(reduction == "mean" ? 1.0 / static_cast<double>(N) : 1.0);
    auto row = [&](int64_t, int64_t offset) FUSEDLOSS_LAMBDA_INLINE {
      // Per block: the values v and a 0/1 mask of the positives, the block's two maxima (which
      // rescale the running sums once), then the exps in straight vector code.
      sigmoid_loss::RunningLogSumExp<acc_t> negatives, positives;
      acc_t v[kBlock];
      acc_t positive_mask[kBlock];
      int not_binary = 0;
      for (int64_t start = 0; start < C; start += kBlock) {
        const int64_t len = std::min(kBlock, C - start);
        acc_t neg_lanes[kLanes], pos_lanes[kLanes];
        for (int k = 0; k < kLanes; ++k) neg_lanes[k] = pos_lanes[k] = Limits<acc_t>::large_negative;
        for (int64_t i = 0; i < len; ++i) {
          const acc_t yv = static_cast<acc_t>(y[offset + start + i]);
          const bool positive = yv == acc_t(1);
          not_binary += !(positive || yv == acc_t(0));
          positive_mask[i] = positive ? acc_t(1) : acc_t(0);
          v[i] = sigmoid_loss::zlpr_value(static_cast<acc_t>(x[offset + start + i]), positive);
        }
        int64_t i = 0;
        for (; i + kLanes <= len; i += kLanes) {
          for (int k = 0; k < kLanes; ++k) {
            const bool positive = positive_mask[i + k] != acc_t(0);
            neg_lanes[k] = !positive && v[i + k] > neg_lanes[k] ? v[i + k] : neg_lanes[k];
            pos_lanes[k] = positive && v[i + k] > pos_lanes[k] ? v[i + k] : pos_lanes[k];
          }
        }
        acc_t neg_max = Limits<acc_t>::large_negative;
        acc_t pos_max = Limits<acc_t>::large_negative;
        for (int k = 0; k < kLanes; ++k) {
          neg_max = max_of(neg_max, neg_lanes[k]);
          pos_max = max_of(pos_max, pos_lanes[k]);
        }
        for (; i < len; ++i) {
          if (positive_mask[i] != acc_t(0)) {
            pos_max = max_of(pos_max, v[i]);
          } else {
            neg_max = max_of(neg_max, v[i]);
          }
        }
        negatives.rescale_to(neg_max);
        positives.rescale_to(pos_max);
        const acc_t neg_shift = negatives.max;
        const acc_t pos_shift = positives.max;
        for (int64_t j = 0; j < len; ++j) {
          v[j] = sigmoid_loss::fast_exp(v[j] - (positive_mask[j] != acc_t(0) ? pos_shift : neg_shift));
        }
        for (int k = 0; k < kLanes; ++k) neg_lanes[k] = pos_lanes[k] = acc_t(0);
        int64_t j = 0;
        for (; j + kLanes <= len; j += kLanes) {
          for (int k = 0; k < kLanes; ++k) {
            pos_lanes[k] += v[j + k] * positive_mask[j + k];
            neg_lanes[k] += v[j + k] - v[j + k] * positive_mask[j + k];
          }
        }
        for (; j < len; ++j) {
          pos_lanes[0] += v[j] * positive_mask[j];
          neg_lanes[0] += v[j] - v[j] * positive_mask[j];
        }
        for (int k = 0; k < kLanes; ++k) {
          negatives.sum += neg_lanes[k];
          positives.sum += pos_lanes[k];
        }
      }
      if (not_binary != 0) {
        for (int64_t c = 0; c < C; ++c) {
          const double yv = static_cast<double>(y[offset + c]);
          if (yv != 0 && yv != 1) fail_target_value(yv, "0 or 1 (multi-hot)");
        }
      }
      // exp((v − max) − log sum): the group's max subtracted first, so the exponent keeps its precision.
      const acc_t log_sum_neg = std::log(negatives.sum);
      const acc_t log_sum_pos = std::log(positives.sum);
      if (g != nullptr) {
        for (int64_t c = 0; c < C; ++c) {
          const bool positive = static_cast<acc_t>(y[offset + c]) == acc_t(1);
          const acc_t v = sigmoid_loss::zlpr_value(static_cast<acc_t>(x[offset + c]), positive);
          const acc_t e = sigmoid_loss::fast_exp(positive ? (v - positives.max) - log_sum_pos
                                                          : (v - negatives.max) - log_sum_neg);
          g[offset + c] = static_cast<scalar_t>((positive ? -e : e) * scale);
        }
      }
      const acc_t lse_neg = negatives.max + log_sum_neg;
      const acc_t lse_pos = positives.max + log_sum_pos;
      return lse_neg + lse_pos;
    };
    total = row_pass<scalar_t>(N, C, row, loss_none);
  });
  return finish(input, reduction, total, static_cast<double>(N), loss_none, grad);
}

// ---------------------------------------------------------------------------------------------
// GHM-C
// ---------------------------------------------------------------------------------------------

// Pass 1: histogram of g = |σ(x) − y| over the valid entries (per chunk, merged in order). Then the
// authors' density weights tot / acc_i / n. Pass 2: loss Σ w·BCE / tot and its gradient w·dBCE/tot.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ghmc_loss_forward_cpu(const at::Tensor& input_arg,
                                                                     const at::Tensor& target_arg,
                                                                     const c10::optional<at::Tensor>& valid_arg,
                                                                     int64_t bins, double momentum,
                                                                     const at::Tensor& acc_sum, bool compute_grad) {
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_for(target_arg, input);
  at::Tensor valid;
  if (valid_arg.has_value() && valid_arg->defined()) valid = valid_arg->to(at::kBool).contiguous();
  const int64_t C = last_dim(input);
  const int64_t rows = C == 0 ? 0 : input.numel() / C;
  const int64_t chunk_rows = rows_per_chunk(C);
  const int64_t num_chunks = (rows + chunk_rows - 1) / chunk_rows;
  at::Tensor grad = new_grad(input, compute_grad);
  at::Tensor new_acc_sum = acc_sum.to(at::kFloat).contiguous().clone();
  double loss = 0;
  dispatch_input_and_target(input, target, [&](auto scalar, auto tv) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const target_t* y = target.const_data_ptr<target_t>();
    const bool* is_valid = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
    std::vector<acc_t> edges(bins + 1);
    for (int64_t i = 0; i <= bins; ++i) edges[i] = static_cast<acc_t>(static_cast<float>(i) / static_cast<float>(bins));
    edges[bins] = static_cast<acc_t>(static_cast<float>(edges[bins]) + 1e-6f);
    const int num_bins = static_cast<int>(bins);
    // |σ(x) − y| of a block into norm (straight vector code), and the block's target range check.
    auto gradient_norms = [&](int64_t start, int64_t len, acc_t* norm) FUSEDLOSS_LAMBDA_INLINE {
      int out_of_range = 0;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t yv = static_cast<acc_t>(y[start + i]);
        out_of_range += (yv < acc_t(0)) | (yv > acc_t(1));
        norm[i] = std::fabs(sigmoid_loss::logistic(static_cast<acc_t>(x[start + i])).sigmoid - yv);
      }
      if (out_of_range != 0) {
        for (int64_t i = 0; i < len; ++i) {
          const double yv = static_cast<double>(y[start + i]);
          if (yv < 0 || yv > 1) fail_target_value(yv, "in [0, 1]");
        }
      }
    };
    // Pass 1: per-chunk counts (bins of them, the number of valid entries, and a dropped slot).
    std::vector<int64_t> counts(num_chunks * (bins + 2), 0);
    auto count_chunk = [&](int64_t chunk, int64_t) FUSEDLOSS_LAMBDA_INLINE {
      acc_t norm[kBlock];
      int64_t* count = counts.data() + chunk * (bins + 2);
      const int64_t first = row_offset(chunk * chunk_rows, C);
      const int64_t last = row_offset(std::min(rows, (chunk + 1) * chunk_rows), C);
      for (int64_t start = first; start < last; start += kBlock) {
        const int64_t len = std::min(kBlock, last - start);
        gradient_norms(start, len, norm);
        for (int64_t i = 0; i < len; ++i) {
          // Entries in no bin count in slot bins + 1, which is dropped: no branch.
          const bool counted = is_valid == nullptr || is_valid[start + i];
          const int bin = sigmoid_loss::ghmc_bin(norm[i], edges.data(), num_bins);
          count[bins] += counted;
          ++count[counted && bin >= 0 ? bin : bins + 1];
        }
      }
      return 0.0;
    };
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) run_chunk(count_chunk, chunk, chunk + 1);
    });
    std::vector<int64_t> bin_count(bins + 1, 0);
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk)
      for (int64_t b = 0; b <= bins; ++b) bin_count[b] += counts[chunk * (bins + 2) + b];
    const acc_t tot = std::max<acc_t>(static_cast<acc_t>(bin_count[bins]), acc_t(1));
    int64_t non_empty = 0;
    for (int64_t b = 0; b < bins; ++b) non_empty += bin_count[b] > 0;
    float* acc = new_acc_sum.data_ptr<float>();
    const float keep = static_cast<float>(momentum);
    const float take = static_cast<float>(1.0 - momentum);
    std::vector<acc_t> bin_weight(bins, acc_t(0));
    for (int64_t b = 0; b < bins; ++b) {
      if (bin_count[b] == 0) continue;
      acc_t density = static_cast<acc_t>(bin_count[b]);
      if (momentum > 0) {
        acc[b] = keep * acc[b] + take * static_cast<float>(bin_count[b]);
        density = max_of(static_cast<acc_t>(acc[b]), Limits<acc_t>::tiny);
      }
      bin_weight[b] = tot / density / static_cast<acc_t>(std::max<int64_t>(non_empty, 1));
    }
    // Pass 2: weighted BCE and its gradient; the bins looked up per element, the rest vector code.
    scalar_t* g = grad.numel() > 0 ? grad.data_ptr<scalar_t>() : nullptr;
    const acc_t inv_tot = acc_t(1) / tot;
    loss = sum_over_row_chunks(rows, C, [&](int64_t first_row, int64_t end_row) FUSEDLOSS_LAMBDA_INLINE {
      acc_t norm[kBlock], weighted_loss[kBlock], weight[kBlock];
      double chunk_sum = 0;
      const int64_t first = row_offset(first_row, C);
      const int64_t last = row_offset(end_row, C);
      for (int64_t start = first; start < last; start += kBlock) {
        const int64_t len = std::min(kBlock, last - start);
        gradient_norms(start, len, norm);
        for (int64_t i = 0; i < len; ++i) {
          const bool counted = is_valid == nullptr || is_valid[start + i];
          const int bin = sigmoid_loss::ghmc_bin(norm[i], edges.data(), num_bins);
          const acc_t bin_w = bin_weight[bin >= 0 ? bin : 0];
          weight[i] = counted && bin >= 0 ? bin_w : acc_t(0);
        }
        // Two copies of the loop, so that neither has a branch in it.
        if (g != nullptr) {
          for (int64_t i = 0; i < len; ++i) {
            const LossGrad<acc_t> r = sigmoid_loss::bce(static_cast<acc_t>(x[start + i]),
                                                        static_cast<acc_t>(y[start + i]), acc_t(1));
            weighted_loss[i] = weight[i] * r.loss;
            g[start + i] = static_cast<scalar_t>(weight[i] * r.grad * inv_tot);
          }
        } else {
          for (int64_t i = 0; i < len; ++i) {
            const LossGrad<acc_t> r = sigmoid_loss::bce(static_cast<acc_t>(x[start + i]),
                                                        static_cast<acc_t>(y[start + i]), acc_t(1));
            weighted_loss[i] = weight[i] * r.loss;
          }
        }
        chunk_sum += lane_sum(weighted_loss, len);
      }
      return chunk_sum;
    }) / static_cast<double>(tot);
  });
  return {at::scalar_tensor(loss, input.options()), new_acc_sum, grad};
}

// ---------------------------------------------------------------------------------------------
// Bi-tempered logistic loss
// ---------------------------------------------------------------------------------------------

// Index targets: q is (1 − ε) on the true class and ε/(C − 1) elsewhere, the same for every row.
struct IndexLabels {
  int64_t label;
  double hot, cold, hot_term, cold_term;
  double q(int64_t c) const { return c == label ? hot : cold; }
  double term(int64_t c) const { return c == label ? hot_term : cold_term; }
#ifdef FUSEDLOSS_CPU_AVX2
  // q and A(q) of classes c0 .. c0 + 7 (sigmoid_loss::bi_tempered_row_lanes).
  FUSEDLOSS_INLINE void lanes(int64_t c0, sigmoid_loss::Doubles8& q_out, sigmoid_loss::Doubles8& term_out) const {
    sigmoid_loss::Longs8 index;
    for (int k = 0; k < 8; ++k) index[k] = c0 + k;
    const sigmoid_loss::Longs8 is_label = index == label;
    q_out = is_label ? sigmoid_loss::Doubles8{} + hot : sigmoid_loss::Doubles8{} + cold;
    term_out = is_label ? sigmoid_loss::Doubles8{} + hot_term : sigmoid_loss::Doubles8{} + cold_term;
  }
#endif
};

// Probability targets, smoothed as q ← a·t + b (a = 1 − C/(C−1)·ε, b = ε/(C−1)).
template <typename target_t>
struct ProbabilityLabels {
  const target_t* probs;
  double a, b, t1;
  int64_t num_classes;
  double q(int64_t c) const { return a * static_cast<double>(probs[c]) + b; }
  double term(int64_t c) const { return sigmoid_loss::bi_tempered_target_term(q(c), t1); }
#ifdef FUSEDLOSS_CPU_AVX2
  // q and A(q) of classes c0 .. c0 + 7, 0 past the row (sigmoid_loss::bi_tempered_row_lanes).
  FUSEDLOSS_INLINE void lanes(int64_t c0, sigmoid_loss::Doubles8& q_out, sigmoid_loss::Doubles8& term_out) const {
    sigmoid_loss::Doubles8 t = {};
    for (int k = 0; k < 8 && c0 + k < num_classes; ++k) t[k] = static_cast<double>(probs[c0 + k]);
    q_out = a * t + b;
    term_out = sigmoid_loss::bi_tempered_target_term_lanes<sigmoid_loss::Doubles8, sigmoid_loss::Longs8>(q_out, t1);
  }
#endif
};

std::tuple<at::Tensor, at::Tensor> bi_tempered_logistic_loss_forward_cpu(const at::Tensor& input_arg,
                                                                         const at::Tensor& target_arg, double t1,
                                                                         double t2, double label_smoothing,
                                                                         int64_t num_iters, c10::string_view reduction,
                                                                         bool compute_grad) {
  const at::Tensor input = input_arg.contiguous();
  const bool soft = target_arg.is_floating_point();
  const at::Tensor target = soft ? target_for(target_arg, input) : target_arg.contiguous();
  const int64_t C = input.size(-1);
  const int64_t N = C == 0 ? 0 : input.numel() / C;
  at::Tensor grad = new_grad(input, compute_grad);
  at::Tensor loss_none = new_row_losses(input, reduction);
  // The authors' smoothing, formed in float64 as the reference's Python scalars.
  const double smooth_scale = label_smoothing > 0 ? 1.0 - static_cast<double>(C) / (C - 1) * label_smoothing : 1.0;
  const double smooth_shift = label_smoothing > 0 ? label_smoothing / (C - 1) : 0.0;
  double total = 0;
  dispatch_input_and_target(input, target, [&](auto scalar, auto tv) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* g = grad.numel() > 0 ? grad.data_ptr<scalar_t>() : nullptr;
    const double scale = reduction == "mean" ? 1.0 / static_cast<double>(N) : 1.0;
    const sigmoid_loss::BiTemperedParams<acc_t> prm(t1, t2, static_cast<int>(num_iters), C);
    const double hot = smooth_scale + smooth_shift;
    const double hot_term = sigmoid_loss::bi_tempered_target_term(hot, t1);
    const double cold_term = sigmoid_loss::bi_tempered_target_term(smooth_shift, t1);
    // Rows [first, end), with bi_tempered_row_lanes when `wide` (the AVX-512 variant, float32 compute).
    auto rows = [&](auto wide, int64_t first, int64_t end) FUSEDLOSS_LAMBDA_INLINE {
      const int64_t buffer = decltype(wide)::value ? sigmoid_loss::bi_tempered_padded_classes(C) : C;
      std::vector<acc_t> shifted(buffer);
      std::vector<double> sweep(2 * buffer);
      scalar_t* loss_out = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
      double chunk_sum = 0;
      auto row = [&](const scalar_t* x_row, const auto& labels, scalar_t* g_row) FUSEDLOSS_LAMBDA_INLINE {
#ifdef FUSEDLOSS_CPU_AVX2
        if constexpr (decltype(wide)::value) {
          return sigmoid_loss::bi_tempered_row_lanes(x_row, labels, prm, shifted.data(), sweep.data(), g_row, scale);
        }
#endif
        return sigmoid_loss::bi_tempered_row(x_row, labels, prm, shifted.data(), sweep.data(), g_row, scale);
      };
      for (int64_t n = first; n < end; ++n) {
        const int64_t offset = row_offset(n, C);
        scalar_t* g_row = g == nullptr ? nullptr : g + offset;
        double row_loss;
        if (soft) {
          const ProbabilityLabels<target_t> labels{target.const_data_ptr<target_t>() + offset, smooth_scale,
                                                   smooth_shift, t1, C};
          row_loss = row(x + offset, labels, g_row);
        } else {
          const int64_t label = target.const_data_ptr<int64_t>()[n];
          TORCH_CHECK_VALUE(label >= 0 && label < C, "target values must be class indices in [0, ", C, "), got ",
                            label, " at row ", n);
          const IndexLabels labels{label, hot, smooth_shift, hot_term, cold_term};
          row_loss = row(x + offset, labels, g_row);
        }
        if (loss_out != nullptr) loss_out[n] = static_cast<scalar_t>(row_loss);
        chunk_sum += row_loss;
      }
      return chunk_sum;
    };
    auto chunk = [&](int64_t first, int64_t end) FUSEDLOSS_LAMBDA_INLINE {
      return rows(std::false_type(), first, end);
    };
#ifdef FUSEDLOSS_CPU_AVX2
    if constexpr (std::is_same<acc_t, float>::value) {
      auto wide_chunk = [&](int64_t first, int64_t end) FUSEDLOSS_LAMBDA_INLINE {
        return rows(std::true_type(), first, end);
      };
      total = sum_over_row_chunks(N, C, chunk, &wide_chunk);
      return;
    }
#endif
    total = sum_over_row_chunks(N, C, chunk);
  });
  return finish(input, reduction, total, static_cast<double>(N), loss_none, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("binary_cross_entropy_with_logits_forward", &bce_with_logits_forward_cpu);
  m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward_cpu);
  m.impl("multilabel_soft_margin_loss_forward", &multilabel_soft_margin_loss_forward_cpu);
  m.impl("multilabel_categorical_crossentropy_forward", &multilabel_categorical_crossentropy_forward_cpu);
  m.impl("ghmc_loss_forward", &ghmc_loss_forward_cpu);
  m.impl("bi_tempered_logistic_loss_forward", &bi_tempered_logistic_loss_forward_cpu);
}

}  // namespace fusedloss
