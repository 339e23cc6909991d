// Argument checks and layout decisions shared by every C++ backend (CPU and CUDA), so
// that a bad call fails with the same message whichever device it is on (SPEC §4).
// The Python-side backends use fanet_kernels/_validate.py, which says the same things.
#pragma once

// Tensor and the one ATen function used, not all of ATen/ATen.h: the CUDA sources include this
// file, and nvcc parses every header once per GPU architecture.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <cctype>
#include <optional>
#include <string>
#include <tuple>

namespace fanet {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// A dtype as Python spells it (torch.float32, not Float), so the messages are _validate.py's.
inline std::string dtype_str(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kComplexHalf: return "torch.complex32";
    default: {  // the rest are Python's names lowercased: Float8_e4m3fn, UInt16, QInt8, ...
      std::string name = c10::toString(st);
      for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return "torch." + name;
    }
  }
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fanet: argument '", name,
              "' must be a floating tensor (float32, float64, float16 or bfloat16), got ", dtype_str(st));
}

// x, u: (N, C, H, W), same shape, dtype and device, H*W >= 1; k: (N,), floating, same device.
// u_name: the second argument's name in messages ("branch" for the residual op).
// x, u alone (no k): the pair of bn_se_residual, which has no gate.
inline void check_pair_args(const at::Tensor& x, const at::Tensor& u, const char* u_name = "u") {
  TORCH_CHECK_VALUE(x.dim() == 4, "fanet: argument 'x' must be 4-D (N, C, H, W), got ", x.dim(),
              "-D with shape ", shape_str(x));
  check_float(x, "x");
  TORCH_CHECK_VALUE(u.dim() == 4, "fanet: argument '", u_name, "' must be 4-D (N, C, H, W) like x, got ", u.dim(),
              "-D with shape ", shape_str(u));
  TORCH_CHECK_VALUE(u.sizes() == x.sizes(), "fanet: argument '", u_name, "' must have the shape of x ",
              shape_str(x), ", got ", shape_str(u));
  TORCH_CHECK_TYPE(u.scalar_type() == x.scalar_type(), "fanet: argument '", u_name, "' must have the dtype of x (",
              dtype_str(x.scalar_type()), "), got ", dtype_str(u.scalar_type()));
  TORCH_CHECK_VALUE(u.device() == x.device(), "fanet: argument '", u_name, "' must be on the device of x (",
              x.device(), "), got ", u.device());
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) >= 1, "fanet: argument 'x' must have H*W >= 1, got shape ",
              shape_str(x));
}

inline void check_gate_args(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k,
                            const char* u_name = "u") {
  check_pair_args(x, u, u_name);
  TORCH_CHECK_VALUE(k.dim() == 1 && k.size(0) == x.size(0), "fanet: argument 'k' must have shape (N,) = (",
              x.size(0), ",), got ", shape_str(k));
  check_float(k, "k");
  TORCH_CHECK_VALUE(k.device() == x.device(), "fanet: argument 'k' must be on the device of x (",
              x.device(), "), got ", k.device());
}

// The weights of the MLP head sigmoid(w2 . relu(w1 . inputs + b1) + b2) on C inputs: w1: (H1, C),
// b1: (H1,), w2: (1, H1), b2: (1,), one floating dtype, on `device`.
inline void check_mlp_weights(int64_t C, const at::Device& device, const at::Tensor& w1, const at::Tensor& b1,
                              const at::Tensor& w2, const at::Tensor& b2, const char* input) {
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1,
              "fanet: argument 'w1' must have shape (H1, C) with C = ", C, ", got ", shape_str(w1));
  const int64_t H1 = w1.size(0);
  TORCH_CHECK_VALUE(b1.dim() == 1 && b1.size(0) == H1, "fanet: argument 'b1' must have shape (", H1,
              ",), got ", shape_str(b1));
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == 1 && w2.size(1) == H1,
              "fanet: argument 'w2' must have shape (1, ", H1, "), got ", shape_str(w2));
  TORCH_CHECK_VALUE(b2.dim() == 1 && b2.size(0) == 1, "fanet: argument 'b2' must have shape (1,), got ",
              shape_str(b2));
  const std::pair<const at::Tensor*, const char*> ws[] = {{&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}};
  for (const auto& [t, name] : ws) {
    check_float(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == w1.scalar_type(), "fanet: argument '", name,
                "' must have the dtype of w1 (", dtype_str(w1.scalar_type()), "), got ", dtype_str(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == device, "fanet: argument '", name,
                "' must be on the device of ", input, " (", device, "), got ", t->device());
  }
}

