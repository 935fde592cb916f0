// Torch-free math of one fused softmax-loss row (docs/BACKENDS.md, softmax_loss): the row loss of
// fusedloss.cross_entropy / focal_loss, every option of the public functions.
//
// For one row of logits x (C classes), target y (an index) or probabilities t, per-class weights w
// (ones when absent), smoothing ε, focal γ, z-loss z and soft-cap c:
//
//   s_c   = c·tanh(x_c / c)   (s = x without soft-cap)        lse = log Σ_c exp(s_c)
//   lp_c  = s_c − lse         p_c = exp(lp_c)
//   q_c   = (1 − ε)·[c = y] + ε/C   (or (1 − ε)·t_c + ε/C)      a_c = q_c·w_c
//   cost(lp) = −(1 − p)^γ·lp                                   (the focal cost of one class)
//   l     = Σ_c a_c·cost(lp_c) + z·lse²
//
// Gradient (written during the forward pass, so that backward only scales it by grad_output), with
// cost'(lp) = d cost / d lp and G = Σ_c a_c·cost'(lp_c):
//
//   dl/ds_j = a_j·cost'(lp_j) + p_j·(2·z·lse − G)          dl/dx_j = dl/ds_j · (1 − tanh²(x_j / c))
//   cost'(lp) = −(1 − p)^γ + γ·p·(1 − p)^γ · lp / (1 − p)   (= −1 for γ = 0)
//
// so that, for γ = 0 (cost' = −1, G = −A with A = Σ a_c):  dl/ds_j = p_j·(A + 2·z·lse) − a_j, and
// for hard targets without smoothing only a_y is nonzero: dl/ds_j = p_j·(2·z·lse − g_y) + [j = y]·g_y
// with g_y = w_y·cost'(lp_y). Both are one row-constant times p_j plus a per-class term, so plain,
// smoothed and focal cross entropy share one vectorized sweep; only focal with smoothing or soft
// targets needs cost'(lp_c) per class (an extra sweep with pow).
//
// Everything is computed in acc_t (float for float16/bfloat16/float32 input, double for float64);
// inputs are read through a load-convert (static_cast), so half types need only a conversion to
// float. The host row function below processes a row in blocks: each block is converted (and
// soft-capped) once into a small buffer, then max, sum-of-exp and the extra sums run over it (online
// softmax at block granularity: the running sum is rescaled once per block, not per element), with
// loops written so that the compiler vectorizes them at the baseline ISA. CUDA code reuses the
// element and row-scalar functions with its own block-wide reductions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/common.h"
#include "kernels/fast_math.h"

namespace fusedloss {
namespace softmax_loss {

// Unqualified calls below pick the float overloads on the host and CUDA's on the device.
using std::exp;
using std::expm1;
using std::log;
using std::pow;
using std::tanh;

// ---------------------------------------------------------------------------------------------
// Element math
// ---------------------------------------------------------------------------------------------

// fast_exp and fast_log (float32 and float64) are in kernels/fast_math.h, shared by every family.
using ::fusedloss::fast_exp;
using ::fusedloss::fast_log;

template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t softcap_value(acc_t x, acc_t softcap, acc_t inv_softcap) {
  return softcap * tanh(x * inv_softcap);
}

#ifndef __CUDA_ARCH__
// float32 on the host: tanh without a library call, so that the loops over it vectorize (std::tanh was most of
// the cost of a soft-capped row). Cephes' tanhf: an odd polynomial for |z| < 0.625, (1 − e)/(1 + e) with
// e = exp(−2|z|) above (e < 0.29 there: no cancellation); within 2 ulps.
template <>
FUSEDLOSS_INLINE float softcap_value<float>(float x, float softcap, float inv_softcap) {
  const float z = x * inv_softcap;
  const float abs_z = z < 0.0f ? -z : z;
  const float e = fast_exp(-2.0f * abs_z);
  const float z2 = abs_z * abs_z;
  float poly = -5.70498872745e-3f;
  poly = poly * z2 + 2.06390887954e-2f;
  poly = poly * z2 - 5.37397155531e-2f;
  poly = poly * z2 + 1.33314422036e-1f;
  poly = poly * z2 - 3.33332819422e-1f;
  const float t = abs_z < 0.625f ? poly * z2 * abs_z + abs_z : (1.0f - e) / (1.0f + e);
  return softcap * (z < 0.0f ? -t : t);
}
#endif

// ds/dx of s = c·tanh(x/c), from the logit x: 1 − tanh²(z) = 4e/(1 + e)² with e = exp(−2|z|), z = x/c.
// It decays with e to exactly 0, while 1 − t² of the rounded t = tanh(z) (or of s/c) carries t's rounding
// error, which is all of its value once |z| passes about 9 in float32 (and a few ulps of it below).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t softcap_derivative(acc_t x, acc_t inv_softcap) {
  const acc_t z = x * inv_softcap;
  const acc_t e = fast_exp(acc_t(-2) * (z < acc_t(0) ? -z : z));
  return acc_t(4) * e / ((acc_t(1) + e) * (acc_t(1) + e));
}

// The focal cost of one class and its derivative in lp = log p:
//   cost = −(1 − p)^γ·lp,   dcost = −(1 − p)^γ + γ·p·(1 − p)^γ·lp/(1 − p).
// 1 − p is −expm1(lp) (exact near p = 1). Where 1 − p is below the smallest normal number the
// factor is 0 and so is its derivative, as in fusedloss.reference.softmax.focal_factor (this keeps
// the derivative finite for 0 < γ < 1, where (1 − p)^(γ−1) is infinite at p = 1). NaN in lp
// propagates through cost (0·NaN).
// (1 − p)^γ with one multiply for γ = 2 and none for γ = 1 (the usual choices; a correctly rounded product, where
// pow was a library call per row that cost as much as the row's exps for tag sets of tens of classes).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t focal_power(acc_t one_minus_p, acc_t gamma) {
  if (gamma == acc_t(2)) return one_minus_p * one_minus_p;
  if (gamma == acc_t(1)) return one_minus_p;
  return pow(one_minus_p, gamma);
}

template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void focal_cost(acc_t lp, acc_t gamma, acc_t* cost, acc_t* dcost) {
  const acc_t one_minus_p = -expm1(lp);
  const bool representable = one_minus_p > Limits<acc_t>::tiny;
  const acc_t factor = representable ? focal_power(one_minus_p, gamma) : acc_t(0);
  const acc_t ratio = representable ? lp / one_minus_p : acc_t(0);
  *cost = -factor * lp;
  *dcost = -factor + gamma * fast_exp(lp) * factor * ratio;
}

// ---------------------------------------------------------------------------------------------
// Row scalars
// ---------------------------------------------------------------------------------------------

// Options of one call, converted to acc_t once.
template <typename acc_t>
struct Params {
  int64_t num_classes = 0;
  int64_t ignore_index = -100;
  acc_t label_smoothing = 0;  // ε
  acc_t focal_gamma = 0;      // γ
  acc_t z_loss = 0;
  acc_t softcap = 0;          // 0: no soft-cap
  acc_t inv_softcap = 0;
};

// What the statistics sweep accumulates, relative to the running max so that log-probabilities
// are formed as (s − max) − log Σ exp(s − max), never as s − lse (lse rounds to the ulp of its own
// magnitude, which would cost relative accuracy in every p_c). Merging two partial states (blocks
// of the host sweep, CUDA threads) rescales the one with the smaller max: online softmax.
//   sum_a   = Σ a'_c     sum_a_s = Σ a'_c·(s_c − max)
// with a'_c = w_c for smoothed hard targets (the ε/C part of the target) and a_c for soft targets.
template <typename acc_t>
struct RowStats {
  acc_t max = Limits<acc_t>::large_negative;
  acc_t sum_exp = 0;
  acc_t sum_a_s = 0;
  acc_t sum_a = 0;

  // Adds one class with logit s and target weight a (a = 0 when the row needs no target sums).
  FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void add(acc_t s, acc_t a) {
    if (s > max) {
      sum_exp = sum_exp * fast_exp(max - s) + acc_t(1);
      sum_a_s += sum_a * (max - s);
      max = s;
    } else {
      sum_exp += fast_exp(s - max);
    }
    sum_a_s += a * (s - max);
    sum_a += a;
  }

  FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void merge(const RowStats& other) {
    const acc_t new_max = max_of(max, other.max);
    sum_exp = sum_exp * fast_exp(max - new_max) + other.sum_exp * fast_exp(other.max - new_max);
    sum_a_s = sum_a_s + sum_a * (max - new_max) + other.sum_a_s + other.sum_a * (other.max - new_max);
    sum_a += other.sum_a;
    max = new_max;
  }
};

