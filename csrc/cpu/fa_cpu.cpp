// Fused CPU kernels for the fanet ops (SPEC §4).
//
// Each forward and each backward is one sweep over the activations.  Work is split
// into units whose boundaries depend only on the shapes (a (n, c) plane in NCHW, a
// (n, channel block) column in channels_last), so every sum is taken in the same order
// whatever the thread count: the results, grad_k included, are deterministic.
// The per-element arithmetic is fanet::math (csrc/common/fa_math.h), shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "../common/fa_math.h"
#include "../common/op_drivers.h"

namespace fanet {
namespace math {
// fa_math.h's selection primitive on SIMD lanes: a lane compare gives an all-ones mask.
template <typename T>
struct Select<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static inline V unless_nonpositive(const V& r, const V& v) {
    const V zero(T(0));
    return V::blendv(v, zero, r <= zero);
  }
};
}  // namespace math

namespace cpu {
namespace {

using at::Tensor;
namespace vec = at::vec;

// Two float vectors rounded to one vector of scalar_t (float16/bfloat16).  Where the build machine
// has AVX512-BF16, bfloat16 takes one instruction (vcvtne2ps2bf16) instead of at::vec's rounding in
// about ten integer ops per vector (12 % of the bfloat16 kernels' time at the ResNet-56 shapes,
// benchmarks/PROFILE.md item 12).  It rounds to nearest even too, but flushes denormals and quiets
// NaNs, so a step holding either takes at::vec's path: results stay bit-identical to ATen's.
template <typename scalar_t>
inline vec::Vectorized<scalar_t> round_from_float(const vec::Vectorized<float>& a, const vec::Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // fpclass: quiet NaN, denormal, signalling NaN
    if (!(_mm512_fpclass_ps_mask(a, kNanOrDenormal) | _mm512_fpclass_ps_mask(b, kNanOrDenormal)))
      return vec::Vectorized<at::BFloat16>((__m512i)_mm512_cvtne2ps_pbh(b, a));  // b: upper half
  }
#endif
  return vec::convert_from_float<scalar_t>(a, b);
}

// Moves kStep = 2 * Vectorized<acc_t>::size() elements of scalar_t as two accumulator
// vectors, so float16/bfloat16 are widened to float32 on load and rounded once on store.
// With a count n < kStep the access is masked: lanes past n load as zero and are not
// stored.  That replaces scalar tail loops, which matter when a whole row is shorter than
// kStep (channels_last with C = 16, ResNet-56's first stage) or H*W is odd (7x7 planes).
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = vec::Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * AVec::size();
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static_assert(!kReduced || vec::Vectorized<scalar_t>::size() == kStep,
                "reduced-precision vectors must hold two float vectors");

  static inline void load(const scalar_t* p, AVec& a, AVec& b, int64_t n = kStep) {
    if constexpr (kReduced) {
      using SVec = vec::Vectorized<scalar_t>;
      std::tie(a, b) = vec::convert_to_float<scalar_t>(n == kStep ? SVec::loadu(p) : SVec::loadu(p, n));
    } else {
      load_acc(p, a, b, n);
    }
  }
  static inline void store(scalar_t* p, const AVec& a, const AVec& b, int64_t n = kStep) {
    if constexpr (kReduced) {
      const auto v = round_from_float<scalar_t>(a, b);
      n == kStep ? v.store(p) : v.store(p, n);
    } else if (n == kStep) {
      a.store(p);
      b.store(p + AVec::size());
    } else if (n <= AVec::size()) {  // never an all-masked access: it can cost a microcode assist
      a.store(p, n);
    } else {
      a.store(p);
      b.store(p + AVec::size(), n - AVec::size());
    }
  }
  // Accumulator-typed memory (pooled gradients), masked like load.
  static inline void load_acc(const acc_t* p, AVec& a, AVec& b, int64_t n = kStep) {
    if (n == kStep) {
      a = AVec::loadu(p);
      b = AVec::loadu(p + AVec::size());
    } else if (n <= AVec::size()) {
      a = AVec::loadu(p, n);
      b = AVec(acc_t(0));
    } else {
      a = AVec::loadu(p);
      b = AVec::loadu(p + AVec::size(), n - AVec::size());
    }
  }
  static inline acc_t sum(const AVec& a, const AVec& b) {
    return vec::vec_reduce_all<acc_t>([](AVec& l, AVec& r) { return l + r; }, a + b);
  }
};

// Channel block of one channels_last work unit: its running sums stay in L1.  A multiple
// of every kStep, so masked steps stay inside the block's sums.
constexpr int64_t kChannelBlock = 256;

