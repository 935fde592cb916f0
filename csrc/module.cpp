// The Python module fusedloss._C. The ops themselves are registered with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in each family's files); importing this module
// loads them. WITH_CUDA tells the dispatcher in Python whether CUDA kernels were built; cpu_isa() which vector-ISA
// variant the CPU kernels run in.
#include <torch/extension.h>

#include "cpu/isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FUSEDLOSS_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  // Which vector-ISA variant the CPU kernels run in ("avx512", "avx2" or "baseline"; FUSEDLOSS_CPU_ISA caps it).
  m.def("cpu_isa", [] { return std::string(fusedloss::cpu::active_isa()); });
  // The op fusedloss::softmax_loss through the dispatcher's unboxed entry: the same op (autograd, every dispatch
  // key and mode below Python), without the boxing of its eleven arguments into IValues that a call through
  // torch.ops costs (about 1.5 us, as long as a one-row loss itself). fusedloss.cross_entropy calls it for plain
  // tensors outside torch.compile and torch function modes, where torch.ops would do nothing more.
  m.def(
      "softmax_loss",
      [](const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
         int64_t ignore_index, const std::string& reduction, double label_smoothing, double focal_gamma,
         double z_loss, c10::optional<double> softcap, bool mean_by_count, bool inplace_backward) {
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedloss::softmax_loss", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                               int64_t, c10::string_view, double, double, double,
                                               c10::optional<double>, bool, bool)>();
        pybind11::gil_scoped_release no_gil;
        return op.call(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap,
                       mean_by_count, inplace_backward);
      });
  // fusedloss::crf_viterbi the same way (a one-sentence decode is a few microseconds, a third of them the boxing);
  // mask None means every position on, as in the Python function of the op.
  m.def("crf_viterbi", [](const at::Tensor& emissions, const c10::optional<at::Tensor>& mask,
                          const at::Tensor& transitions, const at::Tensor& start_transitions,
                          const at::Tensor& end_transitions) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fusedloss::crf_viterbi", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&)>();
    pybind11::gil_scoped_release no_gil;
    const at::Tensor on = mask.has_value() ? *mask
                                           : at::ones({emissions.dim() > 0 ? emissions.size(0) : 0,
                                                       emissions.dim() > 1 ? emissions.size(1) : 0},
                                                      emissions.options().dtype(at::kBool));
    return op.call(emissions, on, transitions, start_transitions, end_transitions);
  });
}
