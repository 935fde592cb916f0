// Linear-chain CRF math for one sequence run by a team of lanes that split the K tags: the parallel form of
// csrc/kernels/crf.h (same recursions, same matrix form with its underflow guard, same normalized alpha and
// beta with float64 offsets; see the header comment there). The CUDA kernels of csrc/cuda/crf.cu run one
// sequence per thread block with the block as the team; the C++ tests run the same code with SerialTeam (one
// lane), against brute-force enumeration.
//
// Lane r of n owns the tags k = r, r + n, r + 2n, ... of every K-vector: it alone writes them. Vectors that
// other lanes read (the weights of a step, the previous scores) go through the team's shared vectors with a
// team.sync() between the writes and the reads. A Team provides
//     int rank() const, int size() const, void sync() const,
//     V max(V) const, V sum(V) const   (over the team; every lane gets the result; NaN propagates through max)
// and every lane of the team must call every function below (they contain team-wide reductions).
//
// Work per step: a lane computes its columns (forward, Viterbi) or rows (backward) of the K x K step from the
// tables (e_col, e_row_t, transitions), which the caller may place in fast memory (CUDA shared memory);
// each step costs one or two team.sync() plus one max reduction.
//
// Values nobody checked. On CUDA tensors the mask and the tags are not read back by the host (that would wait
// for the device), so these functions take any length L >= 0 and any tag values, and never read or write outside
// the sequence's rows [0, L) for them: an empty sequence (L = 0, an all-off mask) gets NaN from team_forward,
// team_gold_score and team_viterbi, and nothing from team_backward; a tag outside [0, K) is never used as an
// index: team_gold_score returns NaN and team_backward<true> writes a zero gradient for the sequence. (The
// kernels write the rows past L: zeros, or NaN marginals for an empty sequence.) The same holds for the partial-
// label recursions (an allowed set that is empty reads as constants: a very negative finite log Z, never NaN;
// EmissionSource) and team_kbest_viterbi (NaN scores for L = 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/crf.h"

namespace fusedloss {
namespace crf {

// The team of one lane: the host runs the team functions as plain loops (C++ tests).
struct SerialTeam {
  FUSEDLOSS_HOST_DEVICE int rank() const { return 0; }
  FUSEDLOSS_HOST_DEVICE int size() const { return 1; }
  FUSEDLOSS_HOST_DEVICE void sync() const {}
  template <typename V>
  FUSEDLOSS_HOST_DEVICE V max(V x) const {
    return x;
  }
  template <typename V>
  FUSEDLOSS_HOST_DEVICE V sum(V x) const {
    return x;
  }
};

// max that keeps a NaN of either argument (so a NaN score reaches the offsets and log Z).
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// kPartialLabelScore (crf.h) is the value of a replaced emission outside a position's allowed set.

// Where the recursions read their emissions. With allowed (L, K) bool/uint8 (partial labels; null: every tag),
// an entry outside the allowed set reads as kPartialLabelScore, a constant. A row with no allowed tag at all
// (nothing checks for it on CUDA tensors) replaces every emission of the row by that constant: its paths all
// shift by kPartialLabelScore, so the row reads 0 here and the caller adds kPartialLabelScore to log Z once per
// such row (team_empty_rows). Reading -1e30 directly would round every other score of the row away in float32
// and leave offsets too coarse for the backward. any_empty: whether the sequence has such a row (only then is
// a row scanned).
template <typename E, typename T>
struct EmissionSource {
  const E* emissions;
  const uint8_t* allowed;
  int K;
  bool any_empty;

