"""ONNX models written directly with ``onnx.helper``: patterns no torch exporter emits.

Every builder is deterministic (``numpy.random.default_rng(0)``), sets ``ir_version`` and
``opset_import`` explicitly and passes ``onnx.checker``. Batch axes are symbolic (``"N"``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
CUSTOM_DOMAIN = "com.example.spa"


class _Graph:
    """Minimal accumulator; ``const_nodes`` makes weights ``Constant`` nodes, not initializers."""

    def __init__(self, seed: int = 0, const_nodes: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.const_nodes = const_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def input(self, name: str, shape: Sequence[int | str], dtype: int = FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, shape: Sequence[int | str] | None, dtype: int = FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def const(self, name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.const_nodes:
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor)
            )
        else:
            self.inits.append(tensor)
        return name

    def weight(self, name: str, shape: Sequence[int], scale: float = 0.3) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: object) -> str:
        name = self._name(op_type.lower())
        outs = [f"{name}_out{i}" for i in range(n_out)] if n_out > 1 else [name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs  # type: ignore[return-value]

    def conv(
        self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, relu: bool = True
    ) -> str:
        w = self.weight(self._name("conv_w"), [cout, cin // group, k, k])
        b = self.weight(self._name("conv_b"), [cout], 0.1)
        pad = k // 2
        y = self.op("Conv", [x, w, b], kernel_shape=[k, k], pads=[pad] * 4, group=group)
        return self.op("Relu", [y]) if relu else y

    def graph(self, name: str) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)

    def model(
        self, name: str, opset: int, ir_version: int, extra: Sequence[tuple[str, int]] = ()
    ) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra]
        model = helper.make_model(
            self.graph(name), opset_imports=opsets, producer_name="spa-handmade"
        )
        model.ir_version = ir_version
        onnx.checker.check_model(model)
        return model


def _conv_gemm(g: _Graph, size: int = 8) -> None:
    """x -> Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    x = g.input("x", ["N", 3, size, size])
    y = g.conv(g.conv(x, 3, 8), 8, 16)
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    w, b = g.weight("fc_w", [10, 16]), g.weight("fc_b", [10], 0.1)
    g.nodes.append(helper.make_node("Gemm", [y, w, b], ["y"], name="fc", transB=1))
    g.output("y", ["N", 10])


# --------------------------------------------------------------------------- exporter quirks


def constant_node_weights() -> onnx.ModelProto:
    """Old-Paddle style: every parameter is a Constant node, some routed through Identity."""
    g = _Graph(const_nodes=True)
    x = g.input("x", ["N", 3, 16, 16])
    w1, b1 = g.weight("conv1_w", [8, 3, 3, 3]), g.weight("conv1_b", [8], 0.1)
    w1 = g.op("Identity", [w1])
    y = g.op("Conv", [x, w1, b1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    scale = g.const("bn_scale", g.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    bias = g.weight("bn_bias", [8], 0.1)
    mean = g.weight("bn_mean", [8], 0.1)
    var = g.const("bn_var", g.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    var = g.op("Identity", [var])
    y = g.op("Relu", [g.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)])
    w2, b2 = g.weight("conv2_w", [16, 8, 3, 3]), g.weight("conv2_b", [16], 0.1)
    y = g.op("Conv", [y, g.op("Identity", [w2]), b2], kernel_shape=[3, 3], strides=[2, 2])
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    fw, fb = g.weight("fc_w", [10, 16]), g.weight("fc_b", [10], 0.1)
    g.nodes.append(helper.make_node("Gemm", [y, fw, g.op("Identity", [fb])], ["y"], transB=1))
    g.output("y", ["N", 10])
    return g.model("constant_node_weights", opset=11, ir_version=6)


def paddle_style_layernorm() -> onnx.ModelProto:
    """MatMul/Add -> LayerNorm decomposed over the last axis -> MatMul; Constant weights."""
    g = _Graph(const_nodes=True)
    x = g.input("x", ["N", 8, 32])
    h = g.op("Add", [g.op("MatMul", [x, g.weight("w1", [32, 32])]), g.weight("b1", [32], 0.1)])
    mean = g.op("ReduceMean", [h], axes=[-1], keepdims=1)
    centered = g.op("Sub", [h, mean])
    sq = g.op("Pow", [centered, g.const("two", np.array(2.0, np.float32))])
    var = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const("eps", np.array(1e-5, np.float32))])])
    normed = g.op("Div", [centered, std])
    gamma = g.const("gamma", g.rng.uniform(0.5, 1.5, 32).astype(np.float32))
    y = g.op("Add", [g.op("Mul", [normed, gamma]), g.weight("beta", [32], 0.1)])
    g.nodes.append(helper.make_node("MatMul", [y, g.weight("w2", [32, 16])], ["y"]))
    g.output("y", ["N", 8, 16])
    return g.model("paddle_style_layernorm", opset=13, ir_version=7)


