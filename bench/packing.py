"""How tightly Berth's scheduler packs, against known optima and two published baselines.

``python -m bench.packing [--limit N | --all] [--seeds S]``: pure computation, no cluster, no root.

1. **Hosts used vs optimum** on the vector bin packing instances of
   ``../shared/data/vector-bin-packing`` (see :mod:`bench.instances`): every bin becomes an identical
   node (as many nodes as items, so nothing is ever pending), every item a single-replica task of its
   own service, placed by ``berth.controller.scheduler.schedule()`` in one call, handed over in
   three orders (:func:`item_order`: the file's, a seeded shuffle, decreasing normalised size;
   ``schedule()`` itself places a batch largest first and then tries to free hosts, so the order
   handed over matters little for Berth; the baselines place in the order given). Hosts used =
   distinct nodes in the plan.
2. **Utilisation**: a fixed cluster (:data:`CLUSTER_NODES` nodes of :data:`NODE_CPU_MILLIS` /
   :data:`NODE_MEMORY_BYTES`) and a seeded stream of mixed task shapes; the figure is the
   cluster-wide utilisation of the bottleneck resource (:func:`bottleneck_utilisation`), taken
   *online* (one task per call in arrival order, at the first task that fits on no node) and for
   the stream as one *batch* (the plan's state, some task left pending).

Both are also run with :data:`bench.baselines.BASELINES` (Kubernetes LeastAllocated, Nomad BestFit
v3) on the same instances and streams. Readable tables go to stdout, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench import instances as inst
from bench.baselines import BASELINES, Cluster, IntArray, ScoreFn
from berth.controller.scheduler import NodeInfo, Resources, TaskRequest, schedule

BERTH = "berth"
SCHEDULERS = (BERTH, *(b.name for b in BASELINES))
ORDERS = ("given", "shuffled", "decreasing")
WITHIN_PCT = 3.0
"""An instance counts as *within* when hosts used <= optimum x (1 + 3 %)."""

DEFAULT_LIMIT = 60
"""Default instances per family (9 families with known optima): ~120-170 s on 2 cores; `--all` longer."""
DEFAULT_SEEDS = 10

GIB = 1 << 30
CLUSTER_NODES = 50
NODE_CPU_MILLIS = 32_000
NODE_MEMORY_BYTES = 128 * GIB

Order = npt.NDArray[np.intp]


# --- 1. hosts used vs optimum -----------------------------------------------------------------


def berth_nodes(capacity: Sequence[int], count: int) -> list[NodeInfo]:
    """``count`` identical empty nodes of ``capacity`` (instance units)."""
    resources = inst.to_resources(capacity)
    return [NodeInfo(id=f"n{i:04d}", name=f"n{i:04d}", capacity=resources) for i in range(count)]


def berth_tasks(items: IntArray, order: Iterable[int]) -> list[TaskRequest]:
    """One task per item, in ``order``, each its own service (``item<index>``), slot 0.

    Own services keep Berth's spread scorer and its "subtract own replicas" correction out of the
    way: items differ in size, and those assume replicas of one service ask for the same.
    """
    return [
        TaskRequest(task_id=f"t{i:04d}", service=f"item{i}", resources=inst.to_resources(items[i]))
        for i in order
    ]


def berth_hosts_used(instance: inst.Instance, order: Order, *, seed: int = 0) -> int:
    """Nodes Berth's ``schedule()`` uses for every item of ``instance`` placed in ``order``."""
    nodes = berth_nodes(instance.capacity, len(instance.items))
    plan = schedule(nodes, berth_tasks(instance.items, order), seed=seed)
    if plan.pending:
        raise RuntimeError(f"{instance.name}: {len(plan.pending)} items pending: {plan.pending[0].reason}")
    return len({placement.node_id for placement in plan.placements})


def baseline_hosts_used(instance: inst.Instance, order: Order, score: ScoreFn, *, seed: int = 0) -> int:
    """Nodes a baseline score uses for every item of ``instance`` placed in ``order``."""
    capacity = np.repeat(np.array(instance.capacity, dtype=np.int64)[:, None], len(instance.items), axis=1)
    cluster = Cluster(capacity, score, seed=seed)
    for i in order:
        if cluster.place(instance.items[i]) is None:
            raise RuntimeError(f"{instance.name}: item {i} fits nowhere")
    return cluster.hosts_used()


