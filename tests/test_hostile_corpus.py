"""A generated corpus of hostile inputs beyond broken bytes (those are in test_hostile.py):
broken graphs, lying tensors, absurd sizes, external data that points elsewhere, and invalid
command lines. Every case ends in its documented exit code with one line on stderr — never a
traceback or an internal error — every file in the model's folder is unchanged (by hash), and
a failure leaves no output behind."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa_compiler.cli import main


def _base() -> onnx.ModelProto:
    """x [1, 4, 6, 6] -> Conv(4->8) -> Relu -> Conv(8->2) -> y: a valid model with a group."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b0"),
        numpy_helper.from_array(rng.standard_normal((2, 8, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="c0", pads=[1] * 4),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w1", "b1"], ["y"], name="c1", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes, "base",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
        weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


BASE = _base()


def _mutant(change) -> onnx.ModelProto:
    model = copy.deepcopy(BASE)
    change(model)
    return model


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set(tensor: onnx.TensorProto, **fields) -> None:
    for key, value in fields.items():
        if key == "dims":
            del tensor.dims[:]
            tensor.dims.extend(value)
        else:
            setattr(tensor, key, value)


def _blow_up(model: onnx.ModelProto, op: str, constant: np.ndarray, **attrs) -> None:
    """Put ``op`` between the Relu and the second Conv: r -> op(r, constant) -> c1, or for
    ConstantOfShape r + sum(ConstantOfShape(constant)) -> c1."""
    model.graph.initializer.append(numpy_helper.from_array(constant, "blow_up_arg"))
    if op == "ConstantOfShape":
        nodes = [helper.make_node(op, ["blow_up_arg"], ["big"]),
                 helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
                 helper.make_node("Add", ["r", "total"], ["blown"])]  # fmt: skip
    elif op == "Resize":
        nodes = [helper.make_node(op, ["r", "", "blow_up_arg"], ["blown"], **attrs)]
    else:
        nodes = [helper.make_node(op, ["r", "blow_up_arg"], ["blown"], **attrs)]
    position = list(model.graph.node).index(_node(model, "c1"))
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    _node(model, "c1").input[0] = "blown"


def _graph_cases() -> dict[str, onnx.ModelProto]:
    cases = {}

    def add(name, change):
        cases[name] = _mutant(change)

    # structure
    add("cycle", lambda m: _node(m, "c0").input.__setitem__(0, "y"))
    add("self-loop", lambda m: _node(m, "relu").input.__setitem__(0, "r"))
    add("dangling-input", lambda m: _node(m, "relu").input.__setitem__(0, "nowhere"))
    add("dangling-weight", lambda m: _node(m, "c1").input.__setitem__(1, "w_missing"))
    add("output-never-produced", lambda m: setattr(m.graph.output[0], "name", "ghost"))
    add("duplicate-producer", lambda m: _node(m, "relu").output.__setitem__(0, "h"))
    add("duplicate-initializer", lambda m: m.graph.initializer.append(_init(m, "w0")))
    add("input-shadows-node-output", lambda m: _node(m, "c0").output.__setitem__(0, "x"))
    add("no-nodes", lambda m: m.graph.ClearField("node"))
    add("no-outputs", lambda m: m.graph.ClearField("output"))
    add("no-opset", lambda m: m.ClearField("opset_import"))
    add("unknown-op", lambda m: setattr(_node(m, "relu"), "op_type", "Frobnicate"))
    # found by the fuzzer: a dead Conv onnxruntime cannot run (its weight is the input, so its
    # bias has the wrong length) that the pruned model no longer contains
    add(
        "dead-node-onnxruntime-rejects",
        lambda m: (
            _node(m, "c0").input.__setitem__(1, "x"),
            _node(m, "relu").input.__setitem__(0, "w1"),
        ),
    )
    add("missing-op-type", lambda m: setattr(_node(m, "relu"), "op_type", ""))
    add("conv-missing-weight", lambda m: _node(m, "c0").input.__delitem__(1))
    add("conv-too-many-inputs", lambda m: _node(m, "c0").input.append("b0"))
    add("relu-two-outputs", lambda m: _node(m, "relu").output.append("extra"))
    add("opset-from-the-future", lambda m: setattr(m.opset_import[0], "version", 99))
    add("opset-zero", lambda m: setattr(m.opset_import[0], "version", 0))
    add("ir-version-zero", lambda m: setattr(m, "ir_version", 0))
    add("ir-version-huge", lambda m: setattr(m, "ir_version", 10_000))
    # attributes
    add("kernel-bigger-than-image", lambda m: _set(_init(m, "w0"), dims=[8, 4, 30, 30]))
    add(
        "group-does-not-divide",
        lambda m: _node(m, "c0").attribute.append(helper.make_attribute("group", 3)),
    )
    add(
        "negative-pads",
        lambda m: _node(m, "c1").attribute[0].CopyFrom(helper.make_attribute("pads", [-5] * 4)),
    )
    add(
        "zero-stride",
        lambda m: _node(m, "c1").attribute.append(helper.make_attribute("strides", [0, 0])),
    )
    add(
        "huge-dilation",
        lambda m: _node(m, "c0").attribute.append(
            helper.make_attribute("dilations", [2**40, 2**40])
        ),
    )
    add(
        "attribute-of-wrong-type",
        lambda m: _node(m, "c0").attribute.append(helper.make_attribute("group", "two")),
    )
    # tensors that lie
    add("weight-short-data", lambda m: _set(_init(m, "w0"), raw_data=_init(m, "w0").raw_data[:40]))
    add("weight-long-data", lambda m: _set(_init(m, "w1"), raw_data=_init(m, "w1").raw_data * 2))
    add("weight-dims-claim-terabytes", lambda m: _set(_init(m, "w0"), dims=[2**20, 2**20, 3, 3]))
    add("weight-negative-dim", lambda m: _set(_init(m, "w0"), dims=[8, -4, 3, 3]))
    add(
        "weight-few-extra-bytes",
        lambda m: _set(_init(m, "w0"), raw_data=_init(m, "w0").raw_data + b"\0" * 8),
    )
    add("weight-int4-wrong-size", lambda m: _set(_init(m, "w1"), data_type=TensorProto.INT4))
    add("weight-zero-size", lambda m: _set(_init(m, "w1"), dims=[0, 8, 3, 3], raw_data=b""))
    add("weight-int64", lambda m: _set(_init(m, "w1"), data_type=TensorProto.INT64))
    add(
        "weight-string",
        lambda m: _init(m, "w1").CopyFrom(
            helper.make_tensor("w1", TensorProto.STRING, [1], [b"weights"])
        ),
    )
    add("weight-undefined-type", lambda m: _set(_init(m, "w0"), data_type=0))
    add("weight-unknown-type", lambda m: _set(_init(m, "w0"), data_type=999))
    add(
        "bias-wrong-length",
        lambda m: _set(_init(m, "b0"), dims=[7], raw_data=_init(m, "b0").raw_data[:28]),
    )
    add("float-data-count-lies", lambda m: _init(m, "b1").CopyFrom(_lying_floats()))
    add("weight-with-both-raw-and-float", lambda m: _init(m, "b1").float_data.extend([1.0, 2.0]))
    # inputs
    add("input-absurd-dims", lambda m: _set_input_dims(m, [1, 4, 2**31, 2**31]))
    add("input-billions", lambda m: _set_input_dims(m, [10**9, 4, 6, 6]))
    # small inputs, absurd intermediate tensors (refused before onnxruntime allocates them)
    add(
        "conv-pads-blow-up",
        lambda m: _node(m, "c1").attribute[0].CopyFrom(helper.make_attribute("pads", [30000] * 4)),
    )
    add("tile-blows-up", lambda m: _blow_up(m, "Tile", np.array([1, 1, 20000, 20000])))
    add("pad-blows-up", lambda m: _blow_up(m, "Pad", np.array([0, 0, 60000, 60000] * 2)))
    add("resize-blows-up", lambda m: _blow_up(m, "Resize", np.float32([1, 1, 1e4, 1e4])))
    add(
        "constant-of-shape-blows-up",
        lambda m: _blow_up(m, "ConstantOfShape", np.array([2**16] * 2)),
    )
    # no values at all (a zero dim), but 2**31 channels for the channel graph to index
    add("input-empty-but-wide", lambda m: _set_input_dims(m, [0, 2**31]))
    add("input-empty-wide-4d", lambda m: _set_input_dims(m, [0, 2**31, 6, 6]))
    add("input-negative-dim", lambda m: _set_input_dims(m, [1, 4, -6, 6]))
    # a dynamic batch in, a fixed one declared out: the author's inconsistency, not spa's
    add("input-batch-dynamic-output-fixed", lambda m: _set_input_dims(m, [-1, 4, 6, 6]))
    add("input-zero-dim", lambda m: _set_input_dims(m, [1, 4, 0, 6]))
    add("input-wrong-channels", lambda m: _set_input_dims(m, [1, 5, 6, 6]))
    add("input-wrong-rank", lambda m: _set_input_dims(m, [1, 4, 6]))
    add(
        "input-int-type",
        lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.INT32),
    )
    add("input-no-type", lambda m: m.graph.input[0].ClearField("type"))
    add(
        "output-wrong-type",
        lambda m: setattr(m.graph.output[0].type.tensor_type, "elem_type", TensorProto.INT8),
    )
    add("duplicate-input", lambda m: m.graph.input.append(m.graph.input[0]))
    return cases


def _lying_floats() -> onnx.TensorProto:
    tensor = onnx.TensorProto(name="b1", data_type=TensorProto.FLOAT, dims=[2])
    tensor.float_data.extend([1.0, 2.0, 3.0])  # three values for a shape of two
    return tensor


def _set_input_dims(model: onnx.ModelProto, dims: list[int]) -> None:
    shape = model.graph.input[0].type.tensor_type.shape
    shape.ClearField("dim")
    for size in dims:
        shape.dim.add().dim_value = size


GRAPH_CASES = _graph_cases()


def _files(folder: pathlib.Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink()
    }


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _assert_clean_failure(code: int, stderr: str, expected: tuple[int, ...]) -> None:
    assert code in expected, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    lines = stderr.strip().splitlines()
    if code == 2:
        assert len(lines) == 1, stderr
    else:  # a model spa handled: only warnings, each on one line
        assert all(line.startswith("spa: warning: ") for line in lines), stderr


@pytest.mark.parametrize("name", sorted(GRAPH_CASES))
def test_a_hostile_graph_is_refused_cleanly(tmp_path, name):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(GRAPH_CASES[name].SerializeToString())
    before = _files(folder)
    out = tmp_path / "out.onnx"
    code, stderr = _run(
        ["compile", str(path), "--criterion", "l1", "--ratio", "0.5", "-o", str(out)]
    )
    # 0 where the mutation leaves a model spa can still prune correctly, 3 where nothing can go
    _assert_clean_failure(code, stderr, (0, 2, 3))
    assert _files(folder) == before
    if code == 2:
        assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


@pytest.mark.parametrize("op", ["tile", "pad", "resize", "constant-of-shape"])
def test_absurd_intermediate_tensors_are_refused_before_anything_runs(tmp_path, op):
    path = tmp_path / "model.onnx"
    path.write_bytes(GRAPH_CASES[f"{op}-blows-up"].SerializeToString())
    code, stderr = _run(["compile", str(path), "-o", str(tmp_path / "out.onnx")])
    assert code == 2 and "refuses activations over" in stderr, stderr


@pytest.mark.parametrize("name", ["dead-node-onnxruntime-rejects", "bias-wrong-length"])
def test_onnxruntime_logs_nothing_of_its_own_to_stderr(tmp_path, name):
    """onnxruntime's native logger writes to the process's stderr, past Python's redirection:
    only a real process shows whether its error lines leak next to spa's one-line message."""
    path = tmp_path / "model.onnx"
    path.write_bytes(GRAPH_CASES[name].SerializeToString())
    argv = ["compile", str(path), "--criterion", "l1", "-o", str(tmp_path / "out.onnx")]
    done = subprocess.run(
        [sys.executable, "-m", "spa_compiler", *argv], capture_output=True, text=True
    )
    _assert_clean_failure(done.returncode, done.stderr, (0, 2, 3))
    assert all(line.startswith("spa: ") for line in done.stderr.splitlines()), done.stderr


def _external(
    folder: pathlib.Path, location: str, offset: int | None = None, length: int | None = None
) -> pathlib.Path:
    """The base model with w0 moved to external data at ``location`` (as written)."""
    model = copy.deepcopy(BASE)
    tensor = _init(model, "w0")
    data = tensor.raw_data
    (folder / "w0.bin").write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _outside(tmp_path: pathlib.Path) -> pathlib.Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 8)
    return secret


