// The `fanet` operator library: schemas only.  Device kernels are registered from
// csrc/cpu/ and csrc/cuda/ with TORCH_LIBRARY_IMPL; fake kernels are
// registered from Python (fanet_kernels/ops.py), following pytorch/extension-cpp; autograd in
// csrc/autograd.cpp.
#include <torch/library.h>

#ifdef FANET_PYTHON_MODULE
#include <Python.h>

#include "common/build_info.h"
#include "cpu/capability.h"

namespace {
PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef FANET_WITH_CUDA
  return PyUnicode_FromString(fanet::cuda_archs().c_str());
#else
  Py_RETURN_NONE;
#endif
}

// A bad FANET_CPU_CAPABILITY raises ValueError, as the ops do (c10::ValueError).
PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fanet::cpu::capability().c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* cpu_capabilities(PyObject*, PyObject*) {
  const auto names = fanet::cpu::capabilities();
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (t == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) PyTuple_SET_ITEM(t, i, PyUnicode_FromString(names[i].c_str()));
  return t;
}

PyMethodDef methods[] = {
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "The CUDA architectures the kernels were built for, as in TORCH_CUDA_ARCH_LIST (\"7.5;8.0;9.0+PTX\"); "
     "\"\" if the build did not record them; None without CUDA kernels."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The SIMD level the CPU kernels run at in this process: the best this build holds and this CPU runs "
     "(\"default\", \"avx2\", \"avx512\", \"avx512bf16\"), or the environment variable "
     "FANET_CPU_CAPABILITY's, which may name a lower one.  ValueError if that variable is invalid."},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS,
     "The SIMD levels of the CPU kernels that this build holds and this CPU runs, lowest first: "
     "the values FANET_CPU_CAPABILITY may take here."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import fanet_kernels._C` loads this library, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "fanet_kernels compiled ops (see torch.ops.fanet)", -1, methods};
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
  // The BatchNorm -> SE tail of an SE residual block inside the residual gate: S = batch_norm(z) * e
  // with e = sigmoid(se_w2 . relu(se_w1 . mean_hw(batch_norm(z)) + se_b1) + se_b2) per (n, c), then
  // residual_gate_pool's U = relu(S + x) and gate.  Also returns z's plane means z_mean (N, C) (for the
  // backward; accumulation dtype); mean, var as bn_residual_gate_pool's.
  m.def(
      "bn_se_residual_gate_pool(Tensor x, Tensor z, Tensor k, Tensor weight, Tensor bias, Tensor se_w1, "
      "Tensor se_b1, Tensor se_w2, Tensor se_b2, Tensor? running_mean, Tensor? running_var, bool training, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // The same without the gate: out = U = relu(S + x), the SE residual block's output.
  m.def(
      "bn_se_residual(Tensor x, Tensor z, Tensor weight, Tensor bias, Tensor se_w1, Tensor se_b1, Tensor se_w2, "
      "Tensor se_b2, Tensor? running_mean, Tensor? running_var, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  // k'[n] = sigmoid(w2 . relu(w1 . mean_hw(x[n]) + b1) + b2)
  m.def("focus(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor", tags);
  // The MLP head alone on inputs (N, C): k[n] = sigmoid(w2 . relu(w1 . inputs[n] + b1) + b2).  FA's
  // focus MLP on a pool a gate already wrote, and its association MLP on the k history.
  m.def("mlp(Tensor inputs, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor", tags);

  // Backward ops: -> (grad_x, grad_u, grad_k)
  m.def("gate_backward(Tensor grad_out, Tensor x, Tensor u, Tensor k) -> (Tensor, Tensor, Tensor)", tags);
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
  // -> (grad_x, grad_z, grad_k, grad_weight, grad_bias, grad_se_w1, grad_se_b1, grad_se_w2, grad_se_b2);
  // mean, var, z_mean: the forward's.
  m.def(
      "bn_se_residual_gate_pool_backward(Tensor? grad_out, Tensor? grad_pooled, Tensor x, Tensor z, Tensor k, "
      "Tensor weight, Tensor bias, Tensor se_w1, Tensor se_b1, Tensor se_w2, Tensor se_b2, Tensor mean, "
      "Tensor var, Tensor z_mean, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_x, grad_z, grad_weight, grad_bias, grad_se_w1, grad_se_b1, grad_se_w2, grad_se_b2)
  m.def(
      "bn_se_residual_backward(Tensor grad_out, Tensor x, Tensor z, Tensor weight, Tensor bias, Tensor se_w1, "
      "Tensor se_b1, Tensor se_w2, Tensor se_b2, Tensor mean, Tensor var, Tensor z_mean, bool training, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)
  m.def(
      "focus_backward(Tensor grad_k, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_inputs, grad_w1, grad_b1, grad_w2, grad_b2)
  m.def(
      "mlp_backward(Tensor grad_k, Tensor inputs, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
}
