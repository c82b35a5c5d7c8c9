"""The long fuzz run: thousands of random protobuf-level edits of a valid model through
`spa compile` (tests/test_fuzz.py with random seeds); the last model run is kept, so after a
failure it is the minimal failing one.

    python benchmarks/fuzz_long.py [--examples 5000] [--dump /tmp/spa-fuzz-last.onnx]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--dump", default="/tmp/spa-fuzz-last.onnx")
    args = parser.parse_args()
    env = {**os.environ, "SPA_FUZZ_EXAMPLES": str(args.examples), "SPA_FUZZ_RANDOM": "1",
           "SPA_FUZZ_DUMP": args.dump, "TRITON_INTERPRET": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    if done.returncode:
        print(f"fuzz_long: a failure; the minimal failing model is {args.dump}", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