@dataclass
class InstanceResult:
    name: str
    family: str
    items: int
    dims: int
    optimum: int
    best_heuristic: int | None
    used: dict[str, dict[str, int]] = field(default_factory=dict)
    """scheduler -> order -> hosts used."""


def pct_over(used: int, optimum: int) -> float:
    """How far ``used`` is above ``optimum``, in % of the optimum."""
    return (used - optimum) / optimum * 100.0


def item_order(instance: inst.Instance, name: str) -> Order:
    """The order items are handed to the scheduler in.

    ``given``: the file's. ``shuffled``: a permutation seeded by the instance name (arrival in no
    particular order). ``decreasing``: :func:`bench.instances.decreasing_order`.
    """
    count = len(instance.items)
    if name == "given":
        return np.arange(count)
    if name == "shuffled":
        permutation: Order = np.random.default_rng(zlib.crc32(instance.name.encode())).permutation(count)
        return permutation
    if name == "decreasing":
        return inst.decreasing_order(instance)
    raise ValueError(f"unknown order {name!r}")


def run_packing(instances: Sequence[inst.Instance], *, seed: int = 0) -> list[InstanceResult]:
    results: list[InstanceResult] = []
    for instance in instances:
        assert instance.known.optimum is not None
        result = InstanceResult(
            instance.name,
            instance.family,
            len(instance.items),
            instance.dims,
            instance.known.optimum,
            instance.known.best_heuristic,
        )
        for order_name in ORDERS:
            order = item_order(instance, order_name)
            result.used.setdefault(BERTH, {})[order_name] = berth_hosts_used(instance, order, seed=seed)
            for baseline in BASELINES:
                used = baseline_hosts_used(instance, order, baseline.score, seed=seed)
                result.used.setdefault(baseline.name, {})[order_name] = used
        results.append(result)
    return results


def summarise(overs: Sequence[float]) -> dict[str, float | int]:
    """Mean and worst % over optimum, and how many are within :data:`WITHIN_PCT`."""
    values = np.array(overs, dtype=np.float64)
    return {
        "instances": int(values.size),
        "mean_pct_over": round(float(values.mean()), 2) if values.size else 0.0,
        "worst_pct_over": round(float(values.max()), 2) if values.size else 0.0,
        "within_3pct": int(np.count_nonzero(values <= WITHIN_PCT + 1e-9)),
    }


def groups(results: Sequence[InstanceResult]) -> dict[str, list[InstanceResult]]:
    """Family, collection and ``overall`` -> results, in display order."""
    grouped: dict[str, list[InstanceResult]] = {}
    for result in sorted(results, key=lambda r: _family_key(r.family)):
        grouped.setdefault(result.family, []).append(result)
    for result in results:
        grouped.setdefault(result.family.split("/")[0], []).append(result)
    grouped["overall"] = list(results)
    return grouped


def _family_key(family: str) -> tuple[str, int, str]:
    collection, _, sub = family.partition("/")
    digits = "".join(ch for ch in sub if ch.isdigit())
    return collection, int(digits) if digits else 0, sub


def packing_figures(results: Sequence[InstanceResult]) -> dict[str, Any]:
    """scheduler -> order -> group -> :func:`summarise`; plus the paper's best heuristic."""
    grouped = groups(results)
    figures: dict[str, Any] = {}
    for scheduler in SCHEDULERS:
        figures[scheduler] = {
            order: {
                name: summarise([pct_over(r.used[scheduler][order], r.optimum) for r in members])
                for name, members in grouped.items()
            }
            for order in ORDERS
        }
    figures["paper_best_heuristic"] = {
        name: summarise([pct_over(r.best_heuristic, r.optimum) for r in members if r.best_heuristic])
        for name, members in grouped.items()
    }
    return figures


