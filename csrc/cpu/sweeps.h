// The gate's forward and backward sweeps, shared by the gate (gate.inc), BatchNorm gate (bn_gate.inc)
// and pool (focus.inc) kernels: each forward and each backward is one sweep over the activations.
// Work is split into units whose boundaries depend only on the shapes (a (n, c) plane in NCHW, a
// (n, channel block) column in channels_last), so every sum is taken in the same order whatever the
// thread count: the results, grad_k included, are deterministic.
#pragma once

#include "walks.h"

namespace fanet::cpu::CPU_CAPABILITY {

// ---------------------------------------------------------------------------------------
// Forward sweeps.  Mode kGate writes out; kGatePool writes out and its channel means;
// kPool only reads x and writes its channel means (focus).
enum class Fwd { kGate, kGatePool, kPool };

// n <= kStep elements at offset `at`: v0/v1 receive what the pool sums (out, or x for
// kPool); masked lanes are zero (x = u = 0 gives out = 0), so they add nothing.  kResidual:
// u holds a residual branch B and the gate weights towards relu(B + x); kNorm: u holds z and
// B = z * alpha + beta (nv: the NormRow lane vectors of these channels).
// no_gate (kNorm only): out = relu(B + x) itself.
template <Fwd kMode, bool kResidual, bool kNorm, typename scalar_t, typename AVec = typename AccPair<scalar_t>::AVec>
inline void forward_step(const scalar_t* x, const scalar_t* u, scalar_t* out, int64_t at, int64_t n, AVec k,
                         const AVec* nv, AVec& v0, AVec& v1, bool no_gate = false) {
  using P = AccPair<scalar_t>;
  P::load(x + at, v0, v1, n);
  if constexpr (kMode != Fwd::kPool) {
    AVec u0, u1;
    P::load(u + at, u0, u1, n);
    if constexpr (kNorm) {
      u0 = math::norm_branch(u0, nv[2 * kAlpha], nv[2 * kBeta]);
      u1 = math::norm_branch(u1, nv[2 * kAlpha + 1], nv[2 * kBeta + 1]);
    }
    if constexpr (kResidual) {
      u0 = math::residual_output(v0, u0);
      u1 = math::residual_output(v1, u1);
    }
    if (kNorm && no_gate) {
      v0 = u0;
      v1 = u1;
    } else {
      v0 = math::gate(v0, u0, k);
      v1 = math::gate(v1, u1, k);
    }
    P::store(out + at, v0, v1, n);
    if (kNorm && n < P::kStep) P::keep_first(v0, v1, n);
  }
}

template <typename scalar_t, Fwd kMode, bool kResidual, bool kNorm, typename P = AccPair<scalar_t>>
void forward_nchw(const ForwardSweep<scalar_t>& s) {
  using acc_t = typename P::acc_t;
  using AVec = typename P::AVec;
  const auto& [x, u, k, norm, out, pooled, N, C, HW, nhwc, residual, norm_stride, no_gate] = s;
  const ChannelTable<P, kNormRows> table{norm, C, norm_stride};
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    // Locals, not the captured references: vector stores may alias anything, so the compiler would
    // reload captured values at every step.
    const scalar_t *xl = x, *ul = u;
    scalar_t* ol = out;
    const int64_t hw = HW;
    for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c)
      const AVec kv(kMode == Fwd::kPool ? acc_t(0) : k[p / C]);
      AVec nv[2 * kNormRows];
      if constexpr (kNorm) table.sample(p / C).plane(p % C, nv);
      AVec s[2] = {AVec(acc_t(0)), AVec(acc_t(0))};
      LaneTotals<P, false, 1> tot;
      for (int64_t r = 0; r < hw; r += kRun<P>) {
        for (int64_t i = r, e = std::min(hw, r + kRun<P>); i < e; i += P::kStep) {
          AVec v0, v1;
          forward_step<kMode, kResidual, kNorm>(xl, ul, ol, p * hw + i, std::min(P::kStep, e - i), kv, nv, v0, v1,
                                                no_gate);
          if constexpr (kMode != Fwd::kGate) {
            s[0] = s[0] + v0;
            s[1] = s[1] + v1;
          }
        }
        if constexpr (kMode != Fwd::kGate) tot.fold(s);
      }
      if constexpr (kMode != Fwd::kGate) pooled[p] = acc_t(tot.total(0) / double(HW));
    }
  });
}

