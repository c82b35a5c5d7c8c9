"""Accuracy of the shipped digits CNN after pruning, per criterion and ratio, no fine-tuning.

obspa runs data-free (synthetic inputs over the model's input range, [0, 1]: pixels / 16),
from the model's parameters alone, and calibrated on 128 training images.

    python benchmarks/bench_digits_quality.py

Uses the held-out quarter of scikit-learn's digits (the split models/make_digits_cnn.py used).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np
import onnxruntime as ort

import spa_compiler

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
from make_digits_cnn import data  # noqa: E402


def accuracy(proto_bytes: bytes, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": images})[0]
    return float((logits.argmax(1) == labels).mean())


def main() -> None:
    train, images, _, labels = data()
    path = ROOT / "models" / "digits_cnn.onnx"
    dense = accuracy(path.read_bytes(), images, labels)
    print(f"dense accuracy {dense:.4f}")
    print("| criterion | ratio | MACs kept | params kept | accuracy |")
    print("|---|---:|---:|---:|---:|")
    calibration = pathlib.Path(tempfile.mkdtemp()) / "digits_calib.npz"
    np.savez(calibration, image=train[:128])  # training images: never the measured ones
    variants = {
        "l1": {"criterion": "l1"},
        "l2": {"criterion": "l2"},
        "random": {"criterion": "random"},
        "obspa": {"criterion": "obspa", "input_range": (0.0, 1.0)},
        "obspa (model moments)": {"criterion": "obspa", "moments": "model", "input_range": (0, 1)},
        "obspa --calib": {"criterion": "obspa", "calibration": calibration},
    }
    for criterion, options in variants.items():
        for ratio in (0.1, 0.2, 0.3, 0.5):
            pruned, report = spa_compiler.compile(path, ratio=ratio, **options)
            kept_macs = report.after["macs"] / report.before["macs"]
            kept_params = report.after["parameters"] / report.before["parameters"]
            value = accuracy(pruned.SerializeToString(), images, labels)
            print(
                f"| {criterion} | {ratio:.1f} | {kept_macs:.3f} | {kept_params:.3f} | {value:.4f} |"
            )


if __name__ == "__main__":
    main()
