// Linear-chain CRF math for one sequence, torch-free, shared by csrc/cpu and csrc/cuda.
//
// One sequence of length L (its mask is a prefix of L ones), emissions e (L, K), transition scores
// A[i, j] (i -> j), start scores s and end scores f. A tag path y scores
//     score(y) = s[y_0] + sum_{t<L} e[t, y_t] + sum_{0<t<L} A[y_{t-1}, y_t] + f[y_{L-1}]
// and log Z = logsumexp_y score(y), by the forward algorithm in log space
//     alpha_0[j] = s[j] + e[0, j],  alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + A[i, j]) + e[t, j],
//     log Z = logsumexp_j(alpha_{L-1}[j] + f[j]),
// and the backward algorithm beta_{L-1}[i] = f[i], beta_{t-1}[i] = logsumexp_j(A[i, j] + e[t, j] + beta_t[j]).
// Marginals: u_t[k] = P(y_t = k) = exp(alpha_t[k] + beta_t[k] - log Z) and
// P_t(i, j) = P(y_{t-1} = i, y_t = j) = exp(alpha_{t-1}[i] + A[i, j] + e[t, j] + beta_t[j] - log Z).
// Gradient of the log-likelihood score(y) - log Z: gold indicators minus these marginals.
//
// Matrix form (the scaled forward algorithm of HMMs, as in CRFsuite). With the column maxima c_j of A and
// Ecol[i, j] = exp(A[i, j] - c_j), computed once per call, a forward step is
//     m = max_i alpha[i],  p_i = exp(alpha[i] - m),  S_j = sum_i p_i Ecol[i, j],
//     alpha'[j] = log S_j + m + c_j + e[t, j]:
// K exps, K^2 multiply-adds (vectorized along j: Ecol is row-major) and K logs instead of K^2 exps. The
// backward step is the same with the row maxima r_i of A and Erow^T[j, i] = exp(A[i, j] - r_i) (stored
// transposed so that its inner loop runs along i). Forbidden transitions (-1e4) are exact zeros there.
//
// Underflow guard. The matrix form loses a column when all its terms underflow: its best predecessor lies
// far below m (emissions in the hundreds, or a column reachable only from unlikely tags through forbidden
// transitions). Every term that underflows was below the smallest normal number `tiny`, so with
// S_j >= kMinSum the sum keeps a relative error under K * tiny / kMinSum (1e-11 at K = 1024 in float32);
// columns under kMinSum (or NaN) take the exact path M_j + log sum_i exp(alpha[i] + A[i, j] - M_j) with
// M_j = max_i(alpha[i] + A[i, j]). They are rare, so typical steps pay nothing for the guard.
//
// Backward with the pairwise marginals in the same sweep. With v_j = e[t, j] + beta_t[j], mv = max_j v_j,
// w_j = exp(v_j - mv) and the row sums S'_i = sum_j Erow[i, j] w_j (so beta_{t-1}[i] = log S'_i + mv + r_i),
//     P_t(i, j) = F_i Erow[i, j] w_j,   F_i = exp(alpha_{t-1}[i] + r_i + mv - log Z),   u_{t-1}[i] = F_i S'_i.
// F_i <= 1 / S'_i, so for guarded rows F_i stays finite; a row whose F_i exceeds 1 / kMinSum (its S'_i is
// tiny) gets its pairwise marginals exactly instead. One K^2 sweep thus gives beta, the tag marginals and the
// transition gradient.
//
// Viterbi: the same recursion in the max-plus semiring (no exp), backpointers in a compact buffer
// (uint8_t for K <= 256, int16_t above), then a backtrace. Ties go to the lowest tag index.
//
// Types: E is the emission type (float, double, or a 16-bit float type convertible to float), T the
// accumulation type (float or double). Every function works on one sequence with caller-provided workspace.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/common.h"
#include "kernels/fast_math.h"
#include "kernels/softmax_loss.h"

namespace fusedloss {
namespace crf {

// Threshold of the underflow guard (see the header comment), and its reciprocal bounding F_i.
template <typename T>
struct Guard;

// max_drift: how far the sum of one position's tag marginals may be from 1 before the transition gradient of
// that step is rescaled too (normalize_marginals).
template <>
struct Guard<float> {
  static constexpr float min_sum = 1e-24f;
  static constexpr float max_scale = 1e24f;
  static constexpr float max_drift = 1e-6f;
};

template <>
struct Guard<double> {
  static constexpr double min_sum = 1e-280;
  static constexpr double max_scale = 1e280;
  static constexpr double max_drift = 1e-14;
};

// exp and log for the K-vectors of a step: on the host in float32 the shared vectorizable ones
// (kernels/fast_math.h: Cephes, about 1 ulp; exp is exactly 0 below the smallest normal number, so exp(-1e4) of a
// forbidden transition is 0, and NaN propagates; log gets a positive normal finite argument here, which the guard
// makes sure of); double precision and device code use the library functions.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T fast_exp(T x) {
  return exp(x);
}

template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T fast_log(T x) {
  return log(x);
}

#ifndef __CUDA_ARCH__
template <>
FUSEDLOSS_INLINE float fast_exp<float>(float x) {
  return ::fusedloss::fast_exp(x);
}

template <>
FUSEDLOSS_INLINE float fast_log<float>(float x) {
  return ::fusedloss::fast_log(x);
}
#endif

// Tables of the transition scores, computed once per call (make_tables) and shared by every sequence.
template <typename T>
struct Tables {
  int K;
  const T* transitions;  // (K, K) row-major, [i, j] scores i -> j
  const T* start;        // (K,)
  const T* end;          // (K,)
  T* col_max;            // (K,) c_j = max_i A[i, j]
  T* row_max;            // (K,) r_i = max_j A[i, j]
  T* e_col;              // (K, K) [i, j] = exp(A[i, j] - c_j)
  T* e_row_t;            // (K, K) [j, i] = exp(A[i, j] - r_i)
};

template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void make_tables(const Tables<T>& tab) {
  const int K = tab.K;
  for (int j = 0; j < K; ++j) tab.col_max[j] = tab.transitions[j];
  for (int i = 0; i < K; ++i) {
    const T* row = tab.transitions + static_cast<int64_t>(i) * K;
    T row_max = row[0];
    for (int j = 0; j < K; ++j) {
      tab.col_max[j] = max_of(tab.col_max[j], row[j]);
      row_max = max_of(row_max, row[j]);
    }
    tab.row_max[i] = row_max;
  }
  for (int i = 0; i < K; ++i) {
    const T* row = tab.transitions + static_cast<int64_t>(i) * K;
    T* e_col = tab.e_col + static_cast<int64_t>(i) * K;
    for (int j = 0; j < K; ++j) e_col[j] = fast_exp(row[j] - tab.col_max[j]);
    for (int j = 0; j < K; ++j) tab.e_row_t[static_cast<int64_t>(j) * K + i] = fast_exp(row[j] - tab.row_max[i]);
  }
}

template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T max_over(const T* x, int K) {
  T m = x[0];
  for (int k = 1; k < K; ++k) m = max_of(m, x[k]);
  return m;
}

// logsumexp_k(x[k] + y[k]) with the max subtracted first; a NaN term makes the sum NaN.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T logsumexp_sum(const T* x, const T* y, int K) {
  T m = x[0] + y[0];
  for (int k = 1; k < K; ++k) m = max_of(m, x[k] + y[k]);
  T s = 0;
  for (int k = 0; k < K; ++k) s += exp(x[k] + y[k] - m);
  return m + log(s);
}

// Emission row t in the accumulation type (16-bit floats are converted once, outside the K^2 loops).
template <typename E, typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void load_row(const E* emissions, int64_t t, int K, T* out) {
  const E* row = emissions + t * K;
  for (int k = 0; k < K; ++k) out[k] = static_cast<T>(row[k]);
}

