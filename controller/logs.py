"""Structured, quiet-by-default logging: one event per line as ``key=value`` pairs."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise SystemExit(f"--log-level: unknown level {level!r}; use debug, info, warning or error")
    logging.basicConfig(
        level=numeric,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)
    logging.getLogger("aetcd").setLevel(logging.WARNING)
