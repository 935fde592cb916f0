// The cpp backend of the linear-chain CRF ops (docs/BACKENDS.md, crf_*): the per-sequence math of
// csrc/kernels/crf.h, sequences in parallel with at::parallel_for.
//
// Compute dtype: float32 for float16/bfloat16/float32 emissions (16-bit emissions are read as they are and
// converted one row at a time), float64 when emissions or transitions are float64; log Z, the gold score and
// the per-step offsets of the normalized forward variables in float64. Extra memory: the forward variables
// alpha (B, T, K) in the compute dtype and their offsets (B, T), only when the backward will need them (twice for
// the partial-label log-likelihood: the constrained and the free model); per-thread workspace of O(T K) otherwise
// (the k-best Viterbi: O(T K k) backpointers; Viterbi of a batch, 16 or 8 sequences at a time: T K bytes of
// backpointers per sequence of the group), and for the transition gradient one (K, K) accumulator per slot of
// sequences.
//
// Determinism: every result is a function of one sequence, except the transition gradients, which are
// summed over fixed slots of sequences (a partition of the batch that depends on B and K, not on the
// number of threads) and then over the slots in order, so any thread count gives identical bits.
//
// Vector ISA: each kernel loop below is compiled for the baseline x86-64 ISA, for AVX2 + FMA and for AVX-512,
// picked at run time (cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

// The selects of crf::fast_exp / fast_log (clamps, NaN) vectorize only when floating-point compares may
// be executed speculatively; no-trapping-math allows that (it changes no value, only FP exception flags).
#pragma GCC optimize("no-trapping-math")

#include "cpu/isa.h"
#include "crf_checks.h"
#include "kernels/crf.h"

namespace fusedloss {
namespace {

using cpu::run;
using cpu::run_parallel;

template <typename T>
struct TablesJob {
  crf::Tables<T> tab;
  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t, int64_t) const { crf::make_tables(tab); }
};

// x in dtype, contiguous: x itself when it already is (without a call through the dispatcher, which costs a
// one-sentence decode a few percent each).
at::Tensor contiguous_as(const at::Tensor& x, at::ScalarType dtype) {
  return x.scalar_type() == dtype && x.is_contiguous() ? x : x.to(dtype).contiguous();
}

// The transition tensors in the compute dtype and their tables (crf::Tables), built once per call.
template <typename T>
struct TransitionTables {
  at::Tensor transitions, start, end;
  std::vector<T> buffer;
  crf::Tables<T> tab;

  TransitionTables(const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
                   at::ScalarType dtype, bool with_exp_tables) {
    transitions = contiguous_as(transitions_arg, dtype);
    start = contiguous_as(start_arg, dtype);
    end = contiguous_as(end_arg, dtype);
    const int K = static_cast<int>(transitions.size(0));
    tab.K = K;
    tab.transitions = transitions.const_data_ptr<T>();
    tab.start = start.const_data_ptr<T>();
    tab.end = end.const_data_ptr<T>();
    if (!with_exp_tables) return;  // Viterbi needs only the scores
    buffer.resize(2 * static_cast<size_t>(K) + 2 * static_cast<size_t>(K) * K);
    tab.col_max = buffer.data();
    tab.row_max = tab.col_max + K;
    tab.e_col = tab.row_max + K;
    tab.e_row_t = tab.e_col + static_cast<int64_t>(K) * K;
    run(TablesJob<T>{tab}, 0, 1);
  }
};

// Sequence lengths from a left-aligned mask (B, T) of bool or uint8.
std::vector<int64_t> sequence_lengths(const at::Tensor& mask_arg) {
  TORCH_CHECK(mask_arg.scalar_type() == at::kBool || mask_arg.scalar_type() == at::kByte,
              "crf: mask must be bool or uint8, got ", mask_arg.scalar_type());
  const at::Tensor mask = mask_arg.contiguous();
  const int64_t B = mask.size(0), T = mask.size(1);
  const uint8_t* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t L = 0;
    for (int64_t t = 0; t < T; ++t) L += m[b * T + t] != 0;
    TORCH_CHECK(L >= 1, "crf: every sequence needs mask[:, 0] on, sequence ", b, " has none");
    lengths[b] = L;
  }
  return lengths;
}

template <typename X>
struct TypeTag {
  using type = X;
};

// Compute dtype and the emissions it reads: float32 unless emissions or transitions are float64, in which
// case 16-bit or float32 emissions are widened once.
at::ScalarType compute_dtype(const at::Tensor& emissions, const at::Tensor& transitions) {
  return emissions.scalar_type() == at::kDouble || transitions.scalar_type() == at::kDouble ? at::kDouble
                                                                                            : at::kFloat;
}

// Calls f(TypeTag<E>, TypeTag<T>) for emissions type E (already in the compute dtype's family) and T.
template <typename F>
void dispatch_types(const at::Tensor& emissions, F&& f) {
  switch (emissions.scalar_type()) {
    case at::kDouble:
      f(TypeTag<double>{}, TypeTag<double>{});
      break;
    case at::kFloat:
      f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<at::Half>{}, TypeTag<float>{});
      break;
    case at::kBFloat16:
      f(TypeTag<at::BFloat16>{}, TypeTag<float>{});
      break;
    default:
      TORCH_CHECK(false, "crf: emissions must be float16, bfloat16, float32 or float64, got ",
                  emissions.scalar_type());
  }
}

