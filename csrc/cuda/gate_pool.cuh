// gate_pool's walk, shared by gate_pool and residual_gate_pool (gate.cu) and bn_residual_gate_pool
// (bn_gate.cu), which forms its branch from z inside it.
#pragma once

#include <ATen/Dispatch.h>

#include "../common/checks.h"
#include "../common/results.h"
#include "../common/with_flag.h"
#include "ops.h"
#include "walks.cuh"

namespace fanet::cuda {

// out = gate(x, u, k) in acc_t; with kResidual, u is a branch B and the gate weights towards
// U = relu(B + x) (not rounded to scalar_t).
template <bool kResidual, typename acc_t>
__device__ __forceinline__ acc_t gate_value(acc_t x, acc_t u, acc_t k) {
  if constexpr (kResidual) u = math::residual_output(x, u);
  return math::gate(x, u, k);
}

// gate_pool: out = gate(x, u, k[n]) written and summed (the mean of the un-rounded out).  kResidual:
// u holds a branch B and the gate weights towards relu(B + x); kNorm (with kResidual): u holds z and
// B = z * alpha + beta (bn_residual_gate_pool; norm: the (kNormRows, C) table).
template <typename scalar_t, bool kResidual, bool kNorm>
struct GateOp {
  static_assert(kResidual || !kNorm, "kNorm needs kResidual");
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 1;
  const scalar_t* x;
  const scalar_t* u;
  const acc_t* k;
  const acc_t* norm;
  scalar_t* out;
  int64_t C;
  int64_t norm_stride = 0;  // kNorm: 0, or kNormRows * C for the SE tail's per-sample table
  bool no_gate = false;     // kNorm: out = U (bn_se_residual)
  template <int kL>
  struct Channel {
    acc_t k, alpha[kL], beta[kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t n, int64_t c) const {
    Channel<kL> ch;
    ch.k = k[n];
    if constexpr (kNorm) {
      table_row(norm + n * norm_stride, kAlpha, C, c, ch.alpha);
      table_row(norm + n * norm_stride, kBeta, C, c, ch.beta);
    }
    return ch;
  }
  template <int kVec, int kL, int kS>
  __device__ void step(const Channel<kL>& ch, int64_t off, acc_t (&s)[kS][kL]) const {
    const Pack<scalar_t, kVec> xp = load_pack<kVec>(x + off);
    const Pack<scalar_t, kVec> up = load_pack<kVec>(u + off);
    Pack<scalar_t, kVec> op;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t uv = acc_t(up.v[j]);
      acc_t o;
      if constexpr (kNorm) {
        const acc_t xv = acc_t(xp.v[j]);
        const acc_t U = math::residual_output(xv, math::norm_branch(uv, ch.alpha[j % kL], ch.beta[j % kL]));
        o = no_gate ? U : math::gate(xv, U, ch.k);
      } else {
        o = gate_value<kResidual>(acc_t(xp.v[j]), uv, ch.k);
      }
      op.v[j] = scalar_t(o);
      s[0][j % kL] += o;
    }
    store_pack<kVec>(out + off, op);
  }
};

// gate_pool and residual_gate_pool (in.residual) on checked inputs; with kNorm, bn_residual_gate_pool
// with its BatchNorm table `norm`.
template <bool kNorm>
GatePoolResult run_gate_pool(const GateInputs& in, const Tensor& norm) {
  const Tensor& x = in.x;
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const DeviceGuard guard(x);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() == 0) return {out, at::empty({N, C}, x.options())};
  Tensor pooled;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_gate_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *up = in.u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool aligned = aligned16(xp) && aligned16(up) && aligned16(op);
    const auto run = [&](auto residual_tag) {
      constexpr bool kResidual = decltype(residual_tag)::value;
      const GateOp<scalar_t, kResidual, kNorm> gate_op{
          xp, up, in.k.const_data_ptr<acc_t>(), kNorm ? norm.const_data_ptr<acc_t>() : nullptr, op, C, in.norm_stride,
          in.no_gate};
      pooled = channel_means<scalar_t>(gate_op, aligned, in.fmt, N, C, HW, acc_opts);
    };
    if constexpr (kNorm)
      run(std::true_type{});  // the BatchNorm gate is residual; one variant per file (bn_gate.cu)
    else
      with_flag(in.residual, run);
  });
  return {out, pooled.to(x.scalar_type())};
}

}  // namespace fanet::cuda
