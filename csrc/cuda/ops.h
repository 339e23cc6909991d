// The CUDA backend's host side, op family by family (gate.cu, bn_gate.cu, focus.cu): outputs and
// buffers, dtype dispatch and kernel launches.  The arguments are checked and in the kernels'
// layout already (csrc/common/op_drivers.h); register.cpp hands these functions to the drivers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/checks.h"
#include "../common/results.h"

namespace fanet::cuda {

// Raises, naming the GPU and the archs built, where this build has no kernel code that the GPU of
// `device` runs (gate.cu).
void check_kernel_image(c10::DeviceIndex device);

// The tensors' device made current for an op (RAII), its kernels checked to load there.
struct DeviceGuard {
  at::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& x) : guard(x.device()) { check_kernel_image(x.get_device()); }
};

// ---- gate.cu ----
at::Tensor gate(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k);
GatePoolResult gate_pool(const GateInputs& in);  // gate_pool and residual_gate_pool (in.residual)
GateGrads gate_backward(const GateBackwardInputs& b, const at::Tensor& k);

// ---- bn_gate.cu, focus.cu ----
#include "../common/device_ops.inc"
// bn_residual_gate_pool's forward (the CPU's is gate_pool with a table).
GatePoolResult bn_gate_pool(const GateInputs& in, const at::Tensor& norm);

}  // namespace fanet::cuda
