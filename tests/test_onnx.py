"""torch.onnx.export of FA models with both exporters, run in onnxruntime against eager: during
export the ops resolve to the reference backend (the fused ops have no ONNX translation)."""
import warnings

import numpy as np
import pytest
import torch
import torchvision

import fanet_kernels as fk
from fanet_kernels.zoo import create_model

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[test]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[test]')")


def _export_and_run(model: torch.nn.Module, x: torch.Tensor, path, dynamo: bool, x_run: torch.Tensor) -> None:
    model.eval()
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (pip install -e '.[test]')")
        kw = dict(dynamic_shapes=({0: torch.export.Dim("n")},), dynamo=True, verbose=False)
    else:
        kw = dict(dynamic_axes={"x": {0: "n"}}, dynamo=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation and tracer warnings
        torch.onnx.export(model, (x,), str(path), input_names=["x"], **kw)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x_run.numpy()})
    with torch.no_grad():
        expected = model(x_run).numpy()
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    if fk.HAS_EXTENSION:  # the export's switch to the reference ends with the export
        assert fk.get_backend("cpu") == "cpu"


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_zoo_fa_resnet20(tmp_path, dynamo):
    torch.manual_seed(0)
    model = create_model("fa_resnet20")
    # exported at batch 2, run at batch 3: the batch dimension stays dynamic
    _export_and_run(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", dynamo, torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_apply_fa_resnet18(tmp_path, dynamo):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    # a backend named on the modules is overridden during export too
    fk.apply_fa(model, backend="cpu" if fk.HAS_EXTENSION else None)
    x = torch.randn(1, 3, 64, 64)
    _export_and_run(model, x, tmp_path / "m.onnx", dynamo, x)