at::Tensor emissions_for(const at::Tensor& emissions, at::ScalarType dtype) {
  TORCH_CHECK(emissions.dim() == 3, "crf: emissions must be (B, T, K), got ", emissions.sizes());
  return (dtype == at::kDouble ? emissions.to(at::kDouble) : emissions).contiguous();
}

// ---------------------------------------------------------------------------------------------------
// Jobs: one range of sequences (or slots) each; run() holds the loops compiled per ISA.

template <typename E, typename T>
struct ForwardJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const int64_t* tags;
  const int64_t* lengths;
  int64_t T_len;
  T* alpha;         // (B, T, K) or nullptr
  double* offsets;  // (B, T) or nullptr
  T* log_likelihood;
  double* log_partition;
  uint8_t* bad_tags;

  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    const int K = tab->K;
    std::vector<T> scratch(crf::Workspace<T>::size(K) + (alpha == nullptr ? 2 * K : 0));
    const auto ws = crf::Workspace<T>::carve(scratch.data(), K);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lengths[b];
      const E* em = emissions + b * T_len * K;
      const int64_t* y = tags + b * T_len;
      const bool store = alpha != nullptr;
      T* alpha_b = store ? alpha + b * T_len * K : scratch.data() + crf::Workspace<T>::size(K);
      const double log_z = crf::forward(*tab, em, L, alpha_b, store ? offsets + b * T_len : nullptr, store, ws);
      log_partition[b] = log_z;
      if (!crf::tags_in_range(y, L, K)) {
        bad_tags[b] = 1;
        continue;
      }
      log_likelihood[b] = static_cast<T>(crf::gold_score(*tab, em, y, L) - log_z);
    }
  }
};

template <typename E, typename T>
struct BackwardJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const int64_t* tags;
  const int64_t* lengths;
  int64_t T_len, B, num_slots, max_length;
  const T* alpha;          // (B, T, K) or nullptr: recompute
  const double* offsets;   // (B, T) or nullptr
  const double* log_partition;
  const T* grad;
  E* grad_emissions;
  T* slot_grads;  // per slot: transitions (K, K) transposed, start (K), end (K)

  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t slot_begin, int64_t slot_end) const {
    const int K = tab->K;
    const int64_t slot_size = static_cast<int64_t>(K) * K + 2 * K;
    std::vector<T> scratch(crf::Workspace<T>::size(K) + (alpha == nullptr ? max_length * K : 0));
    std::vector<double> offsets_scratch(alpha == nullptr ? max_length : 0);
    const auto ws = crf::Workspace<T>::carve(scratch.data(), K);
    for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
      T* acc = slot_grads + slot * slot_size;
      for (int64_t b = slot * B / num_slots; b < (slot + 1) * B / num_slots; ++b) {
        const int64_t L = lengths[b];
        const E* em = emissions + b * T_len * K;
        const T* alpha_b = alpha;
        const double* offsets_b = offsets;
        if (alpha != nullptr) {
          alpha_b += b * T_len * K;
          offsets_b += b * T_len;
        } else {
          T* recomputed = scratch.data() + crf::Workspace<T>::size(K);
          crf::forward(*tab, em, L, recomputed, offsets_scratch.data(), true, ws);
          alpha_b = recomputed;
          offsets_b = offsets_scratch.data();
        }
        E* out = grad_emissions + b * T_len * K;
        crf::backward<true>(*tab, em, tags + b * T_len, L, alpha_b, offsets_b, log_partition[b], grad[b], out, acc,
                            acc + static_cast<int64_t>(K) * K, acc + static_cast<int64_t>(K) * K + K, ws);
        std::fill(out + L * K, out + T_len * K, E(0));
      }
    }
  }
};

