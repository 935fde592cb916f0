// Torch-free math of the sigmoid and multi-label losses (docs/BACKENDS.md, "Sigmoid and multi-label
// ops"), per element or per row, shared by the CPU kernels (csrc/cpu/sigmoid.cpp) and the CUDA
// kernels. acc_t is float for float16/bfloat16/float32 input and double for float64; every
// function returns the loss and, in the same pass, its derivative with respect to the logit, so
// that backward only multiplies by grad_output.
//
// The logistic terms come from e = exp(−|x|) ∈ (0, 1] only (no overflow for any x):
//   softplus(x)  = log(1 + e^x)  = max(x, 0) + log1p(e)      = −log σ(−x)
//   softplus(−x) = log(1 + e^−x) = max(−x, 0) + log1p(e)     = −log σ(x)
//   σ(|x|) = 1 / (1 + e),  σ(−|x|) = e / (1 + e)             (both formed directly: 1 − σ never rounds away)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/common.h"
#include "kernels/softmax_loss.h"

// Row sums in the loops below may be reassociated into vector lanes (OpenMP simd reductions; a plain
// float sum is a dependent chain the compiler may not reorder). Without OpenMP (nvcc, the standalone
// tests) the loops run in order.
#define FUSEDLOSS_PRAGMA(text) _Pragma(#text)
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define FUSEDLOSS_SIMD_SUM(...) FUSEDLOSS_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define FUSEDLOSS_SIMD_SUM(...)
#endif


