// Torch-free math of one fused distillation row (docs/BACKENDS.md, distillation_loss): the divergence of the
// student's softmax from the teacher's and its gradient with respect to the student's logits.
//
// For one row, a = z_S / τ, b = z_T / τ (V classes), log P_S = (a − max a) − log Σ exp(a − max a), log P_T
// likewise:
//
//   β = 0:  l = Σ P_T (log P_T − log P_S)                 dl/dz_S = (P_S − P_T) / τ
//   β = 1:  l = Σ P_S (log P_S − log P_T)                 dl/dz_S = P_S (log P_S − log P_T − l) / τ
//   else:   log M = logsumexp(log β + log P_T, log(1 − β) + log P_S)
//           A = Σ P_T (log P_T − log M),  B = Σ P_S (log P_S − log M),  l = β A + (1 − β) B
//           dl/dz_S = (1 − β) P_S (log P_S − log M − B) / τ
//
// (with g = dl/dP_S: g = (1 − β)(log P_S − log M), since the terms through ∂ log M / ∂P_S sum to a constant
// that the softmax's Jacobian removes; dl/dz_S = P_S (g − Σ P_S g) / τ and Σ P_S g = (1 − β) B; for β = 1,
// g = log P_S − log P_T + 1 and the 1 cancels).
//
// Passes over a row: pass 1 reads both rows once for the online max and sum of exponentials (per block of
// kBlock columns: the running sum is rescaled once per block); pass 2 reads them again for the loss and, for
// β = 0, writes the gradient; β > 0 needs l (or B) before the gradient: pass 3 writes it. log M is
// max(u, v) + log1p(exp(−|u − v|)), with a branch-free log1p on [0, 1] so that the loops vectorize.
// Every gradient is multiplied by the row's factor (d(loss)/d(l_n)); a row of factor 0 is skipped (loss 0,
// gradient 0). The gradient may be written over the student's row: each block is read before it is written.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common.h"
#include "kernels/softmax_loss.h"

