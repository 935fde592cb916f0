// C++ tests of csrc/kernels/crf.h (no libtorch): log Z, the gold score, the gradients (gold indicators minus
// marginals), the tag marginals and Viterbi against brute-force enumeration of every tag path in float64,
// for tiny K and L; with forbidden transitions (-1e4), emissions in the hundreds (the underflow guard), and
// float32 against float64 at long sequences; plus the accuracy of fast_exp and fast_log. The team form of the
// same math (csrc/kernels/crf_team.h, which the CUDA kernels run with a thread block as the team) runs here
// with one lane through every check, and through the values the CUDA kernels must survive unchecked: an empty
// sequence (all-off mask) and tags outside [0, K). Those run on buffers of exactly the sequence's size, so the
// AddressSanitizer build of this file (test_crf_asan, CMakeLists.txt) fails on any access outside them. The team
// functions of the partial-label log-likelihood, log Z and the k-best Viterbi are checked the same way against
// brute force over the allowed paths and over every path ranked.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "kernels/crf.h"
#include "kernels/crf_team.h"

namespace {

using fusedloss::crf::Tables;
using fusedloss::crf::Workspace;

using fusedloss_test::check;

bool close(double got, double want, double atol, double rtol) {
  return std::abs(got - want) <= atol + rtol * std::abs(want);  // false for NaN
}

// A CRF problem of one sequence in float64: emissions (L, K), transitions (K, K), start, end, gold tags.
struct Problem {
  int K;
  int64_t L;
  std::vector<double> emissions, transitions, start, end;
  std::vector<int64_t> tags;
};

Problem random_problem(std::mt19937& rng, int K, int64_t L, double emission_scale, bool constrained) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p{K, L, {}, {}, {}, {}, {}};
  for (int64_t i = 0; i < L * K; ++i) p.emissions.push_back(emission_scale * normal(rng));
  for (int i = 0; i < K * K; ++i) p.transitions.push_back(normal(rng));
  for (int i = 0; i < K; ++i) p.start.push_back(normal(rng));
  for (int i = 0; i < K; ++i) p.end.push_back(normal(rng));
  if (constrained && K > 1) {
    // Forbid about a third of the transitions but keep i -> i, so every tag stays reachable.
    std::uniform_int_distribution<int> pick(0, 2);
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j)
        if (i != j && pick(rng) == 0) p.transitions[i * K + j] = -1e4;
    p.start[K - 1] = -1e4;
  }
  std::uniform_int_distribution<int> tag(0, K - 1);
  for (int64_t t = 0; t < L; ++t) p.tags.push_back(tag(rng));
  return p;
}

double path_score(const Problem& p, const std::vector<int64_t>& y) {
  double s = p.start[y[0]] + p.end[y[p.L - 1]];
  for (int64_t t = 0; t < p.L; ++t) s += p.emissions[t * p.K + y[t]];
  for (int64_t t = 1; t < p.L; ++t) s += p.transitions[y[t - 1] * p.K + y[t]];
  return s;
}

// Every path of the problem, by brute force: log Z, the marginals of tags and transitions, the best path.
struct BruteForce {
  double log_z, best_score;
  std::vector<int64_t> best_path;
  std::vector<double> unary;     // (L, K)
  std::vector<double> pairwise;  // (K, K) summed over t
  std::vector<double> first, last;
};

BruteForce brute_force(const Problem& p) {
  const int K = p.K;
  const int64_t L = p.L;
  std::vector<std::vector<int64_t>> paths;
  std::vector<double> scores;
  std::vector<int64_t> y(L, 0);
  while (true) {
    paths.push_back(y);
    scores.push_back(path_score(p, y));
    int64_t t = L - 1;
    while (t >= 0 && y[t] == K - 1) y[t--] = 0;
    if (t < 0) break;
    ++y[t];
  }
  BruteForce r{0, -INFINITY, {}, std::vector<double>(L * K, 0), std::vector<double>(K * K, 0),
               std::vector<double>(K, 0), std::vector<double>(K, 0)};
  double m = -INFINITY;
  for (size_t n = 0; n < paths.size(); ++n) {
    m = std::max(m, scores[n]);
    if (scores[n] > r.best_score) {  // strict: the first (lowest tags in lexicographic order) wins ties
      r.best_score = scores[n];
      r.best_path = paths[n];
    }
  }
  double z = 0;
  for (double s : scores) z += std::exp(s - m);
  r.log_z = m + std::log(z);
  for (size_t n = 0; n < paths.size(); ++n) {
    const double prob = std::exp(scores[n] - r.log_z);
    const auto& path = paths[n];
    for (int64_t t = 0; t < L; ++t) r.unary[t * K + path[t]] += prob;
    for (int64_t t = 1; t < L; ++t) r.pairwise[path[t - 1] * K + path[t]] += prob;
    r.first[path[0]] += prob;
    r.last[path[L - 1]] += prob;
  }
  return r;
}

// The kernels on one problem in precision T.
template <typename T>
struct Run {
  double log_z, gold, viterbi_score;
  std::vector<int64_t> viterbi_path;
  std::vector<T> grad_emissions, grad_transitions, grad_start, grad_end, marginals;
};

template <typename T>
Run<T> run_kernels(const Problem& p, T g) {
  const int K = p.K;
  const int64_t L = p.L;
  std::vector<T> emissions(p.emissions.begin(), p.emissions.end());
  std::vector<T> transitions(p.transitions.begin(), p.transitions.end());
  std::vector<T> start(p.start.begin(), p.start.end()), end(p.end.begin(), p.end.end());
  std::vector<T> tables(2 * K + 2 * K * K);
  Tables<T> tab{K, transitions.data(), start.data(), end.data(), tables.data(), tables.data() + K,
                tables.data() + 2 * K, tables.data() + 2 * K + K * K};
  fusedloss::crf::make_tables(tab);
  std::vector<T> work(Workspace<T>::size(K));
  const auto ws = Workspace<T>::carve(work.data(), K);
  std::vector<T> alpha(L * K), scratch(2 * K);
  std::vector<double> offsets(L);

  Run<T> r;
  r.log_z = fusedloss::crf::forward(tab, emissions.data(), L, alpha.data(), offsets.data(), true, ws);
  const double log_z_unstored = fusedloss::crf::forward(tab, emissions.data(), L, scratch.data(),
                                                        static_cast<double*>(nullptr), false, ws);
  check(log_z_unstored == r.log_z, "forward without stored alpha gives the same log Z");
  r.gold = fusedloss::crf::gold_score(tab, emissions.data(), p.tags.data(), L);
  r.grad_emissions.assign(L * K, 0);
  std::vector<T> grad_t(K * K, 0);
  r.grad_start.assign(K, 0);
  r.grad_end.assign(K, 0);
  fusedloss::crf::backward<true>(tab, emissions.data(), p.tags.data(), L, alpha.data(), offsets.data(), r.log_z, g,
                                 r.grad_emissions.data(), grad_t.data(), r.grad_start.data(), r.grad_end.data(), ws);
  r.grad_transitions.assign(K * K, 0);
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) r.grad_transitions[i * K + j] = grad_t[j * K + i];
  r.marginals.assign(L * K, 0);
  fusedloss::crf::backward<false>(tab, emissions.data(), static_cast<const int64_t*>(nullptr), L, alpha.data(),
                                  offsets.data(), r.log_z, T(1), r.marginals.data(), static_cast<T*>(nullptr),
                                  static_cast<T*>(nullptr), static_cast<T*>(nullptr), ws);
  std::vector<T> viterbi_scores(2 * K), viterbi_emission(K);
  std::vector<int32_t> best_prev(K);
  std::vector<uint8_t> backpointers(L * K);
  r.viterbi_path.assign(L, -1);
  r.viterbi_score = fusedloss::crf::viterbi(tab, emissions.data(), L, viterbi_scores.data(), viterbi_emission.data(),
                                            best_prev.data(), backpointers.data(), r.viterbi_path.data());
  return r;
}

