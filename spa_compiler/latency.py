"""``spa bench``: latency of ONNX models in onnxruntime, side by side.

Every model runs in its own session on the same inputs; after a warm-up, runs are
interleaved (A, B, A, B, …) so that machine drift falls on every model alike, and each
batch size reports p50/p90/p99 latency and throughput, with the speed-up over the first
model next to its FLOPs and parameter ratios — fewer FLOPs are a promise, latency is the
proof.
"""

from __future__ import annotations

import os
import pathlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from spa_compiler.errors import PLOT_NEEDS_MATPLOTLIB, BadInputError

SEQUENCE = 128  # symbolic non-batch dims (sequence length, free image sides)


@dataclass
class Timing:
    model: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # samples per second at p50
    speedup: float | None = None  # the first model's p50 over this one's


@dataclass
class BenchResult:
    models: list[str]
    device: str
    threads: int | None
    runs: int
    timings: list[Timing] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    macs: list[int] = field(default_factory=list)
    parameters: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "device": self.device,
            "threads": self.threads,
            "runs": self.runs,
            "macs": self.macs,
            "parameters": self.parameters,
            "skipped": self.skipped,
            "timings": [vars(t) for t in self.timings],
        }

    def table(self) -> str:
        lines = [
            f"spa bench ({self.device}, {self.threads or 'default'} threads, {self.runs} "
            "interleaved runs per model and batch)",
            f"  {'model':<32} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
            f"{'samples/s':>10} {'speed-up':>8} {'MACs':>6} {'params':>6}",
        ]
        for timing in self.timings:
            index = self.models.index(timing.model)
            macs = self.macs[index] / self.macs[0] if self.macs and self.macs[0] else None
            params = (
                self.parameters[index] / self.parameters[0]
                if self.parameters and self.parameters[0]
                else None
            )
            lines.append(
                f"  {pathlib.Path(timing.model).name[:32]:<32} {timing.batch:>5} "
                f"{timing.p50_ms:>9.3f} {timing.p90_ms:>9.3f} {timing.p99_ms:>9.3f} "
                f"{timing.throughput:>10.1f} "
                + (f"{timing.speedup:>7.2f}x" if timing.speedup else f"{'-':>8}")
                + (f" {macs:>5.2f}x" if macs is not None else f" {'-':>6}")
                + (f" {params:>5.2f}x" if params is not None else f" {'-':>6}")
            )
        lines.extend(f"  skipped: {why}" for why in self.skipped)
        return "\n".join(lines)

    def plot(self) -> bytes:
        """PNG: each model's speed-up over the first against the batch, next to the cut its
        MACs promise (the first model's MACs over its own), the 'fewer FLOPs, no speed-up'
        gap made visible."""
        import io

        try:
            import matplotlib
        except ImportError:
            raise BadInputError(PLOT_NEEDS_MATPLOTLIB) from None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        batches = sorted({t.batch for t in self.timings})
        for index, model in enumerate(self.models[1:], start=1):
            points = sorted(
                (t.batch, t.speedup) for t in self.timings if t.model == model and t.speedup
            )
            if not points:
                continue
            (line,) = axis.plot(*zip(*points, strict=True), "o-", label=pathlib.Path(model).name)
            if self.macs and self.macs[0] and self.macs[index]:
                promised = self.macs[0] / self.macs[index]
                axis.axhline(promised, color=line.get_color(), ls=":", lw=1,
                             label=f"MACs cut {promised:.2f}x")  # fmt: skip
        axis.axhline(1.0, color="black", lw=0.6)
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("batch")
        axis.set_ylabel(f"speed-up over {pathlib.Path(self.models[0]).name} (p50)")
        axis.set_title(f"spa bench, {self.device}, {self.threads or 'default'} threads")
        axis.legend(fontsize=8)
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
        plt.close(figure)
        return buffer.getvalue()


def _providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider"]
    raise BadInputError(f"unknown device {device!r} (choose cpu or cuda)")


