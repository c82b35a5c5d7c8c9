"""ONNX shape inference with data propagation, so Reshape targets computed from Shape are known."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from spa_compiler.errors import BadInputError
from spa_compiler.ir import Model
from spa_compiler.pipeline import Pass, PassResult


def _known_shapes(graph: gs.Graph) -> int:
    return sum(
        1
        for tensor in graph.tensors().values()
        if isinstance(tensor, gs.Variable) and tensor.shape is not None
    )


class InferShapes(Pass):
    name = "infer-shapes"

    def call(self, model: Model) -> PassResult:
        before = _known_shapes(model.graph)
        proto = model.to_onnx()
        try:
            inferred = onnx.shape_inference.infer_shapes(
                proto, check_type=False, strict_mode=False, data_prop=True
            )
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise BadInputError(f"ONNX shape inference failed: {first_line}") from None
        graph = gs.import_onnx(inferred)
        result = Model(
            graph=graph,
            opset=model.opset,
            ir_version=model.ir_version,
            path=model.path,
            metadata=model.metadata,
        )
        after = _known_shapes(graph)
        return PassResult(result, changed=after != before, details={"known_shapes": after})
