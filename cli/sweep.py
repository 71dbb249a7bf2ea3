"""``probe sweep`` and ``probe report``: probes across checkpoints, and the figures drawn again from results."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

import probecore
from probecore.errors import DataError
from probecore.labels import shorten_middle
from probecore.report import check_writable
from probecore.run_spec import RunSpec

from .models import model_source
from .options import with_run_options
from .output import console, progress_bars, user_errors
from .run import load_data


class CheckpointOrder(str, Enum):
    natural = "natural"
    given = "given"


@with_run_options
def sweep_command(
    models: list[str] = typer.Argument(
        ..., help="Checkpoints: ONNX files (e.g. ckpt_*.onnx) or package.module:function references, put in "
        "training order by --order.", show_default=False,
    ),
    out: Path = typer.Option(Path("sweep"), "--out", help="Directory for sweep.json, sweep.csv, heatmap.png, report.html."),
    order: CheckpointOrder = typer.Option(
        CheckpointOrder.natural, "--order", help="natural: by the numbers in the checkpoint names, compared as "
        "numbers (ckpt_2 before ckpt_10, which the shell's ckpt_*.onnx puts after it), kept as given when some "
        "name holds no number; given: as listed.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
    *,
    spec: RunSpec,
    engine=None,
) -> None:
    """Probe the same layers of every checkpoint on one data set: a layer x checkpoint grid of probe errors.

    Example: probe sweep ckpt_*.onnx --data data.npz --out sweep/
    """
    models, used_order, why = checkpoint_order(models, order.value)
    if not quiet:
        labels = _listing([_label(model) for model in models])
        console.print(f"checkpoint order {used_order} ({why}): {labels}", highlight=False, soft_wrap=True)
    with user_errors():
        check_writable(out)
        tracker = None
        for index, model in enumerate(models):
            with model_source(model, spec.device) as source:
                if tracker is None:  # one data pipeline for every checkpoint
                    dataset, _ = load_data(source, spec, quiet)
                    tracker = probecore.ProbeTracker(dataset, spec, engine=engine)
                with progress_bars(quiet) as progress:
                    tracker.progress = progress
                    report = tracker.record(_label(model), source)
            report.settings["source"]["model"] = str(model)
            report.settings["source"]["checkpoint_order"] = used_order
            if not quiet:
                best = min(report.layers, key=lambda layer: layer.metrics["test"].error)
                console.print(f"[{index + 1}/{len(models)}] {_label(model)}: best layer {best.name} "
                              f"({100 * best.metrics['test'].error:.1f}% test error)", highlight=False)  # fmt: skip
        from probecore.render import sweep_figures

        tracker.sweep.write(out, sweep_figures(tracker.sweep))
    if not quiet:
        console.print(sweep_table(tracker.sweep))
        console.print(f"wrote {out / 'sweep.json'}, sweep.csv, heatmap.png, errors_last.png and report.html")


def report_command(
    results: Path = typer.Argument(..., help="A directory written by `probe run` or `probe sweep`.", show_default=False),
) -> None:
    """Draw the figures and the HTML report again from report.json (or sweep.json) in RESULTS.

    Example: probe report results/
    """
    with user_errors():
        from probecore.render import report_figures, sweep_figures
        from probecore.report import write_results

        for name, kind in (("sweep.json", "sweep"), ("report.json", "report")):
            path = results / name
            if path.is_file():
                break
        else:
            raise DataError(f"{results} holds no report.json or sweep.json; pass a directory written by `probe run` or `probe sweep`")
        check_writable(results)
        try:
            data = json.loads(path.read_text())
            if kind == "sweep":
                files = sweep_figures(probecore.SweepReport.from_dict(data))
            else:
                files = report_figures(probecore.ProbeReport.from_dict(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not a probecore {kind} ({type(exc).__name__}: {exc}); run `probe run` again") from None
        write_results(results, files)
    console.print(f"wrote {', '.join(str(results / name) for name in files)}")


def sweep_table(sweep: probecore.SweepReport) -> Table:
    table = Table(title="Probe test error % by layer (rows) and checkpoint (columns)", title_justify="left")
    table.add_column("layer", no_wrap=True)
    for checkpoint in sweep.checkpoints:
        table.add_column(checkpoint, justify="right")
    for name, row in zip(sweep.layers, sweep.grid()):
        table.add_row(shorten_middle(name, 32), *("" if value != value else f"{100 * value:.1f}" for value in row))
    return table


def checkpoint_order(models: Sequence[str], order: str = "natural") -> tuple[list[str], str, str]:
    """The checkpoints in the order to probe them, the order used (natural or given), and why, for the line
    printed.

    The shell sorts ``ckpt_*.onnx`` as text (ckpt_10 before ckpt_2), so ``natural`` sorts by the numbers in
    the names compared as numbers. A name without a number (init, final) has no place among them, so then the
    given order is kept, and said."""
    if order == "given":
        return list(models), "given", "as listed"
    unnumbered = [_label(model) for model in models if not re.search("[0-9]", _label(model))]
    if unnumbered:
        verb = "holds" if len(unnumbered) == 1 else "hold"
        return list(models), "given", f"{_listing(unnumbered)} {verb} no number to sort by; put the step in every name"
    return sorted(models, key=lambda model: natural_key(_label(model))), "natural", "by the numbers in the names"


def natural_key(name: str) -> list:
    """``name`` split into text and numbers, the numbers as ints: epoch1_step500 < epoch2_step100 <
    epoch2_step1000. Text and numbers alternate from a text part on, so keys compare part by part."""
    return [int(part) if index % 2 else part for index, part in enumerate(re.split("([0-9]+)", name))]


def _listing(names: list[str], most: int = 8) -> str:
    """Names joined with commas, the middle left out past ``most`` so the line stays readable."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[: most - 2])}, ..., {', '.join(names[-2:])} ({len(names)} in all)"


def _label(model: str) -> str:
    return Path(model).stem if not str(model).count(":") else str(model)