def _session(path: str, device: str, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach users as spa's one-line errors
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        with warnings.catch_warnings():  # "provider not available": said below, in one line
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(path, options, providers=_providers(device))
    except Exception as error:  # onnxruntime raises its own types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BadInputError(f"{path}: onnxruntime cannot load it on {device}: {first}") from None
    # The provider list lies (a CUDA build without a usable GPU falls back to the CPU without
    # a word): only the providers the session really took count.
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BadInputError(
            "--device cuda: onnxruntime's CUDA provider does not work here "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    return session


def _feeds(session: ort.InferenceSession, batch: int, seed: int) -> dict[str, np.ndarray] | str:
    """Inputs of the declared shapes with the batch dim set; a reason where it is fixed."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session.get_inputs():
        shape = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim > 0:
                if axis == 0 and dim != batch:
                    return f"{value.name} has a fixed batch of {dim}"
                shape.append(dim)
            else:
                shape.append(batch if axis == 0 else SEQUENCE)
        kind = value.type.removeprefix("tensor(").removesuffix(")")
        dtype = {"float": np.float32, "float16": np.float16, "double": np.float64,
                 "int64": np.int64, "int32": np.int32, "bool": np.bool_}.get(kind)  # fmt: skip
        if dtype is None:
            return f"{value.name} has type {value.type}"
        if dtype is np.bool_:
            feeds[value.name] = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):  # ids 0..1: valid for any table or mask
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _measure(path: str) -> tuple[int, int]:
    import spa_compiler
    from spa_compiler.compiler import measure

    counted = measure(spa_compiler.load(path).graph)
    return int(counted["macs"]), int(counted["parameters"])


def bench(
    models: list[str | os.PathLike[str]],
    batches: tuple[int, ...] = (1, 8, 32),
    device: str = "cpu",
    threads: int | None = None,
    runs: int = 30,
    warmup: int = 5,
    seed: int = 0,
) -> BenchResult:
    """Time ``models`` side by side (see the module's docstring); the first is the
    reference for speed-ups and FLOPs/parameter ratios."""
    if not models:
        raise BadInputError("spa bench needs at least one model")
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches):
        raise BadInputError("runs and batch sizes must be positive, warm-up not negative")
    paths = [str(pathlib.Path(m)) for m in models]
    for path in paths:
        if not pathlib.Path(path).is_file():
            raise BadInputError(f"{path}: no such file")
        try:
            onnx.load(path, load_external_data=False)
        except Exception:  # protobuf raises several types
            raise BadInputError(f"{path}: not an ONNX model") from None
    sessions = [_session(path, device, threads) for path in paths]
    result = BenchResult(models=paths, device=device, threads=threads, runs=runs)
    for path in paths:
        macs, parameters = _measure(path)
        result.macs.append(macs)
        result.parameters.append(parameters)
    for batch in batches:
        feeds = [_feeds(session, batch, seed) for session in sessions]
        reasons = [f for f in feeds if isinstance(f, str)]
        if reasons:
            result.skipped.append(f"batch {batch}: {reasons[0]}")
            continue
        for path, session, feed in zip(paths, sessions, feeds, strict=True):
            try:  # a provider that loads but cannot run (a broken CUDA setup) fails here
                for _ in range(max(1, warmup)):
                    session.run(None, feed)
            except Exception as error:  # onnxruntime raises its own types
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                message = f"{path}: onnxruntime cannot run it on {device}: {first}"
                raise BadInputError(message) from None
        samples: list[list[float]] = [[] for _ in sessions]
        for _ in range(runs):  # interleaved: A, B, A, B, ...
            for index, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
                started = time.perf_counter()
                session.run(None, feed)
                samples[index].append((time.perf_counter() - started) * 1000.0)
        reference = None
        for path, times in zip(paths, samples, strict=True):
            p50, p90, p99 = np.percentile(times, [50, 90, 99])
            reference = reference or p50
            result.timings.append(
                Timing(
                    path,
                    batch,
                    float(p50),
                    float(p90),
                    float(p99),
                    batch * 1000.0 / p50,
                    speedup=float(reference / p50),
                )
            )
    return result


__all__ = ["BenchResult", "Timing", "bench"]
