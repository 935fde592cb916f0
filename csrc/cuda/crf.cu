// CUDA kernels of the linear-chain CRF ops, torch-free: one thread block per sequence, its threads split the
// K tags (csrc/kernels/crf_team.h: the matrix form of csrc/kernels/crf.h with the same underflow guard and
// normalized alpha/beta, the math the C++ tests check on the host). Workspace in global memory comes from the
// caller (csrc/cuda/crf_binding.cpp).
//
// Per step a block reads its tables (exp(A - colmax) for the forward, exp(A - rowmax)^T for the backward, A for
// Viterbi) and its K-vectors from shared memory when they fit the device's per-block shared memory, with
// the backward's per-sequence transition-gradient accumulator and Viterbi's backpointers too when they fit;
// otherwise from global memory (same code, other pointers). The time loop is serial, so a block does
// O(K^2 / threads) work per step and the batch fills the GPU.
//
// Masks and tags are not checked on CUDA tensors (the host would have to wait for the device), so every kernel
// takes each sequence's length from the mask as it comes, 0 included, and any tag value, with defined results
// and no access outside the sequence's own rows, never a device-side assert: an empty sequence (all-off mask)
// gets a NaN log-likelihood and a zero gradient, NaN marginals at every position, a path of -1 and a NaN score;
// a tag outside [0, K) at an unmasked position a NaN log-likelihood and a zero gradient (crf_team.h). Other
// sequences are unaffected: each block reads and writes only its own sequence's rows and its own slot. The
// partial-label log-likelihood and log Z kernels (NaN value and zero gradient for an empty sequence) do not read
// the allowed sets back either: a position whose set is empty gives a very negative value (-1e30 per such
// position) with finite gradients (crf_team.h, EmissionSource); the k-best Viterbi gives an empty sequence NaN
// scores and paths of -1. These kernels have been compiled for sm_80/sm_90 but have not yet run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/crf.h"
#include "kernels/crf_team.h"

namespace fusedloss {
namespace crf {
namespace cuda {

namespace {

constexpr int kMaxThreads = 256;
constexpr int kDefaultShared = 48 * 1024;

// Threads per sequence: the tags rounded up to whole warps, at most kMaxThreads (lanes then own several tags).
int threads_for(int K) { return K >= kMaxThreads ? kMaxThreads : ((K + 31) / 32) * 32; }

// A thread block as the team of crf_team.h. blockDim.x is a multiple of 32.
struct BlockTeam {
  double* scratch;  // 32 entries of shared memory for the reductions across warps

  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }

  struct MaxOp {
    template <typename V>
    __device__ V operator()(V a, V b) const {
      return nan_max(a, b);
    }
  };
  struct SumOp {
    template <typename V>
    __device__ V operator()(V a, V b) const {
      return a + b;
    }
  };

