"""Everything the CLI prints: user errors as one line, progress bars, and the per-layer table."""

from __future__ import annotations

import contextlib
import os
import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from probecore.errors import Interrupted, ProbeError
from probecore.labels import shorten_middle
from probecore.report import MODEL_ERROR_NOTE, ProbeReport

DEBUG_VARIABLE = "PROBECORE_DEBUG"
# Piped output is read by people too (logs, CI): give tables room instead of rich's 80-column default, unless
# COLUMNS says how wide the reader is.
console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
# No emoji codes: a path such as a:smile:b stays as written, and printing an out-of-memory error does not import
# rich's emoji table (a lazy import that itself failed for want of memory)
error_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


@contextlib.contextmanager
def user_errors():
    """Turn a ``ProbeError`` (or running out of memory) into one line on stderr and exit code 1 (a traceback
    with PROBECORE_DEBUG=1)."""
    try:
        yield
    except ProbeError as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        error_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    except MemoryError as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else "an allocation failed"
        error_console.print(
            f"error: out of memory ({detail}); no results were written; keep the feature cache on (drop --no-cache; "
            "--cache-dir DIR picks where: features go to disk and are read back memory-mapped), or probe fewer "
            "layers (--layers) or fewer features (--max-features)",
            markup=False,
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        kept = f"; {exc}" if isinstance(exc, Interrupted) else ""  # where the features extracted so far are
        error_console.print(f"interrupted; no results were written{kept}", markup=False)
        raise typer.Exit(130) from None


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``812 samples/s``; rich's own speed column counts bytes."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} {task.fields['unit']}/s" if task.speed else "", style="progress.data.speed")


@contextlib.contextmanager
def progress_bars(quiet: bool):
    """A ``progress(stage, done, total, detail)`` callback drawing rich bars, silent when quiet or not a TTY."""
    if quiet or not sys.stdout.isatty():
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    labels = {
        "extract": ("extracting activations", "samples"),
        "fit": ("fitting probes", "layers"),
        "control": ("fitting control-task probes", "layers"),
    }
    with Progress(*columns, console=console, transient=True) as bars:
        tasks = {}

        def progress(stage: str, done: int, total: int, detail: str) -> None:
            label, unit = labels[stage]
            if stage not in tasks:
                tasks[stage] = bars.add_task(label, total=total, unit=unit)
            description = f"{label} [{detail}]" if detail else label
            bars.update(tasks[stage], completed=done, total=total, description=description)

        yield progress


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


# Columns left out, in this order, until the table fits the terminal; the layer, its chosen strength, its
# errors and their interval (and the selectivity) always stay.
DROPPED_FIRST = ("loss tr/va/te", "top-5 % te", "reduction", "features used", "shape", "control err % tr/te", "op")
LAYER_NAME_MIN = 24  # a name is cut in the middle (encoder.lay...nse.output) only past this, once columns are dropped


def report_table(report: ProbeReport, width: int | None = None) -> Table:
    """Layer, shape, features, reduction, chosen L2, loss / error per split, and the control task's
    selectivity when there is one; the best test error in bold. In ``width`` columns (the console's by
    default), the less needed columns are left out and long layer names are shortened in the middle (the
    full names are in report.json)."""
    columns = _report_columns(report)
    width = console.width if width is None else width
    longest = max(len(layer.name) for layer in report.layers)
    for header in DROPPED_FIRST:
        if _table_width(columns, max(len("layer"), min(longest, LAYER_NAME_MIN))) <= width:
            break
        columns.pop(header, None)
    name_width = max(min(longest, width - _table_width(columns, 0)), min(longest, 12))
    table = Table(title="Linear probe per layer (tr/va/te: train/valid/test)", title_justify="left")
    table.add_column("layer", no_wrap=True)
    for header, (justify, _) in columns.items():
        table.add_column(header, justify=justify, no_wrap=True)
    best = min(layer.metrics["test"].error for layer in report.layers)
    for index, layer in enumerate(report.layers):
        cells = [shorten_middle(layer.name, name_width), *(cell_values[index] for _, cell_values in columns.values())]
        table.add_row(*cells, style="bold" if layer.metrics["test"].error == best else None)
    return table


def _report_columns(report: ProbeReport) -> dict[str, tuple[str, list[str]]]:
    """Every column but the layer's name: header -> (justification, one cell per layer)."""
    layers = report.layers

    def column(justify, cell):
        return justify, [cell(layer) for layer in layers]

    def splits(layer):
        return [layer.metrics[split] for split in ("train", "valid", "test")]

    def interval(layer):
        low, high = layer.metrics["test"].error_interval
        return f"{_percent(low)}-{_percent(high)}"

    columns = {  # "features used": after the reduction (report.json's features_used); `probe layers` lists the raw count
        "op": column("left", lambda layer: f"{layer.op_type} (side)" if layer.role == "side" else layer.op_type),
        "shape": column("left", lambda layer: "x".join(map(str, layer.shape))),
        "features used": column("left", lambda layer: str(layer.n_features)),
        "reduction": column("left", lambda layer: layer.reduction["description"]),
        "l2": column("right", lambda layer: "" if layer.l2 is None else f"{layer.l2:.0e}"),
        "loss tr/va/te": column("right", lambda layer: " / ".join(_loss(m.loss) for m in splits(layer))),
        "error % tr/va/te": column("right", lambda layer: " / ".join(_percent(m.error) for m in splits(layer))),
        "test err 95% CI": column("right", interval),
    }
    if any(layer.metrics["test"].top5_error is not None for layer in layers):
        columns["top-5 % te"] = column("right", lambda layer: _percent(layer.metrics["test"].top5_error))
    if any(layer.control is not None for layer in layers):
        columns["control err % tr/te"] = column("right", lambda layer: " / ".join(
            _percent(layer.control[split].error) for split in ("train", "test") if split in layer.control
        ) if layer.control else "")  # fmt: skip
        columns["selectivity"] = column("right", lambda layer: _percent(layer.selectivity))
    return columns


def _table_width(columns: dict[str, tuple[str, list[str]]], name_width: int) -> int:
    """Characters a rich table (default box) takes with a ``name_width`` layer column: each column's widest
    cell or header, plus a space on each side and a rule between columns."""
    widths = [name_width]
    widths += [max(len(header), *(len(cell) for cell in cells)) for header, (_, cells) in columns.items()]
    return sum(widths) + 3 * len(widths) + 1


def print_summary(report: ProbeReport) -> None:
    console.print(report_table(report))
    sizes = ", ".join(f"{name} {size}" for name, size in report.split_sizes.items())
    provider = report.settings.get("source", {}).get("provider")
    line = f"{len(report.layers)} layers, {len(report.classes)} classes, samples: {sizes}"
    if provider:
        line += f", onnxruntime provider: {provider}"
    console.print(line)
    cache = report.settings.get("cache")
    if cache and cache["splits_from_cache"]:
        hits = cache["splits_from_cache"]
        console.print(f"{hits} cached feature entr{'y' if hits == 1 else 'ies'} read from {cache['dir']}, without a forward pass")
    if report.model_test is not None:
        console.print(f"model's own error on the test split ({report.model_output}): {_percent(report.model_test.error)}% "
                      f"({MODEL_ERROR_NOTE})")  # fmt: skip
    skipped = report.settings.get("images", {}).get("unreadable_skipped", [])
    if skipped:
        console.print(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} (listed in report.json)")
    for finding in report.diagnostics:
        console.print(Text.assemble(("note", "yellow"), f" ({finding.kind.replace('_', ' ')}): {finding.message}"))
