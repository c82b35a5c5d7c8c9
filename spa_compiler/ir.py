"""Loading ONNX files safely into the one IR spa rewrites: onnx-graphsurgeon's ``Graph``.

External data is resolved by spa itself, not by onnx's loader, so that every file read is
checked first: relative location, inside the model's folder after resolving symbolic links,
a regular file, offset and length inside it, and a length that matches the tensor's shape.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from spa_compiler.errors import BadInputError, SpaWarning, UnsafeExternalDataError

# Opsets 22 and 23 changed none of the op table's semantics: 22 added bfloat16 to many ops'
# types, 23 float4e2m1, QuantizeLinear's ``precision`` and DequantizeLinear's ``output_dtype``
# (the op table reads neither); ops new in 23 (Attention, RMSNormalization, RotaryEmbedding)
# have no rule and block. tests/test_op_table.py lists every op of the table changed in 22/23.
SUPPORTED_OPSETS = range(11, 24)

# Prefix of dims ONNX shape inference could not name ("unk__N"), renamed per inference run so
# that equal names always mean equal sizes.
ANONYMOUS_DIM_PREFIX = "?"


def is_anonymous_dim(dim: object) -> bool:
    return dim is None or (isinstance(dim, str) and dim.startswith(ANONYMOUS_DIM_PREFIX))


SUPPORTED_IR_VERSIONS = range(3, onnx.IR_VERSION + 1)


@dataclass
class Model:
    """A loaded model: the rewritable graph plus where it came from."""

    graph: gs.Graph
    opset: int
    ir_version: int
    path: pathlib.Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Initializers also listed as graph inputs (IR >= 4): callers may override them.
    overridable: list[str] = field(default_factory=list)

    def to_onnx(self) -> onnx.ModelProto:
        proto = gs.export_onnx(self.graph, do_type_check=False)
        proto.ir_version = self.ir_version
        return proto


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers and node attributes, sub-graphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from iter_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from iter_tensors(subgraph)


def _external_file(
    base_dir: pathlib.Path, tensor: onnx.TensorProto
) -> tuple[pathlib.Path, int, int]:
    where = f"external data of tensor '{tensor.name}'"
    try:
        info = external_data_helper.ExternalDataInfo(tensor)
        offset = int(info.offset or 0)
        explicit_length = None if info.length in (None, "") else int(info.length)
    except (ValueError, TypeError) as error:  # negative or non-numeric offset/length
        raise BadInputError(f"{where}: {error}") from None
    location = info.location or ""
    if not location:
        raise BadInputError(f"{where} has no location")
    if "\x00" in location:
        raise UnsafeExternalDataError(f"{where} has a location with a NUL byte")
    relative = pathlib.PurePosixPath(location.replace("\\", "/"))
    if relative.is_absolute() or pathlib.PureWindowsPath(location).drive:
        raise UnsafeExternalDataError(
            f"{where} uses the absolute path '{location}'; only paths inside the model's folder "
            "are read"
        )
    if ".." in relative.parts:
        raise UnsafeExternalDataError(
            f"{where} points outside the model's folder ('{location}'): path traversal refused"
        )
    root = base_dir.resolve()
    resolved = (root / relative).resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafeExternalDataError(
            f"{where} resolves outside the model's folder ('{location}' -> '{resolved}'): refused"
        )
    if not resolved.exists():
        raise BadInputError(f"{where}: file '{location}' not found next to the model")
    if not resolved.is_file():
        raise BadInputError(f"{where}: '{location}' is not a regular file")
    file_size = resolved.stat().st_size
    if offset < 0 or offset > file_size:
        raise BadInputError(f"{where}: offset {offset} is past the end of '{location}'")
    length = file_size - offset if explicit_length is None else explicit_length
    if length < 0 or offset + length > file_size:
        raise BadInputError(
            f"{where}: offset {offset} + length {length} is past the end of '{location}' "
            f"({file_size} bytes)"
        )
    return resolved, offset, length


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        return None
    if dtype == np.dtype(object):
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    bits = _SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:  # packed, the last byte padded
        return -(-count * bits // 8)
    return count * dtype.itemsize


_SUB_BYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def load_external_data(
    proto: onnx.ModelProto, base_dir: pathlib.Path, hold_large: bool = False
) -> None:
    """Read every external tensor into memory after checking where it lives; with
    ``hold_large``, large numeric initializers become held arrays (see ``hold``), read
    straight from the file into numpy, never through protobuf."""
    top_level = len(proto.graph.initializer)  # iter_tensors yields these first
    held = {}
    for index, tensor in enumerate(iter_tensors(proto.graph)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        path, offset, length = _external_file(base_dir, tensor)
        expected = _expected_nbytes(tensor)
        if expected is not None and expected != length:
            raise BadInputError(
                f"external data of tensor '{tensor.name}' holds {length} bytes but its shape "
                f"{list(tensor.dims)} needs {expected}"
            )
        with open(path, "rb") as handle:
            handle.seek(offset)
            if (
                hold_large
                and tensor.data_type in _RAW_TYPES
                and int(np.prod(tensor.dims, dtype=np.int64)) > SKELETON_ELEMENTS
                and index < top_level
            ):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")
                array = np.fromfile(handle, dtype=dtype, count=length // dtype.itemsize)
                if array.nbytes != length:
                    raise BadInputError(f"external data of tensor '{tensor.name}' is truncated")
                held[tensor.name] = array.reshape(tuple(tensor.dims))
                del tensor.external_data[:]
                tensor.external_data.add(key="location", value=HELD_LOCATION)
                continue
            data = handle.read(length)
        if len(data) != length:
            raise BadInputError(f"external data of tensor '{tensor.name}' is truncated")
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    if held:
        hold(proto, held)


def _check_dims(proto: onnx.ModelProto) -> None:
    for tensor in iter_tensors(proto.graph):
        if any(dim < 0 for dim in tensor.dims):
            raise BadInputError(f"tensor '{tensor.name}' declares a negative dimension")


def read_model_proto(path: str | os.PathLike[str], hold_large: bool = False) -> onnx.ModelProto:
    """Parse, resolve external data safely and run the ONNX checker; raise BadInputError.
    ``hold_large``: large external weights become held arrays; the caller must ``forget``."""
    path = pathlib.Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if not path.is_file():
        raise BadInputError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInputError(f"{path}: cannot read ({error.strerror})") from None
    if not data:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise BadInputError(f"{path}: not an ONNX model (protobuf parse failed: {error})") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise BadInputError(f"{path}: not an ONNX model (no graph or no opset)")
    _check_dims(proto)
    if not proto.graph.output:
        raise BadInputError(f"{path}: the graph declares no outputs")
    read_minus_one_as_dynamic(proto, str(path), in_place=True)
    check_input_sizes(proto, str(path))
    load_external_data(proto, path.parent, hold_large)
    check_supported(proto, str(path))
    problem = check(proto)
    if problem:
        forget(proto)
        raise BadInputError(f"{path}: fails the ONNX checker: {problem}")
    return proto


# Initializers above this many elements are checked for their data size by spa and left out
# of the proto the ONNX checker serializes (BERT-base: 440 MB copied per check otherwise).
SKELETON_ELEMENTS = 1024


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights: each becomes a typed graph input."""
    light = onnx.ModelProto()
    for field_name in (
        "ir_version",
        "producer_name",
        "producer_version",
        "domain",
        "model_version",
        "doc_string",
    ):
        setattr(light, field_name, getattr(proto, field_name))
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    light.metadata_props.extend(proto.metadata_props)
    graph, source = light.graph, proto.graph
    graph.name, graph.doc_string = source.name, source.doc_string
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    declared = {value.name for value in source.input}
    for tensor in source.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= SKELETON_ELEMENTS:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return light


