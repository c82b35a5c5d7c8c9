"""The ``spa`` command line. Errors end in one line on stderr and a documented exit code:
0 success, 1 internal error, 2 bad input or bad arguments."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import warnings
from typing import Any

import click

from spa_compiler.errors import EXIT_BAD_INPUT, EXIT_FAILURE, SpaError, SpaWarning


def _shorten(items: list[str], limit: int = 2) -> str:
    if not items:
        return "-"
    shown = ", ".join(items[:limit])
    return shown + (f" +{len(items) - limit}" if len(items) > limit else "")


def _member_names(members: list[Any]) -> list[str]:
    names: list[str] = []
    for member in members:
        label = f"{member.tensor}[{member.axis}]"
        if label not in names:
            names.append(label)
    return names


def format_table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spa-compiler", prog_name="spa")
def cli() -> None:
    """spa: Structurally Prune Anything, on plain ONNX from any framework."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@click.option(
    "--all", "show_all", is_flag=True, help="List blocked groups too (default: weight groups)."
)
@click.option(
    "--heads",
    type=click.Choice(["head", "dim"]),
    default="head",
    show_default=True,
    help="Attention: prune whole heads, or the head dimension across heads.",
)
def inspect(model: str, as_json: bool, show_all: bool, heads: str) -> None:
    """Show which channels of MODEL must be removed together, and what blocks the rest."""
    import spa_compiler

    analysis = spa_compiler.inspect(model, heads=heads)
    if as_json:
        click.echo(json.dumps(analysis.to_json(), indent=1, sort_keys=True))
        return
    rows = []
    for group in analysis.groups:
        # By default: groups whose channels a weight produces or reads (the ones a user can
        # act on); kernel and spatial axes and pure shape tensors only with --all.
        if not show_all and not (group.prunable or group.sources or group.consumers):
            continue
        if not show_all and not group.prunable and group.channels < 2:
            continue
        status = "prunable" if group.prunable else "blocked: " + (group.blocked_reasons or ["?"])[0]
        rows.append(
            [
                str(group.id),
                str(group.channels),
                str(group.granularity),
                _shorten(_member_names(group.sources)),
                _shorten(_member_names(group.consumers)),
                status[:110],
            ]
        )
    headers = ["group", "channels", "gran", "sources", "consumers", "status"]
    click.echo(format_table(rows, headers))
    summary = analysis.summary()
    click.echo("")
    click.echo(
        f"{summary['prunable_groups']} prunable groups ({summary['prunable_channels']} channels), "
        f"{summary['blocked_groups']} blocked; weights in prunable groups: "
        f"{summary['prunable_weight_parameters']:,} of {summary['weight_parameters']:,} "
        f"parameters ({100 * summary['coverage']:.1f}%); "
        f"analysis {summary['analysis_seconds']:.3f} s"
    )


