// CUDA kernels of the linear-chain CRF ops, torch-free: the per-sequence math of csrc/kernels/crf.h, one
// thread per sequence, workspace in global memory provided by the caller (csrc/cuda/crf_binding.cpp).
//
// This is the straightforward mapping of the CPU backend (same recursions, same guard, same results up to
// rounding); it serves correctness on CUDA tensors. The fast GPU path is the Triton backend, which `auto`
// prefers for CUDA tensors (SPEC 2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/crf.h"

namespace fusedloss {
namespace crf {
namespace cuda {

namespace {

constexpr int kThreads = 64;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void tables_kernel(Tables<T> tab) {
  if (blockIdx.x == 0 && threadIdx.x == 0) make_tables(tab);
}

template <typename T>
FUSEDLOSS_HOST_DEVICE Tables<T> carve_tables(const T* transitions, const T* start, const T* end, T* buffer, int K) {
  return Tables<T>{K, transitions, start, end, buffer, buffer + K, buffer + 2 * K,
                   buffer + 2 * K + static_cast<int64_t>(K) * K};
}

// Per sequence b: workspace (6K) + scratch alpha (T_len * K) in T, offsets (T_len) in double.
template <typename E, typename T>
__global__ void forward_kernel(Tables<T> tab, const E* emissions, const int64_t* tags, const int64_t* lengths,
                               int64_t B, int64_t T_len, T* workspace, T* alpha, double* offsets, T* log_likelihood,
                               double* log_partition, uint8_t* bad_tags) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int K = tab.K;
  const int64_t L = lengths[b];
  T* ws_buffer = workspace + b * (Workspace<T>::size(K) + 2 * K);
  const Workspace<T> ws = Workspace<T>::carve(ws_buffer, K);
  const bool store = alpha != nullptr;
  T* alpha_b = store ? alpha + b * T_len * K : ws_buffer + Workspace<T>::size(K);
  const E* em = emissions + b * T_len * K;
  const double log_z = forward(tab, em, L, alpha_b, store ? offsets + b * T_len : nullptr, store, ws);
  log_partition[b] = log_z;
  const int64_t* y = tags + b * T_len;
  if (!tags_in_range(y, L, K)) {
    bad_tags[b] = 1;
    return;
  }
  log_likelihood[b] = static_cast<T>(gold_score(tab, em, y, L) - log_z);
}

// Per sequence b: its own transition-gradient accumulator (K^2 + 2K, zeroed by the caller) in slot_grads.
template <typename E, typename T>
__global__ void backward_kernel(Tables<T> tab, const E* emissions, const int64_t* tags, const int64_t* lengths,
                                int64_t B, int64_t T_len, T* workspace, const T* alpha, const double* offsets,
                                const double* log_partition, const T* grad, E* grad_emissions, T* slot_grads) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int K = tab.K;
  const int64_t L = lengths[b];
  const Workspace<T> ws = Workspace<T>::carve(workspace + b * Workspace<T>::size(K), K);
  T* acc = slot_grads + b * (static_cast<int64_t>(K) * K + 2 * K);
  E* out = grad_emissions + b * T_len * K;
  backward<true>(tab, emissions + b * T_len * K, tags + b * T_len, L, alpha + b * T_len * K, offsets + b * T_len,
                 log_partition[b], grad[b], out, acc, acc + static_cast<int64_t>(K) * K,
                 acc + static_cast<int64_t>(K) * K + K, ws);
  for (int64_t i = L * K; i < T_len * K; ++i) out[i] = static_cast<E>(0.0f);
}

template <typename E, typename T>
__global__ void marginals_kernel(Tables<T> tab, const E* emissions, const int64_t* lengths, int64_t B,
                                 int64_t T_len, T* workspace, T* alpha, double* offsets, T* marginals) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int K = tab.K;
  const int64_t L = lengths[b];
  const Workspace<T> ws = Workspace<T>::carve(workspace + b * Workspace<T>::size(K), K);
  const E* em = emissions + b * T_len * K;
  T* alpha_b = alpha + b * T_len * K;
  double* offsets_b = offsets + b * T_len;
  const double log_z = forward(tab, em, L, alpha_b, offsets_b, true, ws);
  T* out = marginals + b * T_len * K;
  backward<false>(tab, em, static_cast<const int64_t*>(nullptr), L, alpha_b, offsets_b, log_z, T(1), out,
                  static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr), ws);
  for (int64_t i = L * K; i < T_len * K; ++i) out[i] = T(0);
}

// Per sequence b: scores (2K), emission row (K) in T, best_prev (K) int32, backpointers (T_len * K) int16.
template <typename E, typename T>
__global__ void viterbi_kernel(Tables<T> tab, const E* emissions, const int64_t* lengths, int64_t B, int64_t T_len,
                               T* workspace, int32_t* best_prev, int16_t* backpointers, int64_t* paths, T* scores) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int K = tab.K;
  const int64_t L = lengths[b];
  T* ws = workspace + b * 3 * static_cast<int64_t>(K);
  int64_t* path = paths + b * T_len;
  scores[b] = static_cast<T>(viterbi(tab, emissions + b * T_len * K, L, ws, ws + 2 * K, best_prev + b * K,
                                     backpointers + b * T_len * K, path));
  for (int64_t t = L; t < T_len; ++t) path[t] = -1;
}

