// The `fanet` operator library: schemas only.  Device kernels are registered from
// csrc/cpu/ and csrc/cuda/ with TORCH_LIBRARY_IMPL; fake kernels are
// registered from Python (fanet_kernels/ops.py), following pytorch/extension-cpp; autograd in
// csrc/autograd.cpp.
#include <torch/library.h>

#ifdef FANET_PYTHON_MODULE
#include <Python.h>

#include "common/build_info.h"

namespace {
PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef FANET_WITH_CUDA
  return PyUnicode_FromString(fanet::cuda_archs().c_str());
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "The CUDA architectures the kernels were built for, as in TORCH_CUDA_ARCH_LIST (\"7.5;8.0;9.0+PTX\"); "
     "\"\" if the build did not record them; None without CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import fanet_kernels._C` loads this library, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fanet_kernels compiled ops (see torch.ops.fanet)", -1, methods};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(fanet, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // out = x + (u - x) * k[n]
  m.def("gate(Tensor x, Tensor u, Tensor k) -> Tensor", tags);
  // (out, pooled), pooled[n, c] = mean over H, W of out[n, c]
  m.def("gate_pool(Tensor x, Tensor u, Tensor k) -> (Tensor, Tensor)", tags);
  // The same with u = relu(branch + x) formed on the fly: a residual block with an identity
  // shortcut hands over its branch, and its add and ReLU run inside the gate.
  m.def("residual_gate_pool(Tensor x, Tensor branch, Tensor k) -> (Tensor, Tensor)", tags);
  // residual_gate_pool with branch = batch_norm(z): the branch's last BatchNorm folded into the
  // gate's pass.  Training: z's batch statistics, returned as (mean, var) (biased var) for the
  // caller to update its running stats; else the running stats, returned as given.  Running stats
  // are never written here.
  m.def(
      "bn_residual_gate_pool(Tensor x, Tensor z, Tensor k, Tensor weight, Tensor bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  // k'[n] = sigmoid(w2 . relu(w1 . mean_hw(x[n]) + b1) + b2)
  m.def("focus(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor", tags);
  // The MLP head alone on inputs l (N, C): k[n] = sigmoid(w2 . relu(w1 . l[n] + b1) + b2).  FA's
  // focus MLP on a pool a gate already wrote, and its association MLP on the k history.
  m.def("mlp(Tensor l, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor", tags);

  // Backward ops: -> (grad_x, grad_u, grad_k)
  m.def("gate_backward(Tensor grad_out, Tensor x, Tensor u, Tensor k) -> (Tensor, Tensor, Tensor)",
        tags);
  // grad_pooled is folded into grad_out on the fly; either may be None (no gradient).
  m.def(
      "gate_pool_backward(Tensor? grad_out, Tensor? grad_pooled, Tensor x, Tensor u, Tensor k) "
      "-> (Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_x, grad_branch, grad_k); grad_x includes the identity shortcut's share.
  m.def(
      "residual_gate_pool_backward(Tensor? grad_out, Tensor? grad_pooled, Tensor x, Tensor branch, Tensor k) "
      "-> (Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_x, grad_z, grad_k, grad_weight, grad_bias); mean, var: the forward's.
  m.def(
      "bn_residual_gate_pool_backward(Tensor? grad_out, Tensor? grad_pooled, Tensor x, Tensor z, Tensor k, "
      "Tensor weight, Tensor bias, Tensor mean, Tensor var, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)
  m.def(
      "focus_backward(Tensor grad_k, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_l, grad_w1, grad_b1, grad_w2, grad_b2)
  m.def(
      "mlp_backward(Tensor grad_k, Tensor l, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
}