EXIT_NOTHING_TO_PRUNE = 3


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the pruned model (written atomically).",
)
@click.option(
    "--ratio",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=None,
    help="Fraction of the channels of every prunable group to remove [default: 0.3].",
)
@click.option(
    "--target-flops",
    type=float,
    default=None,
    help="Fraction of the original MACs to keep; the ratio is searched.",
)
@click.option(
    "--target-params",
    type=float,
    default=None,
    help="Fraction of the original parameters to keep; the ratio is searched.",
)
@click.option(
    "--global",
    "global_ranking",
    is_flag=True,
    help="Rank the channels of all groups together instead of pruning each equally.",
)
@click.option(
    "--max-group-ratio",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=0.9,
    show_default=True,
    help="With --global: the most of one group's channels that may go.",
)
@click.option(
    "--criterion",
    type=click.Choice(["l1", "l2", "random", "bn-scale", "obspa", "snip"]),  # criteria.CRITERIA
    default="obspa",
    show_default=True,
    help="Channel importance criterion (obspa: Optimal-Brain-Surgeon error of the consumers, "
    "which are then refitted on the kept channels; random and snip need no trained weights: "
    "snip is a label-free SNIP saliency on synthetic inputs, for pruning before training).",
)
@click.option(
    "--moments",
    type=click.Choice(["synthetic", "model"]),
    default="synthetic",
    show_default=True,
    help="obspa and snip without --calib: second moments from synthetic inputs run through "
    "onnxruntime, or read off the model's parameters.",
)
@click.option(
    "--calib",
    "calibration",
    type=click.Path(dir_okay=False, path_type=str),
    help="An .npz of real inputs (one array per graph input, samples first) for the second "
    "moments of obspa and snip.",
)
@click.option(
    "--input-range",
    metavar="LOW,HIGH",
    help="Where the model's float inputs live (e.g. 0,1 for pixels scaled to [0, 1]), for "
    "the synthetic or model moments (obspa, snip); default: standardized (mean 0, variance 1).",
)
@click.option(
    "--compensate/--no-compensate",
    default=None,
    help="Refit the consumers of removed channels (default: on with obspa).",
)
@click.option(
    "--aggregate",
    type=click.Choice(["sum", "mean", "max"]),
    default="sum",
    show_default=True,
    help="How a group's member scores combine.",
)
@click.option(
    "--normalize",
    type=click.Choice(["mean", "max", "sum", "none"]),
    default=None,
    help="Per-group score normalization, matters with --global (default: mean; none for "
    "obspa, whose scores are relative output errors).",
)
@click.option(
    "--round-to",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Keep channel counts multiples of N where possible; auto: 16 for groups of 256 "
    "channels or more, 8 from 64 (what vectorised kernels run at full width), else 1.",
)
@click.option(
    "--heads",
    type=click.Choice(["head", "dim"]),
    default="head",
    show_default=True,
    help="Attention: remove whole heads, or shrink the head dimension.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Protect groups touching tensors or nodes matching this glob (repeatable).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for --criterion random and for synthetic inputs (obspa, snip): the same seed "
    "gives the same plan.",
)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Apply a saved plan instead of selecting channels.",
)
@click.option(
    "--save-plan",
    type=click.Path(dir_okay=False, path_type=str),
    help="Write the plan (kept channels of every group) as JSON.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Write the report as JSON.",
)
@click.option(
    "--nm",
    "nm_pattern",
    metavar="N:M",
    help="Then make Conv/Gemm/MatMul weights N:M sparse along their reduction axis (2:4, "
    "4:8, ...; M in 4, 8, 16). Alone it prunes no channels.",
)
@click.option(
    "--nm-method",
    type=click.Choice(["obs", "magnitude"]),
    default="obs",
    show_default=True,
    help="N:M masks by SparseGPT-style OBS (with weight updates) or by magnitude.",
)
@click.option(
    "--nm-exclude",
    multiple=True,
    metavar="PATTERN",
    help="Keep weights or nodes matching this glob dense (repeatable).",
)
@click.option(
    "--export-compressed",
    type=click.Path(dir_okay=False, path_type=str),
    help="With --nm: write the sparse weights compressed (values + positions) as .npz.",
)
@click.option(
    "--bench", "run_bench", is_flag=True, help="Then time the output against the input (CPU)."
)
@click.option(
    "--external-data",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Write the weights to OUTPUT.data; auto: when the input keeps its weights in external "
    "data or the output is over protobuf's 2 GB.",
)
@click.option("--force", is_flag=True, help="Allow the output path to be the input path.")
def compile_command(
    model: str,
    output: str,
    ratio: float | None,
    target_flops: float | None,
    target_params: float | None,
    global_ranking: bool,
    max_group_ratio: float,
    criterion: str,
    moments: str,
    calibration: str | None,
    compensate: bool | None,
    input_range: str | None,
    aggregate: str,
    normalize: str | None,
    round_to: str,
    heads: str,
    exclude: tuple[str, ...],
    seed: int,
    plan_path: str | None,
    save_plan: str | None,
    report_path: str | None,
    nm_pattern: str | None,
    nm_method: str,
    nm_exclude: tuple[str, ...],
    export_compressed: str | None,
    run_bench: bool,
    external_data: str,
    force: bool,
) -> None:
    """Prune MODEL structurally and write a valid, smaller ONNX model to OUTPUT."""
    import pathlib

    from spa_compiler.compiler import compile as compile_model
    from spa_compiler.errors import BadInputError
    from spa_compiler.io import PROTOBUF_LIMIT, data_file_for, write_atomic, write_model
    from spa_compiler.ir import forget, held_weights
    from spa_compiler.plan import Plan

    source, target = pathlib.Path(model), pathlib.Path(output)
    inputs = _input_files(source) if source.is_file() else set()  # parsed once, used twice
    _check_output_paths(source, inputs, output, save_plan, report_path, force, export_compressed,
                        external_data != "never")  # fmt: skip
    pattern = _parse_pattern(nm_pattern)
    if (export_compressed or nm_exclude) and pattern is None:
        option = "--export-compressed" if export_compressed else "--nm-exclude"
        raise BadInputError(f"{option} needs --nm")
    if ratio is not None and (target_flops is not None or target_params is not None):
        raise BadInputError("--ratio and a --target-* option exclude each other")
    selecting = ratio is not None or target_flops or target_params or global_ranking
    if plan_path and selecting:
        raise BadInputError("--plan fixes every kept channel; drop the selection options")
    plan = Plan.load(plan_path) if plan_path else None
    if ratio is None and not selecting and plan_path is None:
        ratio = 0.0 if pattern is not None else 0.3  # --nm alone removes no channel
    proto, report = compile_model(
        model,
        ratio=0.3 if ratio is None else ratio,
        criterion=criterion,
        aggregation=aggregate,
        round_to=_parse_round_to(round_to),
        exclude=exclude,
        heads=heads,
        seed=seed,
        plan=plan,
        global_ranking=global_ranking,
        max_group_ratio=max_group_ratio,
        target_flops=target_flops,
        target_params=target_params,
        normalization=normalize,
        moments=moments,
        calibration=calibration,
        compensate=compensate,
        input_range=_parse_range(input_range),
        nm=pattern,
        nm_method=nm_method,
        nm_exclude=nm_exclude,
        self_contained=False,  # large weights stay arrays until write_model streams them
    )
    archive = None
    if export_compressed:  # before writing: writing moves the weights out of the proto
        from spa_compiler.nm import compressed_archive

        archive = compressed_archive(proto, report.nm)
    external = external_data == "always" or (
        external_data == "auto"
        and (
            len(inputs) > 1
            or proto.ByteSize() + sum(a.nbytes for a in held_weights(proto).values())
            >= PROTOBUF_LIMIT
        )
    )
    try:
        write_model(target, proto, external)
    finally:
        forget(proto)
    if save_plan:
        report.plan.save(save_plan)
    if report_path:
        text = json.dumps(report.to_json(), indent=1, sort_keys=True) + "\n"
        write_atomic(pathlib.Path(report_path), text.encode())
    if archive is not None:
        write_atomic(pathlib.Path(export_compressed), archive)
        if not any(not entry["method"].endswith("(quantized)") for entry in report.nm["applied"]):
            report.warnings.append(
                f"{export_compressed} holds no weight: no float weight was made sparse "
                "(quantized weights are not exported compressed)"
            )
    click.echo(report.summary())
    click.echo(f"wrote {output}" + (f" and {data_file_for(target)}" if external else ""))
    if run_bench:
        from spa_compiler.latency import bench

        click.echo(bench([model, output], runs=20, warmup=3).table())
    for warning in report.warnings:
        click.echo(f"spa: warning: {warning}", err=True)
    if report.groups_prunable == 0 and not (report.nm and report.nm["applied"]):
        raise click.exceptions.Exit(EXIT_NOTHING_TO_PRUNE)


