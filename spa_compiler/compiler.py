"""``spa_compiler.compile``: load -> analyze -> score -> select (plan) -> rewrite -> cleanup ->
validate, as a list of passes; saving is the caller's (or the CLI's) step."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa_compiler import flops
from spa_compiler.analysis import Analysis, weight_sizes
from spa_compiler.criteria import ObsContext
from spa_compiler.errors import BadInputError
from spa_compiler.ir import (
    SKELETON_ELEMENTS,
    HeldValues,
    Model,
    forget,
    held_reference,
    hold,
    is_anonymous_dim,
    materialize,
    model_from_proto,
    read_minus_one_as_dynamic,
    read_model_proto,
)
from spa_compiler.pipeline import run_passes
from spa_compiler.plan import Plan, check_plan_matches
from spa_compiler.runtime import observed_shapes


@dataclass
class Report:
    """What a compile did, for people (``summary``) and machines (``to_json``)."""

    before: dict[str, Any]
    after: dict[str, Any]
    groups_pruned: int
    groups_prunable: int
    groups_blocked: int
    seconds: float
    passes: list[tuple[str, float]]
    plan: Plan
    groups: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ratio: float | None = None
    target: dict[str, Any] | None = None
    statistics: dict[str, Any] | None = None  # second moments and compensation (obspa)
    nm: dict[str, Any] | None = None  # N:M sparsity: pattern, weights done and skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after": self.after,
            "groups_pruned": self.groups_pruned,
            "groups_prunable": self.groups_prunable,
            "groups_blocked": self.groups_blocked,
            "seconds": round(self.seconds, 4),
            "passes": [{"name": n, "seconds": round(s, 4)} for n, s in self.passes],
            "groups": self.groups,
            "warnings": self.warnings,
            "ratio": self.ratio,
            "target": self.target,
            "statistics": self.statistics,
            "nm": self.nm,
        }

    def summary(self) -> str:
        def line(label: str, key: str) -> str:
            old, new = self.before[key], self.after[key]
            ratio = f"{new / old:.3f}x" if old else "-"
            return f"  {label:<12} {old:>14,} -> {new:>14,}  ({ratio})"

        lines = [
            "spa compile",
            line("parameters", "parameters"),
            line("MACs", "macs"),
            line("FLOPs", "flops"),
            line("bytes", "bytes"),
            f"  groups       {self.groups_pruned} pruned of {self.groups_prunable} prunable, "
            f"{self.groups_blocked} blocked",
        ]
        before, after = self.before["flops_by_op"], self.after["flops_by_op"]
        lines.append(f"  {'op type':<22} {'nodes':>5} {'FLOPs before':>14}    {'FLOPs after':>14}")
        for op in sorted(set(before) | set(after), key=lambda o: -before.get(o, 0)):
            nodes = self.before["ops"].get(op, 0)
            lines.append(
                f"    {op:<20} {nodes:>5} {before.get(op, 0):>14,} -> {after.get(op, 0):>14,}"
            )
        if self.target is not None and self.target["achieved"] is not None:
            lines.append(
                f"  target       keep {self.target['fraction']:.3f} of {self.target['metric']}: "
                f"achieved {self.target['achieved']:.3f} at ratio {self.ratio:.4f}"
            )
        if self.statistics is not None:
            stats = self.statistics
            lines.append(
                f"  moments      {stats['source']}: {stats['covered']} of {stats['layers']} "
                f"consumer layers; {stats.get('refitted', 0)} refitted, "
                f"{stats.get('biases', 0)} biases compensated"
            )
        if self.nm is not None:
            lines.append(
                f"  N:M {self.nm['pattern']:<8} {len(self.nm['applied'])} weights sparse "
                f"({self.nm['zeroed']:,} of {self.nm['eligible']:,} parameters zero), "
                f"{len(self.nm['skipped'])} skipped"
            )
            lines.extend(f"    skipped {name}: {why}" for name, why in self.nm["skipped"])
        lines.append(f"  time         {self.seconds:.2f} s")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _nbytes(constant: gs.Constant) -> int:
    """A constant's size without loading it (counting must not copy every weight)."""
    values = constant._values  # graphsurgeon has no public accessor that keeps values lazy
    if isinstance(values, gs.ir.tensor.LazyValues):
        return int(values.nbytes)
    return int(np.asarray(values).nbytes)


