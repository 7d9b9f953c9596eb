"""Metrics of a simulated run, from its :class:`~moesim.sim.engine.RunLog`.

Latencies per request: TTFT (arrival to first token), TPOT (mean time per output token after
the first), end-to-end; reported as p50 / p90 / p99 and mean, in seconds. Throughput over the
makespan (first arrival to last finish). Per device: utilisation (compute-busy share of the
makespan), HBM use (weights, activations, reserve and the peak KV cache), link utilisation
(share of the makespan the device's all-to-all traffic keeps its links busy), and the time
breakdown: attention (everything but routed experts), experts, all-to-all, and idle (the
makespan minus the three; a lower bound of true idle time when communication overlaps compute).
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def _dist(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def latencies(log) -> dict[str, np.ndarray]:
    ttft = log.first_token - log.arrival
    e2e = log.finish - log.arrival
    tokens_after_first = np.maximum(log.output - 1, 1)
    tpot = np.where(log.output > 1, (log.finish - log.first_token) / tokens_after_first, np.nan)
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e}


def summarize(log, sim) -> dict:
    """The run's metrics as a JSON-ready dict (see the module docstring)."""
    start = float(log.arrival.min())
    makespan = float(np.nanmax(log.finish)) - start
    steps = {k: np.asarray(v) for k, v in log.steps.items()}
    devices = sum(len(g.model.devices) for g in sim.groups)
    output_tokens = int(log.output.sum())
    prompt_tokens = int(log.prompt.sum())
    lat = latencies(log)
    groups = {}
    for g in sim.groups:
        busy = log.busy[g.name]
        mine = steps["group"] == g.name
        mem = sim.memory[g.name]
        kv_peak = int(steps["kv_used_blocks"][mine].max()) if mine.any() else 0
        kv_per_replica = kv_peak / g.model.replicas * g.block_size * mem["kv_per_token"]
        used = mem["weights"] + mem["activations"] + mem["reserved"] + kv_per_replica
        compute = busy["attention"] + busy["experts"]
        idle = np.maximum(makespan - compute - busy["comm"], 0.0)
        groups[g.name] = {
            "role": g.role,
            "devices": len(g.model.devices),
            "layout": g.model.layout.to_dict(),
            "steps": int(mine.sum()),
            "utilisation": {"mean": float((compute / makespan).mean()), "max": float((compute / makespan).max())},
            "link_utilisation": {"mean": float((busy["comm"] / makespan).mean()), "max": float((busy["comm"] / makespan).max())},
            "hbm_bytes": {"capacity": mem["capacity"], "weights": mem["weights"], "activations": mem["activations"],
                          "reserved": mem["reserved"], "kv_peak": kv_per_replica, "used_peak": used,
                          "kv_blocks_per_replica": g.kv_blocks},
            "breakdown_s": {"attention": float(busy["attention"].mean()), "experts": float(busy["experts"].mean()),
                            "all_to_all": float(busy["comm"].mean()), "idle": float(idle.mean())},
            "rank_slots": np.asarray(log.rank_slots[g.name], dtype=np.float64).tolist() if np.ndim(log.rank_slots[g.name]) else [],
        }
    durations = steps["duration"] if steps["duration"].size else np.zeros(1)
    in_system = steps["running"] + steps["waiting"] if steps["running"].size else np.zeros(1)
    return {
        "scenario": sim.scenario.name,
        "model": sim.arch.name,
        "cluster": sim.cluster.name,
        "devices": devices,
        "requests": int(log.arrival.size),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "simulated_s": makespan,
        "steps": int(steps["duration"].size),
        "throughput": {
            "output_tokens_per_s": output_tokens / makespan,
            "total_tokens_per_s": (output_tokens + prompt_tokens) / makespan,
            "output_tokens_per_s_per_device": output_tokens / makespan / devices,
            "requests_per_s": log.arrival.size / makespan,
        },
        "latency_s": {name: _dist(values) for name, values in lat.items()},
        "preemptions": int(log.preemptions.sum()),
        "routed_slots": int(steps["slots"].sum()) if steps["slots"].size else 0,
        "dropped_slots": int(steps["dropped"].sum()) if steps["dropped"].size else 0,
        "mean_requests_in_engine": float((in_system * durations).sum() / makespan),
        "kv_transfers": len(log.transfers),
        "groups": groups,
    }