  template <typename V, typename Op>
  __device__ V reduce(V x, Op op) const {
    for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
    if (blockDim.x <= 32) return x;
    __syncthreads();  // the previous reduction's reads of scratch are done
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = static_cast<double>(x);
    __syncthreads();
    V y = static_cast<V>(scratch[0]);
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) y = op(y, static_cast<V>(scratch[w]));
    return y;
  }
  template <typename V>
  __device__ V max(V x) const {
    return reduce(x, MaxOp{});
  }
  template <typename V>
  __device__ V sum(V x) const {
    return reduce(x, SumOp{});
  }
};

// Copies n values into shared memory (the whole block takes part).
template <typename T>
__device__ T* stage(T* dst, const T* src, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  return dst;
}

template <typename T>
__global__ void tables_kernel(Tables<T> tab) {
  __shared__ double scratch[32];
  team_make_tables(BlockTeam{scratch}, tab);
}

template <typename T>
Tables<T> carve_tables(const T* transitions, const T* start, const T* end, T* buffer, int K) {
  return Tables<T>{K, transitions, start, end, buffer, buffer + K, buffer + 2 * K,
                   buffer + 2 * K + static_cast<int64_t>(K) * K};
}

FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE int64_t square(int K) { return static_cast<int64_t>(K) * K; }

// The tables each kind of kernel reads, staged into shared memory at `table` (the layouts the *_shared sizes
// count); tab then points there.
template <typename T>
__device__ void stage_forward_tables(Tables<T>& tab, T* table) {
  const int K = tab.K;
  tab.e_col = stage(table, tab.e_col, square(K));
  tab.col_max = stage(table + square(K), tab.col_max, K);
  tab.start = stage(table + square(K) + K, tab.start, K);
  tab.end = stage(table + square(K) + 2 * K, tab.end, K);
}

template <typename T>
__device__ void stage_forward_backward_tables(Tables<T>& tab, T* table) {
  const int K = tab.K;
  tab.e_col = stage(table, tab.e_col, square(K));
  tab.e_row_t = stage(table + square(K), tab.e_row_t, square(K));
  tab.col_max = stage(table + 2 * square(K), tab.col_max, K);
  tab.row_max = stage(table + 2 * square(K) + K, tab.row_max, K);
  tab.start = stage(table + 2 * square(K) + 2 * K, tab.start, K);
  tab.end = stage(table + 2 * square(K) + 3 * K, tab.end, K);
}

template <typename T>
__device__ void stage_viterbi_tables(Tables<T>& tab, T* table) {
  const int K = tab.K;
  tab.transitions = stage(table, tab.transitions, square(K));
  tab.start = stage(table + square(K), tab.start, K);
  tab.end = stage(table + square(K) + K, tab.end, K);
}

// Shared-memory layouts (in elements of T, then bytes). Forward: alpha (2K), p (K), e_col (K^2), col_max,
// start, end (K each). Backward: beta, v, w, u (K each), e_row_t (K^2), row_max, end (K each), the transition
// gradient accumulator (K^2 + 2K). Marginals: both tables, the backward's vectors (the forward's alias them).
int64_t forward_shared(int K) { return 6 * static_cast<int64_t>(K) + square(K); }
int64_t backward_shared(int K) { return 8 * static_cast<int64_t>(K) + 2 * square(K); }
int64_t marginals_shared(int K) { return 8 * static_cast<int64_t>(K) + 2 * square(K); }
int64_t partial_backward_shared(int K) { return 10 * static_cast<int64_t>(K) + 3 * square(K); }

// Whether `bytes` of dynamic shared memory fit a block of this device (raising the kernel's limit above the
// default 48 KiB when needed).
template <typename Kernel>
bool fits_shared(Kernel kernel, int64_t bytes) {
  int device = 0;
  int limit = kDefaultShared;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (bytes > limit - 1024) return false;  // static shared memory (the reduction scratch) needs room too
  if (bytes > kDefaultShared) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
           cudaSuccess;
  }
  return true;
}

// Forward + gold score. Global workspace per sequence (used when !in_shared): alpha (2K), p (K). The
// log-likelihood is NaN for an empty sequence (log Z and the gold score are) and for one with a tag outside
// [0, K) (the gold score is).
template <typename E, typename T>
__global__ void forward_kernel(Tables<T> tab, const E* emissions, const int64_t* tags, const int64_t* lengths,
                               int64_t T_len, bool in_shared, T* workspace, int64_t workspace_stride, T* alpha,
                               double* offsets, T* log_likelihood, double* log_partition) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  T* vec = in_shared ? reinterpret_cast<T*>(shared) : workspace + b * workspace_stride;
  if (in_shared) {
    T* table = vec + 3 * K;
    stage_forward_tables(tab, table);
    team.sync();
  }
  const int64_t L = lengths[b];
  const E* em = emissions + b * T_len * K;
  const bool store = alpha != nullptr;
  const double log_z = team_forward(team, tab, em, L, vec, vec + 2 * K, store ? alpha + b * T_len * K : nullptr,
                                    store ? offsets + b * T_len : nullptr);
  bool bad = false;
  const double gold = team_gold_score(team, tab, em, tags + b * T_len, L, &bad);
  if (threadIdx.x == 0) {
    log_partition[b] = log_z;
    log_likelihood[b] = static_cast<T>(gold - log_z);  // NaN when bad or L == 0
  }
}

