// C++ tests of csrc/kernels/softmax_loss.h (no libtorch): the fused row against a naive float64
// implementation of the loss written from its formula (the per-row loss of fusedloss.cross_entropy), and
// its gradient against central finite differences of that naive loss, over every option; plus the accuracy
// of fast_exp.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "kernels/softmax_loss.h"

namespace {

using fusedloss_test::check;

struct Case {
  int64_t C;
  double eps, gamma, z, softcap;
  bool weighted, soft, ignored;
};

// The loss of one row straight from the formula, in float64.
double naive_loss(const std::vector<double>& x, int64_t y, const std::vector<double>& t, const std::vector<double>& w,
                  const Case& c) {
  const int64_t C = c.C;
  std::vector<double> s(C);
  double mx = -INFINITY;
  for (int64_t i = 0; i < C; ++i) {
    s[i] = c.softcap > 0 ? c.softcap * std::tanh(x[i] / c.softcap) : x[i];
    mx = std::max(mx, s[i]);
  }
  double sum = 0;
  for (int64_t i = 0; i < C; ++i) sum += std::exp(s[i] - mx);
  const double lse = mx + std::log(sum);
  double loss = 0;
  for (int64_t i = 0; i < C; ++i) {
    const double q = c.soft ? (1 - c.eps) * t[i] + c.eps / C : (1 - c.eps) * (i == y) + c.eps / C;
    const double lp = s[i] - lse;
    const double one_minus_p = -std::expm1(lp);
    const double factor = c.gamma == 0 ? 1.0 : (one_minus_p > 2.2250738585072014e-308 ? std::pow(one_minus_p, c.gamma) : 0.0);
    loss += -q * w[i] * factor * lp;
  }
  return loss + c.z * lse * lse;
}

// W: float lanes of the row sweeps (8; 16 in the AVX-512 variant of the CPU kernels, same results within rounding).
template <typename acc_t, int W = 8>
void run_case(const Case& c, std::mt19937& rng, double value_tol, double grad_tol) {
  using namespace fusedloss::softmax_loss;
  const int64_t C = c.C;
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> uniform(0.1, 2.0);
  std::vector<double> x(C), t(C), w(C, 1.0);
  for (auto& v : x) v = static_cast<double>(static_cast<acc_t>(normal(rng)));
  double t_sum = 0;
  for (auto& v : t) t_sum += (v = uniform(rng));
  for (auto& v : t) v = static_cast<double>(static_cast<acc_t>(v / t_sum));
  if (c.weighted)
    for (auto& v : w) v = static_cast<double>(static_cast<acc_t>(uniform(rng)));
  const int64_t y = c.ignored ? -100 : static_cast<int64_t>(rng() % C);

  Params<acc_t> prm;
  prm.num_classes = C;
  prm.label_smoothing = acc_t(c.eps);
  prm.focal_gamma = acc_t(c.gamma);
  prm.z_loss = acc_t(c.z);
  prm.softcap = acc_t(c.softcap);
  prm.inv_softcap = c.softcap > 0 ? acc_t(1.0 / c.softcap) : acc_t(0);

  std::vector<acc_t> xa(x.begin(), x.end()), ta(t.begin(), t.end()), wa(w.begin(), w.end()), grad(C);
  const acc_t scale = acc_t(0.5);
  const acc_t loss = process_row<acc_t, acc_t, acc_t, W>(xa.data(), y, c.soft ? ta.data() : nullptr,
                                                      c.weighted ? wa.data() : nullptr, prm, grad.data(), scale);
  const acc_t loss_only = process_row<acc_t, acc_t, acc_t, W>(xa.data(), y, c.soft ? ta.data() : nullptr,
                                                           c.weighted ? wa.data() : nullptr, prm, nullptr, scale);
  char name[256];
  std::snprintf(name, sizeof(name), "%s W=%d C=%lld eps=%g gamma=%g z=%g softcap=%g weighted=%d soft=%d ignored=%d",
                sizeof(acc_t) == 8 ? "double" : "float", W, static_cast<long long>(C), c.eps, c.gamma, c.z, c.softcap,
                c.weighted, c.soft, c.ignored);
  check(loss == loss_only, std::string(name) + ": loss does not depend on whether the gradient is written");

  const bool ignored = !c.soft && c.ignored;
  const double expected = ignored ? 0.0 : naive_loss(x, y, t, w, c);
  const double value_err = std::fabs(double(loss) - expected);
  if (!(value_err <= value_tol * (1 + std::fabs(expected))))
    std::printf("  loss %.17g expected %.17g\n", double(loss), expected);
  check(value_err <= value_tol * (1 + std::fabs(expected)), std::string(name) + ": loss");

  double max_err = 0, max_ref = 0;
  // Finite differences cost O(C) each: check every class of small rows, and the target plus a
  // stride of classes of large ones.
  const int64_t stride = C > 16 ? C / 16 : 1;
  for (int64_t i = 0; i < C; ++i) {
    if (i % stride != 0 && i != y) continue;
    double fd = 0;
    if (!ignored) {
      const double h = 1e-5 * std::max(1.0, std::fabs(x[i]));
      std::vector<double> xp = x, xm = x;
      xp[i] += h;
      xm[i] -= h;
      fd = double(scale) * (naive_loss(xp, y, t, w, c) - naive_loss(xm, y, t, w, c)) / (2 * h);
    }
    max_err = std::max(max_err, std::fabs(double(grad[i]) - fd));
    max_ref = std::max(max_ref, std::fabs(fd));
  }
  if (!(max_err <= grad_tol * (1 + max_ref))) std::printf("  max grad error %.3g (max |grad| %.3g)\n", max_err, max_ref);
  check(max_err <= grad_tol * (1 + max_ref), std::string(name) + ": gradient");
}

void test_fast_exp() {
  using fusedloss::fast_exp;
  double worst_float = 0, worst_double = 0;
  for (double v = -87.0; v <= 0.0; v += 0.000731) {
    const float f = static_cast<float>(v);
    worst_float = std::max(worst_float, std::fabs(double(fast_exp(f)) / std::exp(double(f)) - 1));
    worst_double = std::max(worst_double, std::fabs(fast_exp(v) / std::exp(v) - 1));
  }
  std::printf("fast_exp relative error: float %.3g, double %.3g\n", worst_float, worst_double);
  check(worst_float < 2.5e-7, "fast_exp(float) within 2 ulp");
  check(worst_double < 5e-16, "fast_exp(double) within 2 ulp");
  check(fast_exp(-1000.0f) == 0.0f && fast_exp(-1e30f) == 0.0f, "fast_exp(float) underflows to 0");
  check(std::isnan(fast_exp(NAN)) && std::isnan(fast_exp(double(NAN))), "fast_exp propagates NaN");
}

// exp of W lanes x <= 0 by the table algorithm (the AVX-512 variant's with 16 lanes, the AVX2 variant's with 8),
// applied to n floats.
// kZeroUnderflow = false: below the underflow bound about 2^-126 instead of 0, the rest the same bits.
template <int W, bool kZeroUnderflow = true>
inline __attribute__((always_inline)) void apply_exp_lanes(const float* in, float* out, int64_t n) {
  typedef typename fusedloss::FloatLanes<W>::type V;
  for (int64_t i = 0; i < n; i += W) {
    V v;
    std::memcpy(&v, in + i, sizeof(v));
    v = fusedloss::fast_exp_nonpositive_lanes<W, true, kZeroUnderflow>(v);
    std::memcpy(out + i, &v, sizeof(v));
  }
}

void exp_lanes16(const float* in, float* out, int64_t n) { apply_exp_lanes<16>(in, out, n); }
void exp_lanes8(const float* in, float* out, int64_t n) { apply_exp_lanes<8>(in, out, n); }
void exp_lanes16_unzeroed(const float* in, float* out, int64_t n) { apply_exp_lanes<16, false>(in, out, n); }
void exp_lanes8_unzeroed(const float* in, float* out, int64_t n) { apply_exp_lanes<8, false>(in, out, n); }

#if defined(__GNUC__) && defined(__x86_64__)
// The same, compiled as the extension's AVX-512 and AVX2 variants compile them (vpermps, fused multiply-adds).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"),
               optimize("fp-contract=fast"))) void exp_lanes16_avx512(const float* in, float* out, int64_t n) {
  apply_exp_lanes<16>(in, out, n);
}
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void exp_lanes8_avx2(const float* in, float* out,
                                                                                      int64_t n) {
  apply_exp_lanes<8>(in, out, n);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"),
               optimize("fp-contract=fast"))) void exp_lanes16_avx512_unzeroed(const float* in, float* out,
                                                                               int64_t n) {
  apply_exp_lanes<16, false>(in, out, n);
}
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void exp_lanes8_avx2_unzeroed(const float* in,
                                                                                               float* out, int64_t n) {
  apply_exp_lanes<8, false>(in, out, n);
}
#endif

