// Python entry point of a forgetkern extension module. The module itself is empty: importing it loads the
// shared library, whose static TORCH_LIBRARY registrations add the ops to torch.ops.forgetkern_cpu /
// torch.ops.forgetkern_cuda. The module name comes from -DFK_MODULE_NAME=<name> (e.g. _C or _cuda).
#include <Python.h>

#ifndef FK_MODULE_NAME
#error "compile with -DFK_MODULE_NAME=<extension module name>"
#endif

#define FK_STR_(x) #x
#define FK_STR(x) FK_STR_(x)
#define FK_CONCAT_(a, b) a##b
#define FK_CONCAT(a, b) FK_CONCAT_(a, b)

static struct PyModuleDef fk_module_def = {
    PyModuleDef_HEAD_INIT,
    "forgetkern." FK_STR(FK_MODULE_NAME),
    "forgetkern compiled kernels; the ops are registered with torch.ops on import.",
    0,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC FK_CONCAT(PyInit_, FK_MODULE_NAME)(void) { return PyModule_Create(&fk_module_def); }
