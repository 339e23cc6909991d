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
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "../common/fa_math.h"
#include "../common/op_drivers.h"

namespace fanet {
namespace math {
// fa_math.h's lane primitives on SIMD vectors: a lane compare gives an all-ones mask.
template <typename T>
struct Lane<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static inline V unless_nonpositive(const V& r, const V& v) {
    const V zero(T(0));
    return V::blendv(v, zero, r <= zero);
  }
  // One rounding, as fma_ on CUDA: at::vec::fmadd is one FMA instruction in ATen's AVX2 and
  // AVX-512 vectors, but a * b + c (two roundings) in its generic one, which other builds get.
  static inline V fmadd(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);
#else
    __at_align__ T av[V::size()], bv[V::size()], cv[V::size()];
    a.store(av);
    b.store(bv);
    c.store(cv);
    for (int i = 0; i < V::size(); ++i) av[i] = std::fma(av[i], bv[i], cv[i]);
    return V::loadu(av);
#endif
  }
};
}  // namespace math

namespace cpu {
namespace {

using at::Tensor;
namespace vec = at::vec;

// Two float vectors rounded to one vector of scalar_t (float16/bfloat16).  Where the build machine
// has AVX512-BF16, bfloat16 takes one instruction (vcvtne2ps2bf16) instead of at::vec's rounding in
// about ten integer ops per vector (a measurable share of the bfloat16 kernels' time).  It rounds
// to nearest even too, but flushes denormals and quiets
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
  // Zeroes the lanes from n on: a masked step loads them as zero, but a BatchNorm shift turns a
  // zero into a value that would enter the channel sums.
  static inline void keep_first(AVec& a, AVec& b, int64_t n) {
    const AVec lane = AVec::arange(acc_t(0), acc_t(1)), zero(acc_t(0));
    a = AVec::blendv(zero, a, lane < AVec(acc_t(n)));
    b = AVec::blendv(zero, b, lane < AVec(acc_t(n - AVec::size())));
  }
};

// Per-channel coefficients: row r of a (rows, C) acc_t table as lane vectors v[2r], v[2r + 1].
// plane: every lane channel c (an NCHW plane); row: lanes = channels c .. c + n (a channels_last
// row); tile: lane l = channel l % C (spans_rows).
template <typename L, int kRows>
struct ChannelTable {
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const acc_t* t;
  int64_t C;
  inline void plane(int64_t c, AVec* v) const {
    for (int r = 0; r < kRows; ++r) v[2 * r] = v[2 * r + 1] = AVec(t[r * C + c]);
  }
  inline void row(int64_t c, int64_t n, AVec* v) const {
    for (int r = 0; r < kRows; ++r) L::load_acc(t + r * C + c, v[2 * r], v[2 * r + 1], n);
  }
  inline void tile(AVec* v) const {
    alignas(64) acc_t buf[L::kStep];
    for (int r = 0; r < kRows; ++r) {
      for (int64_t l = 0; l < L::kStep; ++l) buf[l] = t[r * C + l % C];
      L::load_acc(buf, v[2 * r], v[2 * r + 1]);
    }
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
// Long sums: acc_t lane vectors take at most kSumSteps steps, then move into double totals
// (fa_math.h), so no float chain grows with the plane.

// kSums sums, each held in two lane vectors cs[2 s], cs[2 s + 1], of a unit whose lanes add into
// one total per sum (an NCHW plane, or grad_k: kTiled false) or whose lane l holds channel l % C
// (spans_rows: kTiled, a total per lane; such a unit is a whole sample, so the per-lane work is
// amortized).
template <typename L, bool kTiled, int kSums>
struct LaneTotals {
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  double t[kSums][kTiled ? L::kStep : 1] = {};
  // cs into the totals (after at most kSumSteps steps: kRun), and cleared.
  inline void fold(AVec* cs) {
    for (int s = 0; s < kSums; ++s) {
      if constexpr (kTiled) {
        alignas(64) acc_t lanes[L::kStep];
        cs[2 * s].store(lanes);
        cs[2 * s + 1].store(lanes + AVec::size());
        for (int64_t l = 0; l < L::kStep; ++l) t[s][l] += lanes[l];
      } else {
        t[s][0] += L::sum(cs[2 * s], cs[2 * s + 1]);
      }
      cs[2 * s] = cs[2 * s + 1] = AVec(acc_t(0));
    }
  }
  // Sum s (kTiled: of channel c, its lanes in order), after the last fold.
  inline double total(int s, int64_t c = 0, int64_t C = 1) const {
    if constexpr (kTiled) {
      double v = 0;
      for (int64_t l = c; l < L::kStep; l += C) v += t[s][l];
      return v;
    } else {
      return t[s][0];
    }
  }
  // The kSums sums per channel into csum[kSums * c + s]: the plane's channel, or the C tiled ones.
  inline void store(AVec* cs, acc_t* csum, int64_t C) {
    fold(cs);
    for (int64_t c = 0; c < (kTiled ? C : 1); ++c)
      for (int s = 0; s < kSums; ++s) csum[kSums * c + s] = acc_t(total(s, c, C));
  }
};

// A stream of steps is walked in runs of kSumSteps steps (kRun elements), its lane sums folded after
// each run; the inner loop carries no counter.  (Plain loops, not a helper taking lambdas: the
// vector stores may alias anything, so variables a lambda captures by reference would be reloaded
// after every store.)
template <typename L>
constexpr int64_t kRun = kSumSteps * L::kStep;

// The same for a channels_last unit that is not tiled: per channel of the block, kSums acc_t sums
// that the caller adds rows into and folds into double after at most kSumSteps rows.  Lanes past the
// block's cb channels only ever add zeros (masked steps), so a fold clears [0, cb) rounded up to a step.
template <typename L, int kSums>
struct BlockTotals {
  using acc_t = typename L::acc_t;
  alignas(64) acc_t sums[kSums][kChannelBlock];
  double t[kSums][kChannelBlock];
  inline void reset() {
    std::fill(&sums[0][0], &sums[0][0] + kSums * kChannelBlock, acc_t(0));
    std::fill(&t[0][0], &t[0][0] + kSums * kChannelBlock, 0.0);
  }
  // The running sums of channels j .. j + kStep as the lane vectors cs[0 .. 2 kSums), and back.
  template <typename AVec>
  inline void load(int64_t j, AVec* cs) const {
    for (int s = 0; s < kSums; ++s) {
      cs[2 * s] = AVec::loadu(sums[s] + j);
      cs[2 * s + 1] = AVec::loadu(sums[s] + j + AVec::size());
    }
  }
  template <typename AVec>
  inline void save(int64_t j, const AVec* cs) {
    for (int s = 0; s < kSums; ++s) {
      cs[2 * s].store(sums[s] + j);
      cs[2 * s + 1].store(sums[s] + j + AVec::size());
    }
  }
  inline void fold(int64_t cb) {
    const int64_t width = std::min(kChannelBlock, (cb + L::kStep - 1) / L::kStep * L::kStep);
    for (int s = 0; s < kSums; ++s) {
      for (int64_t j = 0; j < cb; ++j) t[s][j] += sums[s][j];
      std::fill(sums[s], sums[s] + width, acc_t(0));
    }
  }
  inline void store(acc_t* csum, int64_t cb) {  // csum: the sums of the block's first channel
    fold(cb);
    for (int64_t j = 0; j < cb; ++j)
      for (int s = 0; s < kSums; ++s) csum[kSums * j + s] = acc_t(t[s][j]);
  }
};

// ---------------------------------------------------------------------------------------
// Forward sweeps.  Mode kGate writes out; kGatePool writes out and its channel means;
// kPool only reads x and writes its channel means (focus).
enum class Fwd { kGate, kGatePool, kPool };

// n <= kStep elements at offset `at`: v0/v1 receive what the pool sums (out, or x for
// kPool); masked lanes are zero (x = u = 0 gives out = 0), so they add nothing.  kResidual:
// u holds a residual branch B and the gate weights towards relu(B + x); kNorm: u holds z and
// B = z * alpha + beta (nv: the NormRow lane vectors of these channels).
template <Fwd kMode, bool kResidual, bool kNorm, typename scalar_t, typename AVec = typename Lanes<scalar_t>::AVec>
inline void forward_step(const scalar_t* x, const scalar_t* u, scalar_t* out, int64_t at, int64_t n, AVec k,
                         const AVec* nv, AVec& v0, AVec& v1) {
  using L = Lanes<scalar_t>;
  L::load(x + at, v0, v1, n);
  if constexpr (kMode != Fwd::kPool) {
    AVec u0, u1;
    L::load(u + at, u0, u1, n);
    if constexpr (kNorm) {
      u0 = math::norm_branch(u0, nv[2 * kAlpha], nv[2 * kBeta]);
      u1 = math::norm_branch(u1, nv[2 * kAlpha + 1], nv[2 * kBeta + 1]);
    }
    if constexpr (kResidual) {
      u0 = math::residual_output(v0, u0);
      u1 = math::residual_output(v1, u1);
    }
    v0 = math::gate(v0, u0, k);
    v1 = math::gate(v1, u1, k);
    L::store(out + at, v0, v1, n);
    if (kNorm && n < L::kStep) L::keep_first(v0, v1, n);
  }
}

template <typename scalar_t, Fwd kMode, bool kResidual, bool kNorm>
void forward_nchw(const scalar_t* x, const scalar_t* u, const at::opmath_type<scalar_t>* k,
                  const at::opmath_type<scalar_t>* norm, scalar_t* out, at::opmath_type<scalar_t>* pooled,
                  int64_t N, int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const ChannelTable<L, kNormRows> table{norm, C};
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    // Locals, not the captured references: vector stores may alias anything, so the compiler would
    // reload captured values at every step.
    const scalar_t *xl = x, *ul = u;
    scalar_t* ol = out;
    const int64_t hw = HW;
    for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c)
      const AVec kv(kMode == Fwd::kPool ? acc_t(0) : k[p / C]);
      AVec nv[2 * kNormRows];
      if constexpr (kNorm) table.plane(p % C, nv);
      AVec s[2] = {AVec(acc_t(0)), AVec(acc_t(0))};
      LaneTotals<L, false, 1> tot;
      for (int64_t r = 0; r < hw; r += kRun<L>) {
        for (int64_t i = r, e = std::min(hw, r + kRun<L>); i < e; i += L::kStep) {
          AVec v0, v1;
          forward_step<kMode, kResidual, kNorm>(xl, ul, ol, p * hw + i, std::min(L::kStep, e - i), kv, nv, v0, v1);
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

template <typename scalar_t, Fwd kMode, bool kResidual, bool kNorm>
void forward_nhwc(const scalar_t* x, const scalar_t* u, const at::opmath_type<scalar_t>* k,
                  const at::opmath_type<scalar_t>* norm, scalar_t* out, at::opmath_type<scalar_t>* pooled,
                  int64_t N, int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<L>(C);
  const ChannelTable<L, kNormRows> table{norm, C};
  AVec tiled[2 * kNormRows];
  if (kNorm && span) table.tile(tiled);
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    BlockTotals<L, 1> block;  // the channel sums of a unit that is not tiled
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
        const int64_t base = n * hw_n * c_n, len = hw_n * c_n;
        AVec s[2] = {AVec(acc_t(0)), AVec(acc_t(0))};
        LaneTotals<L, true, 1> tot;
        for (int64_t r = 0; r < len; r += kRun<L>) {
          for (int64_t i = r, e = std::min(len, r + kRun<L>); i < e; i += L::kStep) {
            AVec v0, v1;
            forward_step<kMode, kResidual, kNorm>(xl, ul, ol, base + i, std::min(L::kStep, e - i), kv, tiled, v0, v1);
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
            for (int64_t j = 0; j < cb; j += L::kStep) {
              const int64_t cnt = std::min(L::kStep, cb - j);
              AVec v0, v1, nv[2 * kNormRows];
              if constexpr (kNorm) table.row(c0 + j, cnt, nv);
              forward_step<kMode, kResidual, kNorm>(xl, ul, ol, base + j, cnt, kv, nv, v0, v1);
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
template <bool kFold, bool kResidual, bool kNorm, typename scalar_t,
          typename AVec = typename Lanes<scalar_t>::AVec>
inline void backward_step(const scalar_t* g, const scalar_t* x, const scalar_t* u, scalar_t* gx, scalar_t* gu,
                          int64_t at, int64_t n, AVec k, AVec gp0, AVec gp1, AVec inv_hw, const AVec* nv,
                          AVec* cs, AVec& s0, AVec& s1) {
  using L = Lanes<scalar_t>;
  AVec g0, g1, x0, x1, u0, u1, xh0, xh1;
  L::load(g + at, g0, g1, n);
  L::load(x + at, x0, x1, n);
  L::load(u + at, u0, u1, n);
  if constexpr (kFold) {
    g0 = math::fold_pooled_grad(g0, gp0, inv_hw);
    g1 = math::fold_pooled_grad(g1, gp1, inv_hw);
  }
  if constexpr (kNorm) {
    if (n < L::kStep) L::keep_first(g0, g1, n);  // masked lanes: B = beta, not 0
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

template <typename scalar_t, bool kFold, bool kResidual, bool kNorm>
void gate_backward_nchw(const scalar_t* g, const at::opmath_type<scalar_t>* gp, const scalar_t* x,
                        const scalar_t* u, const at::opmath_type<scalar_t>* k, const at::opmath_type<scalar_t>* norm,
                        scalar_t* gx, scalar_t* gu, double* partial, at::opmath_type<scalar_t>* csum, int64_t N,
                        int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const AVec ihv(acc_t(1) / acc_t(HW));
  const ChannelTable<L, kNormRows> table{norm, C};
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    // Locals: see forward_nchw.
    const scalar_t *gl = g, *xl = x, *ul = u;
    scalar_t *gxl = gx, *gul = gu;
    const int64_t hw = HW;
    for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c): one k, one pooled gradient
      const AVec kv(k[p / C]), gpv(kFold ? gp[p] : acc_t(0));
      AVec gk[2] = {AVec(acc_t(0)), AVec(acc_t(0))}, nv[2 * kNormRows], cs[4];
      LaneTotals<L, false, 1> gk_tot;
      LaneTotals<L, false, 2> tot;
      if constexpr (kNorm) {
        table.plane(p % C, nv);
        std::fill(cs, cs + 4, AVec(acc_t(0)));
      }
      for (int64_t r = 0; r < hw; r += kRun<L>) {
        for (int64_t i = r, e = std::min(hw, r + kRun<L>); i < e; i += L::kStep)
          backward_step<kFold, kResidual, kNorm>(gl, xl, ul, gxl, gul, p * hw + i, std::min(L::kStep, e - i), kv, gpv,
                                                 gpv, ihv, nv, cs, gk[0], gk[1]);
        gk_tot.fold(gk);
        if constexpr (kNorm) tot.fold(cs);
      }
      partial[p] = gk_tot.total(0);
      if constexpr (kNorm) tot.store(cs, csum + 2 * p, C);
    }
  });
}

template <typename scalar_t, bool kFold, bool kResidual, bool kNorm>
void gate_backward_nhwc(const scalar_t* g, const at::opmath_type<scalar_t>* gp, const scalar_t* x,
                        const scalar_t* u, const at::opmath_type<scalar_t>* k, const at::opmath_type<scalar_t>* norm,
                        scalar_t* gx, scalar_t* gu, double* partial, at::opmath_type<scalar_t>* csum, int64_t N,
                        int64_t C, int64_t HW) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const AVec ihv(acc_t(1) / acc_t(HW)), zero(acc_t(0));
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<L>(C);
  const ChannelTable<L, kNormRows> table{norm, C};
  AVec tiled[2 * kNormRows];
  if (kNorm && span) table.tile(tiled);
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    BlockTotals<L, 2> block;  // kNorm: the channel sums of a unit that is not tiled
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
      LaneTotals<L, false, 1> gk_tot;
      if (span) {  // the sample's HW * C elements as one stream; lane l holds channel l % C
        AVec gp0 = zero, gp1 = zero;
        if constexpr (kFold) {
          AVec gpv[2];
          ChannelTable<L, 1>{gpn, C}.tile(gpv);
          gp0 = gpv[0];
          gp1 = gpv[1];
        }
        const int64_t base = n * hw_n * c_n, len = hw_n * c_n;
        LaneTotals<L, true, 2> tot;
        for (int64_t r = 0; r < len; r += kRun<L>) {
          for (int64_t i = r, e = std::min(len, r + kRun<L>); i < e; i += L::kStep)
            backward_step<kFold, kResidual, kNorm>(gl, xl, ul, gxl, gul, base + i, std::min(L::kStep, e - i), kv, gp0,
                                                   gp1, ihv, tiled, cs, gk[0], gk[1]);
          gk_tot.fold(gk);
          if constexpr (kNorm) tot.fold(cs);
        }
        if constexpr (kNorm) tot.store(cs, csum + 2 * n * C, C);
      } else {
        if constexpr (kNorm) block.reset();
        // grad_k's lanes take ceil(cb / kStep) steps a row: they fold every `run` rows (a power of two,
        // so the channel sums, one value per row, fold every kSumSteps rows at a run's end).
        int64_t run = kSumSteps;
        while (run > 1 && run * ((cb + L::kStep - 1) / L::kStep) > kSumSteps) run /= 2;
        for (int64_t r = 0; r < hw_n; r += run) {
          for (int64_t hw = r; hw < std::min(hw_n, r + run); ++hw) {
            const int64_t base = (n * hw_n + hw) * c_n + c0;
            for (int64_t j = 0; j < cb; j += L::kStep) {
              const int64_t cnt = std::min(L::kStep, cb - j);
              AVec gp0 = zero, gp1 = zero, nv[2 * kNormRows];
              if constexpr (kFold) L::load_acc(gpn + j, gp0, gp1, cnt);
              if constexpr (kNorm) {
                table.row(c0 + j, cnt, nv);
                block.load(j, cs);
              }
              backward_step<kFold, kResidual, kNorm>(gl, xl, ul, gxl, gul, base + j, cnt, kv, gp0, gp1, ihv, nv, cs,
                                                     gk[0], gk[1]);
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

// ---------------------------------------------------------------------------------------
// The BatchNorm of bn_residual_gate_pool: z's batch statistics, and its input gradient.

// Shifted sums of z per (n, c) into csum[(n * C + c) * 2]: sum(z - K_c), sum((z - K_c)^2), with
// K_c = shift[c] a value of channel c.  The shift keeps the variance accurate where the mean is
// large against the spread (a plain sum of squares cancels there).
template <typename scalar_t>
void channel_sums(const scalar_t* z, const at::opmath_type<scalar_t>* shift, at::opmath_type<scalar_t>* csum,
                  int64_t N, int64_t C, int64_t HW, bool channels_last) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const ChannelTable<L, 1> table{shift, C};
  const auto step = [](const scalar_t* p, int64_t n, const AVec* kv, AVec* cs) {
    AVec d0, d1;
    L::load(p, d0, d1, n);
    d0 = d0 - kv[0];
    d1 = d1 - kv[1];
    if (n < L::kStep) L::keep_first(d0, d1, n);
    math::add_moments(d0, cs[0], cs[2]);
    math::add_moments(d1, cs[1], cs[3]);
  };
  const AVec zero(acc_t(0));
  if (!channels_last) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      const scalar_t* zl = z;  // a local: see forward_nchw
      const int64_t hw = HW;
      for (int64_t p = begin; p < end; ++p) {  // plane p = (n, c)
        AVec kv[2], cs[4] = {zero, zero, zero, zero};
        LaneTotals<L, false, 2> tot;
        table.plane(p % C, kv);
        for (int64_t r = 0; r < hw; r += kRun<L>) {
          for (int64_t i = r, e = std::min(hw, r + kRun<L>); i < e; i += L::kStep)
            step(zl + p * hw + i, std::min(L::kStep, e - i), kv, cs);
          tot.fold(cs);
        }
        tot.store(cs, csum + 2 * p, C);
      }
    });
    return;
  }
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const bool span = spans_rows<L>(C);
  AVec tiled[2];
  if (span) table.tile(tiled);
  at::parallel_for(0, N * blocks, grain_for(HW * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
    BlockTotals<L, 2> block;
    const scalar_t* zl = z;  // locals: see forward_nchw
    const int64_t hw_n = HW, c_n = C;
    for (int64_t unit = begin; unit < end; ++unit) {  // unit = (n, channel block), all rows
      const int64_t n = unit / blocks, c0 = (unit % blocks) * kChannelBlock, cb = std::min(kChannelBlock, c_n - c0);
      AVec cs[4] = {zero, zero, zero, zero};
      if (span) {
        const int64_t len = hw_n * c_n;
        LaneTotals<L, true, 2> tot;
        for (int64_t r = 0; r < len; r += kRun<L>) {
          for (int64_t i = r, e = std::min(len, r + kRun<L>); i < e; i += L::kStep)
            step(zl + n * len + i, std::min(L::kStep, e - i), tiled, cs);
          tot.fold(cs);
        }
        tot.store(cs, csum + 2 * n * C, C);
        continue;
      }
      block.reset();
      for (int64_t r = 0; r < hw_n; r += kSumSteps) {  // a row adds one value per channel
        for (int64_t hw = r; hw < std::min(hw_n, r + kSumSteps); ++hw) {
          for (int64_t j = 0; j < cb; j += L::kStep) {
            const int64_t cnt = std::min(L::kStep, cb - j);
            AVec kv[2];
            table.row(c0 + j, cnt, kv);
            block.load(j, cs);
            step(zl + (n * hw_n + hw) * c_n + c0 + j, cnt, kv, cs);
            block.save(j, cs);
          }
        }
        block.fold(cb);
      }
      block.store(csum + 2 * (n * C + c0), cb);
    }
  });
}

// grad_z from grad_B (in place: gz holds grad_B on entry) and z; t: the (kGradRows, C) table.
template <typename scalar_t>
void norm_grad(scalar_t* gz, const scalar_t* z, const at::opmath_type<scalar_t>* t, int64_t N, int64_t C, int64_t HW,
               bool channels_last) {
  using L = Lanes<scalar_t>;
  using AVec = typename L::AVec;
  const ChannelTable<L, kGradRows> table{t, C};
  const auto step = [](scalar_t* gp, const scalar_t* zp, int64_t n, const AVec* cv) {
    AVec g0, g1, z0, z1;
    L::load(gp, g0, g1, n);
    L::load(zp, z0, z1, n);
    const auto grad = [&](const AVec& g, const AVec& z, int h) {
      return math::norm_input_grad(g, z, cv[2 * kGradInvstd + h], cv[2 * kGradShift + h], cv[2 * kGradScale + h],
                                   cv[2 * kGradXhat + h], cv[2 * kGradConst + h]);
    };
    L::store(gp, grad(g0, z0, 0), grad(g1, z1, 1), n);
  };
  if (!channels_last) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        AVec cv[2 * kGradRows];
        table.plane(p % C, cv);
        for (int64_t i = 0; i < HW; i += L::kStep) step(gz + p * HW + i, z + p * HW + i, std::min(L::kStep, HW - i), cv);
      }
    });
    return;
  }
  if (spans_rows<L>(C)) {  // one stream; lane l holds channel l % C
    AVec cv[2 * kGradRows];
    table.tile(cv);
    const int64_t len = N * HW * C;
    at::parallel_for(0, (len + L::kStep - 1) / L::kStep, 32768 / L::kStep, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) step(gz + s * L::kStep, z + s * L::kStep, std::min(L::kStep, len - s * L::kStep), cv);
    });
    return;
  }
  at::parallel_for(0, N * HW, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // row r = (n, h, w)
      for (int64_t c = 0; c < C; c += L::kStep) {
        const int64_t cnt = std::min(L::kStep, C - c);
        AVec cv[2 * kGradRows];
        table.row(c, cnt, cv);
        step(gz + r * C + c, z + r * C + c, cnt, cv);
      }
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

// norm (defined only with residual): the (kNormRows, C) BatchNorm table of bn_residual_gate_pool.
template <Fwd kMode>
void run_forward(const Tensor& x, const Tensor& u, const Tensor& k, const Tensor& out, const Tensor& pooled,
                 at::MemoryFormat fmt, bool residual = false, const Tensor& norm = Tensor()) {
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = kMode == Fwd::kPool ? nullptr : u.const_data_ptr<scalar_t>();
    const acc_t* kp = kMode == Fwd::kPool ? nullptr : k.const_data_ptr<acc_t>();
    const acc_t* np = norm.defined() ? norm.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op = kMode == Fwd::kPool ? nullptr : out.mutable_data_ptr<scalar_t>();
    acc_t* pp = kMode == Fwd::kGate ? nullptr : pooled.mutable_data_ptr<acc_t>();
    with_flag(residual, [&](auto residual_tag) {
      constexpr bool kResidual = decltype(residual_tag)::value && kMode == Fwd::kGatePool;
      with_flag(norm.defined(), [&](auto norm_tag) {
        constexpr bool kNorm = decltype(norm_tag)::value && kResidual;
        if (fmt == at::MemoryFormat::ChannelsLast)
          forward_nhwc<scalar_t, kMode, kResidual, kNorm>(x.const_data_ptr<scalar_t>(), up, kp, np, op, pp, N, C, HW);
        else
          forward_nchw<scalar_t, kMode, kResidual, kNorm>(x.const_data_ptr<scalar_t>(), up, kp, np, op, pp, N, C, HW);
      });
    });
  });
}

Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) {
  const auto in = prepare_gate(x, u, k);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() > 0) run_forward<Fwd::kGate>(in.x, in.u, in.k, out, Tensor(), in.fmt);
  return out;
}

