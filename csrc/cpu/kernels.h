// The CPU kernels' interface: the host code (gate.cpp, bn_gate.cpp, focus.cpp: tensors, dtypes,
// buffers) calls the per-element sweeps through a table of function pointers.  The sweeps are
// compiled once per SIMD level (kernels/*.inc, built by capability/*.cpp) and dispatch.cpp picks
// the level at run time.  Only raw pointers and sizes cross this interface, so the kernel
// translation units include little of torch: an inline function of a torch header compiled there
// with AVX-512 flags could be the copy the linker keeps for every caller.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fanet::cpu {

template <typename scalar_t>
using Acc = at::opmath_type<scalar_t>;  // float for float16/bfloat16

// Channels of one channels_last work unit (its running sums stay in L1).  The host sizes the
// gate backward's per-unit partial sums of grad_k with it.
constexpr int64_t kChannelBlock = 256;

// A forward sweep over (N, C, H*W) activations in NCHW or channels_last: the gate writes out,
// gate_pool also its channel means (pooled), the pool only reads x and writes the means.
template <typename scalar_t>
struct ForwardSweep {
  const scalar_t* x;
  const scalar_t* u;          // the gate's target; a residual branch B (residual); z (norm)
  const Acc<scalar_t>* k;     // (N,)
  const Acc<scalar_t>* norm;  // the (kNormRows, C) BatchNorm table of bn_residual_gate_pool, or null
  scalar_t* out;
  Acc<scalar_t>* pooled;  // (N, C) means, or null: the gate alone
  int64_t N, C, HW;
  bool channels_last;
  bool residual;        // the gate weights towards relu(B + x)
  int64_t norm_stride;  // between samples' tables in norm: 0, or kNormRows * C (the SE tail's (N, kNormRows, C))
  bool no_gate;         // out = relu(B + x), k unused (bn_se_residual)
};

// The gate's backward sweep: reads grad_out g (and grad_pooled gp, folded in when not null), x and u,
// writes grad_x and grad_u (grad_B when residual), and one partial sum of grad_k per work unit:
// partial (N, units), units = C in NCHW, ceil(C / kChannelBlock) in channels_last.  With norm, u holds
// z, and csum (N, C, 2) receives the BatchNorm's channel sums of grad_B and grad_B * xhat.
template <typename scalar_t>
struct BackwardSweep {
  const scalar_t* g;
  const Acc<scalar_t>* gp;
  const scalar_t* x;
  const scalar_t* u;
  const Acc<scalar_t>* k;
  const Acc<scalar_t>* norm;
  scalar_t* gx;
  scalar_t* gu;
  double* partial;
  Acc<scalar_t>* csum;
  int64_t N, C, HW;
  bool channels_last;
  bool residual;
  int64_t norm_stride;  // as ForwardSweep's
  bool no_gate;         // grad_x = grad_B (bn_se_residual); k must hold ones
};

// The kernels of one SIMD level for one dtype.
template <typename scalar_t>
struct Kernels {
  // gate.inc: the gate and (residual_)gate_pool, forward (pooled may be null) and backward.
  void (*gate_forward)(const ForwardSweep<scalar_t>&);
  void (*gate_backward)(const BackwardSweep<scalar_t>&);
  // bn_gate.inc: bn_residual_gate_pool's sweeps (norm set), then its statistics and input gradient.
  void (*bn_gate_forward)(const ForwardSweep<scalar_t>&);
  void (*bn_gate_backward)(const BackwardSweep<scalar_t>&);
  // Shifted sums of z per (n, c) into csum (N, C, 2): sum(z - shift[c]), sum((z - shift[c])^2).
  void (*channel_sums)(const scalar_t* z, const Acc<scalar_t>* shift, Acc<scalar_t>* csum, int64_t N, int64_t C,
                       int64_t HW, bool channels_last);
  // grad_z from grad_B in place (gz holds grad_B on entry) and z; t: the (kGradRows, C) table, or
  // with t_stride = kGradRows * C an (N, kGradRows, C) one (the SE tail's).
  void (*norm_grad)(scalar_t* gz, const scalar_t* z, const Acc<scalar_t>* t, int64_t t_stride, int64_t N, int64_t C,
                    int64_t HW, bool channels_last);
  // focus.inc: x's channel means into pooled (N, C) (x, pooled, sizes and layout of the sweep), and
  // gx[n, c, h, w] = grad_pool[n, c] / HW.
  void (*pool)(const ForwardSweep<scalar_t>&);
  void (*broadcast_pool_grad)(const Acc<scalar_t>* grad_pool, scalar_t* gx, int64_t N, int64_t C, int64_t HW,
                              bool channels_last);
};

// Every dtype's kernels of one SIMD level.
struct KernelTable {
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<c10::Half> f16;
  Kernels<c10::BFloat16> bf16;
};

// The kernels of the level chosen for this process (dispatch.cpp).
const KernelTable& kernel_table();

template <typename scalar_t>
const Kernels<scalar_t>& kernels() {
  const KernelTable& t = kernel_table();
  if constexpr (std::is_same_v<scalar_t, float>)
    return t.f32;
  else if constexpr (std::is_same_v<scalar_t, double>)
    return t.f64;
  else if constexpr (std::is_same_v<scalar_t, c10::Half>)
    return t.f16;
  else
    return t.bf16;
}

// Each SIMD level's translation units fill their family's entries of a table.
#define FANET_CPU_DECLARE_LEVEL(level)      \
  namespace level {                         \
  void add_gate_kernels(KernelTable& t);    \
  void add_bn_gate_kernels(KernelTable& t); \
  void add_focus_kernels(KernelTable& t);   \
  }
FANET_CPU_DECLARE_LEVEL(DEFAULT)
FANET_CPU_DECLARE_LEVEL(AVX2)
FANET_CPU_DECLARE_LEVEL(AVX512)
FANET_CPU_DECLARE_LEVEL(AVX512BF16)
#undef FANET_CPU_DECLARE_LEVEL

}  // namespace fanet::cpu