// x as for the gate, and the focus MLP's weights.
inline void check_focus_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                             const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fanet: argument 'x' must be 4-D (N, C, H, W), got ", x.dim(),
              "-D with shape ", shape_str(x));
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) >= 1, "fanet: argument 'x' must have H*W >= 1, got shape ",
              shape_str(x));
  check_mlp_weights(x.size(1), x.device(), w1, b1, w2, b2, "x");
}

// inputs: (N, C) floating, and the MLP's weights.
inline void check_mlp_args(const at::Tensor& inputs, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK_VALUE(inputs.dim() == 2, "fanet: argument 'inputs' must be 2-D (N, C), got ", inputs.dim(),
                    "-D with shape ", shape_str(inputs));
  check_float(inputs, "inputs");
  check_mlp_weights(inputs.size(1), inputs.device(), w1, b1, w2, b2, "inputs");
}

// The memory format the kernels run in: channels_last when x is laid out that way (and not
// also plain-contiguous, as when C == 1 or H == W == 1), else contiguous.  Any other stride
// pattern is made contiguous explicitly.  _validate.out_memory_format mirrors this rule.
inline at::MemoryFormat kernel_memory_format(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// A tensor in the given layout, copied only when it is not already.
inline at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// Gradient check for the backward ops: same shape as x, floating.
inline void check_grad_like(const at::Tensor& g, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(g.sizes() == x.sizes(), "fanet: argument '", name, "' must have the shape of x ",
              shape_str(x), ", got ", shape_str(g));
  check_float(g, name);
  TORCH_CHECK_VALUE(g.device() == x.device(), "fanet: argument '", name, "' must be on the device of x (",
              x.device(), "), got ", g.device());
}

// The dtype the kernels accumulate in: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// Checked gate inputs in the layout the kernels run in, k in the accumulation dtype.
// residual: u holds a residual branch B and the kernels weight towards relu(B + x)
// (fa_math.h, residual_output).
struct GateInputs {
  at::Tensor x, u, k;
  at::MemoryFormat fmt;
  bool residual = false;
  // The BatchNorm table's stride per sample: 0 for one (kNormRows, C) table, kNormRows * C for the SE
  // tail's per-sample (N, kNormRows, C) one.
  int64_t norm_stride = 0;
  bool no_gate = false;  // bn_se_residual: out = U (k unused, ones)
};

inline GateInputs prepare_gate(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k,
                               const char* u_name = "u") {
  check_gate_args(x, u, k, u_name);
  const auto fmt = kernel_memory_format(x);
  return {in_format(x, fmt), in_format(u, fmt), k.to(acc_dtype(x.scalar_type())).contiguous(), fmt,
          /*residual=*/false};
}

// The schema's weight and bias are required; Python's None reaches the ops as an undefined tensor.
inline void check_bn_affine(const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(weight.defined(), "fanet: argument 'weight' must be a tensor (an affine BatchNorm's), got None");
  TORCH_CHECK_VALUE(bias.defined(), "fanet: argument 'bias' must be a tensor (an affine BatchNorm's), got None");
}

// The BatchNorm arguments of bn_residual_gate_pool, checked against z (N, C, H, W): weight, bias and
// the running stats where given are (C,) floating tensors on z's device; eval needs the running
// stats, training more than one value per channel (F.batch_norm's rule).  The backward op passes the
// forward's statistics under their own names.
inline void check_bn_args(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, bool training,
                          const char* mean_name = "running_mean", const char* var_name = "running_var") {
  const int64_t C = z.size(1);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_mean == has_var, "fanet: arguments '", mean_name, "' and '", var_name,
                    "' must both be given or both be None");
  TORCH_CHECK_VALUE(training || has_mean, "fanet: arguments '", mean_name, "' and '", var_name,
                    "' are required when not training");
  check_bn_affine(weight, bias);
  const std::pair<const at::Tensor*, const char*> ps[] = {
      {&weight, "weight"}, {&bias, "bias"},
      {running_mean.has_value() ? &*running_mean : nullptr, mean_name},
      {running_var.has_value() ? &*running_var : nullptr, var_name}};
  for (const auto& [t, name] : ps) {
    if (t == nullptr || !t->defined()) continue;
    check_float(*t, name);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, "fanet: argument '", name, "' must have shape (C,) = (", C,
                      ",), got ", shape_str(*t));
    TORCH_CHECK_VALUE(t->device() == z.device(), "fanet: argument '", name, "' must be on the device of z (",
                      z.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(!training || C == 0 || z.numel() / C != 1,
                    "fanet: argument 'z': Expected more than 1 value per channel when training, got input size ",
                    shape_str(z));
}

// The MLP head's weights (focus's or association's) in the accumulation dtype of its inputs,
// contiguous (they are tiny).
// The SE block's weights against its input z (N, C, H, W): se_w1 (R, C), se_b1 (R,), se_w2 (C, R),
// se_b2 (C,), one floating dtype, on z's device (_validate.check_se).
inline void check_se_args(const at::Tensor& z, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2) {
  const std::pair<const at::Tensor*, const char*> ws[] = {{&w1, "se_w1"}, {&b1, "se_b1"}, {&w2, "se_w2"}, {&b2, "se_b2"}};
  for (const auto& [t, name] : ws) check_float(*t, name);
  const int64_t C = z.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1,
                    "fanet: argument 'se_w1' must have shape (R, C) with C = ", C, ", got ", shape_str(w1));
  const int64_t R = w1.size(0);
  TORCH_CHECK_VALUE(b1.dim() == 1 && b1.size(0) == R, "fanet: argument 'se_b1' must have shape (", R, ",), got ",
                    shape_str(b1));
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == R, "fanet: argument 'se_w2' must have shape (",
                    C, ", ", R, "), got ", shape_str(w2));
  TORCH_CHECK_VALUE(b2.dim() == 1 && b2.size(0) == C, "fanet: argument 'se_b2' must have shape (", C, ",), got ",
                    shape_str(b2));
  for (int i = 1; i < 4; ++i)
    TORCH_CHECK_TYPE(ws[i].first->scalar_type() == w1.scalar_type(), "fanet: argument '", ws[i].second,
                     "' must have the dtype of se_w1 (", dtype_str(w1.scalar_type()), "), got ",
                     dtype_str(ws[i].first->scalar_type()));
  for (const auto& [t, name] : ws)
    TORCH_CHECK_VALUE(t->device() == z.device(), "fanet: argument '", name, "' must be on the device of z (",
                      z.device(), "), got ", t->device());
}

