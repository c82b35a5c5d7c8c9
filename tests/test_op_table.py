"""One test per entry of the op table: each op sits between two convolutions, and the
analysis must either carry the channels through it exactly (checked by the oracle) or block
them with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from builder import GraphBuilder
from oracle import check_groups

import spa_compiler
from spa_compiler.op_rules import RULES

C = 6


def between_convs(build_op, opset: int = 17, spatial: int = 4, c_out: int | None = None):
    """x -> conv(3->C) -> [op] -> conv(C->2) -> y."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, spatial, spatial])
    y = b.conv(x, 3, C, name="first")
    y = build_op(b, y)
    b.output(b.conv(y, c_out or C, 2, k=1, name="second"), rank=4)
    model = spa_compiler.from_proto(b.model())
    return model, spa_compiler.inspect(model)


def producer_group(analysis):
    return next(
        g
        for g in analysis.groups
        if any(m.tensor == "first.weight" and m.axis == 0 for m in g.members)
    )


def assert_carried(model, analysis):
    group = producer_group(analysis)
    assert group.prunable, group.blocked_reasons
    assert {(m.tensor, m.axis) for m in group.consumers} == {("second.weight", 1)}
    assert check_groups(model, analysis) >= 1


def assert_blocked(analysis, word: str):
    group = producer_group(analysis)
    assert not group.prunable
    assert any(word in reason for reason in group.blocked_reasons), group.blocked_reasons


UNARY_FLOAT = [
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Erf",
    "Softplus",
    "Softsign",
    "Mish",
    "Elu",
    "Selu",
    "Celu",
    "ThresholdedRelu",
    "Identity",
    "Neg",
    "Abs",
    "Exp",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
]


@pytest.mark.parametrize("op", UNARY_FLOAT)
def test_unary(op):
    model, analysis = between_convs(lambda b, y: b.op(op, [y]), opset=18)
    assert_carried(model, analysis)


@pytest.mark.parametrize("op", ["Log", "Sqrt", "Reciprocal"])
def test_unary_positive_domain(op):
    model, analysis = between_convs(lambda b, y: b.op(op, [b.op("Sigmoid", [y])]))
    assert_carried(model, analysis)


def test_gelu_opset20_clip_dropout_cast():
    for build, opset in [
        (lambda b, y: b.op("Gelu", [y]), 20),
        (
            lambda b, y: b.op(
                "Clip", [y, b.const("lo", np.float32(-1)), b.const("hi", np.float32(1))]
            ),
            17,
        ),
        (lambda b, y: b.op("Dropout", [y]), 17),
        (lambda b, y: b.op("Cast", [y], to=1), 17),
    ]:
        model, analysis = between_convs(build, opset=opset)
        assert_carried(model, analysis)


@pytest.mark.parametrize(
    "op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"]
)
def test_broadcast_with_per_channel_constant(op):
    def build(b, y):
        y = b.op("Sigmoid", [y]) if op == "Pow" else y
        values = np.random.default_rng(1).uniform(0.5, 1.5, (C, 1, 1)).astype(np.float32)
        return b.op(op, [y, b.const(f"{op.lower()}_param", values)])

    model, analysis = between_convs(build)
    group = producer_group(analysis)
    assert (f"{op.lower()}_param", 0) in {(m.tensor, m.axis) for m in group.params}
    assert_carried(model, analysis)


def test_where_and_comparisons():
    def build(b, y):
        other = b.conv("x", 3, C, name="other")
        condition = b.op("Greater", [y, other])
        return b.op("Where", [condition, y, other])

    model, analysis = between_convs(build)
    group = producer_group(analysis)
    assert ("other.weight", 0) in {(m.tensor, m.axis) for m in group.sources}
    assert_carried(model, analysis)


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [2, 2]}),
        ("AveragePool", {"kernel_shape": [2, 2]}),
        ("LpPool", {"kernel_shape": [2, 2]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
        ("GlobalLpPool", {}),
    ],
)
def test_pooling(op, attrs):
    model, analysis = between_convs(lambda b, y: b.op(op, [y], **attrs))
    assert_carried(model, analysis)


