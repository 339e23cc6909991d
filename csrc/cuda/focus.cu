// The focus and mlp ops on CUDA: the pool of x, the MLP head (focus's on the pool, association's on
// the attention history), and the broadcast of the pool's gradient.
#include <ATen/Dispatch.h>

#include "ops.h"
#include "walks.cuh"

namespace fanet::cuda {
namespace {

using at::Tensor;

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

// ---- the MLP head: one block per sample ---------------------------------------------------------
//
// Forward: hidden[n, j] = mlp_hidden(w1[j] . inputs[n], b1[j]) (one warp per hidden unit),
// k[n] = sigmoid(b2 + w2 . hidden[n]).  kBackward additionally takes grad_k and writes grad_z[n]
// (the gradient of b2's sum), grad_h[n, j] (of b1's) and grad_inputs[n, c] = grad_h[n] . w1[:, c].
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    mlp_kernel(const acc_t* __restrict__ inputs, const acc_t* __restrict__ w1, const acc_t* __restrict__ b1,
               const acc_t* __restrict__ w2, const acc_t* __restrict__ b2, int64_t C, int64_t H1,
               acc_t* __restrict__ hidden, acc_t* __restrict__ k_out, const acc_t* __restrict__ grad_k,
               acc_t* __restrict__ grad_z, acc_t* __restrict__ grad_h, acc_t* __restrict__ grad_inputs) {
  __shared__ acc_t scratch[kWarps];
  __shared__ acc_t gz_shared;
  const int64_t n = blockIdx.x;
  const acc_t* ln = inputs + n * C;
  acc_t* hn = hidden + n * H1;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t j = warp; j < H1; j += kWarps) {
    const acc_t* row = w1 + j * C;
    acc_t dot = acc_t(0);
    // Unrolled twice: 4 times made ptxas spill the double forward on sm_90.
#pragma unroll 2
    for (int64_t c = lane; c < C; c += kWarp) dot += row[c] * ln[c];
    dot = warp_sum(dot);
    if (lane == 0) hn[j] = math::mlp_hidden(dot, b1[j]);
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
    for (int64_t j = threadIdx.x; j < H1; j += kThreads) ghn[j] = math::mlp_hidden_grad(gz, w2[j], hn[j]);
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      acc_t t = acc_t(0);
      for (int64_t j = 0; j < H1; ++j) t += ghn[j] * w1[j * C + c];
      grad_inputs[n * C + c] = t;
    }
  }
}

// grad_x[n, c, h, w] = grad_pool[n, c] / HW, in the tensor's memory order (focus backward).
template <typename scalar_t, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    broadcast_pool_grad_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_pool, scalar_t* __restrict__ gx,
                               int64_t total, int64_t C, int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVec;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < total; i += stride) {
    Pack<scalar_t, kVec> v;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t e = i + j;
      const int64_t nc = kChannelsLast ? (e / (HW * C)) * C + e % C : e / HW;
      v.v[j] = scalar_t(grad_pool[nc] * inv_hw);
    }
    store_pack<kVec>(gx + i, v);
  }
}

// Runs the MLP head on inputs (N, C); fills hidden and either k (forward) or, given grad_k, grad_z,
// grad_h and grad_inputs (backward).
template <bool kBackward>
void run_mlp(const Tensor& inputs, const MlpWeights& w, const Tensor& hidden, const Tensor& k, const Tensor& grad_k,
             const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_inputs) {
  const int64_t N = inputs.size(0), C = inputs.size(1), H1 = w.w1.size(0);
  if (N == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "fanet_mlp_cuda", [&] {
    const auto mut = [](const Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    mlp_kernel<scalar_t, kBackward><<<grid_for(N), kThreads, 0, stream>>>(
        inputs.const_data_ptr<scalar_t>(), w.w1.const_data_ptr<scalar_t>(), w.b1.const_data_ptr<scalar_t>(),
        w.w2.const_data_ptr<scalar_t>(), w.b2.const_data_ptr<scalar_t>(), C, H1, hidden.mutable_data_ptr<scalar_t>(),
        mut(k), grad_k.defined() ? grad_k.const_data_ptr<scalar_t>() : nullptr, mut(grad_z), mut(grad_h),
        mut(grad_inputs));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

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

void mlp(const Tensor& inputs, const MlpWeights& w, const Tensor& hidden, const Tensor& k, const Tensor& grad_k,
         const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_inputs) {
  if (grad_k.defined())
    run_mlp<true>(inputs, w, hidden, k, grad_k, grad_z, grad_h, grad_inputs);
  else
    run_mlp<false>(inputs, w, hidden, k, grad_k, grad_z, grad_h, grad_inputs);
}

// gx[n, c, h, w] = grad_pool[n, c] / HW in layout fmt (focus backward).
void broadcast_pool_grad(const Tensor& grad_pool, const Tensor& gx, at::MemoryFormat fmt) {
  const int64_t C = gx.size(1), HW = plane(gx), total = gx.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fanet_focus_grad_x_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const acc_t* glp = grad_pool.const_data_ptr<acc_t>();
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

}  // namespace fanet::cuda
