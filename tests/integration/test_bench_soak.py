"""``bench.soak`` end to end at a small size: cycles of create, scale down and remove run
against a real controller and etcd, and its figures come from what it measured."""

from __future__ import annotations

import itertools
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


def test_short_soak_reports_its_cycles() -> None:
    argv = [
        sys.executable,
        "-m",
        "bench.soak",
        "--minutes",
        "0.1",
        "--nodes",
        "10",
        "--replicas",
        "60",
        "--settle",
        "0.5",
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["note"] == ""
    history = figures["history"]
    assert figures["cycles"] == len(history) >= 2
    assert all(c["rss_mb"] > 0 and c["seconds"] > 0 for c in history)
    assert [c["at_s"] for c in history] == sorted(c["at_s"] for c in history)
    assert figures["rss_first_mb"] == history[0]["rss_mb"]
    assert figures["rss_last_mb"] == history[-1]["rss_mb"]
    assert figures["rss_max_mb"] == max(c["rss_mb"] for c in history)
    assert figures["rss_peak_mb"] >= figures["rss_max_mb"]
    assert figures["controller_cpu_s"] > 0
    # the collector's runs come from the controller's metrics: counters, so they never go down
    runs = [c["gc_collections"] for c in history]
    assert all(len(r) == 3 for r in runs)
    assert all(
        b >= a for before, after in itertools.pairwise(runs) for a, b in zip(before, after, strict=True)
    )
    assert len(figures["gc_collections"]) == 3 and min(figures["gc_collections"]) >= 0