// The row's loss and the row constants of its gradient. With p_j = exp((s_j − max) − log_sum):
//   hard targets:  dl/ds_j = p_j·(target_coef + p_rest) − smooth_coef·w_j,  j ≠ y
//                  dl/ds_y = (p_y − 1)·target_coef + p_rest·p_y − smooth_coef·w_y
//   soft, γ = 0:   dl/ds_j = (p_j·target_coef − a_j) + p_j·p_rest     (target_coef = A)
//   per_class_focal: dl/ds_j = p_j·p_rest + a_j·cost'(lp_j)
// The target part is formed apart from the z-loss part (as autograd of the reference does), and the
// target class keeps p_y − 1 as one factor: for C = 1 (p = 1) the gradient is exactly the z-loss
// part, and in bfloat16 output the target class is rounded once, after the subtraction.
template <typename acc_t>
struct RowResult {
  acc_t loss = 0;
  acc_t max = 0;
  acc_t log_sum = 0;  // log Σ exp(s_c − max)
  acc_t p_rest = 0;
  acc_t smooth_coef = 0;
  acc_t target_coef = 0;
  bool per_class_focal = false;  // the gradient needs cost'(lp_c) of every class: finish_per_class_focal

  FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t log_prob(acc_t s) const { return (s - max) - log_sum; }
  FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t logsumexp() const { return max + log_sum; }
};

template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE RowResult<acc_t> start_row(const RowStats<acc_t>& stats) {
  RowResult<acc_t> res;
  res.max = stats.max;
  res.log_sum = fast_log(stats.sum_exp);
  return res;
}

// Finish a hard-target row from its statistics (sum_a and sum_a_s over w_c when ε > 0) and its
// target's soft-capped logit s_y. Focal rows with smoothing only get their log-sum here and are
// completed by finish_per_class_focal after a second sweep.
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE RowResult<acc_t> finish_hard_row(const RowStats<acc_t>& stats,
                                                                        const Params<acc_t>& prm, acc_t s_y,
                                                                        acc_t w_y) {
  RowResult<acc_t> res = start_row(stats);
  const acc_t lse = res.logsumexp();
  const acc_t lp_y = res.log_prob(s_y);
  const acc_t eps = prm.label_smoothing;
  const acc_t z_term = acc_t(2) * prm.z_loss * lse;
  const acc_t z_value = prm.z_loss * lse * lse;
  if (prm.focal_gamma != acc_t(0)) {
    if (eps != acc_t(0)) {
      res.per_class_focal = true;
      return res;
    }
    acc_t cost, dcost;
    focal_cost(lp_y, prm.focal_gamma, &cost, &dcost);
    const acc_t g_y = w_y * dcost;
    res.loss = w_y * cost + z_value;
    res.target_coef = -g_y;
    res.p_rest = z_term;
    return res;
  }
  const acc_t eps_c = eps / acc_t(prm.num_classes);
  acc_t loss = -(acc_t(1) - eps) * w_y * lp_y;
  // ε/C · Σ_c w_c lp_c = ε/C · (Σ_c w_c (s_c − max) − Σ_c w_c · log_sum)
  if (eps != acc_t(0)) loss -= eps_c * (stats.sum_a_s - stats.sum_a * res.log_sum);
  res.loss = loss + z_value;
  res.target_coef = (acc_t(1) - eps) * w_y;
  res.p_rest = eps != acc_t(0) ? eps_c * stats.sum_a + z_term : z_term;
  res.smooth_coef = eps_c;
  return res;
}

// Soft-target weight a_c = ((1 − ε)·t_c + ε/C)·w_c.
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t soft_weight(acc_t t, acc_t w, acc_t eps, acc_t eps_c) {
  return ((acc_t(1) - eps) * t + eps_c) * w;
}

// Finish a soft-target row (stats over a_c); γ ≠ 0 rows are completed by finish_per_class_focal.
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE RowResult<acc_t> finish_soft_row(const RowStats<acc_t>& stats,
                                                                        const Params<acc_t>& prm) {
  RowResult<acc_t> res = start_row(stats);
  if (prm.focal_gamma != acc_t(0)) {
    res.per_class_focal = true;
    return res;
  }
  const acc_t lse = res.logsumexp();
  // −Σ_c a_c lp_c = A·log_sum − Σ_c a_c (s_c − max)
  res.loss = stats.sum_a * res.log_sum - stats.sum_a_s + prm.z_loss * lse * lse;
  res.target_coef = stats.sum_a;
  res.p_rest = acc_t(2) * prm.z_loss * lse;
  return res;
}

// Per-class focal rows: given Σ_c a_c cost(lp_c) and G = Σ_c a_c cost'(lp_c) (a second sweep),
// the loss and p_rest = 2·z·lse − G.
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void finish_per_class_focal(RowResult<acc_t>* res, const Params<acc_t>& prm,
                                                                   acc_t sum_cost, acc_t sum_dcost) {
  const acc_t lse = res->logsumexp();
  res->loss = sum_cost + prm.z_loss * lse * lse;
  res->p_rest = acc_t(2) * prm.z_loss * lse - sum_dcost;
}

// ---------------------------------------------------------------------------------------------
// One row on the host (CPU backend and the C++ tests)
// ---------------------------------------------------------------------------------------------

#ifndef __CUDA_ARCH__

// Elements per block of the host sweep (the block buffer stays in L1) and independent
// accumulators per reduction (so that the compiler can keep them in vector registers without
// reassociating a single float sum, which it may not do without -ffast-math). A row of 1024 classes is one block:
// with blocks of 512 each row had two reductions of its lanes and a merge, and the forward at 4096 x 600 to 2000
// took 5-6% longer without a gradient, 5-14% with one (Intel Xeon, 2 threads); blocks of 2048 were slower at 1024.
constexpr int64_t kBlock = 1024;
constexpr int kLanes = 8;

template <typename acc_t>
FUSEDLOSS_INLINE acc_t lane_sum(const acc_t* lanes) {
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// Block buffer: s_c of the block, converted to acc_t and soft-capped.
template <typename acc_t, typename scalar_t>
FUSEDLOSS_INLINE void load_block(const scalar_t* x, int64_t len, const Params<acc_t>& prm, acc_t* s) {
  if (prm.softcap != acc_t(0)) {
    for (int64_t i = 0; i < len; ++i) s[i] = softcap_value(static_cast<acc_t>(x[i]), prm.softcap, prm.inv_softcap);
  } else {
    for (int64_t i = 0; i < len; ++i) s[i] = static_cast<acc_t>(x[i]);
  }
  // Zeros up to the next multiple of 16 (kBlock is one): the float32 sweeps below read whole vectors and mask the
  // lanes past len, which must hold numbers all the same.
  for (int64_t i = len; i < kBlock && (i % 16) != 0; ++i) s[i] = acc_t(0);
}

template <typename acc_t>
FUSEDLOSS_INLINE acc_t block_max(const acc_t* s, int64_t len) {
  acc_t lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = Limits<acc_t>::large_negative;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] = s[i + k] > lanes[k] ? s[i + k] : lanes[k];
  acc_t result = Limits<acc_t>::large_negative;
  for (int k = 0; k < kLanes; ++k) result = max_of(result, lanes[k]);
  for (; i < len; ++i) result = max_of(result, s[i]);
  return result;
}

// Σ exp(s_i − shift) over the block; with out, also stores each exp(s_i − shift) there.
template <typename acc_t>
FUSEDLOSS_INLINE acc_t block_sum_exp(const acc_t* s, int64_t len, acc_t shift, acc_t* out) {
  if (out != nullptr) {
    for (int64_t i = 0; i < len; ++i) out[i] = fast_exp(s[i] - shift);
    acc_t lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int k = 0; k < kLanes; ++k) lanes[k] += out[i + k];
    acc_t result = lane_sum(lanes);
    for (; i < len; ++i) result += out[i];
    return result;
  }
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += fast_exp(s[i + k] - shift);
  acc_t result = lane_sum(lanes);
  for (; i < len; ++i) result += fast_exp(s[i] - shift);
  return result;
}

// Σ_i v_i·(s_i − shift) over the block (v = w, or ones when v is null).
template <typename acc_t>
FUSEDLOSS_INLINE acc_t block_dot(const acc_t* v, const acc_t* s, acc_t shift, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  if (v == nullptr) {
    for (; i + kLanes <= len; i += kLanes)
      for (int k = 0; k < kLanes; ++k) lanes[k] += s[i + k] - shift;
  } else {
    for (; i + kLanes <= len; i += kLanes)
      for (int k = 0; k < kLanes; ++k) lanes[k] += v[i + k] * (s[i + k] - shift);
  }
  acc_t result = lane_sum(lanes);
  for (; i < len; ++i) result += (v == nullptr ? acc_t(1) : v[i]) * (s[i] - shift);
  return result;
}

template <typename acc_t>
FUSEDLOSS_INLINE acc_t block_sum(const acc_t* v, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += v[i + k];
  acc_t result = lane_sum(lanes);
  for (; i < len; ++i) result += v[i];
  return result;
}