@pytest.mark.parametrize(
    "op",
    [
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    ],
)
def test_reduce_over_spatial_keeps_channels(op):
    def build(b, y):
        if op == "ReduceSum":
            return b.op(op, [y, b.const("axes", np.array([2, 3]))], keepdims=1)
        return b.op(op, [y], axes=[2, 3], keepdims=1)

    model, analysis = between_convs(build)
    assert_carried(model, analysis)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceLogSum"])
def test_reduce_over_channels_blocks(op):
    _, analysis = between_convs(
        lambda b, y: b.op(op, [b.op("Sigmoid", [y])], axes=[1], keepdims=1), c_out=1
    )
    assert_blocked(analysis, f"reduced by {op}")


def test_argmax_blocks_its_axis():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.conv(x, 3, C, name="first")
    b.output(b.op("ArgMax", [y], axis=1, keepdims=0), dtype=7)
    analysis = spa_compiler.inspect(b.model())
    assert_blocked(analysis, "reduced by ArgMax")


@pytest.mark.parametrize(
    ("op", "word"),
    [
        ("LpNormalization", "normalized together"),
        ("LRN", "normalized together"),
        ("MeanVarianceNormalization", "normalized together"),
    ],
)
def test_cross_channel_norms_block(op, word):
    attrs = {
        "LRN": {"size": 3},
        "LpNormalization": {"axis": 1},
        "MeanVarianceNormalization": {"axes": [1, 2, 3]},
    }[op]
    _, analysis = between_convs(lambda b, y: b.op(op, [y], **attrs))
    assert_blocked(analysis, word)


def test_mean_variance_normalization_per_channel_carries():
    model, analysis = between_convs(lambda b, y: b.op("MeanVarianceNormalization", [y]))
    assert_carried(model, analysis)


def test_instance_norm_and_batch_norm_parameters():
    def build(b, y):
        y = b.op("InstanceNormalization", [y, b.weight("in_s", [C]), b.weight("in_b", [C])])
        return y

    model, analysis = between_convs(build)
    assert {("in_s", 0), ("in_b", 0)} <= {
        (m.tensor, m.axis) for m in producer_group(analysis).params
    }
    assert_carried(model, analysis)


def test_layer_norm_over_channels_blocks():
    def build(b, y):
        t = b.op("Transpose", [y], perm=[0, 2, 3, 1])
        t = b.op("LayerNormalization", [t, b.weight("ln_g", [C]), b.weight("ln_b", [C])], axis=-1)
        return b.op("Transpose", [t], perm=[0, 3, 1, 2])

    _, analysis = between_convs(build)
    assert_blocked(analysis, "LayerNormalization")


def test_softmax_over_channels_blocks_and_over_space_carries():
    _, analysis = between_convs(lambda b, y: b.op("Softmax", [y], axis=1))
    assert_blocked(analysis, "Softmax axis")
    model, analysis = between_convs(lambda b, y: b.op("Softmax", [y], axis=-1))
    assert_carried(model, analysis)
    model, analysis = between_convs(lambda b, y: b.op("LogSoftmax", [y], axis=3))
    assert_carried(model, analysis)


def test_transpose_squeeze_unsqueeze_flatten_reshape_roundtrip():
    def build(b, y):
        y = b.op("Unsqueeze", [y, b.const("ax", np.array([0]))])
        y = b.op("Squeeze", [y, b.const("ax2", np.array([0]))])
        y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
        y = b.op("Transpose", [y], perm=[0, 3, 1, 2])
        y = b.op("Reshape", [y, b.const("flat", np.array([1, C, 16]))])
        return b.op("Reshape", [y, b.const("back", np.array([1, C, 4, 4]))])

    model, analysis = between_convs(build)
    assert_carried(model, analysis)


