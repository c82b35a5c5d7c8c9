"""Broken files from a real model: truncated at random offsets and with flipped bits. Every
case ends in success or a documented exit code with one line on stderr — never a traceback
or an internal error — the input stays as it was and a failure leaves no output."""

from __future__ import annotations

import contextlib
import io
import pathlib
import random

import onnx
import pytest

from spa_compiler.cli import main

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
SOURCE = (MODELS / "digits_cnn.onnx").read_bytes()


def _cases() -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    cases = [(f"truncated-{i}", SOURCE[: rng.randrange(1, len(SOURCE))]) for i in range(40)]
    for i in range(60):
        data = bytearray(SOURCE)
        for _ in range(rng.choice([1, 2, 8])):
            # half the flips land in the first 4 KB, where the graph's structure lives
            position = rng.randrange(0, 4096 if i % 2 else len(SOURCE))
            data[position] ^= 1 << rng.randrange(8)
        cases.append((f"flipped-{i}", bytes(data)))
    return cases


CASES = _cases()


def _compile(path: pathlib.Path, out: pathlib.Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["compile", str(path), "--criterion", "l1", "--ratio", "0.3", "-o", str(out)])
    return code, err.getvalue()


@pytest.mark.parametrize(("name", "data"), CASES, ids=[name for name, _ in CASES])
def test_a_broken_file_never_crashes_spa(tmp_path, name, data):
    path, out = tmp_path / f"{name}.onnx", tmp_path / "out.onnx"
    path.write_bytes(data)
    code, stderr = _compile(path, out)
    assert code in (0, 2, 3), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert path.read_bytes() == data
    if code == 2:
        assert not out.exists() and len(stderr.strip().splitlines()) == 1


def test_a_convolution_whose_output_size_goes_negative_is_bad_input(tmp_path):
    """A dilation of 17 on 8x8 images: the input is inconsistent, not the rewrite (exit 2)."""
    proto = onnx.load(MODELS / "digits_cnn.onnx")
    for attribute in proto.graph.node[0].attribute:
        if attribute.name == "dilations":
            attribute.ints[:] = [1, 17]
    path = tmp_path / "dilated.onnx"
    onnx.save(proto, path)
    code, stderr = _compile(path, tmp_path / "out.onnx")
    assert code == 2 and "shape inference" in stderr
