// Fused CUDA kernels for the fanet ops (SPEC §4).
//
// Host-side semantics (checks, layouts, dtypes, N = 0) are those of csrc/cpu/fa_cpu.cpp:
// both use prepare_gate / prepare_focus_weights from checks.h.  The per-element arithmetic is
// fanet::math (csrc/common/fa_math.h), the very functions the CPU kernels call.
//
// Every sum is cut into pieces whose boundaries depend only on the shape and dtype (a plane,
// a chunk of a sample, a run of rows), each piece is reduced by one block in a fixed order
// (warp shuffles, then shared memory), and the pieces are added by a second tiny kernel in
// index order.  No float atomics: grad_k and the pools are bit-for-bit reproducible run to run.
// Activations move in 16-byte packs when every pointer is 16-byte aligned and the run length
// allows; otherwise the same kernels run one element at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "../common/build_info.h"
#include "../common/checks.h"
#include "../common/fa_math.h"
#include "../common/op_drivers.h"

namespace fanet {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
// Elements of one sample per block of the gate kernels (rounded to whole rows or planes when
// grad_pooled is folded in); a multiple of every pack width.
constexpr int64_t kChunk = 8192;
// Rows (H*W positions) per thread in the channels_last pooling kernel.
constexpr int64_t kRowsPerThread = 8;

// ---- small device helpers -------------------------------------------------------------------

// kN values of T in one aligned load/store (16 bytes when kN = 16 / sizeof(T)).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

template <int kN, typename T>
__device__ __forceinline__ Pack<T, kN> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kN>*>(p);
}

template <int kN, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kN>& v) {
  *reinterpret_cast<Pack<T, kN>*>(p) = v;
}

// out = gate(x, u, k) in acc_t; with kResidual, u is a branch B and the gate weights towards
// U = relu(B + x) (not rounded to scalar_t).
template <bool kResidual, typename acc_t>
__device__ __forceinline__ acc_t gate_value(acc_t x, acc_t u, acc_t k) {
  if constexpr (kResidual) u = math::residual_output(x, u);
  return math::gate(x, u, k);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Whether a thread's acc_t sums move into double totals every kSumSteps values (fa_math.h): float
// chains lose accuracy as they grow; double ones (float64 inputs) need no second level, and the
// registers it takes made the double kernels spill.
template <typename acc_t>
constexpr bool kTwoLevel = !std::is_same_v<acc_t, double>;

// Butterfly sum over the 32 lanes: every lane ends with the total, in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (all kThreads threads must call it); the total is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch /* kWarps entries */) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) total = warp_sum(lane < kWarps ? scratch[lane] : T(0));
  return total;
}

