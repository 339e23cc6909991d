// The CUDA backend: its kernels (ops.h) as the drivers' DeviceKernels, registered for every op.
// Host code only (compiled by the C++ compiler).
#include <torch/library.h>

#include "../common/op_drivers.h"
#include "ops.h"

namespace fanet::cuda {
namespace {

using at::Tensor;
namespace device = fanet::cuda;  // for device_members.inc

struct Cuda {
  static DeviceGuard guard(const Tensor& x) { return DeviceGuard(x); }
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cuda::gate(x, u, k); }
  static GatePoolResult gate_pool(const GateInputs& in) { return cuda::gate_pool(in); }
  static GatePoolResult gate_pool(const GateInputs& in, const Tensor& norm) { return cuda::bn_gate_pool(in, norm); }
  static GateGrads gate_backward(const GateBackwardInputs& b, const Tensor& k) { return cuda::gate_backward(b, k); }
#include "../common/device_members.inc"
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CUDA, m) { register_ops<Cuda>(m); }

}  // namespace fanet::cuda
