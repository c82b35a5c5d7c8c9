"""Counting multiply-accumulates (MACs) and element operations from a graph's shapes.

Symbolic dims (the batch) count as 1, so figures are per sample; a dim written as an
expression of them (shape inference's ``floor((1024*w + 1024)/(w + 1))``) is evaluated with
every symbol at 1, so the same size counts the same before and after a rewrite simplifies it.
A dim shape inference cannot tell at all counts as 1 too; ``compile`` measures those in one
onnxruntime run with the symbolic dims at 1 (``runtime.observed_shapes``) and otherwise says
the counts are lower bounds (``unresolved``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.ir import ANONYMOUS_DIM_PREFIX
from spa_compiler.op_rules import REDUCE_OPS


@functools.lru_cache(maxsize=4096)
def _symbolic_dim(dim: str) -> int:
    if dim.isidentifier() or dim.startswith("?"):
        return 1
    try:
        import sympy

        expression = sympy.sympify(dim, locals={"floor": sympy.floor, "ceiling": sympy.ceiling})
        value = expression.subs({symbol: 1 for symbol in expression.free_symbols})
        return max(1, int(value))
    except (sympy.SympifyError, TypeError, ValueError, SyntaxError):
        return 1


def _dim(dim: object) -> int:
    return dim if isinstance(dim, int) else _symbolic_dim(str(dim))


def _numel(shape: list | tuple | None) -> int:
    if shape is None:
        return 0
    return int(np.prod([_dim(d) for d in shape], dtype=np.int64))


def _dims(shape: list | tuple | None) -> list[int]:
    return [_dim(d) for d in (shape or [])]


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
    if node.op in ("LSTM", "GRU", "RNN") and len(node.inputs) > 2:
        # Every time step and batch row multiplies the input and the hidden state by every
        # direction's gate weights W [dirs, gates·hidden, input] and R [dirs, gates·hidden,
        # hidden].
        x = _dims(shape_of(node.inputs[0]))
        steps = x[0] * x[1] if len(x) == 3 else 0
        return steps * (_numel(shape_of(node.inputs[1])) + _numel(shape_of(node.inputs[2])))
    if node.op == "Einsum":
        equation = node.attrs.get("equation", "")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        sizes: dict[str, int] = {}
        for letters, tensor in zip(equation.split("->")[0].split(","), node.inputs, strict=False):
            for letter, dim in zip(letters.strip(), _dims(shape_of(tensor)), strict=False):
                sizes[letter] = dim
        return int(np.prod(list(sizes.values()), dtype=np.int64)) if sizes else 0
    return 0


def _window(node: gs.Node, shape_of: Callable[[gs.Tensor], list | None]) -> int:
    """Elements each output of a pooling op reads."""
    kernel = node.attrs.get("kernel_shape")
    if kernel is not None:
        return int(np.prod(kernel))
    source = _dims(shape_of(node.inputs[0]))
    return int(np.prod(source[2:])) if len(source) > 2 else 1


# FLOPs per output element (or per input element where marked) of the ops without a
# reduction; MAC ops count 2 FLOPs per MAC.
PER_ELEMENT = {
    "Relu": 1,
    "LeakyRelu": 2,
    "PRelu": 2,
    "Sigmoid": 4,
    "HardSigmoid": 3,
    "HardSwish": 4,
    "Tanh": 4,
    "Gelu": 8,
    "Erf": 4,
    "Clip": 2,
    "Softplus": 4,
    "Softsign": 3,
    "Mish": 8,
    "Elu": 3,
    "Selu": 4,
    "Celu": 4,
    "Swish": 5,
    "Exp": 1,
    "Log": 1,
    "Sqrt": 1,
    "Reciprocal": 1,
    "Neg": 1,
    "Abs": 1,
    "Sin": 1,
    "Cos": 1,
    "Pow": 1,
    "Add": 1,
    "Sub": 1,
    "Mul": 1,
    "Div": 1,
    "Max": 1,
    "Min": 1,
    "Sum": 1,
    "Mean": 1,
    "Where": 1,
    "Equal": 1,
    "Greater": 1,
    "Less": 1,
    "BatchNormalization": 2,
    "InstanceNormalization": 5,
    "LayerNormalization": 5,
    "GroupNormalization": 5,
    "MeanVarianceNormalization": 5,
    "LpNormalization": 3,
    "LRN": 5,
    "Softmax": 5,
    "LogSoftmax": 5,
    "Resize": 4,
    "Upsample": 4,
    "QuantizeLinear": 2,
    "DequantizeLinear": 2,
}
# Reductions read every input element once.
PER_INPUT_ELEMENT = set(REDUCE_OPS) | {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
POOLING = {"MaxPool", "AveragePool", "LpPool"}
MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN"}
# No arithmetic: data movement, shape computations, control flow (its sub-graphs are not
# counted).
NO_ARITHMETIC = {
    "Identity",
    "Dropout",
    "Cast",
    "CastLike",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Expand",
    "Tile",
    "Pad",
    "Shape",
    "Size",
    "Trilu",
    "If",
    "Loop",
    "Scan",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Not",
    "IsNaN",
    "IsInf",
    "And",
    "Or",
    "Xor",
    "GreaterOrEqual",
    "LessOrEqual",
    "Mod",
    "BitShift",
    "ThresholdedRelu",
    "Hardmax",
}


def node_flops(
    node: gs.Node,
    shape_of: Callable[[gs.Tensor], list | None] = _shape_of,
    macs: int | None = None,
) -> int:
    """Floating-point operations of one node: 2 per MAC, per-element costs for the rest, 0 for
    data movement (Reshape, Transpose, Concat, Slice, Gather...). ``macs``: the node's MACs if
    the caller has them already."""
    macs = node_macs(node, shape_of) if macs is None else macs
    if macs:
        return 2 * macs
    if not node.outputs:
        return 0
    if node.op in PER_INPUT_ELEMENT:
        return _numel(shape_of(node.inputs[0]))
    if node.op in POOLING:
        return _numel(shape_of(node.outputs[0])) * _window(node, shape_of)
    return _numel(shape_of(node.outputs[0])) * PER_ELEMENT.get(node.op, 0)


def count(graph: gs.Graph, shape_of: Callable[[gs.Tensor], list | None] = _shape_of) -> dict:
    """MACs and FLOPs, per op type and in total."""
    macs: dict[str, int] = defaultdict(int)
    flops: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        value = node_macs(node, shape_of)
        if value:
            macs[node.op] += value
        cost = node_flops(node, shape_of, value)
        if cost:
            flops[node.op] += cost
    return {
        "macs": sum(macs.values()),
        "macs_by_op": dict(macs),
        "flops": sum(flops.values()),
        "flops_by_op": dict(flops),
    }


def _unknown(dim: object) -> bool:
    return dim is None or (isinstance(dim, str) and dim.startswith(ANONYMOUS_DIM_PREFIX))


def _unresolved_operands(
    node: gs.Node, shape_of: Callable[[gs.Tensor], list | None] = _shape_of
) -> list[gs.Tensor]:
    operands = [t for t in [*node.inputs, *node.outputs[:1]] if t.name]
    shapes = [shape_of(t) for t in operands]
    return [
        t
        for t, shape in zip(operands, shapes, strict=True)
        if shape is None or any(_unknown(d) for d in shape)
    ]


def unresolved(
    graph: gs.Graph, shape_of: Callable[[gs.Tensor], list | None] = _shape_of
) -> list[str]:
    """Nodes that multiply-accumulate (``MAC_OPS``) with a dim shape inference left unknown in
    an operand or the output: each counts as 1, so the graph's MACs are a lower bound (and a
    rewrite that resolves more shapes can count more than the original)."""
    return [
        node.name or node.op
        for node in graph.nodes
        if node.op in MAC_OPS and _unresolved_operands(node, shape_of)
    ]


def unresolved_tensors(graph: gs.Graph) -> list[gs.Variable]:
    """The tensors behind ``unresolved``: operands of MAC nodes with an unknown dim."""
    found: dict[str, gs.Variable] = {}
    for node in graph.nodes:
        if node.op in MAC_OPS:
            for tensor in _unresolved_operands(node):
                if isinstance(tensor, gs.Variable):
                    found.setdefault(tensor.name, tensor)
    return list(found.values())