// Workspace of the forward and backward sweeps: 6 vectors of K.
template <typename T>
struct Workspace {
  T* emission;  // the current emission row in T
  T* weights;   // p (forward) or w (backward)
  T* sums;      // S (forward) or S' (backward)
  T* scale;     // F (backward)
  T* beta;      // beta_t, then beta_{t-1} (backward)
  T* extra;     // v (backward)
  FUSEDLOSS_HOST_DEVICE static int64_t size(int K) { return 6 * static_cast<int64_t>(K); }
  FUSEDLOSS_HOST_DEVICE static Workspace carve(T* buffer, int K) {
    return Workspace{buffer, buffer + K, buffer + 2 * K, buffer + 3 * K, buffer + 4 * K, buffer + 5 * K};
  }
};

// Subtracts the maximum of x (K,) from it and returns that maximum: alpha and beta are kept as
// alpha_t = hat_t + offset_t with hat_t <= 0 and a float64 offset, so the K^2 loops run on numbers of the
// size of one step's spread, and the growth of the scores with t (|log Z| ~ L * |emission|) is summed in
// float64 rather than rounded into every entry.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T normalize(T* x, int K) {
  const T m = max_over(x, K);
  for (int k = 0; k < K; ++k) x[k] -= m;
  return m;
}

// x[k] <- x[k] + y[k] - m with m = max_k(x[k] + y[k]) formed in float64, and returns m: normalize(x + y) without
// rounding x + y to T first. y is an emission row: adding emissions in the hundreds or thousands in float32
// would round the best tag's running score to the ulp of the emission (6e-5 at 1000) at every step, and these
// roundings, different in the forward and the backward sweep, would move exp(alpha + beta - log Z) of a sure
// tag away from 1 by their sum. Here the best tag's entry is exactly 0 and its score goes into the offset whole.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double add_normalized(T* x, const T* y, int K) {
  double m = static_cast<double>(x[0]) + static_cast<double>(y[0]);
  for (int k = 1; k < K; ++k) m = max_of(m, static_cast<double>(x[k]) + static_cast<double>(y[k]));
  for (int k = 0; k < K; ++k) x[k] = static_cast<T>((static_cast<double>(x[k]) + static_cast<double>(y[k])) - m);
  return m;
}

// One forward step on normalized values: next[j] = logsumexp_i(prev[i] + A[i, j]) + emission[j]
// (matrix form, guarded), then normalized (add_normalized); returns the maximum taken out.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double forward_step(const Tables<T>& tab, const T* prev, const T* emission,
                                                      T* next, T* p, T* sums) {
  const int K = tab.K;
  const T m = max_over(prev, K);  // 0 unless a NaN came in
  for (int i = 0; i < K; ++i) p[i] = fast_exp(prev[i] - m);
  for (int j = 0; j < K; ++j) sums[j] = 0;
  // Four rows of E per sweep over sums (a quarter of its loads and stores). Rows whose weights are all 0
  // (tags far below the best one) are skipped; NaN is not 0, so it is kept.
  T* __restrict__ acc = sums;
  int i = 0;
  for (; i + 4 <= K; i += 4) {
    const T p0 = p[i], p1 = p[i + 1], p2 = p[i + 2], p3 = p[i + 3];
    if (p0 == 0 && p1 == 0 && p2 == 0 && p3 == 0) continue;
    const T* __restrict__ e0 = tab.e_col + static_cast<int64_t>(i) * K;
    const T* __restrict__ e1 = e0 + K;
    const T* __restrict__ e2 = e1 + K;
    const T* __restrict__ e3 = e2 + K;
    for (int j = 0; j < K; ++j) acc[j] += (p0 * e0[j] + p1 * e1[j]) + (p2 * e2[j] + p3 * e3[j]);
  }
  for (; i < K; ++i) {
    const T pi = p[i];
    if (pi == 0) continue;
    const T* __restrict__ e_col = tab.e_col + static_cast<int64_t>(i) * K;
    for (int j = 0; j < K; ++j) acc[j] += pi * e_col[j];
  }
  for (int j = 0; j < K; ++j) {
    const T s = sums[j] >= Guard<T>::min_sum ? sums[j] : Guard<T>::min_sum;
    next[j] = fast_log(s) + m + tab.col_max[j];
  }
  for (int j = 0; j < K; ++j) {
    if (sums[j] >= Guard<T>::min_sum) continue;
    // Exact column: every term of the matrix form underflowed (or a NaN came in).
    T best = prev[0] + tab.transitions[j];
    for (int i = 1; i < K; ++i) best = max_of(best, prev[i] + tab.transitions[static_cast<int64_t>(i) * K + j]);
    T s = 0;
    for (int i = 0; i < K; ++i) s += exp(prev[i] + tab.transitions[static_cast<int64_t>(i) * K + j] - best);
    next[j] = best + log(s);
  }
  return add_normalized(next, emission, K);
}

// Forward algorithm over one sequence; returns log Z. With store_alpha, alpha (L, K) and offsets (L,) keep
// alpha_t = alpha[t] + offsets[t] for the backward sweep; without, alpha is (2, K) of scratch and offsets is
// unused.
template <typename E, typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double forward(const Tables<T>& tab, const E* emissions, int64_t L, T* alpha,
                                                      double* offsets, bool store_alpha, const Workspace<T>& ws) {
  const int K = tab.K;
  load_row(emissions, 0, K, ws.emission);
  for (int k = 0; k < K; ++k) alpha[k] = tab.start[k];
  double offset = add_normalized(alpha, ws.emission, K);
  if (store_alpha) offsets[0] = offset;
  for (int64_t t = 1; t < L; ++t) {
    const T* prev = alpha + (store_alpha ? (t - 1) * K : ((t - 1) & 1) * K);
    T* next = alpha + (store_alpha ? t * K : (t & 1) * K);
    load_row(emissions, t, K, ws.emission);
    offset += forward_step(tab, prev, ws.emission, next, ws.weights, ws.sums);
    if (store_alpha) offsets[t] = offset;
  }
  const T* last = alpha + (store_alpha ? (L - 1) * K : ((L - 1) & 1) * K);
  return offset + static_cast<double>(logsumexp_sum(last, tab.end, K));
}

// score(tags) of one sequence; tags are in [0, K) (the caller checks: see tags_in_range). Summed in float64,
// like the offsets of the forward algorithm that it is compared with.
template <typename E, typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double gold_score(const Tables<T>& tab, const E* emissions,
                                                         const int64_t* tags, int64_t L) {
  const int K = tab.K;
  double score = static_cast<double>(tab.start[tags[0]]) + static_cast<double>(static_cast<T>(emissions[tags[0]]));
  for (int64_t t = 1; t < L; ++t) {
    score += static_cast<double>(tab.transitions[tags[t - 1] * K + tags[t]]);
    score += static_cast<double>(static_cast<T>(emissions[t * K + tags[t]]));
  }
  return score + static_cast<double>(tab.end[tags[L - 1]]);
}

// Scales one position's tag marginals u (K,) to sum to 1 and returns 1/Z − 1 for their sum Z (0 when Z is not
// positive). They sum to 1 in exact arithmetic; the computed Z is off by the rounding of the scores that alpha,
// beta and log Z are made of (about an ulp of the emissions when they are far larger than the transitions: a
// tag that is sure given the future may be far below the best one given the past, and its rounded alpha then
// carries an error of that ulp), which would keep a sure tag's probability from being exactly 1.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T normalize_marginals(T* u, int K) {
  T z = 0;
  for (int k = 0; k < K; ++k) z += u[k];
  if (!(z > T(0))) return T(0);
  const T inv = T(1) / z;
  for (int k = 0; k < K; ++k) u[k] *= inv;
  return inv - T(1);
}

FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE bool tags_in_range(const int64_t* tags, int64_t L, int K) {
  bool ok = true;
  for (int64_t t = 0; t < L; ++t) ok = ok && tags[t] >= 0 && tags[t] < K;
  return ok;
}

// Backward sweep over one sequence, from the stored alpha (L, K) with its offsets (L,) and log Z. beta is
// kept normalized the same way (beta_t = beta[.] + beta_offset), and every exponent that combines both with
// log Z takes its offsets as one float64 sum first.
// kGradient = true (log-likelihood gradient, tags given): out[t, k] = g * (1[y_t = k] - u_t[k]) and the
//   transition gradients are accumulated: grad_transitions_t[j * K + i] += g * (gold count - sum_t P_t(i, j))
//   (transposed), grad_start[k] += g * (1[y_0 = k] - u_0[k]), grad_end[k] += g * (1[y_{L-1} = k] - u_{L-1}[k]).
// kGradient = false (marginals): out[t, k] = u_t[k]; tags and the gradient pointers are unused.
// kGradient = kAccumulate = true (gradient of g * log Z, no gold path): out[t, k] += g * u_t[k],
//   grad_transitions_t[j * K + i] += g * sum_t P_t(i, j), grad_start += g * u_0, grad_end += g * u_{L-1}; tags
//   are unused. Two calls with +g and -g on two models give the gradient of a difference of log partitions.
// Rows t >= L of out are not written.
template <bool kGradient, bool kAccumulate = false, typename E, typename T, typename Out>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void backward(const Tables<T>& tab, const E* emissions, const int64_t* tags,
                                                     int64_t L, const T* alpha, const double* offsets,
                                                     double log_z, T g, Out* out, T* grad_transitions_t,
                                                     T* grad_start, T* grad_end, const Workspace<T>& ws) {
  static_assert(kGradient || !kAccumulate, "the accumulate mode is a gradient mode");
  const int K = tab.K;
  // The transition gradient below is written as "minus gm times the pairwise marginals": gm = g for the
  // log-likelihood, -g for the accumulate mode.
  const T gm = kAccumulate ? -g : g;
  T* beta = ws.beta;
  T* u = ws.scale;  // u_t of the row being written; F is computed into the same vector below
  const T* alpha_last = alpha + (L - 1) * K;
  for (int k = 0; k < K; ++k) beta[k] = tab.end[k];
  double beta_offset = static_cast<double>(normalize(beta, K));
  {
    const T shift = static_cast<T>(offsets[L - 1] + beta_offset - log_z);
    for (int k = 0; k < K; ++k) u[k] = exp(alpha_last[k] + beta[k] + shift);
    normalize_marginals(u, K);
  }
  // 1 − u[gold] as the sum of the other tags' marginals (u sums to 1: normalize_marginals): exact where 1 − u
  // of a rounded u close to 1 would carry ulp(1) / (1 − u) of relative error.
  auto residual = [&](const T* marginals, int64_t gold) {
    T others = 0;
    for (int k = 0; k < K; ++k) others += k == gold ? T(0) : marginals[k];
    return others;
  };
  auto write_row = [&](int64_t t, const T* marginals) {
    Out* row = out + t * K;
    if (kAccumulate) {
      for (int k = 0; k < K; ++k) row[k] = static_cast<Out>(row[k] + g * marginals[k]);
    } else if (kGradient) {
      for (int k = 0; k < K; ++k) row[k] = static_cast<Out>(-g * marginals[k]);
      row[tags[t]] = static_cast<Out>(g * residual(marginals, tags[t]));
    } else {
      for (int k = 0; k < K; ++k) row[k] = static_cast<Out>(marginals[k]);
    }
  };
  write_row(L - 1, u);
  if (kAccumulate) {
    for (int k = 0; k < K; ++k) grad_end[k] += g * u[k];
  } else if (kGradient) {
    for (int k = 0; k < K; ++k) grad_end[k] -= k == tags[L - 1] ? T(0) : g * u[k];
    grad_end[tags[L - 1]] += g * residual(u, tags[L - 1]);
  }
  T* v = ws.extra;
  T* w = ws.weights;
  T* sums = ws.sums;
  T* scale = ws.scale;
  for (int64_t t = L - 1; t >= 1; --t) {
    const T* alpha_prev = alpha + (t - 1) * K;
    // v_j = emission[t, j] + beta_t[j] - mv, relative to its maximum mv (add_normalized).
    load_row(emissions, t, K, v);
    const double mv = add_normalized(v, beta, K);
    // alpha_{t-1} + (v + mv) - log Z = alpha_prev + v + shift: mv and the offsets enter as one rounded number.
    const T shift = static_cast<T>(mv + offsets[t - 1] + beta_offset - log_z);
    for (int j = 0; j < K; ++j) w[j] = fast_exp(v[j]);
    for (int i = 0; i < K; ++i) scale[i] = fast_exp(alpha_prev[i] + tab.row_max[i] + shift);
    for (int i = 0; i < K; ++i) sums[i] = 0;
    // ws.emission is free in this sweep: it holds g * F_i for the rows swept in the matrix form.
    T* g_scale = ws.emission;
    if (kGradient) {
      for (int i = 0; i < K; ++i) g_scale[i] = scale[i] <= Guard<T>::max_scale ? gm * scale[i] : T(0);
      const T* __restrict__ gs = g_scale;
      T* __restrict__ acc = sums;
      for (int j = 0; j < K; ++j) {
        const T wj = w[j];
        if (wj == 0) continue;
        const T* __restrict__ e_row = tab.e_row_t + static_cast<int64_t>(j) * K;
        T* __restrict__ grad = grad_transitions_t + static_cast<int64_t>(j) * K;
        for (int i = 0; i < K; ++i) {
          const T ew = e_row[i] * wj;
          acc[i] += ew;
          grad[i] -= gs[i] * ew;
        }
      }
      if (!kAccumulate) grad_transitions_t[tags[t] * K + tags[t - 1]] += g;
    } else {
      T* __restrict__ acc = sums;
      int j = 0;
      for (; j + 4 <= K; j += 4) {
        const T w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
        if (w0 == 0 && w1 == 0 && w2 == 0 && w3 == 0) continue;
        const T* __restrict__ e0 = tab.e_row_t + static_cast<int64_t>(j) * K;
        const T* __restrict__ e1 = e0 + K;
        const T* __restrict__ e2 = e1 + K;
        const T* __restrict__ e3 = e2 + K;
        for (int i = 0; i < K; ++i) acc[i] += (e0[i] * w0 + e1[i] * w1) + (e2[i] * w2 + e3[i] * w3);
      }
      for (; j < K; ++j) {
        const T wj = w[j];
        if (wj == 0) continue;
        const T* __restrict__ e_row = tab.e_row_t + static_cast<int64_t>(j) * K;
        for (int i = 0; i < K; ++i) acc[i] += e_row[i] * wj;
      }
    }
    // beta_{t-1} (relative to beta_offset + mv) and u_{t-1} = F * S' (overwrites F, kept per row where the
    // exact path needs it).
    for (int i = 0; i < K; ++i) {
      const T s = sums[i] >= Guard<T>::min_sum ? sums[i] : Guard<T>::min_sum;
      beta[i] = fast_log(s) + tab.row_max[i];
    }
    for (int i = 0; i < K; ++i) {
      const bool exact_row = !(sums[i] >= Guard<T>::min_sum);
      const bool exact_pairs = kGradient && !(scale[i] <= Guard<T>::max_scale);
      const T* a_row = tab.transitions + static_cast<int64_t>(i) * K;
      if (exact_row) beta[i] = logsumexp_sum(a_row, v, K);
      if (exact_pairs) {
        for (int j = 0; j < K; ++j) {
          grad_transitions_t[static_cast<int64_t>(j) * K + i] -= gm * exp(alpha_prev[i] + a_row[j] + v[j] + shift);
        }
      }
      u[i] = exact_row ? exp(alpha_prev[i] + beta[i] + shift) : scale[i] * sums[i];
    }
    const T correction = normalize_marginals(u, K);
    if (kGradient && (correction > Guard<T>::max_drift || correction < -Guard<T>::max_drift)) {
      // The pairwise marginals of this step went into the gradient with the same drift: add correction times
      // them (a second K^2 sweep, only at steps whose scores drifted: emissions far larger than the transitions).
      for (int j = 0; j < K; ++j) {
        const T cw = correction * w[j];
        if (cw == 0) continue;
        const T* __restrict__ e_row = tab.e_row_t + static_cast<int64_t>(j) * K;
        T* __restrict__ grad = grad_transitions_t + static_cast<int64_t>(j) * K;
        for (int i = 0; i < K; ++i) grad[i] -= g_scale[i] * e_row[i] * cw;
      }
      for (int i = 0; i < K; ++i) {
        if (fast_exp(alpha_prev[i] + tab.row_max[i] + shift) <= Guard<T>::max_scale) continue;  // a matrix-form row
        const T* a_row = tab.transitions + static_cast<int64_t>(i) * K;
        for (int j = 0; j < K; ++j) {
          grad_transitions_t[static_cast<int64_t>(j) * K + i] -=
              correction * gm * exp(alpha_prev[i] + a_row[j] + v[j] + shift);
        }
      }
    }
    beta_offset += mv + static_cast<double>(normalize(beta, K));
    write_row(t - 1, u);
  }
  if (kAccumulate) {
    for (int k = 0; k < K; ++k) grad_start[k] += g * u[k];
  } else if (kGradient) {
    for (int k = 0; k < K; ++k) grad_start[k] -= k == tags[0] ? T(0) : g * u[k];
    grad_start[tags[0]] += g * residual(u, tags[0]);
  }
}