template <typename E, typename T, typename BP>
struct ViterbiJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const int64_t* lengths;
  int64_t T_len, max_length;
  int64_t* paths;
  T* scores;

  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    const int K = tab->K;
    std::vector<T> scratch(3 * static_cast<size_t>(K));
    std::vector<int32_t> best_prev(K);
    std::vector<BP> backpointers(max_length * K);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lengths[b];
      int64_t* path = paths + b * T_len;
      scores[b] = static_cast<T>(crf::viterbi(*tab, emissions + b * T_len * K, L, scratch.data(), scratch.data() + 2 * K,
                               best_prev.data(), backpointers.data(), path));
      std::fill(path + L, path + T_len, int64_t(-1));
    }
  }

  // The AVX-512 and AVX2 variants: groups of 16 or 8 sequences, one per vector lane (run_batches); what is left,
  // up to 16 tags in one vector of float32 scores (crf::viterbi_lanes16, the same results; one AVX-512 register,
  // or two AVX2 ones), two sequences side by side; a sequence with a NaN score goes through crf::viterbi. In the
  // AVX2 variant one sequence alone takes the scalar sweep: its two-register steps were no faster than the
  // sweep's, and building the padded rows cost a one-sentence decode 10%.
  FUSEDLOSS_INLINE void run_wide(int64_t begin, int64_t end) const {
    run_batches<16>(begin, end, [&](int64_t b, int64_t e) FUSEDLOSS_LAMBDA_INLINE {
      run_lanes16<crf::Floats16>(b, e);
    });
  }
  FUSEDLOSS_INLINE void run_avx2(int64_t begin, int64_t end) const {
    run_batches<8>(begin, end, [&](int64_t b, int64_t e) FUSEDLOSS_LAMBDA_INLINE {
      if (e - b >= 2) {
        run_lanes16<crf::Halves16>(b, e);
      } else {
        run(b, e);
      }
    });
  }

  // Groups of W sequences through crf::viterbi_batch (float32 scores, K <= 256), the rest (a last group of fewer
  // than min_batch, or every sequence where the batch run does not apply) through rest(begin, end). A group costs
  // the same whatever its number of sequences: on an Intel Xeon (K = 5 to 33, T = 64) a group of 16 lanes took
  // as long as 3 or 4 sequences through the per-sequence runs, one of 8 (AVX2) as long as 4 or 5.
  template <int W, typename Rest>
  FUSEDLOSS_INLINE void run_batches(int64_t begin, int64_t end, const Rest& rest) const {
    constexpr int min_batch = W == 16 ? 4 : 5;
    if constexpr (std::is_same<T, float>::value && std::is_same<BP, uint8_t>::value) {
      if (end - begin >= min_batch && crf::batch_viterbi_applies(*tab, max_length)) {
        const int K = tab->K;
        // 64-byte aligned by hand: a std::vector of GCC vector types was not (and the kernel's stores assume it).
        std::vector<float> buffer(crf::BatchLanes<W>::workspace(K) + 16);
        float* const work =
            reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
        std::vector<uint8_t> backpointers(max_length * K * W);
        for (int64_t b = begin; b < end; b += W) {
          const int n = static_cast<int>(std::min<int64_t>(W, end - b));
          if (n < min_batch) {
            rest(b, end);
            break;
          }
          const E* em[W];
          int64_t* path[W];
          double score[W];
          bool done[W];
          for (int i = 0; i < n; ++i) {
            em[i] = emissions + (b + i) * T_len * K;
            path[i] = paths + (b + i) * T_len;
          }
          crf::viterbi_batch<W>(*tab, n, em, lengths + b, T_len * K, work,
                                backpointers.data(), path, score, done);
          for (int i = 0; i < n; ++i) {
            if (!done[i]) {
              run(b + i, b + i + 1);
              continue;
            }
            scores[b + i] = static_cast<T>(score[i]);
            std::fill(path[i] + lengths[b + i], path[i] + T_len, int64_t(-1));
          }
        }
        return;
      }
    }
    rest(begin, end);
  }

  template <typename V>
  FUSEDLOSS_INLINE void run_lanes16(int64_t begin, int64_t end) const {
    if constexpr (std::is_same<T, float>::value && std::is_same<BP, uint8_t>::value) {
      const int K = tab->K;
      if (K <= 16) {
        const crf::TransitionLanes<V> lanes(*tab);
        const int64_t stride = max_length * K + 16;
        std::vector<uint8_t> backpointers(2 * stride);
        uint8_t* const bp[2] = {backpointers.data(), backpointers.data() + stride};
        for (int64_t b = begin; b < end; b += 2) {
          const int n = b + 1 < end ? 2 : 1;
          const int64_t second = b + n - 1;  // b itself when alone
          const E* em[2] = {emissions + b * T_len * K, emissions + second * T_len * K};
          const int64_t L[2] = {lengths[b], lengths[second]};
          int64_t* path[2] = {paths + b * T_len, paths + second * T_len};
          double score[2] = {0, 0};
          bool done[2] = {false, false};
          auto lanes_of = [&](auto powers) FUSEDLOSS_LAMBDA_INLINE {
            crf::viterbi_lanes16<decltype(powers)::value, V>(lanes, *tab, n, em, L, bp, path, score, done);
          };
          if (K <= 2) {
            lanes_of(std::integral_constant<int, 2>());
          } else if (K <= 4) {
            lanes_of(std::integral_constant<int, 4>());
          } else if (K <= 8) {
            lanes_of(std::integral_constant<int, 8>());
          } else {
            lanes_of(std::integral_constant<int, 16>());
          }
          for (int i = 0; i < n; ++i) {
            if (!done[i]) {
              run(b + i, b + i + 1);
              continue;
            }
            scores[b + i] = static_cast<T>(score[i]);
            std::fill(path[i] + L[i], path[i] + T_len, int64_t(-1));
          }
        }
        return;
      }
    }
    run(begin, end);
  }
};

template <typename E, typename T>
struct MarginalsJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const int64_t* lengths;
  int64_t T_len, max_length;
  T* marginals;

  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    const int K = tab->K;
    std::vector<T> scratch(crf::Workspace<T>::size(K) + max_length * K);
    std::vector<double> offsets(max_length);
    const auto ws = crf::Workspace<T>::carve(scratch.data(), K);
    T* alpha = scratch.data() + crf::Workspace<T>::size(K);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lengths[b];
      const E* em = emissions + b * T_len * K;
      T* out = marginals + b * T_len * K;
      const double log_z = crf::forward(*tab, em, L, alpha, offsets.data(), true, ws);
      crf::backward<false>(*tab, em, static_cast<const int64_t*>(nullptr), L, alpha, offsets.data(), log_z, T(1), out,
                           static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr), ws);
      std::fill(out + L * K, out + T_len * K, T(0));
    }
  }
};

