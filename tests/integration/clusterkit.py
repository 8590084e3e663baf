"""Helpers for integration tests that drive a dev cluster through the real CLI and check what
really runs (runc's own state on every host), shared by the service and failover tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from berth.cli.devcluster import DevCluster
from berth.controller.store import Store

T = TypeVar("T")


def berth(c: DevCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BERTH_ADDR": c.controller_address}
    proc = subprocess.run(
        [sys.executable, "-m", "berth.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"berth {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def ps(c: DevCluster, service: str) -> list[dict[str, Any]]:
    return list(json.loads(berth(c, "service", "ps", service, "-o", "json").stdout))


def nodes(c: DevCluster) -> list[dict[str, Any]]:
    return list(json.loads(berth(c, "node", "ls", "-o", "json").stdout))


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def apply(c: DevCluster, tmp_path: Path, spec: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(spec.replace("IMAGE", c.image or ""))
    berth(c, "service", "apply", "-f", str(path))


def all_running(c: DevCluster, service: str, count: int) -> list[dict[str, Any]] | None:
    rows = ps(c, service)
    if len(rows) == count and all(r["state"] == "running" for r in rows):
        return rows
    return None


def containers(c: DevCluster) -> dict[str, tuple[str, int]]:
    """Every running container on every host, from runc itself: task id -> (host, pid)."""
    found: dict[str, tuple[str, int]] = {}
    for name, host in c.hosts.items():
        root = Path(host.state_dir) / "runc"
        if not root.exists():
            continue
        out = subprocess.run(
            ["runc", "--root", str(root), "list", "-f", "json"], capture_output=True, text=True, check=True
        ).stdout
        for entry in json.loads(out or "null") or []:
            if entry["status"] == "running":
                found[entry["id"]] = (name, int(entry["pid"]))
    return found


def of_service(found: dict[str, tuple[str, int]], service: str) -> dict[str, tuple[str, int]]:
    return {tid: v for tid, v in found.items() if tid.startswith(f"{service}.")}


def get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return str(resp.read().decode())


def stored(c: DevCluster) -> tuple[dict[str, Any], dict[str, Any]]:
    """Services and tasks in etcd (value and revision): used to prove a failed call changed nothing."""

    async def load() -> tuple[dict[str, Any], dict[str, Any]]:
        store = Store(c.etcd_endpoint, "/berth/")
        try:
            loaded = await store.load()
        finally:
            await store.close()
        services = {k: (str(v.value), v.mod_revision) for k, v in loaded.services.items()}
        tasks = {k: (str(v.value), v.mod_revision) for k, v in loaded.tasks.items()}
        return services, tasks

    return asyncio.run(load())
