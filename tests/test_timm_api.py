"""timm's model API on the zoo (the contract of timm's tests/test_models.py where it applies), the
zoo in timm's registry, and apply_fa's messages on timm blocks it cannot add SE to."""
import subprocess
import sys

import pytest
import torch

import fanet_kernels as fk
from fanet_kernels.zoo import create_model

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[vision]')")

# small ones: the contract is the same frame for every zoo model (StagedNet, VGG19, InceptionV4)
NAMES = ["fa_resnet20", "se_resnet20", "fa_vgg19"]


def _x(n=2):
    torch.manual_seed(0)
    return torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_head(name):
    model = timm.create_model(name).eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), out, atol=1e-5)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert out.shape == (2, 10) and model.num_classes == 10
    assert model.pretrained_cfg["classifier"] in dict(model.named_modules())
    assert model.pretrained_cfg["first_conv"] in dict(model.named_modules())


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_zero_and_reset_classifier(name):
    x = _x()
    model = create_model(name, num_classes=0).eval()
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 0 for m in model.modules())
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) and model.num_classes == 0
    with pytest.raises(ValueError, match="num_classes"):
        create_model(name, num_classes=-1)


def test_num_classes_keeps_the_paper_count():
    # the head stays Linear(64, num_classes) under its old name: counts and checkpoints are unchanged
    model = create_model("fa_resnet20")
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.weight.shape == (10, 64)


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    x = _x()
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        outs = model(x)
    info = model.feature_info
    assert len(outs) == len(info.channels())
    for o, c, r in zip(outs, info.channels(), info.reduction()):
        assert o.shape[1] == c and o.shape[-1] == x.shape[-1] // r
    full = timm.create_model(name).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        assert torch.allclose(final, full.forward_features(x), atol=1e-5)
    for a, b in zip(inter, outs):
        assert torch.allclose(a, b, atol=1e-5)
    picked = timm.create_model(name, features_only=True, out_indices=(1, -1)).eval()
    assert [o.shape[1] for o in picked(x)] == [info.channels()[1], info.channels()[-1]]


def test_inception_feature_info_channels():
    model = create_model("fa_inception_v4").eval()
    with torch.no_grad():
        outs = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    assert [o.shape[1] for o in outs] == [f["num_chs"] for f in model.feature_info]


def test_pretrained_needs_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("fa_resnet20", pretrained=True)
    source = create_model("fa_resnet20")
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)  # the CLI's checkpoints keep it under "model" too
    model = timm.create_model("fa_resnet20", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    # another num_classes: everything but the classifier loads
    model = timm.create_model("fa_resnet20", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.fc.out_features == 3 and torch.equal(model.stem[0].weight, source.stem[0].weight)


def test_registered_either_import_order():
    # timm imported after fanet_kernels: the names are registered right after timm's import
    code = ("import fanet_kernels, sys; assert 'timm' not in sys.modules; import timm; "
            "m = timm.create_model('fa_resnet56', num_classes=100); assert m.fc.out_features == 100; "
            "assert timm.create_model('vgg19').__class__.__module__ == 'timm.models.vgg'; "
            "print(len(timm.list_models('fa_*')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["16"]
    assert timm.is_model("fa_se_resnext29_8x16d")  # in this process fanet_kernels came first or second


@pytest.mark.parametrize("name, says", [
    ("skresnet18", "SelectiveKernelBasic has no bn3 or bn2"),
    ("resnet50_gn", "Bottleneck.bn3, the norm that ends its residual branch, is a GroupNorm"),
])
def test_apply_fa_se_names_what_the_block_lacks(name, says):
    with torch.device("meta"):
        model = timm.create_model(name)
    with pytest.raises(TypeError, match=says):
        fk.apply_fa(model, se=True)
