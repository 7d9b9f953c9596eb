"""Nsight Systems SQLite export (``nsys export --type sqlite report.nsys-rep``): kernels and
NVTX ranges.

Table ``CUPTI_ACTIVITY_KIND_KERNEL`` holds one row per kernel with ``start`` and ``end`` in
NANOSECONDS, ``deviceId``, ``streamId``, ``correlationId`` and the name as an id into
``StringIds(id, value)``: ``demangledName`` (with templates) and ``shortName`` (base name) in
current releases, ``name`` in early ones; the columns are read with ``PRAGMA table_info`` so
either works. ``NVTX_EVENTS`` holds ranges (``start``, ``end`` ns, ``text`` or ``textId`` into
StringIds, ``globalTid``); CUDA API calls are in ``CUPTI_ACTIVITY_KIND_RUNTIME`` (``start``,
``end``, ``correlationId``, ``globalTid``), which ties a kernel to the thread and time it was
launched from.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.validate.busy import busy_time

KERNEL_TABLE = "CUPTI_ACTIVITY_KIND_KERNEL"
_NAME_COLUMNS = ("demangledName", "shortName", "name")


@dataclass
class NsysKernels:
    """Kernels of a report, sorted by start: ``start_ns`` / ``end_ns`` (int64 nanoseconds),
    ``device``, ``stream``, ``correlation`` (int64) and ``name`` (object array of str)."""

    start_ns: np.ndarray
    end_ns: np.ndarray
    device: np.ndarray
    stream: np.ndarray
    correlation: np.ndarray
    name: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.start_ns.size)

    def busy_ns(self) -> dict[int, float]:
        """Nanoseconds each device was busy (union of its kernels over all streams)."""
        return {int(d): busy_time(self.start_ns[self.device == d], self.end_ns[self.device == d])
                for d in np.unique(self.device)}


@dataclass(frozen=True)
class NvtxRange:
    """One NVTX push/pop or start/end range: ``start_ns`` / ``end_ns`` and the thread
    (``global_tid``, nsys's serialized id) it was pushed on."""

    text: str
    start_ns: int
    end_ns: int
    global_tid: int


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise InputError("file not found", source=str(path))
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        connection.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"not an SQLite database ({exc}); export the report with 'nsys export --type sqlite'",
                         source=str(path)) from None
    return connection


def _columns(connection: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]


def read_kernels(path: str | Path) -> NsysKernels:
    """The kernel table of an nsys SQLite export, names resolved through StringIds."""
    path = Path(path)
    with closing(_connect(path)) as connection:
        columns = _columns(connection, KERNEL_TABLE)
        if not columns:
            raise InputError(f"no {KERNEL_TABLE} table: the report recorded no CUDA kernels (profile with -t cuda)",
                             source=str(path))
        missing = [c for c in ("start", "end", "deviceId", "streamId") if c not in columns]
        name_column = next((c for c in _NAME_COLUMNS if c in columns), None)
        if missing or name_column is None:
            raise InputError(f"{KERNEL_TABLE} lacks {', '.join(missing) or 'a name column'}; columns: {', '.join(columns)}",
                             source=str(path))
        correlation = "k.correlationId" if "correlationId" in columns else "-1"
        try:
            rows = connection.execute(
                f"SELECT k.start, k.end, k.deviceId, k.streamId, {correlation}, s.value FROM {KERNEL_TABLE} AS k "
                f"LEFT JOIN StringIds AS s ON s.id = k.{name_column} ORDER BY k.start").fetchall()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot read {KERNEL_TABLE}: {exc}", source=str(path)) from None
    if any(r[0] is None or r[1] is None for r in rows):
        raise InputError(f"{KERNEL_TABLE} has kernels without start/end timestamps", source=str(path))
    table = np.array([r[:5] for r in rows], dtype=np.int64).reshape(-1, 5)
    names = np.array([r[5] if r[5] is not None else "<unknown>" for r in rows], dtype=object)
    return NsysKernels(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4], names, str(path))


def read_nvtx_ranges(path: str | Path, match: str | None = None) -> list[NvtxRange]:
    """NVTX ranges (those with an end) whose text contains ``match``, by start time."""
    path = Path(path)
    with closing(_connect(path)) as connection:
        try:
            columns = _columns(connection, "NVTX_EVENTS")
            if not columns:
                return []
            text = "COALESCE(n.text, s.value)" if "textId" in columns else "n.text"
            join = "LEFT JOIN StringIds AS s ON s.id = n.textId" if "textId" in columns else ""
            tid = "n.globalTid" if "globalTid" in columns else "0"
            rows = connection.execute(
                f"SELECT {text}, n.start, n.end, {tid} FROM NVTX_EVENTS AS n {join} "
                f"WHERE n.end IS NOT NULL AND n.end >= n.start ORDER BY n.start").fetchall()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot read NVTX_EVENTS: {exc}", source=str(path)) from None
    return [NvtxRange(t or "", int(s), int(e), int(g or 0)) for t, s, e, g in rows if match is None or match in (t or "")]


def kernels_in_range(path: str | Path, kernels: NsysKernels, nvtx: NvtxRange) -> np.ndarray:
    """Indices of the kernels launched inside an NVTX range: their CUDA runtime launch call
    (same correlation id) started on the range's thread between its start and end. Without a
    runtime table, the kernels that started inside the range instead."""
    path = Path(path)
    with closing(_connect(path)) as connection:
        columns = _columns(connection, "CUPTI_ACTIVITY_KIND_RUNTIME")
        if not columns or "correlationId" not in columns:
            return np.flatnonzero((kernels.start_ns >= nvtx.start_ns) & (kernels.start_ns <= nvtx.end_ns))
        same_thread = "AND globalTid = ?" if "globalTid" in columns and nvtx.global_tid else ""
        params = (nvtx.start_ns, nvtx.end_ns) + ((nvtx.global_tid,) if same_thread else ())
        launched = {r[0] for r in connection.execute(
            f"SELECT correlationId FROM CUPTI_ACTIVITY_KIND_RUNTIME WHERE start >= ? AND start <= ? {same_thread}", params)}
    return np.flatnonzero(np.isin(kernels.correlation, list(launched)))


def range_busy(path: str | Path, match: str) -> list[tuple[str, float]]:
    """(text, nanoseconds) of each NVTX range whose text contains ``match``, by start time: the
    union over all streams of the kernels launched inside it (:func:`kernels_in_range`; memory
    copies are not in the kernel table), overlaps counted once."""
    kernels = read_kernels(path)
    out = []
    for nvtx in read_nvtx_ranges(path, match):
        mine = kernels_in_range(path, kernels, nvtx)
        out.append((nvtx.text, busy_time(kernels.start_ns[mine], kernels.end_ns[mine])))
    return out