// Partial labels: allowed (L, K) holds one flag per tag (the bytes of a bool tensor), the set of tags the
// annotation allows at each position. log Z_allowed is the forward algorithm on the emissions with every tag
// outside the set at kPartialLabelScore: its exp is exactly 0 in float32 and float64, and unlike -inf it keeps
// every difference of scores finite (no NaN from -inf - -inf in the normalized recursions).
constexpr double kPartialLabelScore = -1e30;

// Whether every position of the sequence allows exactly one tag; if so, that tag path is written to tags (L,).
// Such a sequence takes the log-likelihood path (gold score − log Z), so one-hot sets give exactly what
// crf_log_likelihood gives.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE bool single_tags(const uint8_t* allowed, int64_t L, int K, int64_t* tags) {
  for (int64_t t = 0; t < L; ++t) {
    const uint8_t* row = allowed + t * K;
    int count = 0;
    int64_t tag = 0;
    for (int k = 0; k < K; ++k) {
      if (row[k] == 0) continue;
      ++count;
      tag = k;
    }
    if (count != 1) return false;
    tags[t] = tag;
  }
  return true;
}

// The constrained model's emissions (L, K) in T: the emission where allowed, kPartialLabelScore elsewhere.
template <typename E, typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void constrain_emissions(const E* emissions, const uint8_t* allowed,
                                                                int64_t L, int K, T* out) {
  for (int64_t i = 0; i < L * K; ++i) {
    out[i] = allowed[i] != 0 ? static_cast<T>(emissions[i]) : static_cast<T>(kPartialLabelScore);
  }
}

// Workspace of kbest_viterbi: the running scores (2, K, k), the merge's list heads (K, K), an emission row and
// the best head per tag (K each) in T; the heads' ranks (K, K) and the best head's list per tag (K) in int32.
template <typename T>
struct KBestWorkspace {
  T* score;
  T* head;
  T* emission;
  T* best;
  int32_t* rank;
  int32_t* arg;
  FUSEDLOSS_HOST_DEVICE static int64_t size(int K, int k) {
    return 2 * static_cast<int64_t>(K) * k + static_cast<int64_t>(K) * K + 2 * K;
  }
  FUSEDLOSS_HOST_DEVICE static int64_t index_size(int K) { return static_cast<int64_t>(K) * K + K; }
  FUSEDLOSS_HOST_DEVICE static KBestWorkspace carve(T* buffer, int32_t* index_buffer, int K, int k) {
    T* head = buffer + 2 * static_cast<int64_t>(K) * k;
    T* emission = head + static_cast<int64_t>(K) * K;
    int32_t* arg = index_buffer + static_cast<int64_t>(K) * K;
    return KBestWorkspace{buffer, head, emission, emission + K, index_buffer, arg};
  }
};

// k-best Viterbi (list Viterbi) over one sequence. For each step and tag it keeps the k best partial paths,
// scores sorted descending (K, k) with backpointers (previous tag * k + previous rank) in backpointers (L, K, k);
// after t steps a tag has min(K^t, k) of them (count below), so ranks past that are never read. The candidates
// for tag j are the K sorted lists score[i, :] + A[i, j]; the merge keeps each list's head, head[i, j], and takes
// the best head k times, strictly greater winning, so ties go to the lower previous tag and, within a list, to
// the lower rank. All tags are merged at once with the loop of viterbi (vectorized along j), so with k = 1 every
// operation is viterbi's, in the same order: the same path and score bits. The final k are merged from the lists
// score[j, :] + end[j] the same way.
// Writes the r-th best path to paths[r * path_stride + t] for t < L and its score to scores[r]; ranks from K^L on
// get -1 at t < L and -inf.
template <typename E, typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void kbest_viterbi(const Tables<T>& tab, const E* emissions, int64_t L, int k,
                                                          const KBestWorkspace<T>& ws, int32_t* backpointers,
                                                          int64_t* paths, int64_t path_stride, double* scores) {
  const int K = tab.K;
  const int64_t KK = static_cast<int64_t>(K) * K;
  const T exhausted = static_cast<T>(-INFINITY);  // the head of a list with nothing left: never taken
  T* cur = ws.score;
  T* nxt = ws.score + static_cast<int64_t>(K) * k;
  T* emission = ws.emission;
  load_row(emissions, 0, K, emission);
  for (int j = 0; j < K; ++j) cur[static_cast<int64_t>(j) * k] = tab.start[j] + emission[j];
  // The running scores are normalized like viterbi's: the best (rank 0 of some tag) moves into a float64 offset.
  auto normalize_ranks = [&](T* x, int64_t count) {
    T m = x[0];
    for (int j = 1; j < K; ++j) m = max_of(m, x[static_cast<int64_t>(j) * k]);
    for (int j = 0; j < K; ++j) {
      for (int64_t r = 0; r < count; ++r) x[static_cast<int64_t>(j) * k + r] -= m;
    }
    return m;
  };
  int64_t count = 1;  // paths per tag so far: min(K^t, k)
  double offset = static_cast<double>(normalize_ranks(cur, count));
  for (int64_t t = 1; t < L; ++t) {
    const int64_t next_count = count * K < k ? count * K : k;
    for (int i = 0; i < K; ++i) {
      const T c = cur[static_cast<int64_t>(i) * k];
      const T* __restrict__ row = tab.transitions + static_cast<int64_t>(i) * K;
      T* __restrict__ head = ws.head + static_cast<int64_t>(i) * K;
      for (int j = 0; j < K; ++j) head[j] = c + row[j];
    }
    for (int64_t i = 0; i < KK; ++i) ws.rank[i] = 0;
    load_row(emissions, t, K, emission);
    int32_t* bp = backpointers + t * K * k;
    for (int64_t r = 0; r < next_count; ++r) {
      T* __restrict__ best = ws.best;
      int32_t* __restrict__ arg = ws.arg;
      for (int j = 0; j < K; ++j) {
        best[j] = ws.head[j];
        arg[j] = 0;
      }
      for (int i = 1; i < K; ++i) {
        const T* __restrict__ head = ws.head + static_cast<int64_t>(i) * K;
        for (int j = 0; j < K; ++j) {
          // A NaN candidate wins, so NaN reaches the score (as in viterbi).
          const T cand = head[j];
          const bool take = cand > best[j] || cand != cand;
          best[j] = take ? cand : best[j];
          arg[j] = take ? i : arg[j];
        }
      }
      for (int j = 0; j < K; ++j) {
        const int i = arg[j];
        const int64_t at = static_cast<int64_t>(i) * K + j;
        const int32_t taken = ws.rank[at]++;
        nxt[static_cast<int64_t>(j) * k + r] = best[j] + emission[j];
        bp[static_cast<int64_t>(j) * k + r] = i * k + taken;
        const T* list = cur + static_cast<int64_t>(i) * k;
        ws.head[at] = taken + 1 < count ? list[taken + 1] + tab.transitions[at] : exhausted;
      }
    }
    count = next_count;
    offset += static_cast<double>(normalize_ranks(nxt, count));
    T* swap = cur;
    cur = nxt;
    nxt = swap;
  }
  const int64_t total = count * K < k ? count * K : k;
  int32_t* heads = ws.rank;
  for (int j = 0; j < K; ++j) heads[j] = 0;
  for (int64_t q = 0; q < total; ++q) {
    int best_j = -1;
    T best = 0;
    for (int j = 0; j < K; ++j) {
      if (heads[j] >= count) continue;
      const T s = cur[static_cast<int64_t>(j) * k + heads[j]] + tab.end[j];
      // As viterbi's final choice: the first NaN wins.
      if (best_j < 0 || s > best || (s != s && best == best)) {
        best = s;
        best_j = j;
      }
    }
    scores[q] = offset + static_cast<double>(best);
    int64_t* path = paths + q * path_stride;
    int64_t tag = best_j;
    int64_t rank = heads[best_j]++;
    path[L - 1] = tag;
    for (int64_t t = L - 1; t >= 1; --t) {
      const int32_t code = backpointers[(t * K + tag) * k + rank];
      tag = code / k;
      rank = code % k;
      path[t - 1] = tag;
    }
  }
  for (int64_t q = total; q < k; ++q) {
    scores[q] = -static_cast<double>(INFINITY);
    for (int64_t t = 0; t < L; ++t) paths[q * path_stride + t] = -1;
  }
}

