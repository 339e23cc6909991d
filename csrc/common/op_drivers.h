// Host-side drivers of the ops that are the same on every device: argument checks, layout,
// buffers and the order of the steps.  A device backend supplies only its kernels, through
// a `Device` struct (see csrc/cpu/fa_cpu.cpp and csrc/cuda/fa_cuda.cu) with
//   static auto guard(const at::Tensor& x);   // RAII device guard, or any dummy value
//   static at::Tensor pool_acc(const at::Tensor& x, at::MemoryFormat fmt);   // (N, C) means, acc dtype
//   static void mlp(l, w, hidden, k, grad_k, grad_z, grad_h, grad_l);
//       // the focus MLP per sample on means l: forward (fills hidden, k) when grad_k is
//       // undefined, else backward (fills hidden, grad_z, grad_h, grad_l; k unused)
//   static void broadcast_pool_grad(const at::Tensor& grad_l, const at::Tensor& gx, at::MemoryFormat fmt);
//       // gx[n, c, h, w] = grad_l[n, c] / HW in layout fmt
//   static at::Tensor gate(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k);
//   static std::tuple<at::Tensor, at::Tensor> gate_pool(const GateInputs&);
//       // (out, pooled) of checked inputs; with in.residual, u is a branch B and U = relu(B + x)
//   static std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward(const GateBackwardInputs&, const at::Tensor& k);
//       // (grad_x, grad_u, grad_k) of the weighting, grad_pooled folded in when defined;
//       // with b.in.residual (grad_x, grad_branch, grad_k), grad_x including the shortcut's share
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"

namespace fanet {

// Calls f(std::integral_constant<bool, flag>{}): a runtime flag as a template argument of the
// device kernels (both devices use it to pick their residual / fold variants).
template <typename F>
inline void with_flag(bool flag, const F& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward_op(const at::Tensor& grad_out, const at::Tensor& x,
                                                                const at::Tensor& u, const at::Tensor& k) {
  return Device::gate_backward(prepare_gate_backward(grad_out, std::nullopt, x, u, k), k);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_pool_backward_op(const std::optional<at::Tensor>& grad_out,
                                                                     const std::optional<at::Tensor>& grad_pooled,
                                                                     const at::Tensor& x, const at::Tensor& u,
                                                                     const at::Tensor& k) {
  return Device::gate_backward(prepare_gate_backward(grad_out, grad_pooled, x, u, k), k);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> gate_pool_op(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k) {
  return Device::gate_pool(prepare_gate(x, u, k));
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> residual_gate_pool_op(const at::Tensor& x, const at::Tensor& branch,
                                                         const at::Tensor& k) {
  auto in = prepare_gate(x, branch, k, "branch");
  in.residual = true;
  return Device::gate_pool(in);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_gate_pool_backward_op(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
    const at::Tensor& branch, const at::Tensor& k) {
  auto b = prepare_gate_backward(grad_out, grad_pooled, x, branch, k, "branch");
  b.in.residual = true;
  return Device::gate_backward(b, k);
}

// The MLP head on inputs l (N, C) in the accumulation dtype: k (N,), accumulation dtype.
template <typename Device>
at::Tensor mlp_forward(const at::Tensor& l, const FocusWeights& w) {
  at::Tensor k = at::empty({l.size(0)}, l.options()), hidden = at::empty({l.size(0), w.w1.size(0)}, l.options());
  Device::mlp(l, w, hidden, k, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor());
  return k;
}

// Its backward: (grad_l in the accumulation dtype, grad_w1, grad_b1, grad_w2, grad_b2 in
// weight_dtype).  The hidden units are recomputed; the weight gradients are small matrix products.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_backward(
    const at::Tensor& grad_k, const at::Tensor& l, const FocusWeights& w, at::ScalarType weight_dtype) {
  const int64_t N = l.size(0), C = l.size(1), H1 = w.w1.size(0);
  const auto opts = l.options();
  const at::Tensor gk = grad_k.to(l.scalar_type()).contiguous();
  at::Tensor hidden = at::empty({N, H1}, opts), grad_h = at::empty({N, H1}, opts);
  at::Tensor grad_z = at::empty({N}, opts), grad_l = at::empty({N, C}, opts);
  Device::mlp(l, w, hidden, at::Tensor(), gk, grad_z, grad_h, grad_l);
  auto [gw1, gb1, gw2, gb2] = focus_weight_grads(l, hidden, grad_h, grad_z, weight_dtype);
  return {grad_l, gw1, gb1, gw2, gb2};
}

template <typename Device>
at::Tensor focus_op(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2) {
  const auto w = prepare_focus_weights(x, w1, b1, w2, b2);
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto fmt = kernel_memory_format(x);
  return mlp_forward<Device>(Device::pool_acc(in_format(x, fmt), fmt), w).to(x.scalar_type());
}

// The pool is recomputed (focus returns only k'), then the MLP backward, then grad_x = grad_l / HW
// broadcast.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> focus_backward_op(
    const at::Tensor& grad_k, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2) {
  const auto w = prepare_focus_weights(x, w1, b1, w2, b2);
  check_focus_grad(grad_k, x);
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto fmt = kernel_memory_format(x);
  auto [grad_l, gw1, gb1, gw2, gb2] =
      mlp_backward<Device>(grad_k, Device::pool_acc(in_format(x, fmt), fmt), w, w1.scalar_type());
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() > 0) Device::broadcast_pool_grad(grad_l, gx, fmt);
  return {gx, gw1, gb1, gw2, gb2};
}

// The MLP head alone, on given inputs l (N, C): the focus MLP on a pool that a gate already
// produced, and the association MLP on the attention history.
template <typename Device>
at::Tensor mlp_op(const at::Tensor& l, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                  const at::Tensor& b2) {
  const auto w = prepare_mlp_weights(l, w1, b1, w2, b2);
  [[maybe_unused]] const auto guard = Device::guard(l);
  return mlp_forward<Device>(l.to(acc_dtype(l.scalar_type())).contiguous(), w).to(l.scalar_type());
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_backward_op(
    const at::Tensor& grad_k, const at::Tensor& l, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2) {
  const auto w = prepare_mlp_weights(l, w1, b1, w2, b2);
  check_focus_grad(grad_k, l, "l");
  [[maybe_unused]] const auto guard = Device::guard(l);
  auto [grad_l, gw1, gb1, gw2, gb2] =
      mlp_backward<Device>(grad_k, l.to(acc_dtype(l.scalar_type())).contiguous(), w, w1.scalar_type());
  return {grad_l.to(l.scalar_type()), gw1, gb1, gw2, gb2};
}

// Registers the ops of a device backend: m.impl for every schema of csrc/fanet.cpp.
template <typename Device>
void register_ops(torch::Library& m) {
  m.impl("gate", &Device::gate);
  m.impl("gate_pool", &gate_pool_op<Device>);
  m.impl("residual_gate_pool", &residual_gate_pool_op<Device>);
  m.impl("focus", &focus_op<Device>);
  m.impl("gate_backward", &gate_backward_op<Device>);
  m.impl("gate_pool_backward", &gate_pool_backward_op<Device>);
  m.impl("residual_gate_pool_backward", &residual_gate_pool_backward_op<Device>);
  m.impl("focus_backward", &focus_backward_op<Device>);
  m.impl("mlp", &mlp_op<Device>);
  m.impl("mlp_backward", &mlp_backward_op<Device>);
}

}  // namespace fanet