def _parse_batches(text: str) -> tuple[int, ...]:
    from spa_compiler.errors import BadInputError

    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"--batch takes sizes like 1,8,32, not {text!r}") from None
    if not batches or any(b < 1 for b in batches):
        raise BadInputError(f"--batch sizes must be positive, not {text!r}")
    return batches


class _BenchGroup(click.Group):
    """`spa bench A.onnx B.onnx` times models; `spa bench kernels` times the Triton kernels."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["models", *args]
        return super().parse_args(ctx, args)


@cli.group(name="bench", cls=_BenchGroup)
def bench_group() -> None:
    """Speed: `spa bench [models] A.onnx [B.onnx ...]` or `spa bench kernels`."""


@bench_group.command(name="models")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="PNG of the speed-ups against the batch, next to the MACs cuts.",
)
def bench_command(
    models: tuple[str, ...],
    batches: str,
    device: str,
    threads: int | None,
    runs: int,
    warmup: int,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Time MODELS side by side in onnxruntime (interleaved runs; the first is the
    reference for speed-ups, FLOPs and parameter ratios)."""
    from spa_compiler.io import write_atomic
    from spa_compiler.latency import bench

    result = bench(list(models), _parse_batches(batches), device, threads, runs, warmup)
    click.echo(result.table())
    if json_path:
        text = json.dumps(result.to_json(), indent=1, sort_keys=True) + "\n"
        write_atomic(pathlib.Path(json_path), text.encode())
    if plot_path:
        write_atomic(pathlib.Path(plot_path), result.plot())