// Viterbi over one sequence: writes the best path to path[0..L) and returns its score. The running scores
// are normalized each step like alpha (their maximum moves into a float64 offset), so a long sequence's score
// is not rounded at its full size at every step.
// score: (2, K) scratch; best_prev: (K,) int32 scratch; backpointers: (L, K) of uint8_t or int16_t.
template <typename E, typename T, typename BP>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double viterbi(const Tables<T>& tab, const E* emissions, int64_t L, T* score,
                                                 T* emission, int32_t* best_prev, BP* backpointers, int64_t* path) {
  const int K = tab.K;
  T* cur = score;
  T* nxt = score + K;
  load_row(emissions, 0, K, emission);
  for (int k = 0; k < K; ++k) cur[k] = tab.start[k] + emission[k];
  double offset = static_cast<double>(normalize(cur, K));
  for (int64_t t = 1; t < L; ++t) {
    // Predecessor 0 first, then strictly better ones: the lowest index wins ties. A NaN candidate wins
    // and stays, so NaN reaches the score.
    for (int j = 0; j < K; ++j) {
      nxt[j] = cur[0] + tab.transitions[j];
      best_prev[j] = 0;
    }
    T* __restrict__ best = nxt;
    int32_t* __restrict__ arg = best_prev;
    int i = 1;
    for (; i + 2 <= K; i += 2) {  // two predecessors per sweep, in increasing order (ties stay with the lower)
      const T c0 = cur[i], c1 = cur[i + 1];
      const T* __restrict__ row0 = tab.transitions + static_cast<int64_t>(i) * K;
      const T* __restrict__ row1 = row0 + K;
      for (int j = 0; j < K; ++j) {
        T b = best[j];
        int32_t a = arg[j];
        const T cand0 = c0 + row0[j];
        const bool take0 = cand0 > b || cand0 != cand0;
        b = take0 ? cand0 : b;
        a = take0 ? i : a;
        const T cand1 = c1 + row1[j];
        const bool take1 = cand1 > b || cand1 != cand1;
        best[j] = take1 ? cand1 : b;
        arg[j] = take1 ? i + 1 : a;
      }
    }
    for (; i < K; ++i) {
      const T ci = cur[i];
      const T* __restrict__ row = tab.transitions + static_cast<int64_t>(i) * K;
      for (int j = 0; j < K; ++j) {
        const T cand = ci + row[j];
        const bool take = cand > best[j] || cand != cand;
        best[j] = take ? cand : best[j];
        arg[j] = take ? i : arg[j];
      }
    }
    load_row(emissions, t, K, emission);
    BP* bp = backpointers + t * K;
    for (int j = 0; j < K; ++j) {
      nxt[j] += emission[j];
      bp[j] = static_cast<BP>(best_prev[j]);
    }
    offset += static_cast<double>(normalize(nxt, K));
    T* swap = cur;
    cur = nxt;
    nxt = swap;
  }
  int best = 0;
  T best_score = cur[0] + tab.end[0];
  for (int k = 1; k < K; ++k) {
    const T s = cur[k] + tab.end[k];
    if (s > best_score || s != s) {
      best_score = s;
      best = k;
    }
    if (s != s) break;
  }
  path[L - 1] = best;
  for (int64_t t = L - 1; t >= 1; --t) {
    best = static_cast<int>(backpointers[t * K + best]);
    path[t - 1] = best;
  }
  return offset + static_cast<double>(best_score);
}

#ifndef __CUDACC__
// ---------------------------------------------------------------------------------------------
// Viterbi with the running scores of K <= 16 tags in one vector of 16 float lanes (the CPU kernels' AVX-512 and
// AVX2 variants, float32 scores): viterbi's arithmetic lane by lane, the same path and score bits. Each step forms
// the candidates cur[i] + A[i, :] of P >= K predecessors (a power of two; rows past K are −inf) and picks the best
// predecessor of every tag by a tree of pairwise choices in which the lower-index half keeps ties: the first best,
// as viterbi's sweep in index order, with a chain of log2 P dependent choices instead of K. Without NaN only: a
// NaN score (from the inputs, or inf − inf) ends the sequence's vector run, and viterbi() takes it from the start.
// The vector V is a GCC vector of 16 floats (Floats16: one AVX-512 register) or two of 8 (Halves16: two AVX2
// registers; GCC lowered the 16-lane shuffles to scalar code there, 4x slower than the scalar sweep).
// ---------------------------------------------------------------------------------------------

typedef FloatLanes<16>::type Floats16;
typedef FloatLanes<16>::int_type Ints16;
typedef FloatLanes<8>::type Floats8;
typedef FloatLanes<8>::int_type Ints8;

// 16 float lanes as two vectors of 8: lanes 0-7, then 8-15.
struct Halves16 {
  Floats8 lo, hi;
  FUSEDLOSS_INLINE float operator[](int k) const { return k < 8 ? lo[k] : hi[k - 8]; }
};
FUSEDLOSS_INLINE Halves16 operator+(const Halves16& a, const Halves16& b) { return {a.lo + b.lo, a.hi + b.hi}; }
FUSEDLOSS_INLINE Halves16 operator-(const Halves16& a, const Halves16& b) { return {a.lo - b.lo, a.hi - b.hi}; }

