"""Per-container overlay root filesystems.

An image is unpacked once per manifest digest and shared by every container of that image as the
read-only ``lowerdir``; each container gets its own ``upperdir``/``workdir`` inside its bundle, so
writes never touch the shared copy and disappear with the container. The mount is made with
mount(2) directly (no shell, no ``mount`` binary), in the agent's mount namespace, at
``<bundle>/rootfs`` where runc expects the root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def is_mounted(target: Path) -> bool:
    want = os.fsencode(os.path.realpath(target))
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace(b"\\040", b" ") == want:
                return True
    return False


def mount_overlay(lower: Path, bundle: Path) -> Path:
    """Mount ``lower`` (read-only) + a fresh upper/work dir under ``bundle`` at ``bundle/rootfs``.

    Idempotent: an existing mount at the target is kept (agent restarted between create and start).
    """
    target = bundle / "rootfs"
    upper, work = bundle / "upper", bundle / "work"
    for d in (target, upper, work):
        d.mkdir(parents=True, exist_ok=True)
    if is_mounted(target):
        return target
    for p in (lower, upper, work):
        if any(c in str(p) for c in ",:\n"):
            raise ValueError(f"overlay path {p} contains ',' or ':' which mount options cannot express")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    _check(
        _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, opts.encode()),
        f"mount overlay at {target}",
    )
    log.debug("mounted overlay %s", target)
    return target


def unmount(target: Path) -> None:
    """Unmount ``target``; fall back to a lazy unmount when busy. Never raises if not mounted."""
    path = os.fsencode(target)
    while is_mounted(target):
        if _libc.umount2(path, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        if err == errno.EBUSY:
            log.warning("%s busy, detaching lazily", target)
            _check(_libc.umount2(path, _MNT_DETACH), f"umount -l {target}")
            return
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
