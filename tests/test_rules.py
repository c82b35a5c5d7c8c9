"""Each op rule on a hand-built graph: asserted groups, sizes and blocked reasons, plus the
exactness oracle on every prunable group."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builder import GraphBuilder
from onnx import TensorProto, numpy_helper
from oracle import check_groups, compile_check

import spa_compiler
from spa_compiler.analysis import Analysis


def analyze(builder: GraphBuilder, heads: str = "head") -> tuple[spa_compiler.Model, Analysis]:
    model = spa_compiler.from_proto(builder.model())
    analysis = spa_compiler.inspect(model, heads=heads)
    return model, analysis


def group_of(analysis: Analysis, tensor: str, axis: int):
    for group in analysis.groups:
        if any(m.tensor == tensor and m.axis == axis for m in group.members):
            return group
    raise AssertionError(f"no group holds {tensor}[{axis}]")


def names(members) -> set[tuple[str, int]]:
    return {(m.tensor, m.axis) for m in members}


def member(group, tensor: str, axis: int):
    return next(m for m in group.members if m.tensor == tensor and m.axis == axis)


def test_conv_chain_sources_consumers_and_bn():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    y = b.conv(x, 3, 8, name="c1")
    y = b.op(
        "BatchNormalization",
        [
            y,
            b.weight("s", [8]),
            b.weight("bb", [8]),
            b.weight("m", [8]),
            b.const("v", np.ones(8, np.float32)),
        ],
    )
    y = b.op("Relu", [y])
    y = b.conv(y, 8, 4, name="c2")
    b.output(y)
    model, analysis = analyze(b)
    group = group_of(analysis, "c1.weight", 0)
    assert group.prunable and group.channels == 8 and group.granularity == 1
    assert names(group.sources) == {("c1.weight", 0), ("c1.bias", 0)}
    assert names(group.consumers) == {("c2.weight", 1)}
    assert names(group.params) == {("s", 0), ("bb", 0), ("m", 0), ("v", 0)}
    assert not group_of(analysis, "c2.weight", 0).prunable  # graph output
    assert "graph output" in group_of(analysis, "c2.weight", 0).blocked_reasons[0]
    assert not group_of(analysis, "c1.weight", 1).prunable  # graph input
    assert len(analysis.prunable) == 1
    assert check_groups(model, analysis) == 1


def test_residual_add_couples_producers():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    stem = b.op("Relu", [b.conv(x, 4, 8, name="stem")])
    branch = b.op("Relu", [b.conv(stem, 8, 6, name="a")])
    branch = b.conv(branch, 6, 8, name="b")
    y = b.op("Relu", [b.op("Add", [stem, branch])])
    y = b.conv(y, 8, 2, name="head")
    b.output(y)
    model, analysis = analyze(b)
    trunk = group_of(analysis, "stem.weight", 0)
    assert trunk.prunable and trunk.channels == 8
    assert names(trunk.sources) == {
        ("stem.weight", 0),
        ("stem.bias", 0),
        ("b.weight", 0),
        ("b.bias", 0),
    }
    assert names(trunk.consumers) == {("a.weight", 1), ("head.weight", 1)}
    inner = group_of(analysis, "a.weight", 0)
    assert inner.prunable and inner.channels == 6 and inner is not trunk
    assert check_groups(model, analysis) == 2


def test_concat_offsets():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    left = b.op("Relu", [b.conv(x, 3, 4, name="left")])
    right = b.op("Relu", [b.conv(x, 3, 6, name="right")])
    y = b.op("Concat", [left, right], axis=1)
    b.output(b.conv(y, 10, 2, name="fuse"))
    model, analysis = analyze(b)
    g_left, g_right = group_of(analysis, "left.weight", 0), group_of(analysis, "right.weight", 0)
    assert (g_left.channels, g_right.channels) == (4, 6)
    np.testing.assert_array_equal(member(g_left, "fuse.weight", 1).indices[:, 0], np.arange(4))
    np.testing.assert_array_equal(member(g_right, "fuse.weight", 1).indices[:, 0], 4 + np.arange(6))
    assert check_groups(model, analysis) == 2


def test_split_and_slice_and_gather():
    b = GraphBuilder(opset=13)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 12, name="c")])
    first, second = b.op("Split", [y, b.const("sizes", np.array([4, 8]))], n_out=2, axis=1)
    sliced = b.op(
        "Slice",
        [
            second,
            b.const("st", np.array([2])),
            b.const("en", np.array([8])),
            b.const("ax", np.array([1])),
        ],
    )
    picked = b.op("Gather", [first, b.const("idx", np.array([3, 1, 1]))], axis=1)
    b.output(b.conv(sliced, 6, 2, name="use_slice"))
    b.output(b.conv(picked, 3, 2, name="use_gather"))
    model, analysis = analyze(b)
    groups = [
        g for g in analysis.groups if any(m.tensor == "c.weight" and m.axis == 0 for m in g.members)
    ]
    by_size = {g.channels: g for g in groups}
    # c's 12 channels: 0, 2 (in first part, unused), 1 (gathered twice), 3, 4..5 (sliced
    # away), 6..11 (kept by the slice).
    assert sum(g.channels for g in groups) == 12
    sliced_group = group_of(analysis, "use_slice.weight", 1)
    np.testing.assert_array_equal(
        member(sliced_group, "c.weight", 0).indices[:, 0], np.arange(6, 12)
    )
    gathered = group_of(analysis, "use_gather.weight", 1)
    assert sorted(member(gathered, "c.weight", 0).indices[:, 0].tolist()) in ([1, 3], [1], [3])
    assert by_size  # groups exist
    assert check_groups(model, analysis) >= 2


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_prunes_whole_groups(groups):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="pw1")])
    y = b.op("Relu", [b.conv(y, 8, 8, group=groups, name="gc")])
    b.output(b.conv(y, 8, 2, name="pw2"))
    model, analysis = analyze(b)
    group = group_of(analysis, "pw1.weight", 0)
    assert group.prunable and group.channels == groups and group.granularity == 8 // groups
    assert ("gc.weight", 0) in names(group.sources)
    assert ("pw2.weight", 1) in names(group.consumers)
    reasons = group_of(analysis, "gc.weight", 1).blocked_reasons
    assert any("grouped convolution" in r for r in reasons)
    assert check_groups(model, analysis) == 1


def test_depthwise_conv_passes_channels_through():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="pw1")])
    y = b.op("HardSwish", [b.conv(y, 8, 8, group=8, name="dw")])
    b.output(b.conv(y, 8, 2, name="pw2"))
    model, analysis = analyze(b)
    group = group_of(analysis, "pw1.weight", 0)
    assert group.channels == 8 and group.granularity == 1 and group.prunable
    assert {("dw.weight", 0), ("dw.bias", 0)} <= names(group.sources)
    assert check_groups(model, analysis) == 1


def test_gemm_transposes_and_matmul_weight_left():
    b = GraphBuilder()
    x = b.input("x", [2, 6])
    h = b.op("Gemm", [x, b.weight("w1", [5, 6]), b.weight("b1", [5])], transB=1)
    h = b.op("Tanh", [h])
    h = b.op("Gemm", [h, b.weight("w2", [5, 7])], transA=0)
    h = b.op("Relu", [h])
    ht = b.op("Transpose", [h], perm=[1, 0])
    out = b.op("MatMul", [b.weight("w3", [3, 7]), ht])
    b.output(out)
    model, analysis = analyze(b)
    g1 = group_of(analysis, "w1", 0)
    assert g1.prunable and names(g1.sources) == {("w1", 0), ("b1", 0)}
    assert names(g1.consumers) == {("w2", 0)}
    g2 = group_of(analysis, "w2", 1)
    assert g2.prunable and names(g2.consumers) == {("w3", 1)}
    assert check_groups(model, analysis) == 2


def test_flatten_merges_spatial_into_consumer_blocks():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    y = b.op("Relu", [b.conv(x, 3, 5, name="c")])
    y = b.op("Flatten", [y], axis=1)
    b.output(b.op("Gemm", [y, b.weight("fc", [2, 80])], transB=1))
    model, analysis = analyze(b)
    group = group_of(analysis, "c.weight", 0)
    assert group.prunable and group.channels == 5
    fc = member(group, "fc", 1)
    assert fc.indices.shape == (5, 16)
    np.testing.assert_array_equal(fc.indices[2], np.arange(32, 48))
    assert check_groups(model, analysis) == 1


def test_channel_shuffle_is_a_permutation():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="c")])
    y = b.op("Reshape", [y, b.const("s1", np.array([1, 2, 4, 8, 8]))])
    y = b.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = b.op("Reshape", [y, b.const("s2", np.array([1, 8, 8, 8]))])
    b.output(b.conv(y, 8, 2, name="after"))
    model, analysis = analyze(b)
    group = group_of(analysis, "c.weight", 0)
    assert group.prunable
    assert group.channels == 4 and group.granularity == 2  # columns of the 2x4 shuffle
    before = member(group, "c.weight", 0).indices
    after = member(group, "after.weight", 1).indices
    # Channel i*4+j of the producer lands at j*2+i after the shuffle.
    for rows, cols in zip(before, after, strict=True):
        assert sorted((c % 4) * 2 + c // 4 for c in rows) == sorted(cols.tolist())
    assert check_groups(model, analysis) == 1


def test_attention_heads_and_head_dim():
    b = GraphBuilder()
    x = b.input("x", [1, 5, 16])
    q = b.op("MatMul", [x, b.weight("wq", [16, 16])])
    k = b.op("MatMul", [x, b.weight("wk", [16, 16])])
    v = b.op("MatMul", [x, b.weight("wv", [16, 16])])
    shape = b.const("heads", np.array([1, 5, 4, 4]))
    q = b.op("Transpose", [b.op("Reshape", [q, shape])], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [k, shape])], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [v, shape])], perm=[0, 2, 1, 3])
    scores = b.op("Softmax", [b.op("MatMul", [q, k])], axis=-1)
    out = b.op("Transpose", [b.op("MatMul", [scores, v])], perm=[0, 2, 1, 3])
    out = b.op("Reshape", [out, b.const("merge", np.array([1, 5, 16]))])
    b.output(b.op("MatMul", [out, b.weight("wo", [16, 16])]))
    model, analysis = analyze(b)
    heads = group_of(analysis, "wq", 1)
    assert heads.prunable and heads.channels == 4 and heads.granularity == 4
    assert names(heads.sources) == {("wq", 1), ("wk", 1), ("wv", 1)}
    assert names(heads.consumers) == {("wo", 0)}
    assert check_groups(model, analysis) == 1
    model, by_dim = analyze(b, heads="dim")
    qk = group_of(by_dim, "wq", 1)
    vo = group_of(by_dim, "wv", 1)
    assert qk is not vo and qk.channels == 4 and vo.channels == 4
    assert names(vo.consumers) == {("wo", 0)} and not qk.consumers
    assert check_groups(model, by_dim) == 2


def test_softmax_layernorm_and_reduce_block_their_axes():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8])
    h = b.op("MatMul", [x, b.weight("w1", [8, 8])])
    s = b.op("Softmax", [h], axis=-1)
    n = b.op(
        "LayerNormalization",
        [b.op("MatMul", [x, b.weight("w2", [8, 8])]), b.weight("g", [8]), b.weight("beta", [8])],
        axis=-1,
    )
    mean = b.op("ReduceMean", [b.op("MatMul", [x, b.weight("w3", [8, 8])])], axes=[-1])
    b.output(b.op("MatMul", [s, b.weight("o1", [8, 2])]))
    b.output(b.op("MatMul", [n, b.weight("o2", [8, 2])]))
    b.output(mean)
    _, analysis = analyze(b)
    assert "Softmax axis" in " ".join(group_of(analysis, "w1", 1).blocked_reasons)
    assert "LayerNormalization" in " ".join(group_of(analysis, "w2", 1).blocked_reasons)
    assert "ReduceMean" in " ".join(group_of(analysis, "w3", 1).blocked_reasons)
    assert not analysis.prunable


def test_unknown_op_blocks_with_reason():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(x, 3, 8, name="c1")
    y = b.op("DepthToSpace", [y], blocksize=2)
    b.output(b.conv(y, 2, 2, name="c2"))
    _, analysis = analyze(b)
    reasons = " ".join(group_of(analysis, "c1.weight", 0).blocked_reasons)
    assert "no channel rule for op DepthToSpace" in reasons


def test_group_norm_prunes_whole_groups():
    b = GraphBuilder(opset=21)
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(x, 3, 8, name="c1")
    y = b.op("GroupNormalization", [y, b.weight("gs", [8]), b.weight("gb", [8])], num_groups=4)
    b.output(b.conv(b.op("Relu", [y]), 8, 2, name="c2"), shape=[1, 2, 8, 8])
    model, analysis = analyze(b)
    group = group_of(analysis, "c1.weight", 0)
    assert group.prunable and group.channels == 4 and group.granularity == 2
    assert check_groups(model, analysis) == 1


def test_lstm_and_if_block_their_channels():
    b = GraphBuilder()
    x = b.input("x", [3, 1, 4])
    h = b.op("MatMul", [x, b.weight("w_in", [4, 6])])
    outs = b.op(
        "LSTM", [h, b.weight("W", [1, 20, 6]), b.weight("R", [1, 20, 5])], n_out=3, hidden_size=5
    )
    b.output(outs[0])
    _, analysis = analyze(b)
    assert "recurrent op" in " ".join(group_of(analysis, "w_in", 1).blocked_reasons)


def test_einsum_linear():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4])
    h = b.op("Relu", [b.op("Einsum", [x, b.weight("w1", [4, 6])], equation="bij,jk->bik")])
    b.output(b.op("Einsum", [h, b.weight("w2", [6, 2])], equation="bik,kl->bil"))
    model, analysis = analyze(b)
    group = group_of(analysis, "w1", 1)
    assert group.prunable and names(group.consumers) == {("w2", 0)}
    assert check_groups(model, analysis) == 1


def test_shape_read_blocks_axis():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="c1")])
    size = b.op("Shape", [y])
    b.output(size, TensorProto.INT64)
    b.output(b.conv(y, 8, 2, name="c2"))
    _, analysis = analyze(b)
    assert any("Shape" in r for r in group_of(analysis, "c1.weight", 0).blocked_reasons)


def _flatten_cnn(batch_read) -> GraphBuilder:
    """conv(3->12) -> Relu -> NHWC Transpose -> Reshape(·, target) -> MatMul(192->5), the
    target built by ``batch_read(b, relu)`` around the constant 4*4*12 = 192."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    relu = b.op("Relu", [b.conv(x, 3, 12, name="c1")])
    nhwc = b.op("Transpose", [relu], perm=[0, 2, 3, 1])
    flat = b.op("Reshape", [nhwc, batch_read(b, relu)])
    b.output(b.op("MatMul", [flat, b.weight("dense", [192, 5])]))
    return b


