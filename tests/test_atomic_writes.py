"""Outputs are all or nothing: killing `spa compile` at any moment never leaves a truncated
model or external-data file at the output paths, and the same input gives the same bytes
whatever Python's hash seed."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"


def _llama(folder: pathlib.Path, *sizes: int) -> pathlib.Path:
    """models/make_llama.py's model of ``sizes`` saved in ``folder``, in external data."""
    spec = importlib.util.spec_from_file_location("make_llama", MODELS / "make_llama.py")
    make_llama = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_llama)
    path = folder / "llama.onnx"
    make_llama.save(make_llama.build(*sizes), path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> pathlib.Path:
    return _llama(tmp_path_factory.mktemp("llama"), 512, 3, 8, 8, 1536, 4000)  # ~45 MB


def _command(model: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "spa_compiler", "compile", str(model), "--ratio", "0.3",
            "--criterion", "l1", "--external-data", "always", "-o", str(out)]  # fmt: skip


@pytest.mark.parametrize("delay", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_a_killed_compile_leaves_nothing_half_written(llama, tmp_path, delay):
    out = tmp_path / "out.onnx"
    process = subprocess.Popen(_command(llama, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if out.exists():  # the rename happened: the model and the data it names are complete
        onnx.checker.check_model(str(out), full_check=True)
        session = ort.InferenceSession(str(out))
        logits = session.run(None, {"input_ids": np.array([[1, 2]], dtype=np.int64)})[0]
        assert logits.shape == (1, 2, 4000)
    # Otherwise nothing is at the output path; a data file renamed just before the kill may
    # stand alone (the model is renamed last, so it never names missing data).


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> pathlib.Path:
    return _llama(tmp_path_factory.mktemp("small"), 256, 2, 4, 4, 768, 2000)  # ~11 MB


def _every_output(model: pathlib.Path, folder: pathlib.Path) -> tuple[list[str], dict]:
    names = ("out.onnx", "out.onnx.data", "plan.json", "report.json", "w.npz")
    paths = {name: folder / name for name in names}
    command = [*_command(model, paths["out.onnx"]), "--nm", "2:4",
               "--save-plan", str(paths["plan.json"]), "--report", str(paths["report.json"]),
               "--export-compressed", str(paths["w.npz"])]  # fmt: skip
    return command, paths


def _kill_when(command: list[str], folder: pathlib.Path, prefix: str) -> None:
    """Run ``command`` and SIGKILL it the moment a file named ``prefix``... appears."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            if any(name.startswith(prefix) for name in os.listdir(folder)):
                break
            time.sleep(0.0005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


# The plan, report and archive are written after the model, one after the other: each kill
# lands at the start of one of those writes (its temporary file just created).
@pytest.fixture(scope="module")
def every_output(small_llama, tmp_path_factory) -> dict[str, bytes]:
    command, paths = _every_output(small_llama, tmp_path_factory.mktemp("full"))
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.mark.parametrize("trigger", ["out.onnx", ".plan.json.", ".report.json.", ".w.npz."])
def test_a_killed_compile_leaves_no_half_written_plan_report_or_archive(
    small_llama, every_output, tmp_path, trigger
):
    expected = every_output
    (tmp_path / "killed").mkdir()
    command, paths = _every_output(small_llama, tmp_path / "killed")
    _kill_when(command, tmp_path / "killed", trigger)
    for name, path in paths.items():  # each output whole (as a full run writes it) or absent
        if name == "report.json" and path.exists():  # it holds timings: whole, not identical
            assert json.loads(path.read_text()).keys() == json.loads(expected[name]).keys()
        elif path.exists():
            assert path.read_bytes() == expected[name], name


def test_external_data_output_is_identical_across_hash_seeds(llama, tmp_path):
    outputs = []
    for seed in ("0", "1", "12345"):
        out = tmp_path / seed / "out.onnx"
        out.parent.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(_command(llama, out), capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        outputs.append((out.read_bytes(), (out.parent / "out.onnx.data").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]
