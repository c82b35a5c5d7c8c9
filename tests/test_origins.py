"""spa on models written by each framework's own ONNX converter, checked by the exactness oracle.

PyTorch, with both exporters (legacy at opsets 13 and 17, dynamo), is the architecture corpus:
test_analysis_corpus.py runs the oracle on its groups, test_compile.py and test_obspa.py on
its compiles. This file covers the other origins:

- scikit-learn MLPs, converted live by skl2onnx (a 0.3 MB wheel, in the test extra);
- TensorFlow/Keras (tf2onnx), JAX/Flax (jax2onnx) and PaddlePaddle (paddle2onnx): their
  frameworks are too heavy for CI, so the files the converters wrote are checked in under
  tests/data/<origin>/, made by tests/data/make_<origin>.py (versions in its docstring).

Every file is compiled at two l1 ratios and with the default obspa; each compile must find
groups, drop parameters, run in onnxruntime, and reproduce the original with the removed
channels' consumer weights zeroed. What spa blocks is asserted with its reason: the ones that
are follow-up work say so in a comment.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from oracle import (
    check_groups,
    compensation_check,
    compile_check,
    random_feeds,
    worst_relative_error,
    zero_removed_consumers,
)

import spa_compiler
from spa_compiler.errors import SpaWarning

DATA = pathlib.Path(__file__).resolve().parent / "data"
MAX_BYTES = 200_000
TOLERANCE = 1e-4

# Per checked-in file: the channel counts of the prunable groups (sorted), and words that must
# appear among the blocked reasons beyond the graph's own inputs and outputs.
FILES: dict[str, tuple[list[int], list[str]]] = {
    # stem+residual trunk 8 (the depthwise conv rides on it), the block's inner conv 8, the
    # pointwise conv 16, Dense 32; tf2onnx folded every BN into its conv and dropped the NHWC
    # Transposes but the input's
    "tensorflow/keras_resnet_cnn.onnx": ([8, 8, 16, 32], ["Softmax axis"]),
    # BN after the ReLU stays as Mul+Add, coupled with its conv's output
    "tensorflow/keras_bn_after_relu.onnx": ([8, 12, 16], []),
    # Flatten's target is Cast(Concat(Gather(Shape(x), NHWC order)[0:1], [192])), 192 =
    # 4*4*12 a constant: only the batch size is read, and the 192 is rewritten
    "tensorflow/keras_flatten_cnn.onnx": ([8, 12, 24], []),
    # BatchNormalization on 2-D data is Mul+Add after the MatMul+Add
    "tensorflow/keras_dense_mlp.onnx": ([16, 32], []),
    "jax/flax_mlp.onnx": ([16, 32], []),
    # the same MLP at jax2onnx's default opset, 23
    "jax/flax_mlp_opset23.onnx": ([16, 32], []),
    "jax/jax_function_mlp.onnx": ([16, 32], []),
    # the 8-channel residual trunk and the strided conv (16); jax2onnx 0.17.1 declares NHWC
    # shapes for tensors it has made NCHW, which spa replaces (test_jax2onnx_stale_value_info)
    "jax/flax_resnet_cnn.onnx": ([8, 16], []),
    # the flatten is Reshape(x, Concat(Unsqueeze(Squeeze(Shape(x)[0])), [192])), as tf2onnx's
    "jax/flax_flatten_cnn.onnx": ([8, 12, 24], []),
    # trunk 8 with the depthwise conv, inner conv 8, pointwise 16 (BN + hardswish), Linear 32
    "paddle/paddle_resnet_cnn.onnx": ([8, 8, 16, 32], []),
    # Paddle's flatten is Reshape(x, Concat(Shape(x)[0:1], [-1])): the 12 channels prune
    "paddle/paddle_flatten_cnn.onnx": ([8, 12, 24], []),
    # BatchNorm1D is a BatchNormalization node; GELU an Erf decomposition
    "paddle/paddle_mlp.onnx": ([16, 32], []),
}
PRODUCERS = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "paddle": ""}
# Ratios for l1; obspa (the default criterion) runs once at 0.5.
COMPILES = [("l1", 0.3), ("l1", 0.7), ("obspa", 0.5)]


def _run_in_ort(proto: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The model loads and runs in onnxruntime with its default optimizations, and gives
    outputs shaped like the original's."""
    feeds = random_feeds(original, 0)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    reference = ort.InferenceSession(
        original.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    assert len(got) == len(reference)
    for a, b in zip(got, reference, strict=True):
        if isinstance(b, np.ndarray):
            assert a.shape == b.shape
            if np.issubdtype(a.dtype, np.floating):
                assert np.isfinite(a).all()


def _check_compile(source, original: onnx.ModelProto, criterion: str, ratio: float) -> None:
    pruned, report = spa_compiler.compile(source, ratio=ratio, criterion=criterion, seed=0)
    assert report.groups_prunable > 0 and report.groups_pruned > 0
    assert report.after["parameters"] < report.before["parameters"]
    _run_in_ort(pruned, original)
    if criterion == "obspa":
        # Compensation refits the kept weights: exact in the form that, with the removed
        # channels' consumer weights already zero, it changes nothing. The obspa ranking
        # itself goes through the plain oracle with compensation off.
        assert report.statistics is not None
        assert compensation_check(source, ratio, 0) <= TOLERANCE
        assert compile_check(source, ratio, 0, criterion="obspa", compensate=False) <= TOLERANCE
    else:
        zeroed = zero_removed_consumers(source, report.plan)
        assert worst_relative_error(zeroed, pruned, 0) <= TOLERANCE


def _check_analysis(model, expected: list[int], words: list[str]) -> None:
    if isinstance(model, onnx.ModelProto):
        model = spa_compiler.from_proto(model)
    analysis = spa_compiler.inspect(model)
    assert sorted(g.channels for g in analysis.prunable) == expected
    reasons = " | ".join(r for g in analysis.blocked for r in g.blocked_reasons)
    for word in words:
        assert word in reasons, f"{word!r} not among the blocked reasons: {reasons[:2000]}"
    for group in analysis.blocked:
        assert group.blocked_reasons
    assert check_groups(model, analysis, limit=8) == len(expected)


# --------------------------------------------------------------------------- checked-in files


def test_checked_in_files_are_listed_small_and_from_their_converter():
    found = {str(p.relative_to(DATA)) for p in DATA.glob("*/*.onnx")}
    assert found == set(FILES)
    for name in found:
        path = DATA / name
        assert path.stat().st_size < MAX_BYTES, name
        proto = onnx.load(str(path))
        assert proto.producer_name == PRODUCERS[name.split("/")[0]], name
        batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param, f"{name}: the batch is symbolic, as the converters write it"
    assert (DATA / "make_tensorflow.py").exists()
    assert (DATA / "make_jax.py").exists()
    assert (DATA / "make_paddle.py").exists()


@pytest.mark.parametrize("name", sorted(FILES))
def test_origin_analysis(name):
    expected, words = FILES[name]
    _check_analysis(spa_compiler.load(DATA / name), expected, words)


@pytest.mark.parametrize(
    ("name", "criterion", "ratio"),
    [(n, c, r) for n in sorted(FILES) for c, r in COMPILES],
    ids=[f"{n}-{c}-{r}" for n in sorted(FILES) for c, r in COMPILES],
)
def test_origin_compile(name, criterion, ratio):
    path = DATA / name
    _check_compile(path, onnx.load(str(path)), criterion, ratio)


def test_jax2onnx_stale_value_info():
    """The flax_resnet_cnn file as jax2onnx wrote it fails the full ONNX checker: its value_info
    still has the NHWC shapes of tensors the converter made NCHW. spa replaces the declared
    shapes that ONNX's inference contradicts, with a warning, and analyses the file as it does
    the same file without value_info: the trunk (8, across the residual add) and the strided
    conv (16)."""
    proto = onnx.load(str(DATA / "jax/flax_resnet_cnn.onnx"))
    with pytest.raises(onnx.shape_inference.InferenceError, match="existing shape differ"):
        onnx.checker.check_model(proto, full_check=True)
    declared = {v.name: v for v in proto.graph.value_info}
    shape = [d.dim_value or d.dim_param for d in declared["relu_out_0"].type.tensor_type.shape.dim]
    assert shape == ["B", 16, 16, 8]  # really (B, 8, 16, 16): it feeds an NCHW Conv
    stale = r"'relu_out_0' declared \['B', 16, 16, 8\], inferred \['B', 8, 16, 16\]"
    with pytest.warns(SpaWarning, match=stale):
        model = spa_compiler.load(DATA / "jax/flax_resnet_cnn.onnx")
    assert list(model.graph.tensors()["relu_out_0"].shape) == ["B", 8, 16, 16]
    _check_analysis(model, [8, 16], [])
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto, full_check=True)
    _check_analysis(proto, [8, 16], [])


