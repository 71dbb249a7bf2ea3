"""Where the fitter's stopping rules come from: each strength of whole paths fitted far past convergence,
the validation loss and test error recorded after every L-BFGS iteration, and the rules replayed on them.

    python benchmarks/path_rules.py [--out traj.pkl] [--replay traj.pkl]

Paths (strongest first, each strength warm-started from the previous one's optimum, 400 to 600 iterations, no
stopping test): the demo's 7 layers, four of the ResNet-shaped workload's layers at C = 10
(``probe_workload.resnet50_workload``: layer1.0, layer2.1, layer3.2, layer4.0), and 24 random problems
(tests/test_path_guarantees.py's ``clusters``: its four shapes and two wider ones, seeds 0 to 3). For each rule
it prints how far a fit it stops is from that strength's optimum (validation loss, relative; test error,
points), at worst, and how many iterations a path needs with it (``probe._Path``'s search replayed: a look at
each strength, the settled rule where two are within the look's uncertainty, and for the chosen one).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

import probecore.probe as fitter
from probecore.lbfgs import minimize
from probecore.precondition import SpectralPreconditioner
from probecore.softmax import SoftmaxLoss

GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
SETTLED = fitter._Rule(10, fitter.SETTLED_VALID, fitter.SETTLED_OBJECTIVE)


def trajectories(splits: dict, labels: dict, n_classes: int, max_iter: int) -> list[tuple[float, np.ndarray]]:
    """Per strength: rows of (objective, validation loss, test error) after each iteration."""
    mean, scale = fitter._moments(splits["train"])
    train, valid, test = (fitter._standardized(splits[name], mean, scale) for name in ("train", "valid", "test"))
    y_train, y_valid, y_test = (np.ascontiguousarray(labels[name], np.int64) for name in ("train", "valid", "test"))
    loss = SoftmaxLoss(train, y_train, n_classes, GRID[0])
    preconditioner = SpectralPreconditioner.of(train)
    params, out = np.zeros(train.shape[1] * n_classes + n_classes), []
    for l2 in GRID:
        loss.l2, rows = l2, []

        def record(x, objective):
            weights, bias = loss.unpack(x)
            errors = (test @ weights + bias).argmax(axis=1) != y_test
            rows.append((objective, loss.held_out_loss(x, valid, y_valid), float(errors.mean())))
            return False

        guess = None if preconditioner is None else fitter._InitialInverseHessian(l2, n_classes, preconditioner)
        params = minimize(loss.value_and_grad, params, precondition=guess, max_iter=max_iter, gtol=1e-9, ftol=0.0,
                          callback=record).x  # fmt: skip
        out.append((l2, np.array(rows)))
    return out


def record_all() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from probe_workload import resnet50_workload
    from test_path_guarantees import PROBLEMS, clusters

    import probecore
    from probecore.backends.onnx_source import OnnxSource
    from probecore.bundled import DEMO_DATA, DEMO_MODEL

    paths = {}
    dataset = probecore.load_dataset(DEMO_DATA)
    source = OnnxSource(DEMO_MODEL, device="cpu")
    extracted = probecore.extract_features(source, dataset, probecore.select_layers(source.layers(), None))
    labels = {name: split.y for name, split in dataset.splits().items()}
    for name, splits in extracted.by_layer.items():
        paths[f"demo {name}"] = trajectories(splits, labels, len(dataset.classes), 500)
        print(f"demo {name}", flush=True)
    workload = resnet50_workload(10)
    labels = dict(zip(("train", "valid", "test"), workload.labels()))
    for name, *splits in workload.layers():
        if name in ("layer1.0", "layer2.1", "layer3.2", "layer4.0"):
            paths[f"resnet {name}"] = trajectories(dict(zip(("train", "valid", "test"), splits)), labels, 10, 400)
            print(f"resnet {name}", flush=True)
    for seed in range(4):
        for n, d, c, spread in [*PROBLEMS, (3000, 200, 10, 2.0), (3000, 400, 20, 1.0)]:
            x, y = clusters(np.random.default_rng(seed), 2 * n, d, c, spread)
            rows = {"train": slice(0, n), "valid": slice(n, n + n // 2), "test": slice(n + n // 2, None)}
            key = f"random seed {seed} n{n} d{2 * d} c{c} s{spread}"
            paths[key] = trajectories({k: x[r] for k, r in rows.items()}, {k: y[r] for k, r in rows.items()}, c, 600)
            print(key, flush=True)
    return paths


def stop_at(rows: np.ndarray, rule) -> int:
    """The iteration (0-based) at which ``rule`` stops the fit: ``probe._Watch``'s test."""
    objective, valid = rows[:, 0], rows[:, 1]
    for i in range(rule.window, len(rows)):
        window = valid[i - rule.window : i + 1]
        still = window.max() - window.min() <= rule.valid * valid[i]
        if still and objective[i - rule.window] - objective[i] <= rule.objective * abs(objective[i]):
            return i
    return len(rows) - 1