// fast_exp_nonpositive_lanes<16> and <8, true> against std::exp in float64, as compiled here and (where the CPU has
// it) as AVX-512 or AVX2 code: relative error over [-87.33, 0] (every 2^-10 of a step, and every float in [-1, 0] at
// a stride), 1 at ±0, 0 below the underflow bound and at -inf, NaN through whatever its payload and sign.
void test_exp_lanes() {
  std::vector<float> in;
  for (double v = -87.33; v <= 0.0; v += 0.000977) in.push_back(static_cast<float>(v));
  for (float v = -1.0f; v < 0.0f; v = std::nextafter(v, 0.0f)) {
    in.push_back(v);
    for (int skip = 0; skip < 37 && v < 0.0f; ++skip) v = std::nextafter(v, 0.0f);
  }
  // The reductions' edges: |r| at ln2/32 (16 lanes) and ln2/16 (8 lanes), on both sides.
  const float specials[] = {0.0f, -0.0f, -87.3365f, -87.33654f, -87.4f, -88.0f, -103.0f, -1e30f, -INFINITY, NAN,
                            -NAN, std::nanf("0x2345"), -std::nanf("0x10"), -1e-30f, -1e-45f, -0.021660f, -0.0216617f,
                            -0.043321f, -0.0433217f, -0.0433219f, -0.129965f, -0.1299651f};
  const size_t first_special = in.size();
  for (float v : specials) in.push_back(v);
  while (in.size() % 16 != 0) in.push_back(-1.0f);
  // Each compile with and without the zeroing of underflows (kZeroUnderflow = false: the same bits from the bound
  // up, a normal number of about 2^-126 below it, -inf included, NaN through).
  typedef void (*ExpFn)(const float*, float*, int64_t);
  std::vector<std::tuple<std::string, ExpFn, ExpFn>> variants = {
      {"exp lanes16", exp_lanes16, exp_lanes16_unzeroed}, {"exp lanes8", exp_lanes8, exp_lanes8_unzeroed}};
#if defined(__GNUC__) && defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    variants.emplace_back("exp lanes16 (AVX-512)", exp_lanes16_avx512, exp_lanes16_avx512_unzeroed);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    variants.emplace_back("exp lanes8 (AVX2)", exp_lanes8_avx2, exp_lanes8_avx2_unzeroed);
#endif
  std::vector<float> e(in.size()), unzeroed(in.size());
  for (const auto& [name, zeroed_fn, unzeroed_fn] : variants) {
    zeroed_fn(in.data(), e.data(), static_cast<int64_t>(in.size()));
    unzeroed_fn(in.data(), unzeroed.data(), static_cast<int64_t>(in.size()));
    double worst = 0;
    bool specials_ok = true, unzeroed_ok = true;
    for (size_t i = 0; i < in.size(); ++i) {
      const float x = in[i];
      if (std::isnan(x)) {
        specials_ok &= std::isnan(e[i]);
        unzeroed_ok &= std::isnan(unzeroed[i]);
      } else if (x < -87.3365f) {
        specials_ok &= e[i] == 0.0f;
        unzeroed_ok &= std::isnormal(unzeroed[i]) && unzeroed[i] < 2.5e-38f;
      } else {
        worst = std::max(worst, std::fabs(double(e[i]) / std::exp(double(x)) - 1));
        specials_ok &= std::isnormal(e[i]) || e[i] == 0.0f;
        unzeroed_ok &= std::memcmp(&e[i], &unzeroed[i], sizeof(float)) == 0;
      }
      if (i >= first_special && x == 0.0f) specials_ok &= e[i] == 1.0f;
    }
    std::printf("%s relative error: %.3g\n", name.c_str(), worst);
    check(worst < 1.2e-7, name + " within 1 ulp");
    check(specials_ok, name + ": 1 at 0, 0 below the underflow bound, NaN through, no subnormal");
    check(unzeroed_ok, name + " unzeroed: the same bits from the underflow bound up, about 2^-126 below, NaN through");
  }
}