def test_jax2onnx_default_opset_is_read():
    """jax2onnx writes opset 23 unless told otherwise; spa reads opsets 11-23."""
    proto = onnx.load(str(DATA / "jax/flax_mlp_opset23.onnx"))
    assert proto.opset_import[0].version == 23
    opset21 = spa_compiler.inspect(DATA / "jax/flax_mlp.onnx")
    opset23 = spa_compiler.inspect(DATA / "jax/flax_mlp_opset23.onnx")
    assert [g.channels for g in opset23.groups] == [g.channels for g in opset21.groups]


# --------------------------------------------------------------------------- scikit-learn, live


def _fit(estimator, targets):
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 10)).astype(np.float32)
    y = {
        "classes": (x[:, 0] > 0).astype(int) + (x[:, 1] > 0),
        "binary": (x[:, 0] + x[:, 2] > 0).astype(int),
        "values": np.stack([x[:, 0] * x[:, 1], x[:, 2]], 1),
    }[targets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(x, y)
    return x


def _sklearn_cases():
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    return {
        # MatMul+Add+ReLU twice, then Softmax and the label's ArgMax/ArrayFeatureExtractor
        "classifier": (
            MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=30, random_state=0),
            "classes", [16, 32],
        ),
        # logistic hidden layer; binary output is Sigmoid, then Sub/Concat into 2 columns
        "binary_logistic": (
            MLPClassifier(
                hidden_layer_sizes=(24,), activation="logistic", max_iter=30, random_state=0
            ),
            "binary", [24],
        ),
        "regressor_tanh": (
            MLPRegressor(
                hidden_layer_sizes=(24, 12), activation="tanh", max_iter=30, random_state=0
            ),
            "values", [12, 24],
        ),
    }  # fmt: skip


