"""onnxruntime sessions on models whose weights stay in memory, and random inputs of the
declared shapes: shared by validation and by activation statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from spa_compiler.errors import BadInputError
from spa_compiler.ir import SYMBOLIC_DIM, check_input_sizes, held_weights, skeleton


@dataclass
class DeclaredInput:
    name: str
    dims: list[int | None]  # None where the dim is symbolic or unknown
    dtype: np.dtype


def declared_inputs(proto: onnx.ModelProto) -> list[DeclaredInput]:
    """The graph inputs a caller feeds (initializers that are also inputs left out)."""
    check_input_sizes(proto)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"input '{value.name}' has no usable element type") from None
        inputs.append(DeclaredInput(value.name, dims, dtype))
    return inputs


def random_inputs(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values of each graph input's declared shape (symbolic dims set small)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for declared in declared_inputs(proto):
        shape = [SYMBOLIC_DIM if d is None else d for d in declared.dims]
        dtype = declared.dtype
        if dtype == np.bool_:
            feeds[declared.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            feeds[declared.name] = np.asarray(rng.integers(0, 2, size=shape), dtype=dtype)
        else:
            feeds[declared.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
    return feeds


IN_MEMORY = "spa-in-memory-weights"


def session(
    proto: onnx.ModelProto,
    arrays: dict[str, np.ndarray] | None = None,
    extra_outputs: Sequence[tuple[str, int]] = (),
    optimize: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime session that does not serialize the model's large weights: they are
    handed over as in-memory external initializers (serializing BERT-base costs seconds and a
    copy). ``arrays`` supplies weights already in memory by name, saving a decode of the
    proto; ``extra_outputs`` (name, ONNX element type) exposes intermediate tensors."""
    arrays = {**held_weights(proto), **(arrays or {})}
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach users as spa's one-line errors
    if not optimize:  # validation compares output shapes: skip the optimizers' start-up cost
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The kernels' packed copies of every weight would be a second copy of the model (the
    # weights are handed over in memory, not copied): measured on a 2.4 GB Llama-style model.
    options.add_session_config_entry("session.disable_prepacking", "1")
    light = skeleton(proto)
    declared = {value.name for value in light.graph.output}
    for name, elem_type in extra_outputs:
        if name not in declared:
            light.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
            declared.add(name)
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
    return ort.InferenceSession(
        light.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_session(
    proto: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Run a model once in onnxruntime (see ``session``)."""
    return session(proto, arrays).run(None, feeds)


__all__ = ["DeclaredInput", "declared_inputs", "random_inputs", "run_session", "session"]