def _tf2onnx_target(b: GraphBuilder, relu: str) -> str:
    """tf2onnx: Cast(Concat(Slice(Cast(Gather(Shape(x), nhwc order), int32), 0, 1), [192]))."""
    nhwc_shape = b.op("Gather", [b.op("Shape", [relu]), b.const("order", np.array([0, 2, 3, 1]))])
    as_int32 = b.op("Cast", [nhwc_shape], to=TensorProto.INT32)
    zero, one = b.const("zero", np.array([0])), b.const("one", np.array([1]))
    batch = b.op("Slice", [as_int32, zero, one, zero])
    target = b.op("Concat", [batch, b.const("rest", np.array([192], np.int32))], axis=0)
    return b.op("Cast", [target], to=TensorProto.INT64)


def _jax2onnx_target(b: GraphBuilder, relu: str) -> str:
    """jax2onnx: Concat(Unsqueeze(Squeeze(Gather(Shape(x), [0]))), [192])."""
    picked = b.op("Gather", [b.op("Shape", [relu]), b.const("first", np.array([0]))], axis=0)
    scalar = b.op("Squeeze", [picked, b.const("sq_axes", np.array([0]))])
    vector = b.op("Unsqueeze", [scalar, b.const("unsq_axes", np.array([0]))])
    return b.op("Concat", [vector, b.const("rest", np.array([192]))], axis=0)


