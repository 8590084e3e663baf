"""``bench.scheduler`` end to end at a small size: its figures come from a real run and agree
with each other (every task placed and acknowledged, the CPU budget adds up, the ceiling is
measured on the same etcd). Needs only the ``etcd`` binary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

if shutil.which("etcd") is None:
    pytest.skip("needs the etcd binary (apt-get install etcd-server)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_reports_consistent_figures() -> None:
    argv = [sys.executable, "-m", "bench.scheduler", "--nodes", "20", "--tasks", "400"]
    argv += ["--settle", "1", "--ceiling-keys", "2000", "--max-heartbeats-per-second", "10"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["note"] == ""
    assert figures["placed"] == figures["acked"] == 400
    assert figures["task_writes"] >= 400 and figures["status_writes"] >= 400
    assert figures["nodes_down"] == 0
    assert 0 < figures["placed_s"] <= figures["acked_s"]
    assert figures["placements_per_s"] == pytest.approx(400 / figures["placed_s"], rel=0.01)
    # the CPU budget: every process counted, spread over the cores this machine gives the run
    assert figures["cores"] >= 1
    parts = ("controller_cpu_s", "etcd_cpu_s", "hollow_cpu_s", "bench_cpu_s")
    assert figures["cpu_total_s"] == pytest.approx(sum(figures[p] for p in parts), abs=0.05)
    assert figures["cpu_bound_s"] == pytest.approx(figures["cpu_total_s"] / figures["cores"], abs=0.01)
    assert figures["idle_controller_cpu_pct"] >= 0 and figures["idle_hollow_cpu_pct"] >= 0
    # the knob reaches the controller (which exits on an option it does not know: the run would
    # fail) and is recorded with the figures it produced
    assert figures["max_heartbeats_per_second"] == 10
    assert figures["etcd_ceiling_keys_per_s"] > 0
    ratio = figures["placements_per_s"] / figures["etcd_ceiling_keys_per_s"]
    assert figures["placements_fraction_of_ceiling"] == pytest.approx(ratio, abs=0.001)
    assert "all CPU / over the cores" in done.stdout
