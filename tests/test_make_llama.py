"""The Llama-style generator (models/make_llama.py): a tiny one in external data runs in
onnxruntime, and spa compiles it — structured and N:M — into a model that runs too."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"


def _make_llama():
    spec = importlib.util.spec_from_file_location("make_llama", MODELS / "make_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_llama_in_external_data_compiles(tmp_path):
    make_llama = _make_llama()
    path = tmp_path / "llama.onnx"
    make_llama.save(make_llama.build(64, 2, 4, 2, 96, 100), path)
    assert (tmp_path / "llama.onnx.data").stat().st_size > 100_000
    onnx.checker.check_model(str(path))
    ids = np.array([[1, 5, 7]], dtype=np.int64)
    logits = ort.InferenceSession(str(path)).run(None, {"input_ids": ids})[0]
    assert logits.shape == (1, 3, 100)
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "spa_compiler", "compile", str(path), "--ratio", "0.25",
         "--nm", "2:4", "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pruned = ort.InferenceSession(str(out)).run(None, {"input_ids": ids})[0]
    assert pruned.shape == logits.shape


def _tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    make_llama = _make_llama()
    path = tmp_path / "llama.onnx"
    make_llama.save(make_llama.build(64, 1, 4, 4, 96, 100), path)
    return path


def _compile(path, out, *options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spa_compiler", "compile", str(path), "--ratio", "0.25",
         "--criterion", "l1", "-o", str(out), *options],
        capture_output=True, text=True,
    )  # fmt: skip


def test_external_data_output_modes_are_byte_identical_and_leave_no_temporaries(tmp_path):
    path = _tiny(tmp_path)
    ids = {"input_ids": np.array([[3, 1, 4]], dtype=np.int64)}
    outputs = {}
    for mode, name in (("auto", "a.onnx"), ("always", "b.onnx"), ("never", "c.onnx")):
        done = _compile(path, tmp_path / name, "--external-data", mode)
        assert done.returncode == 0, done.stderr
        outputs[mode] = ort.InferenceSession(str(tmp_path / name)).run(None, ids)[0]
    # auto follows the input (external data); never embeds everything
    assert (tmp_path / "a.onnx.data").exists() and (tmp_path / "b.onnx.data").exists()
    assert not (tmp_path / "c.onnx.data").exists()
    np.testing.assert_array_equal(outputs["auto"], outputs["never"])
    again = _compile(path, tmp_path / "d.onnx", "--external-data", "always")
    assert again.returncode == 0
    assert (tmp_path / "d.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    model_b = (tmp_path / "b.onnx").read_bytes().replace(b"b.onnx.data", b"d.onnx.data")
    assert (tmp_path / "d.onnx").read_bytes() == model_b
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_external_data_output_never_overwrites_the_input_data(tmp_path):
    path = _tiny(tmp_path)
    before = (tmp_path / "llama.onnx.data").read_bytes()
    # an output named so that its data file would be the input's own data file
    done = _compile(path, tmp_path / "llama.onnx", "--force")
    assert done.returncode == 2 and "input external data" in done.stderr
    assert (tmp_path / "llama.onnx.data").read_bytes() == before


def test_the_api_returns_a_self_contained_model_from_external_data(tmp_path):
    import spa_compiler
    from spa_compiler.ir import _HELD

    path = _tiny(tmp_path)
    pruned, _ = spa_compiler.compile(str(path), ratio=0.25, criterion="l1")
    assert not _HELD  # nothing held once compile returns
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in pruned.graph.initializer)
    onnx.save(pruned, str(tmp_path / "api.onnx"))
    ids = {"input_ids": np.array([[2, 7]], dtype=np.int64)}
    assert ort.InferenceSession(str(tmp_path / "api.onnx")).run(None, ids)[0].shape == (1, 2, 100)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_onnxruntime_sessions_do_not_copy_the_weights(tmp_path):
    """spa's sessions feed large weights as inputs: onnxruntime copies initializers handed
    over in memory (add_external_initializers), a second copy of the model."""
    from spa_compiler.ir import forget, read_model_proto
    from spa_compiler.runtime import session

    make_llama = _make_llama()
    path = tmp_path / "llama.onnx"
    make_llama.save(make_llama.build(512, 2, 8, 8, 1536, 8000), path)  # ~46 MB of weights
    weights = (tmp_path / "llama.onnx.data").stat().st_size
    proto = read_model_proto(path, hold_large=True)
    try:
        before = _resident_bytes()
        runner = session(proto)
        grown = _resident_bytes() - before
        logits = runner.run(None, {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})[0]
    finally:
        forget(proto)
    assert logits.shape == (1, 3, 8000)
    assert grown < weights / 4, (grown, weights)
