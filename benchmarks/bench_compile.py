"""Compile time and peak memory: spa vs Torch-Pruning, side by side, in one run.

    python benchmarks/bench_compile.py [--out /tmp/spa-bench] [--models resnet50,bert-base]

Same architectures (benchmarks/bench_analysis.py: ResNet-50 and BERT-base structure and sizes,
random weights), same channel ratio 0.3, L1 magnitude. spa: `spa_compiler.compile` on the
exported ONNX file, validation included, after one warm-up compile of the tiny shipped model
(imports excluded, as torch's import is for Torch-Pruning). Torch-Pruning 1.6: BasePruner with
GroupMagnitudeImportance(p=1) on the torch module (DepGraph build + pruning step), the
classifier / pooler ignored as spa blocks graph outputs. Each measurement runs in a fresh
process so peak resident memory (ru_maxrss) belongs to that job alone.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def _rss_mb() -> float:
    """Current resident memory (libraries loaded, before the measured job)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def spa_job(model: str, out: str) -> dict:
    import resource

    import spa_compiler

    path = pathlib.Path(out) / f"{model}.onnx"
    # Warm up on the tiny shipped model: library imports are not compile time (Torch-Pruning's
    # job likewise imports torch before its clock starts). That includes sympy, which
    # onnxruntime's symbolic shape inference imports and the tiny model does not need.
    import onnxruntime.tools.symbolic_shape_infer  # noqa: F401

    spa_compiler.compile(HERE.parent / "models" / "digits_cnn.onnx", ratio=0.3, criterion="l1")
    baseline = _rss_mb()
    started = time.perf_counter()
    _, report = spa_compiler.compile(path, ratio=0.3, criterion="l1")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "model_mb": path.stat().st_size / 2**20,
        "params_kept": report.after["parameters"] / report.before["parameters"],
        "macs_kept": report.after["macs"] / report.before["macs"],
    }


def torch_pruning_job(model: str, out: str) -> dict:
    import resource

    import torch
    import torch_pruning as tp

    sys.path.insert(0, str(HERE))
    from bench_analysis import BertBase, ResNet50

    torch.manual_seed(0)
    if model == "resnet50":
        module = ResNet50().eval()
        example = torch.randn(1, 3, 224, 224)
        ignored, heads = [module.fc], {}
    else:
        module = BertBase().eval()
        example = (torch.randint(0, 30522, (1, 128)), torch.ones(1, 128, dtype=torch.int64))
        ignored = [module.pool, module.tokens, module.positions]
        heads = {}
        for layer in module.layers:
            for projection in (layer.q, layer.k, layer.v):
                heads[projection] = layer.heads
    before = sum(p.numel() for p in module.parameters())
    baseline = _rss_mb()
    started = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        module,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.3,
        ignored_layers=ignored,
        num_heads=heads,
        prune_num_heads=bool(heads),
        prune_head_dims=False,
    )
    pruner.step()
    seconds = time.perf_counter() - started
    after = sum(p.numel() for p in module.parameters())
    return {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline,
        "params_kept": after / before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/spa-bench")
    parser.add_argument("--models", default="resnet50,bert-base")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = spa_job if args.job == "spa" else torch_pruning_job
        print(json.dumps(job(args.model, args.out)))
        return
    subprocess.run(
        [
            sys.executable,
            str(HERE / "bench_analysis.py"),
            "--out",
            args.out,
            "--repeat",
            "1",
            "--models",
            args.models,
        ],
        check=True,
        capture_output=True,
    )
    rows = []
    for model in args.models.split(","):
        result = {}
        for tool in ("spa", "torch-pruning"):
            done = subprocess.run(
                [sys.executable, __file__, "--job", tool, "--model", model, "--out", args.out],
                capture_output=True,
                text=True,
            )
            lines = done.stdout.strip().splitlines()
            result[tool] = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
            )
        rows.append((model, result))
        spa, torch_pruning = result["spa"], result["torch-pruning"]
        ratio = (
            spa["seconds"] / torch_pruning["seconds"]
            if "seconds" in spa and "seconds" in torch_pruning
            else float("nan")
        )
        print(
            f"{model}: spa {spa} | torch-pruning {torch_pruning} | time ratio {ratio:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
