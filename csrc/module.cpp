// The Python module fusedloss._C. The ops themselves are registered with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in each family's files); importing this module
// loads them. WITH_CUDA tells the dispatcher in Python whether CUDA kernels were built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FUSEDLOSS_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