// Partial-label log-likelihood (allowed != nullptr) or log partition (allowed == nullptr). Saved for backward
// (each (B, T, K) / (B, T), or nullptr): the free model's alpha and offsets and, for partial labels, the
// constrained model's. Sequences whose allowed sets are single tags take the log-likelihood path (gold score −
// log Z) and leave the constrained model's entries unwritten.
template <typename E, typename T>
struct PartitionForwardJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const uint8_t* allowed;
  const int64_t* lengths;
  int64_t T_len, max_length;
  T* alpha;
  double* offsets;
  T* alpha_allowed;
  double* offsets_allowed;
  double* log_partition;
  double* log_partition_allowed;
  T* value;

  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    const int K = tab->K;
    const bool store = alpha != nullptr;
    const bool partial = allowed != nullptr;
    // Workspace, then two (2, K) alpha scratches when nothing is stored, then the constrained emissions (L, K).
    const int64_t ws_size = crf::Workspace<T>::size(K);
    std::vector<T> scratch(ws_size + (store ? 0 : 4 * K) + (partial ? max_length * K : 0));
    std::vector<int64_t> tags(partial ? max_length : 0);
    const auto ws = crf::Workspace<T>::carve(scratch.data(), K);
    T* constrained = scratch.data() + ws_size + (store ? 0 : 4 * K);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lengths[b];
      const E* em = emissions + b * T_len * K;
      T* alpha_b = store ? alpha + b * T_len * K : scratch.data() + ws_size;
      const double log_z = crf::forward(*tab, em, L, alpha_b, store ? offsets + b * T_len : nullptr, store, ws);
      log_partition[b] = log_z;
      if (!partial) {
        value[b] = static_cast<T>(log_z);
        continue;
      }
      const uint8_t* allowed_b = allowed + b * T_len * K;
      if (crf::single_tags(allowed_b, L, K, tags.data())) {
        const double gold = crf::gold_score(*tab, em, tags.data(), L);
        log_partition_allowed[b] = gold;
        value[b] = static_cast<T>(gold - log_z);
        continue;
      }
      crf::constrain_emissions(em, allowed_b, L, K, constrained);
      T* alpha_c = store ? alpha_allowed + b * T_len * K : scratch.data() + ws_size + 2 * K;
      const double log_z_allowed = crf::forward(*tab, static_cast<const T*>(constrained), L, alpha_c,
                                                store ? offsets_allowed + b * T_len : nullptr, store, ws);
      log_partition_allowed[b] = log_z_allowed;
      value[b] = static_cast<T>(log_z_allowed - log_z);
    }
  }
};