// Backward: emission gradients (rows past the sequence's end are zeroed) and the sequence's transition
// gradient (K^2 transposed, then start, end) written to its slot of slot_grads (zeroed by the caller). An empty
// sequence or one with a tag outside [0, K) gets zeros everywhere (team_backward adds nothing for it).
// Global workspace per sequence (when !in_shared): beta, v, w, u.
template <typename E, typename T>
__global__ void backward_kernel(Tables<T> tab, const E* emissions, const int64_t* tags, const int64_t* lengths,
                                int64_t T_len, bool in_shared, T* workspace, int64_t workspace_stride, const T* alpha,
                                const double* offsets, const double* log_partition, const T* grad, E* grad_emissions,
                                T* slot_grads) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  const int64_t slot_size = square(K) + 2 * K;
  T* vec = in_shared ? reinterpret_cast<T*>(shared) : workspace + b * workspace_stride;
  T* acc = slot_grads + b * slot_size;
  if (in_shared) {
    T* table = vec + 4 * K;
    tab.e_row_t = stage(table, tab.e_row_t, square(K));
    tab.row_max = stage(table + square(K), tab.row_max, K);
    tab.end = stage(table + square(K) + K, tab.end, K);
    acc = table + square(K) + 2 * K;
    for (int64_t i = threadIdx.x; i < slot_size; i += blockDim.x) acc[i] = T(0);
    team.sync();
  }
  const int64_t L = lengths[b];
  E* out = grad_emissions + b * T_len * K;
  const TeamBackwardVectors<T> vectors{vec, vec + K, vec + 2 * K, vec + 3 * K};
  team_backward<true>(team, tab, emissions + b * T_len * K, tags + b * T_len, L, alpha + b * T_len * K,
                      offsets + b * T_len, log_partition[b], grad[b], out, acc, acc + square(K),
                      acc + square(K) + K, vectors);
  for (int64_t i = L * K + threadIdx.x; i < T_len * K; i += blockDim.x) out[i] = static_cast<E>(0.0f);
  if (in_shared) {
    team.sync();
    T* slot = slot_grads + b * slot_size;
    for (int64_t i = threadIdx.x; i < slot_size; i += blockDim.x) slot[i] = acc[i];
  }
}

// Tag marginals: the forward (alpha stored in global memory) then the backward without gradients. Global
// workspace per sequence (when !in_shared): 4K (the backward's vectors; the forward's alpha and p alias them).
// Rows past the sequence's end are 0; an empty sequence has no distribution at all: NaN at every position.
template <typename E, typename T>
__global__ void marginals_kernel(Tables<T> tab, const E* emissions, const int64_t* lengths, int64_t T_len,
                                 bool in_shared, T* workspace, int64_t workspace_stride, T* alpha, double* offsets,
                                 T* marginals) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  T* vec = in_shared ? reinterpret_cast<T*>(shared) : workspace + b * workspace_stride;
  if (in_shared) {
    T* table = vec + 4 * K;
    stage_forward_backward_tables(tab, table);
    team.sync();
  }
  const int64_t L = lengths[b];
  const E* em = emissions + b * T_len * K;
  T* alpha_b = alpha + b * T_len * K;
  double* offsets_b = offsets + b * T_len;
  const double log_z = team_forward(team, tab, em, L, vec, vec + 2 * K, alpha_b, offsets_b);
  team.sync();  // the forward's vectors are free, its stored alpha complete
  T* out = marginals + b * T_len * K;
  const TeamBackwardVectors<T> vectors{vec, vec + K, vec + 2 * K, vec + 3 * K};
  team_backward<false>(team, tab, em, static_cast<const int64_t*>(nullptr), L, alpha_b, offsets_b, log_z, T(1), out,
                       static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr), vectors);
  const T past_end = L > 0 ? T(0) : static_cast<T>(NAN);
  for (int64_t i = L * K + threadIdx.x; i < T_len * K; i += blockDim.x) out[i] = past_end;
}

