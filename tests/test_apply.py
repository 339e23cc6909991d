"""apply_fa on torchvision (and timm, if installed) ResNet-family models."""
import copy
import subprocess
import sys

import pytest
import torch
import torchvision

from fanet_kernels import apply_fa, collect_k
from fanet_kernels.apply import added_parameters


def _apply_and_load(model, **kw):
    original = copy.deepcopy(model.state_dict())
    n_before = sum(p.numel() for p in model.parameters())
    apply_fa(model, **kw)
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == []
    new = [k for k in model.state_dict() if k not in original]
    assert sorted(result.missing_keys) == sorted(new)
    assert all(".fa." in k or ".stage_fa." in k or ".se." in k for k in new)
    for k, v in original.items():  # the pretrained weights are in place
        assert torch.equal(model.state_dict()[k], v), k
    added = sum(p.numel() for p in model.parameters()) - n_before
    assert added == added_parameters(model) > 0
    return added


def _train_step(model, size=64):
    x = torch.randn(2, 3, size, size, requires_grad=True)
    y = model(x)
    y.square().mean().backward()
    assert y.shape == (2, 1000) and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".fa." in n or "stage_fa" in n)


def test_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    added = _apply_and_load(model)
    print(f"\napply_fa(resnet18): +{added:,} parameters ({added / 11_689_512:.2%})")
    _train_step(model)
    ks = collect_k(model)
    assert ks["layer1"].shape == (2, 1) and ks["stages"].shape == (2, 3)


def test_resnext50_with_se():
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d()
    added = _apply_and_load(model, se=True)
    print(f"\napply_fa(resnext50_32x4d, se=True): +{added:,} parameters")
    _train_step(model, size=32)
    assert collect_k(model)["layer3"].shape == (2, 5)


def test_wide_resnet_keys_only():
    with torch.device("meta"):
        model = torchvision.models.wide_resnet50_2()
        original = set(model.state_dict())
        apply_fa(model)
    assert original <= set(model.state_dict())


def test_compile_fullgraph():
    torch.manual_seed(0)
    model = apply_fa(torchvision.models.resnet18())
    x = torch.randn(2, 3, 32, 32)
    # aot_eager: dynamo with fullgraph=True (no graph break) and AOT autograd through the fake
    # kernels, without the minute of inductor codegen on this CPU
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    k_compiled = collect_k(model)  # the chains and stages record their k under torch.compile too
    torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-4)
    assert model.layer2.stage_fa.focus1.weight.grad is not None
    k_eager = collect_k(model)
    assert k_compiled.keys() == k_eager.keys() and len(k_eager) == 5  # layer1..4 chains, the stages
    for name, k in k_eager.items():
        torch.testing.assert_close(k_compiled[name], k, atol=1e-5, rtol=1e-5)


def test_compile_before_any_eager_call(tmp_path):
    # A fresh process, so no backend has been loaded yet when Dynamo traces the first call.
    script = tmp_path / "compile_first.py"
    script.write_text(
        "import torch, torchvision, fanet_kernels as fk\n"
        "model = fk.apply_fa(torchvision.models.resnet18())\n"
        "y = torch.compile(model, fullgraph=True, backend='aot_eager')(torch.randn(2, 3, 32, 32))\n"
        "assert y.shape == (2, 1000) and len(fk.collect_k(model)) == 5\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_projection_reused_not_recomputed():
    model = apply_fa(torchvision.models.resnet18())
    calls = []
    model.layer2[0].downsample.register_forward_hook(lambda m, i, o: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_not_a_resnet():
    with pytest.raises(TypeError, match="ResNet"):
        apply_fa(torchvision.models.vgg11())


def test_timm_resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=10)
    added = _apply_and_load(model, se=True)
    print(f"\napply_fa(timm resnet18, se=True): +{added:,} parameters")
    y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert y.shape == (2, 10)


def test_torchvision_blocks_fuse_add_and_relu():
    """torchvision's blocks become ResidualBlocks of themselves: same keys and results, the FA
    chains run residual_gate_pool, and a pickled model loads back."""
    import io

    from fanet_kernels.modules import FASequential, ResidualBlock

    torch.manual_seed(1)
    model = apply_fa(torchvision.models.resnet18()).eval()
    block = model.layer2[1]
    assert isinstance(block, ResidualBlock) and isinstance(block, torchvision.models.resnet.BasicBlock)
    x = torch.randn(2, 3, 64, 64)
    fused = model(x)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, FASequential):
            m.fuse_residual = False
    torch.testing.assert_close(fused, plain(x), atol=1e-5, rtol=1e-5)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), fused)
    bottleneck = apply_fa(torchvision.models.resnet50()).layer1[1]
    assert type(bottleneck).__name__ == "TorchvisionBottleneck" and bottleneck.shortcut is None
