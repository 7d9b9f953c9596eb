"""Measured kernel and collective timings in aiconfigurator's table schema.

One table per file: gzip CSV (``*.csv.gz`` or ``*.csv``) or Parquet (``*.parquet``, read with
pyarrow when it is installed). Columns that hold one value in the whole table may have been
dropped and listed in a ``tables.json`` beside the files (``{table: {"constant_columns":
{...}}}``); they are put back as constants. Each table is recognised by its file name and
columns as one operator family (:data:`FAMILIES`), and its measured time is converted to
seconds: ``latency`` is milliseconds in the moe, gemm, attention, mla, nccl and custom
all-reduce tables; the DeepEP tables give microseconds (``*_us``).
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import InputError


@dataclass(frozen=True)
class Family:
    """How to recognise one operator family's table and where its measured time is.

    ``keyword`` is a piece of the file name (aiconfigurator names files
    ``<op>_<framework>_<version>_<what>_perf``); ``columns`` must all be present (as columns or
    constants); ``times`` maps each measured quantity to (column, seconds per unit).
    ``shape`` are the columns that make one measured shape (the rest is the swept size), used
    to hold whole shapes out of calibration.
    """

    name: str
    keyword: str
    columns: tuple[str, ...]
    times: dict[str, tuple[str, float]]
    shape: tuple[str, ...]


_MS, _US = 1e-3, 1e-6

FAMILIES: tuple[Family, ...] = (
    # the DeepEP MoE compute tables first: their names also contain "moe_perf"
    Family("moe_deepep", "wideep_", ("num_tokens", "moe_ep_size", "distribution", "hidden_size", "inter_size", "topk",
                                     "num_experts", "latency"), {"latency": ("latency", _MS)},
           ("moe_ep_size", "op_name")),
    Family("moe", "moe_perf", ("num_tokens", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size",
                               "moe_ep_size", "distribution", "moe_dtype", "latency"), {"latency": ("latency", _MS)},
           ("hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size", "moe_ep_size")),
    Family("gemm", "gemm_perf", ("gemm_dtype", "m", "n", "k", "latency"), {"latency": ("latency", _MS)}, ("n", "k")),
    Family("attention_prefill", "context_attention", ("batch_size", "isl", "num_heads", "num_key_value_heads",
                                                      "head_dim", "window_size", "latency"),
           {"latency": ("latency", _MS)}, ("num_heads", "num_key_value_heads", "head_dim", "window_size")),
    Family("attention_decode", "generation_attention", ("batch_size", "step", "num_heads", "num_key_value_heads",
                                                        "head_dim", "window_size", "latency"),
           {"latency": ("latency", _MS)}, ("num_heads", "num_key_value_heads", "head_dim", "window_size")),
    Family("mla_prefill", "context_mla", ("num_heads", "batch_size", "isl", "tp_size", "latency"),
           {"latency": ("latency", _MS)}, ("num_heads", "tp_size", "batch_size")),
    Family("mla_decode", "generation_mla", ("num_heads", "batch_size", "step", "tp_size", "latency"),
           {"latency": ("latency", _MS)}, ("num_heads", "tp_size", "batch_size")),
    Family("nccl", "nccl_perf", ("op_name", "num_gpus", "message_size", "latency"), {"latency": ("latency", _MS)},
           ("op_name", "num_gpus", "message_size")),
    Family("custom_allreduce", "custom_allreduce", ("num_gpus", "message_size", "backend", "latency"),
           {"latency": ("latency", _MS)}, ("num_gpus", "message_size")),
    Family("deepep_ll", "deepep_ll", ("hidden_size", "num_token", "num_topk", "num_experts", "dispatch_avg_t_us",
                                      "combine_avg_t_us"),
           {"dispatch": ("dispatch_avg_t_us", _US), "combine": ("combine_avg_t_us", _US)},
           ("hidden_size", "num_topk", "num_experts")),
    Family("deepep_normal", "deepep_normal", ("hidden_size", "num_token", "num_topk", "num_experts", "dispatch_sms",
                                              "dispatch_transmit_us", "combine_sms", "combine_transmit_us"),
           {"dispatch": ("dispatch_transmit_us", _US), "combine": ("combine_transmit_us", _US)},
           ("hidden_size", "num_topk", "num_experts")),
)

_BY_NAME = {f.name: f for f in FAMILIES}
_SUFFIXES = (".csv.gz", ".csv", ".parquet")


@dataclass
class Table:
    """One measured table: ``columns`` name -> array (numbers as float64, text as str),
    ``constants`` the columns with one value for the whole table, ``seconds`` each measured
    quantity of the family in seconds (``latency``, or ``dispatch`` / ``combine``)."""

    name: str
    family: Family
    path: Path
    columns: dict[str, np.ndarray]
    constants: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def get(self, name: str) -> np.ndarray:
        """Column ``name``, a constant broadcast to every row, or an error naming the table."""
        if name in self.columns:
            return self.columns[name]
        if name in self.constants:
            return np.full(len(self), _number_or_text([self.constants[name]])[0])
        raise InputError(f"table has no column {name!r}", source=str(self.path))

    def take(self, index: np.ndarray) -> Table:
        """The rows at ``index`` (same constants)."""
        return Table(self.name, self.family, self.path, {k: v[index] for k, v in self.columns.items()},
                     dict(self.constants), {k: v[index] for k, v in self.seconds.items()})

    @property
    def device(self) -> str:
        """The GPU the table was measured on, as the table names it ('' when it does not)."""
        if "device" in self.constants:
            return self.constants["device"]
        values = self.columns.get("device")
        return str(values[0]) if values is not None and len(values) else ""


def table_name(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _number_or_text(values: list[str]) -> np.ndarray:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=str)


def _read_csv(path: Path) -> dict[str, list[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise InputError("empty table: expected a header row of column names", source=str(path))
            rows = list(reader)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"cannot read as CSV: {exc.__class__.__name__}: {exc}", source=str(path)) from None
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise InputError(f"row has {len(row)} fields; the header has {len(header)}", source=str(path),
                             field=f"line {number}")
    return {name: [r[i] for r in rows] for i, name in enumerate(header)}


def _read_parquet(path: Path) -> dict[str, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet tables needs pyarrow: pip install pyarrow (or convert the table to CSV)",
                         source=str(path)) from None
    table = pq.read_table(path)
    return {name: [str(v) for v in table.column(name).to_pylist()] for name in table.column_names}


def _constants(folder: Path) -> dict[str, dict[str, str]]:
    """``tables.json`` beside the tables: table name -> its dropped constant columns."""
    index = folder / "tables.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed JSON: {exc}", source=str(index)) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping of table name to its description", source=str(index))
    return {name: {k: str(v) for k, v in (entry or {}).get("constant_columns", {}).items()}
            for name, entry in data.items() if isinstance(entry, dict)}


def recognise(name: str, columns: set[str]) -> Family | None:
    """The family whose file-name keyword ``name`` contains and whose columns are all present."""
    for family in FAMILIES:
        if family.keyword in name and set(family.columns) <= columns:
            return family
    return None


def read_table(path: str | Path, *, family: str | None = None, constants: dict[str, str] | None = None) -> Table:
    """Read one table file. Its family is recognised from the file name and columns unless
    ``family`` names it; ``constants`` are columns dropped from the file (by default those the
    ``tables.json`` beside it lists)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", source=str(path))
    raw = _read_parquet(path) if path.name.endswith(".parquet") else _read_csv(path)
    name = table_name(path)
    constants = dict(_constants(path.parent).get(name, {}) if constants is None else constants)
    present = set(raw) | set(constants)
    if family is not None:
        if family not in _BY_NAME:
            raise InputError(f"unknown table family {family!r}; expected one of {', '.join(_BY_NAME)}", source=str(path))
        spec = _BY_NAME[family]
        missing = [c for c in spec.columns if c not in present]
        if missing:
            raise InputError(f"a {family} table needs column(s) {', '.join(missing)}", source=str(path))
    else:
        spec = recognise(name, present)
        if spec is None:
            raise InputError("not a known measured table: expected a name with one of "
                             f"{', '.join(f.keyword for f in FAMILIES)} and its columns", source=str(path))
    return _timed(Table(name, spec, path, {k: _number_or_text(v) for k, v in raw.items()}, constants),
                  lambda row: f"line {row + 2}")


