"""Shared pieces of the benchmark suite: paired timing against a baseline, bundled-model fixtures, a summary.

Run with ``pytest benchmarks/`` (``pytest`` alone only collects ``tests/``). ``--benchmark-disable`` runs
every benchmark once, untimed by pytest-benchmark, so CI can smoke-test the suite; the correctness guards
still apply and the summary still prints (one-round figures, not worth quoting).

Every speed figure is a ratio against a baseline measured in the same test, round by round: each round
first runs the baseline under a plain ``time.perf_counter`` timer (pytest-benchmark's ``setup`` hook, which
it does not time), then the candidate under pytest-benchmark. Interleaving keeps both sides under the same
machine load, which matters on a shared 2-core box; ratios use the fastest round of each side.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import probecore
from probecore import bundled
from probecore.pipeline import package_versions

VERSIONED = ("probecore", "numpy", "scipy", "numba", "onnx", "onnxruntime", "onnxruntime-gpu", "scikit-learn")
_SUMMARY: list[tuple[str, dict]] = []
_LOAD_AT_START: tuple[float, float, float] | None = None


@dataclass
class Paired:
    """Wall times (seconds) of both sides, one entry per round, and the last result of each."""

    candidate_seconds: list[float] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)
    candidate_result: object = None
    baseline_result: object = None

    @property
    def candidate_min(self) -> float:
        return min(self.candidate_seconds)

    @property
    def baseline_min(self) -> float:
        return min(self.baseline_seconds)

    def figures(self) -> dict:
        return {
            "rounds": len(self.candidate_seconds),
            "candidate_min_s": round(self.candidate_min, 4),
            "candidate_median_s": round(statistics.median(self.candidate_seconds), 4),
            "baseline_min_s": round(self.baseline_min, 4),
            "baseline_median_s": round(statistics.median(self.baseline_seconds), 4),
        }


def _paired(benchmark, candidate: Callable[[], object], baseline: Callable[[], object], rounds: int) -> Paired:
    paired = Paired()

    def run_baseline():  # pytest-benchmark's setup: runs before every round and is not part of its timing
        started = time.perf_counter()
        paired.baseline_result = baseline()
        paired.baseline_seconds.append(time.perf_counter() - started)

    def run_candidate():
        started = time.perf_counter()
        result = candidate()
        paired.candidate_seconds.append(time.perf_counter() - started)
        return result

    paired.candidate_result = benchmark.pedantic(
        run_candidate, setup=run_baseline, rounds=1 if benchmark.disabled else rounds, iterations=1
    )
    return paired


@pytest.fixture
def paired(benchmark):
    """``paired(candidate, baseline, rounds)``: time both, interleaved, the candidate under pytest-benchmark."""
    return lambda candidate, baseline, rounds: _paired(benchmark, candidate, baseline, rounds)


@pytest.fixture
def record(benchmark, request):
    """``record(figures)``: store figures in the benchmark's ``extra_info`` and in the end-of-run summary."""

    def store(figures: dict) -> None:
        benchmark.extra_info.update(figures)
        _SUMMARY.append((request.node.nodeid.split("::")[-1], dict(figures)))

    return store


@pytest.fixture(scope="session")
def mnist() -> probecore.Dataset:
    """The bundled 5000 digits: 3500 train, 500 valid, 1000 test."""
    return probecore.load_dataset(bundled.DEMO_DATA)


def versions() -> dict[str, str]:
    return package_versions(VERSIONED)


def pytest_sessionstart(session):
    global _LOAD_AT_START
    _LOAD_AT_START = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["nproc"] = os.cpu_count()
    machine_info["loadavg_at_start"] = _LOAD_AT_START
    machine_info["package_versions"] = versions()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section("probecore benchmark figures")
    session = getattr(config, "_benchmarksession", None)
    disabled = session is None or session.disabled
    write(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        + ", ".join(f"{name} {version}" for name, version in versions().items())
    )
    write(f"load average at start {_LOAD_AT_START}, at end {os.getloadavg()} (other processes skew timings)")
    if disabled:
        write("--benchmark-disable: one round each, figures are a smoke test only")
    for name, figures in _SUMMARY:
        write(f"{name}: " + ", ".join(f"{key}={value}" for key, value in figures.items()))