// ---- gate forward / backward: elementwise over fixed chunks of each sample --------------------
//
// Block b handles elements [chunk_idx * chunk, (chunk_idx + 1) * chunk) of sample
// n = b / chunks, in the tensors' own memory order (NCHW or NHWC: the sample index is outermost
// in both).  Forward writes out = gate(x, u, k[n]).  Backward reads grad_out (g), folds
// grad_pooled / HW in when kFold, writes grad_x and grad_u, and leaves the block's sum of
// g * (u - x) in partial[b] (double: each thread's float sum moves into a double total every
// kSumSteps values, fa_math.h, so grad_k keeps its accuracy when a chunk is a whole large plane).
// Backward with kResidual (residual_gate_pool): u holds the branch B,
// U = relu(B + x) is formed in registers, grad_u receives grad_B and grad_x the shortcut's share too.
//
// With kFold the chunk is a whole number of rows (NHWC: multiples of C) or planes (NCHW:
// multiples of HW, chunk_c planes per chunk), so each thread finds its channel with 32-bit
// arithmetic and then steps it; a 64-bit division (a called routine) makes ptxas spill.  For the
// same reason inv_hw = 1 / HW comes from the host (a double division is a call too).
template <typename scalar_t, int kVec, bool kBackward, bool kFold, bool kChannelsLast, bool kResidual>
__global__ void __launch_bounds__(kThreads) gate_kernel(
    const scalar_t* __restrict__ g, const at::opmath_type<scalar_t>* __restrict__ gp,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
    const at::opmath_type<scalar_t>* __restrict__ k, scalar_t* __restrict__ out0,
    scalar_t* __restrict__ out1, double* __restrict__ partial, int64_t C,
    int64_t HW, int64_t chunk, int64_t chunks, int64_t chunk_c, int64_t step_c, int64_t step_r,
    at::opmath_type<scalar_t> inv_hw) {
  static_assert(kBackward || !kResidual, "the residual forward runs in the pool kernels");
  using acc_t = at::opmath_type<scalar_t>;
  // Block decomposition in 32 bits: the launch checks the grid fits in 2^31 blocks.
  const uint32_t block = blockIdx.x;
  const uint32_t chunk_idx = block % uint32_t(chunks);
  const int64_t n = block / uint32_t(chunks);
  const int64_t per_sample = C * HW;
  const int64_t begin = int64_t(chunk_idx) * chunk;
  const int64_t end = min64(per_sample, begin + chunk);
  const int64_t base = n * per_sample;
  const acc_t kn = k[n];
  constexpr int kRunSteps = kSumSteps / kVec > 0 ? kSumSteps / kVec : 1;
  acc_t s = acc_t(0);
  double total = 0;
  int run = 0;
  const uint32_t offset = threadIdx.x * kVec;  // < 2^31, and < 2^32 after adding a remainder
  // Fold only: channel c_i of element i, and (NCHW) its position r_i in the plane, stepped by
  // kThreads * kVec elements per iteration = step_c channels (mod C) in NHWC, step_c planes and
  // step_r positions in NCHW.
  int64_t c_i = 0, r_i = 0;
  if constexpr (kFold) {
    if constexpr (kChannelsLast) {
      c_i = int64_t(offset) < C ? int64_t(offset) : int64_t(offset % uint32_t(C));
    } else if (int64_t(offset) < HW) {
      c_i = int64_t(chunk_idx) * chunk_c;
      r_i = offset;
    } else {
      const uint32_t q = offset / uint32_t(HW);
      c_i = int64_t(chunk_idx) * chunk_c + q;
      r_i = int64_t(offset - q * uint32_t(HW));
    }
  }
  const int64_t first = begin + offset;
  // kVec > 1 only when per_sample % kVec == 0, so a pack never straddles `end`.  Not unrolled: the
  // backward's block_sum has calls (the shuffles' divergent path), which cap the registers, and
  // unrolled double variants spilled; each step already has a 16-byte load per tensor in flight.
#pragma unroll 1
  for (int64_t i = first; i < end; i += int64_t(kThreads) * kVec) {
    const Pack<scalar_t, kVec> xp = load_pack<kVec>(x + base + i);
    const Pack<scalar_t, kVec> up = load_pack<kVec>(u + base + i);
    if constexpr (!kBackward) {
      Pack<scalar_t, kVec> op;
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        op.v[j] = scalar_t(math::gate(acc_t(xp.v[j]), acc_t(up.v[j]), kn));
      store_pack<kVec>(out0 + base + i, op);
    } else {
      const Pack<scalar_t, kVec> gpk = load_pack<kVec>(g + base + i);
      Pack<scalar_t, kVec> gx, gu;
      int64_t c = c_i, r = r_i;  // stepped along the pack
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        acc_t gv = acc_t(gpk.v[j]);
        if constexpr (kFold) {
          gv = math::fold_pooled_grad(gv, gp[n * C + c], inv_hw);
          if constexpr (kChannelsLast) {
            if (++c == C) c = 0;
          } else if (++r == HW) {
            r = 0;
            ++c;
          }
        }
        const acc_t xv = acc_t(xp.v[j]), uv = acc_t(up.v[j]);
        if constexpr (kResidual) {
          const acc_t gb = math::residual_grad_branch(gv, kn, xv, uv);
          gx.v[j] = scalar_t(math::residual_grad_x(gv, kn, gb));
          gu.v[j] = scalar_t(gb);
          s += math::gate_grad_k_term(gv, xv, math::residual_output(xv, uv));
        } else {
          gx.v[j] = scalar_t(math::gate_grad_x(gv, kn));
          gu.v[j] = scalar_t(math::gate_grad_u(gv, kn));
          s += math::gate_grad_k_term(gv, xv, uv);
        }
      }
      store_pack<kVec>(out0 + base + i, gx);
      store_pack<kVec>(out1 + base + i, gu);
      if constexpr (kTwoLevel<acc_t>) {
        if (++run == kRunSteps) {
          total += double(s);
          s = acc_t(0);
          run = 0;
        }
      }
      if constexpr (kFold) {  // on to the next i, without a division
        if constexpr (kChannelsLast) {
          c_i += step_c;
          if (c_i >= C) c_i -= C;
        } else {
          c_i += step_c;
          r_i += step_r;
          if (r_i >= HW) {
            r_i -= HW;
            ++c_i;
          }
        }
      }
    }
  }
  if constexpr (kBackward) {
    __shared__ double scratch[kWarps];
    total = block_sum(total + double(s), scratch);
    if (threadIdx.x == 0) partial[block] = total;
  }
}

// ---- channel walks: sums per (n, c) over the activations ---------------------------------------
//
// The pools, the BatchNorm statistics, the BatchNorm gate's backward and BatchNorm's input gradient
// all walk a tensor channel by channel.  A walk visits every element once, in packs of kVec, and
// hands each pack to an Op:
//   using acc_t;  static constexpr int kSums;   // sums per (n, c); 0: an element-wise pass
//   template <int kL> struct Channel;            // a thread's constants of kL consecutive channels
//   template <int kL> Channel<kL> channel(int64_t n, int64_t c) const;
//   template <int kVec, int kL, int kS> void step(const Channel<kL>&, int64_t off, acc_t (&s)[kS][kL]) const;
//       // elements [off, off + kVec): element j is of channel c + j % kL (kL = 1: an NCHW plane;
//       // kL = kVec: channels_last), and adds to s[q][j % kL]
// and writes sums[((n * splits + split) * C + c) * kSums + q] (splits = 1 in NCHW), each added in a
// fixed order.  No float chain adds more than kSumSteps values (fa_math.h): an NCHW thread moves its
// sums into double totals every kSumSteps values, an NHWC thread adds kRowsPerThread rows and its
// block adds the threads' sums in double, and the splits are added in double.