template <typename V>
FUSEDLOSS_INLINE V splat16(float value) {
  if constexpr (std::is_same<V, Halves16>::value) {
    return {Floats8{} + value, Floats8{} + value};
  } else {
    return Floats16{} + value;
  }
}

// Every lane of lane I of v.
template <int I>
FUSEDLOSS_INLINE Floats16 broadcast_lane(const Floats16& v) {
  return __builtin_shuffle(v, Ints16{} + I);
}
template <int I>
FUSEDLOSS_INLINE Halves16 broadcast_lane(const Halves16& v) {
  const Floats8 b = __builtin_shuffle(I < 8 ? v.lo : v.hi, Ints8{} + (I & 7));
  return {b, b};
}

// a > b ? x : y, lane by lane. Each select takes its comparison directly: GCC lowered a comparison kept in a
// variable, or two of them or'ed, to one compare and branch per lane.
FUSEDLOSS_INLINE Floats16 pick_greater(const Floats16& a, const Floats16& b, const Floats16& x, const Floats16& y) {
  return a > b ? x : y;
}
FUSEDLOSS_INLINE Halves16 pick_greater(const Halves16& a, const Halves16& b, const Halves16& x, const Halves16& y) {
  return {a.lo > b.lo ? x.lo : y.lo, a.hi > b.hi ? x.hi : y.hi};
}

// The first K lanes of x (lane: 0, 1, ..., 15) and −inf past them (m); x − x there and 0 past them (z).
FUSEDLOSS_INLINE void lanes_below(const Floats16& x, const Floats16& lane, int K, Floats16& m, Floats16& z) {
  m = lane < static_cast<float>(K) ? x : Floats16{} - INFINITY;
  z = lane < static_cast<float>(K) ? x - x : Floats16{};
}
FUSEDLOSS_INLINE void lanes_below(const Halves16& x, const Halves16& lane, int K, Halves16& m, Halves16& z) {
  const float k = static_cast<float>(K);
  m = {lane.lo < k ? x.lo : Floats8{} - INFINITY, lane.hi < k ? x.hi : Floats8{} - INFINITY};
  z = {lane.lo < k ? x.lo - x.lo : Floats8{}, lane.hi < k ? x.hi - x.hi : Floats8{}};
}

