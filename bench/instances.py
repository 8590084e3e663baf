"""Vector bin packing instances with known optima, read straight from the shared tarballs.

The data (``../shared/data/vector-bin-packing/``, Vectorpack project, MIT licence) holds two
collections, each a ``<Collection>_instances.tar.gz`` of ``.vbp`` files plus a tab-separated
``<Collection>_summary_known.csv`` (``instance_name``, ``LB``, ``OPT`` with -1 for unknown, then the
best bin count of the paper's heuristics: ``best_overall``, ...).

``.vbp`` format: line 1 the number of dimensions ``d``; line 2 the ``d`` bin capacities; line 3 the
number ``n`` of item lines; then ``n`` lines ``s_1 ... s_d m``: the item's size in each dimension and
its multiplicity (the item is repeated ``m`` times).

A *family* is a subfolder of a tarball: ``Panigrahy/class1`` ... ``Panigrahy/class9``,
``Triplet/Caprara``, ``Triplet/Falkenauer``. Only instances whose optimum is known are loaded.

Mapping onto Berth: dimension 1 -> ``cpu_millis``, dimension 2 -> ``memory_bytes``, dimensions 3.. ->
scalars ``d3``, ``d4``, ... Every dimension is multiplied by a fixed integer (:data:`CPU_MILLIS_PER_UNIT`,
:data:`MEMORY_BYTES_PER_UNIT`, 1 for scalars). The sizes are integers already, so the scaled sizes are
integers and every ratio (item/capacity, item/item) is preserved exactly.
"""

from __future__ import annotations

import csv
import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from berth.controller.scheduler import Resources

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "vector-bin-packing"
"""``/work/shared/data/vector-bin-packing`` next to the repository."""
COLLECTIONS = ("Panigrahy", "Triplet")

CPU_MILLIS_PER_UNIT = 64
"""One size unit of dimension 1 in millicores: a 1000-unit Panigrahy bin is a 64-core host."""
MEMORY_BYTES_PER_UNIT = 256 << 20
"""One size unit of dimension 2 in bytes (256 MiB): a 1000-unit bin has 250 GiB."""

IntMatrix = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Known:
    """One row of a ``*_summary_known.csv``."""

    lower_bound: int
    optimum: int | None
    """``None`` where the file says -1 (unknown)."""
    best_heuristic: int | None
    """``best_overall``: the fewest bins any heuristic of the paper reached."""


@dataclass(frozen=True)
class Instance:
    """One vector bin packing instance: identical bins, items with a size in every dimension."""

    name: str
    family: str
    """``<collection>/<subfolder>``, e.g. ``Panigrahy/class3`` or ``Triplet/Caprara``."""
    capacity: tuple[int, ...]
    items: IntMatrix
    """One row per item (multiplicities expanded), one column per dimension, in file order."""
    known: Known

    @property
    def collection(self) -> str:
        return self.family.split("/", 1)[0]

    @property
    def dims(self) -> int:
        return len(self.capacity)


