// C++ tests of the k-best Viterbi and of the partial-label helpers of csrc/kernels/crf.h (no libtorch): every
// tag path of tiny sequences enumerated in float64 and sorted by the documented order (score descending, then
// the path compared from its last tag backwards: the lower tag, then the lower rank of its prefix, which for a
// brute force is the same as the lexicographic order of the reversed path), k up to past K^L (-1 and -inf
// padding), k = 1 against viterbi bit for bit, forbidden transitions (-1e4) and emissions in the hundreds; and
// the accumulate mode of crf::backward (the gradient of log Z) against brute-force marginals.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "kernels/crf.h"

namespace {

using fusedloss::crf::KBestWorkspace;
using fusedloss::crf::Tables;
using fusedloss::crf::Workspace;
using fusedloss_test::check;

struct Case {
  int K;
  int64_t L;
  std::vector<double> emissions, transitions, start, end;
};

Case make_case(int K, int64_t L, double scale, bool forbid, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  Case c{K, L, {}, {}, {}, {}};
  for (int64_t i = 0; i < L * K; ++i) c.emissions.push_back(scale * normal(gen));
  for (int i = 0; i < K * K; ++i) c.transitions.push_back(0.5 * normal(gen));
  for (int i = 0; i < K; ++i) c.start.push_back(0.5 * normal(gen));
  for (int i = 0; i < K; ++i) c.end.push_back(0.5 * normal(gen));
  if (forbid) {
    for (int i = 0; i < K; ++i) c.transitions[i * K + (i + 1) % K] = -1e4;
    c.start[K - 1] = -1e4;
  }
  return c;
}

struct Path {
  std::vector<int64_t> tags;
  double score;
};

// Every path with its float64 score, in the documented order.
std::vector<Path> enumerate(const Case& c) {
  const int K = c.K;
  std::vector<Path> paths;
  std::vector<int64_t> y(c.L, 0);
  while (true) {
    double s = c.start[y[0]] + c.emissions[y[0]] + c.end[y[c.L - 1]];
    for (int64_t t = 1; t < c.L; ++t) s += c.transitions[y[t - 1] * K + y[t]] + c.emissions[t * K + y[t]];
    paths.push_back({y, s});
    int64_t t = 0;
    while (t < c.L && ++y[t] == K) y[t++] = 0;
    if (t == c.L) break;
  }
  std::stable_sort(paths.begin(), paths.end(), [](const Path& a, const Path& b) {
    if (a.score != b.score) return a.score > b.score;
    return std::lexicographical_compare(a.tags.rbegin(), a.tags.rend(), b.tags.rbegin(), b.tags.rend());
  });
  return paths;
}

template <typename T>
struct Model {
  std::vector<T> emissions, transitions, start, end, buffer;
  Tables<T> tab;
  explicit Model(const Case& c)
      : emissions(c.emissions.begin(), c.emissions.end()),
        transitions(c.transitions.begin(), c.transitions.end()),
        start(c.start.begin(), c.start.end()),
        end(c.end.begin(), c.end.end()),
        buffer(2 * c.K + 2 * c.K * c.K) {
    const int K = c.K;
    tab = Tables<T>{K, transitions.data(), start.data(), end.data(), buffer.data(), buffer.data() + K,
                    buffer.data() + 2 * K, buffer.data() + 2 * K + K * K};
    fusedloss::crf::make_tables(tab);
  }
};

template <typename T>
void test_kbest(const Case& c, const std::string& name, double atol, double rtol) {
  const int K = c.K;
  const int64_t L = c.L;
  const std::vector<Path> want = enumerate(c);
  const Model<T> model(c);
  const int k = static_cast<int>(want.size()) + 2;
  std::vector<T> scratch(KBestWorkspace<T>::size(K, k));
  std::vector<int32_t> index_scratch(KBestWorkspace<T>::index_size(K)), backpointers(L * K * k);
  const auto ws = KBestWorkspace<T>::carve(scratch.data(), index_scratch.data(), K, k);
  std::vector<int64_t> paths(k * L, 7);
  std::vector<double> scores(k);
  fusedloss::crf::kbest_viterbi(model.tab, model.emissions.data(), L, k, ws, backpointers.data(), paths.data(), L,
                                scores.data());
  bool paths_ok = true, scores_ok = true;
  for (int r = 0; r < k; ++r) {
    const std::vector<int64_t> got(paths.begin() + r * L, paths.begin() + (r + 1) * L);
    if (r < static_cast<int>(want.size())) {
      // Scores of equal paths may round apart in float32: compare the scores, and the paths where no other path
      // lies within the tolerance.
      const double tol = atol + rtol * std::abs(want[r].score);
      scores_ok = scores_ok && std::abs(scores[r] - want[r].score) <= tol;
      const bool near_prev = r > 0 && std::abs(want[r - 1].score - want[r].score) <= 2 * tol;
      const bool near_next =
          r + 1 < static_cast<int>(want.size()) && std::abs(want[r + 1].score - want[r].score) <= 2 * tol;
      if (!near_prev && !near_next) paths_ok = paths_ok && got == want[r].tags;
    } else {
      scores_ok = scores_ok && std::isinf(scores[r]) && scores[r] < 0;
      paths_ok = paths_ok && got == std::vector<int64_t>(L, -1);
    }
  }
  check(paths_ok, name + ": k-best paths");
  check(scores_ok, name + ": k-best scores");

  // k = 1 is viterbi, bit for bit.
  std::vector<T> vscore(2 * K), vemission(K);
  std::vector<int32_t> best_prev(K);
  std::vector<uint8_t> vbp(L * K);
  std::vector<int64_t> vpath(L);
  const double vbest = fusedloss::crf::viterbi(model.tab, model.emissions.data(), L, vscore.data(), vemission.data(),
                                               best_prev.data(), vbp.data(), vpath.data());
  std::vector<int64_t> path1(L);
  double score1;
  std::vector<T> scratch1(KBestWorkspace<T>::size(K, 1));
  const auto ws1 = KBestWorkspace<T>::carve(scratch1.data(), index_scratch.data(), K, 1);
  fusedloss::crf::kbest_viterbi(model.tab, model.emissions.data(), L, 1, ws1, backpointers.data(), path1.data(), L,
                                &score1);
  check(path1 == vpath && score1 == vbest, name + ": 1-best equals viterbi");
}

// Ties: all-zero scores make every path tie; the order is then the reversed-lexicographic one.
void test_ties() {
  Case c{3, 3, std::vector<double>(9, 0.0), std::vector<double>(9, 0.0), std::vector<double>(3, 0.0),
         std::vector<double>(3, 0.0)};
  const std::vector<Path> want = enumerate(c);
  const Model<float> model(c);
  const int k = 27;
  std::vector<float> scratch(KBestWorkspace<float>::size(3, k));
  std::vector<int32_t> index_scratch(KBestWorkspace<float>::index_size(3)), backpointers(3 * 3 * k);
  const auto ws = KBestWorkspace<float>::carve(scratch.data(), index_scratch.data(), 3, k);
  std::vector<int64_t> paths(k * 3);
  std::vector<double> scores(k);
  fusedloss::crf::kbest_viterbi(model.tab, model.emissions.data(), 3, k, ws, backpointers.data(), paths.data(), 3,
                                scores.data());
  bool ok = true;
  for (int r = 0; r < k; ++r) {
    ok = ok && std::vector<int64_t>(paths.begin() + 3 * r, paths.begin() + 3 * r + 3) == want[r].tags;
  }
  check(ok, "ties: lower tag, then lower rank");
}

// backward<true, true>: the gradient of g * log Z, accumulated onto what is there.
void test_accumulate(const Case& c, const std::string& name) {
  const int K = c.K;
  const int64_t L = c.L;
  const std::vector<Path> all = enumerate(c);
  double m = all[0].score, z = 0;
  for (const Path& p : all) z += std::exp(p.score - m);
  const double log_z = m + std::log(z);
  std::vector<double> marg(L * K, 0), pair(K * K, 0), first(K, 0), last(K, 0);
  for (const Path& p : all) {
    const double w = std::exp(p.score - log_z);
    for (int64_t t = 0; t < L; ++t) marg[t * K + p.tags[t]] += w;
    for (int64_t t = 1; t < L; ++t) pair[p.tags[t - 1] * K + p.tags[t]] += w;
    first[p.tags[0]] += w;
    last[p.tags[L - 1]] += w;
  }
  const Model<double> model(c);
  std::vector<double> ws_buffer(Workspace<double>::size(K)), alpha(L * K), offsets(L);
  const auto ws = Workspace<double>::carve(ws_buffer.data(), K);
  const double got_log_z = fusedloss::crf::forward(model.tab, model.emissions.data(), L, alpha.data(), offsets.data(),
                                                   true, ws);
  check(std::abs(got_log_z - log_z) <= 1e-9 * (1 + std::abs(log_z)), name + ": log Z");
  const double g = 0.75;
  std::vector<double> out(L * K, 1.0), grad_t(K * K, 1.0), grad_start(K, 1.0), grad_end(K, 1.0);
  fusedloss::crf::backward<true, true>(model.tab, model.emissions.data(), static_cast<const int64_t*>(nullptr), L,
                                       alpha.data(), offsets.data(), got_log_z, g, out.data(), grad_t.data(),
                                       grad_start.data(), grad_end.data(), ws);
  bool ok = true;
  for (int64_t i = 0; i < L * K; ++i) ok = ok && std::abs(out[i] - (1 + g * marg[i])) <= 1e-9;
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) ok = ok && std::abs(grad_t[j * K + i] - (1 + g * pair[i * K + j])) <= 1e-9;
    ok = ok && std::abs(grad_start[i] - (1 + g * first[i])) <= 1e-9;
    ok = ok && std::abs(grad_end[i] - (1 + g * last[i])) <= 1e-9;
  }
  check(ok, name + ": accumulate mode adds g times the marginals");
}

}  // namespace

int main() {
  uint32_t seed = 1;
  for (int K : {1, 2, 3, 4}) {
    for (int64_t L : {1, 2, 3, 4}) {
      for (bool forbid : {false, true}) {
        const std::string name = "K=" + std::to_string(K) + " L=" + std::to_string(L) + (forbid ? " forbidden" : "");
        const Case c = make_case(K, L, 1.0, forbid && K > 1, seed++);
        test_kbest<double>(c, name + " float64", 1e-12, 1e-13);
        test_kbest<float>(c, name + " float32", 1e-4, 1e-6);
        test_accumulate(c, name);
      }
    }
  }
  // Absolute tolerances: float32 scores of paths of a few emissions in the hundreds are good to some ulp(1000).
  test_kbest<double>(make_case(3, 4, 300.0, false, 99), "emissions x300 float64", 1e-9, 1e-13);
  test_kbest<float>(make_case(3, 4, 300.0, false, 99), "emissions x300 float32", 2e-3, 1e-6);
  test_ties();
  return fusedloss_test::report();
}