#ifndef __CUDACC__
// The float32 sweeps, W lanes at a time (W = 16 in the AVX-512 variant of the CPU kernels, 8 in the others), the
// last partial vector masked (the block buffer is padded: load_block), lanes added pairwise at the end. No per-row
// scalar tail: a tag set of 127 classes costs no more scalar exps than one of 128.
template <int W>
FUSEDLOSS_INLINE typename FloatLanes<W>::type load_lanes(const float* p) {
  typename FloatLanes<W>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Lanes [0, count) of a vector are real classes.
template <int W>
FUSEDLOSS_INLINE typename FloatLanes<W>::int_type lanes_below(int64_t count) {
  typename FloatLanes<W>::int_type index;
  for (int k = 0; k < W; ++k) index[k] = k;
  return index < static_cast<int32_t>(count);
}

// The two halves of v, added (Add) or max'ed, as a vector of W / 2; then down to one float.
template <bool kMax, int W>
FUSEDLOSS_INLINE float reduce_lanes(typename FloatLanes<W>::type v) {
  typedef float Half __attribute__((vector_size(W * 2)));
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const Half r = kMax ? (lo > hi ? lo : hi) : lo + hi;
  if constexpr (W == 8) {
    float lanes[4];
    std::memcpy(lanes, &r, sizeof(lanes));
    const float a = kMax ? max_of(lanes[0], lanes[2]) : lanes[0] + lanes[2];
    const float b = kMax ? max_of(lanes[1], lanes[3]) : lanes[1] + lanes[3];
    return kMax ? max_of(a, b) : a + b;
  } else {
    return reduce_lanes<kMax, W / 2>(r);
  }
}

template <int W>
FUSEDLOSS_INLINE float block_max_lanes(const float* s, int64_t len) {
  typedef typename FloatLanes<W>::type V;
  const V lowest = V{} + Limits<float>::large_negative;
  auto larger = [](V a, V b) FUSEDLOSS_LAMBDA_INLINE { return b > a ? b : a; };
  // Four running maxima: one is a chain of dependent max operations (4 cycles a vector), two took 2 cycles a
  // vector, a tenth of a 1024-class row's no_grad forward in the AVX2 variant.
  V m = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    m = larger(m, load_lanes<W>(s + i));
    m1 = larger(m1, load_lanes<W>(s + i + W));
    m2 = larger(m2, load_lanes<W>(s + i + 2 * W));
    m3 = larger(m3, load_lanes<W>(s + i + 3 * W));
  }
  m = larger(larger(m, m2), larger(m1, m3));
  for (; i + W <= len; i += W) m = larger(m, load_lanes<W>(s + i));
  if (i < len) {
    const V v = lanes_below<W>(len - i) ? load_lanes<W>(s + i) : lowest;
    m = v > m ? v : m;
  }
  return reduce_lanes<true, W>(m);
}

// kPermute: the table exp in 8 lanes too (fast_exp_nonpositive_lanes; 16 lanes always take it), for the AVX2
// variant. ahead (or null): memory to bring into the cache meanwhile, ahead_size bytes per float of the block (the
// logits ahead, in their own dtype), a line or two per step of the loop (see process_row).
template <int W, bool kPermute = false>
FUSEDLOSS_INLINE float block_sum_exp_lanes(const float* s, int64_t len, float shift, float* out,
                                           const char* ahead = nullptr, int ahead_size = sizeof(float)) {
  typedef typename FloatLanes<W>::type V;
  // Two running sums (vectors i mod 2, added at the end): one is a chain of dependent adds across the loop.
  V sum = {}, sum1 = {};
  int64_t i = 0;
  // The lines of ahead that match floats [i, i + 2W) of the block (an address formed as an integer: a prefetch
  // past the end of a tensor does not fault).
  auto prefetch = [&](int64_t at) FUSEDLOSS_LAMBDA_INLINE {
    if (ahead != nullptr) {
      const uintptr_t line = reinterpret_cast<uintptr_t>(ahead) + static_cast<uintptr_t>(at * ahead_size);
      for (int b = 0; b < 2 * W * ahead_size; b += 64) __builtin_prefetch(reinterpret_cast<const void*>(line + b));
    }
  };
  // kSide vectors a step, their exps computed side by side (fast_exp_nonpositive_lanes_each): each exp is a chain
  // of about twenty dependent operations. Four 16-lane vectors a step: 0-10% fewer cycles than two one after the
  // other (Intel Xeon, 4096 and 128 x 1024 under no_grad, AVX-512, two alternations); the AVX2 variant, with 16
  // registers, keeps two (four spilled more to the stack, as slow as two). The sums take the vectors in the same
  // order either way (the same bits).
  // Without out, the exps are only summed: those below the underflow bound may be about 2^−126 instead of 0
  // (fast_exp_nonpositive_lanes' kZeroUnderflow): the block holds its max, whose e^0 = 1 leaves them in the rounding.
  constexpr int kSide = W == 16 ? 4 : 2;
  auto side = [&](int64_t at, float* to) FUSEDLOSS_LAMBDA_INLINE {
    _Pragma("GCC unroll 4") for (int k = 0; k < kSide; k += 2) prefetch(at + k * W);
    V e[kSide];
    _Pragma("GCC unroll 4") for (int k = 0; k < kSide; ++k) e[k] = load_lanes<W>(s + at + k * W) - shift;
    if (to != nullptr) {
      fast_exp_nonpositive_lanes_each<W, kSide, kPermute>(e);
    } else {
      fast_exp_nonpositive_lanes_each<W, kSide, kPermute, false>(e);
    }
    _Pragma("GCC unroll 4") for (int k = 0; k < kSide; ++k) {
      if (to != nullptr) std::memcpy(to + at + k * W, &e[k], sizeof(V));
      if (k % 2 == 0) {
        sum += e[k];
      } else {
        sum1 += e[k];
      }
    }
  };
  // What is left: two vectors a step, then one (16-lane vectors; no more than one with 8 lanes).
  if (out != nullptr) {
    for (; i + kSide * W <= len; i += kSide * W) side(i, out);
    for (; i + 2 * W <= len; i += 2 * W) {
      prefetch(i);
      const V e = fast_exp_nonpositive_lanes<W, kPermute>(load_lanes<W>(s + i) - shift);
      const V e1 = fast_exp_nonpositive_lanes<W, kPermute>(load_lanes<W>(s + i + W) - shift);
      std::memcpy(out + i, &e, sizeof(e));
      std::memcpy(out + i + W, &e1, sizeof(e1));
      sum += e;
      sum1 += e1;
    }
    for (; i + W <= len; i += W) {
      const V e = fast_exp_nonpositive_lanes<W, kPermute>(load_lanes<W>(s + i) - shift);
      std::memcpy(out + i, &e, sizeof(e));
      sum += e;
    }
  } else {
    for (; i + kSide * W <= len; i += kSide * W) side(i, nullptr);
    for (; i + 2 * W <= len; i += 2 * W) {
      prefetch(i);
      sum += fast_exp_nonpositive_lanes<W, kPermute, false>(load_lanes<W>(s + i) - shift);
      sum1 += fast_exp_nonpositive_lanes<W, kPermute, false>(load_lanes<W>(s + i + W) - shift);
    }
    for (; i + W <= len; i += W) sum += fast_exp_nonpositive_lanes<W, kPermute, false>(load_lanes<W>(s + i) - shift);
  }
  sum += sum1;
  if (i < len) {
    const V e =
        lanes_below<W>(len - i) ? fast_exp_nonpositive_lanes<W, kPermute>(load_lanes<W>(s + i) - shift) : V{};
    if (out != nullptr)
      for (int64_t k = 0; k < len - i; ++k) out[i + k] = e[k];
    sum += e;
  }
  return reduce_lanes<false, W>(sum);
}

// Σ_i v_i·(s_i − shift) (v = ones when null), as block_dot.
template <int W>
FUSEDLOSS_INLINE float block_dot_lanes(const float* v, const float* s, float shift, int64_t len) {
  typedef typename FloatLanes<W>::type V;
  V sum = {};
  int64_t i = 0;
  if (v == nullptr) {
    for (; i + W <= len; i += W) sum += load_lanes<W>(s + i) - shift;
  } else {
    for (; i + W <= len; i += W) sum += load_lanes<W>(v + i) * (load_lanes<W>(s + i) - shift);
  }
  float result = reduce_lanes<false, W>(sum);
  for (; i < len; ++i) result += (v == nullptr ? 1.0f : v[i]) * (s[i] - shift);
  return result;
}
#endif

// The sweeps of one block in acc_t: the lane-wise float32 versions above with W lanes, the templates for float64.
template <int W, typename acc_t>
FUSEDLOSS_INLINE acc_t row_block_max(const acc_t* s, int64_t len) {
#ifndef __CUDACC__
  if constexpr (std::is_same<acc_t, float>::value) {
    return block_max_lanes<W>(s, len);
  } else  // NOLINT(readability/braces)
#endif
  {
    return block_max(s, len);
  }
}

