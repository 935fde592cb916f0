// Run-time choice of the vector ISA for the CPU kernels. The extension is built for the baseline x86-64 ISA (the
// wheel must run on any x86-64); a job's loops are compiled again for AVX2 + FMA and for AVX-512 (F, BW, VL, DQ),
// and the best variant the CPU has runs. A job is a struct with `void run(int64_t begin, int64_t end) const` marked
// FUSEDLOSS_INLINE, so that its loops (and the always-inline kernel functions they call) are compiled into each
// variant below; `static constexpr bool kContract = true` lets the AVX2 and AVX-512 variants fuse multiply-adds
// (results then differ from the baseline variant's in the last bits); a `run_wide` member runs instead of `run`
// in the AVX-512 variant (loops written for 16 float lanes), a `run_avx2` member in the AVX2 variant (8 float
// lanes with AVX2's variable permute).
#pragma once

#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/common.h"

namespace fusedloss {
namespace cpu {

#if defined(__GNUC__) && defined(__x86_64__)
#define FUSEDLOSS_CPU_AVX2 1
#endif

// FUSEDLOSS_CPU_ISA=baseline or =avx2 (read once, at the first kernel call) caps the variant every job runs in:
// to compare the variants on the same inputs (tests/test_cpu_isa.py) or to rule one out.
inline bool isa_capped_at(const char* variant) {
  const char* value = std::getenv("FUSEDLOSS_CPU_ISA");
  return value != nullptr && std::strcmp(value, variant) == 0;
}

inline bool has_avx2_fma() {
#ifdef FUSEDLOSS_CPU_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !isa_capped_at("baseline");
  return has;
#else
  return false;
#endif
}

inline bool has_avx512() {
#ifdef FUSEDLOSS_CPU_AVX2
  static const bool has = has_avx2_fma() && !isa_capped_at("avx2") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// The variant the jobs run in: "avx512", "avx2" (AVX2 + FMA) or "baseline" (x86-64 SSE2, or the compiler's
// default ISA).
inline const char* active_isa() { return has_avx512() ? "avx512" : has_avx2_fma() ? "avx2" : "baseline"; }

template <typename Job>
void run_baseline(const Job& job, int64_t begin, int64_t end) {
  job.run(begin, end);
}

#ifdef FUSEDLOSS_CPU_AVX2
// A job with `void run_avx2(int64_t, int64_t) const` runs it in the AVX2 variant (and in the AVX-512 one where it
// has no run_wide): loops over 8 float lanes that use AVX2's variable permute of 8 floats (vpermps), which the
// baseline variant would lower to scalar code.
template <typename Job, typename = void>
struct HasRunAvx2 {
  static constexpr bool value = false;
};
template <typename Job>
struct HasRunAvx2<Job, std::void_t<decltype(std::declval<const Job&>().run_avx2(int64_t(0), int64_t(0)))>> {
  static constexpr bool value = true;
};

template <typename Job>
FUSEDLOSS_INLINE void run_permuting(const Job& job, int64_t begin, int64_t end) {
  if constexpr (HasRunAvx2<Job>::value) {
    job.run_avx2(begin, end);
  } else {
    job.run(begin, end);
  }
}

// Without contraction (GCC contracts by default in C++ once FMA is there): every result is the same, bit for
// bit, as the baseline variant's.
template <typename Job>
__attribute__((target("avx2,fma"), optimize("fp-contract=off"))) void run_avx2(const Job& job, int64_t begin,
                                                                                 int64_t end) {
  run_permuting(job, begin, end);
}

// With a * b + c fused into one rounding (jobs whose Job::kContract is true: their tests allow it).
template <typename Job>
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void run_avx2_contract(const Job& job,
                                                                                           int64_t begin,
                                                                                           int64_t end) {
  run_permuting(job, begin, end);
}

#define FUSEDLOSS_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"
// A job with `void run_wide(int64_t, int64_t) const` runs it in the AVX-512 variant: its loops over 16 float
// lanes (GCC vectors), which the other variants would lower to scalar code.
template <typename Job, typename = void>
struct HasRunWide {
  static constexpr bool value = false;
};
template <typename Job>
struct HasRunWide<Job, std::void_t<decltype(std::declval<const Job&>().run_wide(int64_t(0), int64_t(0)))>> {
  static constexpr bool value = true;
};

template <typename Job>
FUSEDLOSS_INLINE void run_widest(const Job& job, int64_t begin, int64_t end) {
  if constexpr (HasRunWide<Job>::value) {
    job.run_wide(begin, end);
  } else {
    run_permuting(job, begin, end);
  }
}

template <typename Job>
__attribute__((target(FUSEDLOSS_AVX512_TARGET), optimize("fp-contract=off"))) void run_avx512(const Job& job,
                                                                                               int64_t begin,
                                                                                               int64_t end) {
  run_widest(job, begin, end);
}

template <typename Job>
__attribute__((target(FUSEDLOSS_AVX512_TARGET), optimize("fp-contract=fast"))) void run_avx512_contract(
    const Job& job, int64_t begin, int64_t end) {
  run_widest(job, begin, end);
}

template <typename Job, typename = void>
struct Contracts {
  static constexpr bool value = false;
};
template <typename Job>
struct Contracts<Job, std::void_t<decltype(Job::kContract)>> {
  static constexpr bool value = Job::kContract;
};
#endif

#if defined(__x86_64__)
// Subnormal numbers as IEEE 754 has them for the duration of a job, whatever the thread's flush-to-zero and
// denormals-are-zero flags (MXCSR bits 15 and 6) say, then the thread's own flags back. Threads of one process
// can differ there: a library built with -ffast-math sets both in the thread that loads it (as torch.compile's
// compiled kernels may), and torch.set_flush_denormal sets the calling thread's. A job's results then depended on
// which thread ran which range, so the same call gave different bits at 1 and 2 threads.
class IeeeSubnormals {
 public:
  IeeeSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFlushBits); }
  ~IeeeSubnormals() { _mm_setcsr(saved_); }
  IeeeSubnormals(const IeeeSubnormals&) = delete;
  IeeeSubnormals& operator=(const IeeeSubnormals&) = delete;

