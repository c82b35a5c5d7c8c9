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
