// The cuda backend of softmax_loss: the torch side (allocation, the mean's divisor, the reduction)
// around the torch-free kernel of softmax_loss.cu. Compiled only when torch has CUDA (setup.py).
// Same contract as the CPU kernel in csrc/cpu/softmax_loss.cpp; the divisor and 1/divisor stay on the
// device (no host sync).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#include "cuda/softmax_loss_launch.h"

namespace fusedloss {
namespace {

softmax_loss::cuda::DType to_kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return softmax_loss::cuda::DType::kFloat16;
    case at::kBFloat16:
      return softmax_loss::cuda::DType::kBFloat16;
    case at::kFloat:
      return softmax_loss::cuda::DType::kFloat32;
    case at::kDouble:
      return softmax_loss::cuda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "softmax_loss_forward: unsupported input dtype ", type);
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_loss_forward_cuda(const at::Tensor& input_arg, const at::Tensor& target_arg,
                                                             const c10::optional<at::Tensor>& weight_arg,
                                                             int64_t ignore_index, c10::string_view reduction,
                                                             double label_smoothing, double focal_gamma, double z_loss,
                                                             c10::optional<double> softcap, bool mean_by_count,
                                                             bool compute_grad, bool inplace_backward) {
  TORCH_CHECK(input_arg.dim() == 2, "softmax_loss_forward: input must be (N, C), got ", input_arg.sizes());
  TORCH_CHECK(reduction == "none" || reduction == "mean" || reduction == "sum",
              "softmax_loss_forward: reduction must be none, mean or sum, got ", reduction);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const bool soft = target_arg.is_floating_point();
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_type);
  at::Tensor target = target_arg.contiguous();
  if (soft && target.scalar_type() != input.scalar_type() && target.scalar_type() != acc_type) {
    target = target.to(acc_type);
  }
  at::Tensor weight;
  if (weight_arg.has_value() && weight_arg->defined()) weight = weight_arg->to(acc_type).contiguous();

  at::Tensor divisor;
  if (soft) {
    divisor = at::scalar_tensor(static_cast<double>(N), acc_options);
  } else {
    const at::Tensor kept = target != ignore_index;
    if (weight.defined() && !mean_by_count) {
      // Out-of-range targets are clamped for this gather only; their rows get a NaN loss in the kernel.
      divisor = at::where(kept, weight.index_select(0, target.clamp(0, C - 1)), at::zeros({}, acc_options)).sum();
    } else {
      divisor = kept.sum().to(acc_type);
    }
  }
  const at::Tensor grad_scale = reduction == "mean" ? divisor.reciprocal() : at::ones({}, acc_options);

  at::Tensor grad;
  if (!compute_grad) {
    grad = at::empty({0}, input.options());
  } else if (inplace_backward) {
    // A new tensor over input's storage (not an autograd view of it): the caller gave it up.
    grad = at::empty({0}, input.options());
    grad.set_(input.storage(), input.storage_offset(), input.sizes(), input.strides());
  } else {
    grad = at::empty_like(input);
  }
  at::Tensor row_loss = at::empty({N}, acc_options);

  softmax_loss::cuda::LaunchArgs args;
  args.input = input.const_data_ptr();
  args.input_dtype = to_kernel_dtype(input.scalar_type());
  args.target = soft ? nullptr : target.const_data_ptr<int64_t>();
  args.soft_target = soft ? target.const_data_ptr() : nullptr;
  args.soft_target_in_acc = soft && target.scalar_type() != input.scalar_type();
  args.weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  args.grad_scale = grad_scale.const_data_ptr();
  args.grad = compute_grad ? grad.data_ptr() : nullptr;
  args.row_loss = row_loss.data_ptr();
  args.num_rows = N;
  args.num_classes = C;
  args.ignore_index = ignore_index;
  args.label_smoothing = label_smoothing;
  args.focal_gamma = focal_gamma;
  args.z_loss = z_loss;
  args.softcap = softcap.has_value() ? *softcap : 0.0;
  const cudaError_t status = softmax_loss::cuda::launch_softmax_loss(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "softmax_loss_forward: CUDA launch failed: ", cudaGetErrorString(status));

  if (reduction == "none") return {row_loss.to(input.scalar_type()), grad};
  at::Tensor total = row_loss.sum();
  if (reduction == "mean") total = total / divisor;
  return {total.to(input.scalar_type()), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("softmax_loss_forward", &softmax_loss_forward_cuda);
}

}  // namespace fusedloss