// Viterbi. Shared memory: scores (2K), transitions (K^2), start, end; then the backpointers (T_len * K of BP)
// when bp_in_shared. Global workspace per sequence (when !in_shared): scores (2K). An empty sequence gets a
// NaN score (team_viterbi) and -1 at every step.
template <typename E, typename T, typename BP>
__global__ void viterbi_kernel(Tables<T> tab, const E* emissions, const int64_t* lengths, int64_t T_len,
                               bool in_shared, bool bp_in_shared, T* workspace, int64_t workspace_stride,
                               BP* backpointers, int64_t* paths, T* scores) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  T* vec = in_shared ? reinterpret_cast<T*>(shared) : workspace + b * workspace_stride;
  BP* bp = backpointers + b * T_len * K;
  if (in_shared) {
    T* table = vec + 2 * K;
    stage_viterbi_tables(tab, table);
    if (bp_in_shared) bp = reinterpret_cast<BP*>(table + square(K) + 2 * K);
    team.sync();
  }
  const int64_t L = lengths[b];
  int64_t* path = paths + b * T_len;
  const double score = team_viterbi(team, tab, emissions + b * T_len * K, L, vec, bp, path);
  if (threadIdx.x == 0) scores[b] = static_cast<T>(score);
  for (int64_t t = L + threadIdx.x; t < T_len; t += blockDim.x) path[t] = -1;
}

// Partial-label log-likelihood (allowed non-null: log Z_allowed - log Z, with -1e30 per position without any
// allowed tag, EmissionSource) or log Z (allowed null), one value per sequence; NaN for an empty sequence.
// Shared memory: the forward's layout (forward_shared). Global workspace per sequence (when !in_shared): alpha
// (2K), p (K).
template <typename E, typename T>
__global__ void partial_forward_kernel(Tables<T> tab, const E* emissions, const uint8_t* allowed,
                                       const int64_t* lengths, int64_t T_len, bool in_shared, T* workspace,
                                       int64_t workspace_stride, T* value) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  T* vec = in_shared ? reinterpret_cast<T*>(shared) : workspace + b * workspace_stride;
  if (in_shared) {
    T* table = vec + 3 * K;
    stage_forward_tables(tab, table);
    team.sync();
  }
  const int64_t L = lengths[b];
  const E* em = emissions + b * T_len * K;
  double constrained = 0;
  if (allowed != nullptr) {
    const uint8_t* allowed_b = allowed + b * T_len * K;
    const double empty = team_empty_rows(team, allowed_b, L, K);
    const EmissionSource<E, T> source{em, allowed_b, K, empty > 0};
    constrained = team_forward(team, tab, source, L, vec, vec + 2 * K, static_cast<T*>(nullptr),
                               static_cast<double*>(nullptr)) +
                  empty * kPartialLabelScore;
    team.sync();  // the vectors are free for the second recursion
  }
  const double log_z = team_forward(team, tab, free_source<E, T>(em, K), L, vec, vec + 2 * K,
                                    static_cast<T*>(nullptr), static_cast<double*>(nullptr));
  if (threadIdx.x == 0) value[b] = static_cast<T>(allowed != nullptr ? constrained - log_z : log_z);
}

