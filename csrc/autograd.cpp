// Autograd of the `fanet` ops, for every device: each forward op is wired to its backward op
// (csrc/fanet.cpp) as a C++ autograd node.  The math lives in the ops; this file only saves the
// inputs and calls the backward op through the dispatcher, so the device (and, under
// torch.compile, the fake kernels of fanet_kernels/ops.py) is chosen there.  In C++ because a
// Python autograd formula (torch.library.register_autograd) doubles the cost of a small op's
// forward + backward (2x16x4x4 gate_pool: 102 us against 52 us here).  The backward ops are
// differentiable no further: a double backward through them raises (BackwardFunction).
#include "common/checks.h"
#include "common/results.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fanet {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::optional<Tensor> maybe(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// A forward op and its backward op, by schema name: the template argument of the nodes below.
struct OpPair {
  const char* forward;
  const char* backward;
};
constexpr OpPair kGate{"fanet::gate", "fanet::gate_backward"};
constexpr OpPair kGatePool{"fanet::gate_pool", "fanet::gate_pool_backward"};
constexpr OpPair kResidualGatePool{"fanet::residual_gate_pool", "fanet::residual_gate_pool_backward"};
constexpr OpPair kFocus{"fanet::focus", "fanet::focus_backward"};
constexpr OpPair kMlp{"fanet::mlp", "fanet::mlp_backward"};
constexpr OpPair kBnResidualGatePool{"fanet::bn_residual_gate_pool", "fanet::bn_residual_gate_pool_backward"};
constexpr OpPair kBnSeResidualGatePool{"fanet::bn_se_residual_gate_pool", "fanet::bn_se_residual_gate_pool_backward"};
constexpr OpPair kBnSeResidual{"fanet::bn_se_residual", "fanet::bn_se_residual_backward"};

// fanet::gate: (x, u, k) -> out.
struct GateFunction : torch::autograd::Function<GateFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& u, const Tensor& k) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>(kGate.forward);
    ctx->save_for_backward({x, u, k});
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, u, k);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<GateGrads(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(kGate.backward);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gu, gk] = op.call(grads[0], s[0], s[1], s[2]);
    return {gx, gu, gk};
  }
};

// fanet::gate_pool and fanet::residual_gate_pool: (x, u or branch, k) -> (out, pooled).  Either
// output may go unused; its gradient then reaches the backward op as None, not as zeros.
template <const OpPair& Ops>
struct GatePoolFunction : torch::autograd::Function<GatePoolFunction<Ops>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& u, const Tensor& k) {
    static const auto op = find_op<GatePoolResult(const Tensor&, const Tensor&, const Tensor&)>(Ops.forward);
    ctx->save_for_backward({x, u, k});
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [out, pooled] = op.call(x, u, k);
    return {out, pooled};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GateGrads(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
                                             const Tensor&, const Tensor&)>(Ops.backward);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gu, gk] = op.call(maybe(grads[0]), maybe(grads[1]), s[0], s[1], s[2]);
    return {gx, gu, gk};
  }
};

