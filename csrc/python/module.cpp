// The Python extension module custom_bn._C. Importing it runs the static registrations of the
// operators (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) compiled into the same library; the
// operators themselves are reached through torch.ops.custom_bn. Only setup.py builds this file:
// the CMake library never includes Python.
#include <Python.h>

static PyModuleDef custom_bn_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "custom_bn operator library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&custom_bn_module); }