// Gradients of grad[b] * value[b] of partial_forward_kernel: the forward recursions run again here (nothing is
// saved by the forward), storing alpha (T_len, K) and offsets (T_len,) of the sequence in global memory, each
// followed by the accumulating backward: +grad on the constrained model, -grad on the free one (log Z: the free
// one with +grad). Emission gradients go to grad_emissions in the compute dtype (so the difference of the two
// passes is not rounded to a 16-bit type in between), zero past the end and where an emission is a constant;
// the transition gradient (K^2 transposed, then start, end) to the sequence's slot of slot_grads (zeroed by the
// caller). Shared memory: the backward's vectors (4K; the forward's alias them), both tables with col_max,
// row_max, start, end (2K^2 + 4K) and the accumulator (K^2 + 2K): partial_backward_shared. Global workspace per
// sequence (when !in_shared): 4K. An empty sequence gets zeros.
template <typename E, typename T>
__global__ void partial_backward_kernel(Tables<T> tab, const E* emissions, const uint8_t* allowed,
                                        const int64_t* lengths, int64_t T_len, bool in_shared, T* workspace,
                                        int64_t workspace_stride, T* alpha, double* offsets, const T* grad,
                                        T* grad_emissions, T* slot_grads) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  const int64_t slot_size = square(K) + 2 * K;
  T* vec = in_shared ? reinterpret_cast<T*>(shared) : workspace + b * workspace_stride;
  T* acc = slot_grads + b * slot_size;
  if (in_shared) {
    T* table = vec + 4 * K;
    stage_forward_backward_tables(tab, table);
    acc = table + 2 * square(K) + 4 * K;
    for (int64_t i = threadIdx.x; i < slot_size; i += blockDim.x) acc[i] = T(0);
  }
  const int64_t L = lengths[b];
  const E* em = emissions + b * T_len * K;
  T* out = grad_emissions + b * T_len * K;
  for (int64_t i = threadIdx.x; i < T_len * K; i += blockDim.x) out[i] = T(0);
  team.sync();  // tables staged, accumulators zeroed
  T* alpha_b = alpha + b * T_len * K;
  double* offsets_b = offsets + b * T_len;
  const TeamBackwardVectors<T> vectors{vec, vec + K, vec + 2 * K, vec + 3 * K};
  T g = grad[b];
  if (allowed != nullptr) {
    const uint8_t* allowed_b = allowed + b * T_len * K;
    const double empty = team_empty_rows(team, allowed_b, L, K);
    const EmissionSource<E, T> source{em, allowed_b, K, empty > 0};
    const double log_z = team_forward(team, tab, source, L, vec, vec + 2 * K, alpha_b, offsets_b);
    team.sync();  // the forward's vectors are free, its stored alpha complete
    team_backward_accumulate(team, tab, source, L, alpha_b, offsets_b, log_z, g, out, acc, acc + square(K),
                             acc + square(K) + K, vectors);
    team.sync();  // the backward's vectors and its reads of alpha are done
    g = -g;
  }
  const EmissionSource<E, T> free = free_source<E, T>(em, K);
  const double log_z = team_forward(team, tab, free, L, vec, vec + 2 * K, alpha_b, offsets_b);
  team.sync();
  team_backward_accumulate(team, tab, free, L, alpha_b, offsets_b, log_z, g, out, acc, acc + square(K),
                           acc + square(K) + K, vectors);
  if (in_shared) {
    team.sync();
    T* slot = slot_grads + b * slot_size;
    for (int64_t i = threadIdx.x; i < slot_size; i += blockDim.x) slot[i] = acc[i];
  }
}

// k-best Viterbi (team_kbest_viterbi). Shared memory when it fits: transitions (K^2), start, end, the scores
// (2Kk), then the merge heads (threads * K int32); otherwise the tables are read from global memory and the
// scores and heads live in the global workspaces (2Kk of T and threads * K int32 per sequence). Backpointers
// (T_len, K, k) int32 per sequence in global memory. paths (k, T_len) per sequence, -1 past the end; scores (k,)
// in float64.
template <typename E, typename T>
__global__ void kbest_kernel(Tables<T> tab, const E* emissions, const int64_t* lengths, int64_t T_len, int k,
                             bool in_shared, T* score_workspace, int32_t* heads_workspace, int32_t* backpointers,
                             int64_t* paths, double* scores) {
  extern __shared__ double shared[];
  __shared__ double scratch[32];
  const BlockTeam team{scratch};
  const int64_t b = blockIdx.x;
  const int K = tab.K;
  const int64_t Kk = static_cast<int64_t>(K) * k;
  T* score = score_workspace + b * 2 * Kk;
  int32_t* heads = heads_workspace + b * static_cast<int64_t>(blockDim.x) * K;
  if (in_shared) {
    T* table = reinterpret_cast<T*>(shared);
    stage_viterbi_tables(tab, table);
    score = table + square(K) + 2 * K;
    heads = reinterpret_cast<int32_t*>(score + 2 * Kk);
    team.sync();
  }
  const int64_t L = lengths[b];
  int64_t* path = paths + b * k * T_len;
  team_kbest_viterbi(team, tab, emissions + b * T_len * K, L, k, score, heads, backpointers + b * T_len * Kk, path,
                     T_len, scores + b * k);
  const int64_t tail = T_len - L;
  for (int64_t i = threadIdx.x; i < tail * k; i += blockDim.x) path[(i / tail) * T_len + L + i % tail] = -1;
}

