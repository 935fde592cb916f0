// The gradient buffer of the CPU ops that compute their gradient in the forward pass (softmax, sigmoid and
// distillation losses): a contiguous tensor of input's shape and dtype that reuses the pages of the previous
// large buffer once nothing but this cache refers to them.
//
// Why: a tensor above glibc's largest mmap threshold (32 MiB) is new pages from the kernel on every call, and
// the first write faults each 4 KiB page in. For 4096 x 32000 float32 logits (524 MB) the faults took 110 ms of a
// 135 ms forward+backward, about six times the time of copying the logits. A training step drops the gradient
// (optimizer.zero_grad() sets .grad to None) before the next forward, so the next call of the same size finds
// the pages here unreferenced and writes into them, already mapped. While anything else holds them (the .grad of
// a parameter, a view, a NumPy array over it) a call gets new pages, as without the cache. One buffer is kept:
// at most one gradient's worth of memory stays allocated between calls. FUSEDLOSS_REUSE_GRAD=0 turns it off.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace fusedloss {
namespace cpu {

inline bool reuse_grad_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("FUSEDLOSS_REUSE_GRAD");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

inline at::Tensor gradient_buffer(const at::Tensor& input) {
  constexpr int64_t kMinBytes = int64_t(32) << 20;
  const int64_t bytes = input.numel() * static_cast<int64_t>(input.element_size());
  if (bytes < kMinBytes || !input.device().is_cpu() || !reuse_grad_enabled())
    return at::empty_like(input, at::MemoryFormat::Contiguous);
  static std::mutex mutex;
  static c10::Storage cached;
  const std::lock_guard<std::mutex> lock(mutex);
  // use_count() == 1: this cache holds the only reference (every tensor over the storage, views included,
  // holds one).
  if (!(cached && cached.use_count() == 1 && static_cast<int64_t>(cached.nbytes()) == bytes)) {
    cached = at::empty({bytes}, input.options().dtype(at::kByte)).storage();
  }
  at::Tensor grad = at::empty({0}, input.options().memory_format(at::MemoryFormat::Contiguous));
  grad.set_(cached, 0, input.sizes());
  return grad;
}

}  // namespace cpu
}  // namespace fusedloss
