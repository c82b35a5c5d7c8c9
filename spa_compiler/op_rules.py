"""How channels map through each ONNX op: one small function per op type.

A rule receives a ``RuleContext`` for one node and must account for every axis of every
input and output: ``link`` it to another axis, ``block`` it with a reason, or ``free`` it (the
op puts no constraint on it, e.g. an axis Expand creates). Axes a rule leaves unaccounted for
are blocked automatically, so a rule can be incomplete but never wrong. Ops without a rule
block all their axes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.channel_graph import (
    CONSUMER,
    CONTRACTED,
    PARAM,
    PRODUCER,
    ChannelGraph,
    Space,
    node_key,
)
from spa_compiler.errors import BadInputError

Rule = Callable[["RuleContext"], None]
RULES: dict[str, Rule] = {}

# Ops a weight may pass through on its way to the op that uses it.
WEIGHT_VIEW_OPS = {"Identity", "Cast", "Transpose", "DequantizeLinear", "CastLike"}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(function: Rule) -> Rule:
        for op in ops:
            RULES[op] = function
        return function

    return register


class RuleContext:
    """What a rule sees: one node, its tensors' shapes and constants, and the channel graph."""

    def __init__(self, channels: ChannelGraph, node: gs.Node, opset: int) -> None:
        self.channels = channels
        self.node = node
        self.opset = opset
        self.name = node_key(node)
        self.covered: set[Space] = set()

    # -- tensors --------------------------------------------------------------------------
    def input(self, i: int) -> str | None:
        if i < len(self.node.inputs) and self.node.inputs[i].name:
            return self.node.inputs[i].name
        return None

    def output(self, i: int) -> str | None:
        if i < len(self.node.outputs) and self.node.outputs[i].name:
            return self.node.outputs[i].name
        return None

    @property
    def data_inputs(self) -> list[str]:
        return [t.name for t in self.node.inputs if t.name]

    @property
    def outputs(self) -> list[str]:
        return [t.name for t in self.node.outputs if t.name]

    def shape(self, name: str) -> list[int | str | None] | None:
        return self.channels.shape(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def dim(self, name: str, axis: int) -> int | None:
        return self.channels.size((name, axis))

    def const(self, i: int) -> np.ndarray | None:
        """The value of input i if it is a constant (weights and folded shapes alike)."""
        if i >= len(self.node.inputs):
            return None
        tensor = self.node.inputs[i]
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def attr(self, key: str, default: object = None) -> Any:
        return self.node.attrs.get(key, default)

    # -- declarations ---------------------------------------------------------------------
    def link(
        self,
        a: str,
        axis_a: int,
        b: str,
        axis_b: int,
        a_idx: np.ndarray | None = None,
        b_idx: np.ndarray | None = None,
    ) -> None:
        self.covered.update({(a, axis_a), (b, axis_b)})
        self.channels.link((a, axis_a), (b, axis_b), a_idx, b_idx, node=self.name)

    def block(self, name: str, axis: int, reason: str) -> None:
        self.covered.add((name, axis))
        self.channels.block((name, axis), f"{self.node.op} '{self.name}': {reason}")

    def block_tensor(self, name: str, reason: str) -> None:
        for axis in range(self.rank(name) or 0):
            self.block(name, axis, reason)

    def block_all(self, reason: str) -> None:
        for name in [*self.data_inputs, *self.outputs]:
            self.block_tensor(name, reason)

    def free(self, name: str, axis: int) -> None:
        self.covered.add((name, axis))

    def factor(self, whole: tuple[str, int], factors: list[tuple[str, int]]) -> None:
        self.covered.update([whole, *factors])
        self.channels.factor(whole, factors, self.name, self.node.op)

    def role(self, name: str, axis: int, role: str) -> None:
        """Mark a weight axis as producing/reading channels, and the same on every constant it
        is computed from (a transposed, dequantized, masked, split or sliced weight)."""
        self.channels.add_role((name, axis), role, self.name)
        if not self.channels.from_constants(name) or self.channels.is_weight(name):
            return
        # Walk the channel graph back through constant-only tensors to the weights.
        seen, frontier = {(name, axis)}, [(name, axis)]
        while frontier:
            space = frontier.pop()
            if space not in self.channels.spaces:
                continue
            for neighbour in self.channels.spaces.neighbors(space):
                if neighbour in seen or not self.channels.from_constants(neighbour[0]):
                    continue
                seen.add(neighbour)
                if self.channels.is_weight(neighbour[0]):
                    self.channels.add_role(neighbour, role, self.name)
                frontier.append(neighbour)

    def same(self, a: str, b: str) -> None:
        """Link every axis of ``a`` to the same axis of ``b`` (equal ranks)."""
        for axis in range(self.rank(a) or 0):
            self.link(a, axis, b, axis)

    def broadcast(self, inputs: list[str], output: str) -> None:
        """Numpy broadcasting: an input axis equal to the output's links to it."""
        out_shape = self.shape(output) or []
        for name in inputs:
            shape = self.shape(name) or []
            offset = len(out_shape) - len(shape)
            for axis, dim in enumerate(shape):
                out_axis = offset + axis
                out_dim = out_shape[out_axis] if out_axis >= 0 else None
                if out_axis < 0:
                    self.block(name, axis, "broadcast beyond the output's rank")
                elif dim == 1 and out_dim != 1:
                    self.free(name, axis)
                elif dim == out_dim or not isinstance(dim, int) or not isinstance(out_dim, int):
                    self.link(name, axis, output, out_axis)
                    if self.channels.is_weight(name):
                        self.role(name, axis, PARAM)
                else:
                    self.block(name, axis, f"broadcast of {dim} to {out_dim}")


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def axes_of(node: gs.Node, input_index: int) -> list[int] | None:
    """A node's axes from its attribute or its constant input; None if computed at run time."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if input_index >= len(node.inputs) or not node.inputs[input_index].name:
        return []
    tensor = node.inputs[input_index]
    if not isinstance(tensor, gs.Constant):
        return None
    return [int(a) for a in np.asarray(tensor.values).reshape(-1)]


def axes_input_or_attr(ctx: RuleContext, input_index: int) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as a constant input (newer opsets)."""
    if "axes" in ctx.node.attrs:
        return [int(a) for a in ctx.attr("axes")]
    if ctx.input(input_index) is None:
        return []
    value = ctx.const(input_index)
    return None if value is None else [int(a) for a in value.reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Element-wise ops: every axis maps to itself.

UNARY_OPS = (
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Gelu",
    "Erf",
    "Clip",
    "Softplus",
    "Softsign",
    "Mish",
    "Elu",
    "Selu",
    "Celu",
    "ThresholdedRelu",
    "Identity",
    "Cast",
    "Neg",
    "Abs",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Not",
    "IsNaN",
    "IsInf",
    "Dropout",
    "Swish",
)


@rule(*UNARY_OPS)
def unary(ctx: RuleContext) -> None:
    data = ctx.input(0)
    for output in ctx.outputs:  # Dropout's mask has the data's shape too
        ctx.same(data, output)
    for name in ctx.data_inputs[1:]:  # Clip bounds, Dropout ratio: scalars
        ctx.block_tensor(name, "scalar operand")


BROADCAST_OPS = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Where",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
    "Mod",
    "PRelu",
    "BitShift",
    "CastLike",
)


@rule(*BROADCAST_OPS)
def broadcasting(ctx: RuleContext) -> None:
    inputs = ctx.data_inputs
    if ctx.node.op == "CastLike":
        inputs = inputs[:1]
        ctx.block_tensor(ctx.input(1), "type source of CastLike")
    ctx.broadcast(inputs, ctx.output(0))


@rule("QuantizeLinear", "DequantizeLinear")
def quantize(ctx: RuleContext) -> None:
    data, output = ctx.input(0), ctx.output(0)
    ctx.same(data, output)
    rank = ctx.rank(data) or 0
    axis = normalize_axis(int(ctx.attr("axis", 1)), rank)
    for i in (1, 2):
        name = ctx.input(i)
        if name is None:
            continue
        if ctx.rank(name) == 1 and rank > 0:
            ctx.link(name, 0, output, axis)
            ctx.role(name, 0, PARAM)
        else:
            ctx.block_tensor(name, "quantization parameter")
            if (ctx.rank(name) or 0) > 1:  # blocked quantization (opset 21's block_size):
                # one scale per block of channels, which pruning single channels would split
                ctx.block_tensor(data, "blocked quantization")
                ctx.block_tensor(output, "blocked quantization")


# ---------------------------------------------------------------------------------------------
# Weighted ops: the sources and consumers of channels.


def _spatial(ctx: RuleContext, names: list[str], first: int, reason: str) -> None:
    for name in names:
        for axis in range(first, ctx.rank(name) or 0):
            ctx.block(name, axis, reason)


@rule("Conv")
def conv(ctx: RuleContext) -> None:
    x, w, y, b = ctx.input(0), ctx.input(1), ctx.output(0), ctx.input(2)
    groups = int(ctx.attr("group", 1))
    ctx.link(x, 0, y, 0)
    _spatial(ctx, [x, y, w], 2, "spatial axis of a convolution")
    if b is not None:
        ctx.link(b, 0, y, 1)
        ctx.role(b, 0, PRODUCER)
    ctx.link(w, 0, y, 1)
    ctx.role(w, 0, PRODUCER)
    if groups == 1:
        ctx.link(x, 1, w, 1)
        if _is_weight_like(ctx, w):
            ctx.role(w, 1, CONSUMER)
        else:  # a weight computed at run time: input channels meet activations
            ctx.channels.add_role((x, 1), CONTRACTED, ctx.name)
            ctx.channels.add_role((w, 1), CONTRACTED, ctx.name)
        return
    _grouped(ctx, x, y, groups)
    ctx.block(w, 1, "in-group input position of a grouped convolution: whole groups are pruned")


def _grouped(ctx: RuleContext, x: str, y: str, groups: int) -> None:
    """Grouped convolution: input group g and output group g are removed together."""
    channels_in, channels_out = ctx.dim(x, 1), ctx.dim(y, 1)
    if channels_in is None or channels_out is None:
        ctx.block(x, 1, "grouped convolution with unknown channel count")
        ctx.block(y, 1, "grouped convolution with unknown channel count")
        return
    if groups < 1 or channels_in % groups or channels_out % groups:
        raise BadInputError(
            f"{ctx.node.op} '{ctx.name}': group {groups} does not divide its {channels_in} "
            f"input and {channels_out} output channels"
        )
    per_group_in, per_group_out = channels_in // groups, channels_out // groups
    inputs = np.arange(channels_in)
    ctx.link(x, 1, y, 1, inputs, (inputs // per_group_in) * per_group_out)
    outputs = np.arange(channels_out)
    ctx.link(y, 1, y, 1, outputs, (outputs // per_group_out) * per_group_out)


@rule("ConvTranspose")
def conv_transpose(ctx: RuleContext) -> None:
    x, w, y, b = ctx.input(0), ctx.input(1), ctx.output(0), ctx.input(2)
    groups = int(ctx.attr("group", 1))
    ctx.link(x, 0, y, 0)
    _spatial(ctx, [x, y, w], 2, "spatial axis of a transposed convolution")
    if b is not None:
        ctx.link(b, 0, y, 1)
        ctx.role(b, 0, PRODUCER)
    ctx.link(x, 1, w, 0)
    ctx.role(w, 0, CONSUMER)
    if groups == 1:
        ctx.link(w, 1, y, 1)
        ctx.role(w, 1, PRODUCER)
        return
    ctx.role(w, 0, PRODUCER)
    _grouped(ctx, x, y, groups)
    ctx.block(w, 1, "in-group output position of a grouped transposed convolution")


@rule("Gemm")
def gemm(ctx: RuleContext) -> None:
    a, b, y, c = ctx.input(0), ctx.input(1), ctx.output(0), ctx.input(2)
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a_m, a_k = (1, 0) if trans_a else (0, 1)
    b_k, b_n = (1, 0) if trans_b else (0, 1)
    ctx.link(a, a_m, y, 0)
    ctx.link(a, a_k, b, b_k)
    ctx.link(b, b_n, y, 1)
    _weight_roles(ctx, a, a_m, a_k, b, b_n, b_k)
    if c is not None:
        ctx.broadcast([c], y)
        rank_c = ctx.rank(c) or 0
        if _is_weight_like(ctx, c) and rank_c >= 1 and ctx.dim(c, rank_c - 1) == ctx.dim(y, 1):
            ctx.role(c, rank_c - 1, PRODUCER)


def _weight_roles(
    ctx: RuleContext, a: str, a_m: int | None, a_k: int, b: str, b_n: int | None, b_k: int
) -> None:
    weight_a, weight_b = _is_weight_like(ctx, a), _is_weight_like(ctx, b)
    if weight_b:
        ctx.role(b, b_k, CONSUMER)
        if b_n is not None:
            ctx.role(b, b_n, PRODUCER)
    if weight_a:
        ctx.role(a, a_k, CONSUMER)
        if a_m is not None:
            ctx.role(a, a_m, PRODUCER)
    if not weight_a and not weight_b:
        ctx.channels.add_role((a, a_k), CONTRACTED, ctx.name)
        ctx.channels.add_role((b, b_k), CONTRACTED, ctx.name)


def _is_weight_like(ctx: RuleContext, name: str) -> bool:
    """A constant, or a tensor computed from constants only (a weight behind views)."""
    return ctx.channels.from_constants(name)


@rule("MatMul")
def matmul(ctx: RuleContext) -> None:
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    rank_a, rank_b, rank_y = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if rank_a == 1 or rank_b == 1:
        if rank_a == 1 and rank_b == 1:
            ctx.link(a, 0, b, 0)
            _weight_roles(ctx, a, None, 0, b, None, 0)
        elif rank_a == 1:
            ctx.link(a, 0, b, rank_b - 2)
            ctx.link(b, rank_b - 1, y, rank_y - 1)
            _weight_roles(ctx, a, None, 0, b, rank_b - 1, rank_b - 2)
            _batch_axes(ctx, [(b, rank_b - 2)], y, rank_y - 1)
        else:
            ctx.link(a, rank_a - 1, b, 0)
            ctx.link(a, rank_a - 2, y, rank_y - 1)
            _weight_roles(ctx, a, rank_a - 2, rank_a - 1, b, None, 0)
            _batch_axes(ctx, [(a, rank_a - 2)], y, rank_y - 1)
        return
    ctx.link(a, rank_a - 2, y, rank_y - 2)
    ctx.link(a, rank_a - 1, b, rank_b - 2)
    ctx.link(b, rank_b - 1, y, rank_y - 1)
    _weight_roles(ctx, a, rank_a - 2, rank_a - 1, b, rank_b - 1, rank_b - 2)
    heads = not _is_weight_like(ctx, a) and not _is_weight_like(ctx, b)
    _batch_axes(ctx, [(a, rank_a - 2), (b, rank_b - 2)], y, rank_y - 2, heads)


def _batch_axes(
    ctx: RuleContext, operands: list[tuple[str, int]], y: str, y_batch: int, heads: bool = False
) -> None:
    """Leading (batch) axes broadcast like element-wise ops."""
    y_shape = ctx.shape(y) or []
    for name, batch_rank in operands:
        shape = ctx.shape(name) or []
        offset = y_batch - batch_rank
        for axis in range(batch_rank):
            y_axis = offset + axis
            if shape[axis] == 1 and y_shape[y_axis] != 1:
                ctx.free(name, axis)
            else:
                ctx.link(name, axis, y, y_axis)
                if heads:
                    ctx.channels.head_spaces.add((name, axis))
                    ctx.channels.head_spaces.add((y, y_axis))


@rule("Einsum")
def einsum(ctx: RuleContext) -> None:
    equation = str(ctx.attr("equation", b"")).replace(" ", "")
    if isinstance(ctx.attr("equation"), bytes):
        equation = ctx.attr("equation").decode().replace(" ", "")
    if "->" not in equation or "." in equation:
        ctx.block_all(f"Einsum equation '{equation}' (implicit output or ellipsis) not mapped")
        return
    lhs, out_letters = equation.split("->")
    operand_letters = lhs.split(",")
    inputs, y = ctx.data_inputs, ctx.output(0)
    if len(operand_letters) != len(inputs) or any(
        len(set(letters)) != len(letters) for letters in [*operand_letters, out_letters]
    ):
        ctx.block_all(f"Einsum equation '{equation}' repeats an index")
        return
    weights = [_is_weight_like(ctx, name) for name in inputs]
    for name, letters, is_weight in zip(inputs, operand_letters, weights, strict=True):
        for axis, letter in enumerate(letters):
            if letter in out_letters:
                ctx.link(name, axis, y, out_letters.index(letter))
                shared = sum(letter in other for other in operand_letters) > 1
                if is_weight:
                    ctx.role(name, axis, PARAM if shared else PRODUCER)
                elif shared and not any(weights):
                    ctx.channels.head_spaces.add((name, axis))
            else:
                partners = [
                    (other, other_letters.index(letter))
                    for other, other_letters in zip(inputs, operand_letters, strict=True)
                    if other != name and letter in other_letters
                ]
                if not partners:
                    ctx.block(name, axis, f"summed out by Einsum '{equation}'")
                for other, other_axis in partners:
                    ctx.link(name, axis, other, other_axis)
                partner_weight = any(
                    weight
                    for other, other_letters, weight in zip(
                        inputs, operand_letters, weights, strict=True
                    )
                    if other != name and letter in other_letters
                )
                if is_weight:
                    ctx.role(name, axis, CONSUMER)
                elif not partner_weight:
                    ctx.channels.add_role((name, axis), CONTRACTED, ctx.name)


# ---------------------------------------------------------------------------------------------
# Normalizations.


@rule("BatchNormalization", "InstanceNormalization")
def per_channel_norm(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    if ctx.node.op == "InstanceNormalization":
        # Statistics are taken over the spatial axes: only N and C are independent.
        ctx.link(x, 0, y, 0)
        ctx.link(x, 1, y, 1)
        _spatial(ctx, [x, y], 2, "normalized over by InstanceNormalization")
    else:
        ctx.same(x, y)
    for name in ctx.data_inputs[1:]:
        ctx.link(name, 0, y, 1)
        ctx.role(name, 0, PARAM)
    for name in ctx.outputs[1:]:  # training-mode running statistics
        ctx.link(name, 0, y, 1)


@rule("LayerNormalization")
def layer_norm(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    first = normalize_axis(int(ctx.attr("axis", -1)), rank)
    for axis in range(rank):
        if axis < first:
            ctx.link(x, axis, y, axis)
        else:
            reason = "normalized over by LayerNormalization (removing channels changes the "
            reason += "statistics of the channels kept)"
            ctx.block(x, axis, reason)
            ctx.block(y, axis, reason)
    for name in ctx.data_inputs[1:]:
        ctx.broadcast([name], y)
    for name in ctx.outputs[1:]:  # Mean, InvStdDev
        for axis in range(min(first, ctx.rank(name) or 0)):
            ctx.link(name, axis, y, axis)
        for axis in range(first, ctx.rank(name) or 0):
            ctx.free(name, axis)


@rule("GroupNormalization")
def group_norm(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    groups = int(ctx.attr("num_groups"))
    ctx.link(x, 0, y, 0)
    _spatial(ctx, [x, y], 2, "normalized over by GroupNormalization")
    channels = ctx.dim(x, 1)
    if channels is None:
        ctx.block(x, 1, "unknown channel count")
        return
    per_group = channels // groups
    index = np.arange(channels)
    ctx.link(x, 1, y, 1)
    # Channels of one normalization group share statistics: only whole groups are removable.
    ctx.link(y, 1, y, 1, index, (index // per_group) * per_group)
    for name in ctx.data_inputs[1:]:
        size = ctx.dim(name, 0)
        if size == channels:
            ctx.link(name, 0, y, 1)
        elif size == groups:
            ctx.link(name, 0, y, 1, np.arange(groups), np.arange(groups) * per_group)
        else:
            ctx.block(name, 0, "unexpected GroupNormalization parameter size")
        ctx.role(name, 0, PARAM)


@rule("LpNormalization", "MeanVarianceNormalization", "LRN")
def cross_channel_norm(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    if ctx.node.op == "LpNormalization":
        coupled = {normalize_axis(int(ctx.attr("axis", -1)), rank)}
    elif ctx.node.op == "LRN":
        coupled = {1}
    else:
        coupled = {normalize_axis(a, rank) for a in ctx.attr("axes", [0, 2, 3])}
    for axis in range(rank):
        if axis in coupled:
            ctx.block(x, axis, f"channels are normalized together by {ctx.node.op}")
            ctx.block(y, axis, f"channels are normalized together by {ctx.node.op}")
        else:
            ctx.link(x, axis, y, axis)


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    default = -1 if ctx.opset >= 13 else 1
    axis = normalize_axis(int(ctx.attr("axis", default)), rank)
    coupled = {axis} if ctx.opset >= 13 else set(range(axis, rank))
    for i in range(rank):
        if i in coupled:
            ctx.block(x, i, f"{ctx.node.op} axis")
            ctx.block(y, i, f"{ctx.node.op} axis")
        else:
            ctx.link(x, i, y, i)


# ---------------------------------------------------------------------------------------------
# Reductions and pooling.

REDUCE_OPS = (
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "ArgMax",
    "ArgMin",
)


@rule(*REDUCE_OPS)
def reduce(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    if ctx.node.op in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [int(ctx.attr("axis", 0))]
    else:
        axes = axes_input_or_attr(ctx, 1)
        if ctx.input(1) is not None:
            ctx.block_tensor(ctx.input(1), "axes operand")
    if axes is None:
        ctx.block_all("reduction axes computed at run time")
        return
    if not axes:
        noop = int(ctx.attr("noop_with_empty_axes", 0))
        axes = [] if noop else list(range(rank))
    reduced = {normalize_axis(a, rank) for a in axes}
    keepdims = int(ctx.attr("keepdims", 1))
    reason = f"reduced by {ctx.node.op} (every channel feeds every output)"
    if ctx.node.op == "ReduceMean" and _feeds_normalization(ctx.node):
        reason = "normalized over by a LayerNorm/RMSNorm pattern (ReduceMean): removing channels "
        reason += "changes the statistics of the channels kept"
    out_axis = 0
    for axis in range(rank):
        if axis in reduced:
            ctx.block(x, axis, reason)
            if keepdims:
                ctx.free(y, out_axis)
                out_axis += 1
        else:
            ctx.link(x, axis, y, out_axis)
            out_axis += 1


def _feeds_normalization(node: gs.Node) -> bool:
    frontier, seen = [node], 0
    for _ in range(4):
        following = []
        for current in frontier:
            for output in current.outputs:
                following.extend(output.outputs)
        if any(n.op in ("Sqrt", "Reciprocal", "Div", "Pow") for n in following):
            return True
        frontier, seen = following, seen + len(following)
        if seen > 64:
            break
    return False


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pooling(ctx: RuleContext) -> None:
    x = ctx.input(0)
    for index, y in enumerate(ctx.outputs):
        if index == 1:  # MaxPool's Indices are flat positions that count the channels
            ctx.block_tensor(y, "MaxPool indices encode channel positions")
            ctx.block(x, 1, "MaxPool indices encode channel positions")
            continue
        ctx.link(x, 0, y, 0)
        ctx.link(x, 1, y, 1)
        _spatial(ctx, [y], 2, "spatial axis of pooling")
    _spatial(ctx, [x], 2, "spatial axis of pooling")


# ---------------------------------------------------------------------------------------------
# Data movement.


def _stack_parts(ctx: RuleContext, whole: str, parts: list[str], axis: int, what: str) -> None:
    """``whole`` is ``parts`` laid end to end along ``axis`` (Concat output, Split input)."""
    offset: int | None = 0
    for part in parts:
        for i in range(ctx.rank(whole) or 0):
            if i != axis:
                ctx.link(part, i, whole, i)
        size = ctx.dim(part, axis)
        if offset is None or size is None:
            ctx.block(part, axis, f"{what} of unknown size")
            ctx.block(whole, axis, f"{what} of unknown size")
            offset = None
            continue
        ctx.link(part, axis, whole, axis, np.arange(size), offset + np.arange(size))
        offset += size


@rule("Concat")
def concat(ctx: RuleContext) -> None:
    y = ctx.output(0)
    axis = normalize_axis(int(ctx.attr("axis")), ctx.rank(y) or 0)
    _stack_parts(ctx, y, ctx.data_inputs, axis, "Concat of an input")


@rule("Split")
def split(ctx: RuleContext) -> None:
    x = ctx.input(0)
    axis = normalize_axis(int(ctx.attr("axis", 0)), ctx.rank(x) or 0)
    if ctx.input(1) is not None:
        ctx.block_tensor(ctx.input(1), "split sizes operand")
    _stack_parts(ctx, x, ctx.outputs, axis, "Split into parts")


def slice_positions(size: int, start: int, end: int, step: int) -> np.ndarray:
    """The indices ONNX's Slice picks from an axis of ``size``. Not Python's slicing: with a
    negative step ONNX clamps the start to [0, size-1] and the end to [-1, size-1], so a start
    below -size still picks index 0 where Python's slice picks nothing."""
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return np.arange(start, end, step, dtype=np.int64)


@rule("Slice")
def slice_(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    if ctx.opset >= 10:
        values = [ctx.const(i) if ctx.input(i) is not None else None for i in range(1, 5)]
        for i in range(1, 5):
            if ctx.input(i) is not None:
                ctx.block_tensor(ctx.input(i), "slice bounds operand")
        starts, ends, axes, steps = values
        if (
            starts is None
            or ends is None
            or (ctx.input(3) and axes is None)
            or (ctx.input(4) and steps is None)
        ):
            ctx.block_all("Slice bounds computed at run time")
            return
    else:
        starts = np.array(ctx.attr("starts"))
        ends = np.array(ctx.attr("ends"))
        axes = np.array(ctx.attr("axes")) if "axes" in ctx.node.attrs else None
        steps = None
    axes_list = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps_list = [1] * len(starts) if steps is None else [int(s) for s in steps]
    if 0 in steps_list:
        ctx.block_all("Slice with step 0 (invalid)")
        return
    sliced = {}
    for start, end, axis, step in zip(starts, ends, axes_list, steps_list, strict=True):
        sliced[normalize_axis(axis, rank)] = (int(start), int(end), step)
    for axis in range(rank):
        if axis not in sliced:
            ctx.link(x, axis, y, axis)
            continue
        size = ctx.dim(x, axis)
        if size is None:
            ctx.block(x, axis, "sliced axis of unknown size")
            ctx.block(y, axis, "sliced axis of unknown size")
            continue
        start, end, step = sliced[axis]
        selected = slice_positions(size, start, end, step)
        ctx.link(y, axis, x, axis, np.arange(len(selected)), selected)


@rule("Gather")
def gather(ctx: RuleContext) -> None:
    data, indices, y = ctx.input(0), ctx.input(1), ctx.output(0)
    rank = ctx.rank(data) or 0
    axis = normalize_axis(int(ctx.attr("axis", 0)), rank)
    index_rank = ctx.rank(indices) or 0
    value = ctx.const(1)
    for i in range(rank):
        if i < axis:
            ctx.link(data, i, y, i)
        elif i > axis:
            ctx.link(data, i, y, i - 1 + index_rank)
            if ctx.channels.is_weight(data):
                ctx.role(data, i, PRODUCER)  # an embedding table produces channels
    if value is not None and value.ndim == 1 and ctx.dim(data, axis) is not None:
        selected = np.where(value < 0, value + ctx.dim(data, axis), value)
        ctx.link(y, axis, data, axis, np.arange(len(selected)), selected)
        ctx.block_tensor(indices, "constant gather indices")
        return
    ctx.block(data, axis, "gathered by indices known only at run time")
    for i in range(index_rank):
        ctx.link(indices, i, y, axis + i)


@rule("Reshape")
def reshape(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    shape_input = ctx.input(1)
    if shape_input is not None:
        ctx.block_tensor(shape_input, "reshape target operand")
        if ctx.const(1) is None:
            uncoupled = _uncoupled_positions(ctx, 1)
            if uncoupled is None:
                ctx.block_all("Reshape target computed at run time in a form spa cannot rewrite")
                return
            for position in uncoupled:
                ctx.block(y, position, "size set at run time by a computation spa cannot follow")
    regroup(ctx, x, y)


def _uncoupled_positions(ctx: RuleContext, index: int) -> list[int] | None:
    """For a Reshape/Expand target computed at run time: the positions that hold a size
    neither constant nor coupled to this output axis by a Shape rule (``_shape_reads``), to
    be blocked; None if spa could not rewrite the target. A target is rewritable if it is a
    Concat of 1-D parts of known length (the pruning pass rewrites the constant parts) or if
    every position is a coupled size read (it follows the new sizes by itself)."""
    tensor = ctx.node.inputs[index]
    length = tensor.shape[0] if tensor.shape is not None and len(tensor.shape) == 1 else None
    if not isinstance(length, int):
        return None
    output = ctx.output(0)
    shift = (ctx.rank(output) or 0) - length if ctx.node.op == "Expand" else 0
    coupled = {
        target_axis - shift
        for shape_node in _shape_nodes_behind(tensor)
        for _, name, target_axis, _ in _shape_reads(ctx, shape_node).couplings
        if name == output
    }
    concat = concat_behind(tensor)
    if concat is None:
        return [] if coupled >= set(range(length)) else None
    positions, position = [], 0
    for part in concat.inputs:
        shape = part.shape
        size = shape[0] if shape is not None and len(shape) == 1 else None
        if not isinstance(size, int):
            return None
        if not isinstance(part, gs.Constant):
            positions.extend(p for p in range(position, position + size) if p not in coupled)
        position += size
    return positions if position == length else None


# Ops through which ``_shape_reads`` may carry a size into a target.
_SIZE_CARRIERS = ("Concat", "Cast", "Where", "Reshape", "Gather", "Slice", "Squeeze", "Unsqueeze")


def _shape_nodes_behind(tensor: gs.Tensor) -> list[gs.Node]:
    """Shape nodes whose read sizes may reach ``tensor`` through the ops they are followed by."""
    found: list[gs.Node] = []
    frontier, seen = [tensor], {id(tensor)}
    for _ in range(MAX_SHAPE_PATH + 1):
        following = []
        for current in frontier:
            node = current.inputs[0] if current.inputs else None
            if node is None:
                continue
            if node.op == "Shape":
                if node not in found:
                    found.append(node)
                continue
            if node.op not in _SIZE_CARRIERS and node.op != "Mul":
                continue
            for source in node.inputs:
                if id(source) not in seen and not isinstance(source, gs.Constant):
                    seen.add(id(source))
                    following.append(source)
        frontier = following
    return found


def concat_behind(vector: gs.Tensor) -> gs.Node | None:
    """The Concat that builds a 1-D shape vector, looking through the position-keeping ops
    exporters put after it: a Cast to another integer type (tf2onnx), and torch's legacy
    expand export's Where(Equal(v, -1), ones, v) and Reshape of the vector to its own
    length."""
    reader = None
    for _ in range(4):
        node = vector.inputs[0] if vector.inputs else None
        if node is None:
            return None
        # The rewrite changes the Concat's constant entries in place: whatever else reads a
        # vector on the way sees the new sizes, which only other reshape targets (analysed on
        # their own) and placeholder tests (sizes stay positive) may.
        if not all(
            user is reader
            or (user.op in ("Reshape", "Expand") and user.inputs[1:2] == [vector]
                and user.inputs[0] is not vector)
            or _compared_with_negatives(user, vector)
            for user in vector.outputs
        ):  # fmt: skip
            return None
        reader = node
        if node.op == "Concat":
            return node
        if node.op == "Where" and len(node.inputs) == 3:
            # Only torch's placeholder test keeps every size of v: under another condition a
            # position may come from the other branch, which a rewrite of v would not reach.
            if not _placeholder_where(node, node.inputs[2]):
                return None
            vector = node.inputs[2]
            continue
        keeps = (node.op == "Reshape" and node.inputs[0].shape == vector.shape) or (
            node.op == "Cast" and int(node.attrs.get("to", 0)) in _INTEGER_TYPES
        )
        if not keeps:
            return None
        vector = node.inputs[0]
    return None


@rule("Flatten")
def flatten(ctx: RuleContext) -> None:
    regroup(ctx, ctx.input(0), ctx.output(0))


def regroup(ctx: RuleContext, x: str, y: str) -> None:
    """Map axes between two shapes with the same element order (Reshape, Flatten).

    Equal leading and trailing dims map one to one. The axes between are refined into their
    common factors (a virtual tensor): each side's axis is a product of factors, so splits,
    merges and regroupings (GroupNorm's [N, C, H, W] -> [N, G, C/G*H*W]) are all
    factorizations. Dims of unknown size in that middle part are blocked.
    """
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None:
        ctx.block_all("reshape between shapes spa does not know")
        return
    for axis, dim in enumerate(in_shape):
        if dim == 1:
            ctx.free(x, axis)
    for axis, dim in enumerate(out_shape):
        if dim == 1:
            ctx.free(y, axis)
    ins = [(a, d) for a, d in enumerate(in_shape) if d != 1]
    outs = [(a, d) for a, d in enumerate(out_shape) if d != 1]

    def same(i: int, j: int) -> bool:
        a, b = ins[i][1], outs[j][1]
        if a is not None and a == b:
            return True
        if isinstance(a, int) or isinstance(b, int):
            return False
        # Two different names for unknown sizes are equal when everything else is static and
        # holds the same number of elements.
        rest_in = [d for k, (_, d) in enumerate(ins) if k != i % len(ins)]
        rest_out = [d for k, (_, d) in enumerate(outs) if k != j % len(outs)]
        static = all(isinstance(d, int) for d in rest_in + rest_out)
        return static and int(np.prod(rest_in)) == int(np.prod(rest_out))

    while ins and outs and same(0, 0):
        ctx.link(x, ins.pop(0)[0], y, outs.pop(0)[0])
    while ins and outs and same(-1, -1):
        ctx.link(x, ins.pop()[0], y, outs.pop()[0])
    if not ins and not outs:
        return
    # Leading runs that merge a dim of unknown size (B*S for a Gemm): equal symbolic products,
    # never prunable (they hold the batch), so block them and factor the rest.
    prefix = _symbolic_prefix([d for _, d in ins], [d for _, d in outs])
    if prefix is not None:
        count_in, count_out = prefix
        reason = "merged with a dimension of unknown size"
        for axis, _ in ins[:count_in]:
            ctx.block(x, axis, reason)
        for axis, _ in outs[:count_out]:
            ctx.block(y, axis, reason)
        ins, outs = ins[count_in:], outs[count_out:]
        if not ins and not outs:
            return
    refined = _refine([d for _, d in ins], [d for _, d in outs])
    if refined is None:
        reason = f"reshape {in_shape} -> {out_shape} mixes axes spa cannot factor"
        for axis, _ in ins:
            ctx.block(x, axis, reason)
        for axis, _ in outs:
            ctx.block(y, axis, reason)
        return
    sizes, in_parts, out_parts = refined
    virtual = f"{ctx.name}::factors"
    ctx.channels.virtual[virtual] = sizes
    for (axis, _), parts in zip(ins, in_parts, strict=True):
        _attach(ctx, (x, axis), [(virtual, p) for p in parts])
    for (axis, _), parts in zip(outs, out_parts, strict=True):
        _attach(ctx, (y, axis), [(virtual, p) for p in parts])


def _symbolic_prefix(in_dims: list, out_dims: list) -> tuple[int, int] | None:
    """Shortest leading runs with equal products that contain a symbolic dim, if any."""
    if all(isinstance(d, int) for d in in_dims[:1] + out_dims[:1]):
        return None
    import sympy

    def symbol(dim: str) -> sympy.Expr:
        # onnxruntime writes merged dims as products ("8*batch"); other names are opaque.
        parts = dim.split("*")
        if len(parts) > 1 and all(re.fullmatch(r"[0-9]+|[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
            return sympy.Mul(
                *(sympy.Integer(int(p)) if p.isdigit() else sympy.Symbol(p) for p in parts)
            )
        return sympy.Symbol(dim)

    def product(dims: list) -> sympy.Expr | None:
        total = sympy.Integer(1)
        for d in dims:
            if d is None:
                return None
            total *= sympy.Integer(d) if isinstance(d, int) else symbol(d)
        return total

    for size in range(2, len(in_dims) + len(out_dims) + 1):
        for count_in in range(1, min(size, len(in_dims) + 1)):
            count_out = size - count_in
            if not 1 <= count_out <= len(out_dims):
                continue
            left, right = product(in_dims[:count_in]), product(out_dims[:count_out])
            if left is not None and right is not None and sympy.simplify(left - right) == 0:
                return count_in, count_out
    return None


def _attach(ctx: RuleContext, whole: tuple[str, int], parts: list[tuple[str, int]]) -> None:
    if len(parts) == 1:
        ctx.link(whole[0], whole[1], parts[0][0], parts[0][1])
    else:
        ctx.factor(whole, parts)


def _refine(
    in_dims: list, out_dims: list
) -> tuple[list[int], list[list[int]], list[list[int]]] | None:
    """Common refinement of two factorizations of the same size, or None if there is none."""
    if not all(isinstance(d, int) for d in in_dims + out_dims) or not in_dims or not out_dims:
        return None
    if int(np.prod(in_dims)) != int(np.prod(out_dims)):
        return None
    sizes: list[int] = []
    in_parts: list[list[int]] = [[] for _ in in_dims]
    out_parts: list[list[int]] = [[] for _ in out_dims]
    i = j = 0
    a, b = in_dims[0], out_dims[0]
    while i < len(in_dims) and j < len(out_dims):
        step = min(a, b)
        if max(a, b) % step:
            return None
        in_parts[i].append(len(sizes))
        out_parts[j].append(len(sizes))
        sizes.append(step)
        a, b = a // step, b // step
        if a == 1:
            i += 1
            a = in_dims[i] if i < len(in_dims) else 1
        if b == 1:
            j += 1
            b = out_dims[j] if j < len(out_dims) else 1
    return sizes, in_parts, out_parts


@rule("Transpose")
def transpose(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    perm = ctx.attr("perm") or list(reversed(range(rank)))
    for out_axis, in_axis in enumerate(perm):
        ctx.link(x, int(in_axis), y, out_axis)


@rule("Squeeze", "Unsqueeze")
def squeeze(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    if ctx.input(1) is not None:
        ctx.block_tensor(ctx.input(1), "axes operand")
    axes = axes_input_or_attr(ctx, 1)
    if axes is None:
        ctx.block_all("axes computed at run time")
        return
    in_rank, out_rank = ctx.rank(x) or 0, ctx.rank(y) or 0
    if ctx.node.op == "Squeeze":
        if not axes:
            axes = [a for a, d in enumerate(ctx.shape(x) or []) if d == 1]
        dropped = {normalize_axis(a, in_rank) for a in axes}
        kept_in = [a for a in range(in_rank) if a not in dropped]
        kept_out = list(range(out_rank))
        for a in dropped:
            ctx.free(x, a)
    else:
        added = {normalize_axis(a, out_rank) for a in axes}
        kept_in = list(range(in_rank))
        kept_out = [a for a in range(out_rank) if a not in added]
        for a in added:
            ctx.free(y, a)
    for a, b in zip(kept_in, kept_out, strict=True):
        ctx.link(x, a, y, b)


@rule("Expand")
def expand(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    ctx.block_tensor(ctx.input(1), "target shape operand")
    x_shape, y_shape = ctx.shape(x) or [], ctx.shape(y) or []
    static_target = ctx.const(1) is not None
    uncoupled = [] if static_target else _uncoupled_positions(ctx, 1)
    if uncoupled is None:
        # The target holds every output size; spa can only rewrite constants it can find.
        ctx.block_all("Expand target computed at run time in a form spa cannot rewrite")
        return
    shift = len(y_shape) - (ctx.shape(ctx.input(1)) or [len(y_shape)])[0]
    for position in uncoupled:
        ctx.block(y, position + shift, "size set at run time by a computation spa cannot follow")
    offset = len(y_shape) - len(x_shape)
    for axis in range(len(y_shape)):
        in_axis = axis - offset
        if in_axis >= 0 and x_shape[in_axis] == y_shape[axis]:
            ctx.link(x, in_axis, y, axis)
            continue
        if in_axis >= 0:
            ctx.free(x, in_axis)
        if static_target:
            ctx.free(y, axis)  # repeated copies; a rewrite shrinks the target shape
        else:
            ctx.block(y, axis, "Expand target computed at run time")


@rule("Tile")
def tile(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    ctx.block_tensor(ctx.input(1), "repeats operand")
    repeats = ctx.const(1)
    if repeats is None:
        ctx.block_all("Tile repeats computed at run time")
        return
    for axis, count in enumerate(repeats.reshape(-1).tolist()):
        size = ctx.dim(x, axis)
        if count == 1:
            ctx.link(x, axis, y, axis)
        elif size is None:
            ctx.block(x, axis, "tiled axis of unknown size")
            ctx.block(y, axis, "tiled axis of unknown size")
        else:
            out = np.arange(size * count)
            ctx.link(y, axis, x, axis, out, out % size)


@rule("Pad")
def pad(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    for i in range(1, 4):
        if ctx.input(i) is not None:
            ctx.block_tensor(ctx.input(i), "pad operand")
    pads = np.array(ctx.attr("pads")) if "pads" in ctx.node.attrs else ctx.const(1)
    axes = ctx.const(3) if ctx.input(3) is not None else None
    if pads is None or (ctx.input(3) is not None and axes is None):
        ctx.block_all("pads computed at run time")
        return
    axes_list = list(range(rank)) if axes is None else [normalize_axis(int(a), rank) for a in axes]
    pads = pads.reshape(-1)
    padded = {
        axis for k, axis in enumerate(axes_list) if pads[k] != 0 or pads[k + len(axes_list)] != 0
    }
    for axis in range(rank):
        if axis in padded:
            ctx.block(x, axis, "padded axis")
            ctx.block(y, axis, "padded axis")
        else:
            ctx.link(x, axis, y, axis)


@rule("Resize", "Upsample")
def resize(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    for name in ctx.data_inputs[1:]:
        ctx.block_tensor(name, "resize operand")
    x_shape, y_shape = ctx.shape(x), ctx.shape(y)
    if x_shape is None or y_shape is None or len(x_shape) != len(y_shape):
        ctx.block_all("resize between shapes spa does not know")
        return
    scales = ctx.const(2) if ctx.node.op == "Resize" else ctx.const(1)
    rank = len(x_shape)
    axes = [normalize_axis(int(a), rank) for a in ctx.attr("axes", list(range(rank)))]
    full_scales = np.ones(rank)
    if scales is not None and scales.size == len(axes):
        full_scales[axes] = scales.reshape(-1)
    for axis, (a, b) in enumerate(zip(x_shape, y_shape, strict=True)):
        kept = a == b and float(full_scales[axis]) == 1.0
        if kept and axis < 2:
            ctx.link(x, axis, y, axis)
        else:
            ctx.block(x, axis, "resized axis")
            ctx.block(y, axis, "resized axis")


@rule("Trilu")
def trilu(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x) or 0
    if ctx.input(1) is not None:
        ctx.block_tensor(ctx.input(1), "diagonal offset operand")
    for axis in range(rank):
        if axis >= rank - 2:
            ctx.block(x, axis, "position-dependent mask of Trilu")
            ctx.block(y, axis, "position-dependent mask of Trilu")
        else:
            ctx.link(x, axis, y, axis)


@rule("Shape", "Size")
def shape_reader(ctx: RuleContext) -> None:
    """A size read at run time is fine where it only becomes the same-position dim of a
    Reshape or Expand target: after pruning it reads the new size, so the two axes are
    coupled (linked). The read sizes are followed entry by entry (``_shape_reads``): an axis
    whose size reaches any other use is blocked; an axis whose size no use reads (only the
    batch entry is picked by a Gather or Slice of constant indices) is free."""
    x = ctx.input(0)
    rank = ctx.rank(x) or 0
    for name in ctx.outputs:
        ctx.block_tensor(name, "shape value")
    if ctx.node.op == "Size":
        ctx.block_tensor(x, "its size is read by Size")
        return
    if ctx.rank(x) is None:
        ctx.block_all("Shape of a tensor of unknown rank")
        return
    reads = _shape_reads(ctx, ctx.node)
    for axis in range(rank):
        if axis in reads.unfollowed:
            ctx.block(x, axis, "its size is read by a Shape computation")
        else:
            ctx.free(x, axis)
    for axis, target, target_axis, scale in reads.couplings:
        size, target_size = ctx.dim(x, axis), ctx.dim(target, target_axis)
        if scale == 1 or size is None:
            ctx.link(x, axis, target, target_axis)
        elif target_size == size * scale:
            # Size read, multiplied by a constant (repeat_kv's kv_heads * n_rep): channel i
            # owns a block of ``scale`` positions of the target axis.
            ctx.link(
                x,
                axis,
                target,
                target_axis,
                np.repeat(np.arange(size), scale),
                np.arange(size * scale),
            )
        else:
            reason = "its size is read and scaled into an unrelated shape"
            ctx.block(x, axis, reason)
            ctx.block(target, target_axis, reason)


Coupling = tuple[int, str, int, int]  # axis read, tensor, its axis, scale
# ONNX's int32, int64, uint32, uint64: a size survives a Cast to them unchanged.
_INTEGER_TYPES = (6, 7, 12, 13)
# How far a read size is followed through shape arithmetic before spa gives up on it.
MAX_SHAPE_PATH = 16


@dataclass
class ShapeReads:
    """Where the sizes a Shape node reads end up: coupled to Reshape/Expand output axes, or
    in a use spa cannot follow (those axes must keep their size)."""

    couplings: list[Coupling] = field(default_factory=list)
    unfollowed: set[int] = field(default_factory=set)


def _shape_reads(ctx: RuleContext, node: gs.Node) -> ShapeReads:
    """Follow each entry of a Shape node's output (the size of one axis) through the shape
    arithmetic exporters write. Only ops that move entries without changing them are
    followed: Gather and Slice of constant indices, Cast to an integer type, Squeeze and
    Unsqueeze between a scalar and a one-entry vector, Concat, a Reshape of the vector to its
    own length, torch's Where(Equal(v, -1), ones, v), and a scalar's Mul by a positive integer
    constant. An entry reaching a Reshape/Expand target is coupled to that output axis; one
    reaching anything else (a graph output, a sub-graph, other arithmetic) is unfollowed."""
    rank = len(node.inputs[0].shape or [])
    start = normalize_axis(int(node.attrs.get("start", 0)), rank)
    end = max(0, min(rank, normalize_axis(int(node.attrs.get("end", rank)), rank)))
    start = max(0, min(rank, start))
    reads = ShapeReads()
    entries: list[int | None] = list(range(start, end))
    _follow_sizes(node.outputs[0], entries, False, 1, reads, _opaque_tensors(ctx), 0)
    return reads


def _opaque_tensors(ctx: RuleContext) -> set[str]:
    """Tensors whose readers spa does not see as nodes: graph outputs and the tensors that
    If/Loop/Scan sub-graphs read from the enclosing graph."""
    cached = ctx.channels.__dict__.get("_opaque_tensors")
    if cached is None:
        graph = ctx.channels.graph
        cached = {t.name for t in graph.outputs}
        for node in graph.nodes:
            cached.update(outer_scope_inputs(node))
        ctx.channels.__dict__["_opaque_tensors"] = cached
    return cached


def _integer_constant(tensor: gs.Tensor) -> np.ndarray | None:
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    return values if np.issubdtype(values.dtype, np.integer) else None


def _follow_sizes(
    value: gs.Tensor,
    entries: list[int | None],
    scalar: bool,
    scale: int,
    reads: ShapeReads,
    opaque: set[str],
    depth: int,
) -> None:
    """``value`` holds, at position k, the size of axis ``entries[k]`` times ``scale`` (None:
    not a size this Shape read); a scalar when ``scalar`` (one entry)."""
    read = {axis for axis in entries if axis is not None}
    if not read:
        return
    if depth > MAX_SHAPE_PATH or value.name in opaque:
        reads.unfollowed.update(read)
        return
    for user in value.outputs:
        moved = _moved_entries(user, value, entries, scalar, scale)
        if moved is None:
            reads.unfollowed.update(read)
            continue
        if moved == "target":
            couplings = _target_couplings(user, entries, scale)
            if couplings is None:
                reads.unfollowed.update(read)
            else:
                reads.couplings.extend(couplings)
            continue
        if moved == "ignored":
            continue
        out_entries, out_scalar, out_scale = moved
        _follow_sizes(user.outputs[0], out_entries, out_scalar, out_scale, reads, opaque, depth + 1)


def _moved_entries(
    user: gs.Node, value: gs.Tensor, entries: list[int | None], scalar: bool, scale: int
):
    """Where ``user`` puts the entries of ``value``: (entries, scalar, scale) of its output,
    "target" for a Reshape/Expand target, "ignored" for a use that cannot change with the
    sizes, or None for a use spa does not follow."""
    inputs, op = user.inputs, user.op
    if len(user.outputs) != 1:
        return None
    first = len(inputs) > 0 and inputs[0] is value
    if op in ("Reshape", "Expand") and len(inputs) > 1 and inputs[1] is value and not first:
        return None if scalar else "target"
    if op == "Equal":
        # Equal(v, -1) only finds torch's -1 placeholders: false for every size, pruned or not
        return "ignored" if _compared_with_negatives(user, value) else None
    if op == "Where" and len(inputs) == 3 and inputs[2] is value and inputs[1] is not value:
        # torch's Where(Equal(v, -1), ones, v): v wherever v holds a size
        placeholders = _placeholder_where(user, value)
        return (entries, False, scale) if placeholders and not scalar else None
    if op == "Cast" and first:
        integer = int(user.attrs.get("to", 0)) in _INTEGER_TYPES
        return (entries, scalar, scale) if integer else None
    if op == "Mul" and scalar:
        factor = _constant_factor(user, value)
        return None if factor is None else (entries, True, scale * factor)
    if not first:
        return None
    if op == "Gather" and int(user.attrs.get("axis", 0)) == 0 and not scalar:
        indices = _integer_constant(inputs[1]) if len(inputs) > 1 else None
        if indices is None or indices.ndim > 1:
            return None
        flat = indices.reshape(-1)
        if np.any(flat < -len(entries)) or np.any(flat >= len(entries)):
            return None
        picked = [entries[int(i)] for i in flat]
        return picked, indices.ndim == 0, scale
    if op == "Slice" and not scalar and len(inputs) in (3, 4, 5):
        bounds = [_integer_constant(t) for t in inputs[1:]]
        if any(b is None or b.size != 1 for b in bounds):
            return None
        start, stop = int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0])
        axis = int(bounds[2].reshape(-1)[0]) if len(bounds) > 2 else 0
        step = int(bounds[3].reshape(-1)[0]) if len(bounds) > 3 else 1
        if axis not in (0, -1) or step == 0:
            return None
        positions = slice_positions(len(entries), start, stop, step)
        return [entries[int(k)] for k in positions], False, scale
    if op == "Squeeze" and not scalar and len(entries) == 1:
        return entries, True, scale
    if op == "Unsqueeze" and scalar:
        axes = axes_of(user, 1)
        return (entries, False, scale) if axes is not None and len(axes) == 1 else None
    if op == "Concat" and not scalar and int(user.attrs.get("axis", 0)) in (0, -1):
        lengths = []
        for part in inputs:
            length = part.shape[0] if part.shape is not None and len(part.shape) == 1 else None
            if not isinstance(length, int):
                return None
            lengths.append(length)
        out: list[int | None] = []
        for part, length in zip(inputs, lengths, strict=True):
            out.extend(entries if part is value else [None] * length)
        return out, False, scale
    if op == "Reshape" and not scalar and isinstance(inputs[1], gs.Constant):
        # a reshape of the vector to its own length
        own = [len(entries)]
        shapes = [value.shape, user.outputs[0].shape]
        if all(shape is not None and list(shape) == own for shape in shapes):
            return entries, False, scale
    return None


def _placeholder_where(node: gs.Node, value: gs.Tensor) -> bool:
    """Whether ``node`` is torch's Where(Equal(value, -1), ones, value): every size of value
    passes, and only its placeholders become the constant 1."""
    test = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    ones = _integer_constant(node.inputs[1])
    return (
        node.inputs[2] is value
        and test is not None
        and _compared_with_negatives(test, value)
        and ones is not None
        and bool(np.all(ones == 1))
    )


def _compared_with_negatives(node: gs.Node, value: gs.Tensor) -> bool:
    """Whether ``node`` is Equal(value, c) with c integer constants below zero (never a size)."""
    if node.op != "Equal" or len(node.inputs) != 2 or value not in node.inputs:
        return False
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    constant = _integer_constant(other)
    return constant is not None and bool(np.all(constant < 0))


def _target_couplings(
    node: gs.Node, entries: list[int | None], scale: int
) -> list[Coupling] | None:
    output = node.outputs[0]
    length = node.inputs[1].shape[0] if node.inputs[1].shape else None
    if output.shape is None or length != len(entries):
        return None
    shift = len(output.shape) - length  # Expand aligns its target to the right
    if shift < 0 or (node.op == "Reshape" and shift != 0):
        return None
    return [
        (axis, output.name, k + shift, scale) for k, axis in enumerate(entries) if axis is not None
    ]


def _constant_factor(node: gs.Node, operand: gs.Tensor) -> int | None:
    """The integer a Mul node multiplies ``operand`` by, if it is a positive constant."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is operand else node.inputs[0]
    if not isinstance(other, gs.Constant) or np.asarray(other.values).size != 1:
        return None
    value = np.asarray(other.values).reshape(-1)[0]
    if not np.issubdtype(np.asarray(value).dtype, np.integer) or value < 1:
        return None
    return int(value)


# ---------------------------------------------------------------------------------------------
# Ops whose channels spa does not try to follow.

RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@rule(*RECURRENT_OPS)
def recurrent(ctx: RuleContext) -> None:
    ctx.block_all("recurrent op: its gates mix channels across time steps")


@rule("If", "Loop", "Scan")
def control_flow(ctx: RuleContext) -> None:
    reason = f"crosses a {ctx.node.op} sub-graph"
    ctx.block_all(reason)
    for name in outer_scope_inputs(ctx.node):
        ctx.block_tensor(name, reason)


def outer_scope_inputs(node: gs.Node) -> list[str]:
    """Tensors of enclosing graphs that a node's sub-graphs read implicitly."""
    names: list[str] = []
    for value in node.attrs.values():
        subgraphs = value if isinstance(value, list) else [value]
        for subgraph in subgraphs:
            if not isinstance(subgraph, gs.Graph):
                continue
            produced = {t.name for n in subgraph.nodes for t in n.outputs}
            produced.update(t.name for t in subgraph.inputs)
            for inner in subgraph.nodes:
                for tensor in inner.inputs:
                    if tensor.name and tensor.name not in produced and tensor.name not in names:
                        names.append(tensor.name)
                names.extend(n for n in outer_scope_inputs(inner) if n not in produced)
    return names


def unknown(ctx: RuleContext) -> None:
    domain = f"{ctx.node.domain}." if ctx.node.domain else ""
    ctx.block_all(f"no channel rule for op {domain}{ctx.node.op}")


def rule_for(node: gs.Node) -> Rule:
    if node.domain not in (None, "", "ai.onnx"):
        return unknown
    return RULES.get(node.op, unknown)
