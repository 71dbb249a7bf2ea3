"""``probe run`` and ``probe demo``: probe every chosen layer and write report.json and probes.csv."""

from __future__ import annotations

import os
from pathlib import Path

import typer

import probecore
from probecore.errors import DataError
from probecore.feature_cache import FeatureCache
from probecore.images import ImagePreprocessing
from probecore.probe import FitOptions
from probecore.report import check_writable
from probecore.reduction import ReductionPolicy

from .models import model_source
from .output import console, print_summary, progress_bars, user_errors

# Option defaults come from the library's own, so the CLI and the API never disagree.
POLICY = ReductionPolicy()
FIT = FitOptions()


def run_command(
    model: str = typer.Argument(
        ..., help="The ONNX model file, or package.module:function returning a Keras model or (torch module, "
        "example input).", show_default=False,
    ),
    data: Path = typer.Option(
        ..., "--data", help="A .npz file with x_train, y_train, x_test, y_test (x_valid, y_valid optional), or x, y; "
        "or an image folder with one subfolder per class.",
    ),
    out: Path = typer.Option(Path("results"), "--out", help="Directory for report.json and probes.csv."),
    layers: str = typer.Option(
        None, "--layers", help="Comma-separated names, globs or op types, e.g. 'relu*,logits' or 'op:Relu,Add'. "
        "Default: the input, activations, pooling, residual additions and outputs.",
    ),
    max_features: int = typer.Option(POLICY.max_features, help="Reduce layers with more features than this."),
    pool: str = typer.Option(POLICY.pool, help="Pooling for spatial and sequence tensors: avg or max."),
    global_pool: bool = typer.Option(False, "--global-pool", help="Pool each feature map to one value per channel."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Read rank-4 tensors as (N, H, W, C)."),
    no_reduce: bool = typer.Option(False, "--no-reduce", help="Probe every layer at full size."),
    tokens: str = typer.Option(
        None, "--tokens", help="Pool every sequence layer, (N, T, D), to one vector: mean, max, first or last token "
        "(padding skipped where the model takes an attention mask).", show_default=False,
    ),
    l2: str = typer.Option(
        ",".join(f"{value:g}" for value in FIT.l2_path), help="L2 strength on the probe weights (next to the mean "
        "cross-entropy); several, comma-separated, are fitted strongest first and the best on validation is kept.",
    ),
    threads: int = typer.Option(
        None, min=1, help="Probes fitted at once [default: one per available core].", show_default=False
    ),
    control: bool = typer.Option(
        False, "--control", help="Also fit each layer a probe on control labels (a fixed random class per distinct "
        "input) and report selectivity: control test error minus real test error.",
    ),
    batch_size: int = typer.Option(256, min=1, help="Samples per forward pass."),
    layers_per_pass: int = typer.Option(
        None, min=1, help="Expose at most this many layers per pass over the data (more passes, less memory).",
        show_default=False,
    ),
    seed: int = typer.Option(0, min=0, help="Seed for the data split and the random feature subsets."),
    valid_fraction: float = typer.Option(0.1, help="Share of the samples held out to choose the L2 strength (x/y data)."),
    test_fraction: float = typer.Option(0.2, help="Share of the samples held out for testing (x/y data)."),
    device: str = typer.Option("auto", help="auto (CUDA when it works), cpu, or cuda."),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", help="Where extracted features are kept for later runs "
        "[default: $PROBECORE_CACHE_DIR or ~/.cache/probecore].", show_default=False,
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep features in memory only; reuse nothing."),
    cache_float16: bool = typer.Option(False, "--cache-float16", help="Store cached features as float16 (half the disk)."),
    image_size: int = typer.Option(
        None, help="Image folders: crop size, when the model input does not fix it [default: 224].", show_default=False
    ),
    resize: int = typer.Option(None, help="Image folders: short side before the center crop [default: size*256/224].",
                               show_default=False),
    pixel_scale: float = typer.Option(1 / 255, help="Image folders: pixel values are multiplied by this first."),
    pixel_mean: str = typer.Option("0", help="Image folders: subtracted after scaling, e.g. '0.485,0.456,0.406'."),
    pixel_std: str = typer.Option("1", help="Image folders: divided by last, e.g. '0.229,0.224,0.225'."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the table."),
) -> None:
    """Fit a linear probe on every chosen layer of MODEL and report its loss and error per split.

    Example: probe run model.onnx --data data.npz --out results/ --layers 'op:Relu,Add'
    """
    with user_errors():
        policy = ReductionPolicy(
            max_features=max_features, pool=pool, global_pool=global_pool, channels_last=channels_last,
            enabled=not no_reduce, seed=seed, tokens=tokens,
        )  # fmt: skip
        cache = None if no_cache else FeatureCache(cache_dir or default_cache_dir(), "float16" if cache_float16 else "float32")
        images = {"size": image_size, "resize": resize, "scale": pixel_scale,
                  "mean": parse_floats(pixel_mean, "--pixel-mean"), "std": parse_floats(pixel_std, "--pixel-std")}  # fmt: skip
        probe_and_write(
            model, data, out, layers=layers, policy=policy, fit=FitOptions(l2=parse_floats(l2, "--l2"), threads=threads),
            control_task=control, batch_size=batch_size,
            seed=seed, fractions=(valid_fraction, test_fraction), device=device, cache=cache, images=images,
            layers_per_pass=layers_per_pass, quiet=quiet, as_json=as_json,
        )  # fmt: skip


def demo_command(
    out: Path = typer.Option(Path("probe-demo"), "--out", help="Directory for report.json and probes.csv."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
) -> None:
    """Probe the bundled MNIST convnet (the paper's Figure 2 model) on 5 000 bundled MNIST digits.

    Needs no download: the model and the digits ship inside the package.
    """
    from probecore.bundled import DEMO_DATA, DEMO_MODEL

    with user_errors():
        probe_and_write(DEMO_MODEL, DEMO_DATA, out, quiet=quiet)  # features in memory: the demo leaves no cache


def image_preprocessing(source, size=None, resize=None, scale=1 / 255, mean=(0.0,), std=(1.0,)):
    """Preprocessing that fits the model's image input: layout and channels from (N, C, H, W) or (N, H, W, C)."""
    dims = source.input_dims
    if dims is None or len(dims) != 4 or not ({dims[1], dims[3]} & {1, 3}):
        raise DataError(
            f"an image folder needs a model whose input is images, (N, 3, H, W) or (N, H, W, 3); model input "
            f"{source.input_name!r} is {dims}; pass a .npz file instead"
        )
    channels_last = dims[1] not in (1, 3)
    channels = dims[3] if channels_last else dims[1]
    fixed = _image_size(source)
    if size is not None and fixed is not None and size != fixed:
        raise DataError(f"--image-size {size} does not fit model input {source.input_name!r}, which takes {fixed}")
    return ImagePreprocessing(
        size=size or fixed or 224, resize=resize, scale=scale, mean=mean, std=std, channels_last=channels_last,
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


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise DataError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def default_cache_dir() -> Path:
    """$PROBECORE_CACHE_DIR, else probecore/ under the user's cache directory ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("PROBECORE_CACHE_DIR"):
        return Path(os.environ["PROBECORE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "probecore"


def probe_and_write(
    model: str | Path, data: Path, out: Path, *, layers: str | None = None, policy: ReductionPolicy = POLICY,
    fit: FitOptions = FIT, batch_size: int = 256, seed: int = 0, fractions: tuple[float, float] = (0.1, 0.2),
    device: str = "auto", cache: FeatureCache | None = None, images: dict | None = None,
    layers_per_pass: int | None = None, control_task: bool = False, quiet: bool = False, as_json: bool = False,
) -> None:  # fmt: skip
    """Load, probe, write the results, then show them; nothing is written unless everything succeeded."""
    check_writable(out)
    with model_source(model, device) as source:
        preprocessing = image_preprocessing(source, **(images or {})) if data.is_dir() else None
        note = image_size_note(source, (images or {}).get("size")) if preprocessing is not None else None
        if note and not (quiet or as_json):
            console.print(note, highlight=False)
        dataset = probecore.load_dataset(data, *fractions, seed=seed, preprocessing=preprocessing)
        entries = probecore.parse_layer_spec(layers) if layers else None
        with progress_bars(quiet or as_json) as progress:
            report = probecore.run_probes(
                source, dataset, entries, policy, fit, batch_size, progress, cache, layers_per_pass, control_task
            )
    report.settings["source"]["model"] = str(model)  # the reference, not its temporary export
    report.settings.update({"data": str(data), "seed": seed})
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
