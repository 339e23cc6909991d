// bn_residual_gate_pool on the CPU, host side: z's batch statistics, the BatchNorm table, and the
// backward's two passes.  Its forward is gate.cpp's gate_pool with the table.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/fa_math.h"
#include "kernels.h"
#include "ops.h"

namespace fanet::cpu {

using at::Tensor;

namespace {

// Per-channel sums of csum (N, C, 2), over the batch in a fixed order, in double.
template <typename acc_t, typename F>
void reduce_channel_sums(const Tensor& csum, const F& per_channel) {
  const int64_t N = csum.size(0), C = csum.size(1);
  const acc_t* p = csum.const_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    double s0 = 0, s1 = 0;
    for (int64_t n = 0; n < N; ++n) {
      s0 += p[2 * (n * C + c)];
      s1 += p[2 * (n * C + c) + 1];
    }
    per_channel(c, s0, s1);
  }
}

}  // namespace

// Fills mean and var (C,) with z's batch statistics from its moments about shift (one read of z), and
// z_mean (N, C) with z's plane means when it is defined.
void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean, const Tensor& var,
                 const Tensor& z_mean) {
  const int64_t N = z.size(0), C = z.size(1), HW = plane(z);
  Tensor csum = at::empty({N, C, 2}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fanet_batch_stats_cpu", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t* kp = shift.const_data_ptr<acc_t>();
    kernels<scalar_t>().channel_sums(z.const_data_ptr<scalar_t>(), kp, csum.mutable_data_ptr<acc_t>(), N, C, HW,
                                     fmt == at::MemoryFormat::ChannelsLast);
    const double M = double(N * HW);
    acc_t *mp = mean.mutable_data_ptr<acc_t>(), *vp = var.mutable_data_ptr<acc_t>();
    reduce_channel_sums<acc_t>(
        csum, [&](int64_t c, double s1, double s2) { math::batch_moments(double(kp[c]), s1, s2, M, mp[c], vp[c]); });
    if (z_mean.defined()) {
      const acc_t* cp = csum.const_data_ptr<acc_t>();
      acc_t* zm = z_mean.mutable_data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t p = n * C + c;
          zm[p] = acc_t(double(kp[c]) + double(cp[2 * p]) / double(HW));
        }
      }
    }
  });
}

// Fills the (kNormRows, C) table t from the statistics and the affine parameters (all acc dtype).
void norm_table(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                const Tensor& t) {
  const int64_t C = mean.size(0);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fanet_norm_table_cpu", [&] {
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *vp = var.const_data_ptr<scalar_t>(),
                   *wp = weight.const_data_ptr<scalar_t>(), *bp = bias.const_data_ptr<scalar_t>();
    scalar_t* tp = t.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) math::norm_table_column(mp[c], vp[c], wp[c], bp[c], eps, tp, C, c);
  });
}

// Pass 1: the residual gate's backward with B formed from z, which also takes the channel sums;
// pass 2: BatchNorm's input gradient from them, over grad_B in place.  For float16/bfloat16 grad_B is
// rounded on its way from pass 1 to pass 2 (the sums are of the unrounded values), as the unfused
// gate backward rounds it before ATen's batch norm backward reads it.
BnGateGrads bn_gate_backward(const GateBackwardInputs& b, const Tensor& k, const Tensor& norm, bool training) {
  const Tensor& x = b.in.x;
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  Tensor csum = at::empty({N, C, 2}, x.options().dtype(acc));  // every pair is written
  auto [gx, gz, gk] = gate_backward(b, k, norm, csum);
  Tensor grad_w = at::empty({C}, x.options().dtype(acc)), grad_b = at::empty({C}, x.options().dtype(acc));
  Tensor gt = at::empty({kGradRows, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_norm_grad_cpu", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t* np = norm.const_data_ptr<acc_t>();
    acc_t *gwp = grad_w.mutable_data_ptr<acc_t>(), *gbp = grad_b.mutable_data_ptr<acc_t>(),
          *tp = gt.mutable_data_ptr<acc_t>();
    const double M = double(N * HW);
    reduce_channel_sums<acc_t>(csum, [&](int64_t c, double sum_g, double sum_gx) {
      math::norm_grad_column(np, C, c, sum_g, sum_gx, M, training, gwp[c], gbp[c], tp);
    });
    if (x.numel() > 0)
      kernels<scalar_t>().norm_grad(gz.mutable_data_ptr<scalar_t>(), b.in.u.const_data_ptr<scalar_t>(), tp, 0, N, C,
                                    HW, b.in.fmt == at::MemoryFormat::ChannelsLast);
  });
  return {gx, gz, gk, grad_w, grad_b};
}

// The SE tail's pass 1 (b.in.norm_stride: the per-sample table): grad_x, grad_S, grad_k (k's dtype)
// and the (N, C, 2) sums of grad_S and grad_S * xhat, acc.
BnGateSums bn_gate_sums(const GateBackwardInputs& b, const Tensor& k, const Tensor& table) {
  const Tensor& x = b.in.x;
  Tensor csum = at::empty({x.size(0), x.size(1), 2}, x.options().dtype(acc_dtype(x.scalar_type())));
  auto [gx, gz, gk] = gate_backward(b, k, table, csum);
  return {gx, gz, gk, csum};
}

