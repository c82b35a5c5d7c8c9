"""Validate a compiled model before anything is written: the full ONNX checker, shape
inference, and an onnxruntime session on random inputs whose output shapes must equal the
original model's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from spa_compiler.errors import PassError
from spa_compiler.ir import Model
from spa_compiler.pipeline import Pass, PassResult

SYMBOLIC_DIM = 2


def random_inputs(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values of each graph input's declared shape (symbolic dims set small)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else SYMBOLIC_DIM for d in tensor_type.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_session(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


class ValidateModel(Pass):
    name = "validate"

    def __init__(self, compiled: onnx.ModelProto, original: onnx.ModelProto) -> None:
        self.compiled, self.original = compiled, original

    def call(self, model: Model) -> PassResult:
        try:
            onnx.checker.check_model(self.compiled, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise PassError(f"the pruned model fails the ONNX checker: {_first(error)}") from None
        feeds = random_inputs(self.original)
        try:
            expected = run_session(self.original, feeds)
        except Exception:  # the original does not run here (custom ops): nothing to compare
            expected = None
        try:
            produced = run_session(self.compiled, feeds)
        except Exception as error:
            raise PassError(
                f"the pruned model does not run in onnxruntime: {_first(error)}"
            ) from None
        if expected is not None:
            for i, (a, b) in enumerate(zip(expected, produced, strict=True)):
                if np.shape(a) != np.shape(b):
                    raise PassError(f"output {i} changed shape: {np.shape(a)} -> {np.shape(b)}")
        return PassResult(model, changed=False, details={"outputs": len(produced)})


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
