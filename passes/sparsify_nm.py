"""N:M sparsity on the weights of Conv, Gemm and MatMul, along the reduction axis — the axis
TensorRT and cuSPARSELt group: Conv weight axis 1 (input channels), MatMul B axis −2, Gemm B
by ``transB``. Weights may reach their node through Transpose, Cast, Identity and a
DequantizeLinear (then the quantized value set to the zero point is the zero). Each weight
that cannot take the pattern is skipped with its reason: reduction size not a multiple of M,
not floating point, computed at run time, shared with other readers, or excluded.

The model stays dense (it loads anywhere as is) with the zero pattern in its weights.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler import nm
from spa_compiler.channel_graph import is_floating
from spa_compiler.ir import Model
from spa_compiler.linear_layers import LAYER_RULES, LinearLayer
from spa_compiler.obs import Moments
from spa_compiler.pipeline import Pass, PassResult

PATH_OPS = ("Cast", "Identity")


@dataclass
class Target:
    """A weight constant that feeds one node's reduction, and how."""

    node: gs.Node
    constant: gs.Constant
    axis: int  # the reduction axis in the constant's own layout
    dequantize: gs.Node | None = None
    layer: LinearLayer | None = None  # set where OBS can refit it (a direct float weight)


@dataclass
class Found:
    targets: list[Target] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (weight, reason)


def _reduction(node: gs.Node) -> tuple[int, int] | None:
    """(input index of the weight, reduction axis in the node's view of it)."""
    if node.op == "Conv" and len(node.inputs) > 1:
        return 1, 1
    if node.op == "Gemm" and len(node.inputs) > 1:  # B's reduction axis ignores transA
        return 1, 1 if node.attrs.get("transB", 0) else 0
    if node.op == "MatMul" and len(node.inputs) > 1:
        return 1, -2  # counted from the end: the constant's rank settles it
    return None


_FOUR_BIT_TYPES = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1: stored two to a byte


def _unsupported(constant: gs.Constant, dequantize: gs.Node | None) -> str | None:
    lazy = getattr(constant, "_values", None)
    stored = getattr(getattr(lazy, "tensor", None), "data_type", None)
    if stored in _FOUR_BIT_TYPES:
        return "4-bit weights are not supported"
    if dequantize is not None and dequantize.attrs.get("block_size", 0):
        return "block-quantized weights are not supported"
    return None


def _trace(tensor: gs.Tensor, axis: int) -> tuple[gs.Constant, int, gs.Node | None] | str | None:
    """Follow a weight back to its constant through layout-only ops (and one
    DequantizeLinear right after the constant), mapping the axis; a reason where a constant
    cannot take the pattern; None where the operand is no weight (an activation)."""
    dequantize = None
    path: list[gs.Node] = []
    while not isinstance(tensor, gs.Constant):
        if not tensor.inputs:
            return None
        producer = tensor.inputs[0]
        if producer.op not in (*PATH_OPS, "Transpose", "DequantizeLinear"):
            return None
        if len(tensor.outputs) != 1:
            return "the weight is shared with other readers"
        if producer.op == "DequantizeLinear":
            if not isinstance(producer.inputs[0], gs.Constant):
                return None
            dequantize = producer
        path.append(producer)
        tensor = producer.inputs[0]
    if len(tensor.outputs) != 1:
        return "the weight is shared with other readers"
    rank = len(tensor.shape)  # layout ops keep the rank: the constant's settles every axis
    if rank < 2:
        return None
    axis = axis % rank
    for producer in path:  # node side first: an output axis i is input axis perm[i]
        if producer.op == "Transpose":
            perm = producer.attrs.get("perm", list(range(rank))[::-1])
            axis = int(perm[axis])
    return tensor, axis, dequantize


