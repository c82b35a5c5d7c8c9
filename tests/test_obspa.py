"""OBSPA: the OBS algebra against closed-form least squares, moment estimators, exactness
with compensation over the corpus, determinism, and quality on the shipped digits CNN."""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from architectures import ARCHITECTURES
from oracle import compensation_check, compile_check

import spa_compiler
from spa_compiler import obs
from spa_compiler.obs import Moments

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _layer(seed: int = 0, outputs: int = 6, features: int = 9, samples: int = 400):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((features, features))
    x = rng.standard_normal((samples, features)) @ mixing + rng.standard_normal(features)
    weights = rng.standard_normal((outputs, features))
    return weights, x


def _least_squares_error(weights, hessian, kept) -> float:
    """min over W' of E‖W x − W' x_R‖² = tr(W (H − H_:R H_RR⁻¹ H_R:) Wᵀ)."""
    explained = hessian[:, kept] @ np.linalg.solve(hessian[np.ix_(kept, kept)], hessian[kept, :])
    return float(np.trace(weights @ (hessian - explained) @ weights.T))


def test_refit_is_the_closed_form_least_squares_solution():
    weights, x = _layer()
    hessian = x.T @ x / len(x)
    removed = np.array([1, 4, 5])
    kept = np.setdiff1d(np.arange(9), removed)
    refitted = weights + obs.refit(weights, hessian, removed)
    # Normal equations: W'_R = W H_:R H_RR⁻¹, i.e. the least-squares fit of W x on x_R.
    expected = np.linalg.solve(hessian[np.ix_(kept, kept)], hessian[kept, :] @ weights.T).T
    np.testing.assert_allclose(refitted[:, kept], expected, rtol=1e-9, atol=1e-9)
    # ... which is also what numpy's least squares gives on the samples themselves.
    direct = np.linalg.lstsq(x[:, kept], x @ weights.T, rcond=None)[0].T
    np.testing.assert_allclose(refitted[:, kept], direct, rtol=1e-7, atol=1e-7)


def test_obs_update_and_error_match_least_squares():
    weights, x = _layer(1)
    hessian = x.T @ x / len(x)
    inverse = np.linalg.inv(hessian)
    removed = np.array([0, 3, 7])
    kept = np.setdiff1d(np.arange(9), removed)
    rows, shrunk, error = obs.remove_features(weights, inverse, removed)
    refitted = weights + obs.refit(weights, hessian, removed)
    np.testing.assert_allclose(rows[:, kept], refitted[:, kept], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(rows[:, removed], 0.0, atol=1e-12)
    assert error == pytest.approx(_least_squares_error(weights, hessian, kept), rel=1e-8)
    # the downdated inverse is the inverse of the kept features' H
    np.testing.assert_allclose(
        shrunk[np.ix_(kept, kept)], np.linalg.inv(hessian[np.ix_(kept, kept)]), rtol=1e-8
    )


def test_block_errors_equal_the_error_of_removing_each_block():
    weights, x = _layer(2, features=8)
    hessian = x.T @ x / len(x)
    blocks = np.arange(8).reshape(4, 2)
    errors = obs.block_errors(weights, np.linalg.inv(hessian), blocks)
    for channel, block in enumerate(blocks):
        kept = np.setdiff1d(np.arange(8), block)
        assert errors[channel] == pytest.approx(_least_squares_error(weights, hessian, kept))


def test_greedy_order_one_channel_at_a_time_is_the_least_squares_greedy():
    weights, x = _layer(3, features=7)
    hessian = x.T @ x / len(x)
    layer = obs.Layer(weights, np.linalg.inv(hessian), np.arange(7)[:, None], 1.0)
    scores = obs.removal_scores([layer], 7, steps=7)
    removed: list[int] = []
    for _ in range(6):  # naive greedy: each step removes the channel whose loss is least
        candidates = [c for c in range(7) if c not in removed]
        losses = [
            _least_squares_error(weights, hessian, [k for k in candidates if k != c])
            for c in candidates
        ]
        removed.append(candidates[int(np.argmin(losses))])
    assert list(np.argsort(scores)[:6]) == removed


def test_bias_compensation_keeps_the_output_mean():
    """With a bias, least squares moves the removed channels' mean contribution into it
    (FLAP's compensation): the mean output is unchanged."""
    weights, x = _layer(4)
    bias = np.random.default_rng(4).standard_normal(6)
    stats = Moments.empty(9)
    stats.add(x)
    hessian = stats.hessian(with_bias=True, damping=0.0)
    removed = np.array([2, 6])
    rows = np.hstack([weights, bias[:, None]])
    refitted = rows + obs.refit(rows, hessian, removed)
    kept = np.setdiff1d(np.arange(9), removed)
    before = x @ weights.T + bias
    after = x[:, kept] @ refitted[:, kept].T + refitted[:, 9]
    np.testing.assert_allclose(after.mean(axis=0), before.mean(axis=0), rtol=1e-4, atol=1e-4)
    plain = x[:, kept] @ weights[:, kept].T + bias
    assert np.mean((after - before) ** 2) < np.mean((plain - before) ** 2)


def test_moments_accumulate_in_parts():
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 5)) for n in (30, 7, 50)]
    stats = Moments.empty(5)
    for part in parts[:2]:
        stats.add(part)
    stats.hessian(False)  # folds the pending sum; later parts still add
    stats.add(parts[2])
    every = np.vstack(parts)
    np.testing.assert_allclose(stats.hessian(False, 0.0), every.T @ every / 87, rtol=1e-5)
    np.testing.assert_allclose(stats.hessian(True, 0.0)[:5, 5], every.mean(axis=0), rtol=1e-6)