def test_tile_pad_expand_on_spatial_axes():
    def build(b, y):
        y = b.op("Tile", [y, b.const("reps", np.array([1, 1, 2, 1]))])
        y = b.op("Pad", [y, b.const("pads", np.array([0, 0, 1, 0, 0, 0, 1, 0]))])
        return b.op("Expand", [y, b.const("shape", np.array([1, 1, 10, 4]))])

    model, analysis = between_convs(build, c_out=C)
    assert_carried(model, analysis)


def test_tile_of_channels_repeats_them():
    model, analysis = between_convs(
        lambda b, y: b.op("Tile", [y, b.const("reps", np.array([1, 2, 1, 1]))]), c_out=2 * C
    )
    group = producer_group(analysis)
    second = next(m for m in group.members if m.tensor == "second.weight")
    assert second.indices.shape == (C, 2)
    assert_carried(model, analysis)


def test_pad_of_channels_blocks():
    _, analysis = between_convs(
        lambda b, y: b.op("Pad", [y, b.const("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0]))]),
        c_out=C + 2,
    )
    assert_blocked(analysis, "padded axis")


def test_resize_keeps_channels():
    def build(b, y):
        scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
        return b.op("Resize", [y, b.const("roi", np.zeros(0, np.float32)), scales], mode="nearest")

    model, analysis = between_convs(build)
    assert_carried(model, analysis)


def test_trilu_on_spatial_axes():
    model, analysis = between_convs(lambda b, y: b.op("Trilu", [y]))
    assert_carried(model, analysis)


def test_conv_transpose_plain():
    def build(b, y):
        w = b.weight("up.weight", [C, 4, 2, 2])
        return b.op("ConvTranspose", [y, w, b.weight("up.bias", [4])], strides=[2, 2])

    model, analysis = between_convs(build, c_out=4)
    group = producer_group(analysis)
    assert ("up.weight", 0) in {(m.tensor, m.axis) for m in group.consumers}
    assert check_groups(model, analysis) == 2


def test_quantize_dequantize_pass_through():
    def build(b, y):
        q = b.op(
            "QuantizeLinear", [y, b.const("qs", np.float32(0.05)), b.const("qz", np.uint8(128))]
        )
        return b.op(
            "DequantizeLinear", [q, b.const("ds", np.float32(0.05)), b.const("dz", np.uint8(128))]
        )

    model, analysis = between_convs(build)
    assert_carried(model, analysis)


def test_every_table_entry_has_a_test():
    tested = set(UNARY_FLOAT) | {
        "Log",
        "Sqrt",
        "Reciprocal",
        "Gelu",
        "Clip",
        "Dropout",
        "Cast",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "PRelu",
        "Where",
        "Greater",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceSumSquare",
        "ReduceLogSum",
        "ArgMax",
        "LpNormalization",
        "LRN",
        "MeanVarianceNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "Softmax",
        "LogSoftmax",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Reshape",
        "Tile",
        "Pad",
        "Expand",
        "Resize",
        "Trilu",
        "ConvTranspose",
        "QuantizeLinear",
        "DequantizeLinear",
    }
    # Covered in test_rules.py and test_analysis_corpus.py.
    tested |= {
        "Conv",
        "BatchNormalization",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Gemm",
        "MatMul",
        "Flatten",
        "GroupNormalization",
        "LSTM",
        "Einsum",
        "Shape",
        "If",
        "Loop",
        "GRU",
        "Upsample",
    }
    untested = sorted(set(RULES) - tested)
    # Ops whose outputs are boolean/integer or that need a second model input; their rule is
    # the shared unary/broadcast one tested above.
    shared = {
        "Not",
        "IsNaN",
        "IsInf",
        "Equal",
        "Less",
        "GreaterOrEqual",
        "LessOrEqual",
        "And",
        "Or",
        "Xor",
        "Mod",
        "BitShift",
        "CastLike",
        "Swish",
        "ArgMin",
        "RNN",
        "Scan",
        "Size",
        "Hardmax",
    }
    assert set(untested) <= shared, untested


def test_flops_counter_covers_the_op_table():
    from spa_compiler import flops

    known = (
        set(flops.PER_ELEMENT)
        | flops.PER_INPUT_ELEMENT
        | flops.POOLING
        | flops.MAC_OPS
        | flops.NO_ARITHMETIC
    )
    assert set(RULES) <= known, sorted(set(RULES) - known)


def test_flops_of_a_small_network():
    from spa_compiler import flops

    model, _ = between_convs(lambda b, y: b.op("Relu", [y]))
    counted = flops.count(model.graph)
    first = 6 * 4 * 4 * 3 * 3 * 3  # output elements x (Cin x 3 x 3)
    second = 2 * 4 * 4 * 6  # 1x1 conv
    assert counted["macs"] == first + second
    assert counted["flops"] == 2 * (first + second) + 6 * 4 * 4  # + one Relu per element


def test_flops_of_recurrent_ops_and_expression_dims():
    import onnx_graphsurgeon as gs

    from spa_compiler import flops

    x = gs.Variable("x", np.float32, [7, 2, 16])  # [steps, batch, input]
    w = gs.Constant("w", np.zeros((2, 4 * 8, 16), np.float32))  # 2 directions, 4 gates
    r = gs.Constant("r", np.zeros((2, 4 * 8, 8), np.float32))
    y = gs.Variable("y", np.float32, [7, 2, 2, 8])
    lstm = gs.Node("LSTM", inputs=[x, w, r], outputs=[y], attrs={"hidden_size": 8})
    assert flops.node_macs(lstm) == 7 * 2 * (2 * 32 * 16 + 2 * 32 * 8)
    # A dim that shape inference left as an expression of a symbol counts as its value at 1.
    a = gs.Variable("a", np.float32, ["w", "floor((1024*floor(w/2) + 1024)/(floor(w/2) + 1))"])
    b = gs.Constant("b", np.zeros((1024, 3), np.float32))
    out = gs.Variable("out", np.float32, ["w", 3])
    assert flops.node_macs(gs.Node("MatMul", inputs=[a, b], outputs=[out])) == 3 * 1024


# Every op of the table whose schema changed in opset 22 (bfloat16 added) or 23 (float4e2m1
# added; QuantizeLinear's precision and DequantizeLinear's output_dtype attributes), built
# between the two convolutions at those opsets: carried (True), read by a weight of the op
# itself (that weight's axis), or blocked with a reason.
def _qdq(b, y):
    scale, zero = b.const("qs", np.float32(0.05)), b.const("qz", np.uint8(128))
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [y, scale, zero]), scale, zero])


