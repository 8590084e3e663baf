"""``bench.scheduler`` end to end at a small size: its figures come from a real run and agree
with each other (every task placed and acknowledged, the CPU budget adds up, the ceiling is
measured on the same etcd). Needs only the ``etcd`` binary."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

if shutil.which("etcd") is None:
    pytest.skip("needs the etcd binary (apt-get install etcd-server)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_reports_consistent_figures(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.scheduler", "--nodes", "20", "--tasks", "5000", "--keep"]
    argv += ["--settle", "1", "--idle-window", "2", "--ceiling-keys", "2000"]
    argv += ["--max-heartbeats-per-second", "10"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = Path(re.findall(r"kept (\S+)", done.stderr)[-1])
    try:
        controller_log = (kept / "controller.log").read_text()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["note"] == ""
    assert figures["placed"] == figures["acked"] == 5000
    assert figures["task_writes"] >= 5000 and figures["status_writes"] >= 5000
    assert figures["nodes_down"] == 0
    assert 0 < figures["placed_s"] <= figures["acked_s"]
    assert figures["placements_per_s"] == pytest.approx(5000 / figures["placed_s"], rel=0.01)
    # the CPU of the run: read when the last task was seen running, so the window ends just
    # after the last ack (the bench polls every 50 ms), and no busier than the cores can be
    assert figures["controller_cpu_s"] > 0 and figures["hollow_cpu_s"] > 0
    assert figures["acked_s"] <= figures["cpu_window_s"] <= figures["acked_s"] + 1.0
    assert figures["cores"] >= 1
    assert 0 < figures["machine_busy_pct"] <= 105
    assert figures["idle_controller_cpu_pct"] is not None and figures["idle_hollow_cpu_pct"] is not None
    # the knob reached the controller: 20 nodes at 10 heartbeats/s is a 2 s interval
    assert "heartbeat timing stretched nodes=20 interval=2.00s" in controller_log
    assert figures["max_heartbeats_per_second"] == 10
    assert figures["etcd_ceiling_keys_per_s"] > 0
    ratio = figures["placements_per_s"] / figures["etcd_ceiling_keys_per_s"]
    assert figures["placements_fraction_of_ceiling"] == pytest.approx(ratio, abs=0.001)
    assert "all CPU / machine busy" in done.stdout
