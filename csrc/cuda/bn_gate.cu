// bn_residual_gate_pool on CUDA: z's batch statistics, the BatchNorm table, the gate's walk with the
// branch formed from z (gate_pool.cuh), and the backward's two passes.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include "gate_pool.cuh"

namespace fanet::cuda {
namespace {

// bn_residual_gate_pool's batch statistics: the shifted moments of z (shift: K_c per channel).
template <typename scalar_t>
struct MomentsOp {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 2;
  const scalar_t* z;
  const acc_t* shift;
  template <int kL>
  struct Channel {
    acc_t shift[kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t, int64_t c) const {
    Channel<kL> ch;
    table_row(shift, 0, 0, c, ch.shift);
    return ch;
  }
  template <int kVec, int kL, int kS>
  __device__ void step(const Channel<kL>& ch, int64_t off, acc_t (&s)[kS][kL]) const {
    const Pack<scalar_t, kVec> zp = load_pack<kVec>(z + off);
#pragma unroll
    for (int j = 0; j < kVec; ++j) math::add_moments(acc_t(zp.v[j]) - ch.shift[j % kL], s[0][j % kL], s[1][j % kL]);
  }
};

// bn_residual_gate_pool's backward pass 1: the residual gate's backward with B = z * alpha + beta,
// grad_pooled / HW folded into grad_out when kFold.  Writes grad_x and grad_B (into gz, for pass 2)
// and sums grad_B, grad_B * xhat (BatchNorm's channel sums) and g * (U - x) (grad_k's, per channel).
template <typename scalar_t, bool kFold>
struct NormGateBackwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 3;
  const scalar_t* g;
  const acc_t* gp;
  const scalar_t* x;
  const scalar_t* z;
  const acc_t* k;
  const acc_t* norm;
  scalar_t* gx;
  scalar_t* gz;
  int64_t C;
  acc_t inv_hw;
  int64_t norm_stride = 0;  // 0, or kNormRows * C for the SE tail's per-sample table
  bool no_gate = false;     // grad_x = grad_B (bn_se_residual; k holds ones)
  template <int kL>
  struct Channel {
    acc_t k, gp[kL], alpha[kL], beta[kL], invstd[kL], shift[kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t n, int64_t c) const {
    Channel<kL> ch;
    ch.k = k[n];
    if constexpr (kFold) table_row(gp, n, C, c, ch.gp);  // grad_pooled: (N, C)
    const acc_t* t = norm + n * norm_stride;
    table_row(t, kAlpha, C, c, ch.alpha);
    table_row(t, kBeta, C, c, ch.beta);
    table_row(t, kInvstd, C, c, ch.invstd);
    table_row(t, kShift, C, c, ch.shift);
    return ch;
  }
  template <int kVec, int kL, int kS>
  __device__ void step(const Channel<kL>& ch, int64_t off, acc_t (&s)[kS][kL]) const {
    const Pack<scalar_t, kVec> gpk = load_pack<kVec>(g + off);
    const Pack<scalar_t, kVec> xp = load_pack<kVec>(x + off);
    const Pack<scalar_t, kVec> zp = load_pack<kVec>(z + off);
    Pack<scalar_t, kVec> gxp, gbp;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int l = j % kL;
      acc_t gv = acc_t(gpk.v[j]);
      if constexpr (kFold) gv = math::fold_pooled_grad(gv, ch.gp[l], inv_hw);
      const acc_t xv = acc_t(xp.v[j]), zv = acc_t(zp.v[j]);
      const acc_t bv = math::norm_branch(zv, ch.alpha[l], ch.beta[l]);
      const acc_t gb = math::residual_grad_branch(gv, ch.k, xv, bv);
      gxp.v[j] = scalar_t(no_gate ? gb : math::residual_grad_x(gv, ch.k, gb));
      gbp.v[j] = scalar_t(gb);  // rounded for pass 2, summed unrounded (as the CPU does)
      math::add_norm_grad_sums(gb, math::norm_xhat(zv, ch.invstd[l], ch.shift[l]), s[0][l], s[1][l]);
      s[2][l] += math::gate_grad_k_term(gv, xv, math::residual_output(xv, bv));
    }
    store_pack<kVec>(gx + off, gxp);
    store_pack<kVec>(gz + off, gbp);
  }
};

// bn_residual_gate_pool's backward pass 2: BatchNorm's input gradient over grad_B in place (gz), from
// z and the (kGradRows, C) table t.
template <typename scalar_t>
struct NormInputGradOp {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 0;
  scalar_t* gz;
  const scalar_t* z;
  const acc_t* t;
  int64_t C;
  int64_t t_stride = 0;  // 0, or kGradRows * C for the SE tail's (N, kGradRows, C) table
  template <int kL>
  struct Channel {
    acc_t row[kGradRows][kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t n, int64_t c) const {
    Channel<kL> ch;
#pragma unroll
    for (int r = 0; r < kGradRows; ++r) table_row(t + n * t_stride, r, C, c, ch.row[r]);
    return ch;
  }
  template <int kVec, int kL, int kS>
  __device__ void step(const Channel<kL>& ch, int64_t off, acc_t (&)[kS][kL]) const {
    const Pack<scalar_t, kVec> gp = load_pack<kVec>(gz + off);
    const Pack<scalar_t, kVec> zp = load_pack<kVec>(z + off);
    Pack<scalar_t, kVec> op;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int l = j % kL;
      op.v[j] =
          scalar_t(math::norm_input_grad(acc_t(gp.v[j]), acc_t(zp.v[j]), ch.row[kGradInvstd][l], ch.row[kGradShift][l],
                                         ch.row[kGradScale][l], ch.row[kGradXhat][l], ch.row[kGradConst][l]));
    }
    store_pack<kVec>(gz + off, op);
  }
};

// ---- bn_residual_gate_pool: per channel ---------------------------------------------------------
// Thread per channel, from the (C, 2) batch totals (double) of line_sums_kernel.

// mean, var of channel c from the moments of MomentsOp.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    batch_moments_kernel(const double* __restrict__ totals, const acc_t* __restrict__ shift, int64_t C, double M,
                         acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads)
    math::batch_moments(double(shift[c]), totals[2 * c], totals[2 * c + 1], M, mean[c], var[c]);
}

