"""The offload MILP's policy in the simulator, against the best hand-set policy.

    python validation/offload_plan_check.py [--scenarios mixtral-8x7b-offload-t4 mixtral-8x7b-offload-a5000]
                                            [--output 256] [--markdown]

For each scenario: ``moesim plan offload`` (latency objective) gives a policy and its predicted
decode speed; the simulator runs that policy; then every hand-set policy of the offloading
benchmark (tests/bench/bench_offload.py: 13 residency / prefetch / miss combinations) runs at
every expert-cache size from 0 to 8 slots per layer that fits, on the same scenario (its
dtypes, workload, framework overhead). Prints one row per scenario: the MILP's predicted and
simulated tokens/s (1 / mean TPOT), the best hand-set policy's, which one it was, and the best
among the deployable ones (no Belady oracle, no exact pre-gate, which Mixtral does not have), and
the best of those at full precision (no low-precision copies on a miss).
Deterministic: the same inputs give the same table.
"""

from __future__ import annotations

import argparse

from moesim.cli.plan_offload import recommend
from moesim.errors import InputError
from moesim.scenario.build import build
from moesim.scenario.offload import POLICY_PRESETS
from moesim.scenario.schema import load_scenario

ORACLES = ("Belady (oracle)", "LRU + pre-gated")  # need the future, or a pre-gate the model lacks
LOW = "LRU + low precision on a miss (HOBBIT-like)"  # computes misses with other weights (quality), and another kernel


def _speed(scn, path, offload: dict, output: int | None, max_running: int | None = None) -> tuple[float, dict]:
    """Simulated decode tokens/s (1 / mean TPOT) of the scenario with these offload fields."""
    raw = scn.model_dump()
    raw["plan"] = None
    raw["offload"] = raw["offload"] | offload
    if max_running:
        raw["scheduler"] = raw["scheduler"] | {"max_running": max_running}
    if output:
        raw["workload"] = raw["workload"] | {"output": output}
    raw["outputs"] = {"perfetto": False, "figures": False, "timeline_steps": []}
    _, m = build(scn.model_validate(raw), path).run()
    return 1.0 / m["latency_s"]["tpot"]["mean"], m


def check(name: str, output: int | None) -> dict:
    scn, path = load_scenario(name)
    if output:  # the planner sees the same workload as the runs
        scn = scn.model_validate(scn.model_dump() | {"workload": scn.workload.model_dump() | {"output": output}})
    rec, _ = recommend(scn, path)
    d = rec.decision
    milp, m = _speed(scn, path, {k: v for k, v in d.items() if k != "max_running"}, None, d["max_running"])
    shipped, _ = _speed(scn, path, {}, None)
    results = []
    for label, policy in POLICY_PRESETS.items():
        for slots in range(9):
            fields = {"cache_experts": slots, "top_n": None, "accuracy": 1.0, "pinned": None, "cache_memory": None} | policy
            try:
                speed, _ = _speed(scn, path, fields, None)
            except InputError:  # this many slots do not fit the HBM
                break
            results.append((speed, label, slots))
    best = max(results)
    deployable = max(r for r in results if r[1] not in ORACLES)
    full = max(r for r in results if r[1] not in ORACLES and r[1] != LOW)
    pre = d["prefetch"] + (f" top-{d['top_n']}" if d["prefetch"] != "none" else "")
    return {"scenario": name, "milp_policy": f"static {sum(map(len, d['pinned']))} pinned, {d['on_miss']}, {pre}",
            "predicted": rec.predicted["tokens_per_s"], "simulated": milp, "milp_hit_rate": m["offload"]["hit_rate"],
            "best": best, "deployable": deployable, "full": full, "shipped": shipped, "top": sorted(results)[-5:][::-1], "runs": len(results),
            "gap": rec.solver["gap"], "status": rec.solver["status"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["mixtral-8x7b-offload-t4", "mixtral-8x7b-offload-a5000"])
    parser.add_argument("--output", type=int, help="output tokens per request (default: the scenario's)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    rows = [check(name, args.output) for name in args.scenarios]
    head = ["scenario", "MILP policy", "MILP predicted tok/s", "MILP simulated tok/s", "best hand-set simulated tok/s",
            "best hand-set policy (slots/layer)", "best deployable hand-set", "best deployable at full precision",
            "as shipped"]
    lines = []
    for r in rows:
        best, dep, full = r["best"], r["deployable"], r["full"]
        lines.append([r["scenario"], r["milp_policy"], f"{r['predicted']:.2f}", f"{r['simulated']:.2f}", f"{best[0]:.2f}",
                      f"{best[1]} ({best[2]})", f"{dep[0]:.2f}: {dep[1]} ({dep[2]})",
                      f"{full[0]:.2f}: {full[1]} ({full[2]})", f"{r['shipped']:.2f}"])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in lines:
            print("\n".join(f"{h:<36}{v}" for h, v in zip(head, line)) + "\n")
    for r in rows:
        print(f"{r['scenario']}: solver {r['status']}, gap {r['gap']:.2%}; {r['runs']} hand-set runs; "
              f"MILP policy's simulated hit rate {r['milp_hit_rate']:.1%}; top hand-set: "
              + "; ".join(f"{label} ({slots}) {speed:.2f}" for speed, label, slots in r["top"]))


if __name__ == "__main__":
    main()
