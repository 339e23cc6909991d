// The channel walks: sums per (n, c) over the activations, for the pools, the BatchNorm statistics
// and the BatchNorm gate's backward, and the small kernels that add their pieces in a fixed order.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "common.cuh"

namespace fanet::cuda {

// Rows (H*W positions) per thread in the channels_last walk.
constexpr int64_t kRowsPerThread = 8;

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
__global__ void __launch_bounds__(kThreads)
    walk_nchw_kernel(const Op op, typename Op::acc_t* __restrict__ sums, int64_t planes, int64_t C, int64_t HW,
                     int group, double scale) {
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
__global__ void __launch_bounds__(kThreads)
    walk_nhwc_kernel(const Op op, typename Op::acc_t* __restrict__ sums, int64_t C, int64_t HW, int64_t ctiles,
                     int64_t splits, int64_t rows, int tx) {
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

// out[n, c] = scale * sum over s of partial[n, s, c] (partial: (N, S, C)), s in order, in double (S
// grows with the plane): the fold of a walk's splits (C = C * kSums; the channels_last pools' second,
// tiny pass) and grad_k's sum of its chunks.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) sum_splits_kernel(const in_t* __restrict__ partial, out_t* __restrict__ out,
                                                              int64_t N, int64_t S, int64_t C, double scale) {
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
__global__ void __launch_bounds__(kThreads)
    line_sums_kernel(const acc_t* __restrict__ data, int64_t len, int64_t line_stride, int64_t elem_stride,
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

}  // namespace fanet::cuda