def _timed(table: Table, where) -> Table:
    """``table`` with its measured quantities in seconds, after checking they are positive
    numbers; ``where(row index)`` names a bad row for the error."""
    for quantity, (column, scale) in table.family.times.items():
        values = table.get(column)
        if values.dtype.kind != "f":
            raise InputError(f"column {column!r} must hold numbers", source=str(table.path))
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if bad.size:
            raise InputError(f"column {column!r} must hold positive times", source=str(table.path),
                             field=where(int(bad[0])))
        table.seconds[quantity] = values * scale
    return table


def table_from_rows(rows: list[dict], family: str, path: str | Path) -> Table:
    """A table of ``family`` from rows already in its schema (each a dict of column -> value),
    e.g. those the nccl-tests and benchmark_moe readers make from ``path``; every row must hold
    the family's columns."""
    path = Path(path)
    spec = _BY_NAME[family]
    if not rows:
        raise InputError("no measured rows", source=str(path))
    missing = [c for c in spec.columns if c not in rows[0]]
    if missing:
        raise InputError(f"a {family} table needs column(s) {', '.join(missing)}", source=str(path))
    columns = {name: _number_or_text([str(r[name]) for r in rows]) for name in rows[0]}
    return _timed(Table(path.name, spec, path, columns), lambda row: f"row {row + 1}")


def read_folder(folder: str | Path) -> list[Table]:
    """Every measured table in ``folder`` (files of other kinds are left alone; a table file whose
    name and columns match no family is an error, so a misspelt file is not silently skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder of measured tables", source=str(folder))
    constants = _constants(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES))
    if not files:
        raise InputError(f"no measured tables ({', '.join(_SUFFIXES)}) in this folder", source=str(folder))
    return [read_table(p, constants=constants.get(table_name(p))) for p in files]


def by_family(tables: list[Table]) -> dict[str, list[Table]]:
    out: dict[str, list[Table]] = {}
    for table in tables:
        out.setdefault(table.family.name, []).append(table)
    return out
