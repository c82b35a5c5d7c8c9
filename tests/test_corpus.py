"""The architecture corpus itself: builds, exports, checks and matches torch in onnxruntime."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from architectures import (
    ARCHITECTURES,
    EXPORTER_OPSET,
    EXPORTERS,
    Arch,
    export,
    unsupported_reason,
)
from handmade import HANDMADE, NOT_RUNNABLE_IN_ORT, external_data, opset_variants, with_if

RTOL = ATOL = 1e-4

REQUIRED = {
    "resnet_basic", "resnet_bottleneck", "densenet", "mobilenet_v2", "mobilenet_v3", "resnext",
    "shufflenet_v2", "efficientnet", "convnext", "inception", "unet", "fpn_yolo", "vit", "bert",
    "gpt2", "llama", "lstm_model", "gru_model", "mlp", "vgg", "squeezenet", "ghostnet", "csp",
    "res2net", "senet", "groupnorm_cnn", "instancenorm_cnn", "prelu_cnn", "tcn_conv1d",
    "xception", "mlp_mixer", "transformer_decoder", "pixel_shuffle_sr", "einsum_attention",
    "conv_transpose_grouped",
}  # fmt: skip

ARCH_NAMES = sorted(ARCHITECTURES)
PAIRS = [pytest.param(a, e, id=f"{a}-{e}") for a in ARCH_NAMES for e in EXPORTERS]


def _torch_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in outs]


def _ort_outputs(path: pathlib.Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {f"input{i}": t.numpy() for i, t in enumerate(inputs)})


def _random_feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        ttype = value.type.tensor_type
        shape = [batch if d.dim_param else d.dim_value for d in ttype.shape.dim]
        if ttype.elem_type == onnx.TensorProto.BOOL:
            feeds[value.name] = np.array(True)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# --------------------------------------------------------------------------- registry


def test_registry_covers_required_architectures() -> None:
    assert len(ARCHITECTURES) >= 32
    assert set(ARCHITECTURES) >= REQUIRED
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name
        assert arch.tags, name


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_builds_and_runs(name: str) -> None:
    arch = ARCHITECTURES[name]
    model, inputs = arch.build(), arch.example_inputs()
    assert not model.training
    assert all(t.shape[0] == 2 for t in inputs)
    outs = _torch_outputs(model, inputs)
    assert all(np.isfinite(o).all() for o in outs)
    # Seeded: a second build and a second set of inputs are bit-identical.
    again = _torch_outputs(arch.build(), arch.example_inputs())
    for a, b in zip(outs, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(mod.running_var, torch.ones_like(mod.running_var))
            assert not torch.allclose(mod.running_mean, torch.zeros_like(mod.running_mean))


# --------------------------------------------------------------------------- exports


def _check_export(arch: Arch, exporter: str, path: pathlib.Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)  # by path: follows external data
    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == EXPORTER_OPSET[exporter]
    inputs = arch.example_inputs()
    assert [i.name for i in proto.graph.input] == [f"input{i}" for i in range(len(inputs))]
    assert all(o.name == f"output{i}" for i, o in enumerate(proto.graph.output))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert bool(batch_dim.dim_param) == arch.dynamic_batch

    model = arch.build()
    got = _ort_outputs(path, inputs)
    want = _torch_outputs(model, inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    if arch.dynamic_batch:
        # Batch 3 proves the symbolic batch axis is really dynamic in the graph.
        bigger = tuple(torch.cat([t, t[:1]]) for t in inputs)
        got = _ort_outputs(path, bigger)
        for g, w in zip(got, _torch_outputs(model, bigger), strict=True):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_export_matches_torch(
    name: str, exporter: str, exported_model: Callable[[str, str], pathlib.Path]
) -> None:
    _check_export(ARCHITECTURES[name], exporter, exported_model(name, exporter))


def test_unsupported_pairs_really_fail(tmp_path: pathlib.Path) -> None:
    """Every skip in the export matrix is justified by an actual exporter failure."""
    skipped = [
        (a, e) for a in ARCH_NAMES for e in EXPORTERS if unsupported_reason(ARCHITECTURES[a], e)
    ]
    for name, exporter in skipped:
        with pytest.raises(Exception):  # noqa: B017 - any exporter error will do
            export(ARCHITECTURES[name], exporter, tmp_path / f"{name}-{exporter}.onnx")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_is_deterministic(tmp_path: pathlib.Path, exporter: str) -> None:
    arch = ARCHITECTURES["resnet_basic"]
    first = export(arch, exporter, tmp_path / "a" / "m.onnx")
    second = export(arch, exporter, tmp_path / "b" / "m.onnx")
    assert first.read_bytes() == second.read_bytes()
    data_a, data_b = first.with_suffix(".onnx.data"), second.with_suffix(".onnx.data")
    assert data_a.exists() == data_b.exists()
    if data_a.exists():
        assert data_a.read_bytes() == data_b.read_bytes()


# --------------------------------------------------------------------------- handmade


@pytest.mark.parametrize("name", sorted(HANDMADE))
def test_handmade_model_is_valid_and_runs(name: str) -> None:
    model = HANDMADE[name]()
    assert model.ir_version > 0 and model.opset_import
    assert model.SerializeToString() == HANDMADE[name]().SerializeToString()
    onnx.checker.check_model(model, full_check=True)
    if name in NOT_RUNNABLE_IN_ORT:
        with pytest.raises(Exception):  # noqa: B017 - ORT's error type varies
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for out in sess.run(None, _random_feeds(model)):
        assert np.isfinite(out).all()


def test_constant_node_weights_has_no_initializers() -> None:
    model = HANDMADE["constant_node_weights"]()
    assert not model.graph.initializer
    ops = [n.op_type for n in model.graph.node]
    assert "Identity" in ops and "BatchNormalization" in ops


def test_with_if_branches_differ() -> None:
    model = with_if()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _random_feeds(model)
    then_out = sess.run(None, {**feeds, "cond": np.array(True)})[0]
    else_out = sess.run(None, {**feeds, "cond": np.array(False)})[0]
    assert then_out.shape == else_out.shape
    assert not np.allclose(then_out, else_out)


def test_opset_variants() -> None:
    versions = {k: (m.ir_version, m.opset_import[0].version) for k, m in opset_variants().items()}
    assert versions == {
        "opset11": (7, 11), "opset13": (7, 13), "opset17": (8, 17), "opset21": (10, 21)
    }  # fmt: skip


def test_external_data(tmp_path: pathlib.Path) -> None:
    path = external_data(tmp_path)
    assert path.exists() and (tmp_path / "external_data.onnx.data").exists()
    proto = onnx.load(str(path), load_external_data=False)
    assert proto.graph.initializer
    assert all(
        t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data
        for t in proto.graph.initializer
    )
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _random_feeds(proto)
    inline = onnx.load(str(path)).SerializeToString()
    ref = ort.InferenceSession(inline, providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(sess.run(None, feeds)[0], ref[0], rtol=1e-6, atol=1e-6)


SHIPPED = {"resnet_tiny": "resnet_basic", "bert_tiny": "bert", "mobilenet_tiny": "mobilenet_v2"}


@pytest.mark.parametrize("filename", sorted(SHIPPED))
def test_shipped_model_matches_registry(filename: str) -> None:
    """models/*.onnx still compute what the registry architecture computes (numerically)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "models" / f"{filename}.onnx"
    assert path.exists(), "run: python models/make_models.py --out models/"
    assert path.stat().st_size < 1 << 20
    assert not path.with_suffix(".onnx.data").exists()
    arch = ARCHITECTURES[SHIPPED[filename]]
    inputs = arch.example_inputs()
    for g, w in zip(_ort_outputs(path, inputs), _torch_outputs(arch.build(), inputs), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
