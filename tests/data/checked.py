"""What every make_<origin>.py does with a model it exported: run it in onnxruntime, compare
with the framework's own output, and say what was written."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort


def check_against_framework(path: pathlib.Path, x: np.ndarray, want: np.ndarray) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    nodes = [node.op_type for node in onnx.load(str(path)).graph.node]
    print(f"{path.name}: {path.stat().st_size} bytes, {nodes}")