// A run of the kernels on p against brute-force enumeration; g is the gradient scale the run used.
template <typename T>
void check_run(const Problem& p, const Run<T>& got, double g, const std::string& name, double atol, double rtol) {
  const BruteForce want = brute_force(p);
  const int K = p.K;
  const int64_t L = p.L;
  const double gold = path_score(p, p.tags);
  check(close(got.log_z, want.log_z, atol, rtol), name + ": log Z");
  check(close(got.gold, gold, atol, rtol), name + ": gold score");
  bool grads = true, marginals = true;
  for (int64_t t = 0; t < L; ++t) {
    for (int k = 0; k < K; ++k) {
      const double u = want.unary[t * K + k];
      grads = grads && close(got.grad_emissions[t * K + k], g * ((p.tags[t] == k) - u), atol, rtol);
      marginals = marginals && close(got.marginals[t * K + k], u, atol, rtol);
    }
  }
  check(grads, name + ": emission gradient");
  check(marginals, name + ": marginals");
  std::vector<double> counts(K * K, 0);
  for (int64_t t = 1; t < L; ++t) counts[p.tags[t - 1] * K + p.tags[t]] += 1;
  bool trans = true;
  for (int i = 0; i < K * K; ++i) trans = trans && close(got.grad_transitions[i], g * (counts[i] - want.pairwise[i]), atol, rtol);
  check(trans, name + ": transition gradient");
  bool ends = true;
  for (int k = 0; k < K; ++k) {
    ends = ends && close(got.grad_start[k], g * ((p.tags[0] == k) - want.first[k]), atol, rtol);
    ends = ends && close(got.grad_end[k], g * ((p.tags[L - 1] == k) - want.last[k]), atol, rtol);
  }
  check(ends, name + ": start and end gradients");
  check(got.viterbi_path == want.best_path, name + ": Viterbi path");
  check(close(got.viterbi_score, want.best_score, atol, rtol), name + ": Viterbi score");
}

// The same problem through the team functions of crf_team.h with a one-lane team.
template <typename T>
Run<T> run_team_kernels(const Problem& p, T g) {
  using fusedloss::crf::SerialTeam;
  using fusedloss::crf::TeamBackwardVectors;
  const SerialTeam team;
  const int K = p.K;
  const int64_t L = p.L;
  std::vector<T> emissions(p.emissions.begin(), p.emissions.end());
  std::vector<T> transitions(p.transitions.begin(), p.transitions.end());
  std::vector<T> start(p.start.begin(), p.start.end()), end(p.end.begin(), p.end.end());
  std::vector<T> tables(2 * K + 2 * K * K), serial_tables(tables.size());
  auto carve = [&](std::vector<T>& buffer) {
    return Tables<T>{K, transitions.data(), start.data(), end.data(), buffer.data(), buffer.data() + K,
                     buffer.data() + 2 * K, buffer.data() + 2 * K + K * K};
  };
  const Tables<T> tab = carve(tables);
  fusedloss::crf::team_make_tables(team, tab);
  fusedloss::crf::make_tables(carve(serial_tables));
  check(tables == serial_tables, "team_make_tables equals make_tables");
  std::vector<T> vectors(4 * K), alpha(L * K);
  std::vector<double> offsets(L);
  const TeamBackwardVectors<T> vec{vectors.data(), vectors.data() + K, vectors.data() + 2 * K, vectors.data() + 3 * K};

  Run<T> r;
  r.log_z = fusedloss::crf::team_forward(team, tab, emissions.data(), L, vectors.data(), vectors.data() + 2 * K,
                                         alpha.data(), offsets.data());
  const double log_z_unstored = fusedloss::crf::team_forward(team, tab, emissions.data(), L, vectors.data(),
                                                             vectors.data() + 2 * K, static_cast<T*>(nullptr),
                                                             static_cast<double*>(nullptr));
  check(log_z_unstored == r.log_z, "team forward without stored alpha gives the same log Z");
  bool bad_tags = true;
  r.gold = fusedloss::crf::team_gold_score(team, tab, emissions.data(), p.tags.data(), L, &bad_tags);
  check(!bad_tags, "team gold score: tags in range");
  r.grad_emissions.assign(L * K, 0);
  std::vector<T> grad_t(K * K, 0);
  r.grad_start.assign(K, 0);
  r.grad_end.assign(K, 0);
  fusedloss::crf::team_backward<true>(team, tab, emissions.data(), p.tags.data(), L, alpha.data(), offsets.data(),
                                      r.log_z, g, r.grad_emissions.data(), grad_t.data(), r.grad_start.data(),
                                      r.grad_end.data(), vec);
  r.grad_transitions.assign(K * K, 0);
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) r.grad_transitions[i * K + j] = grad_t[j * K + i];
  r.marginals.assign(L * K, 0);
  fusedloss::crf::team_backward<false>(team, tab, emissions.data(), static_cast<const int64_t*>(nullptr), L,
                                       alpha.data(), offsets.data(), r.log_z, T(1), r.marginals.data(),
                                       static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                                       vec);
  std::vector<T> viterbi_scores(2 * K);
  std::vector<uint8_t> backpointers(L * K);
  r.viterbi_path.assign(L, -1);
  r.viterbi_score = fusedloss::crf::team_viterbi(team, tab, emissions.data(), L, viterbi_scores.data(),
                                                 backpointers.data(), r.viterbi_path.data());
  return r;
}

