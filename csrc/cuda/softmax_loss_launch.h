// Torch-free launcher of the CUDA softmax-loss kernel (softmax_loss.cu), called by the torch binding
// softmax_loss_binding.cpp with raw device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedloss {
namespace softmax_loss {
namespace cuda {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

struct LaunchArgs {
  const void* input = nullptr;          // (N, C) contiguous, input_dtype
  DType input_dtype = DType::kFloat32;
  const int64_t* target = nullptr;      // (N,) class indices (hard targets), or null
  const void* soft_target = nullptr;    // (N, C) probabilities (soft targets), or null
  bool soft_target_in_acc = false;      // probabilities in the compute dtype instead of input_dtype
  const void* weight = nullptr;         // (C,) in the compute dtype, or null
  const void* grad_scale = nullptr;     // device scalar multiplying the gradient (compute dtype), or null (1)
  void* grad = nullptr;                 // (N, C) input_dtype, may equal input; null: no gradient
  void* row_loss = nullptr;             // (N,) compute dtype
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0;
  double focal_gamma = 0;
  double z_loss = 0;
  double softcap = 0;                   // 0: none
};

// Enqueues the kernel on stream; returns the launch error (cudaSuccess when none).
cudaError_t launch_softmax_loss(const LaunchArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace softmax_loss
}  // namespace fusedloss