def _observed_shape_of(observed: dict[str, list[int]]):
    """A shape lookup for the FLOPs counter: a run's shape where shape inference had none."""

    def shape_of(tensor: gs.Tensor) -> list | None:
        known = observed.get(tensor.name)
        return known if known is not None else flops._shape_of(tensor)

    return shape_of


def measure(graph: gs.Graph, observed: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Parameters, MACs, FLOPs, bytes and ops of ``graph``; ``observed``: shapes measured in a
    run (``runtime.observed_shapes``) for tensors shape inference left unknown."""
    sizes = weight_sizes(graph)
    counted = flops.count(graph, _observed_shape_of(observed or {}))
    nbytes = sum(
        _nbytes(tensor) for tensor in graph.tensors().values() if isinstance(tensor, gs.Constant)
    )
    return {
        "parameters": sum(sizes.values()),
        "macs": counted["macs"],
        "macs_by_op": counted["macs_by_op"],
        "flops": counted["flops"],
        "flops_by_op": counted["flops_by_op"],
        "bytes": nbytes,
        "nodes": len(graph.nodes),
        "ops": dict(Counter(node.op for node in graph.nodes)),
    }


def estimate(
    graph: gs.Graph,
    groups: dict[int, Any],
    plan: Plan,
    observed: dict[str, list[int]] | None = None,
) -> dict[str, int]:
    """Parameters and MACs the model would have after ``plan``, from shapes alone: every axis
    that shrinks is a member of a planned group, so no rewrite is needed."""
    base = _observed_shape_of(observed or {})
    removed: dict[tuple[str, int], int] = defaultdict(int)
    for planned in plan.groups:
        channels = planned.removed
        if channels:
            for member in groups[planned.group].members:
                removed[(member.tensor, member.axis)] += int(member.indices[channels].size)

    def shape_of(tensor: gs.Tensor) -> list | None:
        shape = base(tensor)
        if shape is None:
            return None
        return [
            d - removed.get((tensor.name, i), 0) if isinstance(d, int) else d
            for i, d in enumerate(shape)
        ]

    sizes = weight_sizes(graph)
    tensors = graph.tensors()
    parameters = sum(
        int(np.prod(shape_of(tensors[name]) or [size])) for name, size in sizes.items()
    )
    return {"parameters": parameters, "macs": flops.count(graph, shape_of)["macs"]}


def export(model: Model, original: onnx.ModelProto) -> onnx.ModelProto:
    """The rewritten graph as a ModelProto with the original's opsets, IR and metadata. Large
    weights are held (``ir.hold``), not copied into the proto: the caller ``forget``s them or
    ``materialize``s the proto."""
    graph = model.graph
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    arrays: dict[str, np.ndarray] = {}
    swapped: list[tuple[gs.Constant, Any]] = []
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.shape is not None:
            tensor.shape = [None if is_anonymous_dim(d) else d for d in tensor.shape]
        elif isinstance(tensor, gs.Constant) and _holdable(tensor):
            values = np.asarray(tensor.values)
            data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            arrays[tensor.name] = values
            swapped.append((tensor, tensor._values))
            tensor._values = HeldValues(
                held_reference(tensor.name, data_type, values.shape), values
            )
    try:
        proto = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in swapped:  # the graph keeps its own values
            tensor._values = values
    hold(proto, arrays)
    del proto.graph.value_info[:]
    original_outputs = {value.name: value for value in original.graph.output}
    for value in proto.graph.output:  # the interface stays as its author declared it
        if value.name in original_outputs:
            value.CopyFrom(original_outputs[value.name])
    declared = {value.name for value in proto.graph.input}
    for value in original.graph.input:  # overridable initializers stay graph inputs
        if value.name in model.overridable and value.name not in declared:
            proto.graph.input.append(value)
    proto.ir_version = original.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(original.opset_import)
    proto.producer_name = original.producer_name or "spa"
    proto.producer_version = original.producer_version
    proto.domain, proto.model_version = original.domain, original.model_version
    proto.doc_string = original.doc_string
    del proto.metadata_props[:]
    proto.metadata_props.extend(original.metadata_props)
    return proto


def _holdable(constant: gs.Constant) -> bool:
    """A weight worth holding as an array: large, numeric, in a dtype numpy stores natively."""
    if int(np.prod(constant.shape, dtype=np.int64)) <= SKELETON_ELEMENTS:
        return False
    dtype = np.asarray(constant.values).dtype
    return (
        dtype.kind in "fiub"
        and dtype.isnative
        and dtype.name != "bool"
        and (dtype.itemsize > 1 or dtype.kind in "iu")
    )


def _sparsify(
    model: Model,
    original: onnx.ModelProto,
    pattern: tuple[int, int],
    method: str,
    exclude: Sequence[str],
    calibration: str | os.PathLike[str] | None,
    seed: int,
    input_range: tuple[float, float] | None,
) -> dict[str, Any]:
    """Run the N:M pass, with second moments of its layers' inputs for OBS, collected on the
    model as it is now (after any structured pruning)."""
    from spa_compiler import nm as nm_math
    from spa_compiler.passes import SparsifyNM
    from spa_compiler.passes.estimate_moments import (
        calibration_feeds,
        collect,
        synthetic_feeds,
    )
    from spa_compiler.passes.sparsify_nm import find_targets

    n, m = pattern
    try:
        nm_math.check_pattern(n, m)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    if method not in ("obs", "magnitude"):
        raise BadInputError(f"unknown N:M method {method!r} (choose obs or magnitude)")
    timings: list[tuple[str, float]] = []
    warnings: list[str] = []
    moments: dict[str, Any] = {}
    layers = [t.layer for t in find_targets(model.graph, m, exclude).targets if t.layer]
    if method == "obs" and layers:
        started = time.perf_counter()
        current = export(model, original)
        try:
            feeds = (
                calibration_feeds(calibration, original)
                if calibration is not None
                else synthetic_feeds(current, model.graph, seed=seed, input_range=input_range)
            )
            moments = collect(current, feeds, layers, seed)
        except BadInputError as error:
            if calibration is not None:
                raise
            warnings.append(f"{error}; N:M masks chosen by magnitude instead")
        finally:
            forget(current)
        timings.append(("nm-moments", time.perf_counter() - started))
    result = run_passes(model, [SparsifyNM(n, m, method, exclude, moments)])
    timings += [(name, seconds) for name, _, seconds in result.results]
    details = result.results[-1][1].details
    targets = details.pop("targets")
    eligible = sum(int(np.prod(t.constant.shape)) for t in targets)
    zeroed = sum(nm_math.weight_violations_zeros(t) for t in targets)
    return {
        "pattern": f"{n}:{m}",
        "method": method,
        "applied": [
            {"tensor": t.constant.name, "axis": t.axis, "method": how}
            for t, (_, how) in zip(targets, details["applied"], strict=True)
        ],
        "skipped": [list(entry) for entry in details["skipped"]],
        "eligible": eligible,
        "zeroed": zeroed,
        "timings": timings,
        "warnings": warnings,
    }


def _load(
    model: Model | onnx.ModelProto | str | os.PathLike[str], timings: list[tuple[str, float]]
) -> tuple[Model, onnx.ModelProto]:
    import spa_compiler

    if isinstance(model, Model):
        raise BadInputError("compile takes a path or an onnx.ModelProto (the original model)")
    started = time.perf_counter()
    # graphsurgeon reads the proto's tensors without changing them, and every rewrite replaces
    # a constant's values instead of writing into them: no copy of the weights is needed.
    # A file's large external weights are read straight into arrays (held, see ir.hold).
    if isinstance(model, onnx.ModelProto):
        original = read_minus_one_as_dynamic(model)  # a copy only where it has -1 dims
    else:
        original = read_model_proto(model, hold_large=True)
    try:
        imported = model_from_proto(original)
        timings.append(("load", time.perf_counter() - started))
        started = time.perf_counter()
        prepared = spa_compiler.prepare(imported)
        timings.append(("prepare", time.perf_counter() - started))
    except BaseException:
        forget(original)
        raise
    return prepared, original


def compile(
    model: onnx.ModelProto | str | os.PathLike[str],
    ratio: float = 0.3,
    criterion: str = "obspa",
    aggregation: str = "sum",
    round_to: int | str = "auto",
    exclude: Sequence[str] = (),
    heads: str = "head",
    seed: int = 0,
    plan: Plan | None = None,
    validate: bool = True,
    global_ranking: bool = False,
    max_group_ratio: float = 0.9,
    target_flops: float | None = None,
    target_params: float | None = None,
    normalization: str | None = None,
    moments: str = "synthetic",
    calibration: str | os.PathLike[str] | None = None,
    compensate: bool | None = None,
    input_range: tuple[float, float] | None = None,
    nm: tuple[int, int] | None = None,
    nm_method: str = "obs",
    nm_exclude: Sequence[str] = (),
    self_contained: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Prune ``model`` structurally; return the pruned ModelProto and a Report.

    ``ratio`` removes that fraction of the channels of every prunable group (whole heads for
    attention unless ``heads="dim"``); ``global_ranking`` ranks all groups' channels together
    instead (at most ``max_group_ratio`` of a group). ``target_flops`` / ``target_params``
    (fractions of the original to keep) search the ratio that reaches them. ``plan`` applies a
    saved plan instead.

    ``self_contained=False`` leaves the large weights of the returned proto as arrays it
    references (``spa_compiler.ir.held_weights``) instead of copying them into it: write it
    with ``spa_compiler.io.write_model`` (which reads them), then ``spa_compiler.ir.forget``
    it — how the CLI writes models larger than memory would hold twice.

    ``criterion="obspa"`` scores channels by the Optimal-Brain-Surgeon error of their
    consumers under second moments from ``moments`` ("synthetic" inputs run through
    onnxruntime, or "model": read off the parameters) or from ``calibration`` (an .npz of real
    inputs), and ``compensate`` (default: on for obspa) refits the consumers on the kept
    channels. ``normalization`` defaults to "mean", and to "none" for obspa, whose scores are
    relative output errors already. ``input_range`` (low, high) says where the model's
    float inputs live, for synthetic and model moments (default: standardized).
    ``criterion="snip"`` scores channels by a label-free, layer-local SNIP saliency under the
    same moments (``criteria.snip_scores``); it needs no trained weights (prune before
    training) and does not compensate unless asked. ``seed`` seeds ``random`` scores and the
    synthetic inputs: the same seed gives the same plan.

    ``nm=(N, M)`` then makes every eligible Conv/Gemm/MatMul weight N:M sparse along its
    reduction axis (after the structured pruning), by SparseGPT-style OBS under the layer
    inputs' second moments (``nm_method="obs"``) or by magnitude; ``nm_exclude`` protects
    weights or nodes by glob.
    """
    if target_flops is not None and target_params is not None:
        raise BadInputError("give either a FLOPs target or a parameter target, not both")
    for name, value in (("target-flops", target_flops), ("target-params", target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise BadInputError(f"{name} is the fraction to keep, in (0, 1]; not {value}")
    from spa_compiler.passes import (
        AnalyzeChannels,
        CompensateWeights,
        CompleteShapes,
        EstimateMoments,
        InferShapes,
        PruneChannels,
        SelectChannels,
        ValidateModel,
    )

    started = time.perf_counter()
    timings: list[tuple[str, float]] = []
    loaded, original = _load(model, timings)
    proto = None
    try:
        # Where shape inference left a multiplying node's dims unknown (they would count as
        # 1), one onnxruntime run of the original tells them (not with validate=False: no
        # onnxruntime session then).
        unknown_before = flops.unresolved_tensors(loaded.graph) if validate else []
        observed = observed_shapes(original, unknown_before)
        before = measure(loaded.graph, observed)
        output_shapes = [None if t.shape is None else list(t.shape) for t in loaded.graph.outputs]

        analyzed = run_passes(loaded, [AnalyzeChannels(heads=plan.heads if plan else heads)])
        timings += [(name, seconds) for name, _, seconds in analyzed.results]
        analysis: Analysis = analyzed.results[-1][1].details["analysis"]
        target_key, target = (
            ("macs", target_flops) if target_flops is not None else ("parameters", target_params)
        )
        removes = plan is not None or ratio > 0 or target is not None or global_ranking
        # nothing to score or refit when no channel goes (--nm alone, --ratio 0)
        uses_obs = (plan.criterion if plan is not None else criterion) == "obspa" and removes
        align = 1
        if nm is not None and len(nm) == 2 and nm[1] > 0:
            # channel counts that stay multiples of M keep every reduction N:M-eligible
            align = int(nm[1])
        compensate = uses_obs if compensate is None else compensate and removes
        # snip scores from the same moments; it refits nothing unless asked (before training
        # there is nothing to preserve)
        scores_need_moments = plan is None and criterion == "snip" and removes
        if normalization is None:
            normalization = "none" if criterion == "obspa" else "mean"
        statistics: dict[str, Any] = {}
        context = None
        warnings: list[str] = []
        uncounted = flops.unresolved(loaded.graph, _observed_shape_of(observed))
        if uncounted:
            warnings.append(
                f"MACs and FLOPs are lower bounds: shape inference left dims unknown at "
                f"{len(uncounted)} node(s) that multiply (first: {uncounted[0]}), each counted "
                "as 1"
                + ("; --target-flops searches on these counts" if target_flops is not None else "")
            )
        if (
            calibration is not None
            and not (uses_obs or compensate or scores_need_moments)
            and nm is None
        ):
            warnings.append("--calib is used by obspa, snip and by compensation only: ignored")
        if uses_obs or compensate or scores_need_moments:
            estimated = run_passes(
                loaded,
                [EstimateMoments(analysis, original, moments, calibration, seed, input_range)],
            )
            timings += [(name, seconds) for name, _, seconds in estimated.results]
            statistics = estimated.results[-1][1].details
            warnings += statistics.pop("warnings", [])
            # The greedy OBS order is only needed as deep as a selection may cut: a uniform
            # ratio needs little beyond it (rounding), a search or global ranking needs it all.
            searching = plan is None and (target is not None or global_ranking)
            depth = 1.0 if searching else min(1.0, ratio + 0.1)
            context = ObsContext(loaded.graph, statistics["moments"], depth)
        achieved: float | None = None
        if plan is None:
            scores: dict[int, np.ndarray] = {}

            def select(trial_ratio: float) -> Plan:
                selection = SelectChannels(
                    analysis,
                    trial_ratio,
                    criterion,
                    aggregation,
                    round_to,
                    exclude,
                    seed,
                    global_ranking,
                    max_group_ratio,
                    normalization,
                    scores,
                    context,
                    align,
                )
                return selection(loaded).details["plan"]

            if target is not None:
                started_search = time.perf_counter()
                groups = {g.id: g for g in analysis.prunable}
                base = max(1, before[target_key])

                def fraction(trial_ratio: float) -> float:
                    estimated = estimate(loaded.graph, groups, select(trial_ratio), observed)
                    return estimated[target_key] / base

                low, high = 0.0, 0.99
                if fraction(high) > target:
                    ratio = high
                else:
                    for _ in range(14):
                        middle = (low + high) / 2
                        low, high = (middle, high) if fraction(middle) > target else (low, middle)
                    ratio = high
                timings.append(("search-ratio", time.perf_counter() - started_search))
            started_select = time.perf_counter()
            plan = select(ratio)
            timings.append(("select-channels", time.perf_counter() - started_select))
            if statistics:  # how the moments were made: applying the plan again needs the same
                plan.metadata["moments"] = statistics["source"]
                plan.metadata["input_range"] = list(input_range) if input_range else None
        elif statistics and plan.metadata.get("moments") not in (None, statistics["source"]):
            warnings.append(
                f"the plan was made with {plan.metadata['moments']} moments, compensated now with "
                f"{statistics['source']} ones: the refitted weights differ from the first compile's"
            )
        matched = check_plan_matches(plan, analysis)

        if compensate and statistics:
            compensated = run_passes(
                loaded, [CompensateWeights(plan, matched, statistics["moments"])]
            )
            timings += [(name, seconds) for name, _, seconds in compensated.results]
            statistics.update(compensated.results[-1][1].details)
        # Second moments are a features² matrix per consumer input (1.6 GB on a 2.4 GB
        # Llama-style model): nothing past selection and compensation reads them.
        statistics.pop("moments", None)
        context = None
        rewritten = run_passes(
            loaded, [PruneChannels(plan, matched), InferShapes(), CompleteShapes()]
        )
        if rewritten.results[-1][1].changed:
            rewritten = run_passes(rewritten.model, [InferShapes()])
        timings += [(name, seconds) for name, _, seconds in rewritten.results]
        sparsity = None
        if nm is not None:
            sparsity = _sparsify(
                rewritten.model, original, nm, nm_method, nm_exclude, calibration, seed, input_range
            )
            timings += sparsity.pop("timings")
            warnings += sparsity.pop("warnings")
        unknown_after = flops.unresolved_tensors(rewritten.model.graph) if validate else []
        # measured before export, or, where a run must tell some dims, on the exported model
        after = None if unknown_after else measure(rewritten.model.graph)
        started_export = time.perf_counter()
        proto = export(rewritten.model, original)
        timings.append(("export", time.perf_counter() - started_export))
        if after is None:
            after = measure(rewritten.model.graph, observed_shapes(proto, unknown_after))
        if target is not None:
            achieved = after[target_key] / max(1, before[target_key])
        if validate:
            checked = run_passes(rewritten.model, [ValidateModel(proto, original, output_shapes)])
            timings += [(name, seconds) for name, _, seconds in checked.results]
            warnings += checked.results[-1][1].details.get("warnings", [])

        if target is not None and achieved is not None and achieved > target * 1.02 + 1e-9:
            warnings.append(
                f"target {target:.3f} of the original {target_key} not reached: achieved "
                f"{achieved:.3f} (prunable groups limit how far spa can go)"
            )
        if not analysis.prunable and not (sparsity and sparsity["applied"]):
            reasons = Counter(
                r.split(": ", 2)[-1]
                for g in analysis.blocked
                for r in g.blocked_reasons
                if g.weight_members and g.channels > 1
            )
            common = "; ".join(reason for reason, _ in reasons.most_common(2)) or "no weights"
            warnings.append(f"no prunable group: the model is unchanged ({common})")
        report = Report(
            before=before,
            after=after,
            groups_pruned=sum(1 for g in plan.groups if g.removed),
            groups_prunable=len(analysis.prunable),
            groups_blocked=len(analysis.blocked),
            seconds=time.perf_counter() - started,
            passes=timings,
            plan=plan,
            groups=[
                {
                    "group": g.group,
                    "channels": g.channels,
                    "kept": len(g.keep),
                    "members": [f"{m['tensor']}[{m['axis']}]" for m in g.members],
                }
                for g in plan.groups
            ],
            warnings=warnings,
        )
        if statistics:
            report.statistics = statistics
        report.nm = sparsity
        report.ratio = ratio if plan.ratio is not None else None
        report.target = (
            None
            if target is None
            else {"metric": target_key, "fraction": target, "achieved": achieved}
        )
        if self_contained:
            materialize(proto)
        return proto, report
    except BaseException:
        if proto is not None:
            forget(proto)
        raise
    finally:  # the arrays held for the proto read from a file go with the compile
        forget(original)


__all__ = ["Report", "compile", "estimate", "export", "measure"]
