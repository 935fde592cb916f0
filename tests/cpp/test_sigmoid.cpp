// C++ tests of csrc/kernels/sigmoid.h (no libtorch): fast_log and log1p_unit against the C library
// over the float32 range, the logistic terms and the BCE / focal derivatives against central finite
// differences of the float64 formulas, the GHM-C bin of every float32 edge and its neighbours, and
// the tempered normalization (the probabilities sum to 1 after enough steps, for t2 < 1 and > 1).
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "kernels/sigmoid.h"

namespace {

using fusedloss_test::check;
namespace sl = fusedloss::sigmoid_loss;

void test_fast_log() {
  double worst = 0;
  for (float x = 1e-37f; x < 1e37f; x *= 1.0137f) {
    const double err = std::fabs(sl::fast_log(x) - std::log(static_cast<double>(x)));
    worst = std::fmax(worst, err / std::fmax(std::fabs(std::log(static_cast<double>(x))), 1.0));
  }
  check(worst < 4e-7, "fast_log relative error " + std::to_string(worst));
  check(std::isinf(sl::fast_log(0.0f)) && sl::fast_log(0.0f) < 0, "fast_log(0) = -inf");
  check(std::isnan(sl::fast_log(-1.0f)) && std::isnan(sl::fast_log(NAN)), "fast_log(<0), fast_log(NaN) = NaN");
  check(std::isinf(sl::fast_log(INFINITY)), "fast_log(inf) = inf");
  check(std::fabs(sl::fast_log(1e-44f) - std::log(static_cast<double>(1e-44f))) < 1e-5, "fast_log of a subnormal");
  double worst64 = 0;
  for (double x = 1e-300; x < 1e300; x *= 1.0137) {
    const long double exact = std::log(static_cast<long double>(x));
    worst64 = std::fmax(worst64, static_cast<double>(std::fabs(sl::fast_log(x) - exact) / std::fmax(std::fabs(exact), 1.0L)));
  }
  check(worst64 < 4e-16, "fast_log (float64) relative error " + std::to_string(worst64 * 1e16) + "e-16");
  check(std::isinf(sl::fast_log(0.0)) && std::isnan(sl::fast_log(-1.0)) && std::isinf(sl::fast_log(INFINITY)),
        "fast_log (float64) special values");
  check(std::fabs(sl::fast_log(1e-320) - std::log(1e-320)) < 1e-12, "fast_log (float64) of a subnormal");
  double worst_log1p = 0;
  std::vector<float> units;
  for (float e = 1e-30f; e <= 1.0f; e *= 1.07f) units.push_back(e);
  for (float e = 0.40f; e <= 0.52f; e += 1e-5f) units.push_back(e);  // around the switch at sqrt(2) - 1
  units.push_back(1.0f);
  for (float e : units) {
    const double exact = std::log1p(static_cast<double>(e));
    worst_log1p = std::fmax(worst_log1p, std::fabs(sl::log1p_unit(e) - exact) / exact);
  }
  std::printf("log1p_unit relative error %.3g\n", worst_log1p);
  check(worst_log1p < 2e-7, "log1p_unit relative error " + std::to_string(worst_log1p));
  check(std::isnan(sl::log1p_unit(NAN)) && sl::log1p_unit(0.0f) == 0.0f && sl::log1p_unit(1e-30f) == 1e-30f,
        "log1p_unit: NaN through, exact at 0 and for tiny e");
}

double bce64(double x, double y, double pw) {
  return pw * y * std::log1p(std::exp(-x)) + (1 - y) * std::log1p(std::exp(x));
}

double focal64(double x, double y, double alpha, double gamma) {
  const double p = 1 / (1 + std::exp(-x));
  const double p_t = p * y + (1 - p) * (1 - y);
  const double a = alpha >= 0 ? alpha * y + (1 - alpha) * (1 - y) : 1.0;
  return a * std::pow(1 - p_t, gamma) * bce64(x, y, 1.0);
}

void test_elementwise_derivatives() {
  std::mt19937 rng(0);
  std::uniform_real_distribution<double> logit(-8, 8), label(0, 1);
  const double h = 1e-6;
  for (int i = 0; i < 200; ++i) {
    const double x = logit(rng), y = i % 3 == 0 ? label(rng) : (i % 2);
    const auto b = sl::bce<double>(x, y, 1.7);
    const double fd = (bce64(x + h, y, 1.7) - bce64(x - h, y, 1.7)) / (2 * h);
    check(std::fabs(b.loss - bce64(x, y, 1.7)) < 1e-12 && std::fabs(b.grad - fd) < 1e-7,
          "bce at x=" + std::to_string(x));
    for (double gamma : {0.5, 2.0, 1.5}) {
      const auto f = gamma == 2.0 ? sl::sigmoid_focal<sl::FocalPower::kSquare>(x, y, 0.25, gamma)
                                  : sl::sigmoid_focal<sl::FocalPower::kGeneral>(x, y, 0.25, gamma);
      const double fd_focal = (focal64(x + h, y, 0.25, gamma) - focal64(x - h, y, 0.25, gamma)) / (2 * h);
      check(std::fabs(f.loss - focal64(x, y, 0.25, gamma)) < 1e-12 && std::fabs(f.grad - fd_focal) < 1e-7,
            "sigmoid_focal at x=" + std::to_string(x) + " gamma=" + std::to_string(gamma));
    }
  }
  // float32 at saturation: finite, and σ(−x) formed directly (not 1 − σ(x)).
  const auto t = sl::logistic(30.0f);
  check(t.sigmoid_neg > 0 && std::fabs(t.sigmoid_neg - std::exp(-30.0)) < 1e-6 * std::exp(-30.0), "σ(-30) in float32");
  check(std::fabs(t.softplus_neg - std::exp(-30.0)) < 1e-6 * std::exp(-30.0), "softplus(-30) in float32");
  const auto big = sl::logistic(-100.0f);
  check(big.softplus == 0.0f && big.softplus_neg == 100.0f && big.sigmoid == 0.0f, "logistic(-100)");
}

void test_ghmc_bins() {
  for (int bins : {1, 3, 10, 30, 100}) {
    std::vector<float> edges(bins + 1);
    for (int i = 0; i <= bins; ++i) edges[i] = static_cast<float>(i) / static_cast<float>(bins);
    edges[bins] += 1e-6f;
    bool ok = true;
    for (int i = 0; i <= bins; ++i) {
      for (float g : {edges[i], std::nextafter(edges[i], -1.0f), std::nextafter(edges[i], 2.0f)}) {
        int expected = -1;
        for (int b = 0; b < bins; ++b)
          if (edges[b] <= g && g < edges[b + 1]) expected = b;
        ok = ok && sl::ghmc_bin(g, edges.data(), bins) == expected;
      }
    }
    ok = ok && sl::ghmc_bin(1.0f, edges.data(), bins) == bins - 1 && sl::ghmc_bin(NAN, edges.data(), bins) == -1;
    check(ok, "ghmc_bin agrees with the authors' comparisons, bins=" + std::to_string(bins));
  }
}

void test_tempered_normalization() {
  std::mt19937 rng(1);
  std::normal_distribution<double> normal(0, 3);
  const int64_t C = 1000;
  std::vector<double> a(C);
  for (double t : {0.5, 0.8, 0.7, 1.0, 1.2, 1.3, 4.0}) {
    double mx = -1e300;
    for (auto& v : a) {
      v = normal(rng);
      mx = std::fmax(mx, v);
    }
    for (auto& v : a) v -= mx;
    const sl::BiTemperedParams<double> prm(0.5, t, 60, C);
    const double lambda = sl::tempered_normalization(a.data(), prm);
    double total = 0;
    for (double v : a) {
      const double base = 1 + (1 - t) * (v - lambda);
      total += t == 1.0 ? std::exp(v - lambda) : std::pow(std::fmax(base, 0.0), 1 / (1 - t));
    }
    check(std::fabs(total - 1) < 1e-9, "tempered probabilities sum to 1, t2=" + std::to_string(t) + ": " +
                                           std::to_string(total));
  }
}

}  // namespace

int main() {
  test_fast_log();
  test_elementwise_derivatives();
  test_ghmc_bins();
  test_tempered_normalization();
  return fusedloss_test::report();
}