EXTERNAL_CASES = {
    "absolute-path": lambda f, t: _external(f, str(_outside(t))),
    "parent-traversal": lambda f, t: (_outside(t), _external(f, "../secret.bin"))[1],
    "deep-traversal": lambda f, t: _external(f, "../../../../../../etc/passwd"),
    "traversal-through-folder": lambda f, t: (_outside(t), _external(f, "sub/../../secret.bin"))[1],
    "symlink-outside": lambda f, t: (
        os.symlink(_outside(t), f / "link.bin"),
        _external(f, "link.bin"),
    )[1],
    "symlinked-folder-outside": lambda f, t: (
        _outside(t),
        os.symlink(t, f / "up"),
        _external(f, "up/secret.bin"),
    )[2],
    "missing-file": lambda f, t: _external(f, "nothing.bin"),
    "empty-location": lambda f, t: _external(f, ""),
    "location-is-a-folder": lambda f, t: ((f / "dir").mkdir(), _external(f, "dir"))[1],
    "offset-past-end": lambda f, t: _external(f, "w0.bin", offset=10**6),
    "length-past-end": lambda f, t: _external(f, "w0.bin", length=10**6),
    "offset-plus-length-past-end": lambda f, t: _external(f, "w0.bin", offset=100, length=1152),
    "negative-offset": lambda f, t: _external(f, "w0.bin", offset=-8),
    "negative-length": lambda f, t: _external(f, "w0.bin", length=-1),
    "length-too-short-for-shape": lambda f, t: _external(f, "w0.bin", length=64),
    "offset-not-a-number": lambda f, t: _external_raw(f, {"location": "w0.bin", "offset": "ten"}),
    "null-byte-in-location": lambda f, t: _external(f, "w0.bin\x00.txt"),
    "device-file": lambda f, t: _external(f, "/dev/zero"),
    "proc-file": lambda f, t: _external(f, "/proc/self/environ"),
    "the-model-itself": lambda f, t: _external(f, "model.onnx"),
}