CASES = [(arch, 0.6, 0) for arch in ARCHITECTURES] + [(arch, 0.95, 1) for arch in ARCHITECTURES]


@pytest.mark.parametrize(("arch", "ratio", "seed"), CASES, ids=[f"{a}-{r}" for a, r, _ in CASES])
def test_compensation_keeps_the_exactness_oracle(exported_model, arch, ratio, seed):
    """Zero the removed channels' consumer weights: refitting on the kept channels must then
    change nothing, whichever channels a plan removes (here: random plans)."""
    path = exported_model(arch, "legacy17")
    assert compensation_check(path, ratio, seed) <= 1e-4


@pytest.mark.parametrize("name", ["resnet_tiny", "bert_tiny", "mobilenet_tiny"])
@pytest.mark.parametrize("moments", ["synthetic", "model"])
def test_obspa_plans_are_exact_without_compensation(name, moments):
    path = MODELS / f"{name}.onnx"
    assert compile_check(path, 0.5, 0, criterion="obspa", moments=moments, compensate=False) <= 1e-4


@pytest.mark.parametrize("name", ["resnet_tiny", "bert_tiny", "mobilenet_tiny"])
def test_obspa_refits_every_linear_consumer(name):
    _, report = spa_compiler.compile(MODELS / f"{name}.onnx", ratio=0.3, criterion="obspa")
    stats = report.statistics
    assert stats["source"] == "synthetic"
    assert stats["layers"] > 0 and stats["covered"] == stats["layers"]
    assert stats["refitted"] == stats["layers"]


def test_model_moments_cover_convolutions_and_embeddings():
    for name in ("resnet_tiny", "mobilenet_tiny"):
        _, report = spa_compiler.compile(
            MODELS / f"{name}.onnx", ratio=0.3, criterion="obspa", moments="model"
        )
        assert report.statistics["covered"] == report.statistics["layers"]
    _, report = spa_compiler.compile(
        MODELS / "bert_tiny.onnx", ratio=0.3, criterion="obspa", moments="model"
    )
    assert report.statistics["covered"] >= report.statistics["layers"] // 2


