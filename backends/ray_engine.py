"""A Ray engine: extraction sharded over a cluster with Ray Data, probes fitted as Ray tasks; the report is the
one ``LocalEngine`` gives. Needs ``probecore[ray]``; nothing else in probecore imports Ray.

    engine = RayEngine("auto")                 # the running cluster (`ray start --head` ...); "local": start one here
    report = probecore.run_probes(source, dataset, spec, engine=engine)

Extraction: each split's rows are cut into shards (a multiple of the batch size, so batches are the ones a local
run makes); a Ray Data ``map_batches`` over the shards runs a pool of actors, each holding one copy of the source
(an ``OnnxSource`` builds its onnxruntime session once per actor). With a cache, every shard is a cache entry
of its own: a shard whose actor is killed is redone (Ray restarts the actor and retries it) from the rows it
had written, and a run whose driver died resumes from every finished shard. Fitting: one task per layer, on
``fit_cpus`` CPUs with BLAS capped to as many threads, retried if its worker dies. The model file, the cache
directory and image folders must be reachable at the same paths on every node (a shared file system); the
inputs of .npz data travel through Ray's object store.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np

from probecore.errors import ExtraNotInstalledError, ProbeError
from probecore.extraction import (
    ExtractionPlan, add_task_result, empty_features, reduced_batches, rows_from, through_cache,
)  # fmt: skip
from probecore.probe import fit_probe, largest_first


def _ray():
    try:
        import ray
    except ImportError:
        raise ExtraNotInstalledError("Ray is not installed; install it with: pip install 'probecore[ray]'") from None
    return ray


class RayEngine:
    """Runs extraction and fitting on the Ray cluster at ``address`` ("auto": the one running on this machine's
    network, as ``ray start`` left it; "local": a new one on this machine; or ``ray://host:port``/``host:port``).

    ``actors``: extraction actors (default: one per CPU of the cluster, less one for Ray Data's own work);
    ``fit_cpus``: CPUs (and BLAS threads) per fit; ``shard_batches``: batches per shard (default: enough for
    about four shards per actor and split)."""

    def __init__(self, address: str = "auto", actors: int | None = None, fit_cpus: int = 1, shard_batches: int | None = None):
        _ray()  # a missing extra is said before any work
        self.address, self.actors, self.fit_cpus, self.shard_batches = address, actors, fit_cpus, shard_batches
        self._connected = False
        self.shard_log: list[dict] = []  # the last extraction's shards: split, rows, node, device (report.json)

    def _connect(self):
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=None if self.address == "local" else self.address, logging_level="ERROR",
                         log_to_driver=False)  # fmt: skip
            except ConnectionError as exc:
                raise ProbeError(
                    f"cannot reach a Ray cluster at {self.address!r} ({str(exc).splitlines()[0]}); start one with "
                    "`ray start --head`, or pass --ray local"
                ) from None
        if not self._connected:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            self._connected = True
        return ray

    def _actor_count(self, resources: dict, gpus: int) -> int:
        if gpus:  # one actor per GPU: each holds its own session on its device
            return self.actors or int(resources.get("GPU", 0))
        return self.actors or max(1, int(resources.get("CPU", 1)) - 1)

    def extract(self, source, plan: ExtractionPlan, progress=None):
        ray = self._connect()
        progress = progress or (lambda *args: None)
        # on the cluster's GPUs when it has some and the source may use one (an OnnxSource not held to "cpu")
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0) >= 1 and getattr(source, "device", "cpu") != "cpu")
        actors = self._actor_count(resources, gpus)
        shards = self.shards(plan, actors)
        plan_ref = ray.put(plan)
        rows = ray.data.from_items(shards, override_num_blocks=len(shards))
        extracted_shards = rows.map_batches(
            ShardExtractor, fn_constructor_args=(source, plan_ref), batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(shards))), num_cpus=1, num_gpus=gpus,
        )  # fmt: skip
        parts: dict[tuple[int, str], dict[int, dict]] = {}
        extracted = empty_features(plan)
        done, self.shard_log = 0, []
        for batch in extracted_shards.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            index, split, start = int(batch["group"][0]), str(batch["split"][0]), int(batch["start"][0])
            arrays = pickle.loads(batch["features"][0])
            parts.setdefault((index, split), {})[start] = arrays
            extracted.splits_from_cache += int(batch["from_cache"][0])
            done += int(batch["stop"][0]) - start
            self.shard_log.append({"group": index, "split": split, "rows": [start, int(batch["stop"][0])],
                                   "node": str(batch["node"][0]), "device": str(batch["device"][0]),
                                   "from_cache": bool(batch["from_cache"][0])})  # fmt: skip
            progress("extract", done, plan.total_samples, f"{split}, {len(self.shard_log)}/{len(shards)} shards")
        for (index, split), by_start in parts.items():
            ordered = [by_start[start] for start in sorted(by_start)]
            add_task_result(extracted, plan, index, split, {name: np.concatenate([part[name] for part in ordered])
                                                              for name in ordered[0]})  # fmt: skip
        return extracted

    def shards(self, plan: ExtractionPlan, actors: int) -> list[dict]:
        """(group, split, start, stop) of every shard: rows in whole batches, about four shards per actor."""
        shards = []
        for index, split in plan.tasks():
            n = len(plan.inputs[split])
            batches = self.shard_batches or max(1, math.ceil(n / plan.batch_size / (4 * actors)))
            step = batches * plan.batch_size
            shards += [{"group": index, "split": split, "start": start, "stop": min(start + step, n)}
                       for start in range(0, n, step)]  # fmt: skip
        return shards

    def fit(self, train, train_labels, n_classes, valid, valid_labels, options, done=None, evaluator=None):
        if evaluator is not None:
            raise ProbeError("the Ray engine fits probes on its workers' CPUs; use --fit-device auto or cpu with --ray")
        ray = self._connect()
        options = dataclasses.replace(options, threads=1, blas_threads=self.fit_cpus)
        remote = ray.remote(num_cpus=self.fit_cpus, max_retries=3, retry_exceptions=False)(fit_probe)
        labels = ray.put(train_labels), ray.put(valid_labels)
        pending = {
            remote.options(name=f"fit {name}").remote(
                ray.put(np.asarray(train[name])), labels[0], n_classes,
                None if valid is None else ray.put(np.asarray(valid[name])), labels[1], options,
            ): name
            for name in largest_first(train)  # Ray starts them about in this order
        }  # fmt: skip
        probes = {}
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(finished[0])
            probes[name] = ray.get(finished[0])
            if done is not None:
                done(name, probes[name])
        return {name: probes[name] for name in train}

    def describe(self) -> dict:
        ray = self._connect()
        resources = ray.cluster_resources()
        return {"kind": "ray", "address": self.address, "nodes": len([n for n in ray.nodes() if n["Alive"]]),
                "cpus": int(resources.get("CPU", 0)), "gpus": int(resources.get("GPU", 0)),
                "fit_cpus": self.fit_cpus, "shards": self.shard_log}  # fmt: skip


class ShardExtractor:
    """A Ray Data actor: one copy of the source (one model session), running shard after shard of the plan."""

    def __init__(self, source, plan_ref):
        import ray

        self.source, self.plan = source, ray.get(plan_ref)

    def __call__(self, batch: dict) -> dict:
        index, split = int(batch["group"][0]), str(batch["split"][0])
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        plan = self.plan
        x = rows_from(plan.inputs[split], start, stop)
        batches = reduced_batches(self.source, plan, index, split)
        if plan.cache is not None:
            key = {**plan.cache_keys[index, split], "rows": [start, stop]}
            arrays, from_cache = through_cache(plan.cache, key, x, batches, lambda n: None)
            arrays = {name: np.array(values) for name, values in arrays.items()}  # out of the memory map
        else:
            parts = list(batches(x))
            arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
            from_cache = False
        import ray

        device = getattr(self.source, "provider", None) or "host"  # an OnnxSource's onnxruntime provider
        return {**{k: batch[k] for k in ("group", "split", "start", "stop")},
                "node": np.array([ray.get_runtime_context().get_node_id()]), "device": np.array([device]),
                "from_cache": np.array([from_cache]), "features": np.array([pickle.dumps(arrays, protocol=5)], dtype=object)}  # fmt: skip
