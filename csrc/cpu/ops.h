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

// ---- bn_gate.cpp, focus.cpp ----
#include "../common/device_ops.inc"

}  // namespace fanet::cpu
