"""Issue 5: a real Prometheus scrapes a dev cluster through the controller's /sd.

A 3-host dev cluster started with ``monitoring=True`` (what ``berth dev up --monitoring`` does):
etcd, registry, controller, agents, runc, and Debian's Prometheus with deploy/prometheus's config
and alert rules. PromQL answers are compared with what ``berth`` itself reports; a killed host
shows as a dip and recovery of the running replicas and one observation of the failover
histogram; every dashboard query runs against the live Prometheus; the exported names and labels
are exactly the catalog's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from berth.cli.devcluster import DevCluster
from tests.integration.clusterkit import all_running, apply, berth, nodes, ps, wait_for
from tests.integration.devtools import BASE_DIR, free_ports, make_config, owner_alive, traces
from tests.unit.metric_catalog import AGENT_METRICS, CONTROLLER_METRICS, METRICS

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, cgroups, runc)", allow_module_level=True)
if shutil.which("prometheus") is None:
    pytest.skip("needs Debian's prometheus package (make apt installs it)", allow_module_level=True)

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
PORTAL = """
name: portal
image: IMAGE
replicas: 6
resources: {cpu: 100m, memory: 48Mi}
ports: [8080]
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    DevCluster.sweep("dt", BASE_DIR, skip=owner_alive)
    (prometheus_port,) = free_ports(1)
    c = DevCluster(replace(make_config("m", hosts=3), monitoring=True, prometheus_port=prometheus_port))
    try:
        c.up()
        wait_for(lambda: len([n for n in nodes(c) if n["state"] == "ready"]) == 3, 30, "3 ready nodes")
        yield c
    finally:
        c.down()
    assert traces(c.name) == []


def get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        return bytes(resp.read())


def query(c: DevCluster, promql: str) -> list[dict[str, Any]]:
    """An instant query; the result vector (raises on a PromQL error)."""
    url = f"{c.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def scalar(c: DevCluster, promql: str) -> float | None:
    result = query(c, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_discovery_lists_the_controller_and_every_agent(cluster: DevCluster) -> None:
    groups = json.loads(get(f"http://{cluster.metrics_address}/sd"))
    components = sorted(g["labels"]["__meta_berth_component"] for g in groups)
    assert components == ["agent", "agent", "agent", "controller"]
    by_node = {g["labels"].get("__meta_berth_node"): g["targets"] for g in groups}
    for host in cluster.hosts.values():
        assert by_node[host.name] == [f"{host.address}:9371"]
    # and Prometheus, reading that discovery, scrapes all four
    targets = wait_for(
        lambda: (r := query(cluster, "up == 1")) and len(r) == 4 and r,
        60,
        "Prometheus to scrape the controller and 3 agents",
    )
    jobs = sorted(t["metric"]["job"] for t in targets)
    assert jobs == ["berth-agent", "berth-agent", "berth-agent", "berth-controller"]


def test_promql_answers_match_what_berth_reports(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, PORTAL)
    rows = wait_for(lambda: all_running(cluster, "portal", 6), 90, "6 portal replicas running")
    service = json.loads(berth(cluster, "service", "ls", "-o", "json").stdout)[0]
    assert service["running"] == 6

    running = wait_for(
        lambda: scalar(cluster, 'berth_service_running_replicas{service="portal"}') == 6 or None,
        30,
        "Prometheus to see 6 running portal replicas",
    )
    assert running
    assert scalar(cluster, 'berth_service_desired_replicas{service="portal"}') == 6

    task = rows[0]
    limit = wait_for(
        lambda: scalar(cluster, f'container_spec_memory_limit_bytes{{task="{task["id"]}"}}'),
        30,
        f"the memory limit of {task['id']}",
    )
    assert limit == 48 * 1024 * 1024
    series = query(cluster, f'container_memory_working_set_bytes{{task="{task["id"]}"}}')
    assert series and series[0]["metric"]["service"] == "portal"
    assert series[0]["metric"]["node"] == task["node"]

    node = next(n for n in nodes(cluster) if n["name"] == task["node"])
    capacity = scalar(cluster, f'berth_node_capacity{{node="{node["name"]}",resource="memory"}}')
    assert capacity == node["capacity"]["memory_bytes"]
    cores = scalar(cluster, f'berth_node_capacity{{node="{node["name"]}",resource="cpu"}}')
    assert cores == node["capacity"]["cpu_millis"] / 1000
    allocated = wait_for(
        lambda: scalar(cluster, f'berth_node_allocated{{node="{node["name"]}",resource="memory"}}'),
        30,
        "allocation series",
    )
    assert allocated == node["allocated"]["memory_bytes"]


def test_grpc_calls_are_counted_by_method_and_code(cluster: DevCluster) -> None:
    def count(code: str) -> float:
        page = get(f"http://{cluster.metrics_address}/metrics").decode()
        wanted = f'berth_grpc_requests_total{{code="{code}",method="ClusterAPI/ScaleService"}} '
        return next((float(line.split()[-1]) for line in page.splitlines() if line.startswith(wanted)), 0.0)

    before = count("NOT_FOUND")
    assert berth(cluster, "service", "scale", "nosuch=2", check=False).returncode != 0
    assert count("NOT_FOUND") == before + 1
    assert count("OK") == 0.0  # nothing was scaled


def test_every_dashboard_query_runs_against_prometheus(cluster: DevCluster) -> None:
    values = {"service": "portal", "node": next(iter(cluster.hosts)), "__rate_interval": "1m"}
    values |= {"__interval": "15s", "__range": "5m"}
    checked = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], target["expr"])
                query(cluster, expr)  # raises unless Prometheus accepts and evaluates it
                checked += 1
    assert checked >= 30


