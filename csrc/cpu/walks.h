// What every CPU sweep is built from: steps of SIMD lanes, per-channel coefficient tables, and the
// two-level sums (fa_math.h's kSumSteps) whose order depends only on the shapes and the vector width.
// Compiled once per SIMD level: everything here lives in the namespace of the level (CPU_CAPABILITY,
// as ATen's at::vec does), so no function compiled for one level is shared with another.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "../common/fa_math.h"
#include "kernels.h"

namespace fanet {
namespace math {
// fa_math.h's primitives on SIMD vectors: a lane compare gives an all-ones mask.
template <typename T>
struct Primitives<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static inline V unless_nonpositive(const V& r, const V& v) {
    const V zero(T(0));
    return V::blendv(v, zero, r <= zero);
  }
  // One rounding, as fma_ on CUDA: at::vec::fmadd is one FMA instruction in ATen's AVX2 and
  // AVX-512 vectors, but a * b + c (two roundings) in its generic one (the DEFAULT level), so
  // that level takes std::fma lane by lane: every level rounds alike.
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

namespace cpu::CPU_CAPABILITY {

namespace vec = at::vec;

// Two float vectors rounded to one vector of scalar_t (float16/bfloat16).  At the AVX512BF16 level
// bfloat16 takes one instruction (vcvtne2ps2bf16) instead of at::vec's rounding in about ten integer
// ops per vector (a measurable share of the bfloat16 kernels' time).  It rounds to nearest even too,
// but flushes denormals and quiets NaNs, so a step holding either takes at::vec's path: results stay
// bit-identical to ATen's, and to the other levels'.
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
struct AccPair {
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
  // The lanes of a + b added in a tree of fixed shape: lane i + lane i + w, w halving from size / 2.
  // That is the order of at::vec's float reduction on AVX2 and AVX-512 (one shuffle and add per
  // level), which those levels use; its generic reduction (DEFAULT, and double everywhere) adds the
  // lanes one by one instead, so those take the same tree in scalars: levels of the same vector width
  // (DEFAULT and AVX2) give the same sums.
  static inline acc_t sum(const AVec& a, const AVec& b) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>)
      return vec::vec_reduce_all<acc_t>([](AVec& l, AVec& r) { return l + r; }, a + b);
#endif
    __at_align__ acc_t v[AVec::size()];
    (a + b).store(v);
    for (int64_t w = AVec::size() / 2; w > 0; w /= 2)
      for (int64_t i = 0; i < w; ++i) v[i] += v[i + w];
    return v[0];
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
template <typename P, int kRows>
struct ChannelTable {
  using acc_t = typename P::acc_t;
  using AVec = typename P::AVec;
  const acc_t* t;
  int64_t C;
  int64_t stride = 0;  // between samples' tables: 0 for one table, kRows * C for an (N, kRows, C) one
  inline ChannelTable sample(int64_t n) const { return {t + n * stride, C, stride}; }
  inline void plane(int64_t c, AVec* v) const {
    for (int r = 0; r < kRows; ++r) v[2 * r] = v[2 * r + 1] = AVec(t[r * C + c]);
  }
  inline void row(int64_t c, int64_t n, AVec* v) const {
    for (int r = 0; r < kRows; ++r) P::load_acc(t + r * C + c, v[2 * r], v[2 * r + 1], n);
  }
  inline void tile(AVec* v) const {
    alignas(64) acc_t buf[P::kStep];
    for (int r = 0; r < kRows; ++r) {
      for (int64_t l = 0; l < P::kStep; ++l) buf[l] = t[r * C + l % C];
      P::load_acc(buf, v[2 * r], v[2 * r + 1]);
    }
  }
};

// kernels.h's kChannelBlock is a multiple of every kStep, so masked steps stay inside a block's sums.
static_assert(kChannelBlock % AccPair<double>::kStep == 0 && kChannelBlock % AccPair<c10::BFloat16>::kStep == 0);

// channels_last with C dividing kStep (C = 16: ResNet-56's first stage): a row fills only part
// of a step, so rows are walked as one contiguous stream of whole steps instead, in which lane
// l always holds channel l % C and its sums stay in registers (bfloat16 ran 1.8x slower in
// half-masked steps).
template <typename P>
inline bool spans_rows(int64_t C) {
  return P::kStep % C == 0;
}

// Calls add(kernels) on each dtype's entries of t.  The AVX512BF16 level differs from AVX512 only in
// bfloat16 (round_from_float): it fills bfloat16's entries alone, over AVX512's (dispatch.cpp).
template <typename Add>
void for_each_dtype(KernelTable& t, const Add& add) {
#ifndef CPU_CAPABILITY_AVX512BF16
  add(t.f32);
  add(t.f64);
  add(t.f16);
#endif
  add(t.bf16);
}

// About this many elements per parallel task keeps threads busy without overhead.
inline int64_t grain_for(int64_t unit_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, unit_elems)); }

// ---------------------------------------------------------------------------------------
// Long sums: acc_t lane vectors take at most kSumSteps steps, then move into double totals
// (fa_math.h), so no float chain grows with the plane.

// kSums sums, each held in two lane vectors cs[2 s], cs[2 s + 1], of a unit whose lanes add into
// one total per sum (an NCHW plane, or grad_k: kTiled false) or whose lane l holds channel l % C
// (spans_rows: kTiled, a total per lane; such a unit is a whole sample, so the per-lane work is
// amortized).
template <typename P, bool kTiled, int kSums>
struct LaneTotals {
  using acc_t = typename P::acc_t;
  using AVec = typename P::AVec;
  double t[kSums][kTiled ? P::kStep : 1] = {};
  // cs into the totals (after at most kSumSteps steps: kRun), and cleared.
  inline void fold(AVec* cs) {
    for (int s = 0; s < kSums; ++s) {
      if constexpr (kTiled) {
        alignas(64) acc_t lanes[P::kStep];
        cs[2 * s].store(lanes);
        cs[2 * s + 1].store(lanes + AVec::size());
        for (int64_t l = 0; l < P::kStep; ++l) t[s][l] += lanes[l];
      } else {
        t[s][0] += P::sum(cs[2 * s], cs[2 * s + 1]);
      }
      cs[2 * s] = cs[2 * s + 1] = AVec(acc_t(0));
    }
  }
  // Sum s (kTiled: of channel c, its lanes in order), after the last fold.
  inline double total(int s, int64_t c = 0, int64_t C = 1) const {
    if constexpr (kTiled) {
      double v = 0;
      for (int64_t l = c; l < P::kStep; l += C) v += t[s][l];
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
template <typename P>
constexpr int64_t kRun = kSumSteps * P::kStep;

// The same for a channels_last unit that is not tiled: per channel of the block, kSums acc_t sums
// that the caller adds rows into and folds into double after at most kSumSteps rows.  Lanes past the
// block's cb channels only ever add zeros (masked steps), so a fold clears [0, cb) rounded up to a step.
template <typename P, int kSums>
struct BlockTotals {
  using acc_t = typename P::acc_t;
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
    const int64_t width = std::min(kChannelBlock, (cb + P::kStep - 1) / P::kStep * P::kStep);
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

}  // namespace cpu::CPU_CAPABILITY
}  // namespace fanet
