"""FA models where PyTorch users put models: forward hooks and feature extraction (every stage
returns a tensor), torchvision's IntermediateLayerGetter and segmentation backbones, timm's
forward_intermediates, torch.export without warnings, torch.fx and create_feature_extractor, and
torch.jit.script's refusal; each against eager outputs, and from two threads at once."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

import fanet_kernels as fk
from fanet_kernels import zoo
from fanet_kernels.modules import FAStage

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _tv_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return fk.apply_fa(torchvision.models.resnet18()).eval()


def _zoo_resnet20() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create_model("fa_resnet20").eval()


def _hooked(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The model's output and what forward hooks on ``names`` see."""
    seen = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in names]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, seen


def _no_call_state(model: torch.nn.Module) -> None:
    """Nothing of a call stays on a stage (the history rides on the output tensors only)."""
    for m in model.modules():
        if isinstance(m, FAStage):
            assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vars(m).values())


def test_stages_return_tensors_to_hooks():
    model = _tv_resnet18()
    x = torch.randn(2, 3, 32, 32)
    y, seen = _hooked(model, STAGES, x)
    assert all(type(seen[n]) is torch.Tensor for n in STAGES)
    assert [seen[n].shape[1] for n in STAGES] == [64, 128, 256, 512]
    assert not hasattr(seen["layer4"], "_fanet_stage_history")  # the last stage hands nothing on
    torch.testing.assert_close(model.fc(torch.flatten(model.avgpool(seen["layer4"]), 1)), y)


def test_stage_without_history_says_so():
    model = _tv_resnet18()
    with pytest.raises(ValueError, match="no stage-level attention history"):
        model.layer3(torch.randn(2, 128, 8, 8))


def test_intermediate_layer_getter_cut_short():
    """layer1 .. layer3 only (layer4 never runs): the features match the full model's, and the
    cut-short call leaves nothing behind."""
    model = _tv_resnet18()
    x = torch.randn(2, 3, 32, 32)
    _, seen = _hooked(model, STAGES, x)
    getter = IntermediateLayerGetter(model, {"layer1": "a", "layer2": "b", "layer3": "c"})
    with torch.no_grad():
        feats = getter(x)
    for short, name in zip("abc", STAGES):
        torch.testing.assert_close(feats[short], seen[name], rtol=0, atol=0)
    _no_call_state(model)


def test_segmentation_backbone():
    """fcn_resnet's backbone (an IntermediateLayerGetter, dilated layer3/4) converted by apply_fa:
    the model trains a step, and its backbone features match forward hooks on the same stages."""
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    fk.apply_fa(model.backbone)
    assert isinstance(model.backbone.layer3, FAStage)
    x = torch.randn(2, 3, 48, 48)
    out = model(x)
    assert out["out"].shape == (2, 3, 48, 48) and out["aux"].shape == (2, 3, 48, 48)
    (out["out"].square().mean() + out["aux"].square().mean()).backward()
    assert model.backbone.layer4.stage_fa.focus1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        feats, seen = _hooked(model.backbone, ["layer3", "layer4"], x)
    torch.testing.assert_close(feats["aux"], seen["layer3"], rtol=0, atol=0)
    torch.testing.assert_close(feats["out"], seen["layer4"], rtol=0, atol=0)


def test_timm_forward_intermediates():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = fk.apply_fa(timm.create_model("resnet18", pretrained=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        _, seen = _hooked(model, STAGES, x)
        assert [t.shape[1] for t in inter] == [64, 64, 128, 256, 512]
        for t, name in zip(inter[1:], STAGES):
            torch.testing.assert_close(t, seen[name], rtol=0, atol=0)
        cut = model.forward_intermediates(x, indices=[2], intermediates_only=True, stop_early=True)
        torch.testing.assert_close(cut[0], seen["layer2"], rtol=0, atol=0)


@pytest.mark.parametrize("make", [_zoo_resnet20, _tv_resnet18], ids=["fa_resnet20", "tv_resnet18"])
def test_export_without_warnings(make):
    model = make()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    k_before = fk.collect_k(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ep = torch.export.export(model, (x,))
    k_after = fk.collect_k(model)  # the record of the last eager call, untouched by export
    assert k_after.keys() == k_before.keys()
    for name, k in k_before.items():
        assert type(k_after[name]) is torch.Tensor and torch.equal(k_after[name], k)
    torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_zoo_resnet20, _tv_resnet18], ids=["fa_resnet20", "tv_resnet18"])
def test_fx_symbolic_trace(make):
    model = make()
    x = torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    for m in model.modules():  # tracing recorded no proxies as k values
        assert all(type(k) is torch.Tensor for k in getattr(m, "last_k", []))


@pytest.mark.parametrize("make,names", [
    (_zoo_resnet20, ["layers.0", "layers.1", "layers.2", "layers.1.0"]),
    (_tv_resnet18, ["layer1", "layer2", "layer3", "layer4", "layer2.0"]),
], ids=["fa_resnet20", "tv_resnet18"])
def test_create_feature_extractor(make, names):
    """Eval and train graphs against forward hooks (train: from equal copies, BN statistics too)."""
    import copy

    model = make()
    x = torch.randn(2, 3, 32, 32)
    extractor = create_feature_extractor(model, return_nodes=names)
    for train in (False, True):
        model.train(train)
        hooked = copy.deepcopy(model)
        _, want = _hooked(hooked, names, x)
        got = extractor.train(train)(x)
        assert got.keys() == set(names)
        for n in names:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6, msg=n)
        if train:
            for (n, b), b_want in zip(model.named_buffers(), hooked.buffers()):
                torch.testing.assert_close(b, b_want, msg=n)


def test_jit_script_refused_in_one_line():
    model = _zoo_resnet20()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's own deprecation notice
        with pytest.raises(RuntimeError, match=r"do not support torch\.jit\.script; use torch\.compile, torch\.export"):
            torch.jit.script(model)


def test_jit_trace_matches_eager():
    model = _zoo_resnet20()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)


def test_feature_extraction_from_two_threads():
    """Two threads run the cut-short getter (and a full forward) on one model at once: each gets its
    serial result."""
    model = _tv_resnet18()
    getter = IntermediateLayerGetter(model, {"layer1": "a", "layer2": "b", "layer3": "c"})
    xs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    start = threading.Barrier(2)
    results, errors = [None, None], []

    def work(i):
        try:
            start.wait(30)
            with torch.no_grad():
                for _ in range(3):
                    results[i] = (getter(xs[i]), model(xs[i]))
        except Exception as exc:
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with torch.no_grad():
        for (feats, y), x in zip(results, xs):
            want = getter(x)
            for key in "abc":
                torch.testing.assert_close(feats[key], want[key], rtol=0, atol=0)
            torch.testing.assert_close(y, model(x), rtol=0, atol=0)