// The (kNormRows, C) table t from the statistics and the affine parameters (acc dtype).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    norm_table_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var, const acc_t* __restrict__ weight,
                      const acc_t* __restrict__ bias, double eps, int64_t C, acc_t* __restrict__ t) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads)
    math::norm_table_column(mean[c], var[c], weight[c], bias[c], eps, t, C, c);
}

// From the batch totals of NormGateBackwardOp's first two sums (grad_B, grad_B * xhat): grad_bias,
// grad_weight and the (kGradRows, C) table gt of NormInputGradOp.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    norm_grad_table_kernel(const double* __restrict__ totals, const acc_t* __restrict__ norm, int64_t C, double M,
                           bool training, acc_t* __restrict__ grad_w, acc_t* __restrict__ grad_b,
                           acc_t* __restrict__ gt) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads) {
    math::norm_grad_column(norm, C, c, totals[2 * c], totals[2 * c + 1], M, training, grad_w[c], grad_b[c], gt);
  }
}

// ---- the SE tail's (N, C) arithmetic (fa_math.h's se_*): a thread per (n, c), or per channel --------

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    se_squeeze_kernel(const acc_t* __restrict__ norm, const acc_t* __restrict__ zbar, int64_t NC, int64_t C,
                      acc_t* __restrict__ q) {
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < NC; p += int64_t(gridDim.x) * kThreads) {
    const int64_t c = p % C;
    q[p] = math::se_squeeze(zbar[p], norm[kAlpha * C + c], norm[kBeta * C + c]);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    se_scale_kernel(const acc_t* __restrict__ norm, acc_t* __restrict__ e, int64_t NC, int64_t C,
                    acc_t* __restrict__ table) {
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < NC; p += int64_t(gridDim.x) * kThreads) {
    const acc_t en = math::sigmoid(e[p]);
    e[p] = en;
    math::se_table_column(norm, C, p % C, en, table + (p / C) * kNormRows * C);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    se_scale_grad_kernel(const acc_t* __restrict__ sums, int64_t ks, const acc_t* __restrict__ e,
                         const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, int64_t NC, int64_t C,
                         double* __restrict__ da) {
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < NC; p += int64_t(gridDim.x) * kThreads) {
    const int64_t c = p % C;
    da[p] = math::se_scale_grad(weight[c], bias[c], sums[p * ks], sums[p * ks + 1], e[p]);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    se_norm_grad_kernel(const acc_t* __restrict__ norm, const acc_t* __restrict__ zbar, const acc_t* __restrict__ sums,
                        int64_t ks, const acc_t* __restrict__ e, const double* __restrict__ dq,
                        const double* __restrict__ da, int64_t N, int64_t C, int64_t HW, bool training,
                        acc_t* __restrict__ grad_w, acc_t* __restrict__ grad_b, double* __restrict__ grad_b2,
                        acc_t* __restrict__ table) {
  // A thread per channel: the samples in order, as on the CPU.
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads) {
    double gw = 0, gb = 0, gb2 = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = n * C + c;
      math::add_se_norm_grad_terms(norm, C, c, zbar[p], sums[p * ks], sums[p * ks + 1], e[p], dq[p], da[p], gw, gb,
                                   gb2);
    }
    grad_w[c] = acc_t(gw);
    grad_b[c] = acc_t(gb);
    grad_b2[c] = gb2;
    const double M = double(N * HW);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = n * C + c;
      math::se_grad_table_column(norm, C, c, e[p], dq[p], gw, gb, HW, M, training, table + n * kGradRows * C);
    }
  }
}

}  // namespace