// fast_expm1 against std::expm1 in float64: relative error over [-88, 1], densely near 0 (where e^x - 1 would
// cancel) and around the switch at ±ln2/2; exact 0 at 0, -1 far below, NaN through.
void test_fast_expm1() {
  using fusedloss::fast_expm1;
  double worst = 0;
  auto visit = [&](double v) {
    const float f = static_cast<float>(v);
    const double expected = std::expm1(double(f));
    if (expected != 0) worst = std::max(worst, std::fabs(double(fast_expm1(f)) / expected - 1));
  };
  for (double v = -88.0; v <= 1.0; v += 0.000913) visit(v);
  for (double v = 1e-30; v < 0.5; v *= 1.01) {
    visit(v);
    visit(-v);
  }
  for (double v = 0.3465; v < 0.3467; v += 1e-7) {
    visit(v);
    visit(-v);
  }
  std::printf("fast_expm1 relative error: float %.3g\n", worst);
  check(worst < 3.6e-7, "fast_expm1(float) within 3 ulp");
  check(fast_expm1(0.0f) == 0.0f && fast_expm1(-200.0f) == -1.0f, "fast_expm1 exact at 0 and far below");
  check(std::isnan(fast_expm1(NAN)), "fast_expm1 propagates NaN");
}

void test_nan_row() {
  using namespace fusedloss::softmax_loss;
  Params<float> prm;
  prm.num_classes = 5;
  std::vector<float> x = {1, 2, NAN, 4, 5}, grad(5);
  const float loss = process_row<float, float, float>(x.data(), 1, nullptr, nullptr, prm, grad.data(), 1.0f);
  bool all_nan = std::isnan(loss);
  for (float g : grad) all_nan = all_nan && std::isnan(g);
  check(all_nan, "NaN in a row makes its loss and gradient NaN");
}

