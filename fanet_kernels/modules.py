"""Drop-in FA modules (SPEC §1, §2): FAGate, FASequential (a chain), FAStage/FAStages (the stage
level) and SEBlock.  The math is reference.fa_weight / fa_chain / fa_stages; here the pooling
and the weighting run through the fused ops of the active backend (fanet_kernels.ops).
"""
from __future__ import annotations

import threading
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import backends, ops
from .blocks import (BatchNorm2dSE, DownsampleResidualBlock, ResidualBlock, SE_WEIGHTS, SEBlock, Tail, batch_norm_args,
                     count_batch, foldable_tail, no_hooks)

__all__ = ["BatchNorm2dSE", "DownsampleResidualBlock", "FAOutput", "FAGate", "FASequential", "FAStage", "FAStages",
           "NormResidual", "NormSEResidual", "Residual", "ResidualBlock", "SE_WEIGHTS", "SEBlock", "Tail", "collect_k",
           "foldable_tail", "out_channels"]


class _NotScriptable:
    # torch.jit.script calls this on every module before compiling any: one clear refusal up front
    def __prepare_scriptable__(self):
        raise RuntimeError(f"{type(self).__name__}: FA modules do not support torch.jit.script; use torch.compile, "
                           "torch.export or torch.jit.trace")


class FAOutput(NamedTuple):
    out: torch.Tensor            # X_{i+1}
    k: torch.Tensor              # (N,) attention of this block
    history: list[torch.Tensor]  # [k_1 .. k_i], with gradients
    pooled: torch.Tensor         # (N, C) channel means of out: the focus input of the next gate


class Residual(NamedTuple):
    """A block output the gate forms itself: ``relu(branch + x)`` (a residual block with an identity
    shortcut), so the block's add and ReLU cost no pass of their own (ops.residual_gate_pool)."""
    branch: torch.Tensor


class NormResidual(NamedTuple):
    """``relu(norm(z) + x)``: a Residual whose branch ends in the BatchNorm ``norm``, run inside the gate
    too, running stats and all (ops.bn_residual_gate_pool); ``z`` is the branch before it."""
    z: torch.Tensor
    norm: nn.BatchNorm2d


class NormSEResidual(NamedTuple):
    """``relu(se(norm(z)) + x)``: a NormResidual whose BatchNorm ``norm`` is followed by an SE block with
    weights ``se`` = (w1 (R, C), b1, w2 (C, R), b2), all run inside the gate (ops.bn_se_residual_gate_pool)."""
    z: torch.Tensor
    norm: nn.BatchNorm2d
    se: tuple[torch.Tensor, ...]


