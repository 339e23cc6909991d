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
#include <cstdint>
#include <tuple>
#include <type_traits>

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
// g * (u - x) in partial[b].  Backward with kResidual (residual_gate_pool): u holds the branch B,
// U = relu(B + x) is formed in registers, grad_u receives grad_B and grad_x the shortcut's share too.
//
// With kFold the chunk is a whole number of rows (NHWC: multiples of C) or planes (NCHW:
// multiples of HW, chunk_c planes per chunk), so each thread finds its channel with 32-bit
// arithmetic and then steps it; a 64-bit division (a called routine) makes ptxas spill.
template <typename scalar_t, int kVec, bool kBackward, bool kFold, bool kChannelsLast, bool kResidual>
__global__ void __launch_bounds__(kThreads) gate_kernel(
    const scalar_t* __restrict__ g, const at::opmath_type<scalar_t>* __restrict__ gp,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
    const at::opmath_type<scalar_t>* __restrict__ k, scalar_t* __restrict__ out0,
    scalar_t* __restrict__ out1, at::opmath_type<scalar_t>* __restrict__ partial, int64_t C,
    int64_t HW, int64_t chunk, int64_t chunks, int64_t chunk_c, int64_t step_c, int64_t step_r) {
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
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  acc_t s = acc_t(0);
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
  // kVec > 1 only when per_sample % kVec == 0, so a pack never straddles `end`.
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
    __shared__ acc_t scratch[kWarps];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[block] = s;
  }
}

// ---- pooling, NCHW: one group of threads per (n, c) plane ------------------------------------
//
// kGate: out = gate(x, u, k[n]) is written and pooled (gate_pool); otherwise x is pooled
// (focus); kResidual (with kGate): u holds a residual branch B and the gate weights towards
// relu(B + x).  `group` threads share a plane: 32 (one warp, several planes per block) for small
// planes, kThreads for large ones.  pooled[p] = mean of the plane, in acc_t.
template <typename scalar_t, int kVec, bool kGate, bool kResidual>
__global__ void __launch_bounds__(kThreads) pool_nchw_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
    const at::opmath_type<scalar_t>* __restrict__ k, scalar_t* __restrict__ out,
    at::opmath_type<scalar_t>* __restrict__ pooled, int64_t planes, int64_t C, int64_t HW, int group) {
  static_assert(kGate || !kResidual, "kResidual needs kGate");
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p = int64_t(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  const int t = threadIdx.x % group;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  acc_t s = acc_t(0);
  if (p < planes) {
    const int64_t base = p * HW;
    const acc_t kn = kGate ? k[p / C] : acc_t(0);
    // kVec > 1 only when HW % kVec == 0.
    for (int64_t i = int64_t(t) * kVec; i < HW; i += int64_t(group) * kVec) {
      const Pack<scalar_t, kVec> xp = load_pack<kVec>(x + base + i);
      if constexpr (kGate) {
        const Pack<scalar_t, kVec> up = load_pack<kVec>(u + base + i);
        Pack<scalar_t, kVec> op;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc_t o = gate_value<kResidual>(acc_t(xp.v[j]), acc_t(up.v[j]), kn);
          op.v[j] = scalar_t(o);
          s += o;  // the mean of the un-rounded out
        }
        store_pack<kVec>(out + base + i, op);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) s += acc_t(xp.v[j]);
      }
    }
  }
  s = warp_sum(s);  // every lane of every warp takes part (planes >= p are zeros)
  if (group == kWarp) {
    if (t == 0 && p < planes) pooled[p] = s * inv_hw;
    return;
  }
  __shared__ acc_t scratch[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = warp_sum(lane < kWarps ? scratch[lane] : acc_t(0));
    if (lane == 0 && p < planes) pooled[p] = s * inv_hw;
  }
}

