// CUDA kernel of softmax_loss (docs/BACKENDS.md): one thread block per row; the row math is
// csrc/kernels/softmax_loss.h. Torch-free: called through softmax_loss_launch.h.
//
// Sweep 1: every thread keeps an online max / sum of exp (and the sums of the loss) over its
// strided columns; a block reduction merges them. Every thread then finishes the row scalars
// itself (same inputs, same result, no broadcast needed). Sweep 2 writes the gradient; focal rows
// with smoothing or soft targets first reduce Σ a·cost and Σ a·cost' in an extra sweep.
// Targets outside [0, C) that are not ignore_index give a NaN loss and a zero gradient: the kernel
// never reads or writes out of bounds for them (a range check would wait for the device; CPU kernels
// raise ValueError instead).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/softmax_loss_launch.h"
#include "kernels/softmax_loss.h"

namespace fusedloss {
namespace softmax_loss {
namespace cuda {
namespace {

constexpr int kWarp = 32;

template <typename acc_t>
__device__ FUSEDLOSS_INLINE RowStats<acc_t> warp_merge(RowStats<acc_t> v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    RowStats<acc_t> other;
    other.max = __shfl_xor_sync(0xffffffffu, v.max, offset);
    other.sum_exp = __shfl_xor_sync(0xffffffffu, v.sum_exp, offset);
    other.sum_a_s = __shfl_xor_sync(0xffffffffu, v.sum_a_s, offset);
    other.sum_a = __shfl_xor_sync(0xffffffffu, v.sum_a, offset);
    v.merge(other);
  }
  return v;
}

// Merge of every thread's state; the result is returned to all threads.
template <typename acc_t>
__device__ RowStats<acc_t> block_merge(RowStats<acc_t> v, RowStats<acc_t>* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_merge(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? shared[lane] : RowStats<acc_t>();
    v = warp_merge(v);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return v;
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? shared[lane] : acc_t(0);
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

template <typename acc_t, typename scalar_t>
__device__ FUSEDLOSS_INLINE acc_t load_logit(const scalar_t* x, int64_t c, const Params<acc_t>& prm) {
  const acc_t v = static_cast<acc_t>(x[c]);
  return prm.softcap != acc_t(0) ? softcap_value(v, prm.softcap, prm.inv_softcap) : v;
}

// input carries no __restrict__: with inplace_backward the gradient is written over input's own storage (grad may
// equal input), and a no-alias promise would let the compiler reorder or cache loads across those stores.
template <typename acc_t, typename scalar_t, typename target_t>
__global__ void softmax_loss_kernel(const scalar_t* input, const int64_t* __restrict__ target,
                                    const target_t* __restrict__ soft_target, const acc_t* __restrict__ weight,
                                    const acc_t* grad_scale_ptr, Params<acc_t> prm,
                                    scalar_t* grad, acc_t* __restrict__ row_loss) {
  __shared__ RowStats<acc_t> shared_stats[kWarp];
  __shared__ acc_t shared_sum[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t C = prm.num_classes;
  const int64_t offset = row_offset(row, C);
  const scalar_t* x = input + offset;
  scalar_t* g = grad == nullptr ? nullptr : grad + offset;
  const target_t* soft = soft_target == nullptr ? nullptr : soft_target + offset;
  const bool is_soft = soft != nullptr;
  const int64_t y = is_soft ? 0 : target[row];
  if (!is_soft && (y == prm.ignore_index || y < 0 || y >= C)) {
    if (g != nullptr)
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) g[c] = static_cast<scalar_t>(acc_t(0));
    if (threadIdx.x == 0) row_loss[row] = y == prm.ignore_index ? acc_t(0) : acc_t(NAN);
    return;
  }
  const acc_t scale = grad_scale_ptr == nullptr ? acc_t(1) : *grad_scale_ptr;
  const acc_t eps = prm.label_smoothing;
  const acc_t eps_c = eps / acc_t(C);
  const bool hard_smoothing = !is_soft && eps != acc_t(0);
  auto class_weight = [&](int64_t c) { return weight == nullptr ? acc_t(1) : weight[c]; };
  // a_c: the target mass of class c times its weight.
  auto target_weight = [&](int64_t c) {
    return is_soft ? soft_weight(static_cast<acc_t>(soft[c]), class_weight(c), eps, eps_c)
                   : (eps_c + (c == y ? acc_t(1) - eps : acc_t(0))) * class_weight(c);
  };

  RowStats<acc_t> stats;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t a = is_soft ? target_weight(c) : (hard_smoothing ? class_weight(c) : acc_t(0));
    stats.add(load_logit(x, c, prm), a);
  }
  stats = block_merge(stats, shared_stats);

  RowResult<acc_t> res;
  acc_t s_y = 0;
  if (is_soft) {
    res = finish_soft_row(stats, prm);
  } else {
    s_y = load_logit(x, y, prm);
    res = finish_hard_row(stats, prm, s_y, class_weight(y));
  }

  if (res.per_class_focal) {
    acc_t sum_cost = 0, sum_dcost = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t cost, dcost;
      focal_cost(res.log_prob(load_logit(x, c, prm)), prm.focal_gamma, &cost, &dcost);
      const acc_t a = target_weight(c);
      sum_cost += a * cost;
      sum_dcost += a * dcost;
    }
    sum_cost = block_sum(sum_cost, shared_sum);
    sum_dcost = block_sum(sum_dcost, shared_sum);
    finish_per_class_focal(&res, prm, sum_cost, sum_dcost);
    if (g != nullptr) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const acc_t s = load_logit(x, c, prm);
        const acc_t lp = res.log_prob(s);
        acc_t cost, dcost;
        focal_cost(lp, prm.focal_gamma, &cost, &dcost);
        acc_t d = fast_exp(lp) * res.p_rest + target_weight(c) * dcost;
        if (prm.softcap != acc_t(0)) d *= softcap_derivative(static_cast<acc_t>(x[c]), prm.inv_softcap);
        g[c] = static_cast<scalar_t>(d * scale);
      }
    }
  } else if (g != nullptr) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const acc_t s = load_logit(x, c, prm);
      const acc_t p = fast_exp(res.log_prob(s));
      // The whole element in acc_t before one rounding; the target keeps p_y − 1 as one factor.
      acc_t d;
      if (is_soft) {
        d = (p * res.target_coef - target_weight(c)) + p * res.p_rest;
      } else {
        d = (c == y ? (p - acc_t(1)) * res.target_coef : p * res.target_coef) + p * res.p_rest -
            res.smooth_coef * class_weight(c);
      }
      if (prm.softcap != acc_t(0)) d *= softcap_derivative(static_cast<acc_t>(x[c]), prm.inv_softcap);
      g[c] = static_cast<scalar_t>(d * scale);
    }
  }
  if (threadIdx.x == 0) row_loss[row] = res.loss;
}

