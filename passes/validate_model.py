"""Validate a compiled model before anything is written: the full ONNX checker, shape
inference, and an onnxruntime session on random inputs whose output shapes must equal the
original model's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper

from spa_compiler.errors import PassError
from spa_compiler.ir import Model, check, skeleton
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
            feeds[value.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = np.asarray(rng.integers(0, 2, size=shape), dtype=dtype)
        else:
            feeds[value.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
    return feeds


IN_MEMORY = "spa-in-memory-weights"


def run_session(
    proto: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Run a model in onnxruntime without serializing its large weights: they are handed to
    the session as external initializers (serializing BERT-base costs seconds and a copy).
    ``arrays`` supplies weights already in memory by name, saving a decode of the proto."""
    arrays = arrays or {}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Output shapes are all validation compares: skip the graph optimizers' start-up cost.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    light = skeleton(proto)
    inputs = {value.name for value in light.graph.input}
    names, values = [], []
    for tensor in proto.graph.initializer:
        if tensor.name in inputs and tensor.name not in {v.name for v in proto.graph.input}:
            array = arrays.get(tensor.name)
            if array is None or array.shape != tuple(tensor.dims):
                array = numpy_helper.to_array(tensor)
            reference = onnx.TensorProto(
                name=tensor.name, data_type=tensor.data_type, dims=tensor.dims
            )
            reference.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (
                ("location", IN_MEMORY),
                ("offset", "0"),
                ("length", str(array.nbytes)),
            ):
                reference.external_data.add(key=key, value=value)
            light.graph.initializer.append(reference)
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
    kept = [value for value in light.graph.input if value.name not in set(names)]
    del light.graph.input[:]
    light.graph.input.extend(kept)
    options.add_external_initializers(names, values)
    session = ort.InferenceSession(
        light.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


class ValidateModel(Pass):
    name = "validate"

    def __init__(
        self,
        compiled: onnx.ModelProto,
        original: onnx.ModelProto,
        output_shapes: list[list | None] | None = None,
    ) -> None:
        """``output_shapes``: the original's inferred output shapes; where every dim is a
        number or an input's symbolic dim, they replace running the original model."""
        self.compiled, self.original = compiled, original
        self.output_shapes = output_shapes

    def expected_shapes(self, feeds: dict[str, np.ndarray]) -> list[tuple] | None:
        if self.output_shapes is None:
            return None
        symbols: dict[str, int] = {}
        for value in self.original.graph.input:
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.dim_param and value.name in feeds:
                    symbols[dim.dim_param] = int(np.shape(feeds[value.name])[axis])
        shapes = []
        for shape in self.output_shapes:
            if shape is None or not all(isinstance(d, int) or d in symbols for d in shape):
                return None
            shapes.append(tuple(d if isinstance(d, int) else symbols[d] for d in shape))
        return shapes

    def call(self, model: Model) -> PassResult:
        problem = check(self.compiled, full=True)
        if problem:
            raise PassError(f"the pruned model fails the ONNX checker: {problem}")
        feeds = random_inputs(self.original)
        weights = {
            name: np.asarray(tensor.values)
            for name, tensor in model.graph.tensors().items()
            if isinstance(tensor, gs.Constant)
        }
        try:
            produced = run_session(self.compiled, feeds, weights)
        except Exception as error:
            try:
                run_session(self.original, feeds)
            except Exception as original_error:  # custom ops, or inputs it cannot take
                warning = (
                    f"onnxruntime cannot run the original model here ({_first(original_error)});"
                    " the pruned model was validated by the ONNX checker only"
                )
                return PassResult(model, changed=False, details={"warnings": [warning]})
            raise PassError(
                f"the pruned model does not run in onnxruntime: {_first(error)}"
            ) from None
        known = self.expected_shapes(feeds)
        if known is None:
            known = [np.shape(a) for a in run_session(self.original, feeds)]
        for i, (shape, result) in enumerate(zip(known, produced, strict=True)):
            if tuple(shape) != np.shape(result):
                raise PassError(f"output {i} changed shape: {tuple(shape)} -> {np.shape(result)}")
        return PassResult(model, changed=False, details={"outputs": len(produced)})


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
