"""Regression tests from an adversarial review of the analysis: each graph once made spa
report a group prunable that was not, crash, or fold a shape wrongly."""

from __future__ import annotations

import numpy as np
import onnx
from builder import GraphBuilder
from onnx import TensorProto, helper, numpy_helper
from oracle import check_groups, compile_check, random_feeds, run

import spa_compiler


def analyze(builder: GraphBuilder):
    model = spa_compiler.from_proto(builder.model())
    return model, spa_compiler.inspect(model)


def test_matmul_with_a_vector_weight_reads_channels():
    b = GraphBuilder()
    x = b.input("x", [2, 6])
    h = b.op("Relu", [b.op("Gemm", [x, b.weight("w1", [6, 8]), b.weight("b1", [8])])])
    b.output(b.op("MatMul", [h, b.weight("v", [8])]))
    model, analysis = analyze(b)
    group = next(
        g for g in analysis.groups if any(m.tensor == "w1" and m.axis == 1 for m in g.members)
    )
    assert ("v", 0) in {(m.tensor, m.axis) for m in group.consumers}
    check_groups(model, analysis)


def test_masked_and_split_weights_get_roles_on_the_constants():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c0")])
    mask = b.const("mask", (np.arange(8) % 3 != 0).astype(np.float32).reshape(1, 8, 1, 1))
    # over 4096 elements, so constant folding keeps the Mul (small ones fold into one weight)
    weight = b.op("Mul", [b.weight("w_orig", [64, 8, 3, 3]), mask])
    y = b.op("Conv", [h, weight], pads=[1, 1, 1, 1])
    parts = b.op(
        "Split", [b.weight("wqkv", [96, 64]), b.const("sizes", np.array([32, 64]))], n_out=2, axis=0
    )
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [y])])])
    b.output(b.op("Gemm", [flat, parts[0]], transB=1), shape=[1, 32])
    b.output(b.op("Gemm", [flat, parts[1]], transB=1), shape=[1, 64])
    model, analysis = analyze(b)
    trunk = next(g for g in analysis.prunable if any(m.tensor == "c0.weight" for m in g.members))
    assert ("w_orig", 1) in {(m.tensor, m.axis) for m in trunk.consumers}
    inner = next(
        g for g in analysis.prunable if any(m.tensor == "w_orig" and m.axis == 0 for m in g.members)
    )
    assert ("wqkv", 1) in {(m.tensor, m.axis) for m in inner.consumers}
    check_groups(model, analysis)


def test_maxpool_indices_block_the_channels():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c0")])
    pooled, indices = b.op("MaxPool", [h], n_out=2, kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Add", [pooled, b.op("Cast", [indices], to=TensorProto.FLOAT)])
    b.output(b.conv(y, 8, 2, name="c1"))
    _, analysis = analyze(b)
    assert not any(
        g.prunable
        for g in analysis.groups
        if any(m.tensor == "c0.weight" and m.axis == 0 for m in g.members)
    )


def test_shape_with_start_and_end_folds_correctly():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight("w", [5, 5])])])
    size = b.op("Gather", [b.op("Shape", [h], start=2), b.const("zero", np.array([0]))])
    target = b.op("Concat", [b.const("lead", np.array([1, 4])), size], axis=0)
    b.output(b.op("Reshape", [h, target]))
    proto = b.model()
    prepared = spa_compiler.from_proto(proto).to_onnx()
    feeds = random_feeds(proto)
    np.testing.assert_array_equal(run(proto, feeds)[0], run(prepared, feeds)[0])


