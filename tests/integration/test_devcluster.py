"""The dev cluster machinery against the real kernel, etcd, registry, skopeo and umoci.

This file checks the infrastructure half (etcd, registry, image, namespaces, teardown) without
controller and agents; tests/integration/test_services.py runs full clusters with the real ones.
Every cluster has a unique name ``dt<pid>``; leftovers of earlier crashed runs (whose pid is gone)
are swept first, and each test checks that ``down()`` left nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest

from berth.cli.devcluster import DevCluster, DevClusterConfig, DevClusterError
from tests.integration.devtools import BASE_DIR, make_config, owner_alive, traces

pytestmark = pytest.mark.integration

TOOLS = ("etcd", "docker-registry", "skopeo", "umoci", "nsenter", "ip", "nft", "busybox")

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, cgroups)", allow_module_level=True)
_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing:
    pytest.skip(f"missing tools: {', '.join(_missing)}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _sweep_leftovers() -> Iterator[None]:
    DevCluster.sweep("dt", BASE_DIR, skip=owner_alive)
    yield
    DevCluster.sweep(f"dt{os.getpid()}", BASE_DIR)


def _get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return bytes(resp.read())


def _in_netns(cluster: DevCluster, host: str, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={cluster.netns_path(host)}", *argv],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


def test_up_without_agents_serves_image_to_hosts_and_down_leaves_nothing() -> None:
    config = replace(make_config("a"), start_controller=False, start_agents=False)
    cluster = DevCluster(config)
    lines: list[str] = []
    try:
        cluster.up(progress=lines.append)
        assert any("etcd" in line for line in lines)

        assert json.loads(_get(f"http://127.0.0.1:{config.etcd_port}/health"))["health"] == "true"

        ref = cluster.image
        assert ref == f"{cluster.registry_address}/portal:1.0"
        assert cluster.registry_address == f"10.{210 + config.subnet_index}.0.1:{config.registry_port}"
        inspect = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{ref}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        image_config = json.loads(inspect.stdout)["config"]
        assert image_config["Entrypoint"] == ["/portal/start.sh"]
        assert "PORT=8080" in image_config["Env"]
        assert "8080/tcp" in image_config["ExposedPorts"]

        for i, host in enumerate(("h1", "h2"), start=1):
            assert cluster.netns(host) == f"berth-{config.name}-{host}"
            assert cluster.host_address(host) == f"10.{210 + config.subnet_index}.0.{10 + i}"
            body = _in_netns(
                cluster, host, "busybox", "wget", "-q", "-O-", f"http://{cluster.registry_address}/v2/"
            )
            assert body.strip() == "{}"
            addr = _in_netns(cluster, host, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
            assert cluster.host_address(host) in addr

        st = cluster.status()
        assert st["up"] is True
        assert {p["name"] for p in st["processes"]} == {"etcd", "registry"}
        assert all(p["alive"] for p in st["processes"])
        assert [h["name"] for h in st["hosts"]] == ["h1", "h2"]
        # a second object (like the CLI's) sees the same cluster, and up() refuses to run twice
        again = DevCluster(DevClusterConfig(name=config.name, base_dir=BASE_DIR))
        assert again.registry_address == cluster.registry_address
        with pytest.raises(DevClusterError, match="already up"):
            again.up()
    finally:
        cluster.down()
    assert traces(config.name) == []
    cluster.down()  # safe when already down
