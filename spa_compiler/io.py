"""Writing outputs atomically: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

from spa_compiler.errors import BadInputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary(folder: pathlib.Path, name: str, path: pathlib.Path) -> tuple[int, str]:
    if not folder.is_dir():
        raise BadInputError(f"{path}: output folder '{folder}' does not exist")
    try:
        return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise BadInputError(f"{path}: cannot write to '{folder}' ({error.strerror})") from None


def _finish(handle_stream, temporary: str) -> None:
    handle_stream.flush()
    os.fsync(handle_stream.fileno())
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    os.chmod(temporary, 0o666 & ~_umask())


def _written(path: pathlib.Path, data: bytes) -> str:
    """``data`` in a complete temporary file next to ``path``; its name."""
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    handle, temporary = _temporary(folder, path.name, path)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            _finish(stream, temporary)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise BadInputError(f"{path}: cannot write ({error.strerror})") from None
        raise
    return temporary


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    temporary = _written(path, data)
    try:
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise BadInputError(f"{path}: cannot write ({error.strerror})") from None


# Tensors of at least this many bytes go to the external-data file (onnx's own threshold);
# each starts at a multiple of DATA_ALIGNMENT so that a reader can map it with aligned loads.
EXTERNAL_MIN_BYTES = 1024
DATA_ALIGNMENT = 64
PROTOBUF_LIMIT = 2**31


def data_file_for(path: pathlib.Path) -> pathlib.Path:
    """Where ``write_model`` puts the external data of the model at ``path``."""
    return path.with_name(f"{path.name}.data")


def write_model(path: pathlib.Path, proto, external: bool) -> None:
    """Write ``proto`` atomically, its large tensors in ``<name>.data`` when ``external``.

    The data file is written first, tensor by tensor, and each tensor's bytes are dropped from
    the proto once written, so the model is never held twice (as a proto and as serialized
    bytes). Both files go to temporary names in the target folder and are renamed when
    complete: a reader sees the old or the new file, never a truncated one. The proto is
    changed in place (its large tensors become external references)."""
    from spa_compiler.ir import held_bytes, is_held, iter_tensors, materialize

    if not external:
        materialize(proto)  # held arrays, if any, become the proto's bytes
        if proto.ByteSize() >= PROTOBUF_LIMIT:
            raise BadInputError(
                f"{path}: the model is over 2 GB, beyond protobuf's limit; write its weights to "
                "a separate file with --external-data always"
            )
        write_atomic(path, proto.SerializeToString())
        return
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    target = data_file_for(path)
    handle, temporary = _temporary(folder, target.name, path)
    model_temporary = None
    try:
        with os.fdopen(handle, "wb") as stream:
            offset = 0
            for tensor in iter_tensors(proto.graph):
                if is_held(tensor):
                    data = held_bytes(proto, tensor)
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    data = tensor.raw_data
                    tensor.ClearField("raw_data")
                else:
                    continue
                padding = -offset % DATA_ALIGNMENT
                stream.write(b"\0" * padding)
                offset += padding
                stream.write(data)
                tensor.data_location = tensor.EXTERNAL
                del tensor.external_data[:]
                for key, value in (
                    ("location", target.name), ("offset", str(offset)), ("length", str(len(data))),
                ):  # fmt: skip
                    tensor.external_data.add(key=key, value=value)
                offset += len(data)
                del data
            _finish(stream, temporary)
        model_temporary = _written(path, proto.SerializeToString())
        # The data first: once the model is renamed, everything it names is in place.
        os.replace(temporary, target)
        os.replace(model_temporary, path)
    except BaseException as error:
        for leftover in (temporary, model_temporary):
            if leftover:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
        if isinstance(error, OSError):
            raise BadInputError(f"{path}: cannot write ({error.strerror})") from None
        raise