def test_resize_axes_attribute_and_slice_step_zero_do_not_crash():
    b = GraphBuilder(opset=18)
    x = b.input("x", [1, 3, 4, 4])
    h = b.conv(x, 3, 6, name="c0")
    up = b.op(
        "Resize",
        [h, "", b.const("scales", np.array([2.0, 2.0], np.float32))],
        axes=[2, 3],
        mode="nearest",
    )
    b.output(b.conv(up, 6, 2, name="c1"))
    model, analysis = analyze(b)
    assert any(
        g.prunable for g in analysis.groups if any(m.tensor == "c0.weight" for m in g.members)
    )
    check_groups(model, analysis)

    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [
            numpy_helper.from_array(np.array([v]), n)
            for n, v in (("s", 0), ("e", 4), ("a", 0), ("st", 0))
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    analysis = spa_compiler.inspect(proto)
    assert "step 0" in " ".join(r for g in analysis.groups for r in g.blocked_reasons)


def test_int8_weights_behind_dequantize_are_weights():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c0")])
    quantized = b.const("wq", np.random.default_rng(0).integers(-8, 8, (4, 8, 3, 3), np.int8))
    weight = b.op(
        "DequantizeLinear", [quantized, b.const("scale", np.full(4, 0.1, np.float32))], axis=0
    )
    b.output(b.op("Conv", [h, weight], pads=[1, 1, 1, 1]))
    model, analysis = analyze(b)
    group = next(g for g in analysis.prunable if any(m.tensor == "c0.weight" for m in g.members))
    assert ("wq", 1) in {(m.tensor, m.axis) for m in group.consumers}
    check_groups(model, analysis)


def test_run_time_target_couples_the_axes_it_reads():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c0")])
    flat = b.op("Flatten", [b.op("Relu", [b.conv(x, 3, 8, name="c1")])])
    target = b.op("Concat", [b.op("Shape", [h], end=2), b.const("rest", np.array([-1]))], axis=0)
    reshaped = b.op("Reshape", [flat, target])
    b.output(b.op("Conv", [reshaped, b.weight("w1d", [5, 8, 1])]))
    b.output(b.conv(h, 8, 4, name="head"))
    proto = b.model()
    assert compile_check(proto, 0.5, 0) <= 1e-4


def test_initializer_that_is_a_graph_input_is_not_pruned():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c0")])
    b.output(b.conv(h, 8, 2, name="c1"))
    proto = b.model()
    weight = next(t for t in proto.graph.initializer if t.name == "c0.weight")
    proto.graph.input.append(
        helper.make_tensor_value_info("c0.weight", TensorProto.FLOAT, list(weight.dims))
    )
    analysis = spa_compiler.inspect(proto)
    assert not analysis.prunable
    pruned, _ = spa_compiler.compile(proto, ratio=0.5)
    assert "c0.weight" in {v.name for v in pruned.graph.input}


# From a review of the compile path.


def test_resize_sizes_follow_the_axes_attribute():
    b = GraphBuilder(opset=18)
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("Relu", [b.conv(x, 4, 8, name="c0")])
    r = b.op("Resize", [h, "", "", b.const("sz", np.array([12, 12]))], mode="nearest", axes=[2, 3])
    b.output(b.op("GlobalAveragePool", [b.conv(r, 8, 4, name="c1")]))
    assert compile_check(b.model(), 0.5, 0) <= 1e-4


def test_slice_with_int32_bounds_and_negative_step():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("Relu", [b.conv(x, 4, 12, name="c0")])

    def bound(name, value):
        return b.const(name, np.array([value], np.int32))

    s = b.op("Slice", [h, bound("st", -1), bound("en", -100), bound("ax", 1), bound("sp", -1)])
    b.output(b.conv(s, 12, 4, name="c1"))
    assert compile_check(b.model(), 0.5, 0) <= 1e-4


def test_opset11_split_and_unnamed_nodes():
    b = GraphBuilder(opset=11)
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("Relu", [b.conv(x, 4, 8, name="c0")])
    left, right = b.op("Split", [h], n_out=2, axis=1)
    b.output(b.op("Add", [b.conv(left, 4, 4, name="d0"), b.conv(right, 4, 4, name="d1")]))
    assert compile_check(b.model(), 0.5, 0) <= 1e-4

    b = GraphBuilder(opset=13)
    x = b.input("x", [1, 4, 6, 6])
    for index, channels in enumerate((8, 12)):
        h = b.op("Relu", [b.conv(x, 4, channels, name=f"c{index}")])
        parts = b.op("Split", [h], n_out=2, axis=1, name="")
        b.output(b.conv(parts[0], channels // 2, 2, name=f"p{index}"))
        b.output(b.conv(parts[1], channels // 2, 2, name=f"q{index}"))
    proto = b.model()
    for node in proto.graph.node:
        if node.op_type == "Split":
            node.name = ""
    assert compile_check(proto, 0.5, 0) <= 1e-4


def test_head_dimension_pruning_is_exact(exported_model):
    path = exported_model("llama", "dynamo")
    assert compile_check(path, 0.5, 0, heads="dim") <= 1e-4


def test_round_to_at_ratio_zero_removes_nothing():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("Relu", [b.conv(x, 4, 11, name="c0")])
    b.output(b.conv(h, 11, 2, name="c1"))
    _, report = spa_compiler.compile(b.model(), ratio=0.0, round_to=8)
    assert all(not g.removed for g in report.plan.groups)


def test_cli_outputs_never_overwrite_the_input(tmp_path):
    import shutil
    import subprocess
    import sys

    source = tmp_path / "in.onnx"
    shutil.copy("models/digits_cnn.onnx", source)
    before = source.read_bytes()
    for extra in (["--save-plan", str(source)], ["--report", str(tmp_path / "o.onnx")]):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "spa_compiler",
                "compile",
                str(source),
                "-o",
                str(tmp_path / "o.onnx"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert source.read_bytes() == before


def test_a_slice_with_run_time_bounds_elsewhere_does_not_stop_the_rewrite():
    """A sequence cut to a length computed at run time (transformers' position ids) blocks its
    own tensor; pruning channels elsewhere must not trip over its non-constant bounds."""
    b = GraphBuilder()
    x = b.input("x", ["n", 4, 6, 6])
    h = b.op("Relu", [b.conv(x, 4, 8, name="c0")])
    b.output(b.conv(h, 8, 4, name="c1"))
    table = b.input("table", [1, 16])
    length = b.op("Gather", [b.op("Shape", [x]), b.const("w", np.array([0], np.int64))])
    cut = b.op("Slice", [table, b.const("zero", np.array([0], np.int64)), length,
                         b.const("axis", np.array([1], np.int64))])  # fmt: skip
    b.output(cut)
    assert compile_check(b.model(), 0.5, 0) <= 1e-4


def test_an_output_declared_with_the_wrong_rank_is_kept_with_a_warning(tmp_path):
    """ddddocr ships a model whose output is declared [1, seqlen] but is [steps, 1, classes]:
    the rewrite keeps the author's declaration, checks the outputs with onnxruntime against
    the original's, and says so."""
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("Relu", [b.conv(x, 4, 8, name="c0")])
    y = b.conv(h, 8, 4, name="c1")
    flat = b.op("Reshape", [y, b.const("target", np.array([6, 1, 24], np.int64))])
    b.output(flat, shape=[1, "seqlen"])
    path = tmp_path / "declared.onnx"
    onnx.save(b.model(), path)
    pruned, report = spa_compiler.compile(path, ratio=0.5)
    assert any("declared output shapes contradict" in w for w in report.warnings)
    assert [d.dim_param for d in pruned.graph.output[0].type.tensor_type.shape.dim][1] == "seqlen"
    assert compile_check(path, 0.5, 0) <= 1e-4


def test_bfloat16_weights_are_weights(tmp_path):
    """numpy has no bfloat16: graphsurgeon keeps ONNX's type number, which spa must still
    read as floating point (it crashed every criterion)."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        values = (rng.standard_normal(shape) * 0.5).astype(np.float32).reshape(-1).tolist()
        return helper.make_tensor(name, TensorProto.BFLOAT16, shape, values)

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1"),
        helper.make_node("Relu", ["h"], ["r"], name="r"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 8])],
        [weight("w1", [16, 32]), weight("b1", [32]), weight("w2", [32, 8]), weight("b2", [8])],
    )
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    for options in ({"criterion": "l1"}, {"criterion": "obspa"}):
        pruned, _ = spa_compiler.compile(path, ratio=0.5, **options)
        dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
        assert dims["w1"] == [16, 16] and dims["w2"] == [16, 8]
        assert all(t.data_type == TensorProto.BFLOAT16 for t in pruned.graph.initializer)
