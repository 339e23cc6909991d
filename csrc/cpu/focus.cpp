// The focus and mlp ops on the CPU, host side: the pool of x, the MLP head (focus's on the pool,
// association's on the attention history), and the broadcast of the pool's gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/fa_math.h"
#include "kernels.h"
#include "ops.h"

namespace fanet::cpu {

using at::Tensor;

// Channel means of x in the accumulation dtype: one read of x.
Tensor pool_acc(const Tensor& x, at::MemoryFormat fmt) {
  Tensor pooled = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (x.numel() == 0) return pooled;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fanet_pool_cpu", [&] {
    kernels<scalar_t>().pool({.x = x.const_data_ptr<scalar_t>(),
                              .u = nullptr,
                              .k = nullptr,
                              .norm = nullptr,
                              .out = nullptr,
                              .pooled = pooled.mutable_data_ptr<Acc<scalar_t>>(),
                              .N = x.size(0),
                              .C = x.size(1),
                              .HW = plane(x),
                              .channels_last = fmt == at::MemoryFormat::ChannelsLast,
                              .residual = false});
  });
  return pooled;
}

// The MLP head on inputs (N, C): forward when grad_k is undefined, else backward (which recomputes
// the forward's hidden units first).  The dot products are matrix products (BLAS): with C = 1024
// and H1 = 256 a per-sample loop took 17 ms for batch 128, the products well under 1 ms.  The rest
// is per sample (fa_math.h).
void mlp(const Tensor& inputs, const MlpWeights& w, const Tensor& hidden, const Tensor& k, const Tensor& grad_k,
         const Tensor& grad_z, const Tensor& grad_h, const Tensor& grad_inputs) {
  const int64_t N = inputs.size(0), H1 = w.w1.size(0);
  if (N == 0) return;
  const bool backward = grad_k.defined();
  Tensor pre = hidden;  // a handle: mm_out writes hidden's storage
  at::mm_out(pre, inputs, w.w1.t());
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "fanet_mlp_cpu", [&] {
    const scalar_t *b1p = w.b1.const_data_ptr<scalar_t>(), *w2p = w.w2.const_data_ptr<scalar_t>(),
                   *b2p = w.b2.const_data_ptr<scalar_t>();
    const auto out = [](const Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    scalar_t *hp = out(hidden), *kp = out(k), *gzp = out(grad_z), *ghp = out(grad_h);
    const scalar_t* gkp = backward ? grad_k.const_data_ptr<scalar_t>() : nullptr;
    // About 32768 operations per task, as in the sweeps (a sample's head is about 4 * H1).
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / H1), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const scalar_t kn = math::mlp_head(hp + n * H1, b1p, H1, w2p, b2p);
        if (backward)
          gzp[n] = math::mlp_head_backward(gkp[n], kn, hp + n * H1, w2p, H1, ghp + n * H1);
        else
          kp[n] = kn;
      }
    });
  });
  if (backward) {
    Tensor gi = grad_inputs;
    at::mm_out(gi, grad_h, w.w1);
  }
}

void broadcast_pool_grad(const Tensor& grad_pool, const Tensor& gx, at::MemoryFormat fmt) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fanet_focus_grad_x_cpu", [&] {
    kernels<scalar_t>().broadcast_pool_grad(grad_pool.const_data_ptr<Acc<scalar_t>>(), gx.mutable_data_ptr<scalar_t>(),
                                            gx.size(0), gx.size(1), plane(gx), fmt == at::MemoryFormat::ChannelsLast);
  });
}

}  // namespace fanet::cpu