// gate_pool and residual_gate_pool (in.residual; with a BatchNorm table `norm`, bn_residual_gate_pool)
// on checked inputs.
std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in, const Tensor& norm = Tensor()) {
  const Tensor& x = in.x;
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() > 0) run_forward<Fwd::kGatePool>(in.x, in.u, in.k, out, pooled, in.fmt, in.residual, norm);
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
// residual branch; norm defined: u is z of bn_residual_gate_pool, and csum (N, C, 2) receives the
// BatchNorm's channel sums of grad_B and grad_B * xhat per sample, grad_u being grad_B).
std::tuple<Tensor, Tensor, Tensor> gate_backward_impl(const GateBackwardInputs& b, const Tensor& k,
                                                      const Tensor& norm = Tensor(), const Tensor& csum = Tensor()) {
  const auto& in = b.in;
  const bool fold = b.gp.defined();
  const int64_t N = in.x.size(0), C = in.x.size(1), HW = plane(in.x);
  Tensor gx = at::empty(in.x.sizes(), in.x.options().memory_format(in.fmt));
  Tensor gu = at::empty(in.x.sizes(), in.x.options().memory_format(in.fmt));
  const bool cl = in.fmt == at::MemoryFormat::ChannelsLast;
  const int64_t units = cl ? (C + kChannelBlock - 1) / kChannelBlock : C;
  Tensor partial = at::zeros({N, units}, in.k.options().dtype(at::kDouble));
  if (in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fanet_gate_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *gptr = b.g.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>(),
                     *up = in.u.const_data_ptr<scalar_t>();
      const acc_t* kp = in.k.const_data_ptr<acc_t>();
      const acc_t* gpp = fold ? b.gp.const_data_ptr<acc_t>() : nullptr;
      const acc_t* np = norm.defined() ? norm.const_data_ptr<acc_t>() : nullptr;
      scalar_t *gxp = gx.mutable_data_ptr<scalar_t>(), *gup = gu.mutable_data_ptr<scalar_t>();
      double* pp = partial.mutable_data_ptr<double>();
      acc_t* csp = norm.defined() ? csum.mutable_data_ptr<acc_t>() : nullptr;
      with_flag(fold, [&](auto fold_tag) {
        with_flag(in.residual, [&](auto residual_tag) {
          with_flag(norm.defined(), [&](auto norm_tag) {
            constexpr bool kFold = decltype(fold_tag)::value, kResidual = decltype(residual_tag)::value;
            constexpr bool kNorm = decltype(norm_tag)::value && kResidual;
            if (cl)
              gate_backward_nhwc<scalar_t, kFold, kResidual, kNorm>(gptr, gpp, xp, up, kp, np, gxp, gup, pp, csp, N, C,
                                                                    HW);
            else
              gate_backward_nchw<scalar_t, kFold, kResidual, kNorm>(gptr, gpp, xp, up, kp, np, gxp, gup, pp, csp, N, C,
                                                                    HW);
          });
        });
      });
    });
  }
  // Per-sample sum of the per-unit partials, in unit order, in double: deterministic.
  Tensor gk = at::empty({N}, partial.options());
  const double* pp = partial.const_data_ptr<double>();
  double* gkp = gk.mutable_data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) gkp[n] = std::accumulate(pp + n * units, pp + (n + 1) * units, 0.0);
  return {gx, gu, gk.to(k.scalar_type())};
}