// fanet::bn_residual_gate_pool: (x, z, k, weight, bias, running_mean, running_var, training, eps) ->
// (out, pooled, mean, var); mean and var are statistics for the caller's running stats, not
// differentiable (in training their dependence on z is in the backward op's grad_z).
struct BnResidualGatePoolFunction : torch::autograd::Function<BnResidualGatePoolFunction> {
  using Forward = BnGatePoolResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double);
  using Backward = BnGateGrads(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double);
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& z, const Tensor& k,
                               const Tensor& weight, const Tensor& bias, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training, double eps) {
    static const auto op = find_op<Forward>(kBnResidualGatePool.forward);
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [out, pooled, mean, var] = op.call(x, z, k, weight, bias, running_mean, running_var, training, eps);
    ctx->save_for_backward({x, z, k, weight, bias, mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    return {out, pooled, mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(kBnResidualGatePool.backward);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gz, gk, gw, gb] =
        op.call(maybe(grads[0]), maybe(grads[1]), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble());
    return {gx, gz, gk, gw, gb, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// fanet::bn_se_residual_gate_pool: (x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean,
// running_var, training, eps) -> (out, pooled, mean, var, z_mean); mean, var and z_mean (z's plane
// means, saved for the backward) are not differentiable.
struct BnSeResidualGatePoolFunction : torch::autograd::Function<BnSeResidualGatePoolFunction> {
  using Forward = BnSeGatePoolResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double);
  using Backward = BnSeGateGrads(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, bool, double);
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& z, const Tensor& k,
                               const Tensor& weight, const Tensor& bias, const Tensor& w1, const Tensor& b1,
                               const Tensor& w2, const Tensor& b2, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training, double eps) {
    static const auto op = find_op<Forward>(kBnSeResidualGatePool.forward);
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [out, pooled, mean, var, z_mean] =
        op.call(x, z, k, weight, bias, w1, b1, w2, b2, running_mean, running_var, training, eps);
    ctx->save_for_backward({x, z, k, weight, bias, w1, b1, w2, b2, mean, var, z_mean});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var, z_mean});
    return {out, pooled, mean, var, z_mean};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(kBnSeResidualGatePool.backward);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gz, gk, gw, gb, gw1, gb1, gw2, gb2] =
        op.call(maybe(grads[0]), maybe(grads[1]), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10],
                s[11], ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble());
    return {gx, gz, gk, gw, gb, gw1, gb1, gw2, gb2, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// fanet::bn_se_residual: as above without k and pooled -> (out, mean, var, z_mean).
struct BnSeResidualFunction : torch::autograd::Function<BnSeResidualFunction> {
  using Forward = BnSeResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                             bool, double);
  using Backward = BnSeGrads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             bool, double);
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& z, const Tensor& weight,
                               const Tensor& bias, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                               const Tensor& b2, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training, double eps) {
    static const auto op = find_op<Forward>(kBnSeResidual.forward);
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [out, mean, var, z_mean] =
        op.call(x, z, weight, bias, w1, b1, w2, b2, running_mean, running_var, training, eps);
    ctx->save_for_backward({x, z, weight, bias, w1, b1, w2, b2, mean, var, z_mean});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var, z_mean});
    return {out, mean, var, z_mean};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(kBnSeResidual.backward);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gz, gw, gb, gw1, gb1, gw2, gb2] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10],
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble());
    return {gx, gz, gw, gb, gw1, gb1, gw2, gb2, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// fanet::focus and fanet::mlp: (input, w1, b1, w2, b2) -> k.
template <const OpPair& Ops>
struct HeadFunction : torch::autograd::Function<HeadFunction<Ops>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& in, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                        const Tensor& b2) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(Ops.forward);
    ctx->save_for_backward({in, w1, b1, w2, b2});
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(in, w1, b1, w2, b2);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<HeadGrads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
            Ops.backward);
    const auto s = ctx->get_saved_variables();
    const auto [gin, gw1, gb1, gw2, gb2] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4]);
    return {gin, gw1, gb1, gw2, gb2};
  }
};

// The backward op of Ops, returning Result (a tuple of gradients).  Without an autograd kernel, a
// double backward (create_graph=True, then a backward through these gradients) would only warn
// and treat the gradients as constants: a silently wrong result.  With create_graph its outputs
// get a node that raises when such a backward reaches it; without, it costs nothing.
// Tensors by const reference, scalars (bool, double) by value: the dispatcher's C++ signature.
template <typename T>
using Param = std::conditional_t<std::is_arithmetic_v<T>, T, const T&>;

template <const OpPair& Ops, typename Result, typename... Args>
struct BackwardFunction : torch::autograd::Function<BackwardFunction<Ops, Result, Args...>> {
  static Result call(Param<Args>... args) {
    static const auto op = find_op<Result(Param<Args>...)>(Ops.backward);
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(args...);
  }
  static variable_list forward(AutogradContext*, Param<Args>... args) {
    return std::apply([](auto&&... grads) { return variable_list{grads...}; }, call(args...));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fanet: ", Ops.backward,
                                " is not differentiable: the fanet ops have first "
                                "derivatives only (no double backward through ",
                                Ops.forward,
                                "); the reference "
                                "backend, fanet_kernels.use_backend(\"reference\"), has higher ones");
  }
};