// Gradient of sum_b grad[b] * value[b] (PartitionForwardJob's value): the accumulate mode of crf::backward on the
// constrained model with +g and the free one with -g (log partition: the free one with +g), or the
// log-likelihood gradient for sequences of single tags. Without saved alphas (nullptr) the forward recursions
// are run again per sequence. Transition gradients are summed per slot as in BackwardJob.
template <typename E, typename T>
struct PartitionBackwardJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const uint8_t* allowed;
  const int64_t* lengths;
  int64_t T_len, B, num_slots, max_length;
  const T* alpha;
  const double* offsets;
  const T* alpha_allowed;
  const double* offsets_allowed;
  const double* log_partition;
  const double* log_partition_allowed;
  const T* grad;
  E* grad_emissions;
  T* slot_grads;

  static constexpr bool kContract = true;  // fused multiply-adds in the AVX2 and AVX-512 variants
  FUSEDLOSS_INLINE void run(int64_t slot_begin, int64_t slot_end) const {
    constexpr bool kDirect = std::is_same<E, T>::value;  // else the gradient is summed in T, then converted
    const int K = tab->K;
    const int64_t KK = static_cast<int64_t>(K) * K;
    const int64_t slot_size = KK + 2 * K;
    const bool partial = allowed != nullptr;
    const bool saved = alpha != nullptr;
    const int64_t LK = max_length * K;
    const int64_t ws_size = crf::Workspace<T>::size(K);
    // Workspace | constrained emissions | gradient in T | recomputed alpha, alpha_allowed.
    std::vector<T> scratch(ws_size + (partial ? LK : 0) + (kDirect ? 0 : LK) + (saved ? 0 : 2 * LK));
    std::vector<double> offsets_scratch(saved ? 0 : 2 * max_length);
    std::vector<int64_t> tags(partial ? max_length : 0);
    const auto ws = crf::Workspace<T>::carve(scratch.data(), K);
    T* constrained = scratch.data() + ws_size;
    T* grad_t = constrained + (partial ? LK : 0);
    T* recomputed = grad_t + (kDirect ? 0 : LK);
    for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
      T* acc = slot_grads + slot * slot_size;
      T* acc_start = acc + KK;
      T* acc_end = acc + KK + K;
      for (int64_t b = slot * B / num_slots; b < (slot + 1) * B / num_slots; ++b) {
        const int64_t L = lengths[b];
        const E* em = emissions + b * T_len * K;
        E* out = grad_emissions + b * T_len * K;
        const uint8_t* allowed_b = partial ? allowed + b * T_len * K : nullptr;
        const bool single = partial && crf::single_tags(allowed_b, L, K, tags.data());
        const bool constrained_model = partial && !single;
        if (constrained_model) crf::constrain_emissions(em, allowed_b, L, K, constrained);
        const T* alpha_b;
        const double* offsets_b;
        const T* alpha_c = nullptr;
        const double* offsets_c = nullptr;
        double log_z, log_z_c = 0;
        if (saved) {
          alpha_b = alpha + b * T_len * K;
          offsets_b = offsets + b * T_len;
          log_z = log_partition[b];
          if (constrained_model) {
            alpha_c = alpha_allowed + b * T_len * K;
            offsets_c = offsets_allowed + b * T_len;
            log_z_c = log_partition_allowed[b];
          }
        } else {
          log_z = crf::forward(*tab, em, L, recomputed, offsets_scratch.data(), true, ws);
          alpha_b = recomputed;
          offsets_b = offsets_scratch.data();
          if (constrained_model) {
            log_z_c = crf::forward(*tab, static_cast<const T*>(constrained), L, recomputed + LK,
                                   offsets_scratch.data() + max_length, true, ws);
            alpha_c = recomputed + LK;
            offsets_c = offsets_scratch.data() + max_length;
          }
        }
        const T g = grad[b];
        if (single) {
          crf::backward<true>(*tab, em, static_cast<const int64_t*>(tags.data()), L, alpha_b, offsets_b, log_z, g,
                              out, acc, acc_start, acc_end, ws);
        } else {
          T* g_out = kDirect ? reinterpret_cast<T*>(out) : grad_t;
          std::fill(g_out, g_out + L * K, T(0));
          if (constrained_model) {
            crf::backward<true, true>(*tab, static_cast<const T*>(constrained), static_cast<const int64_t*>(nullptr),
                                      L, alpha_c, offsets_c, log_z_c, g, g_out, acc, acc_start, acc_end, ws);
          }
          crf::backward<true, true>(*tab, em, static_cast<const int64_t*>(nullptr), L, alpha_b, offsets_b, log_z,
                                    partial ? -g : g, g_out, acc, acc_start, acc_end, ws);
          if (!kDirect) {
            for (int64_t i = 0; i < L * K; ++i) out[i] = static_cast<E>(grad_t[i]);
          }
        }
        std::fill(out + L * K, out + T_len * K, E(0));
      }
    }
  }
};

template <typename E, typename T>
struct KBestJob {
  const crf::Tables<T>* tab;
  const E* emissions;
  const int64_t* lengths;
  int64_t T_len, max_length;
  int k;
  int64_t* paths;  // (B, k, T)
  T* scores;       // (B, k)

  FUSEDLOSS_INLINE void run(int64_t begin, int64_t end) const {
    const int K = tab->K;
    std::vector<T> scratch(crf::KBestWorkspace<T>::size(K, k));
    std::vector<int32_t> index_scratch(crf::KBestWorkspace<T>::index_size(K));
    const auto ws = crf::KBestWorkspace<T>::carve(scratch.data(), index_scratch.data(), K, k);
    std::vector<int32_t> backpointers(max_length * K * k);
    std::vector<double> best(k);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lengths[b];
      int64_t* paths_b = paths + b * k * T_len;
      crf::kbest_viterbi(*tab, emissions + b * T_len * K, L, k, ws, backpointers.data(), paths_b, T_len, best.data());
      for (int r = 0; r < k; ++r) {
        scores[b * k + r] = static_cast<T>(best[r]);
        std::fill(paths_b + r * T_len + L, paths_b + (r + 1) * T_len, int64_t(-1));
      }
    }
  }
};

int64_t max_of_lengths(const std::vector<int64_t>& lengths) {
  return lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
}

// ---------------------------------------------------------------------------------------------------
// Op implementations.

// Slots of transition-gradient accumulators: as many as there are sequences, up to 4M accumulator entries in all
// (16 MiB in float32).
int64_t slot_count(int64_t B, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(B, (int64_t(1) << 22) / (K * K + 2 * K)));
}