def parse_vbp(text: str) -> tuple[tuple[int, ...], IntMatrix]:
    """``(capacity, items)`` from the text of a ``.vbp`` file (multiplicities expanded)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 3:
        raise ValueError("a .vbp file needs at least 3 lines")
    dims = int(lines[0][0])
    capacity = tuple(int(value) for value in lines[1])
    if len(capacity) != dims:
        raise ValueError(f"{len(capacity)} capacities for {dims} dimensions")
    count = int(lines[2][0])
    rows = lines[3 : 3 + count]
    if len(rows) != count:
        raise ValueError(f"{len(rows)} item lines, expected {count}")
    items: list[list[int]] = []
    for row in rows:
        if len(row) != dims + 1:
            raise ValueError(f"item line {' '.join(row)!r} has {len(row)} fields, expected {dims + 1}")
        sizes = [int(value) for value in row[:dims]]
        items.extend([sizes] * int(row[dims]))
    return capacity, np.array(items, dtype=np.int64).reshape(len(items), dims)


def read_summary(text: str) -> dict[str, Known]:
    """Instance name -> :class:`Known`, from the text of a ``*_summary_known.csv``."""
    known: dict[str, Known] = {}
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        optimum = int(row["OPT"])
        best = int(row.get("best_overall") or -1)
        known[row["instance_name"]] = Known(
            lower_bound=int(row["LB"]),
            optimum=optimum if optimum > 0 else None,
            best_heuristic=best if best > 0 else None,
        )
    return known


def _size_key(name: str) -> tuple[int, int, int, str]:
    """``classC_120_5_3`` -> ``(120, 5, 3, name)``: items, dimensions, index."""
    parts = name.split("_")
    try:
        return int(parts[-3]), int(parts[-2]), int(parts[-1]), name
    except (IndexError, ValueError):
        return 0, 0, 0, name


def subsample(names: Sequence[str], limit: int | None) -> list[str]:
    """At most ``limit`` of ``names``, evenly spaced over them sorted by (items, dims, index).

    Deterministic, and spread over every size and dimension count of the family.
    """
    ordered = sorted(names, key=_size_key)
    if limit is None or limit >= len(ordered):
        return ordered
    if limit <= 0:
        return []
    step = len(ordered) / limit
    return [ordered[int(i * step + step / 2)] for i in range(limit)]


@dataclass(frozen=True)
class Catalogue:
    """What was loaded and what was left out."""

    instances: tuple[Instance, ...]
    unknown_optimum: int
    """Instances in the tarballs skipped because their optimum is unknown."""
    available: dict[str, int]
    """Family -> instances with a known optimum (before ``limit``)."""


def load(
    data_dir: Path = DATA_DIR,
    *,
    limit: int | None = None,
    collections: Iterable[str] = COLLECTIONS,
) -> Catalogue:
    """Instances with a known optimum, at most ``limit`` per family (``None``: all)."""
    instances: list[Instance] = []
    unknown = 0
    available: dict[str, int] = {}
    for collection in collections:
        known = read_summary((data_dir / f"{collection}_summary_known.csv").read_text())
        with tarfile.open(data_dir / f"{collection}_instances.tar.gz") as tar:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                if not (member.isfile() and member.name.endswith(".vbp")):
                    continue
                path = Path(member.name)
                name = path.stem
                entry = known.get(name)
                if entry is None or entry.optimum is None:
                    unknown += 1
                    continue
                family = f"{collection}/{path.parent.name}"
                members.setdefault(family, {})[name] = member
            for family in sorted(members):
                available[family] = len(members[family])
                for name in subsample(list(members[family]), limit):
                    handle = tar.extractfile(members[family][name])
                    if handle is None:
                        raise ValueError(f"cannot read {name} from {collection}")
                    capacity, items = parse_vbp(handle.read().decode())
                    instances.append(Instance(name, family, capacity, items, known[name]))
    return Catalogue(tuple(instances), unknown, available)


def scalar_name(dim: int) -> str:
    """The Berth scalar that holds 0-based dimension ``dim`` (>= 2): ``d3``, ``d4``, ..."""
    return f"d{dim + 1}"


def to_resources(sizes: Sequence[int] | npt.NDArray[np.int64]) -> Resources:
    """One size vector (a bin capacity or an item) as Berth :class:`Resources`."""
    values = [int(v) for v in sizes]
    return Resources(
        cpu_millis=values[0] * CPU_MILLIS_PER_UNIT,
        memory_bytes=(values[1] if len(values) > 1 else 0) * MEMORY_BYTES_PER_UNIT,
        scalars={scalar_name(i): v for i, v in enumerate(values) if i >= 2},
    )


def decreasing_order(instance: Instance) -> npt.NDArray[np.intp]:
    """Item indices by decreasing normalised size ``sum_k s_k / c_k`` (stable: ties keep file order).

    This is the "sum" ordering of first-fit-decreasing in Panigrahy et al. (2011).
    """
    capacity = np.array(instance.capacity, dtype=np.float64)
    size = (instance.items / capacity).sum(axis=1)
    order: npt.NDArray[np.intp] = np.argsort(-size, kind="stable")
    return order
