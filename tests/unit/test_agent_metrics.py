"""The agent's /metrics: cgroup v1/v2 parsing, the scrape-time collector, the registry and its HTTP server.

Fake cgroup trees are built in ``tmp_path`` with file contents in the formats the kernel documents
(Documentation/admin-guide/cgroup-v1/{memory,cpuacct}.rst, scheduler/sched-bwc.rst and
cgroup-v2.rst), laid out as on a hybrid host (separate ``cpu``, ``cpuacct`` and ``memory`` mounts)
and as on a unified one.
"""

from __future__ import annotations

import asyncio
import errno
import platform
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from berth.agent import cgroups as cgroups_mod
from berth.agent.cgroups import (
    Cgroups,
    ContainerStats,
    Hierarchy,
    parse_cpu_max,
    stats_v1,
    stats_v2,
)
from berth.agent.metrics import (
    AgentMetrics,
    TaskView,
    advertised,
    manager_tasks,
    parse_listen,
    samples,
)
from berth.agent.runtime import ContainerSpec, ExitStatus, ImageInfo, RunningContainer
from berth.agent.tasks import Backoff, TaskManager
from berth.proto.berth.v1 import types_pb2 as pb
from tests.unit.metric_catalog import AGENT_METRICS, CONTAINER_METRICS, METRICS

PARENT = "berth-test/containers"
UNLIMITED_V1 = "9223372036854771712"

V1_MEMORY_STAT = """cache 1478656
rss 2703360
rss_huge 0
shmem 0
mapped_file 905216
dirty 0
writeback 0
swap 0
pgpgin 1386
pgpgout 366
pgfault 1686
pgmajfault 7
inactive_anon 2433024
active_anon 135168
inactive_file 1351680
active_file 126976
unevictable 0
hierarchical_memory_limit 67108864
hierarchical_memsw_limit 67108864
total_cache 1478656
total_rss 2703360
total_rss_huge 0
total_shmem 0
total_mapped_file 905216
total_dirty 0
total_writeback 0
total_swap 0
total_pgpgin 1386
total_pgpgout 366
total_pgfault 1686
total_pgmajfault 7
total_inactive_anon 2433024
total_active_anon 135168
total_inactive_file 1351680
total_active_file 126976
total_unevictable 0
"""

V1_CPU_STAT = "nr_periods 1520\nnr_throttled 38\nthrottled_time 2750000000\n"

V2_CPU_STAT = """usage_usec 1834567
user_usec 1200000
system_usec 634567
nr_periods 412
nr_throttled 17
throttled_usec 250000
nr_bursts 0
burst_usec 0
"""

V2_MEMORY_STAT = """anon 2437120
file 1462272
kernel 339968
kernel_stack 32768
pagetables 69632
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 0
zswap 0
zswapped 0
file_mapped 901120
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 2433024
active_anon 4096
inactive_file 1335296
active_file 126976
unevictable 0
slab_reclaimable 118784
slab_unreclaimable 102400
slab 221184
workingset_refault_anon 0
workingset_refault_file 0
workingset_activate_anon 0
workingset_activate_file 0
workingset_restore_anon 0
workingset_restore_file 0
workingset_nodereclaim 0
pgscan 0
pgsteal 0
pgfault 1723
pgmajfault 5
"""


def v1_files(
    *, usage: str = "4235264", limit: str = "67108864", quota: str = "25000", cpuacct: str = "1234567890"
) -> dict[str, str]:
    return {
        "cpuacct.usage": cpuacct + "\n",
        "cpu.stat": V1_CPU_STAT,
        "cpu.cfs_quota_us": quota + "\n",
        "cpu.cfs_period_us": "100000\n",
        "memory.usage_in_bytes": usage + "\n",
        "memory.stat": V1_MEMORY_STAT,
        "memory.limit_in_bytes": limit + "\n",
    }


def v2_files(
    *, current: str = "4239360", mem_max: str = "67108864", cpu_max: str = "25000 100000"
) -> dict[str, str]:
    return {
        "cpu.stat": V2_CPU_STAT,
        "cpu.max": cpu_max + "\n",
        "memory.current": current + "\n",
        "memory.stat": V2_MEMORY_STAT,
        "memory.max": mem_max + "\n",
    }


# -- pure parsing ----------------------------------------------------------------------------------