// The SE forward's plane means of z, (N, C) on z's device.
inline void check_z_mean(const at::Tensor& z_mean, const at::Tensor& z) {
  check_float(z_mean, "z_mean");
  TORCH_CHECK_VALUE(z_mean.dim() == 2 && z_mean.size(0) == z.size(0) && z_mean.size(1) == z.size(1) &&
                        z_mean.device() == z.device(),
                    "fanet: argument 'z_mean' must have shape (", z.size(0), ", ", z.size(1), ") on z's device (",
                    z.device(), "), got ", shape_str(z_mean), " on ", z_mean.device());
}

struct MlpWeights {
  at::Tensor w1, b1, w2, b2;
};

inline MlpWeights weights_in(at::ScalarType acc, const at::Tensor& w1, const at::Tensor& b1,
                               const at::Tensor& w2, const at::Tensor& b2) {
  return {w1.to(acc).contiguous(), b1.to(acc).contiguous(), w2.to(acc).contiguous(), b2.to(acc).contiguous()};
}

inline MlpWeights prepare_focus_weights(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                          const at::Tensor& w2, const at::Tensor& b2) {
  check_focus_args(x, w1, b1, w2, b2);
  return weights_in(acc_dtype(x.scalar_type()), w1, b1, w2, b2);
}