// NCHW: `group` threads per (n, c) plane: 32 (one warp, several planes per block) for small planes,
// kThreads for large ones.  The sums are scaled by `scale` (1 / HW: the pools' means).
template <typename Op, int kVec>
__global__ void __launch_bounds__(kThreads) walk_nchw_kernel(const Op op, typename Op::acc_t* __restrict__ sums,
                                                              int64_t planes, int64_t C, int64_t HW, int group,
                                                              double scale) {
  using acc_t = typename Op::acc_t;
  constexpr int kS = Op::kSums > 0 ? Op::kSums : 1;
  const int64_t p = int64_t(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  const int t = threadIdx.x % group;
  acc_t s[kS][1];
  double total[kS];
#pragma unroll
  for (int q = 0; q < kS; ++q) {
    s[q][0] = acc_t(0);
    total[q] = 0;
  }
  if (p < planes) {
    const int64_t n = p / C;
    const auto ch = op.template channel<1>(n, p - n * C);
    // kVec > 1 only when HW % kVec == 0.  Runs of kSumSteps values per thread, then into total.
    constexpr bool kRuns = Op::kSums > 0 && kTwoLevel<acc_t>;
    const int64_t stride = int64_t(group) * kVec, run = kRuns ? stride * (kSumSteps / kVec) : HW;
    for (int64_t r = int64_t(t) * kVec; r < HW; r += run) {
      const int64_t r_end = min64(HW, r + run);
      for (int64_t i = r; i < r_end; i += stride) op.template step<kVec, 1>(ch, p * HW + i, s);
      if constexpr (kRuns) {
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          total[q] += double(s[q][0]);
          s[q][0] = acc_t(0);
        }
      }
    }
  }
  if constexpr (Op::kSums > 0) {
#pragma unroll
    for (int q = 0; q < kS; ++q) {
      total[q] = warp_sum(total[q] + double(s[q][0]));  // every lane takes part (planes >= p: zeros)
    }
    if (group == kWarp) {
      if (t == 0 && p < planes) {
#pragma unroll
        for (int q = 0; q < kS; ++q) sums[p * kS + q] = acc_t(total[q] * scale);
      }
      return;
    }
    __shared__ double scratch[kS][kWarps];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) {
#pragma unroll
      for (int q = 0; q < kS; ++q) scratch[q][warp] = total[q];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int q = 0; q < kS; ++q) {
        const double v = warp_sum(lane < kWarps ? scratch[q][lane] : 0.0);
        if (lane == 0 && p < planes) sums[p * kS + q] = acc_t(v * scale);
      }
    }
  }
}

// channels_last: a (channel tile, row split) of one sample per block.  Block threads form a tx-by-ty
// grid: tx threads across a tile of tx * kVec channels (one pack each), ty threads down the rows.
// The block walks rows [split * rows, (split + 1) * rows) and sums each channel down its rows in
// shared memory in a fixed order; sum_splits_kernel then adds the splits.
template <typename Op, int kVec>
__global__ void __launch_bounds__(kThreads) walk_nhwc_kernel(const Op op, typename Op::acc_t* __restrict__ sums,
                                                              int64_t C, int64_t HW, int64_t ctiles, int64_t splits,
                                                              int64_t rows, int tx) {
  using acc_t = typename Op::acc_t;
  constexpr int kS = Op::kSums > 0 ? Op::kSums : 1;
  const uint32_t block = blockIdx.x;  // grid < 2^31 blocks: 32-bit decomposition
  const int64_t split = block % uint32_t(splits);
  const int64_t ctile = (block / uint32_t(splits)) % uint32_t(ctiles);
  const int64_t n = block / uint32_t(splits * ctiles);
  const int ty = kThreads / tx;
  const int lx = threadIdx.x % tx, ly = threadIdx.x / tx;
  const int64_t c = (ctile * tx + lx) * kVec;  // kVec > 1 only when C % kVec == 0
  acc_t s[kS][kVec];
#pragma unroll
  for (int q = 0; q < kS; ++q)
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[q][j] = acc_t(0);
  if (c < C) {
    const auto ch = op.template channel<kVec>(n, c);
    const int64_t r_end = min64(HW, (split + 1) * rows), r0 = split * rows + ly, row_step = int64_t(ty) * C;
    // Two rows in flight, the offset stepped: the default unrolling, or a product per row, made ptxas
    // spill some double instantiations.
#pragma unroll 2
    for (int64_t r = r0, off = (n * HW + r0) * C + c; r < r_end; r += ty, off += row_step)
      op.template step<kVec, kVec>(ch, off, s);
  }
  if constexpr (Op::kSums > 0) {
    __shared__ acc_t red[kThreads * kVec];
    const int width = tx * kVec;  // channels in the tile
#pragma unroll
    for (int q = 0; q < kS; ++q) {
      if (q > 0) __syncthreads();  // the previous sum has been read out of red
#pragma unroll
      for (int j = 0; j < kVec; ++j) red[ly * width + lx * kVec + j] = s[q][j];
      __syncthreads();
      for (int i = threadIdx.x; i < width; i += kThreads) {
        const int64_t cc = ctile * width + i;
        if (cc < C) {
          double v = 0;  // up to kThreads values: added in double
          for (int y = 0; y < ty; ++y) v += double(red[y * width + i]);
          sums[((n * splits + split) * C + cc) * kS + q] = acc_t(v);
        }
      }
    }
  }
}

// ---- the walks' ops ------------------------------------------------------------------------------

// Row r of a (rows, C) per-channel table, for channels c .. c + kL - 1.
template <int kL, typename T>
__device__ __forceinline__ void table_row(const T* t, int64_t r, int64_t C, int64_t c, T (&v)[kL]) {
#pragma unroll
  for (int l = 0; l < kL; ++l) v[l] = t[r * C + c + l];
}

