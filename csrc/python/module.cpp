// The Python extension module custom_bn._C. Importing it runs the static registrations of the
// operators (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) compiled into the same library; the
// operators themselves are reached through torch.ops.custom_bn. The module's one function,
// _build_info(), reports build_info.h to custom_bn.build_info(). Only setup.py builds this file:
// the CMake library never includes Python.
#include <Python.h>

#include "build_info.h"

namespace {

// A new Python list of str, or nullptr with the Python error set.
PyObject* string_list(const std::vector<std::string>& names) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (const std::string& name : names) {
    PyObject* item = PyUnicode_FromString(name.c_str());
    const bool appended = item != nullptr && PyList_Append(list, item) == 0;
    Py_XDECREF(item);
    if (!appended) {
      Py_DECREF(list);
      return nullptr;
    }
  }
  return list;
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* compiled = string_list(custom_bn::cpu_capabilities_compiled());
  if (compiled == nullptr) return nullptr;
  PyObject* archs = string_list(custom_bn::cuda_architectures());
  if (archs == nullptr) {
    Py_DECREF(compiled);
    return nullptr;
  }
  return Py_BuildValue("{s:s,s:N,s:O,s:O,s:N,s:s}", "cpu_capability",
                       custom_bn::cpu_capability().c_str(), "cpu_capabilities_compiled", compiled,
                       "openmp", custom_bn::built_with_openmp() ? Py_True : Py_False, "cuda",
                       custom_bn::built_with_cuda() ? Py_True : Py_False, "cuda_architectures",
                       archs, "torch_compiled_against",
                       custom_bn::torch_version_compiled_against().c_str());
}

PyMethodDef methods[] = {
    {"_build_info", build_info, METH_NOARGS, "What custom_bn was built with (see build_info.h)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef custom_bn_module = {PyModuleDef_HEAD_INIT, "_C", "custom_bn operator library", -1,
                                methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&custom_bn_module); }
