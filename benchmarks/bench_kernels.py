"""All GPU checks and timings of the Triton N:M kernels in one go (one short GPU session):
correctness against float64 (fp16/bf16, 2:4/4:8, each product path, ragged shapes, bias+GELU,
poisoned outputs), then — with ``--sweep-budget`` — a coordinate-descent search for the
sparse kernel's best blocks at the decode shapes (``kernels/tune.py``) and the expansion
kernel's blocks, then timings in priority order — the issue's fp16 2:4 grid first — saved
after every shape so a cut-off run keeps what it measured, then a model's matmul shapes.

    python benchmarks/bench_kernels.py --out results/ [--model llama.onnx] [--budget 420]
        [--sweep-budget 150]

Writes kernels.json, kernels.png and kernels.txt (the table) into --out; exits 1 if a
correctness check fails, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
from spa_compiler.kernels import benchmark, nm_matmul

from spa_compiler.io import write_atomic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--model", help="an ONNX model whose Gemm/MatMul shapes to time")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds for the timings (after the search)"
    )
    parser.add_argument("--quick", action="store_true", help="the fp16 2:4 grid only")
    parser.add_argument(
        "--sweep-budget",
        type=float,
        default=0.0,
        help="seconds for searching the sparse kernel's blocks at decode shapes (0: none)",
    )
    parser.add_argument(
        "--timing",
        choices=["graph", "eager"],
        default="graph",
        help="CUDA-graph replays (device time) or eager Python launches",
    )
    args = parser.parse_args()
    try:
        benchmark.require_gpu()
    except benchmark.NoGPUError as error:
        print(f"bench_kernels: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(data: dict) -> None:
        data["seconds"] = time.perf_counter() - started
        write_atomic(
            args.out / "kernels.json", (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
        )

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    def extra(what: str, function, *args, **kwargs):
        """A search is an extra: its failure is logged and recorded, never the end of the run
        (the issue's table comes after it)."""
        try:
            return function(*args, **kwargs)
        except Exception as error:
            log(f"{what} failed: {type(error).__name__}: {error}")
            data.setdefault("extra_failures", []).append(f"{what}: {type(error).__name__}")
            return None
        finally:
            torch.cuda.empty_cache()

    checks = benchmark.gpu_correctness()
    failed = [c for c in checks if not c["ok"]]
    worst = max(c["relative_error"] for c in checks)
    log(f"correctness: {len(checks) - len(failed)}/{len(checks)} ok, worst error {worst:.2e}")
    for check in failed:
        log(f"FAILED {check}")
    data = benchmark.run(m_values=(), sizes=(), log=log, timing=args.timing)  # device, versions
    data["correctness"] = checks
    save(data)

    if args.sweep_budget > 0:
        # fp16 2:4 at the memory-bound shapes, the target first
        targets = [(1, 8192, 8192), (16, 8192, 8192), (4, 8192, 8192), (1, 4096, 4096)]
        data["sweep"] = []
        sweep_started = time.perf_counter()
        for index, (m, n, k) in enumerate(targets):
            left = args.sweep_budget - (time.perf_counter() - sweep_started)
            if left <= 5:
                break
            share = left / (len(targets) - index) if index else left * 0.4
            searched = extra(
                f"sweep M={m} N={n} K={k}", benchmark.sweep, m, n, k, budget_s=share, log=log,
                copy_bandwidth=data["copy_bandwidth_bytes_per_s"],
            )  # fmt: skip
            if searched is not None:
                data["sweep"].append(searched)
                log(benchmark.sweep_text(searched, data["copy_bandwidth_bytes_per_s"]))
            save(data)
        data["sweep_decompress"] = (
            extra("decompress blocks", benchmark.sweep_decompress, 8192, 8192, log=log) or []
        )
        timed = [r for r in data["sweep_decompress"] if "microseconds" in r]
        if timed:  # the large-M runs below expand with the fastest blocks found
            fastest = min(timed, key=lambda r: r["microseconds"])
            nm_matmul.DECOMPRESS_BLOCKS = tuple(fastest["blocks"])
            log(f"decompress blocks {nm_matmul.DECOMPRESS_BLOCKS} from now on")
        data["sweep_chunks"] = [
            extra(f"chunked expand {size}", benchmark.sweep_chunks, 4096, size, size, log=log)
            for size in (8192, 4096)
        ]
        save(data)

    # The timings' budget starts here (after the checks and the search): the issue's fp16 2:4
    # grid first, then the model's shapes, then 4:8 and bf16.
    timings_started = time.perf_counter()

    def within_budget() -> bool:
        return time.perf_counter() - timings_started < args.budget

    grid_m = (1, 4, 16, 64, 256, 4096)
    first = [(m, s, s, "fp16", (2, 4)) for s in (8192, 4096) for m in grid_m]
    rest = [] if args.quick else [(m, s, s, "fp16", (4, 8)) for s in (8192, 4096) for m in grid_m]
    rest += [] if args.quick else [(m, 8192, 8192, "bf16", (2, 4)) for m in (1, 16, 4096)]

    def time_jobs(jobs) -> None:
        for m, n, k, dtype, pattern in jobs:
            if not within_budget():
                data["skipped"].append([m, n, k, dtype, f"{pattern[0]}:{pattern[1]}", "budget"])
                continue
            measured = benchmark.time_shape(m, n, k, dtype, pattern, timing=args.timing)
            data["shapes"].append(measured.to_json())
            log(benchmark._row_text(measured))
            save(data)

    time_jobs(first)
    if args.model and within_budget():
        data["model"] = benchmark._model_estimate(
            args.model, (1, 16, 256), "fp16", (2, 4), log, args.timing
        )
        save(data)
    time_jobs(rest)
    data["tuned"] = benchmark._tuned()
    save(data)
    table = benchmark.table(data)
    if data.get("sweep"):
        copy = data["copy_bandwidth_bytes_per_s"]
        table += "\n\nsweep (fp16 2:4):\n" + "\n".join(
            benchmark.sweep_text(row, copy) for row in data["sweep"]
        )
    print(table)
    write_atomic(args.out / "kernels.txt", (table + "\n").encode())
    write_atomic(args.out / "kernels.png", benchmark.plot(data))
    log(f"done; GPU memory peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