int threads_for(int64_t num_classes) {
  if (num_classes >= 4096) return 512;
  if (num_classes >= 512) return 256;
  return 128;
}

template <typename acc_t, typename scalar_t>
cudaError_t launch_typed(const LaunchArgs& args, cudaStream_t stream) {
  Params<acc_t> prm;
  prm.num_classes = args.num_classes;
  prm.ignore_index = args.ignore_index;
  prm.label_smoothing = static_cast<acc_t>(args.label_smoothing);
  prm.focal_gamma = static_cast<acc_t>(args.focal_gamma);
  prm.z_loss = static_cast<acc_t>(args.z_loss);
  prm.softcap = static_cast<acc_t>(args.softcap);
  prm.inv_softcap = args.softcap != 0 ? static_cast<acc_t>(1.0 / args.softcap) : acc_t(0);
  if (args.num_rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.num_rows));
  const dim3 block(threads_for(args.num_classes));
  const auto* x = static_cast<const scalar_t*>(args.input);
  const auto* w = static_cast<const acc_t*>(args.weight);
  const auto* scale = static_cast<const acc_t*>(args.grad_scale);
  auto* g = static_cast<scalar_t*>(args.grad);
  auto* loss = static_cast<acc_t*>(args.row_loss);
  if (args.soft_target != nullptr && args.soft_target_in_acc) {
    softmax_loss_kernel<acc_t, scalar_t, acc_t><<<grid, block, 0, stream>>>(
        x, args.target, static_cast<const acc_t*>(args.soft_target), w, scale, prm, g, loss);
  } else {
    softmax_loss_kernel<acc_t, scalar_t, scalar_t><<<grid, block, 0, stream>>>(
        x, args.target, static_cast<const scalar_t*>(args.soft_target), w, scale, prm, g, loss);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_softmax_loss(const LaunchArgs& args, cudaStream_t stream) {
  switch (args.input_dtype) {
    case DType::kFloat16:
      return launch_typed<float, __half>(args, stream);
    case DType::kBFloat16:
      return launch_typed<float, __nv_bfloat16>(args, stream);
    case DType::kFloat32:
      return launch_typed<float, float>(args, stream);
    case DType::kFloat64:
      return launch_typed<double, double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace softmax_loss
}  // namespace fusedloss