namespace fusedloss {
namespace distillation {

using ::fusedloss::fast_exp;

constexpr int64_t kBlock = 512;

template <typename acc_t>
struct Params {
  int64_t num_classes = 0;
  int mode = 0;  // 0: forward KL (β = 0), 1: reverse KL (β = 1), 2: generalized JSD
  acc_t beta = 0;
  acc_t log_beta = 0;
  acc_t log_1m_beta = 0;
  acc_t inv_tau = 1;
};

// log(1 + e) for e in [0, 1], branch-free: 2 atanh(z) with z = e / (2 + e) in [0, 1/3], its series to z^17
// (float) or z^33 (double), within an ulp or two.
template <typename acc_t>
FUSEDLOSS_INLINE acc_t log1p_unit(acc_t e) {
  constexpr int kTerms = sizeof(acc_t) == 4 ? 8 : 16;
  const acc_t z = e / (acc_t(2) + e);
  const acc_t z2 = z * z;
  acc_t p = acc_t(1) / acc_t(2 * kTerms + 1);
  for (int k = kTerms - 1; k >= 0; --k) p = p * z2 + acc_t(1) / acc_t(2 * k + 1);
  return acc_t(2) * z * p;
}

template <typename acc_t>
FUSEDLOSS_INLINE acc_t log_mixture(acc_t lpt, acc_t lps, const Params<acc_t>& prm) {
  const acc_t u = prm.log_beta + lpt;
  const acc_t v = prm.log_1m_beta + lps;
  const acc_t hi = u > v ? u : v;
  const acc_t d = u > v ? v - u : u - v;  // −|u − v|
  return hi + log1p_unit(fast_exp(d));
}

template <typename acc_t, typename scalar_t>
FUSEDLOSS_INLINE void load_block(const scalar_t* x, int64_t len, acc_t inv_tau, acc_t* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<acc_t>(x[i]) * inv_tau;
}

template <typename acc_t>
FUSEDLOSS_INLINE acc_t block_max(const acc_t* a, int64_t len) {
  acc_t m = Limits<acc_t>::large_negative;
  for (int64_t i = 0; i < len; ++i) m = a[i] > m ? a[i] : m;
  return m;
}

template <typename acc_t>
FUSEDLOSS_INLINE acc_t block_sum_exp(const acc_t* a, int64_t len, acc_t shift) {
  acc_t s = 0;
  for (int64_t i = 0; i < len; ++i) s += fast_exp(a[i] - shift);
  return s;
}

// Row loss; writes factor · dl/dz_S into grad when it is not null.
template <typename acc_t, typename scalar_t>
FUSEDLOSS_INLINE acc_t process_row(const scalar_t* s, const scalar_t* t, const Params<acc_t>& prm, acc_t factor,
                                   scalar_t* grad) {
  const int64_t V = prm.num_classes;
  if (factor == acc_t(0)) {
    if (grad != nullptr)
      for (int64_t i = 0; i < V; ++i) grad[i] = scalar_t(0);
    return acc_t(0);
  }
  acc_t a[kBlock];
  acc_t b[kBlock];
  // pass 1: max and sum of exponentials of both rows, online per block
  acc_t max_s = Limits<acc_t>::large_negative, max_t = Limits<acc_t>::large_negative;
  acc_t sum_s = 0, sum_t = 0;
  for (int64_t off = 0; off < V; off += kBlock) {
    const int64_t len = min_of(kBlock, V - off);
    load_block(s + off, len, prm.inv_tau, a);
    load_block(t + off, len, prm.inv_tau, b);
    const acc_t new_s = max_of(max_s, block_max(a, len));
    const acc_t new_t = max_of(max_t, block_max(b, len));
    sum_s = (off == 0 ? acc_t(0) : sum_s * fast_exp(max_s - new_s)) + block_sum_exp(a, len, new_s);
    sum_t = (off == 0 ? acc_t(0) : sum_t * fast_exp(max_t - new_t)) + block_sum_exp(b, len, new_t);
    max_s = new_s;
    max_t = new_t;
  }
  // log P = (a − max) − log Σ exp(a − max): never a − lse, which rounds to the ulp of lse's size
  const acc_t log_sum_s = std::log(sum_s);
  const acc_t log_sum_t = std::log(sum_t);
  const acc_t gscale = prm.inv_tau * factor;
  // pass 2: the loss (and the gradient for β = 0)
  acc_t sum_a = 0, sum_b = 0;
  for (int64_t off = 0; off < V; off += kBlock) {
    const int64_t len = min_of(kBlock, V - off);
    load_block(s + off, len, prm.inv_tau, a);
    load_block(t + off, len, prm.inv_tau, b);
    if (prm.mode == 0) {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = (a[i] - max_s) - log_sum_s;
        const acc_t lpt = (b[i] - max_t) - log_sum_t;
        const acc_t pt = fast_exp(lpt);
        sum_a += pt * (lpt - lps);
        a[i] = (fast_exp(lps) - pt) * gscale;
      }
      if (grad != nullptr)
        for (int64_t i = 0; i < len; ++i) grad[off + i] = static_cast<scalar_t>(a[i]);
    } else if (prm.mode == 1) {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = (a[i] - max_s) - log_sum_s;
        const acc_t lpt = (b[i] - max_t) - log_sum_t;
        sum_a += fast_exp(lps) * (lps - lpt);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = (a[i] - max_s) - log_sum_s;
        const acc_t lpt = (b[i] - max_t) - log_sum_t;
        const acc_t lm = log_mixture(lpt, lps, prm);
        sum_a += fast_exp(lpt) * (lpt - lm);
        sum_b += fast_exp(lps) * (lps - lm);
      }
    }
  }
  const acc_t loss = prm.mode == 2 ? prm.beta * sum_a + (acc_t(1) - prm.beta) * sum_b : sum_a;
  if (prm.mode == 0 || grad == nullptr) return loss;
  // pass 3: the gradient, P_S (h − K) · c / τ
  const acc_t K = prm.mode == 1 ? loss : sum_b;
  const acc_t c = prm.mode == 1 ? gscale : (acc_t(1) - prm.beta) * gscale;
  for (int64_t off = 0; off < V; off += kBlock) {
    const int64_t len = min_of(kBlock, V - off);
    load_block(s + off, len, prm.inv_tau, a);
    load_block(t + off, len, prm.inv_tau, b);
    if (prm.mode == 1) {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = (a[i] - max_s) - log_sum_s;
        const acc_t lpt = (b[i] - max_t) - log_sum_t;
        a[i] = fast_exp(lps) * ((lps - lpt) - K) * c;
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = (a[i] - max_s) - log_sum_s;
        const acc_t lpt = (b[i] - max_t) - log_sum_t;
        a[i] = fast_exp(lps) * ((lps - log_mixture(lpt, lps, prm)) - K) * c;
      }
    }
    for (int64_t i = 0; i < len; ++i) grad[off + i] = static_cast<scalar_t>(a[i]);
  }
  return loss;
}

}  // namespace distillation
}  // namespace fusedloss