@pytest.mark.parametrize("target", [_tf2onnx_target, _jax2onnx_target], ids=["tf2onnx", "jax"])
def test_flatten_with_batch_read_and_constant_size_prunes(target):
    """Only the batch entry of the Shape is read; the flattened size is a constant that the
    rewrite updates (192 -> 16 * kept channels)."""
    b = _flatten_cnn(target)
    model, analysis = analyze(b)
    group = group_of(analysis, "c1.weight", 0)
    assert group.prunable, group.blocked_reasons
    assert group.channels == 12 and names(group.consumers) == {("dense", 0)}
    assert check_groups(model, analysis) == 1
    proto = b.model()
    assert compile_check(proto, 0.5, 0) <= 1e-4
    pruned, _ = spa_compiler.compile(proto, ratio=0.5, criterion="l1", round_to=1)
    constants = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert [v for k, v in constants.items() if k.startswith("rest")] == [[96]]


def test_flatten_target_behind_a_where_on_another_condition_blocks():
    """Where(keep, [N, 192], Concat(batch, [192])): the constant the rewrite would update sits
    in one branch, but a run-time-looking condition may pick the other, so the target's
    flattened axis is not rewritable and the channels block."""

    def target(b: GraphBuilder, relu: str) -> str:
        batch = b.op("Slice", [b.op("Shape", [relu]), b.const("zero", np.array([0])),
                               b.const("one", np.array([1]))])  # fmt: skip
        built = b.op("Concat", [batch, b.const("rest", np.array([192]))], axis=0)
        keep = b.const("keep", np.array([True, False]))
        return b.op("Where", [keep, b.const("stale", np.array([-1, 192])), built])

    _, analysis = analyze(_flatten_cnn(target))
    assert not group_of(analysis, "c1.weight", 0).prunable


