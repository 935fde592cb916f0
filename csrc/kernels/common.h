// Host/device helpers shared by the torch-free kernels in csrc/kernels (softmax losses, CRF).
// Nothing here includes torch: these headers compile in the CPU extension, under nvcc, and in the
// standalone C++ tests of CMakeLists.txt.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FUSEDLOSS_HOST_DEVICE __host__ __device__
#define FUSEDLOSS_INLINE __forceinline__
#else
#define FUSEDLOSS_HOST_DEVICE
#define FUSEDLOSS_INLINE inline __attribute__((always_inline))
#endif

// Lambdas of the row loops are inlined into their caller, so that they are compiled for the caller's instruction
// set (the CPU kernels compile each loop for baseline x86-64, AVX2 and AVX-512; a lambda does not take the target
// of the function it is written in).
#if defined(__GNUC__) && !defined(__CUDA_ARCH__)
#define FUSEDLOSS_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FUSEDLOSS_LAMBDA_INLINE
#endif

namespace fusedloss {

// A large finite negative used where -inf would be natural (masked lanes, forbidden transitions,
// the initial running max): exp() of it minus any finite score is exactly 0 in float32 and
// float64, while inf - inf = NaN cannot occur.
template <typename T>
struct Limits;

template <>
struct Limits<float> {
  static constexpr float large_negative = -1e30f;
  // Smallest positive normal number (FLT_MIN), so device code needs no <cfloat>.
  static constexpr float tiny = 1.17549435e-38f;
};

template <>
struct Limits<double> {
  static constexpr double large_negative = -1e300;
  static constexpr double tiny = 2.2250738585072014e-308;
};

template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T max_of(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE T min_of(T a, T b) {
  return a < b ? a : b;
}

// Row offsets are 64-bit: row * stride overflows int32 once N * C passes 2^31 elements.
FUSEDLOSS_HOST_DEVICE FUSEDLOSS_INLINE int64_t row_offset(int64_t row, int64_t stride) {
  return row * stride;
}

}  // namespace fusedloss