template <typename E, typename T>
void forward_typed(const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B, int64_t T_len,
                   int K, const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                   int64_t workspace_stride, void* alpha, double* offsets, void* log_likelihood,
                   double* log_partition, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, kMaxThreads, 0, stream>>>(tab);
  const int64_t bytes = forward_shared(K) * static_cast<int64_t>(sizeof(T));
  const bool in_shared = fits_shared(forward_kernel<E, T>, bytes);
  forward_kernel<E, T><<<static_cast<unsigned>(B), threads_for(K), in_shared ? bytes : 0, stream>>>(
      tab, static_cast<const E*>(emissions), tags, lengths, T_len, in_shared, static_cast<T*>(workspace),
      workspace_stride, static_cast<T*>(alpha), offsets, static_cast<T*>(log_likelihood), log_partition);
}

template <typename E, typename T>
void backward_typed(const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B, int64_t T_len,
                    int K, const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                    int64_t workspace_stride, const void* alpha, const double* offsets, const double* log_partition,
                    const void* grad, void* grad_emissions, void* slot_grads, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, kMaxThreads, 0, stream>>>(tab);
  const int64_t bytes = backward_shared(K) * static_cast<int64_t>(sizeof(T));
  const bool in_shared = fits_shared(backward_kernel<E, T>, bytes);
  backward_kernel<E, T><<<static_cast<unsigned>(B), threads_for(K), in_shared ? bytes : 0, stream>>>(
      tab, static_cast<const E*>(emissions), tags, lengths, T_len, in_shared, static_cast<T*>(workspace),
      workspace_stride, static_cast<const T*>(alpha), offsets, log_partition, static_cast<const T*>(grad),
      static_cast<E*>(grad_emissions), static_cast<T*>(slot_grads));
}

template <typename E, typename T>
void marginals_typed(const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                     const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                     int64_t workspace_stride, void* alpha, double* offsets, void* marginals, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, kMaxThreads, 0, stream>>>(tab);
  const int64_t bytes = marginals_shared(K) * static_cast<int64_t>(sizeof(T));
  const bool in_shared = fits_shared(marginals_kernel<E, T>, bytes);
  marginals_kernel<E, T><<<static_cast<unsigned>(B), threads_for(K), in_shared ? bytes : 0, stream>>>(
      tab, static_cast<const E*>(emissions), lengths, T_len, in_shared, static_cast<T*>(workspace), workspace_stride,
      static_cast<T*>(alpha), offsets, static_cast<T*>(marginals));
}

template <typename E, typename T, typename BP>
void viterbi_bp(const Tables<T>& tab, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len,
                void* workspace, int64_t workspace_stride, void* backpointers, int64_t* paths, void* scores,
                cudaStream_t stream) {
  const int K = tab.K;
  const int64_t tables = (2 * static_cast<int64_t>(K) + square(K) + 2 * K) * static_cast<int64_t>(sizeof(T));
  const int64_t with_bp = tables + T_len * K * static_cast<int64_t>(sizeof(BP));
  const bool bp_in_shared = fits_shared(viterbi_kernel<E, T, BP>, with_bp);
  const bool in_shared = bp_in_shared || fits_shared(viterbi_kernel<E, T, BP>, tables);
  const int64_t bytes = bp_in_shared ? with_bp : (in_shared ? tables : 0);
  viterbi_kernel<E, T, BP><<<static_cast<unsigned>(B), threads_for(K), bytes, stream>>>(
      tab, static_cast<const E*>(emissions), lengths, T_len, in_shared, bp_in_shared, static_cast<T*>(workspace),
      workspace_stride, static_cast<BP*>(backpointers), paths, static_cast<T*>(scores));
}

