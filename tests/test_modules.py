"""FA modules against the reference math (reference.fa_weight / fa_chain / fa_stages)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fanet_kernels as fk
from fanet_kernels import ops, reference, zoo
from fanet_kernels.modules import FAGate, FASequential, FAStages, Residual, SEBlock, collect_k

BACKENDS = ["reference"] + (["cpu"] if "cpu" in fk.available_backends() else [])


def set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, FAGate):
            m.backend = backend


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, ref_forward, x, backend, atol=2e-5, buffers=False):
    """Output, input and parameter gradients of ``model`` on ``backend`` against ``ref_forward`` on a
    copy; ``buffers``: the BatchNorm running stats and counts too (where ref_forward runs every
    BatchNorm as often as the model does)."""
    torch.manual_seed(0)
    mod, ref = copy.deepcopy(model), copy.deepcopy(model)
    set_backend(mod, backend)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ym, yr = mod(xm), ref_forward(ref, xr)
    torch.testing.assert_close(ym, yr, atol=atol, rtol=1e-4)
    w = torch.randn_like(ym)
    (ym * w).sum().backward()
    (yr * w).sum().backward()
    torch.testing.assert_close(xm.grad, xr.grad, atol=atol, rtol=1e-4)
    gm, gr = grads(mod), grads(ref)
    assert gm.keys() == gr.keys()
    for n in gm:
        torch.testing.assert_close(gm[n], gr[n], atol=atol, rtol=1e-4, msg=n)
    bm, br = dict(mod.named_buffers()), dict(ref.named_buffers())
    assert bm.keys() == br.keys()
    for n in bm if buffers else ():
        torch.testing.assert_close(bm[n], br[n], atol=atol, rtol=1e-4, msg=n)
    return mod


def ref_resnet(model, x):
    """fa_resnet from the reference functions, with the model's own weights."""
    stages = list(model.layers)

    def chain(st):
        return lambda inp: reference.fa_chain(inp, list(st), [g.params() for g in st.fa])[0]

    out, ks = reference.fa_stages(model.stem(x), [chain(st) for st in stages],
                                  [st.stage_fa.params() for st in stages[1:]],
                                  projections=[None] + [st[0].shortcut for st in stages[1:]])
    assert len(ks) == 2
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["fa_resnet20", "fa_se_resnet20"])
def test_fa_resnet_equals_reference(name, backend):
    torch.manual_seed(1)
    model = zoo.create_model(name)
    mod = compare(model, ref_resnet, torch.randn(2, 3, 16, 16), backend)
    ks = collect_k(mod)
    assert set(ks) == {"layers.0", "layers.1", "layers.2", "layers.stages"}
    assert all(v.shape == (2, 2) for v in ks.values())
    assert [k.shape for k in mod.layers[1].last_k] == [torch.Size([2])] * 2


def _conv(cin, cout, pool):
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_with_projections_equals_reference(backend):
    """A VGG-like chain: shapes change, X is projected, focus on X_i from the previous pool."""
    torch.manual_seed(2)
    widths = [4, 8, 8, 12]
    blocks = [_conv(3, 4, True), _conv(4, 8, True), _conv(8, 8, False), _conv(8, 12, True)]
    projections = [None, nn.Conv2d(4, 8, 1, 2), None, nn.Conv2d(8, 12, 1, 2)]
    chain = FASequential(blocks, channels=widths[:3], projections=projections)

    def ref(m, x):
        p = [None if q is None else m.projections[str(i)] for i, q in enumerate(projections)]
        return reference.fa_chain(x, list(m), [g.params() for g in m.fa], projections=p)[0]

    compare(chain, ref, torch.randn(3, 3, 16, 16), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stages_with_pre_equals_reference(backend):
    """Inception-style stages: P is a reduction block that feeds the chain."""
    torch.manual_seed(3)
    stages = [nn.Sequential(_conv(4, 4, False), _conv(4, 4, False)),
              nn.Sequential(_conv(8, 8, False), _conv(8, 8, False), _conv(8, 8, False))]
    pre = [None, _conv(4, 8, True)]
    model = FAStages(stages, channels=[4, 8], pre=pre)

    def ref(m, x):
        def chain(st):
            return lambda inp: reference.fa_chain(inp, list(st), [g.params() for g in st.fa])[0]
        return reference.fa_stages(x, [chain(st) for st in m], [m[1].stage_fa.params()], None,
                                   pre=[None, m[1].pre])[0]

    compare(model, ref, torch.randn(2, 4, 8, 8), backend)


def test_reference_and_cpu_backend_agree_on_zoo_model():
    if "cpu" not in fk.available_backends():
        pytest.skip("compiled CPU backend not built")
    torch.manual_seed(4)
    model = zoo.create_model("fa_resnext29_8x16d", backend="cpu").eval()
    x = torch.randn(1, 3, 16, 16)
    y_cpu = model(x)
    set_backend(model, "reference")
    torch.testing.assert_close(model(x), y_cpu, atol=1e-5, rtol=1e-4)


def test_pooled_x_makes_no_extra_pass(monkeypatch):
    calls = []
    real_focus = ops.focus

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real_focus(*a, **kw)

    monkeypatch.setattr(ops, "focus", spy)
    torch.manual_seed(5)
    g1, g2 = FAGate(6, 1), FAGate(6, 2)
    x1, u1, u2 = (torch.randn(2, 6, 5, 5) for _ in range(3))
    r1 = g1(x1, u1)
    assert len(calls) == 1
    r2 = g2(r1.out, u2, r1.history, pooled_x=r1.pooled)
    assert len(calls) == 1  # the pool of r1.out came from gate_pool: x was not read again
    torch.testing.assert_close(r1.pooled, r1.out.mean(dim=(2, 3)))
    r2b = g2(r1.out, u2, r1.history)  # without the pool: one focus pass, same result
    assert len(calls) == 2
    torch.testing.assert_close(r2.out, r2b.out)
    torch.testing.assert_close(r2.k, r2b.k)
    assert len(r2.history) == 2 and r2.history[0].grad_fn is not None  # not detached
    # a chain of 5 blocks pools with the focus op once (block 1), then uses the gates' pools
    calls.clear()
    FASequential([nn.Conv2d(6, 6, 3, padding=1) for _ in range(5)], channels=6)(x1)
    assert len(calls) == 1


def test_fagate_parameters_and_errors():
    g = FAGate(64, 3)
    assert sum(p.numel() for p in g.parameters()) == (64 * 16 + 16 + 16 + 1) + (3 * 12 + 12 + 12 + 1)
    assert not hasattr(FAGate(16, 1), "assoc1")
    assert FAGate(3, 1).focus1.out_features == 1  # h1 = max(1, C // r1)
    with pytest.raises(ValueError, match="index"):
        FAGate(8, 0)
    with pytest.raises(ValueError, match="history"):
        FAGate(8, 2)(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2), [])
    x = torch.randn(2, 4, 3, 3)
    for call, name in ((lambda: FAGate(4, 1)(torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)), "channels=4"),
                       (lambda: FAGate(4, 1)(x, x, pooled_x=torch.rand(2, 5)), "'pooled_x'"),
                       (lambda: FAGate(4, 2)(x, x, [torch.rand(3)]), "'history'"),
                       (lambda: FAGate(4, 1)(x, torch.randn(2, 8, 3, 3)), "'projected'"),
                       (lambda: FAGate(4, 1, backend="gpu"), "'backend'"),
                       (lambda: FASequential([nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 1)])(
                           torch.randn(2, 3, 4, 4)), r"FAGate\(index=2\).*'projections'")):
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_under_autocast(backend):
    """Under autocast a BatchNorm block returns float32 and a conv block bfloat16: the gate
    promotes x and u as x + (u - x) * k would, and the chain trains."""
    torch.manual_seed(0)
    m = FASequential(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                   nn.Conv2d(4, 4, 3, padding=1)), backend=backend)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert y.dtype == torch.float32 and x.grad is not None and m.fa[0].focus1.weight.grad is not None