// focus: the channel sums of x.
template <typename scalar_t>
struct PoolOp {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 1;
  const scalar_t* x;
  template <int kL>
  struct Channel {};
  template <int kL>
  __device__ Channel<kL> channel(int64_t, int64_t) const {
    return {};
  }
  template <int kVec, int kL, int kS>
  __device__ void step(const Channel<kL>&, int64_t off, acc_t (&s)[kS][kL]) const {
    const Pack<scalar_t, kVec> xp = load_pack<kVec>(x + off);
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[0][j % kL] += acc_t(xp.v[j]);
  }
};

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
  template <int kL>
  struct Channel {
    acc_t k, alpha[kL], beta[kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t n, int64_t c) const {
    Channel<kL> ch;
    ch.k = k[n];
    if constexpr (kNorm) {
      table_row(norm, kAlpha, C, c, ch.alpha);
      table_row(norm, kBeta, C, c, ch.beta);
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
      if constexpr (kNorm) uv = math::norm_branch(uv, ch.alpha[j % kL], ch.beta[j % kL]);
      const acc_t o = gate_value<kResidual>(acc_t(xp.v[j]), uv, ch.k);
      op.v[j] = scalar_t(o);
      s[0][j % kL] += o;
    }
    store_pack<kVec>(out + off, op);
  }
};

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
  template <int kL>
  struct Channel {
    acc_t k, gp[kL], alpha[kL], beta[kL], invstd[kL], shift[kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t n, int64_t c) const {
    Channel<kL> ch;
    ch.k = k[n];
    if constexpr (kFold) table_row(gp, n, C, c, ch.gp);  // grad_pooled: (N, C)
    table_row(norm, kAlpha, C, c, ch.alpha);
    table_row(norm, kBeta, C, c, ch.beta);
    table_row(norm, kInvstd, C, c, ch.invstd);
    table_row(norm, kShift, C, c, ch.shift);
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
      gxp.v[j] = scalar_t(math::residual_grad_x(gv, ch.k, gb));
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
  template <int kL>
  struct Channel {
    acc_t row[kGradRows][kL];
  };
  template <int kL>
  __device__ Channel<kL> channel(int64_t, int64_t c) const {
    Channel<kL> ch;
#pragma unroll
    for (int r = 0; r < kGradRows; ++r) table_row(t, r, C, c, ch.row[r]);
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
      op.v[j] = scalar_t(math::norm_input_grad(acc_t(gp.v[j]), acc_t(zp.v[j]), ch.row[kGradInvstd][l],
                                               ch.row[kGradShift][l], ch.row[kGradScale][l], ch.row[kGradXhat][l],
                                               ch.row[kGradConst][l]));
    }
    store_pack<kVec>(gz + off, op);
  }
};

// out[n, c] = scale * sum over s of partial[n, s, c] (partial: (N, S, C)), s in order, in double (S
// grows with the plane): the fold of a walk's splits (C = C * kSums; the channels_last pools' second,
// tiny pass) and grad_k's sum of its chunks.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) sum_splits_kernel(const in_t* __restrict__ partial,
                                                              out_t* __restrict__ out, int64_t N,
                                                              int64_t S, int64_t C, double scale) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < N * C; i += stride) {
    const int64_t n = i / C, c = i % C;
    const in_t* p = partial + n * S * C + c;
    double t = 0;
    for (int64_t s = 0; s < S; ++s) t += double(p[s * C]);
    out[i] = out_t(t * scale);
  }
}

// One block per line i: out[i * kQ + q] = sum over j < len of data[i * line_stride + j * elem_stride + q]
// for q < kQ, in double, in a fixed order (threads stride j, then block_sum).  The batch totals of
// the channel sums (line = channel, j = sample) and grad_k (line = sample, j = channel).
template <int kQ, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads) line_sums_kernel(const acc_t* __restrict__ data, int64_t len,
                                                             int64_t line_stride, int64_t elem_stride,
                                                             out_t* __restrict__ out) {
  const acc_t* line = data + int64_t(blockIdx.x) * line_stride;
  double s[kQ];
#pragma unroll
  for (int q = 0; q < kQ; ++q) s[q] = 0;
  for (int64_t j = threadIdx.x; j < len; j += kThreads) {
#pragma unroll
    for (int q = 0; q < kQ; ++q) s[q] += double(line[j * elem_stride + q]);
  }
  __shared__ double scratch[kWarps];
#pragma unroll
  for (int q = 0; q < kQ; ++q) {
    const double t = block_sum(s[q], scratch);
    if (threadIdx.x == 0) out[int64_t(blockIdx.x) * kQ + q] = out_t(t);
    __syncthreads();  // scratch is read before the next sum writes it
  }
}

// ---- bn_residual_gate_pool: per channel ---------------------------------------------------------
// Thread per channel, from the (C, 2) batch totals (double) of line_sums_kernel.

// mean, var of channel c from the moments of MomentsOp.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) batch_moments_kernel(const double* __restrict__ totals,
                                                                 const acc_t* __restrict__ shift, int64_t C,
                                                                 double M, acc_t* __restrict__ mean,
                                                                 acc_t* __restrict__ var) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads)
    math::batch_moments(double(shift[c]), totals[2 * c], totals[2 * c + 1], M, mean[c], var[c]);
}

// The (kNormRows, C) table t from the statistics and the affine parameters (acc dtype).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) norm_table_kernel(const acc_t* __restrict__ mean,
                                                              const acc_t* __restrict__ var,
                                                              const acc_t* __restrict__ weight,
                                                              const acc_t* __restrict__ bias, double eps, int64_t C,
                                                              acc_t* __restrict__ t) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads)
    math::norm_table_column(mean[c], var[c], weight[c], bias[c], eps, t, C, c);
}

// From the batch totals of NormGateBackwardOp's first two sums (grad_B, grad_B * xhat): grad_bias,
// grad_weight and the (kGradRows, C) table gt of NormInputGradOp.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) norm_grad_table_kernel(const double* __restrict__ totals,
                                                                   const acc_t* __restrict__ norm, int64_t C,
                                                                   double M, bool training,
                                                                   acc_t* __restrict__ grad_w,
                                                                   acc_t* __restrict__ grad_b,
                                                                   acc_t* __restrict__ gt) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < C; c += int64_t(gridDim.x) * kThreads) {
    math::norm_grad_column(norm, C, c, totals[2 * c], totals[2 * c + 1], M, training, grad_w[c], grad_b[c], gt);
  }
}