def external_data(tmp_dir: str | pathlib.Path) -> pathlib.Path:
    """Write a conv model whose weights live in ``<name>.onnx.data``; returns the .onnx path."""
    g = _Graph()
    _conv_gemm(g)
    model = g.model("external_data", opset=17, ir_version=8)
    path = pathlib.Path(tmp_dir) / "external_data.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def with_lstm() -> onnx.ModelProto:
    """x[T, N, 8] -> Gemm (per step, via Reshape) -> LSTM -> Squeeze(Y_h) -> Gemm."""
    g = _Graph()
    steps, feat, emb, hidden = 4, 8, 16, 24
    x = g.input("x", [steps, "N", feat])
    flat = g.op("Reshape", [x, g.const("flat_shape", np.array([-1, feat], np.int64))])
    w, b = g.weight("proj_w", [emb, feat]), g.weight("proj_b", [emb], 0.1)
    h = g.op("Gemm", [flat, w, b], transB=1)
    seq = g.op("Reshape", [h, g.const("seq_shape", np.array([steps, -1, emb], np.int64))])
    lw = g.weight("lstm_w", [1, 4 * hidden, emb])
    lr = g.weight("lstm_r", [1, 4 * hidden, hidden])
    lb = g.weight("lstm_b", [1, 8 * hidden], 0.1)
    _, y_h, _ = g.op("LSTM", [seq, lw, lr, lb], n_out=3, hidden_size=hidden)
    last = g.op("Squeeze", [y_h, g.const("axis0", np.array([0], np.int64))])
    fw, fb = g.weight("fc_w", [5, hidden]), g.weight("fc_b", [5], 0.1)
    g.nodes.append(helper.make_node("Gemm", [last, fw, fb], ["y"], transB=1))
    g.output("y", ["N", 5])
    return g.model("with_lstm", opset=17, ir_version=8)


def with_if() -> onnx.ModelProto:
    """Conv -> If(cond){Conv with outer-scope weight} -> Conv; ``cond`` is a bool input."""
    g = _Graph()
    x = g.input("x", ["N", 3, 16, 16])
    cond = g.input("cond", [], TensorProto.BOOL)
    y = g.conv(x, 3, 8)
    w_then = g.weight("then_w", [8, 8, 3, 3])
    w_else = g.weight("else_w", [8, 8, 1, 1])
    b_shared = g.weight("branch_b", [8], 0.1)
    out_info = [helper.make_tensor_value_info("branch_out", FLOAT, ["N", 8, 16, 16])]

    def branch(name: str, w: str, k: int) -> onnx.GraphProto:
        pad = k // 2
        conv = helper.make_node(
            "Conv", [y, w, b_shared], [f"{name}_c"], kernel_shape=[k, k], pads=[pad] * 4
        )
        relu = helper.make_node("Relu", [f"{name}_c"], ["branch_out"])
        return helper.make_graph([conv, relu], name, [], out_info)

    z = g.op(
        "If", [cond], then_branch=branch("then", w_then, 3), else_branch=branch("else", w_else, 1)
    )
    z = g.conv(z, 8, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [z], ["y"]))
    g.output("y", ["N", 4, 16, 16])
    return g.model("with_if", opset=17, ir_version=8)


def opset_variants() -> dict[str, onnx.ModelProto]:
    """The same conv+gemm model at several (opset, IR) pairs."""
    models = {}
    for opset, ir in ((11, 7), (13, 7), (17, 8), (21, 10)):
        g = _Graph()
        _conv_gemm(g)
        models[f"opset{opset}"] = g.model(f"conv_gemm_opset{opset}", opset=opset, ir_version=ir)
    return models


# --------------------------------------------------------------------------- ops torch never emits


def group_normalization() -> onnx.ModelProto:
    """Opset-21 GroupNormalization (per-channel scale/bias) between convs."""
    g = _Graph()
    x = g.input("x", ["N", 3, 16, 16])
    y = g.conv(x, 3, 16, relu=False)
    scale = g.const("gn_scale", g.rng.uniform(0.5, 1.5, 16).astype(np.float32))
    y = g.op("GroupNormalization", [y, scale, g.weight("gn_bias", [16], 0.1)], num_groups=4)
    y = g.conv(g.op("Relu", [y]), 16, 8, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 8, 16, 16])
    return g.model("group_normalization", opset=21, ir_version=10)


