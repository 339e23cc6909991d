// The arithmetic of the FA kernels, shared by the CPU and CUDA backends.
//
// Every function here is a template on the value type so that the CPU kernels can
// instantiate it with at::vec::Vectorized<acc_t> (SIMD lanes) and with plain
// float/double, and the CUDA kernels with float/double in registers.  The CPU tests
// therefore exercise exactly the code the GPU runs.  See SPEC.md §1 and §4.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FANET_HD __host__ __device__ __forceinline__
#else
#define FANET_HD inline
#endif

namespace fanet {
namespace math {

// ---- weighting: out = x + (u - x) * k ------------------------------------------------

// Written as x + (u - x) * k (not lerp's two-sided form) so that it rounds like the
// reference, which is the paper's equation (9) verbatim.
template <typename T>
FANET_HD T gate(T x, T u, T k) {
  return x + (u - x) * k;
}

// pooled = mean_hw(out), so d pooled[n, c] / d out[n, c, h, w] = 1 / (H * W): the
// pooled gradient is folded into grad_out element by element, never materialised.
template <typename T>
FANET_HD T fold_pooled_grad(T grad_out, T grad_pooled, T inv_hw) {
  return grad_out + grad_pooled * inv_hw;
}

// d out / d x = 1 - k, written g - g*k to round like autograd of the reference.
template <typename T>
FANET_HD T gate_grad_x(T g, T k) {
  return g - g * k;
}

template <typename T>
FANET_HD T gate_grad_u(T g, T k) {
  return g * k;
}

// One element's contribution to grad_k[n] = sum_{c,h,w} g * (u - x).
template <typename T>
FANET_HD T gate_grad_k_term(T g, T x, T u) {
  return g * (u - x);
}

// ---- residual weighting: the block's add and ReLU inside the gate ---------------------
// A residual block with an identity shortcut outputs U = relu(B + X) (B: its residual
// branch).  The residual ops take B instead of U and form U on the fly, so the block's
// add, its ReLU and their backward passes cost no extra sweep over memory.

// Comparison and selection, which SIMD vectors spell differently from scalars: this
// primary template serves float/double (CPU scalars, CUDA registers); csrc/cpu/fa_cpu.cpp
// specializes it for at::vec::Vectorized.
template <typename T>
struct Select {
  // v where r > 0 or r is NaN, else 0: torch's threshold(r, 0, 0) rule, which relu and
  // its backward (threshold_backward) follow.
  static FANET_HD T unless_nonpositive(T r, T v) { return r <= T(0) ? T(0) : v; }
};

// U = relu(B + X), as the block computes it (b + x, in that order).
template <typename T>
FANET_HD T residual_output(T x, T b) {
  const T r = b + x;
  return Select<T>::unless_nonpositive(r, r);
}

// d out / d B: grad_u = g * k passes where B + X > 0.
template <typename T>
FANET_HD T residual_grad_branch(T g, T k, T x, T b) {
  return Select<T>::unless_nonpositive(b + x, gate_grad_u(g, k));
}

// d out / d X: through the weighting (g - g*k) and through the identity shortcut (grad_b),
// summed in the order autograd of the reference sums them.
template <typename T>
FANET_HD T residual_grad_x(T g, T k, T grad_b) {
  return gate_grad_x(g, k) + grad_b;
}

// ---- focus MLP: k' = sigmoid(w2 . relu(w1 . l + b1) + b2) --------------------------

FANET_HD float exp_(float v) { return expf(v); }
FANET_HD double exp_(double v) { return exp(v); }

template <typename T>
FANET_HD T sigmoid(T z) {
  return T(1) / (T(1) + exp_(-z));
}

template <typename T>
FANET_HD T relu(T v) {
  return v > T(0) ? v : T(0);
}

// Hidden unit j from its pre-activation dot product w1[j, :] . l.
template <typename T>
FANET_HD T focus_hidden(T dot, T b1) {
  return relu(dot + b1);
}

// d k' / d z for k' = sigmoid(z), from k' itself.
template <typename T>
FANET_HD T sigmoid_grad(T k, T grad_k) {
  return grad_k * k * (T(1) - k);
}

// Gradient reaching hidden unit j's pre-activation: relu passes it where h > 0.
template <typename T>
FANET_HD T focus_hidden_grad(T grad_z, T w2, T h) {
  return h > T(0) ? grad_z * w2 : T(0);
}

// The focus MLP of one sample after its dot products, built from the pieces above.  The
// dot products w1 . l are a matrix product over all samples (BLAS on the CPU); the CUDA
// kernels spread the same pieces over a thread block per sample instead.  On entry hidden
// (H1 entries) holds w1 . l, on exit relu(w1 . l + b1).  Returns k'.
template <typename T, typename W>
FANET_HD T focus_mlp_head(T* hidden, const W* b1, int64_t H1, const W* w2, const W* b2) {
  T z = T(0);
  for (int64_t j = 0; j < H1; ++j) {
    const T h = focus_hidden(hidden[j], T(b1[j]));
    hidden[j] = h;
    z += T(w2[j]) * h;
  }
  return sigmoid(T(b2[0]) + z);
}

// Backward of focus_mlp_head for one sample, given k' and the hidden activations it
// produced: writes grad_hidden (H1: the gradient of each pre-activation, i.e. of b1) and
// returns the gradient of z (i.e. of b2).  grad_l = grad_hidden . w1 and the weight
// gradients are matrix products over the samples, taken by the caller.
template <typename T, typename W>
FANET_HD T focus_mlp_head_backward(T grad_k, T k, const T* hidden, const W* w2, int64_t H1, T* grad_hidden) {
  const T grad_z = sigmoid_grad(k, grad_k);
  for (int64_t j = 0; j < H1; ++j) grad_hidden[j] = focus_hidden_grad(grad_z, T(w2[j]), hidden[j]);
  return grad_z;
}

}  // namespace math
}  // namespace fanet
