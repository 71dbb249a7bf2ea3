"""``probe run`` and ``probe demo``: probe every chosen layer and write report.json and probes.csv."""

from __future__ import annotations

from pathlib import Path

import typer

import probecore
from probecore.errors import DataError
from probecore.images import ImagePreprocessing
from probecore.report import check_writable
from probecore.run_spec import DataSpec, RunSpec

from .models import model_source
from .options import with_run_options
from .output import console, print_summary, progress_bars, user_errors


@with_run_options
def run_command(
    model: str = typer.Argument(
        ..., help="The ONNX model file, or package.module:function returning a Keras model or (torch module, "
        "example input).", show_default=False,
    ),
    out: Path = typer.Option(Path("results"), "--out", help="Directory for report.json and probes.csv."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the table."),
    *,
    spec: RunSpec,
    engine=None,
) -> None:
    """Fit a linear probe on every chosen layer of MODEL and report its loss and error per split.

    Example: probe run model.onnx --data data.npz --out results/ --layers 'op:Relu,Add'
    """
    with user_errors():
        probe_and_write(model, out, spec, engine, quiet=quiet, as_json=as_json)


def demo_command(
    out: Path = typer.Option(Path("probe-demo"), "--out", help="Directory for report.json and probes.csv."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
) -> None:
    """Probe the bundled MNIST convnet (the paper's Figure 2 model) on 5 000 bundled MNIST digits.

    Needs no download: the model and the digits ship inside the package.
    """
    from probecore.bundled import DEMO_DATA, DEMO_MODEL

    with user_errors():  # features in memory: the demo leaves no cache
        probe_and_write(DEMO_MODEL, out, RunSpec(data=DataSpec(DEMO_DATA)), quiet=quiet)


def image_preprocessing(source, data: DataSpec):
    """Preprocessing that fits the model's image input: layout and channels from (N, C, H, W) or (N, H, W, C)."""
    dims = source.input_dims
    if dims is None or len(dims) != 4 or not ({dims[1], dims[3]} & {1, 3}):
        raise DataError(
            f"an image folder needs a model whose input is images, (N, 3, H, W) or (N, H, W, 3); model input "
            f"{source.input_name!r} is {dims}; pass a .npz file instead"
        )
    channels_last = dims[1] not in (1, 3)
    channels = dims[3] if channels_last else dims[1]
    fixed, size = _image_size(source), data.image_size
    if size is not None and fixed is not None and size != fixed:
        raise DataError(f"--image-size {size} does not fit model input {source.input_name!r}, which takes {fixed}")
    return ImagePreprocessing(
        size=size or fixed or 224, resize=data.resize, scale=data.pixel_scale, mean=data.pixel_mean, std=data.pixel_std,
        channels_last=channels_last,
        grayscale=channels == 1,
    )  # fmt: skip


def _image_size(source) -> int | None:
    """The image size the model's input fixes, or None where it takes any size."""
    dims = source.input_dims
    height = dims[1] if dims[1] not in (1, 3) else dims[2]
    return height if isinstance(height, int) and height > 0 else None


def image_size_note(source, size: int | None) -> str | None:
    """The one line that says an open model input's image size came from a default, not from the model."""
    if size is not None or _image_size(source) is not None:
        return None
    return f"model input {source.input_name!r} takes any image size: images are cropped to 224x224 (--image-size to change)"


def probe_and_write(
    model: str | Path, out: Path, spec: RunSpec, engine=None, quiet: bool = False, as_json: bool = False
) -> None:
    """Load, probe, write the results, then show them; nothing is written unless everything succeeded."""
    check_writable(out)
    with model_source(model, spec.device) as source:
        dataset, preprocessing = load_data(source, spec, quiet or as_json)
        with progress_bars(quiet or as_json) as progress:
            report = probecore.run_probes(source, dataset, spec, progress, engine)
    report.settings["source"]["model"] = str(model)  # the reference, not its temporary export
    if preprocessing is not None:
        skipped = dataset.train.x.skipped
        report.settings["images"] = {**preprocessing.describe(), "unreadable_skipped": [str(path) for path, _ in skipped]}
    from probecore.render import report_figures  # matplotlib loads only here

    report.write(out, report_figures(report))
    if as_json:
        print(report.to_json())
    elif not quiet:
        print_summary(report)
        console.print(f"wrote {out / 'report.json'}, probes.csv, errors.png and report.html")


def load_data(source, spec: RunSpec, quiet: bool):
    """``spec.data`` split as ``spec`` says, an image folder preprocessed to fit ``source``'s input (said in one
    line where its size is a default); and that preprocessing (None for a .npz file)."""
    path = Path(spec.data.path)
    preprocessing = image_preprocessing(source, spec.data) if path.is_dir() else None
    note = image_size_note(source, spec.data.image_size) if preprocessing is not None else None
    if note and not quiet:
        console.print(note, highlight=False)
    dataset = probecore.load_dataset(
        path, spec.valid_fraction, spec.test_fraction, seed=spec.seed, preprocessing=preprocessing
    )
    return dataset, preprocessing