inline MlpWeights prepare_mlp_weights(const at::Tensor& inputs, const at::Tensor& w1, const at::Tensor& b1,
                                      const at::Tensor& w2, const at::Tensor& b2) {
  check_mlp_args(inputs, w1, b1, w2, b2);
  return weights_in(acc_dtype(inputs.scalar_type()), w1, b1, w2, b2);
}

// ---- host-side steps of the backward ops, shared by the device backends ------------------

// Checked inputs of gate_backward / gate_pool_backward in the kernels' layout: g in x's dtype
// (zeros when only `pooled` had a gradient: one kernel serves every case, and that case is
// rare), gp (N, C) in the accumulation dtype, or undefined when `pooled` had no gradient.
struct GateBackwardInputs {
  GateInputs in;
  at::Tensor g, gp;
};

inline GateBackwardInputs prepare_gate_backward(const std::optional<at::Tensor>& grad_out,
                                                const std::optional<at::Tensor>& grad_pooled,
                                                const at::Tensor& x, const at::Tensor& u,
                                                const at::Tensor& k, const char* u_name = "u") {
  auto in = prepare_gate(x, u, k, u_name);
  const bool has_g = grad_out.has_value() && grad_out->defined();
  if (has_g) check_grad_like(*grad_out, x, "grad_out");
  at::Tensor g = has_g ? in_format(grad_out->to(x.scalar_type()), in.fmt) : at::zeros_like(in.x);
  at::Tensor gp;
  if (grad_pooled.has_value() && grad_pooled->defined()) {
    const auto& p = *grad_pooled;
    TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(1),
                      "fanet: argument 'grad_pooled' must have shape (", x.size(0), ", ", x.size(1),
                      "), got ", shape_str(p));
    check_float(p, "grad_pooled");
    TORCH_CHECK_VALUE(p.device() == x.device(), "fanet: argument 'grad_pooled' must be on the device of x (",
                      x.device(), "), got ", p.device());
    gp = p.to(acc_dtype(x.scalar_type())).contiguous();
  }
  return {std::move(in), std::move(g), std::move(gp)};
}

// grad_k of focus and mlp: (N,) for the op's input x or inputs (named `input` in messages).
inline void check_grad_k(const at::Tensor& grad_k, const at::Tensor& x, const char* input = "x") {
  TORCH_CHECK_VALUE(grad_k.dim() == 1 && grad_k.size(0) == x.size(0), "fanet: argument 'grad_k' must have shape (",
                    x.size(0), ",), got ", shape_str(grad_k));
  check_float(grad_k, "grad_k");
  TORCH_CHECK_VALUE(grad_k.device() == x.device(), "fanet: argument 'grad_k' must be on the device of ", input,
                    " (", x.device(), "), got ", grad_k.device());
}

// The MLP head's weight gradients from its per-sample backward: sums over the batch as small
// matrix products (a fixed order), cast to the weights' dtype.  inputs: (N, C), hidden/grad_h:
// (N, H1), grad_z: (N,).  Returns (grad_w1, grad_b1, grad_w2, grad_b2).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_weight_grads(
    const at::Tensor& inputs, const at::Tensor& hidden, const at::Tensor& grad_h, const at::Tensor& grad_z,
    at::ScalarType weight_dtype) {
  return {grad_h.t().mm(inputs).to(weight_dtype), grad_h.sum(0).to(weight_dtype),
          grad_z.unsqueeze(0).mm(hidden).to(weight_dtype), grad_z.sum(0, /*keepdim=*/true).to(weight_dtype)};
}

}  // namespace fanet