def _data_size_problem(tensor: onnx.TensorProto) -> str | None:
    expected = _expected_nbytes(tensor)
    if expected is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if tensor.HasField("raw_data"):
        # For large tensors ByteSize avoids copying the bytes out of the message: the payload
        # is the size less the name, dims and field tags (well under the slack allowed here);
        # a few extra bytes that slip through are caught when the values are decoded.
        overhead = len(tensor.name.encode()) + 11 * len(tensor.dims) + 32
        size = tensor.ByteSize()
        if expected > 1 << 20 and expected <= size <= expected + overhead:
            return None
        actual = len(tensor.raw_data)
    else:
        count = int(np.prod(tensor.dims, dtype=np.int64))
        stored = max(
            len(tensor.float_data),
            len(tensor.int32_data),
            len(tensor.int64_data),
            len(tensor.double_data),
            len(tensor.uint64_data),
        )
        if tensor.data_type == onnx.TensorProto.COMPLEX64:
            stored //= 2
        return (
            None
            if stored == count
            else (f"tensor '{tensor.name}' holds {stored} values but its shape needs {count}")
        )
    if actual != expected:
        return f"tensor '{tensor.name}' holds {actual} bytes but its shape needs {expected}"
    return None


def check(proto: onnx.ModelProto, full: bool = False) -> str | None:
    """Run the ONNX checker (with shape inference when ``full``) on the model's skeleton and
    check the large weights' data sizes; return the first problem, or None."""
    for tensor in proto.graph.initializer:  # the checker does not compare data with shapes
        problem = _data_size_problem(tensor)
        if problem:
            return problem
    try:
        onnx.checker.check_model(skeleton(proto), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        text = str(error).strip()
        return text.splitlines()[0] if text else repr(error)
    return None


# spa runs models on generated inputs (validation, moments, bench) and sizes its analysis by
# their axes: an input declared larger than this is refused before anything is allocated.
MAX_INPUT_BYTES = 2**31
SYMBOLIC_DIM = 2  # the size a symbolic dim takes in generated inputs


def read_minus_one_as_dynamic(
    proto: onnx.ModelProto, where: str = "model", in_place: bool = False
) -> onnx.ModelProto:
    """Dims declared as ``dim_value: -1`` (old paddle2onnx writes them in graph inputs and
    outputs; onnxruntime reads them as dynamic) become symbolic dims, with one warning. Other
    negative values are left as they are (``check_input_sizes`` refuses them in inputs).
    Returns ``proto`` where there is no -1, else ``proto`` changed (``in_place``) or a changed
    copy."""
    kinds = ("input", "output", "value_info")

    def declared(model: onnx.ModelProto) -> list[tuple[str, onnx.ValueInfoProto]]:
        graph = model.graph
        return [(kind, value) for kind in kinds for value in getattr(graph, kind)]

    def minus_ones(value: onnx.ValueInfoProto) -> list[int]:
        if not value.type.HasField("tensor_type"):
            return []
        dims = value.type.tensor_type.shape.dim
        return [
            axis for axis, d in enumerate(dims) if d.HasField("dim_value") and d.dim_value == -1
        ]

    if not any(minus_ones(value) for _, value in declared(proto)):
        return proto
    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy
    taken = {
        dim.dim_param
        for _, value in declared(proto)
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_param
    }
    described = []
    for kind, value in declared(proto):
        for axis in minus_ones(value):
            name, count = f"{value.name}_dynamic_{axis}", 1
            while name in taken:
                count += 1
                name = f"{value.name}_dynamic_{axis}_{count}"
            taken.add(name)
            value.type.tensor_type.shape.dim[axis].dim_param = name  # clears dim_value (a oneof)
            described.append(f"{kind.replace('_', ' ')} '{value.name}' axis {axis}")
    more = f" (and {len(described) - 1} more)" if len(described) > 1 else ""
    warnings.warn(
        f"{where}: {described[0]}{more} declares dimension -1: read as a dynamic dimension, as "
        "onnxruntime does",
        SpaWarning,
        stacklevel=2,
    )
    return proto


def check_input_sizes(proto: onnx.ModelProto, where: str = "model") -> None:
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
        if any(d is not None and d < 0 for d in dims):
            raise BadInputError(f"{where}: input '{value.name}' declares a negative dimension")
        count = 1
        for d in dims:
            count *= SYMBOLIC_DIM if d is None else d
        if count * 8 > MAX_INPUT_BYTES:  # 8: the widest element spa generates
            raise BadInputError(
                f"{where}: input '{value.name}' declares {dims} ({count:,} elements): spa runs "
                f"the model on such inputs and refuses any over {MAX_INPUT_BYTES:,} bytes"
            )


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise BadInputError("model imports no default ONNX opset")


def check_supported(proto: onnx.ModelProto, where: str = "model") -> None:
    opset = default_opset(proto)
    if opset not in SUPPORTED_OPSETS:
        raise BadInputError(
            f"{where}: opset {opset} is not supported (supported: "
            f"{SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1})"
        )
    if proto.ir_version not in SUPPORTED_IR_VERSIONS:
        raise BadInputError(
            f"{where}: IR version {proto.ir_version} is not supported (supported: "
            f"{SUPPORTED_IR_VERSIONS.start}-{SUPPORTED_IR_VERSIONS.stop - 1})"
        )


class RawValues(gs.ir.tensor.LazyValues):
    """Lazy weight values read with one copy (graphsurgeon's loader copies twice, which costs
    BERT-base a second and 440 MB); the array is read-only, so rewrites replace it."""

    def load(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type).newbyteorder("<")
        data = self.tensor.raw_data
        shape = tuple(self.tensor.dims)
        if len(data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise BadInputError(
                f"tensor '{self.tensor.name}' holds {len(data)} bytes but its shape "
                f"{list(shape)} needs {dtype.itemsize * int(np.prod(shape, dtype=np.int64))}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)


_RAW_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
}


class HeldValues(gs.ir.tensor.LazyValues):
    """A held array (see ``hold``): graphsurgeon exports the reference, not the data."""

    def __init__(self, tensor: onnx.TensorProto, array: np.ndarray) -> None:
        super().__init__(tensor)
        self.array = array

    def load(self) -> np.ndarray:
        return self.array


def _read_weights_once(graph: gs.Graph, held: dict[str, np.ndarray]) -> None:
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if type(lazy) is not gs.ir.tensor.LazyValues:
            continue
        if is_held(lazy.tensor) and lazy.tensor.name in held:
            tensor._values = HeldValues(lazy.tensor, held[lazy.tensor.name])
            # graphsurgeon would stamp "external" on every tensor derived from this one
            tensor.data_location = None
        elif lazy.tensor.data_type in _RAW_TYPES and lazy.tensor.HasField("raw_data"):
            tensor._values = RawValues(lazy.tensor)


# Large weights held as numpy arrays instead of protobuf bytes, for protos spa builds or reads
# itself: the tensor in the proto is an external reference to HELD_LOCATION (no file) and the
# array lives here, {id(proto): (proto, {name: array})} — the proto is kept alive with its
# entry, so an id is never reused while held. Protobuf keeps a message's bytes in an arena
# until the whole message goes, so weights that once entered a proto could not be dropped:
# a 2.4 GB model read into a proto and decoded into arrays weighed 4.8 GB.
HELD_LOCATION = "spa-held-weights"
_HELD: dict[int, tuple[onnx.ModelProto, dict[str, np.ndarray]]] = {}


def hold(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    _HELD.setdefault(id(proto), (proto, {}))[1].update(arrays)


def held_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The arrays behind ``proto``'s held references (empty for an ordinary proto)."""
    return _HELD.get(id(proto), (None, {}))[1]


def forget(proto: onnx.ModelProto) -> None:
    _HELD.pop(id(proto), None)


def is_held(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == "location" and entry.value == HELD_LOCATION for entry in tensor.external_data
    )


def held_reference(name: str, data_type: int, dims) -> onnx.TensorProto:
    reference = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    reference.data_location = onnx.TensorProto.EXTERNAL
    reference.external_data.add(key="location", value=HELD_LOCATION)
    return reference


def held_bytes(proto: onnx.ModelProto, tensor: onnx.TensorProto) -> memoryview:
    """A held tensor's data as ONNX stores it (little-endian, row-major), without a copy
    where the array already is."""
    array = np.asarray(held_weights(proto)[tensor.name])
    stored = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    return memoryview(stored).cast("B")


def materialize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Put held arrays back into ``proto`` as bytes (a self-contained model) and forget them."""
    for tensor in iter_tensors(proto.graph):
        if is_held(tensor):
            tensor.raw_data = held_bytes(proto, tensor).tobytes()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    forget(proto)
    return proto


def model_from_proto(proto: onnx.ModelProto, path: pathlib.Path | None = None) -> Model:
    """Import into graphsurgeon; Constant nodes stay nodes here (the prepare passes lower them)."""
    check_supported(proto, str(path) if path else "model")
    try:
        graph = gs.import_onnx(proto)
    except Exception as error:  # graphsurgeon raises bare exceptions on malformed graphs
        raise BadInputError(f"cannot import graph: {error}") from None
    _read_weights_once(graph, held_weights(proto))
    initializers = {t.name for t in proto.graph.initializer}
    return Model(
        graph=graph,
        opset=default_opset(proto),
        ir_version=int(proto.ir_version),
        path=path,
        metadata={entry.key: entry.value for entry in proto.metadata_props},
        overridable=[v.name for v in proto.graph.input if v.name in initializers],
    )


def load_model(path: str | os.PathLike[str]) -> Model:
    """Read an .onnx file (with its external data) into a ``Model``; never modifies the file."""
    path = pathlib.Path(path)
    return model_from_proto(read_model_proto(path), path)
