"""Export the shipped tiny models (legacy exporter, opset 17, weights inline).

Usage: ``python models/make_models.py --out models/``. Output bytes are deterministic, so
re-running must leave ``sha256sum models/*.onnx`` unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys

# Run as a plain script: this file's folder is on sys.path, so zoo.py imports directly.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from zoo import SHIPPED, export

SHIPPED_FILES = {
    "resnet_tiny.onnx": "resnet_basic",
    "bert_tiny.onnx": "bert",
    "mobilenet_tiny.onnx": "mobilenet_v2",
}
MAX_BYTES = 1 << 20


def make_models(out: pathlib.Path) -> list[pathlib.Path]:
    """Export every shipped model into ``out``; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, arch_name in SHIPPED_FILES.items():
        path = export(SHIPPED[arch_name], "legacy17", out / filename)
        if path.with_suffix(".onnx.data").exists():
            raise RuntimeError(f"{path} was written with external data; expected inline weights")
        if path.stat().st_size >= MAX_BYTES:
            raise RuntimeError(f"{path} is {path.stat().st_size} bytes; shipped models stay < 1 MB")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = pathlib.Path(__file__).resolve().parent
    parser.add_argument("--out", type=pathlib.Path, default=default_out, help="output folder")
    args = parser.parse_args(argv)
    for path in make_models(args.out):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{digest}  {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
