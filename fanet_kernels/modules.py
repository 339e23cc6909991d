"""Drop-in FA modules (SPEC §1, §2): FAGate, FASequential (a chain), FAStage/FAStages (the stage
level) and SEBlock.  The math is reference.fa_weight / fa_chain / fa_stages; here the pooling
and the weighting run through the fused ops of the active backend (fanet_kernels.ops).
"""
from __future__ import annotations

import threading
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, ops

__all__ = ["FAOutput", "FAGate", "FASequential", "FAStage", "FAStages", "ResidualBlock", "SEBlock",
           "collect_k", "out_channels"]


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


class FAGate(_NotScriptable, nn.Module):
    """Focus + association + weighting of the block at position ``index`` >= 1 of a chain.

    ``forward(x, u, history=None, pooled_x=None, x_proj=None, residual=False)``: x = X_i (block
    input), u = U_i (block output), history = [k_1 .. k_{i-1}].  If ``pooled_x`` (the ``pooled``
    of the previous gate, i.e. the channel means of x) is given, x is not read again; else the
    fused focus op pools it.  ``x_proj`` = P(x) is the start of the weighting when x and u differ
    in shape (focus stays on x).  ``residual=True``: u is the residual branch B of a block whose
    output is relu(B + x); the add and the ReLU then run inside the gate (ops.residual_gate_pool).
    ``norm`` (with residual): u is the branch before its last BatchNorm ``norm``, which then runs
    inside the gate too (ops.bn_residual_gate_pool), running stats and all.  An x and a u of
    different dtypes (a block's output under autocast) are promoted as x + (u - x) * k would be.
    Parameters: focus1 Linear(C, max(1, C // r1)), focus2 Linear(h1, 1) and, for index >= 2,
    assoc1 Linear(index, r2 * index), assoc2 Linear(r2 * index, 1).
    """

    def __init__(self, channels: int, index: int, r1: int = 4, r2: int = 4, backend: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(index, int) or index < 1:
            raise ValueError(f"FAGate: argument 'index' must be an int >= 1 (block 0 is not gated), got {index!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"FAGate: argument 'channels' must be an int >= 1, got {channels!r}")
        for name, r in (("r1", r1), ("r2", r2)):
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"FAGate: argument '{name}' must be an int >= 1, got {r!r}")
        if backend is not None:
            backends._check_name(backend)  # a typo fails here; availability is checked at the first call
        self.channels, self.index, self.backend = channels, index, backend
        h1 = max(1, channels // r1)
        self.focus1 = nn.Linear(channels, h1)
        self.focus2 = nn.Linear(h1, 1)
        if index >= 2:
            self.assoc1 = nn.Linear(index, r2 * index)
            self.assoc2 = nn.Linear(r2 * index, 1)

    def params(self) -> dict[str, torch.Tensor]:
        """The weights under the names reference.fa_weight expects."""
        p = {"w1": self.focus1.weight, "b1": self.focus1.bias, "w2": self.focus2.weight, "b2": self.focus2.bias}
        if self.index >= 2:
            p.update(w3=self.assoc1.weight, b3=self.assoc1.bias, w4=self.assoc2.weight, b4=self.assoc2.bias)
        return p

    def forward(self, x: torch.Tensor, u: torch.Tensor, history: Optional[Sequence[torch.Tensor]] = None,
                pooled_x: Optional[torch.Tensor] = None, x_proj: Optional[torch.Tensor] = None,
                residual: bool = False, norm: Optional[nn.BatchNorm2d] = None) -> FAOutput:
        hist = list(history) if history is not None else []
        if residual and x_proj is not None:
            raise ValueError(f"FAGate(index={self.index}): arguments 'residual' and 'x_proj' exclude each other "
                             "(a residual branch is added to x itself)")
        if len(hist) != self.index - 1:
            raise ValueError(f"FAGate(index={self.index}): argument 'history' must hold k_1 .. k_{self.index - 1} "
                             f"({self.index - 1} tensors), got {len(hist)}")
        if norm is not None and not residual:
            raise ValueError(f"FAGate(index={self.index}): argument 'norm' needs residual=True")
        # out comes last: torch.fx and create_feature_extractor take a module's last node as its output
        k, pooled, out = _gate(self.index, self.channels, self.backend, x, u, hist, pooled_x, x_proj, residual,
                               None if norm is None else batch_norm_args(norm), self.params())
        return FAOutput(out, k, [*hist, k], pooled)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, index={self.index}, backend={self.backend}"


@torch.fx.wrap
def _gate(index: int, channels: int, backend: Optional[str], x: torch.Tensor, u: torch.Tensor,
          hist: list[torch.Tensor], pooled_x: Optional[torch.Tensor], x_proj: Optional[torch.Tensor], residual: bool,
          bn: Optional[tuple], w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FAGate's checks and fused ops: (k, pooled, out).  One function that torch.fx records as one call
    (torch.fx.wrap), since its checks branch on shapes and dtypes, which FX cannot trace."""
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
    if x_proj is None and u.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, u.dtype)
        x, u = x.to(dt), u.to(dt)
    elif x_proj is not None and u.dtype != x_proj.dtype:
        dt = torch.promote_types(x_proj.dtype, u.dtype)
        x_proj, u = x_proj.to(dt), u.to(dt)
    if x_proj is None and not residual and u.shape != x.shape:
        raise ValueError(f"FAGate(index={index}): block {index}'s output 'u' {list(u.shape)} differs "
                         f"from its input 'x' {list(x.shape)}: give the gate 'x_proj' (FASequential: "
                         "'projections')")
    if pooled_x is None:
        k = ops.focus(x, w["w1"], w["b1"], w["w2"], w["b2"], backend=backend)
    else:
        k = ops.mlp(pooled_x, w["w1"], w["b1"], w["w2"], w["b2"], backend=backend)
    if index >= 2:  # association (reference.associate), as one op
        k = ops.mlp(torch.stack([*hist, k], dim=1), w["w3"], w["b3"], w["w4"], w["b4"], backend=backend)
    if bn is not None:
        out, pooled = ops.bn_residual_gate_pool(x, u, k, *_count_batch(bn), backend=backend)
    elif residual:
        out, pooled = ops.residual_gate_pool(x, u, k, backend=backend)
    else:
        out, pooled = ops.gate_pool(x if x_proj is None else x_proj, u, k, backend=backend)
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


class ResidualBlock(nn.Module):
    """A residual block ``relu(branch(x) + shortcut(x))`` (``shortcut`` None: the identity) whose
    add and ReLU an FA chain folds into its gate when the shortcut is the identity: the chain
    calls ``branch`` and ``ops.residual_gate_pool`` instead of ``forward``, which saves a pass over
    memory each way.  Subclasses define ``branch`` and set ``self.shortcut``.  A block with forward
    hooks is run through ``forward`` so that its hooks see its output.

    A branch that ends in a BatchNorm2d, ``branch(x) == branch_norm()(pre_norm(x))``, can say so by
    defining both: the chain then calls ``pre_norm`` and ``ops.bn_residual_gate_pool``, which runs
    that BatchNorm inside the gate as well (a plain affine nn.BatchNorm2d without hooks only)."""

    shortcut: Optional[nn.Module]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def branch_norm(self) -> Optional[nn.BatchNorm2d]:
        """The BatchNorm2d that ends the branch, or None (the default: the branch does not say)."""
        return None

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The branch up to, not including, ``branch_norm()``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + (x if self.shortcut is None else self.shortcut(x)))


def _fusable(block: nn.Module) -> bool:
    return (isinstance(block, ResidualBlock) and block.shortcut is None
            and not (block._forward_hooks or block._forward_pre_hooks))


def _foldable_norm(block: ResidualBlock) -> Optional[nn.BatchNorm2d]:
    """The block's last BatchNorm if the gate can run it: exactly nn.BatchNorm2d (no subclass that
    changes forward), affine, no hooks."""
    bn = block.branch_norm()
    if type(bn) is nn.BatchNorm2d and bn.affine and not (bn._forward_hooks or bn._forward_pre_hooks):
        return bn
    return None


def batch_norm_args(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    """(weight, bias, running_mean, running_var, training, momentum, eps, counter): what ``bn.forward``
    passes to F.batch_norm, with ``counter`` = the ``num_batches_tracked`` that this call counts
    (None if none), which ``_count_batch`` advances when the call runs (torch/nn/modules/batchnorm.py)."""
    counted = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None, training,
            bn.momentum, bn.eps, bn.num_batches_tracked if counted else None)


def _count_batch(bn: tuple) -> tuple:
    """batch_norm_args' tuple as F.batch_norm's arguments (..., training, factor, eps), counting the
    batch.  Run inside ``_gate``, so that a torch.fx graph keeps the count with the op."""
    weight, bias, mean, var, training, momentum, eps, counter = bn
    factor = 0.0 if momentum is None else momentum
    if counter is not None:
        counter.add_(1)
        factor = 1.0 / float(counter) if momentum is None else momentum
    return weight, bias, mean, var, training, factor, eps


def _seq(blocks) -> list[nn.Module]:
    blocks = list(blocks.children()) if isinstance(blocks, nn.Sequential) else list(blocks)
    if not blocks:
        raise ValueError("argument 'blocks' must hold at least one block")
    return blocks


class FASequential(_NotScriptable, nn.Module):
    """An FA chain over ``blocks`` (an nn.Sequential or a list): block 0 ungated, block i >= 1
    weighted by gate ``fa[i-1]``.  Blocks keep their names "0", "1", ... so a state_dict of the
    plain nn.Sequential loads (the new ``fa.*`` keys are then missing).  ``channels``: int, one
    int per gated block, or None (read off block i-1).  ``projections``: optional list (one per
    block, None where shapes match) of modules P used as ``x_proj`` (VGG).  After a forward,
    ``last_k`` holds the detached (N,) k of blocks 1 .. n-1 (under torch.compile too).
    """

    def __init__(self, blocks: Union[nn.Sequential, Sequence[nn.Module]],
                 channels: Union[int, Sequence[int], None] = None, r1: int = 4, r2: int = 4,
                 backend: Optional[str] = None, projections: Optional[Sequence[Optional[nn.Module]]] = None,
                 gated: bool = True, fuse_residual: bool = True) -> None:
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
        self.fa = nn.ModuleList([FAGate(c, i, r1, r2, backend) for i, c in enumerate(chans, 1)] if gated else [])
        if projections is not None:
            if len(projections) != n:
                raise ValueError(f"argument 'projections' must hold one entry per block ({n}), got {len(projections)}")
            self.proj = nn.ModuleDict({str(i): p for i, p in enumerate(projections) if p is not None})
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
        proj = self._modules.get("proj")
        for i in range(1, self._n):
            block = self[i]
            if not len(self.fa):
                x = block(x)
                continue
            if proj is None or str(i) not in proj:
                if self.fuse_residual and _fusable(block):
                    norm = _foldable_norm(block)
                    u = block.branch(x) if norm is None else block.pre_norm(x)
                    x, _, hist, pooled = self.fa[i - 1](x, u, hist, pooled_x=pooled, residual=True, norm=norm)
                    continue
                xp = None
            else:
                xp = proj[str(i)](x)
            x, _, hist, pooled = self.fa[i - 1](x, block(x), hist, pooled_x=pooled, x_proj=xp)
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
                     "pass 'proj' explicitly")


class FAStage(FASequential):
    """One stage of a multi-stage FA network (SPEC §2): an FA chain (``chain=False``: plain blocks)
    plus, for ``index`` >= 1, the stage-level gate.  A stage takes and returns a tensor, as the
    stage it replaces, so it can replace ``layer1 .. layerN`` of a model whose forward calls them in a
    row (forward hooks, torchvision's IntermediateLayerGetter and timm's forward_intermediates see
    tensors).  The stage-level history [k_1 .. k_s] travels on the output tensor itself (an attribute
    the next stage reads, see ``_with_history``): nothing of a call stays on the module or in a global,
    so threads do not mix, and a chain cut short (layer1 .. layer3 only) leaves nothing behind.  The
    stage with ``last=True`` returns its output without it.  P: ``pre`` (a module run on the stage input, whose
    output feeds the chain, e.g. Inception's reduction block) or ``proj`` (default: the shortcut of
    block 0, found by attribute name; a string is a submodule path) applied to the stage input.
    """

    def __init__(self, blocks: Union[nn.Sequential, Sequence[nn.Module]], index: int,
                 channels: Union[int, Sequence[int], None] = None, stage_channels: Optional[int] = None,
                 proj: Union[str, nn.Module, None] = "auto", pre: Optional[nn.Module] = None, last: bool = False,
                 chain: bool = True, r1: int = 4, r2: int = 4, backend: Optional[str] = None,
                 projections: Optional[Sequence[Optional[nn.Module]]] = None, fuse_residual: bool = True) -> None:
        super().__init__(blocks, channels, r1, r2, backend, projections, gated=chain, fuse_residual=fuse_residual)
        self.index, self.last = index, last
        self._proj_path: Optional[str] = None
        if pre is not None:
            self.pre = pre
        if index >= 1:
            if pre is None:
                if proj == "auto":
                    self._proj_path = "0." + _find_shortcut(self[0])
                elif isinstance(proj, str):
                    self._proj_path = proj
                elif isinstance(proj, nn.Module):
                    self.stage_proj = proj
                else:
                    raise ValueError("FAStage: stage index >= 1 needs 'proj' or 'pre'")
            c = stage_channels if stage_channels is not None else out_channels(self[self._n - 1])
            self.stage_fa = FAGate(c, index, r1, r2, backend)
            if self._proj_path is not None:
                # Block 0 computes P(X_s) as its shortcut anyway: keep that output instead of
                # running P twice (twice would also update its BN statistics twice).
                self.get_submodule(self._proj_path).register_forward_hook(self._keep_projection)
        self.last_stage_k: Optional[torch.Tensor] = None

    def _keep_projection(self, module: nn.Module, args, output: torch.Tensor) -> None:
        kept = getattr(_in_flight, "kept", None)
        if kept is not None:  # else the shortcut ran outside this stage's forward
            kept[self] = output

    def _project(self, x: torch.Tensor, kept: Optional[torch.Tensor]) -> torch.Tensor:
        if self._proj_path is None:
            return self.stage_proj(x)
        return kept if kept is not None else self.get_submodule(self._proj_path)(x)

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
    """The stage level over ``stages`` (each an nn.Sequential of blocks): every stage an FA chain
    (``chain=True``), stage 0 ungated, stage s >= 1 gated with P = ``projections[s]`` (default
    "auto": the shortcut of its first block) or run on ``pre[s]`` (x).  ``channels[s]`` (an int:
    the width of the stage's blocks and output; None: read off the blocks) sizes its gates.  Stages are children "0",
    "1", ... holding their blocks as "s.i", so the keys of a plain nn.Sequential of stages load.
    """

    def __init__(self, stages: Union[nn.Sequential, Sequence[nn.Module]],
                 channels: Optional[Sequence[Union[int, Sequence[int], None]]] = None,
                 projections: Optional[Sequence[Union[str, nn.Module, None]]] = None,
                 pre: Optional[Sequence[Optional[nn.Module]]] = None, chain: bool = True,
                 r1: int = 4, r2: int = 4, backend: Optional[str] = None, fuse_residual: bool = True) -> None:
        super().__init__()
        stages = list(stages.children()) if isinstance(stages, nn.Sequential) else list(stages)
        n = len(stages)
        for s, st in enumerate(stages):
            self.add_module(str(s), st if isinstance(st, FAStage) else FAStage(
                st, s, channels=None if channels is None else channels[s],
                stage_channels=channels[s] if channels is not None and isinstance(channels[s], int) else None,
                proj="auto" if projections is None or projections[s] is None else projections[s],
                pre=None if pre is None else pre[s], last=s == n - 1, chain=chain, r1=r1, r2=r2, backend=backend,
                fuse_residual=fuse_residual))
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


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al.): GAP -> Linear(C, C // r) -> ReLU -> Linear -> sigmoid ->
    channel scale; both Linear layers with bias."""

    def __init__(self, channels: int, r: int = 16) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("r", r)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SEBlock: argument '{name}' must be an int >= 1, got {v!r}")
        hidden = max(1, channels // r)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * s[:, :, None, None].to(x.dtype)


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
