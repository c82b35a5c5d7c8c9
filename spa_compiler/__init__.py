"""spa: Structurally Prune Anything, an ONNX graph-rewriting compiler."""

from __future__ import annotations

import os

from spa_compiler.analysis import Analysis
from spa_compiler.channel_graph import ChannelGraph, Group, Member
from spa_compiler.errors import BadInputError, SpaError
from spa_compiler.ir import Model, load_model

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "BadInputError",
    "ChannelGraph",
    "Group",
    "Member",
    "Model",
    "SpaError",
    "inspect",
    "load",
    "load_model",
    "prepare",
]


def prepare(model: Model) -> Model:
    """Shape inference and constant folding: the passes every analysis starts from."""
    from spa_compiler.passes import FoldConstants, InferShapes, ResolveReshapes
    from spa_compiler.pipeline import run_passes

    model = run_passes(model, [InferShapes(), FoldConstants(), InferShapes()]).model
    for _ in range(8):  # each round can unlock reshapes further down
        result = run_passes(model, [ResolveReshapes()])
        if not result.changed:
            break
        model = run_passes(result.model, [InferShapes()]).model
    return model


def load(path: str | os.PathLike[str]) -> Model:
    """Load an .onnx file safely and prepare it for analysis."""
    return prepare(load_model(path))


def inspect(model_or_path: Model | str | os.PathLike[str], heads: str = "head") -> Analysis:
    """Coupled-channel analysis of a model: groups, what blocks them, and coverage."""
    from spa_compiler.passes import AnalyzeChannels

    model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)
    return AnalyzeChannels(heads=heads)(model).details["analysis"]
