"""Importance criteria: one score per channel of a group (higher = more important).

Scores are computed per member weight (the rows a producer writes, the columns a consumer
reads), aggregated over the group's members (sum, mean or max) and normalised by the group's
mean, so groups of different sizes can be ranked together.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.channel_graph import CONSUMER, PARAM, PRODUCER, Group, Member
from spa_compiler.errors import BadInputError

CRITERIA = ("l1", "l2", "random", "bn-scale")
AGGREGATIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("mean", "max", "sum", "none")


def _per_index_norm(values: np.ndarray, axis: int, power: int) -> np.ndarray:
    """Sum of |w|^power over every axis but ``axis`` (accumulated in float64)."""
    others = tuple(i for i in range(values.ndim) if i != axis)
    magnitude = np.abs(values) if power == 1 else np.square(values, dtype=np.float64)
    return magnitude.sum(axis=others, dtype=np.float64) if others else magnitude.astype(np.float64)


def _member_scores(member: Member, values: np.ndarray, power: int) -> np.ndarray:
    per_index = _per_index_norm(values, member.axis, power)
    per_channel = per_index[member.indices].sum(axis=1)
    return np.sqrt(per_channel) if power == 2 else per_channel


def _bn_scales(group: Group, graph: gs.Graph) -> list[np.ndarray]:
    nodes = {node.name: node for node in graph.nodes}
    scales = []
    for member in group.members:
        for role, node_name in member.roles:
            node = nodes.get(node_name)
            if (
                role == PARAM
                and node is not None
                and node.op == "BatchNormalization"
                and node.inputs[1].name == member.tensor
                and isinstance(node.inputs[1], gs.Constant)
            ):
                values = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
                scales.append(values[member.indices].mean(axis=1))
    return scales


def score_group(
    group: Group,
    graph: gs.Graph,
    criterion: str = "l1",
    aggregation: str = "sum",
    seed: int = 0,
    normalization: str = "mean",
) -> np.ndarray:
    """One importance score per channel of ``group``, divided by the group's mean, max or sum
    (``normalization``) so that groups compare under global ranking."""
    if criterion not in CRITERIA:
        raise BadInputError(f"unknown criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
    if aggregation not in AGGREGATIONS:
        raise BadInputError(f"unknown aggregation {aggregation!r}")
    if normalization not in NORMALIZATIONS:
        raise BadInputError(f"unknown normalization {normalization!r}")
    if criterion == "random":
        return np.random.default_rng([seed, group.id]).random(group.channels)
    tensors = graph.tensors()
    rows: list[np.ndarray] = []
    if criterion == "bn-scale":
        rows = _bn_scales(group, graph)
    if not rows:  # l1/l2, and bn-scale where no BatchNormalization scales the channels
        power = 2 if criterion == "l2" else 1
        for member in group.members:
            tensor = tensors.get(member.tensor)
            if not member.is_weight or not isinstance(tensor, gs.Constant):
                continue
            if not any(role in (PRODUCER, CONSUMER) for role, _ in member.roles):
                continue
            rows.append(_member_scores(member, tensor.values, power))
    if not rows:
        return np.ones(group.channels)
    table = np.stack(rows)
    combined = {"sum": table.sum, "mean": table.mean, "max": table.max}[aggregation](axis=0)
    if normalization == "none":
        return combined
    scale = {"mean": combined.mean, "max": combined.max, "sum": combined.sum}[normalization]()
    return combined / scale if scale > 0 else combined