def test_stats_v1_units_and_working_set() -> None:
    s = stats_v1(v1_files())
    assert s == ContainerStats(
        cpu_usage_seconds=pytest.approx(1.23456789),  # type: ignore[arg-type]
        cpu_throttled_seconds=pytest.approx(2.75),  # type: ignore[arg-type]
        memory_usage_bytes=4235264,
        memory_working_set_bytes=4235264 - 1351680,  # usage - total_inactive_file
        memory_limit_bytes=64 * 1024 * 1024,
        cpu_quota_us=25000,
        cpu_period_us=100000,
    )


def test_stats_v1_unlimited_and_floor() -> None:
    s = stats_v1(v1_files(limit=UNLIMITED_V1, quota="-1", usage="1000000"))
    assert s.memory_limit_bytes == 0
    assert s.cpu_quota_us == 0
    assert s.cpu_period_us == 100000
    assert s.memory_working_set_bytes == 0  # inactive_file > usage: floored, as cAdvisor does


def test_stats_v2_units_and_working_set() -> None:
    s = stats_v2(v2_files())
    assert s.cpu_usage_seconds == pytest.approx(1.834567)
    assert s.cpu_throttled_seconds == pytest.approx(0.25)
    assert s.memory_usage_bytes == 4239360
    assert s.memory_working_set_bytes == 4239360 - 1335296  # memory.current - inactive_file
    assert s.memory_limit_bytes == 64 * 1024 * 1024
    assert (s.cpu_quota_us, s.cpu_period_us) == (25000, 100000)


def test_stats_v2_max_means_unlimited() -> None:
    s = stats_v2(v2_files(mem_max="max", cpu_max="max 100000"))
    assert s.memory_limit_bytes == 0
    assert (s.cpu_quota_us, s.cpu_period_us) == (0, 100000)


def test_stats_v2_without_cpu_controller_has_no_throttling() -> None:
    files = v2_files()
    files["cpu.stat"] = "usage_usec 500\nuser_usec 300\nsystem_usec 200\n"  # core stats only
    s = stats_v2(files)
    assert s.cpu_usage_seconds == pytest.approx(0.0005)
    assert s.cpu_throttled_seconds == 0


def test_parse_cpu_max() -> None:
    assert parse_cpu_max("max 100000\n") == (0, 100000)
    assert parse_cpu_max("150000 100000") == (150000, 100000)
    assert parse_cpu_max("max") == (0, 100000)


# -- reading fake cgroup trees ---------------------------------------------------------------------


def make_v1(root: Path) -> Cgroups:
    hier = [
        Hierarchy(root / "cpu", frozenset({"cpu"}), False),
        Hierarchy(root / "cpuacct", frozenset({"cpuacct"}), False),
        Hierarchy(root / "memory", frozenset({"memory"}), False),
        Hierarchy(root / "systemd", frozenset({"name=systemd"}), False),
        Hierarchy(root / "unified", frozenset(), True),
    ]
    return Cgroups(PARENT, hierarchies=hier)


def write_v1(cg: Cgroups, task_id: str, files: dict[str, str]) -> None:
    for name, content in files.items():
        d = cg.path(name.split(".", 1)[0], task_id)
        assert d is not None
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(content)


def make_v2(root: Path) -> Cgroups:
    return Cgroups(PARENT, hierarchies=[Hierarchy(root, frozenset(), True)])


def write_v2(cg: Cgroups, task_id: str, files: dict[str, str]) -> None:
    d = cg.path("memory", task_id)
    assert d is not None
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (d / name).write_text(content)


def test_cgroups_stats_v1_tree(tmp_path: Path) -> None:
    cg = make_v1(tmp_path)
    assert not cg.unified
    write_v1(cg, "t1", v1_files())
    assert cg.stats("t1") == stats_v1(v1_files())
    assert (tmp_path / "cpuacct" / PARENT / "t1" / "cpuacct.usage").is_file()
    assert cg.stats("never-ran") is None


def test_cgroups_stats_v2_tree(tmp_path: Path) -> None:
    cg = make_v2(tmp_path)
    assert cg.unified
    write_v2(cg, "t1", v2_files())
    assert cg.stats("t1") == stats_v2(v2_files())
    assert cg.stats("never-ran") is None


def test_cgroups_stats_file_vanished(tmp_path: Path) -> None:
    cg = make_v1(tmp_path)
    write_v1(cg, "t1", v1_files())
    (tmp_path / "memory" / PARENT / "t1" / "memory.stat").unlink()
    assert cg.stats("t1") is None