namespace fusedloss {
namespace sigmoid_loss {

using ::fusedloss::fast_exp;  // kernels/fast_math.h
using ::fusedloss::fast_log;
using std::fabs;
using std::log;
using std::log1p;
using std::pow;

// ---------------------------------------------------------------------------------------------
// Element math
// ---------------------------------------------------------------------------------------------

// fast_exp and fast_log: kernels/fast_math.h.

// log(1 + e) for e in [0, 1]: fast_log1p_unit (kernels/fast_math.h) in float32.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE float log1p_unit(float e) { return fast_log1p_unit(e); }

FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double log1p_unit(double e) { return log1p(e); }

// b^k for b >= 0 (exp(k·log b)); 0^k is 0 for k > 0 and +inf for k < 0, NaN propagates.
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t power(acc_t base, acc_t exponent) {
  return fast_exp(exponent * fast_log(base));
}

template <typename acc_t>
struct Logistic {
  acc_t softplus;      // log(1 + e^x)  = −log σ(−x)
  acc_t softplus_neg;  // log(1 + e^−x) = −log σ(x)
  acc_t sigmoid;       // σ(x)
  acc_t sigmoid_neg;   // σ(−x)
};

template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE Logistic<acc_t> logistic(acc_t x) {
  const acc_t e = fast_exp(-fabs(x));
  const acc_t log1p_e = log1p_unit(e);
  const acc_t positive_part = x > acc_t(0) ? x : acc_t(0);
  const acc_t big = acc_t(1) / (acc_t(1) + e);
  const acc_t small = e * big;
  Logistic<acc_t> t;
  t.softplus = positive_part + log1p_e;
  t.softplus_neg = (positive_part - x) + log1p_e;
  t.sigmoid = x >= acc_t(0) ? big : small;
  t.sigmoid_neg = x >= acc_t(0) ? small : big;
  return t;
}

template <typename acc_t>
struct LossGrad {
  acc_t loss;
  acc_t grad;  // d loss / d x
};

// Binary cross entropy of logit x against y in [0, 1] (weight w and pos_weight P folded in later):
//   l = P·y·softplus(−x) + (1 − y)·softplus(x),   dl/dx = (1 − y)·σ(x) − P·y·σ(−x)
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE LossGrad<acc_t> bce(acc_t x, acc_t y, acc_t pos_weight) {
  const Logistic<acc_t> t = logistic(x);
  const acc_t positive = pos_weight * y;
  const acc_t negative = acc_t(1) - y;
  return {positive * t.softplus_neg + negative * t.softplus, negative * t.sigmoid - positive * t.sigmoid_neg};
}

#ifndef __CUDACC__
// bce() times the weight w, of K vectors of 16 float32 elements at once, each step for all K before the next
// (FUSEDLOSS_EACH): the AVX-512 variant's element loop. Written element by element, the compiler's loop had one
// chain of about 40 dependent operations per vector (exp, log1p, division, the sums) and ran at about one
// operation per cycle; four chains side by side run 1.7x faster. The formulas of logistic() and bce(), with the
// 16-lane table exp (fast_exp_nonpositive_lanes) and log1p_unit on lanes: within the same error bound, not the
// same bits as the scalar path.
template <int K>
FUSEDLOSS_INLINE void bce_lanes16(const typename FloatLanes<16>::type (&x)[K],
                                  const typename FloatLanes<16>::type (&y)[K],
                                  const typename FloatLanes<16>::type (&w)[K],
                                  const typename FloatLanes<16>::type (&pos_weight)[K],
                                  typename FloatLanes<16>::type (&loss)[K], typename FloatLanes<16>::type (&grad)[K]) {
  typedef typename FloatLanes<16>::type V;
  typedef typename FloatLanes<16>::int_type I;
  V e[K], k[K], f[K], log1p_e[K], big[K];
  FUSEDLOSS_EACH(i, K) e[i] = -bit_cast_to<V>(bit_cast_to<I>(x[i]) & 0x7fffffff);  // −|x|
  fast_exp_nonpositive_lanes_each<16, K>(e);
  // fast_log1p_unit on lanes.
  FUSEDLOSS_EACH(i, K) k[i] = (e[i] + 0.0857864376269050f + 12582912.0f) - 12582912.0f;
  FUSEDLOSS_EACH(i, K) f[i] = (e[i] - k[i]) * (1.0f - 0.5f * k[i]);
  FUSEDLOSS_EACH(i, K) log1p_e[i] = log_reduced(f[i], k[i]);
  FUSEDLOSS_EACH(i, K) big[i] = 1.0f / (1.0f + e[i]);
  FUSEDLOSS_EACH(i, K) {
    const V positive_part = x[i] > 0.0f ? x[i] : V{};
    const V small = e[i] * big[i];
    const V softplus = positive_part + log1p_e[i];
    const V softplus_neg = (positive_part - x[i]) + log1p_e[i];
    const V sigmoid = x[i] >= 0.0f ? big[i] : small;
    const V sigmoid_neg = x[i] >= 0.0f ? small : big[i];
    const V positive = pos_weight[i] * y[i];
    const V negative = 1.0f - y[i];
    loss[i] = w[i] * (positive * softplus_neg + negative * softplus);
    grad[i] = w[i] * (negative * sigmoid - positive * sigmoid_neg);
  }
}
#endif

// The focal factor's exponent γ, fixed per call: none (γ = 0), square (γ = 2, the default: two
// multiplies) or any other (exp(γ·log b)).
enum class FocalPower { kNone, kSquare, kGeneral };

// torchvision's sigmoid focal loss of one element: with ce = BCE(x, y), p = σ(x),
//   b = 1 − p_t = p·(1 − y) + σ(−x)·y,   db/dx = p·σ(−x)·(1 − 2y)
//   l = α_t·b^γ·ce,   dl/dx = α_t·(b^γ·dce/dx + γ·b^(γ−1)·db/dx·ce)
// α_t = α·y + (1 − α)(1 − y), or 1 when α < 0. Where b is below the smallest normal number the
// factor is 0 with derivative 0 (as the reference's focal_power): b^(γ−1) is infinite at b = 0 for
// γ < 1, while the product's derivative is 0 there.
template <FocalPower kPower, typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE LossGrad<acc_t> sigmoid_focal(acc_t x, acc_t y, acc_t alpha, acc_t gamma) {
  const Logistic<acc_t> t = logistic(x);
  const acc_t negative = acc_t(1) - y;
  const acc_t ce = y * t.softplus_neg + negative * t.softplus;
  const acc_t dce = negative * t.sigmoid - y * t.sigmoid_neg;
  LossGrad<acc_t> out{ce, dce};
  if constexpr (kPower != FocalPower::kNone) {
    const acc_t base = t.sigmoid * negative + t.sigmoid_neg * y;
    const acc_t dbase = t.sigmoid * t.sigmoid_neg * (negative - y);
    // Selected, not branched, so that a NaN ce still reaches loss and gradient (0·NaN).
    const bool representable = base > Limits<acc_t>::tiny;
    const acc_t safe_base = representable ? base : acc_t(1);
    acc_t factor, dfactor;
    if constexpr (kPower == FocalPower::kSquare) {
      factor = safe_base * safe_base;
      dfactor = acc_t(2) * safe_base * dbase;
    } else {
      factor = power(safe_base, gamma);
      dfactor = gamma * (factor / safe_base) * dbase;
    }
    factor = representable ? factor : acc_t(0);
    dfactor = representable ? dfactor : acc_t(0);
    out.loss = factor * ce;
    out.grad = factor * dce + dfactor * ce;
  }
  const acc_t alpha_t = alpha >= acc_t(0) ? alpha * y + (acc_t(1) - alpha) * negative : acc_t(1);
  out.loss *= alpha_t;
  out.grad *= alpha_t;
  return out;
}

// ---------------------------------------------------------------------------------------------
// ZLPR (multilabel categorical cross entropy), one row
// ---------------------------------------------------------------------------------------------

// A running log-sum-exp relative to its max, seeded with the implicit 0 term: (max, sum) =
// (0, exp(0 − 0) = 1).
template <typename acc_t>
struct RunningLogSumExp {
  acc_t max = 0;
  acc_t sum = 1;