template <typename E, typename T>
void viterbi_typed(const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                   const void* transitions, const void* start, const void* end, void* workspace,
                   int64_t workspace_stride, void* backpointers, int64_t* paths, void* scores, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab{K, static_cast<const T*>(transitions), static_cast<const T*>(start),
                      static_cast<const T*>(end), nullptr, nullptr, nullptr, nullptr};
  if (K <= 256) {
    viterbi_bp<E, T, uint8_t>(tab, emissions, lengths, B, T_len, workspace, workspace_stride, backpointers, paths,
                              scores, stream);
  } else {
    viterbi_bp<E, T, int16_t>(tab, emissions, lengths, B, T_len, workspace, workspace_stride, backpointers, paths,
                              scores, stream);
  }
}

template <typename E, typename T>
void partial_forward_typed(const void* emissions, const uint8_t* allowed, const int64_t* lengths, int64_t B,
                           int64_t T_len, int K, const void* transitions, const void* start, const void* end,
                           void* tables, void* workspace, int64_t workspace_stride, void* value, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, kMaxThreads, 0, stream>>>(tab);
  const int64_t bytes = forward_shared(K) * static_cast<int64_t>(sizeof(T));
  const bool in_shared = fits_shared(partial_forward_kernel<E, T>, bytes);
  partial_forward_kernel<E, T><<<static_cast<unsigned>(B), threads_for(K), in_shared ? bytes : 0, stream>>>(
      tab, static_cast<const E*>(emissions), allowed, lengths, T_len, in_shared, static_cast<T*>(workspace),
      workspace_stride, static_cast<T*>(value));
}

template <typename E, typename T>
void partial_backward_typed(const void* emissions, const uint8_t* allowed, const int64_t* lengths, int64_t B,
                            int64_t T_len, int K, const void* transitions, const void* start, const void* end,
                            void* tables, void* workspace, int64_t workspace_stride, void* alpha, double* offsets,
                            const void* grad, void* grad_emissions, void* slot_grads, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab = carve_tables(static_cast<const T*>(transitions), static_cast<const T*>(start),
                                     static_cast<const T*>(end), static_cast<T*>(tables), K);
  tables_kernel<T><<<1, kMaxThreads, 0, stream>>>(tab);
  const int64_t bytes = partial_backward_shared(K) * static_cast<int64_t>(sizeof(T));
  const bool in_shared = fits_shared(partial_backward_kernel<E, T>, bytes);
  partial_backward_kernel<E, T><<<static_cast<unsigned>(B), threads_for(K), in_shared ? bytes : 0, stream>>>(
      tab, static_cast<const E*>(emissions), allowed, lengths, T_len, in_shared, static_cast<T*>(workspace),
      workspace_stride, static_cast<T*>(alpha), offsets, static_cast<const T*>(grad), static_cast<T*>(grad_emissions),
      static_cast<T*>(slot_grads));
}

template <typename E, typename T>
void kbest_typed(const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K, int k,
                 const void* transitions, const void* start, const void* end, void* score_workspace,
                 int32_t* heads_workspace, int32_t* backpointers, int64_t* paths, double* scores, cudaStream_t stream) {
  if (B == 0) return;
  const Tables<T> tab{K, static_cast<const T*>(transitions), static_cast<const T*>(start),
                      static_cast<const T*>(end), nullptr, nullptr, nullptr, nullptr};
  const int threads = threads_for(K);
  const int64_t bytes = (square(K) + 2 * static_cast<int64_t>(K) + 2 * static_cast<int64_t>(K) * k) *
                            static_cast<int64_t>(sizeof(T)) +
                        static_cast<int64_t>(threads) * K * static_cast<int64_t>(sizeof(int32_t));
  const bool in_shared = fits_shared(kbest_kernel<E, T>, bytes);
  kbest_kernel<E, T><<<static_cast<unsigned>(B), threads, in_shared ? bytes : 0, stream>>>(
      tab, static_cast<const E*>(emissions), lengths, T_len, k, in_shared, static_cast<T*>(score_workspace),
      heads_workspace, backpointers, paths, scores);
}

}  // namespace