// ---- pooling, channels_last: a (channel tile, row split) of one sample per block -------------
//
// Block threads form a tx-by-ty grid: tx threads across a tile of tx * kVec channels (one pack
// each), ty threads down the rows.  The block walks rows [split * rows, (split + 1) * rows),
// sums each channel down its rows in shared memory in a fixed order, and writes
// partial[n, split, c]; sum_splits_kernel then adds the splits.  kGate, kResidual: as for
// pool_nchw_kernel.
template <typename scalar_t, int kVec, bool kGate, bool kResidual>
__global__ void __launch_bounds__(kThreads) pool_nhwc_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
    const at::opmath_type<scalar_t>* __restrict__ k, scalar_t* __restrict__ out,
    at::opmath_type<scalar_t>* __restrict__ partial, int64_t C, int64_t HW, int64_t ctiles,
    int64_t splits, int64_t rows, int tx) {
  static_assert(kGate || !kResidual, "kResidual needs kGate");
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kThreads * kVec];
  const uint32_t block = blockIdx.x;  // grid < 2^31 blocks: 32-bit decomposition
  const int64_t split = block % uint32_t(splits);
  const int64_t ctile = (block / uint32_t(splits)) % uint32_t(ctiles);
  const int64_t n = block / uint32_t(splits * ctiles);
  const int ty = kThreads / tx;
  const int lx = threadIdx.x % tx, ly = threadIdx.x / tx;
  const int64_t c = (ctile * tx + lx) * kVec;  // kVec > 1 only when C % kVec == 0
  acc_t s[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) s[j] = acc_t(0);
  if (c < C) {
    const acc_t kn = kGate ? k[n] : acc_t(0);
    const int64_t r_end = min64(HW, (split + 1) * rows);
    for (int64_t r = split * rows + ly; r < r_end; r += ty) {
      const int64_t off = (n * HW + r) * C + c;
      const Pack<scalar_t, kVec> xp = load_pack<kVec>(x + off);
      if constexpr (kGate) {
        const Pack<scalar_t, kVec> up = load_pack<kVec>(u + off);
        Pack<scalar_t, kVec> op;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc_t o = gate_value<kResidual>(acc_t(xp.v[j]), acc_t(up.v[j]), kn);
          op.v[j] = scalar_t(o);
          s[j] += o;
        }
        store_pack<kVec>(out + off, op);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) s[j] += acc_t(xp.v[j]);
      }
    }
  }
  const int width = tx * kVec;  // channels in the tile
#pragma unroll
  for (int j = 0; j < kVec; ++j) red[ly * width + lx * kVec + j] = s[j];
  __syncthreads();
  for (int q = threadIdx.x; q < width; q += kThreads) {
    const int64_t cc = ctile * width + q;
    if (cc < C) {
      acc_t t = acc_t(0);
      for (int y = 0; y < ty; ++y) t += red[y * width + q];
      partial[(n * splits + split) * C + cc] = t;
    }
  }
}

