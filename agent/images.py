"""Image pulls: registry → OCI layout cache → unpacked read-only rootfs, once per digest.

We do not speak the registry protocol ourselves: ``skopeo copy`` handles auth, manifest lists
(it picks this platform's instance), OCI indexes and blob verification, and ``umoci raw unpack``
applies layers with whiteouts correctly. This module adds what the agent needs on top:

* one OCI layout under ``<state_dir>/images/oci`` so layers shared between images and re-pulls of
  the same image are not downloaded again (skopeo reuses blobs already present);
* the manifest digest of what was pulled (``--digestfile``), re-checked against the stored manifest
  blob, which is the identity containers are recorded with;
* one unpacked rootfs per manifest digest in ``<state_dir>/images/rootfs/<hex>``, unpacked into a
  temporary dir and renamed into place, so a crash never leaves a half-unpacked rootfs that looks
  complete;
* errors turned into one line a user can act on.

Pulls within one agent are serialised by an asyncio lock around the shared layout: skopeo rewrites
the layout's ``index.json`` without locking, so two concurrent copies into it could lose a tag.
A pull of an image already unpacked costs a manifest round trip and no layer download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from berth.agent.runtime import ImageInfo, ImagePullError

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "docker.io"


def registry_of(reference: str) -> str:
    """The registry host of an image reference, as Docker resolves it."""
    first, sep, _ = reference.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DEFAULT_REGISTRY


def normalize(reference: str) -> str:
    """Add the implicit ``:latest`` tag; reject references skopeo would misread."""
    ref = reference.strip()
    if not ref or any(c.isspace() for c in ref) or ref.startswith("-"):
        raise ImagePullError(f"invalid image reference {reference!r}")
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else ref + ":latest"


def describe_skopeo_error(reference: str, stderr: str) -> tuple[str, bool]:
    """(one-line reason, retryable) from skopeo's stderr."""
    registry = registry_of(reference)
    low = stderr.lower()
    if "server gave http response to https client" in low:
        return f"registry {registry} speaks plain HTTP; list it as an insecure registry", False
    if any(
        s in low
        for s in (
            "manifest unknown",
            "name unknown",
            "not found",
            "404",
            "no such manifest",
            "does not exist",
        )
    ):
        return f"image {reference} not found in registry", False
    if any(s in low for s in ("unauthorized", "authentication required", "requested access", "401", "403")):
        return f"access to image {reference} denied by registry {registry}", False
    if any(
        s in low
        for s in (
            "connection refused", "no such host", "i/o timeout", "network is unreachable",
            "no route to host", "connection reset", "tls handshake timeout", "dial tcp",
            "context deadline exceeded", "timeout",
        )
    ):  # fmt: skip
        return f"registry {registry} unreachable", True
    if "invalid reference format" in low or "invalid image name" in low:
        return f"invalid image reference {reference!r}", False
    if "digest" in low and ("mismatch" in low or "did not match" in low):
        return f"image {reference}: content does not match its digest", True
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "unknown error"
    if "msg=" in last:  # logrus line: time="..." level=fatal msg="..."
        last = last.split("msg=", 1)[1].strip().strip('"')
    return f"pulling {reference} failed: {last[:300]}", True


