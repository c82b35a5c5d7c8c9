"""Property-based fuzzing of the loader and the compile path: hypothesis edits a valid model at
the protobuf level — op types, input names, attributes, tensor types, dims and bytes, declared
input shapes, opsets — and every edited model must end in a documented exit code with clean
stderr, the input untouched and no output left behind on failure.

CI runs a bounded, derandomized sample; ``benchmarks/fuzz_long.py`` runs thousands of random
ones (``SPA_FUZZ_EXAMPLES``, ``SPA_FUZZ_RANDOM=1``)."""

from __future__ import annotations

import contextlib
import copy
import os

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from test_hostile_corpus import BASE, _assert_clean_failure, _files, _run

EXAMPLES = int(os.environ.get("SPA_FUZZ_EXAMPLES", "120"))
RANDOM = os.environ.get("SPA_FUZZ_RANDOM") == "1"
OPS = ["Conv", "Relu", "Add", "Mul", "Concat", "Reshape", "Transpose", "Gemm", "MatMul",
       "BatchNormalization", "MaxPool", "Slice", "Split", "Softmax", "Identity", "Frob",
       ""]  # fmt: skip
NAMES = ["x", "h", "r", "y", "w0", "b0", "w1", "b1", "ghost", ""]
SIZES = st.one_of(st.integers(-3, 12), st.sampled_from([0, 1, 2**31, 2**40, 2**62]))


@st.composite
def edits(draw) -> onnx.ModelProto:
    model = copy.deepcopy(BASE)
    graph = model.graph
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(
            ["op", "input", "output", "attr", "dtype", "dims", "bytes", "graph-input", "opset"]
        ))  # fmt: skip
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        if kind == "op":
            node.op_type = draw(st.sampled_from(OPS))
        elif kind == "input" and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(NAMES))
        elif kind == "output":
            node.output[0] = draw(st.sampled_from(NAMES))
        elif kind == "attr":
            name = draw(st.sampled_from(["group", "pads", "strides", "dilations", "axis",
                                         "kernel_shape", "perm", "epsilon"]))  # fmt: skip
            value = draw(st.one_of(SIZES, st.lists(SIZES, max_size=6), st.floats(-1e30, 1e30),
                                   st.text(max_size=4)))  # fmt: skip
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(kept)
            with contextlib.suppress(ValueError, TypeError):  # a value protobuf cannot hold
                node.attribute.append(helper.make_attribute(name, value))
        elif kind == "dtype":
            tensor.data_type = draw(st.integers(0, 26))
        elif kind == "dims":
            del tensor.dims[:]
            tensor.dims.extend(draw(st.lists(SIZES, max_size=5)))
        elif kind == "bytes":
            data = tensor.raw_data
            cut = draw(st.integers(0, len(data)))
            tensor.raw_data = data[:cut] + draw(st.binary(max_size=16))
        elif kind == "graph-input":
            shape = graph.input[0].type.tensor_type.shape
            shape.ClearField("dim")
            for size in draw(st.lists(SIZES, max_size=5)):
                shape.dim.add().dim_value = size
        else:
            model.opset_import[0].version = draw(st.integers(-1, 30))
    return model


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(model=edits())
def test_fuzzed_models_end_cleanly(tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    if os.environ.get("SPA_FUZZ_DUMP"):  # the last model run: after a failure, the minimal one
        with open(os.environ["SPA_FUZZ_DUMP"], "wb") as dump:
            dump.write(model.SerializeToString())
    before = _files(folder)
    out = tmp_path / "out.onnx"
    out.unlink(missing_ok=True)
    code, stderr = _run(["compile", str(path), "--criterion", "l1", "--ratio", "0.5",
                         "-o", str(out)])  # fmt: skip
    _assert_clean_failure(code, stderr, (0, 2, 3))
    assert _files(folder) == before
    if code == 2:
        assert not out.exists()
