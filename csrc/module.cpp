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
  // Which vector-ISA variant the CPU kernels run in ("avx2" or "baseline"; FUSEDLOSS_CPU_ISA=baseline forces it).
  m.def("cpu_isa", [] { return std::string(fusedloss::cpu::active_isa()); });
}