def test_seblock():
    for args, name in (((8, 0), "'r'"), ((0, 4), "'channels'")):
        with pytest.raises(ValueError, match=name):
            SEBlock(*args)
    with pytest.raises(ValueError, match="'se_reduction'"):
        zoo.create_model("fa_se_resnet20", se_reduction=0)
    se = SEBlock(32, 8)
    assert sum(p.numel() for p in se.parameters()) == 32 * 4 + 4 + 4 * 32 + 32
    x = torch.randn(2, 32, 3, 3)
    s = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3))))))
    torch.testing.assert_close(se(x), x * s[:, :, None, None])


def test_fasequential_keeps_block_keys():
    plain = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
    fa = FASequential(copy.deepcopy(plain))
    r = fa.load_state_dict(plain.state_dict(), strict=False)
    assert r.unexpected_keys == [] and all(k.startswith("fa.") for k in r.missing_keys)
    assert len(fa) == 3 and fa[0] is list(fa)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_is_folded_only_where_it_ends_the_branch(backend, monkeypatch):
    """With SE after the last BatchNorm (FA-SE-ResNet) the chain runs ops.bn_se_residual_gate_pool; with a
    hook on that BatchNorm, ``branch`` + ops.residual_gate_pool: the BatchNorm runs as a module."""
    calls = {"bn": 0, "plain": 0, "se": 0}
    for name, key in (("bn_residual_gate_pool", "bn"), ("residual_gate_pool", "plain"),
                      ("bn_se_residual_gate_pool", "se")):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _k=key, **kw: calls.__setitem__(_k, calls[_k] + 1)
                            or _r(*a, **kw))
    x = torch.randn(2, 3, 16, 16)
    zoo.create_model("fa_se_resnet20", backend=backend)(x)
    assert calls == {"bn": 0, "plain": 0, "se": 6}
    model = zoo.create_model("fa_resnet20", backend=backend)
    seen = []
    model.layers[1][2].bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(x)
    assert calls == {"bn": 5, "plain": 1, "se": 6} and seen == [torch.Size([2, 32, 8, 8])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_blocks_fuse_add_and_relu_into_the_gate(backend, monkeypatch):
    """Gated blocks with an identity shortcut run ``pre_norm`` + ops.bn_residual_gate_pool (the zoo's
    branches end in a BatchNorm); the result equals the unfused chain (``fuse_residual=False``), and
    a block with a forward hook is run through its forward so the hook sees U."""
    calls = []
    real = ops.bn_residual_gate_pool
    monkeypatch.setattr(ops, "bn_residual_gate_pool", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(6)
    model = zoo.create_model("fa_resnet20", backend=backend)

    def unfused(m, inp):
        for chain in m.modules():
            if isinstance(chain, FASequential):
                chain.fuse_residual = False
        return m(inp)

    x = torch.randn(2, 3, 16, 16)
    compare(model, unfused, x, backend, buffers=True)
    assert len(calls) == 6  # blocks 1 and 2 of each of the 3 stages; the stage gates are not residual
    calls.clear()
    seen = []
    model.layers[1][2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(x)
    assert len(calls) == 5 and seen == [torch.Size([2, 32, 8, 8])]
    with pytest.raises(ValueError, match="Residual"):
        FAGate(4, 1)(x[:, :1].expand(2, 4, 16, 16), Residual(x[:, :1].expand(2, 4, 16, 16)),
                     projected=torch.zeros(2, 4, 16, 16))