def einsum_linear() -> onnx.ModelProto:
    """Einsum 'bij,jk->bik' with weights, twice, as a Linear replacement."""
    g = _Graph()
    x = g.input("x", ["N", 8, 16])
    h = g.op("Einsum", [x, g.weight("w1", [16, 32])], equation="bij,jk->bik")
    h = g.op("Relu", [g.op("Add", [h, g.weight("b1", [32], 0.1)])])
    g.nodes.append(
        helper.make_node("Einsum", [h, g.weight("w2", [32, 12])], ["y"], equation="bij,jk->bik")
    )
    g.output("y", ["N", 8, 12])
    return g.model("einsum_linear", opset=13, ir_version=7)


def _resize_model(opset: int, ir: int, with_roi: bool) -> onnx.ModelProto:
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 8)
    roi = g.const("roi", np.array([], np.float32)) if with_roi else ""
    scales = g.const("scales", np.array([1, 1, 2, 2], np.float32))
    # Upsample-9 semantics: nearest, asymmetric coordinates, floor rounding.
    y = g.op(
        "Resize",
        [y, roi, scales],
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    y = g.conv(y, 8, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 4, 16, 16])
    return g.model(f"resize_opset{opset}", opset=opset, ir_version=ir)


def upsample_opset9_style() -> onnx.ModelProto:
    """Resize-13 with scales and an empty roi slot, as converted from Upsample-9."""
    return _resize_model(13, 7, with_roi=False)


def resize_opset11_roi() -> onnx.ModelProto:
    """Resize-11, where the roi input is mandatory (an empty tensor)."""
    return _resize_model(11, 6, with_roi=True)


def gather_channels() -> onnx.ModelProto:
    """Gather(axis=1) of even channels [0, 2, 4, 6] between two convs."""
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 8)
    y = g.op("Gather", [y, g.const("even", np.arange(0, 8, 2, dtype=np.int64))], axis=1)
    y = g.conv(y, 4, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 4, 8, 8])
    return g.model("gather_channels", opset=13, ir_version=7)


def slice_channels() -> onnx.ModelProto:
    """Contiguous then strided channel Slice between convs."""
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 8)

    def chan_slice(t: str, start: int, end: int, step: int) -> str:
        vals = [g.const(g._name(k), np.array([v], np.int64)) for k, v in
                (("st", start), ("en", end), ("ax", 1), ("sp", step))]  # fmt: skip
        return g.op("Slice", [t, *vals])

    y = g.conv(chan_slice(y, 0, 6, 1), 6, 8)
    y = g.conv(chan_slice(y, 0, 8, 2), 4, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 4, 8, 8])
    return g.model("slice_channels", opset=13, ir_version=7)


def tile_pad_expand() -> onnx.ModelProto:
    """Tile, Pad and Expand that touch only spatial axes, between convs."""
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 8)
    y = g.op("Tile", [y, g.const("reps", np.array([1, 1, 2, 2], np.int64))])
    y = g.op("Pad", [y, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    y = g.conv(y, 8, 8)  # [N, 8, 18, 18]
    y = g.op("GlobalAveragePool", [y])
    y = g.op("Expand", [y, g.const("to", np.array([1, 1, 4, 4], np.int64))])
    y = g.conv(y, 8, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 4, 4, 4])
    return g.model("tile_pad_expand", opset=13, ir_version=7)


def max_min_where() -> onnx.ModelProto:
    """Max/Min/Where of two conv branches and a broadcast [1, C, 1, 1] constant."""
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.conv(x, 3, 8, relu=False)
    b = g.conv(x, 3, 8, relu=False)
    per_c = g.weight("per_channel", [1, 8, 1, 1], 0.2)
    hi = g.op("Max", [a, b, per_c])
    lo = g.op("Min", [a, per_c])
    y = g.op("Where", [g.op("Greater", [a, b]), hi, lo])
    y = g.conv(y, 8, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 4, 8, 8])
    return g.model("max_min_where", opset=13, ir_version=7)


def gemm_transA() -> onnx.ModelProto:  # noqa: N802 - name mirrors the attribute
    """Gemm(transB) -> Relu -> Transpose -> Gemm(transA=1, transB=1)."""
    g = _Graph()
    x = g.input("x", ["N", 16])
    h = g.op("Gemm", [x, g.weight("w1", [32, 16]), g.weight("b1", [32], 0.1)], transB=1)
    ht = g.op("Transpose", [g.op("Relu", [h])], perm=[1, 0])  # [32, N]
    w2, b2 = g.weight("w2", [24, 32]), g.weight("b2", [24], 0.1)
    g.nodes.append(helper.make_node("Gemm", [ht, w2, b2], ["y"], transA=1, transB=1))
    g.output("y", ["N", 24])
    return g.model("gemm_transA", opset=13, ir_version=7)


