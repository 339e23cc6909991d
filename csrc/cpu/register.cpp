// The CPU backend: its kernels (ops.h) as the drivers' DeviceKernels, registered for every op.
#include <torch/library.h>

#include "../common/op_drivers.h"
#include "ops.h"

namespace fanet::cpu {
namespace {

using at::Tensor;
namespace device = fanet::cpu;  // for device_members.inc

struct Cpu {
  static int guard(const Tensor&) { return 0; }  // one device: nothing to guard
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cpu::gate(x, u, k); }
  static GatePoolResult gate_pool(const GateInputs& in, const Tensor& norm = Tensor()) {
    return cpu::gate_pool(in, norm);
  }
  static GateGrads gate_backward(const GateBackwardInputs& b, const Tensor& k) { return cpu::gate_backward(b, k); }
#include "../common/device_members.inc"
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CPU, m) { register_ops<Cpu>(m); }

}  // namespace fanet::cpu