// Emission dtype codes shared with the binding: 0 float16, 1 bfloat16, 2 float32, 3 float64. The compute
// dtype is float64 for code 3 and float32 otherwise (the binding widens emissions when transitions are
// float64). workspace: B rows of workspace_stride elements of the compute dtype (forward 3K, backward and
// marginals 4K, Viterbi 2K), used where shared memory is too small; backpointers: (B, T_len, K) of uint8 for
// K <= 256, int16 above. Partial log-likelihood and log Z (allowed null): workspace 3K (forward) or 4K
// (backward), alpha (B, T_len, K) and offsets (B, T_len) for the backward's recomputed forward, emission gradients
// in the compute dtype. k-best Viterbi: score_workspace (B, 2Kk) of the compute dtype, heads_workspace (B,
// kbest_threads(K) * K) int32, backpointers (B, T_len, K, k) int32, paths (B, k, T_len), scores (B, k) float64.
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
                    void* workspace, int64_t workspace_stride, void* alpha, double* offsets, void* log_likelihood,
                    double* log_partition, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, forward_typed, emissions, tags, lengths, B, T_len, K, transitions, start, end,
                         tables, workspace, workspace_stride, alpha, offsets, log_likelihood, log_partition, stream)
}

void launch_backward(int dtype_code, const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B,
                     int64_t T_len, int K, const void* transitions, const void* start, const void* end, void* tables,
                     void* workspace, int64_t workspace_stride, const void* alpha, const double* offsets,
                     const double* log_partition, const void* grad, void* grad_emissions, void* slot_grads,
                     cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, backward_typed, emissions, tags, lengths, B, T_len, K, transitions, start, end,
                         tables, workspace, workspace_stride, alpha, offsets, log_partition, grad, grad_emissions,
                         slot_grads, stream)
}

void launch_marginals(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                      const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                      int64_t workspace_stride, void* alpha, double* offsets, void* marginals, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, marginals_typed, emissions, lengths, B, T_len, K, transitions, start, end,
                         tables, workspace, workspace_stride, alpha, offsets, marginals, stream)
}

void launch_viterbi(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                    const void* transitions, const void* start, const void* end, void* workspace,
                    int64_t workspace_stride, void* backpointers, int64_t* paths, void* scores, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, viterbi_typed, emissions, lengths, B, T_len, K, transitions, start, end,
                         workspace, workspace_stride, backpointers, paths, scores, stream)
}

void launch_partial_forward(int dtype_code, const void* emissions, const uint8_t* allowed, const int64_t* lengths,
                            int64_t B, int64_t T_len, int K, const void* transitions, const void* start,
                            const void* end, void* tables, void* workspace, int64_t workspace_stride, void* value,
                            cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, partial_forward_typed, emissions, allowed, lengths, B, T_len, K, transitions,
                         start, end, tables, workspace, workspace_stride, value, stream)
}

void launch_partial_backward(int dtype_code, const void* emissions, const uint8_t* allowed, const int64_t* lengths,
                             int64_t B, int64_t T_len, int K, const void* transitions, const void* start,
                             const void* end, void* tables, void* workspace, int64_t workspace_stride, void* alpha,
                             double* offsets, const void* grad, void* grad_emissions, void* slot_grads,
                             cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, partial_backward_typed, emissions, allowed, lengths, B, T_len, K, transitions,
                         start, end, tables, workspace, workspace_stride, alpha, offsets, grad, grad_emissions,
                         slot_grads, stream)
}

int kbest_threads(int K) { return threads_for(K); }

void launch_kbest_viterbi(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len,
                          int K, int k, const void* transitions, const void* start, const void* end,
                          void* score_workspace, int32_t* heads_workspace, int32_t* backpointers, int64_t* paths,
                          double* scores, cudaStream_t stream) {
  FUSEDLOSS_CRF_DISPATCH(dtype_code, kbest_typed, emissions, lengths, B, T_len, K, k, transitions, start, end,
                         score_workspace, heads_workspace, backpointers, paths, scores, stream)
}

#undef FUSEDLOSS_CRF_DISPATCH

}  // namespace cuda
}  // namespace crf
}  // namespace fusedloss