def _parse_ints(option: str, text: str) -> tuple[int, ...]:
    from spa_compiler.errors import BadInputError

    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"{option} takes integers like 1,16,256, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BadInputError(f"{option} values must be positive, not {text!r}")
    return values


def _parse_shapes(text: str | None) -> tuple[tuple[int, int, int], ...]:
    from spa_compiler.errors import BadInputError

    shapes = []
    for part in (text or "").split(","):
        if not part:
            continue
        try:
            m, n, k = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise BadInputError(
                f"--shapes takes MxNxK,... like 1x4096x4096, not {part!r}"
            ) from None
        if min(m, n, k) < 1:
            raise BadInputError(f"--shapes sizes must be positive, not {part!r}")
        shapes.append((m, n, k))
    return tuple(shapes)


@bench_group.command(name="kernels")
@click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=str),
    help="Also time this model's Gemm/MatMul weight shapes (dense vs N:M total).",
)
@click.option("--shapes", help="Extra shapes MxNxK,... (y = x·Wᵀ, x [M, K], W [N, K]).")
@click.option(
    "--m",
    "m_values",
    default="1,4,16,64,256,4096",
    show_default=True,
    help="Rows of x (tokens) for the K = N grid and the model's shapes.",
)
@click.option("--sizes", default="4096,8192", show_default=True, help="K = N of the grid.")
@click.option("--dtype", "dtypes", default="fp16", show_default=True, help="fp16 and/or bf16.")
@click.option("--nm", "patterns", default="2:4", show_default=True, help="Patterns, e.g. 2:4,4:8.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--timing",
    type=click.Choice(["graph", "eager"]),
    default="graph",
    show_default=True,
    help="CUDA-graph replays (device time) or eager launches (plus Python's cost).",
)
def bench_kernels(
    model: str | None, shapes: str | None, m_values: str, sizes: str, dtypes: str,
    patterns: str, json_path: str | None, plot_path: str | None, timing: str,
) -> None:  # fmt: skip
    """Time N:M Triton matmuls against cuBLAS dense, the dense Triton kernel and torch's 2:4
    (medians of CUDA-event timings, weights rotated out of L2). Needs a CUDA GPU."""
    from spa_compiler.errors import BadInputError
    from spa_compiler.io import write_atomic

    chosen_dtypes = tuple(dtypes.split(","))
    if any(d not in ("fp16", "bf16") for d in chosen_dtypes):
        raise BadInputError(f"--dtype takes fp16 and/or bf16, not {dtypes!r}")
    chosen_patterns = tuple(_parse_pattern(p) for p in patterns.split(","))
    if any(n & (n - 1) for n, _ in chosen_patterns):
        raise BadInputError(f"the kernels need N:M with N a power of two, not {patterns!r}")
    options = {
        "m_values": _parse_ints("--m", m_values), "sizes": _parse_ints("--sizes", sizes),
        "shapes": _parse_shapes(shapes), "dtypes": chosen_dtypes, "patterns": chosen_patterns,
    }  # fmt: skip
    if model and not pathlib.Path(model).is_file():
        raise BadInputError(f"--model {model}: no such file")
    try:
        from spa_compiler.kernels import benchmark
    except ImportError as error:
        raise BadInputError(
            f"spa bench kernels needs torch and triton ({error.name} is missing)"
        ) from None
    try:
        data = benchmark.run(**options, model=model, timing=timing,
                             log=lambda line: click.echo(line, err=True))  # fmt: skip
    except benchmark.NoGPUError as error:
        raise BadInputError(str(error)) from None
    click.echo(benchmark.table(data))
    if json_path:
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        write_atomic(pathlib.Path(json_path), text.encode())
    if plot_path:
        write_atomic(pathlib.Path(plot_path), benchmark.plot(data))


