"""Benchmark: the serving simulator's speed and memory.

    python tests/bench/bench_sim.py [--requests-ds 10000] [--requests-mixtral 1000] [--breakdown] [--repeat 3]

Runs DeepSeek-V3 decode-heavy serving on 64 H100 (EP64, DP64 attention, count-level routing
from its profile, two-micro-batch overlap; the bundled deepseek-v3-decode-ep64 scenario with a
Poisson stream of 10,000 requests) and Mixtral-8x7B on one H100 with token-level routing (the
bundled mixtral-8x7b-h100 scenario, 1,000 requests). Prints wall time, CPU time of the
process, simulated time, simulated seconds per wall second and per CPU second (the figure to
compare on a shared machine), the steps simulated, the SimPy events processed (a step of each
group, each arrival, each KV transfer and the processes' wake-ups) and their rate per wall
second, and the process's peak resident memory. Each
simulation is preceded by a 20-request warm-up, so Numba's first compilation (or cache load) is
not timed, and then runs ``--repeat`` times afresh (its set-up included); the run of least CPU
time is reported. Target (issue 4): the 64-GPU run at least 100x faster than real time and under 2 GB.
``--breakdown`` also prints where each run's CPU time goes (process time inside the engine's
and the step model's main pieces, a few microseconds of timer overhead a call included).
"""

from __future__ import annotations

import argparse
import collections
import resource
import time

import simpy

from moesim.routing.stream import CountStream
from moesim.scenario.build import build
from moesim.scenario.schema import load_scenario
from moesim.sim.engine import _Group
from moesim.sim.step import StepLoad, StepModel

RUNS = {
    "DeepSeek-V3 EP64": ("deepseek-v3-decode-ep64", {
        "workload": {"arrivals": "poisson", "rate": 120.0, "requests": 10_000,
                     "prompt": {"mean": 1024, "cv": 0.5, "max": 4096}, "output": {"mean": 512, "cv": 0.5, "max": 2048}},
        "routing": {"distribution": "profile", "seed": 0},
        "scheduler": {"max_running": 128, "max_batched_tokens": 2048},
        "policies": {"overlap": "two_microbatch"}}),
    "Mixtral-8x7B 1xH100": ("mixtral-8x7b-h100", {"workload": {"requests": 1_000}}),
}


# (class, method, label): the pieces --breakdown times; indented labels lie inside the step's cost
PIECES = [(_Group, "_admit", "admission"), (_Group, "_schedule", "scheduler"), (CountStream, "step", "count stream"),
          (_Group, "_load", "step load (count stream included)"), (StepModel, "cost", "step cost"),
          (StepLoad, "half", "  cutting the micro-batches"), (StepModel, "_decode_cores", "  decode attention"),
          (StepModel, "_attention", "  attention block (new shapes costed)"),
          (StepModel, "_expert_parallel", "  expert-parallel layers (experts, all-to-all)"),
          (StepModel, "_two_microbatch", "  two-micro-batch overlap"), (_Group, "_advance", "advancing the sequences")]


def timed_pieces() -> collections.Counter:
    """Wrap :data:`PIECES` to add their process time (s) to the counter returned."""
    spent: collections.Counter = collections.Counter()
    for cls, name, label in PIECES:
        def wrapper(*args, _method=getattr(cls, name), _label=label, **kwargs):
            start = time.process_time()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_label] += time.process_time() - start
        setattr(cls, name, wrapper)
    return spent


def counted_events() -> list[int]:
    """Count the SimPy events every simulation processes (``Environment.step`` calls) into the
    one-element list returned (a fraction of a microsecond an event)."""
    processed = [0]
    step = simpy.Environment.step

    def counting(env):
        processed[0] += 1
        return step(env)
    simpy.Environment.step = counting
    return processed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-ds", type=int, default=10_000)
    parser.add_argument("--requests-mixtral", type=int, default=1_000)
    parser.add_argument("--breakdown", action="store_true", help="also print where each run's CPU time goes")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each simulation; the one of least CPU time is reported (timeit's convention: "
                             "a shared machine only ever adds time)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: expected at least 1 run, got {args.repeat}")
    spent = timed_pieces() if args.breakdown else None
    events = counted_events()
    counts = {"DeepSeek-V3 EP64": args.requests_ds, "Mixtral-8x7B 1xH100": args.requests_mixtral}
    print(f"{'run':<22}{'requests':>9}{'wall s':>9}{'CPU s':>8}{'simulated s':>13}{'sim/wall':>10}{'sim/CPU':>9}"
          f"{'steps':>9}{'events':>9}{'events/s':>10}{'peak RSS':>10}")
    for name, (scenario, overrides) in RUNS.items():
        scn, path = load_scenario(scenario)
        update = {key: (getattr(scn, key).model_dump() | value) for key, value in overrides.items()}
        quiet = {"outputs": {"perfetto": False, "figures": False, "timeline_steps": []}}

        def simulation(requests: int):
            workload = update["workload"] | {"requests": requests}
            return build(scn.model_validate(scn.model_dump() | update | {"workload": workload} | quiet), path)

        simulation(20).run()  # compile (or load Numba's cache) outside the timing
        best = None
        for _ in range(args.repeat):  # each a fresh simulation, set-up included
            sim = simulation(counts[name])
            if spent is not None:
                spent.clear()
            events[0] = 0
            start, cpu = time.perf_counter(), time.process_time()
            _, metrics = sim.run()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if best is None or cpu < best[1]:
                best = (wall, cpu, metrics, collections.Counter(spent), events[0])
        wall, cpu, metrics, spent_best, processed = best
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        steps, simulated = metrics["steps"], metrics["simulated_s"]
        print(f"{name:<22}{counts[name]:>9,}{wall:>9.1f}{cpu:>8.1f}{simulated:>13.1f}{simulated / wall:>9.1f}x{simulated / cpu:>8.1f}x"
              f"{steps:>9,}{processed:>9,}{processed / wall:>10,.0f}{peak:>8.2f} GB", flush=True)
        if spent is not None:
            for label, seconds in spent_best.items():
                print(f"    {label:<48}{seconds:>7.2f} s{seconds / steps * 1e6:>8.0f} us a step")
            rest = cpu - sum(v for k, v in spent_best.items() if not k.startswith(' ') and k != 'count stream')
            print(f"    {'the rest (SimPy, the log, set-up)':<48}{rest:>7.2f} s")


if __name__ == "__main__":
    main()