// channels_last with C dividing kStep (C = 16: ResNet-56's first stage): a row fills only part
// of a step, so rows are walked as one contiguous stream of whole steps instead, in which lane
// l always holds channel l % C and its sums stay in registers (bfloat16 ran 1.8x slower in
// half-masked steps).
template <typename L>
inline bool spans_rows(int64_t C) {
  return L::kStep % C == 0;
}

// About this many elements per parallel task keeps threads busy without overhead.
inline int64_t grain_for(int64_t unit_elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, unit_elems));
}

// ---------------------------------------------------------------------------------------
// Forward sweeps.  Mode kGate writes out; kGatePool writes out and its channel means;
// kPool only reads x and writes its channel means (focus).
enum class Fwd { kGate, kGatePool, kPool };

// n <= kStep elements at offset `at`: v0/v1 receive what the pool sums (out, or x for
// kPool); masked lanes are zero (x = u = 0 gives out = 0), so they add nothing.  kResidual:
// u holds a residual branch B and the gate weights towards relu(B + x).
template <Fwd kMode, bool kResidual, typename scalar_t, typename AVec = typename Lanes<scalar_t>::AVec>
inline void forward_step(const scalar_t* x, const scalar_t* u, scalar_t* out, int64_t at, int64_t n, AVec k,
                         AVec& v0, AVec& v1) {
  using L = Lanes<scalar_t>;
  L::load(x + at, v0, v1, n);
  if constexpr (kMode != Fwd::kPool) {
    AVec u0, u1;
    L::load(u + at, u0, u1, n);
    if constexpr (kResidual) {
      u0 = math::residual_output(v0, u0);
      u1 = math::residual_output(v1, u1);
    }
    v0 = math::gate(v0, u0, k);
    v1 = math::gate(v1, u1, k);
    L::store(out + at, v0, v1, n);
  }
}

template <typename scalar_t, Fwd kMode, bool kResidual>
void forward_nchw(const scalar_t* x, const scalar_t* u, const at::opmath_type<scalar_t>* k,
                  scalar_t* out, at::opmath_type<scalar_t>* pooled, int64_t N, int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c)
      const AVec kv(kMode == Fwd::kPool ? acc_t(0) : k[p / C]);
      AVec s0(acc_t(0)), s1(acc_t(0));
      for (int64_t i = 0; i < HW; i += L::kStep) {
        AVec v0, v1;
        forward_step<kMode, kResidual>(x, u, out, p * HW + i, std::min(L::kStep, HW - i), kv, v0, v1);
        if constexpr (kMode != Fwd::kGate) {
          s0 = s0 + v0;
          s1 = s1 + v1;
        }
      }
      if constexpr (kMode != Fwd::kGate) pooled[p] = L::sum(s0, s1) * inv_hw;
    }
  });
}