def test_cgroups_stats_enodev_after_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a file of a cgroup removed after the open gives ENODEV: the container is gone."""
    cg = make_v2(tmp_path)
    write_v2(cg, "t1", v2_files())
    real = Path.read_text

    def read_text(self: Path, *a: object, **kw: object) -> str:
        if self.name == "memory.stat":
            raise OSError(errno.ENODEV, "No such device")
        return real(self)

    monkeypatch.setattr(cgroups_mod.Path, "read_text", read_text)
    assert cg.stats("t1") is None


# -- the collector ---------------------------------------------------------------------------------


def build(
    cg: Cgroups | None, tasks: list[TaskView], rtt: float | None = 0.0042
) -> tuple[AgentMetrics, Callable[[str], dict[str, float]]]:
    m = AgentMetrics("node-a", version="9.9.9")
    m.watch(lambda: tasks, cg, lambda: rtt)

    def by_task(name: str) -> dict[str, float]:
        out = {}
        for labels, value in samples(m.registry, name):
            assert labels.keys() == {"service", "task", "node"}, (name, labels)
            assert labels["node"] == "node-a"
            out[labels["task"]] = value
        return out

    return m, by_task


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_collector_samples(tmp_path: Path, layout: str) -> None:
    if layout == "v1":
        cg = make_v1(tmp_path)
        write_v1(cg, "web.1", v1_files())
        write_v1(cg, "web.2", v1_files(limit=UNLIMITED_V1, quota="-1", cpuacct="5000000000"))
        write_v1(cg, "gone.1", v1_files())
        for ctrl in ("cpu", "cpuacct", "memory"):  # exited between the snapshot and the read
            for f in (tmp_path / ctrl / PARENT / "gone.1").iterdir():
                f.unlink()
            (tmp_path / ctrl / PARENT / "gone.1").rmdir()
        expect_cpu, expect_mem = 1.23456789, 4235264
        expect_ws = 4235264 - 1351680
    else:
        cg = make_v2(tmp_path)
        write_v2(cg, "web.1", v2_files())
        write_v2(cg, "web.2", v2_files(mem_max="max", cpu_max="max 100000"))
        write_v2(cg, "gone.1", v2_files())
        (tmp_path / PARENT / "gone.1" / "cpu.stat").unlink()
        expect_cpu, expect_mem = 1.834567, 4239360
        expect_ws = 4239360 - 1335296
    now = time.time()
    tasks = [
        TaskView(task_id="web.1", service="web", running=True, started_at=now - 5, restarts=2),
        TaskView(task_id="web.2", service="web", running=True, started_at=now - 1, restarts=0),
        TaskView(task_id="gone.1", service="gone", running=True, started_at=now, restarts=0),
        TaskView(task_id="wait.1", service="wait", running=False, started_at=0, restarts=1),
    ]
    m, by_task = build(cg, tasks)

    cpu = by_task("container_cpu_usage_seconds_total")
    assert set(cpu) == {"web.1", "web.2"}  # gone.1 skipped, wait.1 not running
    assert cpu["web.1"] == pytest.approx(expect_cpu)
    assert by_task("container_memory_usage_bytes")["web.1"] == expect_mem
    assert by_task("container_memory_working_set_bytes")["web.1"] == expect_ws
    assert by_task("container_spec_memory_limit_bytes") == {"web.1": 64 * 1024 * 1024, "web.2": 0}
    assert by_task("container_spec_cpu_quota") == {"web.1": 25000, "web.2": 0}
    assert by_task("container_spec_cpu_period") == {"web.1": 100000, "web.2": 100000}
    throttled = by_task("container_cpu_cfs_throttled_seconds_total")
    assert throttled["web.1"] == pytest.approx(2.75 if layout == "v1" else 0.25)
    assert by_task("container_start_time_seconds") == {"web.1": now - 5, "web.2": now - 1}
    # restarts: every task the agent holds, running or not
    assert by_task("berth_agent_task_restarts_total") == {"web.1": 2, "web.2": 0, "gone.1": 0, "wait.1": 1}
    for labels, _ in samples(m.registry, "container_memory_usage_bytes"):
        assert labels["service"] == "web"


def test_metric_names_types_and_label_sets(tmp_path: Path) -> None:
    cg = make_v2(tmp_path)
    write_v2(cg, "web.1", v2_files())
    m, _ = build(cg, [TaskView(task_id="web.1", service="web", running=True, started_at=1.0, restarts=0)])
    m.observe_pull(0.7)
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    types = {name: f.type for name, f in families.items()}
    assert types == {
        "container_cpu_usage_seconds": "counter",
        "container_cpu_cfs_throttled_seconds": "counter",
        "container_memory_usage_bytes": "gauge",
        "container_memory_working_set_bytes": "gauge",
        "container_spec_memory_limit_bytes": "gauge",
        "container_spec_cpu_quota": "gauge",
        "container_spec_cpu_period": "gauge",
        "container_start_time_seconds": "gauge",
        "berth_agent_task_restarts": "counter",
        "berth_agent_image_pull_duration_seconds": "histogram",
        "berth_agent_heartbeat_rtt_seconds": "gauge",
        "berth_build_info": "gauge",
    }
    for f in families.values():
        assert f.documentation, f.name
    names = {s.name for f in families.values() for s in f.samples}
    assert names >= CONTAINER_METRICS
    assert {"berth_agent_task_restarts_total", "berth_build_info"} <= names
    for f in families.values():
        for s in f.samples:
            keys = set(s.labels)
            if s.name in CONTAINER_METRICS or s.name == "berth_agent_task_restarts_total":
                assert keys == {"service", "task", "node"}, s
            elif s.name == "berth_build_info":
                assert keys == {"version", "python_version"}
                assert s.labels == {"version": "9.9.9", "python_version": platform.python_version()}
                assert s.value == 1
            elif s.name == "berth_agent_image_pull_duration_seconds_bucket":
                assert keys == {"node", "le"}
            else:
                assert keys == {"node"}, s
                assert s.labels["node"] == "node-a"
    assert samples(m.registry, "berth_agent_heartbeat_rtt_seconds") == [({"node": "node-a"}, 0.0042)]
    assert samples(m.registry, "berth_agent_image_pull_duration_seconds_count") == [({"node": "node-a"}, 1.0)]
    assert samples(m.registry, "berth_agent_image_pull_duration_seconds_sum") == [({"node": "node-a"}, 0.7)]


def test_no_rtt_before_first_ack_and_no_cgroups(tmp_path: Path) -> None:
    m, by_task = build(
        None, [TaskView(task_id="h.1", service="h", running=True, started_at=1.0, restarts=0)], rtt=None
    )
    assert samples(m.registry, "berth_agent_heartbeat_rtt_seconds") == []
    assert by_task("container_memory_usage_bytes") == {}
    assert by_task("berth_agent_task_restarts_total") == {"h.1": 0}


def test_bad_cgroup_content_skips_only_that_container(tmp_path: Path) -> None:
    cg = make_v2(tmp_path)
    write_v2(cg, "ok.1", v2_files())
    write_v2(cg, "bad.1", v2_files(current=""))
    tasks = [
        TaskView(task_id=t, service="s", running=True, started_at=1.0, restarts=0) for t in ("ok.1", "bad.1")
    ]
    _, by_task = build(cg, tasks)
    assert set(by_task("container_memory_usage_bytes")) == {"ok.1"}


def test_registries_are_per_agent() -> None:
    a = AgentMetrics("a", version="1")
    b = AgentMetrics("b", version="1")
    a.observe_pull(1.0)
    assert samples(a.registry, "berth_agent_image_pull_duration_seconds_count") == [({"node": "a"}, 1.0)]
    assert samples(b.registry, "berth_agent_image_pull_duration_seconds_count") == [({"node": "b"}, 0.0)]


def test_http_server_serves_metrics(tmp_path: Path) -> None:
    cg = make_v1(tmp_path)
    write_v1(cg, "web.1", v1_files())
    m, _ = build(cg, [TaskView(task_id="web.1", service="web", running=True, started_at=1.0, restarts=0)])
    port = m.serve("127.0.0.1", 0)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    assert 'container_spec_memory_limit_bytes{node="node-a",service="web",task="web.1"} 6.7108864e+07' in body
    assert "berth_build_info{" in body


# -- listen flag -------------------------------------------------------------------------------------


def test_parse_listen_and_advertised() -> None:
    assert parse_listen("", "10.0.0.5") is None
    assert parse_listen("10.0.0.5:9371", "x") == ("10.0.0.5", 9371)
    assert parse_listen(":9000", "10.0.0.5") == ("10.0.0.5", 9000)
    assert parse_listen("[fd00::1]:9371", "x") == ("fd00::1", 9371)
    for bad in ("10.0.0.5", "host:port", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad, "x")
    assert advertised("0.0.0.0", 9371, "10.0.0.5") == "10.0.0.5:9371"
    assert advertised("10.0.0.7", 9371, "10.0.0.5") == "10.0.0.7:9371"
    assert advertised("::", 9371, "fd00::5") == "[fd00::5]:9371"


# -- hooks in the task runners -------------------------------------------------------------------


class ExitOnceRuntime:
    """Pull takes a little while; the first container run exits at once, the second keeps running."""

    def __init__(self) -> None:
        self.starts = 0
        self.forever = asyncio.Event()

    async def pull(self, reference: str) -> ImageInfo:
        await asyncio.sleep(0.02)
        return ImageInfo(reference=reference, digest="sha256:" + "0" * 64, rootfs="/nonexistent")

    async def create(self, spec: ContainerSpec, image: ImageInfo) -> None:
        return None

    async def start(self, task_id: str) -> RunningContainer:
        self.starts += 1
        return RunningContainer(task_id=task_id, pid=10, ip="", image_digest="d", started_at=time.time())

    async def wait(self, task_id: str) -> ExitStatus:
        if self.starts == 1:
            return ExitStatus(exit_code=1)
        await self.forever.wait()
        return ExitStatus(exit_code=0)

    async def stop(self, task_id: str, timeout: float = 10.0) -> None:
        self.forever.set()

    async def remove(self, task_id: str) -> None:
        return None

    async def list(self) -> list[object]:
        return []


def test_runners_feed_pull_histogram_restarts_and_start_time() -> None:
    async def scenario() -> tuple[list[TaskView], AgentMetrics]:
        runtime = ExitOnceRuntime()
        metrics = AgentMetrics("node-a", version="1")
        manager = TaskManager(
            runtime,  # type: ignore[arg-type]
            node_id="n1",
            node_name="node-a",
            report=lambda s: None,
            on_pull=metrics.observe_pull,
        )
        task = pb.Task(id="web.1", service="web", slot=1)
        task.spec.image = "r/img:1"
        before = time.time()
        manager.apply([task], [], full=True)
        manager.runners["web.1"].backoff = Backoff(initial=0.01)
        for _ in range(200):
            views = manager_tasks(manager)
            if views and views[0].running and views[0].restarts == 1:
                break
            await asyncio.sleep(0.01)
        views = manager_tasks(manager)
        assert views[0].started_at >= before
        await manager.runners["web.1"].shutdown(grace=0.1)
        return views, metrics

    views, metrics = asyncio.run(scenario())
    assert views == [
        TaskView(task_id="web.1", service="web", running=True, started_at=views[0].started_at, restarts=1)
    ]
    ((labels, count),) = samples(metrics.registry, "berth_agent_image_pull_duration_seconds_count")
    assert labels == {"node": "node-a"} and count == 1
    ((_, total),) = samples(metrics.registry, "berth_agent_image_pull_duration_seconds_sum")
    assert 0.01 < total < 5


def test_pull_histogram_buckets() -> None:
    m = AgentMetrics("n", version="1")
    for seconds in (0.05, 0.1, 3.0, 1000.0):
        m.observe_pull(seconds)
    buckets = {
        labels["le"]: v for labels, v in samples(m.registry, "berth_agent_image_pull_duration_seconds_bucket")
    }
    assert buckets["0.1"] == 2  # le: 0.1 itself falls in the 0.1 bucket
    assert buckets["2.5"] == 2
    assert buckets["5.0"] == 3
    assert buckets["300.0"] == 3
    assert buckets["+Inf"] == 4
    assert samples(m.registry, "berth_agent_image_pull_duration_seconds_sum") == [({"node": "n"}, 1003.15)]


def test_agent_families_match_the_metric_catalog(tmp_path: Path) -> None:
    """What an agent exposes is exactly the agent part of the catalog deploy/ is checked against."""
    cg = make_v2(tmp_path)
    write_v2(cg, "web.1", v2_files())
    m, _ = build(cg, [TaskView(task_id="web.1", service="web", running=True, started_at=1.0, restarts=3)])
    m.observe_pull(1.0)
    exposed: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in m.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        exposed[name] = (family.type, tuple(sorted(labels)))
    assert exposed == {name: METRICS[name] for name in AGENT_METRICS}