@cli.command(name="verify-nm")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--nm", "nm_pattern", required=True, metavar="N:M", help="The pattern, e.g. 2:4.")
def verify_nm(model: str, nm_pattern: str) -> None:
    """Check that every eligible weight of MODEL is N:M sparse; exit 1 on any violation."""
    import spa_compiler
    from spa_compiler.nm import weight_violations
    from spa_compiler.passes.sparsify_nm import find_targets

    n, m = _parse_pattern(nm_pattern)
    found = find_targets(spa_compiler.load(model).graph, m)  # shapes inferred, as compile
    rows, bad = [], 0
    for target in found.targets:
        groups, violations = weight_violations(target, n, m)
        bad += violations > 0
        status = "ok" if not violations else f"{violations} of {groups} groups over {n}"
        rows.append(
            [target.constant.name, str(list(target.constant.shape)), str(target.axis), status]
        )
    rows += [[name, "-", "-", f"not eligible: {why}"] for name, why in found.skipped]
    click.echo(format_table(rows, ["weight", "shape", "axis", f"{n}:{m}"]))
    click.echo(f"{len(found.targets) - bad} of {len(found.targets)} eligible weights are {n}:{m}")
    if bad:
        raise click.exceptions.Exit(EXIT_FAILURE)


def _parse_round_to(text: str) -> int | str:
    from spa_compiler.errors import BadInputError

    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BadInputError(f"--round-to takes a positive integer or auto, not {text!r}")
    return value


def _parse_pattern(text: str | None) -> tuple[int, int] | None:
    from spa_compiler.errors import BadInputError
    from spa_compiler.nm import check_pattern

    if text is None:
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
        check_pattern(n, m)
    except ValueError:
        raise BadInputError(
            f"--nm takes N:M with M in 4, 8, 16 and 0 < N < M, not {text!r}"
        ) from None
    return n, m


def _parse_range(text: str | None) -> tuple[float, float] | None:
    from spa_compiler.errors import BadInputError

    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"--input-range takes LOW,HIGH (two numbers), not {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise BadInputError(f"--input-range needs finite LOW < HIGH, not {text!r}")
    return low, high


def _input_files(source: pathlib.Path) -> set[pathlib.Path]:
    """The model file and the external-data files it names (resolved)."""
    import onnx

    from spa_compiler.ir import iter_tensors

    files = {source.resolve()}
    try:
        proto = onnx.load(str(source), load_external_data=False)
    except Exception:  # unreadable input: the compile itself reports it
        return files
    for tensor in iter_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                with contextlib.suppress(OSError, ValueError):  # the loader refuses it later
                    files.add((source.parent / entry.value).resolve())
    return files


def _check_output_paths(
    source: pathlib.Path,
    protected: set[pathlib.Path],
    output: str,
    save_plan: str | None,
    report: str | None,
    force: bool,
    compressed: str | None = None,
    external: bool = False,
) -> None:
    """Outputs never overwrite the input model (``protected``: it and its external data
    files), or each other."""
    from spa_compiler.errors import BadInputError
    from spa_compiler.io import data_file_for

    seen: dict[pathlib.Path, str] = {}
    data_file = str(data_file_for(pathlib.Path(output)))
    for option, path in (
        ("-o", output),
        ("-o's external data", data_file if external else None),
        ("--save-plan", save_plan),
        ("--report", report),
        ("--export-compressed", compressed),
    ):
        if not path:
            continue
        resolved = pathlib.Path(path).resolve()
        if resolved in seen:
            raise BadInputError(f"{option} and {seen[resolved]} name the same file '{path}'")
        seen[resolved] = option
        if resolved in protected and not (
            option == "-o" and force and resolved == source.resolve()
        ):
            what = "the input model" if resolved == source.resolve() else "input external data"
            hint = "; choose another output or --force" if option == "-o" else ""
            raise BadInputError(f"{option} {path}: is {what}{hint}")


def _show_spa_warnings_on_one_line() -> None:
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SpaWarning):
            click.echo(f"spa: warning: {' '.join(str(message).split())}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    with warnings.catch_warnings():
        _show_spa_warnings_on_one_line()
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        code = cli.main(args=argv, prog_name="spa", standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except click.exceptions.Abort:
        click.echo("spa: aborted", err=True)
        return EXIT_FAILURE
    except click.exceptions.ClickException as error:
        click.echo(f"spa: {error.format_message()}", err=True)
        return EXIT_BAD_INPUT if error.exit_code == 2 else error.exit_code
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except SpaError as error:
        click.echo(f"spa: error: {error}", err=True)
        return error.exit_code
    except KeyboardInterrupt:
        click.echo("spa: interrupted", err=True)
        return 130
    except Exception as error:  # the last line of defence against a traceback
        if os.environ.get("SPA_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        click.echo(
            f"spa: internal error: {type(error).__name__}: {message[:300]} "
            "(set SPA_DEBUG=1 for a traceback)",
            err=True,
        )
        return EXIT_FAILURE
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
