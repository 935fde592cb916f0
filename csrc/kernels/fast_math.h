// exp and log that loops vectorize, shared by every family's kernels (softmax, sigmoid, CRF): branch-free
// Cephes algorithms with about 1 ulp of error in float32 and float64, no library calls on the host (a call per
// element keeps a loop scalar); CUDA's own functions on the device. Torch-free, host and device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/common.h"

namespace fusedloss {

#ifndef __CUDA_ARCH__
FUSEDLOSS_INLINE int32_t float_bits(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

FUSEDLOSS_INLINE float bits_float(int32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

FUSEDLOSS_INLINE int64_t double_bits(double v) {
  int64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

FUSEDLOSS_INLINE double bits_double(int64_t bits) {
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
#endif

#ifndef __CUDA_ARCH__
// The bits of v as a To of the same size (scalars or vectors).
template <typename To, typename From>
FUSEDLOSS_INLINE To bit_cast_to(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_to: sizes differ");
  To to;
  std::memcpy(&to, &v, sizeof(to));
  return to;
}

// e^r − 1 for |r| ≤ ln2/2 as r + r²·P(r), Cephes' expf polynomial (about 1 ulp, no cancellation near 0).
template <typename F>
FUSEDLOSS_INLINE F expm1_reduced(F r) {
  F poly = F{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  return poly * r * r + r;
}

// fast_exp's float32 algorithm on a float (I = int32_t) or on a GCC vector of floats (I = its int32 twin).
// kNonPositive: the caller passes x ≤ 0 or NaN (s − max of a softmax), so the clamp from above is left out.
template <typename F, typename I, bool kNonPositive = false>
FUSEDLOSS_INLINE F exp_float_lanes(F x) {
  const F hi = F{} + 88.3762626647949f;
  const F lo = F{} + -87.3365478515625f;
  const auto underflow = x < lo;
  if (!kNonPositive) x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const F magic = F{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const F shifted = x * 1.44269504088896341f + magic;
  const F n = shifted - magic;
  const I n_int = bit_cast_to<I>(shifted) - bit_cast_to<I>(magic);
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const F exp_r = expm1_reduced(r) + 1.0f;
  // Computed unconditionally, then selected: a conditional multiply would keep the compiler from
  // vectorizing (it may not speculate a floating-point operation under -ftrapping-math).
  const F result = exp_r * bit_cast_to<F>((n_int + 127) << 23);
  return underflow ? F{} : result;
}

// fast_expm1's float32 algorithm on a float or a GCC vector of floats (I as for log_float_lanes).
template <typename F, typename I>
FUSEDLOSS_INLINE F expm1_float_lanes(F x) {
  const F near_zero = expm1_reduced(x);
  const F far = exp_float_lanes<F, I>(x) - 1.0f;
  return (x > -0.34657359f) & (x < 0.34657359f) ? near_zero : far;
}

#endif

#ifndef __CUDACC__
// GCC vectors of W floats (W = 8 or 16) and their int32 twins, for host loops written lane by lane: the CPU
// kernels' AVX-512 variant (csrc/cpu/isa.h) runs them with W = 16 (one register), the AVX2 and baseline variants
// with W = 8 (one AVX register, two SSE ones): a width the variant has no comparison for is lowered to scalar code.
// Not under nvcc, whose host pass does not take every GCC vector operation.
template <int W>
struct FloatLanes;
template <>
struct FloatLanes<8> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t int_type __attribute__((vector_size(32)));
};
template <>
struct FloatLanes<16> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t int_type __attribute__((vector_size(64)));
};

// GCC vectors of W doubles (W = 8: one AVX-512 register) and their int64 twins.
template <int W>
struct DoubleLanes;
template <>
struct DoubleLanes<8> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t int_type __attribute__((vector_size(64)));
};

// exp of W floats x ≤ 0 (or NaN) at once. kPermute: the code is compiled for an ISA with a variable permute of W
// floats (vpermps: AVX2 for 8 lanes, AVX-512 for 16), which the table algorithm below needs; W = 16 always has it.
// Without it: fast_exp lane by lane, the same bits, without its clamp from above (the softmax sweeps pass
// s − max). The caller chooses: the ISA variants of the CPU kernels are compiled from the same source
// (csrc/cpu/isa.h), so nothing inside a function can tell AVX2 from the baseline.
// kZeroUnderflow = false (the table algorithm only): inputs below −87.3365 give e^−87.3365 (about 2^−126, a normal
// number) instead of 0, one operation fewer per vector in AVX2 and AVX-512; for sums that also hold an e^0 = 1
// (a softmax's Σ exp(s − max)), next to which 2^−126 is lost in the rounding (1 + 2^−126 rounds to 1).
template <int W, bool kPermute = (W == 16), bool kZeroUnderflow = true>
FUSEDLOSS_INLINE typename FloatLanes<W>::type fast_exp_nonpositive_lanes(typename FloatLanes<W>::type x);

// Each step of a computation on K independent vectors, done for all K before the next step (the loop unrolled):
// K chains of dependent operations side by side in the instruction stream. Where each element is a long chain (the
// logistic losses: exp, log1p, a division), one vector after another ran at about one operation per cycle, the
// CPU's out-of-order window full of operations waiting on their own chain: the 4096 x 80 BCE loop ran 1.3x faster
// with four vectors side by side. (The softmax tiles' exps, already many to a tile, did not gain.)
#define FUSEDLOSS_EACH(k, K) _Pragma("GCC unroll 16") for (int k = 0; k < (K); ++k)

// The table exp's constants for W lanes: a table of W entries 2^(j/W) (one vector), each entry's rounding
// (2^(j/W) − table_j) / table_j, W/ln2, and ln2/W in two parts (k times the first is exact for |k| ≤ 2016).
template <int W>
struct ExpTable;
template <>
struct ExpTable<16> {
  typedef FloatLanes<16>::type F;
  static constexpr float kScale = 23.083120346069336f, kLn2High = 0.0433197021484375f,
                         kLn2Low = 1.9966364561696537e-06f;
  static constexpr int kShift = 4;
  FUSEDLOSS_INLINE static F table() {
    return F{1.0f,         1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
             1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f,
             1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f,
             1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f};
  }
  FUSEDLOSS_INLINE static F error() {
    return F{0.0f,          4.6285471455576044e-08f, -1.199215748926008e-08f, 4.7297824323777604e-08f,
             3.1934181521364735e-08f, 3.621057231839586e-08f, -3.0990719324108795e-08f, -7.475213337215791e-09f,
             1.7114270889351246e-08f, -3.047683350132502e-08f, 5.233334210430485e-09f, 6.10759176566944e-09f,
             -1.4719605090363075e-08f, -5.258795177098818e-09f, -6.128259677495862e-09f, 5.140609271592211e-09f};
  }
};
template <>
struct ExpTable<8> {
  typedef FloatLanes<8>::type F;
  static constexpr float kScale = 11.541560327111707f, kLn2High = 0.086639404296875f,
                         kLn2Low = 3.9932729123393074e-06f;
  static constexpr int kShift = 3;
  FUSEDLOSS_INLINE static F table() {
    return F{1.0f,         1.0905077457427979f, 1.1892070770263672f, 1.2968395948410034f,
             1.4142135381698608f, 1.5422108173370361f, 1.6817928552627563f, 1.8340080976486206f};
  }
  FUSEDLOSS_INLINE static F error() {
    return F{0.0f,          -1.199215748926008e-08f, 3.1934181521364735e-08f, -3.0990719324108795e-08f,
             1.7114270889351246e-08f, 5.233334210430485e-09f, -1.4719605090363075e-08f, -6.128259677495862e-09f};
  }
};

// fast_exp_nonpositive_lanes<W, kPermute, kZeroUnderflow> of K vectors in place, step by step across them
// (FUSEDLOSS_EACH): the same bits as K separate calls.
template <int W, int K, bool kPermute = (W == 16), bool kZeroUnderflow = true>
FUSEDLOSS_INLINE void fast_exp_nonpositive_lanes_each(typename FloatLanes<W>::type (&x)[K]) {
  if constexpr (W != 16 && !kPermute) {
    typedef typename FloatLanes<W>::type F;
    typedef typename FloatLanes<W>::int_type I;
    FUSEDLOSS_EACH(i, K) x[i] = exp_float_lanes<F, I, true>(x[i]);
  } else {
    // The table exp: 7 (16 lanes) or 8 (8 lanes) multiplies or multiply-adds where Cephes' has 11 (the softmax
    // sweeps' exps are bound by the two multiply-add ports). x = (Wn + j)·ln2/W + r with j in [0, W) and
    // |r| ≤ ln2/(2W); e^x = 2^n · 2^(j/W) · (1 + q), 2^(j/W) from a table of W (one vpermps: the index is the
    // low bits of the rounded Wx/ln2, which the 1.5·2^23 trick leaves in the float's low bits), 2^n added to the
    // table entry's exponent bits (n ≥ −126 above the underflow bound: always a normal number), q = e^r − 1 as
    // r + r²(c2 + c3·r) (16 lanes: fitted on |r| ≤ ln2/32, relative error 2e-9) or r + r²(1/2 + r/6 + r²/24)
    // (8 lanes: |r| ≤ ln2/16, error below r⁵/120 = 1.3e-9), plus the table entry's rounding error (a second
    // table). Within 1 ulp: the last multiply-add's rounding and little else (the C++ tests bound it).
    // Inputs below −87.3365 give 0, as fast_exp; NaN propagates through q (the exponent bits added to a NaN's
    // table entry are whatever they are, the product with q is NaN).
    typedef ExpTable<W> T;
    typedef typename FloatLanes<W>::type F;
    typedef typename FloatLanes<W>::int_type I;
    typedef uint32_t U __attribute__((vector_size(4 * W)));
    // Just above −126·ln2 (−87.33654475): from there on, 2^n · 2^(j/W) · (1 + q) ≥ 2^−126 · e^(r ≥ 0).
    const F lo = F{} + -87.3365f;
    const F magic = F{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer, kept in the low bits
    const F table = T::table(), table_error = T::error();
    I underflow[K];
    F shifted[K], k[K], r[K], scaled[K], q[K];
    U bits[K];
    if constexpr (kZeroUnderflow) FUSEDLOSS_EACH(i, K) underflow[i] = x[i] < lo;
    if constexpr (W == 8 || !kZeroUnderflow) {
      // 8 lanes (the AVX2 variant), or no underflow mask: the clamp compiled as vmaxps (lo > x ? lo : x is its
      // exact semantics, NaN included). Against the constant lo, GCC reused the underflow compare's mask for a
      // blend instead (8 lanes: vblendvps, which runs one a cycle on the Intel Xeon VM where vmaxps runs two); the
      // empty asm hides that floor is lo (a store and a load per call, on the memory ports). Measured there, one
      // thread, the same bits: the AVX2 variant 4-8% faster at 1024 classes under no_grad, 5-15% at 37 to 133
      // with the gradient.
      F floor = lo;
      __asm__("" : "+m"(floor));
      FUSEDLOSS_EACH(i, K) x[i] = floor > x[i] ? floor : x[i];
    } else {
      FUSEDLOSS_EACH(i, K) x[i] = underflow[i] ? lo : x[i];
    }
    FUSEDLOSS_EACH(i, K) shifted[i] = x[i] * T::kScale + magic;
    FUSEDLOSS_EACH(i, K) k[i] = shifted[i] - magic;  // Wn + j, in [−126W, 0]
    FUSEDLOSS_EACH(i, K) r[i] = x[i] - k[i] * T::kLn2High;
    FUSEDLOSS_EACH(i, K) r[i] = r[i] - k[i] * T::kLn2Low;
    // 0x4B400000 + k, k = Wn + j: the low kShift bits are j. bits << (23 − kShift) is n << 23 (the exponent of 2^n,
    // as the product's bits need it) plus j << (23 − kShift) (0x4B400000's bits shift out), so the table holds each
    // entry's bits less j << (23 − kShift): its entry plus that shifted value is 2^n · 2^(j/W) exactly, in one shift
    // and one add (a right shift, a left shift and an add took one operation more per vector).
    FUSEDLOSS_EACH(i, K) bits[i] = bit_cast_to<U>(shifted[i]);
    I index;
    for (int j = 0; j < W; ++j) index[j] = j;
    const U table_less_j = bit_cast_to<U>(bit_cast_to<I>(table) - (index << (23 - T::kShift)));
    // The table index j is the low kShift bits of bits: __builtin_shuffle takes its index modulo W, which vpermps
    // does by itself (it reads only those bits), so bits goes in as it is (a masked index cost one more operation
    // per vector).
    FUSEDLOSS_EACH(i, K) {
      scaled[i] = bit_cast_to<F>(__builtin_shuffle(table_less_j, bits[i]) + (bits[i] << (23 - T::kShift)));
    }
    if constexpr (W == 16) {
      FUSEDLOSS_EACH(i, K) q[i] = (r[i] * 0.1666698008775711f + 0.5000184774398804f) * (r[i] * r[i]) +
                                  (r[i] + __builtin_shuffle(table_error, bits[i]));
    } else {
      FUSEDLOSS_EACH(i, K) q[i] = ((r[i] * 0.0416666679f + 0.166666672f) * r[i] + 0.5f) * (r[i] * r[i]) +
                                  (r[i] + __builtin_shuffle(table_error, bits[i]));
    }
    FUSEDLOSS_EACH(i, K) x[i] = scaled[i] * q[i] + scaled[i];
    if constexpr (kZeroUnderflow) FUSEDLOSS_EACH(i, K) x[i] = underflow[i] ? F{} : x[i];
  }
}

template <int W, bool kPermute, bool kZeroUnderflow>
FUSEDLOSS_INLINE typename FloatLanes<W>::type fast_exp_nonpositive_lanes(typename FloatLanes<W>::type x) {
  typename FloatLanes<W>::type one[1] = {x};
  fast_exp_nonpositive_lanes_each<W, 1, kPermute, kZeroUnderflow>(one);
  return one[0];
}
#endif

// exp(x) in float32 with about 1 ulp of error, branch-free so that a loop over it vectorizes
// (std::exp does not: it is a library call). Cephes' expf: x = n·ln2 + r with |r| ≤ ln2/2
// (n rounded with the 1.5·2^23 trick, since SSE2 has no round instruction), a degree-6 polynomial
// for e^r, and 2^n built in the exponent bits. NaN propagates (the clamps are written so that a
// NaN compares false and passes through); inputs below −87.3 give 0 instead of a subnormal, and
// inputs above 88.37 are clamped (callers pass s − max ≤ 0).
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  return exp_float_lanes<float, int32_t>(x);
#endif
}

// expm1(x) = e^x − 1 in float32, branch-free so that a loop over it vectorizes (the focal factor 1 − p =
// −expm1(log p) of a tile of rows): expm1_reduced for |x| ≤ ln2/2, e^x − 1 beyond (|e^x − 1| > 0.29 there: at
// most 3 ulp, no cancellation). NaN propagates; x ≥ 88.4 gives about FLT_MAX, not inf (fast_exp's clamp).
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE float fast_expm1(float x) {
#ifdef __CUDA_ARCH__
  return ::expm1f(x);
#else
  return expm1_float_lanes<float, int32_t>(x);
#endif
}

#ifndef __CUDA_ARCH__
// k·ln2 + log(1 + f) for f in [√½ − 1, √2 − 1]: Cephes' logf polynomial, ln2 in two parts (fast_log and
// fast_log1p_unit), on a float or a GCC vector of floats.
template <typename F>
FUSEDLOSS_INLINE F log_reduced(F f, F k) {
  const F z = f * f;
  F poly = F{} + 7.0376836292e-2f;
  poly = poly * f - 1.1514610310e-1f;
  poly = poly * f + 1.1676998740e-1f;
  poly = poly * f - 1.2420140846e-1f;
  poly = poly * f + 1.4249322787e-1f;
  poly = poly * f - 1.6668057665e-1f;
  poly = poly * f + 2.0000714765e-1f;
  poly = poly * f - 2.4999993993e-1f;
  poly = poly * f + 3.3333331174e-1f;
  F y = poly * f * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  return f + y + 0.693359375f * k;
}

// Integer lanes to floating-point lanes of the same width (scalars or GCC vectors).
template <typename F, typename I>
FUSEDLOSS_INLINE F int_lanes_to_float(I v) {
  if constexpr (std::is_arithmetic<I>::value) {
    return static_cast<F>(v);
  } else {
    return __builtin_convertvector(v, F);
  }
}

// fast_log's float32 algorithm on a float (I = int32_t) or on a GCC vector of floats (I = its int32 twin): Cephes'
// logf, x = m·2^k with m in [√½, √2), a degree-8 polynomial in m − 1. x = 0 gives −inf, x < 0 and NaN give NaN,
// +inf gives +inf; subnormal x is scaled by 2^23 first. kNormal: the caller passes x >= FLT_MIN, +inf or NaN (the
// tests for subnormal, zero and negative x left out).
template <typename F, typename I, bool kNormal = false>
FUSEDLOSS_INLINE F log_float_lanes(F x) {
  F scaled = x;
  F exponent_bias = F{} + 126.0f;
  if constexpr (!kNormal) {
    const auto subnormal = x < 1.17549435e-38f;
    scaled = subnormal ? x * 8388608.0f : x;
    exponent_bias = subnormal ? F{} + 149.0f : exponent_bias;  // 23 more for a scaled subnormal
  }
  const I bits = bit_cast_to<I>(scaled);
  F exponent = int_lanes_to_float<F>((bits >> 23) & 0xff) - exponent_bias;
  F m = bit_cast_to<F>((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const auto low = m < 0.707106781186547524f;
  exponent = low ? exponent - 1.0f : exponent;
  m = low ? m + m - 1.0f : m - 1.0f;
  F result = log_reduced(m, exponent);
  if constexpr (!kNormal) result = x == 0.0f ? F{} - INFINITY : result;
  result = x == INFINITY ? F{} + INFINITY : result;
  if constexpr (!kNormal) result = x < 0.0f ? F{} + NAN : result;
  return x != x ? x : result;
}

#endif

// log(x) in float32 with about 1 ulp of error, branch-free so that loops over it vectorize (log_float_lanes).
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE float fast_log(float x) {
#ifdef __CUDA_ARCH__
  return ::logf(x);
#else
  return log_float_lanes<float, int32_t>(x);
#endif
}

// log(1 + e) for e in [0, 1] (the softplus of logistic losses, e = exp(−|x|)) in float32, branch-free and without
// a division: 1 + e = 2^k·(1 + f) with k = 0, f = e for e ≤ √2 − 1, else k = 1, f = (e − 1)/2, so that f in
// [√½ − 1, √2 − 1] is formed from e without rounding 1 + e first (one rounding of e − 1 for e in (0.414, 0.5), at
// most half an ulp of the result), then fast_log's polynomial in f. Exact for tiny e (log1p(e) = e), NaN
// propagates. The C++ tests bound it against std::log1p.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE float fast_log1p_unit(float e) {
#ifdef __CUDA_ARCH__
  return ::log1pf(e);
#else
  // k = round(e + 0.5 − (√2 − 1)) with the 1.5·2^23 trick (0 or 1; at the boundary either is exact enough), f
  // from it by arithmetic (exact for k = 0 and 1). Written as a choice between two constants, k was carried by the
  // compiler into its own copy of the polynomial for each, and both were computed.
  const float k = (e + 0.0857864376269050f + 12582912.0f) - 12582912.0f;
  const float f = (e - k) * (1.0f - 0.5f * k);
  return log_reduced(f, k);
#endif
}

#ifndef __CUDA_ARCH__
// fast_exp's float64 algorithm on a double (I = int64_t) or on a GCC vector of doubles (I = its int64 twin).
template <typename F, typename I>
FUSEDLOSS_INLINE F exp_double_lanes(F x) {
  const auto underflow = x < -708.0;
  x = x > 709.0 ? F{} + 709.0 : x;
  x = x < -708.0 ? F{} - 708.0 : x;
  const F magic = F{} + 6755399441055744.0;  // 1.5·2^52
  const F shifted = x * 1.4426950408889634074 + magic;
  const F n = shifted - magic;
  const I n_int = bit_cast_to<I>(shifted) - bit_cast_to<I>(magic);
  F r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  const F r2 = r * r;
  F p = F{} + 1.26177193074810590878e-4;
  p = p * r2 + 3.02994407707441961300e-2;
  p = p * r2 + 9.99999999999999999910e-1;
  p = p * r;
  F q = F{} + 3.00198505138664455042e-6;
  q = q * r2 + 2.52448340349684104192e-3;
  q = q * r2 + 2.27265548208155028766e-1;
  q = q * r2 + 2.00000000000000000009e0;
  const F exp_r = 1.0 + 2.0 * p / (q - p);
  const F result = exp_r * bit_cast_to<F>((n_int + 1023) << 52);
  return underflow ? F{} : result;
}

// fast_log's float64 algorithm on a double (I = int64_t) or on a GCC vector of doubles (I = its int64 twin); kNormal
// as for log_float_lanes (x >= DBL_MIN, +inf or NaN).
template <typename F, typename I, bool kNormal = false>
FUSEDLOSS_INLINE F log_double_lanes(F x) {
  F scaled = x;
  F exponent_bias = F{} + 1022.0;
  if constexpr (!kNormal) {
    const auto subnormal = x < 2.2250738585072014e-308;
    scaled = subnormal ? x * 4503599627370496.0 : x;              // 2^52
    exponent_bias = subnormal ? F{} + 1074.0 : exponent_bias;  // 52 more for a scaled subnormal
  }
  const I bits = bit_cast_to<I>(scaled);
  F exponent = int_lanes_to_float<F>((bits >> 52) & 0x7ff) - exponent_bias;
  F m = bit_cast_to<F>((bits & 0x000fffffffffffffLL) | 0x3fe0000000000000LL);  // in [0.5, 1)
  const auto low = m < 0.70710678118654752440;
  exponent = low ? exponent - 1.0 : exponent;
  m = low ? m + m - 1.0 : m - 1.0;
  const F z = m * m;
  F p = F{} + 1.01875663804580931796e-4;
  p = p * m + 4.97494994976747001425e-1;
  p = p * m + 4.70579119878881725854e0;
  p = p * m + 1.44989225341610930846e1;
  p = p * m + 1.79368678507819816313e1;
  p = p * m + 7.70838733755885391666e0;
  F q = m + 1.12873587189167450590e1;
  q = q * m + 4.52279145837532221105e1;
  q = q * m + 8.29875266912776603211e1;
  q = q * m + 7.11544750618563894466e1;
  q = q * m + 2.31251620126765340583e1;
  F y = m * (z * p / q);
  y -= exponent * 2.121944400546905827679e-4;
  y -= 0.5 * z;
  F result = m + y + exponent * 0.693359375;
  if constexpr (!kNormal) result = x == 0.0 ? F{} - INFINITY : result;
  result = x == INFINITY ? F{} + INFINITY : result;
  if constexpr (!kNormal) result = x < 0.0 ? F{} + NAN : result;
  return x != x ? x : result;
}
#endif

// exp(x) in float64 with about 1 ulp of error, branch-free (Cephes' exp: x = n·ln2 + r, the Padé
// form e^r = 1 + 2·r·P(r²) / (Q(r²) − r·P(r²)), 2^n in the exponent bits). Inputs below −708
// give 0.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double fast_exp(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return exp_double_lanes<double, int64_t>(x);
#endif
}

// log(x) in float64 with about 1 ulp of error, branch-free (Cephes' log: x = m·2^k with m in
// [√½, √2), log(1 + f) = f − f²/2 + f³·P(f)/Q(f)); the same special values as the float version.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double fast_log(double x) {
#ifdef __CUDA_ARCH__
  return ::log(x);
#else
  return log_double_lanes<double, int64_t>(x);
#endif
}

}  // namespace fusedloss