// Fills mean and var (C,) with z's batch statistics from its moments about shift (one read of z).
// With z_mean defined, also z's plane means (N, C) into it.
void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean, const Tensor& var,
                 const Tensor& z_mean) {
  const int64_t N = z.size(0), C = z.size(1), HW = plane(z);
  const auto acc_opts = mean.options();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fanet_batch_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t* kp = shift.const_data_ptr<acc_t>();
    const auto [sums, splits] = walk<scalar_t>(MomentsOp<scalar_t>{zp, kp}, aligned16(zp), fmt, N, C, HW, acc_opts);
    const Tensor folded = fold_splits<acc_t>(sums, N, splits);  // (N, C, 2)
    const Tensor totals = channel_totals<acc_t>(folded);
    if (z_mean.defined())
      z_mean.copy_(shift.to(at::kDouble).add(folded.select(2, 0).to(at::kDouble).div(double(HW))));
    batch_moments_kernel<acc_t><<<stride_grid(C, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        totals.const_data_ptr<double>(), kp, C, double(N * HW), mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

GatePoolResult bn_gate_pool(const GateInputs& in, const Tensor& norm) { return run_gate_pool<true>(in, norm); }

// Fills the (kNormRows, C) table t from the statistics and the affine parameters (all acc dtype).
void norm_table(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                const Tensor& t) {
  const int64_t C = mean.size(0);
  if (C == 0) return;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fanet_norm_table_cuda", [&] {
    norm_table_kernel<scalar_t><<<stride_grid(C, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), eps, C, t.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Pass 1 (NormGateBackwardOp): the residual gate's backward with B formed from z, taking BatchNorm's
// channel sums and grad_k's; pass 2 (NormInputGradOp): BatchNorm's input gradient over grad_B in place.
// 8 * S bytes, as on the CPU.
namespace {

// Pass 1 (NormGateBackwardOp) with the table norm (b.in.norm_stride, b.in.no_gate): fills gx, gz and
// returns its sums folded over the splits, (N, C, 3) acc.
template <typename scalar_t>
Tensor norm_gate_pass1(const GateBackwardInputs& b, const Tensor& norm, const Tensor& gx, const Tensor& gz) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& in = b.in;
  const Tensor& x = in.x;
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const scalar_t *gptr = b.g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                 *zp = in.u.const_data_ptr<scalar_t>();
  scalar_t *gxp = gx.mutable_data_ptr<scalar_t>(), *gzp = gz.mutable_data_ptr<scalar_t>();
  const bool aligned = aligned16(gptr) && aligned16(xp) && aligned16(zp) && aligned16(gxp) && aligned16(gzp);
  Tensor sums;
  int64_t splits = 1;
  with_flag(b.gp.defined(), [&](auto fold_tag) {
    constexpr bool kFold = decltype(fold_tag)::value;
    const NormGateBackwardOp<scalar_t, kFold> pass1{gptr,
                                                    kFold ? b.gp.const_data_ptr<acc_t>() : nullptr,
                                                    xp,
                                                    zp,
                                                    in.k.const_data_ptr<acc_t>(),
                                                    norm.const_data_ptr<acc_t>(),
                                                    gxp,
                                                    gzp,
                                                    C,
                                                    acc_t(1) / acc_t(HW),
                                                    in.norm_stride,
                                                    in.no_gate};
    std::tie(sums, splits) = walk<scalar_t>(pass1, aligned, in.fmt, N, C, HW, acc_opts);
  });
  return fold_splits<acc_t>(sums, N, splits);
}

// grad_k[n] (acc): sample n's per-channel sums of g * (U - x), the third of folded's triples, in order.
template <typename acc_t>
void grad_k_sums(const Tensor& folded, const Tensor& gk) {
  const int64_t N = folded.size(0), C = folded.size(1), K = folded.size(2);
  line_sums_kernel<1><<<grid_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      folded.const_data_ptr<acc_t>() + 2, C, C * K, K, gk.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The SE tail's pass 1: (grad_x, grad_S, grad_k in k's dtype, the (N, C, 2) sums of grad_S and
// grad_S * xhat, acc).  x is not empty.
BnGateSums bn_gate_sums(const GateBackwardInputs& b, const Tensor& k, const Tensor& table) {
  const Tensor& x = b.in.x;
  const DeviceGuard guard(x);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor gx = at::empty(x.sizes(), x.options().memory_format(b.in.fmt));
  Tensor gz = at::empty(x.sizes(), x.options().memory_format(b.in.fmt));
  Tensor gk = at::empty({x.size(0)}, acc_opts), folded;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_bn_gate_sums_cuda", [&] {
    folded = norm_gate_pass1<scalar_t>(b, table, gx, gz);
    grad_k_sums<at::opmath_type<scalar_t>>(folded, gk);
  });
  return {gx, gz, gk.to(k.scalar_type()), folded.narrow(2, 0, 2)};
}

// The SE tail's pass 2 over gz in place, with the (N, kGradRows, C) table t (acc).
void norm_grad(const Tensor& gz, const Tensor& z, const Tensor& t, at::MemoryFormat fmt) {
  if (z.numel() == 0) return;
  const DeviceGuard guard(z);
  const int64_t N = z.size(0), C = z.size(1), HW = plane(z);
  const auto acc_opts = z.options().dtype(acc_dtype(z.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fanet_norm_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    walk<scalar_t>(NormInputGradOp<scalar_t>{gzp, zp, t.const_data_ptr<acc_t>(), C, kGradRows * C},
                   aligned16(gzp) && aligned16(zp), fmt, N, C, HW, acc_opts);
  });
}

BnGateGrads bn_gate_backward(const GateBackwardInputs& b, const Tensor& k, const Tensor& norm, bool training) {
  const auto& in = b.in;
  const Tensor& x = in.x;
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const DeviceGuard guard(x);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor gx = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor gz = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() == 0) return {gx, gz, at::zeros({N}, k.options()), at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
  Tensor gk = at::empty({N}, acc_opts), grad_w = at::empty({C}, acc_opts), grad_b = at::empty({C}, acc_opts);
  Tensor gt = at::empty({kGradRows, C}, acc_opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_bn_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = in.u.const_data_ptr<scalar_t>();
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    const Tensor folded = norm_gate_pass1<scalar_t>(b, norm, gx, gz);  // (N, C, 3)
    const Tensor totals = channel_totals<acc_t>(folded);
    norm_grad_table_kernel<acc_t><<<stride_grid(C, 1), kThreads, 0, stream>>>(
        totals.const_data_ptr<double>(), norm.const_data_ptr<acc_t>(), C, double(N * HW), training,
        grad_w.mutable_data_ptr<acc_t>(), grad_b.mutable_data_ptr<acc_t>(), gt.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_k_sums<acc_t>(folded, gk);
    walk<scalar_t>(NormInputGradOp<scalar_t>{gzp, zp, gt.const_data_ptr<acc_t>(), C}, aligned16(gzp) && aligned16(zp),
                   in.fmt, N, C, HW, acc_opts);
  });
  return {gx, gz, gk.to(k.scalar_type()), grad_w, grad_b};
}

// ---- the SE tail's (N, C) arithmetic: launches (acc tensors as DeviceKernels says) ----

void se_squeeze(const Tensor& norm, const Tensor& z_mean, const Tensor& q) {
  const int64_t NC = z_mean.numel(), C = z_mean.size(1);
  if (NC == 0) return;
  AT_DISPATCH_FLOATING_TYPES(z_mean.scalar_type(), "fanet_se_squeeze_cuda", [&] {
    se_squeeze_kernel<scalar_t><<<stride_grid(NC, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        norm.const_data_ptr<scalar_t>(), z_mean.const_data_ptr<scalar_t>(), NC, C, q.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void se_scale(const Tensor& norm, const Tensor& e, const Tensor& table) {
  const int64_t NC = e.numel(), C = e.size(1);
  if (NC == 0) return;
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "fanet_se_scale_cuda", [&] {
    se_scale_kernel<scalar_t><<<stride_grid(NC, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        norm.const_data_ptr<scalar_t>(), e.mutable_data_ptr<scalar_t>(), NC, C, table.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void se_scale_grad(const Tensor& sums, const Tensor& e, const Tensor& weight, const Tensor& bias, const Tensor& da) {
  const int64_t NC = e.numel(), C = e.size(1);
  if (NC == 0) return;
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "fanet_se_scale_grad_cuda", [&] {
    se_scale_grad_kernel<scalar_t><<<stride_grid(NC, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        sums.const_data_ptr<scalar_t>(), sums.stride(1), e.const_data_ptr<scalar_t>(),
        weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), NC, C, da.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void se_norm_grad(const Tensor& norm, const Tensor& z_mean, const Tensor& sums, const Tensor& e, const Tensor& dq,
                  const Tensor& da, int64_t hw, bool training, const Tensor& grad_weight, const Tensor& grad_bias,
                  const Tensor& grad_b2, const Tensor& table) {
  const int64_t N = e.size(0), C = e.size(1);
  if (C == 0) return;
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "fanet_se_norm_grad_cuda", [&] {
    se_norm_grad_kernel<scalar_t><<<stride_grid(C, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        norm.const_data_ptr<scalar_t>(), z_mean.const_data_ptr<scalar_t>(), sums.const_data_ptr<scalar_t>(),
        sums.stride(1), e.const_data_ptr<scalar_t>(), dq.const_data_ptr<double>(), da.const_data_ptr<double>(), N, C,
        hw, training, grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
        grad_b2.mutable_data_ptr<double>(), table.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fanet::cuda