template <typename T>
void check_against_brute_force(const Problem& p, const std::string& name, double atol, double rtol) {
  check_run(p, run_kernels<T>(p, static_cast<T>(0.75)), 0.75, name, atol, rtol);
  check_run(p, run_team_kernels<T>(p, static_cast<T>(0.75)), 0.75, name + " team", atol, rtol);
}
void test_brute_force() {
  std::mt19937 rng(1234);
  for (int K : {1, 2, 3, 4}) {
    for (int64_t L : {1, 2, 3, 5}) {
      for (bool constrained : {false, true}) {
        const Problem p = random_problem(rng, K, L, 1.0, constrained);
        const std::string name = "K=" + std::to_string(K) + " L=" + std::to_string(L) +
                                 (constrained ? " constrained" : "");
        check_against_brute_force<double>(p, name + " double", 1e-10, 1e-10);
        check_against_brute_force<float>(p, name + " float", 2e-5, 2e-5);
      }
    }
  }
}

// Emissions in the hundreds: every column of the matrix form underflows unless guarded. With constraints,
// the only allowed predecessors of a column can be ~300 below the best tag: the exact column path.
void test_large_emissions() {
  std::mt19937 rng(99);
  for (bool constrained : {false, true}) {
    const Problem p = random_problem(rng, 4, 5, 200.0, constrained);
    const std::string name = std::string("emissions x200") + (constrained ? " constrained" : "");
    check_against_brute_force<double>(p, name + " double", 1e-9, 1e-12);
    // Float32 holds scores of ~1000 to ~1e-4; marginals are 0/1-like here.
    check_against_brute_force<float>(p, name + " float", 2e-3, 1e-6);
  }
}

// Long sequences: float32 log Z against float64 within the rounding of float32 sums of that size.
void test_long_sequence() {
  std::mt19937 rng(7);
  for (double scale : {1.0, 100.0}) {
    const Problem p = random_problem(rng, 9, 2000, scale, true);
    const Run<double> want = run_kernels<double>(p, 1.0);
    const Run<float> got = run_kernels<float>(p, 1.0f);
    // Each step rounds its own increment of log Z (the offsets add up in float64): eps * |log Z| in all.
    const double tolerance = 1.2e-7 * std::abs(want.log_z);
    check(close(got.log_z, want.log_z, tolerance, 0), "T=2000 scale=" + std::to_string(scale) + ": float32 log Z");
    check(std::isfinite(want.log_z), "T=2000: finite log Z");
    // Viterbi scores are normalized per step too: float32 rounds each step's increment only.
    check(close(got.viterbi_score, want.viterbi_score, 0, 1.2e-7),
          "T=2000 scale=" + std::to_string(scale) + ": float32 Viterbi score");
    const Run<float> team = run_team_kernels<float>(p, 1.0f);
    check(close(team.log_z, want.log_z, tolerance, 0),
          "T=2000 scale=" + std::to_string(scale) + ": team float32 log Z");
    check(team.viterbi_path == got.viterbi_path && team.viterbi_score == got.viterbi_score,
          "T=2000 scale=" + std::to_string(scale) + ": team Viterbi equals the serial one");
    double row_error = 0;
    for (int64_t t = 0; t < p.L; ++t) {
      double sum = 0;
      for (int k = 0; k < p.K; ++k) sum += want.marginals[t * p.K + k];
      row_error = std::max(row_error, std::abs(sum - 1));
    }
    char error[32];
    std::snprintf(error, sizeof error, "%.3g", row_error);
    // The exponent alpha + beta - log Z cancels terms of size |log Z|; each of the L steps rounds them.
    const double sum_tolerance = 1.2e-16 * static_cast<double>(p.L) * std::abs(want.log_z);
    check(row_error < sum_tolerance, "T=2000 scale=" + std::to_string(scale) + ": marginals sum to 1, error " + error);
  }
}

// A forbidden transition gets exactly zero pairwise mass and no NaN anywhere, also when every path the
// gold tags take is forbidden (the gold score is then ~-1e4, still finite).
void test_forbidden_gold_path() {
  std::mt19937 rng(5);
  Problem p = random_problem(rng, 3, 4, 1.0, false);
  p.transitions[0 * 3 + 1] = -1e4;
  p.tags = {0, 1, 1, 2};
  const Run<float> got = run_kernels<float>(p, 1.0f);
  bool finite = std::isfinite(got.log_z) && std::isfinite(got.gold);
  for (float v : got.grad_emissions) finite = finite && std::isfinite(v);
  for (float v : got.grad_transitions) finite = finite && std::isfinite(v);
  check(finite, "forbidden gold path: finite values and gradients");
  // d/dA[0,1]: gold count 1 minus a pairwise marginal of exactly 0.
  check(got.grad_transitions[0 * 3 + 1] == 1.0f, "forbidden transition: marginal exactly 0");
}

// A heap buffer of exactly n values, filled with `fill`. n = 0 is a zero-size allocation: a valid pointer with no
// element behind it, so that under AddressSanitizer any read or write through it (tags[-1], out[(L-1)*K + k],
// path[L-1] for L = 0) is a reported heap-buffer-overflow rather than a silent read of a neighbour's memory.
template <typename V>
struct Exact {
  std::unique_ptr<V[]> buffer;
  int64_t size;
  explicit Exact(int64_t n, V fill = V(0)) : buffer(new V[static_cast<size_t>(n)]), size(n) {
    for (int64_t i = 0; i < n; ++i) buffer[i] = fill;
  }
  template <typename W>
  explicit Exact(const std::vector<W>& values) : Exact(static_cast<int64_t>(values.size())) {
    for (int64_t i = 0; i < size; ++i) buffer[i] = static_cast<V>(values[i]);
  }
  V* get() const { return buffer.get(); }
  bool all(V value) const {
    for (int64_t i = 0; i < size; ++i)
      if (!(buffer[i] == value)) return false;
    return true;
  }
};

// The parameters and tables of a problem, each in its own exact buffer.
template <typename T>
struct ExactTables {
  Exact<T> transitions, start, end, tables;
  Tables<T> tab;
  explicit ExactTables(const Problem& p)
      : transitions(p.transitions), start(p.start), end(p.end), tables(2 * p.K + 2 * p.K * p.K),
        tab{p.K, transitions.get(), start.get(), end.get(), tables.get(), tables.get() + p.K,
            tables.get() + 2 * p.K, tables.get() + 2 * p.K + p.K * p.K} {
    fusedloss::crf::team_make_tables(fusedloss::crf::SerialTeam{}, tab);
  }
};

// A team of real lanes: one thread each, sharing every buffer (as a thread block shares its shared memory), with
// a barrier for sync() and reductions through a shared slot per lane, so the lane splits and the synchronization
// of the team functions (lane r owns tags r, r + n, ...; every lane's merge heads at [i * n + r]) run here as on
// a GPU, under AddressSanitizer too.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int n_, waiting_ = 0;
  int64_t generation_ = 0;
};