// The four gradients from the emission gradient and the slot accumulators (num_slots, K * K + 2 * K): the slots
// are summed in order (a fixed order: see Determinism above); the transition block is stored transposed ([j, i]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_gradients(
    const at::Tensor& grad_emissions, const at::Tensor& slot_grads, const at::Tensor& emissions_arg,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg) {
  const int64_t K = emissions_arg.size(2);
  const int64_t num_slots = slot_grads.size(0), slot_size = slot_grads.size(1);
  at::Tensor total = at::zeros({slot_size}, slot_grads.options());
  AT_DISPATCH_FLOATING_TYPES(total.scalar_type(), "crf_sum_slots", [&] {
    const scalar_t* slots = slot_grads.const_data_ptr<scalar_t>();
    scalar_t* sum = total.data_ptr<scalar_t>();
    for (int64_t slot = 0; slot < num_slots; ++slot) {
      for (int64_t k = 0; k < slot_size; ++k) sum[k] += slots[slot * slot_size + k];
    }
  });
  const at::Tensor grad_transitions = total.narrow(0, 0, K * K).view({K, K}).t().contiguous();
  const at::Tensor grad_start = total.narrow(0, K * K, K);
  const at::Tensor grad_end = total.narrow(0, K * K + K, K);
  return {grad_emissions.to(emissions_arg.scalar_type()), grad_transitions.to(transitions_arg.scalar_type()),
          grad_start.to(start_arg.scalar_type()), grad_end.to(end_arg.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_forward_cpu(
    const at::Tensor& emissions_arg, const at::Tensor& tags_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    bool save_for_backward) {
  const at::ScalarType result_dtype = c10::promoteTypes(emissions_arg.scalar_type(), transitions_arg.scalar_type());
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const at::Tensor tags = tags_arg.to(at::kLong).contiguous();
  const int64_t B = emissions.size(0), T_len = emissions.size(1), K = emissions.size(2);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  const auto opts = emissions.options().dtype(dtype);
  at::Tensor log_likelihood = at::empty({B}, opts);
  const auto opts64 = emissions.options().dtype(at::kDouble);
  at::Tensor log_partition = at::empty({B}, opts64);
  at::Tensor alpha = save_for_backward ? at::empty({B, T_len, K}, opts) : at::empty({0}, opts);
  at::Tensor offsets = save_for_backward ? at::empty({B, T_len}, opts64) : at::empty({0}, opts64);
  std::vector<uint8_t> bad_tags(B, 0);
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, true);
    const ForwardJob<E, T> job{&tables.tab,
                               emissions.const_data_ptr<E>(),
                               tags.const_data_ptr<int64_t>(),
                               lengths.data(),
                               T_len,
                               save_for_backward ? alpha.data_ptr<T>() : nullptr,
                               save_for_backward ? offsets.data_ptr<double>() : nullptr,
                               log_likelihood.data_ptr<T>(),
                               log_partition.data_ptr<double>(),
                               bad_tags.data()};
    run_parallel(job, B);
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(!bad_tags[b], "tags must be in [0, ", K, ") at unmasked positions, got a value outside in "
                      "sequence ", b);
  }
  return {log_likelihood.to(result_dtype), log_partition, alpha, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_backward_cpu(
    const at::Tensor& grad_arg, const at::Tensor& emissions_arg, const at::Tensor& tags_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    const at::Tensor& log_partition_arg, const at::Tensor& alpha_arg, const at::Tensor& offsets_arg) {
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const at::Tensor tags = tags_arg.to(at::kLong).contiguous();
  const int64_t B = emissions.size(0), T_len = emissions.size(1), K = emissions.size(2);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  const at::Tensor grad = grad_arg.to(dtype).contiguous();
  const at::Tensor log_partition = log_partition_arg.to(at::kDouble).contiguous();
  const bool have_alpha = alpha_arg.numel() > 0;
  const at::Tensor alpha = have_alpha ? alpha_arg.to(dtype).contiguous() : alpha_arg;
  const at::Tensor offsets = have_alpha ? offsets_arg.to(at::kDouble).contiguous() : offsets_arg;
  const int64_t slot_size = K * K + 2 * K;
  const int64_t num_slots = slot_count(B, K);
  at::Tensor slot_grads = at::zeros({num_slots, slot_size}, emissions.options().dtype(dtype));
  at::Tensor grad_emissions = at::empty_like(emissions);
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, true);
    const BackwardJob<E, T> job{&tables.tab,
                                emissions.const_data_ptr<E>(),
                                tags.const_data_ptr<int64_t>(),
                                lengths.data(),
                                T_len,
                                B,
                                num_slots,
                                max_of_lengths(lengths),
                                have_alpha ? alpha.const_data_ptr<T>() : nullptr,
                                have_alpha ? offsets.const_data_ptr<double>() : nullptr,
                                log_partition.const_data_ptr<double>(),
                                grad.const_data_ptr<T>(),
                                grad_emissions.data_ptr<E>(),
                                slot_grads.data_ptr<T>()};
    run_parallel(job, num_slots);
  });
  return finish_gradients(grad_emissions, slot_grads, emissions_arg, transitions_arg, start_arg, end_arg);
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_cpu(const at::Tensor& emissions_arg, const at::Tensor& mask,
                                                   const at::Tensor& transitions_arg, const at::Tensor& start_arg,
                                                   const at::Tensor& end_arg) {
  check_crf_args(emissions_arg, nullptr, &mask, transitions_arg, start_arg, end_arg);
  const at::ScalarType result_dtype = c10::promoteTypes(emissions_arg.scalar_type(), transitions_arg.scalar_type());
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const int64_t B = emissions.size(0), T_len = emissions.size(1), K = emissions.size(2);
  TORCH_CHECK(K <= 32767, "crf_viterbi: backpointers are int16, so K must be at most 32767, got ", K);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  at::Tensor paths = at::empty({B, T_len}, emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B}, emissions.options().dtype(dtype));
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, false);
    const E* em = emissions.const_data_ptr<E>();
    if (K <= 256) {
      run_parallel(ViterbiJob<E, T, uint8_t>{&tables.tab, em, lengths.data(), T_len, max_of_lengths(lengths),
                                             paths.data_ptr<int64_t>(), scores.data_ptr<T>()},
                   B);
    } else {
      run_parallel(ViterbiJob<E, T, int16_t>{&tables.tab, em, lengths.data(), T_len, max_of_lengths(lengths),
                                             paths.data_ptr<int64_t>(), scores.data_ptr<T>()},
                   B);
    }
  });
  return {paths, contiguous_as(scores, result_dtype)};
}