def _external_raw(folder: pathlib.Path, entries: dict[str, str]) -> pathlib.Path:
    model = copy.deepcopy(BASE)
    tensor = _init(model, "w0")
    (folder / "w0.bin").write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("name", sorted(EXTERNAL_CASES))
def test_external_data_that_points_elsewhere_is_refused(tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    path = EXTERNAL_CASES[name](folder, tmp_path)
    before = _files(folder)
    out = tmp_path / "out.onnx"
    code, stderr = _run(["compile", str(path), "--criterion", "l1", "-o", str(out)])
    _assert_clean_failure(code, stderr, (2,))
    assert _files(folder) == before and not out.exists()


def _cli_cases() -> dict[str, list[str]]:
    m = "{model}"
    o = ["-o", "{out}"]
    cases = {
        "ratio-negative": ["compile", m, "--ratio", "-0.1", *o],
        "ratio-one": ["compile", m, "--ratio", "1", *o],
        "ratio-nan": ["compile", m, "--ratio", "nan", *o],
        "ratio-inf": ["compile", m, "--ratio", "inf", *o],
        "ratio-text": ["compile", m, "--ratio", "lots", *o],
        "target-zero": ["compile", m, "--target-flops", "0", *o],
        "target-above-one": ["compile", m, "--target-params", "1.5", *o],
        "ratio-and-target": ["compile", m, "--ratio", "0.3", "--target-flops", "0.5", *o],
        "two-targets": ["compile", m, "--target-flops", "0.5", "--target-params", "0.5", *o],
        "max-group-ratio-one": ["compile", m, "--global", "--max-group-ratio", "1", *o],
        "unknown-criterion": ["compile", m, "--criterion", "vibes", *o],
        "unknown-aggregate": ["compile", m, "--aggregate", "median", *o],
        "unknown-heads": ["compile", m, "--heads", "some", *o],
        "round-to-zero": ["compile", m, "--round-to", "0", *o],
        "seed-text": ["compile", m, "--seed", "abc", *o],
        "plan-missing": ["compile", m, "--plan", "{tmp}/nope.json", *o],
        "plan-not-json": ["compile", m, "--plan", "{garbage}", *o],
        "plan-with-ratio": ["compile", m, "--plan", "{garbage}", "--ratio", "0.2", *o],
        "calib-missing": ["compile", m, "--calib", "{tmp}/nope.npz", *o],
        "calib-not-npz": ["compile", m, "--calib", "{garbage}", *o],
        "input-range-backwards": ["compile", m, "--input-range", "1,-1", *o],
        "input-range-text": ["compile", m, "--input-range", "low,high", *o],
        "nm-bad": ["compile", m, "--nm", "4:4", *o],
        "nm-not-a-pattern": ["compile", m, "--nm", "half", *o],
        "nm-exclude-without-nm": ["compile", m, "--nm-exclude", "*", *o],
        "compressed-without-nm": ["compile", m, "--export-compressed", "{tmp}/w.npz", *o],
        "output-folder-missing": ["compile", m, "-o", "{tmp}/no/such/dir/out.onnx"],
        "output-is-input": ["compile", m, "-o", m],
        "output-is-a-folder": ["compile", m, "-o", "{tmp}"],
        "plan-over-input": ["compile", m, "--save-plan", m, *o],
        "report-is-output": ["compile", m, "--report", "{out}", *o],
        "external-data-bad": ["compile", m, "--external-data", "sometimes", *o],
        "missing-output": ["compile", m],
        "missing-model": ["compile"],
        "unknown-option": ["compile", m, "--turbo", *o],
        "unknown-command": ["prune", m],
        "inspect-missing": ["inspect", "{tmp}/nope.onnx"],
        "inspect-folder": ["inspect", "{tmp}"],
        "verify-nm-bad-pattern": ["verify-nm", m, "--nm", "9:4"],
        "bench-batch-zero": ["bench", m, "--batch", "0"],
        "bench-runs-zero": ["bench", m, "--runs", "0"],
        "bench-missing": ["bench", "{tmp}/nope.onnx"],
    }
    return cases


CLI_CASES = _cli_cases()


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_invalid_command_lines_are_refused_cleanly(tmp_path, name):
    folder = tmp_path / "in"
    folder.mkdir()
    model = folder / "model.onnx"
    model.write_bytes(BASE.SerializeToString())
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not json, not npz\xff")
    out = tmp_path / "out.onnx"
    argv = [a.format(model=model, out=out, tmp=tmp_path, garbage=garbage) for a in CLI_CASES[name]]
    before = _files(folder)
    code, stderr = _run(argv)
    _assert_clean_failure(code, stderr, (2,))
    assert _files(folder) == before and not out.exists()


def test_the_corpus_has_two_hundred_cases_with_the_broken_files():
    from test_hostile import CASES as BROKEN_FILES

    total = len(BROKEN_FILES) + len(GRAPH_CASES) + len(EXTERNAL_CASES) + len(CLI_CASES)
    assert total >= 200, total


def test_bfloat16_weights_do_not_crash_shape_inference():
    """onnx-graphsurgeon keeps bfloat16 (no NumPy type) as its ONNX enum value; the activation
    size check took it for a NumPy dtype and the compile ended in a TypeError. It compiles now
    (onnxruntime has no CPU bfloat16 Gemm: checked by the ONNX checker only, as reported), and
    the kept rows are the original's, bit for bit."""
    import spa_compiler

    rng = np.random.default_rng(0)

    def bf16(name, *shape):
        bits = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(
            np.uint16
        )
        tensor = helper.make_tensor(name, TensorProto.BFLOAT16, shape, bits.tobytes(), raw=True)
        return tensor, bits

    (w1, w1_bits), (b1, _), (w2, _), (b2, _) = (
        bf16("w1", 16, 8),
        bf16("b1", 16),
        bf16("w2", 4, 16),
        bf16("b2", 4),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
        ],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 4])],
        [w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pruned, report = spa_compiler.compile(model, ratio=0.5, criterion="l1", round_to=1)
    assert report.groups_pruned == 1
    assert any("ONNX checker only" in w for w in report.warnings)
    kept = report.plan.groups[0].keep
    weight = {t.name: t for t in pruned.graph.initializer}["w1"]
    assert weight.data_type == TensorProto.BFLOAT16
    got = np.frombuffer(weight.raw_data, dtype=np.uint16).reshape(len(kept), 8)
    assert np.array_equal(got, w1_bits[kept])
    # the rewritten bfloat16 weights (ml_dtypes arrays) still count as parameters
    assert report.before["parameters"] == 16 * 8 + 16 + 4 * 16 + 4
    assert report.after["parameters"] == len(kept) * 8 + len(kept) + 4 * len(kept) + 4
