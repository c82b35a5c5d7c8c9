"""The ``spa`` command line. Errors end in one line on stderr and a documented exit code:
0 success, 1 internal error, 2 bad input or bad arguments."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from spa_compiler.errors import EXIT_BAD_INPUT, EXIT_FAILURE, SpaError


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="spa", standalone_mode=False)
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
