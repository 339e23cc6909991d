// The ops' multi-tensor results, by what they hold (csrc/fanet.cpp's schemas), for the drivers,
// the device backends and autograd.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fanet {

// gate_pool and its residual and BatchNorm variants' (out, pooled).
using GatePoolResult = std::tuple<at::Tensor, at::Tensor>;
// The gate backward ops' (grad_x, grad_u, grad_k); grad_u is grad_branch for residual_gate_pool.
using GateGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// focus_backward's and mlp_backward's (grad_x or grad_inputs, grad_w1, grad_b1, grad_w2, grad_b2).
using HeadGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// bn_residual_gate_pool's (out, pooled, mean, var).
using BnGatePoolResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// bn_residual_gate_pool_backward's (grad_x, grad_z, grad_k, grad_weight, grad_bias).
using BnGateGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The SE tail's backward pass 1: (grad_x, grad_S, grad_k, sums (N, C, 2) of grad_S and grad_S * xhat, acc).
using BnGateSums = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// bn_se_residual_gate_pool's (out, pooled, mean, var, z_mean) and bn_se_residual's (out, mean, var, z_mean).
using BnSeGatePoolResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BnSeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// bn_se_residual_gate_pool_backward's (grad_x, grad_z, grad_k, grad_weight, grad_bias, grad_se_w1,
// grad_se_b1, grad_se_w2, grad_se_b2) and bn_se_residual_backward's (the same without grad_k).
using BnSeGateGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;
using BnSeGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace fanet
