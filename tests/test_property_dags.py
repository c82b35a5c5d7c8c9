"""Property test: random DAGs built from the supported op table compile at random ratios and the
exactness oracle holds (zero the consumer weights of the removed channels in the original; the
pruned model must give the same outputs)."""

from __future__ import annotations

import numpy as np
import onnx
from builder import GraphBuilder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import compile_check

# Each step reads one or two earlier tensors [1, C, 6, 6] and adds one.
STEPS = ["conv", "pointwise", "depthwise", "relu", "sigmoid-gate", "add", "concat", "bn", "pool"]


@st.composite
def dags(draw) -> tuple[GraphBuilder, str]:
    b = GraphBuilder(seed=draw(st.integers(0, 10_000)))
    tensors = [(b.input("x", [1, 3, 6, 6]), 3)]
    for _ in range(draw(st.integers(2, 9))):
        step = draw(st.sampled_from(STEPS))
        name, channels = draw(st.sampled_from(tensors[-3:]))  # mostly deep, some branches
        if step in ("conv", "pointwise"):
            out = draw(st.integers(1, 8))
            kernel = 3 if step == "conv" else 1
            tensors.append((b.conv(name, channels, out, k=kernel), out))
        elif step == "depthwise":
            tensors.append((b.conv(name, channels, channels, group=channels), channels))
        elif step == "relu":
            tensors.append((b.op("Relu", [name]), channels))
        elif step == "sigmoid-gate":  # x * sigmoid(x): channels stay paired
            tensors.append((b.op("Mul", [name, b.op("Sigmoid", [name])]), channels))
        elif step == "bn":
            scale, bias = b.weight(f"s{b.count}", [channels]), b.weight(f"b{b.count}", [channels])
            mean, var = (
                b.const(f"m{b.count}", np.zeros(channels, np.float32)),
                b.const(f"v{b.count}", np.ones(channels, np.float32)),
            )
            tensors.append((b.op("BatchNormalization", [name, scale, bias, mean, var]), channels))
        elif step == "pool":
            tensors.append((b.op("MaxPool", [name], kernel_shape=[3, 3], pads=[1] * 4), channels))
        else:
            same = [(n, c) for n, c in tensors if c == channels]
            other, other_channels = draw(st.sampled_from(same if step == "add" else tensors))
            if step == "add":
                tensors.append((b.op("Add", [name, other]), channels))
            else:
                tensors.append((b.op("Concat", [name, other], axis=1), channels + other_channels))
    # Every tensor nothing reads joins the head, so no branch is dead (cleanup would drop it).
    read = {i for node in b.nodes for i in node.input}
    leaves = [(n, c) for n, c in tensors[1:] if n not in read] or tensors[-1:]
    last, channels = leaves[0]
    for other, other_channels in leaves[1:]:
        last, channels = b.op("Concat", [last, other], axis=1), channels + other_channels
    b.output(b.conv(last, channels, 2, k=1, name="head"))
    return b, last


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(dag=dags(), ratio=st.floats(0.05, 0.9), seed=st.integers(0, 100))
def test_random_dags_compile_exactly(tmp_path_factory, dag, ratio, seed):
    builder, _ = dag
    path = tmp_path_factory.mktemp("dag") / "dag.onnx"
    onnx.save(builder.model(), str(path))
    assert compile_check(str(path), ratio, seed) <= 1e-4
