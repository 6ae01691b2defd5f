// The extension only registers kernels (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); the schemas live in
// tome_kernels/_native.py. This stub makes the shared object importable as tome_kernels._C.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "tome_kernels kernels, registered as torch.ops.tome._native_*",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