// out[n, c] = scale * sum over s of partial[n, s, c], s in order: the second, tiny pass of
// every split reduction (channels_last pools with S = splits; grad_k with C = 1).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_splits_kernel(const acc_t* __restrict__ partial,
                                                              acc_t* __restrict__ out, int64_t N,
                                                              int64_t S, int64_t C, acc_t scale) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < N * C; i += stride) {
    const int64_t n = i / C, c = i % C;
    const acc_t* p = partial + n * S * C + c;
    acc_t t = acc_t(0);
    for (int64_t s = 0; s < S; ++s) t += p[s * C];
    out[i] = t * scale;
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

// pooled[n, c] (acc dtype) = mean over H, W of x, or of gate(x, u, k) written to out when kGate
// (with `residual`, u is a branch B and the gate weights towards relu(B + x)).
template <bool kGate>
void run_pool(const Tensor& x, const Tensor& u, const Tensor& k, const Tensor& out, const Tensor& pooled,
              at::MemoryFormat fmt, bool residual = false) {
  const int64_t N = x.size(0), C = x.size(1), HW = plane(x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* up = kGate ? u.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* kp = kGate ? k.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op = kGate ? out.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* pp = pooled.mutable_data_ptr<acc_t>();
    const bool ptrs_ok = aligned16(xp) && (!kGate || (aligned16(up) && aligned16(op)));
    const auto run = [&](auto residual_tag) {
      constexpr bool kResidual = decltype(residual_tag)::value;
      if (fmt == at::MemoryFormat::ChannelsLast) {
        with_pack_width<scalar_t>(ptrs_ok && C % pack_width<scalar_t>() == 0, [&](auto vec) {
          constexpr int kVec = decltype(vec)::value;
          int tx = 1;  // threads across channels: enough for C, at most a warp
          while (tx < kWarp && tx * kVec < C) tx *= 2;
          const int64_t rows = (kThreads / tx) * kRowsPerThread;
          const int64_t ctiles = ceil_div(C, int64_t(tx) * kVec), splits = ceil_div(HW, rows);
          Tensor partial = at::empty({N, splits, C}, pooled.options());
          pool_nhwc_kernel<scalar_t, kVec, kGate, kResidual>
              <<<grid_for(N * ctiles * splits), kThreads, 0, stream>>>(
                  xp, up, kp, op, partial.mutable_data_ptr<acc_t>(), C, HW, ctiles, splits, rows, tx);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          sum_splits_kernel<acc_t><<<stride_grid(N * C, 1), kThreads, 0, stream>>>(
              partial.const_data_ptr<acc_t>(), pp, N, splits, C, acc_t(1) / acc_t(HW));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      } else {
        with_pack_width<scalar_t>(ptrs_ok && HW % pack_width<scalar_t>() == 0, [&](auto vec) {
          constexpr int kVec = decltype(vec)::value;
          // A warp per plane while a plane is at most a few packs per lane, else a block.
          const int group = HW <= int64_t(kWarp) * kVec * 4 ? kWarp : kThreads;
          const int64_t planes = N * C;
          pool_nchw_kernel<scalar_t, kVec, kGate, kResidual>
              <<<grid_for(ceil_div(planes, kThreads / group)), kThreads, 0, stream>>>(xp, up, kp, op, pp, planes, C,
                                                                                     HW, group);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    };
    // The residual kernels exist with kGate only (focus pools x alone).
    if constexpr (kGate)
      with_flag(residual, run);
    else
      run(std::false_type{});
  });
}

// ---- the ops ------------------------------------------------------------------------------

Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) {
  const auto in = prepare_gate(x, u, k);
  const at::cuda::CUDAGuard guard(x.device());
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
          0, 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// gate_pool and residual_gate_pool (in.residual) on checked inputs.
std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in) {
  const Tensor& x = in.x;
  const at::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options().memory_format(in.fmt));
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() > 0) run_pool<true>(in.x, in.u, in.k, out, pooled, in.fmt, in.residual);
  return {out, pooled.to(x.scalar_type())};
}

// Channel means of x in the accumulation dtype: one read of x.
Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) {
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() > 0) run_pool<false>(x, Tensor(), Tensor(), Tensor(), pooled, fmt);
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
  const at::cuda::CUDAGuard guard(x.device());
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
  Tensor partial = at::empty({N, chunks}, x.options().dtype(acc));
  Tensor gk = at::empty({N}, x.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gptr = g.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>(),
                   *up = in.u.const_data_ptr<scalar_t>();
    const acc_t* kp = in.k.const_data_ptr<acc_t>();
    const acc_t* gpp = fold ? gp.const_data_ptr<acc_t>() : nullptr;
    scalar_t *gxp = gx.mutable_data_ptr<scalar_t>(), *gup = gu.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    const bool vec = aligned16(gptr) && aligned16(xp) && aligned16(up) && aligned16(gxp) && aligned16(gup) &&
                     (C * HW) % pack_width<scalar_t>() == 0;
    with_pack_width<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      // How far one loop step (kThreads * kVec elements) moves the fold's channel index.
      const int64_t step = int64_t(kThreads) * kVec;
      const int64_t step_c = cl ? step % C : step / HW, step_r = cl ? 0 : step % HW;
      const auto launch = [&](auto kernel) {
        kernel<<<grid_for(N * chunks), kThreads, 0, stream>>>(gptr, gpp, xp, up, kp, gxp, gup, pp, C, HW, chunk,
                                                              chunks, chunk_c, step_c, step_r);
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
    sum_splits_kernel<acc_t><<<stride_grid(N, 1), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), gk.mutable_data_ptr<acc_t>(), N, chunks, 1, acc_t(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gu, gk.to(k.scalar_type())};
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
  static at::cuda::CUDAGuard guard(const Tensor& x) { return at::cuda::CUDAGuard(x.device()); }
  static Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return cuda::gate(x, u, k); }
  static std::tuple<Tensor, Tensor> gate_pool(const GateInputs& in) { return cuda::gate_pool(in); }
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
};

}  // namespace

TORCH_LIBRARY_IMPL(fanet, CUDA, m) {
  register_ops<Device>(m);
}

}  // namespace cuda
}  // namespace fanet
