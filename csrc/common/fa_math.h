// The arithmetic of the FA kernels, shared by the CPU and CUDA backends.
//
// Every function here is a template on the value type so that the CPU kernels can
// instantiate it with at::vec::Vectorized<acc_t> (SIMD lanes) and with plain
// float/double, and the CUDA kernels with float/double in registers.  See SPEC.md §1 and §4.
//
// Both devices round alike.  No compiler contracts a * b + c into a fused multiply-add (the
// CPU sources are built with -ffp-contract=off, the CUDA ones with --fmad=false); both fuse
// exactly where this file asks (Primitives::fmadd, fma_: one rounding on each device); division
// and square root are IEEE on both (nvcc's default -prec-div/-prec-sqrt=true, no
// -use_fast_math); float16/bfloat16 round to nearest even on both.  So, given the same
// inputs, every element-wise output (the gates' out, grad_x, grad_u; the BatchNorm gate's
// out, grad_x and grad_z given the same batch statistics and channel sums) is bit-identical
// on the CPU and the GPU, and the CPU tests exercise the arithmetic the GPU runs;
// tests/test_cuda.py checks it on a GPU.  What differs, and by how much:
//  - every sum (pools, grad_k, batch statistics and channel sums, weight gradients, the
//    MLP head's dot products) is added in another order on each device: those agree to
//    rounding, not bit for bit, and so do the outputs computed from them;
//  - exp_ in the MLP head's and the SE scale's sigmoid: CUDA's expf is within 2 ulp, glibc's within
//    0.502 ulp (exp: 1 and 0.511), so given the same z, k' = 1 / (1 + exp(-z)) differs by at most
//    7 ulp in float and 5 in double (those bounds through the rounded add and division);
//  - the SE tail's excitation: its matrix products are ATen's (BLAS, cuBLAS); its sums over the
//    batch (add_se_norm_grad_terms) are added in the same order on both devices;
//  - NaN payloads: a NaN is NaN on both devices, its bits may differ;
//  - denormals are kept on both, unless torch.set_flush_denormal(True) makes the CPU flush them.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FANET_HD __host__ __device__ __forceinline__
#else
#define FANET_HD inline
#endif