def _channel_entry_read(b: GraphBuilder, relu: str, use: str) -> str:
    """Concat(Shape(x)[0:1], [192]) as target; Shape(x)[0:2] (the batch and channel sizes:
    with the batch symbolic, constant folding leaves it) goes to ``use`` as well."""
    shape = b.op("Shape", [relu])
    zero, one, two = (b.const(n, np.array([v])) for n, v in (("zero", 0), ("one", 1), ("two", 2)))
    sizes = b.op("Slice", [shape, zero, two, zero])
    if use == "output":
        b.output(sizes, TensorProto.INT64)
    elif use == "float":
        b.output(b.op("Cast", [sizes], to=TensorProto.FLOAT))
    elif use == "add":
        b.output(b.op("Add", [sizes, one]), TensorProto.INT64)
    batch = b.op("Slice", [shape, zero, one, zero])
    return b.op("Concat", [batch, b.const("rest", np.array([192]))], axis=0)


@pytest.mark.parametrize("use", ["output", "float", "add"])
def test_shape_entry_of_the_channels_read_elsewhere_blocks(use):
    b = _flatten_cnn(lambda b, relu: _channel_entry_read(b, relu, use))
    _, analysis = analyze(b)
    group = group_of(analysis, "c1.weight", 0)
    assert not group.prunable
    assert any("its size is read by a Shape computation" in r for r in group.blocked_reasons)