// Lane 0 of the maximum of m's lanes and of the sum of z's, by the same tree of pairs (lanes i and i + 8, then i
// and i + 4 within each 8, i and i + 2, i and i + 1) for both vector types: the same bits.
FUSEDLOSS_INLINE void fold_lanes(Floats16& m, Floats16& z) {
  auto fold = [&](Ints16 order) FUSEDLOSS_LAMBDA_INLINE {
    const Floats16 other = __builtin_shuffle(m, order);
    m = other > m ? other : m;
    z += __builtin_shuffle(z, order);
  };
  fold(Ints16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  fold(Ints16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  fold(Ints16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  fold(Ints16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
}
FUSEDLOSS_INLINE void fold_lanes(Halves16& m, Halves16& z) {
  // Lanes i and i + 8: the other half (lane 0 is all that is read, so one half is enough from here on).
  Floats8 mv = m.hi > m.lo ? m.hi : m.lo;
  Floats8 zv = z.lo + z.hi;
  auto fold = [&](Ints8 order) FUSEDLOSS_LAMBDA_INLINE {
    const Floats8 other = __builtin_shuffle(mv, order);
    mv = other > mv ? other : mv;
    zv += __builtin_shuffle(zv, order);
  };
  fold(Ints8{4, 5, 6, 7, 0, 1, 2, 3});
  fold(Ints8{2, 3, 0, 1, 6, 7, 4, 5});
  fold(Ints8{1, 0, 3, 2, 5, 4, 7, 6});
  m.lo = mv;
  z.lo = zv;
}

// The transition rows, start and end scores padded to 16 lanes, built once per call.
template <typename V>
struct TransitionLanes {
  V rows[16];
  V start, end;
  V lane;  // each lane's index
  bool has_nan = false;
  explicit TransitionLanes(const Tables<float>& tab) {
    const int K = tab.K;
    for (int i = 0; i < 16; ++i) {
      rows[i] = i < K ? padded(tab.transitions + static_cast<int64_t>(i) * K, K) : splat16<V>(-INFINITY);
    }
    start = padded(tab.start, K);
    end = padded(tab.end, K);
    const float lanes[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    std::memcpy(&lane, lanes, sizeof(lane));
    for (int64_t i = 0; i < static_cast<int64_t>(K) * K; ++i) has_nan |= tab.transitions[i] != tab.transitions[i];
    for (int k = 0; k < K; ++k) has_nan |= tab.start[k] != tab.start[k] || tab.end[k] != tab.end[k];
  }
  template <typename E>
  static FUSEDLOSS_INLINE V padded(const E* values, int K) {
    static_assert(sizeof(V) == 16 * sizeof(float), "16 float lanes in order");
    float lanes[16] = {};
    for (int k = 0; k < K; ++k) lanes[k] = static_cast<float>(values[k]);
    V v;
    std::memcpy(&v, lanes, sizeof(v));
    return v;
  }
  // padded(row, K) of float32 emissions where 16 floats can be read from row (the step is not among the
  // sequence's last 16 / K): one load, the lanes past K set to 0. Built by padded(), each step's emissions went
  // through a stack buffer that one vector load read back from several smaller stores, which the CPU cannot
  // forward: about 15% of the kernel's time in a one-sentence decode (perf, 32 steps of 9 tags).
  FUSEDLOSS_INLINE V step_emissions(const float* row, int K, bool whole) const {
    if (!whole) return padded(row, K);
    V v;
    std::memcpy(&v, row, sizeof(v));
    const float k = static_cast<float>(K);
    if constexpr (std::is_same<V, Halves16>::value) {
      return {lane.lo < k ? v.lo : Floats8{}, lane.hi < k ? v.hi : Floats8{}};
    } else {
      return lane < k ? v : V{};
    }
  }
  template <typename E>
  FUSEDLOSS_INLINE V step_emissions(const E* row, int K, bool) const {
    return padded(row, K);
  }
};

// The best of predecessors [First, First + Count) for every tag and its index (as a float: float selects on
// the same float comparison), a tree written out at compile time so that every vector stays in a register.
template <int First, int Count, typename V>
FUSEDLOSS_INLINE void best_predecessor16(const V& cur, const V (&rows)[16], V& best, V& arg) {
  if constexpr (Count == 1) {
    best = broadcast_lane<First>(cur) + rows[First];
    arg = splat16<V>(static_cast<float>(First));
  } else {
    V high, high_arg;
    best_predecessor16<First, Count / 2>(cur, rows, best, arg);
    best_predecessor16<First + Count / 2, Count / 2>(cur, rows, high, high_arg);
    arg = pick_greater(high, best, high_arg, arg);
    best = pick_greater(high, best, high, best);
  }
}

// normalize() of the first K lanes: their maximum subtracted from every lane, and returned; NaN where a lane is
// NaN or infinite (their sum of x − x, beside the tree of maxima: GCC lowered a vector NaN test here to one
// compare and branch per lane).
template <typename V>
FUSEDLOSS_INLINE float normalize_lanes16(V& x, const V& lane, int K) {
  V m, z;
  lanes_below(x, lane, K, m, z);
  fold_lanes(m, z);
  x = x - splat16<V>(m[0]);
  return m[0] + z[0];
}

// One sequence's state in viterbi_lanes16: the running scores (less their maximum), that maximum (NaN ends the
// vector run) and the sum of the maxima so far, in float64 as viterbi()'s offset.
template <typename V>
struct Viterbi16State {
  V cur;
  float m;
  double offset;
};

template <typename V, typename E>
FUSEDLOSS_INLINE Viterbi16State<V> viterbi16_start(const TransitionLanes<V>& lanes, const E* emissions, int K) {
  Viterbi16State<V> s;
  s.cur = lanes.start + TransitionLanes<V>::padded(emissions, K);
  s.m = normalize_lanes16(s.cur, lanes.lane, K);
  s.offset = static_cast<double>(s.m);
  return s;
}

// The 16 lanes' predecessor indices (small whole floats) as 16 bytes.
FUSEDLOSS_INLINE void store_backpointers16(const Floats16& arg, uint8_t* out) {
  typedef uint8_t Bytes16 __attribute__((vector_size(16)));
  const Bytes16 bp = __builtin_convertvector(__builtin_convertvector(arg, Ints16), Bytes16);
  std::memcpy(out, &bp, sizeof(bp));
}
FUSEDLOSS_INLINE void store_backpointers16(const Halves16& arg, uint8_t* out) {
  typedef uint8_t Bytes8 __attribute__((vector_size(8)));
  const Bytes8 lo = __builtin_convertvector(__builtin_convertvector(arg.lo, Ints8), Bytes8);
  const Bytes8 hi = __builtin_convertvector(__builtin_convertvector(arg.hi, Ints8), Bytes8);
  std::memcpy(out, &lo, sizeof(lo));
  std::memcpy(out + 8, &hi, sizeof(hi));
}

// Step t of one sequence: every tag's best predecessor (its index stored as step t's backpointers, 16 bytes), plus
// the emissions, normalized.
template <int P, typename V, typename E>
FUSEDLOSS_INLINE void viterbi16_step(const TransitionLanes<V>& lanes, const E* emissions, int K, int64_t L,
                                     int64_t t, uint8_t* backpointers, Viterbi16State<V>& s) {
  V best, arg;
  best_predecessor16<0, P>(s.cur, lanes.rows, best, arg);
  s.cur = best + lanes.step_emissions(emissions + t * K, K, (L - t) * K >= 16);
  store_backpointers16(arg, backpointers + t * K);
  s.m = normalize_lanes16(s.cur, lanes.lane, K);
  s.offset += static_cast<double>(s.m);
}

// The best last tag (viterbi()'s order: the first best), the path back from it, the score; false where a score
// went NaN.
template <typename V>
FUSEDLOSS_INLINE bool viterbi16_finish(const Tables<float>& tab, const Viterbi16State<V>& s, int64_t L,
                                       const uint8_t* backpointers, int64_t* path, double* score) {
  if (s.m != s.m) return false;
  const int K = tab.K;
  int best = 0;
  float best_score = s.cur[0] + tab.end[0];
  for (int k = 1; k < K; ++k) {
    const float v = s.cur[k] + tab.end[k];
    if (v > best_score) {  // no NaN here
      best_score = v;
      best = k;
    }
  }
  path[L - 1] = best;
  for (int64_t t = L - 1; t >= 1; --t) {
    best = static_cast<int>(backpointers[t * K + best]);
    path[t - 1] = best;
  }
  *score = s.offset + static_cast<double>(best_score);
  return true;
}

// viterbi() for K <= P <= 16 (P a power of two) with float32 scores, of two sequences side by side (each step's
// chain of dependent choices, shuffles and maxima is about 60 cycles long: the second sequence's step runs in its
// shadow; one sequence's time per step fell by a third, while four side by side ran slower than two), or of one
// (n = 1). done[i]: false where a score is NaN (the caller then runs viterbi() for that sequence). backpointers:
// (L, K) bytes and 16 more (each step stores 16), one buffer per sequence.
template <int P, typename V, typename E>
FUSEDLOSS_INLINE void viterbi_lanes16(const TransitionLanes<V>& lanes, const Tables<float>& tab, int n,
                                      const E* const* emissions, const int64_t* L, uint8_t* const* backpointers,
                                      int64_t* const* path, double* score, bool* done) {
  const int K = tab.K;
  if (lanes.has_nan) {
    done[0] = done[1] = false;
    return;
  }
  Viterbi16State<V> a = viterbi16_start(lanes, emissions[0], K);
  int64_t t = 1;
  if (n == 2) {
    // Two states as two variables (an array of them ran 10% slower).
    Viterbi16State<V> b = viterbi16_start(lanes, emissions[1], K);
    const int64_t common = L[0] < L[1] ? L[0] : L[1];
    for (; t < common && a.m == a.m && b.m == b.m; ++t) {
      viterbi16_step<P>(lanes, emissions[0], K, L[0], t, backpointers[0], a);
      viterbi16_step<P>(lanes, emissions[1], K, L[1], t, backpointers[1], b);
    }
    for (int64_t u = t; u < L[1] && b.m == b.m; ++u)
      viterbi16_step<P>(lanes, emissions[1], K, L[1], u, backpointers[1], b);
    done[1] = viterbi16_finish(tab, b, L[1], backpointers[1], path[1], score + 1);
  }
  for (; t < L[0] && a.m == a.m; ++t) viterbi16_step<P>(lanes, emissions[0], K, L[0], t, backpointers[0], a);
  done[0] = viterbi16_finish(tab, a, L[0], backpointers[0], path[0], score);
}

// ---------------------------------------------------------------------------------------------
// Viterbi of up to W sequences side by side, one sequence per lane of a vector of W float32 scores (W = 16 in the
// AVX-512 variant, 8 in the AVX2 one), for batches: viterbi()'s arithmetic lane by lane, the same comparisons in
// the same order, so the same path and score bits. Each step costs about K^2 vector additions, maxima, compares
// and selects for W sequences at once, whatever K (the per-sequence vector run spends a chain of shuffles on each
// sequence's step). The emissions are transposed in chunks of steps (step, tag, lane) as floats.
//
// Only where no NaN can arise silently: the caller checks that the transitions, start and end scores hold no NaN
// and no +inf (batch_viterbi_applies); a lane whose emissions make a score NaN or its step's maximum infinite
// (where viterbi() goes NaN) is reported in done[] as false, and the caller runs viterbi() for that sequence.
// ---------------------------------------------------------------------------------------------

template <int W>
struct BatchLanes {
  typedef float V __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef uint8_t Bytes __attribute__((vector_size(W)));
  typedef double D __attribute__((vector_size(8 * W)));
  // Steps per chunk of transposed emissions: about 32 KB of them.
  static int chunk_steps(int K) { return std::max(1, 8192 / (K * W)); }
  // Floats of workspace for K tags: the chunk of emissions, the running scores, the next step's, the indices.
  static int64_t workspace(int K) { return (static_cast<int64_t>(chunk_steps(K)) + 3) * K * W; }
};

// Transitions, start and end scores that the batch run reproduces viterbi() on: no NaN and no +inf (a −inf,
// a forbidden transition, is fine). Lengths must be whole floats (below 2^24).
FUSEDLOSS_INLINE bool batch_viterbi_applies(const Tables<float>& tab, int64_t max_length) {
  const int K = tab.K;
  bool ok = max_length < (int64_t(1) << 24);
  for (int64_t i = 0; i < static_cast<int64_t>(K) * K; ++i) ok &= tab.transitions[i] < INFINITY;
  for (int k = 0; k < K; ++k) ok &= tab.start[k] < INFINITY && tab.end[k] < INFINITY;
  return ok;  // (NaN < INFINITY is false)
}

// One stage of a W x W transpose in W vectors (rows): within every 2H x 2H block, the top-right H x H block and
// the bottom-left one trade places. The stages H = W/2, ..., 1 make the transpose; each shuffle's lane order is
// a compile-time constant.
template <int W, int H, typename V, int... C>
FUSEDLOSS_INLINE void transpose_stage(V* x, std::integer_sequence<int, C...>) {
  for (int r = 0; r < W; ++r) {
    if (r & H) continue;
    const V a = x[r], b = x[r + H];
    x[r] = __builtin_shufflevector(a, b, ((C & H) ? W + C - H : C)...);
    x[r + H] = __builtin_shufflevector(a, b, ((C & H) ? W + C : C + H)...);
  }
}
template <int W, int H = W / 2, typename V>
FUSEDLOSS_INLINE void transpose_lanes(V* x) {
  transpose_stage<W, H>(x, std::make_integer_sequence<int, W>());
  if constexpr (H > 1) transpose_lanes<W, H / 2>(x);
}

// Flat elements [f0, f1) of each lane's emissions (f = step * K + tag) as floats to dst[(f - f0) * W + lane]:
// blocks of W elements of float emissions through a register transpose, where all W lanes may be read there (f
// below readable); the rest one by one, and only up to each lane's own end (L[l] * K).
template <int W, typename E>
FUSEDLOSS_INLINE void transpose_emissions(int n, const E* const* emissions, const int64_t* L, int K, int64_t f0,
                                          int64_t f1, int64_t readable, float* dst) {
  typedef typename BatchLanes<W>::V V;
  int64_t f = f0;
  if constexpr (std::is_same<E, float>::value) {
    for (; f + W <= f1 && f + W <= readable; f += W) {
      V x[W];
      for (int l = 0; l < W; ++l) std::memcpy(&x[l], emissions[l < n ? l : 0] + f, sizeof(V));
      transpose_lanes<W>(x);
      std::memcpy(dst + (f - f0) * W, x, sizeof(x));
    }
  }
  for (int l = 0; l < n; ++l) {
    const int64_t end = std::min(f1, L[l] * K);
    for (int64_t g = f; g < end; ++g) dst[(g - f0) * W + l] = static_cast<float>(emissions[l][g]);
  }
}

// Sequences emissions[l] of lengths L[l] (l < n <= W, each L >= 1), each readable up to element readable (its
// padded length T * K). work: BatchLanes<W>::workspace(K) floats, 64-byte aligned; backpointers: (max L, K, W)
// bytes. Writes path[l][0..L) and score[l] where done[l].
template <int W, typename E>
FUSEDLOSS_INLINE void viterbi_batch(const Tables<float>& tab, int n, const E* const* emissions, const int64_t* L,
                                    int64_t readable, float* work, uint8_t* backpointers, int64_t* const* path,
                                    double* score, bool* done) {
  typedef typename BatchLanes<W>::V V;
  typedef typename BatchLanes<W>::I I;
  typedef typename BatchLanes<W>::Bytes Bytes;
  typedef typename BatchLanes<W>::D D;
  const int K = tab.K;
  const int chunk = BatchLanes<W>::chunk_steps(K);
  V* const em = reinterpret_cast<V*>(work);  // (chunk, K) vectors
  V* const cur = em + static_cast<int64_t>(chunk) * K;
  V* const nxt = cur + K;
  // Every lane runs every step: a lane's state is read at its own last step (the lanes in order of length), and
  // past it (and in lanes past n) the lane computes on stale values that nothing reads. (Selects on a lane's
  // length instead were lowered by GCC to one branch per lane.)
  int order[W];
  int64_t max_length = 0;
  for (int l = 0; l < n; ++l) {
    int p = l;
    for (; p > 0 && L[order[p - 1]] > L[l]; --p) order[p] = order[p - 1];
    order[p] = l;
    max_length = std::max(max_length, L[l]);
  }
  int finished = 0;  // lanes whose last step is done: order[0 .. finished)
  int tag[W];
  V* const index = nxt + K;  // index[i]: i in every lane
  for (int i = 0; i < K; ++i) index[i] = V{} + static_cast<float>(i);
  I bad = I{};
  D offset = D{};
  for (int64_t t0 = 0; t0 < max_length; t0 += chunk) {
    // Steps [t0, t1), transposed; a lane's steps past its end hold stale values (read only by its unread state).
    const int64_t t1 = std::min<int64_t>(max_length, t0 + chunk);
    transpose_emissions<W>(n, emissions, L, K, t0 * K, t1 * K, readable, reinterpret_cast<float*>(em));
    for (int64_t t = t0; t < t1; ++t) {
      const V* e = em + (t - t0) * K;
      if (t == 0) {
        for (int j = 0; j < K; ++j) nxt[j] = e[j] + tab.start[j];
      } else {
        // Columns j0 .. j0 + J - 1 at once: J independent chains of maxima share each load of cur[i].
        uint8_t* bp = backpointers + t * K * W;
        auto columns = [&](auto count, int j0) FUSEDLOSS_LAMBDA_INLINE {
          constexpr int J = decltype(count)::value;
          const float* a = tab.transitions + j0;
          V best[J], arg[J];
#pragma GCC unroll 4
          for (int q = 0; q < J; ++q) {
            best[q] = cur[0] + a[q];  // predecessor 0 first, then strictly better ones in index order:
            arg[q] = V{};             // the lowest index wins ties
          }
          for (int i = 1; i < K; ++i) {
            const V c = cur[i], at = index[i];
            const float* row = a + static_cast<int64_t>(i) * K;
#pragma GCC unroll 4
            for (int q = 0; q < J; ++q) {
              const V cand = c + row[q];
              arg[q] = cand > best[q] ? at : arg[q];
              best[q] = cand > best[q] ? cand : best[q];
            }
          }
#pragma GCC unroll 4
          for (int q = 0; q < J; ++q) {
            nxt[j0 + q] = best[q] + e[j0 + q];
            const Bytes b = __builtin_convertvector(__builtin_convertvector(arg[q], I), Bytes);
            std::memcpy(bp + (j0 + q) * W, &b, sizeof(b));
          }
        };
        int j = 0;
        for (; j + 4 <= K; j += 4) columns(std::integral_constant<int, 4>(), j);
        if (K - j == 3) {
          columns(std::integral_constant<int, 3>(), j);
        } else if (K - j == 2) {
          columns(std::integral_constant<int, 2>(), j);
        } else if (K - j == 1) {
          columns(std::integral_constant<int, 1>(), j);
        }
      }
      // normalize(): the maximum in index order, subtracted; a NaN score or an infinite maximum ends the lane.
      V m = nxt[0];
      I nan = nxt[0] != nxt[0];
      for (int j = 1; j < K; ++j) {
        m = m > nxt[j] ? m : nxt[j];
        nan |= nxt[j] != nxt[j];
      }
      bad |= nan | ((m - m) != 0);
      offset += __builtin_convertvector(m, D);
      for (int j = 0; j < K; ++j) cur[j] = nxt[j] - m;
      // The lanes that end here: their best last tag (viterbi()'s order: the first best) and score.
      for (; finished < n && L[order[finished]] == t + 1; ++finished) {
        const int l = order[finished];
        done[l] = bad[l] == 0;
        tag[l] = 0;
        if (!done[l]) continue;
        float best_score = cur[0][l] + tab.end[0];
        for (int k = 1; k < K; ++k) {
          const float v = cur[k][l] + tab.end[k];
          if (v > best_score) {  // no NaN here
            best_score = v;
            tag[l] = k;
          }
        }
        path[l][L[l] - 1] = tag[l];
        score[l] = offset[l] + static_cast<double>(best_score);
      }
    }
  }
  // The paths back, all lanes one step at a time: the lanes' chains of dependent loads overlap (traced one lane
  // after the other, each step waited on the load of the step before).
  for (int64_t t = max_length - 1; t >= 1; --t) {
    const uint8_t* bp = backpointers + t * K * W;
    for (int l = 0; l < n; ++l) {
      if (t >= L[l] || !done[l]) continue;
      tag[l] = bp[tag[l] * W + l];
      path[l][t - 1] = tag[l];
    }
  }
}

#endif

}  // namespace crf
}  // namespace fusedloss
