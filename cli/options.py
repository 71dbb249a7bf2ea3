"""The options ``probe run`` and ``probe sweep`` share, defined once, and the ``RunSpec`` they make."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import typer

from probecore.errors import DataError
from probecore.probe import FitOptions
from probecore.reduction import ReductionPolicy
from probecore.run_spec import DataSpec, RunSpec

from .output import user_errors

# Option defaults come from the library's own, so the CLI and the API never disagree.
POLICY, FIT, SPEC = ReductionPolicy(), FitOptions(), RunSpec()


def _shared(
    data: Path = typer.Option(
        ..., "--data", help="A .npz file with x_train, y_train, x_test, y_test (x_valid, y_valid optional), or x, y; "
        "or an image folder with one subfolder per class.",
    ),
    layers: str = typer.Option(
        None, "--layers", help="Comma-separated names, globs or op types, e.g. 'relu*,logits' or 'op:Relu,Add' (the "
        "same in every checkpoint of a sweep). Default: the input, activations, pooling, residual additions and "
        "outputs.",
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
    batch_size: int = typer.Option(SPEC.batch_size, min=1, help="Samples per forward pass."),
    layers_per_pass: int = typer.Option(
        None, min=1, help="Expose at most this many layers per pass over the data (more passes, less memory).",
        show_default=False,
    ),
    seed: int = typer.Option(SPEC.seed, min=0, help="Seed for the data split and the random feature subsets."),
    valid_fraction: float = typer.Option(
        SPEC.valid_fraction, help="Share of the samples held out to choose the L2 strength (x/y data)."
    ),
    test_fraction: float = typer.Option(SPEC.test_fraction, help="Share of the samples held out for testing (x/y data)."),
    device: str = typer.Option(SPEC.device, help="auto (CUDA when it works), cpu, or cuda."),
    fit_device: str = typer.Option(
        SPEC.fit_device, help="Where the probes are fitted: auto (on CUDA when the model runs there and "
        "onnxruntime can use it), cpu, or cuda.",
    ),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", help="Where extracted features are kept for later runs "
        "[default: $PROBECORE_CACHE_DIR or ~/.cache/probecore].", show_default=False,
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep features in memory only; reuse nothing."),
    cache_float16: bool = typer.Option(False, "--cache-float16", help="Store cached features as float16 (half the disk)."),
    image_size: int = typer.Option(
        None, help="Image folders: crop size, when the model input does not fix it [default: 224].", show_default=False
    ),
    resize: int = typer.Option(
        None, help="Image folders: short side before the center crop [default: size*256/224].", show_default=False
    ),
    pixel_scale: float = typer.Option(1 / 255, help="Image folders: pixel values are multiplied by this first."),
    pixel_mean: str = typer.Option("0", help="Image folders: subtracted after scaling, e.g. '0.485,0.456,0.406'."),
    pixel_std: str = typer.Option("1", help="Image folders: divided by last, e.g. '0.229,0.224,0.225'."),
) -> RunSpec:
    """The one definition of the shared options; the ``RunSpec`` they say."""
    policy = ReductionPolicy(
        max_features=max_features, pool=pool, global_pool=global_pool, channels_last=channels_last,
        enabled=not no_reduce, seed=seed, tokens=tokens,
    )  # fmt: skip
    images = DataSpec(
        str(data), image_size=image_size, resize=resize, pixel_scale=pixel_scale,
        pixel_mean=parse_floats(pixel_mean, "--pixel-mean"), pixel_std=parse_floats(pixel_std, "--pixel-std"),
    )  # fmt: skip
    return RunSpec(
        data=images, layers=layers or None, policy=policy, fit=FitOptions(l2=parse_floats(l2, "--l2"), threads=threads),
        valid_fraction=valid_fraction, test_fraction=test_fraction, batch_size=batch_size,
        layers_per_pass=layers_per_pass, control_task=control, cache_dir=None if no_cache else cache_dir or default_cache_dir(),
        cache_dtype="float16" if cache_float16 else "float32", device=device, fit_device=fit_device, seed=seed,
    )  # fmt: skip


def _engine(
    ray: str = typer.Option(
        None, "--ray", help="Extract and fit on a Ray cluster: auto (the one `ray start` runs here), local (start one "
        "on this machine) or its address, host:port or ray://host:port. Needs probecore[ray]; the model, data "
        "folders and --cache-dir at the same paths on every node.", show_default=False,
    ),
):
    """Where the run's work happens: this process, or a Ray cluster (Ray is imported only then)."""
    if ray is None:
        return None
    from probecore.backends.ray_engine import RayEngine

    return RayEngine(ray)


SHARED = list(inspect.signature(_shared, eval_str=True).parameters.values())
ENGINE = list(inspect.signature(_engine, eval_str=True).parameters.values())


def with_run_options(command):
    """Give ``command`` the shared options (after its own, in its --help); it receives them as one
    ``spec: RunSpec`` and an ``engine`` (None: this process), made before it runs, a bad value being one line
    on stderr."""
    own = inspect.signature(command, eval_str=True)
    kept = [parameter for parameter in own.parameters.values() if parameter.name not in ("spec", "engine")]

    @functools.wraps(command)
    def with_spec(**values):
        shared = {parameter.name: values.pop(parameter.name) for parameter in SHARED}
        where = {parameter.name: values.pop(parameter.name) for parameter in ENGINE}
        with user_errors():
            spec, engine = _shared(**shared), _engine(**where)
        return command(spec=spec, engine=engine, **values)

    with_spec.__signature__ = own.replace(parameters=[*kept, *SHARED, *ENGINE])
    return with_spec


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
