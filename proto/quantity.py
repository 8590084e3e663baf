"""Parse and format resource quantities the way Kubernetes and Docker users write them.

CPU: ``250m`` (millicores), ``0.5`` or ``2`` (cores). Memory: ``64Mi``, ``1Gi``, ``512M``, ``1e9``,
plain bytes. Errors are ``ValueError`` with a message that says what is accepted, so callers can
prefix the field name.
"""

from __future__ import annotations

import re

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([KMGTP]i|[kKMGTP])?[bB]?\s*$")
_CPU_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(m)?\s*$")


def parse_memory(text: str | int) -> int:
    """Return bytes for ``64Mi``, ``1G``, ``1048576``; raise ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is negative; use a size such as 64Mi or 1Gi")
        return text
    match = _MEMORY_RE.match(str(text))
    if not match:
        raise ValueError(f"cannot parse {text!r} as a size; use e.g. 64Mi, 1Gi, 500M or bytes")
    number, unit = match.groups()
    factor = _BINARY.get(unit or "", 0) or _DECIMAL.get(unit or "", 1)
    return int(float(number) * factor)


def parse_cpu(text: str | int | float) -> int:
    """Return millicores for ``250m``, ``0.5``, ``2``; raise ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is negative; use e.g. 250m, 0.5 or 2")
        return round(float(text) * 1000)
    match = _CPU_RE.match(str(text))
    if not match:
        raise ValueError(f"cannot parse {text!r} as CPU; use e.g. 250m, 0.5 or 2 (cores)")
    number, milli = match.groups()
    return round(float(number)) if milli else round(float(number) * 1000)


def format_memory(n: int) -> str:
    """Render bytes compactly with binary units (``128Mi``)."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if (n >= factor and n % (factor // 8 or 1) == 0) or n >= 10 * factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return str(n)


def format_cpu(millis: int) -> str:
    """Render millicores as cores when whole (``2``) and millicores otherwise (``250m``)."""
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"
