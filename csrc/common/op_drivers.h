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
// and for bn_residual_gate_pool (the branch's last BatchNorm inside the residual gate; fa_math.h's
// NormRow and GradRow are the layouts of its per-channel tables):
//   static void batch_stats(z, shift, fmt, mean, var);
//       // fills mean, var (C,) with z's batch statistics (biased var) from its moments about shift
//   static void norm_table(mean, var, weight, bias, double eps, t);   // fills t (kNormRows, C)
//       // (every tensor but z in the acc dtype)
//   static std::tuple<at::Tensor, at::Tensor> gate_pool(const GateInputs&, const at::Tensor& norm);
//       // the residual gate_pool with branch B = z * alpha + beta (in.u holds z)
//   static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_gate_backward(
//       const GateBackwardInputs&, const at::Tensor& k, const at::Tensor& norm, bool training);
//       // (grad_x, grad_z, grad_k, grad_weight, grad_bias), the last two in the acc dtype
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "fa_math.h"

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

// ---- bn_residual_gate_pool --------------------------------------------------------------

// A (C,) tensor in the accumulation dtype, contiguous.
inline at::Tensor acc_vector(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// (mean, biased var) of z per channel in the accumulation dtype, z non-empty.  The moments are taken
// about K_c = z[0, c, H/2, W/2], a value of the channel (the centre, not a corner that padding may
// make atypical), so sums of z - K_c stay near the spread where the mean is large against it; 0
// where that value is not finite (an inf shift would make an inf mean NaN).
template <typename Device>
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& z, at::MemoryFormat fmt) {
  const auto acc = acc_dtype(z.scalar_type());
  at::Tensor shift = acc_vector(z.select(0, 0).select(1, z.size(2) / 2).select(1, z.size(3) / 2), acc);
  shift = at::where(at::isfinite(shift), shift, at::zeros_like(shift));
  at::Tensor mean = at::empty({z.size(1)}, z.options().dtype(acc)), var = at::empty_like(mean);
  Device::batch_stats(z, shift, fmt, mean, var);
  return {mean, var};
}

// The (kNormRows, C) table of the kernels.
template <typename Device>
at::Tensor norm_table(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                      const at::Tensor& bias, double eps) {
  const auto acc = mean.scalar_type();
  at::Tensor t = at::empty({kNormRows, mean.size(0)}, mean.options());
  Device::norm_table(mean, var, acc_vector(weight, acc), acc_vector(bias, acc), eps, t);
  return t;
}

// Training: z's batch statistics; eval: the running stats, returned as given.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_residual_gate_pool_op(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& k, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double eps) {
  auto in = prepare_gate(x, z, k, "z");
  in.residual = true;
  check_bn_args(z, weight, bias, running_mean, running_var, training);
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor mean, var;
  if (!training) {
    mean = acc_vector(*running_mean, acc).clone();
    var = acc_vector(*running_var, acc).clone();
  } else if (z.numel() > 0) {
    std::tie(mean, var) = batch_stats<Device>(in.u, in.fmt);
  } else {  // z empty: no statistics, zeros
    mean = at::zeros({z.size(1)}, x.options().dtype(acc));
    var = at::zeros_like(mean);
  }
  auto [out, pooled] = Device::gate_pool(in, norm_table<Device>(mean, var, weight, bias, eps));
  return {out, pooled, mean, var};
}

// mean, var: the forward's statistics.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_residual_gate_pool_backward_op(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
    const at::Tensor& z, const at::Tensor& k, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, bool training, double eps) {
  auto b = prepare_gate_backward(grad_out, grad_pooled, x, z, k, "z");
  b.in.residual = true;
  check_bn_args(z, weight, bias, mean, var, false, "mean", "var");
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor norm = norm_table<Device>(acc_vector(mean, acc), acc_vector(var, acc), weight, bias, eps);
  auto [gx, gz, gk, gw, gb] = Device::bn_gate_backward(b, k, norm, training);
  return {gx, gz, gk, gw.to(weight.scalar_type()), gb.to(bias.scalar_type())};
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
  m.impl("bn_residual_gate_pool", &bn_residual_gate_pool_op<Device>);
  m.impl("bn_residual_gate_pool_backward", &bn_residual_gate_pool_backward_op<Device>);
}

}  // namespace fanet