struct ThreadTeamState {
  Barrier barrier;
  std::vector<double> slots;
  explicit ThreadTeamState(int n) : barrier(n), slots(n) {}
};

struct ThreadTeam {
  ThreadTeamState* state;
  int lane, lanes;
  int rank() const { return lane; }
  int size() const { return lanes; }
  void sync() const { state->barrier.wait(); }
  template <typename V, typename Op>
  V reduce(V x, Op op) const {
    state->slots[lane] = static_cast<double>(x);
    sync();
    V y = static_cast<V>(state->slots[0]);
    for (int r = 1; r < lanes; ++r) y = op(y, static_cast<V>(state->slots[r]));
    sync();  // every lane has read the slots before the next reduction writes them
    return y;
  }
  template <typename V>
  V max(V x) const {
    return reduce(x, [](V a, V b) { return fusedloss::crf::nan_max(a, b); });
  }
  template <typename V>
  V sum(V x) const {
    return reduce(x, [](V a, V b) { return a + b; });
  }
};

// Runs body(team) on a one-lane SerialTeam (lanes = 1) or on `lanes` threads of a ThreadTeam.
template <typename Body>
void run_team(int lanes, const Body& body) {
  if (lanes == 1) {
    body(fusedloss::crf::SerialTeam{}, 0);
    return;
  }
  ThreadTeamState state(lanes);
  std::vector<std::thread> threads;
  for (int r = 0; r < lanes; ++r) threads.emplace_back([&, r] { body(ThreadTeam{&state, r, lanes}, r); });
  for (auto& thread : threads) thread.join();
}

// An empty sequence (L = 0: an all-off mask, which nothing checks on CUDA tensors) through every team function:
// log Z, the gold score, the log-likelihood and the Viterbi score are NaN, the gradients are zero, nothing is
// written to its (empty) outputs and nothing outside its buffers is touched.
template <typename T>
void check_team_empty_sequence(int K, const std::string& name) {
  using fusedloss::crf::SerialTeam;
  std::mt19937 rng(17 + K);
  const Problem p = random_problem(rng, K, 0, 1.0, false);
  const ExactTables<T> t(p);
  const SerialTeam team;
  Exact<T> emissions(0), alpha(0), out(0), vectors(4 * K), score(2 * K);
  Exact<int64_t> tags(0), path(0);
  Exact<double> offsets(0);
  Exact<uint8_t> backpointers(0);
  const double log_z = fusedloss::crf::team_forward(team, t.tab, emissions.get(), 0, vectors.get(),
                                                    vectors.get() + 2 * K, alpha.get(), offsets.get());
  check(std::isnan(log_z), name + ": log Z is NaN");
  const double log_z_unstored = fusedloss::crf::team_forward(team, t.tab, emissions.get(), 0, vectors.get(),
                                                             vectors.get() + 2 * K, static_cast<T*>(nullptr),
                                                             static_cast<double*>(nullptr));
  check(std::isnan(log_z_unstored), name + ": log Z without stored alpha is NaN");
  bool bad_tags = true;
  const double gold = fusedloss::crf::team_gold_score(team, t.tab, emissions.get(), tags.get(), 0, &bad_tags);
  check(std::isnan(gold) && std::isnan(gold - log_z) && !bad_tags, name + ": gold score and log-likelihood NaN");
  Exact<T> grad_t(K * K, T(0)), grad_start(K, T(0)), grad_end(K, T(0));
  const fusedloss::crf::TeamBackwardVectors<T> vec{vectors.get(), vectors.get() + K, vectors.get() + 2 * K,
                                                   vectors.get() + 3 * K};
  fusedloss::crf::team_backward<true>(team, t.tab, emissions.get(), tags.get(), 0, alpha.get(), offsets.get(), log_z,
                                      T(0.75), out.get(), grad_t.get(), grad_start.get(), grad_end.get(), vec);
  check(grad_t.all(T(0)) && grad_start.all(T(0)) && grad_end.all(T(0)), name + ": zero transition gradients");
  fusedloss::crf::team_backward<false>(team, t.tab, emissions.get(), static_cast<const int64_t*>(nullptr), 0,
                                       alpha.get(), offsets.get(), log_z, T(1), out.get(), static_cast<T*>(nullptr),
                                       static_cast<T*>(nullptr), static_cast<T*>(nullptr), vec);
  const double best = fusedloss::crf::team_viterbi(team, t.tab, emissions.get(), 0, score.get(), backpointers.get(),
                                                   path.get());
  check(std::isnan(best), name + ": Viterbi score is NaN");
}

void test_team_empty_sequence() {
  for (int K : {1, 3, 5}) {
    check_team_empty_sequence<float>(K, "empty sequence K=" + std::to_string(K) + " float");
    check_team_empty_sequence<double>(K, "empty sequence K=" + std::to_string(K) + " double");
  }
}

// A tag outside [0, K) at any step (the first, a middle one, the last) is reported and never used as an index:
// the team gold score is NaN and flags it, and the team backward gives the sequence a zero gradient (every
// emission row written as 0, nothing added to the transition, start and end gradients), all on exact buffers.
template <typename T>
void check_team_bad_tags(const Problem& p, const std::string& name) {
  using fusedloss::crf::SerialTeam;
  const int K = p.K;
  const int64_t L = p.L;
  const ExactTables<T> t(p);
  const SerialTeam team;
  const Exact<T> emissions(p.emissions);
  Exact<T> alpha(L * K), vectors(4 * K);
  Exact<double> offsets(L);
  const double log_z = fusedloss::crf::team_forward(team, t.tab, emissions.get(), L, vectors.get(),
                                                    vectors.get() + 2 * K, alpha.get(), offsets.get());
  check(std::isfinite(log_z), name + ": log Z finite (it reads no tag)");
  const fusedloss::crf::TeamBackwardVectors<T> vec{vectors.get(), vectors.get() + K, vectors.get() + 2 * K,
                                                   vectors.get() + 3 * K};
  for (int64_t at : {int64_t(0), L / 2, L - 1}) {
    for (int64_t bad : {int64_t(-1), int64_t(K), int64_t(K) + 7, int64_t(-1000000)}) {
      std::vector<int64_t> values = p.tags;
      values[at] = bad;
      const Exact<int64_t> tags(values);
      const std::string what = name + " tag " + std::to_string(bad) + " at " + std::to_string(at);
      bool bad_tags = false;
      const double gold = fusedloss::crf::team_gold_score(team, t.tab, emissions.get(), tags.get(), L, &bad_tags);
      check(bad_tags && std::isnan(gold) && std::isnan(gold - log_z), what + ": gold score flags it, NaN");
      Exact<T> out(L * K, T(7)), grad_t(K * K, T(0)), grad_start(K, T(0)), grad_end(K, T(0));
      fusedloss::crf::team_backward<true>(team, t.tab, emissions.get(), tags.get(), L, alpha.get(), offsets.get(),
                                          log_z, T(0.75), out.get(), grad_t.get(), grad_start.get(), grad_end.get(),
                                          vec);
      check(out.all(T(0)), what + ": emission gradient written as zero");
      check(grad_t.all(T(0)) && grad_start.all(T(0)) && grad_end.all(T(0)), what + ": zero transition gradients");
    }
  }
}

