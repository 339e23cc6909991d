// Host-side drivers of the ops that are the same on every device: argument checks, layout,
// buffers and the order of the steps.  A device backend supplies only its kernels, as a struct of
// static functions (csrc/cpu/register.cpp, csrc/cuda/register.cpp) that models DeviceKernels.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <concepts>
#include <optional>
#include <tuple>

#include "checks.h"
#include "fa_math.h"
#include "results.h"
#include "with_flag.h"

namespace fanet {

// What the drivers call on a device.  The tensors handed over are checked, on the device, and in the
// layout the kernels run in (GateInputs.fmt, or fmt); "acc": in the accumulation dtype (acc_dtype).
template <typename D>
concept DeviceKernels = requires(const at::Tensor& t, const GateInputs& in, const GateBackwardInputs& b,
                                 const MlpWeights& w, at::MemoryFormat fmt, double eps, bool training,
                                 int64_t hw) {
  D::guard(t);                                       // an RAII guard of t's device, or any dummy value
  { D::gate(t, t, t) } -> std::same_as<at::Tensor>;  // the gate op itself, checks included
  // With in.residual, u is a branch B and the gate weights towards U = relu(B + x).
  { D::gate_pool(in) } -> std::same_as<GatePoolResult>;
  // grad_pooled folded in when b.gp is defined; with b.in.residual the result is (grad_x, grad_branch,
  // grad_k), grad_x including the shortcut's share.
  { D::gate_backward(b, t) } -> std::same_as<GateGrads>;
  { D::pool_acc(t, fmt) } -> std::same_as<at::Tensor>;  // x's (N, C) channel means, acc
  // mlp(inputs, w, hidden, k, grad_k, grad_z, grad_h, grad_inputs), all acc: the MLP head per sample on
  // inputs (N, C); forward (fills hidden, k) when grad_k is undefined, else backward (fills hidden,
  // grad_z, grad_h, grad_inputs; k unused).
  { D::mlp(t, w, t, t, t, t, t, t) } -> std::same_as<void>;
  // broadcast_pool_grad(grad_inputs, gx, fmt): gx[n, c, h, w] = grad_inputs[n, c] / HW.
  { D::broadcast_pool_grad(t, t, fmt) } -> std::same_as<void>;
  // bn_residual_gate_pool, the branch's last BatchNorm inside the residual gate (every tensor but z
  // acc; fa_math.h's NormRow and GradRow are the rows of its per-channel tables):
  // batch_stats(z, shift, fmt, mean, var, z_mean) fills mean, var (C,) from z's moments about shift (biased
  // var), and z_mean (N, C) with z's plane means where it is defined (the SE tail's);
  { D::batch_stats(t, t, fmt, t, t, t) } -> std::same_as<void>;
  // norm_table(mean, var, weight, bias, eps, table) fills table (kNormRows, C);
  { D::norm_table(t, t, t, t, eps, t) } -> std::same_as<void>;
  // the residual gate_pool with branch B = z * alpha + beta (in.u holds z; the table above, or with
  // in.norm_stride the SE tail's per-sample (N, kNormRows, C) table; in.no_gate: out = relu(B + x));
  { D::gate_pool(in, t) } -> std::same_as<GatePoolResult>;
  // bn_gate_backward(b, k, table, training), grad_weight and grad_bias acc.
  { D::bn_gate_backward(b, t, t, training) } -> std::same_as<BnGateGrads>;
  // The SE tail's backward: bn_gate_sums(b, k, table) is pass 1 with the per-sample table (b.in's
  // norm_stride, no_gate): (grad_x, grad_S, grad_k, (N, C, 2) acc sums of grad_S and grad_S * xhat);
  { D::bn_gate_sums(b, t, t) } -> std::same_as<BnGateSums>;
  // norm_grad(gz, z, table, fmt): pass 2 over gz in place with an (N, kGradRows, C) table.
  { D::norm_grad(t, t, t, fmt) } -> std::same_as<void>;
  // The SE tail's (N, C) arithmetic (fa_math.h's se_* functions; acc unless said; sums as
  // bn_gate_sums returns them, (N, C, >= 2) with unit last stride):
  // se_squeeze(norm, z_mean, q) fills q (N, C) with SE's squeeze;
  { D::se_squeeze(t, t, t) } -> std::same_as<void>;
  // se_scale(norm, e, table): e (N, C) holds the excitation's pre-activation and becomes its sigmoid,
  // the scale; table (N, kNormRows, C) is filled;
  { D::se_scale(t, t, t) } -> std::same_as<void>;
  // se_scale_grad(sums, e, weight, bias, da) fills da (N, C, double), the pre-activation's gradient;
  { D::se_scale_grad(t, t, t, t, t) } -> std::same_as<void>;
  // se_norm_grad(norm, z_mean, sums, e, dq, da, HW, training, grad_weight, grad_bias, grad_b2, table)
  // with dq, da (N, C) double fills grad_weight, grad_bias (C,), grad_b2 (C, double) and the
  // (N, kGradRows, C) table of norm_grad.
  { D::se_norm_grad(t, t, t, t, t, t, hw, training, t, t, t, t) } -> std::same_as<void>;
};

template <DeviceKernels Device>
GateGrads gate_backward_op(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& u, const at::Tensor& k) {
  return Device::gate_backward(prepare_gate_backward(grad_out, std::nullopt, x, u, k), k);
}

template <DeviceKernels Device>
GateGrads gate_pool_backward_op(const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_pooled,
                                const at::Tensor& x, const at::Tensor& u, const at::Tensor& k) {
  return Device::gate_backward(prepare_gate_backward(grad_out, grad_pooled, x, u, k), k);
}

template <DeviceKernels Device>
GatePoolResult gate_pool_op(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k) {
  return Device::gate_pool(prepare_gate(x, u, k));
}

template <DeviceKernels Device>
GatePoolResult residual_gate_pool_op(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& k) {
  auto in = prepare_gate(x, branch, k, "branch");
  in.residual = true;
  return Device::gate_pool(in);
}

template <DeviceKernels Device>
GateGrads residual_gate_pool_backward_op(const std::optional<at::Tensor>& grad_out,
                                         const std::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
                                         const at::Tensor& branch, const at::Tensor& k) {
  auto b = prepare_gate_backward(grad_out, grad_pooled, x, branch, k, "branch");
  b.in.residual = true;
  return Device::gate_backward(b, k);
}

// The MLP head on inputs (N, C) in the accumulation dtype: k (N,), accumulation dtype.
template <DeviceKernels Device>
at::Tensor mlp_forward(const at::Tensor& inputs, const MlpWeights& w) {
  const auto opts = inputs.options();
  at::Tensor k = at::empty({inputs.size(0)}, opts), hidden = at::empty({inputs.size(0), w.w1.size(0)}, opts);
  Device::mlp(inputs, w, hidden, k, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor());
  return k;
}

// Its backward: (grad_inputs in the accumulation dtype, grad_w1, grad_b1, grad_w2, grad_b2 in
// weight_dtype).  The hidden units are recomputed; the weight gradients are small matrix products.
template <DeviceKernels Device>
HeadGrads mlp_backward(const at::Tensor& grad_k, const at::Tensor& inputs, const MlpWeights& w,
                       at::ScalarType weight_dtype) {
  const int64_t N = inputs.size(0), C = inputs.size(1), H1 = w.w1.size(0);
  const auto opts = inputs.options();
  const at::Tensor gk = grad_k.to(inputs.scalar_type()).contiguous();
  at::Tensor hidden = at::empty({N, H1}, opts), grad_h = at::empty({N, H1}, opts);
  at::Tensor grad_z = at::empty({N}, opts), grad_inputs = at::empty({N, C}, opts);
  Device::mlp(inputs, w, hidden, at::Tensor(), gk, grad_z, grad_h, grad_inputs);
  auto [gw1, gb1, gw2, gb2] = mlp_weight_grads(inputs, hidden, grad_h, grad_z, weight_dtype);
  return {grad_inputs, gw1, gb1, gw2, gb2};
}

template <DeviceKernels Device>
at::Tensor focus_op(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2) {
  const auto w = prepare_focus_weights(x, w1, b1, w2, b2);
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto fmt = kernel_memory_format(x);
  return mlp_forward<Device>(Device::pool_acc(in_format(x, fmt), fmt), w).to(x.scalar_type());
}

// The pool is recomputed (focus returns only k), then the MLP backward, then grad_x = grad_pool / HW
// broadcast.
template <DeviceKernels Device>
HeadGrads focus_backward_op(const at::Tensor& grad_k, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2) {
  const auto w = prepare_focus_weights(x, w1, b1, w2, b2);
  check_grad_k(grad_k, x);
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto fmt = kernel_memory_format(x);
  auto [grad_pool, gw1, gb1, gw2, gb2] =
      mlp_backward<Device>(grad_k, Device::pool_acc(in_format(x, fmt), fmt), w, w1.scalar_type());
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() > 0) Device::broadcast_pool_grad(grad_pool, gx, fmt);
  return {gx, gw1, gb1, gw2, gb2};
}

