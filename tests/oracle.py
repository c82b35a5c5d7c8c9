"""Exactness oracle for the channel analysis, run with real onnxruntime sessions.

For a group and a random subset S of its channels: zero the consumer-side weights that read S
(model A), then additionally scramble every other weight entry the group owns for S -- the
producers' rows, biases, norm parameters (model B). If the analysis found every reader of S
with the right indices, nothing downstream can see the scrambled values and A and B give the
same outputs. A missed consumer or a wrong index mapping makes them differ.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper

from spa_compiler.analysis import Analysis
from spa_compiler.channel_graph import CONSUMER, CONTRACTED, Group
from spa_compiler.ir import Model
from spa_compiler.runtime import random_inputs


def random_feeds(proto: onnx.ModelProto, seed: int = 0) -> dict:
    """Random inputs of the declared shapes: the ones spa's own validation uses."""
    return random_inputs(proto, seed)


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _set(proto: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name == name:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def _values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}


def _index(array: np.ndarray, axis: int, positions: np.ndarray) -> tuple:
    index: list = [slice(None)] * array.ndim
    index[axis] = positions
    return tuple(index)


def perturbation_check(
    model: Model, group: Group, seed: int = 0, zero_consumers: bool = True
) -> float:
    """Largest output difference between models A and B (0 when the analysis is exact)."""
    rng = np.random.default_rng(seed)
    proto = model.to_onnx()
    values = _values(proto)
    channels = group.channels
    count = max(1, channels // 2)
    chosen = np.sort(rng.choice(channels, size=count, replace=False))
    consumers = {
        (m.tensor, m.axis)
        for m in group.members
        if m.is_weight and any(r == CONSUMER for r, _ in m.roles)
    }
    model_a = onnx.ModelProto()
    model_a.CopyFrom(proto)
    for member in group.members:
        if (member.tensor, member.axis) in consumers and zero_consumers:
            array = values[member.tensor]
            positions = member.indices[chosen].reshape(-1)
            array[_index(array, member.axis, positions)] = 0
            _set(model_a, member.tensor, array)
    _mask_contractions(model, model_a, group, chosen)
    model_b = onnx.ModelProto()
    model_b.CopyFrom(model_a)
    consumer_tensors = {name for name, _ in consumers}
    for member in group.members:
        if not member.is_weight or member.tensor in consumer_tensors:
            continue
        array = values[member.tensor]
        if not np.issubdtype(array.dtype, np.floating):
            continue
        positions = member.indices[chosen].reshape(-1)
        region = array[_index(array, member.axis, positions)]
        # Positive factors keep variances positive; zeros (fresh biases) get moved too.
        scrambled = region * rng.uniform(0.3, 3.0, size=region.shape) + (region == 0) * 0.7
        array[_index(array, member.axis, positions)] = scrambled.astype(array.dtype)
        _set(model_b, member.tensor, array)
    feeds = random_feeds(proto, seed)
    outputs_a, outputs_b = run(model_a, feeds), run(model_b, feeds)
    worst = 0.0
    for a, b in zip(outputs_a, outputs_b, strict=True):
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            worst = max(worst, float(np.any(a != b)))
            continue
        scale = max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale if a.size else 0.0)
    return worst


def _mask_contractions(model: Model, proto: onnx.ModelProto, group: Group, chosen) -> None:
    """Channels an activation x activation contraction reads (Q.K^T over the head dim) have no
    weight to zero: zero them on one operand of each such contraction, right at its input."""
    tensors = model.graph.tensors()
    masked_nodes: set[str] = set()
    for member in group.members:
        for role, node_name in member.roles:
            if role != CONTRACTED or node_name in masked_nodes:
                continue
            masked_nodes.add(node_name)
            rank = len(tensors[member.tensor].shape)
            mask_shape = [1] * rank
            mask_shape[member.axis] = tensors[member.tensor].shape[member.axis]
            mask = np.ones(mask_shape, np.float32)
            mask[_index(mask, member.axis, member.indices[chosen].reshape(-1))] = 0
            masked = f"{member.tensor}__oracle_masked_{len(masked_nodes)}"
            proto.graph.initializer.append(numpy_helper.from_array(mask, f"{masked}_mask"))
            for node in proto.graph.node:
                if node.name == node_name:
                    for i, name in enumerate(node.input):
                        if name == member.tensor:
                            node.input[i] = masked
            proto.graph.node.append(
                onnx.helper.make_node("Mul", [member.tensor, f"{masked}_mask"], [masked])
            )
    if masked_nodes:
        sorted_graph = gs.import_onnx(proto)
        sorted_graph.toposort()
        proto.CopyFrom(gs.export_onnx(sorted_graph, do_type_check=False))


