// C++ tests of csrc/kernels/distillation.h (no libtorch): the fused row against a naive float64 implementation
// of the divergence written from its formula (forward KL, reverse KL, generalized JSD), its gradient against
// central finite differences of that naive loss, the gradient written over the student's row, rows of factor 0,
// rows longer than a block; plus the accuracy of the branch-free log1p.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "kernels/distillation.h"

namespace {

using fusedloss_test::check;
namespace dl = fusedloss::distillation;

std::vector<double> log_softmax(const std::vector<double>& z, double tau) {
  double mx = -INFINITY;
  for (double v : z) mx = std::max(mx, v / tau);
  double sum = 0;
  for (double v : z) sum += std::exp(v / tau - mx);
  std::vector<double> out(z.size());
  for (size_t i = 0; i < z.size(); ++i) out[i] = z[i] / tau - mx - std::log(sum);
  return out;
}

double naive_loss(const std::vector<double>& s, const std::vector<double>& t, double beta, double tau) {
  const auto ls = log_softmax(s, tau);
  const auto lt = log_softmax(t, tau);
  double a = 0, b = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const double ps = std::exp(ls[i]), pt = std::exp(lt[i]);
    if (beta == 0) {
      a += pt * (lt[i] - ls[i]);
    } else if (beta == 1) {
      a += ps * (ls[i] - lt[i]);
    } else {
      const double lm = std::log(beta * pt + (1 - beta) * ps);
      a += beta * pt * (lt[i] - lm);
      b += (1 - beta) * ps * (ls[i] - lm);
    }
  }
  return a + b;
}

template <typename T>
void run_case(int64_t V, double beta, double tau, double factor, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<double> s(V), t(V);
  for (int64_t i = 0; i < V; ++i) {
    s[i] = static_cast<double>(static_cast<T>(normal(rng)));
    t[i] = static_cast<double>(static_cast<T>(normal(rng)));
  }
  std::vector<T> st(s.begin(), s.end()), tt(t.begin(), t.end()), grad(V);
  dl::Params<T> prm;
  prm.num_classes = V;
  prm.mode = beta == 0 ? 0 : (beta == 1 ? 1 : 2);
  prm.beta = static_cast<T>(beta);
  prm.log_beta = prm.mode == 2 ? static_cast<T>(std::log(beta)) : T(0);
  prm.log_1m_beta = prm.mode == 2 ? static_cast<T>(std::log1p(-beta)) : T(0);
  prm.inv_tau = static_cast<T>(1.0 / tau);
  const T loss = dl::process_row<T, T>(st.data(), tt.data(), prm, static_cast<T>(factor), grad.data());
  const double expected = naive_loss(s, t, beta, tau);
  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-11;
  const std::string name = std::string(sizeof(T) == 4 ? "float" : "double") + " V=" + std::to_string(V) +
                           " beta=" + std::to_string(beta) + " tau=" + std::to_string(tau);
  check(std::abs(loss - expected) <= tol * std::max(1.0, std::abs(expected)), name + ": loss " +
        std::to_string(loss) + " vs " + std::to_string(expected));
  // the gradient against central differences of the float64 loss, at a few classes
  double worst = 0, scale = 0;
  for (int64_t k : {int64_t(0), V / 3, V - 1}) {
    std::vector<double> plus = s, minus = s;
    const double h = 1e-5;
    plus[k] += h;
    minus[k] -= h;
    const double fd = factor * (naive_loss(plus, t, beta, tau) - naive_loss(minus, t, beta, tau)) / (2 * h);
    worst = std::max(worst, std::abs(static_cast<double>(grad[k]) - fd));
    scale = std::max(scale, std::abs(fd));
  }
  check(worst <= (sizeof(T) == 4 ? 2e-5 : 1e-7) * std::max(1.0, scale), name + ": gradient off by " +
        std::to_string(worst));
  // written over the student's own row: the same gradient
  std::vector<T> over = st;
  dl::process_row<T, T>(over.data(), tt.data(), prm, static_cast<T>(factor), over.data());
  check(std::equal(over.begin(), over.end(), grad.begin()), name + ": gradient over the student's row differs");
  // factor 0: loss 0, gradient 0
  const T zero = dl::process_row<T, T>(st.data(), tt.data(), prm, T(0), grad.data());
  check(zero == T(0) && std::all_of(grad.begin(), grad.end(), [](T g) { return g == T(0); }),
        name + ": a row of factor 0 is not skipped");
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  for (int64_t V : {1, 7, 512, 1300}) {
    for (double beta : {0.0, 0.1, 0.5, 1.0}) {
      for (double tau : {0.5, 1.0, 2.0}) {
        run_case<float>(V, beta, tau, 0.75, rng);
        run_case<double>(V, beta, tau, 0.75, rng);
      }
    }
  }
  double worst_f = 0, worst_d = 0;
  for (int i = 0; i <= 1000; ++i) {
    const double e = i / 1000.0;
    worst_f = std::max(worst_f, std::abs(dl::log1p_unit<float>(static_cast<float>(e)) -
                                         std::log1p(static_cast<double>(static_cast<float>(e)))));
    worst_d = std::max(worst_d, std::abs(dl::log1p_unit<double>(e) - std::log1p(e)));
  }
  check(worst_f <= 2e-7, "log1p_unit<float> error " + std::to_string(worst_f));
  check(worst_d <= 4e-16, "log1p_unit<double> error " + std::to_string(worst_d));
  return fusedloss_test::report();
}
