"""Compiler passes (installed as ``spa_compiler.passes``), one pass per module."""

from spa_compiler.passes.analyze_channels import AnalyzeChannels
from spa_compiler.passes.compensate_weights import CompensateWeights
from spa_compiler.passes.complete_shapes import CompleteShapes
from spa_compiler.passes.estimate_moments import EstimateMoments
from spa_compiler.passes.fold_constants import FoldConstants
from spa_compiler.passes.infer_shapes import InferShapes
from spa_compiler.passes.prune_channels import PruneChannels
from spa_compiler.passes.select_channels import SelectChannels
from spa_compiler.passes.sparsify_nm import SparsifyNM
from spa_compiler.passes.validate_model import ValidateModel

__all__ = [
    "AnalyzeChannels",
    "CompensateWeights",
    "CompleteShapes",
    "EstimateMoments",
    "FoldConstants",
    "InferShapes",
    "PruneChannels",
    "SelectChannels",
    "SparsifyNM",
    "ValidateModel",
]
