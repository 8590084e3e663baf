"""bench.packing's pieces: the .vbp parser, the baseline scores and the first-failure figure."""

from __future__ import annotations

import numpy as np
import pytest

from bench import instances as inst
from bench.baselines import Cluster, IntArray, ScoreFn, bestfit_v3, least_allocated
from bench.packing import (
    baseline_batch,
    baseline_first_failure,
    baseline_hosts_used,
    berth_batch,
    berth_first_failure,
    berth_hosts_used,
    bottleneck_utilisation,
    mixed_stream,
)

GIB = 1 << 30

PANIGRAHY_STYLE = """3
1000 1000 1000
3
52 135 521 1
210 788 756 2
465 398 352 1
"""

TRIPLET_STYLE = """2
100 100
6
43 45 1
39 33 1
18 22 1
50 50 1
25 30 1
25 20 1
"""


def test_parse_panigrahy_style_expands_multiplicities() -> None:
    capacity, items = inst.parse_vbp(PANIGRAHY_STYLE)
    assert capacity == (1000, 1000, 1000)
    assert items.tolist() == [[52, 135, 521], [210, 788, 756], [210, 788, 756], [465, 398, 352]]


def test_parse_triplet_style() -> None:
    capacity, items = inst.parse_vbp(TRIPLET_STYLE)
    assert capacity == (100, 100)
    assert items.shape == (6, 2)
    assert items[:3].sum(axis=0).tolist() == [100, 100]  # a triplet filling one bin exactly


def test_parse_rejects_a_short_item_line() -> None:
    with pytest.raises(ValueError):
        inst.parse_vbp("2\n100 100\n1\n5 1\n")


def test_summary_reads_unknown_optimum_as_none() -> None:
    text = "instance_name\tLB\tOPT\tbest_overall\na_20_3_0\t6\t6\t7\nb_20_3_1\t5\t-1\t6\n"
    known = inst.read_summary(text)
    assert known["a_20_3_0"] == inst.Known(lower_bound=6, optimum=6, best_heuristic=7)
    assert known["b_20_3_1"].optimum is None


def test_dimensions_map_to_cpu_memory_and_scalars() -> None:
    resources = inst.to_resources([10, 20, 30, 40])
    assert resources.cpu_millis == 10 * inst.CPU_MILLIS_PER_UNIT
    assert resources.memory_bytes == 20 * inst.MEMORY_BYTES_PER_UNIT
    assert dict(resources.scalars) == {"d3": 30, "d4": 40}


def test_subsample_is_spread_over_sizes() -> None:
    names = [f"c_{n}_3_{i}" for n in (20, 40) for i in range(10)]
    picked = inst.subsample(names, 4)
    assert len(picked) == 4
    assert {name.split("_")[1] for name in picked} == {"20", "40"}
    assert inst.subsample(names, None) == sorted(names, key=inst._size_key)


@pytest.mark.skipif(not inst.DATA_DIR.is_dir(), reason="shared instance data not present")
def test_load_reads_both_collections_from_the_tarballs() -> None:
    catalogue = inst.load(limit=1)
    families = {i.family for i in catalogue.instances}
    assert {"Triplet/Caprara", "Triplet/Falkenauer", "Panigrahy/class2"} <= families
    for instance in catalogue.instances:
        assert instance.known.optimum is not None
        assert instance.items.shape[1] == instance.dims
        assert (instance.items <= np.array(instance.capacity)).all()


def _instance(text: str, optimum: int) -> inst.Instance:
    capacity, items = inst.parse_vbp(text)
    return inst.Instance("tiny_6_2_0", "Triplet/tiny", capacity, items, inst.Known(optimum, optimum, None))


def test_hosts_used_on_a_tiny_instance() -> None:
    instance = _instance(TRIPLET_STYLE, 2)
    order = np.arange(len(instance.items))
    # Berth places the batch largest first: (50,50) and (43,45) share a host, and the optimum
    # needs them apart; the refill step (controller/scheduler/improve.py) repacks the hosts one
    # at a time with the pair that fills each best, and finds the optimum
    assert berth_hosts_used(instance, order) == 2
    assert baseline_hosts_used(instance, order, bestfit_v3) == 2
    assert baseline_hosts_used(instance, order, least_allocated) == 6  # spreads: one item per node