class FAGate(_NotScriptable, nn.Module):
    """Focus + association + weighting of the block at position ``index`` >= 1 of a chain (SPEC §1).

    ``gate(x, u, history=None, pooled_x=None, projected=None)`` returns an :class:`FAOutput` with
    out = x + (u - x) * k, where x = X_i is the block input, u = U_i the block output and history =
    [k_1 .. k_{i-1}] the k of the blocks before.  ``u`` may also be a :class:`Residual` or a
    :class:`NormResidual`, whose output the gate forms in its own pass.  ``pooled_x``: the channel
    means of x (the ``pooled`` of the previous gate), so that focus does not read x again.
    ``projected``: P(x), the start of the weighting where x and u differ in shape (focus stays on x).
    An x and a u of different dtypes (a block's output under autocast) are promoted as
    x + (u - x) * k would be.

    Args:
        channels: C of the block input x, the width of the focus MLP.
        index: the block's position i >= 1 in its chain (block 0 is not gated).
        r1: focus reduction: the focus MLP is Linear(C, max(1, C // r1)), ReLU, Linear(h1, 1).
        r2: association expansion: for index >= 2, Linear(index, r2 * index), ReLU, Linear(r2 * index, 1).
        backend: the backend of this gate's ops (None: the thread's or process's setting).
        device, dtype: of the parameters, as for torch's layers.
    """

    def __init__(self, channels: int, index: int, r1: int = 4, r2: int = 4, backend: Optional[str] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(index, int) or index < 1:
            raise ValueError(f"FAGate: argument 'index' must be an int >= 1 (block 0 is not gated), got {index!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"FAGate: argument 'channels' must be an int >= 1, got {channels!r}")
        for name, r in (("r1", r1), ("r2", r2)):
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"FAGate: argument '{name}' must be an int >= 1, got {r!r}")
        if backend is not None:
            backends.check_name(backend)  # a typo fails here; availability is checked at the first call
        self.channels, self.index, self.backend = channels, index, backend
        h1 = max(1, channels // r1)
        factory = {"device": device, "dtype": dtype}
        self.focus1 = nn.Linear(channels, h1, **factory)
        self.focus2 = nn.Linear(h1, 1, **factory)
        if index >= 2:
            self.assoc1 = nn.Linear(index, r2 * index, **factory)
            self.assoc2 = nn.Linear(r2 * index, 1, **factory)

    def params(self) -> dict[str, torch.Tensor]:
        """The weights under the names reference.fa_weight expects."""
        p = {"w1": self.focus1.weight, "b1": self.focus1.bias, "w2": self.focus2.weight, "b2": self.focus2.bias}
        if self.index >= 2:
            p.update(w3=self.assoc1.weight, b3=self.assoc1.bias, w4=self.assoc2.weight, b4=self.assoc2.bias)
        return p

    def forward(self, x: torch.Tensor, u: Union[torch.Tensor, Residual, NormResidual],
                history: Optional[Sequence[torch.Tensor]] = None, pooled_x: Optional[torch.Tensor] = None,
                projected: Optional[torch.Tensor] = None) -> FAOutput:
        hist = list(history) if history is not None else []
        if len(hist) != self.index - 1:
            raise ValueError(f"FAGate(index={self.index}): argument 'history' must hold k_1 .. k_{self.index - 1} "
                             f"({self.index - 1} tensors), got {len(hist)}")
        if isinstance(u, (Residual, NormResidual, NormSEResidual)) and projected is not None:
            raise ValueError(f"FAGate(index={self.index}): a Residual 'u' and 'projected' exclude each other "
                             "(a residual branch is added to x itself)")
        if isinstance(u, NormSEResidual):
            kind, second, bn = "norm_se_residual", u.z, (batch_norm_args(u.norm), u.se)
        elif isinstance(u, NormResidual):
            kind, second, bn = "norm_residual", u.z, batch_norm_args(u.norm)
        elif isinstance(u, Residual):
            kind, second, bn = "residual", u.branch, None
        else:
            kind, second, bn = ("plain" if projected is None else "projected"), u, None
        # out comes last: torch.fx and create_feature_extractor take a module's last node as its output
        k, pooled, out = _gate(kind, self.index, self.channels, self.backend, x, second, hist, pooled_x, projected,
                               bn, self.params())
        return FAOutput(out, k, [*hist, k], pooled)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, index={self.index}, backend={self.backend}"


@torch.fx.wrap
def _gate(kind: str, index: int, channels: int, backend: Optional[str], x: torch.Tensor, u: torch.Tensor,
          hist: list[torch.Tensor], pooled_x: Optional[torch.Tensor], projected: Optional[torch.Tensor],
          bn: Optional[tuple], w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FAGate's checks and fused ops: (k, pooled, out).  ``kind``: plain, projected, residual (u is the
    branch), norm_residual (u is z, bn the BatchNorm's batch_norm_args) or norm_se_residual (bn: those and
    the SE weights).  One function that torch.fx
    records as one call (torch.fx.wrap), since its checks branch on shapes and dtypes, which FX cannot
    trace."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"FAGate(index={index}): argument 'x' must be (N, {channels}, H, W) "
                         f"(the gate was built for channels={channels}), got {list(x.shape)}")
    if pooled_x is not None and tuple(pooled_x.shape) != (x.shape[0], channels):
        raise ValueError(f"FAGate(index={index}): argument 'pooled_x' must be (N, C) = "
                         f"({x.shape[0]}, {channels}), got {list(pooled_x.shape)}")
    for j, h in enumerate(hist):
        if h.shape != x.shape[:1]:
            raise ValueError(f"FAGate(index={index}): argument 'history' must hold (N,) = "
                             f"({x.shape[0]},) tensors, got {list(h.shape)} at position {j}")
    # A block may return another dtype than its input (under autocast a BatchNorm block returns
    # float32, a conv block bfloat16): promote both, as x + (u - x) * k would.
    if projected is None and u.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, u.dtype)
        x, u = x.to(dt), u.to(dt)
    elif projected is not None and u.dtype != projected.dtype:
        dt = torch.promote_types(projected.dtype, u.dtype)
        projected, u = projected.to(dt), u.to(dt)
    if kind == "plain" and u.shape != x.shape:
        raise ValueError(f"FAGate(index={index}): block {index}'s output 'u' {list(u.shape)} differs "
                         f"from its input 'x' {list(x.shape)}: give the gate 'projected' (FASequential: "
                         "'projections')")
    if pooled_x is None:
        k = ops.focus(x, w["w1"], w["b1"], w["w2"], w["b2"], backend=backend)
    else:
        k = ops.mlp(pooled_x, w["w1"], w["b1"], w["w2"], w["b2"], backend=backend)
    if index >= 2:  # association (reference.associate), as one op
        k = ops.mlp(torch.stack([*hist, k], dim=1), w["w3"], w["b3"], w["w4"], w["b4"], backend=backend)
    if kind == "norm_se_residual":
        weight, bias, mean, var, training, factor, eps = count_batch(bn[0])
        out, pooled = ops.bn_se_residual_gate_pool(x, u, k, weight, bias, *bn[1], mean, var, training, factor, eps,
                                                   backend=backend)
    elif kind == "norm_residual":
        out, pooled = ops.bn_residual_gate_pool(x, u, k, *count_batch(bn), backend=backend)
    elif kind == "residual":
        out, pooled = ops.residual_gate_pool(x, u, k, backend=backend)
    else:
        out, pooled = ops.gate_pool(x if projected is None else projected, u, k, backend=backend)
    return k, pooled, out


