"""onnxruntime sessions on models whose weights stay in memory, and random inputs of the
declared shapes: shared by validation and by activation statistics."""

from __future__ import annotations

import contextlib
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


def random_inputs(
    proto: onnx.ModelProto, seed: int = 0, symbolic: int = SYMBOLIC_DIM
) -> dict[str, np.ndarray]:
    """Random values of each graph input's declared shape (symbolic dims ``symbolic``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for declared in declared_inputs(proto):
        shape = [symbolic if d is None else d for d in declared.dims]
        dtype = declared.dtype
        if dtype == np.bool_:
            feeds[declared.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            feeds[declared.name] = np.asarray(rng.integers(0, 2, size=shape), dtype=dtype)
        else:
            feeds[declared.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
    return feeds


class WeightFedSession:
    """An onnxruntime session whose large weights are graph inputs, fed from memory with every
    run: onnxruntime reads input buffers in place, whereas initializers handed over with
    ``add_external_initializers`` are copied into the session (a second copy of the model,
    2.4 GB on a Llama-style model) and ``add_initializer`` still wants the weights inside the
    serialized model."""

    def __init__(self, inner: ort.InferenceSession, weights: dict[str, np.ndarray]) -> None:
        self.inner, self.weights = inner, weights

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.inner.run(names, {**feeds, **self.weights})


def session(
    proto: onnx.ModelProto,
    arrays: dict[str, np.ndarray] | None = None,
    extra_outputs: Sequence[tuple[str, int | None]] = (),
    optimize: bool = False,
) -> WeightFedSession:
    """An onnxruntime session that neither serializes nor copies the model's large weights
    (serializing BERT-base costs seconds and a copy). ``arrays`` supplies weights already in
    memory by name, saving a decode of the proto; ``extra_outputs`` (name, ONNX element
    type, or None where it is not known: the output is then declared untyped) exposes
    intermediate tensors."""
    arrays = {**held_weights(proto), **(arrays or {})}
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach users as spa's one-line errors
    if not optimize:  # validation compares output shapes: skip the optimizers' start-up cost
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    light = skeleton(proto)  # large weights become typed graph inputs
    declared = {value.name for value in light.graph.output}
    for name, elem_type in extra_outputs:
        if name not in declared:
            light.graph.output.append(
                onnx.helper.make_empty_tensor_value_info(name)
                if elem_type is None
                else onnx.helper.make_tensor_value_info(name, elem_type, None)
            )
            declared.add(name)
    fed = {value.name for value in light.graph.input} - {v.name for v in proto.graph.input}
    weights = {}
    for tensor in proto.graph.initializer:
        if tensor.name in fed:
            array = arrays.get(tensor.name)
            if array is None or array.shape != tuple(tensor.dims):
                array = numpy_helper.to_array(tensor)
            weights[tensor.name] = np.ascontiguousarray(array)
    inner = ort.InferenceSession(
        light.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return WeightFedSession(inner, weights)


def run_session(
    proto: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Run a model once in onnxruntime (see ``session``)."""
    return session(proto, arrays).run(None, feeds)


def observed_shapes(proto: onnx.ModelProto, tensors: Sequence) -> dict[str, list[int]]:
    """The shapes ``tensors`` (graphsurgeon variables of ``proto``'s graph) take in one
    onnxruntime run on random inputs with every symbolic dim 1 — the FLOPs counter's
    per-sample convention — where shape inference could not tell them; {} where the model
    does not run so (a symbolic dim that must be larger, an op onnxruntime lacks)."""
    produced = {name for node in proto.graph.node for name in node.output if name}
    wanted = []
    for tensor in tensors:
        # A type graphsurgeon does not know (None: np.dtype(None) would be float64, which
        # onnxruntime refuses for a float tensor, losing every observation) is left undeclared.
        elem_type = None
        if tensor.dtype is not None:
            with contextlib.suppress(TypeError, KeyError, ValueError):
                elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
        if tensor.name in produced:
            wanted.append((tensor.name, elem_type))
    if not wanted:
        return {}
    try:
        feeds = random_inputs(proto, symbolic=1)
        arrays = session(proto, extra_outputs=wanted).run([n for n, _ in wanted], feeds)
    except Exception:  # a count stays a lower bound (and says so); it never ends a compile
        return {}
    return {name: list(np.shape(a)) for (name, _), a in zip(wanted, arrays, strict=True)}


__all__ = [
    "DeclaredInput",
    "WeightFedSession",
    "declared_inputs",
    "observed_shapes",
    "random_inputs",
    "run_session",
    "session",
]
