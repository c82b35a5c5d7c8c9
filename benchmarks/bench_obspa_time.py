"""OBSPA compile time on ResNet-50 and BERT-base (goal on a 2-core machine: ≤ 30 s / ≤ 60 s).

    python benchmarks/bench_obspa_time.py [--out /tmp/spa-bench] [--moments synthetic,model]

Same models as benchmarks/bench_analysis.py (real layer structure and sizes, random weights),
ratio 0.3, ``--criterion obspa``: second moments, greedy OBS scores, least-squares
compensation, rewrite and validation. Each compile runs in a fresh process; prints the total,
the slowest passes and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def job(path: str, moments: str) -> dict:
    import resource

    import spa_compiler

    started = time.perf_counter()
    _, report = spa_compiler.compile(path, ratio=0.3, criterion="obspa", moments=moments)
    return {
        "seconds": time.perf_counter() - started,
        "passes": {name: round(seconds, 2) for name, seconds in report.passes},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "statistics": report.statistics,
        "macs_kept": report.after["macs"] / report.before["macs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/spa-bench")
    parser.add_argument("--models", default="resnet50,bert-base")
    parser.add_argument("--moments", default="synthetic,model")
    parser.add_argument("--job", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(*args.job)))
        return
    export = [sys.executable, str(HERE / "bench_analysis.py"), "--out", args.out]
    subprocess.run([*export, "--repeat", "1", "--models", args.models], check=True)
    for model in args.models.split(","):
        for moments in args.moments.split(","):
            path = str(pathlib.Path(args.out) / f"{model}.onnx")
            done = subprocess.run(
                [sys.executable, __file__, "--job", path, moments],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            slowest = sorted(result["passes"].items(), key=lambda item: -item[1])[:4]
            print(
                f"{model} obspa/{moments}: {result['seconds']:.1f} s, peak "
                f"{result['peak_rss_mb']:.0f} MB, MACs kept {result['macs_kept']:.3f}; "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in slowest),
                flush=True,
            )


if __name__ == "__main__":
    main()