def print_packing(figures: dict[str, Any], out: Callable[[str], None]) -> None:
    names = list(figures[BERTH]["given"])
    for order in ORDERS:
        title = {
            "given": "file order",
            "shuffled": "a seeded random order",
            "decreasing": "decreasing size (sum of s_k/c_k)",
        }[order]
        out(f"\nHosts used vs optimum: % over optimum, items in {title}")
        out("  mean / worst / within 3 % (of n)")
        header = f"{'group':<22}{'n':>4}" + "".join(f"{s:>24}" for s in SCHEDULERS) + f"{'paper best':>14}"
        out(header)
        out("-" * len(header))
        for name in names:
            cells = []
            for scheduler in SCHEDULERS:
                s = figures[scheduler][order][name]
                cells.append(
                    f"{s['mean_pct_over']:>8.1f} /{s['worst_pct_over']:>6.1f} /{s['within_3pct']:>5}"
                )
            best = figures["paper_best_heuristic"][name]
            line = f"{name:<22}{figures[BERTH][order][name]['instances']:>4}"
            line += "".join(f"{c:>24}" for c in cells) + f"{best['mean_pct_over']:>14.1f}"
            out(line)


# --- 2. utilisation at first failure ----------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A kind of task: cpu and memory drawn independently, uniformly from the listed values."""

    name: str
    weight: float
    cpu_millis: tuple[int, ...]
    memory_bytes: tuple[int, ...]


def _mib(*values: int) -> tuple[int, ...]:
    return tuple(v << 20 for v in values)


SHAPES = (
    Shape("small", 0.35, (100, 250, 500, 1000), _mib(128, 256, 512, 1024, 2048)),
    Shape("balanced", 0.25, (1000, 2000, 4000), _mib(4096, 8192, 16384)),
    Shape("cpu-heavy", 0.15, (4000, 6000, 8000, 12000), _mib(1024, 2048, 4096)),
    Shape("memory-heavy", 0.15, (500, 1000, 2000), _mib(16384, 24576, 32768, 49152)),
    Shape("large", 0.10, (8000, 12000, 16000), _mib(32768, 49152, 65536)),
)
"""The task mix (nodes have 4 GiB per core; ``balanced`` draws near that ratio)."""


def mixed_stream(seed: int, total_capacity: IntArray, shapes: Sequence[Shape] = SHAPES) -> IntArray:
    """Seeded task requests ``[task, (cpu, memory)]``, just long enough that one must fail.

    Tasks are drawn until their summed request exceeds ``total_capacity`` (cluster-wide cpu,
    memory) in some dimension, so the first failure happens at the last task or before.
    """
    rng = np.random.default_rng(seed)
    weights = np.array([s.weight for s in shapes])
    weights /= weights.sum()
    requests: list[tuple[int, int]] = []
    total = np.zeros(2, dtype=np.int64)
    while np.all(total <= total_capacity):
        shape = shapes[int(rng.choice(len(shapes), p=weights))]
        request = (int(rng.choice(shape.cpu_millis)), int(rng.choice(shape.memory_bytes)))
        requests.append(request)
        total += request
    return np.array(requests, dtype=np.int64)


def bottleneck_utilisation(capacity: IntArray, allocated: IntArray) -> float:
    """% in use of the cluster's most-used resource: ``max_d sum(allocated[d]) / sum(capacity[d])``.

    ``capacity`` and ``allocated`` are ``[dimension, node]``; dimensions with no capacity are skipped.
    """
    total_capacity = capacity.sum(axis=1)
    used = allocated.sum(axis=1)
    shares = [used[d] / total_capacity[d] for d in range(len(total_capacity)) if total_capacity[d] > 0]
    return 100.0 * float(max(shares)) if shares else 0.0


@dataclass(frozen=True)
class FirstFailure:
    placed: int
    """Tasks placed before the first that fit nowhere."""
    cpu_pct: float
    memory_pct: float
    bottleneck_pct: float


def _first_failure(capacity: IntArray, allocated: IntArray, placed: int) -> FirstFailure:
    shares = 100.0 * allocated.sum(axis=1) / capacity.sum(axis=1)
    return FirstFailure(
        placed, float(shares[0]), float(shares[1]), bottleneck_utilisation(capacity, allocated)
    )


def cluster_capacity(nodes: int = CLUSTER_NODES) -> IntArray:
    """``[2, nodes]``: identical nodes of :data:`NODE_CPU_MILLIS` and :data:`NODE_MEMORY_BYTES`."""
    return np.repeat(np.array([[NODE_CPU_MILLIS], [NODE_MEMORY_BYTES]], dtype=np.int64), nodes, axis=1)


def berth_nodes_state(capacity: IntArray, allocated: IntArray) -> list[NodeInfo]:
    """The cluster as Berth nodes, with ``allocated`` (``[2, node]``) already in use."""
    return [
        NodeInfo(
            id=f"node-{i:03d}",
            capacity=Resources(cpu_millis=int(capacity[0, i]), memory_bytes=int(capacity[1, i])),
            allocated=Resources(cpu_millis=int(allocated[0, i]), memory_bytes=int(allocated[1, i])),
        )
        for i in range(capacity.shape[1])
    ]


