"""torch.profiler / Kineto Chrome trace JSON: kernels, device busy time, annotated spans.

The file ``prof.export_chrome_trace(path)`` writes (Kineto's ``ChromeTraceLogger``) is
``{"schemaVersion", "deviceProperties", ..., "traceEvents": [...]}``; each complete event is
``{"ph": "X", "cat", "name", "pid", "tid", "ts", "dur", "args"}`` with ``ts`` and ``dur`` in
MICROSECONDS (three decimals, i.e. ns resolution). On the GPU side ``pid`` is the device and
``tid`` the stream, and a kernel's ``args`` carry ``device``, ``stream`` and ``correlation`` (the
id of the ``cuda_runtime`` launch that queued it). Categories used here:

- ``kernel``, ``gpu_memcpy``, ``gpu_memset``: work on the device;
- ``user_annotation``: a ``record_function`` range on the CPU thread;
- ``gpu_user_annotation``: the same range drawn over the GPU work it launched;
- ``cuda_runtime`` / ``cuda_driver``: launches, linked to kernels by ``correlation``;
- ``cpu_op``: ATen operators on the CPU thread.

A trace recorded without a GPU (the collectors' ``--dry-run``) has no kernels; the functions
here then fall back to ``cpu_op`` events and say so (``on_cpu``), so the same code path is
exercised on a CPU, but such times are CPU times and never a GPU measurement. ``.json.gz``
files (``tensorboard_trace_handler``) are read too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.files import load_json
from moesim.validate.busy import busy_time, clip_intervals

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
# Categories of traces written by torch 1.8-1.9 (before Kineto's lower-case names).
_OLD_NAMES = {"operator": "cpu_op", "runtime": "cuda_runtime", "memcpy": "gpu_memcpy", "memset": "gpu_memset"}


@dataclass(frozen=True)
class TraceEvent:
    """One complete (``ph: X``) event; ``ts`` and ``dur`` in microseconds."""

    name: str
    cat: str
    ts: float
    dur: float
    pid: Any
    tid: Any
    args: dict = field(default_factory=dict, compare=False)

    @property
    def end(self) -> float:
        """End time, microseconds."""
        return self.ts + self.dur

    @property
    def device(self):
        """The GPU a device event ran on (``args.device``, else its ``pid``)."""
        return self.args.get("device", self.pid)


@dataclass
class KinetoTrace:
    """The complete events of a trace file, in file order, and its top-level metadata."""

    path: str
    events: list[TraceEvent]
    metadata: dict

    def of(self, *categories: str) -> list[TraceEvent]:
        """The events of the given categories."""
        return [e for e in self.events if e.cat in categories]


@dataclass
class Span:
    """An annotated range and the work inside it.

    ``start`` / ``end`` are the annotation's bounds and ``busy`` the union of its work's
    intervals, all in microseconds. ``on_cpu`` is True when ``work`` holds CPU operators
    because the trace has no kernels (a CPU dry run): ``busy`` is then CPU time."""

    name: str
    start: float
    end: float
    work: list[TraceEvent]
    busy: float
    on_cpu: bool
    args: dict = field(default_factory=dict)


def load_trace(path: str | Path) -> KinetoTrace:
    """Read a Chrome trace written by torch.profiler (``.json`` or ``.json.gz``).

    Keeps the complete events (``ph`` "X", or no ``ph`` as some exporters write) and drops
    metadata, instant and flow events. Raises InputError for a file that is not a trace or
    has an event without a numeric ``ts`` / ``dur``."""
    path = Path(path)
    data = load_json(path)
    if isinstance(data, list):  # the Trace Event Format also allows a bare event array
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise InputError("not a Chrome trace: expected an object with a 'traceEvents' list", source=str(path))
    events = []
    for i, raw in enumerate(data["traceEvents"]):
        if not isinstance(raw, dict):
            raise InputError("expected an event object", source=str(path), field=f"traceEvents[{i}]")
        if raw.get("ph", "X") != "X":
            continue
        try:
            ts, dur = float(raw["ts"]), float(raw.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            raise InputError("complete event needs numeric 'ts' and 'dur' (microseconds)", source=str(path),
                             field=f"traceEvents[{i}]") from None
        cat = str(raw.get("cat", "")).lower()
        args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
        events.append(TraceEvent(str(raw.get("name", "")), _OLD_NAMES.get(cat, cat), ts, dur,
                                 raw.get("pid"), raw.get("tid"), args))
    metadata = {k: v for k, v in data.items() if k != "traceEvents"}
    return KinetoTrace(str(path), events, metadata)


def device_work(trace: KinetoTrace, *, copies: bool = True, cpu_fallback: bool = False) -> tuple[list[TraceEvent], bool]:
    """The events that kept a device busy: kernels (and memcpy / memset when ``copies``).

    With no device events and ``cpu_fallback``, the ``cpu_op`` events instead; the second
    value says whether that happened (CPU times, not a GPU measurement)."""
    wanted = DEVICE_CATEGORIES if copies else ("kernel",)
    work = trace.of(*wanted)
    if work or not cpu_fallback:
        return work, False
    return trace.of("cpu_op"), True


def busy_by_device(events: list[TraceEvent]) -> dict:
    """Microseconds each device was busy: the union of its events' intervals over all of its
    streams (overlapping kernels count once)."""
    out: dict = {}
    for device in sorted({e.device for e in events}, key=str):
        mine = [e for e in events if e.device == device]
        out[device] = busy_time([e.ts for e in mine], [e.end for e in mine])
    return out


def _matcher(match):
    if match is None:
        return lambda name: True
    pattern = re.compile(match) if isinstance(match, str) else match
    return lambda name: pattern.search(name) is not None


def _span(annotation: TraceEvent, work: list[TraceEvent], *, clip: bool, on_cpu: bool) -> Span:
    starts, ends = [e.ts for e in work], [e.end for e in work]
    if clip:
        starts, ends = clip_intervals(starts, ends, annotation.ts, annotation.end)
    return Span(annotation.name, annotation.ts, annotation.end, work, busy_time(starts, ends), on_cpu, annotation.args)


def annotation_spans(trace: KinetoTrace, match=None, *, copies: bool = True) -> list[Span]:
    """One :class:`Span` per ``record_function`` range whose name matches ``match`` (a regular
    expression, searched; None takes all), in time order, with the work inside it:

    - GPU ranges (``gpu_user_annotation``) when the trace has them: the device events on the
      same device that overlap the range, clipped to it;
    - else CPU ranges (``user_annotation``) with kernels: the kernels whose launch
      (``cuda_runtime`` / ``cuda_driver`` on the same thread, inside the range) has their
      ``correlation`` id; they may run after the range closes, so they are not clipped;
    - else (no kernels at all: a CPU trace) the ``cpu_op`` events on the range's thread that
      lie inside it, with ``on_cpu`` set.
    """
    wanted = _matcher(match)
    work, on_cpu = device_work(trace, copies=copies, cpu_fallback=True)
    gpu_ranges = [e for e in trace.of("gpu_user_annotation") if wanted(e.name)]
    if gpu_ranges and not on_cpu:
        return sorted((_span(a, [w for w in work if w.device == a.device and w.end > a.ts and w.ts < a.end],
                             clip=True, on_cpu=False) for a in gpu_ranges), key=lambda s: s.start)
    cpu_ranges = sorted((e for e in trace.of("user_annotation") if wanted(e.name)), key=lambda e: e.ts)
    if on_cpu:
        return [_span(a, [w for w in work if (w.pid, w.tid) == (a.pid, a.tid) and w.ts >= a.ts and w.end <= a.end],
                      clip=True, on_cpu=True) for a in cpu_ranges]
    by_correlation: dict = {}
    for w in work:
        if "correlation" in w.args:
            by_correlation.setdefault(w.args["correlation"], []).append(w)
    launches = trace.of(*LAUNCH_CATEGORIES)
    spans = []
    for a in cpu_ranges:
        inside = [launch for launch in launches
                  if (launch.pid, launch.tid) == (a.pid, a.tid) and a.ts <= launch.ts <= a.end]
        mine = [w for launch in inside for w in by_correlation.get(launch.args.get("correlation"), ())]
        spans.append(_span(a, mine, clip=False, on_cpu=False))
    return spans


def kernel_table(events: list[TraceEvent]) -> dict[str, np.ndarray]:
    """Columns of a list of events: ``name`` (object), ``start_us``, ``end_us``, ``dur_us``,
    ``device``, ``stream`` (object: ids as the trace gives them)."""
    return {
        "name": np.array([e.name for e in events], dtype=object),
        "start_us": np.array([e.ts for e in events], dtype=np.float64),
        "end_us": np.array([e.end for e in events], dtype=np.float64),
        "dur_us": np.array([e.dur for e in events], dtype=np.float64),
        "device": np.array([e.device for e in events], dtype=object),
        "stream": np.array([e.args.get("stream", e.tid) for e in events], dtype=object),
    }
