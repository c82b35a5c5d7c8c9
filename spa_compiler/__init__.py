"""spa: Structurally Prune Anything, an ONNX graph-rewriting compiler."""

from __future__ import annotations

import os

import onnx

from spa_compiler.analysis import Analysis
from spa_compiler.channel_graph import ChannelGraph, Group, Member
from spa_compiler.errors import BadInputError, SpaError
from spa_compiler.ir import Model, load_model, model_from_proto

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "BadInputError",
    "ChannelGraph",
    "Group",
    "Member",
    "Model",
    "SpaError",
    "bench",
    "compile",
    "from_proto",
    "inspect",
    "load",
    "load_model",
    "prepare",
]


def prepare(model: Model) -> Model:
    """Shape inference and constant folding: the passes every analysis starts from."""
    from spa_compiler.passes import CompleteShapes, FoldConstants, InferShapes
    from spa_compiler.pipeline import run_passes

    passes = [InferShapes(check_declared=True), FoldConstants(), InferShapes()]
    model = run_passes(model, passes).model
    for _ in range(8):  # each round can unlock reshapes further down
        result = run_passes(model, [CompleteShapes()])
        if not result.changed:
            break
        model = run_passes(result.model, [InferShapes()]).model
    return model


def load(path: str | os.PathLike[str]) -> Model:
    """Load an .onnx file safely and prepare it for analysis."""
    return prepare(load_model(path))


def bench(models, **options):
    """Time models side by side in onnxruntime; see ``spa_compiler.latency.bench``."""
    from spa_compiler.latency import bench as bench_models

    return bench_models(models, **options)


def compile(model, **options):
    """Prune a model structurally; see ``spa_compiler.compiler.compile``."""
    from spa_compiler.compiler import compile as compile_model

    return compile_model(model, **options)


def from_proto(proto: onnx.ModelProto) -> Model:
    """Check an in-memory ModelProto (no external data) and prepare it for analysis."""
    from spa_compiler.ir import check, read_minus_one_as_dynamic

    proto = read_minus_one_as_dynamic(proto)
    problem = check(proto)
    if problem:
        raise BadInputError(f"model fails the ONNX checker: {problem[:300]}")
    return prepare(model_from_proto(proto))


def inspect(
    model: Model | onnx.ModelProto | str | os.PathLike[str], heads: str = "head"
) -> Analysis:
    """Coupled-channel analysis of a model: groups, what blocks them, and coverage.

    ``model`` is a path, an in-memory ``onnx.ModelProto`` or an already prepared ``Model``.
    """
    from spa_compiler.passes import AnalyzeChannels

    if isinstance(model, onnx.ModelProto):
        model = from_proto(model)
    elif not isinstance(model, Model):
        model = load(model)
    return AnalyzeChannels(heads=heads)(model).details["analysis"]
