"""Importance criteria: one score per channel of a group (higher = more important).

Scores are computed per member weight (the rows a producer writes, the columns a consumer
reads), aggregated over the group's members (sum, mean or max) and normalised by the group's
mean, so groups of different sizes can be ranked together.

Criteria that need no trained weights, for pruning before training: ``random`` (seeded by
``--seed`` and the group id) and ``snip`` (gradient saliency on synthetic inputs, also seeded).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler import obs
from spa_compiler.channel_graph import CONSUMER, PARAM, PRODUCER, Group, Member
from spa_compiler.errors import BadInputError
from spa_compiler.linear_layers import LayerIndex, LinearLayer
from spa_compiler.obs import Moments

CRITERIA = ("l1", "l2", "random", "bn-scale", "obspa", "snip")
# Criteria whose scores need the second moments of the consumers' inputs (an ObsContext).
MOMENT_CRITERIA = ("obspa", "snip")
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


class ObsContext:
    """What OBSPA scoring needs besides the weights: each linear consumer, and the second
    moments of the activations they read (H⁻¹ computed once per activation)."""

    def __init__(self, graph: gs.Graph, moments: dict[str, Moments], depth: float = 1.0) -> None:
        """``depth``: the largest fraction of a group's channels a selection may remove (the
        greedy removal order is computed that far)."""
        self.layers = LayerIndex(graph)
        self.moments = moments
        self.depth = depth
        self._inverses: dict[tuple[str, int, bool], np.ndarray] = {}

    def release(self, group: Group) -> None:
        """Forget the H⁻¹ of the activations ``group``'s consumers read."""
        for member in group.consumers:
            layer = self.layers.find(member)
            if layer is not None:
                self._inverses.pop(
                    (layer.activation.name, layer.features, layer.bias is not None), None
                )

    def hessian(self, layer: LinearLayer) -> tuple[Callable[[np.ndarray], float], np.ndarray]:
        """H⁻¹ of the layer's input (augmented for its bias), and a function giving the
        output energy E‖W x‖² of rows W; the identity where nothing is known about the
        activation (OBS then reduces to the weights' L2 norm)."""
        with_bias = layer.bias is not None
        key = (layer.activation.name, layer.features, with_bias)
        stats = self.moments.get(layer.activation.name)
        known = stats is not None and stats.features == layer.features and stats.usable
        if key not in self._inverses:
            if known:
                self._inverses[key] = stats.inverse(with_bias)
            else:
                self._inverses[key] = np.eye(layer.features + with_bias)

        def energy(rows: np.ndarray) -> float:
            if not known:
                return float(np.einsum("rn,rn->", rows, rows))
            stats.settle()
            product = rows[:, : stats.features] @ stats.sum_outer
            return float(np.einsum("rn,rn->", product, rows[:, : stats.features])) / stats.count

        return energy, self._inverses[key]


def obspa_scores(group: Group, context: ObsContext) -> np.ndarray:
    """Greedy OBS removal order over every linear consumer of the group (see ``obs``);
    scores are relative output errors, comparable across groups. Groups without a linear
    consumer fall back to the L2 norm of their weights, as a share of the group's total."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _obspa_scores(group, context)


def _obspa_scores(group: Group, context: ObsContext) -> np.ndarray:
    layers = []
    for member in group.consumers:
        layer = context.layers.find(member)
        if layer is None:
            continue
        energy, inverse = context.hessian(layer)
        rows = layer.rows()
        if layer.bias is not None:
            rows = np.hstack([rows, np.zeros((rows.shape[0], 1))])
        layers.append(obs.Layer(rows, inverse, member.indices, energy(rows)))
    if not layers:
        squares = score_group(group, context.layers.graph, "l2", "sum", 0, "none") ** 2
        return squares / max(float(squares.sum()), 1e-30)
    scores = obs.removal_scores(layers, group.channels, depth=context.depth)
    # An activation's channels belong to one group: its H⁻¹ is not asked for again, and
    # keeping every layer's (an 11008-wide input: 1 GB each) would hold them all at once.
    context.release(group)
    return scores


def _second_moment_times(rows: np.ndarray, stats: Moments | None, features: int) -> np.ndarray:
    """``rows`` @ E[x xᵀ] (undamped: this is a derivative, not an inverse); ``rows`` itself
    (H = I) where the activation's moments are unknown. Wider than ``obs.BLOCK`` features,
    ``Moments`` holds H's diagonal blocks only (cross-block terms dropped, as for OBSPA)."""
    if stats is None or stats.features != features or not stats.usable:
        return rows
    stats.settle()
    product = np.empty_like(rows)
    for start in range(0, features, obs.BLOCK):  # one float64 block of H at a time
        block = slice(start, min(features, start + obs.BLOCK))
        product[:, block] = rows[:, block] @ stats.sum_outer[block, block].astype(np.float64)
    return product / max(stats.count, 1)


