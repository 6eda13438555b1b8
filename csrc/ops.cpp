// The nto op library: schemas (one place) and the build facts module.
// Kernels are registered per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// implementations are registered from Python (nto_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

#ifndef NTO_TORCH_VERSION
#define NTO_TORCH_VERSION "unknown"
#endif

// Read from the file by nto_ext/ops.py before loading, to refuse a stale build.
extern "C" __attribute__((used, visibility("default")))
const char nto_build_marker[] = "nto-ext-built-against-torch:" NTO_TORCH_VERSION "\0";

TORCH_LIBRARY(nto, m) {
  m.def(
      "param_stats(Tensor[] tensors, bool histogram=True) -> (Tensor numel, Tensor sumsq, "
      "Tensor absmax, Tensor hist)");
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor?[] indices, Tensor[] steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay) -> ()");
  m.def("select_topk(Tensor[] tensors, int k) -> Tensor[]");
  m.def("remap_state(Tensor[] old_indices, Tensor[] new_indices, Tensor[] states) -> Tensor[]");
  m.def("gather_accumulate_(Tensor[] dense, Tensor[] indices, Tensor(a!)[] compact) -> ()");
}

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
