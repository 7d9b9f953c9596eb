"""nccl-tests results (``all_reduce_perf``, ``all_gather_perf``, ``alltoall_perf`` ...): the
text table they print and the JSON file ``-J PATH`` writes (nccl-tests 2.17+, src/util.cu).

Text: after the ``# Using devices`` block (one ``#  Rank ...`` line per GPU) comes a header
naming the columns, e.g.::

    #       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong
    #        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)
         1048576        262144     float     sum      -1    28.61   36.66   64.15       0    28.12   37.29   65.26       0

``size`` is bytes (the larger of send and receive buffer), ``count`` elements, ``time``
microseconds (``cputime`` with ``-C 1``), ``algbw`` / ``busbw`` GB/s; the first group is
out-of-place, the second in-place; ``#wrong`` is ``N/A`` without data checking. Older releases
print ``error`` for ``#wrong`` and have no ``root`` or ``redop`` column for some tests; ``-R``
adds per-iteration columns and ``-T`` a timestamp; the header decides which column is which.

JSON: ``{"version", "args", "config": {..., "devices": [...]}, "results": [{"size", "count",
"type", "redop", "root", "out_of_place": {"time", "alg_bw", "bus_bw", "nwrong"} | null,
"in_place": {...}, ...}], ...}``; the collective is named only by the program in ``args[0]``.

:func:`table_rows` turns a run into rows of the aiconfigurator NCCL table (``op_name``,
``nccl_dtype``, ``num_gpus``, ``message_size`` in ELEMENTS, ``latency`` in ms), the columns
``moesim.validate`` compares with the cost model; :func:`read_table` reads a file straight
into such a table (what ``moesim validate --nccl-tests`` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moesim.errors import InputError
from moesim.files import load_json, read_text
from moesim.validate.tables import Table, table_from_rows

# Bytes per element of the type names nccl-tests prints (src/common.cu test_typenames).
TYPE_BYTES = {"int8": 1, "uint8": 1, "char": 1, "int32": 4, "uint32": 4, "int": 4, "int64": 8, "uint64": 8,
              "half": 2, "float": 4, "double": 8, "bfloat16": 2, "f8e4m3": 1, "f8e5m2": 1}
_GROUP = ("time", "algbw", "busbw", "wrong")
# The collectives moesim's cost model prices, by their program names (all_reduce_perf ...).
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "alltoall")


@dataclass(frozen=True)
class Timing:
    """One placement's figures: ``time_us`` (microseconds), ``algbw`` and ``busbw`` (GB/s, 1e9
    bytes/s), ``wrong`` (wrong elements; None when not checked)."""

    time_us: float
    algbw: float
    busbw: float
    wrong: float | None


@dataclass(frozen=True)
class NcclRow:
    """One message size: ``size`` bytes, ``count`` elements, the element ``type``, ``redop``
    and ``root`` as printed, and the out-of-place / in-place timings (None when not run)."""

    size: int
    count: int
    type: str
    redop: str
    root: int
    out_of_place: Timing | None
    in_place: Timing | None


@dataclass
class NcclRun:
    """A whole run: the collective (``all_reduce`` ...; '' when the output does not say),
    the GPUs it used (``num_gpus``; 0 when not printed) and its rows."""

    op_name: str
    num_gpus: int
    rows: list[NcclRow]
    source: str = ""


def _op_from_program(program: str) -> str:
    name = Path(program).name
    return name[: -len("_perf")] if name.endswith("_perf") else name


def _number(text: str, source: str, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"expected a number in column {column!r}, got {text!r}", source=source, field=f"line {line}") from None


def _header_columns(line: str) -> list[str] | None:
    """Column names of a results header line, with the per-placement groups renamed
    ``oop_time`` ... / ``ip_time`` ...; None when the line is not that header."""
    names = line.lstrip("#").split()
    if not names or names[0] not in ("size", "bytes") or "count" not in names and "N" not in names:
        return None
    out, prefix = [], "oop_"
    for name in names:
        name = {"N": "count", "bytes": "size", "cputime": "time", "#wrong": "wrong", "error": "wrong", "res": "wrong",
                "op": "redop"}.get(name, name)
        if name == "time" and any(n == "oop_time" for n in out):
            prefix = "ip_"
        if name in _GROUP or name.startswith("i_"):
            name = prefix + name
        elif name == "timestamp":
            out += ["timestamp_date", "timestamp_time"]
            continue
        out.append(name)
    return out


def _timing(values: dict, prefix: str, source: str, line: int) -> Timing | None:
    if prefix + "time" not in values:
        return None
    wrong = values.get(prefix + "wrong", "N/A")
    return Timing(*(_number(values[prefix + k], source, line, prefix + k) for k in ("time", "algbw", "busbw")),
                  None if wrong == "N/A" else _number(wrong, source, line, prefix + "wrong"))


def parse_text(text: str, source: str = "", op_name: str = "") -> NcclRun:
    """Parse the printed output of an nccl-tests program; ``op_name`` names the collective
    when the output does not (releases before 2.14 print no ``Collective test starting``)."""
    columns: list[str] | None = None
    ranks, gpus_per_rank, rows = 0, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if found := re.match(r"#\s*Collective test starting:\s*(\S+)", stripped):
                op_name = op_name or _op_from_program(found.group(1))
            elif re.match(r"#\s+Rank\s+\d+", stripped):
                ranks += 1
            elif found := re.search(r"nThread\s+(\d+)\s+nGpus\s+(\d+)", stripped):
                gpus_per_rank = int(found.group(1)) * int(found.group(2))
            elif header := _header_columns(stripped):
                columns = header
            continue
        if columns is None:
            continue  # launcher or NCCL INFO lines before the table
        tokens = stripped.split()
        if not tokens[0].isdigit():
            continue  # a warning printed between rows
        width = len(columns)
        oop_width = sum(1 for c in columns if c.startswith("oop_"))
        names = columns
        if len(tokens) == width - oop_width:  # a replay line: in-place only
            names = [c for c in columns if not c.startswith("oop_")]
        elif len(tokens) == width - 2 and columns[-1] == "timestamp_time":
            names = columns[:-2]
        elif len(tokens) != width:
            raise InputError(f"results row has {len(tokens)} columns, the header names {width} (truncated output?)",
                             source=source, field=f"line {number}")
        values = dict(zip(names, tokens))
        rows.append(NcclRow(int(_number(values["size"], source, number, "size")),
                            int(_number(values["count"], source, number, "count")), values.get("type", ""),
                            values.get("redop", "none"), int(_number(values.get("root", "-1"), source, number, "root")),
                            _timing(values, "oop_", source, number), _timing(values, "ip_", source, number)))
    if columns is None:
        raise InputError("no nccl-tests results header ('#  size  count  type ...') found", source=source)
    if not rows:
        raise InputError("no result rows after the header (the run stopped early?)", source=source)
    return NcclRun(op_name, ranks or gpus_per_rank, rows, source)


def _json_timing(entry, source: str, where: str) -> Timing | None:
    if entry is None:
        return None
    try:
        time = entry["time"] if "time" in entry else entry["cpu_time"]
        wrong = entry.get("nwrong")
        return Timing(float(time), float(entry["alg_bw"]), float(entry["bus_bw"]), None if wrong is None else float(wrong))
    except (KeyError, TypeError, ValueError):
        raise InputError("expected {time, alg_bw, bus_bw, nwrong} with numbers", source=source, field=where) from None


def parse_json(data, source: str = "", op_name: str = "") -> NcclRun:
    """Parse the object nccl-tests writes with ``-J``."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise InputError("not an nccl-tests JSON report: expected an object with a 'results' list", source=source)
    args = data.get("args") or []
    if not op_name and args:
        op_name = _op_from_program(str(args[0]))
    devices = (data.get("config") or {}).get("devices") or []
    rows = []
    for i, result in enumerate(data["results"]):
        where = f"results[{i}]"
        try:
            rows.append(NcclRow(int(result["size"]), int(result["count"]), str(result["type"]), str(result["redop"]),
                                int(str(result.get("root", -1)).strip()),
                                _json_timing(result.get("out_of_place"), source, where + ".out_of_place"),
                                _json_timing(result.get("in_place"), source, where + ".in_place")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError("expected size, count, type, redop, root", source=source, field=where) from None
    if not rows:
        raise InputError("the report holds no results", source=source)
    return NcclRun(op_name, len(devices), rows, source)


def read_nccl_tests(path: str | Path, op_name: str = "") -> NcclRun:
    """Read nccl-tests output, text or ``-J`` JSON (told apart by the first character)."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("{"):
        return parse_json(load_json(path), str(path), op_name)
    return parse_text(text, str(path), op_name)


def table_rows(run: NcclRun, *, placement: str = "out_of_place", num_gpus: int | None = None) -> list[dict]:
    """Rows in the aiconfigurator NCCL table's columns: ``op_name``, ``nccl_dtype`` (the
    nccl-tests type name, e.g. ``half``), ``num_gpus``, ``message_size`` (ELEMENTS: the
    ``size`` column in bytes over the element size, as that table stores it) and ``latency``
    (milliseconds), from the ``placement`` timing ('out_of_place' or 'in_place')."""
    if placement not in ("out_of_place", "in_place"):
        raise InputError(f"placement must be out_of_place or in_place, got {placement!r}", source=run.source)
    gpus = num_gpus or run.num_gpus
    if not run.op_name or not gpus:
        raise InputError("the output does not say the collective or the GPU count; pass op_name / num_gpus",
                         source=run.source)
    out = []
    for row in run.rows:
        timing = getattr(row, placement)
        if timing is None:
            continue
        if row.type not in TYPE_BYTES:
            raise InputError(f"unknown nccl-tests type {row.type!r}; known: {', '.join(TYPE_BYTES)}", source=run.source)
        out.append({"op_name": run.op_name, "nccl_dtype": row.type, "num_gpus": gpus,
                    "message_size": row.size // TYPE_BYTES[row.type], "latency": timing.time_us / 1e3})
    return out


def read_table(path: str | Path, *, num_gpus: int | None = None, placement: str = "out_of_place") -> Table:
    """An nccl-tests output file (text or ``-J`` JSON) as a table of the ``nccl`` family.

    The collective comes from the output (``Collective test starting``, or the program in the
    JSON's ``args``), else from a file name starting ``<collective>_perf`` (the program's
    name); ``num_gpus`` overrides the GPU count the output gives (one ``#  Rank`` line per
    GPU; the JSON's device list)."""
    path = Path(path)
    run = read_nccl_tests(path)
    if not run.op_name and (found := re.match(r"(\w+?)_perf", path.name)):
        run.op_name = found.group(1)
    if not run.op_name:
        raise InputError("the output does not name the collective (nccl-tests before 2.14); name the file after the "
                         "program, e.g. all_reduce_perf.txt", source=str(path), field="collective")
    if run.op_name not in COLLECTIVES:
        raise InputError(f"collective {run.op_name!r} has no cost model; expected one of {', '.join(COLLECTIVES)}",
                         source=str(path), field="collective")
    if not (num_gpus or run.num_gpus):
        raise InputError("the output does not give the GPU count (no '#  Rank' lines); give --gpus N", source=str(path),
                         field="num_gpus")
    rows = table_rows(run, placement=placement, num_gpus=num_gpus)
    if not rows:
        raise InputError(f"no {placement.replace('_', '-')} timings in the output", source=str(path))
    return table_from_rows(rows, "nccl", path)
