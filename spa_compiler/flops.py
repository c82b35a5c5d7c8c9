"""Counting multiply-accumulates (MACs) and element operations from a graph's shapes.

Symbolic dims (the batch) count as 1, so figures are per sample.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs


def _numel(shape: list | tuple | None) -> int:
    if shape is None:
        return 0
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))


def _dims(shape: list | tuple | None) -> list[int]:
    return [d if isinstance(d, int) else 1 for d in (shape or [])]


def _shape_of(tensor: gs.Tensor) -> list | None:
    return None if tensor.shape is None else list(tensor.shape)


def node_macs(node: gs.Node, shape_of: Callable[[gs.Tensor], list | None] = _shape_of) -> int:
    """Multiply-accumulates of one node (0 for ops without a reduction). ``shape_of`` lets a
    caller count a graph with other shapes (a plan's estimate) without rewriting it."""
    out = shape_of(node.outputs[0]) if node.outputs else None
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        weight = _dims(shape_of(node.inputs[1]))
        if not weight:
            return 0
        if node.op == "Conv":
            return _numel(out) * int(np.prod(weight[1:]))
        # Each input element meets Cout/group output channels over the kernel window.
        return _numel(shape_of(node.inputs[0])) * int(np.prod(weight[1:]))
    if node.op in ("Gemm", "MatMul"):
        a = _dims(shape_of(node.inputs[0]))
        if not a:
            return 0
        k = a[0] if node.op == "Gemm" and int(node.attrs.get("transA", 0)) else a[-1]
        return _numel(out) * k
    if node.op == "Einsum":
        equation = node.attrs.get("equation", "")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        sizes: dict[str, int] = {}
        for letters, tensor in zip(equation.split("->")[0].split(","), node.inputs, strict=False):
            for letter, dim in zip(letters.strip(), _dims(shape_of(tensor)), strict=False):
                sizes[letter] = dim
        return int(np.prod(list(sizes.values()), dtype=np.int64)) if sizes else 0
    return 0


def count(graph: gs.Graph, shape_of: Callable[[gs.Tensor], list | None] = _shape_of) -> dict:
    """MACs per op type, element operations of the other ops, and totals."""
    macs: dict[str, int] = defaultdict(int)
    elementwise = 0
    for node in graph.nodes:
        value = node_macs(node, shape_of)
        if value:
            macs[node.op] += value
        elif node.outputs:
            elementwise += _numel(shape_of(node.outputs[0]))
    return {"macs": sum(macs.values()), "macs_by_op": dict(macs), "elementwise": elementwise}