// ahead, ahead_size: as for block_sum_exp_lanes (float32 only).
template <int W, typename acc_t, bool kPermute = false>
FUSEDLOSS_INLINE acc_t row_block_sum_exp(const acc_t* s, int64_t len, acc_t shift, acc_t* out,
                                         const char* ahead = nullptr, int ahead_size = sizeof(float)) {
#ifndef __CUDACC__
  if constexpr (std::is_same<acc_t, float>::value) {
    return block_sum_exp_lanes<W, kPermute>(s, len, shift, out, ahead, ahead_size);
  } else  // NOLINT(readability/braces)
#endif
  {
    return block_sum_exp(s, len, shift, out);
  }
}

template <int W, typename acc_t>
FUSEDLOSS_INLINE acc_t row_block_dot(const acc_t* v, const acc_t* s, acc_t shift, int64_t len) {
#ifndef __CUDACC__
  if constexpr (std::is_same<acc_t, float>::value) {
    return block_dot_lanes<W>(v, s, shift, len);
  } else  // NOLINT(readability/braces)
#endif
  {
    return block_dot(v, s, shift, len);
  }
}

// Tiles of R rows (one per vector lane) of at most kTileMaxClasses classes with hard targets, except focal with
// smoothing. The tile is transposed into t[c][r] on load, so that max, exp, sum and the gradient run across rows
// with one vector operation per class and no padding of the classes, and nothing of a row is recomputed per class;
// the row scalars (log, finish_hard_row) are computed across the rows too. Rows side by side also hide each
// other's latency: one row's sweeps and scalars are a chain of dependent steps, which left the per-row sweep
// waiting on them for tag sets of tens to hundreds of classes. Lanes past `rows` (a partial tile) hold zeros and
// are never stored. Every lane runs the same operations in the same order whatever its neighbours, so a row's
// result does not depend on which tile (and so which thread) holds it.
// Writes losses[r] and, when grad is not null, grad_scale·dl/dx of each row (grad may be x).
// R = kTileRows (8: one AVX2 register of float32 per class), or 16 in the AVX-512 variant of the CPU kernels,
// which hands out units of kTileUnitRows rows. Tiles serve up to kTileMaxClasses classes in the AVX-512 and AVX2
// variants (measured faster than the per-row sweep up to there: AVX-512, 1.3x eager under no_grad at 257-512
// classes where the per-row sweep gave 0.8x, t, e and d then take 3 x 32 KiB of stack; AVX2, 8 rows a tile, the
// forward under no_grad 1.8x faster at 161 classes, 1.5x at 200, 1.3x at 256, 1.06x at 512) and up to
// kTileMaxClassesNarrow in the baseline variant.
constexpr int kTileRows = 8;
constexpr int kTileUnitRows = 16;
constexpr int64_t kTileMaxClasses = 512;
constexpr int64_t kTileMaxClassesNarrow = 160;

#ifndef __CUDACC__
// 8 x 8 float transposes with vector shuffles (GCC vector extensions: one register per row in the AVX2 variant
// of the CPU kernels, two in the baseline one), for the tile's loads and stores in float32. One element at a time
// these took as long as the tile's exps: the transposed stores and loads cannot be vectorized by the compiler
// (there is no scatter before AVX-512).
typedef float TileVector __attribute__((vector_size(32)));