void test_team_bad_tags() {
  std::mt19937 rng(11);
  for (int K : {1, 3}) {
    for (int64_t L : {1, 2, 4}) {
      const Problem p = random_problem(rng, K, L, 1.0, false);
      const std::string name = "K=" + std::to_string(K) + " L=" + std::to_string(L);
      check_team_bad_tags<float>(p, name + " float");
      check_team_bad_tags<double>(p, name + " double");
    }
  }
}

// Partial labels: allowed (L, K) as 0/1 bytes. The brute force sums over the paths whose every tag is allowed
// (the others carry a -1e30 emission, whose exp is exactly 0 in float64); a row with no allowed tag has every
// emission replaced by that constant, so its paths read 0 there and log Z_allowed gains -1e30 once.
struct ConstrainedBruteForce {
  double log_z;  // without the -1e30 of empty rows
  int empty_rows;
  std::vector<double> unary, pairwise, first, last;
};

ConstrainedBruteForce constrained_brute_force(const Problem& p, const std::vector<uint8_t>& allowed) {
  const int K = p.K;
  const int64_t L = p.L;
  Problem q = p;
  int empty = 0;
  std::vector<bool> row_empty(L, true);
  for (int64_t t = 0; t < L; ++t) {
    for (int k = 0; k < K; ++k) row_empty[t] = row_empty[t] && allowed[t * K + k] == 0;
    if (row_empty[t]) {
      ++empty;
      for (int k = 0; k < K; ++k) q.emissions[t * K + k] = 0;
    }
  }
  std::vector<double> scores;
  std::vector<std::vector<int64_t>> paths;
  std::vector<int64_t> y(L, 0);
  while (true) {
    bool ok = true;
    for (int64_t t = 0; t < L; ++t) ok = ok && (row_empty[t] || allowed[t * K + y[t]] != 0);
    if (ok) {
      paths.push_back(y);
      scores.push_back(path_score(q, y));
    }
    int64_t t = L - 1;
    while (t >= 0 && y[t] == K - 1) y[t--] = 0;
    if (t < 0) break;
    ++y[t];
  }
  double m = -INFINITY;
  for (double s : scores) m = std::max(m, s);
  double z = 0;
  for (double s : scores) z += std::exp(s - m);
  ConstrainedBruteForce r{m + std::log(z), empty, std::vector<double>(L * K, 0), std::vector<double>(K * K, 0),
                          std::vector<double>(K, 0), std::vector<double>(K, 0)};
  for (size_t n = 0; n < paths.size(); ++n) {
    const double prob = std::exp(scores[n] - r.log_z);
    const auto& path = paths[n];
    for (int64_t t = 0; t < L; ++t)
      if (!row_empty[t]) r.unary[t * K + path[t]] += prob;  // an empty row's emissions are constants: no gradient
    for (int64_t t = 1; t < L; ++t) r.pairwise[path[t - 1] * K + path[t]] += prob;
    r.first[path[0]] += prob;
    r.last[path[L - 1]] += prob;
  }
  return r;
}

// The value and gradients of one sequence as a CUDA kernel computes them from the team functions: with allowed
// (partial labels) log Z_allowed - log Z, by the constrained recursion accumulating +g and the free one -g;
// without, log Z accumulating +g. Every buffer has exactly the sequence's size.
template <typename T>
struct PartialRun {
  double value;
  std::vector<T> grad_emissions, grad_transitions, grad_start, grad_end;
};

template <typename T>
PartialRun<T> run_team_partial(const Problem& p, const std::vector<uint8_t>* allowed_values, T g_in, int lanes = 1) {
  using fusedloss::crf::EmissionSource;
  const int K = p.K;
  const int64_t L = p.L;
  const ExactTables<T> t(p);
  const Exact<T> emissions(p.emissions);
  const Exact<uint8_t> allowed(allowed_values != nullptr ? *allowed_values : std::vector<uint8_t>());
  Exact<T> alpha(L * K), vectors(4 * K), out(L * K, T(0)), grad_t(K * K, T(0)), grad_start(K, T(0)),
      grad_end(K, T(0));
  Exact<double> offsets(L);
  const fusedloss::crf::TeamBackwardVectors<T> vec{vectors.get(), vectors.get() + K, vectors.get() + 2 * K,
                                                   vectors.get() + 3 * K};
  double result = 0;
  run_team(lanes, [&](const auto& team, int lane) {
    double value = 0;
    T g = g_in;
    if (allowed_values != nullptr) {
      const double empty = fusedloss::crf::team_empty_rows(team, allowed.get(), L, K);
      const EmissionSource<T, T> source{emissions.get(), allowed.get(), K, empty > 0};
      const double log_z_allowed = fusedloss::crf::team_forward(team, t.tab, source, L, vectors.get(),
                                                                vectors.get() + 2 * K, alpha.get(), offsets.get());
      team.sync();
      fusedloss::crf::team_backward_accumulate(team, t.tab, source, L, alpha.get(), offsets.get(), log_z_allowed, g,
                                               out.get(), grad_t.get(), grad_start.get(), grad_end.get(), vec);
      team.sync();
      value = log_z_allowed + empty * fusedloss::crf::kPartialLabelScore;
      g = -g;
    }
    const auto free = fusedloss::crf::free_source<T, T>(emissions.get(), K);
    const double log_z = fusedloss::crf::team_forward(team, t.tab, free, L, vectors.get(), vectors.get() + 2 * K,
                                                      alpha.get(), offsets.get());
    team.sync();
    fusedloss::crf::team_backward_accumulate(team, t.tab, free, L, alpha.get(), offsets.get(), log_z, g, out.get(),
                                             grad_t.get(), grad_start.get(), grad_end.get(), vec);
    if (lane == 0) result = allowed_values != nullptr ? value - log_z : log_z;
  });
  PartialRun<T> r{result, {}, std::vector<T>(K * K), {}, {}};
  r.grad_emissions.assign(out.get(), out.get() + L * K);
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) r.grad_transitions[i * K + j] = grad_t.get()[j * K + i];
  r.grad_start.assign(grad_start.get(), grad_start.get() + K);
  r.grad_end.assign(grad_end.get(), grad_end.get() + K);
  return r;
}

