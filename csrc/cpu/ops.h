// The CPU backend's host side, op family by family (gate.cpp, bn_gate.cpp, focus.cpp): outputs and
// buffers, dtype dispatch, and the calls into the kernels of the SIMD level in use (kernels.h).  The
// arguments are checked and in the kernels' layout already (csrc/common/op_drivers.h);
// register.cpp hands these functions to the drivers.
#pragma once

#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../common/results.h"

namespace fanet::cpu {

inline int64_t plane(const at::Tensor& x) { return x.size(2) * x.size(3); }

// ---- gate.cpp ----
at::Tensor gate(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k);
// gate_pool and residual_gate_pool (in.residual); with a BatchNorm table `norm`, bn_residual_gate_pool.
GatePoolResult gate_pool(const GateInputs& in, const at::Tensor& norm = at::Tensor());
// The gate backward ops; with `norm`, pass 1 of bn_residual_gate_pool's backward, which also fills
// csum (N, C, 2) with BatchNorm's channel sums of grad_B and grad_B * xhat per sample.
GateGrads gate_backward(const GateBackwardInputs& b, const at::Tensor& k, const at::Tensor& norm = at::Tensor(),
                        const at::Tensor& csum = at::Tensor());

// ---- bn_gate.cpp ----
void batch_stats(const at::Tensor& z, const at::Tensor& shift, at::MemoryFormat fmt, const at::Tensor& mean,
                 const at::Tensor& var, const at::Tensor& z_mean);
void norm_table(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight, const at::Tensor& bias,
                double eps, const at::Tensor& t);
BnGateGrads bn_gate_backward(const GateBackwardInputs& b, const at::Tensor& k, const at::Tensor& norm, bool training);
BnGateSums bn_gate_sums(const GateBackwardInputs& b, const at::Tensor& k, const at::Tensor& table);
void norm_grad(const at::Tensor& gz, const at::Tensor& z, const at::Tensor& t, at::MemoryFormat fmt);

// ---- focus.cpp ----
at::Tensor pool_acc(const at::Tensor& x, at::MemoryFormat fmt);
void mlp(const at::Tensor& inputs, const MlpWeights& w, const at::Tensor& hidden, const at::Tensor& k,
         const at::Tensor& grad_k, const at::Tensor& grad_z, const at::Tensor& grad_h, const at::Tensor& grad_inputs);
void broadcast_pool_grad(const at::Tensor& grad_pool, const at::Tensor& gx, at::MemoryFormat fmt);

}  // namespace fanet::cpu