// ---- focus MLP: one block per sample -----------------------------------------------------------
//
// Forward: hidden[n, j] = focus_hidden(w1[j] . l[n], b1[j]) (one warp per hidden unit),
// k[n] = sigmoid(b2 + w2 . hidden[n]).  kBackward additionally takes grad_k and writes
// grad_z[n] (the gradient of b2's sum), grad_h[n, j] (of b1's) and grad_l[n, c] = grad_h[n] . w1[:, c].
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kThreads) focus_mlp_kernel(
    const acc_t* __restrict__ l, const acc_t* __restrict__ w1, const acc_t* __restrict__ b1,
    const acc_t* __restrict__ w2, const acc_t* __restrict__ b2, int64_t C, int64_t H1,
    acc_t* __restrict__ hidden, acc_t* __restrict__ k_out, const acc_t* __restrict__ grad_k,
    acc_t* __restrict__ grad_z, acc_t* __restrict__ grad_h, acc_t* __restrict__ grad_l) {
  __shared__ acc_t scratch[kWarps];
  __shared__ acc_t gz_shared;
  const int64_t n = blockIdx.x;
  const acc_t* ln = l + n * C;
  acc_t* hn = hidden + n * H1;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t j = warp; j < H1; j += kWarps) {
    const acc_t* row = w1 + j * C;
    acc_t dot = acc_t(0);
    // Unrolled twice: 4 times made ptxas spill the double forward on sm_90.
#pragma unroll 2
    for (int64_t c = lane; c < C; c += kWarp) dot += row[c] * ln[c];
    dot = warp_sum(dot);
    if (lane == 0) hn[j] = math::focus_hidden(dot, b1[j]);
  }
  __syncthreads();  // hidden[n] (global) is visible to the whole block
  acc_t z = acc_t(0);
  for (int64_t j = threadIdx.x; j < H1; j += kThreads) z += w2[j] * hn[j];
  z = block_sum(z, scratch);
  if (threadIdx.x == 0) {
    const acc_t kn = math::sigmoid(b2[0] + z);
    if constexpr (kBackward) {
      const acc_t gz = math::sigmoid_grad(kn, grad_k[n]);
      grad_z[n] = gz;
      gz_shared = gz;
    } else {
      k_out[n] = kn;
    }
  }
  if constexpr (kBackward) {
    __syncthreads();
    const acc_t gz = gz_shared;
    acc_t* ghn = grad_h + n * H1;
    for (int64_t j = threadIdx.x; j < H1; j += kThreads) ghn[j] = math::focus_hidden_grad(gz, w2[j], hn[j]);
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      acc_t t = acc_t(0);
      for (int64_t j = 0; j < H1; ++j) t += ghn[j] * w1[j * C + c];
      grad_l[n * C + c] = t;
    }
  }
}

// grad_x[n, c, h, w] = grad_l[n, c] / HW, in the tensor's memory order (focus backward).
template <typename scalar_t, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) broadcast_pool_grad_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad_l, scalar_t* __restrict__ gx, int64_t total,
    int64_t C, int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVec;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < total; i += stride) {
    Pack<scalar_t, kVec> v;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t e = i + j;
      const int64_t nc = kChannelsLast ? (e / (HW * C)) * C + e % C : e / HW;
      v.v[j] = scalar_t(grad_l[nc] * inv_hw);
    }
    store_pack<kVec>(gx + i, v);
  }
}

// ---- host helpers -------------------------------------------------------------------------

// A build without machine code (SASS) or PTX that this GPU runs would fail at its first launch with
// "no kernel image is available"; instead, before the first op on each device, ask the runtime
// whether a kernel loads there (every kernel carries the same archs), and if not, name the GPU, its
// compute capability and the archs built.  Remembered per device once it loads.
void check_kernel_image(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<bool>, kMaxDevices> loads{};
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && loads[device].load(std::memory_order_relaxed)) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, sum_splits_kernel<float, float>);
  if (err == cudaSuccess) {
    if (cached) loads[device].store(true, std::memory_order_relaxed);
    return;
  }
  (void)cudaGetLastError();  // not a sticky error: clear it, or the next launch check reports it
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
      err == cudaErrorUnsupportedPtxVersion) {
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    const std::string archs = cuda_archs(), cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
    TORCH_CHECK(false, "fanet: backend 'cuda' cannot run on ", prop.name, " (compute capability ", cc,
                "): fanet_kernels._C carries CUDA code for ", archs.empty() ? "other GPUs" : archs, " only (",
                cudaGetErrorString(err), "). Use backend 'triton' or 'reference' ('auto' does), or rebuild with "
                "TORCH_CUDA_ARCH_LIST=\"", cc, "\" by an nvcc that targets it (nvcc 13 targets 7.5 and newer).");
  }
  C10_CUDA_CHECK(err);
}

// The tensors' device made current for an op (RAII), its kernels checked to load there.
struct DeviceGuard {
  at::cuda::CUDAGuard guard;
  explicit DeviceGuard(const Tensor& x) : guard(x.device()) { check_kernel_image(x.get_device()); }
};

inline int64_t plane(const Tensor& x) { return x.size(2) * x.size(3); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Calls f(std::integral_constant<int, kVec>) with the 16-byte pack width of scalar_t when
// `can_vec` (every pointer aligned, the run length a multiple of it), else with 1.
template <typename scalar_t, typename F>
void with_pack_width(bool can_vec, F&& f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (can_vec)
    f(std::integral_constant<int, kVec>{});
  else
    f(std::integral_constant<int, 1>{});
}

template <typename scalar_t>
constexpr int pack_width() {
  return 16 / sizeof(scalar_t);
}

inline unsigned grid_for(int64_t blocks) {
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "fanet: tensor too large for one CUDA launch (", blocks,
              " blocks)");
  return static_cast<unsigned>(blocks);
}

// Blocks for a grid-stride loop over `work` items of kThreads * per_thread.
inline unsigned stride_grid(int64_t work, int64_t per_thread) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads * per_thread), 1 << 16)));
}

