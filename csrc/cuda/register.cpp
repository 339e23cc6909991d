// The CUDA backend: its kernels (ops.h) as the drivers' DeviceKernels, registered for every op.
// Host code only (compiled by the C++ compiler).
#include <torch/library.h>

#include "../common/op_drivers.h"
#include "ops.h"

namespace fanet::cuda {
namespace {

using at::Tensor;

struct Cuda {
  static DeviceGuard guard(const Tensor& x) { return DeviceGuard(x); }
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cuda::gate(x, u, k); }
  static GatePoolResult gate_pool(const GateInputs& in) { return cuda::gate_pool(in); }
  static GatePoolResult gate_pool(const GateInputs& in, const Tensor& norm) { return cuda::bn_gate_pool(in, norm); }
  static GateGrads gate_backward(const GateBackwardInputs& b, const Tensor& k) { return cuda::gate_backward(b, k); }
  static Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) { return cuda::pool_acc(x, fmt); }
  static void mlp(const Tensor& inputs, const MlpWeights& w, const Tensor& hidden, const Tensor& k,
                  const Tensor& grad_k, const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_inputs) {
    cuda::mlp(inputs, w, hidden, k, grad_k, grad_z, grad_h, grad_inputs);
  }
  static void broadcast_pool_grad(const Tensor& grad_pool, const Tensor& gx, at::MemoryFormat fmt) {
    cuda::broadcast_pool_grad(grad_pool, gx, fmt);
  }
  static void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean,
                          const Tensor& var, const Tensor& z_mean) {
    cuda::batch_stats(z, shift, fmt, mean, var, z_mean);
  }
  static void norm_table(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                         const Tensor& t) {
    cuda::norm_table(mean, var, weight, bias, eps, t);
  }
  static BnGateGrads bn_gate_backward(const GateBackwardInputs& b, const Tensor& k, const Tensor& norm, bool training) {
    return cuda::bn_gate_backward(b, k, norm, training);
  }
  static BnGateSums bn_gate_sums(const GateBackwardInputs& b, const Tensor& k, const Tensor& table) {
    return cuda::bn_gate_sums(b, k, table);
  }
  static void norm_grad(const Tensor& gz, const Tensor& z, const Tensor& t, at::MemoryFormat fmt) {
    cuda::norm_grad(gz, z, t, fmt);
  }
  static void se_squeeze(const Tensor& norm, const Tensor& z_mean, const Tensor& q) {
    cuda::se_squeeze(norm, z_mean, q);
  }
  static void se_scale(const Tensor& norm, const Tensor& e, const Tensor& table) { cuda::se_scale(norm, e, table); }
  static void se_scale_grad(const Tensor& sums, const Tensor& e, const Tensor& weight, const Tensor& bias,
                            const Tensor& da) {
    cuda::se_scale_grad(sums, e, weight, bias, da);
  }
  static void se_norm_grad(const Tensor& norm, const Tensor& z_mean, const Tensor& sums, const Tensor& e,
                           const Tensor& dq, const Tensor& da, int64_t hw, bool training, const Tensor& grad_weight,
                           const Tensor& grad_bias, const Tensor& grad_b2, const Tensor& table) {
    cuda::se_norm_grad(norm, z_mean, sums, e, dq, da, hw, training, grad_weight, grad_bias, grad_b2, table);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CUDA, m) { register_ops<Cuda>(m); }

}  // namespace fanet::cuda
