"""Fill in output shapes ONNX shape inference leaves unknown but spa can derive exactly.

Shape-preserving ops (activations, normalizations) whose inference ONNX does not implement
for a given opset get their input's shape.

Reshape outputs get the shape their run-time target implies.
The legacy torch exporter writes ``x.view(B, S, H, -1)`` as Concat(Shape(x)[0], Shape(x)[1],
H, -1): with a symbolic batch size, ONNX shape inference leaves the ``-1`` unknown although it
is a plain integer. This pass reads such targets part by part (constants, and single dims read
through Shape -> Gather), solves the ``-1`` with symbolic dims cancelling, and records the
shape on the output tensor. Run shape inference afterwards to propagate it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.ir import Model, is_anonymous_dim
from spa_compiler.op_rules import UNARY_OPS
from spa_compiler.pipeline import Pass, PassResult

Dim = int | str


def _known(shape: list | None) -> bool:
    """No dim is missing (named and anonymous symbolic dims are fine)."""
    return shape is not None and all(isinstance(d, (int, str)) for d in shape)


def _complete(shape: list | None) -> bool:
    """Every dim is a number or a name the model gave (nothing left to derive)."""
    return shape is not None and not any(is_anonymous_dim(d) for d in shape)


def _dims_read_by_shape(part: gs.Tensor) -> list[Dim] | None:
    """Dims held by a 1-D part of a target: a constant, or Unsqueeze(Gather(Shape(t), i))."""
    if isinstance(part, gs.Constant):
        return [int(v) for v in np.asarray(part.values).reshape(-1)]
    node = part.inputs[0] if part.inputs else None
    if node is not None and node.op == "Unsqueeze":
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if node is None or node.op != "Gather" or not isinstance(node.inputs[1], gs.Constant):
        return None
    index = np.asarray(node.inputs[1].values).reshape(-1)
    source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if source is None or source.op != "Shape" or source.attrs.get("start", 0) != 0:
        return None
    shape = source.inputs[0].shape
    if not _known(shape):
        return None
    return [shape[int(i)] for i in index]


def _target(node: gs.Node) -> list[Dim] | None:
    target = node.inputs[1]
    if isinstance(target, gs.Constant):
        return [int(v) for v in np.asarray(target.values).reshape(-1)]
    producer = target.inputs[0] if target.inputs else None
    if producer is None or producer.op != "Concat":
        return None
    dims: list[Dim] = []
    for part in producer.inputs:
        values = _dims_read_by_shape(part)
        if values is None:
            return None
        dims.extend(values)
    return dims


def _product(dims: list[Dim]) -> tuple[int, Counter]:
    number, symbols = 1, Counter()
    for d in dims:
        if isinstance(d, int):
            number *= d
        else:
            symbols[d] += 1
    return number, symbols


def resolve_reshape(node: gs.Node) -> list[Dim] | None:
    in_shape = node.inputs[0].shape
    if not _known(in_shape):
        return None
    target = _target(node)
    if target is None:
        return None
    allow_zero = int(node.attrs.get("allowzero", 0))
    out: list[Dim] = []
    for i, d in enumerate(target):
        if d == 0 and not allow_zero:
            if i >= len(in_shape):
                return None
            out.append(in_shape[i])
        else:
            out.append(d)
    if out.count(-1) > 1:
        return None
    if -1 in out:
        total_number, total_symbols = _product(list(in_shape))
        rest_number, rest_symbols = _product([d for d in out if d != -1])
        if rest_symbols - total_symbols or rest_number == 0 or total_number % rest_number:
            return None
        left = total_symbols - rest_symbols
        if left:
            return None  # the -1 would be symbolic; leave it to shape inference
        out[out.index(-1)] = total_number // rest_number
    return out


# Ops whose output has the input's shape: the op table's unary ops, norms and softmax.
SHAPE_PRESERVING_OPS = set(UNARY_OPS) | {
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "MeanVarianceNormalization",
    "LpNormalization",
    "LRN",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "PRelu",
    "Trilu",
}


class CompleteShapes(Pass):
    name = "complete-shapes"

    def call(self, model: Model) -> PassResult:
        changed = 0
        for node in model.graph.nodes:
            output = node.outputs[0] if node.outputs else None
            if output is None or _complete(output.shape):
                continue
            if node.op in SHAPE_PRESERVING_OPS and _known(node.inputs[0].shape):
                output.shape = list(node.inputs[0].shape)
                output.dtype = output.dtype or node.inputs[0].dtype
                changed += 1
                continue
            if node.op != "Reshape":
                continue
            shape = resolve_reshape(node)
            if shape is not None:
                node.outputs[0].shape = shape
                if node.outputs[0].dtype is None:
                    node.outputs[0].dtype = node.inputs[0].dtype
                changed += 1
        return PassResult(model, changed=changed > 0, details={"resolved": changed})