// The MLP head alone, on given inputs (N, C): the focus MLP on a pool that a gate already
// produced, and the association MLP on the attention history.
template <DeviceKernels Device>
at::Tensor mlp_op(const at::Tensor& inputs, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                  const at::Tensor& b2) {
  const auto w = prepare_mlp_weights(inputs, w1, b1, w2, b2);
  [[maybe_unused]] const auto guard = Device::guard(inputs);
  return mlp_forward<Device>(inputs.to(acc_dtype(inputs.scalar_type())).contiguous(), w).to(inputs.scalar_type());
}

template <DeviceKernels Device>
HeadGrads mlp_backward_op(const at::Tensor& grad_k, const at::Tensor& inputs, const at::Tensor& w1,
                          const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const auto w = prepare_mlp_weights(inputs, w1, b1, w2, b2);
  check_grad_k(grad_k, inputs, "inputs");
  [[maybe_unused]] const auto guard = Device::guard(inputs);
  auto [grad_inputs, gw1, gb1, gw2, gb2] =
      mlp_backward<Device>(grad_k, inputs.to(acc_dtype(inputs.scalar_type())).contiguous(), w, w1.scalar_type());
  return {grad_inputs.to(inputs.scalar_type()), gw1, gb1, gw2, gb2};
}

// ---- bn_residual_gate_pool --------------------------------------------------------------