  // Folds in a block whose largest value is block_max and whose Σ exp(v − new max) is added after.
  FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void rescale_to(acc_t block_max) {
    if (block_max > max) {
      sum *= fast_exp(max - block_max);
      max = block_max;
    }
  }
};

// The ZLPR value v_c of class c: s_c for negatives, −s_c for positives, so both groups are a
// log-sum-exp of v over the group plus the implicit 0:
//   l = log(1 + Σ_{y=0} e^{s}) + log(1 + Σ_{y=1} e^{−s})
//   dl/ds_c = e^{v_c − lse_neg} (negatives),  −e^{v_c − lse_pos} (positives)
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t zlpr_value(acc_t s, bool positive) {
  return positive ? -s : s;
}

// ---------------------------------------------------------------------------------------------
// GHM-C
// ---------------------------------------------------------------------------------------------

// The bin of gradient norm g among the authors' float32 edges (edges[i] = i/bins, the last + 1e-6):
// the i with edges[i] <= g < edges[i+1], or −1 when there is none (NaN g). The guess floor(g·bins)
// is off by at most one from the float32 edges, and the two comparisons settle it; no branch (the
// norms are random, so branches would mispredict).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE int ghmc_bin(acc_t g, const acc_t* edges, int bins) {
  const bool inside = g >= edges[0] && g < edges[bins];
  int bin = static_cast<int>(inside ? g * static_cast<acc_t>(bins) : acc_t(0));
  bin = bin < bins - 1 ? bin : bins - 1;
  bin -= g < edges[bin] ? 1 : 0;
  bin += g >= edges[bin + 1] ? 1 : 0;
  return inside ? bin : -1;
}

// ---------------------------------------------------------------------------------------------
// Bi-tempered logistic loss, one row
// ---------------------------------------------------------------------------------------------

// Tempered logarithm (u^(1−t) − 1)/(1 − t) from log u (t ≠ 1).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t log_t_from_log(acc_t log_u, acc_t one_minus_t) {
  return (fast_exp(one_minus_t * log_u) - acc_t(1)) / one_minus_t;
}

// log of the tempered exponential exp_t(u) = relu(1 + (1 − t)·u)^(1/(1−t)) (t ≠ 1): −inf outside
// the support (t < 1). The relu passes NaN, as torch's: a NaN or infinite logit makes its row NaN (written
// `base > 0 ? base : 0`, a NaN row of t2 < 1 came out finite: the NaN class got p = 0).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t log_exp_t(acc_t u, acc_t one_minus_t, acc_t inv_one_minus_t) {
  const acc_t base = acc_t(1) + one_minus_t * u;
  return fast_log(base < acc_t(0) ? acc_t(0) : base) * inv_one_minus_t;
}

template <typename acc_t>
struct BiTemperedParams {
  double t1;
  double t2;
  int num_iters;
  int64_t num_classes;
  // 1 − t2 and 1/(1 − t2), formed in float64 (as the reference's Python scalars) and then rounded;
  // integer_exponent is 1/(1 − t2) when that is an integer of magnitude <= 15 (t2 = 1.2, 1.5, 2,
  // 0.5, 0.8, ...), else 0: exp_t is then a few multiplies instead of exp(k·log b).
  acc_t one_minus_t2;
  acc_t inv_one_minus_t2;
  int integer_exponent;
  // The last sweep needs p, p^(1−t1), p^(t2−t1), p^t2 = b^(e_i), b = 1 + (1 − t2)(a − λ), e_i = α_i/(1 − t2).
  // When every e_i is n_i/D with integers |n_i| <= 15 and D <= 12 (t1, t2 = 0.8, 1.2: D = 1; 0.5, 4.0:
  // D = 6), they are integer powers of r = b^(1/D): one log and one exp per class (none for D = 1)
  // instead of a log and four exps. power_denominator is D, or 0 when there is none (or t1 or t2 is 1).
  int power_denominator;
  int power_numerators[4];

  BiTemperedParams(double t1_, double t2_, int num_iters_, int64_t num_classes_)
      : t1(t1_),
        t2(t2_),
        num_iters(num_iters_),
        num_classes(num_classes_),
        one_minus_t2(static_cast<acc_t>(1.0 - t2_)),
        inv_one_minus_t2(t2_ == 1.0 ? acc_t(0) : static_cast<acc_t>(1.0 / (1.0 - t2_))),
        integer_exponent(0),
        power_denominator(0),
        power_numerators{0, 0, 0, 0} {
    if (t2_ == 1.0) return;
    const double k = 1.0 / (1.0 - t2_);
    int numerator = 0;
    if (as_small_integer(k, &numerator)) integer_exponent = numerator;
    if (t1_ == 1.0) return;
    const double exponents[4] = {k, (1.0 - t1_) * k, (t2_ - t1_) * k, t2_ * k};
    for (int denominator = 1; denominator <= 12 && power_denominator == 0; ++denominator) {
      bool all = true;
      for (int i = 0; i < 4 && all; ++i) all = as_small_integer(exponents[i] * denominator, &power_numerators[i]);
      if (all) power_denominator = denominator;
    }
  }

  // Whether v is an integer n with |n| <= 15, to 1e-9 relative.
  static bool as_small_integer(double v, int* n) {
    const double rounded = std::round(v);
    if (std::fabs(rounded) > 15 || std::fabs(v - rounded) > 1e-9 * std::fmax(std::fabs(v), 1.0)) return false;
    *n = static_cast<int>(rounded);
    return true;
  }
};

// base^|k| for an integer |k| <= 15, by squaring with a fixed trip count (branch-free, vectorizes).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t integer_power_magnitude(acc_t base, int exponent) {
  const int magnitude = exponent < 0 ? -exponent : exponent;
  acc_t result = 1;
  acc_t square = base;
  for (int bit = 0; bit < 4; ++bit) {
    result *= ((magnitude >> bit) & 1) != 0 ? square : acc_t(1);
    square *= square;
  }
  return result;
}