def snip_scores(group: Group, context: ObsContext) -> np.ndarray:
    """SNIP-style connection sensitivity of the group's channel masks, label-free and
    layer-local; needs no trained weights.

    Each linear consumer y = W x of the group (Conv rows per kernel position, as in ``obs``)
    gets the loss L = ½ E‖W x‖² over the synthetic (or --calib) inputs whose second moment
    H = E[x xᵀ] spa collected. A mask m_c on channel c scales its input features, and
    m_c · ∂L/∂m_c at m = 1 is E[x_c · (Wᵀ W x)_c] = (Wᵀ W H)_cc = Σ_r W_rc (W H)_rc — the
    first-order change of L when the channel's mask goes from 1 to 0, exact because L is
    quadratic in x (no autodiff needed). A channel sums this over the features it owns and
    over the group's consumers (one mask gates them all), and scores its absolute value, as
    SNIP scores |m · ∂L/∂m|. It is not SNIP's task loss: no labels, and each consumer's own
    output stands for the network's. Groups without a linear consumer (read only by a
    depthwise conv, say) fall back to the L2 norm of their weights."""
    total = np.zeros(group.channels)
    found = False
    for member in group.consumers:
        layer = context.layers.find(member)
        if layer is None:
            continue
        found = True
        rows = layer.rows()
        stats = context.moments.get(layer.activation.name)
        gradient = _second_moment_times(rows, stats, layer.features)  # ∂L/∂W = W H
        per_feature = np.einsum("rn,rn->n", rows, gradient)
        total += per_feature[member.indices].sum(axis=1)
    if not found:
        return score_group(group, context.layers.graph, "l2", "sum", 0, "none")
    return np.abs(total)


def score_group(
    group: Group,
    graph: gs.Graph,
    criterion: str = "l1",
    aggregation: str = "sum",
    seed: int = 0,
    normalization: str = "mean",
    context: ObsContext | None = None,
) -> np.ndarray:
    """One importance score per channel of ``group``, divided by the group's mean, max or sum
    (``normalization``) so that groups compare under global ranking. ``obspa`` needs the
    ``context`` of second moments and gives relative errors, already comparable: it is not
    normalized. ``snip`` needs the ``context`` too; its scores are normalized like the
    magnitude criteria's."""
    if criterion not in CRITERIA:
        raise BadInputError(f"unknown criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
    if aggregation not in AGGREGATIONS:
        raise BadInputError(f"unknown aggregation {aggregation!r}")
    if normalization not in NORMALIZATIONS:
        raise BadInputError(f"unknown normalization {normalization!r}")
    if criterion == "random":
        return np.random.default_rng([seed, group.id]).random(group.channels)
    if criterion == "obspa":
        if context is None:
            raise BadInputError("obspa scores need second moments (an ObsContext)")
        return obspa_scores(group, context)
    if criterion == "snip":
        if context is None:
            raise BadInputError("snip scores need second moments (an ObsContext)")
        return _normalize(snip_scores(group, context), normalization)
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
    return _normalize(combined, normalization)


def _normalize(scores: np.ndarray, normalization: str) -> np.ndarray:
    """Scores divided by their mean, max or sum, so that groups compare under global ranking."""
    if normalization == "none":
        return scores
    scale = {"mean": scores.mean, "max": scores.max, "sum": scores.sum}[normalization]()
    return scores / scale if scale > 0 else scores