// Pass 2 over gz in place with the (N, kGradRows, C) table t (acc).
void norm_grad(const Tensor& gz, const Tensor& z, const Tensor& t, at::MemoryFormat fmt) {
  const int64_t N = z.size(0), C = z.size(1), HW = plane(z);
  if (z.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fanet_norm_grad_cpu", [&] {
    kernels<scalar_t>().norm_grad(gz.mutable_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                  t.const_data_ptr<Acc<scalar_t>>(), kGradRows * C, N, C, HW,
                                  fmt == at::MemoryFormat::ChannelsLast);
  });
}

// ---- the SE tail's (N, C) arithmetic (fa_math.h's se_*), per sample ----
namespace {

// f(n, c, p) for every entry p = n * C + c of an (N, C) tensor, in parallel over samples: a few
// operations each.
template <typename F>
void per_entry(int64_t N, int64_t C, const F& f) {
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t c = 0; c < C; ++c) f(n, c, n * C + c);
  });
}

}  // namespace

void se_squeeze(const Tensor& norm, const Tensor& z_mean, const Tensor& q) {
  const int64_t C = z_mean.size(1);
  AT_DISPATCH_FLOATING_TYPES(z_mean.scalar_type(), "fanet_se_squeeze_cpu", [&] {
    const scalar_t *np = norm.const_data_ptr<scalar_t>(), *zp = z_mean.const_data_ptr<scalar_t>();
    scalar_t* qp = q.mutable_data_ptr<scalar_t>();
    per_entry(z_mean.size(0), C, [&](int64_t, int64_t c, int64_t p) {
      qp[p] = math::se_squeeze(zp[p], np[kAlpha * C + c], np[kBeta * C + c]);
    });
  });
}

void se_scale(const Tensor& norm, const Tensor& e, const Tensor& table) {
  const int64_t C = e.size(1);
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "fanet_se_scale_cpu", [&] {
    const scalar_t* np = norm.const_data_ptr<scalar_t>();
    scalar_t *ep = e.mutable_data_ptr<scalar_t>(), *tp = table.mutable_data_ptr<scalar_t>();
    per_entry(e.size(0), C, [&](int64_t n, int64_t c, int64_t p) {
      ep[p] = math::sigmoid(ep[p]);
      math::se_table_column(np, C, c, ep[p], tp + n * kNormRows * C);
    });
  });
}

void se_scale_grad(const Tensor& sums, const Tensor& e, const Tensor& weight, const Tensor& bias, const Tensor& da) {
  const int64_t C = e.size(1), ks = sums.stride(1);
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "fanet_se_scale_grad_cpu", [&] {
    const scalar_t *sp = sums.const_data_ptr<scalar_t>(), *ep = e.const_data_ptr<scalar_t>(),
                   *wp = weight.const_data_ptr<scalar_t>(), *bp = bias.const_data_ptr<scalar_t>();
    double* dp = da.mutable_data_ptr<double>();
    per_entry(e.size(0), C, [&](int64_t, int64_t c, int64_t p) {
      dp[p] = math::se_scale_grad(wp[c], bp[c], sp[p * ks], sp[p * ks + 1], ep[p]);
    });
  });
}

// The batch sums by channel blocks, each walking the samples in order over contiguous rows; then the
// per-sample table.
void se_norm_grad(const Tensor& norm, const Tensor& z_mean, const Tensor& sums, const Tensor& e, const Tensor& dq,
                  const Tensor& da, int64_t hw, bool training, const Tensor& grad_weight, const Tensor& grad_bias,
                  const Tensor& grad_b2, const Tensor& table) {
  const int64_t N = e.size(0), C = e.size(1), ks = sums.stride(1);
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "fanet_se_norm_grad_cpu", [&] {
    const scalar_t *np = norm.const_data_ptr<scalar_t>(), *zp = z_mean.const_data_ptr<scalar_t>(),
                   *sp = sums.const_data_ptr<scalar_t>(), *ep = e.const_data_ptr<scalar_t>();
    const double *dqp = dq.const_data_ptr<double>(), *dap = da.const_data_ptr<double>();
    std::vector<double> gw(C, 0.0), gb(C, 0.0);
    double* gb2 = grad_b2.mutable_data_ptr<double>();
    std::fill(gb2, gb2 + C, 0.0);
    at::parallel_for(0, C, std::max<int64_t>(16, 4096 / std::max<int64_t>(N, 1)), [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t p = n * C + c;
          math::add_se_norm_grad_terms(np, C, c, zp[p], sp[p * ks], sp[p * ks + 1], ep[p], dqp[p], dap[p], gw[c], gb[c],
                                       gb2[c]);
        }
      }
    });
    scalar_t *gwp = grad_weight.mutable_data_ptr<scalar_t>(), *gbp = grad_bias.mutable_data_ptr<scalar_t>(),
             *tp = table.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      gwp[c] = scalar_t(gw[c]);
      gbp[c] = scalar_t(gb[c]);
    }
    const double M = double(N * hw);
    per_entry(N, C, [&](int64_t n, int64_t c, int64_t p) {
      math::se_grad_table_column(np, C, c, ep[p], dqp[p], gw[c], gb[c], hw, M, training, tp + n * kGradRows * C);
    });
  });
}

}  // namespace fanet::cpu