def exported(text: str) -> dict[str, set[str]]:
    """Sample names of a /metrics page -> the label names seen on them."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", "")
        labels = set(re.findall(r'(\w+)="', rest.partition("}")[0])) if rest else set()
        out.setdefault(name, set()).update(labels - {"le"})
    return out


def family(sample: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and METRICS.get(base, ("",))[0] == "histogram":
            return base
    return sample


def test_names_and_labels_are_the_catalogs(cluster: DevCluster) -> None:
    controller = exported(get(f"http://{cluster.metrics_address}/metrics").decode())
    host = next(iter(cluster.hosts.values()))
    agent = exported(get(f"http://{host.address}:9371/metrics").decode())
    for page, expected in ((controller, CONTROLLER_METRICS), (agent, AGENT_METRICS)):
        seen: dict[str, set[str]] = {}
        for sample, labels in page.items():
            seen.setdefault(family(sample), set()).update(labels)
        extra = set(seen) - set(expected)
        assert not extra, f"exported but not in the catalog: {sorted(extra)}"
        for name in expected:
            if name in seen:  # a labelled family with no child yet exports nothing
                assert seen[name] == set(METRICS[name][1]), name
    # everything the controller has from the start is there
    assert {n for n in CONTROLLER_METRICS if n != "berth_grpc_request_duration_seconds"} <= set(
        family(s) for s in controller
    ) | {"berth_grpc_request_duration_seconds"}


def test_a_killed_host_dips_and_recovers_and_failover_is_counted(cluster: DevCluster, tmp_path: Path) -> None:
    if not all_running(cluster, "portal", 6):
        apply(cluster, tmp_path, PORTAL)
        wait_for(lambda: all_running(cluster, "portal", 6), 90, "6 portal replicas running")
    wait_for(
        lambda: scalar(cluster, 'berth_service_running_replicas{service="portal"}') == 6 or None,
        30,
        "6 running in Prometheus",
    )
    before = scalar(cluster, "berth_failover_seconds_count") or 0.0
    counts: dict[str, int] = {}
    for row in ps(cluster, "portal"):
        counts[row["node"]] = counts.get(row["node"], 0) + 1
    victim = max(sorted(counts), key=lambda h: counts[h])
    killed_at = time.time()
    cluster.kill_host(victim)
    try:
        wait_for(lambda: all_running(cluster, "portal", 6), 60, "portal whole again")
        wait_for(
            lambda: (scalar(cluster, "berth_failover_seconds_count") or 0.0) >= before + 1 or None,
            30,
            "the failover histogram to count the event",
        )
        assert scalar(cluster, "berth_failover_seconds_count") == before + 1
        # the running series dipped below 6 after the kill and is back at 6
        window = f"{int(time.time() - killed_at) + 5}s"
        low = scalar(cluster, f'min_over_time(berth_service_running_replicas{{service="portal"}}[{window}])')
        assert low is not None and low < 6
        wait_for(
            lambda: scalar(cluster, 'berth_service_running_replicas{service="portal"}') == 6 or None,
            30,
            "the running series back at 6",
        )
        assert (scalar(cluster, "berth_node_down_events_total") or 0.0) >= 1
        down = scalar(cluster, f'berth_node_up{{node="{victim}"}}')
        assert down == 0
    finally:
        cluster.start_agent(victim)
        wait_for(lambda: all(n["state"] == "ready" for n in nodes(cluster)), 30, "all nodes ready")