// want_* are the gradient of the value (before g).
template <typename T>
void check_partial_run(const PartialRun<T>& got, double want_value, const std::vector<double>& want_unary,
                       const std::vector<double>& want_pairwise, const std::vector<double>& want_first,
                       const std::vector<double>& want_last, double g, const std::string& name, double atol,
                       double rtol) {
  check(close(got.value, want_value, atol, rtol), name + ": value");
  bool ok = true;
  for (size_t i = 0; i < want_unary.size(); ++i) ok = ok && close(got.grad_emissions[i], g * want_unary[i], atol, rtol);
  check(ok, name + ": emission gradient");
  ok = true;
  for (size_t i = 0; i < want_pairwise.size(); ++i)
    ok = ok && close(got.grad_transitions[i], g * want_pairwise[i], atol, rtol);
  check(ok, name + ": transition gradient");
  ok = true;
  for (size_t i = 0; i < want_first.size(); ++i) {
    ok = ok && close(got.grad_start[i], g * want_first[i], atol, rtol);
    ok = ok && close(got.grad_end[i], g * want_last[i], atol, rtol);
  }
  check(ok, name + ": start and end gradients");
}

std::vector<double> difference(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

template <typename T>
void check_partial(const Problem& p, const std::vector<uint8_t>& allowed, const std::string& name, double atol,
                   double rtol, int lanes = 1) {
  const BruteForce free = brute_force(p);
  const ConstrainedBruteForce c = constrained_brute_force(p, allowed);
  const double g = 0.75;
  const PartialRun<T> got = run_team_partial<T>(p, &allowed, static_cast<T>(g), lanes);
  const double want = c.log_z + c.empty_rows * fusedloss::crf::kPartialLabelScore - free.log_z;
  // When the allowed sets leave only paths through forbidden transitions, log Z_allowed is about -1e4 and the
  // marginals come from exponents that cancel terms of that size: float32 rounds them to eps * |log Z|.
  if (sizeof(T) == 4) atol = std::max(atol, 1.2e-7 * std::max(std::abs(c.log_z), std::abs(free.log_z)));
  check_partial_run(got, want, difference(c.unary, free.unary), difference(c.pairwise, free.pairwise),
                    difference(c.first, free.first), difference(c.last, free.last), g, name + " partial", atol,
                    rtol);
}

template <typename T>
void check_log_partition(const Problem& p, const std::string& name, double atol, double rtol, int lanes = 1) {
  const BruteForce free = brute_force(p);
  const double g = -1.25;
  const PartialRun<T> got = run_team_partial<T>(p, nullptr, static_cast<T>(g), lanes);
  check_partial_run(got, free.log_z, free.unary, free.pairwise, free.first, free.last, g, name + " log Z", atol, rtol);
}

std::vector<uint8_t> random_allowed(std::mt19937& rng, int K, int64_t L) {
  std::uniform_int_distribution<int> kind(0, 2), tag(0, K - 1), bit(0, 1);
  std::vector<uint8_t> allowed(L * K, 1);
  for (int64_t t = 0; t < L; ++t) {
    const int what = kind(rng);  // 0: unannotated (all tags), 1: one tag, 2: a random non-empty subset
    if (what == 0) continue;
    const int keep = tag(rng);
    for (int k = 0; k < K; ++k) allowed[t * K + k] = (k == keep || (what == 2 && bit(rng))) ? 1 : 0;
  }
  return allowed;
}

// Partial-label log-likelihood and log Z through the team functions against brute force, with random allowed
// sets (unannotated rows, single tags, subsets), forbidden transitions and large emissions (the guard).
void test_team_partial() {
  std::mt19937 rng(4321);
  for (int K : {1, 2, 3, 4}) {
    for (int64_t L : {1, 2, 3, 5}) {
      for (bool constrained : {false, true}) {
        for (double scale : {1.0, 200.0}) {
          const Problem p = random_problem(rng, K, L, scale, constrained);
          const std::vector<uint8_t> allowed = random_allowed(rng, K, L);
          const std::string name = "K=" + std::to_string(K) + " L=" + std::to_string(L) +
                                   (constrained ? " constrained" : "") + (scale > 1 ? " x200" : "");
          const double float_atol = scale > 1 ? 2e-3 : 2e-5;
          check_partial<double>(p, allowed, name + " double", 1e-9, 1e-10);
          check_partial<float>(p, allowed, name + " float", float_atol, 2e-5);
          check_log_partition<double>(p, name + " double", 1e-9, 1e-10);
          check_log_partition<float>(p, name + " float", float_atol, 2e-5);
        }
      }
    }
  }
}

// One allowed tag per position is the ordinary log-likelihood of that path (value and gradient).
void test_team_partial_single_tags() {
  std::mt19937 rng(77);
  for (int K : {2, 4}) {
    const Problem p = random_problem(rng, K, 4, 1.0, true);
    std::vector<uint8_t> allowed(p.L * K, 0);
    for (int64_t t = 0; t < p.L; ++t) allowed[t * K + p.tags[t]] = 1;
    const PartialRun<double> got = run_team_partial<double>(p, &allowed, 1.0);
    const Run<double> want = run_kernels<double>(p, 1.0);
    const std::string name = "single tags K=" + std::to_string(K);
    check(close(got.value, want.gold - want.log_z, 1e-10, 1e-10), name + ": log-likelihood");
    bool ok = true;
    for (size_t i = 0; i < want.grad_emissions.size(); ++i)
      ok = ok && close(got.grad_emissions[i], want.grad_emissions[i], 1e-10, 1e-10);
    for (size_t i = 0; i < want.grad_transitions.size(); ++i)
      ok = ok && close(got.grad_transitions[i], want.grad_transitions[i], 1e-10, 1e-10);
    for (int k = 0; k < K; ++k) {
      ok = ok && close(got.grad_start[k], want.grad_start[k], 1e-10, 1e-10);
      ok = ok && close(got.grad_end[k], want.grad_end[k], 1e-10, 1e-10);
    }
    check(ok, name + ": gradients equal the log-likelihood's");
  }
}

// A position with no allowed tag (unchecked on CUDA tensors): a very negative finite value (-1e30 per such
// row), finite gradients, equal to the model where that row's emissions are constants; also every row empty.
void test_team_partial_empty_sets() {
  std::mt19937 rng(31);
  for (int K : {1, 3}) {
    for (int64_t L : {1, 3, 4}) {
      const Problem p = random_problem(rng, K, L, 1.0, true);
      for (int64_t at : {int64_t(0), L - 1, int64_t(-1)}) {
        std::vector<uint8_t> allowed = random_allowed(rng, K, L);
        if (at >= 0) {
          for (int k = 0; k < K; ++k) allowed[at * K + k] = 0;
        } else {
          allowed.assign(L * K, 0);
        }
        const std::string name = "empty allowed set K=" + std::to_string(K) + " L=" + std::to_string(L) + " at " +
                                 (at >= 0 ? std::to_string(at) : std::string("every row"));
        check_partial<double>(p, allowed, name + " double", 1e-9, 1e-10);
        check_partial<float>(p, allowed, name + " float", 2e-5, 2e-5);
        const PartialRun<float> got = run_team_partial<float>(p, &allowed, 1.0f);
        bool finite = std::isfinite(static_cast<float>(got.value)) && got.value < -1e29;
        for (float v : got.grad_emissions) finite = finite && std::isfinite(v);
        for (float v : got.grad_transitions) finite = finite && std::isfinite(v);
        check(finite, name + ": very negative finite float32 value, finite gradients");
      }
    }
  }
}

// L = 0 through the partial and log-partition functions: NaN values, nothing read or written (exact buffers of
// size 0, AddressSanitizer).
template <typename T>
void check_team_partial_empty_sequence(int K, const std::string& name) {
  std::mt19937 rng(3 + K);
  const Problem p = random_problem(rng, K, 0, 1.0, false);
  const std::vector<uint8_t> allowed;
  const PartialRun<T> partial = run_team_partial<T>(p, &allowed, T(1));
  check(std::isnan(partial.value), name + ": partial log-likelihood NaN");
  const PartialRun<T> log_z = run_team_partial<T>(p, nullptr, T(1));
  check(std::isnan(log_z.value), name + ": log Z NaN");
  bool zero = true;
  for (T v : partial.grad_transitions) zero = zero && v == T(0);
  for (int k = 0; k < K; ++k) zero = zero && partial.grad_start[k] == T(0) && partial.grad_end[k] == T(0);
  check(zero, name + ": zero gradients");
  const Exact<uint8_t> empty(0);
  check(fusedloss::crf::team_empty_rows(fusedloss::crf::SerialTeam{}, empty.get(), 0, K) == 0,
        name + ": no empty rows");
}

void test_team_partial_empty_sequence() {
  for (int K : {1, 4}) {
    check_team_partial_empty_sequence<float>(K, "partial L=0 K=" + std::to_string(K) + " float");
    check_team_partial_empty_sequence<double>(K, "partial L=0 K=" + std::to_string(K) + " double");
  }
}

// k-best Viterbi through team_kbest_viterbi with a one-lane team, on exact buffers; paths (k, L).
template <typename T>
struct KBestRun {
  std::vector<int64_t> paths;
  std::vector<double> scores;
};

template <typename T>
KBestRun<T> run_team_kbest(const Problem& p, int k, int lanes = 1) {
  const int K = p.K;
  const int64_t L = p.L;
  const ExactTables<T> t(p);
  const Exact<T> emissions(p.emissions);
  Exact<T> score(2 * K * k);
  Exact<int32_t> heads(lanes * K), backpointers(L * K * k);
  Exact<int64_t> paths(k * L, int64_t(-7));
  Exact<double> scores(k);
  run_team(lanes, [&](const auto& team, int) {
    fusedloss::crf::team_kbest_viterbi(team, t.tab, emissions.get(), L, k, score.get(), heads.get(),
                                       backpointers.get(), paths.get(), L, scores.get());
  });
  return KBestRun<T>{std::vector<int64_t>(paths.get(), paths.get() + k * L),
                     std::vector<double>(scores.get(), scores.get() + k)};
}

// Every path by brute force, best first; equal scores in the order of their reversed tag sequences (the lower
// last tag, then the lower previous tag...), which is the list-Viterbi order when every partial score ties too.
std::vector<std::pair<double, std::vector<int64_t>>> ranked_paths(const Problem& p) {
  std::vector<std::pair<double, std::vector<int64_t>>> all;
  std::vector<int64_t> y(p.L, 0);
  while (true) {
    all.emplace_back(path_score(p, y), y);
    int64_t t = p.L - 1;
    while (t >= 0 && y[t] == p.K - 1) y[t--] = 0;
    if (t < 0) break;
    ++y[t];
  }
  std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    if (a.first != b.first) return a.first > b.first;
    return std::lexicographical_compare(a.second.rbegin(), a.second.rend(), b.second.rbegin(), b.second.rend());
  });
  return all;
}