def test_run_time_target_entry_spa_cannot_follow_blocks_its_axis():
    """A target entry computed from read sizes by arithmetic (N*C*H*W / N) blocks the axes
    read, and its position of the output."""

    def target(b: GraphBuilder, relu: str) -> str:
        shape = b.op("Shape", [relu])
        batch = b.op("Slice", [shape, b.const("zero", np.array([0])), b.const("one", [1])])
        rest = b.op("Div", [b.op("ReduceProd", [shape], keepdims=1), batch])
        return b.op("Concat", [batch, rest], axis=0)

    _, analysis = analyze(_flatten_cnn(target))
    group = group_of(analysis, "c1.weight", 0)
    assert not group.prunable
    reasons = " ".join(group.blocked_reasons)
    assert "[axis 1]: Shape 'shape5': its size is read by a Shape computation" in reasons
    assert "[axis 1]: Reshape 'reshape10': size set at run time by a computation spa" in reasons


def test_where_that_is_not_a_placeholder_test_blocks():
    """torch's Where(Equal(v, -1), ones, v) keeps the sizes; a Where on another condition may
    replace them, so the sizes it reads block."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    relu = b.op("Relu", [b.conv(x, 3, 12, name="c1")])
    keep = b.const("keep", np.array([True, False, True, True]))
    target = b.op("Where", [keep, b.const("ones", np.ones(4, np.int64)), b.op("Shape", [relu])])
    b.output(b.conv(b.op("Expand", [b.weight("bias", [1, 1, 4, 4]), target]), 12, 2))
    _, analysis = analyze(b)
    group = group_of(analysis, "c1.weight", 0)
    assert not group.prunable
    assert any("its size is read by a Shape computation" in r for r in group.blocked_reasons)


# Found by an adversarial review: each built so that a wrong rule prunes and the output moves.


def _negative_step_slice(b: GraphBuilder, data: str, start: int, end: int) -> str:
    consts = [b.const(n, np.array([v])) for n, v in (("st", start), ("en", end), ("ax", 0))]
    return b.op("Slice", [data, *consts, b.const("sp", np.array([-1]))])


def test_shape_entry_slice_with_a_negative_step_follows_onnx_clamping():
    """Slice(v, -10, -100, step -1) on a 2-vector picks entry 0 in ONNX (starts clamp to
    [0, n-1]); Python's slicing picks nothing, which freed the channel entry."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    relu = b.op("Relu", [b.conv(x, 3, 12, name="c1")])
    b.output(b.conv(relu, 12, 5, name="c2"))
    swapped = b.op("Gather", [b.op("Shape", [relu]), b.const("order", np.array([1, 0]))], axis=0)
    b.output(_negative_step_slice(b, swapped, -10, -100), TensorProto.INT64)
    _, analysis = analyze(b)
    assert not group_of(analysis, "c1.weight", 0).prunable
    assert compile_check(b.model(), 0.5, 0) <= 1e-4


