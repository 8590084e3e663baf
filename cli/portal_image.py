"""Build the example ``portal`` OCI image without Docker, and push it to a registry.

The image is one layer: busybox-static with its applets as symlinks in ``/bin``, ``/etc/passwd`` and
``/etc/group`` (root, nobody), and the page files of ``deploy/examples/portal/`` (``/portal/start.sh``
and ``/www``). ``umoci`` builds the OCI layout, ``skopeo`` pushes it over plain HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

PORTAL_NAME = "portal"
PORTAL_TAG = "1.0"
BUSYBOX = Path("/bin/busybox")

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(RuntimeError):
    """Building or pushing the example image failed; the message names the failing command."""


def portal_source_dir() -> Path:
    """``deploy/examples/portal`` of this checkout (the page files and start.sh)."""
    return Path(__file__).resolve().parent.parent / "deploy" / "examples" / "portal"


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(list(argv), check=False, capture_output=True, text=True, env=env, timeout=300)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{argv[0]} is not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(f"{' '.join(argv)} timed out") from e
    if done.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv)} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def _no_proxy_env() -> dict[str, str]:
    """The registry is local: never send its traffic through a proxy from the environment."""
    drop = {"http_proxy", "https_proxy", "all_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop}


def make_rootfs(root: Path, source: Path | None = None) -> None:
    """Lay out the image's root filesystem in the (empty or missing) directory ``root``."""
    source = source or portal_source_dir()
    if not BUSYBOX.is_file():
        raise ImageBuildError(f"{BUSYBOX} not found: install busybox-static")
    start = source / "start.sh"
    if not start.is_file():
        raise ImageBuildError(f"{start} not found")
    for d in ("bin", "etc", "portal", "www", "root", "proc", "sys", "dev", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    applets = _run([str(BUSYBOX), "--list"]).split()
    for applet in applets:
        if applet == "busybox" or "/" in applet:
            continue
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(_PASSWD)
    (root / "etc" / "group").write_text(_GROUP)
    (root / "etc" / "hostname").write_text("portal\n")
    shutil.copy2(start, root / "portal" / "start.sh")
    (root / "portal" / "start.sh").chmod(0o755)
    www = source / "www"
    if www.is_dir():
        shutil.copytree(www, root / "www", dirs_exist_ok=True)
    (root / "www").chmod(0o777)  # start.sh writes index.html at start, as any user


def build_oci_layout(layout: Path, *, tag: str = PORTAL_TAG, source: Path | None = None) -> str:
    """Build the image into the OCI layout directory ``layout`` (replaced); returns ``oci:<dir>:<tag>``."""
    if layout.exists():
        shutil.rmtree(layout)
    layout.parent.mkdir(parents=True, exist_ok=True)
    image = f"{layout}:{tag}"
    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", image])
    with tempfile.TemporaryDirectory(prefix="portal-rootfs-", dir=layout.parent) as tmp:
        root = Path(tmp) / "rootfs"
        root.mkdir()
        root.chmod(0o755)
        make_rootfs(root, source)
        _run(
            [
                "umoci",
                "insert",
                "--image",
                image,
                "--history.created_by",
                "berth dev: portal rootfs",
                str(root),
                "/",
            ]
        )
    _run(
        [
            "umoci",
            "config",
            "--image",
            image,
            "--author",
            "berth",
            "--os",
            "linux",
            "--config.entrypoint",
            "/portal/start.sh",
            "--clear",
            "config.cmd",
            "--config.env",
            "PORT=8080",
            "--config.env",
            f"PATH={_PATH}",
            "--config.exposedports",
            "8080/tcp",
            "--config.workingdir",
            "/www",
            "--config.user",
            "0:0",
            "--config.stopsignal",
            "SIGTERM",
            "--config.label",
            "org.opencontainers.image.title=berth portal example",
            "--history.created_by",
            "berth dev: portal config",
        ]
    )
    _run(["umoci", "gc", "--layout", str(layout)])
    return f"oci:{image}"


def push(oci_ref: str, registry: str, name: str = PORTAL_NAME, tag: str = PORTAL_TAG) -> str:
    """Copy ``oci:<dir>:<tag>`` to ``docker://<registry>/<name>:<tag>`` over plain HTTP; returns the ref."""
    ref = f"{registry}/{name}:{tag}"
    _run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", oci_ref, f"docker://{ref}"],
        env=_no_proxy_env(),
    )
    return ref


def build_portal_image(
    registry_address: str,
    *,
    work_dir: Path | None = None,
    tag: str = PORTAL_TAG,
    progress: Callable[[str], None] = lambda s: None,
) -> str:
    """Build the portal image, push it to ``registry_address``; returns e.g. ``10.210.0.1:5000/portal:1.0``.

    ``work_dir`` keeps the OCI layout (``<work_dir>/portal-oci``); without it a temporary directory is used.
    """
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="berth-portal-") as tmp:
            return build_portal_image(registry_address, work_dir=Path(tmp), tag=tag, progress=progress)
    progress("building the portal image (umoci)")
    oci_ref = build_oci_layout(work_dir / "portal-oci", tag=tag)
    progress(f"pushing {registry_address}/{PORTAL_NAME}:{tag} (skopeo)")
    return push(oci_ref, registry_address, PORTAL_NAME, tag)