template <typename scalar_t, Fwd kMode, bool kResidual>
void forward_nhwc(const scalar_t* x, const scalar_t* u, const at::opmath_type<scalar_t>* k,
                  scalar_t* out, at::opmath_type<scalar_t>* pooled, int64_t N, int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<L>(C);
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t sums[kChannelBlock];
    for (int64_t unit = begin; unit < end; ++unit) {  // unit = (n, channel block), all rows
      const int64_t n = unit / blocks;
      const int64_t c0 = (unit % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      const AVec kv(kMode == Fwd::kPool ? acc_t(0) : k[n]);
      if (span) {  // the sample's HW * C elements as one stream; lane l holds channel l % C
        const int64_t base = n * HW * C, len = HW * C;
        AVec s0(acc_t(0)), s1(acc_t(0));
        for (int64_t i = 0; i < len; i += L::kStep) {
          AVec v0, v1;
          forward_step<kMode, kResidual>(x, u, out, base + i, std::min(L::kStep, len - i), kv, v0, v1);
          if constexpr (kMode != Fwd::kGate) {
            s0 = s0 + v0;
            s1 = s1 + v1;
          }
        }
        if constexpr (kMode != Fwd::kGate) {
          s0.store(sums);
          s1.store(sums + AVec::size());
          for (int64_t l = C; l < L::kStep; ++l) sums[l % C] += sums[l];
        }
      } else {
        std::fill(sums, sums + kChannelBlock, acc_t(0));
        for (int64_t hw = 0; hw < HW; ++hw) {
          const int64_t base = (n * HW + hw) * C + c0;
          for (int64_t j = 0; j < cb; j += L::kStep) {
            AVec v0, v1;
            forward_step<kMode, kResidual>(x, u, out, base + j, std::min(L::kStep, cb - j), kv, v0, v1);
            if constexpr (kMode != Fwd::kGate) {
              (AVec::loadu(sums + j) + v0).store(sums + j);
              (AVec::loadu(sums + j + AVec::size()) + v1).store(sums + j + AVec::size());
            }
          }
        }
      }
      if constexpr (kMode != Fwd::kGate) {
        for (int64_t j = 0; j < cb; ++j) pooled[n * C + c0 + j] = sums[j] * inv_hw;
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
template <bool kFold, bool kResidual, typename scalar_t, typename AVec = typename Lanes<scalar_t>::AVec>
inline void backward_step(const scalar_t* g, const scalar_t* x, const scalar_t* u, scalar_t* gx, scalar_t* gu,
                          int64_t at, int64_t n, AVec k, AVec gp0, AVec gp1, AVec inv_hw, AVec& s0, AVec& s1) {
  using L = Lanes<scalar_t>;
  AVec g0, g1, x0, x1, u0, u1;
  L::load(g + at, g0, g1, n);
  L::load(x + at, x0, x1, n);
  L::load(u + at, u0, u1, n);
  if constexpr (kFold) {
    g0 = math::fold_pooled_grad(g0, gp0, inv_hw);
    g1 = math::fold_pooled_grad(g1, gp1, inv_hw);
  }
  if constexpr (kResidual) {
    const AVec gb0 = math::residual_grad_branch(g0, k, x0, u0), gb1 = math::residual_grad_branch(g1, k, x1, u1);
    L::store(gx + at, math::residual_grad_x(g0, k, gb0), math::residual_grad_x(g1, k, gb1), n);
    L::store(gu + at, gb0, gb1, n);
    u0 = math::residual_output(x0, u0);
    u1 = math::residual_output(x1, u1);
  } else {
    L::store(gx + at, math::gate_grad_x(g0, k), math::gate_grad_x(g1, k), n);
    L::store(gu + at, math::gate_grad_u(g0, k), math::gate_grad_u(g1, k), n);
  }
  s0 = s0 + math::gate_grad_k_term(g0, x0, u0);
  s1 = s1 + math::gate_grad_k_term(g1, x1, u1);
}

template <typename scalar_t, bool kFold, bool kResidual>
void gate_backward_nchw(const scalar_t* g, const at::opmath_type<scalar_t>* gp, const scalar_t* x,
                        const scalar_t* u, const at::opmath_type<scalar_t>* k, scalar_t* gx, scalar_t* gu,
                        at::opmath_type<scalar_t>* partial, int64_t N, int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const AVec ihv(acc_t(1) / acc_t(HW));
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c): one k, one pooled gradient
      const AVec kv(k[p / C]), gpv(kFold ? gp[p] : acc_t(0));
      AVec s0(acc_t(0)), s1(acc_t(0));
      for (int64_t i = 0; i < HW; i += L::kStep)
        backward_step<kFold, kResidual>(g, x, u, gx, gu, p * HW + i, std::min(L::kStep, HW - i), kv, gpv, gpv, ihv, s0, s1);
      partial[p] = L::sum(s0, s1);
    }
  });
}

template <typename scalar_t, bool kFold, bool kResidual>
void gate_backward_nhwc(const scalar_t* g, const at::opmath_type<scalar_t>* gp, const scalar_t* x,
                        const scalar_t* u, const at::opmath_type<scalar_t>* k, scalar_t* gx, scalar_t* gu,
                        at::opmath_type<scalar_t>* partial, int64_t N, int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const AVec ihv(acc_t(1) / acc_t(HW)), zero(acc_t(0));
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<L>(C);
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {  // unit = (n, channel block), all rows
      const int64_t n = unit / blocks;
      const int64_t c0 = (unit % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      const AVec kv(k[n]);
      const acc_t* gpn = kFold ? gp + n * C + c0 : nullptr;  // one pooled gradient per channel
      AVec s0(acc_t(0)), s1(acc_t(0));
      if (span) {  // the sample's HW * C elements as one stream; lane l holds channel l % C
        AVec gp0 = zero, gp1 = zero;
        if constexpr (kFold) {
          alignas(64) acc_t tile[L::kStep];
          for (int64_t l = 0; l < L::kStep; ++l) tile[l] = gpn[l % C];
          L::load_acc(tile, gp0, gp1);
        }
        const int64_t base = n * HW * C, len = HW * C;
        for (int64_t i = 0; i < len; i += L::kStep)
          backward_step<kFold, kResidual>(g, x, u, gx, gu, base + i, std::min(L::kStep, len - i), kv, gp0, gp1, ihv,
                                          s0, s1);
      } else {
        for (int64_t hw = 0; hw < HW; ++hw) {
          const int64_t base = (n * HW + hw) * C + c0;
          for (int64_t j = 0; j < cb; j += L::kStep) {
            const int64_t cnt = std::min(L::kStep, cb - j);
            AVec gp0 = zero, gp1 = zero;
            if constexpr (kFold) L::load_acc(gpn + j, gp0, gp1, cnt);
            backward_step<kFold, kResidual>(g, x, u, gx, gu, base + j, cnt, kv, gp0, gp1, ihv, s0, s1);
          }
        }
      }
      partial[unit] = L::sum(s0, s1);
    }
  });
}