// A (C,) tensor in the accumulation dtype, contiguous.
inline at::Tensor acc_vector(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// (mean, biased var) of z per channel in the accumulation dtype, z non-empty.  The moments are taken
// about K_c = z[0, c, H/2, W/2], a value of the channel (the centre, not a corner that padding may
// make atypical), so sums of z - K_c stay near the spread where the mean is large against it; 0
// where that value is not finite (an inf shift would make an inf mean NaN).
// With z_mean (N, C) acc defined, also z's plane means into it.
template <DeviceKernels Device>
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& z, at::MemoryFormat fmt,
                                               const at::Tensor& z_mean = at::Tensor()) {
  const auto acc = acc_dtype(z.scalar_type());
  at::Tensor shift = acc_vector(z.select(0, 0).select(1, z.size(2) / 2).select(1, z.size(3) / 2), acc);
  shift = at::where(at::isfinite(shift), shift, at::zeros_like(shift));
  at::Tensor mean = at::empty({z.size(1)}, z.options().dtype(acc)), var = at::empty_like(mean);
  Device::batch_stats(z, shift, fmt, mean, var, z_mean);
  return {mean, var};
}

// The (kNormRows, C) table of the kernels.
template <DeviceKernels Device>
at::Tensor norm_table(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight, const at::Tensor& bias,
                      double eps) {
  const auto acc = mean.scalar_type();
  at::Tensor t = at::empty({kNormRows, mean.size(0)}, mean.options());
  Device::norm_table(mean, var, acc_vector(weight, acc), acc_vector(bias, acc), eps, t);
  return t;
}

