// Torch-free math of the local work of the vocabulary-parallel softmax losses (fusedloss.distributed):
// one row of a rank's logit shard (C_r classes of the global C).
//
// Statistics, before any communication (s = softcap·tanh(x / softcap), or x):
//   m_r = max_c s_c,   e_r = Σ_c exp(s_c − m_r),   g_r = Σ_c (m_r − s_c)
// (the shift is 0 when m_r is not finite, so that ±inf and NaN logits give what the PyTorch path gives).
//
// Gradient of the shard, once the global log-sum-exp `lse` and the row coefficient A are known
// (fusedloss/distributed.py derives them):
//   dl/ds_j = exp(s_j − lse)·(A + 2·z·lse) − (ε/C)·w_j − [j = y_r]·target_coef
//   dl/dx_j = scale · dl/ds_j · ds/dx_j
// with y_r the local index of the row's target when this shard holds it (−1 otherwise) and w the shard's class
// weights (ones when absent). Focal loss with label smoothing needs a per-class focal term here and is not
// served by this kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common.h"
#include "kernels/softmax_loss.h"

namespace fusedloss {
namespace vocab_parallel {

template <typename acc_t>
struct Cap {
  bool on;
  acc_t value;
  acc_t inverse;

  FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE acc_t operator()(acc_t x) const {
    return on ? softmax_loss::softcap_value<acc_t>(x, value, inverse) : x;
  }
};

// The scalar row statistics, with torch's semantics for rows of ±inf and NaN.
template <typename acc_t, typename scalar_t>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void row_stats_exact(const scalar_t* x, int64_t num_classes,
                                                            const Cap<acc_t>& cap, acc_t* row_max, acc_t* sum_exp,
                                                            acc_t* gap_sum) {
  acc_t m = -INFINITY;
  for (int64_t c = 0; c < num_classes; ++c) {
    const acc_t s = cap(static_cast<acc_t>(x[c]));
    m = (s > m || s != s) ? s : m;  // NaN propagates, as torch.amax
  }
  const acc_t shift = std::isfinite(m) ? m : acc_t(0);
  acc_t total = 0;
  acc_t gap = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    const acc_t s = cap(static_cast<acc_t>(x[c]));
    total += std::exp(s - shift);
    gap += shift - s;
  }
  *row_max = m;
  *sum_exp = total;
  *gap_sum = gap;
}

#ifndef __CUDA_ARCH__
// Host: blocks of the row through softmax_loss's vectorizable block loops (max, then Σ exp and Σ (m − s)). A row
// whose max is not a finite number above Limits::large_negative, or whose sums are not finite, is redone by
// row_stats_exact.
template <typename acc_t, typename scalar_t>
FUSEDLOSS_INLINE void row_stats(const scalar_t* x, int64_t num_classes, const Cap<acc_t>& cap, acc_t* row_max,
                                acc_t* sum_exp, acc_t* gap_sum) {
  using softmax_loss::kBlock;
  softmax_loss::Params<acc_t> prm{};
  prm.softcap = cap.on ? cap.value : acc_t(0);
  prm.inv_softcap = cap.inverse;
  acc_t s[kBlock];
  acc_t m = Limits<acc_t>::large_negative;
  for (int64_t start = 0; start < num_classes; start += kBlock) {
    const int64_t len = min_of(kBlock, num_classes - start);
    softmax_loss::load_block(x + start, len, prm, s);
    m = max_of(m, softmax_loss::block_max(s, len));
  }
  acc_t total = 0;
  acc_t gap = 0;
  for (int64_t start = 0; start < num_classes; start += kBlock) {
    const int64_t len = min_of(kBlock, num_classes - start);
    softmax_loss::load_block(x + start, len, prm, s);
    total += softmax_loss::block_sum_exp<acc_t>(s, len, m, nullptr);
    gap -= softmax_loss::block_dot<acc_t>(nullptr, s, m, len);
  }
  if (!(m > Limits<acc_t>::large_negative) || !std::isfinite(m) || !std::isfinite(total) || !std::isfinite(gap)) {
    row_stats_exact(x, num_classes, cap, row_max, sum_exp, gap_sum);
    return;
  }
  *row_max = m;
  *sum_exp = total;
  *gap_sum = gap;
}
#endif

template <typename acc_t>
struct GradRow {
  acc_t lse;
  acc_t coefficient;    // A + 2·z·lse
  acc_t target_coef;    // (1 − ε)·w_y·h_y, subtracted at the local target
  int64_t local_target; // −1 when the target is not in this shard
  acc_t scale;          // grad_output·token weight (0 at ignored rows)
};

#ifndef __CUDA_ARCH__
// Host: the row in blocks; every loop is branch-free per element, so that it vectorizes. grad may be x itself
// (the block is read before it is written).
template <typename acc_t, typename scalar_t>
FUSEDLOSS_INLINE void row_grad(const scalar_t* x, int64_t num_classes, const Cap<acc_t>& cap,
                               const GradRow<acc_t>& row, acc_t smoothing_per_class, const acc_t* weight,
                               acc_t* grad) {
  using softmax_loss::kBlock;
  softmax_loss::Params<acc_t> prm{};
  prm.softcap = cap.on ? cap.value : acc_t(0);
  prm.inv_softcap = cap.inverse;
  acc_t s[kBlock];
  acc_t derivative[kBlock];  // ds/dx with softcap, taken before grad (which may be x itself) is written
  for (int64_t start = 0; start < num_classes; start += kBlock) {
    const int64_t len = min_of(kBlock, num_classes - start);
    if (cap.on) {
      for (int64_t i = 0; i < len; ++i) {
        derivative[i] = softmax_loss::softcap_derivative<acc_t>(static_cast<acc_t>(x[start + i]), cap.inverse);
      }
    }
    softmax_loss::load_block(x + start, len, prm, s);
    acc_t* g = grad + start;
    if (weight == nullptr) {
      for (int64_t i = 0; i < len; ++i) {
        g[i] = fast_exp(s[i] - row.lse) * row.coefficient - smoothing_per_class;
      }
    } else {
      const acc_t* w = weight + start;
      for (int64_t i = 0; i < len; ++i) {
        g[i] = fast_exp(s[i] - row.lse) * row.coefficient - smoothing_per_class * w[i];
      }
    }
    const int64_t target = row.local_target - start;
    if (target >= 0 && target < len) g[target] -= row.target_coef;
    if (cap.on) {
      for (int64_t i = 0; i < len; ++i) g[i] *= row.scale * derivative[i];
    } else {
      for (int64_t i = 0; i < len; ++i) g[i] *= row.scale;
    }
  }
}
#endif

}  // namespace vocab_parallel
}  // namespace fusedloss
