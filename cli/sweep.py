"""``probe sweep`` and ``probe report``: probes across checkpoints, and the figures drawn again from results."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

import probecore
from probecore.errors import DataError
from probecore.feature_cache import FeatureCache
from probecore.probe import FitOptions
from probecore.reduction import ReductionPolicy

from .models import model_source
from .output import console, progress_bars, user_errors
from .run import FIT, POLICY, default_cache_dir, image_preprocessing, parse_floats


def sweep_command(
    models: list[str] = typer.Argument(
        ..., help="Checkpoints in training order: ONNX files (e.g. ckpt_*.onnx) or package.module:function references.",
        show_default=False,
    ),
    data: Path = typer.Option(..., "--data", help="A .npz file or an image folder, as for `probe run`."),
    out: Path = typer.Option(Path("sweep"), "--out", help="Directory for sweep.json, sweep.csv, heatmap.png, report.html."),
    layers: str = typer.Option(None, "--layers", help="Names, globs or op types, as for `probe run`; the same in every checkpoint."),
    max_features: int = typer.Option(POLICY.max_features, help="Reduce layers with more features than this."),
    global_pool: bool = typer.Option(False, "--global-pool", help="Pool each feature map to one value per channel."),
    l2: str = typer.Option(",".join(f"{value:g}" for value in FIT.l2_path), help="L2 strengths, as for `probe run`."),
    batch_size: int = typer.Option(256, min=1, help="Samples per forward pass."),
    seed: int = typer.Option(0, min=0, help="Seed for the data split and the random feature subsets."),
    device: str = typer.Option("auto", help="auto (CUDA when it works), cpu, or cuda."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep features in memory only; reuse nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
) -> None:
    """Probe the same layers of every checkpoint on one data set: a layer x checkpoint grid of probe errors.

    Example: probe sweep ckpt_*.onnx --data data.npz --out sweep/
    """
    with user_errors():
        policy = ReductionPolicy(max_features=max_features, global_pool=global_pool, seed=seed)
        cache = None if no_cache else FeatureCache(default_cache_dir())
        entries = probecore.parse_layer_spec(layers) if layers else None
        tracker = None
        for index, model in enumerate(models):
            with model_source(model, device) as source:
                if tracker is None:  # one data pipeline for every checkpoint
                    preprocessing = image_preprocessing(source) if data.is_dir() else None
                    dataset = probecore.load_dataset(data, seed=seed, preprocessing=preprocessing)
                    fit = FitOptions(l2=parse_floats(l2, "--l2"))
                    tracker = probecore.ProbeTracker(dataset, entries, policy, fit, batch_size, cache=cache)
                with progress_bars(quiet) as progress:
                    tracker.progress = progress
                    report = tracker.record(_label(model), source)
            report.settings["source"]["model"] = str(model)
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
    table.add_column("layer")
    for checkpoint in sweep.checkpoints:
        table.add_column(checkpoint, justify="right")
    for name, row in zip(sweep.layers, sweep.grid()):
        table.add_row(name, *("" if value != value else f"{100 * value:.1f}" for value in row))
    return table


def _label(model: str) -> str:
    return Path(model).stem if not str(model).count(":") else str(model)