SKLEARN = ["classifier", "binary_logistic", "regressor_tanh"]


def _convert(estimator, x, zipmap: bool = False) -> onnx.ModelProto:
    skl2onnx = pytest.importorskip("skl2onnx")
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = None if zipmap or not hasattr(final, "classes_") else {id(final): {"zipmap": False}}
    return skl2onnx.to_onnx(
        estimator, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3}
    )


@pytest.mark.parametrize("name", SKLEARN)
def test_sklearn_mlp(name):
    pytest.importorskip("skl2onnx")
    estimator, targets, expected = _sklearn_cases()[name]
    proto = _convert(estimator, _fit(estimator, targets))
    assert proto.producer_name == "skl2onnx"
    _check_analysis(proto, expected, [])
    for criterion, ratio in COMPILES:
        _check_compile(proto, proto, criterion, ratio)


def test_sklearn_zipmap_classifier():
    """skl2onnx's default classifier output is a ZipMap: a sequence of {class: probability}
    maps. spa finds and prunes the same groups, and its output runs in onnxruntime."""
    pytest.importorskip("skl2onnx")
    estimator, targets, expected = _sklearn_cases()["classifier"]
    proto = _convert(estimator, _fit(estimator, targets), zipmap=True)
    assert "ZipMap" in [n.op_type for n in proto.graph.node]
    assert sorted(g.channels for g in spa_compiler.inspect(proto).prunable) == expected
    pruned, report = spa_compiler.compile(proto, ratio=0.5, criterion="l1")
    assert report.groups_pruned > 0
    assert report.after["parameters"] < report.before["parameters"]
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    labels, maps = session.run(None, random_feeds(proto, 0))
    assert len(maps) == len(labels) and set(maps[0]) == {0, 1, 2}


def test_sklearn_zipmap_classifier_oracle():
    pytest.importorskip("skl2onnx")
    estimator, targets, _ = _sklearn_cases()["classifier"]
    proto = _convert(estimator, _fit(estimator, targets), zipmap=True)
    assert compile_check(proto, 0.5, 0, criterion="l1") <= TOLERANCE


def test_oracle_tells_zipmap_outputs_with_other_labels_apart():
    """Maps under other class labels are different outputs even where the values agree."""
    pytest.importorskip("skl2onnx")
    estimator, targets, _ = _sklearn_cases()["classifier"]
    proto = _convert(estimator, _fit(estimator, targets), zipmap=True)
    relabeled = onnx.ModelProto()
    relabeled.CopyFrom(proto)
    zipmap = next(n for n in relabeled.graph.node if n.op_type == "ZipMap")
    labels = next(a for a in zipmap.attribute if a.name == "classlabels_int64s")
    labels.ints[:] = [label + 10 for label in labels.ints]
    assert worst_relative_error(proto, proto, 0) == 0.0
    assert worst_relative_error(proto, relabeled, 0) == float("inf")


@pytest.mark.parametrize(
    ("step", "operator"),
    [
        ("preprocessing.StandardScaler", "Scaler"),
        ("preprocessing.Normalizer", "Normalizer"),
        ("preprocessing.Binarizer", "Binarizer"),
        ("impute.SimpleImputer", "Imputer"),
    ],
)
def test_sklearn_pipeline_behind_a_preprocessing_operator(step, operator):
    """skl2onnx writes scikit-learn's preprocessing as ai.onnx.ml operators, most of which
    ONNX's shape inference gives no output shape; spa knows they keep their input's shape, so
    the MLP behind them prunes like the bare one, exactly."""
    pytest.importorskip("skl2onnx")
    import importlib

    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline

    module, name = step.split(".")
    estimator = make_pipeline(
        getattr(importlib.import_module(f"sklearn.{module}"), name)(),
        MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0),
    )
    proto = _convert(estimator, _fit(estimator, "classes"))
    assert proto.graph.node[0].op_type == operator
    assert [g.channels for g in spa_compiler.inspect(proto).prunable] == [16]
    for criterion, ratio in COMPILES:
        _check_compile(proto, proto, criterion, ratio)
