"""Validate a compiled model before anything is written: the full ONNX checker, shape
inference, and an onnxruntime session on random inputs whose output shapes must equal the
original model's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa_compiler.errors import BadInputError, PassError
from spa_compiler.ir import Model, check, skeleton
from spa_compiler.pipeline import Pass, PassResult
from spa_compiler.runtime import random_inputs, run_session


class ValidateModel(Pass):
    name = "validate"

    def __init__(
        self,
        compiled: onnx.ModelProto,
        original: onnx.ModelProto,
        output_shapes: list[list | None] | None = None,
    ) -> None:
        """``output_shapes``: the original's inferred output shapes; where every dim is a
        number or an input's symbolic dim, they replace running the original model."""
        self.compiled, self.original = compiled, original
        self.output_shapes = output_shapes

    def expected_shapes(self, feeds: dict[str, np.ndarray]) -> list[tuple] | None:
        if self.output_shapes is None:
            return None
        symbols: dict[str, int] = {}
        for value in self.original.graph.input:
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.dim_param and value.name in feeds:
                    symbols[dim.dim_param] = int(np.shape(feeds[value.name])[axis])
        shapes = []
        for shape in self.output_shapes:
            if shape is None or not all(isinstance(d, int) or d in symbols for d in shape):
                return None
            shapes.append(tuple(d if isinstance(d, int) else symbols[d] for d in shape))
        return shapes

    def call(self, model: Model) -> PassResult:
        warnings: list[str] = []
        problem = check(self.compiled, full=True)
        feeds = random_inputs(self.original)
        weights = {
            name: np.asarray(tensor.values)
            for name, tensor in model.graph.tensors().items()
            if isinstance(tensor, gs.Constant)
        }
        try:
            produced = run_session(self.compiled, feeds, weights)
        except Exception as error:
            if problem:
                original_problem = check(self.original, full=True)
                if original_problem is not None:
                    raise BadInputError(
                        f"the model fails the ONNX checker's shape inference: {original_problem}"
                    ) from None
                raise PassError(f"the pruned model fails the ONNX checker: {problem}") from None
            try:
                run_session(self.original, feeds)
            except Exception as original_error:  # custom ops, or inputs it cannot take
                warning = (
                    f"onnxruntime cannot run the original model here ({_first(original_error)});"
                    " the pruned model was validated by the ONNX checker only"
                )
                return PassResult(model, changed=False, details={"warnings": [warning]})
            raise PassError(
                f"the pruned model does not run in onnxruntime: {_first(error)}"
            ) from None
        if problem:
            # Output declarations that contradict the graph (an output declared with the wrong
            # rank, which only shows once shapes are folded) are the author's: they are kept
            # if the model checks with the ranks onnxruntime produced, and the output shapes
            # are compared with the original's as run, not as declared.
            relaxed = skeleton(self.compiled)
            for value, result in zip(relaxed.graph.output, produced, strict=True):
                shape = value.type.tensor_type.shape
                shape.Clear()
                for _ in range(np.ndim(result)):
                    shape.dim.add()
            if check(relaxed, full=True) is not None:
                original_problem = check(self.original, full=True)
                if original_problem is not None:  # the input's own inconsistency, not spa's
                    raise BadInputError(
                        f"the model fails the ONNX checker's shape inference: {original_problem}"
                    )
                raise PassError(f"the pruned model fails the ONNX checker: {problem}")
            warnings.append(
                f"the model's declared output shapes contradict its graph ({problem}); "
                "they are kept as declared and the outputs were checked by onnxruntime"
            )
        declared = None if warnings else self.expected_shapes(feeds)
        known = declared
        if known is not None and _first_different(known, produced) is not None:
            known = None  # the declaration may be the author's mistake: ask the original model
        if known is None:
            try:
                known = [np.shape(a) for a in run_session(self.original, feeds)]
                if declared is not None and [tuple(k) for k in known] != declared:
                    warnings.append(
                        f"the model declares output shapes {declared} but produces {known} on "
                        "inputs of the declared shapes; the pruned model's were compared with "
                        "what the original produces"
                    )
            except Exception as original_error:  # a broken node the pruned model dropped as dead
                warnings.append(
                    f"onnxruntime cannot run the original model here ({_first(original_error)});"
                    " the pruned model runs, its output shapes were not compared"
                )
                known = [np.shape(a) for a in produced]
        i = _first_different(known, produced)
        if i is not None:
            shape, result = tuple(known[i]), np.shape(produced[i])
            raise PassError(f"output {i} changed shape: {shape} -> {result}")
        return PassResult(
            model, changed=False, details={"outputs": len(produced), "warnings": warnings}
        )


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _first_different(shapes: list, arrays: list) -> int | None:
    """The index of the first array whose shape is not the expected one, or None."""
    for i, (shape, array) in enumerate(zip(shapes, arrays, strict=True)):
        if tuple(shape) != np.shape(array):
            return i
    return None