at::Tensor crf_marginals_cpu(const at::Tensor& emissions_arg, const at::Tensor& mask,
                             const at::Tensor& transitions_arg, const at::Tensor& start_arg,
                             const at::Tensor& end_arg) {
  check_crf_args(emissions_arg, nullptr, &mask, transitions_arg, start_arg, end_arg);
  const at::ScalarType result_dtype = c10::promoteTypes(emissions_arg.scalar_type(), transitions_arg.scalar_type());
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const int64_t B = emissions.size(0), T_len = emissions.size(1), K = emissions.size(2);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  at::Tensor marginals = at::empty({B, T_len, K}, emissions.options().dtype(dtype));
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, true);
    run_parallel(MarginalsJob<E, T>{&tables.tab, emissions.const_data_ptr<E>(), lengths.data(), T_len,
                                    max_of_lengths(lengths), marginals.data_ptr<T>()},
                 B);
  });
  return marginals.to(result_dtype);
}

// Partial-label log-likelihood (allowed defined) or log partition (allowed undefined). saved (when
// save_for_backward): log Z (B,) float64, alpha (B, T, K), its offsets (B, T) float64 and, for partial labels,
// the same three of the constrained model (log Z_allowed holds the gold score for sequences of single tags,
// whose constrained alpha is not written).
std::tuple<at::Tensor, std::vector<at::Tensor>> partition_forward(
    const at::Tensor& emissions_arg, const at::Tensor* allowed_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    bool save_for_backward) {
  const at::ScalarType result_dtype = c10::promoteTypes(emissions_arg.scalar_type(), transitions_arg.scalar_type());
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const bool partial = allowed_arg != nullptr;
  const at::Tensor allowed = partial ? allowed_arg->to(at::kBool).contiguous() : at::Tensor();
  const int64_t B = emissions.size(0), T_len = emissions.size(1), K = emissions.size(2);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  const auto opts = emissions.options().dtype(dtype);
  const auto opts64 = emissions.options().dtype(at::kDouble);
  at::Tensor value = at::empty({B}, opts);
  at::Tensor log_partition = at::empty({B}, opts64);
  at::Tensor log_partition_allowed = at::empty({partial ? B : 0}, opts64);
  at::Tensor alpha, offsets, alpha_allowed, offsets_allowed;
  if (save_for_backward) {
    alpha = at::empty({B, T_len, K}, opts);
    offsets = at::empty({B, T_len}, opts64);
    if (partial) {
      alpha_allowed = at::empty({B, T_len, K}, opts);
      offsets_allowed = at::empty({B, T_len}, opts64);
    }
  }
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, true);
    const bool keep_allowed = save_for_backward && partial;
    const PartitionForwardJob<E, T> job{&tables.tab,
                                        emissions.const_data_ptr<E>(),
                                        partial ? static_cast<const uint8_t*>(allowed.const_data_ptr()) : nullptr,
                                        lengths.data(),
                                        T_len,
                                        max_of_lengths(lengths),
                                        save_for_backward ? alpha.data_ptr<T>() : nullptr,
                                        save_for_backward ? offsets.data_ptr<double>() : nullptr,
                                        keep_allowed ? alpha_allowed.data_ptr<T>() : nullptr,
                                        keep_allowed ? offsets_allowed.data_ptr<double>() : nullptr,
                                        log_partition.data_ptr<double>(),
                                        partial ? log_partition_allowed.data_ptr<double>() : nullptr,
                                        value.data_ptr<T>()};
    run_parallel(job, B);
  });
  std::vector<at::Tensor> saved;
  if (save_for_backward) {
    saved = {log_partition, alpha, offsets};
    if (partial) saved.insert(saved.end(), {log_partition_allowed, alpha_allowed, offsets_allowed});
  }
  return {value.to(result_dtype), std::move(saved)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partition_backward(
    const at::Tensor& grad_arg, const at::Tensor& emissions_arg, const at::Tensor* allowed_arg,
    const at::Tensor& mask, const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    at::TensorList saved_arg) {
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const bool partial = allowed_arg != nullptr;
  const at::Tensor allowed = partial ? allowed_arg->to(at::kBool).contiguous() : at::Tensor();
  const int64_t B = emissions.size(0), T_len = emissions.size(1), K = emissions.size(2);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  const at::Tensor grad = grad_arg.to(dtype).contiguous();
  // An empty list: the forward recursions are run again (what a forward without save_for_backward implies).
  const bool have_saved = !saved_arg.empty();
  TORCH_CHECK(!have_saved || saved_arg.size() == (partial ? 6u : 3u),
              "crf: saved must be the list the forward returned, got ", saved_arg.size(), " tensors");
  std::vector<at::Tensor> saved;
  for (size_t i = 0; i < saved_arg.size(); ++i) {
    const bool is_alpha = i % 3 == 1;
    saved.push_back(saved_arg[i].to(is_alpha ? dtype : at::kDouble).contiguous());
  }
  const int64_t slot_size = K * K + 2 * K;
  const int64_t num_slots = slot_count(B, K);
  at::Tensor slot_grads = at::zeros({num_slots, slot_size}, emissions.options().dtype(dtype));
  at::Tensor grad_emissions = at::empty_like(emissions);
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, true);
    const bool with_allowed = have_saved && partial;
    const PartitionBackwardJob<E, T> job{&tables.tab,
                                         emissions.const_data_ptr<E>(),
                                         partial ? static_cast<const uint8_t*>(allowed.const_data_ptr()) : nullptr,
                                         lengths.data(),
                                         T_len,
                                         B,
                                         num_slots,
                                         max_of_lengths(lengths),
                                         have_saved ? saved[1].const_data_ptr<T>() : nullptr,
                                         have_saved ? saved[2].const_data_ptr<double>() : nullptr,
                                         with_allowed ? saved[4].const_data_ptr<T>() : nullptr,
                                         with_allowed ? saved[5].const_data_ptr<double>() : nullptr,
                                         have_saved ? saved[0].const_data_ptr<double>() : nullptr,
                                         with_allowed ? saved[3].const_data_ptr<double>() : nullptr,
                                         grad.const_data_ptr<T>(),
                                         grad_emissions.data_ptr<E>(),
                                         slot_grads.data_ptr<T>()};
    run_parallel(job, num_slots);
  });
  return finish_gradients(grad_emissions, slot_grads, emissions_arg, transitions_arg, start_arg, end_arg);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> crf_partial_log_likelihood_forward_cpu(
    const at::Tensor& emissions, const at::Tensor& allowed, const at::Tensor& mask, const at::Tensor& transitions,
    const at::Tensor& start, const at::Tensor& end, bool save_for_backward) {
  return partition_forward(emissions, &allowed, mask, transitions, start, end, save_for_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_partial_log_likelihood_backward_cpu(
    const at::Tensor& grad, const at::Tensor& emissions, const at::Tensor& allowed, const at::Tensor& mask,
    const at::Tensor& transitions, const at::Tensor& start, const at::Tensor& end, at::TensorList saved) {
  return partition_backward(grad, emissions, &allowed, mask, transitions, start, end, saved);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> crf_log_partition_forward_cpu(
    const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& transitions, const at::Tensor& start,
    const at::Tensor& end, bool save_for_backward) {
  return partition_forward(emissions, nullptr, mask, transitions, start, end, save_for_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_partition_backward_cpu(
    const at::Tensor& grad, const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& transitions,
    const at::Tensor& start, const at::Tensor& end, at::TensorList saved) {
  return partition_backward(grad, emissions, nullptr, mask, transitions, start, end, saved);
}

std::tuple<at::Tensor, at::Tensor> crf_kbest_viterbi_cpu(const at::Tensor& emissions_arg, const at::Tensor& mask,
                                                         const at::Tensor& transitions_arg,
                                                         const at::Tensor& start_arg, const at::Tensor& end_arg,
                                                         int64_t k) {
  check_crf_args(emissions_arg, nullptr, &mask, transitions_arg, start_arg, end_arg);
  check_kbest_k(k, emissions_arg.size(2));
  const at::ScalarType result_dtype = c10::promoteTypes(emissions_arg.scalar_type(), transitions_arg.scalar_type());
  const at::ScalarType dtype = compute_dtype(emissions_arg, transitions_arg);
  const at::Tensor emissions = emissions_for(emissions_arg, dtype);
  const int64_t B = emissions.size(0), T_len = emissions.size(1);
  const std::vector<int64_t> lengths = sequence_lengths(mask);
  at::Tensor paths = at::empty({B, k, T_len}, emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B, k}, emissions.options().dtype(dtype));
  dispatch_types(emissions, [&](auto e_tag, auto t_tag) {
    using E = typename decltype(e_tag)::type;
    using T = typename decltype(t_tag)::type;
    const TransitionTables<T> tables(transitions_arg, start_arg, end_arg, dtype, false);
    run_parallel(KBestJob<E, T>{&tables.tab, emissions.const_data_ptr<E>(), lengths.data(), T_len,
                                max_of_lengths(lengths), static_cast<int>(k), paths.data_ptr<int64_t>(),
                                scores.data_ptr<T>()},
                 B);
  });
  // Scores go through T first, as crf_viterbi's do, so that k = 1 gives its bits in every result dtype.
  return {paths, contiguous_as(scores, result_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("crf_log_likelihood_forward", &crf_log_likelihood_forward_cpu);
  m.impl("crf_log_likelihood_backward", &crf_log_likelihood_backward_cpu);
  m.impl("crf_viterbi", &crf_viterbi_cpu);
  m.impl("crf_marginals", &crf_marginals_cpu);
  m.impl("crf_partial_log_likelihood_forward", &crf_partial_log_likelihood_forward_cpu);
  m.impl("crf_partial_log_likelihood_backward", &crf_partial_log_likelihood_backward_cpu);
  m.impl("crf_log_partition_forward", &crf_log_partition_forward_cpu);
  m.impl("crf_log_partition_backward", &crf_log_partition_backward_cpu);
  m.impl("crf_kbest_viterbi", &crf_kbest_viterbi_cpu);
}

}  // namespace fusedloss
