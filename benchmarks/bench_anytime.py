"""Accuracy of the digits CNN pruned before training and pruned after training then
fine-tuned, over criteria and seeds: runs the two examples and tabulates their JSON.

    python benchmarks/bench_anytime.py [--seeds 0,1,2] [--jobs 2]

Each run is one example process (seeded, single-threaded); ``--jobs`` runs that many at once.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
BEFORE = [("snip", 0.5), ("random", 0.5), ("snip", 0.75), ("random", 0.75)]
AFTER = [("obspa", 0.5), ("l1", 0.5), ("snip", 0.5), ("random", 0.5)]


def run(script: str, criterion: str, ratio: float, seed: int) -> dict:
    command = [sys.executable, str(EXAMPLES / script), "--criterion", criterion]
    command += ["--ratio", str(ratio), "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [("prune_before_training.py", c, r, s) for c, r in BEFORE for s in seeds]
    jobs += [("prune_then_finetune.py", c, r, s) for c, r in AFTER for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    for result in results:
        print(json.dumps(result))
    rows: dict[tuple, list[dict]] = {}
    for (script, criterion, ratio, _), result in zip(jobs, results, strict=True):
        rows.setdefault((script, criterion, ratio), []).append(result)
    print(
        "| path | criterion | ratio | params kept | MACs kept | dense | pruned | after training |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (script, criterion, ratio), group in rows.items():
        before = script.startswith("prune_before")
        final = "pruned_then_trained" if before else "pruned_then_finetuned"
        pruned = "—" if before else spread([r["pruned"] for r in group])
        print(
            f"| {script.removesuffix('.py')} | {criterion} | {ratio} | "
            f"{group[0]['params_kept']:.3f} | {group[0]['macs_kept']:.3f} | "
            f"{spread([r['dense_trained'] for r in group])} | {pruned} | "
            f"{spread([r[final] for r in group])} |"
        )


if __name__ == "__main__":
    main()
