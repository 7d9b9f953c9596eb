"""What every collector shares: arguments, device set-up, timing, CSV tables, the trace.

Timing: each case runs ``--warmup`` times, then ``--repeats`` samples; a sample is ``--inner``
back-to-back calls between two CUDA events (so the launch gaps of one call do not dominate a
short kernel), divided by ``--inner``; the table holds the median sample. ``--dry-run`` runs
the same code on the CPU with tiny shapes and ``time.perf_counter`` instead of CUDA events:
it checks the scripts (CI runs it), its times are CPU times and its rows say so
(``device`` = 'cpu (dry run)').

Tables use aiconfigurator's schema for the family (all columns, the constant ones included:
``framework``, ``version``, ``device``, ``op_name``, ``kernel_source``), with ``latency`` in
milliseconds, and are named like aiconfigurator's (``<op>_<framework>_<version>_<what>_perf.csv``)
so ``moesim validate --measured DIR`` recognises them.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

# The collectors run from a checkout (python validation/collect/collect_x.py): make the
# package importable without installing it.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from moesim.files import atomic_write  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parser(description: str) -> argparse.ArgumentParser:
    """The options every collector takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=Path("validation/measured/local"), help="folder for the tables and the trace")
    p.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny shapes (checks the script; no GPU figures)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per case (default 10; 1 in a dry run)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per case, median kept (default 30; 3 in a dry run)")
    p.add_argument("--inner", type=int, default=None, help="calls per timed sample (default 10; 1 in a dry run)")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trace", action="store_true", help="skip the torch.profiler trace")
    return p


@dataclass
class Env:
    """Where and how a collector runs."""

    device: torch.device
    dry_run: bool
    device_name: str
    warmup: int
    repeats: int
    inner: int
    out: Path
    trace: bool
    seed: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup(args: argparse.Namespace) -> Env:
    """The device and timing settings of a parsed command line; a GPU run without CUDA stops
    with a message saying to use --dry-run."""
    if args.dry_run:
        device, name = torch.device("cpu"), "cpu (dry run)"
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on the CPU")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    torch.manual_seed(args.seed)
    pick = lambda value, gpu, dry: value if value is not None else (dry if args.dry_run else gpu)  # noqa: E731
    return Env(device, args.dry_run, name, pick(args.warmup, 10, 1), pick(args.repeats, 30, 3), pick(args.inner, 10, 1),
               Path(args.out), not args.no_trace, args.seed)


def synchronize(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize(env.device)


def time_call(fn, env: Env) -> float:
    """Median seconds of one call of ``fn`` (see the module docstring)."""
    for _ in range(env.warmup):
        fn()
    synchronize(env)
    samples = []
    for _ in range(env.repeats):
        if env.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(env.inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / env.inner)
        else:
            begin = time.perf_counter()
            for _ in range(env.inner):
                fn()
            samples.append((time.perf_counter() - begin) / env.inner)
    return statistics.median(samples)


def constants(env: Env, op_name: str, kernel_source: str) -> dict:
    """The columns aiconfigurator's tables hold once per table."""
    return {"framework": "torch", "version": torch.__version__.split("+")[0], "device": env.device_name,
            "op_name": op_name, "kernel_source": kernel_source}


def table_path(env: Env, family: str, what: str, framework: str = "torch", version: str | None = None) -> Path:
    """``<out>/<family>_<framework>_<version>_<what>_perf.csv``."""
    version = version or torch.__version__.split("+")[0]
    return env.out / f"{family}_{framework}_{version}_{what}_perf.csv"


def write_table(path: Path, rows: list[dict]) -> Path:
    """Write rows (dicts with the same keys) as CSV, atomically."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


@contextmanager
def profiled(env: Env, path: Path):
    """A torch.profiler session (CPU, plus CUDA on a GPU) whose Chrome trace is written to
    ``path`` when the block ends; yields None (nothing recorded) when traces are off."""
    if not env.trace:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield prof
        synchronize(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def traced_calls(env: Env, fn, label: str, calls: int = 3) -> None:
    """Run ``fn`` ``calls`` times, each inside a ``record_function(label + ' it=<i>')`` range
    (the annotation the replay reads from the torch.profiler trace) and, on a GPU, an NVTX
    range of the same name (what it reads from an Nsight Systems export), waiting for the
    device after each so the ranges do not overlap."""
    for i in range(calls):
        name = f"{label} it={i}"
        with torch.profiler.record_function(name), (torch.cuda.nvtx.range(name) if env.cuda else nullcontext()):
            fn()
        synchronize(env)
