"""Blocks whose branch ends BatchNorm -> SE run their tail as one fused op: in FA chains
(ops.bn_se_residual_gate_pool) and on their own (ops.bn_se_residual), the zoo's, timm's and
torchvision's blocks (fuse_tails, apply_fa), with the same results as the eager tail."""
import copy

import pytest
import torch
import torch.nn as nn

import fanet_kernels as fk
from fanet_kernels import ops, zoo
from fanet_kernels.modules import SEBlock, foldable_tail

CPU_FUSED = "cpu" if "cpu" in fk.available_backends("cpu") else "reference"


def _count_calls(monkeypatch) -> dict[str, int]:
    calls = {"bn_se_residual": 0, "bn_se_residual_gate_pool": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(ops, name, counted)
    return calls


def _step(model: nn.Module, x: torch.Tensor):
    out = model(x)
    out.square().mean().backward()
    return out, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


def _assert_same_step(fused: nn.Module, eager: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> None:
    """Outputs, gradients and buffers of one step alike to float32 rounding: the fused tail and the eager
    one round differently (both are ~2e-5 from float64 on a ResNet-18's logits of ~1)."""
    out_f, grads_f, bufs_f = _step(fused, x)
    out_e, grads_e, bufs_e = _step(eager, x)
    torch.testing.assert_close(out_f, out_e, rtol=rtol, atol=1e-4)
    for gf, ge in zip(grads_f, grads_e):
        if ge is not None:
            torch.testing.assert_close(gf, ge, rtol=rtol, atol=1e-5 * max(1.0, ge.abs().max().item()))
    for bf, be in zip(bufs_f, bufs_e):
        torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, calls", [("se_resnet20", {"bn_se_residual": 9, "bn_se_residual_gate_pool": 0}),
                                         ("fa_se_resnet20", {"bn_se_residual": 3, "bn_se_residual_gate_pool": 6})])
def test_zoo_se_models_fold_the_tail(monkeypatch, name, calls):
    torch.manual_seed(0)
    fused = zoo.create_model(name, backend=CPU_FUSED if name.startswith("fa") else None)
    eager = zoo.create_model(name, fuse=False)
    eager.load_state_dict(fused.state_dict())
    counted = _count_calls(monkeypatch)
    with fk.use_backend(CPU_FUSED):
        _assert_same_step(fused.train(), eager.train(), torch.randn(4, 3, 16, 16))
    # the FA chains fold every gated block (two per stage of 3), block 0 of each stage runs its own tail
    assert counted == calls


def test_eager_tail_is_used_where_the_se_block_has_hooks(monkeypatch):
    model = zoo.create_model("se_resnet20")
    block = model.layers[0][1]
    block.se.register_forward_hook(lambda m, i, o: None)
    assert foldable_tail(block) is None
    counted = _count_calls(monkeypatch)
    model(torch.randn(2, 3, 8, 8))
    assert counted["bn_se_residual"] == 8


def test_a_subclassed_se_block_is_not_folded():
    class MySE(SEBlock):
        def forward(self, x):
            return super().forward(x) * 2

    block = zoo.create_model("se_resnet20").layers[0][0]
    block.se = MySE(16, 4)
    assert foldable_tail(block) is None


def test_timm_se_resnets_convert_with_their_weights():
    timm = pytest.importorskip("timm")
    expected = {"seresnet18": 8, "seresnext26d_32x4d": 8, "ecaresnet26t": 0, "resnet18": 0}
    for name, n_fused in expected.items():
        torch.manual_seed(0)
        eager = timm.create_model(name, num_classes=5).train()
        fused = copy.deepcopy(eager)
        names = fk.fuse_tails(fused)
        assert len(names) == n_fused, name
        assert list(fused.state_dict()) == list(eager.state_dict())
        assert isinstance(fused.layer1[0], type(eager.layer1[0]))  # still timm's class
        with fk.use_backend(CPU_FUSED):
            _assert_same_step(fused, eager, torch.randn(2, 3, 32, 32))


def test_timm_block_with_drop_path_is_left_alone():
    timm = pytest.importorskip("timm")
    model = timm.create_model("seresnet18", drop_path_rate=0.1)
    assert fk.fuse_tails(model) == ["layer1.0"] or fk.fuse_tails(model) == []  # the first block has rate 0
    assert not isinstance(model.layer4[1], fk.ResidualBlock)


def test_apply_fa_se_folds_the_se_tail_into_the_gate(monkeypatch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    fused = fk.apply_fa(tv.models.resnet18(num_classes=5), se=True, backend=CPU_FUSED)
    eager = copy.deepcopy(fused)
    for m in eager.modules():
        if isinstance(m, fk.ResidualBlock):
            m.fuse_tail = False
        if isinstance(m, fk.FASequential):
            m.fuse_residual = False
    counted = _count_calls(monkeypatch)
    with fk.use_backend(CPU_FUSED):
        # 64x64: layer4 at 2x2, so its BatchNorms see 16 values per channel (at 32x32 and batch 2, 2 values: so
        # ill-conditioned that
        # float32 rounding alone moves conv1's gradient by 10 %)
        _assert_same_step(fused.train(), eager.train(), torch.randn(4, 3, 64, 64))
    assert counted == {"bn_se_residual": 4, "bn_se_residual_gate_pool": 4}


def test_fused_se_models_trace_and_compile():
    model = zoo.create_model("se_resnet20").eval()
    x = torch.randn(2, 3, 8, 8)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_fused_se_models_export_without_warning():
    import warnings
    model = zoo.create_model("se_resnet20").eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
