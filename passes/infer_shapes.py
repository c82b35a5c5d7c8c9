"""Shape inference: ONNX's (with data propagation), then onnxruntime's symbolic shape
inference, which follows the shape arithmetic exporters emit (Shape -> Gather -> Concat ->
Where -> Expand for torch's expand, B*S merges for addmm) with named symbolic dims.

Inference runs on a skeleton of the graph: large weights become typed graph inputs, so the
weights are neither serialized nor copied (BERT-base: 3.5 s -> well under a second). Shapes
are written back onto the graphsurgeon tensors in place.

A file's declared shapes of intermediate tensors (``value_info``) are claims; inference is
computed. With ``check_declared`` (the first run on a loaded model), ONNX's inference first runs
without them, and a declared shape that it contradicts (another rank, or another value for a
dim both give as a number) is replaced by the inferred one (jax2onnx 0.17.1 declares the NHWC
shapes of tensors it has made NCHW). Declared shapes that inference does not reach stay, and
so do the graph's input and output declarations.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import pathlib
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa_compiler.errors import BadInputError, SpaWarning
from spa_compiler.ir import ANONYMOUS_DIM_PREFIX, SKELETON_ELEMENTS, Model
from spa_compiler.pipeline import Pass, PassResult


def _known_dims(shape: list | tuple | None) -> int:
    if shape is None:
        return -1
    return sum(1 for d in shape if isinstance(d, int))


def _skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """Export with large constants swapped for typed inputs; the graph is restored after."""
    swapped: list[tuple[gs.Node, int, gs.Constant]] = []
    placeholders: dict[str, gs.Variable] = {}
    original_inputs = list(graph.inputs)
    try:
        for node in graph.nodes:
            for i, tensor in enumerate(node.inputs):
                # The shape, not .values: reading values would load every lazy weight.
                if (
                    isinstance(tensor, gs.Constant)
                    and int(np.prod(tensor.shape, dtype=np.int64)) > SKELETON_ELEMENTS
                ):
                    if tensor.name not in placeholders:
                        placeholders[tensor.name] = gs.Variable(
                            tensor.name, dtype=tensor.dtype, shape=list(tensor.shape)
                        )
                    swapped.append((node, i, tensor))
                    node.inputs[i] = placeholders[tensor.name]
        graph.inputs = original_inputs + list(placeholders.values())
        return gs.export_onnx(graph, do_type_check=False)
    finally:
        for node, i, tensor in swapped:
            node.inputs[i] = tensor
        graph.inputs = original_inputs


_RUNS = itertools.count()
MAX_ACTIVATION_BYTES = 2**32  # onnxruntime's own limit for a Tile output


# The name it is loaded under, and so its logger's name (``logging.getLogger(__name__)``).
SYMBOLIC_MODULE = "spa_symbolic_shape_infer"


@functools.cache
def _symbolic_shape_inference() -> type:
    """onnxruntime's SymbolicShapeInference, loaded from its file: importing the
    ``onnxruntime.tools`` package imports torch when it is installed (1.4 s)."""
    spec = importlib.util.find_spec("onnxruntime")
    path = pathlib.Path(spec.origin).parent / "tools" / "symbolic_shape_infer.py"
    module_spec = importlib.util.spec_from_file_location(SYMBOLIC_MODULE, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SymbolicShapeInference


class _GuessRecorder(logging.Handler):
    """The symbolic inference's warnings where it assumed what it could not prove ("Unable to
    determine if e <= d, treat as equal" on a Slice, "Cannot determine if i < 0"): shapes
    built on them can be wrong (a window of 7 where the tensor holds 4)."""

    GUESSES = ("treat as equal", "Cannot determine", "unsafe merge")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(guess in message for guess in self.GUESSES):
            self.messages.append(message)


def _symbolic_inference(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]] | None:
    """onnxruntime's symbolic shape inference and the outputs of the Slice nodes where it
    guessed (their shapes, and all shapes computed from them, may be wrong); None where it
    cannot handle the graph or guessed elsewhere."""
    SymbolicShapeInference = _symbolic_shape_inference()  # noqa: N806 - a class

    # Loaded from its file under SYMBOLIC_MODULE, it logs there, not to its package name
    # (its "Unable to determine if ... treat as equal" went to stderr, one line per Slice).
    # Its warnings are kept off stderr but read: where it guessed, its shapes are not used.
    logger = logging.getLogger(SYMBOLIC_MODULE)
    level, propagate = logger.level, logger.propagate
    guesses = _GuessRecorder()
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(guesses)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            # SymbolicShapeInference.infer_shapes, less its side effect: when inference stays
            # incomplete it saves "sym_shape_infer_temp.onnx" into the working directory.
            inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
            guessed: set[str] = set()
            attributed = 0
            infer_slice = inference.dispatcher_["Slice"]

            def slice_noting_guesses(node: onnx.NodeProto) -> None:
                nonlocal attributed
                before = len(guesses.messages)
                infer_slice(node)
                if len(guesses.messages) > before:
                    guessed.update(name for name in node.output if name)
                    attributed += len(guesses.messages) - before

            inference.dispatcher_["Slice"] = slice_noting_guesses
            complete = False
            inference._preprocess(proto)
            while inference.run_:
                complete = inference._infer_impl()
            inference._update_output_from_vi()
            if len(guesses.messages) > attributed:  # a guess not traced to a Slice
                return None
            return (inference.out_mp_, guessed) if complete else None
    except Exception:  # it raises bare exceptions on ops it does not know; ONNX's result stands
        return None
    finally:
        logger.removeHandler(guesses)
        logger.setLevel(level)
        logger.propagate = propagate


def _downstream(graph: gs.Graph, names: set[str]) -> set[str]:
    """``names`` and every tensor computed from them (through any number of nodes)."""
    tensors = graph.tensors()
    found, frontier = set(), [name for name in names if name in tensors]
    while frontier:
        name = frontier.pop()
        if name in found:
            continue
        found.add(name)
        for node in tensors[name].outputs:
            frontier.extend(t.name for t in node.outputs if t.name and t.name not in found)
    return found | set(names)


def _all_resolved(proto: onnx.ModelProto) -> bool:
    """Whether ONNX's inference left no tensor without a fully named or numeric shape."""
    values = [*proto.graph.value_info, *proto.graph.output]
    produced = {name for node in proto.graph.node for name in node.output if name}
    if len({v.name for v in values} & produced) < len(produced):
        return False
    for value in values:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            return False
        for dim in tensor_type.shape.dim:
            if not dim.HasField("dim_value") and (
                not dim.dim_param or dim.dim_param.startswith("unk__")
            ):
                return False
    return True