// grad_x[n, c, h, w] = grad_l[n, c] / HW, in either layout (focus backward).
template <typename scalar_t>
void broadcast_pool_grad(const at::opmath_type<scalar_t>* grad_l, scalar_t* gx, int64_t N, int64_t C,
                         int64_t HW, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  at::parallel_for(0, N * (channels_last ? HW : C), grain_for(channels_last ? C : HW), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (channels_last) {  // row r = (n, hw): C values
        const acc_t* gl = grad_l + (r / HW) * C;
        for (int64_t c = 0; c < C; ++c) gx[r * C + c] = scalar_t(gl[c] * inv_hw);
      } else {  // plane r = (n, c): HW copies of one value
        std::fill(gx + r * HW, gx + (r + 1) * HW, scalar_t(grad_l[r] * inv_hw));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Host wrappers.

inline int64_t plane(const Tensor& x) { return x.size(2) * x.size(3); }

template <Fwd kMode>
void run_forward(const Tensor& x, const Tensor& u, const Tensor& k, const Tensor& out, const Tensor& pooled,
                 at::MemoryFormat fmt, bool residual = false) {
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = kMode == Fwd::kPool ? nullptr : u.const_data_ptr<scalar_t>();
    const acc_t* kp = kMode == Fwd::kPool ? nullptr : k.const_data_ptr<acc_t>();
    scalar_t* op = kMode == Fwd::kPool ? nullptr : out.mutable_data_ptr<scalar_t>();
    acc_t* pp = kMode == Fwd::kGate ? nullptr : pooled.mutable_data_ptr<acc_t>();
    with_flag(residual, [&](auto residual_tag) {
      constexpr bool kResidual = decltype(residual_tag)::value && kMode == Fwd::kGatePool;
      if (fmt == at::MemoryFormat::ChannelsLast)
        forward_nhwc<scalar_t, kMode, kResidual>(x.const_data_ptr<scalar_t>(), up, kp, op, pp, N, C, HW);
      else
        forward_nchw<scalar_t, kMode, kResidual>(x.const_data_ptr<scalar_t>(), up, kp, op, pp, N, C, HW);
    });
  });
}

Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) {
  const auto in = prepare_gate(x, u, k);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() > 0) run_forward<Fwd::kGate>(in.x, in.u, in.k, out, Tensor(), in.fmt);
  return out;
}

// gate_pool and residual_gate_pool (in.residual) on checked inputs.
std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in) {
  const Tensor& x = in.x;
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() > 0) run_forward<Fwd::kGatePool>(in.x, in.u, in.k, out, pooled, in.fmt, in.residual);
  return {out, pooled.to(x.scalar_type())};
}

// Channel means of x in the accumulation dtype: one read of x.
Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) {
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() > 0) run_forward<Fwd::kPool>(x, Tensor(), Tensor(), Tensor(), pooled, fmt);
  return pooled;
}

