"""Weights that act as y = W x on one activation: what OBS scores and compensates.

A group's consumer weight qualifies when its node is a Conv (group 1), a Gemm (A not
transposed) or a MatMul with a 2-D constant B, the weight is read directly, and no other node
reads it. Each such layer names the activation whose features it contracts, and the bias the
removed channels' mean contribution can move into: the node's own bias constant, the constant
of an Add right after a MatMul, or — for a bias-free Conv feeding only a BatchNormalization —
that BatchNormalization's mean (with the opposite sign).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.channel_graph import CONSUMER, Member, is_floating, node_key


@dataclass
class LinearLayer:
    node: gs.Node
    weight: gs.Constant
    axis: int  # the weight's input-feature axis
    out_axis: int  # the weight's output-channel axis
    activation: gs.Variable
    feature_axis: int  # the activation's contracted axis (negative: from the end)
    bias: gs.Constant | None = None
    bias_sign: float = 1.0  # -1 for a BatchNormalization mean; Gemm's alpha otherwise

    @property
    def features(self) -> int:
        return int(self.weight.shape[self.axis])

    @property
    def outputs(self) -> int:
        return int(self.weight.shape[self.out_axis])

    def _order(self, ndim: int) -> list[int]:
        middle = [a for a in range(ndim) if a not in (self.out_axis, self.axis)]
        return [self.out_axis, *middle, self.axis]

    def rows(self, values: np.ndarray | None = None) -> np.ndarray:
        """The weight as [outputs × kernel positions, features] in float64."""
        values = np.asarray(self.weight.values if values is None else values)
        moved = np.transpose(values, self._order(values.ndim))
        return moved.reshape(-1, self.features).astype(np.float64)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of ``rows``, in the weight's dtype and layout."""
        values = np.asarray(self.weight.values)
        order = self._order(values.ndim)
        moved_shape = [values.shape[a] for a in order]
        restored = np.transpose(rows.reshape(moved_shape), np.argsort(order))
        return np.ascontiguousarray(restored, dtype=values.dtype)


def _single_reader(tensor: gs.Tensor) -> bool:
    return len(tensor.outputs) == 1


def _bias_constant(tensor: gs.Tensor, outputs: int) -> gs.Constant | None:
    if (
        isinstance(tensor, gs.Constant)
        and _single_reader(tensor)
        and is_floating(tensor.dtype)
        and int(np.prod(tensor.shape)) == outputs
        and (len(tensor.shape) == 0 or tensor.shape[-1] == outputs)
    ):
        return tensor
    return None


def _conv(node: gs.Node, weight: gs.Constant, axis: int) -> LinearLayer | None:
    if node.attrs.get("group", 1) != 1 or axis != 1 or node.inputs[1] is not weight:
        return None
    layer = LinearLayer(node, weight, 1, 0, node.inputs[0], 1)
    if len(node.inputs) > 2 and node.inputs[2].name:
        layer.bias = _bias_constant(node.inputs[2], layer.outputs)
        return layer
    following = node.outputs[0].outputs
    if len(following) == 1 and following[0].op == "BatchNormalization":
        norm = following[0]
        if norm.inputs[0] is node.outputs[0] and len(norm.inputs) > 3:
            layer.bias = _bias_constant(norm.inputs[3], layer.outputs)
            layer.bias_sign = -1.0
    return layer


def _gemm(node: gs.Node, weight: gs.Constant, axis: int) -> LinearLayer | None:
    if node.attrs.get("transA", 0) or node.inputs[1] is not weight:
        return None
    trans_b = bool(node.attrs.get("transB", 0))
    if axis != (1 if trans_b else 0):
        return None
    layer = LinearLayer(node, weight, axis, 0 if trans_b else 1, node.inputs[0], 1)
    beta = float(node.attrs.get("beta", 1.0))
    if len(node.inputs) > 2 and node.inputs[2].name and beta != 0.0:
        # y = alpha·A·B + beta·C: a shift of A·B's output moves C by alpha / beta.
        layer.bias = _bias_constant(node.inputs[2], layer.outputs)
        layer.bias_sign = float(node.attrs.get("alpha", 1.0)) / beta
    return layer


def _matmul(node: gs.Node, weight: gs.Constant, axis: int) -> LinearLayer | None:
    if node.inputs[1] is not weight or len(weight.shape) != 2 or axis != 0:
        return None
    layer = LinearLayer(node, weight, 0, 1, node.inputs[0], -1)
    following = node.outputs[0].outputs
    if len(following) == 1 and following[0].op == "Add":
        add = following[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        layer.bias = _bias_constant(other, layer.outputs)
    return layer


LAYER_RULES = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}


class LayerIndex:
    """Linear layers of a graph, found once per consumer member."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.tensors = graph.tensors()
        keys = Counter(node_key(node) for node in graph.nodes)
        # a name two nodes share says nothing about which one a role means
        self.nodes = {node_key(n): n for n in graph.nodes if keys[node_key(n)] == 1}

    def find(self, member: Member) -> LinearLayer | None:
        tensor = self.tensors.get(member.tensor)
        if not isinstance(tensor, gs.Constant) or not _single_reader(tensor):
            return None
        if not is_floating(tensor.dtype):
            return None
        for role, node_name in member.roles:
            node = self.nodes.get(node_name)
            if role != CONSUMER or node is None or node.op not in LAYER_RULES:
                continue
            layer = LAYER_RULES[node.op](node, tensor, member.axis)
            if layer is not None and isinstance(layer.activation, gs.Variable):
                return layer
        return None


__all__ = ["LAYER_RULES", "LayerIndex", "LinearLayer"]
