"""Output: a table on a terminal, JSON for scripts (``--output json``, or when stdout is piped)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from rich.console import Console
from rich.table import Table


class OutputFormat(StrEnum):
    auto = "auto"
    table = "table"
    json = "json"


def resolve(fmt: OutputFormat) -> OutputFormat:
    if fmt is OutputFormat.auto:
        return OutputFormat.table if sys.stdout.isatty() else OutputFormat.json
    return fmt


def emit(fmt: OutputFormat, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Print rows as JSON (a list of objects) or as a table of ``columns`` (key, header)."""
    if resolve(fmt) is OutputFormat.json:
        print(json.dumps(list(rows), indent=2))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for _, header in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    Console().print(table)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def info(message: str) -> None:
    """Progress and confirmations go to stderr, so stdout stays clean for JSON."""
    print(message, file=sys.stderr)