def _digest(path: pathlib.Path, *options: str, env: dict | None = None) -> str:
    out = path.parent / f"out-{len(options)}-{hashlib.sha1(str(env).encode()).hexdigest()[:6]}"
    command = [sys.executable, "-m", "spa_compiler", "compile", str(MODELS / "bert_tiny.onnx")]
    subprocess.run([*command, "-o", str(out), *options], check=True, env=env, capture_output=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_obspa_output_is_byte_identical_across_runs_and_hash_seeds(tmp_path):
    import os

    options = ("--ratio", "0.4", "--criterion", "obspa")
    first = _digest(tmp_path / "a", *options, env={**os.environ, "PYTHONHASHSEED": "1"})
    second = _digest(tmp_path / "a", *options, env={**os.environ, "PYTHONHASHSEED": "2"})
    assert first == second


def _digits():
    sys.path.insert(0, str(MODELS))
    from make_digits_cnn import data

    return data()


def _accuracy(proto, images, labels) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"image": images})[0].argmax(1) == labels).mean())


def test_obspa_beats_magnitude_on_the_digits_cnn(tmp_path):
    """Real data: the shipped CNN on scikit-learn's digits, half the channels removed."""
    train, images, _, labels = _digits()
    l1, _ = spa_compiler.compile(MODELS / "digits_cnn.onnx", ratio=0.5, criterion="l1")
    free, _ = spa_compiler.compile(MODELS / "digits_cnn.onnx", ratio=0.5, criterion="obspa")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, image=train[:128])
    calibrated, report = spa_compiler.compile(
        MODELS / "digits_cnn.onnx", ratio=0.5, criterion="obspa", calibration=calibration
    )
    assert report.statistics["source"] == "calibration"
    scores = [_accuracy(p, images, labels) for p in (l1, free, calibrated)]
    assert scores[1] > scores[0] + 0.2
    assert scores[2] >= scores[1] - 0.01


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)])
def test_compensation_moves_the_mean_into_a_gemm_bias(tmp_path, alpha, beta):
    """Calibrated on the very inputs it is measured on, least squares with a bias keeps
    every output's mean; Gemm's alpha and beta scale the bias shift."""
    import onnx
    from builder import GraphBuilder
    from oracle import run

    b = GraphBuilder()
    x = b.input("x", ["n", 16])
    hidden = b.op("Relu", [b.op("Gemm", [x, b.weight("w1", [16, 32]), b.weight("b1", [32])])])
    b.output(
        b.op("Gemm", [hidden, b.weight("w2", [32, 8]), b.weight("b2", [8])], alpha=alpha, beta=beta)
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(b.model(), path)
    samples = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32) + 0.5
    np.savez(tmp_path / "calib.npz", x=samples)
    plain, _ = spa_compiler.compile(path, ratio=0.5, criterion="obspa", compensate=False,
                                    calibration=tmp_path / "calib.npz")  # fmt: skip
    compensated, report = spa_compiler.compile(
        path, ratio=0.5, criterion="obspa", calibration=tmp_path / "calib.npz"
    )
    assert report.statistics["biases"] == 1
    dense = run(onnx.load(path), {"x": samples})[0]
    without = run(plain, {"x": samples})[0]
    with_ = run(compensated, {"x": samples})[0]
    np.testing.assert_allclose(with_.mean(axis=0), dense.mean(axis=0), atol=2e-2)
    assert np.mean((with_ - dense) ** 2) < np.mean((without - dense) ** 2)


def test_wide_activations_keep_a_block_diagonal_hessian(monkeypatch):
    monkeypatch.setattr(obs, "BLOCK", 4)
    x = np.random.default_rng(6).standard_normal((300, 10)) + 1.0
    stats = Moments.empty(10)
    stats.add(x)
    hessian = stats.hessian(with_bias=True)
    mean = x.mean(axis=0)
    np.testing.assert_allclose(hessian[:4, 4:8], np.outer(mean[:4], mean[4:8]), rtol=1e-6)
    np.testing.assert_allclose(stats.inverse(with_bias=True) @ hessian, np.eye(11), atol=1e-10)
    plain = stats.hessian(with_bias=False)
    np.testing.assert_allclose(stats.inverse(with_bias=False) @ plain, np.eye(10), atol=1e-10)
    # the covariance is block-diagonal, the means' outer product is kept: H stays positive
    # definite with the bias border (dropping μ_b μ_cᵀ across blocks made it indefinite)
    assert np.linalg.eigvalsh(hessian).min() > 0