def test_data_slice_with_a_negative_step_reads_the_channel_onnx_picks():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    relu = b.op("Relu", [b.conv(x, 3, 12, name="c1")])
    b.output(b.conv(relu, 12, 5, name="c2"))
    consts = [b.const(n, np.array([v])) for n, v in (("st", -100), ("en", -1000), ("ax", 1))]
    b.output(b.op("Slice", [relu, *consts, b.const("sp", np.array([-1]))]))
    assert compile_check(b.model(), 0.5, 0) <= 1e-4


def test_reshape_target_read_elsewhere_is_not_rewritten_in_place():
    """The flatten target also sizes a ConstantOfShape: rewriting its 192 would change it."""

    def target(b: GraphBuilder, relu: str) -> str:
        batch = b.op("Slice", [b.op("Shape", [relu]), b.const("zero", np.array([0])),
                               b.const("one", np.array([1]))])  # fmt: skip
        built = b.op("Concat", [batch, b.const("rest", np.array([192]))], axis=0)
        ones = onnx.helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        b.output(b.op("ReduceSum", [b.op("ConstantOfShape", [built], value=ones)], keepdims=0))
        return built

    b = _flatten_cnn(target)
    _, analysis = analyze(b)
    assert not group_of(analysis, "c1.weight", 0).prunable
    assert compile_check(b.model(), 0.5, 0) <= 1e-4


def test_placeholder_where_must_fill_with_ones():
    """Where(Equal(v, -1), [1, 192], v): the placeholder becomes 192, a size the rewrite of v
    never reaches."""

    def target(b: GraphBuilder, relu: str) -> str:
        batch = b.op("Slice", [b.op("Shape", [relu]), b.const("zero", np.array([0])),
                               b.const("one", np.array([1]))])  # fmt: skip
        v = b.op("Concat", [batch, b.const("rest", np.array([-1]))], axis=0)
        test = b.op("Equal", [v, b.const("m1", np.array([-1]))])
        return b.op("Where", [test, b.const("fill", np.array([1, 192])), v])

    _, analysis = analyze(_flatten_cnn(target))
    assert not group_of(analysis, "c1.weight", 0).prunable


def test_blocked_dequantize_linear_blocks_the_channels_it_reads_in_blocks():
    """DequantizeLinear with block_size (opset 21): one scale per 4 input channels of the
    second conv's weight, which removing single channels would split."""
    from onnx import helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    quantized = numpy_helper.from_array(rng.integers(-100, 100, (8, 16, 3, 3), np.int8), "w2q")
    scales = numpy_helper.from_array(rng.uniform(1e-3, 1e-2, (8, 4, 3, 3)).astype(np.float32), "s")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("DequantizeLinear", ["w2q", "s"], ["w2"], axis=1, block_size=4),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8, 8])],
        [weight("w1", 16, 3, 3, 3), weight("b1", 16), quantized, scales, weight("b2", 8)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    analysis = spa_compiler.inspect(spa_compiler.from_proto(model))
    group = group_of(analysis, "w1", 0)
    assert not group.prunable
    assert any("blocked quantization" in r for r in group.blocked_reasons)