# --- baselines on a hand-made 3-node cluster: empty, half full, three-quarters full ------------

CAPACITY = np.array([[4000, 4000, 4000], [4 * GIB, 4 * GIB, 4 * GIB]], dtype=np.int64)
ALLOCATED = np.array([[0, 2000, 3000], [0, 2 * GIB, 3 * GIB]], dtype=np.int64)
REQUEST = np.array([1000, GIB], dtype=np.int64)


def _cluster(score: ScoreFn, allocated: IntArray = ALLOCATED) -> Cluster:
    cluster = Cluster(CAPACITY, score)
    cluster.allocated[:] = allocated
    return cluster


def test_least_allocated_picks_the_emptiest_node() -> None:
    assert _cluster(least_allocated).choose(REQUEST) == 0
    # (4000 - 1000 - 2000) * 100 // 4000 = 25 for cpu and memory alike
    assert least_allocated(CAPACITY, ALLOCATED, REQUEST).tolist() == [75.0, 25.0, 0.0]


def test_bestfit_v3_picks_the_fullest_node_that_fits() -> None:
    assert _cluster(bestfit_v3).choose(REQUEST) == 2
    scores = bestfit_v3(CAPACITY, ALLOCATED, REQUEST)
    assert scores[2] == pytest.approx(18.0)  # left exactly full
    assert scores[1] == pytest.approx(20 - 2 * 10**0.25)
    assert scores[0] == pytest.approx(20 - 2 * 10**0.75)
    too_full = ALLOCATED.copy()
    too_full[0, 2] = 3500  # the fullest node has only 500 millicores left: not feasible
    assert _cluster(bestfit_v3, too_full).choose(REQUEST) == 1


# --- first failure -----------------------------------------------------------------------------


def test_bottleneck_utilisation_is_the_most_used_resource_cluster_wide() -> None:
    capacity = np.array([[4, 4], [8, 8]], dtype=np.int64)
    allocated = np.array([[4, 2], [2, 2]], dtype=np.int64)
    assert bottleneck_utilisation(capacity, allocated) == pytest.approx(75.0)  # cpu 6/8, memory 4/16


def test_first_failure_on_a_tiny_cluster() -> None:
    capacity = np.array([[2000, 2000], [2 * GIB, 2 * GIB]], dtype=np.int64)
    # two 1500m tasks take one node each; 1000m then fits nowhere (500m free on each); the last
    # task would fit, but the figure is taken at the first failure
    stream = np.array([[1500, GIB], [1500, GIB], [1000, GIB // 2], [100, 1]], dtype=np.int64)
    for outcome in (
        berth_first_failure(capacity, stream),  # online: one task per schedule() call
        baseline_first_failure(capacity, stream, bestfit_v3),
        baseline_first_failure(capacity, stream, least_allocated),
    ):
        assert outcome.placed == 2
        assert outcome.cpu_pct == pytest.approx(75.0)
        assert outcome.memory_pct == pytest.approx(50.0)
        assert outcome.bottleneck_pct == pytest.approx(75.0)


def test_batch_figure_on_a_tiny_cluster() -> None:
    capacity = np.array([[2000, 2000], [2 * GIB, 2 * GIB]], dtype=np.int64)
    # as one batch, largest first: 1500m and 1500m take a node each, 1000m is left pending, 100m
    # still fits; the baselines get the same order and skip the task that fits nowhere
    stream = np.array([[1500, GIB], [1000, GIB // 2], [1500, GIB], [100, 1]], dtype=np.int64)
    for outcome in (
        berth_batch(capacity, stream),
        baseline_batch(capacity, stream, bestfit_v3),
        baseline_batch(capacity, stream, least_allocated),
    ):
        assert outcome.placed == 3
        assert outcome.cpu_pct == pytest.approx(77.5)
        assert outcome.bottleneck_pct == pytest.approx(77.5)


def test_mixed_stream_is_seeded_and_overflows_the_cluster() -> None:
    total = np.array([64_000, 256 * GIB], dtype=np.int64)
    first, again, other = mixed_stream(1, total), mixed_stream(1, total), mixed_stream(2, total)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (first.sum(axis=0) > total).any()
    assert not (first[:-1].sum(axis=0) > total).any()
