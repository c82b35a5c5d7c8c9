"""spa bench: interleaved timing in real onnxruntime sessions, the JSON, compile --bench,
and what it refuses (no GPU here: --device cuda says so)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

import spa_compiler

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
SPA = [sys.executable, "-m", "spa_compiler"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("bench") / "pruned.onnx"
    compiled = [*SPA, "compile", str(MODELS / "digits_cnn.onnx"), "--ratio", "0.5", "-o", str(out)]
    subprocess.run(compiled, check=True, capture_output=True)
    return out


def test_bench_times_models_side_by_side(pruned):
    result = spa_compiler.bench([MODELS / "digits_cnn.onnx", pruned], batches=(1, 4), runs=3)
    assert [(t.batch, pathlib.Path(t.model).name) for t in result.timings] == [
        (1, "digits_cnn.onnx"), (1, "pruned.onnx"), (4, "digits_cnn.onnx"), (4, "pruned.onnx"),
    ]  # fmt: skip
    for timing in result.timings:
        assert 0 < timing.p50_ms <= timing.p90_ms <= timing.p99_ms
        assert timing.throughput > 0 and timing.speedup > 0
    assert result.timings[0].speedup == 1.0
    assert result.macs[1] < result.macs[0] and result.parameters[1] < result.parameters[0]
    assert "speed-up" in result.table()


def test_fixed_batch_sizes_are_skipped_with_a_reason(tmp_path):
    import onnx

    proto = onnx.load(MODELS / "digits_cnn.onnx")
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(proto, path)
    result = spa_compiler.bench([path], batches=(1, 8), runs=2, warmup=0)
    assert [t.batch for t in result.timings] == [1]
    assert result.skipped == ["batch 8: image has a fixed batch of 1"]


def test_cli_json_and_compile_bench(tmp_path, pruned):
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run(
        [*SPA, "bench", str(MODELS / "digits_cnn.onnx"), str(pruned), "--batch", "2",
         "--runs", "3", "--threads", "1", "--json", str(report), "--plot", str(plot)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["threads"] == 1 and len(data["timings"]) == 2
    assert plot.read_bytes().startswith(b"\x89PNG")
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [*SPA, "compile", str(MODELS / "digits_cnn.onnx"), "--ratio", "0.3", "--criterion", "l1",
         "-o", str(out), "--bench"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and "spa bench" in done.stdout and "out.onnx" in done.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--device", "cuda"], "CUDA provider does not work here"),
        (["--batch", "0"], "--batch sizes must be positive"),
        (["--batch", "a"], "--batch takes sizes"),
    ],
)
def test_bench_refuses_what_it_cannot_do(arguments, message):
    done = subprocess.run(
        [*SPA, "bench", str(MODELS / "digits_cnn.onnx"), *arguments],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_bench_refuses_a_file_that_is_not_onnx(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00\x01not a model")
    done = subprocess.run([*SPA, "bench", str(bogus)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "needs a CUDA GPU"),  # this machine has none: the kernel bench says so, exit 2
        (["--nm", "3:4"], "N a power of two"),
        (["--nm", "2:5"], "--nm takes N:M"),
        (["--dtype", "fp8"], "--dtype takes fp16 and/or bf16"),
        (["--shapes", "1x2"], "--shapes takes MxNxK"),
        (["--shapes", "0x8x8"], "--shapes sizes must be positive"),
        (["--m", "1,x"], "--m takes integers"),
        (["--model", "missing.onnx"], "--model missing.onnx: no such file"),
        (["--timing", "wall"], "Invalid value for '--timing'"),
    ],
)
def test_bench_kernels_refuses_what_it_cannot_do(arguments, message):
    pytest.importorskip("torch")
    done = subprocess.run([*SPA, "bench", "kernels", *arguments], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_bench_is_a_group_that_still_takes_model_files_first():
    done = subprocess.run([*SPA, "bench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "kernels" in done.stdout and "models" in done.stdout