 private:
  static constexpr unsigned int kFlushBits = 0x8040u;  // FTZ | DAZ
  unsigned int saved_;
};
#else
struct IeeeSubnormals {};
#endif

// job.run(begin, end) in the best variant this CPU runs.
template <typename Job>
void run(const Job& job, int64_t begin, int64_t end) {
  const IeeeSubnormals subnormals;
#ifdef FUSEDLOSS_CPU_AVX2
  if (has_avx512()) {
    if constexpr (Contracts<Job>::value) {
      run_avx512_contract(job, begin, end);
    } else {
      run_avx512(job, begin, end);
    }
    return;
  }
  if (has_avx2_fma()) {
    if constexpr (Contracts<Job>::value) {
      run_avx2_contract(job, begin, end);
    } else {
      run_avx2(job, begin, end);
    }
    return;
  }
#endif
  run_baseline(job, begin, end);
}

// Rows per parallel task for rows of num_classes classes: about 32K elements of work, a row counting as 32 more
// elements than it has (its max, log and loss cost about as much as 32 elements' exps: a 4096 x 2 call made one
// task, which left the second thread idle for three quarters of the time the call took), so that scheduling costs
// nothing next to a task's work, yet small row counts of large C still split over the threads.
inline int64_t rows_per_task(int64_t num_classes) {
  constexpr int64_t kElementsPerTask = 32768, kRowElements = 32;
  return std::max<int64_t>(1, kElementsPerTask / (std::max<int64_t>(0, num_classes) + kRowElements));
}

// [0, n) split over the threads in ranges of at least grain_size.
template <typename Job>
void run_parallel(const Job& job, int64_t n, int64_t grain_size = 1) {
  at::parallel_for(0, n, grain_size, [&](int64_t begin, int64_t end) { run(job, begin, end); });
}

}  // namespace cpu
}  // namespace fusedloss