// ---- bn_residual_gate_pool: host side -----------------------------------------------------

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

// Fills mean and var (C,) with z's batch statistics from its moments about shift (one read of z).
void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean, const Tensor& var) {
  const int64_t N = z.size(0), C = z.size(1), HW = plane(z);
  Tensor csum = at::empty({N, C, 2}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fanet_batch_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* kp = shift.const_data_ptr<acc_t>();
    channel_sums<scalar_t>(z.const_data_ptr<scalar_t>(), kp, csum.mutable_data_ptr<acc_t>(), N, C, HW,
                           fmt == at::MemoryFormat::ChannelsLast);
    const double M = double(N * HW);
    acc_t *mp = mean.mutable_data_ptr<acc_t>(), *vp = var.mutable_data_ptr<acc_t>();
    reduce_channel_sums<acc_t>(csum, [&](int64_t c, double s1, double s2) {
      math::batch_moments(double(kp[c]), s1, s2, M, mp[c], vp[c]);
    });
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
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_gate_backward(const GateBackwardInputs& b, const Tensor& k,
                                                                    const Tensor& norm, bool training) {
  const Tensor& x = b.in.x;
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  Tensor csum = at::empty({N, C, 2}, x.options().dtype(acc));  // every pair is written
  auto [gx, gz, gk] = gate_backward_impl(b, k, norm, csum);
  Tensor grad_w = at::empty({C}, x.options().dtype(acc)), grad_b = at::empty({C}, x.options().dtype(acc));
  Tensor gt = at::empty({kGradRows, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_norm_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* np = norm.const_data_ptr<acc_t>();
    acc_t *gwp = grad_w.mutable_data_ptr<acc_t>(), *gbp = grad_b.mutable_data_ptr<acc_t>(),
          *tp = gt.mutable_data_ptr<acc_t>();
    const double M = double(N * HW);
    reduce_channel_sums<acc_t>(csum, [&](int64_t c, double sum_g, double sum_gx) {
      math::norm_grad_column(np, C, c, sum_g, sum_gx, M, training, gwp[c], gbp[c], tp);
    });
    if (x.numel() > 0)
      norm_grad<scalar_t>(gz.mutable_data_ptr<scalar_t>(), b.in.u.const_data_ptr<scalar_t>(), tp, N, C, HW,
                          b.in.fmt == at::MemoryFormat::ChannelsLast);
  });
  return {gx, gz, gk, grad_w, grad_b};
}

// The kernels of this device, for the shared drivers of csrc/common/op_drivers.h.
struct Device {
  static int guard(const Tensor&) { return 0; }  // one device: nothing to guard
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cpu::gate(x, u, k); }
  static std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in, const Tensor& norm = Tensor()) {
    return cpu::gate_pool(in, norm);
  }
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
  static void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean,
                          const Tensor& var) {
    cpu::batch_stats(z, shift, fmt, mean, var);
  }
  static void norm_table(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                         const Tensor& t) {
    cpu::norm_table(mean, var, weight, bias, eps, t);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_gate_backward(const GateBackwardInputs& b,
                                                                             const Tensor& k, const Tensor& norm,
                                                                             bool training) {
    return cpu::bn_gate_backward(b, k, norm, training);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CPU, m) {
  register_ops<Device>(m);
}

}  // namespace cpu
}  // namespace fanet
