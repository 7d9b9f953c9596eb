"""Chrome trace / Perfetto JSON of a simulated run (opens in ui.perfetto.dev and chrome://tracing).

One process per device (``pid``), one thread per stream (``tid``: compute, comm); a process per
serving group carries its steps and counters (KV blocks in use, tokens per expert of layer 0 on
the steps recorded in detail). Times are microseconds, as the format wants. Format: the Trace
Event Format ("X" complete events, "C" counters, "M" metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

from moesim.files import atomic_write

STREAMS = {"compute": 1, "comm": 2, "host": 3}  # host: CPU-run experts (offloading)


def trace_events(log, groups) -> list[dict]:
    events: list[dict] = []
    pid_of: dict[tuple[str, int], int] = {}
    next_pid = 1
    for group in groups:
        gpid = next_pid
        next_pid += 1
        events.append({"ph": "M", "name": "process_name", "pid": gpid, "args": {"name": f"{group.name} scheduler"}})
        events.append({"ph": "M", "name": "thread_name", "pid": gpid, "tid": 0, "args": {"name": "steps"}})
        pid_of[(group.name, -1)] = gpid
        for d, device in enumerate(group.model.devices):
            pid_of[(group.name, d)] = next_pid
            events.append({"ph": "M", "name": "process_name", "pid": next_pid, "args": {"name": f"{group.name} {device}"}})
            for stream, tid in STREAMS.items():
                events.append({"ph": "M", "name": "thread_name", "pid": next_pid, "tid": tid, "args": {"name": stream}})
            next_pid += 1
    steps = log.steps
    for i, name in enumerate(steps["group"]):
        events.append({"ph": "X", "pid": pid_of[(name, -1)], "tid": 0, "name": "step", "ts": steps["start"][i] * 1e6,
                       "dur": steps["duration"][i] * 1e6,
                       "args": {"decode_tokens": steps["decode_tokens"][i], "prefill_tokens": steps["prefill_tokens"][i]}})
    for group, step, device, stream, name, start, end in log.spans:
        events.append({"ph": "X", "pid": pid_of[(group, device)], "tid": STREAMS[stream], "name": name, "ts": start * 1e6,
                       "dur": max(end - start, 0.0) * 1e6, "args": {"step": step}})
    for time, group, name, values in log.counters:
        events.append({"ph": "C", "pid": pid_of[(group, -1)], "name": name, "ts": time * 1e6, "args": values})
    return events


def write_trace(log, groups, path: str | Path) -> Path:
    return atomic_write(path, json.dumps({"traceEvents": trace_events(log, groups), "displayTimeUnit": "ms"}))
