"""GPU timing of the N:M kernels against cuBLAS, the dense Triton kernel and torch's 2:4
(``spa bench kernels``), and GPU correctness checks against a float64 reference.

Timing: medians of CUDA-event timings after warm-up, L2 flushed before every call, and every
variant rotating through several copies of its weight (enough to overflow L2 three times) so
that no number is a cache number. ``timing="graph"`` (the default) replays each call from a
CUDA graph, so the number is the device's time; ``"eager"`` launches from Python, which for
kernels of ~20 µs measures Python's launch cost as much as the kernel (seen on an H100:
the same Triton kernel timed 44 and 67 µs eagerly in two runs while cuBLAS, launched from C++,
stayed within 1 %). Bandwidth is counted on the bytes each variant must read and write: weight
(compressed values plus metadata words for N:M), activations and output.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from spa_compiler.errors import PLOT_NEEDS_MATPLOTLIB, BadInputError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("cublas", "triton_dense", "triton_nm", "expand_cublas", "torch_2_4")


class NoGPUError(RuntimeError):
    pass


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise NoGPUError("spa bench kernels needs a CUDA GPU; torch sees none")
    if torch.version.hip:
        raise NoGPUError("spa bench kernels is written for NVIDIA GPUs (torch reports ROCm)")


def _median_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    import triton.testing

    return 1000.0 * float(
        triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    )


def _copies_to_overflow_l2(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(2, min(16, math.ceil(3 * l2 / max(nbytes, 1))))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the memory ceiling."""
    buffers = torch.empty((2, 1 << 30), dtype=torch.uint8, device="cuda")
    buffers[0].random_()
    microseconds = _median_us(lambda: buffers[1].copy_(buffers[0]))
    return 2 * (1 << 30) / (microseconds * 1e-6)


def _rotate(calls: list):
    """One callable that runs ``calls`` in turn (one per weight copy)."""
    iterator = itertools.cycle(calls)
    return lambda: next(iterator)()