template <typename E, typename T>
void forward_typed(const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B, int64_t T_len,
                   int K, const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                   void* alpha, double* offsets, void* log_likelihood, double* log_partition, uint8_t* bad_tags,
                   cudaStream_t stream) {
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, 1, 0, stream>>>(tab);
  forward_kernel<E, T><<<blocks_for(B), kThreads, 0, stream>>>(
      tab, static_cast<const E*>(emissions), tags, lengths, B, T_len, static_cast<T*>(workspace),
      static_cast<T*>(alpha), offsets, static_cast<T*>(log_likelihood), log_partition, bad_tags);
}

template <typename E, typename T>
void backward_typed(const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B, int64_t T_len,
                    int K, const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                    const void* alpha, const double* offsets, const double* log_partition, const void* grad,
                    void* grad_emissions, void* slot_grads, cudaStream_t stream) {
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, 1, 0, stream>>>(tab);
  backward_kernel<E, T><<<blocks_for(B), kThreads, 0, stream>>>(
      tab, static_cast<const E*>(emissions), tags, lengths, B, T_len, static_cast<T*>(workspace),
      static_cast<const T*>(alpha), offsets, log_partition, static_cast<const T*>(grad),
      static_cast<E*>(grad_emissions), static_cast<T*>(slot_grads));
}

template <typename E, typename T>
void marginals_typed(const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                     const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                     void* alpha, double* offsets, void* marginals, cudaStream_t stream) {
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, 1, 0, stream>>>(tab);
  marginals_kernel<E, T><<<blocks_for(B), kThreads, 0, stream>>>(
      tab, static_cast<const E*>(emissions), lengths, B, T_len, static_cast<T*>(workspace), static_cast<T*>(alpha),
      offsets, static_cast<T*>(marginals));
}

template <typename E, typename T>
void viterbi_typed(const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                   const void* transitions, const void* start, const void* end, void* workspace, int32_t* best_prev,
                   int16_t* backpointers, int64_t* paths, void* scores, cudaStream_t stream) {
  const Tables<T> tab{K, static_cast<const T*>(transitions), static_cast<const T*>(start),
                      static_cast<const T*>(end), nullptr, nullptr, nullptr, nullptr};
  viterbi_kernel<E, T><<<blocks_for(B), kThreads, 0, stream>>>(tab, static_cast<const E*>(emissions), lengths, B,
                                                               T_len, static_cast<T*>(workspace), best_prev,
                                                               backpointers, paths, static_cast<T*>(scores));
}

}  // namespace

// Emission dtype codes shared with the binding: 0 float16, 1 bfloat16, 2 float32, 3 float64. The compute
// dtype is float64 for code 3 and float32 otherwise (the binding widens emissions when transitions are
// float64). Workspace sizes per sequence are given above each kernel.
#define FUSEDLOSS_CRF_DISPATCH(code, fn, ...)      \
  switch (code) {                                  \
    case 0:                                        \
      fn<__half, float>(__VA_ARGS__);              \
      break;                                       \
    case 1:                                        \
      fn<__nv_bfloat16, float>(__VA_ARGS__);       \
      break;                                       \
    case 2:                                        \
      fn<float, float>(__VA_ARGS__);               \
      break;                                       \
    default:                                       \
      fn<double, double>(__VA_ARGS__);             \
  }

void launch_forward(int dtype_code, const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B,
                    int64_t T_len, int K, const void* transitions, const void* start, const void* end, void* tables,
                    void* workspace, void* alpha, double* offsets, void* log_likelihood, double* log_partition,
                    uint8_t* bad_tags, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, forward_typed, emissions, tags, lengths, B, T_len, K, transitions, start, end,
                         tables, workspace, alpha, offsets, log_likelihood, log_partition, bad_tags, stream)
}

void launch_backward(int dtype_code, const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B,
                     int64_t T_len, int K, const void* transitions, const void* start, const void* end, void* tables,
                     void* workspace, const void* alpha, const double* offsets, const double* log_partition,
                     const void* grad, void* grad_emissions, void* slot_grads, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, backward_typed, emissions, tags, lengths, B, T_len, K, transitions, start, end,
                         tables, workspace, alpha, offsets, log_partition, grad, grad_emissions, slot_grads, stream)
}

void launch_marginals(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                      const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                      void* alpha, double* offsets, void* marginals, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, marginals_typed, emissions, lengths, B, T_len, K, transitions, start, end,
                         tables, workspace, alpha, offsets, marginals, stream)
}

void launch_viterbi(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                    const void* transitions, const void* start, const void* end, void* workspace, int32_t* best_prev,
                    int16_t* backpointers, int64_t* paths, void* scores, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, viterbi_typed, emissions, lengths, B, T_len, K, transitions, start, end,
                         workspace, best_prev, backpointers, paths, scores, stream)
}

#undef FUSEDLOSS_CRF_DISPATCH

}  // namespace cuda
}  // namespace crf
}  // namespace fusedloss