def test_synthetic_inputs_follow_the_declared_input_range():
    import onnx
    from spa_compiler.passes.estimate_moments import synthetic_feeds

    path = MODELS / "digits_cnn.onnx"
    graph = spa_compiler.load(path).graph
    default = next(synthetic_feeds(onnx.load(path), graph, batches=1))["image"]
    assert abs(float(default.mean())) < 0.2 and abs(float(default.std()) - 1.0) < 0.2
    pixels = next(synthetic_feeds(onnx.load(path), graph, batches=1, input_range=(0.0, 1.0)))
    assert pixels["image"].min() >= 0.0 and pixels["image"].max() <= 1.0
    assert pixels["image"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize("value", ["1,0", "a,b", "0,inf", "3"])
def test_a_bad_input_range_is_refused(tmp_path, value):
    done = subprocess.run(
        [sys.executable, "-m", "spa_compiler", "compile", str(MODELS / "digits_cnn.onnx"),
         "--criterion", "obspa", "--input-range", value, "-o", str(tmp_path / "out.onnx")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--input-range" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out.onnx").exists()


def _mlp(path, first_op: str | None = None, names: bool = True) -> pathlib.Path:
    import onnx
    from builder import GraphBuilder

    b = GraphBuilder()
    x = b.input("x", ["n", 16])
    source = b.op(first_op, [x]) if first_op else x
    gemm = b.op("Gemm", [source, b.weight("w1", [16, 32]), b.weight("b1", [32])])
    b.output(b.op("Gemm", [b.op("Relu", [gemm]), b.weight("w2", [32, 8]), b.weight("b2", [8])]))
    proto = b.model()
    if not names:
        for node in proto.graph.node:
            node.name = ""
    onnx.save(proto, path)
    return path


def test_non_finite_activations_never_reach_the_weights(tmp_path):
    """Log of standard-normal synthetic inputs is NaN for half of them: those samples are
    dropped, and a compensation that would not be finite is not applied."""
    path = _mlp(tmp_path / "log.onnx", first_op="Log")
    assert compensation_check(path, 0.5, 0) <= 1e-4
    pruned, _ = spa_compiler.compile(path, ratio=0.5, criterion="obspa")
    import onnx

    for tensor in pruned.graph.initializer:
        assert np.isfinite(onnx.numpy_helper.to_array(tensor)).all(), tensor.name


def test_unnamed_nodes_are_scored_and_refitted(tmp_path):
    path = _mlp(tmp_path / "unnamed.onnx", names=False)
    _, report = spa_compiler.compile(path, ratio=0.5, criterion="obspa")
    assert report.statistics["layers"] == 1 and report.statistics["refitted"] == 1


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.full((8, 16), np.nan, np.float32)}, "inf or NaN"),
        ({"x": np.array([["a"] * 16] * 8)}, "the input takes"),
        ({"x": np.zeros((0, 16), np.float32)}, "non-empty first axis"),
    ],
)
def test_bad_calibration_arrays_are_refused(tmp_path, arrays, message):
    path = _mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(spa_compiler.BadInputError, match=message):
        spa_compiler.compile(path, ratio=0.5, criterion="obspa", calibration=tmp_path / "calib.npz")


def test_calibration_with_a_magnitude_criterion_is_ignored_with_a_warning(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 16), np.float32))
    _, report = spa_compiler.compile(
        path, ratio=0.5, criterion="l1", calibration=tmp_path / "calib.npz"
    )
    assert report.statistics is None
    assert any("--calib is used by obspa" in w for w in report.warnings)