def matmul_weight_left() -> onnx.ModelProto:
    """Features-first layout: W[Cout, Cin] @ x[Cin, N] with the weight as input 0."""
    g = _Graph()
    x = g.input("x", [16, "N"])
    h = g.op("MatMul", [g.weight("w1", [32, 16]), x])
    h = g.op("Relu", [g.op("Add", [h, g.weight("b1", [32, 1], 0.1)])])
    g.nodes.append(helper.make_node("MatMul", [g.weight("w2", [8, 32]), h], ["y"]))
    g.output("y", [8, "N"])
    return g.model("matmul_weight_left", opset=13, ir_version=7)


def loop_scan() -> onnx.ModelProto:
    """Conv features -> Loop (3 trips) whose body uses outer-scope weights -> Gemm."""
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    h0 = g.op("Flatten", [g.op("GlobalAveragePool", [g.conv(x, 3, 8)])], axis=1)
    w, b = g.weight("loop_w", [8, 8]), g.weight("loop_b", [8], 0.1)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", w], ["mm"]),
            helper.make_node("Add", ["mm", b], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", FLOAT, ["N", 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", FLOAT, ["N", 8]),
        ],
    )
    trips = g.const("trips", np.array(3, np.int64))
    keep_going = g.const("keep_going", np.array(True))
    h = g.op("Loop", [trips, keep_going, h0], body=body)
    fw, fb = g.weight("fc_w", [4, 8]), g.weight("fc_b", [4], 0.1)
    g.nodes.append(helper.make_node("Gemm", [h, fw, fb], ["y"], transB=1))
    g.output("y", ["N", 4])
    return g.model("loop_scan", opset=17, ir_version=8)


def unknown_op() -> onnx.ModelProto:
    """A custom-domain op between convs; the analysis must block it. ORT cannot run it."""
    g = _Graph()
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 8)
    y = g.op("MysteryOp", [y], domain=CUSTOM_DOMAIN, alpha=0.5)
    y = g.conv(y, 8, 4, relu=False)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", ["N", 4, 8, 8])
    return g.model("unknown_op", opset=17, ir_version=8, extra=[(CUSTOM_DOMAIN, 1)])


def quantized_ops() -> onnx.ModelProto:
    """DynamicQuantizeLinear -> MatMulInteger (uint8 weight) -> dequantise -> Gemm."""
    g = _Graph()
    x = g.input("x", ["N", 16])
    xq, x_scale, x_zp = g.op("DynamicQuantizeLinear", [x], n_out=3)
    wq = g.const("wq", g.rng.integers(0, 256, (16, 32), dtype=np.uint8))
    w_zp = g.const("w_zp", np.array(128, np.uint8))
    acc = g.op("MatMulInteger", [xq, wq, x_zp, w_zp])
    scale = g.op("Mul", [x_scale, g.const("w_scale", np.array(0.01, np.float32))])
    h = g.op("Relu", [g.op("Mul", [g.op("Cast", [acc], to=FLOAT), scale])])
    fw, fb = g.weight("fc_w", [8, 32]), g.weight("fc_b", [8], 0.1)
    g.nodes.append(helper.make_node("Gemm", [h, fw, fb], ["y"], transB=1))
    g.output("y", ["N", 8])
    return g.model("quantized_ops", opset=13, ir_version=7)


def _variant(key: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        return opset_variants()[key]

    build.__name__ = f"opset_variant_{key}"
    return build


HANDMADE: dict[str, Callable[[], onnx.ModelProto]] = {
    "constant_node_weights": constant_node_weights,
    "paddle_style_layernorm": paddle_style_layernorm,
    "with_lstm": with_lstm,
    "with_if": with_if,
    **{f"conv_gemm_{k}": _variant(k) for k in ("opset11", "opset13", "opset17", "opset21")},
    "group_normalization": group_normalization,
    "einsum_linear": einsum_linear,
    "upsample_opset9_style": upsample_opset9_style,
    "resize_opset11_roi": resize_opset11_roi,
    "gather_channels": gather_channels,
    "slice_channels": slice_channels,
    "tile_pad_expand": tile_pad_expand,
    "max_min_where": max_min_where,
    "gemm_transA": gemm_transA,
    "matmul_weight_left": matmul_weight_left,
    "loop_scan": loop_scan,
    "unknown_op": unknown_op,
    "quantized_ops": quantized_ops,
}

NOT_RUNNABLE_IN_ORT: frozenset[str] = frozenset({"unknown_op"})
