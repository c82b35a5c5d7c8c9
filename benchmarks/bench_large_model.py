"""Peak memory of `spa compile` on a Llama-style model above 2 GB in external data.

    python benchmarks/bench_large_model.py [--dir /tmp/spa-large] [--criteria l1,obspa]

Generates the model once (models/make_llama.py: hidden 2048, 9 layers, FFN 5632, vocab 32000,
fp32 = 2.37 GB of weights), then runs `spa compile --ratio 0.3` per criterion in a child
process and reports its peak resident memory (the child's ru_maxrss) against the weight bytes.
Goal (issue `spa bench`): peak ≤ 2.5 × the weight bytes, output saved with external data.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = ["--hidden", "2048", "--layers", "9", "--heads", "16", "--ffn", "5632", "--vocab", "32000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/spa-large"))
    parser.add_argument("--criteria", default="l1,obspa")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / "llama.onnx"
    if not model.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "make_llama.py"), str(model),
                        *SIZES], check=True)  # fmt: skip
    weights = (args.dir / "llama.onnx.data").stat().st_size
    print(f"model: {model} ({weights / 1e9:.2f} GB of weights in external data)")
    for criterion in args.criteria.split(","):
        out = args.dir / f"out.{criterion}.onnx"
        command = [sys.executable, "-m", "spa_compiler", "compile", str(model), "--ratio", "0.3",
                   "--criterion", criterion, "-o", str(out)]  # fmt: skip
        started = time.perf_counter()
        # A fresh intermediary per run: RUSAGE_CHILDREN's peak then covers this compile alone.
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(f"{criterion}: failed ({done.returncode}): {done.stderr.strip()}")
            continue
        peak = int(done.stdout.strip().splitlines()[-1])
        data = out.with_name(out.name + ".data")
        print(f"{criterion}: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB = "
              f"{peak / weights:.2f}x the weights; output {data.stat().st_size / 1e9:.2f} GB in "
              f"{data.name}")  # fmt: skip


MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True)
if done.returncode:
    sys.stderr.write(done.stderr.decode())
    sys.exit(done.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


if __name__ == "__main__":
    main()
