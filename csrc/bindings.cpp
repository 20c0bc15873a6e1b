// lorabench._C: the compiled kernels of lorabench.
//
// Op schemas and fake (meta) implementations are defined once, in Python
// (lorabench/ops/*.py, through torch.library). Each op family registers its
// backend kernels with TORCH_LIBRARY_IMPL in its own binding file
// (csrc/<family>_ops.cpp); those files are the only ones that include torch
// headers next to csrc/cpu/*. The .cu files in csrc/cuda/ include only CUDA
// headers and are launched from the binding files through plain C++ launchers.
//
// This file only makes the shared object importable as a Python module and
// reports what it was built with.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorabench compiled kernels (registered as torch.library ops in the lorabench namespace)";
#ifdef LORABENCH_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef __AVX512F__
  m.attr("simd") = "avx512";
#elif defined(__AVX2__)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "none";
#endif
}