// rows[0..8) -> columns: afterwards rows[c][r] holds what rows[r][c] held.
FUSEDLOSS_INLINE void transpose8(TileVector rows[8]) {
  TileVector lo[4], hi[4], pair[8];
  for (int i = 0; i < 4; ++i) {  // interleave rows 2i and 2i + 1 (unpacklo / unpackhi in each 128-bit half)
    lo[i] = __builtin_shufflevector(rows[2 * i], rows[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    hi[i] = __builtin_shufflevector(rows[2 * i], rows[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3: columns (c, c + 4) for c = 0..3
    pair[4 * h + 0] = __builtin_shufflevector(lo[2 * h], lo[2 * h + 1], 0, 1, 8, 9, 4, 5, 12, 13);
    pair[4 * h + 1] = __builtin_shufflevector(lo[2 * h], lo[2 * h + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    pair[4 * h + 2] = __builtin_shufflevector(hi[2 * h], hi[2 * h + 1], 0, 1, 8, 9, 4, 5, 12, 13);
    pair[4 * h + 3] = __builtin_shufflevector(hi[2 * h], hi[2 * h + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {  // the two 128-bit halves: rows 0-3 and 4-7 of columns c and c + 4
    rows[c] = __builtin_shufflevector(pair[c], pair[4 + c], 0, 1, 2, 3, 8, 9, 10, 11);
    rows[c + 4] = __builtin_shufflevector(pair[c], pair[4 + c], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// 16 x 16 float transposes (one 64-byte vector per row: the AVX-512 variant's tiles of 16 rows), four stages of 16
// two-source shuffles: 4 x 4 transposes inside each 128-bit lane (unpack of floats, then of float pairs), then a
// 4 x 4 transpose of the 128-bit lanes (vshuff32x4). Per class this is half the shuffles, loads and stores of two
// 8 x 8 transposes.
typedef float TileVector16 __attribute__((vector_size(64)));

FUSEDLOSS_INLINE void transpose16(TileVector16 rows[16]) {
  TileVector16 a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // rows 2i, 2i + 1 interleaved in each 128-bit lane
    a[2 * i] = __builtin_shufflevector(rows[2 * i], rows[2 * i + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12,
                                       28, 13, 29);
    a[2 * i + 1] = __builtin_shufflevector(rows[2 * i], rows[2 * i + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27,
                                           14, 30, 15, 31);
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3: b[4g + k] lane L holds column 4L + k of those rows
    const TileVector16 *lo = a + 4 * g, *hi = a + 4 * g + 2;
    b[4 * g + 0] = __builtin_shufflevector(lo[0], hi[0], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    b[4 * g + 1] = __builtin_shufflevector(lo[0], hi[0], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    b[4 * g + 2] = __builtin_shufflevector(lo[1], hi[1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    b[4 * g + 3] = __builtin_shufflevector(lo[1], hi[1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int k = 0; k < 4; ++k) {  // lane L of b[4g + k] (g = 0..3) makes column 4L + k
    const TileVector16 s0 =
        __builtin_shufflevector(b[k], b[4 + k], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const TileVector16 s1 =
        __builtin_shufflevector(b[k], b[4 + k], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const TileVector16 s2 =
        __builtin_shufflevector(b[8 + k], b[12 + k], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const TileVector16 s3 =
        __builtin_shufflevector(b[8 + k], b[12 + k], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    rows[k] = __builtin_shufflevector(s0, s2, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    rows[4 + k] = __builtin_shufflevector(s0, s2, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    rows[8 + k] = __builtin_shufflevector(s1, s3, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    rows[12 + k] = __builtin_shufflevector(s1, s3, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
}

// Tiles of 16 rows and at least 16 classes: 16 x 16 blocks, the last one ending at column C (overlapping the one
// before). to_tile: t[c][r] = x[r * C + c]; otherwise the inverse, x[r * C + c] = column(c)[r], with column(c)
// the 16 rows' values of class c (t[c], or computed on the way: the gradient's store).
template <bool to_tile, typename Column>
FUSEDLOSS_INLINE void transpose_tile16(float* x, int64_t C, float (*t)[16], const Column& column) {
  auto block = [&](int64_t c0) FUSEDLOSS_LAMBDA_INLINE {
    TileVector16 v[16];
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i) {
      if constexpr (to_tile) {
        __builtin_memcpy(&v[i], x + i * C + c0, sizeof(TileVector16));
      } else {
        v[i] = column(c0 + i);
      }
    }
    transpose16(v);
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i)
      __builtin_memcpy(to_tile ? &t[c0 + i][0] : x + i * C + c0, &v[i], sizeof(TileVector16));
  };
  int64_t c0 = 0;
  for (; c0 + 16 <= C; c0 += 16) block(c0);
  if (c0 < C) block(C - 16);
}

// The R rows of a full float32 tile between row-major x and the transposed tile t. to_tile: t[c][r] =
// x[r * C + c]; otherwise the inverse, x[r * C + c] = t[c][r] (x is then the gradient). 8 x 8 blocks at a time
// (16 x 16 for 16 rows of at least 16 classes; 16 x 8 into t for 16 rows of 8 to 15); columns past the last
// multiple of 8 go through one more block that ends at column C and overlaps the one before (the overlap is
// written twice with the same values: no element-by-element tail, no access past a row); fewer than 8 classes
// element by element.
// kUnroll: the 8 rows' loads and stores of a block unrolled, so that the rows go straight between memory and
// registers where a TileVector is one register (AVX2 and up). Left as loops, GCC copied the rows into a stack array
// with 16-byte moves that the transpose read back as 32-byte vectors (a failed store-to-load forward per row: the
// AVX2 variant's tiles took 1.4x as long at 9 to 64 classes); in the baseline variant, two SSE registers a row,
// the unrolled copies measured 12-20% slower instead.
template <bool to_tile, int R, bool kUnroll>
FUSEDLOSS_INLINE void transpose_tile(float* x, int64_t C, float (*t)[R]) {
  if constexpr (R == 16) {
    if (C >= 16) {
      return transpose_tile16<to_tile>(x, C, t, [&](int64_t c) FUSEDLOSS_LAMBDA_INLINE {
        TileVector16 v;
        __builtin_memcpy(&v, t[c], sizeof(v));
        return v;
      });
    }
    if (to_tile && C >= 8) {
      // 8 to 15 classes: rows 0-7 and 8-15 of 8 columns through two 8 x 8 transposes, joined into one 64-byte store
      // per class. Stored as two 32-byte halves, each class's row of t was then read by one 64-byte load, which
      // cannot take its value from two stores still in flight and waited for them to reach the cache (Intel Xeon,
      // 4096 x 9 to 15 without a gradient: 7-10% faster on one thread, 20% on two).
      auto block = [&](int64_t c0) FUSEDLOSS_LAMBDA_INLINE {
        TileVector lo[8], hi[8];
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
          __builtin_memcpy(&lo[i], x + i * C + c0, sizeof(TileVector));
          __builtin_memcpy(&hi[i], x + (i + 8) * C + c0, sizeof(TileVector));
        }
        transpose8(lo);
        transpose8(hi);
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
          const TileVector16 v =
              __builtin_shufflevector(lo[i], hi[i], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
          __builtin_memcpy(&t[c0 + i][0], &v, sizeof(v));
        }
      };
      block(0);
      if (C > 8) block(C - 8);
      return;
    }
  }
  for (int r0 = 0; r0 < R; r0 += 8) {
    auto block = [&](int64_t c0) FUSEDLOSS_LAMBDA_INLINE {
      TileVector v[8];
      auto load = [&](int i) FUSEDLOSS_LAMBDA_INLINE {
        __builtin_memcpy(&v[i], to_tile ? x + (r0 + i) * C + c0 : &t[c0 + i][r0], sizeof(TileVector));
      };
      auto store = [&](int i) FUSEDLOSS_LAMBDA_INLINE {
        __builtin_memcpy(to_tile ? &t[c0 + i][r0] : x + (r0 + i) * C + c0, &v[i], sizeof(TileVector));
      };
      if constexpr (kUnroll) {
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) load(i);
        transpose8(v);
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) store(i);
      } else {
        for (int i = 0; i < 8; ++i) load(i);
        transpose8(v);
        for (int i = 0; i < 8; ++i) store(i);
      }
    };
    int64_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8) block(c0);
    if (c0 < C && C >= 8) {
      block(C - 8);
    } else {
      for (int r = r0; r < r0 + 8; ++r)
        for (int64_t c = c0; c < C; ++c) {
          if (to_tile) {
            t[c][r] = x[r * C + c];
          } else {
            x[r * C + c] = t[c][r];
          }
        }
    }
  }
}
#endif

#ifndef __CUDACC__
// Σ_c term(c) for c in [0, C): four partial sums (classes c mod 4), each in class order, added pairwise as
// (p0 + p1) + (p2 + p3) — the order of the tiles' element-wise loops below, kept in vector registers.
template <typename V, typename Term>
FUSEDLOSS_INLINE V sum_mod4(int64_t C, const Term& term) {
  V part0 = {}, part1 = {}, part2 = {}, part3 = {};
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    part0 += term(c);
    part1 += term(c + 1);
    part2 += term(c + 2);
    part3 += term(c + 3);
  }
  if (c < C) part0 += term(c);
  if (c + 1 < C) part1 += term(c + 1);
  if (c + 2 < C) part2 += term(c + 2);
  return (part0 + part1) + (part2 + part3);
}
#endif

// Per row r of a transposed tile: mx[r] = max_c t[c][r], e[c][r] = exp(t[c][r] − mx[r]) (not stored when e is
// null: no gradient to compute), sum[r] = Σ_c e[c][r].
// NaN compares false in the max; it reaches its row's sum (and so the whole row) through exp. Four partial sums per
// row (classes c mod 4), added pairwise: one running sum's rounding error grows with C and put the gradient of
// some 40-class rows at 6 ulps where torch's is 1. In float32 on the host, one GCC vector of R lanes per class
// (the compiler left the max as R scalar maxima, and the partial sums indexed by c mod 4 in memory); the same
// operations lane by lane as the loops for other types.
template <int R, typename acc_t, bool kPermute = false>
FUSEDLOSS_INLINE void tile_max_sum_exp(const acc_t (*t)[R], int64_t C, acc_t* mx, acc_t (*e)[R], acc_t* sum) {
#ifndef __CUDACC__
  if constexpr (std::is_same<acc_t, float>::value) {
    typedef typename FloatLanes<R>::type V;
    // Four running maxima (classes c mod 4): one was a chain of C dependent max operations.
    auto larger = [](V a, V b) FUSEDLOSS_LAMBDA_INLINE { return b > a ? b : a; };
    V m0 = load_lanes<R>(t[0]), m1 = m0, m2 = m0, m3 = m0;
    int64_t k = 1;
    for (; k + 4 <= C; k += 4) {
      m0 = larger(m0, load_lanes<R>(t[k]));
      m1 = larger(m1, load_lanes<R>(t[k + 1]));
      m2 = larger(m2, load_lanes<R>(t[k + 2]));
      m3 = larger(m3, load_lanes<R>(t[k + 3]));
    }
    for (; k < C; ++k) m0 = larger(m0, load_lanes<R>(t[k]));
    const V m = larger(larger(m0, m1), larger(m2, m3));
    auto exp_at = [&](int64_t c) FUSEDLOSS_LAMBDA_INLINE {
      const V v = fast_exp_nonpositive_lanes<R, kPermute>(load_lanes<R>(t[c]) - m);
      std::memcpy(e[c], &v, sizeof(v));
      return v;
    };
    // Without e, the exps are only summed: those below the underflow bound may be about 2^−126 instead of 0
    // (kZeroUnderflow), as each row's sum holds its max's e^0 = 1.
    auto sum_term = [&](int64_t c) FUSEDLOSS_LAMBDA_INLINE {
      return fast_exp_nonpositive_lanes<R, kPermute, false>(load_lanes<R>(t[c]) - m);
    };
    const V total = e != nullptr ? sum_mod4<V>(C, exp_at) : sum_mod4<V>(C, sum_term);
    std::memcpy(mx, &m, sizeof(m));
    std::memcpy(sum, &total, sizeof(total));
    return;
  }
#endif
  for (int r = 0; r < R; ++r) mx[r] = t[0][r];
  for (int64_t c = 1; c < C; ++c)
    for (int r = 0; r < R; ++r) mx[r] = t[c][r] > mx[r] ? t[c][r] : mx[r];
  acc_t part[4][R] = {};
  for (int64_t c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      const acc_t v = fast_exp(t[c][r] - mx[r]);
      if (e != nullptr) e[c][r] = v;
      part[c & 3][r] += v;
    }
  for (int r = 0; r < R; ++r) sum[r] = (part[0][r] + part[1][r]) + (part[2][r] + part[3][r]);
}

// The label-smoothing sums of a transposed tile: sum_w = Σ_c w_c (C without weights), sum_w_s[r] = Σ_c w_c·(t[c][r]
// − mx[r]). Four partial sums per row as in tile_max_sum_exp (one running sum per row was a chain of C dependent
// additions that doubled the tile's time); in float32 on the host one GCC vector of R lanes per class.
template <int R, typename acc_t>
FUSEDLOSS_INLINE void tile_smoothing_sums(const acc_t (*t)[R], int64_t C, const acc_t* mx, const acc_t* weight,
                                          acc_t* sum_w_s, acc_t* sum_w) {
  acc_t total_w = 0;
  if (weight == nullptr) {
    total_w = static_cast<acc_t>(C);
  } else {
    for (int64_t c = 0; c < C; ++c) total_w += weight[c];
  }
  *sum_w = total_w;
#ifndef __CUDACC__
  if constexpr (std::is_same<acc_t, float>::value) {
    typedef typename FloatLanes<R>::type V;
    const V m = load_lanes<R>(mx);
    auto term = [&](int64_t c) FUSEDLOSS_LAMBDA_INLINE {
      const V d = load_lanes<R>(t[c]) - m;
      return weight == nullptr ? d : d * weight[c];
    };
    const V total = sum_mod4<V>(C, term);
    std::memcpy(sum_w_s, &total, sizeof(total));
    return;
  }
#endif
  acc_t part[4][R] = {};
  for (int64_t c = 0; c < C; ++c) {
    const acc_t w_c = weight == nullptr ? acc_t(1) : weight[c];
    for (int r = 0; r < R; ++r) part[c & 3][r] += w_c * (t[c][r] - mx[r]);
  }
  for (int r = 0; r < R; ++r) sum_w_s[r] = (part[0][r] + part[1][r]) + (part[2][r] + part[3][r]);
}

// What a tile row's loss and gradient need beyond its exps: the loss and the coefficients of
// g_c = (p_c·(target_coef + p_rest) − smooth·w_c) for c ≠ y (finish_hard_row's names).
template <typename T>
struct TileRowTerms {
  T loss, target_coef, p_rest, smooth;
};

// Whether tile_row_terms computes focal rows (γ = 1 or 2 in float32; other γ take finish_hard_row per row).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE bool tile_focal_lanes(const Params<acc_t>& prm) {
  return std::is_same<acc_t, float>::value && (prm.focal_gamma == acc_t(2) || prm.focal_gamma == acc_t(1));
}

// exp, expm1 and log of one row's value (T = acc_t) or of a tile's rows at once (T = a GCC vector of float lanes,
// I its int32 twin): the same algorithm either way.
enum class TileMath { kExp, kExpm1, kLog };
template <TileMath kFn, typename T, typename I>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T tile_math(T x) {
#ifndef __CUDACC__
  if constexpr (!std::is_arithmetic<T>::value) {
    if constexpr (kFn == TileMath::kExp) return exp_float_lanes<T, I>(x);
    if constexpr (kFn == TileMath::kExpm1) return expm1_float_lanes<T, I>(x);
    if constexpr (kFn == TileMath::kLog) return log_float_lanes<T, I>(x);
  }
#endif
  if constexpr (std::is_arithmetic<T>::value) {
    if constexpr (kFn == TileMath::kExp) return fast_exp(x);
    if constexpr (kFn == TileMath::kExpm1) return fast_expm1(x);
    if constexpr (kFn == TileMath::kLog) return fast_log(x);
  }
}

// finish_hard_row of tile rows without focal or with focal γ = 1 or 2 in float32, branch-free (fast_log for the
// row's log Σ e; fast_expm1 for the focal −(1 − p), the power as multiplies): the same formulas, in the same
// order. T = acc_t for one row or a GCC vector of float lanes for a tile's rows (I its int32 twin).
template <typename T, typename I, typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE TileRowTerms<T> tile_row_terms(const Params<acc_t>& prm, bool smoothing, T mx,
                                                                     T sum, T s_y, T w_y, T sum_w_s, acc_t sum_w) {
  const T log_sum = tile_math<TileMath::kLog, T, I>(sum);
  const T lse = mx + log_sum;
  const T lp_y = (s_y - mx) - log_sum;
  const acc_t z = prm.z_loss;
  TileRowTerms<T> terms;
  if (prm.focal_gamma == acc_t(0)) {
    const acc_t eps = prm.label_smoothing;
    const acc_t eps_c = eps / acc_t(prm.num_classes);
    T row_loss = -(acc_t(1) - eps) * w_y * lp_y;
    const T smoothed = row_loss - eps_c * (sum_w_s - sum_w * log_sum);
    row_loss = smoothing ? smoothed : row_loss;
    terms.loss = row_loss + z * lse * lse;
    const T z_term = acc_t(2) * z * lse;
    terms.target_coef = (acc_t(1) - eps) * w_y;
    terms.p_rest = smoothing ? eps_c * sum_w + z_term : z_term;
    terms.smooth = T{} + eps_c;
    return terms;
  }
  const acc_t gamma = prm.focal_gamma;
  const T one_minus_p = -tile_math<TileMath::kExpm1, T, I>(lp_y);
  const auto representable = one_minus_p > Limits<acc_t>::tiny;
  const T power = gamma == acc_t(2) ? one_minus_p * one_minus_p : one_minus_p;
  const T factor = representable ? power : T{};
  const T ratio = representable ? lp_y / one_minus_p : T{};
  const T cost = -factor * lp_y;
  const T dcost = -factor + gamma * tile_math<TileMath::kExp, T, I>(lp_y) * factor * ratio;
  const T g_y = w_y * dcost;
  terms.loss = w_y * cost + z * lse * lse;
  terms.target_coef = -g_y;
  terms.p_rest = acc_t(2) * z * lse;
  terms.smooth = T{};
  return terms;
}

// The gradient's row constants of tile rows (T as for tile_row_terms): g_c = e_c·k − smooth·w_c for c ≠ y, g_y
// for the target; smooth comes back times grad_scale. p_c = e_c / Σ e: one rounding, where exp(−log Σ) carried
// the log's rounding, relative to log Σ, into every gradient (up to 8 ulps of the largest at 43 classes).
template <typename T, typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void tile_grad_terms(T sum, T e_y, T w_y, acc_t grad_scale,
                                                            TileRowTerms<T>& terms, T& k, T& g_y) {
  const T inv_sum = acc_t(1) / sum;
  k = inv_sum * ((terms.target_coef + terms.p_rest) * grad_scale);
  const T p_y = e_y * inv_sum;
  g_y = ((p_y - acc_t(1)) * terms.target_coef + p_y * terms.p_rest - terms.smooth * w_y) * grad_scale;
  terms.smooth = terms.smooth * grad_scale;
}

// kC: prm.num_classes when known at compile time (0: read at run time), so that the class loops unroll and keep
// more of t and e in registers. kPermute: compiled for AVX2 or later (the AVX2 and AVX-512 variants pass it): the
// table exp in 8 lanes, the transposes' row copies unrolled.
template <typename acc_t, typename scalar_t, int R = kTileRows, int kC = 0, bool kPermute = false>
FUSEDLOSS_INLINE void process_row_tile(const scalar_t* x, const int64_t* targets, int rows, const acc_t* weight,
                      const Params<acc_t>& prm, scalar_t* grad, acc_t grad_scale, acc_t* losses) {
  static_assert(R % 8 == 0, "tiles are made of 8 x 8 transposes");
  const int64_t C = kC != 0 ? kC : prm.num_classes;
  if (C < 1) return;  // never (C >= 1 is checked before): tells the compiler that the transposes below fill t[0]
  const bool softcap = prm.softcap != acc_t(0);
  const bool smoothing = prm.label_smoothing != acc_t(0);
  alignas(64) acc_t t[kTileMaxClasses][R];  // s_c of each row, then the gradient
  acc_t e[kTileMaxClasses][R];  // exp(s_c − max)
  acc_t d[kTileMaxClasses][R];  // ds_c/dx_c (soft-cap only)
  int64_t y[R];
  bool ignored[R];
  for (int r = 0; r < R; ++r) {
    ignored[r] = r >= rows || targets[r] == prm.ignore_index;
    y[r] = ignored[r] ? 0 : targets[r];
  }
#ifndef __CUDACC__
  // Full float32 tiles move through vector transposes (the partial last tile and other types element by element).
  constexpr bool kVectorTranspose = std::is_same<acc_t, float>::value && std::is_same<scalar_t, float>::value;
  const bool vector_transpose = kVectorTranspose && rows == R && !softcap;
  if constexpr (kVectorTranspose) {
    if (vector_transpose) transpose_tile<true, R, kPermute>(const_cast<float*>(x), C, t);
  }
#else
  const bool vector_transpose = false;
#endif
  for (int r = 0; r < R && !vector_transpose; ++r) {
    const scalar_t* xr = x + row_offset(r, C);
    if (r >= rows) {
      for (int64_t c = 0; c < C; ++c) t[c][r] = acc_t(0);
      if (softcap)
        for (int64_t c = 0; c < C; ++c) d[c][r] = acc_t(0);
    } else if (softcap) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(xr[c]);
        t[c][r] = softcap_value(v, prm.softcap, prm.inv_softcap);
        d[c][r] = softcap_derivative(v, prm.inv_softcap);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) t[c][r] = static_cast<acc_t>(xr[c]);
    }
  }
  acc_t mx[R], sum[R];
  tile_max_sum_exp<R, acc_t, kPermute>(t, C, mx, grad == nullptr ? nullptr : e, sum);
  acc_t sum_w_s[R] = {};
  acc_t sum_w = 0;
  if (smoothing) tile_smoothing_sums<R>(t, C, mx, weight, sum_w_s, &sum_w);
  // The rows' gathered values, then their terms: for the whole tile at once (one vector operation per step) in
  // float32 on the host, one row at a time otherwise. Written across the rows' lanes, the compiler unrolled the
  // 16 rows and kept each row's values apart, a branch per ignored row and a division per row.
  acc_t s_y[R], w_y[R], e_y[R], smooth[R], k[R], g_y[R];
  for (int r = 0; r < R; ++r) {
    s_y[r] = t[y[r]][r];
    w_y[r] = weight == nullptr ? acc_t(1) : weight[y[r]];
    e_y[r] = grad == nullptr ? acc_t(0) : e[y[r]][r];
  }
  const bool per_row_focal = prm.focal_gamma != acc_t(0) && !tile_focal_lanes(prm);
  acc_t d_y[R];  // the target's soft-cap factor
  for (int r = 0; r < R; ++r) d_y[r] = softcap ? d[y[r]][r] : acc_t(1);
  bool lanes_done = false;  // the float32 host path below computed the losses and, with a gradient, t
#ifndef __CUDACC__
  if constexpr (std::is_same<acc_t, float>::value) {
    if (!per_row_focal) {
      typedef typename FloatLanes<R>::type V;
      typedef typename FloatLanes<R>::int_type I;
      const V w_yv = load_lanes<R>(w_y), sumv = load_lanes<R>(sum);
      TileRowTerms<V> terms = tile_row_terms<V, I>(prm, smoothing, load_lanes<R>(mx), sumv, load_lanes<R>(s_y),
                                                    w_yv, load_lanes<R>(sum_w_s), sum_w);
      I kept;
      for (int r = 0; r < R; ++r) kept[r] = ignored[r] ? 0 : -1;
      const V row_losses = kept != 0 ? terms.loss : V{};
      if (rows == R) {
        std::memcpy(losses, &row_losses, sizeof(row_losses));
      } else {
        for (int r = 0; r < rows; ++r) losses[r] = row_losses[r];
      }
      if (grad == nullptr) return;
      V kv, g_yv;
      tile_grad_terms(sumv, load_lanes<R>(e_y), w_yv, grad_scale, terms, kv, g_yv);
      if (softcap) g_yv *= load_lanes<R>(d_y);
      // Ignored rows get 0 (selected: a row of NaN or infinite logits has NaN exps).
      g_yv = kept != 0 ? g_yv : V{};
      std::memcpy(g_y, &g_yv, sizeof(g_yv));
      // Class c of the gradient for the tile's rows, except at the targets (g_y, written after).
      auto column = [&](int64_t c) FUSEDLOSS_LAMBDA_INLINE {
        V g = load_lanes<R>(e[c]) * kv - (weight == nullptr ? terms.smooth : terms.smooth * weight[c]);
        if (softcap) g *= load_lanes<R>(d[c]);
        return kept != 0 ? g : V{};
      };
      if constexpr (R == 16 && kVectorTranspose) {
        if (vector_transpose && C >= 16) {
          // Straight from the registers into the gradient's rows (no pass through t), then the targets'.
          transpose_tile16<false>(grad, C, t, column);
          for (int r = 0; r < R; ++r) grad[row_offset(r, C) + y[r]] = g_y[r];
          return;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const V g = column(c);
        std::memcpy(t[c], &g, sizeof(g));
      }
      lanes_done = true;
    }
  }
#endif
  for (int r = 0; r < R && !lanes_done; ++r) {
    TileRowTerms<acc_t> terms;
    if (per_row_focal) {
      // Other γ (pow) and float64 focal: finish_hard_row per row.
      RowStats<acc_t> stats;
      stats.max = mx[r];
      stats.sum_exp = sum[r];
      stats.sum_a_s = sum_w_s[r];
      stats.sum_a = sum_w;
      const RowResult<acc_t> res = finish_hard_row(stats, prm, s_y[r], w_y[r]);
      terms = {res.loss, res.target_coef, res.p_rest, res.smooth_coef};
    } else {
      terms = tile_row_terms<acc_t, int32_t>(prm, smoothing, mx[r], sum[r], s_y[r], w_y[r], sum_w_s[r], sum_w);
    }
    if (r < rows) losses[r] = ignored[r] ? acc_t(0) : terms.loss;
    if (grad != nullptr) {
      tile_grad_terms(sum[r], e_y[r], w_y[r], grad_scale, terms, k[r], g_y[r]);
      g_y[r] *= d_y[r];
    }
    smooth[r] = terms.smooth;
  }
  if (grad == nullptr) return;
  for (int64_t c = 0; c < C && !lanes_done; ++c) {
    const acc_t w_c = weight == nullptr ? acc_t(1) : weight[c];
    for (int r = 0; r < R; ++r) {
      acc_t g = e[c][r] * k[r] - smooth[r] * w_c;
      if (softcap) g *= d[c][r];
      t[c][r] = g;
    }
  }
  for (int r = 0; r < R; ++r) t[y[r]][r] = g_y[r];
#ifndef __CUDACC__
  if constexpr (kVectorTranspose) {
    if (vector_transpose) {
      for (int r = 0; r < R && !lanes_done; ++r)
        if (ignored[r])
          for (int64_t c = 0; c < C; ++c) t[c][r] = acc_t(0);
      transpose_tile<false, R, kPermute>(grad, C, t);
      return;
    }
  }
#endif
  for (int r = 0; r < rows; ++r) {
    scalar_t* gr = grad + row_offset(r, C);
    if (ignored[r]) {
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<scalar_t>(acc_t(0));
    } else {
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<scalar_t>(t[c][r]);
    }
  }
}

// Whether process_row_tile serves rows of these options (hard targets), with tiles of up to max_classes classes.
template <typename acc_t>
FUSEDLOSS_INLINE bool tile_rows_apply(const Params<acc_t>& prm, int64_t max_classes = kTileMaxClassesNarrow) {
  return prm.num_classes <= max_classes && !(prm.focal_gamma != acc_t(0) && prm.label_smoothing != acc_t(0));
}

// Process one row: returns its loss (0 for an ignored row) and, when grad is not null, writes
// grad_scale·dl/dx into grad[0:C) (which may be x itself: every element is read before it is
// written). Hard targets: soft == nullptr and target is the class index; soft targets: soft points
// to the row's probabilities. weight may be null (all ones). Always inlined (as process_row_tile), so that it is
// compiled into each vector-ISA variant of its caller (csrc/cpu/isa.h); kPermute as for process_row_tile.
template <typename acc_t, typename scalar_t, typename target_t, int W = 8, bool kPermute = false>
FUSEDLOSS_INLINE acc_t process_row(const scalar_t* x, int64_t target, const target_t* soft, const acc_t* weight,
                  const Params<acc_t>& prm, scalar_t* grad, acc_t grad_scale) {
  const int64_t C = prm.num_classes;
  const bool is_soft = soft != nullptr;
  if (!is_soft && target == prm.ignore_index) {
    if (grad != nullptr)
      for (int64_t i = 0; i < C; ++i) grad[i] = static_cast<scalar_t>(acc_t(0));
    return acc_t(0);
  }
  const acc_t eps = prm.label_smoothing;
  const acc_t eps_c = eps / acc_t(C);
  const bool hard_smoothing = !is_soft && eps != acc_t(0);
  const bool softcap = prm.softcap != acc_t(0);
  acc_t s[kBlock];  // s_c of the block
  acc_t a[kBlock];  // soft targets: a_c of the block
  acc_t g[kBlock];  // gradient of the block before the conversion to scalar_t

  auto load_soft_weights = [&](int64_t start, int64_t len) {
    for (int64_t i = 0; i < len; ++i)
      a[i] = soft_weight(static_cast<acc_t>(soft[start + i]), weight == nullptr ? acc_t(1) : weight[start + i], eps,
                         eps_c);
  };
  auto logit = [&](int64_t c) {
    const acc_t v = static_cast<acc_t>(x[c]);
    return softcap ? softcap_value(v, prm.softcap, prm.inv_softcap) : v;
  };
  // a_c of a per-class focal row.
  auto target_weight = [&](int64_t c) {
    const acc_t w_c = weight == nullptr ? acc_t(1) : weight[c];
    return is_soft ? soft_weight(static_cast<acc_t>(soft[c]), w_c, eps, eps_c)
                   : (eps_c + (c == target ? acc_t(1) - eps : acc_t(0))) * w_c;
  };

  // Read before sweep 1, which may overwrite x (inplace) with exp values.
  const acc_t w_y = is_soft || weight == nullptr ? acc_t(1) : weight[target];
  const acc_t s_y = is_soft ? acc_t(0) : logit(target);
  const acc_t ds_y = is_soft || !softcap ? acc_t(1) : softcap_derivative(static_cast<acc_t>(x[target]), prm.inv_softcap);

  // When the gradient has the compute dtype (float32, float64 input) and needs nothing but p_j per
  // class, sweep 1 stores e_j = exp(s_j − block max) in the gradient buffer and sweep 2 turns it
  // into p_j with one multiply per element instead of a second exp (the row is still in L2, so the
  // extra write and read cost no memory traffic). block_maxima keeps each block's max for that.
  constexpr int64_t kMaxStoredBlocks = 512;
  const bool store_exp = std::is_same<scalar_t, acc_t>::value && grad != nullptr && !softcap &&
                         !(prm.focal_gamma != acc_t(0) && (is_soft || eps != acc_t(0))) &&
                         C <= kMaxStoredBlocks * kBlock;
  acc_t block_maxima[kMaxStoredBlocks];

  // Sweep 1: online max / sum of exp, and the target sums the loss needs. Blocks of logits already in acc_t whose
  // length is a multiple of 16 (the vector sweeps then read nothing past them) are read where they are (no copy
  // into s, which took a sixth of a 1024-class row; copied, the last 512 classes of a 1536-class row made it 8%
  // slower), unless the gradient is written over x (sweep 1 may store exps there before the block's dot products
  // read it).
  const bool read_in_place = std::is_same<scalar_t, acc_t>::value && !softcap &&
                             (grad == nullptr || static_cast<const void*>(grad) != static_cast<const void*>(x));
  RowStats<acc_t> stats;
  for (int64_t start = 0; start < C; start += kBlock) {
    const int64_t len = min_of(kBlock, C - start);
    // Rows of 512 classes or more: the logits ahead on their way into the cache while this block's exps run. The
    // hardware prefetcher follows the loads, which pause during the exps, so a row of 32000 classes waited on
    // memory once per block (the no_grad forward at 4096 x 32000 took 28 ms, then 14 with the next block
    // prefetched at the start of each block). Computed in float32: the logits kBlock classes ahead of the ones
    // being summed (into the next row where this one ends), a line or two per step of the exp loop. Issued all at
    // once at the start of a block, the prefetches had waited on each other for the core's few outstanding
    // misses; taken relative to the block's end, a row of blocks of two lengths left gaps. With the blocks of
    // 1024, against the burst and blocks of 512 (Intel Xeon, 2 threads, paired runs): no_grad 9-14% faster from
    // 600 to 2048 classes and 23% at 32000 (34 -> 26 ms), with the gradient 10-17% and 9%; half that distance was
    // slower. float64: the next block at the start. A prefetch past the tensor's end does not fault (the addresses
    // are formed as integers).
    const char* ahead = nullptr;
    if (C >= 512) {
      if constexpr (std::is_same<acc_t, float>::value) {
        ahead = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x + start) + kBlock * sizeof(scalar_t));
      } else {
        const uintptr_t next = reinterpret_cast<uintptr_t>(x + start + len);
        for (uintptr_t b = 0; b < kBlock * sizeof(scalar_t); b += 64)
          __builtin_prefetch(reinterpret_cast<const void*>(next + b));
      }
    }
    const acc_t* s_block = s;
    if (read_in_place && len % 16 == 0) {
      s_block = reinterpret_cast<const acc_t*>(x + start);
    } else {
      load_block(x + start, len, prm, s);
    }
    RowStats<acc_t> block;
    block.max = row_block_max<W>(s_block, len);
    acc_t* exp_out = nullptr;
    if (store_exp) {
      block_maxima[start / kBlock] = block.max;
      exp_out = reinterpret_cast<acc_t*>(grad + start);
    }
    block.sum_exp = row_block_sum_exp<W, acc_t, kPermute>(s_block, len, block.max, exp_out, ahead,
                                                          static_cast<int>(sizeof(scalar_t)));
    if (hard_smoothing) {
      const acc_t* w = weight == nullptr ? nullptr : weight + start;
      block.sum_a_s = row_block_dot<W>(w, s_block, block.max, len);
      block.sum_a = w == nullptr ? acc_t(len) : block_sum(w, len);
    }
    if (is_soft) {
      load_soft_weights(start, len);
      block.sum_a_s = row_block_dot<W>(a, s_block, block.max, len);
      block.sum_a = block_sum(a, len);
    }
    if (start == 0) {
      stats = block;
    } else {
      stats.merge(block);
    }
  }

  RowResult<acc_t> res = is_soft ? finish_soft_row(stats, prm) : finish_hard_row(stats, prm, s_y, w_y);

  if (res.per_class_focal) {
    // Focal with smoothing or soft targets: Σ a_c cost(lp_c) and G = Σ a_c cost'(lp_c), then the
    // gradient, per class (pow and expm1 per element: this combination is not on the fast path).
    // float64 sums: a serial float32 sum over C classes would lose accuracy against torch's pairwise sums.
    double sum_cost = 0, sum_dcost = 0;
    for (int64_t c = 0; c < C; ++c) {
      acc_t cost, dcost;
      focal_cost(res.log_prob(logit(c)), prm.focal_gamma, &cost, &dcost);
      const acc_t a_c = target_weight(c);
      sum_cost += a_c * cost;
      sum_dcost += a_c * dcost;
    }
    finish_per_class_focal(&res, prm, static_cast<acc_t>(sum_cost), static_cast<acc_t>(sum_dcost));
    if (grad != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t s_c = logit(c);
        const acc_t lp = res.log_prob(s_c);
        acc_t cost, dcost;
        focal_cost(lp, prm.focal_gamma, &cost, &dcost);
        acc_t d = fast_exp(lp) * res.p_rest + target_weight(c) * dcost;
        if (softcap) d *= softcap_derivative(static_cast<acc_t>(x[c]), prm.inv_softcap);
        grad[c] = static_cast<scalar_t>(d * grad_scale);
      }
    }
    return res.loss;
  }

  if (grad == nullptr) return res.loss;

  // Sweep 2: dl/dx_j = scale·(p_j·p_coef − smooth_coef·w_j − a_j)·ds/dx: one row constant and one
  // per-class term; the target class is rewritten afterwards in acc_t from p_y − 1.
  const acc_t p_coef = (res.target_coef + res.p_rest) * grad_scale;
  const acc_t target_coef = res.target_coef * grad_scale;
  const acc_t p_rest = res.p_rest * grad_scale;
  const acc_t smooth_coef = res.smooth_coef * grad_scale;
  const acc_t row_max = res.max;
  const acc_t log_sum = res.log_sum;
  for (int64_t start = 0; store_exp && start < C; start += kBlock) {
    const int64_t len = min_of(kBlock, C - start);
    acc_t* out = reinterpret_cast<acc_t*>(grad + start);  // holds e_j; p_j = e_j·exp(block max − max − log_sum)
    const acc_t to_p = fast_exp((block_maxima[start / kBlock] - row_max) - log_sum);
    if (is_soft) {
      load_soft_weights(start, len);
      for (int64_t i = 0; i < len; ++i) {
        const acc_t p = out[i] * to_p;
        out[i] = (p * target_coef - a[i] * grad_scale) + p * p_rest;
      }
    } else if (smooth_coef != acc_t(0) && weight != nullptr) {
      const acc_t* w = weight + start;
      const acc_t k = to_p * p_coef;
      for (int64_t i = 0; i < len; ++i) out[i] = out[i] * k - smooth_coef * w[i];
    } else {
      const acc_t k = to_p * p_coef;
      for (int64_t i = 0; i < len; ++i) out[i] = out[i] * k - smooth_coef;
    }
  }
  for (int64_t start = 0; !store_exp && start < C; start += kBlock) {
    const int64_t len = min_of(kBlock, C - start);
    load_block(x + start, len, prm, s);
    scalar_t* out = grad + start;
    if (is_soft) {
      load_soft_weights(start, len);
      for (int64_t i = 0; i < len; ++i) {
        const acc_t p = fast_exp((s[i] - row_max) - log_sum);
        g[i] = (p * target_coef - a[i] * grad_scale) + p * p_rest;
      }
    } else if (smooth_coef != acc_t(0) && weight != nullptr) {
      const acc_t* w = weight + start;
      for (int64_t i = 0; i < len; ++i) g[i] = fast_exp((s[i] - row_max) - log_sum) * p_coef - smooth_coef * w[i];
    } else if (smooth_coef != acc_t(0)) {
      for (int64_t i = 0; i < len; ++i) g[i] = fast_exp((s[i] - row_max) - log_sum) * p_coef - smooth_coef;
    } else {
      for (int64_t i = 0; i < len; ++i) g[i] = fast_exp((s[i] - row_max) - log_sum) * p_coef;
    }
    if (softcap)
      for (int64_t i = 0; i < len; ++i) g[i] *= softcap_derivative(static_cast<acc_t>(x[start + i]), prm.inv_softcap);
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<scalar_t>(g[i]);
  }
  if (!is_soft) {
    const acc_t p_y = fast_exp(res.log_prob(s_y));
    acc_t g_y = ((p_y - acc_t(1)) * res.target_coef + p_y * res.p_rest - res.smooth_coef * w_y) * grad_scale;
    g_y *= ds_y;
    grad[target] = static_cast<scalar_t>(g_y);
  }
  return res.loss;
}

#endif  // __CUDA_ARCH__

}  // namespace softmax_loss
}  // namespace fusedloss
