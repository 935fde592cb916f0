// The cuda backend of the CRF ops: the torch side (dtypes, allocation of outputs and workspace, the sum of the
// per-sequence transition gradients) around the torch-free kernels of csrc/cuda/crf.cu. Compiled only when
// torch has CUDA (setup.py). Same contract and dtype rules as the CPU kernels in csrc/cpu/crf.cpp.
//
// Nothing here waits for the device: sequence lengths come from the mask by a sum on the device, and mask and
// tag values are not read back. The kernels give an all-off mask or a tag outside [0, K) defined results (NaN
// log-likelihood with a zero gradient, NaN marginals, a path of -1 with a NaN score; csrc/cuda/crf.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>
#include <vector>

#include "crf_checks.h"

namespace fusedloss {
namespace crf {
namespace cuda {
// Defined in csrc/cuda/crf.cu; dtype_code: 0 float16, 1 bfloat16, 2 float32, 3 float64 (compute dtype float64
// for 3, float32 otherwise).
void launch_forward(int dtype_code, const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B,
                    int64_t T_len, int K, const void* transitions, const void* start, const void* end, void* tables,
                    void* workspace, int64_t workspace_stride, void* alpha, double* offsets, void* log_likelihood,
                    double* log_partition, cudaStream_t stream);
void launch_backward(int dtype_code, const void* emissions, const int64_t* tags, const int64_t* lengths, int64_t B,
                     int64_t T_len, int K, const void* transitions, const void* start, const void* end, void* tables,
                     void* workspace, int64_t workspace_stride, const void* alpha, const double* offsets,
                     const double* log_partition, const void* grad, void* grad_emissions, void* slot_grads,
                     cudaStream_t stream);
void launch_marginals(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                      const void* transitions, const void* start, const void* end, void* tables, void* workspace,
                      int64_t workspace_stride, void* alpha, double* offsets, void* marginals, cudaStream_t stream);
void launch_viterbi(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len, int K,
                    const void* transitions, const void* start, const void* end, void* workspace,
                    int64_t workspace_stride, void* backpointers, int64_t* paths, void* scores, cudaStream_t stream);
void launch_partial_forward(int dtype_code, const void* emissions, const uint8_t* allowed, const int64_t* lengths,
                            int64_t B, int64_t T_len, int K, const void* transitions, const void* start,
                            const void* end, void* tables, void* workspace, int64_t workspace_stride, void* value,
                            cudaStream_t stream);
void launch_partial_backward(int dtype_code, const void* emissions, const uint8_t* allowed, const int64_t* lengths,
                             int64_t B, int64_t T_len, int K, const void* transitions, const void* start,
                             const void* end, void* tables, void* workspace, int64_t workspace_stride, void* alpha,
                             double* offsets, const void* grad, void* grad_emissions, void* slot_grads,
                             cudaStream_t stream);
int kbest_threads(int K);
void launch_kbest_viterbi(int dtype_code, const void* emissions, const int64_t* lengths, int64_t B, int64_t T_len,
                          int K, int k, const void* transitions, const void* start, const void* end,
                          void* score_workspace, int32_t* heads_workspace, int32_t* backpointers, int64_t* paths,
                          double* scores, cudaStream_t stream);
}  // namespace cuda
}  // namespace crf

namespace {

// The compute dtype and the emissions in a dtype the kernels read (widened to float64 when transitions are).
struct Inputs {
  at::ScalarType result_dtype, dtype;
  int dtype_code;
  at::Tensor emissions, transitions, start, end, lengths;
  int64_t B, T_len;
  int K;
};

Inputs prepare(const at::Tensor& emissions_arg, const at::Tensor& mask, const at::Tensor& transitions_arg,
               const at::Tensor& start_arg, const at::Tensor& end_arg) {
  TORCH_CHECK(emissions_arg.dim() == 3, "crf: emissions must be (B, T, K), got ", emissions_arg.sizes());
  Inputs in;
  in.result_dtype = at::promote_types(emissions_arg.scalar_type(), transitions_arg.scalar_type());
  const bool wide = emissions_arg.scalar_type() == at::kDouble || transitions_arg.scalar_type() == at::kDouble;
  in.dtype = wide ? at::kDouble : at::kFloat;
  in.emissions = (wide ? emissions_arg.to(at::kDouble) : emissions_arg).contiguous();
  switch (in.emissions.scalar_type()) {
    case at::kHalf:
      in.dtype_code = 0;
      break;
    case at::kBFloat16:
      in.dtype_code = 1;
      break;
    case at::kFloat:
      in.dtype_code = 2;
      break;
    case at::kDouble:
      in.dtype_code = 3;
      break;
    default:
      TORCH_CHECK(false, "crf: emissions must be float16, bfloat16, float32 or float64, got ",
                  emissions_arg.scalar_type());
  }
  in.transitions = transitions_arg.to(in.dtype).contiguous();
  in.start = start_arg.to(in.dtype).contiguous();
  in.end = end_arg.to(in.dtype).contiguous();
  in.lengths = mask.sum(1, false, at::kLong).contiguous();
  in.B = in.emissions.size(0);
  in.T_len = in.emissions.size(1);
  in.K = static_cast<int>(in.emissions.size(2));
  return in;
}

at::Tensor make_tables(const Inputs& in) {
  return at::empty({2 * in.K + 2 * static_cast<int64_t>(in.K) * in.K}, in.emissions.options().dtype(in.dtype));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_forward_cuda(
    const at::Tensor& emissions_arg, const at::Tensor& tags_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    bool save_for_backward) {
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  const at::Tensor tags = tags_arg.to(at::kLong).contiguous();
  const auto opts = in.emissions.options().dtype(in.dtype);
  const auto opts64 = in.emissions.options().dtype(at::kDouble);
  at::Tensor log_likelihood = at::empty({in.B}, opts);
  at::Tensor log_partition = at::empty({in.B}, opts64);
  at::Tensor alpha = save_for_backward ? at::empty({in.B, in.T_len, in.K}, opts) : at::empty({0}, opts);
  at::Tensor offsets = save_for_backward ? at::empty({in.B, in.T_len}, opts64) : at::empty({0}, opts64);
  at::Tensor tables = make_tables(in);
  at::Tensor workspace = at::empty({in.B, 3 * static_cast<int64_t>(in.K)}, opts);
  crf::cuda::launch_forward(in.dtype_code, in.emissions.const_data_ptr(), tags.const_data_ptr<int64_t>(),
                            in.lengths.const_data_ptr<int64_t>(), in.B, in.T_len, in.K, in.transitions.const_data_ptr(),
                            in.start.const_data_ptr(), in.end.const_data_ptr(), tables.data_ptr(), workspace.data_ptr(),
                            workspace.size(1), save_for_backward ? alpha.data_ptr() : nullptr,
                            save_for_backward ? offsets.data_ptr<double>() : nullptr, log_likelihood.data_ptr(),
                            log_partition.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {log_likelihood.to(in.result_dtype), log_partition, alpha, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_backward_cuda(
    const at::Tensor& grad_arg, const at::Tensor& emissions_arg, const at::Tensor& tags_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    const at::Tensor& log_partition_arg, const at::Tensor& alpha_arg, const at::Tensor& offsets_arg) {
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  const at::Tensor tags = tags_arg.to(at::kLong).contiguous();
  at::Tensor alpha = alpha_arg.to(in.dtype).contiguous();
  at::Tensor offsets = offsets_arg.to(at::kDouble).contiguous();
  at::Tensor log_partition = log_partition_arg.to(at::kDouble).contiguous();
  if (alpha.numel() == 0) {
    // The forward ran without saving: run it again, saving.
    auto saved = crf_log_likelihood_forward_cuda(emissions_arg, tags_arg, mask, transitions_arg, start_arg, end_arg,
                                                 true);
    alpha = std::get<2>(saved);
    offsets = std::get<3>(saved);
    log_partition = std::get<1>(saved);
  }
  const at::Tensor grad = grad_arg.to(in.dtype).contiguous();
  const auto opts = in.emissions.options().dtype(in.dtype);
  const int64_t slot_size = static_cast<int64_t>(in.K) * in.K + 2 * in.K;
  at::Tensor slot_grads = at::zeros({in.B, slot_size}, opts);
  at::Tensor grad_emissions = at::empty_like(in.emissions);
  at::Tensor tables = make_tables(in);
  at::Tensor workspace = at::empty({in.B, 4 * static_cast<int64_t>(in.K)}, opts);
  crf::cuda::launch_backward(in.dtype_code, in.emissions.const_data_ptr(), tags.const_data_ptr<int64_t>(),
                             in.lengths.const_data_ptr<int64_t>(), in.B, in.T_len, in.K,
                             in.transitions.const_data_ptr(), in.start.const_data_ptr(), in.end.const_data_ptr(),
                             tables.data_ptr(), workspace.data_ptr(), workspace.size(1), alpha.const_data_ptr(),
                             offsets.const_data_ptr<double>(), log_partition.const_data_ptr<double>(),
                             grad.const_data_ptr(), grad_emissions.data_ptr(), slot_grads.data_ptr(),
                             c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t K = in.K;
  const at::Tensor total = slot_grads.sum(0);
  const at::Tensor grad_transitions = total.narrow(0, 0, K * K).view({K, K}).t().contiguous();
  return {grad_emissions.to(emissions_arg.scalar_type()), grad_transitions.to(transitions_arg.scalar_type()),
          total.narrow(0, K * K, K).to(start_arg.scalar_type()),
          total.narrow(0, K * K + K, K).to(end_arg.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_cuda(const at::Tensor& emissions_arg, const at::Tensor& mask,
                                                    const at::Tensor& transitions_arg, const at::Tensor& start_arg,
                                                    const at::Tensor& end_arg) {
  check_crf_args(emissions_arg, nullptr, &mask, transitions_arg, start_arg, end_arg);  // called directly
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  TORCH_CHECK(in.K <= 32767, "crf_viterbi: backpointers are int16, so K must be at most 32767, got ", in.K);
  const auto opts = in.emissions.options().dtype(in.dtype);
  at::Tensor paths = at::empty({in.B, in.T_len}, in.emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({in.B}, opts);
  at::Tensor workspace = at::empty({in.B, 2 * static_cast<int64_t>(in.K)}, opts);
  // Backpointers in the narrowest type that holds a tag index (B * T * K bytes for K <= 256).
  at::Tensor backpointers =
      at::empty({in.B, in.T_len, in.K}, in.emissions.options().dtype(in.K <= 256 ? at::kByte : at::kShort));
  crf::cuda::launch_viterbi(in.dtype_code, in.emissions.const_data_ptr(), in.lengths.const_data_ptr<int64_t>(), in.B,
                            in.T_len, in.K, in.transitions.const_data_ptr(), in.start.const_data_ptr(),
                            in.end.const_data_ptr(), workspace.data_ptr(), workspace.size(1),
                            backpointers.data_ptr(), paths.data_ptr<int64_t>(), scores.data_ptr(),
                            c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {paths, scores.to(in.result_dtype)};
}

at::Tensor crf_marginals_cuda(const at::Tensor& emissions_arg, const at::Tensor& mask,
                              const at::Tensor& transitions_arg, const at::Tensor& start_arg,
                              const at::Tensor& end_arg) {
  check_crf_args(emissions_arg, nullptr, &mask, transitions_arg, start_arg, end_arg);  // called directly
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  const auto opts = in.emissions.options().dtype(in.dtype);
  at::Tensor marginals = at::empty({in.B, in.T_len, in.K}, opts);
  at::Tensor alpha = at::empty({in.B, in.T_len, in.K}, opts);
  at::Tensor offsets = at::empty({in.B, in.T_len}, in.emissions.options().dtype(at::kDouble));
  at::Tensor tables = make_tables(in);
  at::Tensor workspace = at::empty({in.B, 4 * static_cast<int64_t>(in.K)}, opts);
  crf::cuda::launch_marginals(in.dtype_code, in.emissions.const_data_ptr(), in.lengths.const_data_ptr<int64_t>(),
                              in.B, in.T_len, in.K, in.transitions.const_data_ptr(), in.start.const_data_ptr(),
                              in.end.const_data_ptr(), tables.data_ptr(), workspace.data_ptr(), workspace.size(1),
                              alpha.data_ptr(), offsets.data_ptr<double>(), marginals.data_ptr(),
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return marginals.to(in.result_dtype);
}

// allowed (B, T, K) bool or uint8 as bytes (bool is stored as 0/1 bytes: no conversion kernel), or an undefined
// tensor for log Z. Its values are not read here (that would wait for the device): an empty allowed set at an
// unmasked position gives a very negative value (csrc/cuda/crf.cu), not an error.
at::Tensor allowed_bytes(const at::Tensor& allowed, const at::Tensor& emissions) {
  TORCH_CHECK_VALUE(allowed.sizes() == emissions.sizes(), "allowed must have the shape of emissions ",
                    emissions.sizes(), ", got ", allowed.sizes());
  TORCH_CHECK_VALUE(allowed.scalar_type() == at::kBool || allowed.scalar_type() == at::kByte,
                    "allowed must be bool or uint8, got ", allowed.scalar_type());
  TORCH_CHECK_VALUE(allowed.device() == emissions.device(), "allowed must be on the device of emissions (",
                    emissions.device(), "), got ", allowed.device());
  return allowed.contiguous();
}

// The value of log Z_allowed - log Z (allowed defined) or log Z, (B,) in the result dtype.
at::Tensor partial_value(const Inputs& in, const at::Tensor& allowed) {
  const auto opts = in.emissions.options().dtype(in.dtype);
  at::Tensor value = at::empty({in.B}, opts);
  at::Tensor tables = make_tables(in);
  at::Tensor workspace = at::empty({in.B, 3 * static_cast<int64_t>(in.K)}, opts);
  crf::cuda::launch_partial_forward(
      in.dtype_code, in.emissions.const_data_ptr(),
      allowed.defined() ? static_cast<const uint8_t*>(allowed.const_data_ptr()) : nullptr,
      in.lengths.const_data_ptr<int64_t>(), in.B, in.T_len, in.K, in.transitions.const_data_ptr(),
      in.start.const_data_ptr(), in.end.const_data_ptr(), tables.data_ptr(), workspace.data_ptr(), workspace.size(1),
      value.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return value.to(in.result_dtype);
}

// Gradients of sum_b grad[b] * partial_value[b]; the kernel runs the forward recursions again (the forward saves
// nothing on CUDA), so alpha and its offsets are scratch here.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_gradients(
    const Inputs& in, const at::Tensor& allowed, const at::Tensor& grad_arg, const at::Tensor& emissions_arg,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg) {
  const auto opts = in.emissions.options().dtype(in.dtype);
  const at::Tensor grad = grad_arg.to(in.dtype).contiguous();
  const int64_t slot_size = static_cast<int64_t>(in.K) * in.K + 2 * in.K;
  at::Tensor slot_grads = at::zeros({in.B, slot_size}, opts);
  // In the compute dtype: the constrained and free passes add up there before one rounding to the input dtype.
  at::Tensor grad_emissions = at::empty({in.B, in.T_len, in.K}, opts);
  at::Tensor alpha = at::empty({in.B, in.T_len, in.K}, opts);
  at::Tensor offsets = at::empty({in.B, in.T_len}, in.emissions.options().dtype(at::kDouble));
  at::Tensor tables = make_tables(in);
  at::Tensor workspace = at::empty({in.B, 4 * static_cast<int64_t>(in.K)}, opts);
  crf::cuda::launch_partial_backward(
      in.dtype_code, in.emissions.const_data_ptr(),
      allowed.defined() ? static_cast<const uint8_t*>(allowed.const_data_ptr()) : nullptr,
      in.lengths.const_data_ptr<int64_t>(), in.B, in.T_len, in.K, in.transitions.const_data_ptr(),
      in.start.const_data_ptr(), in.end.const_data_ptr(), tables.data_ptr(), workspace.data_ptr(), workspace.size(1),
      alpha.data_ptr(), offsets.data_ptr<double>(), grad.const_data_ptr(), grad_emissions.data_ptr(),
      slot_grads.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t K = in.K;
  const at::Tensor total = slot_grads.sum(0);
  const at::Tensor grad_transitions = total.narrow(0, 0, K * K).view({K, K}).t().contiguous();
  return {grad_emissions.to(emissions_arg.scalar_type()), grad_transitions.to(transitions_arg.scalar_type()),
          total.narrow(0, K * K, K).to(start_arg.scalar_type()),
          total.narrow(0, K * K + K, K).to(end_arg.scalar_type())};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> crf_partial_log_likelihood_forward_cuda(
    const at::Tensor& emissions_arg, const at::Tensor& allowed_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    bool /*save_for_backward*/) {
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const at::Tensor allowed = allowed_bytes(allowed_arg, emissions_arg);
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  return {partial_value(in, allowed), {}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_partial_log_likelihood_backward_cuda(
    const at::Tensor& grad, const at::Tensor& emissions_arg, const at::Tensor& allowed_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    at::TensorList /*saved*/) {
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const at::Tensor allowed = allowed_bytes(allowed_arg, emissions_arg);
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  return partial_gradients(in, allowed, grad, emissions_arg, transitions_arg, start_arg, end_arg);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> crf_log_partition_forward_cuda(
    const at::Tensor& emissions_arg, const at::Tensor& mask, const at::Tensor& transitions_arg,
    const at::Tensor& start_arg, const at::Tensor& end_arg, bool /*save_for_backward*/) {
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  return {partial_value(in, at::Tensor()), {}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_partition_backward_cuda(
    const at::Tensor& grad, const at::Tensor& emissions_arg, const at::Tensor& mask,
    const at::Tensor& transitions_arg, const at::Tensor& start_arg, const at::Tensor& end_arg,
    at::TensorList /*saved*/) {
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  return partial_gradients(in, at::Tensor(), grad, emissions_arg, transitions_arg, start_arg, end_arg);
}

std::tuple<at::Tensor, at::Tensor> crf_kbest_viterbi_cuda(const at::Tensor& emissions_arg, const at::Tensor& mask,
                                                          const at::Tensor& transitions_arg,
                                                          const at::Tensor& start_arg, const at::Tensor& end_arg,
                                                          int64_t k) {
  check_crf_args(emissions_arg, nullptr, &mask, transitions_arg, start_arg, end_arg);  // called directly
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  const c10::cuda::CUDAGuard device_guard(emissions_arg.device());
  const Inputs in = prepare(emissions_arg, mask, transitions_arg, start_arg, end_arg);
  // Backpointers hold prev_tag * k + prev_rank in int32.
  TORCH_CHECK_VALUE(static_cast<int64_t>(in.K) * k < (int64_t(1) << 31),
                    "crf_kbest_viterbi: num_tags * k must be below 2^31, got ", in.K, " * ", k);
  const auto opts = in.emissions.options().dtype(in.dtype);
  const auto opts32 = in.emissions.options().dtype(at::kInt);
  at::Tensor paths = at::empty({in.B, k, in.T_len}, in.emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({in.B, k}, in.emissions.options().dtype(at::kDouble));
  at::Tensor score_workspace = at::empty({in.B, 2 * static_cast<int64_t>(in.K) * k}, opts);
  at::Tensor heads_workspace =
      at::empty({in.B, static_cast<int64_t>(crf::cuda::kbest_threads(in.K)) * in.K}, opts32);
  at::Tensor backpointers = at::empty({in.B, in.T_len, in.K, k}, opts32);
  crf::cuda::launch_kbest_viterbi(in.dtype_code, in.emissions.const_data_ptr(), in.lengths.const_data_ptr<int64_t>(),
                                  in.B, in.T_len, in.K, static_cast<int>(k), in.transitions.const_data_ptr(),
                                  in.start.const_data_ptr(), in.end.const_data_ptr(), score_workspace.data_ptr(),
                                  heads_workspace.data_ptr<int32_t>(), backpointers.data_ptr<int32_t>(),
                                  paths.data_ptr<int64_t>(), scores.data_ptr<double>(),
                                  c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {paths, scores.to(in.result_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("crf_partial_log_likelihood_forward", &crf_partial_log_likelihood_forward_cuda);
  m.impl("crf_partial_log_likelihood_backward", &crf_partial_log_likelihood_backward_cuda);
  m.impl("crf_log_partition_forward", &crf_log_partition_forward_cuda);
  m.impl("crf_log_partition_backward", &crf_log_partition_backward_cuda);
  m.impl("crf_kbest_viterbi", &crf_kbest_viterbi_cuda);
  m.impl("crf_log_likelihood_forward", &crf_log_likelihood_forward_cuda);
  m.impl("crf_log_likelihood_backward", &crf_log_likelihood_backward_cuda);
  m.impl("crf_viterbi", &crf_viterbi_cuda);
  m.impl("crf_marginals", &crf_marginals_cuda);
}

}  // namespace fusedloss
