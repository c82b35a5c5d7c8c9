"""Loading: external data, Constant-node weights, opsets; bad input ends in exit code 2 with
one line on stderr, no traceback, and the input file untouched."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builder import GraphBuilder
from onnx import helper, numpy_helper
from oracle import compile_check

import spa_compiler


def small_model(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    b = GraphBuilder(opset=opset)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="c1")])
    y = b.op("Relu", [b.conv(y, 8, 8, name="c2")])
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    b.output(b.op("Gemm", [y, b.weight("fc.weight", [4, 8]), b.weight("fc.bias", [4])], transB=1))
    return b.model(ir_version=ir_version)


def structure(analysis) -> list[tuple[int, int, bool, tuple]]:
    return [
        (
            g.channels,
            g.granularity,
            g.prunable,
            tuple(sorted((m.tensor, m.axis) for m in g.weight_members)),
        )
        for g in analysis.groups
        if g.weight_members
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spa_compiler", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_bad_input(path: pathlib.Path, *fragments: str) -> None:
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    result = run_cli("inspect", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if before is not None:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    ("opset", "ir_version"), [(11, 7), (13, 7), (17, 8), (21, 10), (22, 10), (23, 11)]
)
def test_opsets_and_ir_versions(tmp_path, opset, ir_version):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(opset, ir_version), path)
    analysis = spa_compiler.inspect(path)
    assert [g.channels for g in analysis.prunable] == [8, 8]


def test_external_data_equals_inline(tmp_path):
    proto = small_model()
    inline = spa_compiler.inspect(proto)
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.onnx.data").exists()
    assert structure(spa_compiler.inspect(path)) == structure(inline)


def test_constant_nodes_are_weights_like_initializers():
    proto = small_model()
    as_constants = onnx.ModelProto()
    as_constants.CopyFrom(proto)
    graph = as_constants.graph
    nodes = []
    for tensor in graph.initializer:
        const_out = tensor.name + "_const"
        nodes.append(helper.make_node("Constant", [], [const_out], value=tensor))
        nodes.append(helper.make_node("Identity", [const_out], [tensor.name]))
    del graph.initializer[:]
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    onnx.checker.check_model(as_constants)
    assert structure(spa_compiler.inspect(as_constants)) == structure(spa_compiler.inspect(proto))


def test_input_file_is_never_modified(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    before = path.read_bytes()
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == before
    assert "prunable" in result.stdout


def _declare(proto: onnx.ModelProto, name: str, shape: list | None) -> None:
    value = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
    proto.graph.value_info.append(value)


def _shapes(model, *names: str) -> list:
    tensors = model.graph.tensors()
    return [list(tensors[name].shape) for name in names]


def test_declared_shapes_that_inference_contradicts_are_replaced():
    """Declared intermediate shapes are claims: a wrong rank or a wrong number is replaced by
    what ONNX's inference computes without them (with a warning); a shape only named
    differently stays."""
    proto = small_model()
    relu1, relu2 = proto.graph.node[1].output[0], proto.graph.node[3].output[0]
    _declare(proto, proto.graph.node[0].output[0], ["N", 8, 8, 8])  # right
    _declare(proto, relu1, ["N", 8, 8, 8, 1])  # wrong rank
    _declare(proto, relu2, ["N", 8, 8, 3])  # one dim wrong
    with pytest.warns(spa_compiler.errors.SpaWarning, match="2 declared shape"):
        model = spa_compiler.from_proto(proto)
    assert _shapes(model, relu1, relu2) == [["N", 8, 8, 8], ["N", 8, 8, 8]]
    assert [g.channels for g in spa_compiler.inspect(model).prunable] == [8, 8]


def test_replaced_declaration_is_one_warning_line(tmp_path):
    proto = small_model()
    _declare(proto, proto.graph.node[1].output[0], ["N", 8, 8, 3])
    path = tmp_path / "stale.onnx"
    onnx.save(proto, path)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("spa: warning: 1 declared shape(s) contradict")
    assert len(result.stderr.strip().splitlines()) == 1


def test_symbolic_inference_guesses_stay_off_stderr(tmp_path):
    """onnxruntime's symbolic inference logs "Unable to determine if c <= a, treat as equal"
    for a Slice whose end it cannot compare (torch's Swin exports: 36 lines per compile)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["a", 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["c"])
    out = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [None, 8])
    zero = numpy_helper.from_array(np.zeros(1, np.int64), "zero")
    nodes = [
        helper.make_node("Shape", ["y"], ["ends"]),
        helper.make_node("Slice", ["x", "zero", "ends", "zero"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "g", [x, y], [out], [zero])
    path = tmp_path / "slice.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "Unable to determine" not in result.stderr + result.stdout
    # and the guess (the slice as long as x: wrong wherever c < a) is not taken for a shape
    model = spa_compiler.load(str(path))
    assert model.graph.tensors()["out"].shape[0] != "a"


def test_a_symbolic_guess_costs_only_the_shapes_computed_from_it(tmp_path):
    """Where onnxruntime's symbolic inference guesses on a Slice, that Slice's output and
    what is computed from it lose their symbolic shapes; another branch (a Range as long as
    z, which ONNX's inference cannot size) keeps its own."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["a", 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["c"])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["b"])
    outputs = [
        helper.make_tensor_value_info("doubled", onnx.TensorProto.FLOAT, [None, 8]),
        helper.make_tensor_value_info("steps", onnx.TensorProto.INT64, [None]),
    ]
    inits = [
        numpy_helper.from_array(np.zeros(1, np.int64), "zero"),
        numpy_helper.from_array(np.array(0, np.int64), "start"),
        numpy_helper.from_array(np.array(1, np.int64), "step"),
    ]
    nodes = [
        helper.make_node("Shape", ["y"], ["ends"]),
        helper.make_node("Slice", ["x", "zero", "ends", "zero"], ["out"]),
        helper.make_node("Add", ["out", "out"], ["doubled"]),
        helper.make_node("Shape", ["z"], ["z_shape"]),
        helper.make_node("Gather", ["z_shape", "start"], ["length"], axis=0),
        helper.make_node("Range", ["start", "length", "step"], ["steps"]),
    ]
    graph = helper.make_graph(nodes, "g", [x, y, z], outputs, inits)
    path = tmp_path / "branches.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    tensors = spa_compiler.load(str(path)).graph.tensors()
    assert tensors["steps"].shape == ["b"]
    for name in ("out", "doubled"):
        assert tensors[name].shape is None or tensors[name].shape[0] != "a"


def test_declared_shapes_inference_cannot_reach_are_kept():
    """After an op ONNX's inference does not know, the declared shape is all spa has."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c1")])
    mystery = b.op("Mystery", [h], name="mystery")
    b.nodes[-1].domain = "custom.domain"
    b.output(b.conv(b.op("Relu", [mystery]), 8, 4, name="c2"), shape=["N", 4, 8, 8])
    graph = helper.make_graph(b.nodes, "g", b.inputs, b.outputs, b.inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.domain", 1)],
        ir_version=8,
    )
    _declare(proto, mystery, ["N", 8, 8, 8])
    model = spa_compiler.from_proto(proto)
    assert _shapes(model, mystery) == [["N", 8, 8, 8]]


def _minus_one_batch() -> onnx.ModelProto:
    """small_model with its batch declared as dim_value -1, in the input and the output, as
    old paddle2onnx writes it."""
    proto = small_model()
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    return proto


def test_dimension_minus_one_is_read_as_dynamic(tmp_path):
    proto = _minus_one_batch()
    before = proto.SerializeToString()
    with pytest.warns(spa_compiler.errors.SpaWarning, match="declares dimension -1"):
        analysis = spa_compiler.inspect(proto)
    assert structure(analysis) == structure(spa_compiler.inspect(small_model()))
    with pytest.warns(spa_compiler.errors.SpaWarning, match="declares dimension -1"):
        assert compile_check(proto, 0.5, 0) <= 1e-4
    assert proto.SerializeToString() == before  # the caller's proto is left as it is
    path = tmp_path / "minus_one.onnx"
    onnx.save(proto, path)
    result = run_cli("compile", str(path), "--ratio", "0.5", "-o", str(tmp_path / "out.onnx"))
    assert result.returncode == 0, result.stderr
    warning = "input 'x' axis 0 (and 1 more) declares dimension -1: read as a dynamic dimension"
    assert [line for line in result.stderr.splitlines() if "-1" in line] == [
        f"spa: warning: {path}: {warning}, as onnxruntime does"
    ]
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "x_dynamic_0"


def test_other_negative_input_dimensions_are_refused(tmp_path):
    proto = small_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -2
    path = tmp_path / "minus_two.onnx"
    onnx.save(proto, path)
    assert_bad_input(path, "input 'x' declares a negative dimension")


def test_missing_file(tmp_path):
    assert_bad_input(tmp_path / "nope.onnx", "no such file")


def test_not_onnx(tmp_path):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n" * 10)
    assert_bad_input(path, "not an ONNX model")


def test_truncated_protobuf(tmp_path):
    data = small_model().SerializeToString()
    for fraction in (0.1, 0.5, 0.9):
        path = tmp_path / f"cut{fraction}.onnx"
        path.write_bytes(data[: int(len(data) * fraction)])
        assert_bad_input(path)


def test_fails_checker(tmp_path):
    proto = small_model()
    proto.graph.node[0].input[0] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    path.write_bytes(proto.SerializeToString())
    assert_bad_input(path, "ONNX checker")


def test_unsupported_opset(tmp_path):
    proto = small_model()
    proto.opset_import[0].version = 7
    path = tmp_path / "old.onnx"
    path.write_bytes(proto.SerializeToString())
    assert_bad_input(path, "opset 7 is not supported (supported: 11-23)")
    proto.opset_import[0].version = 24
    path.write_bytes(proto.SerializeToString())
    assert_bad_input(path, "opset 24 is not supported (supported: 11-23)")


def _with_external(
    tmp_path: pathlib.Path, location: str, offset: int = 0, length: int | None = None
) -> pathlib.Path:
    proto = small_model()
    tensor = next(t for t in proto.graph.initializer if t.name == "c2.weight")
    raw = numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = {
        "location": location,
        "offset": str(offset),
        "length": str(len(raw) if length is None else length),
    }
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    path = model_dir / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    (model_dir / "weights.bin").write_bytes(raw)
    (tmp_path / "secret.bin").write_bytes(raw)
    return path


def test_external_data_ok(tmp_path):
    path = _with_external(tmp_path, "weights.bin")
    assert spa_compiler.inspect(path).prunable


def test_external_data_missing_file(tmp_path):
    assert_bad_input(_with_external(tmp_path, "gone.bin"), "not found")


def test_external_data_traversal(tmp_path):
    assert_bad_input(_with_external(tmp_path, "../secret.bin"), "path traversal")


def test_external_data_absolute(tmp_path):
    assert_bad_input(_with_external(tmp_path, str(tmp_path / "secret.bin")), "absolute path")


def test_external_data_symlink_outside(tmp_path):
    path = _with_external(tmp_path, "link.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    assert_bad_input(path, "outside the model's folder")


def test_external_data_past_end(tmp_path):
    assert_bad_input(_with_external(tmp_path, "weights.bin", offset=16), "past the end")


def test_external_data_wrong_length(tmp_path):
    path = _with_external(tmp_path, "weights.bin", length=8)
    assert_bad_input(path, "needs")


def test_directory_instead_of_file(tmp_path):
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_cli_json_and_usage_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    import json

    result = run_cli("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["summary"]["prunable_groups"] == 2
    assert {g["channels"] for g in data["groups"] if g["prunable"]} == {8}
    for args in (["inspect"], ["inspect", "--heads", "nope", str(path)], ["frobnicate"]):
        result = run_cli(*args)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_analysis_is_deterministic():
    proto = small_model()
    first = spa_compiler.inspect(proto).to_json()
    second = spa_compiler.inspect(proto).to_json()
    for result in (first, second):
        del result["summary"]["analysis_seconds"]
    assert first == second
    # Every weight but the classifier bias (which only feeds the graph output) is covered.
    assert (
        first["summary"]["prunable_weight_parameters"] == first["summary"]["weight_parameters"] - 4
    )