def check_groups(model: Model, analysis: Analysis, limit: int = 8, tolerance: float = 1e-4) -> int:
    """Run the oracle on up to ``limit`` prunable groups spread over the model; return count."""
    groups = analysis.prunable
    if len(groups) > limit:
        picks = np.linspace(0, len(groups) - 1, limit).round().astype(int)
        groups = [groups[i] for i in sorted(set(picks.tolist()))]
    for group in groups:
        error = perturbation_check(model, group, seed=group.id)
        assert error <= tolerance, (
            f"group {group.id} ({group.channels} channels, members "
            f"{[(m.tensor, m.axis) for m in group.members if m.is_weight]}) is not exact: "
            f"relative output change {error:.3g}"
        )
    return len(groups)


def compile_check(source, ratio: float, seed: int, **options) -> float:
    """Exactness of a compile: the pruned model against the original with the consumer
    weights of every removed channel zeroed, on the same random inputs (relative error)."""
    import spa_compiler

    pruned, report = spa_compiler.compile(
        source, ratio=ratio, seed=seed, criterion=options.pop("criterion", "random"), **options
    )
    zeroed = zero_removed_consumers(source, report.plan)
    return worst_relative_error(zeroed, pruned, seed)


def compensation_check(source, ratio: float, seed: int, **options) -> float:
    """Exactness with OBS compensation on: the original with the removed channels' consumer
    weights zeroed, compiled under the same plan with compensation, must not change (the
    refit of a zero column is zero)."""
    import spa_compiler

    _, report = spa_compiler.compile(
        source, ratio=ratio, seed=seed, criterion=options.pop("criterion", "random")
    )
    zeroed = zero_removed_consumers(source, report.plan)
    plan = report.plan
    plan.criterion = "obspa"
    pruned, compensated = spa_compiler.compile(zeroed, plan=plan, **options)
    assert compensated.statistics is not None
    return worst_relative_error(zeroed, pruned, seed)


def _keep_declared_outputs(proto: onnx.ModelProto, source) -> None:
    """The graph outputs as the source declares them, as spa's export keeps them:
    onnx-graphsurgeon writes a non-tensor output (skl2onnx's ZipMap, a sequence of maps) as
    seq(tensor(undefined)), which onnxruntime refuses."""
    original = (
        source
        if isinstance(source, onnx.ModelProto)
        else onnx.load(str(source), load_external_data=False)
    )
    declared = {value.name: value for value in original.graph.output}
    for value in proto.graph.output:
        if value.name in declared:
            value.CopyFrom(declared[value.name])


def zero_removed_consumers(source, plan) -> onnx.ModelProto:
    """The prepared original with the consumer-side weights of every removed channel zeroed."""
    import spa_compiler
    from spa_compiler.plan import check_plan_matches

    prepared = (
        spa_compiler.load(source)
        if not isinstance(source, onnx.ModelProto)
        else (spa_compiler.from_proto(source))
    )
    analysis = spa_compiler.inspect(prepared, heads=plan.heads)
    groups = check_plan_matches(plan, analysis)
    zeroed = prepared.to_onnx()
    _keep_declared_outputs(zeroed, source)
    values = _values(zeroed)
    for planned in plan.groups:
        removed = planned.removed
        if not removed:
            continue
        for member in groups[planned.group].members:
            if member.is_weight and any(r == CONSUMER for r, _ in member.roles):
                array = values[member.tensor]
                array[_index(array, member.axis, member.indices[removed].reshape(-1))] = 0
                _set(zeroed, member.tensor, array)
        # Channels only an activation x activation contraction reads (heads="dim"): zero
        # them on one operand of each contraction instead.
        _mask_contractions(prepared, zeroed, groups[planned.group], removed)
    return zeroed


def _as_array(output) -> np.ndarray:
    """An output as an array; a sequence of maps (skl2onnx's ZipMap) as [rows, sorted keys]."""
    if isinstance(output, list) and output and isinstance(output[0], dict):
        return np.array([[row[key] for key in sorted(row)] for row in output])
    return np.asarray(output)


def _map_keys(output) -> list[list] | None:
    """Each row's keys of a sequence of maps (ZipMap's class labels), None for a tensor."""
    if isinstance(output, list) and output and isinstance(output[0], dict):
        return [sorted(row) for row in output]
    return None


def worst_relative_error(zeroed: onnx.ModelProto, pruned: onnx.ModelProto, seed: int) -> float:
    feeds = random_feeds(zeroed, seed)
    worst = 0.0
    for a, b in zip(run(zeroed, feeds), run(pruned, feeds), strict=True):
        if _map_keys(a) != _map_keys(b):  # other labels: values under them mean nothing
            return float("inf")
        a, b = _as_array(a), _as_array(b)
        assert np.shape(a) == np.shape(b)
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            worst = max(worst, float(np.any(a != b)))
            continue
        scale = max(1e-6, float(np.max(np.abs(a))) if a.size else 1.0)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale if a.size else 0.0)
    return worst
