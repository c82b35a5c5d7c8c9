"""Lower Constant nodes to weights and fold constant shape sub-graphs.

PaddlePaddle-style files keep every weight in a ``Constant`` node; lowering them makes them
plain constants, exactly like initializers. Shape sub-graphs (the legacy torch exporter's
Shape -> Gather -> Concat -> Reshape chains) fold to constants when the shapes they read are
static. Large float tensors are not folded: a transposed or dequantized weight stays an op on
its original weight, so the file keeps the form its author gave it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.channel_graph import is_floating
from spa_compiler.ir import Model
from spa_compiler.pipeline import Pass, PassResult

LARGEST_FOLDED_FLOAT_ELEMENTS = 4096


def _folds_a_weight(node: gs.Node) -> bool:
    if node.op == "DequantizeLinear":  # folding would store a quantized weight as float
        return True
    for tensor in node.inputs:
        if (
            isinstance(tensor, gs.Constant)
            and is_floating(tensor.dtype)
            and int(np.prod(tensor.shape)) > LARGEST_FOLDED_FLOAT_ELEMENTS
        ):
            return True
    return False


def _split_ranged_shapes(graph: gs.Graph) -> None:
    """Shape(start, end) -> Shape then Slice: graphsurgeon's shape folding ignores the range
    attributes (onnx-graphsurgeon 0.6.1) and would fold the wrong sizes."""
    for node in list(graph.nodes):
        if node.op != "Shape" or ("end" not in node.attrs and not node.attrs.get("start", 0)):
            continue
        start = int(node.attrs.pop("start", 0))
        end = int(node.attrs.pop("end", np.iinfo(np.int64).max))
        output = node.outputs[0]
        full = gs.Variable(f"{output.name}__full_shape", dtype=np.int64)
        node.outputs = [full]
        bounds = [
            gs.Constant(f"{output.name}__{label}", np.array([value], dtype=np.int64))
            for label, value in (("start", start), ("end", end), ("axes", 0))
        ]
        graph.nodes.append(
            gs.Node("Slice", name=f"{node.name}__range", inputs=[full, *bounds], outputs=[output])
        )
    graph.toposort()


def _signature(graph: gs.Graph) -> tuple[int, int]:
    constants = sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
    return len(graph.nodes), constants


class FoldConstants(Pass):
    name = "fold-constants"

    def call(self, model: Model) -> PassResult:
        graph = model.graph
        before = _signature(graph)
        _split_ranged_shapes(graph)
        logger = logging.getLogger("onnx_graphsurgeon")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import onnxruntime
            from onnx_graphsurgeon.logger import G_LOGGER

            onnxruntime.set_default_logger_severity(4)
            gs_level = G_LOGGER.severity
            G_LOGGER.severity = G_LOGGER.ERROR
            graph.fold_constants(
                fold_shapes=True,
                error_ok=True,
                flatten_subgraphs=False,
                should_exclude_node=_folds_a_weight,
            )
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        finally:
            G_LOGGER.severity = gs_level
            logger.setLevel(level)
        after = _signature(graph)
        return PassResult(model, changed=after != before, details={"nodes": after[0]})