def _tracing() -> bool:
    """True while torch.fx or torch.export traces: the k records (module attributes) stay out of the
    graph then.  torch.compile keeps them: Dynamo replays the assignment after the graph."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_exporting()



def out_channels(module: nn.Module) -> int:
    """Output channels of a block, read off its last BatchNorm2d / Conv2d (pass ``channels``
    explicitly where that guess is wrong)."""
    found = None
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            found = m.num_features
        elif isinstance(m, nn.Conv2d):
            found = m.out_channels
    if found is None:
        raise ValueError(f"cannot infer the output channels of {type(module).__name__}: pass 'channels'")
    return found


def _fusable(block: nn.Module) -> bool:
    return isinstance(block, ResidualBlock) and block.shortcut is None and no_hooks(block)


def _seq(blocks) -> list[nn.Module]:
    blocks = list(blocks.children()) if isinstance(blocks, nn.Sequential) else list(blocks)
    if not blocks:
        raise ValueError("argument 'blocks' must hold at least one block")
    return blocks


class FASequential(_NotScriptable, nn.Module):
    """An FA chain over ``blocks`` (SPEC §1): block 0 ungated, block i >= 1 weighted by gate
    ``fa[i-1]``.  Blocks keep their names "0", "1", ... so a state_dict of the plain nn.Sequential
    loads (the new ``fa.*`` keys are then missing).  After a forward, ``last_k`` holds the detached
    (N,) k of blocks 1 .. n-1 (under torch.compile too).  A :class:`ResidualBlock` with an identity
    shortcut runs as its branch, its add and ReLU inside the gate (``Residual``/``NormResidual``).

    Args:
        blocks: an nn.Sequential or a list of modules, run in a row.
        channels: the input width of each gated block: one int for all, one int per gated block, or
            None (read off the block before it, see :func:`out_channels`).
        r1, r2, backend: of the gates (see :class:`FAGate`).
        projections: one entry per block, None where the block keeps the shape of its input, else the
            module P whose output P(x) starts the weighting (VGG).
        gated: False: no gates (a plain chain of the blocks, for a stage gated only at stage level).
        fuse_residual: False: residual blocks run their own forward (for comparisons).
        device, dtype: of the gates' parameters.
    """

    def __init__(self, blocks: Union[nn.Sequential, Sequence[nn.Module]],
                 channels: Union[int, Sequence[int], None] = None, r1: int = 4, r2: int = 4,
                 backend: Optional[str] = None, projections: Optional[Sequence[Optional[nn.Module]]] = None,
                 gated: bool = True, fuse_residual: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.fuse_residual = fuse_residual
        blocks = _seq(blocks)
        for i, b in enumerate(blocks):
            self.add_module(str(i), b)
        self._n = n = len(blocks)
        if isinstance(channels, int) or channels is None:
            chans = [channels if channels is not None else out_channels(blocks[i - 1]) for i in range(1, n)] \
                if gated else []
        else:
            chans = list(channels)
            if len(chans) != n - 1:
                raise ValueError(f"argument 'channels' must hold one int per gated block ({n - 1}), got {len(chans)}")
        self.fa = nn.ModuleList([FAGate(c, i, r1, r2, backend, device, dtype) for i, c in enumerate(chans, 1)]
                                if gated else [])
        if projections is not None:
            if len(projections) != n:
                raise ValueError(f"argument 'projections' must hold one entry per block ({n}), got {len(projections)}")
            self.projections = nn.ModuleDict({str(i): p for i, p in enumerate(projections) if p is not None})
        self.last_k: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, idx: Union[int, slice]) -> Union[nn.Module, list[nn.Module]]:
        """Block ``idx`` (a slice gives a list of blocks)."""
        blocks = [self._modules[str(i)] for i in range(self._n)]
        return blocks[idx]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self[:])

    def run_chain(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        hist: list[torch.Tensor] = []
        pooled = None
        projections = self._modules.get("projections")
        for i in range(1, self._n):
            block = self[i]
            if not len(self.fa):
                x = block(x)
                continue
            if projections is None or str(i) not in projections:
                if self.fuse_residual and _fusable(block):
                    tail = foldable_tail(block)
                    if tail is None:
                        u = Residual(block.branch(x))
                    elif tail.se is None:
                        u = NormResidual(block.pre_norm(x), tail.norm)
                    else:
                        u = NormSEResidual(block.pre_norm(x), tail.norm, tail.se)
                    x, _, hist, pooled = self.fa[i - 1](x, u, hist, pooled_x=pooled)
                    continue
                xp = None
            else:
                xp = projections[str(i)](x)
            x, _, hist, pooled = self.fa[i - 1](x, block(x), hist, pooled_x=pooled, projected=xp)
        if not _tracing():  # under torch.compile too: Dynamo replays the assignment
            self.last_k = [k.detach() for k in hist]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_chain(x)


_SHORTCUT_NAMES = ("downsample", "shortcut", "projection", "proj")

# Block 0's shortcut output P(X_s), from FAStage's forward hook to the forward that runs it: a table
# per thread and per call (stage -> tensor), never an attribute of the module, so that one model
# can run in several threads at once.
_in_flight = threading.local()


def _find_shortcut(block: nn.Module) -> str:
    for name in _SHORTCUT_NAMES:
        m = getattr(block, name, None)
        if isinstance(m, nn.Module) and any(True for _ in m.parameters()):
            return name
    raise ValueError(f"{type(block).__name__} has no projection shortcut (looked for {', '.join(_SHORTCUT_NAMES)}); "
                     "pass 'projection' explicitly")


class FAStage(FASequential):
    """One stage of a multi-stage FA network (SPEC §2): an FA chain plus, for ``index`` >= 1, the
    stage-level gate X_{s+1} = P(X_s) + (U_s - P(X_s)) k_s.  A stage takes and returns a tensor, as
    the stage it replaces, so it can replace ``layer1 .. layerN`` of a model whose forward calls them
    in a row (forward hooks, torchvision's IntermediateLayerGetter and timm's forward_intermediates
    see tensors).  The stage-level history [k_1 .. k_s] travels on the output tensor itself (an
    attribute the next stage reads, see ``_with_history``): nothing of a call stays on the module or
    in a global, so threads do not mix, and a chain cut short (layer1 .. layer3 only) leaves nothing
    behind.  When P is block 0's own shortcut, the output block 0 computes is kept (a forward hook on
    the shortcut writes it to a per-thread, per-call table) instead of running P a second time,
    which would also update its BatchNorm statistics twice.

    Args:
        blocks: the stage's blocks (an nn.Sequential or a list).
        index: the stage's position s (0: not gated at stage level).
        channels: of the chain's gates, as FASequential's ``channels``.
        stage_channels: the stage output's width (None: read off the last block).
        projection: P for index >= 1: "auto" (block 0's shortcut, found by attribute name), a
            submodule path, or a module of its own.
        pre: instead of a projection, a module run on the stage input whose output feeds the chain
            and is P(X_s) (Inception's reduction block).
        last: the last stage returns its output without the history attribute.
        gated: False: the chain's blocks are not gated (stage level only).
        r1, r2, backend, projections, fuse_residual, device, dtype: as for FASequential.
    """

    def __init__(self, blocks: Union[nn.Sequential, Sequence[nn.Module]], index: int,
                 channels: Union[int, Sequence[int], None] = None, stage_channels: Optional[int] = None,
                 projection: Union[str, nn.Module, None] = "auto", pre: Optional[nn.Module] = None,
                 last: bool = False, gated: bool = True, r1: int = 4, r2: int = 4, backend: Optional[str] = None,
                 projections: Optional[Sequence[Optional[nn.Module]]] = None, fuse_residual: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(blocks, channels, r1, r2, backend, projections, gated=gated, fuse_residual=fuse_residual,
                         device=device, dtype=dtype)
        self.index, self.last = index, last
        self._projection_path: Optional[str] = None
        if pre is not None:
            self.pre = pre
        if index >= 1:
            if pre is None:
                if projection == "auto":
                    self._projection_path = "0." + _find_shortcut(self[0])
                elif isinstance(projection, str):
                    self._projection_path = projection
                elif isinstance(projection, nn.Module):
                    self.projection = projection
                else:
                    raise ValueError("FAStage: stage index >= 1 needs 'projection' or 'pre'")
            c = stage_channels if stage_channels is not None else out_channels(self[self._n - 1])
            self.stage_fa = FAGate(c, index, r1, r2, backend, device, dtype)
            if self._projection_path is not None:
                self.get_submodule(self._projection_path).register_forward_hook(self._keep_projection)
        self.last_stage_k: Optional[torch.Tensor] = None

    def _keep_projection(self, module: nn.Module, args, output: torch.Tensor) -> None:
        kept = getattr(_in_flight, "kept", None)
        if kept is not None:  # else the shortcut ran outside this stage's forward
            kept[self] = output

    def _project(self, x: torch.Tensor, kept: Optional[torch.Tensor]) -> torch.Tensor:
        if self._projection_path is None:
            return self.projection(x)
        return kept if kept is not None else self.get_submodule(self._projection_path)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hist = _history_of(x, self.index) if self.index >= 2 else []
        if "pre" in self._modules:
            x = self.pre(x)
        if self.index == 0:
            out = self.run_chain(x)
        else:
            previous = getattr(_in_flight, "kept", None)
            _in_flight.kept = kept = {}
            try:
                u = self.run_chain(x)  # block 0 runs the shortcut P on x: _keep_projection keeps it
            finally:
                _in_flight.kept = previous
            xp = x if "pre" in self._modules else self._project(x, kept.get(self))
            r = self.stage_fa(xp, u, hist)
            out, hist = r.out, r.history
            if not _tracing():
                self.last_stage_k = r.k.detach()
        return out if self.last else _with_history(out, hist)


# The stage-level history [k_1 .. k_s] of stage s's output, kept as an attribute of that tensor: the
# next stage reads it from its input.  It lives exactly as long as the tensor, belongs to one call
# (so to one thread), and under torch.fx / torch.export / torch.compile the tracer sees the
# attribute on its proxy or fake tensor, so the traced graph wires k_s from gate to gate.
_HISTORY = "_fanet_stage_history"


def _with_history(out: torch.Tensor, hist: list[torch.Tensor]) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Dynamo traces an attribute store only on a tensor it saw made by a one-output op (not on
        # one item of a fused op's tuple); a view is such a tensor.  Written as a plain store, as
        # Dynamo does not trace setattr() on a tensor.
        out = out.view_as(out)
    out._fanet_stage_history = hist
    return out


def _history_of(x: torch.Tensor, index: int) -> list[torch.Tensor]:
    # a torch.fx Proxy answers any attribute it lacks with a new Proxy: look in its own __dict__
    hist = vars(x).get(_HISTORY) if isinstance(x, torch.fx.Proxy) else getattr(x, _HISTORY, None)
    if hist is None:
        raise ValueError(f"FAStage(index={index}): its input carries no stage-level attention history: give it "
                         f"the output of stage {index - 1} itself (call the stages in a row, as ResNet.forward "
                         "does, or use FAStages)")
    return hist


class FAStages(_NotScriptable, nn.Module):
    """The stage level over ``stages`` (SPEC §2): every stage an :class:`FAStage`, stage 0 ungated.
    Stages are children "0", "1", ... holding their blocks as "s.i", so the keys of a plain
    nn.Sequential of stages load.

    Args:
        stages: each an nn.Sequential (or list) of blocks, or an FAStage (kept as it is).
        channels: per stage, its width (an int: of its blocks and output) or its chain's ``channels``
            (a list), or None (read off the blocks).
        projections: per stage s >= 1, its P: "auto" or None (the shortcut of its first block), a
            submodule path, or a module.
        pre: per stage, a module run on its input instead of a projection (see FAStage), or None.
        gated, r1, r2, backend, fuse_residual, device, dtype: as for FAStage.
    """

    def __init__(self, stages: Union[nn.Sequential, Sequence[nn.Module]],
                 channels: Optional[Sequence[Union[int, Sequence[int], None]]] = None,
                 projections: Optional[Sequence[Union[str, nn.Module, None]]] = None,
                 pre: Optional[Sequence[Optional[nn.Module]]] = None, gated: bool = True,
                 r1: int = 4, r2: int = 4, backend: Optional[str] = None, fuse_residual: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        stages = list(stages.children()) if isinstance(stages, nn.Sequential) else list(stages)
        n = len(stages)
        for s, st in enumerate(stages):
            self.add_module(str(s), st if isinstance(st, FAStage) else FAStage(
                st, s, channels=None if channels is None else channels[s],
                stage_channels=channels[s] if channels is not None and isinstance(channels[s], int) else None,
                projection="auto" if projections is None or projections[s] is None else projections[s],
                pre=None if pre is None else pre[s], last=s == n - 1, gated=gated, r1=r1, r2=r2, backend=backend,
                fuse_residual=fuse_residual, device=device, dtype=dtype))
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, idx: Union[int, slice]) -> Union[nn.Module, list[nn.Module]]:
        """Stage ``idx`` (a slice gives a list of stages)."""
        return [self._modules[str(s)] for s in range(self._n)][idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(self._n):
            x = self._modules[str(s)](x)
        return x


def collect_k(model: nn.Module) -> dict[str, torch.Tensor]:
    """The k values of the last forward of every FA chain in ``model``, by module name, each
    (N, n_gated) (column j = block j + 1); the stage-level k of a group of FAStage siblings under
    ``"<parent>.stages"`` (``"stages"`` at the root), column s-1 = stage s."""
    out: dict[str, torch.Tensor] = {}
    stage_k: dict[str, list[torch.Tensor]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FASequential) and m.last_k:
            out[name or "chain"] = torch.stack(m.last_k, dim=1)
        if isinstance(m, FAStage) and m.last_stage_k is not None:
            parent = name.rpartition(".")[0]
            stage_k.setdefault(parent + ".stages" if parent else "stages", []).append(m.last_stage_k)
    for key, ks in stage_k.items():
        out[key] = torch.stack(ks, dim=1)
    return out
