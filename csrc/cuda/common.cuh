// What every CUDA kernel of the backend is built from: the launch shape, 16-byte packs, warp and
// block sums in a fixed order, per-channel table rows, and the host's launch arithmetic.
#pragma once

// Not ATen/ATen.h: nvcc parses every header once per GPU architecture, and all of ATen's ops cost
// each .cu file about half a minute.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/fa_math.h"

namespace fanet::cuda {

using at::Tensor;

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;

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

// Row r of a (rows, C) per-channel table, for channels c .. c + kL - 1.
template <int kL, typename T>
__device__ __forceinline__ void table_row(const T* t, int64_t r, int64_t C, int64_t c, T (&v)[kL]) {
#pragma unroll
  for (int l = 0; l < kL; ++l) v[l] = t[r * C + c + l];
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
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "fanet: tensor too large for one CUDA launch (", blocks, " blocks)");
  return static_cast<unsigned>(blocks);
}

// Blocks for a grid-stride loop over `work` items of kThreads * per_thread.
inline unsigned stride_grid(int64_t work, int64_t per_thread) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads * per_thread), 1 << 16)));
}

}  // namespace fanet::cuda