  FUSEDLOSS_HOST_DEVICE bool row_empty(int64_t t) const {
    for (int k = 0; k < K; ++k)
      if (allowed[t * K + k] != 0) return false;
    return true;
  }
  // Whether e[t, j] is replaced by a constant (its gradient is then 0).
  FUSEDLOSS_HOST_DEVICE bool constant(int64_t t, int j) const {
    return allowed != nullptr && allowed[t * K + j] == 0;
  }
  FUSEDLOSS_HOST_DEVICE T read(int64_t t, int j) const {
    if (constant(t, j)) return (any_empty && row_empty(t)) ? T(0) : static_cast<T>(kPartialLabelScore);
    return static_cast<T>(emissions[t * K + j]);
  }
};

template <typename E, typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE EmissionSource<E, T> free_source(const E* emissions, int K) {
  return EmissionSource<E, T>{emissions, nullptr, K, false};
}

// The number of rows in [0, L) of allowed (L, K) without any allowed tag (every lane gets it; lanes split the
// rows, so the pass costs L * K / n reads).
template <typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double team_empty_rows(const Team& team, const uint8_t* allowed, int64_t L,
                                                              int K) {
  double count = 0;
  for (int64_t t = team.rank(); t < L; t += team.size()) {
    bool any = false;
    for (int k = 0; k < K && !any; ++k) any = allowed[t * K + k] != 0;
    count += any ? 0.0 : 1.0;
  }
  return team.sum(count);
}

// The emission of the lane's first tag at step t, read one step ahead: a lane issues the load of step t + 1 (or
// t - 1 going backward) at the top of step t, so the memory latency hides behind the step's synchronizations
// and its K-term sums instead of stalling the next step. Tags past the first of a lane are read when used.
template <typename E, typename T>
struct EmissionPrefetch {
  EmissionSource<E, T> source;
  int64_t L;
  int lane;
  T value;
  // Holds e[t, lane] (0 outside the sequence or for lanes without a tag).
  FUSEDLOSS_HOST_DEVICE void load(int64_t t) {
    value = (t >= 0 && t < L && lane < source.K) ? source.read(t, lane) : T(0);
  }
  // e[t, j] for a tag j of this lane, when `value` holds step t.
  FUSEDLOSS_HOST_DEVICE T get(int64_t t, int j, T current) const { return j == lane ? current : source.read(t, j); }
};

// make_tables, with the K^2 exps split over the team: lane r computes the column maxima of its columns, the
// row maxima of its rows, then the table entries r, r + n, ... of the row-major (K, K) index.
template <typename T, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void team_make_tables(const Team& team, const Tables<T>& tab) {
  const int K = tab.K;
  for (int k = team.rank(); k < K; k += team.size()) {
    T c = tab.transitions[k];
    T r = tab.transitions[static_cast<int64_t>(k) * K];
    for (int i = 1; i < K; ++i) {
      c = max_of(c, tab.transitions[static_cast<int64_t>(i) * K + k]);
      r = max_of(r, tab.transitions[static_cast<int64_t>(k) * K + i]);
    }
    tab.col_max[k] = c;
    tab.row_max[k] = r;
  }
  team.sync();
  const int64_t KK = static_cast<int64_t>(K) * K;
  for (int64_t idx = team.rank(); idx < KK; idx += team.size()) {
    const int64_t i = idx / K;
    const int64_t j = idx - i * K;
    const T a = tab.transitions[idx];
    tab.e_col[idx] = fast_exp(a - tab.col_max[j]);
    tab.e_row_t[j * K + i] = fast_exp(a - tab.row_max[i]);
  }
  team.sync();
}

// Subtracts the team-wide maximum of the lane's entries of x (K,) and returns it (as normalize in crf.h).
template <typename T, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T team_normalize(const Team& team, T* x, int K) {
  T local = Limits<T>::large_negative;
  for (int k = team.rank(); k < K; k += team.size()) local = nan_max(x[k], local);
  const T m = team.max(local);
  for (int k = team.rank(); k < K; k += team.size()) x[k] -= m;
  return m;
}

// Forward algorithm over one sequence; returns log Z (every lane). Uses tab.e_col, col_max, transitions (the
// exact columns of the guard), start, end. alpha: (2, K) shared scratch (ping-pong of the normalized
// alpha_t); p: (K,) shared. With store (non-null), store (L, K) and offsets (L,) receive alpha_t =
// store[t] + offsets[t] for the backward sweep (each lane writes its own tags; lane 0 the offsets).
// The source form reads the emissions through an EmissionSource (partial labels: the constrained recursion).
template <typename E, typename T, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double team_forward(const Team& team, const Tables<T>& tab,
                                                           const EmissionSource<E, T>& source, int64_t L, T* alpha,
                                                           T* p, T* store, double* offsets) {
  // An empty sequence has no log Z; it has no row to read nor to store either (uniform over the team: L is).
  if (L <= 0) return static_cast<double>(NAN);
  const int K = tab.K;
  const int r = team.rank();
  const int n = team.size();
  for (int k = r; k < K; k += n) alpha[k] = tab.start[k] + source.read(0, k);
  double offset = static_cast<double>(team_normalize(team, alpha, K));
  if (store != nullptr) {
    for (int k = r; k < K; k += n) store[k] = alpha[k];
    if (r == 0) offsets[0] = offset;
  }
  EmissionPrefetch<E, T> ahead{source, L, r, T(0)};
  ahead.load(1);
  for (int64_t t = 1; t < L; ++t) {
    const T* prev = alpha + ((t - 1) & 1) * K;
    T* next = alpha + (t & 1) * K;
    const T e_lane = ahead.value;
    ahead.load(t + 1);
    team.sync();  // prev complete
    for (int i = r; i < K; i += n) p[i] = fast_exp(prev[i]);  // prev is normalized: its maximum is 0
    team.sync();  // p complete
    for (int j = r; j < K; j += n) {
      const T e = ahead.get(t, j, e_lane);
      T s = 0;
      for (int i = 0; i < K; ++i) s += p[i] * tab.e_col[static_cast<int64_t>(i) * K + j];
      T x;
      if (s >= Guard<T>::min_sum) {
        x = fast_log(s) + tab.col_max[j] + e;
      } else {
        // Exact column: every term of the matrix form underflowed (or a NaN came in).
        T best = prev[0] + tab.transitions[j];
        for (int i = 1; i < K; ++i) best = max_of(best, prev[i] + tab.transitions[static_cast<int64_t>(i) * K + j]);
        T sum = 0;
        for (int i = 0; i < K; ++i) sum += exp(prev[i] + tab.transitions[static_cast<int64_t>(i) * K + j] - best);
        x = best + log(sum) + e;
      }
      next[j] = x;
    }
    offset += static_cast<double>(team_normalize(team, next, K));
    if (store != nullptr) {
      for (int k = r; k < K; k += n) store[t * K + k] = next[k];
      if (r == 0) offsets[t] = offset;
    }
  }
  const T* last = alpha + ((L - 1) & 1) * K;
  T local = Limits<T>::large_negative;
  for (int k = r; k < K; k += n) local = nan_max(last[k] + tab.end[k], local);
  const T m = team.max(local);
  T s = 0;
  for (int k = r; k < K; k += n) s += exp(last[k] + tab.end[k] - m);
  return offset + static_cast<double>(m) + static_cast<double>(log(team.sum(s)));
}

template <typename E, typename T, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double team_forward(const Team& team, const Tables<T>& tab, const E* emissions,
                                                           int64_t L, T* alpha, T* p, T* store, double* offsets) {
  return team_forward(team, tab, free_source<E, T>(emissions, tab.K), L, alpha, p, store, offsets);
}

// Whether every tag of tags[0..L) lies in [0, K) (every lane gets the answer; true for L = 0).
template <typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE bool team_tags_in_range(const Team& team, const int64_t* tags, int64_t L,
                                                               int K) {
  int bad = 0;
  for (int64_t t = team.rank(); t < L; t += team.size()) bad |= (tags[t] < 0 || tags[t] >= K) ? 1 : 0;
  return team.max(bad) == 0;
}

// score(tags) of one sequence, or NaN when a tag lies outside [0, K) (*bad_tags is then true) or the sequence is
// empty (L = 0; *bad_tags false). A tag is used as an index only once all of them are known to be in range.
// Lanes split the time steps; the float64 partial sums meet in one reduction.
template <typename E, typename T, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double team_gold_score(const Team& team, const Tables<T>& tab,
                                                              const E* emissions, const int64_t* tags, int64_t L,
                                                              bool* bad_tags) {
  const int K = tab.K;
  *bad_tags = !team_tags_in_range(team, tags, L, K);
  if (*bad_tags || L <= 0) return static_cast<double>(NAN);
  double score = 0;
  for (int64_t t = team.rank(); t < L; t += team.size()) {
    score += static_cast<double>(static_cast<T>(emissions[t * K + tags[t]]));
    if (t > 0) score += static_cast<double>(tab.transitions[tags[t - 1] * K + tags[t]]);
  }
  return team.sum(score) + static_cast<double>(tab.start[tags[0]]) + static_cast<double>(tab.end[tags[L - 1]]);
}

// Shared vectors of team_backward, K each.
template <typename T>
struct TeamBackwardVectors {
  T* beta;  // normalized beta_t, own entries only
  T* v;     // e_t + beta_t (read by every lane on exact rows)
  T* w;     // exp(v - max v)
  T* u;     // u_t, the tag marginals of the row just written (own entries)
};

// What team_backward_sweep computes: the tag marginals; the log-likelihood gradient (gold indicators minus
// marginals); or, accumulating, g times the marginals (the gradient of g * log Z).
enum class BackwardMode { kMarginals, kGradient, kAccumulate };

// Backward sweep over one sequence from the stored alpha (L, K) with its offsets (L,) and log Z: crf.h's
// backward<kGradient> with the K rows of each step split over the team. Lane r computes S'_i, beta_{t-1}[i],
// u_{t-1}[i] and (gradient modes) the pairwise terms P_t(i, j) of its rows i, so it alone writes the column i
// of grad_transitions_t (layout [j * K + i]): no atomics. Uses tab.e_row_t, row_max, transitions, end.
// kGradient: out[t, k] = g (1[y_t = k] - u_t[k]); grad_transitions_t, grad_start, grad_end accumulate (+=)
//   g (gold count - pairwise / tag marginals).
// kAccumulate: out[t, k] += g u_t[k] (0 where the source reads a constant), grad_transitions_t += g P_t,
//   grad_start += g u_0, grad_end += g u_{L-1}; tags unused. Two calls (+g on the constrained model, -g on the
//   free one) give the partial-label log-likelihood gradient.
// kMarginals: out[t, k] = u_t[k]; tags and the gradient pointers are unused.
// Rows t >= L of out are not touched. L = 0 (an empty sequence) writes nothing at all and reads nothing. With
// kGradient, a tag outside [0, K) gives the sequence a zero gradient: rows [0, L) of out are written as 0 and
// nothing is accumulated.
template <BackwardMode kMode, typename E, typename T, typename Out, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void team_backward_sweep(const Team& team, const Tables<T>& tab,
                                                                const EmissionSource<E, T>& source,
                                                                const int64_t* tags, int64_t L, const T* alpha,
                                                                const double* offsets, double log_z, T g, Out* out,
                                                                T* grad_transitions_t, T* grad_start, T* grad_end,
                                                                const TeamBackwardVectors<T>& vec) {
  constexpr bool kGold = kMode == BackwardMode::kGradient;
  constexpr bool kGrad = kMode != BackwardMode::kMarginals;
  if (L <= 0) return;
  const int K = tab.K;
  const int r = team.rank();
  const int n = team.size();
  if (kGold && !team_tags_in_range(team, tags, L, K)) {
    for (int64_t t = 0; t < L; ++t)
      for (int k = r; k < K; k += n) out[t * K + k] = static_cast<Out>(T(0));
    return;
  }
  // The sweep below subtracts g times the marginals (the log-likelihood's sign); accumulating adds them.
  const T c = kMode == BackwardMode::kAccumulate ? -g : g;
  for (int k = r; k < K; k += n) vec.beta[k] = tab.end[k];
  double beta_offset = static_cast<double>(team_normalize(team, vec.beta, K));
  auto gold = [&](int64_t t, int k) { return (kGold && tags[t] == k) ? c : T(0); };
  auto write_row = [&](int64_t t, int k, T u) {
    if (kMode == BackwardMode::kGradient) {
      out[t * K + k] = static_cast<Out>(gold(t, k) - c * u);
    } else if (kMode == BackwardMode::kAccumulate) {
      if (!source.constant(t, k)) out[t * K + k] = static_cast<Out>(static_cast<T>(out[t * K + k]) - c * u);
    } else {
      out[t * K + k] = static_cast<Out>(u);
    }
  };
  {
    const T shift = static_cast<T>(offsets[L - 1] + beta_offset - log_z);
    const T* alpha_last = alpha + (L - 1) * K;
    for (int k = r; k < K; k += n) {
      const T u = exp(alpha_last[k] + vec.beta[k] + shift);
      vec.u[k] = u;
      write_row(L - 1, k, u);
      if (kGrad) grad_end[k] += gold(L - 1, k) - c * u;
    }
  }
  EmissionPrefetch<E, T> ahead{source, L, r, T(0)};
  ahead.load(L - 1);
  for (int64_t t = L - 1; t >= 1; --t) {
    const T* alpha_prev = alpha + (t - 1) * K;
    const T e_lane = ahead.value;
    ahead.load(t - 1);
    team.sync();  // the previous step's reads of v and w are done
    T local = Limits<T>::large_negative;
    for (int j = r; j < K; j += n) {
      const T x = ahead.get(t, j, e_lane) + vec.beta[j];
      vec.v[j] = x;
      local = nan_max(x, local);
    }
    const T mv = team.max(local);
    for (int j = r; j < K; j += n) vec.w[j] = fast_exp(vec.v[j] - mv);
    team.sync();  // v and w complete
    // alpha_{t-1} + v - log Z = alpha_prev + v + shift: the offsets enter as one rounded number.
    const T shift = static_cast<T>(offsets[t - 1] + beta_offset - log_z);
    local = Limits<T>::large_negative;
    for (int i = r; i < K; i += n) {
      const T scale = fast_exp(alpha_prev[i] + tab.row_max[i] + mv + shift);  // F_i
      const bool exact_pairs = kGrad && !(scale <= Guard<T>::max_scale);
      const T g_scale = exact_pairs ? T(0) : c * scale;
      T s = 0;
      for (int j = 0; j < K; ++j) {
        const T ew = tab.e_row_t[static_cast<int64_t>(j) * K + i] * vec.w[j];
        s += ew;
        if (kGrad) grad_transitions_t[static_cast<int64_t>(j) * K + i] -= g_scale * ew;
      }
      const T* a_row = tab.transitions + static_cast<int64_t>(i) * K;
      if (exact_pairs) {
        for (int j = 0; j < K; ++j) {
          grad_transitions_t[static_cast<int64_t>(j) * K + i] -= c * exp(alpha_prev[i] + a_row[j] + vec.v[j] + shift);
        }
      }
      if (kGold && tags[t - 1] == i) grad_transitions_t[tags[t] * K + i] += c;
      const bool exact_row = !(s >= Guard<T>::min_sum);
      const T beta = exact_row ? logsumexp_sum(a_row, vec.v, K) : fast_log(s) + mv + tab.row_max[i];
      const T u = exact_row ? exp(alpha_prev[i] + beta + shift) : scale * s;
      vec.beta[i] = beta;
      vec.u[i] = u;
      local = nan_max(beta, local);
      write_row(t - 1, i, u);
    }
    const T m = team.max(local);
    for (int i = r; i < K; i += n) vec.beta[i] -= m;
    beta_offset += static_cast<double>(m);
  }
  if (kGrad) {
    for (int k = r; k < K; k += n) grad_start[k] += gold(0, k) - c * vec.u[k];
  }
}

// kGradient = true: team_backward_sweep's kGradient (tags given); false: its kMarginals.
template <bool kGradient, typename E, typename T, typename Out, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void team_backward(const Team& team, const Tables<T>& tab, const E* emissions,
                                                          const int64_t* tags, int64_t L, const T* alpha,
                                                          const double* offsets, double log_z, T g, Out* out,
                                                          T* grad_transitions_t, T* grad_start, T* grad_end,
                                                          const TeamBackwardVectors<T>& vec) {
  constexpr BackwardMode kMode = kGradient ? BackwardMode::kGradient : BackwardMode::kMarginals;
  team_backward_sweep<kMode>(team, tab, free_source<E, T>(emissions, tab.K), tags, L, alpha, offsets, log_z, g, out,
                             grad_transitions_t, grad_start, grad_end, vec);
}

// The gradient of g * log Z (log Z of the model the source reads: free, or constrained to the allowed sets)
// added to out (L, K) and the transition gradients (team_backward_sweep's kAccumulate). alpha, offsets and log_z
// come from team_forward on the same source (log_z without the kPartialLabelScore of empty rows).
template <typename E, typename T, typename Out, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void team_backward_accumulate(const Team& team, const Tables<T>& tab,
                                                                     const EmissionSource<E, T>& source, int64_t L,
                                                                     const T* alpha, const double* offsets,
                                                                     double log_z, T g, Out* out,
                                                                     T* grad_transitions_t, T* grad_start,
                                                                     T* grad_end, const TeamBackwardVectors<T>& vec) {
  team_backward_sweep<BackwardMode::kAccumulate>(team, tab, source, static_cast<const int64_t*>(nullptr), L, alpha,
                                                 offsets, log_z, g, out, grad_transitions_t, grad_start, grad_end,
                                                 vec);
}

// Viterbi over one sequence: writes the best path to path[0..L) and returns its score (lane 0 does the
// backtrace; the returned score is meaningful on lane 0). An empty sequence (L = 0) returns NaN on every lane
// and touches no memory. Lane r takes the best predecessor of its columns
// (lowest index on ties; a NaN candidate wins, as in crf.h), scores normalized per step with a float64 offset.
// score: (2, K) shared; backpointers: (L, K) of uint8_t or int16_t, written by every lane and read by lane 0
// (shared or global memory). Uses tab.transitions, start, end.
template <typename E, typename T, typename BP, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE double team_viterbi(const Team& team, const Tables<T>& tab, const E* emissions,
                                                           int64_t L, T* score, BP* backpointers, int64_t* path) {
  if (L <= 0) return static_cast<double>(NAN);
  const int K = tab.K;
  const int r = team.rank();
  const int n = team.size();
  for (int k = r; k < K; k += n) score[k] = tab.start[k] + static_cast<T>(emissions[k]);
  double offset = static_cast<double>(team_normalize(team, score, K));
  EmissionPrefetch<E, T> ahead{free_source<E, T>(emissions, K), L, r, T(0)};
  ahead.load(1);
  for (int64_t t = 1; t < L; ++t) {
    const T* cur = score + ((t - 1) & 1) * K;
    T* nxt = score + (t & 1) * K;
    const T e_lane = ahead.value;
    ahead.load(t + 1);
    team.sync();  // cur complete
    for (int j = r; j < K; j += n) {
      const T e = ahead.get(t, j, e_lane);
      T best = cur[0] + tab.transitions[j];
      int arg = 0;
      for (int i = 1; i < K; ++i) {
        const T cand = cur[i] + tab.transitions[static_cast<int64_t>(i) * K + j];
        const bool take = cand > best || cand != cand;
        best = take ? cand : best;
        arg = take ? i : arg;
      }
      nxt[j] = best + e;
      backpointers[t * K + j] = static_cast<BP>(arg);
    }
    offset += static_cast<double>(team_normalize(team, nxt, K));
  }
  team.sync();  // the last scores and every backpointer complete
  if (r != 0) return 0.0;
  const T* cur = score + ((L - 1) & 1) * K;
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

// The k-best order of crf_kbest_viterbi: a higher score first; a NaN before any number (as team_viterbi lets a
// NaN win); equal scores keep the earlier candidate (the lower tag, then the lower rank), so callers scan in
// that order.
template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE bool kbest_before(T a, T b) {
  return a > b || (a != a && b == b);
}

// The number of valid ranks per tag after a step with `count` before it: min(k, K * count). Every tag has
// K^t partial paths at step t (forbidden transitions are paths too), so this is the same for every tag.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE int kbest_count(int count, int K, int k) {
  const int64_t c = static_cast<int64_t>(count) * K;
  return c < k ? static_cast<int>(c) : k;
}

// List Viterbi over one sequence: the k highest-scoring distinct paths, written to paths[q * path_stride + t]
// for ranks q < k and t < L, with their scores to scores[q] (lane 0 writes both). Per step and tag the k best
// partial scores are kept sorted descending (normalized per step with a float64 offset, as team_viterbi), with
// backpointers prev_tag * k + prev_rank. Lane r takes tags j = r, r + n, ...: the candidates of tag j are the K
// sorted lists score[i, :] + A[i, j], merged by scanning their K heads once per output rank (ties: the lower
// previous tag, then the lower rank, by kbest_before and the scan order). The final ranks merge the lists
// score[j, :] + end[j] the same way (ties: the lower last tag, then the lower rank). A sequence with fewer than k
// paths (K^L < k) gets path -1 at every step and score -inf for the ranks past K^L. An empty sequence (L = 0)
// gets NaN scores for every rank and touches no row.
// Workspace: score (2, K, k) shared; heads (K, n) int32, lane r's merge positions at heads[i * n + r] (lane 0
// reuses its column for the final merge); backpointers (L, K, k) int32 (row 0 unused), written by every lane and
// read by lane 0. Needs K * k < 2^31. Uses tab.transitions, start, end.
template <typename E, typename T, typename Team>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE void team_kbest_viterbi(const Team& team, const Tables<T>& tab,
                                                               const E* emissions, int64_t L, int k, T* score,
                                                               int32_t* heads, int32_t* backpointers, int64_t* paths,
                                                               int64_t path_stride, double* scores) {
  const int K = tab.K;
  const int r = team.rank();
  const int n = team.size();
  if (L <= 0) {
    for (int q = r; q < k; q += n) scores[q] = static_cast<double>(NAN);
    return;
  }
  const int64_t Kk = static_cast<int64_t>(K) * k;
  // Subtracts the maximum over the tags' best scores (every valid rank lies below its tag's rank 0).
  auto normalize = [&](T* x, int count) {
    T local = Limits<T>::large_negative;
    for (int j = r; j < K; j += n) local = nan_max(x[static_cast<int64_t>(j) * k], local);
    const T m = team.max(local);
    for (int j = r; j < K; j += n)
      for (int q = 0; q < count; ++q) x[static_cast<int64_t>(j) * k + q] -= m;
    return m;
  };
  int32_t* head = heads + r;
  for (int j = r; j < K; j += n) score[static_cast<int64_t>(j) * k] = tab.start[j] + static_cast<T>(emissions[j]);
  int count = 1;  // valid ranks per tag
  double offset = static_cast<double>(normalize(score, count));
  EmissionPrefetch<E, T> ahead{free_source<E, T>(emissions, K), L, r, T(0)};
  ahead.load(1);
  for (int64_t t = 1; t < L; ++t) {
    const T* cur = score + ((t - 1) & 1) * Kk;
    T* nxt = score + (t & 1) * Kk;
    const T e_lane = ahead.value;
    ahead.load(t + 1);
    const int next_count = kbest_count(count, K, k);
    team.sync();  // cur complete
    for (int j = r; j < K; j += n) {
      const T e = ahead.get(t, j, e_lane);
      for (int i = 0; i < K; ++i) head[static_cast<int64_t>(i) * n] = 0;
      T* out = nxt + static_cast<int64_t>(j) * k;
      int32_t* bp = backpointers + (t * K + j) * k;
      for (int q = 0; q < next_count; ++q) {
        int arg = -1;
        T best = T(0);
        for (int i = 0; i < K; ++i) {
          const int h = head[static_cast<int64_t>(i) * n];
          if (h >= count) continue;
          const T cand = cur[static_cast<int64_t>(i) * k + h] + tab.transitions[static_cast<int64_t>(i) * K + j];
          if (arg < 0 || kbest_before(cand, best)) {
            best = cand;
            arg = i;
          }
        }
        // next_count <= K * count, so some head is left: arg >= 0.
        const int h = head[static_cast<int64_t>(arg) * n]++;
        out[q] = best + e;
        bp[q] = arg * k + h;
      }
    }
    count = next_count;
    offset += static_cast<double>(normalize(nxt, count));
  }
  team.sync();  // the last scores and every backpointer complete
  if (r != 0) return;
  const T* cur = score + ((L - 1) & 1) * Kk;
  const int total = kbest_count(count, K, k);
  for (int j = 0; j < K; ++j) head[static_cast<int64_t>(j) * n] = 0;
  for (int q = 0; q < k; ++q) {
    int64_t* path = paths + q * path_stride;
    if (q >= total) {
      scores[q] = -static_cast<double>(INFINITY);
      for (int64_t t = 0; t < L; ++t) path[t] = -1;
      continue;
    }
    int tag = -1;
    T best = T(0);
    for (int j = 0; j < K; ++j) {
      const int h = head[static_cast<int64_t>(j) * n];
      if (h >= count) continue;
      const T cand = cur[static_cast<int64_t>(j) * k + h] + tab.end[j];
      if (tag < 0 || kbest_before(cand, best)) {
        best = cand;
        tag = j;
      }
    }
    int rank = head[static_cast<int64_t>(tag) * n]++;
    scores[q] = offset + static_cast<double>(best);
    path[L - 1] = tag;
    for (int64_t t = L - 1; t >= 1; --t) {
      const int32_t code = backpointers[(t * K + tag) * k + rank];
      tag = code / k;
      rank = code - tag * k;
      path[t - 1] = tag;
    }
  }
}

}  // namespace crf
}  // namespace fusedloss
