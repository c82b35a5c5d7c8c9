"""Accuracy of the shipped digits CNN after pruning, per criterion and ratio, no fine-tuning.

    python benchmarks/bench_digits_quality.py

Uses the held-out quarter of scikit-learn's digits (the split models/make_digits_cnn.py used).
"""

from __future__ import annotations

import pathlib
import sys

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
    _, images, _, labels = data()
    path = ROOT / "models" / "digits_cnn.onnx"
    dense = accuracy(path.read_bytes(), images, labels)
    print(f"dense accuracy {dense:.4f}")
    print("| criterion | ratio | MACs kept | params kept | accuracy |")
    print("|---|---:|---:|---:|---:|")
    for criterion in ("l1", "l2", "random"):
        for ratio in (0.1, 0.2, 0.3, 0.5):
            pruned, report = spa_compiler.compile(path, ratio=ratio, criterion=criterion)
            kept_macs = report.after["macs"] / report.before["macs"]
            kept_params = report.after["parameters"] / report.before["parameters"]
            value = accuracy(pruned.SerializeToString(), images, labels)
            print(
                f"| {criterion} | {ratio:.1f} | {kept_macs:.3f} | {kept_params:.3f} | {value:.4f} |"
            )


if __name__ == "__main__":
    main()
