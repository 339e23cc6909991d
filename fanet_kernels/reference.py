"""The FA math in plain PyTorch: the specification every backend is tested against.

SPEC.md §1 (one chain) and §2 (stages).  Everything is computed in the accumulation dtype
(float32, or float64 for float64 inputs) and cast back to the input dtype once, which is
what the fused kernels do.  Autograd of these functions is the reference gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Optional

from . import _validate
from .backends import Backend, register

_acc = _validate.acc_dtype


# ---- the fused ops -----------------------------------------------------------------------
def gate(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Weighting (paper eq. 9): ``x + (u - x) * k[n]``."""
    return _gate_acc(x, u, k).to(x.dtype)


def gate_pool(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate(x, u, k), mean over H, W of it)``; the mean is taken before rounding to x's dtype."""
    return _with_pool(_gate_acc(x, u, k), x.dtype)


def residual_gate_pool(x: torch.Tensor, branch: torch.Tensor,
                       k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_pool(x, relu(branch + x), k)`` with the block output ``relu(branch + x)`` formed in
    the accumulation dtype (not rounded to x's dtype first): the FA weighting of a residual block
    with an identity shortcut, given its residual branch."""
    acc = _acc(x.dtype)
    return _with_pool(_gate_acc(x, F.relu(branch.to(acc) + x.to(acc)), k), x.dtype)


def bn_residual_gate_pool(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                          running_var: Optional[torch.Tensor] = None, training: bool = True, momentum: float = 0.1,
                          eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_gate_pool(x, F.batch_norm(z, running_mean, running_var, weight, bias, training,
    momentum, eps), k)`` with the batch norm in the accumulation dtype: a residual block whose branch
    ends in a BatchNorm, that BatchNorm folded into the gate.  Updates the running stats as
    F.batch_norm does."""
    return residual_gate_pool(x, _batch_norm(z, weight, bias, running_mean, running_var, training, momentum, eps), k)


def bn_se_residual_gate_pool(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, se_w1: torch.Tensor, se_b1: torch.Tensor, se_w2: torch.Tensor,
                             se_b2: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                             running_var: Optional[torch.Tensor] = None, training: bool = True, momentum: float = 0.1,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail of a residual block whose branch ends ``BatchNorm -> SE``, and its FA gate: with
    B = F.batch_norm(z, ...) and the SE scale e = excite(mean_hw(B)) (N, C),
    ``residual_gate_pool(x, B * e[n, c], k)``, all in the accumulation dtype.  Updates the running
    stats as F.batch_norm does."""
    branch = _batch_norm(z, weight, bias, running_mean, running_var, training, momentum, eps)
    return residual_gate_pool(x, _se_scaled(branch, se_w1, se_b1, se_w2, se_b2), k)


def bn_se_residual(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   se_w1: torch.Tensor, se_b1: torch.Tensor, se_w2: torch.Tensor, se_b2: torch.Tensor,
                   running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                   training: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """The same block tail with no gate (an SE network without FA): ``relu(B * e[n, c] + x)``."""
    acc = _acc(x.dtype)
    branch = _batch_norm(z, weight, bias, running_mean, running_var, training, momentum, eps)
    return F.relu(_se_scaled(branch, se_w1, se_b1, se_w2, se_b2) + x.to(acc)).to(x.dtype)


def excite(squeeze: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
           b2: torch.Tensor) -> torch.Tensor:
    """SE's excitation ``sigmoid(W2 relu(W1 squeeze + b1) + b2)`` on the (N, C) squeeze, in its dtype."""
    dt = squeeze.dtype
    hidden = F.relu(F.linear(squeeze, w1.to(dt), b1.to(dt)))
    return torch.sigmoid(F.linear(hidden, w2.to(dt), b2.to(dt)))


def _se_scaled(branch: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> torch.Tensor:
    """branch * excite(mean_hw(branch))[n, c]: an SE block on the (accumulation dtype) branch."""
    return branch * excite(branch.mean(dim=(2, 3)), w1, b1, w2, b2)[:, :, None, None]


def _batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], training: bool, momentum: float, eps: float) -> torch.Tensor:
    """F.batch_norm of z in the accumulation dtype, updating the running stats (in their own dtype)."""
    acc = _acc(z.dtype)
    stats = [None if t is None else t.to(acc) for t in (running_mean, running_var)]  # t itself if already acc
    branch = F.batch_norm(z.to(acc), stats[0], stats[1], weight.to(acc), bias.to(acc), training, momentum, eps)
    with torch.no_grad():
        for t, st in zip((running_mean, running_var), stats):
            if t is not None and st is not t:
                t.copy_(st)
    return branch


def focus(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Focus (paper eqs. 5-7): the focused attention k' of shape (N,), from x's channel means."""
    return mlp(x.to(_acc(x.dtype)).mean(dim=(2, 3)), w1, b1, w2, b2).to(x.dtype)


def _with_pool(out: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, its channel means), both rounded to dtype once; the mean is of the un-rounded out."""
    return out.to(dtype), out.mean(dim=(2, 3)).to(dtype)


def _gate_acc(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    acc = _acc(x.dtype)
    xa = x.to(acc)
    return xa + (u.to(acc) - xa) * k.to(acc).view(-1, 1, 1, 1)


# ---- the small networks of one FA module ------------------------------------------------
def mlp(inputs: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The MLP head ``sigmoid(W2 relu(W1 inputs + b1) + b2)`` on ``inputs`` (N, C), shape (N,): the
    focus step's F_in on channel means, and the association step on the k history.  Computed in the
    accumulation dtype, returned in the inputs' dtype (the ``fanet::mlp`` op)."""
    acc = _acc(inputs.dtype)
    hidden = F.relu(F.linear(inputs.to(acc), w1.to(acc), b1.to(acc)))
    return torch.sigmoid(F.linear(hidden, w2.to(acc), b2.to(acc))).squeeze(1).to(inputs.dtype)


def associate(history: list[torch.Tensor], k_focus: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
              w4: torch.Tensor, b4: torch.Tensor) -> torch.Tensor:
    """Association (paper eq. 8) for block i = len(history) + 1 >= 2: s' = [k_1 .. k_{i-1}, k'_i]
    (N, i) -> sigmoid(W4 relu(W3 s' + b3) + b4), shape (N,).  W3 is (r2*i, i) (SPEC §1)."""
    return mlp(torch.stack([*history, k_focus], dim=1), w3, b3, w4, b4)


register(Backend(name="reference", devices=("cpu", "cuda", "meta", "mps", "xpu"),
                 gate=gate, gate_pool=gate_pool, focus=focus, residual_gate_pool=residual_gate_pool, mlp=mlp,
                 bn_residual_gate_pool=bn_residual_gate_pool, bn_se_residual_gate_pool=bn_se_residual_gate_pool,
                 bn_se_residual=bn_se_residual))


# ---- SPEC §1 / §2: one FA block, a chain, the stage level, with explicit weights --------
# ``params`` of a gated block i is a mapping with w1, b1, w2, b2 (focus) and, for i >= 2,
# w3, b3, w4, b4 (association); the modules of fanet_kernels.modules hold the same tensors
# (FAGate.params()) and are tested against these functions.
def fa_weight(i: int, x: torch.Tensor, u: torch.Tensor, history: list[torch.Tensor], params,
              pooled_x: torch.Tensor | None = None, projected: torch.Tensor | None = None):
    """FA of gated block ``i`` >= 1 (SPEC §1): focus on x (or on its channel means ``pooled_x``),
    association over ``history`` = [k_1 .. k_{i-1}] (i >= 2), weighting of ``projected`` (P(x), when
    x and u differ in shape) or x towards u.  Returns (out, k, history + [k], pooled out)."""
    if pooled_x is None:
        k = focus(x, params["w1"], params["b1"], params["w2"], params["b2"])
    else:
        k = mlp(pooled_x, params["w1"], params["b1"], params["w2"], params["b2"])
    if i >= 2:
        k = associate(list(history), k, params["w3"], params["b3"], params["w4"], params["b4"])
    start = x if projected is None else projected
    out, pooled = gate_pool(start, u, k)
    return out, k, [*history, k], pooled


def fa_chain(x: torch.Tensor, blocks, params, projections=None, history=None):
    """An FA chain (SPEC §1): ``blocks[0]`` ungated, block i >= 1 weighted with ``params[i-1]``;
    ``projections[i]`` (optional callables) project X_i where its shape differs from U_i.  The pool of
    X_i for i >= 2 is the pooled output of gate i-1 (no second pass).  Returns (out, [k_1 ..])."""
    x = blocks[0](x)
    hist = [] if history is None else list(history)
    pooled = None
    for i in range(1, len(blocks)):
        u = blocks[i](x)
        proj = projections[i] if projections is not None else None
        x, _, hist, pooled = fa_weight(i, x, u, hist, params[i - 1], pooled_x=pooled,
                                       projected=None if proj is None else proj(x))
    return x, hist


def fa_stages(x: torch.Tensor, stages, params, projections, pre=None):
    """The stage level (SPEC §2): ``stages[s]`` maps a stage input to its output (e.g. an fa_chain);
    stage 0 ungated; for s >= 1 X_{s+1} = P(X_s) + (U_s - P(X_s)) k_s with P = ``projections[s]``
    (the first block's shortcut) and focus on P(X_s).  With ``pre[s]`` given instead (Inception's
    reduction block) the stage runs on P(X_s) = pre[s](X_s).  Returns (out, [k_1 .. k_{S-1}])."""
    hist: list[torch.Tensor] = []
    for s, stage in enumerate(stages):
        p = pre[s] if pre is not None else None
        if p is not None:
            x = p(x)
        if s == 0:
            x = stage(x)
            continue
        xp = x if p is not None else projections[s](x)
        u = stage(x)
        x, _, hist, _ = fa_weight(s, xp, u, hist, params[s - 1])
    return x, hist
