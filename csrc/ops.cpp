// ops.cpp -- the operator schemas of expface_kernels._C (TORCH_LIBRARY) and the
// Python module object.  Kernels: csrc/cpu (CPU key), csrc/cuda (CUDA key);
// fake (meta) implementations: expface_kernels/extension.py (torch.library.register_fake).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(expface_kernels, m) {
  // Tensors as in the backend contract (expface_kernels/contract.py); block_bytes bounds
  // the logits buffer (0 = default: EXPFACE_EXT_BLOCK_BYTES, else 32 MiB on CPU and
  // chunks of 24576 classes on CUDA, see csrc/ek_driver.cpp).
  m.def(
      "lse_partials(Tensor x_hat, Tensor w, Tensor target_logit, Tensor labels, float s, int offset, "
      "int block_bytes=0) -> (Tensor row_max, Tensor row_sumexp, Tensor w_inv_norm)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "grads(Tensor x_hat, Tensor w, Tensor w_inv_norm, Tensor labels, Tensor lse, Tensor target_grad, "
      "Tensor grad_row, float s, int offset, int block_bytes=0) -> (Tensor grad_x_hat, Tensor grad_w)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "fused_forward_grads(Tensor x_hat, Tensor w, Tensor target_logit, Tensor target_factor, Tensor labels, "
      "Tensor grad_row, float s, int block_bytes=0) -> (Tensor lse, Tensor grad_x_hat, Tensor grad_w, "
      "Tensor w_inv_norm)",
      {at::Tag::pt2_compliant_tag});
  // The per-row work around the class loop (csrc/ek_prologue.h).
  m.def(
      "prologue(Tensor x, Tensor w, Tensor labels, int offset, int ignore_index, ScalarType? x_hat_dtype=None) -> "
      "(Tensor x_hat, Tensor x_inv, "
      "Tensor labels_out, Tensor kept, Tensor c_t)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "margin_terms(Tensor c_t, int margin, float m1, float m2, float m3, float s, bool exact) -> (Tensor target_logit, "
      "Tensor target_factor)",
      {at::Tag::pt2_compliant_tag});
  m.def("normalize_backward(Tensor x, Tensor x_inv, Tensor grad_x_hat) -> Tensor grad_x",
        {at::Tag::pt2_compliant_tag});
}

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef EK_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "True if this build of expface_kernels._C contains the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

// TORCH_EXTENSION_NAME: "_C" from setup.py, "expface_kernels_C" from the first-use build
// (expface_kernels/extension_build.py); Python looks for PyInit_<that name>.
#define EK_STR2(x) #x
#define EK_STR(x) EK_STR2(x)
#define EK_CAT2(a, b) a##b
#define EK_CAT(a, b) EK_CAT2(a, b)

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, EK_STR(TORCH_EXTENSION_NAME),
                       "expface_kernels C++/CUDA extension: registers the torch.ops.expface_kernels ops.", -1,
                       kMethods};

}  // namespace

// Importing the module loads the shared object, which runs the TORCH_LIBRARY
// static registrations above (and the CPU / CUDA ones in the other objects).
PyMODINIT_FUNC EK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
