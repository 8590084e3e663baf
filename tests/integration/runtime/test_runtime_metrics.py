"""The agent's /metrics over a real runc container's real cgroup files.

The container runs through the runtime fixture's agent process (in the test host's netns); the
metrics side (``AgentMetrics`` with a ``Cgroups`` for the same cgroup parent, served over HTTP)
runs in the test process: cgroupfs is the same from every network namespace. The task snapshot is
what the agent's ``TaskManager`` would hold for that container: its id, service and the start
time the runtime returned.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from berth.agent.cgroups import Cgroups
from berth.agent.metrics import AgentMetrics, TaskView
from tests.unit.metric_catalog import CONTAINER_METRICS

pytestmark = pytest.mark.integration

Host = Any
MiB = 1024 * 1024


def scrape(port: int) -> dict[str, dict[str, tuple[dict[str, str], float]]]:
    """GET /metrics -> {sample name: {task label (or ""): (labels, value)}}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[s.labels.get("task", "")] = (dict(s.labels), s.value)
    return out


def test_container_metrics_from_real_cgroups(host: Host) -> None:
    image = host.agent.call("pull", ref=host.image)
    spec = {
        "task_id": "metered",
        "service": "meter",
        "slot": 1,
        "node_name": "node-m",
        "image": host.image,
        "args": ["sh", "-c", "while :; do :; done"],  # burns its whole quota: usage and throttling
        "cpu_millis": 250,
        "memory_bytes": 48 * MiB,
    }
    host.agent.call("create", spec=spec, image=image)
    started = host.agent.call("start", task_id="metered")
    tasks = [
        TaskView(
            task_id="metered", service="meter", running=True, started_at=started["started_at"], restarts=0
        )
    ]
    metrics = AgentMetrics("node-m", version="test")
    metrics.watch(lambda: tasks, Cgroups(host.config["cgroup_parent"]))
    port = metrics.serve("127.0.0.1", 0)
    try:
        time.sleep(0.5)
        got = scrape(port)
        assert set(got) >= CONTAINER_METRICS
        for name in CONTAINER_METRICS:
            labels, _ = got[name]["metered"]
            assert labels == {"service": "meter", "task": "metered", "node": "node-m"}, name

        def value(name: str) -> float:
            return got[name]["metered"][1]

        assert value("container_spec_memory_limit_bytes") == 48 * MiB
        assert value("container_spec_cpu_quota") == 25000  # 250m of a 100 ms period
        assert value("container_spec_cpu_period") == 100000
        assert value("container_memory_usage_bytes") > 0
        assert 0 <= value("container_memory_working_set_bytes") <= value("container_memory_usage_bytes")
        cpu = value("container_cpu_usage_seconds_total")
        assert cpu > 0
        assert value("container_cpu_cfs_throttled_seconds_total") >= 0
        assert time.time() - 60 < value("container_start_time_seconds") <= time.time()
        assert value("container_start_time_seconds") == pytest.approx(started["started_at"])

        # counters move; a quota-bound busy loop gets throttled
        time.sleep(1.0)
        again = scrape(port)
        assert again["container_cpu_usage_seconds_total"]["metered"][1] > cpu
        assert again["container_cpu_cfs_throttled_seconds_total"]["metered"][1] > 0
    finally:
        host.agent.call("remove", task_id="metered")
    try:
        # the runner list still names it (the container just exited): skipped, scrape still fine
        after = scrape(port)
        for name in CONTAINER_METRICS:
            assert "metered" not in after.get(name, {}), name
        assert after["berth_build_info"][""][1] == 1
    finally:
        metrics.close()