// Training: z's batch statistics; eval: the running stats, returned as given.
template <DeviceKernels Device>
BnGatePoolResult bn_residual_gate_pool_op(const at::Tensor& x, const at::Tensor& z, const at::Tensor& k,
                                          const at::Tensor& weight, const at::Tensor& bias,
                                          const std::optional<at::Tensor>& running_mean,
                                          const std::optional<at::Tensor>& running_var, bool training, double eps) {
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
template <DeviceKernels Device>
BnGateGrads bn_residual_gate_pool_backward_op(const std::optional<at::Tensor>& grad_out,
                                              const std::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
                                              const at::Tensor& z, const at::Tensor& k, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var,
                                              bool training, double eps) {
  auto b = prepare_gate_backward(grad_out, grad_pooled, x, z, k, "z");
  b.in.residual = true;
  check_bn_args(z, weight, bias, mean, var, false, "mean", "var");
  [[maybe_unused]] const auto guard = Device::guard(x);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor norm = norm_table<Device>(acc_vector(mean, acc), acc_vector(var, acc), weight, bias, eps);
  auto [gx, gz, gk, gw, gb] = Device::bn_gate_backward(b, k, norm, training);
  return {gx, gz, gk, gw.to(weight.scalar_type()), gb.to(bias.scalar_type())};
}

// ---- bn_se_residual_gate_pool and bn_se_residual: the BatchNorm -> SE tail -------------------
// Forward: z's plane sums give the batch statistics (training) and z's plane means z_mean; the squeeze,
// the excitation e on (N, C) (Device::se_* per sample, its two matrix products ATen's), then the
// BatchNorm gate's sweep with the per-sample table (alpha e, beta e, invstd, shift).
// Backward: pass 1 with that table gives grad_S and its sums P0, P1 per (n, c); the excitation's
// backward and BatchNorm's totals on (N, C) in double; pass 2 with an (N, kGradRows, C) table.
// fa_math.h's se_* functions hold the formulas.

struct SeArgs {
  const at::Tensor &weight, &bias, &w1, &b1, &w2, &b2;
};

struct SeExcitation {
  at::Tensor q, hidden, e, table;  // (N, C), (N, R), (N, C) acc; the (N, kNormRows, C) table
};

// SE's squeeze, hidden units and scale from z_mean and the (kNormRows, C) table, in z_mean's (acc)
// dtype, and the per-sample table of the sweeps.
template <DeviceKernels Device>
SeExcitation se_excitation(const at::Tensor& z_mean, const at::Tensor& norm, const SeArgs& a) {
  const auto acc = z_mean.scalar_type();
  at::Tensor q = at::empty_like(z_mean);
  Device::se_squeeze(norm, z_mean, q);
  at::Tensor hidden = at::addmm(a.b1.to(acc), q, a.w1.to(acc).t()).relu_();
  at::Tensor e = at::addmm(a.b2.to(acc), hidden, a.w2.to(acc).t());
  at::Tensor table = at::empty({z_mean.size(0), kNormRows, z_mean.size(1)}, z_mean.options());
  Device::se_scale(norm, e, table);
  return {q, hidden, e, table};
}

// in: checked (residual, z in in.u); k ones where in.no_gate.
template <DeviceKernels Device>
BnSeGatePoolResult bn_se_forward(GateInputs in, const SeArgs& a, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, bool training, double eps) {
  const at::Tensor& z = in.u;
  const auto acc = acc_dtype(z.scalar_type());
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor z_mean = at::zeros({N, C}, z.options().dtype(acc)), mean, var;
  if (z.numel() > 0) {
    std::tie(mean, var) = batch_stats<Device>(z, in.fmt, z_mean);
  } else {  // z empty: no statistics, zeros
    mean = at::zeros({C}, z_mean.options());
    var = at::zeros_like(mean);
  }
  if (!training) {
    mean = acc_vector(*running_mean, acc).clone();
    var = acc_vector(*running_var, acc).clone();
  }
  const at::Tensor norm = norm_table<Device>(mean, var, a.weight, a.bias, eps);
  in.norm_stride = kNormRows * C;
  auto [out, pooled] = Device::gate_pool(in, se_excitation<Device>(z_mean, norm, a).table);
  return {out, pooled, mean, var, z_mean};
}

template <DeviceKernels Device>
BnSeGatePoolResult bn_se_residual_gate_pool_op(const at::Tensor& x, const at::Tensor& z, const at::Tensor& k,
                                               const at::Tensor& weight, const at::Tensor& bias,
                                               const at::Tensor& se_w1, const at::Tensor& se_b1,
                                               const at::Tensor& se_w2, const at::Tensor& se_b2,
                                               const std::optional<at::Tensor>& running_mean,
                                               const std::optional<at::Tensor>& running_var, bool training,
                                               double eps) {
  auto in = prepare_gate(x, z, k, "z");
  in.residual = true;
  check_bn_args(z, weight, bias, running_mean, running_var, training);
  check_se_args(z, se_w1, se_b1, se_w2, se_b2);
  [[maybe_unused]] const auto guard = Device::guard(x);
  return bn_se_forward<Device>(in, {weight, bias, se_w1, se_b1, se_w2, se_b2}, running_mean, running_var, training,
                               eps);
}

template <DeviceKernels Device>
BnSeResult bn_se_residual_op(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& se_w1, const at::Tensor& se_b1,
                             const at::Tensor& se_w2, const at::Tensor& se_b2,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training, double eps) {
  check_pair_args(x, z, "z");
  check_bn_args(z, weight, bias, running_mean, running_var, training);
  check_se_args(z, se_w1, se_b1, se_w2, se_b2);
  [[maybe_unused]] const auto guard = Device::guard(x);
  auto in = prepare_gate(x, z, at::ones({x.size(0)}, x.options().dtype(acc_dtype(x.scalar_type()))), "z");
  in.residual = true;
  in.no_gate = true;
  auto [out, pooled, mean, var, z_mean] =
      bn_se_forward<Device>(in, {weight, bias, se_w1, se_b1, se_w2, se_b2}, running_mean, running_var, training, eps);
  return {out, mean, var, z_mean};
}

// b: checked (residual, z in b.in.u; k ones where b.in.no_gate).  -> the 9 gradients, grad_k k's dtype.
template <DeviceKernels Device>
BnSeGateGrads bn_se_backward(GateBackwardInputs b, const at::Tensor& k, const SeArgs& a, const at::Tensor& mean,
                             const at::Tensor& var, const at::Tensor& z_mean, bool training, double eps) {
  const at::Tensor &x = b.in.x, &z = b.in.u;
  const auto acc = acc_dtype(x.scalar_type());
  const auto wdt = a.w1.scalar_type();
  const int64_t N = x.size(0), C = x.size(1);
  if (x.numel() == 0) {
    const auto fmt = b.in.fmt;
    return {at::empty(x.sizes(), x.options().memory_format(fmt)), at::empty(x.sizes(), x.options().memory_format(fmt)),
            at::zeros_like(k), at::zeros_like(a.weight), at::zeros_like(a.bias), at::zeros_like(a.w1),
            at::zeros_like(a.b1), at::zeros_like(a.w2), at::zeros_like(a.b2)};
  }
  const at::Tensor norm = norm_table<Device>(acc_vector(mean, acc), acc_vector(var, acc), a.weight, a.bias, eps);
  const at::Tensor zm = z_mean.to(acc).contiguous();
  const auto [q, hidden, e, table] = se_excitation<Device>(zm, norm, a);
  b.in.norm_stride = kNormRows * C;
  auto [gx, gz, gk, sums] = Device::bn_gate_sums(b, k, table);
  // The excitation's backward and the BatchNorm's totals, on (N, C) in double.
  const auto f64 = x.options().dtype(at::kDouble);
  const at::Tensor da = at::empty({N, C}, f64);
  Device::se_scale_grad(sums, e, acc_vector(a.weight, acc), acc_vector(a.bias, acc), da);
  const at::Tensor h64 = hidden.to(at::kDouble);
  const at::Tensor dh = at::threshold_backward(at::mm(da, a.w2.to(at::kDouble)), h64, 0);  // relu's: NaN passes
  const at::Tensor dq = at::mm(dh, a.w1.to(at::kDouble));
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor grad_w = at::empty({C}, acc_opts), grad_b = at::empty({C}, acc_opts), grad_b2 = at::empty({C}, f64);
  at::Tensor coefs = at::empty({N, kGradRows, C}, acc_opts);
  Device::se_norm_grad(norm, zm, sums, e, dq, da, x.size(2) * x.size(3), training, grad_w, grad_b, grad_b2, coefs);
  Device::norm_grad(gz, z, coefs, b.in.fmt);
  return {gx,
          gz,
          gk,
          grad_w.to(a.weight.scalar_type()),
          grad_b.to(a.bias.scalar_type()),
          at::mm(dh.t(), q.to(at::kDouble)).to(wdt),
          dh.sum(0).to(wdt),
          at::mm(da.t(), h64).to(wdt),
          grad_b2.to(wdt)};
}

template <DeviceKernels Device>
BnSeGateGrads bn_se_residual_gate_pool_backward_op(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
    const at::Tensor& z, const at::Tensor& k, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& se_w1,
    const at::Tensor& se_b1, const at::Tensor& se_w2, const at::Tensor& se_b2, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& z_mean, bool training, double eps) {
  check_gate_args(x, z, k, "z");  // opdefs' order: the gate's, BatchNorm's, SE's, z_mean, the gradients
  check_bn_args(z, weight, bias, mean, var, false, "mean", "var");
  check_se_args(z, se_w1, se_b1, se_w2, se_b2);
  check_z_mean(z_mean, z);
  auto b = prepare_gate_backward(grad_out, grad_pooled, x, z, k, "z");
  b.in.residual = true;
  [[maybe_unused]] const auto guard = Device::guard(x);
  return bn_se_backward<Device>(b, k, {weight, bias, se_w1, se_b1, se_w2, se_b2}, mean, var, z_mean, training, eps);
}

template <DeviceKernels Device>
BnSeGrads bn_se_residual_backward_op(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z,
                                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& se_w1,
                                     const at::Tensor& se_b1, const at::Tensor& se_w2, const at::Tensor& se_b2,
                                     const at::Tensor& mean, const at::Tensor& var, const at::Tensor& z_mean,
                                     bool training, double eps) {
  check_pair_args(x, z, "z");
  check_bn_args(z, weight, bias, mean, var, false, "mean", "var");
  check_se_args(z, se_w1, se_b1, se_w2, se_b2);
  check_z_mean(z_mean, z);
  check_grad_like(grad_out, x, "grad_out");
  [[maybe_unused]] const auto guard = Device::guard(x);
  const at::Tensor ones = at::ones({x.size(0)}, x.options().dtype(acc_dtype(x.scalar_type())));
  auto b = prepare_gate_backward(grad_out, std::nullopt, x, z, ones, "z");
  b.in.residual = true;
  b.in.no_gate = true;
  auto [gx, gz, gk, gw, gb, gw1, gb1, gw2, gb2] = bn_se_backward<Device>(
      b, ones, {weight, bias, se_w1, se_b1, se_w2, se_b2}, mean, var, z_mean, training, eps);
  return {gx, gz, gw, gb, gw1, gb1, gw2, gb2};
}

// Registers the ops of a device backend: m.impl for every schema of csrc/fanet.cpp.
template <DeviceKernels Device>
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
  m.impl("bn_se_residual_gate_pool", &bn_se_residual_gate_pool_op<Device>);
  m.impl("bn_se_residual_gate_pool_backward", &bn_se_residual_gate_pool_backward_op<Device>);
  m.impl("bn_se_residual", &bn_se_residual_op<Device>);
  m.impl("bn_se_residual_backward", &bn_se_residual_backward_op<Device>);
}

}  // namespace fanet