template <const OpPair& Ops, typename Result, typename... Args>
Result backward_op(Param<Args>... args) {
  using F = BackwardFunction<Ops, Result, Args...>;
  if (!at::GradMode::is_enabled()) return F::call(args...);  // an ordinary backward: no node
  const auto grads = F::apply(args...);
  return [&]<size_t... I>(std::index_sequence<I...>) {
    return Result{grads[I]...};
  }(std::make_index_sequence<std::tuple_size_v<Result>>());
}

using Grad = std::optional<Tensor>;

Tensor gate(const Tensor& x, const Tensor& u, const Tensor& k) { return GateFunction::apply(x, u, k); }

template <const OpPair& Ops>
GatePoolResult gate_pool(const Tensor& x, const Tensor& u, const Tensor& k) {
  const auto r = GatePoolFunction<Ops>::apply(x, u, k);
  return {r[0], r[1]};
}

BnGatePoolResult bn_residual_gate_pool(const Tensor& x, const Tensor& z, const Tensor& k, const Tensor& weight,
                                       const Tensor& bias, const std::optional<Tensor>& running_mean,
                                       const std::optional<Tensor>& running_var, bool training, double eps) {
  check_bn_affine(weight, bias);  // before apply, which records its inputs (an undefined one fails there)
  const auto r = BnResidualGatePoolFunction::apply(x, z, k, weight, bias, running_mean, running_var, training, eps);
  return {r[0], r[1], r[2], r[3]};
}

BnSeGatePoolResult bn_se_residual_gate_pool(const Tensor& x, const Tensor& z, const Tensor& k, const Tensor& weight,
                                            const Tensor& bias, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                                            const Tensor& b2, const std::optional<Tensor>& running_mean,
                                            const std::optional<Tensor>& running_var, bool training, double eps) {
  check_bn_affine(weight, bias);  // as bn_residual_gate_pool
  const auto r = BnSeResidualGatePoolFunction::apply(x, z, k, weight, bias, w1, b1, w2, b2, running_mean, running_var,
                                                     training, eps);
  return {r[0], r[1], r[2], r[3], r[4]};
}

BnSeResult bn_se_residual(const Tensor& x, const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& w1,
                          const Tensor& b1, const Tensor& w2, const Tensor& b2,
                          const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                          bool training, double eps) {
  check_bn_affine(weight, bias);
  const auto r =
      BnSeResidualFunction::apply(x, z, weight, bias, w1, b1, w2, b2, running_mean, running_var, training, eps);
  return {r[0], r[1], r[2], r[3]};
}

template <const OpPair& Ops>
Tensor head(const Tensor& in, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  return HeadFunction<Ops>::apply(in, w1, b1, w2, b2);
}

}  // namespace

TORCH_LIBRARY_IMPL(fanet, Autograd, m) {
  m.impl("gate", &gate);
  m.impl("gate_pool", &gate_pool<kGatePool>);
  m.impl("residual_gate_pool", &gate_pool<kResidualGatePool>);
  m.impl("focus", &head<kFocus>);
  m.impl("mlp", &head<kMlp>);
  m.impl("bn_residual_gate_pool", &bn_residual_gate_pool);
  m.impl("bn_se_residual_gate_pool", &bn_se_residual_gate_pool);
  m.impl("bn_se_residual", &bn_se_residual);
  m.impl("gate_backward", &backward_op<kGate, GateGrads, Tensor, Tensor, Tensor, Tensor>);
  m.impl("gate_pool_backward", &backward_op<kGatePool, GateGrads, Grad, Grad, Tensor, Tensor, Tensor>);
  m.impl("residual_gate_pool_backward", &backward_op<kResidualGatePool, GateGrads, Grad, Grad, Tensor, Tensor, Tensor>);
  m.impl("focus_backward", &backward_op<kFocus, HeadGrads, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>);
  m.impl("mlp_backward", &backward_op<kMlp, HeadGrads, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>);
  m.impl("bn_residual_gate_pool_backward", &backward_op<kBnResidualGatePool, BnGateGrads, Grad, Grad, Tensor, Tensor,
                                                        Tensor, Tensor, Tensor, Tensor, Tensor, bool, double>);
  m.impl("bn_se_residual_gate_pool_backward",
         &backward_op<kBnSeResidualGatePool, BnSeGateGrads, Grad, Grad, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                      Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, double>);
  m.impl("bn_se_residual_backward", &backward_op<kBnSeResidual, BnSeGrads, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                 Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, double>);
}

}  // namespace fanet