def _flatten_and_back(b, y):
    flat = b.op("Flatten", [b.op("Identity", [y])], axis=2)
    return b.op("Reshape", [flat, b.op("Shape", [y])])


CHANGED_IN_22_23 = {
    "AveragePool": (lambda b, y: b.op("AveragePool", [y], kernel_shape=[2, 2]), True),
    "Cast": (lambda b, y: b.op("Cast", [b.op("Cast", [y], to=10)], to=1), True),
    "CastLike": (lambda b, y: b.op("CastLike", [y, b.const("like", np.float32(0))]), True),
    "ConvTranspose": (
        lambda b, y: b.op("ConvTranspose", [y, b.weight("up.weight", [C, C, 1, 1])]),
        ("up.weight", 0),  # read by the ConvTranspose itself
    ),
    "Cos": (lambda b, y: b.op("Cos", [y]), True),
    "Dropout": (lambda b, y: b.op("Dropout", [y]), True),
    "Elu": (lambda b, y: b.op("Elu", [y]), True),
    "Flatten": (_flatten_and_back, True),
    "GlobalAveragePool": (lambda b, y: b.op("GlobalAveragePool", [y]), True),
    "GlobalLpPool": (lambda b, y: b.op("GlobalLpPool", [y]), True),
    "GlobalMaxPool": (lambda b, y: b.op("GlobalMaxPool", [y]), True),
    "HardSigmoid": (lambda b, y: b.op("HardSigmoid", [y]), True),
    "HardSwish": (lambda b, y: b.op("HardSwish", [y]), True),
    "InstanceNormalization": (
        lambda b, y: b.op("InstanceNormalization", [y, b.weight("s", [C]), b.weight("t", [C])]),
        True,
    ),
    "LpNormalization": (lambda b, y: b.op("LpNormalization", [y], axis=1), "normalized together"),
    "LpPool": (lambda b, y: b.op("LpPool", [y], kernel_shape=[2, 2]), True),
    "MaxPool": (lambda b, y: b.op("MaxPool", [y], kernel_shape=[2, 2]), True),
    "Mish": (lambda b, y: b.op("Mish", [y]), True),
    "Pad": (
        lambda b, y: b.op("Pad", [y, b.const("pads", np.array([0, 0, 1, 0, 0, 0, 1, 0]))]),
        True,
    ),
    "QuantizeLinear": (_qdq, True),
    "Round": (lambda b, y: b.op("Round", [y]), True),
    "Selu": (lambda b, y: b.op("Selu", [y]), True),
    "Sin": (lambda b, y: b.op("Sin", [y]), True),
    "Softplus": (lambda b, y: b.op("Softplus", [y]), True),
    "Softsign": (lambda b, y: b.op("Softsign", [y]), True),
    "Squeeze": (
        lambda b, y: b.op(
            "Squeeze", [b.op("Unsqueeze", [y, b.const("ax", np.array([0]))]), b.const("ax2", [0])]
        ),
        True,
    ),
    "ThresholdedRelu": (lambda b, y: b.op("ThresholdedRelu", [y]), True),
    "Transpose": (
        lambda b, y: b.op(
            "Transpose", [b.op("Transpose", [y], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2]
        ),
        True,
    ),
}
# Also changed, and covered elsewhere at opsets 22 and 23: Conv (the two convolutions above),
# Shape and Reshape (the flatten above), Unsqueeze and DequantizeLinear (with Squeeze and
# QuantizeLinear), Identity (in the flatten), If, Loop, Scan and LSTM (test_analysis_corpus
# re-stamps the hand-made graphs); GRU and RNN share LSTM's rule and Size the Shape rule's
# first branch, which block everything they touch whatever the schema.
NOT_IN_ONNXRUNTIME = {"GlobalLpPool"}
COVERED_ELSEWHERE = {"Conv", "Shape", "Reshape", "Unsqueeze", "DequantizeLinear", "Identity"}
COVERED_ELSEWHERE |= {"If", "Loop", "Scan", "LSTM", "GRU", "RNN", "Size"}


def test_ops_changed_in_opsets_22_and_23_are_listed():
    import onnx.defs

    changed = {
        op
        for op in RULES
        for opset in (22, 23)
        if onnx.defs.has(op, opset)  # Swish is new in opset 24
        and onnx.defs.get_schema(op, max_inclusive_version=opset).since_version == opset
    }
    assert changed == set(CHANGED_IN_22_23) | COVERED_ELSEWHERE


@pytest.mark.parametrize("opset", [22, 23])
@pytest.mark.parametrize("op", sorted(CHANGED_IN_22_23))
def test_ops_changed_in_opsets_22_and_23(op, opset):
    build, expected = CHANGED_IN_22_23[op]
    model, analysis = between_convs(build, opset=opset, spatial=6)
    if op in NOT_IN_ONNXRUNTIME:
        # analysed as at opset 21, but the oracle cannot run it: onnxruntime (1.32) has no
        # kernel for this op at opset 22 (nor can spa's validation run such a model)
        import onnxruntime as ort

        group = producer_group(analysis)
        assert group.prunable and {(m.tensor, m.axis) for m in group.consumers} == {
            ("second.weight", 1)
        }
        with pytest.raises(Exception, match=f"Could not find an implementation for {op}"):
            ort.InferenceSession(model.to_onnx().SerializeToString())
        return
    if expected is True:
        assert_carried(model, analysis)
    elif isinstance(expected, tuple):
        group = producer_group(analysis)
        assert group.prunable and {(m.tensor, m.axis) for m in group.consumers} == {expected}
        assert check_groups(model, analysis) >= 1
    else:
        assert_blocked(analysis, expected)