def stream_tasks(stream: IntArray, first: int = 0) -> list[TaskRequest]:
    """One task per request of ``stream``, each its own service (``task<index>``)."""
    return [
        TaskRequest(
            task_id=f"t{i:05d}",
            service=f"task{i}",
            resources=Resources(cpu_millis=int(cpu), memory_bytes=int(memory)),
        )
        for i, (cpu, memory) in enumerate(stream, start=first)
    ]


def berth_first_failure(capacity: IntArray, stream: IntArray, *, seed: int = 0) -> FirstFailure:
    """Online: each task its own ``schedule()`` call on the state so far, in arrival order,
    stopped at the first task that fits on no node (a one-task batch is placed as it comes)."""
    allocated = np.zeros_like(capacity)
    for i, request in enumerate(stream):
        nodes = berth_nodes_state(capacity, allocated)
        plan = schedule(nodes, stream_tasks(stream[i : i + 1], i), seed=seed)
        if plan.pending:
            return _first_failure(capacity, allocated, i)
        allocated[:, int(plan.placements[0].node_id.removeprefix("node-"))] += request
    return _first_failure(capacity, allocated, len(stream))


def berth_batch(capacity: IntArray, stream: IntArray, *, seed: int = 0) -> FirstFailure:
    """Batch: the whole stream in one ``schedule()`` call (which orders it and may move its own
    tasks); the figure is the plan's state, in which some task is left pending."""
    nodes = berth_nodes_state(capacity, np.zeros_like(capacity))
    plan = schedule(nodes, stream_tasks(stream), seed=seed)
    allocated = np.zeros_like(capacity)
    for placement in plan.placements:
        i = int(placement.task_id.removeprefix("t"))
        allocated[:, int(placement.node_id.removeprefix("node-"))] += stream[i]
    return _first_failure(capacity, allocated, len(plan.placements))


def decreasing_stream_order(capacity: IntArray, stream: IntArray) -> Order:
    """Stream indices by decreasing ``sum_d request_d / cluster capacity_d`` (stable), the order
    Berth places a batch in."""
    size = (stream / capacity.sum(axis=1)).sum(axis=1)
    order: Order = np.argsort(-size, kind="stable")
    return order


def baseline_first_failure(
    capacity: IntArray, stream: IntArray, score: ScoreFn, *, seed: int = 0
) -> FirstFailure:
    """A baseline over the stream, stopped at the first task that fits nowhere."""
    cluster = Cluster(capacity, score, seed=seed)
    for i, request in enumerate(stream):
        if cluster.place(request) is None:
            return _first_failure(capacity, cluster.allocated, i)
    return _first_failure(capacity, cluster.allocated, len(stream))


def baseline_batch(capacity: IntArray, stream: IntArray, score: ScoreFn, *, seed: int = 0) -> FirstFailure:
    """A baseline handed the whole stream as a batch in Berth's order (largest first), placing
    every task that fits (one that does not stays pending, later ones still try)."""
    cluster = Cluster(capacity, score, seed=seed)
    placed = sum(cluster.place(stream[i]) is not None for i in decreasing_stream_order(capacity, stream))
    return _first_failure(capacity, cluster.allocated, placed)


FIGURES = ("online", "batch")
"""The two utilisation figures: one task per call in arrival order, and the stream as one batch."""


def run_first_failure(seeds: Sequence[int]) -> dict[str, dict[str, list[FirstFailure]]]:
    """figure (:data:`FIGURES`) -> scheduler -> one outcome per seed."""
    capacity = cluster_capacity()
    outcomes: dict[str, dict[str, list[FirstFailure]]] = {
        figure: {name: [] for name in SCHEDULERS} for figure in FIGURES
    }
    for seed in seeds:
        stream = mixed_stream(seed, capacity.sum(axis=1))
        outcomes["online"][BERTH].append(berth_first_failure(capacity, stream, seed=seed))
        outcomes["batch"][BERTH].append(berth_batch(capacity, stream, seed=seed))
        for baseline in BASELINES:
            outcomes["online"][baseline.name].append(
                baseline_first_failure(capacity, stream, baseline.score, seed=seed)
            )
            outcomes["batch"][baseline.name].append(
                baseline_batch(capacity, stream, baseline.score, seed=seed)
            )
    return outcomes