namespace fanet {

// Long sums (the pools, grad_k, the BatchNorm's channel sums) add at most kSumSteps values into one
// accumulator of the accumulation type (a SIMD lane on the CPU, a thread's register on CUDA), then
// move that accumulator into a double total.  A float32 chain over a whole plane loses accuracy as
// H * W grows (at 2048x2048, a hundred times ATen's error); chains of 64 keep every sum as accurate
// as ATen's cascade sum at any plane size, for one double add per 64 values.  The totals are added
// in an order fixed by the shapes, so the sums stay deterministic.
constexpr int64_t kSumSteps = 64;

// Rows of bn_residual_gate_pool's (kNormRows, C) table: B = z * alpha + beta is the normalized
// branch, xhat = z * invstd + shift the normalized input (math::norm_table_column).
enum NormRow { kAlpha, kBeta, kInvstd, kShift, kNormRows };

// Rows of the (kGradRows, C) table of BatchNorm's input gradient (math::norm_input_grad).
enum GradRow { kGradInvstd, kGradShift, kGradScale, kGradXhat, kGradConst, kGradRows };

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

FANET_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
FANET_HD double fma_(double a, double b, double c) { return fma(a, b, c); }

// Comparison, selection and fused multiply-add, which SIMD vectors spell differently from
// scalars: this primary template serves float/double (CPU scalars, CUDA registers);
// csrc/cpu/walks.h specializes it for at::vec::Vectorized.
template <typename T>
struct Primitives {
  // v where r > 0 or r is NaN, else 0: torch's threshold(r, 0, 0) rule, which relu and
  // its backward (threshold_backward) follow.
  static FANET_HD T unless_nonpositive(T r, T v) { return r <= T(0) ? T(0) : v; }
  // a * b + c rounded once (the CPU's vector fmadd), so both devices round alike.
  static FANET_HD T fmadd(T a, T b, T c) { return fma_(a, b, c); }
};

// U = relu(B + X), as the block computes it (b + x, in that order).
template <typename T>
FANET_HD T residual_output(T x, T b) {
  const T r = b + x;
  return Primitives<T>::unless_nonpositive(r, r);
}

// d out / d B: grad_u = g * k passes where B + X > 0.
template <typename T>
FANET_HD T residual_grad_branch(T g, T k, T x, T b) {
  return Primitives<T>::unless_nonpositive(b + x, gate_grad_u(g, k));
}

// d out / d X: through the weighting (g - g*k) and through the identity shortcut (grad_b),
// summed in the order autograd of the reference sums them.
template <typename T>
FANET_HD T residual_grad_x(T g, T k, T grad_b) {
  return gate_grad_x(g, k) + grad_b;
}

// ---- BatchNorm inside the residual gate (bn_residual_gate_pool) -----------------------
// The branch is B = batch_norm(z).  The ops never write B: they form it from z and a per-channel
// table, B = z * alpha + beta with alpha = weight * invstd, beta = bias - mean * alpha (ATen's
// form), and xhat = z * invstd + shift with shift = -mean * invstd for the backward.

template <typename T>
FANET_HD T norm_branch(T z, T alpha, T beta) {
  return Primitives<T>::fmadd(z, alpha, beta);
}

template <typename T>
FANET_HD T norm_xhat(T z, T invstd, T shift) {
  return Primitives<T>::fmadd(z, invstd, shift);
}

// The batch statistics' shifted moments: d = z - K_c summed and squared into s1, s2 (the shift
// K_c, a value of channel c, keeps the variance exact where the mean is large against the spread).
template <typename T>
FANET_HD void add_moments(T d, T& s1, T& s2) {
  s1 = s1 + d;
  s2 = Primitives<T>::fmadd(d, d, s2);
}

// The channel sums of BatchNorm's backward: grad_B and grad_B * xhat.
template <typename T>
FANET_HD void add_norm_grad_sums(T grad_b, T xhat, T& sum_g, T& sum_gx) {
  sum_g = sum_g + grad_b;
  sum_gx = Primitives<T>::fmadd(grad_b, xhat, sum_gx);
}

// BatchNorm's input gradient from grad_B: grad_z = grad_B * scale + xhat * xhat_coef + constant
// (scale = alpha; training: xhat_coef = -scale * mean(grad_B * xhat), constant = -scale * mean(grad_B);
// eval: both 0).
template <typename T>
FANET_HD T norm_input_grad(T grad_b, T z, T invstd, T shift, T scale, T xhat_coef, T constant) {
  return Primitives<T>::fmadd(grad_b, scale, Primitives<T>::fmadd(norm_xhat(z, invstd, shift), xhat_coef, constant));
}

FANET_HD float sqrt_(float v) { return sqrtf(v); }
FANET_HD double sqrt_(double v) { return sqrt(v); }

// Per channel, from the moments summed over the batch (in double, over M = N * H * W values):
// mean and biased variance in T.
template <typename T>
FANET_HD void batch_moments(double shift, double s1, double s2, double M, T& mean, T& var) {
  const double m = s1 / M, v = s2 / M - m * m;
  mean = T(shift + m);
  var = T(v < 0.0 ? 0.0 : v);  // rounding can make v slightly negative; a NaN stays NaN (F.batch_norm's var)
}

// Column c of the (kNormRows, C) table t, from channel c's statistics and affine parameters.
template <typename T>
FANET_HD void norm_table_column(T mean, T var, T weight, T bias, double eps, T* t, int64_t C, int64_t c) {
  const T invstd = T(1) / sqrt_(var + T(eps));
  const T alpha = weight * invstd;
  t[kAlpha * C + c] = alpha;
  t[kBeta * C + c] = bias - mean * alpha;
  t[kInvstd * C + c] = invstd;
  t[kShift * C + c] = -mean * invstd;
}

// From channel c's batch totals of grad_B (sum_g) and grad_B * xhat (sum_gx), and column c of the
// forward's table `norm`: grad_bias, grad_weight, and column c of the (kGradRows, C) table gt.  In
// training the statistics depend on z too, which takes the means of grad_B and grad_B * xhat out.
template <typename T>
FANET_HD void norm_grad_column(const T* norm, int64_t C, int64_t c, double sum_g, double sum_gx, double M,
                               bool training, T& grad_weight, T& grad_bias, T* gt) {
  grad_bias = T(sum_g);
  grad_weight = T(sum_gx);
  const T scale = norm[kAlpha * C + c];  // weight * invstd
  gt[kGradInvstd * C + c] = norm[kInvstd * C + c];
  gt[kGradShift * C + c] = norm[kShift * C + c];
  gt[kGradScale * C + c] = scale;
  gt[kGradXhat * C + c] = training ? T(-double(scale) * sum_gx / M) : T(0);
  gt[kGradConst * C + c] = training ? T(-double(scale) * sum_g / M) : T(0);
}

// ---- SE inside the BatchNorm gate (bn_se_residual_gate_pool, bn_se_residual) ----------
// The branch is S = B * e[n, c] with e = sigmoid(w2 relu(w1 q + b1) + b2) and SE's squeeze
// q = mean_hw(B) = alpha * zbar + beta (zbar: z's plane mean).  These are the per-sample pieces of
// its (N, C) arithmetic; the excitation's matrix products are ATen's (op_drivers.h).

// q[n, c] from zbar[n, c], in double, rounded once.
template <typename T>
FANET_HD T se_squeeze(T zbar, T alpha, T beta) {
  return T(double(alpha) * double(zbar) + double(beta));
}

// Column c of one sample's (kNormRows, C) table t: S = z (alpha e) + beta e; xhat's rows unchanged.
template <typename T>
FANET_HD void se_table_column(const T* norm, int64_t C, int64_t c, T e, T* t) {
  t[kAlpha * C + c] = norm[kAlpha * C + c] * e;
  t[kBeta * C + c] = norm[kBeta * C + c] * e;
  t[kInvstd * C + c] = norm[kInvstd * C + c];
  t[kShift * C + c] = norm[kShift * C + c];
}

// The gradient of e's pre-activation at (n, c), from the plane sums P0 = sum grad_S and
// P1 = sum grad_S * xhat: d loss / d e = w P1 + b P0 (S = (w xhat + b) e), through the sigmoid.
FANET_HD double se_scale_grad(double w, double b, double p0, double p1, double e) {
  const double de = w * p1 + b * p0;
  return de * e * (1.0 - e);
}

// The SE tail's BatchNorm backward, per channel c over the batch (double): with dB = grad_S e +
// dq / HW (dq: the squeeze's gradient, through mean_hw) and xbar = zbar invstd + shift (mean_hw xhat),
// grad_bias = sum_n (e P0 + dq), grad_weight = sum_n (e P1 + dq xbar), and grad_b2 = sum_n da
// (da: se_scale_grad).  Sample n's terms, added in n's order on both devices:
template <typename T>
FANET_HD void add_se_norm_grad_terms(const T* norm, int64_t C, int64_t c, T zbar, T p0, T p1, T e, double dq,
                                     double da, double& gw, double& gb, double& gb2) {
  const double en = e, xbar = double(zbar) * double(norm[kInvstd * C + c]) + double(norm[kShift * C + c]);
  gb += en * double(p0) + dq;
  gw += en * double(p1) + dq * xbar;
  gb2 += da;
}

// Column c of one sample's (kGradRows, C) table t for norm_input_grad over grad_S, from the channel's
// totals gw, gb: scale e, and in training xhat_coef = -scale gw / M, constant = scale (dq / HW - gb / M),
// in eval 0 and scale dq / HW (scale = w invstd = alpha, M = N HW).
template <typename T>
FANET_HD void se_grad_table_column(const T* norm, int64_t C, int64_t c, T e, double dq, double gw, double gb,
                                   int64_t HW, double M, bool training, T* t) {
  const double scale = norm[kAlpha * C + c];
  t[kGradInvstd * C + c] = norm[kInvstd * C + c];
  t[kGradShift * C + c] = norm[kShift * C + c];
  t[kGradScale * C + c] = T(scale * double(e));
  t[kGradXhat * C + c] = training ? T(-scale * gw / M) : T(0);
  t[kGradConst * C + c] = training ? T(scale * (dq / double(HW) - gb / M)) : T(scale * dq / double(HW));
}

// ---- MLP head: k = sigmoid(w2 . relu(w1 . inputs + b1) + b2) -------------------------
// Focus's MLP on the channel means, and association's on the attention history.

FANET_HD float exp_(float v) { return expf(v); }
FANET_HD double exp_(double v) { return exp(v); }

template <typename T>
FANET_HD T sigmoid(T z) {
  return T(1) / (T(1) + exp_(-z));
}

template <typename T>
FANET_HD T relu(T v) {
  return Primitives<T>::unless_nonpositive(v, v);  // NaN passes, as in torch.relu
}

// Hidden unit j from its pre-activation dot product w1[j, :] . inputs.
template <typename T>
FANET_HD T mlp_hidden(T dot, T b1) {
  return relu(dot + b1);
}

// d k' / d z for k' = sigmoid(z), from k' itself.
template <typename T>
FANET_HD T sigmoid_grad(T k, T grad_k) {
  return grad_k * k * (T(1) - k);
}

// Gradient reaching hidden unit j's pre-activation: relu passes it where h > 0 or h is NaN
// (threshold_backward's rule).
template <typename T>
FANET_HD T mlp_hidden_grad(T grad_z, T w2, T h) {
  return Primitives<T>::unless_nonpositive(h, grad_z * w2);
}

// The MLP head of one sample after its dot products, built from the pieces above.  The
// dot products w1 . inputs are a matrix product over all samples (BLAS on the CPU); the CUDA
// kernels spread the same pieces over a thread block per sample instead.  On entry hidden
// (H1 entries) holds w1 . inputs, on exit relu(w1 . inputs + b1).  Returns k.
template <typename T, typename W>
FANET_HD T mlp_head(T* hidden, const W* b1, int64_t H1, const W* w2, const W* b2) {
  T z = T(0);
  for (int64_t j = 0; j < H1; ++j) {
    const T h = mlp_hidden(hidden[j], T(b1[j]));
    hidden[j] = h;
    z += T(w2[j]) * h;
  }
  return sigmoid(T(b2[0]) + z);
}

// Backward of mlp_head for one sample, given k' and the hidden activations it
// produced: writes grad_hidden (H1: the gradient of each pre-activation, i.e. of b1) and
// returns the gradient of z (i.e. of b2).  grad_inputs = grad_hidden . w1 and the weight
// gradients are matrix products over the samples, taken by the caller.
template <typename T, typename W>
FANET_HD T mlp_head_backward(T grad_k, T k, const T* hidden, const W* w2, int64_t H1, T* grad_hidden) {
  const T grad_z = sigmoid_grad(k, grad_k);
  for (int64_t j = 0; j < H1; ++j) grad_hidden[j] = mlp_hidden_grad(grad_z, T(w2[j]), hidden[j]);
  return grad_z;
}

}  // namespace math
}  // namespace fanet
