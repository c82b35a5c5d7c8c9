"""Criteria that need no trained weights (prune before training): ``snip`` against autograd,
under the exactness oracle, deterministic per seed, on untrained models; ``random`` seeded."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from oracle import compile_check, random_feeds
from torch import nn

import spa_compiler
from spa_compiler import obs
from spa_compiler.frameworks.torch import apply_plan

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
sys.path.insert(0, str(MODELS))
from make_digits_cnn import DigitsCNN  # noqa: E402


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 5)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


def _export(net: nn.Module, example: torch.Tensor, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (example,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return str(path)


def _autograd_snip(net: _Mlp, samples: np.ndarray) -> np.ndarray:
    """|m · ∂L/∂m| at m = 1 for a mask on fc2's input, L = ½ mean ‖W₂ (m ⊙ h)‖²."""
    mask = torch.ones(12, dtype=torch.float64, requires_grad=True)
    hidden = net.hidden(torch.from_numpy(samples)).double().detach()
    outputs = (hidden * mask) @ net.fc2.weight.double().detach().T
    loss = 0.5 * outputs.square().sum(dim=1).mean()
    loss.backward()
    return (mask * mask.grad).abs().detach().numpy()


@pytest.mark.parametrize("block", [None, 5])
def test_snip_scores_are_the_mask_gradient_autograd_gives(tmp_path, monkeypatch, block):
    """Calibrated on real samples, spa's snip score of each hidden channel is exactly the
    saliency torch's autograd computes for the layer-local loss (normalized by the mean)."""
    torch.manual_seed(0)
    net = _Mlp()
    path = _export(net, torch.zeros(1, 6), tmp_path / "mlp.onnx")
    samples = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=samples)
    if block is not None:  # wide-activation path: H kept block-diagonal, as for OBSPA
        monkeypatch.setattr(obs, "BLOCK", block)
    _, report = spa_compiler.compile(
        path, ratio=0.25, criterion="snip", calibration=tmp_path / "calib.npz", round_to=1
    )
    (planned,) = [
        g for g in report.plan.groups if any(m["tensor"] == "fc2.weight" for m in g.members)
    ]
    expected = _autograd_snip(net, samples) if block is None else None
    if block is not None:
        hidden = net.hidden(torch.from_numpy(samples)).double().detach().numpy()
        second = hidden.T @ hidden / len(hidden)
        inside = np.zeros_like(second)
        for start in range(0, 12, block):
            part = slice(start, start + block)
            inside[part, part] = second[part, part]
        weight = net.fc2.weight.double().detach().numpy()
        expected = np.abs(np.einsum("rn,rn->n", weight, weight @ inside))
    np.testing.assert_allclose(planned.scores, expected / expected.mean(), rtol=1e-4)
    assert report.statistics is not None and report.statistics.get("refitted", 0) == 0


@pytest.mark.parametrize("name", ["resnet_tiny", "bert_tiny", "mobilenet_tiny", "digits_cnn"])
def test_snip_plans_are_exact(name):
    assert compile_check(MODELS / f"{name}.onnx", 0.5, 0, criterion="snip") <= 1e-4


def test_snip_global_ranking_is_exact():
    path = MODELS / "resnet_tiny.onnx"
    assert compile_check(path, 0.4, 0, criterion="snip", global_ranking=True) <= 1e-4


@pytest.mark.parametrize("criterion", ["snip", "random"])
def test_seed_determines_the_plan(criterion):
    path = MODELS / "resnet_tiny.onnx"
    first, report = spa_compiler.compile(path, ratio=0.4, criterion=criterion, seed=3)
    again, _ = spa_compiler.compile(path, ratio=0.4, criterion=criterion, seed=3)
    assert first.SerializeToString() == again.SerializeToString()
    _, other = spa_compiler.compile(path, ratio=0.4, criterion=criterion, seed=4)
    scores = [g.scores for g in report.plan.groups]
    assert scores != [g.scores for g in other.plan.groups]  # the seed is really used


def test_snip_prunes_an_untrained_model_that_torch_then_matches(tmp_path):
    """Pruning before training: a randomly initialised CNN, snip, no compensation; the torch
    module sliced by the plan computes what the pruned ONNX model computes."""
    torch.manual_seed(1)
    net = DigitsCNN()
    path = _export(net, torch.zeros(1, 1, 8, 8), tmp_path / "untrained.onnx")
    pruned, report = spa_compiler.compile(path, ratio=0.5, criterion="snip", input_range=(0, 1))
    assert report.statistics["covered"] == report.statistics["layers"] > 0
    assert report.statistics.get("refitted", 0) == 0  # nothing refitted unless asked
    assert report.after["macs"] < 0.5 * report.before["macs"]
    apply_plan(net, report.plan, model=path)
    feeds = random_feeds(pruned)
    import onnxruntime as ort

    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    with torch.no_grad():
        actual = net.eval()(torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_snip_compensates_only_when_asked():
    path = MODELS / "resnet_tiny.onnx"
    _, report = spa_compiler.compile(path, ratio=0.3, criterion="snip", compensate=True)
    assert report.statistics["refitted"] > 0


def test_cli_takes_snip(tmp_path):
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "spa_compiler", "compile", str(MODELS / "mobilenet_tiny.onnx"),
         "--ratio", "0.3", "--criterion", "snip", "--seed", "2", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(onnx.load(out), full_check=True)
