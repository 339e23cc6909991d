// The gate ops on the CPU, host side: gate, gate_pool and residual_gate_pool, forward and backward.
// bn_gate.cpp runs the BatchNorm gate's sweeps through gate_pool and gate_backward too.
#include <ATen/Dispatch.h>

#include <numeric>

#include "kernels.h"
#include "ops.h"

namespace fanet::cpu {

using at::Tensor;

namespace {

// The forward sweep of in: out, and pooled's channel means when pooled is defined; by the BatchNorm
// gate's kernel when `norm` is defined.
void run_forward(const GateInputs& in, const Tensor& out, const Tensor& pooled, const Tensor& norm) {
  const Tensor& x = in.x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_gate_cpu", [&] {
    using acc_t = Acc<scalar_t>;
    const ForwardSweep<scalar_t> s{.x = x.const_data_ptr<scalar_t>(),
                                   .u = in.u.const_data_ptr<scalar_t>(),
                                   .k = in.k.const_data_ptr<acc_t>(),
                                   .norm = norm.defined() ? norm.const_data_ptr<acc_t>() : nullptr,
                                   .out = out.mutable_data_ptr<scalar_t>(),
                                   .pooled = pooled.defined() ? pooled.mutable_data_ptr<acc_t>() : nullptr,
                                   .N = x.size(0),
                                   .C = x.size(1),
                                   .HW = plane(x),
                                   .channels_last = in.fmt == at::MemoryFormat::ChannelsLast,
                                   .residual = in.residual,
                                   .norm_stride = in.norm_stride,
                                   .no_gate = in.no_gate};
    const Kernels<scalar_t>& kern = kernels<scalar_t>();
    (norm.defined() ? kern.bn_gate_forward : kern.gate_forward)(s);
  });
}

}  // namespace

Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) {
  const auto in = prepare_gate(x, u, k);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() > 0) run_forward(in, out, Tensor(), Tensor());
  return out;
}

GatePoolResult gate_pool(const GateInputs& in, const Tensor& norm) {
  const Tensor& x = in.x;
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() > 0) run_forward(in, out, pooled, norm);
  return {out, pooled.to(x.scalar_type())};
}

GateGrads gate_backward(const GateBackwardInputs& b, const Tensor& k, const Tensor& norm, const Tensor& csum) {
  const auto& in = b.in;
  const int64_t N = in.x.size(0), C = in.x.size(1);
  Tensor gx = at::empty(in.x.sizes(), in.x.options().memory_format(in.fmt));
  Tensor gu = at::empty(in.x.sizes(), in.x.options().memory_format(in.fmt));
  const bool cl = in.fmt == at::MemoryFormat::ChannelsLast;
  const int64_t units = cl ? (C + kChannelBlock - 1) / kChannelBlock : C;  // BackwardSweep's partial sums
  Tensor partial = at::zeros({N, units}, in.k.options().dtype(at::kDouble));
  if (in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fanet_gate_backward_cpu", [&] {
      using acc_t = Acc<scalar_t>;
      const BackwardSweep<scalar_t> s{.g = b.g.const_data_ptr<scalar_t>(),
                                      .gp = b.gp.defined() ? b.gp.const_data_ptr<acc_t>() : nullptr,
                                      .x = in.x.const_data_ptr<scalar_t>(),
                                      .u = in.u.const_data_ptr<scalar_t>(),
                                      .k = in.k.const_data_ptr<acc_t>(),
                                      .norm = norm.defined() ? norm.const_data_ptr<acc_t>() : nullptr,
                                      .gx = gx.mutable_data_ptr<scalar_t>(),
                                      .gu = gu.mutable_data_ptr<scalar_t>(),
                                      .partial = partial.mutable_data_ptr<double>(),
                                      .csum = norm.defined() ? csum.mutable_data_ptr<acc_t>() : nullptr,
                                      .N = N,
                                      .C = C,
                                      .HW = plane(in.x),
                                      .channels_last = cl,
                                      .residual = in.residual,
                                      .norm_stride = in.norm_stride,
                                      .no_gate = in.no_gate};
      const Kernels<scalar_t>& kern = kernels<scalar_t>();
      (norm.defined() ? kern.bn_gate_backward : kern.gate_backward)(s);
    });
  }
  // Per-sample sum of the per-unit partials, in unit order, in double: deterministic.
  Tensor gk = at::empty({N}, partial.options());
  const double* pp = partial.const_data_ptr<double>();
  double* gkp = gk.mutable_data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) gkp[n] = std::accumulate(pp + n * units, pp + (n + 1) * units, 0.0);
  return {gx, gu, gk.to(k.scalar_type())};
}

}  // namespace fanet::cpu