template <typename scalar_t, Fwd kMode, bool kResidual, bool kNorm, typename P = AccPair<scalar_t>>
void forward_nhwc(const ForwardSweep<scalar_t>& s) {
  using acc_t = typename P::acc_t;
  using AVec = typename P::AVec;
  const auto& [x, u, k, norm, out, pooled, N, C, HW, nhwc, residual, norm_stride, no_gate] = s;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<P>(C);
  const ChannelTable<P, kNormRows> table{norm, C, norm_stride};
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    BlockTotals<P, 1> block;  // the channel sums of a unit that is not tiled
    AVec tiled[2 * kNormRows];
    // Locals: see forward_nchw.
    const scalar_t *xl = x, *ul = u;
    scalar_t* ol = out;
    const int64_t hw_n = HW, c_n = C;
    for (int64_t unit = begin; unit < end; ++unit) {  // unit = (n, channel block), all rows
      const int64_t n = unit / blocks;
      const int64_t c0 = (unit % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      const AVec kv(kMode == Fwd::kPool ? acc_t(0) : k[n]);
      if (span) {  // the sample's HW * C elements as one stream; lane l holds channel l % C
        if constexpr (kNorm) table.sample(n).tile(tiled);
        const int64_t base = n * hw_n * c_n, len = hw_n * c_n;
        AVec s[2] = {AVec(acc_t(0)), AVec(acc_t(0))};
        LaneTotals<P, true, 1> tot;
        for (int64_t r = 0; r < len; r += kRun<P>) {
          for (int64_t i = r, e = std::min(len, r + kRun<P>); i < e; i += P::kStep) {
            AVec v0, v1;
            forward_step<kMode, kResidual, kNorm>(xl, ul, ol, base + i, std::min(P::kStep, e - i), kv, tiled, v0, v1,
                                                  no_gate);
            if constexpr (kMode != Fwd::kGate) {
              s[0] = s[0] + v0;
              s[1] = s[1] + v1;
            }
          }
          if constexpr (kMode != Fwd::kGate) tot.fold(s);
        }
        if constexpr (kMode != Fwd::kGate) {
          for (int64_t c = 0; c < C; ++c) pooled[n * C + c] = acc_t(tot.total(0, c, C) / double(HW));
        }
      } else {
        if constexpr (kMode != Fwd::kGate) block.reset();
        acc_t* sums = block.sums[0];
        for (int64_t r = 0; r < hw_n; r += kSumSteps) {  // a row adds one value per channel
          for (int64_t hw = r; hw < std::min(hw_n, r + kSumSteps); ++hw) {
            const int64_t base = (n * hw_n + hw) * c_n + c0;
            for (int64_t j = 0; j < cb; j += P::kStep) {
              const int64_t cnt = std::min(P::kStep, cb - j);
              AVec v0, v1, nv[2 * kNormRows];
              if constexpr (kNorm) table.sample(n).row(c0 + j, cnt, nv);
              forward_step<kMode, kResidual, kNorm>(xl, ul, ol, base + j, cnt, kv, nv, v0, v1, no_gate);
              if constexpr (kMode != Fwd::kGate) {
                (AVec::loadu(sums + j) + v0).store(sums + j);
                (AVec::loadu(sums + j + AVec::size()) + v1).store(sums + j + AVec::size());
              }
            }
          }
          if constexpr (kMode != Fwd::kGate) block.fold(cb);
        }
        if constexpr (kMode != Fwd::kGate) {
          for (int64_t j = 0; j < cb; ++j) pooled[n * C + c0 + j] = acc_t(block.t[0][j] / double(HW));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward sweep of the gate: reads grad_out, x, u once, folds grad_pooled / HW in when
// kFold, writes grad_x and grad_u, and leaves one partial sum of g * (u - x) per work
// unit in `partial`; the caller reduces those per sample in a fixed order.

// n <= kStep elements at offset `at`; gp0/gp1 are the pooled gradients of those lanes, s0/s1
// the running grad_k sums.  Masked lanes have u - x = 0, so they add nothing to grad_k.
// kResidual: u holds the branch B, gu receives grad_B and gx includes the shortcut's share.
// kNorm: u holds z, B = z * alpha + beta (nv: NormRow lane vectors), and cs[0..3] take the
// BatchNorm's channel sums of grad_B and grad_B * xhat.
template <bool kFold, bool kResidual, bool kNorm, typename scalar_t, typename AVec = typename AccPair<scalar_t>::AVec>
inline void backward_step(const scalar_t* g, const scalar_t* x, const scalar_t* u, scalar_t* gx, scalar_t* gu,
                          int64_t at, int64_t n, AVec k, AVec gp0, AVec gp1, AVec inv_hw, const AVec* nv, AVec* cs,
                          AVec& s0, AVec& s1, bool no_gate = false) {
  using P = AccPair<scalar_t>;
  AVec g0, g1, x0, x1, u0, u1, xh0, xh1;
  P::load(g + at, g0, g1, n);
  P::load(x + at, x0, x1, n);
  P::load(u + at, u0, u1, n);
  if constexpr (kFold) {
    g0 = math::fold_pooled_grad(g0, gp0, inv_hw);
    g1 = math::fold_pooled_grad(g1, gp1, inv_hw);
  }
  if constexpr (kNorm) {
    if (n < P::kStep) P::keep_first(g0, g1, n);  // masked lanes: B = beta, not 0
    xh0 = math::norm_xhat(u0, nv[2 * kInvstd], nv[2 * kShift]);
    xh1 = math::norm_xhat(u1, nv[2 * kInvstd + 1], nv[2 * kShift + 1]);
    u0 = math::norm_branch(u0, nv[2 * kAlpha], nv[2 * kBeta]);
    u1 = math::norm_branch(u1, nv[2 * kAlpha + 1], nv[2 * kBeta + 1]);
  }
  if constexpr (kResidual) {
    const AVec gb0 = math::residual_grad_branch(g0, k, x0, u0), gb1 = math::residual_grad_branch(g1, k, x1, u1);
    if constexpr (kNorm) {
      math::add_norm_grad_sums(gb0, xh0, cs[0], cs[2]);
      math::add_norm_grad_sums(gb1, xh1, cs[1], cs[3]);
    }
    if (kNorm && no_gate)  // k holds ones: grad_B = g where B + x > 0, and grad_x is it
      P::store(gx + at, gb0, gb1, n);
    else
      P::store(gx + at, math::residual_grad_x(g0, k, gb0), math::residual_grad_x(g1, k, gb1), n);
    P::store(gu + at, gb0, gb1, n);
    u0 = math::residual_output(x0, u0);
    u1 = math::residual_output(x1, u1);
  } else {
    P::store(gx + at, math::gate_grad_x(g0, k), math::gate_grad_x(g1, k), n);
    P::store(gu + at, math::gate_grad_u(g0, k), math::gate_grad_u(g1, k), n);
  }
  s0 = s0 + math::gate_grad_k_term(g0, x0, u0);
  s1 = s1 + math::gate_grad_k_term(g1, x1, u1);
}

template <typename scalar_t, bool kFold, bool kResidual, bool kNorm, typename P = AccPair<scalar_t>>
void gate_backward_nchw(const BackwardSweep<scalar_t>& s) {
  using acc_t = typename P::acc_t;
  using AVec = typename P::AVec;
  const auto& [g, gp, x, u, k, norm, gx, gu, partial, csum, N, C, HW, nhwc, residual, norm_stride, no_gate] = s;
  const AVec ihv(acc_t(1) / acc_t(HW));
  const ChannelTable<P, kNormRows> table{norm, C, norm_stride};
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    // Locals: see forward_nchw.
    const scalar_t *gl = g, *xl = x, *ul = u;
    scalar_t *gxl = gx, *gul = gu;
    const int64_t hw = HW;
    for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c): one k, one pooled gradient
      const AVec kv(k[p / C]), gpv(kFold ? gp[p] : acc_t(0));
      AVec gk[2] = {AVec(acc_t(0)), AVec(acc_t(0))}, nv[2 * kNormRows], cs[4];
      LaneTotals<P, false, 1> gk_tot;
      LaneTotals<P, false, 2> tot;
      if constexpr (kNorm) {
        table.sample(p / C).plane(p % C, nv);
        std::fill(cs, cs + 4, AVec(acc_t(0)));
      }
      for (int64_t r = 0; r < hw; r += kRun<P>) {
        for (int64_t i = r, e = std::min(hw, r + kRun<P>); i < e; i += P::kStep)
          backward_step<kFold, kResidual, kNorm>(gl, xl, ul, gxl, gul, p * hw + i, std::min(P::kStep, e - i), kv, gpv,
                                                 gpv, ihv, nv, cs, gk[0], gk[1], no_gate);
        gk_tot.fold(gk);
        if constexpr (kNorm) tot.fold(cs);
      }
      partial[p] = gk_tot.total(0);
      if constexpr (kNorm) tot.store(cs, csum + 2 * p, C);
    }
  });
}

template <typename scalar_t, bool kFold, bool kResidual, bool kNorm, typename P = AccPair<scalar_t>>
void gate_backward_nhwc(const BackwardSweep<scalar_t>& s) {
  using acc_t = typename P::acc_t;
  using AVec = typename P::AVec;
  const auto& [g, gp, x, u, k, norm, gx, gu, partial, csum, N, C, HW, nhwc, residual, norm_stride, no_gate] = s;
  const AVec ihv(acc_t(1) / acc_t(HW)), zero(acc_t(0));
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<P>(C);
  const ChannelTable<P, kNormRows> table{norm, C, norm_stride};
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    BlockTotals<P, 2> block;  // kNorm: the channel sums of a unit that is not tiled
    AVec tiled[2 * kNormRows];
    // Locals: see forward_nchw.
    const scalar_t *gl = g, *xl = x, *ul = u;
    scalar_t *gxl = gx, *gul = gu;
    const int64_t hw_n = HW, c_n = C;
    for (int64_t unit = begin; unit < end; ++unit) {  // unit = (n, channel block), all rows
      const int64_t n = unit / blocks;
      const int64_t c0 = (unit % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      const AVec kv(k[n]);
      const acc_t* gpn = kFold ? gp + n * C + c0 : nullptr;  // one pooled gradient per channel
      AVec gk[2] = {zero, zero}, cs[4] = {zero, zero, zero, zero};
      LaneTotals<P, false, 1> gk_tot;
      if (span) {  // the sample's HW * C elements as one stream; lane l holds channel l % C
        if constexpr (kNorm) table.sample(n).tile(tiled);
        AVec gp0 = zero, gp1 = zero;
        if constexpr (kFold) {
          AVec gpv[2];
          ChannelTable<P, 1>{gpn, C}.tile(gpv);
          gp0 = gpv[0];
          gp1 = gpv[1];
        }
        const int64_t base = n * hw_n * c_n, len = hw_n * c_n;
        LaneTotals<P, true, 2> tot;
        for (int64_t r = 0; r < len; r += kRun<P>) {
          for (int64_t i = r, e = std::min(len, r + kRun<P>); i < e; i += P::kStep)
            backward_step<kFold, kResidual, kNorm>(gl, xl, ul, gxl, gul, base + i, std::min(P::kStep, e - i), kv, gp0,
                                                   gp1, ihv, tiled, cs, gk[0], gk[1], no_gate);
          gk_tot.fold(gk);
          if constexpr (kNorm) tot.fold(cs);
        }
        if constexpr (kNorm) tot.store(cs, csum + 2 * n * C, C);
      } else {
        if constexpr (kNorm) block.reset();
        // grad_k's lanes take ceil(cb / kStep) steps a row: they fold every `run` rows (a power of two,
        // so the channel sums, one value per row, fold every kSumSteps rows at a run's end).
        int64_t run = kSumSteps;
        while (run > 1 && run * ((cb + P::kStep - 1) / P::kStep) > kSumSteps) run /= 2;
        for (int64_t r = 0; r < hw_n; r += run) {
          for (int64_t hw = r; hw < std::min(hw_n, r + run); ++hw) {
            const int64_t base = (n * hw_n + hw) * c_n + c0;
            for (int64_t j = 0; j < cb; j += P::kStep) {
              const int64_t cnt = std::min(P::kStep, cb - j);
              AVec gp0 = zero, gp1 = zero, nv[2 * kNormRows];
              if constexpr (kFold) P::load_acc(gpn + j, gp0, gp1, cnt);
              if constexpr (kNorm) {
                table.sample(n).row(c0 + j, cnt, nv);
                block.load(j, cs);
              }
              backward_step<kFold, kResidual, kNorm>(gl, xl, ul, gxl, gul, base + j, cnt, kv, gp0, gp1, ihv, nv, cs,
                                                     gk[0], gk[1], no_gate);
              if constexpr (kNorm) block.save(j, cs);
            }
          }
          gk_tot.fold(gk);
          if (kNorm && (r + run) % kSumSteps == 0) block.fold(cb);
        }
        if constexpr (kNorm) block.store(csum + 2 * (n * C + c0), cb);
      }
      partial[unit] = gk_tot.total(0);
    }
  });
}

// Runs s with kNhwc or kNchw, by its layout.
template <auto kNhwc, auto kNchw, typename Sweep>
void by_layout(const Sweep& s) {
  (s.channels_last ? kNhwc : kNchw)(s);
}

template <typename scalar_t, Fwd kMode, bool kResidual, bool kNorm>
void forward(const ForwardSweep<scalar_t>& s) {
  by_layout<&forward_nhwc<scalar_t, kMode, kResidual, kNorm>, &forward_nchw<scalar_t, kMode, kResidual, kNorm>>(s);
}

template <typename scalar_t, bool kFold, bool kResidual, bool kNorm>
void backward(const BackwardSweep<scalar_t>& s) {
  by_layout<&gate_backward_nhwc<scalar_t, kFold, kResidual, kNorm>,
            &gate_backward_nchw<scalar_t, kFold, kResidual, kNorm>>(s);
}

}  // namespace fanet::cpu::CPU_CAPABILITY