def _better_named(new: list | None, old: list | None, input_symbols: set[str]) -> bool:
    """Same dims, but ``new`` names its symbolic ones after graph inputs' dims where ``old``
    used names of its own (an exporter's 'Tanh1342_dim_0' for the batch)."""
    if new is None or old is None or len(new) != len(old):
        return False
    improved = False
    for a, b in zip(new, old, strict=True):
        if isinstance(a, int) or isinstance(b, int):
            if a != b:
                return False
        elif a in input_symbols and b not in input_symbols:
            improved = True
        elif a != b:
            return False
    return improved


def _to_gs_shape(value: onnx.ValueInfoProto, run: int) -> list | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    shape: list = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        elif d.dim_param.startswith("unk__"):
            shape.append(f"{ANONYMOUS_DIM_PREFIX}{run}:{d.dim_param[5:]}")
        else:
            shape.append(d.dim_param or None)
    return shape


def _onnx_inference(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(
            skeleton, check_type=False, strict_mode=False, data_prop=True
        )
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise BadInputError(f"ONNX shape inference failed: {first_line}") from None


# ai.onnx.ml operators whose output has their input's shape, which ONNX's shape inference
# leaves unknown (the element type each gives; None: its input's). skl2onnx puts them in
# front of models (StandardScaler -> Scaler), and without their shape nothing after them
# could be proven.
ML_SAME_SHAPE = {
    "Scaler": onnx.TensorProto.FLOAT,
    "Normalizer": onnx.TensorProto.FLOAT,
    "Binarizer": None,
    "Imputer": None,
}


def _through_ml_operators(inferred: onnx.ModelProto) -> onnx.ModelProto:
    """Give the outputs of ``ML_SAME_SHAPE`` operators their input's shape and infer again,
    until no such output is left without one."""
    graph = inferred.graph
    outputs = {v.name for v in graph.output}
    for _ in range(len(graph.node)):
        known = {
            v.name: v
            for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.tensor_type.HasField("shape")
        }
        added = False
        for node in graph.node:
            if node.domain != "ai.onnx.ml" or node.op_type not in ML_SAME_SHAPE:
                continue
            if not node.input or not node.output or node.input[0] not in known:
                continue
            result = node.output[0]
            if result in known or result in outputs:
                continue
            value = onnx.ValueInfoProto()
            value.CopyFrom(known[node.input[0]])
            value.name = result
            if ML_SAME_SHAPE[node.op_type] is not None:
                value.type.tensor_type.elem_type = ML_SAME_SHAPE[node.op_type]
            graph.value_info.append(value)
            added = True
        if not added:
            break
        inferred = _onnx_inference(inferred)
        graph = inferred.graph
    return inferred


def _contradicts(inferred: list, declared: list) -> bool:
    """Whether two shapes of one tensor cannot both hold: other ranks, or a dim that both give
    as a number with different values (a name may stand for any number)."""
    if len(inferred) != len(declared):
        return True
    return any(
        isinstance(a, int) and isinstance(b, int) and a != b
        for a, b in zip(inferred, declared, strict=True)
    )


def _correct_declarations(graph: gs.Graph, skeleton: onnx.ModelProto, run: int) -> list[str]:
    """Replace the declared shapes of intermediate tensors that ONNX's inference, run without
    any of them, contradicts; return one description per replacement."""
    bare = onnx.ModelProto()
    bare.CopyFrom(skeleton)
    del bare.graph.value_info[:]
    inferred = _onnx_inference(bare)
    boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
    tensors = graph.tensors()
    corrected = []
    for value in inferred.graph.value_info:
        tensor = tensors.get(value.name)
        if not isinstance(tensor, gs.Variable) or tensor.shape is None or value.name in boundary:
            continue
        shape = _to_gs_shape(value, run)
        if shape is not None and _contradicts(shape, list(tensor.shape)):
            corrected.append(f"'{value.name}' declared {list(tensor.shape)}, inferred {shape}")
            tensor.shape = shape
    return corrected


class InferShapes(Pass):
    """``symbolic``: also run onnxruntime's symbolic inference (slower; follows shape
    arithmetic ONNX's inference leaves unknown). ``check_declared``: first replace declared
    intermediate shapes that ONNX's inference contradicts (see the module's docstring)."""

    name = "infer-shapes"

    def __init__(self, symbolic: bool = True, check_declared: bool = False) -> None:
        self.symbolic = symbolic
        self.check_declared = check_declared

    def call(self, model: Model) -> PassResult:
        graph = model.graph
        skeleton = _skeleton(graph)
        skeleton.ir_version = model.ir_version
        corrected = []
        if self.check_declared:  # its anonymous dims get names of their own run
            corrected = _correct_declarations(graph, skeleton, next(_RUNS))
        if corrected:
            warnings.warn(
                f"{len(corrected)} declared shape(s) contradict ONNX shape inference and were "
                f"replaced by the inferred ones (first: {corrected[0]})",
                SpaWarning,
                stacklevel=1,
            )
            skeleton = _skeleton(graph)
            skeleton.ir_version = model.ir_version
        inferred = _through_ml_operators(_onnx_inference(skeleton))
        values = [*inferred.graph.value_info, *inferred.graph.output]
        symbolic = None
        if self.symbolic and not _all_resolved(inferred):
            symbolic = _symbolic_inference(inferred)
        tensors = graph.tensors()
        if symbolic is not None:
            symbolic_proto, guessed = symbolic
            # A Slice it could not bound got its input's length (a crop after padding kept
            # the padded size): that shape and every shape computed from it are not taken.
            tainted = _downstream(graph, guessed)
            values += [
                value
                for value in [*symbolic_proto.graph.value_info, *symbolic_proto.graph.output]
                if value.name not in tainted
            ]
        input_symbols = {d for t in graph.inputs for d in (t.shape or []) if isinstance(d, str)}
        changed = len(corrected)
        run = next(_RUNS)
        for value in values:
            tensor = tensors.get(value.name)
            if not isinstance(tensor, gs.Variable):
                continue
            shape = _to_gs_shape(value, run)
            if (
                _known_dims(shape) > _known_dims(tensor.shape)
                or (tensor.shape is None and shape is not None)
                or _better_named(shape, tensor.shape, input_symbols)
            ):
                tensor.shape = shape
                changed += 1
            if tensor.dtype is None and value.type.tensor_type.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(
                    value.type.tensor_type.elem_type
                )
        _refuse_absurd_activations(graph)
        details = {"updated_shapes": changed, "corrected_declarations": corrected}
        return PassResult(model, changed=changed > 0, details=details)


def _itemsize(dtype: object) -> int:
    """Bytes per element; onnx-graphsurgeon keeps a type NumPy lacks (bfloat16, float8) as
    its ONNX enum value."""
    if dtype is None:
        return 4
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        if isinstance(dtype, int) or hasattr(dtype, "value"):
            code = int(getattr(dtype, "value", dtype))
            return onnx.helper.tensor_dtype_to_np_dtype(code).itemsize
        return 4


def _refuse_absurd_activations(graph: gs.Graph) -> None:
    """spa runs the model (validation, statistics): an activation whose inferred static shape
    exceeds ``MAX_ACTIVATION_BYTES`` (a Pad, Tile, Expand or Resize blown up by its
    attributes) is refused here rather than left to exhaust memory in onnxruntime."""
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Variable) or not tensor.shape:
            continue
        if not all(isinstance(d, int) and d >= 0 for d in tensor.shape):
            continue
        itemsize = _itemsize(tensor.dtype)
        size = float(np.prod(tensor.shape, dtype=np.float64)) * itemsize
        if size > MAX_ACTIVATION_BYTES:
            raise BadInputError(
                f"tensor '{tensor.name}' has shape {list(tensor.shape)} ({size:,.0f} bytes): "
                f"spa runs the model and refuses activations over {MAX_ACTIVATION_BYTES:,} bytes"
            )