// process_row_tile (8 rows per tile, one per vector lane) against process_row row by row, for
// full and partial tiles with ignored rows and a NaN row; a row's result must not depend on the
// tile it sits in (bit-identical when the same rows are processed starting one row later).
// Tiles of rows [first, rows) through one compiled call site, as the extension runs them (TilesJob): the kernel
// is always inlined, so two call sites could be compiled differently (constant options propagated into one of
// them), which is not what the lane-position check below is about.
// kC: the class count fixed at compile time (0: read at run time), as the extension's AVX-512 tiles of 16 to 64
// classes.
template <typename acc_t, int R, int kC = 0>
__attribute__((noinline)) void run_tiles(int first, int rows, int64_t C, const acc_t* x, const int64_t* y,
                                         const acc_t* w, const fusedloss::softmax_loss::Params<acc_t>& prm,
                                         acc_t* grad, acc_t scale, acc_t* loss) {
  for (int n = first; n < rows; n += R)
    fusedloss::softmax_loss::process_row_tile<acc_t, acc_t, R, kC>(x + n * C, y + n, std::min(R, rows - n), w, prm,
                                                                   grad + n * C, scale, loss + n);
}

// process_row as the reference of the tiles, compiled once for any class count (noipa: no copy specialized to a
// test's constant C, in which GCC took a block's maximum for possibly unset).
template <typename acc_t>
__attribute__((noipa)) acc_t reference_row(const acc_t* x, int64_t y, const acc_t* w,
                                           const fusedloss::softmax_loss::Params<acc_t>& prm, acc_t* grad,
                                           acc_t scale) {
  return fusedloss::softmax_loss::process_row<acc_t, acc_t, acc_t>(x, y, nullptr, w, prm, grad, scale);
}