// Runs a walk of op (see walk_nchw_kernel) over an (N, C, H, W) tensor in layout fmt whose pointers
// are all 16-byte aligned when `aligned`.  Returns its sums (N * splits, C, kSums) (undefined when
// Op::kSums = 0) and the splits of each sample (1 in NCHW); NCHW sums are scaled by `scale`.
template <typename scalar_t, typename Op>
std::tuple<Tensor, int64_t> walk(const Op& op, bool aligned, at::MemoryFormat fmt, int64_t N, int64_t C, int64_t HW,
                                 const at::TensorOptions& acc_opts, double scale = 1) {
  using acc_t = typename Op::acc_t;
  constexpr int64_t kS = Op::kSums;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor sums;
  int64_t splits = 1;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    with_pack_width<scalar_t>(aligned && C % pack_width<scalar_t>() == 0, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      int tx = 1;  // threads across channels: enough for C, at most a warp
      while (tx < kWarp && tx * kVec < C) tx *= 2;
      const int64_t rows = (kThreads / tx) * kRowsPerThread;
      const int64_t ctiles = ceil_div(C, int64_t(tx) * kVec);
      splits = ceil_div(HW, rows);
      if (kS > 0) sums = at::empty({N * splits, C, kS}, acc_opts);
      walk_nhwc_kernel<Op, kVec><<<grid_for(N * ctiles * splits), kThreads, 0, stream>>>(
          op, kS > 0 ? sums.mutable_data_ptr<acc_t>() : nullptr, C, HW, ctiles, splits, rows, tx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    with_pack_width<scalar_t>(aligned && HW % pack_width<scalar_t>() == 0, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      // A warp per plane while a plane is at most a few packs per lane, else a block.
      const int group = HW <= int64_t(kWarp) * kVec * 4 ? kWarp : kThreads;
      const int64_t planes = N * C;
      if (kS > 0) sums = at::empty({N, C, kS}, acc_opts);
      walk_nchw_kernel<Op, kVec><<<grid_for(ceil_div(planes, kThreads / group)), kThreads, 0, stream>>>(
          op, kS > 0 ? sums.mutable_data_ptr<acc_t>() : nullptr, planes, C, HW, group, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {sums, splits};
}

// A walk's sums (N * splits, C, K) as (N, C, K), times scale: the splits of each sample added in order.
template <typename acc_t>
Tensor fold_splits(const Tensor& sums, int64_t N, int64_t splits, double scale = 1) {
  if (splits == 1 && scale == 1.0) return sums;
  const int64_t CK = sums.size(1) * sums.size(2);
  Tensor folded = at::empty({N, sums.size(1), sums.size(2)}, sums.options());
  sum_splits_kernel<acc_t, acc_t><<<stride_grid(N * CK, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sums.const_data_ptr<acc_t>(), folded.mutable_data_ptr<acc_t>(), N, splits, CK, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return folded;
}

// pooled (N, C), acc dtype: the means over H, W of what a pooling op (kSums = 1) sums.
template <typename scalar_t, typename Op>
Tensor channel_means(const Op& op, bool aligned, at::MemoryFormat fmt, int64_t N, int64_t C, int64_t HW,
                     const at::TensorOptions& acc_opts) {
  using acc_t = typename Op::acc_t;
  const double inv_hw = 1.0 / double(HW);
  if (fmt != at::MemoryFormat::ChannelsLast)
    return std::get<0>(walk<scalar_t>(op, aligned, fmt, N, C, HW, acc_opts, inv_hw)).view({N, C});
  Tensor partial;
  int64_t splits;
  std::tie(partial, splits) = walk<scalar_t>(op, aligned, fmt, N, C, HW, acc_opts);
  return fold_splits<acc_t>(partial, N, splits, inv_hw).view({N, C});
}

// (C, 2) double: the batch totals of the first two sums of folded (N, C, K).
template <typename acc_t>
Tensor channel_totals(const Tensor& folded) {
  const int64_t N = folded.size(0), C = folded.size(1), K = folded.size(2);
  Tensor totals = at::empty({C, 2}, folded.options().dtype(at::kDouble));
  line_sums_kernel<2><<<grid_for(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      folded.const_data_ptr<acc_t>(), N, K, C * K, totals.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return totals;
}

// ---- the ops ------------------------------------------------------------------------------

Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) {
  const auto in = prepare_gate(x, u, k);
  const DeviceGuard guard(x);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() == 0) return out;
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x), chunks = ceil_div(C * HW, kChunk);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = in.x.const_data_ptr<scalar_t>(), *up = in.u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && aligned16(up) && aligned16(op) && (C * HW) % pack_width<scalar_t>() == 0;
    with_pack_width<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      gate_kernel<scalar_t, kVec, false, false, false, false><<<grid_for(N * chunks), kThreads, 0, stream>>>(
          nullptr, nullptr, xp, up, in.k.const_data_ptr<acc_t>(), op, nullptr, nullptr, C, HW, kChunk, chunks, 0,
          0, 0, acc_t(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// gate_pool and residual_gate_pool (in.residual; with a BatchNorm table `norm`, bn_residual_gate_pool)
// on checked inputs.
std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in, const Tensor& norm = Tensor()) {
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
    with_flag(in.residual, [&](auto residual_tag) {
      with_flag(norm.defined(), [&](auto norm_tag) {
        constexpr bool kResidual = decltype(residual_tag)::value;
        constexpr bool kNorm = decltype(norm_tag)::value && kResidual;
        const GateOp<scalar_t, kResidual, kNorm> gate_op{xp, up, in.k.const_data_ptr<acc_t>(),
                                                         kNorm ? norm.const_data_ptr<acc_t>() : nullptr, op, C};
        pooled = channel_means<scalar_t>(gate_op, aligned, in.fmt, N, C, HW, acc_opts);
      });
    });
  });
  return {out, pooled.to(x.scalar_type())};
}

// Channel means of x in the accumulation dtype: one read of x.
Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  if (x.numel() == 0) return at::empty({N, C}, acc_opts);
  Tensor pooled;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_pool_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    pooled = channel_means<scalar_t>(PoolOp<scalar_t>{xp}, aligned16(xp), fmt, N, C, HW, acc_opts);
  });
  return pooled;
}

