// The gate ops on CUDA: gate, gate_pool and residual_gate_pool, forward and backward (SPEC §4).
//
// Host-side semantics (checks, layouts, dtypes, N = 0) are those of the CPU backend (csrc/cpu/):
// both use prepare_gate / prepare_focus_weights from checks.h.  The per-element arithmetic is
// fanet::math (csrc/common/fa_math.h), the very functions the CPU kernels call.
//
// Every sum is cut into pieces whose boundaries depend only on the shape and dtype (a plane,
// a chunk of a sample, a run of rows), each piece is reduced by one block in a fixed order
// (warp shuffles, then shared memory), and the pieces are added by a second tiny kernel in
// index order.  No float atomics: grad_k and the pools are bit-for-bit reproducible run to run.
// Activations move in 16-byte packs when every pointer is 16-byte aligned and the run length
// allows; otherwise the same kernels run one element at a time.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <atomic>
#include <string>

#include "../common/build_info.h"
#include "gate_pool.cuh"

namespace fanet::cuda {
namespace {

// Elements of one sample per block of the gate kernels (rounded to whole rows or planes when
// grad_pooled is folded in); a multiple of every pack width.
constexpr int64_t kChunk = 8192;

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
__global__ void __launch_bounds__(kThreads)
    gate_kernel(const scalar_t* __restrict__ g, const at::opmath_type<scalar_t>* __restrict__ gp,
                const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
                const at::opmath_type<scalar_t>* __restrict__ k, scalar_t* __restrict__ out0,
                scalar_t* __restrict__ out1, double* __restrict__ partial, int64_t C, int64_t HW, int64_t chunk,
                int64_t chunks, int64_t chunk_c, int64_t step_c, int64_t step_r, at::opmath_type<scalar_t> inv_hw) {
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
      for (int j = 0; j < kVec; ++j) op.v[j] = scalar_t(math::gate(acc_t(xp.v[j]), acc_t(up.v[j]), kn));
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

}  // namespace

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
                cudaGetErrorString(err),
                "). Use backend 'triton' or 'reference' ('auto' does), or rebuild with "
                "TORCH_CUDA_ARCH_LIST=\"",
                cc, "\" by an nvcc that targets it (nvcc 13 targets 7.5 and newer).");
  }
  C10_CUDA_CHECK(err);
}

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
      gate_kernel<scalar_t, kVec, false, false, false, false>
          <<<grid_for(N * chunks), kThreads, 0, stream>>>(nullptr, nullptr, xp, up, in.k.const_data_ptr<acc_t>(), op,
                                                          nullptr, nullptr, C, HW, kChunk, chunks, 0, 0, 0, acc_t(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

GatePoolResult gate_pool(const GateInputs& in) { return run_gate_pool<false>(in, Tensor()); }

// The gate backward ops (b.gp undefined: no pooled gradient; b.in.residual: u is a residual branch,
// the second result grad_branch).
GateGrads gate_backward(const GateBackwardInputs& b, const Tensor& k) {
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
        kernel<<<grid_for(N * chunks), kThreads, 0, stream>>>(gptr, gpp, xp, up, kp, gxp, gup, pp, C, HW, chunk, chunks,
                                                              chunk_c, step_c, step_r, acc_t(1) / acc_t(HW));
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

}  // namespace fanet::cuda