def first_failure_figures(outcomes: dict[str, list[FirstFailure]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, runs in outcomes.items():
        values = [r.bottleneck_pct for r in runs]
        figures[name] = {
            "seeds": len(runs),
            "mean_pct": round(float(np.mean(values)), 2),
            "min_pct": round(float(np.min(values)), 2),
            "mean_cpu_pct": round(float(np.mean([r.cpu_pct for r in runs])), 2),
            "mean_memory_pct": round(float(np.mean([r.memory_pct for r in runs])), 2),
            "mean_placed": round(float(np.mean([r.placed for r in runs])), 1),
        }
    return figures


def print_first_failure(
    seeds: Sequence[int], outcomes: dict[str, dict[str, list[FirstFailure]]], out: Callable[[str], None]
) -> None:
    titles = {
        "online": "online (one task per call, arrival order, stopped at the first task that fits nowhere)",
        "batch": "batch (the whole stream in one call; baselines: the stream largest first, "
        "failures skipped)",
    }
    for figure in FIGURES:
        out(
            f"\nUtilisation, {titles[figure]}: {CLUSTER_NODES} nodes x {NODE_CPU_MILLIS // 1000} cores / "
            f"{NODE_MEMORY_BYTES // GIB} GiB, mixed stream "
            f"({', '.join(f'{s.name} {s.weight:.0%}' for s in SHAPES)})"
        )
        out("  per seed: tasks placed, cpu %, memory %, bottleneck % (= max of the two)")
        header = f"{'seed':>5}" + "".join(f"{s:>32}" for s in SCHEDULERS)
        out(header)
        out("-" * len(header))
        runs = outcomes[figure]
        for k, seed in enumerate(seeds):
            cells = []
            for name in SCHEDULERS:
                r = runs[name][k]
                cells.append(f"{r.placed:>5} {r.cpu_pct:>6.1f} {r.memory_pct:>6.1f} {r.bottleneck_pct:>6.1f}")
            out(f"{seed:>5}" + "".join(f"{c:>32}" for c in cells))
        for label, fn in (("mean", np.mean), ("min", np.min)):
            cells = [f"{float(fn([r.bottleneck_pct for r in runs[name]])):>6.1f}" for name in SCHEDULERS]
            out(f"{label:>5}" + "".join(f"{c:>32}" for c in cells))


# --- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"instances per family (default {DEFAULT_LIMIT})"
    )
    size.add_argument("--all", action="store_true", help="every instance with a known optimum")
    parser.add_argument(
        "--seeds", type=int, default=DEFAULT_SEEDS, help=f"mixed-stream seeds (default {DEFAULT_SEEDS})"
    )
    parser.add_argument("--data", type=Path, default=inst.DATA_DIR, help="instance directory")
    args = parser.parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)

    started = time.monotonic()
    catalogue = inst.load(args.data, limit=None if args.all else args.limit)
    items = sum(len(i.items) for i in catalogue.instances)
    out(
        f"{len(catalogue.instances)} instances ({items} items) of "
        f"{sum(catalogue.available.values())} with a known optimum; "
        f"{catalogue.unknown_optimum} skipped (optimum unknown)"
    )
    results = run_packing(catalogue.instances)
    packing_seconds = time.monotonic() - started
    packing = packing_figures(results)
    print_packing(packing, out)

    seeds = list(range(args.seeds))
    outcomes = run_first_failure(seeds)
    failure = first_failure_figures(outcomes["online"])
    batch_failure = first_failure_figures(outcomes["batch"])
    print_first_failure(seeds, outcomes, out)

    runtime = time.monotonic() - started
    out(f"\nruntime {runtime:.1f} s (packing {packing_seconds:.1f} s)")
    summary = {
        "hosts_over_optimum": {name: packing[name] for name in SCHEDULERS},
        "paper_best_heuristic": packing["paper_best_heuristic"],
        "utilisation_at_first_failure": failure,
        "utilisation_batch": batch_failure,
        "instances": len(catalogue.instances),
        "limit_per_family": None if args.all else args.limit,
        "seeds": args.seeds,
        "runtime_s": round(runtime, 1),
    }
    out(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