// exact: the paths must be the brute force's (float64, no near ties); otherwise each rank's score must match the
// brute force's at that rank and the returned path must have that score, distinct paths.
template <typename T>
void check_kbest(const Problem& p, int k, const std::string& name, double atol, double rtol, bool exact,
                 int lanes = 1) {
  const auto want = ranked_paths(p);
  const KBestRun<T> got = run_team_kbest<T>(p, k, lanes);
  const int64_t L = p.L;
  bool paths_ok = true, scores_ok = true, padding_ok = true;
  for (int q = 0; q < k; ++q) {
    const std::vector<int64_t> path(got.paths.begin() + q * L, got.paths.begin() + (q + 1) * L);
    if (q >= static_cast<int>(want.size())) {
      padding_ok = padding_ok && std::isinf(got.scores[q]) && got.scores[q] < 0;
      for (int64_t v : path) padding_ok = padding_ok && v == -1;
      continue;
    }
    scores_ok = scores_ok && close(got.scores[q], want[q].first, atol, rtol);
    if (exact) {
      paths_ok = paths_ok && path == want[q].second;
    } else {
      bool valid = true;
      for (int64_t v : path) valid = valid && v >= 0 && v < p.K;
      paths_ok = paths_ok && valid && close(path_score(p, path), got.scores[q], atol, rtol);
      for (int o = 0; o < q && valid; ++o)
        paths_ok = paths_ok && !std::equal(path.begin(), path.end(), got.paths.begin() + o * L);
    }
  }
  check(paths_ok, name + ": k-best paths");
  check(scores_ok, name + ": k-best scores");
  check(padding_ok, name + ": ranks past K^L padded with -1 and -inf");
}

