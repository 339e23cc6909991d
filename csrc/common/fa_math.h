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

// The whole focus MLP for one sample, serial over the hidden units, built from the
// pieces above: the CPU kernels use it; the CUDA kernels spread the same pieces over a
// thread block per sample.  l has C entries,
// w1 is (H1, C) row-major, w2 has H1 entries; hidden (H1 entries) receives relu(.).
// Returns k'.
template <typename T, typename W>
FANET_HD T focus_mlp_forward(const T* l, int64_t C, const W* w1, const W* b1, int64_t H1,
                             const W* w2, const W* b2, T* hidden) {
  T z = T(b2[0]);
  for (int64_t j = 0; j < H1; ++j) {
    T dot = T(0);
    const W* row = w1 + j * C;
    for (int64_t c = 0; c < C; ++c) dot += T(row[c]) * l[c];
    const T h = focus_hidden(dot, T(b1[j]));
    hidden[j] = h;
    z += T(w2[j]) * h;
  }
  return sigmoid(z);
}

// Backward of focus_mlp_forward for one sample, given k' and the hidden activations it
// produced.  Writes grad_hidden (H1: the gradient of each pre-activation, i.e. of b1)
// and grad_l (C), and returns the gradient of z (i.e. of b2).  The weight gradients
// are the outer products grad_hidden x l and grad_z x hidden, summed over samples by
// the caller in a fixed order.
template <typename T, typename W>
FANET_HD T focus_mlp_backward(T grad_k, T k, int64_t C, const W* w1, int64_t H1, const W* w2,
                              const T* hidden, T* grad_hidden, T* grad_l) {
  const T grad_z = sigmoid_grad(k, grad_k);
  for (int64_t c = 0; c < C; ++c) grad_l[c] = T(0);
  for (int64_t j = 0; j < H1; ++j) {
    const T gh = focus_hidden_grad(grad_z, T(w2[j]), hidden[j]);
    grad_hidden[j] = gh;
    if (gh != T(0)) {
      const W* row = w1 + j * C;
      for (int64_t c = 0; c < C; ++c) grad_l[c] += gh * T(row[c]);
    }
  }
  return grad_z;
}

}  // namespace math
}  // namespace fanet
