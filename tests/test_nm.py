"""N:M sparsity: the pattern on every eligible weight of the corpus, OBS against magnitude,
skips, structured + N:M together, quantized and transposed weights, the compressed format,
`spa verify-nm` and bad options."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from architectures import ARCHITECTURES
from builder import GraphBuilder
from onnx import numpy_helper
from oracle import random_feeds, run
from spa_compiler.passes.sparsify_nm import find_targets

import spa_compiler
from spa_compiler import nm

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"


def _violations(proto: onnx.ModelProto, n: int, m: int) -> dict[str, int]:
    graph = spa_compiler.from_proto(proto).graph  # shapes inferred, as verify-nm does
    return {
        t.constant.name: nm.weight_violations(t, n, m)[1] for t in find_targets(graph, m).targets
    }


def test_obs_error_is_at_most_magnitude_on_a_layer_with_known_h():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)) @ rng.standard_normal((32, 32))
    hessian = x.T @ x / len(x)
    hessian += 0.01 * np.mean(np.diag(hessian)) * np.eye(32)
    weights = rng.standard_normal((24, 32))

    def error(pruned):
        delta = weights - pruned
        return np.trace(delta @ hessian @ delta.T)

    for n, m in ((2, 4), (4, 8), (1, 4)):
        magnitude = weights * nm.magnitude_mask(weights, n, m)
        obs = nm.obs_nm(weights, hessian, n, m)
        assert nm.violations(obs, n, m) == 0 and nm.violations(magnitude, n, m) == 0
        assert error(obs) <= error(magnitude)


def test_compressed_format_round_trips():
    rng = np.random.default_rng(1)
    for n, m in ((2, 4), (4, 8), (3, 16)):
        rows = rng.standard_normal((5, 4 * m)).astype(np.float32)
        rows *= nm.magnitude_mask(rows, n, m)
        rows[0, :m] = 0.0  # a group with fewer than N non-zeros
        values, positions = nm.compress(rows, n, m)
        assert values.shape == (5, 4 * n) and values.dtype == np.float32
        packed = nm.pack_positions(positions, m)
        np.testing.assert_array_equal(nm.unpack_positions(packed, m, 4, n), positions)
        np.testing.assert_array_equal(nm.decompress(values, positions, m), rows)


CASES = list(ARCHITECTURES)


@pytest.mark.parametrize("arch", CASES)
def test_the_pattern_holds_on_every_eligible_weight_of_the_corpus(exported_model, arch):
    path = exported_model(arch, "legacy17")
    pruned, report = spa_compiler.compile(path, ratio=0.0, nm=(2, 4))
    assert all(v == 0 for v in _violations(pruned, 2, 4).values())
    assert len(report.nm["applied"]) == len(_violations(pruned, 2, 4))


def test_skipped_weights_are_reported_with_their_reason():
    _, report = spa_compiler.compile(MODELS / "resnet_tiny.onnx", ratio=0.0, nm=(2, 4))
    reasons = dict(report.nm["skipped"])
    assert any("reduction size 3 is not a multiple of 4" in why for why in reasons.values())
    _, report = spa_compiler.compile(
        MODELS / "resnet_tiny.onnx", ratio=0.0, nm=(2, 4), nm_exclude=["*"]
    )
    assert not report.nm["applied"]
    assert all(why.startswith(("excluded", "reduction")) for _, why in report.nm["skipped"])


@pytest.mark.parametrize("name", ["resnet_tiny", "bert_tiny", "mobilenet_tiny"])
def test_structured_pruning_and_nm_together_keep_the_model_valid(name):
    path = MODELS / f"{name}.onnx"
    pruned, report = spa_compiler.compile(path, ratio=0.5, nm=(2, 4))
    assert report.after["parameters"] < report.before["parameters"]
    assert report.nm["applied"] and all(v == 0 for v in _violations(pruned, 2, 4).values())
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(path)
    feeds = random_feeds(original, seed=0)
    for a, b in zip(run(original, feeds), run(pruned, feeds), strict=True):
        assert np.shape(a) == np.shape(b) and np.isfinite(b).all()


def test_obs_masks_lose_less_than_magnitude_on_the_digits_cnn():
    sys.path.insert(0, str(MODELS))
    from make_digits_cnn import data

    _, images, _, labels = data()

    def accuracy(proto):
        return float((run(proto, {"image": images})[0].argmax(1) == labels).mean())

    options = {"ratio": 0.0, "nm": (2, 4), "input_range": (0.0, 1.0)}
    magnitude, _ = spa_compiler.compile(
        MODELS / "digits_cnn.onnx", nm_method="magnitude", **options
    )
    obs, report = spa_compiler.compile(MODELS / "digits_cnn.onnx", nm_method="obs", **options)
    assert {entry["method"] for entry in report.nm["applied"]} == {"obs"}
    assert accuracy(obs) >= accuracy(magnitude)


def test_quantized_and_transposed_weights():
    b = GraphBuilder(opset=17)
    x = b.input("x", ["n", 8])
    quantized = b.const("wq", np.arange(-64, 64, dtype=np.int8).reshape(8, 16))
    scale, zero = b.const("s", np.array(0.05, np.float32)), b.const("z", np.array(3, np.int8))
    h = b.op("MatMul", [x, b.op("DequantizeLinear", [quantized, scale, zero])])
    # B reaches the MatMul transposed: the reduction (K = 16) is axis 1 of the constant
    # (large enough that constant folding leaves the Transpose in place)
    transposed = b.op("Transpose", [b.weight("wt", [512, 16])], perm=[1, 0])
    b.output(b.op("MatMul", [h, transposed]))
    pruned, report = spa_compiler.compile(b.model(), ratio=0.0, nm=(2, 4))
    applied = {entry["tensor"]: entry for entry in report.nm["applied"]}
    assert applied["wt"]["axis"] == 1 and "quantized" in applied["wq"]["method"]
    assert all(v == 0 for v in _violations(pruned, 2, 4).values())
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    kept = weights["wq"] != 3  # pruned quantized weights hold the zero point
    assert (kept.reshape(2, 4, 16).sum(axis=1) <= 2).all()
    assert ((weights["wt"] != 0).reshape(512, 4, 4).sum(axis=2) <= 2).all()


def test_export_compressed_matches_the_model(compressed_bert_tiny):
    out, archive = compressed_bert_tiny
    data = np.load(archive)
    header = json.loads(bytes(data["format"]).decode())
    assert header["pattern"] == "2:4" and header["tensors"]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    for name, info in header["tensors"].items():
        groups = info["k"] // 4
        positions = nm.unpack_positions(data[f"{name}.meta"], 4, groups, 2)
        dense = nm.decompress(data[f"{name}.values"], positions, 4)
        moved = np.moveaxis(weights[name], info["axis"], -1).reshape(info["rows"], info["k"])
        np.testing.assert_array_equal(dense, moved)


def test_verify_nm_exit_codes(tmp_path):
    out = tmp_path / "sparse.onnx"
    spa = [sys.executable, "-m", "spa_compiler"]
    compiled = [*spa, "compile", str(MODELS / "resnet_tiny.onnx"), "--nm", "2:4", "-o", str(out)]
    subprocess.run(compiled, check=True, capture_output=True)
    sparse = subprocess.run([*spa, "verify-nm", str(out), "--nm", "2:4"], capture_output=True)
    dense = subprocess.run(
        [*spa, "verify-nm", str(MODELS / "resnet_tiny.onnx"), "--nm", "2:4"], capture_output=True
    )
    assert sparse.returncode == 0 and dense.returncode == 1
    assert b"not eligible: reduction size 3" in sparse.stdout


@pytest.mark.parametrize(
    "options",
    [
        ["--nm", "4:4"],
        ["--nm", "2:5"],
        ["--nm", "two:four"],
        ["--export-compressed", "w.npz"],
        ["--nm-exclude", "*"],
    ],
)
def test_bad_nm_options_are_refused(tmp_path, options):
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "spa_compiler", "compile", str(MODELS / "digits_cnn.onnx"),
         "-o", str(out), *options],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert not out.exists()


def test_nm_output_is_byte_identical(tmp_path):
    first, _ = spa_compiler.compile(MODELS / "bert_tiny.onnx", ratio=0.3, nm=(2, 4))
    second, _ = spa_compiler.compile(MODELS / "bert_tiny.onnx", ratio=0.3, nm=(2, 4))
    assert first.SerializeToString() == second.SerializeToString()


def _matmul_model(path, weight_op: str) -> pathlib.Path:
    b = GraphBuilder(opset=17)
    x = b.input("x", ["n", 16])
    if weight_op == "Transpose":
        weight = b.op("Transpose", [b.weight("w", [512, 16])], perm=[1, 0])
    else:
        weight = b.op("Cast", [b.weight("w", [16, 512])], to=1)
    b.output(b.op("MatMul", [x, weight]))
    onnx.save(b.model(), path)
    return path


@pytest.mark.parametrize("weight_op", ["Transpose", "Cast"])
def test_verify_nm_sees_weights_behind_layout_ops(tmp_path, weight_op):
    path = _matmul_model(tmp_path / "dense.onnx", weight_op)
    spa = [sys.executable, "-m", "spa_compiler"]
    dense = subprocess.run([*spa, "verify-nm", str(path), "--nm", "2:4"], capture_output=True)
    assert dense.returncode == 1, dense.stdout
    out = tmp_path / "sparse.onnx"
    subprocess.run([*spa, "compile", str(path), "--nm", "2:4", "-o", str(out)], check=True)
    sparse = subprocess.run([*spa, "verify-nm", str(out), "--nm", "2:4"], capture_output=True)
    assert sparse.returncode == 0 and b"1 of 1 eligible" in sparse.stdout


def test_dequantize_per_axis_without_zero_point_and_block_quantization(tmp_path):
    b = GraphBuilder(opset=13)
    x = b.input("x", ["n", 16])
    quantized = b.const("wq", np.arange(-64, 64, dtype=np.int8).reshape(16, 8))
    scale = b.const("s", np.linspace(0.01, 0.08, 8).astype(np.float32))
    b.output(b.op("MatMul", [x, b.op("DequantizeLinear", [quantized, scale], axis=1)]))
    pruned, report = spa_compiler.compile(b.model(), ratio=0.0, nm=(2, 4))
    assert [e["tensor"] for e in report.nm["applied"]] == ["wq"]
    assert all(v == 0 for v in _violations(pruned, 2, 4).values())

    b = GraphBuilder(opset=21)
    x = b.input("x", ["n", 16])
    quantized = b.const("wq", np.arange(-64, 64, dtype=np.int8).reshape(16, 8))
    scale = b.const("s", np.full((4, 8), 0.05, np.float32))
    dequantized = b.op("DequantizeLinear", [quantized, scale], axis=0, block_size=4)
    b.output(b.op("MatMul", [x, dequantized]))
    _, report = spa_compiler.compile(b.model(), ratio=0.0, nm=(2, 4))
    assert dict(report.nm["skipped"]) == {"wq": "block-quantized weights are not supported"}


def test_structured_pruning_keeps_reductions_eligible_for_nm():
    _, report = spa_compiler.compile(MODELS / "resnet_tiny.onnx", ratio=0.3, nm=(2, 4))
    assert [why for _, why in report.nm["skipped"]] == ["reduction size 3 is not a multiple of 4"]
    assert len(report.nm["applied"]) == 13


def test_obs_masks_for_a_layer_reading_a_graph_input(tmp_path):
    b = GraphBuilder()
    x = b.input("x", ["n", 16])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight("w1", [16, 16])])])
    b.output(b.op("MatMul", [h, b.weight("w2", [16, 8])]))
    _, report = spa_compiler.compile(b.model(), ratio=0.0, nm=(2, 4))
    assert {e["tensor"]: e["method"] for e in report.nm["applied"]} == {"w1": "obs", "w2": "obs"}
    assert not any("unchanged" in w for w in report.warnings)


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_pruned_weights_are_positive_zeros_and_the_archive_is_bit_exact(method):
    """A pruned negative weight written as w · 0 is -0.0, which the archive (N values a group)
    cannot hold: decompressing it gave +0.0 where the model held -0.0."""
    import io

    b = GraphBuilder(opset=17)
    x = b.input("x", ["n", 16])
    b.output(b.op("MatMul", [x, b.weight("w", [16, 8])]))
    pruned, report = spa_compiler.compile(b.model(), ratio=0.0, nm=(2, 4), nm_method=method)
    weight = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "w")
    assert not np.signbit(weight[weight == 0]).any()
    data = np.load(io.BytesIO(nm.compressed_archive(pruned, report.nm)))
    positions = nm.unpack_positions(data["w.meta"], 4, 4, 2)
    dense = nm.decompress(data["w.values"], positions, 4)
    rows = np.ascontiguousarray(weight.T)
    np.testing.assert_array_equal(dense.view(np.uint32), rows.view(np.uint32))