// R = 8 (kTileRows) or 16 (the AVX-512 variant's tiles; here compiled for the baseline ISA, same lanes).
template <typename acc_t, int R = fusedloss::softmax_loss::kTileRows, int kC = 0>
void test_tile(int64_t C, double eps, double gamma, double z, double softcap, bool weighted, std::mt19937& rng,
               double tol) {
  using namespace fusedloss::softmax_loss;
  const int rows = 2 * R + 3;
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> uniform(0.1, 2.0);
  std::vector<acc_t> x(rows * C), w(C), grad(rows * C), grad_ref(C), grad_shift(rows * C);
  for (auto& v : x) v = static_cast<acc_t>(normal(rng));
  for (auto& v : w) v = static_cast<acc_t>(uniform(rng));
  std::vector<int64_t> y(rows);
  for (auto& v : y) v = static_cast<int64_t>(rng() % C);
  y[3] = -100;
  y[R + 1] = -100;
  x[5 * C + C / 2] = NAN;
  Params<acc_t> prm;
  prm.num_classes = C;
  prm.label_smoothing = acc_t(eps);
  prm.focal_gamma = acc_t(gamma);
  prm.z_loss = acc_t(z);
  prm.softcap = acc_t(softcap);
  prm.inv_softcap = softcap > 0 ? acc_t(1.0 / softcap) : acc_t(0);
  const acc_t* wp = weighted ? w.data() : nullptr;
  const acc_t scale = acc_t(0.25);
  std::vector<acc_t> loss(rows), loss_shift(rows);
  run_tiles<acc_t, R, kC>(0, rows, C, x.data(), y.data(), wp, prm, grad.data(), scale, loss.data());
  // The same rows from row 1 on: every row sits in another lane of another tile.
  run_tiles<acc_t, R, kC>(1, rows, C, x.data(), y.data(), wp, prm, grad_shift.data(), scale, loss_shift.data());
  char name[200];
  std::snprintf(name, sizeof(name), "tile R=%d %s C=%lld%s eps=%g gamma=%g z=%g softcap=%g weighted=%d",
                R, sizeof(acc_t) == 8 ? "double" : "float", static_cast<long long>(C), kC != 0 ? " (fixed)" : "",
                eps, gamma, z, softcap, weighted);
  bool ok = true, same = true, nan_ok = true;
  for (int n = 0; n < rows; ++n) {
    const acc_t ref = reference_row(x.data() + n * C, y[n], wp, prm, grad_ref.data(), scale);
    const bool nan_row = n == 5;
    if (nan_row) {
      nan_ok = nan_ok && std::isnan(loss[n]);
      for (int64_t c = 0; c < C; ++c) nan_ok = nan_ok && std::isnan(grad[n * C + c]);
    } else {
      ok = ok && std::fabs(double(loss[n]) - double(ref)) <= tol * (1 + std::fabs(double(ref)));
      for (int64_t c = 0; c < C; ++c)
        ok = ok && std::fabs(double(grad[n * C + c]) - double(grad_ref[c])) <= tol * (1 + std::fabs(double(grad_ref[c])));
    }
    if (n >= 1) {
      // The same bits, or NaN on both sides: which operand's NaN an operation passes on (its sign bit) depends on
      // how the compiler ordered a commutative operation, which may differ between a vector body and its tail.
      auto same_bits = [](acc_t a, acc_t b) { return std::memcmp(&a, &b, sizeof(acc_t)) == 0 || (a != a && b != b); };
      same = same && same_bits(loss[n], loss_shift[n]);
      for (int64_t c = 0; c < C; ++c) same = same && same_bits(grad[n * C + c], grad_shift[n * C + c]);
    }
  }
  check(ok, std::string(name) + ": equals process_row");
  check(nan_ok, std::string(name) + ": NaN row is NaN (loss and gradient)");
  check(same, std::string(name) + ": bit-identical in another tile position");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_fast_exp();
  test_fast_expm1();
  test_exp_lanes();
  test_nan_row();
  for (int64_t C : {1, 2, 3, 8, 9, 16, 17, 64, 133, 256, 257, 513, 1100}) {
    for (double eps : {0.0, 0.1}) {
      for (double gamma : {0.0, 0.5, 2.0}) {
        for (double z : {0.0, 1e-2}) {
          for (double softcap : {0.0, 5.0}) {
            for (int flags = 0; flags < 6; ++flags) {
              const bool weighted = flags & 1;
              const int kind = flags >> 1;  // 0 hard, 1 soft, 2 ignored
              const Case c{C, eps, gamma, z, softcap, weighted, kind == 1, kind == 2};
              // Tolerances: float64 is limited by the finite differences (h = 1e-5, error ~h²·|l'''|);
              // float32 by rounding over C terms.
              run_case<double>(c, rng, 1e-12, 1e-7);
              run_case<float>(c, rng, 2e-5, 2e-4);
              run_case<float, 16>(c, rng, 2e-5, 2e-4);
            }
          }
        }
      }
    }
  }
  for (int64_t C : {1, 2, 5, 9, 16, 17, 37, 64, 65, 133, 256, 300, 512}) {
    for (double eps : {0.0, 0.1}) {
      for (double gamma : {0.0, 1.0, 2.0, 0.5}) {
        if (eps != 0 && gamma != 0) continue;  // focal with smoothing is not a tile row
        for (double softcap : {0.0, 5.0}) {
          for (bool weighted : {false, true}) {
            test_tile<float>(C, eps, gamma, 1e-2, softcap, weighted, rng, 1e-5);
            test_tile<float, 16>(C, eps, gamma, 1e-2, softcap, weighted, rng, 1e-5);
            test_tile<double>(C, eps, gamma, 1e-2, softcap, weighted, rng, 1e-13);
            if (C == 16) test_tile<float, 16, 16>(C, eps, gamma, 1e-2, softcap, weighted, rng, 1e-5);
            if (C == 64) test_tile<float, 16, 64>(C, eps, gamma, 1e-2, softcap, weighted, rng, 1e-5);
          }
        }
      }
    }
  }
  return fusedloss_test::report();
}