def find_targets(graph: gs.Graph, m: int, exclude: Sequence[str] = ()) -> Found:
    found = Found()
    for node in graph.nodes:
        reduction = _reduction(node)
        if reduction is None:
            continue
        index, axis = reduction
        if node.op in ("MatMul", "Gemm") and isinstance(_trace(node.inputs[0], -1), tuple):
            found.skipped.append(
                (
                    node.inputs[0].name,
                    f"a constant first operand of {node.op} (W·x) is not supported",
                )
            )
        weight = node.inputs[index]
        traced = _trace(weight, axis)
        if traced is None:
            continue
        if isinstance(traced, str):
            found.skipped.append((weight.name, traced))
            continue
        constant, axis, dequantize = traced
        names = {constant.name, weight.name, node.name}
        if any(fnmatch.fnmatchcase(name, p) for name in names for p in exclude):
            found.skipped.append((constant.name, "excluded by --nm-exclude"))
            continue
        reason = _unsupported(constant, dequantize)
        if reason:
            found.skipped.append((constant.name, reason))
            continue
        if dequantize is None and not is_floating(constant.dtype):
            found.skipped.append((constant.name, f"not floating point ({constant.dtype})"))
            continue
        size = int(constant.shape[axis])
        if size % m:
            found.skipped.append((constant.name, f"reduction size {size} is not a multiple of {m}"))
            continue
        target = Target(node, constant, axis, dequantize)
        if dequantize is None and weight is constant and node.op in LAYER_RULES:
            layer = LAYER_RULES[node.op](node, constant, axis)
            if (
                layer is not None
                and layer.axis == axis
                and isinstance(layer.activation, gs.Variable)
            ):
                target.layer = layer
        found.targets.append(target)
    return found


def _dequantized(target: Target, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float values of a quantized weight and, broadcast to it, its zero point."""
    node = target.dequantize
    scale = np.asarray(node.inputs[1].values, dtype=np.float64)
    zero = (
        np.asarray(node.inputs[2].values)
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant)
        else np.zeros((), dtype=values.dtype)
    )
    if zero.size != scale.size:
        zero = np.zeros(scale.shape, dtype=values.dtype)
    if scale.ndim == 1 and scale.size > 1:  # per-axis
        shape = [1] * values.ndim
        shape[int(node.attrs.get("axis", 1)) % values.ndim] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    zero = np.broadcast_to(zero, values.shape)
    return (values.astype(np.float64) - zero) * scale, zero


def _positive_zeros(values: np.ndarray) -> np.ndarray:
    """``values`` with every zero +0.0: the compressed format (``nm.compress``) keeps only N
    entries per group, so a -0.0 that a pruned negative weight (w · 0) or a cast's underflow
    left would come back from the archive as +0.0, not bit for bit what the model holds."""
    return np.where(values == 0, np.zeros_like(values), values)


class SparsifyNM(Pass):
    name = "sparsify-nm"

    def __init__(
        self,
        n: int,
        m: int,
        method: str = "obs",
        exclude: Sequence[str] = (),
        moments: dict[str, Moments] | None = None,
    ) -> None:
        nm.check_pattern(n, m)
        if method not in ("obs", "magnitude"):
            raise ValueError(f"unknown N:M method {method!r}")
        self.n, self.m, self.method = n, m, method
        self.exclude, self.moments = tuple(exclude), moments or {}

    def call(self, model: Model) -> PassResult:
        found = find_targets(model.graph, self.m, self.exclude)
        applied = []
        for target in found.targets:
            values = np.asarray(target.constant.values)
            if target.dequantize is not None:
                real, zero = _dequantized(target, values)
                keep = nm.magnitude_mask(nm.rows_of(real, target.axis), self.n, self.m)
                mask = nm.from_rows(keep.astype(np.uint8), real, target.axis).astype(bool)
                target.constant.values = np.where(mask, values, zero).astype(values.dtype)
                applied.append((target.constant.name, "magnitude (quantized)"))
                continue
            rows = nm.rows_of(values, target.axis)
            stats = (
                self.moments.get(target.layer.activation.name) if target.layer is not None else None
            )
            if (
                self.method == "obs"
                and stats is not None
                and stats.usable
                and (stats.features == rows.shape[1])
            ):
                with np.errstate(all="ignore"):
                    refitted = nm.obs_nm(rows, stats.hessian(with_bias=False), self.n, self.m)
                stored = nm.from_rows(refitted, values, target.axis)
                if np.isfinite(stored).all():  # after the cast: fp16 can overflow
                    target.constant.values = _positive_zeros(stored)
                    applied.append((target.constant.name, "obs"))
                    continue
            rows = np.where(nm.magnitude_mask(rows, self.n, self.m), rows, 0.0)
            target.constant.values = _positive_zeros(nm.from_rows(rows, values, target.axis))
            applied.append((target.constant.name, "magnitude"))
        return PassResult(
            model,
            changed=bool(applied),
            details={
                "pattern": f"{self.n}:{self.m}",
                "applied": applied,
                "skipped": found.skipped,
                "targets": found.targets,
            },
        )
