"""Request streams for the serving simulator, from a scenario's workload.

A :class:`Requests` table holds one row per request: arrival time (s), prompt and output
tokens. Arrivals are a fixed batch at time 0, an open-loop Poisson process, a gamma renewal
process (inter-arrival coefficient of variation ``cv``; above 1 is burstier than Poisson), or a
recorded CSV trace. Lengths are fixed or lognormal with a mean and a coefficient of variation,
clipped to a maximum. The caller passes the random generator (the scenario builder seeds it
from the scenario), so the same workload and seed give the same requests.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import InputError

TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@dataclass(frozen=True)
class Requests:
    """One row per request, sorted by arrival: ``arrival`` in seconds, ``prompt`` and
    ``output`` in tokens."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return self.arrival.size

    @property
    def offered_rate(self) -> float:
        """Requests per second over the arrival span (inf for a batch at one instant)."""
        span = float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")


def draw_lengths(n: int, mean: float, cv: float, longest: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` token lengths, lognormal with this ``mean`` and coefficient of variation ``cv``
    (0: all equal the mean), rounded and clipped to [1, ``longest``]."""
    if cv == 0:
        return np.full(n, min(longest, max(1, round(mean))), dtype=np.int64)
    sigma2 = np.log1p(cv**2)
    draws = rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), size=n)
    return np.clip(np.rint(draws), 1, longest).astype(np.int64)


def arrival_times(process: str, n: int, rng: np.random.Generator, *, rate: float | None = None, cv: float = 1.0) -> np.ndarray:
    """``n`` arrival times in seconds from 0: ``batch`` (all at 0), ``poisson`` at ``rate``
    requests/s, or ``gamma`` (a renewal process with mean gap ``1 / rate`` and gap coefficient
    of variation ``cv``: shape ``1 / cv**2``)."""
    if process == "batch":
        return np.zeros(n)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    elif process == "gamma":
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    else:
        raise ValueError(f"unknown arrival process {process!r}; expected batch, poisson or gamma")
    arrival = np.cumsum(gaps)
    return arrival - arrival[0]  # the first request opens the run


def read_arrival_trace(path: str | Path) -> Requests:
    """A CSV with a header naming ``arrival_s``, ``prompt_tokens`` and ``output_tokens`` (other
    columns are ignored); times need not be sorted."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in TRACE_COLUMNS if c not in header]
            if missing:
                raise InputError(f"expected CSV columns {', '.join(TRACE_COLUMNS)}; missing {', '.join(missing)}", source=str(path))
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    values = (float(row["arrival_s"]), int(row["prompt_tokens"]), int(row["output_tokens"]))
                except (TypeError, ValueError):
                    raise InputError(f"line {line}: expected a number of seconds and two whole token counts, "
                                     f"got {[row.get(c) for c in TRACE_COLUMNS]}", source=str(path)) from None
                if not (np.isfinite(values[0]) and values[0] >= 0 and values[1] >= 1 and values[2] >= 1):
                    raise InputError(f"line {line}: arrival_s must be >= 0 and token counts >= 1", source=str(path))
                rows.append(values)
    except OSError as exc:
        raise InputError(f"cannot read the arrival trace: {exc.strerror or exc}", source=str(path)) from None
    if not rows:
        raise InputError("the arrival trace has no requests", source=str(path))
    table = np.array(rows, dtype=np.float64)
    order = np.argsort(table[:, 0], kind="stable")
    table = table[order]
    return Requests(arrival=table[:, 0], prompt=table[:, 1].astype(np.int64), output=table[:, 2].astype(np.int64))