// The focus MLP on channel means l (Device::mlp of op_drivers.h): forward when grad_k is
// undefined, else backward (which recomputes the forward's hidden units first).  The dot
// products are matrix products (BLAS): with C = 1024 and H1 = 256 a per-sample loop took
// 17 ms for batch 128, the products well under 1 ms.  The rest is per sample (fa_math.h).
void focus_mlp(const Tensor& l, const FocusWeights& w, const Tensor& hidden, const Tensor& k, const Tensor& grad_k,
               const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_l) {
  const int64_t N = l.size(0), H1 = w.w1.size(0);
  if (N == 0) return;
  const bool backward = grad_k.defined();
  Tensor pre = hidden;  // a handle: mm_out writes hidden's storage
  at::mm_out(pre, l, w.w1.t());
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "fanet_focus_mlp_cpu", [&] {
    const scalar_t *b1p = w.b1.const_data_ptr<scalar_t>(), *w2p = w.w2.const_data_ptr<scalar_t>(),
                   *b2p = w.b2.const_data_ptr<scalar_t>();
    const auto out = [](const Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    scalar_t *hp = out(hidden), *kp = out(k), *gzp = out(grad_z), *ghp = out(grad_h);
    const scalar_t* gkp = backward ? grad_k.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, grain_for(4 * H1), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const scalar_t kn = math::focus_mlp_head(hp + n * H1, b1p, H1, w2p, b2p);
        if (backward)
          gzp[n] = math::focus_mlp_head_backward(gkp[n], kn, hp + n * H1, w2p, H1, ghp + n * H1);
        else
          kp[n] = kn;
      }
    });
  });
  if (backward) {
    Tensor gl = grad_l;
    at::mm_out(gl, grad_h, w.w1);
  }
}

// Shared by the gate backward ops (b.gp undefined: no pooled gradient; b.in.residual: u is a
// residual branch).
std::tuple<Tensor, Tensor, Tensor> gate_backward_impl(const GateBackwardInputs& b, const Tensor& k) {
  const auto& in = b.in;
  const bool fold = b.gp.defined();
  const int64_t N = in.x.size(0), C = in.x.size(1), HW = plane(in.x);
  Tensor gx = at::empty(in.x.sizes(), in.x.options().memory_format(in.fmt));
  Tensor gu = at::empty(in.x.sizes(), in.x.options().memory_format(in.fmt));
  const bool cl = in.fmt == at::MemoryFormat::ChannelsLast;
  const int64_t units = cl ? (C + kChannelBlock - 1) / kChannelBlock : C;
  Tensor partial = at::zeros({N, units}, in.k.options());
  if (in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fanet_gate_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *gptr = b.g.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>(),
                     *up = in.u.const_data_ptr<scalar_t>();
      const acc_t* kp = in.k.const_data_ptr<acc_t>();
      const acc_t* gpp = fold ? b.gp.const_data_ptr<acc_t>() : nullptr;
      scalar_t *gxp = gx.mutable_data_ptr<scalar_t>(), *gup = gu.mutable_data_ptr<scalar_t>();
      acc_t* pp = partial.mutable_data_ptr<acc_t>();
      with_flag(fold, [&](auto fold_tag) {
        with_flag(in.residual, [&](auto residual_tag) {
          constexpr bool kFold = decltype(fold_tag)::value, kResidual = decltype(residual_tag)::value;
          if (cl)
            gate_backward_nhwc<scalar_t, kFold, kResidual>(gptr, gpp, xp, up, kp, gxp, gup, pp, N, C, HW);
          else
            gate_backward_nchw<scalar_t, kFold, kResidual>(gptr, gpp, xp, up, kp, gxp, gup, pp, N, C, HW);
        });
      });
    });
  }
  // Per-sample sum of the per-unit partials, in unit order: deterministic.
  return {gx, gu, partial.sum(1).to(k.scalar_type())};
}

// The kernels of this device, for the shared drivers of csrc/common/op_drivers.h.
struct Device {
  static int guard(const Tensor&) { return 0; }  // one device: nothing to guard
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cpu::gate(x, u, k); }
  static std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in) { return cpu::gate_pool(in); }
  static Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) { return cpu::pool_acc(x, fmt); }
  static void mlp(const Tensor& l, const FocusWeights& w, const Tensor& hidden, const Tensor& k,
                  const Tensor& grad_k, const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_l) {
    focus_mlp(l, w, hidden, k, grad_k, grad_z, grad_h, grad_l);
  }
  static void broadcast_pool_grad(const Tensor& grad_l, const Tensor& gx, at::MemoryFormat fmt) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fanet_focus_grad_x_cpu", [&] {
      cpu::broadcast_pool_grad<scalar_t>(grad_l.const_data_ptr<at::opmath_type<scalar_t>>(),
                                         gx.mutable_data_ptr<scalar_t>(), gx.size(0), gx.size(1), plane(gx),
                                         fmt == at::MemoryFormat::ChannelsLast);
    });
  }
  static std::tuple<Tensor, Tensor, Tensor> gate_backward(const GateBackwardInputs& b, const Tensor& k) {
    return gate_backward_impl(b, k);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CPU, m) {
  register_ops<Device>(m);
}

}  // namespace cpu
}  // namespace fanet
