"""ILP against EPLB: where each placement method lands on balance, inter-node traffic and
migration, and what the simulator then serves with the ILP's placement and with EPLB's.

    python validation/placement_compare.py [CASE ...] [--tokens 4096] [--requests 200] [--time-limit 60]
        [--out docs/placement_compare.png] [--plans DIR] [--figure-only]

A CASE is ``MODEL:CLUSTER:GPUS:REDUNDANT`` (default: ``deepseek-v3:h100-2node:16:16`` and
``qwen3-30b-a3b:h100-2node:16:16``; DeepSeek-V3 at scale is ``deepseek-v3:h100-8node:64:64``).
Each case is a DP-attention + EP deployment (``tp 1, dp = ep = GPUS``) whose routing is the
model's fitted profile at token level (skewed expert popularity, locality across tokens,
cross-layer affinity), seed 0. For every method (the start-up contiguous layout, greedy,
EPLB hierarchical, EPLB global, ILP) on a ``--tokens``-token trace of that routing: the most
loaded GPU over the mean, inter-node dispatch bytes per token, expert bytes migrated from the
contiguous start-up layout (slot ``p`` holds expert ``p % experts``), and the cost model's expert
time of the straggler. Then each placement serves the same ``--requests`` requests (batch
arrivals, 256-token prompts, 64 output tokens) in the simulator: output tokens/s and p99 TPOT.

Writes the figure and a CSV of the same numbers beside it (atomically); ``--plans DIR`` keeps
the scenarios and plan files (for ``moesim simulate --plan`` by hand). Deterministic when the ILP solves to its gap before the time limit.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from moesim.files import atomic_write  # noqa: E402
from moesim.plan.placement import PlacementPlan, equal_weights  # noqa: E402
from moesim.plan.recommend import Recommendation, write_plan  # noqa: E402
from moesim.scenario.build import build  # noqa: E402
from moesim.scenario.plan import make_planner, placement_decision, placement_setup, score  # noqa: E402
from moesim.scenario.schema import load_scenario  # noqa: E402

DEFAULT_CASES = ("deepseek-v3:h100-2node:16:16", "qwen3-30b-a3b:h100-2node:16:16")
METHODS = ("contiguous", "greedy", "eplb_hierarchical", "eplb_global", "ilp")
SIMULATED = ("contiguous", "eplb_hierarchical", "eplb_global", "ilp")
# the checkpoints' own expert formats (DeepSeek-V3 ships fp8 with 128x128 block scales)
DTYPES = {"deepseek-v3": {"weights": "fp8", "experts": "fp8_block", "kv_cache": "bf16"}}
COLUMNS = ("case", "method", "imbalance", "worst_imbalance", "inter_node_kb_per_token", "migrated_gib", "expert_us_per_layer",
           "plan_s", "output_tokens_per_s", "p99_tpot_ms")


def case_scenario(case: str, requests: int, folder: Path) -> Path:
    """Write the scenario of ``MODEL:CLUSTER:GPUS:REDUNDANT`` into ``folder``; returns its path."""
    model, cluster, gpus, _ = case.split(":")
    gpus = int(gpus)
    scenario = {"name": f"{model}-ep{gpus}", "description": f"{model}, DP{gpus} attention + EP{gpus} on {cluster}",
                "model": model, "cluster": cluster, "parallel": {"tp": 1, "dp": gpus, "ep": gpus},
                "workload": {"arrivals": "batch", "batch": requests, "prompt": 256, "output": 64},
                "routing": {"distribution": "profile", "level": "token", "seed": 0},
                "scheduler": {"max_running": 64}, "outputs": {"perfetto": False, "figures": False}}
    if model in DTYPES:
        scenario["dtypes"] = DTYPES[model]
    path = folder / f"{scenario['name']}.yaml"
    atomic_write(path, yaml.safe_dump(scenario, sort_keys=False))
    return path


def run_case(case: str, args, folder: Path) -> list[dict]:
    redundant = int(case.split(":")[3])
    scenario, path = load_scenario(str(case_scenario(case, args.requests, folder)))
    setup = placement_setup(scenario, path, redundant=redundant, tokens=args.tokens)
    p = setup.problem
    print(f"{case}: {p.layers} layers x {p.experts} experts, {p.slots} slots on {p.gpus} GPUs in {p.nodes} nodes", flush=True)
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        if method == "contiguous":  # the engines' start-up layout, with the redundant slots wrapping around
            plan = PlacementPlan(method, p.current, equal_weights(p.current, p.experts))
        else:
            plan = make_planner(method, args.time_limit if method == "ilp" else None).plan(p)
        seconds = time.perf_counter() - start
        s = score(setup, plan)
        rows.append({"case": case, "method": method, "imbalance": s["imbalance"], "worst_imbalance": s["worst_imbalance"],
                     "inter_node_kb_per_token": s["inter_node_bytes_per_token"] / 1e3, "migrated_gib": s["migrated_bytes"] / 2**30,
                     "expert_us_per_layer": s["expert_s_per_layer"] * 1e6, "plan_s": seconds,
                     "output_tokens_per_s": None, "p99_tpot_ms": None})
        print(f"  {method:18s} max/mean {s['imbalance']:.3f} (worst {s['worst_imbalance']:.3f})  "
              f"{s['inter_node_bytes_per_token'] / 1e3:8.1f} KB/token  {s['migrated_bytes'] / 2**30:7.1f} GiB moved  "
              f"{seconds:6.1f} s", flush=True)
        if method in SIMULATED:
            plan_file = folder / f"{scenario.name}-{method}.plan.yaml"
            write_plan(plan_file, Recommendation("placement", placement_decision(setup, plan), {}, setup.inputs, plan.solver))
            sim = build(scenario.model_copy(update={"plan": str(plan_file.resolve())}), path)
            _, metrics = sim.run()
            rows[-1]["output_tokens_per_s"] = metrics["throughput"]["output_tokens_per_s"]
            rows[-1]["p99_tpot_ms"] = metrics["latency_s"]["tpot"]["p99"] * 1e3
            print(f"  {'':18s} simulated: {rows[-1]['output_tokens_per_s']:,.0f} output tokens/s, "
                  f"p99 TPOT {rows[-1]['p99_tpot_ms']:.2f} ms", flush=True)
    return rows


def figure(rows: list[dict], path: Path) -> Path:
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 4 * len(cases)), squeeze=False)
    for (left, right), case in zip(axes, cases):
        mine = [r for r in rows if r["case"] == case]
        points: dict[tuple, list[str]] = {}  # methods landing on the same point share one label
        for r in mine:
            points.setdefault((round(r["inter_node_kb_per_token"], 2), round(r["imbalance"], 4)), []).append(r["method"])
        for i, ((x, y), names) in enumerate(sorted(points.items())):
            left.scatter(x, y, s=50)
            # neighbours' labels alternate above and below so close points stay readable
            left.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 else -12), fontsize=8)
        left.margins(x=0.25, y=0.12)
        left.set_xlabel("inter-node dispatch KB per token (all MoE layers)")
        left.set_ylabel("most loaded GPU / mean (mean over layers)")
        left.set_title(case, fontsize=10)
        left.grid(alpha=0.3)
        names = [r["method"] for r in mine]
        right.barh(names, [r["migrated_gib"] for r in mine], color="tab:gray")
        right.set_xlabel("expert weights migrated from the contiguous layout, GiB")
        right.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=list(DEFAULT_CASES), help="MODEL:CLUSTER:GPUS:REDUNDANT")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the trace the placements are planned on")
    parser.add_argument("--requests", type=int, default=200, help="requests each placement serves in the simulator")
    parser.add_argument("--time-limit", type=float, default=60.0, help="the ILP's seconds in all, per case")
    parser.add_argument("--out", default="docs/placement_compare.png")
    parser.add_argument("--plans", help="keep the scenarios and plan files here (default: a temporary folder)")
    parser.add_argument("--figure-only", action="store_true", help="redraw the figure from the CSV beside --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.figure_only:
        with open(out.with_suffix(".csv"), newline="") as f:
            rows = [{k: (v if k in ("case", "method") else float(v) if v else None) for k, v in r.items()}
                    for r in csv.DictReader(f)]
        print(f"wrote {figure(rows, out)}")
        return 0
    folder = Path(args.plans) if args.plans else Path(tempfile.mkdtemp(prefix="placement_compare-"))
    rows = []
    for case in args.cases:
        if len(case.split(":")) != 4:
            parser.error(f"case {case!r}: expected MODEL:CLUSTER:GPUS:REDUNDANT")
        rows += run_case(case, args, folder)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    atomic_write(out.with_suffix(".csv"), text.getvalue())
    figure(rows, out)
    print(f"wrote {out}, {out.with_suffix('.csv')} and the plans in {folder}/")
    print("command: python validation/placement_compare.py " + " ".join(sys.argv[1:]) if argv is None else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