def _graph_median_us(calls: list, replays: int = 200, warmup: int = 20) -> float:
    """Median of CUDA-event timings of CUDA-graph replays, one graph per call (weight copy),
    L2 flushed before each: the kernel's device time without Python's launch cost — how a
    decode loop runs in serving. Warm-up (compilation, autotuning, scratch) runs first, on
    the capture stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    stream.synchronize()
    graphs = []
    for call in calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            call()
        graphs.append(graph)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for index in range(warmup + replays):
        flush.zero_()
        if index >= warmup:
            starts[index - warmup].record()
        graphs[index % len(graphs)].replay()
        if index >= warmup:
            ends[index - warmup].record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends, strict=True))
    return 1000.0 * times[len(times) // 2]


def _time_us(calls: list, timing: str) -> tuple[float, str]:
    """(median µs, how it was timed): CUDA-graph replays, or eager launches from Python."""
    if timing == "graph":
        try:
            return _graph_median_us(calls), "graph"
        except Exception as error:  # a library that cannot be captured: eager, and say so
            torch.cuda.synchronize()
            return _median_us(_rotate(calls)), f"eager ({type(error).__name__} in capture)"
    return _median_us(_rotate(calls)), "eager"


@dataclass
class ShapeTiming:
    m: int
    n: int
    k: int
    dtype: str
    pattern: str
    label: str = ""
    microseconds: dict[str, float] = field(default_factory=dict)
    bytes_moved: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    nm_error: float | None = None
    dense_error: float | None = None
    timing: dict[str, str] = field(default_factory=dict)

    def speedup(self, variant: str) -> float | None:
        if variant not in self.microseconds or "cublas" not in self.microseconds:
            return None
        return self.microseconds["cublas"] / self.microseconds[variant]

    def bandwidth(self, variant: str) -> float | None:
        """Bytes per second, counted on what the variant must read and write."""
        if variant not in self.microseconds or variant not in self.bytes_moved:
            return None
        return self.bytes_moved[variant] / (self.microseconds[variant] * 1e-6)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup_vs_cublas"] = {v: self.speedup(v) for v in self.microseconds}
        data["bandwidth_bytes_per_s"] = {v: self.bandwidth(v) for v in self.microseconds}
        return data


def time_shape(
    m: int, n: int, k: int, dtype: str = "fp16", pattern: tuple[int, int] = (2, 4),
    label: str = "", variants: tuple[str, ...] = VARIANTS, timing: str = "graph",
) -> ShapeTiming:  # fmt: skip
    """One y = x·Wᵀ shape ([M, K] x [N, K]): cuBLAS, Triton dense, Triton N:M, torch 2:4."""
    from spa_compiler.kernels.nm_matmul import (
        decompress,
        dense_matmul,
        nm_matmul,
        reference_matmul,
    )

    keep, group = pattern
    torch_dtype = DTYPES[dtype]
    result = ShapeTiming(m, n, k, dtype, f"{keep}:{group}", label)
    element = torch.empty((), dtype=torch_dtype).element_size()
    x = torch.randn(m, k, device="cuda", dtype=torch_dtype)
    out = torch.empty(m, n, device="cuda", dtype=torch_dtype)
    activation_bytes = (m * k + m * n) * element
    dense_bytes = n * k * element
    dense_weights, sparse_weights = _rotated_weights(n, k, torch_dtype, pattern, "cuda")

    # Correctness of the exact (autotuned) kernels being timed: fresh inputs, poisoned output.
    out.fill_(float("nan"))
    nm_matmul(x, sparse_weights[0], out=out)
    reference = reference_matmul(x, dense_weights[0])
    if torch.isnan(out).any():  # an element never written (JSON has no NaN: None)
        result.nm_error = None
        result.unavailable["triton_nm"] = "output elements left unwritten"
    else:
        result.nm_error = float((out.double() - reference).norm() / reference.norm())

    def timed(variant: str, calls: list, nbytes: int) -> None:
        result.microseconds[variant], result.timing[variant] = _time_us(calls, timing)
        result.bytes_moved[variant] = nbytes

    timed("cublas", [lambda w=w: torch.matmul(x, w.T, out=out) for w in dense_weights],
          dense_bytes + activation_bytes)  # fmt: skip
    if "triton_dense" in variants:
        out.fill_(float("nan"))
        dense_matmul(x, dense_weights[0], out=out)
        result.dense_error = float((out.double() - reference).norm() / reference.norm())
        timed("triton_dense", [lambda w=w: dense_matmul(x, w, out=out) for w in dense_weights],
              dense_bytes + activation_bytes)  # fmt: skip
    timed("triton_nm", [lambda w=w: nm_matmul(x, w, out=out) for w in sparse_weights],
          sparse_weights[0].nbytes + activation_bytes)  # fmt: skip
    if "expand_cublas" in variants and m >= 64:
        expanded = torch.empty_like(dense_weights[0])
        decompress(sparse_weights[0], expanded)
        if not torch.equal(expanded, dense_weights[0]):
            result.unavailable["expand_cublas"] = "the expanded weight differs from the dense"
        timed("expand_cublas",
              [lambda w=w: torch.matmul(x, decompress(w, expanded).T, out=out)
               for w in sparse_weights],
              sparse_weights[0].nbytes + 2 * dense_bytes + activation_bytes)  # fmt: skip
    if "torch_2_4" in variants and (keep, group) == (2, 4):
        try:
            from torch.sparse import to_sparse_semi_structured

            semi = [to_sparse_semi_structured(w) for w in dense_weights]
            torch.nn.functional.linear(x, semi[0])
            timed("torch_2_4", [lambda w=w: torch.nn.functional.linear(x, w) for w in semi],
                  dense_bytes * 9 // 16 + activation_bytes)  # fmt: skip
        except Exception as error:  # an unsupported shape, dtype or card: recorded, not fatal
            result.unavailable["torch_2_4"] = f"{type(error).__name__}: {str(error)[:160]}"
    del dense_weights, sparse_weights
    torch.cuda.empty_cache()
    return result


def _rotated_weights(n: int, k: int, dtype: torch.dtype, pattern: tuple[int, int], device: str):
    """N:M-pruned random [n, k] weights, dense and compressed, in enough copies to overflow L2
    when rotated on a GPU (two elsewhere)."""
    from spa_compiler.kernels.nm_layout import NMWeight, magnitude_prune

    keep, group = pattern
    element = torch.empty((), dtype=dtype).element_size()
    copies = _copies_to_overflow_l2(n * k * element) if device == "cuda" else 2
    dense = [magnitude_prune(torch.randn(n, k, device=device, dtype=dtype), keep, group)
             for _ in range(copies)]  # fmt: skip
    return dense, [NMWeight.from_dense(w, keep, group) for w in dense]


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def _config_dict(config: tuple) -> dict[str, Any]:
    block_m, block_n, block_k, mode, warps, stages, split = config
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "MODE": mode,
            "SPLIT_K": split, "num_warps": warps, "num_stages": stages}  # fmt: skip


def _autotuned_choice(m: int, n: int, k: int, pattern: tuple[int, int], bits: int,
                      dtype: torch.dtype | None = None) -> tuple | None:  # fmt: skip
    """The configuration the autotuner chose for this shape (and x's ``dtype``: Triton's key
    appends the tensor arguments' dtypes, x's first), as a 7-tuple, if it has run."""
    import triton
    from spa_compiler.kernels.nm_matmul import MODES, tuned_config

    wanted = (triton.next_power_of_2(m), n, k, *pattern, bits)
    if dtype is not None:
        wanted = (*wanted, str(dtype))
    names = {v: k for k, v in MODES.items()}
    for key, chosen in tuned_config("nm").items():
        if tuple(key[: len(wanted)]) == wanted:
            return (chosen["BLOCK_M"], chosen["BLOCK_N"], chosen["BLOCK_K"],
                    names[chosen["MODE"]], chosen["num_warps"], chosen["num_stages"],
                    chosen.get("SPLIT_K", 1))  # fmt: skip
    return None


def _sm_clock_hz() -> float | None:
    """The GPU's maximum SM clock, from torch or nvidia-smi."""
    import subprocess

    kilohertz = getattr(torch.cuda.get_device_properties(0), "clock_rate", None)
    if kilohertz:
        return 1e3 * float(kilohertz)
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        return 1e6 * float(line.splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _floors(m, n, k, dtype, pattern, moved, copy_bandwidth, configs) -> dict[str, Any]:
    """Why a configuration is as fast as it is: the memory floor (bytes it must move over the
    copy rate) against the instruction-issue floor of its compiled K loop (``compiled``)."""
    from spa_compiler.kernels import compiled

    floors: dict[str, Any] = {"memory_us": 1e6 * moved / copy_bandwidth if copy_bandwidth else None}
    clock = _sm_clock_hz()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    floors["sm_clock_hz"] = clock
    for config in dict.fromkeys(tuple(c) for c in configs):
        try:
            major, minor = torch.cuda.get_device_capability(0)
            built = compiled.compile_nm(config, pattern, dtype, m=m, capability=10 * major + minor)
        except Exception as error:  # the report is an explanation, never a reason to stop
            floors[str(config)] = f"{type(error).__name__}: {str(error)[:160]}"
            continue
        floors[str(config)] = {
            "registers": built.registers, "stack_bytes": built.stack_bytes,
            "loop_instructions": built.loop_length,
            "issue_us": compiled.issue_floor_us(built, config, m, n, k, sms, clock)
            if clock else None,
        }  # fmt: skip
    return floors


def sweep(
    m: int, n: int, k: int, dtype: str = "fp16", pattern: tuple[int, int] = (2, 4),
    budget_s: float = 60.0, log=print, device: str = "cuda", timer=None,
    copy_bandwidth: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Coordinate descent over the sparse kernel's blocks at one shape (``tune``), from the
    autotuner's choice; every configuration checked against float64 on a poisoned output
    before it is timed (CUDA graphs, rotated weights), cuBLAS timed alongside. ``timer``
    (calls -> (µs, how)) and ``device`` let the CPU tests walk the same code under Triton's
    interpreter."""
    from spa_compiler.kernels import tune
    from spa_compiler.kernels.nm_matmul import _configs_for, _full, nm_matmul, reference_matmul

    keep, group = pattern
    torch_dtype = DTYPES[dtype]
    x = torch.randn(m, k, device=device, dtype=torch_dtype)
    out = torch.empty(m, n, device=device, dtype=torch_dtype)
    element = x.element_size()
    dense, sparse = _rotated_weights(n, k, torch_dtype, pattern, device)
    reference = reference_matmul(x, dense[0])
    timer = timer or (lambda calls: _time_us(calls, "graph"))
    cublas_us, _ = timer([lambda w=w: torch.matmul(x, w.T, out=out) for w in dense])
    nm_matmul(x, sparse[0], out=out)  # the autotuner's choice is the start
    bits = sparse[0].bits
    start = _autotuned_choice(m, n, k, pattern, bits, torch_dtype) or _full(_configs_for(m)[0])
    # a start outside the search's region (a tile wider than K) could not step back into it
    start = tune.into_region(start, m, n, k, pattern, bits)
    failures: dict[str, str] = {}

    def measure(config: tuple) -> float | None:
        options = _config_dict(config)
        try:
            out.fill_(float("nan"))
            nm_matmul(x, sparse[0], out=out, config=options)
            _synchronize(x)
            error = float((out.double() - reference).norm() / reference.norm())
            if not error <= 1e-2:  # NaN (unwritten) included
                failures[str(config)] = f"relative error {error:.1e}"
                return None
            calls = [lambda w=w: nm_matmul(x, w, out=out, config=options) for w in sparse]
            microseconds, how = timer(calls)
        except Exception as error:  # out of shared memory or registers: skipped, recorded
            _synchronize(x)
            failures[str(config)] = f"{type(error).__name__}: {str(error)[:160]}"
            return None
        log(
            f"  sweep M={m} N={n} K={k} {config}: {microseconds:.1f} us "
            f"({cublas_us / microseconds:.2f}x cuBLAS){'' if how == 'graph' else ' ' + how}"
        )
        return microseconds

    best, best_us, history = tune.coordinate_search(
        start, lambda c: tune.neighbours(c, m, n, k, pattern, bits), measure, budget_s
    )
    moved = sparse[0].nbytes + (m * k + m * n) * element
    floors = (
        _floors(m, n, k, dtype, pattern, moved, copy_bandwidth, (start, best)) if x.is_cuda else {}
    )
    result = {
        "m": m, "n": n, "k": k, "dtype": dtype, "pattern": f"{keep}:{group}",
        "cublas_us": cublas_us, "start": list(start),
        "start_us": history[0]["microseconds"] if history else None,
        "best": list(best), "best_us": best_us,
        "speedup_vs_cublas": cublas_us / best_us if best_us else None,
        "bandwidth_bytes_per_s": moved / (best_us * 1e-6) if best_us else None,
        "history": history, "failures": failures, "floors": floors,
    }  # fmt: skip
    return result  # the caller empties torch's cache once the closures are gone


# (BLOCK_N, BLOCK_K, warps) values whose combinations sweep_decompress times
DECOMPRESS_GRID = ((16, 32, 64), (128, 256, 512), (4, 8))


def sweep_text(row: dict[str, Any], copy_bandwidth: float) -> str:
    """One line per searched shape: cuBLAS, the autotuner's choice, the best found."""
    text = f"M={row['m']} N={row['n']} K={row['k']}: cuBLAS {row['cublas_us']:.1f} us"
    if row["start_us"]:
        text += f", autotuned {row['start_us']:.1f} us ({row['cublas_us'] / row['start_us']:.2f}x)"
    if row["best_us"]:
        bandwidth = row["bandwidth_bytes_per_s"]
        text += (
            f", best {row['best_us']:.1f} us ({row['speedup_vs_cublas']:.2f}x, "
            f"{bandwidth / 1e12:.2f} TB/s = {bandwidth / copy_bandwidth:.0%} of copy) "
            f"with {tuple(row['best'])} after {len(row['history'])} configurations"
        )
    floors = row.get("floors") or {}
    best = floors.get(str(tuple(row["best"])))
    if floors.get("memory_us") and isinstance(best, dict) and best.get("issue_us"):
        text += (
            f"; floors: memory {floors['memory_us']:.1f} us, "
            f"instruction issue {best['issue_us']:.1f} us"
        )
    return text


def sweep_decompress(
    n: int, k: int, dtype: str = "fp16", pattern: tuple[int, int] = (2, 4), log=print,
    device: str = "cuda", timer=None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The expansion kernel (the large-M path's fixed cost) over a grid of blocks: bytes read
    and written per second, each result checked bit for bit (``device``/``timer`` as in
    ``sweep``)."""
    from spa_compiler.kernels.nm_matmul import decompress

    torch_dtype = DTYPES[dtype]
    timer = timer or (lambda calls: _time_us(calls, "graph"))
    dense, sparse = _rotated_weights(n, k, torch_dtype, pattern, device)
    expanded = torch.empty_like(dense[0])
    moved = sparse[0].nbytes + expanded.numel() * expanded.element_size()
    rows = []
    for block_n, block_k, warps in itertools.product(*DECOMPRESS_GRID):
        blocks = (block_n, block_k, warps)
        try:
            expanded.zero_()
            decompress(sparse[0], expanded, blocks=blocks)
            if not torch.equal(expanded, dense[0]):
                rows.append({"blocks": list(blocks), "error": "differs from the dense weight"})
                continue
            calls = [lambda w=w, b=blocks: decompress(w, expanded, blocks=b) for w in sparse]
            microseconds, _ = timer(calls)
        except Exception as error:
            _synchronize(expanded)
            rows.append({"blocks": list(blocks), "error": f"{type(error).__name__}"})
            continue
        rows.append({"blocks": list(blocks), "microseconds": microseconds,
                     "bandwidth_bytes_per_s": moved / (microseconds * 1e-6)})  # fmt: skip
        log(
            f"  decompress {n}x{k} {blocks}: {microseconds:.1f} us "
            f"{moved / microseconds / 1e6:.2f} TB/s"
        )
    return rows


def sweep_chunks(
    m: int, n: int, k: int, dtype: str = "fp16", pattern: tuple[int, int] = (2, 4),
    chunks=(None, 512, 1024, 2048, 4096), log=print, device: str = "cuda", timer=None,
) -> dict[str, Any]:  # fmt: skip
    """``nm_linear``'s large-M path, expanding the whole weight against chunks of rows through
    one buffer (``chunk_rows``), beside cuBLAS on the dense weight; each checked against
    float64 (``device``/``timer`` as in ``sweep``)."""
    from spa_compiler.kernels.nm_matmul import nm_linear, reference_matmul

    torch_dtype = DTYPES[dtype]
    x = torch.randn(m, k, device=device, dtype=torch_dtype)
    timer = timer or (lambda calls: _time_us(calls, "graph"))
    dense, sparse = _rotated_weights(n, k, torch_dtype, pattern, device)
    reference = reference_matmul(x, dense[0])
    out = torch.empty(m, n, device=device, dtype=torch_dtype)
    result: dict[str, Any] = {"m": m, "n": n, "k": k, "dtype": dtype, "chunks": []}
    result["cublas_us"], _ = timer([lambda w=w: torch.matmul(x, w.T, out=out) for w in dense])
    for chunk_rows in chunks:
        row: dict[str, Any] = {"chunk_rows": chunk_rows}
        try:
            y = nm_linear(x, sparse[0], dense_from_m=1, chunk_rows=chunk_rows)
            _synchronize(x)
            row["relative_error"] = float((y.double() - reference).norm() / reference.norm())
            calls = [lambda w=w, c=chunk_rows: nm_linear(x, w, dense_from_m=1, chunk_rows=c)
                     for w in sparse]  # fmt: skip
            row["microseconds"], _ = timer(calls)
            row["speedup_vs_cublas"] = result["cublas_us"] / row["microseconds"]
            log(f"  expand+cuBLAS M={m} N={n} K={k} chunk_rows={chunk_rows}: "
                f"{row['microseconds']:.1f} us ({row['speedup_vs_cublas']:.2f}x cuBLAS "
                f"{result['cublas_us']:.1f} us)")  # fmt: skip
        except Exception as error:
            _synchronize(x)
            row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
        result["chunks"].append(row)
    return result


def gpu_correctness(seed: int = 0) -> list[dict[str, Any]]:
    """Both kernels on fresh random inputs, outputs poisoned with NaN, against float64:
    fp16 and bf16, 2:4 and 4:8, each product path on small and ragged shapes, with bias and
    GELU fused (the autotuned kernels without them are checked on every timed shape)."""
    from spa_compiler.kernels.nm_layout import NMWeight, magnitude_prune
    from spa_compiler.kernels.nm_matmul import (
        decompress,
        dense_matmul,
        nm_matmul,
        reference_matmul,
    )

    torch.manual_seed(seed)
    fma = {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 128, "MODE": "fma"}
    gather = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 512, "MODE": "gather"}
    dot = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "MODE": "dot"}
    large = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "MODE": "dot"}
    cases = [
        ("gather", gather, (1, 4096, 4096)),
        ("gather", {**gather, "BLOCK_M": 4, "BLOCK_K": 128}, (3, 1000, 200)),
        ("fma", fma, (3, 1000, 200)),  # ragged: K and N not multiples of the tile
        ("dot", dot, (17, 77, 136)),
        ("dot", dot, (64, 512, 4096)),
        ("dot-large", large, (300, 264, 520)),
        ("gather-split", {**gather, "SPLIT_K": 4}, (1, 4096, 4096)),
        ("dot-split", {**dot, "SPLIT_K": 3}, (17, 77, 136)),
    ]
    rows = []
    for dtype, (keep, group), (name, config, (m, n, k)) in itertools.product(
        ("fp16", "bf16"), ((2, 4), (4, 8)), cases
    ):
        torch_dtype = DTYPES[dtype]
        x = torch.randn(m, k, device="cuda", dtype=torch_dtype)
        dense = torch.randn(n, k, device="cuda", dtype=torch_dtype)
        bias = torch.randn(n, device="cuda", dtype=torch_dtype)
        weight = NMWeight.from_dense(dense, keep, group, prune=True)
        both = (keep, group) == (2, 4) and name in ("fma", "dot", "dot-large")
        for kind in ("nm", "dense") if both else ("nm",):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch_dtype)
            if kind == "nm":
                if "split" in name:  # a first call whose split-K scratch the second reuses
                    nm_matmul(x, weight, bias, "gelu", out=torch.empty_like(out), config=config)
                nm_matmul(x, weight, bias, "gelu", out=out, config=config)
                reference = reference_matmul(x, weight.to_dense(), bias, "gelu")
            else:
                dense_matmul(x, dense, bias, "gelu", out=out, config=config)
                reference = reference_matmul(x, dense, bias, "gelu")
            torch.cuda.synchronize()
            error = float((out.double() - reference).norm() / reference.norm())
            unwritten = int(torch.isnan(out).sum())
            rows.append({
                "kernel": kind, "dtype": dtype, "pattern": f"{keep}:{group}", "config": name,
                "shape": [m, n, k], "relative_error": error, "unwritten": unwritten,
                "ok": unwritten == 0 and error <= 1e-2,
            })  # fmt: skip
    for dtype, (keep, group) in itertools.product(("fp16", "bf16"), ((2, 4), (4, 8))):
        dense = magnitude_prune(
            torch.randn(300, 1000, device="cuda", dtype=DTYPES[dtype]), keep, group
        )
        expanded = decompress(NMWeight.from_dense(dense, keep, group))
        rows.append({
            "kernel": "decompress", "dtype": dtype, "pattern": f"{keep}:{group}",
            "config": "fixed", "shape": [300, 1000], "unwritten": 0,
            "relative_error": float((expanded.double() - dense.double()).abs().max()),
            "ok": bool(torch.equal(expanded, dense)),
        })  # fmt: skip
    return rows


def model_shapes(path: str, pattern: tuple[int, int]) -> list[tuple[str, int, int]]:
    """(weight name, N, K) of every Gemm/MatMul weight an N:M compile would make sparse."""
    import numpy as np
    from spa_compiler.passes.sparsify_nm import find_targets

    import spa_compiler

    found = find_targets(spa_compiler.load(path).graph, pattern[1])
    shapes = []
    for target in found.targets:
        if target.node.op not in ("Gemm", "MatMul") or len(target.constant.shape) != 2:
            continue
        shape = list(target.constant.shape)
        k = shape[target.axis]
        shapes.append((target.constant.name, int(np.prod(shape)) // k, int(k)))
    return shapes


def run(
    m_values=(1, 4, 16, 64, 256, 4096), sizes=(4096, 8192), shapes=(), model: str | None = None,
    dtypes=("fp16",), patterns=((2, 4),), budget_s: float | None = None, log=print,
    timing: str = "graph",
) -> dict[str, Any]:  # fmt: skip
    """Everything ``spa bench kernels`` measures, as JSON-ready data."""
    import triton

    require_gpu()
    started = time.perf_counter()
    properties = torch.cuda.get_device_properties(0)
    data: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "multiprocessors": properties.multi_processor_count,
        "l2_bytes": getattr(properties, "L2_cache_size", None),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "timing": timing,
        "copy_bandwidth_bytes_per_s": copy_bandwidth(),
        "shapes": [],
        "model": None,
        "skipped": [],
    }
    log(f"{data['device']}: copy bandwidth {data['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    grid = [(m, size, size, "") for size in sizes for m in m_values]
    grid += [(m, n, k, "") for m, n, k in shapes]
    for dtype, pattern, (m, n, k, label) in itertools.product(dtypes, patterns, grid):
        if budget_s is not None and time.perf_counter() - started > budget_s:
            data["skipped"].append([m, n, k, dtype, f"{pattern[0]}:{pattern[1]}", "budget"])
            continue
        measured = time_shape(m, n, k, dtype, pattern, label, timing=timing)
        data["shapes"].append(measured.to_json())
        log(_row_text(measured))
    if model:
        data["model"] = _model_estimate(model, m_values, dtypes[0], patterns[0], log, timing)
    data["tuned"] = _tuned()
    data["seconds"] = time.perf_counter() - started
    return data


def _model_estimate(path, m_values, dtype, pattern, log, timing="graph") -> dict[str, Any]:
    """The model's Gemm/MatMul time at each M, dense (cuBLAS) against N:M as ``nm_linear``
    runs it (the sparse kernel below ``DENSE_FROM_M`` rows, the expanded weight above)."""
    from spa_compiler.kernels.nm_matmul import DENSE_FROM_M

    shapes = model_shapes(path, pattern)
    distinct: dict[tuple[int, int], int] = {}
    for _, n, k in shapes:
        distinct[(n, k)] = distinct.get((n, k), 0) + 1
    estimate = {"path": str(path), "weights": len(shapes), "per_m": []}
    for m in m_values:
        sparse = "triton_nm" if m < DENSE_FROM_M else "expand_cublas"
        totals = {"cublas": 0.0, "nm_linear": 0.0}
        for (n, k), count in sorted(distinct.items()):
            measured = time_shape(m, n, k, dtype, pattern, "model", ("cublas", sparse), timing)
            totals["cublas"] += count * measured.microseconds["cublas"]
            totals["nm_linear"] += count * measured.microseconds[sparse]
        row = {
            "m": m, "path": sparse, **{f"{v}_us": t for v, t in totals.items()},
            "speedup": totals["cublas"] / totals["nm_linear"],
        }  # fmt: skip
        estimate["per_m"].append(row)
        log(
            f"model {path}: M={m} matmuls dense {totals['cublas']:.1f} us, "
            f"{pattern[0]}:{pattern[1]} {totals['nm_linear']:.1f} us ({row['speedup']:.2f}x)"
        )
    return estimate


def _tuned() -> dict[str, Any]:
    from spa_compiler.kernels.nm_matmul import tuned_config

    return {
        kind: {str(key): config for key, config in tuned_config(kind).items()}
        for kind in ("nm", "dense")
    }


def _row_text(timing: ShapeTiming) -> str:
    parts = [f"{timing.dtype} {timing.pattern} M={timing.m} N={timing.n} K={timing.k}"]
    for variant, micro in timing.microseconds.items():
        speed = timing.speedup(variant)
        parts.append(f"{variant} {micro:.1f}us ({speed:.2f}x)")
    if timing.unavailable:
        parts.append(f"unavailable: {timing.unavailable}")
    parts.append(f"err {timing.nm_error:.1e}" if timing.nm_error is not None else "UNWRITTEN")
    return "  ".join(parts)


def _cell(micro: dict, speed: dict, variant: str) -> str:
    if variant not in micro:
        return "n/a"
    return f"{micro[variant]:.1f} ({speed[variant]:.2f}x)"


def table(data: dict[str, Any]) -> str:
    """One row per shape: medians, speed-up over cuBLAS, N:M bandwidth against the copy."""
    copy = data["copy_bandwidth_bytes_per_s"]
    headers = [
        "dtype",
        "N:M",
        "M",
        "N",
        "K",
        "cuBLAS us",
        "Triton dense",
        "Triton N:M",
        "expand+cuBLAS",
        "torch 2:4",
        "N:M GB/s",
        "of copy",
    ]
    lines = []
    for row in data["shapes"]:
        micro, speed = row["microseconds"], row["speedup_vs_cublas"]
        bandwidth = row["bandwidth_bytes_per_s"].get("triton_nm")

        lines.append([
            row["dtype"], row["pattern"], str(row["m"]), str(row["n"]), str(row["k"]),
            f"{micro['cublas']:.1f}",
            *(_cell(micro, speed, v) for v in VARIANTS[1:]),
            f"{bandwidth / 1e9:.0f}" if bandwidth else "-",
            f"{bandwidth / copy:.0%}" if bandwidth else "-",
        ])  # fmt: skip
    widths = [
        max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(headers)
    ]
    text = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    text += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    return "\n".join(text)


def plot(data: dict[str, Any]) -> bytes:
    """Speed-up over cuBLAS against M, per K = N, with the fp16 2:4 memory-bound limit 16/9."""
    try:
        import matplotlib
    except ImportError:
        raise BadInputError(PLOT_NEEDS_MATPLOTLIB) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = "fp16" if any(r["dtype"] == "fp16" for r in data["shapes"]) else "bf16"
    rows = [r for r in data["shapes"] if r["n"] == r["k"] and r["dtype"] == dtype]
    sizes = sorted({r["k"] for r in rows})
    figure, axes = plt.subplots(
        1, max(1, len(sizes)), figsize=(6 * max(1, len(sizes)), 4.2), squeeze=False
    )
    for axis, size in zip(axes[0], sizes, strict=False):
        for variant, style in (("triton_nm", "o-"), ("expand_cublas", "d-."),
                               ("triton_dense", "s--"), ("torch_2_4", "^:")):  # fmt: skip
            for pattern in sorted({r["pattern"] for r in rows}):
                points = [
                    (r["m"], r["speedup_vs_cublas"].get(variant))
                    for r in rows
                    if r["k"] == size and r["pattern"] == pattern
                ]
                points = [(m, s) for m, s in points if s]
                if not points or (variant == "triton_dense" and pattern != "2:4"):
                    continue
                name = variant if variant == "triton_dense" else f"{variant} {pattern}"
                axis.plot(*zip(*sorted(points), strict=True), style, label=name)
        axis.axhline(16 / 9, color="grey", lw=0.8, ls="-.", label="16/9 (fp16 2:4 bytes)")
        axis.axhline(1.0, color="black", lw=0.6)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set_xlabel("M (rows of x)")
        axis.set_ylabel("speed-up over cuBLAS dense")
        axis.set_title(f"K = N = {size}, {dtype}, {data['device']}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


__all__ = ["NoGPUError", "ShapeTiming", "gpu_correctness", "plot", "run", "table", "time_shape"]
