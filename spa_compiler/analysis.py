"""Coupled-channel analysis: apply the op table to every node and solve the channel graph."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.channel_graph import ChannelGraph, Group, is_weight_constant
from spa_compiler.ir import Model
from spa_compiler.op_rules import RuleContext, rule_for


@dataclass
class Analysis:
    groups: list[Group]
    channels: ChannelGraph
    weight_sizes: dict[str, int]
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)
    heads: str = "head"

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def blocked(self) -> list[Group]:
        return [g for g in self.groups if not g.prunable]

    @property
    def total_weight_parameters(self) -> int:
        return sum(self.weight_sizes.values())

    @property
    def prunable_weight_parameters(self) -> int:
        names = {m.tensor for g in self.prunable for m in g.weight_members}
        return sum(self.weight_sizes.get(name, 0) for name in names)

    @property
    def coverage(self) -> float:
        total = self.total_weight_parameters
        return self.prunable_weight_parameters / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable),
            "blocked_groups": len(self.blocked),
            "prunable_channels": sum(g.channels for g in self.prunable),
            "weight_parameters": self.total_weight_parameters,
            "prunable_weight_parameters": self.prunable_weight_parameters,
            "coverage": round(self.coverage, 6),
            "analysis_seconds": round(self.seconds, 4),
        }

    def to_json(self, include_blocked: bool = True) -> dict[str, Any]:
        groups = self.groups if include_blocked else self.prunable
        return {"summary": self.summary(), "groups": [g.to_json() for g in groups]}


def weight_sizes(graph: gs.Graph) -> dict[str, int]:
    """Constants with more than one element that are weights: floating point, or integer
    data of a DequantizeLinear (quantized weights)."""
    sizes = {}
    for name, tensor in graph.tensors().items():
        if is_weight_constant(tensor):
            size = int(np.prod(tensor.shape))
            if size > 1:
                sizes[name] = size
    return sizes


def build_channel_graph(model: Model) -> ChannelGraph:
    graph = model.graph
    channels = ChannelGraph(graph)
    for tensor in graph.inputs:
        for axis in range(len(tensor.shape or [])):
            channels.block((tensor.name, axis), "graph input")
    for tensor in graph.outputs:
        for axis in range(len(tensor.shape or [])):
            channels.block((tensor.name, axis), "graph output")
    tensors = graph.tensors()
    for name in model.overridable:
        for axis in range(len(getattr(tensors.get(name), "shape", None) or [])):
            channels.block((name, axis), "initializer that is also a graph input (overridable)")
    graph_outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        ctx = RuleContext(channels, node, model.opset)
        used = [t for t in node.inputs if t.name] + [
            t for t in node.outputs if t.name and (t.outputs or t.name in graph_outputs)
        ]
        unknown = [t.name for t in used if t.shape is None]
        if unknown:
            ctx.block_all(f"shape of '{unknown[0]}' is unknown")
        else:
            rule_for(node)(ctx)
        for tensor in [*node.inputs, *node.outputs]:
            if not tensor.name or tensor.shape is None:
                continue
            for axis in range(len(tensor.shape)):
                if (tensor.name, axis) not in ctx.covered:
                    ctx.block(tensor.name, axis, "the op's channel rule does not map this axis")
    return channels


def analyze(model: Model, heads: str = "head") -> Analysis:
    """Find every group of channels that must be removed together, and what blocks the rest."""
    started = time.perf_counter()
    channels = build_channel_graph(model)
    groups = channels.solve(heads=heads)
    seconds = time.perf_counter() - started
    op_counts: dict[str, int] = {}
    for node in model.graph.nodes:
        op_counts[node.op] = op_counts.get(node.op, 0) + 1
    return Analysis(groups, channels, weight_sizes(model.graph), seconds, op_counts, heads)
