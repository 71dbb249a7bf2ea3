"""What a probing run does, in one serializable value: the CLI builds it, the API takes it, a report records it,
and an engine (``engine.py``) can ship it to other processes or machines that rebuild the same run from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import CacheError, DataError, ProbeError, ReductionError
from .feature_cache import STORAGE_DTYPES, FeatureCache
from .layers import parse_layer_spec
from .probe import FitOptions
from .reduction import ReductionPolicy

FIT_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataSpec:
    """Where the samples come from and how images are preprocessed (image folders); with the run's seed and
    fractions, what loads the same dataset anywhere."""

    path: str
    image_size: int | None = None  # None: the model input's, else 224
    resize: int | None = None  # short side before the crop; None: size * 256 / 224
    pixel_scale: float = 1 / 255
    pixel_mean: tuple[float, ...] = (0.0,)
    pixel_std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        object.__setattr__(self, "path", str(self.path))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))


@dataclass(frozen=True)
class RunSpec:
    """Everything that fixes a probing run but the model: data, layers, reductions, fitting, cache, device.

    ``layers`` takes entries as ``select_layers`` does (names, globs, ``op:Type``), or one comma-separated
    string as ``--layers`` does; None probes the source's default layers. ``seed`` seeds the data split and
    the random feature subsets (it is ``policy.seed``: give it here); ``valid_fraction`` and ``test_fraction``
    split data given as one pool. ``cache_dir`` keeps the reduced
    features on disk for later runs (None: in memory only). ``layers_per_pass`` exposes at most that many
    layers per forward pass (more passes, less memory). ``control_task`` also fits each layer a probe on
    control labels at the strength its real probe chose, and reports selectivity. ``data`` and ``device``
    say how to load the data and open the model where they are not given ready (the CLI, other processes).
    ``fit_device`` says where the probes' losses are evaluated: "cpu" (numpy and numba on the host), "cuda"
    (the source's GPU fitter: ``OnnxSource.loss_evaluator``; an error where there is none) or "auto" (CUDA
    when the model runs there and a GPU fitter works, else the CPU, quietly).
    """

    data: DataSpec | None = None
    layers: tuple[str, ...] | None = None
    policy: ReductionPolicy = ReductionPolicy()
    fit: FitOptions = FitOptions()
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    batch_size: int = 256
    layers_per_pass: int | None = None
    control_task: bool = False
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    device: str = "auto"
    fit_device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(parse_layer_spec(self.layers)))
        elif self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise ReductionError(f"layers_per_pass must be at least 1, got {self.layers_per_pass}")
        if self.cache_dtype not in STORAGE_DTYPES:
            raise CacheError(f"cache storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.cache_dtype!r}")
        if self.fit_device not in FIT_DEVICES:
            raise ProbeError(f"fit device must be one of {', '.join(FIT_DEVICES)}, got {self.fit_device!r}")
        if self.seed < 0:
            raise DataError(f"seed must be zero or positive, got {self.seed}")
        if self.policy.seed not in (0, self.seed):
            raise ReductionError(f"give the seed once, as RunSpec(seed={self.policy.seed}), not in the ReductionPolicy")
        object.__setattr__(self, "policy", dataclasses.replace(self.policy, seed=self.seed))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))

    def feature_cache(self) -> FeatureCache | None:
        """The on-disk cache this run reads and fills, or None."""
        return None if self.cache_dir is None else FeatureCache(self.cache_dir, self.cache_dtype)

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples as lists) that ``from_dict`` turns back into an equal spec."""
        return _lists(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        """The spec ``to_dict`` wrote, e.g. ``report.settings["spec"]``: the same run again."""
        try:
            fields = dict(data)
            fields["policy"] = ReductionPolicy(**fields.get("policy", {}))
            fields["fit"] = FitOptions(**fields.get("fit", {}))
            if fields.get("data") is not None:
                fields["data"] = DataSpec(**fields["data"])
            return cls(**fields)
        except (TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"not a probecore run spec ({exc}); pass what RunSpec.to_dict() wrote") from None


def _lists(value):
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value

