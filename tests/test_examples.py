"""Every script in examples/ runs as README documents it, in its reduced (--quick) mode."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import onnx
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: pathlib.Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _result(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_prune_before_training(tmp_path):
    result = _result(run_example("prune_before_training.py", "--quick", cwd=tmp_path))
    assert result["epochs"] == 1 and result["criterion"] == "snip"
    assert 0.2 < result["macs_kept"] < 0.3 and 0.2 < result["params_kept"] < 0.3
    assert result["pruned_then_trained"] > 0.3  # one epoch already learns (chance: 0.1)
    assert pathlib.Path(result["plan"]).is_file()


@pytest.mark.parametrize("options", [("--criterion", "l1"), ("--compensate",)])
def test_prune_then_finetune(tmp_path, options):
    stdout = run_example("prune_then_finetune.py", "--quick", *options, cwd=tmp_path)
    result = _result(stdout)
    assert result["epochs"] == result["finetune_epochs"] == 1
    assert result["macs_kept"] < 0.3
    assert all(
        0.0 <= result[k] <= 1.0 for k in ("dense_trained", "pruned", "pruned_then_finetuned")
    )


def test_deploy_onnx(tmp_path):
    stdout = run_example("deploy_onnx.py", "-o", "small.onnx", "--quick", cwd=tmp_path)
    assert "spa bench" in stdout and "small.onnx" in stdout
    onnx.checker.check_model(onnx.load(tmp_path / "small.onnx"), full_check=True)