// Runs the focus MLP on channel means l (N, C); fills hidden and either k (forward) or, given
// grad_k, grad_z, grad_h and grad_l (backward).
template <bool kBackward>
void run_focus_mlp(const Tensor& l, const FocusWeights& w, const Tensor& hidden, const Tensor& k,
                   const Tensor& grad_k, const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_l) {
  const int64_t N = l.size(0), C = l.size(1), H1 = w.w1.size(0);
  if (N == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "fanet_focus_mlp_cuda", [&] {
    const auto mut = [](const Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    focus_mlp_kernel<scalar_t, kBackward><<<grid_for(N), kThreads, 0, stream>>>(
        l.const_data_ptr<scalar_t>(), w.w1.const_data_ptr<scalar_t>(), w.b1.const_data_ptr<scalar_t>(),
        w.w2.const_data_ptr<scalar_t>(), w.b2.const_data_ptr<scalar_t>(), C, H1,
        hidden.mutable_data_ptr<scalar_t>(), mut(k), grad_k.defined() ? grad_k.const_data_ptr<scalar_t>() : nullptr,
        mut(grad_z), mut(grad_h), mut(grad_l));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Shared by the gate backward ops (b.gp undefined: no pooled gradient; b.in.residual: u is a
// residual branch, the second result grad_branch).
std::tuple<Tensor, Tensor, Tensor> gate_backward_impl(const GateBackwardInputs& b, const Tensor& k) {
  const auto& in = b.in;
  const Tensor &g = b.g, &gp = b.gp;
  const bool fold = gp.defined();
  const Tensor& x = in.x;
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const DeviceGuard guard(x);
  const auto acc = acc_dtype(x.scalar_type());
  Tensor gx = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor gu = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() == 0) return {gx, gu, at::zeros({N}, k.options())};
  const bool cl = in.fmt == at::MemoryFormat::ChannelsLast;
  // Chunks of whole rows (NHWC) or planes (NCHW) when folding (see gate_kernel), a multiple
  // of every pack width; the chunking depends on the shape only, so grad_k is reproducible.
  int64_t chunk = kChunk;
  if (fold) {
    int64_t unit = cl ? C : HW;
    while (unit % 8 != 0) unit *= 2;  // lcm(unit, 8)
    chunk = unit * std::max<int64_t>(1, kChunk / unit);
  }
  const int64_t chunk_c = fold && !cl ? chunk / HW : 0;
  const int64_t chunks = ceil_div(C * HW, chunk);
  Tensor partial = at::empty({N, chunks}, x.options().dtype(at::kDouble));
  Tensor gk = at::empty({N}, x.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gptr = g.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>(),
                   *up = in.u.const_data_ptr<scalar_t>();
    const acc_t* kp = in.k.const_data_ptr<acc_t>();
    const acc_t* gpp = fold ? gp.const_data_ptr<acc_t>() : nullptr;
    scalar_t *gxp = gx.mutable_data_ptr<scalar_t>(), *gup = gu.mutable_data_ptr<scalar_t>();
    double* pp = partial.mutable_data_ptr<double>();
    const bool vec = aligned16(gptr) && aligned16(xp) && aligned16(up) && aligned16(gxp) && aligned16(gup) &&
                     (C * HW) % pack_width<scalar_t>() == 0;
    with_pack_width<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      // How far one loop step (kThreads * kVec elements) moves the fold's channel index.
      const int64_t step = int64_t(kThreads) * kVec;
      const int64_t step_c = cl ? step % C : step / HW, step_r = cl ? 0 : step % HW;
      const auto launch = [&](auto kernel) {
        kernel<<<grid_for(N * chunks), kThreads, 0, stream>>>(gptr, gpp, xp, up, kp, gxp, gup, pp, C, HW, chunk,
                                                              chunks, chunk_c, step_c, step_r,
                                                              acc_t(1) / acc_t(HW));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_flag(in.residual, [&](auto residual_tag) {
        constexpr bool kResidual = decltype(residual_tag)::value;
        if (!fold)
          launch(gate_kernel<scalar_t, kVec, true, false, false, kResidual>);
        else if (cl)
          launch(gate_kernel<scalar_t, kVec, true, true, true, kResidual>);
        else
          launch(gate_kernel<scalar_t, kVec, true, true, false, kResidual>);
      });
    });
    // Per-sample sum of the per-chunk partials, in chunk order: deterministic.
    sum_splits_kernel<double, acc_t><<<stride_grid(N, 1), kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), gk.mutable_data_ptr<acc_t>(), N, chunks, 1, 1.0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gu, gk.to(k.scalar_type())};
}

// ---- bn_residual_gate_pool ----------------------------------------------------------------------

// Fills mean and var (C,) with z's batch statistics from its moments about shift (one read of z).
void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean, const Tensor& var) {
  const int64_t N = z.size(0), C = z.size(1), HW = plane(z);
  const auto acc_opts = mean.options();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fanet_batch_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t* kp = shift.const_data_ptr<acc_t>();
    const auto [sums, splits] = walk<scalar_t>(MomentsOp<scalar_t>{zp, kp}, aligned16(zp), fmt, N, C, HW, acc_opts);
    const Tensor totals = channel_totals<acc_t>(fold_splits<acc_t>(sums, N, splits));
    batch_moments_kernel<acc_t><<<stride_grid(C, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        totals.const_data_ptr<double>(), kp, C, double(N * HW), mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

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
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_gate_backward(const GateBackwardInputs& b, const Tensor& k,
                                                                    const Tensor& norm, bool training) {
  const auto& in = b.in;
  const Tensor& x = in.x;
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const DeviceGuard guard(x);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor gx = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor gz = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  if (x.numel() == 0)
    return {gx, gz, at::zeros({N}, k.options()), at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
  Tensor gk = at::empty({N}, acc_opts), grad_w = at::empty({C}, acc_opts), grad_b = at::empty({C}, acc_opts);
  Tensor gt = at::empty({kGradRows, C}, acc_opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_bn_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gptr = b.g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                   *zp = in.u.const_data_ptr<scalar_t>();
    scalar_t *gxp = gx.mutable_data_ptr<scalar_t>(), *gzp = gz.mutable_data_ptr<scalar_t>();
    const bool aligned = aligned16(gptr) && aligned16(xp) && aligned16(zp) && aligned16(gxp) && aligned16(gzp);
    Tensor sums;
    int64_t splits = 1;
    with_flag(b.gp.defined(), [&](auto fold_tag) {
      constexpr bool kFold = decltype(fold_tag)::value;
      const NormGateBackwardOp<scalar_t, kFold> pass1{gptr, kFold ? b.gp.const_data_ptr<acc_t>() : nullptr, xp, zp,
                                                      in.k.const_data_ptr<acc_t>(), norm.const_data_ptr<acc_t>(),
                                                      gxp, gzp, C, acc_t(1) / acc_t(HW)};
      std::tie(sums, splits) = walk<scalar_t>(pass1, aligned, in.fmt, N, C, HW, acc_opts);
    });
    const Tensor folded = fold_splits<acc_t>(sums, N, splits);  // (N, C, 3)
    const Tensor totals = channel_totals<acc_t>(folded);
    norm_grad_table_kernel<acc_t><<<stride_grid(C, 1), kThreads, 0, stream>>>(
        totals.const_data_ptr<double>(), norm.const_data_ptr<acc_t>(), C, double(N * HW), training,
        grad_w.mutable_data_ptr<acc_t>(), grad_b.mutable_data_ptr<acc_t>(), gt.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_k[n]: sample n's per-channel sums of g * (U - x) (the third of each triple), in order.
    const int64_t K = folded.size(2);
    line_sums_kernel<1><<<grid_for(N), kThreads, 0, stream>>>(folded.const_data_ptr<acc_t>() + 2, C, C * K, K,
                                                               gk.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    walk<scalar_t>(NormInputGradOp<scalar_t>{gzp, zp, gt.const_data_ptr<acc_t>(), C}, aligned16(gzp) && aligned16(zp),
                   in.fmt, N, C, HW, acc_opts);
  });
  return {gx, gz, gk.to(k.scalar_type()), grad_w, grad_b};
}

// gx[n, c, h, w] = grad_l[n, c] / HW in layout fmt (focus backward).
void broadcast_pool_grad(const Tensor& grad_l, const Tensor& gx, at::MemoryFormat fmt) {
  const int64_t C = gx.size(1), HW = plane(gx), total = gx.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fanet_focus_grad_x_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const acc_t* glp = grad_l.const_data_ptr<acc_t>();
    with_pack_width<scalar_t>(aligned16(gxp) && total % pack_width<scalar_t>() == 0, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      const unsigned grid = stride_grid(total, kVec);
      if (fmt == at::MemoryFormat::ChannelsLast)
        broadcast_pool_grad_kernel<scalar_t, kVec, true><<<grid, kThreads, 0, stream>>>(glp, gxp, total, C, HW);
      else
        broadcast_pool_grad_kernel<scalar_t, kVec, false><<<grid, kThreads, 0, stream>>>(glp, gxp, total, C, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The kernels of this device, for the shared drivers of csrc/common/op_drivers.h.
struct Device {
  static DeviceGuard guard(const Tensor& x) { return DeviceGuard(x); }
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cuda::gate(x, u, k); }
  static std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in, const Tensor& norm = Tensor()) {
    return cuda::gate_pool(in, norm);
  }
  static Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) { return cuda::pool_acc(x, fmt); }
  static void mlp(const Tensor& l, const FocusWeights& w, const Tensor& hidden, const Tensor& k,
                  const Tensor& grad_k, const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_l) {
    if (grad_k.defined())
      run_focus_mlp<true>(l, w, hidden, k, grad_k, grad_z, grad_h, grad_l);
    else
      run_focus_mlp<false>(l, w, hidden, k, grad_k, grad_z, grad_h, grad_l);
  }
  static void broadcast_pool_grad(const Tensor& grad_l, const Tensor& gx, at::MemoryFormat fmt) {
    cuda::broadcast_pool_grad(grad_l, gx, fmt);
  }
  static std::tuple<Tensor, Tensor, Tensor> gate_backward(const GateBackwardInputs& b, const Tensor& k) {
    return gate_backward_impl(b, k);
  }
  static void batch_stats(const Tensor& z, const Tensor& shift, at::MemoryFormat fmt, const Tensor& mean,
                          const Tensor& var) {
    cuda::batch_stats(z, shift, fmt, mean, var);
  }
  static void norm_table(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                         const Tensor& t) {
    cuda::norm_table(mean, var, weight, bias, eps, t);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_gate_backward(const GateBackwardInputs& b,
                                                                             const Tensor& k, const Tensor& norm,
                                                                             bool training) {
    return cuda::bn_gate_backward(b, k, norm, training);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CUDA, m) {
  register_ops<Device>(m);
}

}  // namespace cuda
}  // namespace fanet
