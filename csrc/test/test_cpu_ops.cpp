// C++ test of the CPU kernels and their autograd through the dispatcher, against the FA math
// composed from ATen ops (the same formulas as fanet_kernels/reference.py).  Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include "cpu/capability.h"

#include <cstdio>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  const bool ok = a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), tol, tol);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

template <typename Sig>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor ref_gate(const at::Tensor& x, const at::Tensor& u, const at::Tensor& k) {
  const auto xa = x.to(at::kDouble), ua = u.to(at::kDouble);
  return xa + (ua - xa) * k.to(at::kDouble).view({-1, 1, 1, 1});
}

void check_layout(at::ScalarType dtype, bool channels_last, double tol) {
  const std::string tag = std::string(c10::toString(dtype)) + (channels_last ? " channels_last" : " contiguous");
  auto x = at::randn({3, 37, 13, 17}).to(dtype), u = at::randn({3, 37, 13, 17}).to(dtype);
  if (channels_last) {
    x = x.contiguous(at::MemoryFormat::ChannelsLast);
    u = u.contiguous(at::MemoryFormat::ChannelsLast);
  }
  const auto k = at::rand({3}).to(dtype == at::kDouble ? at::kDouble : at::kFloat);  // grad_k comes back in k's dtype
  const auto ref = ref_gate(x, u, k);

  auto gate = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("fanet::gate");
  auto gate_pool = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "fanet::gate_pool");
  expect_close(gate.call(x, u, k), ref, tol, "gate " + tag);
  auto [out, pooled] = gate_pool.call(x, u, k);
  expect_close(out, ref, tol, "gate_pool out " + tag);
  expect_close(pooled, ref.mean({2, 3}), tol, "gate_pool pooled " + tag);
  if (out.is_contiguous(at::MemoryFormat::ChannelsLast) != channels_last) {
    std::printf("FAIL gate_pool keeps the memory format %s\n", tag.c_str());
    ++failures;
  }

  // Backward: grad_x = g (1 - k), grad_u = g k, grad_k = sum g (u - x), g = grad_out + grad_pooled / HW.
  auto backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&)>("fanet::gate_pool_backward");
  const auto go = at::randn(x.sizes()).to(dtype), gp = at::randn({3, 37});
  auto [gx, gu, gk] = backward.call(go, gp, x, u, k);
  const auto g = go.to(at::kDouble) + gp.to(at::kDouble).view({3, 37, 1, 1}) / (13.0 * 17.0);
  const auto kd = k.to(at::kDouble).view({-1, 1, 1, 1});
  expect_close(gx, g * (1 - kd), tol, "gate_pool_backward grad_x " + tag);
  expect_close(gu, g * kd, tol, "gate_pool_backward grad_u " + tag);
  expect_close(gk, (g * (u.to(at::kDouble) - x.to(at::kDouble))).sum({1, 2, 3}), tol * 100,
               "gate_pool_backward grad_k " + tag);

  // Focus: sigmoid(w2 relu(w1 mean(x) + b1) + b2).
  auto focus =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "fanet::focus");
  const auto w1 = at::randn({9, 37}) * 0.2, b1 = at::randn({9}) * 0.1, w2 = at::randn({1, 9}) * 0.3,
             b2 = at::randn({1});
  const auto pool = x.to(at::kDouble).mean({2, 3});
  const auto h = at::relu(at::linear(pool, w1.to(at::kDouble), b1.to(at::kDouble)));
  const auto kf = at::sigmoid(at::linear(h, w2.to(at::kDouble), b2.to(at::kDouble))).squeeze(1);
  expect_close(focus.call(x, w1, b1, w2, b2), kf, tol, "focus " + tag);
}

// Autograd (csrc/autograd.cpp): the gradients that reach the inputs are those of the backward op,
// also when an output goes unused (its gradient then reaches the backward op as None).
void check_autograd() {
  using GateGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (grad_x, grad_u, grad_k)
  auto gate_pool = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "fanet::gate_pool");
  auto backward = op<GateGrads(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&)>("fanet::gate_pool_backward");
  const auto x = at::randn({2, 5, 3, 4}), u = at::randn({2, 5, 3, 4}), k = at::rand({2});
  const auto go = at::randn(x.sizes()), gp = at::randn({2, 5});
  for (const bool use_pooled : {true, false}) {
    const std::string tag = use_pooled ? " (out and pooled)" : " (out only)";
    auto xr = x.clone().requires_grad_(), ur = u.clone().requires_grad_(), kr = k.clone().requires_grad_();
    auto [out, pooled] = gate_pool.call(xr, ur, kr);
    auto loss = (out * go).sum();
    if (use_pooled) loss = loss + (pooled * gp).sum();
    loss.backward();
    auto [gx, gu, gk] = backward.call(go, use_pooled ? std::optional<at::Tensor>(gp) : std::nullopt, x, u, k);
    expect_close(xr.grad(), gx, 1e-6, "autograd gate_pool grad_x" + tag);
    expect_close(ur.grad(), gu, 1e-6, "autograd gate_pool grad_u" + tag);
    expect_close(kr.grad(), gk, 1e-5, "autograd gate_pool grad_k" + tag);
  }
}

void check_bad_input_is_an_error() {
  auto gate = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("fanet::gate");
  try {
    gate.call(at::randn({2, 3, 4, 4}), at::randn({2, 2, 4, 4}), at::rand({2}));
    std::printf("FAIL shape mismatch raised nothing\n");
    ++failures;
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what()).find("'u'") != std::string::npos;
    std::printf("%s shape mismatch names argument 'u'\n", named ? "ok  " : "FAIL");
    if (!named) ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  // The kernels run at the best SIMD level of this CPU, or FANET_CPU_CAPABILITY's (ctest runs both).
  std::printf("CPU kernels: SIMD level %s\n", fanet::cpu::capability().c_str());
  for (bool cl : {false, true}) {
    check_layout(at::kFloat, cl, 1e-5);
    check_layout(at::kDouble, cl, 1e-12);
    check_layout(at::kBFloat16, cl, 2e-2);
    check_layout(at::kHalf, cl, 2e-3);
  }
  check_autograd();
  check_bad_input_is_an_error();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
