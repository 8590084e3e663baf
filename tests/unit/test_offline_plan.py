"""``berth plan --cluster nodes.yaml``: the offline what-if, through the real CLI and planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def plan(tmp_path: Path, spec: str, nodes: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "spec.yaml").write_text(spec)
    (tmp_path / "nodes.yaml").write_text(nodes)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "berth.cli.main",
            "plan",
            "-f",
            str(tmp_path / "spec.yaml"),
            "--cluster",
            str(tmp_path / "nodes.yaml"),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


NODES = """
nodes:
  - {name: small, cpus: 4, memory: 8Gi, count: 3, labels: {zone: a}}
  - {name: big, cpus: 32, memory: 128Gi, labels: {zone: b}, resources: {gpu: 2}}
"""


def test_offline_plan_counts_hosts_needed(tmp_path: Path) -> None:
    proc = plan(tmp_path, "name: web\nimage: r/i:1\nreplicas: 8\nresources: {cpu: 1, memory: 2Gi}\n", NODES)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["placements"]) == 8 and not result["pending"]
    assert result["nodes_total"] == 4
    # best fit prefers the tighter small nodes; replicas of one service spread across nodes that
    # fit equally well, and the big node stays free for what needs it
    assert {p["node"] for p in result["placements"]} == {"small-1", "small-2", "small-3"}
    assert result["nodes_used"] == 3


def test_offline_plan_reports_pending_reasons(tmp_path: Path) -> None:
    spec = "name: gpu\nimage: r/i:1\nreplicas: 3\nresources: {gpu: 1}\nconstraints: [zone==b]\n"
    result = json.loads(plan(tmp_path, spec, NODES).stdout)
    assert len(result["placements"]) == 2
    [pending] = result["pending"]
    assert pending["slot"] == 3 and "insufficient gpu" in pending["reasons"][0]
    assert "3 constraint zone==b not met" in pending["reasons"][0]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ("nodes: []\n", "needs a list of nodes"),
        ("nodes: [{name: a, cpus: lots}]\n", "nodes[0].cpus"),
        ("nodes: [{name: a, color: red}]\n", "unknown field 'color'"),
        ("nodes: [{cpus: 2}]\n", "nodes[0].name: required"),
        ("nodes: [{name: a, resources: {cpu: 2}}]\n", "nodes[0].resources.cpu: not a named resource"),
    ],
    ids=["empty", "bad-cpus", "unknown-field", "no-name", "cpu-as-resource"],
)
def test_offline_plan_bad_cluster_file(tmp_path: Path, nodes: str, message: str) -> None:
    proc = plan(tmp_path, "name: web\nimage: r/i:1\n", nodes)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_offline_plan_invalid_spec(tmp_path: Path) -> None:
    proc = plan(tmp_path, "name: Web_1\nimage: r/i:1\n", NODES)
    assert proc.returncode != 0 and "name:" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_plan_refuses_a_service_named_twice(tmp_path: Path) -> None:
    """As the live controller's plan does: which of the two would apply mean?"""
    spec = "name: web\nimage: r/i:1\n---\nname: web\nimage: r/i:2\n"
    proc = plan(tmp_path, spec, NODES)
    assert proc.returncode != 0
    assert "'web' appears twice" in proc.stderr and "Traceback" not in proc.stderr
