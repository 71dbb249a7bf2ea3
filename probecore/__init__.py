"""probecore: at which layer does the information you care about become linearly readable?

Linear softmax probes (Alain & Bengio, 2016) fitted on the frozen activations of every layer. The core is
numpy in, numpy out; models come in through an ``ActivationSource`` (``probecore.backends.onnx_source`` for
ONNX files, ``ArraySource`` for activations you already have).

    import probecore
    from probecore.backends.onnx_source import OnnxSource

    dataset = probecore.load_dataset("data.npz")
    report = probecore.run_probes(OnnxSource("model.onnx"), dataset, probecore.RunSpec(layers="op:Relu"))
    report.write("results/")
"""

from .datasets import Dataset, Split, load_dataset, pack_inputs, split_dataset
from .diagnostics import DiagnosticOptions, Finding, diagnose
from .errors import (
    CacheError, DataError, ExtraNotInstalledError, LayerSelectionError, ModelError, OutputError, ProbeError,
    ReductionError,
)  # fmt: skip
from .feature_cache import FeatureCache
from .layers import parse_layer_spec, select_layers
from .engine import Engine, LocalEngine
from .extraction import ExtractedFeatures, ExtractionPlan, extract_features, plan_extraction
from .pipeline import run_probes
from .probe import FitOptions, PathPoint, Probe, fit_probe, fit_probes
from .reduction import Reduction, ReductionPolicy, plan_reduction
from .run_spec import DataSpec, RunSpec
from .report import LayerResult, ProbeReport
from .softmax import SplitMetrics
from .source import ActivationSource, ArraySource, LayerInfo, ReducingSource
from .sweep import ProbeTracker, SweepReport, run_sweep

__version__ = "0.1.0"

__all__ = [
    "ActivationSource",
    "ArraySource",
    "DataSpec",
    "DiagnosticOptions",
    "Engine",
    "ExtractionPlan",
    "LocalEngine",
    "RunSpec",
    "plan_extraction",
    "Finding",
    "ProbeTracker",
    "SweepReport",
    "diagnose",
    "run_sweep",
    "CacheError",
    "DataError",
    "Dataset",
    "ExtraNotInstalledError",
    "ExtractedFeatures",
    "FeatureCache",
    "FitOptions",
    "LayerInfo",
    "LayerResult",
    "LayerSelectionError",
    "PathPoint",
    "ModelError",
    "OutputError",
    "Probe",
    "ProbeError",
    "ProbeReport",
    "Reduction",
    "ReductionError",
    "ReducingSource",
    "ReductionPolicy",
    "Split",
    "SplitMetrics",
    "extract_features",
    "fit_probe",
    "fit_probes",
    "load_dataset",
    "pack_inputs",
    "parse_layer_spec",
    "plan_reduction",
    "run_probes",
    "select_layers",
    "split_dataset",
]