class ImageStore:
    """Pulls and unpacks images into ``<state_dir>/images``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        insecure_registries: Sequence[str] = (),
        command_timeout: float = 600.0,
    ) -> None:
        self.root = Path(state_dir) / "images"
        self.layout = self.root / "oci"
        self.rootfs_root = self.root / "rootfs"
        self.insecure = frozenset(insecure_registries)
        self.command_timeout = command_timeout
        self._lock = asyncio.Lock()
        # leftovers of a crash mid-pull: never complete, never referenced
        for parent in (self.root, self.rootfs_root):
            if parent.is_dir():
                for junk in parent.glob(".pull-*"):
                    shutil.rmtree(junk, ignore_errors=True)
                for junk in parent.glob(".unpack-*"):
                    shutil.rmtree(junk, ignore_errors=True)

    async def pull(self, reference: str) -> ImageInfo:
        ref = normalize(reference)
        registry = registry_of(ref)
        tag = "r-" + hashlib.sha256(ref.encode()).hexdigest()[:32]
        self.root.mkdir(parents=True, exist_ok=True)
        self.rootfs_root.mkdir(parents=True, exist_ok=True)
        async with self._lock:
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".pull-") as tmp:
                digestfile = Path(tmp) / "digest"
                argv = [
                    "skopeo", "--command-timeout", f"{int(self.command_timeout)}s",
                    "copy", "--quiet", "--digestfile", str(digestfile),
                ]  # fmt: skip
                if registry in self.insecure:
                    argv.append("--src-tls-verify=false")
                argv += [f"docker://{ref}", f"oci:{self.layout}:{tag}"]
                rc, _, err = await _run(argv)
                if rc != 0:
                    reason, retryable = describe_skopeo_error(ref, err)
                    log.info("pull %s failed: %s", ref, err.strip())
                    raise ImagePullError(reason, retryable=retryable)
                digest = digestfile.read_text().strip()
            manifest = self._verified_blob(ref, digest)
            rootfs = self.rootfs_root / digest.split(":", 1)[1]
            if not rootfs.is_dir():
                await self._unpack(ref, tag, rootfs)
        config = self._image_config(ref, manifest)
        return _image_info(reference, digest, rootfs, config)

    def _blob(self, digest: str) -> bytes:
        algo, _, hexpart = digest.partition(":")
        return (self.layout / "blobs" / algo / hexpart).read_bytes()

    def _verified_blob(self, ref: str, digest: str) -> dict[str, Any]:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64:
            raise ImagePullError(f"image {ref}: unsupported digest {digest!r}")
        try:
            data = self._blob(digest)
        except OSError as e:
            raise ImagePullError(f"image {ref}: manifest missing from the cache ({e.strerror})") from e
        if hashlib.sha256(data).hexdigest() != hexpart:
            raise ImagePullError(f"image {ref}: manifest does not match digest {digest}", retryable=True)
        if "@" in ref:
            pinned = ref.split("@", 1)[1]
            # a pinned manifest list resolves to this platform's manifest: skopeo verified the list
            if pinned != digest and not self._is_index(pinned):
                raise ImagePullError(f"image {ref}: pulled digest {digest} does not match")
        manifest: dict[str, Any] = json.loads(data)
        return manifest

    def _is_index(self, digest: str) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return "manifests" in json.loads(self._blob(digest))
        return False

    def _image_config(self, ref: str, manifest: dict[str, Any]) -> dict[str, Any]:
        try:
            cfg_digest = manifest["config"]["digest"]
            cfg: dict[str, Any] = json.loads(self._blob(cfg_digest))
        except (KeyError, OSError, ValueError) as e:
            raise ImagePullError(f"image {ref}: unreadable image config ({e})") from e
        inner = cfg.get("config") or {}
        return inner if isinstance(inner, dict) else {}

    async def _unpack(self, ref: str, tag: str, rootfs: Path) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.rootfs_root, prefix=".unpack-"))
        target = tmp / "rootfs"
        try:
            rc, _, err = await _run(
                ["umoci", "raw", "unpack", "--image", f"{self.layout}:{tag}", str(target)]
            )
            if rc != 0:
                raise ImagePullError(f"image {ref}: unpacking failed: {_last_line(err)}")
            os.chmod(target, 0o755)
            os.rename(target, rootfs)
            log.info("unpacked %s into %s", ref, rootfs)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)


def _image_info(reference: str, digest: str, rootfs: Path, cfg: dict[str, Any]) -> ImageInfo:
    def strs(key: str) -> tuple[str, ...]:
        v = cfg.get(key) or ()
        return tuple(str(x) for x in v) if isinstance(v, list) else ()

    return ImageInfo(
        reference=reference,
        digest=digest,
        rootfs=str(rootfs),
        entrypoint=strs("Entrypoint"),
        cmd=strs("Cmd"),
        env=strs("Env"),
        workdir=str(cfg.get("WorkingDir") or "/"),
        user=str(cfg.get("User") or ""),
    )


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown error"


async def _run(argv: list[str]) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as e:
        raise ImagePullError(f"{argv[0]} is not installed on this host") from e
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
