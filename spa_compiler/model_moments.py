"""Data-free second moments read off the model itself: nothing is run on inputs.

Each feature of an activation is modelled as f(z) with z ~ N(mean, variance) independent
across features, where z is the last linear quantity before the activation function f:

- BatchNormalization / LayerNormalization outputs: mean β, variance γ² per feature (what the
  normalization produces on the data it was trained on);
- an embedding lookup (Gather from a constant table): the table columns' mean and variance;
- a Conv / Gemm / MatMul (and a bias Add after it): mean W·E[x] + b, variance Σ W² Var[x],
  from the same estimate of its own input, recursively (folded BatchNorm convs included);
- a residual Add of two activations: means and variances add;
- pooling, Flatten, Identity, Dropout and Concat along the feature axis carry them through.

f is whatever chain of elementwise ops with scalar constants leads from z to the activation
(Relu, Clip, GELU as Erf, SiLU as x·Sigmoid(x), HardSwish, ...): it is evaluated by onnx's
reference evaluator on Gauss-Hermite points, so every activation written in elementwise ONNX
ops is covered without a table of formulas. Unknown producers give mean 0 and variance 1.
H = diag(Var f(z)) + E[f(z)] E[f(z)]ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from spa_compiler.linear_layers import LinearLayer
from spa_compiler.obs import Moments

ELEMENTWISE = {
    "Abs", "Add", "Cast", "Celu", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow",
    "Relu", "Selu", "Sigmoid", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu",
}  # fmt: skip
CARRY = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout"}
POINTS = 24  # Gauss-Hermite points per feature
MAX_DEPTH = 400


@dataclass
class Stats:
    mean: np.ndarray
    variance: np.ndarray


def _constant_scalar(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) == 1


def _cone_source(tensor: gs.Tensor, memo: dict[str, gs.Tensor]) -> gs.Tensor:
    """The tensor an elementwise chain starts from: walk back through elementwise ops with
    scalar constants while every operand leads to one tensor (x·sigmoid(x) does; a residual
    a + b does not, and is itself the start)."""
    if tensor.name in memo:
        return memo[tensor.name]
    memo[tensor.name] = tensor
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op not in ELEMENTWISE or len(producer.outputs) != 1:
        return tensor
    operands = [t for t in producer.inputs if t.name and not _constant_scalar(t)]
    if not operands or any(isinstance(t, gs.Constant) for t in operands):
        return tensor
    sources = {id(s): s for s in (_cone_source(t, memo) for t in operands)}
    source = next(iter(sources.values())) if len(sources) == 1 else tensor
    memo[tensor.name] = source
    return source


def _activation_cone(tensor: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
    """The tensor z an elementwise chain computes ``tensor`` from, and the chain's nodes in
    topological order (empty when ``tensor`` is z itself)."""
    source = _cone_source(tensor, {})
    nodes: dict[int, gs.Node] = {}
    stack = [tensor]
    while stack:
        current = stack.pop()
        if current is source or not current.inputs:
            continue
        producer = current.inputs[0]
        if id(producer) in nodes:
            continue
        nodes[id(producer)] = producer
        stack.extend(t for t in producer.inputs if t.name and not isinstance(t, gs.Constant))
    return source, _toposort(list(nodes.values())) if nodes else []


def _toposort(nodes: list[gs.Node]) -> list[gs.Node]:
    graph = gs.Graph(nodes=nodes)
    graph.toposort()
    return list(graph.nodes)


def _evaluate(source: gs.Tensor, nodes: list[gs.Node], output: gs.Tensor, z: np.ndarray):
    """f(z) for the elementwise chain, by onnx's reference evaluator."""
    initializers, protos = [], []
    seen = set()
    for node in nodes:
        for operand in node.inputs:
            if isinstance(operand, gs.Constant) and operand.name not in seen:
                seen.add(operand.name)
                value = np.asarray(operand.values)
                if np.issubdtype(value.dtype, np.floating):
                    value = value.astype(np.float64)
                initializers.append(numpy_helper.from_array(value, operand.name))
        attributes = {k: v for k, v in node.attrs.items() if not isinstance(v, gs.Tensor)}
        if node.op == "Cast":
            attributes["to"] = onnx.TensorProto.DOUBLE
        protos.append(
            onnx.helper.make_node(
                node.op,
                [t.name for t in node.inputs],
                [t.name for t in node.outputs],
                **attributes,
            )
        )
    graph = onnx.helper.make_graph(
        protos,
        "activation",
        [onnx.helper.make_tensor_value_info(source.name, onnx.TensorProto.DOUBLE, None)],
        [onnx.helper.make_tensor_value_info(output.name, onnx.TensorProto.DOUBLE, None)],
        initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    return np.asarray(ReferenceEvaluator(model).run(None, {source.name: z})[0], dtype=np.float64)


class _Propagator:
    def __init__(self, input_range: tuple[float, float] | None = None) -> None:
        self.input_range = input_range
        self.memo: dict[tuple[str, int], Stats | None] = {}
        nodes, weights = np.polynomial.hermite_e.hermegauss(POINTS)
        self.nodes, self.weights = nodes, weights / weights.sum()

    def activation(self, tensor: gs.Tensor, axis: int, depth: int = 0) -> Stats | None:
        key = (tensor.name, axis)
        if key not in self.memo:
            self.memo[key] = None  # cycles and repeated failures end here
            self.memo[key] = self._activation(tensor, axis, depth)
        return self.memo[key]

    def _activation(self, tensor: gs.Tensor, axis: int, depth: int) -> Stats | None:
        if depth > MAX_DEPTH:
            return None
        source, nodes = _activation_cone(tensor)
        pre = self.linear(source, axis, depth + 1)
        if pre is None or not nodes:
            return pre
        std = np.sqrt(np.maximum(pre.variance, 0.0))
        points = pre.mean[:, None] + std[:, None] * self.nodes[None, :]
        try:
            values = _evaluate(source, nodes, tensor, points.reshape(-1)).reshape(points.shape)
        except Exception:
            return None
        mean = values @ self.weights
        second = np.square(values) @ self.weights
        return Stats(mean, np.maximum(second - np.square(mean), 0.0))

    def linear(self, tensor: gs.Tensor, axis: int, depth: int) -> Stats | None:
        """Stats of a pre-activation tensor along ``axis`` (1: NCHW channels, -1: features)."""
        if isinstance(tensor, gs.Constant) or not tensor.inputs:
            return None
        node = tensor.inputs[0]
        op = node.op
        if op == "BatchNormalization" and axis == 1 and _constants(node.inputs[1:3]):
            scale, bias = (np.asarray(t.values, np.float64).reshape(-1) for t in node.inputs[1:3])
            return Stats(bias, np.square(scale))
        if op == "LayerNormalization" and axis == -1 and node.attrs.get("axis", -1) == -1:
            if not _constants(node.inputs[1:2]):
                return None
            scale = np.asarray(node.inputs[1].values, np.float64).reshape(-1)
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                bias = np.asarray(node.inputs[2].values, np.float64).reshape(-1)
            else:
                bias = np.zeros_like(scale)
            return Stats(bias, np.square(scale))
        if op == "Gather" and axis == -1 and isinstance(node.inputs[0], gs.Constant):
            table = np.asarray(node.inputs[0].values, np.float64)
            if table.ndim != 2 or node.attrs.get("axis", 0) != 0:
                return None
            return Stats(table.mean(axis=0), table.var(axis=0))
        if op in CARRY:
            return self.activation(node.inputs[0], axis, depth + 1)
        if op in ("Flatten", "Reshape", "Squeeze") and axis == -1:
            shape = node.inputs[0].shape  # [N, C, 1, 1] -> [N, C] after global pooling
            if shape and len(shape) == 4 and list(shape[2:]) == [1, 1]:
                return self.activation(node.inputs[0], 1, depth + 1)
            return None
        if op == "Conv" and axis == 1:
            return self._conv(node, depth)
        if op in ("Gemm", "MatMul") and axis == -1:
            return self._dense(node, depth)
        if op == "Add":
            return self._add(node, axis, depth)
        if op == "Concat":
            concat_axis = node.attrs.get("axis", 0)
            rank = len(tensor.shape or [])
            if rank and (concat_axis % rank) == (axis % rank):
                parts = [self.activation(t, axis, depth + 1) for t in node.inputs]
                if all(p is not None for p in parts):
                    return Stats(
                        np.concatenate([p.mean for p in parts]),
                        np.concatenate([p.variance for p in parts]),
                    )
            return None
        return None

    def _input(self, tensor: gs.Tensor, axis: int, size: int, depth: int) -> Stats:
        stats = self.activation(tensor, axis, depth + 1)
        if stats is None or stats.mean.shape[0] != size:
            if self.input_range is not None and not tensor.inputs:  # a graph input
                low, high = self.input_range
                return Stats(np.full(size, (low + high) / 2), np.full(size, (high - low) ** 2 / 12))
            return Stats(np.zeros(size), np.ones(size))
        return stats

    def _conv(self, node: gs.Node, depth: int) -> Stats | None:
        weight = node.inputs[1]
        groups = node.attrs.get("group", 1)
        if not isinstance(weight, gs.Constant):
            return None
        values = np.asarray(weight.values, np.float64)
        per_channel = values.reshape(values.shape[0], values.shape[1], -1)
        if groups == 1:
            source = self._input(node.inputs[0], 1, values.shape[1], depth)
            mean = per_channel.sum(axis=2) @ source.mean
            variance = np.square(per_channel).sum(axis=2) @ source.variance
        elif values.shape[1] == 1 and groups == values.shape[0]:  # depthwise
            source = self._input(node.inputs[0], 1, groups, depth)
            mean = per_channel[:, 0].sum(axis=1) * source.mean
            variance = np.square(per_channel[:, 0]).sum(axis=1) * source.variance
        else:
            return None
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            mean = mean + np.asarray(node.inputs[2].values, np.float64).reshape(-1)
        return Stats(mean, variance)

    def _dense(self, node: gs.Node, depth: int) -> Stats | None:
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or len(weight.shape) != 2:
            return None
        values = np.asarray(weight.values, np.float64)
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                return None
            values = values.T if node.attrs.get("transB", 0) else values
        source = self._input(node.inputs[0], -1, values.shape[0], depth)
        mean = source.mean @ values
        variance = source.variance @ np.square(values)
        if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            bias = np.asarray(node.inputs[2].values, np.float64).reshape(-1)
            mean = mean + (bias if bias.size == mean.size else bias.mean())
        return Stats(mean, variance)

    def _add(self, node: gs.Node, axis: int, depth: int) -> Stats | None:
        constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
        variables = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        parts = [self.activation(t, axis, depth + 1) for t in variables]
        if not parts or any(p is None for p in parts):
            return None
        size = parts[0].mean.shape[0]
        if any(p.mean.shape[0] != size for p in parts):
            return None
        mean = sum(p.mean for p in parts)
        variance = sum(p.variance for p in parts)
        for constant in constants:
            values = np.asarray(constant.values, np.float64)
            if values.size == 1:
                mean = mean + values.reshape(-1)[0]
            elif values.size == size:
                mean = mean + values.reshape(-1)
            else:
                return None
        return Stats(mean, variance)


def _constants(tensors) -> bool:
    return all(isinstance(t, gs.Constant) for t in tensors)


def model_moments(
    graph: gs.Graph,
    layers: list[LinearLayer],
    input_range: tuple[float, float] | None = None,
) -> dict[str, Moments]:
    """Moments of every layer's input activation that the model's parameters determine;
    float graph inputs are uniform over ``input_range`` when it is given."""
    propagator = _Propagator(input_range)
    moments: dict[str, Moments] = {}
    for layer in layers:
        name = layer.activation.name
        if name in moments:
            continue
        axis = 1 if layer.node.op == "Conv" else -1
        stats = propagator.activation(layer.activation, axis)
        if stats is None or stats.mean.shape[0] != layer.features:
            continue
        second = np.diag(stats.variance) + np.outer(stats.mean, stats.mean)
        moments[name] = Moments(second, stats.mean.copy(), 1)
    return moments


__all__ = ["model_moments"]
