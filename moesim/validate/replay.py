"""End-to-end check: replay a profiled MoE layer run and compare moesim's layer time with it.

Input: the torch.profiler trace ``validation/collect/collect_moe.py`` writes
(``moe_trace.json``), or the Nsight Systems SQLite export of a run of it under ``nsys profile``
(``*.sqlite``: the same labels as NVTX ranges), and its ``moe_cases.json`` beside it, which
gives each case's label, shape (tokens, hidden, intermediate size, top-k, experts, EP, dtype)
and the exact tokens each expert received. For every case the measured layer time is the
median, over its annotated calls, of the union of the device work inside the call (kernels on
all streams, overlaps counted once; for nsys, the kernels launched inside the NVTX range:
:func:`moesim.validate.nsys.range_busy`); the predicted time is
:func:`moesim.cost.moe.moe_layer_time` for the device profile with the same counts (router
GEMM excluded: the collector starts from the router's output).

A trace recorded in a ``--dry-run`` has CPU operators instead of kernels: the rows are then
flagged ``on_cpu`` and their "measured" column is CPU time, which checks the machinery and
says nothing about the cost model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.cost.moe import moe_layer_time
from moesim.errors import InputError
from moesim.files import load_json
from moesim.validate import nsys
from moesim.validate.kineto import annotation_spans, load_trace

CASES_FILE = "moe_cases.json"
_CASE_KEYS = ("label", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts", "moe_ep_size",
              "moe_dtype", "tokens_per_expert")


@dataclass(frozen=True)
class ReplayRow:
    """One case: ``measured`` and ``predicted`` layer times in seconds, ``error`` =
    predicted / measured - 1, over ``calls`` annotated calls."""

    label: str
    tokens: int
    distribution: str
    ep: int
    calls: int
    measured: float
    predicted: float
    on_cpu: bool

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0


@dataclass
class Replay:
    """All cases of a trace; ``device`` is the profile predicted with, ``measured_on`` the
    device the collector ran on (from moe_cases.json)."""

    rows: list[ReplayRow]
    device: str
    measured_on: str
    trace: str

    @property
    def on_cpu(self) -> bool:
        return any(r.on_cpu for r in self.rows)

    def summary(self) -> dict[str, float]:
        """Median and 90th percentile of the absolute percentage error, and the case count."""
        errors = np.abs([r.error for r in self.rows]) * 100.0
        return {"cases": len(self.rows), "median_abs_pct": float(np.median(errors)),
                "p90_abs_pct": float(np.percentile(errors, 90))}


def load_cases(path: str | Path) -> dict:
    """Read and check a moe_cases.json written by collect_moe.py."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise InputError("expected {'cases': [...]} as collect_moe.py writes it", source=str(path))
    for i, case in enumerate(data["cases"]):
        missing = [k for k in _CASE_KEYS if k not in case]
        if missing:
            raise InputError(f"case lacks {', '.join(missing)}", source=str(path), field=f"cases[{i}]")
        if len(case["tokens_per_expert"]) != case["num_experts"]:
            raise InputError(f"tokens_per_expert has {len(case['tokens_per_expert'])} entries for {case['num_experts']} experts",
                             source=str(path), field=f"cases[{i}]")
    return data


def replay(trace_path: str | Path, device, *, cases_path: str | Path | None = None) -> Replay:
    """Measured vs predicted layer time for every case of a collect_moe.py trace.

    ``device`` is a device profile (``moesim.hardware.catalog.device(name)``); ``cases_path``
    defaults to moe_cases.json beside the trace."""
    trace_path = Path(trace_path)
    cases_path = Path(cases_path) if cases_path else trace_path.with_name(CASES_FILE)
    cases = load_cases(cases_path)
    by_label: dict[str, list[tuple[float, bool]]] = {}  # label -> (busy microseconds, on the CPU) per call
    if trace_path.suffix == ".sqlite":
        calls = [(text, busy_ns / 1e3, False) for text, busy_ns in nsys.range_busy(trace_path, "moe case=")]
    else:
        calls = [(s.name, s.busy, s.on_cpu) for s in annotation_spans(load_trace(trace_path), r"^moe case=\d+ ")]
    for name, busy, on_cpu in calls:
        if re.match(r"moe case=\d+ ", name):
            by_label.setdefault(re.sub(r" it=\d+$", "", name), []).append((busy, on_cpu))
    rows = []
    for case in cases["cases"]:
        mine = by_label.get(case["label"])
        if not mine:
            hint = "was nsys run with -t cuda,nvtx?" if trace_path.suffix == ".sqlite" else "was it written with --no-trace?"
            raise InputError(f"no annotated calls named {case['label']!r} in the trace ({hint})", source=str(trace_path))
        busy = [b for b, _ in mine]
        if not any(busy):
            raise InputError(f"the calls of {case['label']!r} hold no recorded work", source=str(trace_path))
        counts = np.asarray(case["tokens_per_expert"], dtype=np.int64)
        predicted = moe_layer_time(device, counts, tokens=int(case["num_tokens"]), hidden=int(case["hidden_size"]),
                                   inter=int(case["inter_size"]), top_k=int(case["topk"]), dtype=str(case["moe_dtype"]),
                                   ep=int(case["moe_ep_size"]), expert_tp=int(case.get("moe_tp_size", 1)), router=False)
        rows.append(ReplayRow(case["label"], int(case["num_tokens"]), str(case.get("distribution", "")),
                              int(case["moe_ep_size"]), len(mine), float(np.median(busy)) * 1e-6, predicted.time,
                              any(on_cpu for _, on_cpu in mine)))
    return Replay(rows, getattr(device, "name", str(device)), str(cases.get("device", "")), str(trace_path))


def format_replay(result: Replay) -> list[str]:
    """The replay as lines of a plain table (times in microseconds)."""
    lines = [f"replay of {result.trace}: measured on {result.measured_on or 'unknown'}, predicted for {result.device}"]
    if result.on_cpu:
        lines.append("DRY RUN: the trace has no GPU kernels; 'measured' is CPU time of the operators, not a GPU measurement")
    lines.append(f"{'tokens':>7} {'routing':<22} {'EP':>3} {'calls':>5} {'measured us':>12} {'predicted us':>13} {'error':>8}")
    for r in result.rows:
        lines.append(f"{r.tokens:>7} {r.distribution:<22} {r.ep:>3} {r.calls:>5} {r.measured * 1e6:>12.1f} "
                     f"{r.predicted * 1e6:>13.1f} {r.error * 100:>+7.1f}%")
    s = result.summary()
    lines.append(f"{s['cases']} cases: median |error| {s['median_abs_pct']:.1f}%, p90 {s['p90_abs_pct']:.1f}%")
    return lines