def worst_distance(paths: dict, rule) -> tuple[float, float]:
    """The largest relative validation-loss distance and test-error distance of a stopped fit to its optimum."""
    valid, test = 0.0, 0.0
    for path in paths.values():
        for _, rows in path:
            i = stop_at(rows, rule)
            valid = max(valid, abs(rows[i, 1] - rows[-1, 1]) / rows[-1, 1])
            test = max(test, abs(rows[i, 2] - rows[-1, 2]))
    return valid, test


def replay(path, look, uncertainty: float) -> tuple[int, int, int]:
    """``probe._Path.search`` on recorded rows: (iterations, the strength chosen, the converged fits' choice)."""
    looked = [stop_at(rows, look) for _, rows in path]
    settled = [max(stop_at(rows, SETTLED), first) for (_, rows), first in zip(path, looked)]
    done, cost, best = set(), 0, None

    def value(k):
        return path[k][1][settled[k] if k in done else looked[k], 1]

    def settle(k):
        nonlocal cost
        if k not in done:
            cost, _ = cost + settled[k] - looked[k], done.add(k)

    for k in range(len(path)):
        cost += looked[k] + 1
        if best is None:
            best = k
            continue
        u_best, u_k = (0.0 if best in done else uncertainty), uncertainty
        worse = value(k) * (1 - u_k) > value(best) * (1 + u_best)
        better = value(k) * (1 + u_k) < value(best) * (1 - u_best)
        if not (worse or better):
            settle(best), settle(k)
            better = value(k) < value(best)
        if not better:
            break
        best = k
    settle(best)
    return cost, best, int(np.argmin([rows[-1, 1] for _, rows in path]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="save the recorded paths here")
    parser.add_argument("--replay", type=Path, help="replay paths recorded earlier instead of recording")
    args = parser.parse_args()
    paths = pickle.loads(args.replay.read_bytes()) if args.replay else record_all()
    if args.out:
        args.out.write_bytes(pickle.dumps(paths))
    for name, rule in (("look", fitter.LOOK), ("settled", SETTLED)):
        valid, test = worst_distance(paths, rule)
        print(f"{name} rule {rule}: at worst {100 * valid:.2f} % from the optimum's validation loss, "
              f"{100 * test:.1f} points of test error")  # fmt: skip
    for group in ("demo", "resnet", "random"):
        chosen = {key: path for key, path in paths.items() if key.startswith(group)}
        before = sum(replay(path, SETTLED, 0.0)[0] for path in chosen.values())  # every strength settled
        after = [replay(path, fitter.LOOK, fitter.LOOK_UNCERTAINTY) for path in chosen.values()]
        wrong = [key for key, (_, best, converged) in zip(chosen, after) if
                 chosen[key][best][1][-1, 1] > 1.005 * chosen[key][converged][1][-1, 1]]  # fmt: skip
        print(f"{group}: {len(chosen)} paths, iterations settled everywhere {before}, with looks "
              f"{sum(cost for cost, _, _ in after)}; strengths more than 0.5 % off the best: {wrong or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
