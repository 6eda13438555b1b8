// The build facts module nto_ext._C. The nto operators (schemas, reference and fake
// implementations) are defined in Python, nto_ext/ops.py; this library only adds kernels,
// per backend, in csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL).
#include <Python.h>

#ifndef NTO_TORCH_VERSION
#define NTO_TORCH_VERSION "unknown"
#endif

// Read from the file by nto_ext/ops.py before loading, to refuse a stale build.
extern "C" __attribute__((used, visibility("default")))
const char nto_build_marker[] = "nto-ext-built-against-torch:" NTO_TORCH_VERSION "\0";

// A plain CPython module (no pybind11: keeps the build lean) holding build facts.
static struct PyModuleDef nto_module = {PyModuleDef_HEAD_INIT, "_C",
                                        "nto_ext compiled ops (torch.ops.nto.*)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&nto_module);
  if (!m) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", NTO_TORCH_VERSION);
#ifdef NTO_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddIntConstant(m, "cxx11_abi", _GLIBCXX_USE_CXX11_ABI);
  return m;
}