// base^k for an integer |k| <= 15.
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t integer_power(acc_t base, int exponent) {
  const acc_t result = integer_power_magnitude(base, exponent);
  return exponent < 0 ? acc_t(1) / result : result;
}

// The normalization λ − μ of a row of shifted activations a = x − max x (a <= 0), the authors'
// compute_normalization with exactly num_iters steps, for t2 ≠ 1:
//   t2 > 1: fixed point â ← a·Z(â)^(1−t2), Z = Σ exp_t(â), from â = a; then λ − μ = −log_t(1/Z)
//   t2 < 1: bisection on [0, −log_t(1/d)] with d = #{a > −1/(1−t2)}, keeping Σ exp_t(a − mid) >= 1 left
// partition(scale, shift) = Σ_c exp_t(a_c·scale − shift), count_in_support() = d: each one sweep over the row (in
// cache), with no writes.
template <typename acc_t, typename Partition, typename CountInSupport>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double tempered_normalization_steps(const BiTemperedParams<acc_t>& prm,
                                                                          const Partition& partition,
                                                                          const CountInSupport& count_in_support) {
  const acc_t one_minus_t = prm.one_minus_t2;
  const acc_t inv_one_minus_t = prm.inv_one_minus_t2;
  if (prm.t2 > 1.0) {
    acc_t scale = 1;
    for (int it = 0; it < prm.num_iters; ++it) scale = power(partition(scale, acc_t(0)), one_minus_t);
    const acc_t z = partition(scale, acc_t(0));
    // −log_t(1/Z) = −(Z^(t−1) − 1)/(1 − t)
    return -(power(z, -one_minus_t) - acc_t(1)) * inv_one_minus_t;
  }
  acc_t lower = 0;
  acc_t upper = -(power(count_in_support(), -one_minus_t) - acc_t(1)) * inv_one_minus_t;
  for (int it = 0; it < prm.num_iters; ++it) {
    const acc_t middle = (upper + lower) / acc_t(2);
    const bool below_one = partition(acc_t(1), middle) < acc_t(1);
    lower = below_one ? lower : middle;
    upper = below_one ? middle : upper;
  }
  return (upper + lower) / acc_t(2);
}

// tempered_normalization_steps with one element at a time (t2 = 1: log Σ exp(a)).
template <typename acc_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double tempered_normalization(const acc_t* a, const BiTemperedParams<acc_t>& prm) {
  const int64_t C = prm.num_classes;
  const acc_t one_minus_t = prm.one_minus_t2;
  if (one_minus_t == acc_t(0)) {
    // In float64: p = exp(a − λ) is formed in float64 too, and a float32 λ of magnitude ~log C would
    // put an error of its ulp on every probability.
    double sum = 0;
    FUSEDLOSS_SIMD_SUM(sum)
    for (int64_t c = 0; c < C; ++c) sum += fast_exp(static_cast<double>(a[c]));
    return log(sum);
  }
  const acc_t inv_one_minus_t = prm.inv_one_minus_t2;
  const int k = prm.integer_exponent;
  auto partition = [&](acc_t scale, acc_t shift) FUSEDLOSS_LAMBDA_INLINE {
    acc_t sum = 0;
    if (k != 0) {
      FUSEDLOSS_SIMD_SUM(sum)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t base = acc_t(1) + one_minus_t * (a[c] * scale - shift);
        sum += integer_power(base < acc_t(0) ? acc_t(0) : base, k);
      }
    } else {
      FUSEDLOSS_SIMD_SUM(sum)
      for (int64_t c = 0; c < C; ++c)
        sum += fast_exp(log_exp_t(a[c] * scale - shift, one_minus_t, inv_one_minus_t));
    }
    return sum;
  };
  auto count_in_support = [&]() FUSEDLOSS_LAMBDA_INLINE {
    const acc_t support = -inv_one_minus_t;
    acc_t count = 0;
    FUSEDLOSS_SIMD_SUM(count)
    for (int64_t c = 0; c < C; ++c) count += a[c] > support ? acc_t(1) : acc_t(0);
    return count;
  };
  return tempered_normalization_steps(prm, partition, count_in_support);
}

#ifndef __CUDA_ARCH__
// bi_tempered_target_term on a double (I = int64_t) or on a GCC vector of doubles (I = its int64 twin).
template <typename F, typename I>
FUSEDLOSS_INLINE F bi_tempered_target_term_lanes(F q, double t1) {
  const double one_minus_t1 = 1.0 - t1;
  const F log_q = log_double_lanes<F, I>(q + 1e-10);
  const F log_t_q = one_minus_t1 == 0.0 ? log_q : (exp_double_lanes<F, I>(one_minus_t1 * log_q) - 1.0) / one_minus_t1;
  return q * log_t_q - exp_double_lanes<F, I>((2.0 - t1) * log_double_lanes<F, I>(q)) / (2.0 - t1);
}
#endif