void test_team_kbest() {
  std::mt19937 rng(2468);
  for (int K : {1, 2, 3, 4}) {
    for (int64_t L : {1, 2, 3, 5}) {
      for (bool constrained : {false, true}) {
        const Problem p = random_problem(rng, K, L, 1.0, constrained);
        const std::string base = "K=" + std::to_string(K) + " L=" + std::to_string(L) +
                                 (constrained ? " constrained" : "");
        for (int k : {1, 2, 3, 7, 40}) {
          const std::string name = base + " k=" + std::to_string(k);
          check_kbest<double>(p, k, name + " double", 1e-9, 1e-12, true);
          check_kbest<float>(p, k, name + " float", 2e-3, 2e-6, false);
        }
        // k = 1 is team_viterbi, bit for bit.
        for (bool as_double : {false, true}) {
          bool same = true;
          if (as_double) {
            const KBestRun<double> one = run_team_kbest<double>(p, 1);
            const Run<double> v = run_team_kernels<double>(p, 1.0);
            same = one.paths == v.viterbi_path && one.scores[0] == v.viterbi_score;
          } else {
            const KBestRun<float> one = run_team_kbest<float>(p, 1);
            const Run<float> v = run_team_kernels<float>(p, 1.0f);
            same = one.paths == v.viterbi_path && one.scores[0] == v.viterbi_score;
          }
          check(same, base + (as_double ? " double" : " float") + ": k=1 equals team_viterbi");
        }
      }
    }
  }
  // Every score tied (all zeros): the order of ties is the contract's (lower previous tag, then lower rank;
  // finally the lower last tag), over all K^L paths and the padding after them.
  for (int K : {2, 3}) {
    for (int64_t L : {1, 2, 3}) {
      Problem p{K, L, std::vector<double>(L * K, 0), std::vector<double>(K * K, 0), std::vector<double>(K, 0),
                std::vector<double>(K, 0), std::vector<int64_t>(L, 0)};
      int paths = 1;
      for (int64_t t = 0; t < L; ++t) paths *= K;
      const std::string name = "ties K=" + std::to_string(K) + " L=" + std::to_string(L);
      check_kbest<double>(p, paths + 3, name + " double", 0, 0, true);
      check_kbest<float>(p, paths + 3, name + " float", 0, 0, true);
    }
  }
  // A long sequence (the per-step normalization): float32 against float64 at rank 0..4.
  const Problem p = random_problem(rng, 5, 300, 1.0, true);
  const KBestRun<double> want = run_team_kbest<double>(p, 5);
  const KBestRun<float> got = run_team_kbest<float>(p, 5);
  bool ok = true;
  for (int q = 0; q < 5; ++q) ok = ok && close(got.scores[q], want.scores[q], 0, 1e-6);
  check(ok, "k-best T=300 float32 scores against float64");
}

// The same checks on teams of 2 and 3 threads (lanes owning several tags, and lanes without a tag when K is
// smaller than the team): partial log-likelihood, log Z, k-best, including empty allowed sets and L = 0.
void test_thread_team() {
  std::mt19937 rng(8642);
  for (int lanes : {2, 3}) {
    for (int K : {1, 2, 5}) {
      for (int64_t L : {0, 1, 4}) {
        const Problem p = random_problem(rng, K, L, 1.0, true);
        const std::string name = std::to_string(lanes) + " lanes K=" + std::to_string(K) + " L=" +
                                 std::to_string(L);
        if (L == 0) {
          const std::vector<uint8_t> none;
          check(std::isnan(run_team_partial<float>(p, &none, 1.0f, lanes).value) &&
                    std::isnan(run_team_partial<float>(p, nullptr, 1.0f, lanes).value),
                name + ": NaN values");
          const KBestRun<double> got = run_team_kbest<double>(p, 3, lanes);
          check(std::isnan(got.scores[0]) && std::isnan(got.scores[2]), name + ": NaN k-best scores");
          continue;
        }
        std::vector<uint8_t> allowed = random_allowed(rng, K, L);
        check_partial<double>(p, allowed, name + " double", 1e-9, 1e-10, lanes);
        check_partial<float>(p, allowed, name + " float", 2e-5, 2e-5, lanes);
        check_log_partition<double>(p, name + " double", 1e-9, 1e-10, lanes);
        for (int k = 0; k < K; ++k) allowed[(L - 1) * K + k] = 0;
        check_partial<double>(p, allowed, name + " empty last set double", 1e-9, 1e-10, lanes);
        for (int k : {1, 4, 700}) {
          check_kbest<double>(p, k, name + " k=" + std::to_string(k) + " double", 1e-9, 1e-12, true, lanes);
        }
      }
    }
  }
}

// L = 0: NaN scores for every rank, no row touched.
void test_team_kbest_empty_sequence() {
  for (int K : {1, 3}) {
    std::mt19937 rng(9 + K);
    const Problem p = random_problem(rng, K, 0, 1.0, false);
    const KBestRun<float> got = run_team_kbest<float>(p, 4);
    bool nan = true;
    for (double s : got.scores) nan = nan && std::isnan(s);
    check(nan && got.paths.empty(), "k-best L=0 K=" + std::to_string(K) + ": NaN scores");
  }
}

void test_fast_math() {
  double exp_error = 0, log_error = 0;
  for (double x = -87.0; x <= 87.0; x += 0.01) {
    const float e = fusedloss::crf::fast_exp(static_cast<float>(x));
    const double want = std::exp(static_cast<double>(static_cast<float>(x)));
    exp_error = std::max(exp_error, std::abs(e - want) / want);
    const float l = fusedloss::crf::fast_log(static_cast<float>(want));
    const double want_log = std::log(static_cast<double>(static_cast<float>(want)));
    log_error = std::max(log_error, std::abs(l - want_log) / std::max(1.0, std::abs(want_log)));
  }
  check(exp_error < 3e-7, "fast_exp within 3e-7 relative, got " + std::to_string(exp_error));
  check(log_error < 3e-7, "fast_log within 3e-7, got " + std::to_string(log_error));
  check(fusedloss::crf::fast_exp(-1e4f) == 0.0f, "fast_exp(-1e4) is exactly 0");
  check(fusedloss::crf::fast_exp(-INFINITY) == 0.0f, "fast_exp(-inf) is 0");
  // Large arguments saturate near FLT_MAX (the shared exp clamps them): far above the guard's max_scale, so rows
  // whose scale overflows still take the exact path.
  check(fusedloss::crf::fast_exp(100.0f) > fusedloss::crf::Guard<float>::max_scale * 1e13f,
        "fast_exp(100) is far above max_scale");
  check(std::isnan(fusedloss::crf::fast_exp(NAN)), "fast_exp(NaN) is NaN");
  check(fusedloss::crf::fast_exp(0.0f) == 1.0f, "fast_exp(0) is exactly 1");
}

}  // namespace

int main() {
  test_brute_force();
  test_large_emissions();
  test_long_sequence();
  test_forbidden_gold_path();
  test_team_empty_sequence();
  test_team_bad_tags();
  test_team_partial();
  test_team_partial_single_tags();
  test_team_partial_empty_sets();
  test_team_partial_empty_sequence();
  test_team_kbest();
  test_team_kbest_empty_sequence();
  test_thread_team();
  test_fast_math();
  return fusedloss_test::report();
}