// The target side of one bi-tempered row: the q-only part of the loss,
// A(q) = q·log_t(q + 1e-10, t1) − q^(2−t1)/(2 − t1).
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double bi_tempered_target_term(double q, double t1) {
#ifdef __CUDA_ARCH__
  const double one_minus_t1 = 1.0 - t1;
  const double log_q = fast_log(q + 1e-10);
  const double log_t_q = one_minus_t1 == 0.0 ? log_q : log_t_from_log(log_q, one_minus_t1);
  return q * log_t_q - power(q, 2.0 - t1) / (2.0 - t1);
#else
  return bi_tempered_target_term_lanes<double, int64_t>(q, t1);
#endif
}

// One row of the bi-tempered loss and, with grad, the authors' closed-form gradient times
// grad_scale. labels.q(c) gives q_c, labels.term(c) gives A(q_c), both in float64. shifted holds C
// values, sweep 2·C. With p = exp_t(a − λ, t2) formed as exp(L), L = log p:
//   l  = Σ_c [A(q_c) − q_c·log_t(p_c, t1) + p_c^(2−t1)/(2 − t1)]
//   f  = (p − q)·p^(t2−t1),  e = p^t2 / Σ p^t2,  dl/dx = f − e·Σ_c f_c
// t1 = t2 = 1 is softmax cross entropy: l = Σ_c q_c (lse − x_c), dl/dx = p·Σq − q.
// The normalization runs in acc_t; the last sweep in float64: every power of p is exp(k·L), and a
// float32 k·L of magnitude ~15 (p ~ 1/C) would leave p^t2 about 16 ulps off, several times less
// accurate than torch's float32 pow.
template <typename acc_t, typename scalar_t, typename Labels>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double bi_tempered_row(const scalar_t* x, const Labels& labels, const BiTemperedParams<acc_t>& prm,
                                             acc_t* shifted, double* sweep, scalar_t* grad, double grad_scale) {
  const int64_t C = prm.num_classes;
  acc_t* a = shifted;
  acc_t row_max = Limits<acc_t>::large_negative;
  for (int64_t c = 0; c < C; ++c) {
    a[c] = static_cast<acc_t>(x[c]);
    row_max = max_of(row_max, a[c]);
  }
  for (int64_t c = 0; c < C; ++c) a[c] -= row_max;
  const double t1 = prm.t1;
  const double t2 = prm.t2;
  const double one_minus_t1 = 1.0 - t1;
  const double one_minus_t2 = 1.0 - t2;
  const double lambda = tempered_normalization(a, prm);
  double loss = 0;
  if (one_minus_t1 == 0.0 && one_minus_t2 == 0.0) {
    double label_sum = 0;
    FUSEDLOSS_SIMD_SUM(loss, label_sum)
    for (int64_t c = 0; c < C; ++c) {
      const double q = labels.q(c);
      loss += q * (lambda - static_cast<double>(a[c]));
      label_sum += q;
    }
    if (grad != nullptr) {
      for (int64_t c = 0; c < C; ++c)
        grad[c] = static_cast<scalar_t>((fast_exp(static_cast<double>(a[c]) - lambda) * label_sum - labels.q(c)) *
                                        grad_scale);
    }
    return loss;
  }
  const double inv_one_minus_t2 = one_minus_t2 == 0.0 ? 0.0 : 1.0 / one_minus_t2;
  const double inv_one_minus_t1 = one_minus_t1 == 0.0 ? 0.0 : 1.0 / one_minus_t1;
  const double inv_two_minus_t1 = 1.0 / (2.0 - t1);
  double* forgotten = sweep;
  double* escort = sweep + C;
  double escort_sum = 0;
  double forgotten_sum = 0;
  // Adds class c given p, p^(1−t1), p^(t2−t1), p^t2.
  auto add_class = [&](int64_t c, double p, double p_one_minus_t1, double p_t2_minus_t1,
                       double p_t2) FUSEDLOSS_LAMBDA_INLINE {
    const double q = labels.q(c);
    const double log_t_p = (p_one_minus_t1 - 1.0) * inv_one_minus_t1;
    forgotten[c] = (p - q) * p_t2_minus_t1;
    escort[c] = p_t2;
    return labels.term(c) - q * log_t_p + p * p_one_minus_t1 * inv_two_minus_t1;
  };
  if (prm.power_denominator != 0) {
    const double inv_denominator = 1.0 / prm.power_denominator;
    const int* n = prm.power_numerators;
    FUSEDLOSS_SIMD_SUM(loss)
    for (int64_t c = 0; c < C; ++c) {
      const double b = 1.0 + one_minus_t2 * (static_cast<double>(a[c]) - lambda);
      const double base = b < 0.0 ? 0.0 : b;
      const double r = prm.power_denominator == 1 ? base : fast_exp(fast_log(base) * inv_denominator);
      const double r_inv = 1.0 / r;
      auto r_power = [&](int e) FUSEDLOSS_LAMBDA_INLINE { return integer_power_magnitude(e < 0 ? r_inv : r, e); };
      loss += add_class(c, r_power(n[0]), r_power(n[1]), r_power(n[2]), r_power(n[3]));
    }
  } else {
    FUSEDLOSS_SIMD_SUM(loss)
    for (int64_t c = 0; c < C; ++c) {
      const double u = static_cast<double>(a[c]) - lambda;
      const double log_p = one_minus_t2 == 0.0 ? u : log_exp_t(u, one_minus_t2, inv_one_minus_t2);
      const double p = fast_exp(log_p);
      const double p_one_minus_t1 = fast_exp(one_minus_t1 * log_p);
      if (one_minus_t1 == 0.0) {  // t1 = 1: log_t is log
        const double q = labels.q(c);
        forgotten[c] = (p - q) * fast_exp((t2 - t1) * log_p);
        escort[c] = fast_exp(t2 * log_p);
        loss += labels.term(c) - q * log_p + p * p_one_minus_t1 * inv_two_minus_t1;
      } else {
        loss += add_class(c, p, p_one_minus_t1, fast_exp((t2 - t1) * log_p), fast_exp(t2 * log_p));
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    forgotten_sum += forgotten[c];
    escort_sum += escort[c];
  }
  if (grad != nullptr) {
    const double shift = forgotten_sum / escort_sum;
    for (int64_t c = 0; c < C; ++c)
      grad[c] = static_cast<scalar_t>((forgotten[c] - escort[c] * shift) * grad_scale);
  }
  return loss;
}

#ifndef __CUDACC__
// ---------------------------------------------------------------------------------------------
// Bi-tempered logistic loss on vector lanes, float32 compute (float32, float16, bfloat16 input): the CPU kernels'
// AVX-512 variant (csrc/cpu/isa.h, run_wide). The sweeps of bi_tempered_row, written for the registers: the
// normalization's on 16 float lanes, eight vectors side by side (FUSEDLOSS_EACH: each exp_t is a chain of a dozen
// dependent operations), the last one on 8 double lanes, four side by side. The compiler's loops ran the
// normalization one element at a time (an integer power with a branch per bit): each of its sweeps cost about 4
// cycles an element.
// ---------------------------------------------------------------------------------------------

typedef FloatLanes<16>::type Floats16;
typedef FloatLanes<16>::int_type Ints16;
typedef DoubleLanes<8>::type Doubles8;
typedef DoubleLanes<8>::int_type Longs8;

// The floats a row of C classes takes in the lanes buffers (bi_tempered_row_lanes' shifted; sweep takes twice as
// many doubles): C rounded up to a multiple of 32, the last sweep's step (four vectors of 8 doubles).
inline int64_t bi_tempered_padded_classes(int64_t C) { return (C + 31) / 32 * 32; }

// The number of vectors in an array of them (term's argument below).
template <typename Array>
constexpr int vector_count = std::extent<std::remove_reference_t<Array>>::value;

// Σ_c term(a_c) for a row of C floats padded to whole vectors: term maps an array of up to 8 vectors in place
// (step by step across them); lanes at or past C count 0.
template <typename Term>
FUSEDLOSS_INLINE float sum_row_lanes16(const float* a, int64_t C, const Term& term) {
  constexpr int K = 8;
  Floats16 acc[K] = {};
  const int64_t vectors = (C + 15) / 16;
  int64_t v = 0;
  auto step = [&](auto count) FUSEDLOSS_LAMBDA_INLINE {
    constexpr int N = decltype(count)::value;
    Floats16 x[N];
    FUSEDLOSS_EACH(i, N) x[i] = softmax_loss::load_lanes<16>(a + 16 * (v + i));
    term(x);
    if (v + N == vectors) x[N - 1] = softmax_loss::lanes_below<16>(C - 16 * (v + N - 1)) ? x[N - 1] : Floats16{};
    FUSEDLOSS_EACH(i, N) acc[i] += x[i];
    v += N;
  };
  while (v + K <= vectors) step(std::integral_constant<int, K>());
  const int64_t rest = vectors - v;  // the last K − 1 at most
  if constexpr (K > 4) if ((rest & 4) != 0) step(std::integral_constant<int, 4>());
  if ((rest & 2) != 0) step(std::integral_constant<int, 2>());
  if ((rest & 1) != 0) step(std::integral_constant<int, 1>());
  for (int i = 1; i < K; ++i) acc[0] += acc[i];
  return softmax_loss::reduce_lanes<false, 16>(acc[0]);
}

// tempered_normalization on 16 float lanes (t2 = 1: tempered_normalization itself).
FUSEDLOSS_INLINE double tempered_normalization_lanes(const float* a, const BiTemperedParams<float>& prm) {
  const float one_minus_t = prm.one_minus_t2;
  if (one_minus_t == 0.0f) return tempered_normalization(a, prm);
  const float inv_one_minus_t = prm.inv_one_minus_t2;
  const int64_t C = prm.num_classes;
  const int k = prm.integer_exponent;
  const int magnitude = k < 0 ? -k : k;
  auto partition = [&](float scale, float shift) FUSEDLOSS_LAMBDA_INLINE {
    return sum_row_lanes16(a, C, [&](auto& x) FUSEDLOSS_LAMBDA_INLINE {
      constexpr int N = vector_count<decltype(x)>;
      FUSEDLOSS_EACH(i, N) x[i] = 1.0f + one_minus_t * (x[i] * scale - shift);
      if (k != 0) {  // base^k by squaring, as integer_power (the same products in the same order)
        FUSEDLOSS_EACH(i, N) x[i] = x[i] < 0.0f ? Floats16{} : x[i];
        Floats16 result[N];
        FUSEDLOSS_EACH(i, N) result[i] = Floats16{} + 1.0f;
        for (int m = magnitude;; m >>= 1) {
          if ((m & 1) != 0) FUSEDLOSS_EACH(i, N) result[i] *= x[i];
          if (m <= 1) break;
          FUSEDLOSS_EACH(i, N) x[i] *= x[i];
        }
        FUSEDLOSS_EACH(i, N) x[i] = k < 0 ? 1.0f / result[i] : result[i];
      } else {
        // exp(log(base)/(1 − t)), at most 0 (base <= 1 for t < 1, >= 1 for t > 1). A base below FLT_MIN (t < 1)
        // taken as FLT_MIN: its log times 1/(1 − t) > 1 is below the exp's underflow bound, exp gives 0 (the
        // log's tests for zero, negative and subnormal input are then left out).
        FUSEDLOSS_EACH(i, N) {
          x[i] = x[i] < 1.17549435e-38f ? Floats16{} + 1.17549435e-38f : x[i];
          x[i] = log_float_lanes<Floats16, Ints16, true>(x[i]) * inv_one_minus_t;
        }
        fast_exp_nonpositive_lanes_each<16, N>(x);
      }
    });
  };
  auto count_in_support = [&]() FUSEDLOSS_LAMBDA_INLINE {
    const float support = -inv_one_minus_t;
    return sum_row_lanes16(a, C, [&](auto& x) FUSEDLOSS_LAMBDA_INLINE {
      FUSEDLOSS_EACH(i, vector_count<decltype(x)>) x[i] = x[i] > support ? Floats16{} + 1.0f : Floats16{};
    });
  };
  return tempered_normalization_steps(prm, partition, count_in_support);
}

// 8 floats as 8 doubles.
FUSEDLOSS_INLINE Doubles8 load_doubles8(const float* p) {
  typedef float Floats8 __attribute__((vector_size(32)));
  Floats8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, Doubles8);
}

FUSEDLOSS_INLINE double sum_doubles8(Doubles8 v) {
  double lanes[8];
  std::memcpy(lanes, &v, sizeof(lanes));
  return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

// bi_tempered_row on vector lanes (float32 compute, acc_t = float). shifted holds
// bi_tempered_padded_classes(C) floats, sweep twice as many doubles. labels.lanes(c0, q, term) gives q_c and A(q_c)
// of classes c0 .. c0 + 7 as Doubles8 (any finite values past C; nothing read there).
template <typename scalar_t, typename Labels>
FUSEDLOSS_INLINE double bi_tempered_row_lanes(const scalar_t* x, const Labels& labels,
                                              const BiTemperedParams<float>& prm, float* shifted, double* sweep,
                                              scalar_t* grad, double grad_scale) {
  const int64_t C = prm.num_classes;
  const double t1 = prm.t1;
  const double t2 = prm.t2;
  if (t1 == 1.0 && t2 == 1.0) return bi_tempered_row(x, labels, prm, shifted, sweep, grad, grad_scale);
  const int64_t padded = bi_tempered_padded_classes(C);
  float* a = shifted;
  for (int64_t c = 0; c < C; ++c) a[c] = static_cast<float>(x[c]);
  const float row_max = softmax_loss::block_max_lanes<16>(a, C);
  for (int64_t c = 0; c < C; ++c) a[c] -= row_max;
  for (int64_t c = C; c < padded; ++c) a[c] = 0.0f;
  const double lambda = tempered_normalization_lanes(a, prm);

  const double one_minus_t1 = 1.0 - t1;
  const double one_minus_t2 = 1.0 - t2;
  const double inv_one_minus_t2 = one_minus_t2 == 0.0 ? 0.0 : 1.0 / one_minus_t2;
  const double inv_one_minus_t1 = one_minus_t1 == 0.0 ? 0.0 : 1.0 / one_minus_t1;
  const double inv_two_minus_t1 = 1.0 / (2.0 - t1);
  const int denominator = prm.power_denominator;
  const double inv_denominator = denominator == 0 ? 0.0 : 1.0 / denominator;
  const int* n = prm.power_numerators;
  const bool any_negative = n[0] < 0 || n[1] < 0 || n[2] < 0 || n[3] < 0;
  const bool any_positive = n[0] > 0 || n[1] > 0 || n[2] > 0 || n[3] > 0;
  double* forgotten = sweep;
  double* escort = sweep + padded;
  constexpr int K = 4;  // 8-double vectors side by side (the padded row holds a multiple of 32 floats)
  Doubles8 loss[K] = {}, forgotten_sum[K] = {}, escort_sum[K] = {};
  for (int64_t c = 0; c < padded; c += 8 * K) {
    Doubles8 u[K], q[K], term[K], p[K], p_one_minus_t1[K], p_t2_minus_t1[K], p_t2[K], log_t_p[K];
    FUSEDLOSS_EACH(i, K) {
      u[i] = load_doubles8(a + c + 8 * i) - lambda;
      labels.lanes(c + 8 * i, q[i], term[i]);
    }
    if (denominator != 0) {
      // p, p^(1−t1), p^(t2−t1), p^t2 as integer powers of r = b^(1/D) (BiTemperedParams): the squares r^(2^j)
      // (and of 1/r) once, for the four; each power their product in the order of integer_power_magnitude.
      Doubles8 up[K][4], down[K][4];
      FUSEDLOSS_EACH(i, K) {
        const Doubles8 b = 1.0 + one_minus_t2 * u[i];
        const Doubles8 base = b < 0.0 ? Doubles8{} : b;
        if (denominator == 1) {
          up[i][0] = base;
          if (any_negative) down[i][0] = 1.0 / base;
        } else if (!any_positive) {
          // 1/r as exp(−log(b)/D) where no power needs r: every numerator is negative (t2 > 1, t1 < 1), and then
          // b = 1 + (1 − t2)(a − λ) >= 1 (a <= 0 <= λ): the log's tests for zero and subnormal b left out.
          const Doubles8 normal = b < 2.2250738585072014e-308 ? Doubles8{} + 2.2250738585072014e-308 : b;
          down[i][0] = exp_double_lanes<Doubles8, Longs8>(-log_double_lanes<Doubles8, Longs8, true>(normal) *
                                                          inv_denominator);
        } else {
          const Doubles8 log_r = log_double_lanes<Doubles8, Longs8>(base) * inv_denominator;
          up[i][0] = exp_double_lanes<Doubles8, Longs8>(log_r);
          if (any_negative) down[i][0] = 1.0 / up[i][0];
        }
      }
      for (int j = 1; j < 4; ++j) {
        FUSEDLOSS_EACH(i, K) {
          if (any_positive) up[i][j] = up[i][j - 1] * up[i][j - 1];
          if (any_negative) down[i][j] = down[i][j - 1] * down[i][j - 1];
        }
      }
      auto r_power = [&](int i, int e) FUSEDLOSS_LAMBDA_INLINE {
        const Doubles8* square = e < 0 ? down[i] : up[i];
        const int m = e < 0 ? -e : e;
        Doubles8 result = Doubles8{} + 1.0;
        for (int j = 0; j < 4; ++j)
          if (((m >> j) & 1) != 0) result *= square[j];
        return result;
      };
      FUSEDLOSS_EACH(i, K) {
        p[i] = r_power(i, n[0]);
        p_one_minus_t1[i] = r_power(i, n[1]);
        p_t2_minus_t1[i] = r_power(i, n[2]);
        p_t2[i] = r_power(i, n[3]);
        log_t_p[i] = (p_one_minus_t1[i] - 1.0) * inv_one_minus_t1;
      }
    } else {
      FUSEDLOSS_EACH(i, K) {
        const Doubles8 b = 1.0 + one_minus_t2 * u[i];
        const Doubles8 log_p =
            one_minus_t2 == 0.0 ? u[i] : log_double_lanes<Doubles8, Longs8>(b < 0.0 ? Doubles8{} : b) * inv_one_minus_t2;
        p[i] = exp_double_lanes<Doubles8, Longs8>(log_p);
        p_one_minus_t1[i] = exp_double_lanes<Doubles8, Longs8>(one_minus_t1 * log_p);
        p_t2_minus_t1[i] = exp_double_lanes<Doubles8, Longs8>((t2 - t1) * log_p);
        p_t2[i] = exp_double_lanes<Doubles8, Longs8>(t2 * log_p);
        log_t_p[i] = one_minus_t1 == 0.0 ? log_p : (p_one_minus_t1[i] - 1.0) * inv_one_minus_t1;
      }
    }
    FUSEDLOSS_EACH(i, K) {
      const int64_t c0 = c + 8 * i;
      const Doubles8 f = (p[i] - q[i]) * p_t2_minus_t1[i];
      const Doubles8 l = term[i] - q[i] * log_t_p[i] + p[i] * p_one_minus_t1[i] * inv_two_minus_t1;
      std::memcpy(forgotten + c0, &f, sizeof(f));
      std::memcpy(escort + c0, &p_t2[i], sizeof(f));
      Longs8 index;
      for (int k = 0; k < 8; ++k) index[k] = c0 + k;
      const Longs8 real = index < C;
      loss[i] += real ? l : Doubles8{};
      forgotten_sum[i] += real ? f : Doubles8{};
      escort_sum[i] += real ? p_t2[i] : Doubles8{};
    }
  }
  for (int i = 1; i < K; ++i) {
    loss[0] += loss[i];
    forgotten_sum[0] += forgotten_sum[i];
    escort_sum[0] += escort_sum[i];
  }
  if (grad != nullptr) {
    const double shift = sum_doubles8(forgotten_sum[0]) / sum_doubles8(escort_sum[0]);
    for (int64_t c = 0; c < C; ++c) grad[c] = static_cast<scalar_t>((forgotten[c] - escort[c] * shift) * grad_scale);
  }
  return sum_doubles8(loss[0]);
}
#endif

}  // namespace sigmoid_loss
}  // namespace fusedloss
