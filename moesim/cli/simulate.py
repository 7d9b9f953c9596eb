"""``moesim simulate``: serve a scenario's requests in the discrete-event simulator."""

from __future__ import annotations

import json
import time
from pathlib import Path

from moesim.cli.output import console, emit_json, table
from moesim.errors import InputError
from moesim.files import atomic_write
from moesim.report.figures import device_load, latency_cdf, step_timeline
from moesim.report.perfetto import write_trace
from moesim.scenario.build import build
from moesim.scenario.schema import load_scenario
from moesim.sim.metrics import latencies


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "simulate", help="serve a scenario's request stream in the discrete-event simulator", formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim simulate --scenario mixtral-8x7b-h100\n"
                "  moesim simulate --scenario deepseek-v3-decode-ep64 --requests 500 --out runs/ds\n"
                "  moesim simulate --scenario deepseek-v3-decode-ep64 --plan plan.yaml\n"
                "writes metrics.json, trace.json (open in ui.perfetto.dev) and PNG figures to --out."),
    )
    parser.add_argument("--scenario", required=True, help="bundled scenario name or path to a scenario YAML")
    parser.add_argument("--requests", type=int, help="serve only the first N requests of the workload")
    parser.add_argument("--plan", help="a plan file of 'moesim plan' to run (overrides the scenario's plan:)")
    parser.add_argument("--out", help="output folder (default: runs/<scenario name>)")
    parser.add_argument("--json", action="store_true", help="print metrics.json to stdout instead of tables")
    parser.set_defaults(func=_simulate)


def _ms(value: float) -> str:
    return f"{value * 1e3:,.1f} ms"


def _simulate(args) -> int:
    if args.requests is not None and args.requests < 1:
        raise InputError("must be a positive number of requests", field="--requests")
    scenario, path = load_scenario(args.scenario)
    if args.plan:
        scenario = scenario.model_copy(update={"plan": str(Path(args.plan).resolve())})
    sim = build(scenario, path, requests=args.requests)
    start = time.perf_counter()
    log, metrics = sim.run()
    wall = time.perf_counter() - start
    metrics["wall_s"] = wall
    metrics["simulated_s_per_wall_s"] = metrics["simulated_s"] / wall
    out = Path(args.out or Path("runs") / scenario.name)
    files = [atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")]
    if scenario.outputs.perfetto:
        files.append(write_trace(log, sim.groups, out / "trace.json"))
    if scenario.outputs.figures:
        files.append(latency_cdf(latencies(log), out / "latency_cdf.png", title=scenario.name))
        for group in sim.groups:
            slots = metrics["groups"][group.name]["rank_slots"]
            if slots:
                files.append(device_load(slots, out / f"load_{group.name}.png", title=f"{scenario.name} ({group.name})"))
            spans = [s for s in log.spans if s[0] == group.name]
            if spans:
                files.append(step_timeline(spans, out / f"timeline_{group.name}.png", title=f"{scenario.name} ({group.name})"))
    if args.json:
        emit_json(metrics)
        return 0
    _print(metrics)
    console.print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _print(m: dict) -> None:
    t = m["throughput"]
    table(f"{m['scenario']}: {m['model']} on {m['devices']} devices of {m['cluster']}", ["metric", "value"], [
        ["requests", f"{m['requests']:,} ({m['prompt_tokens']:,} prompt + {m['output_tokens']:,} output tokens)"],
        ["simulated time", f"{m['simulated_s']:,.2f} s in {m['steps']:,} steps ({m['simulated_s_per_wall_s']:,.1f}x real time)"],
        ["output tokens/s", f"{t['output_tokens_per_s']:,.0f} ({t['output_tokens_per_s_per_device']:,.0f} per device)"],
        ["total tokens/s", f"{t['total_tokens_per_s']:,.0f}"],
        ["preemptions / dropped slots", f"{m['preemptions']:,} / {m['dropped_slots']:,}"],
    ])
    table("latency", ["", "p50", "p90", "p99", "mean"],
          [[name.upper(), *(_ms(d[k]) for k in ("p50", "p90", "p99", "mean"))] for name, d in m["latency_s"].items()],
          right={1, 2, 3, 4})
    rows = []
    for name, g in m["groups"].items():
        hbm = g["hbm_bytes"]
        b = g["breakdown_s"]
        total = max(sum(b.values()), 1e-300)
        rows.append([name, str(g["devices"]), f"{g['utilisation']['mean']:.0%}", f"{hbm['used_peak'] / hbm['capacity']:.0%}",
                     f"{g['link_utilisation']['mean']:.0%}",
                     " / ".join(f"{b[k] / total:.0%}" for k in ("attention", "experts", "all_to_all", "idle"))])
    table("devices", ["group", "devices", "compute util", "HBM peak", "link util", "attention / experts / all-to-all / idle"],
          rows)
    if "offload" in m:
        _print_offload(m["offload"], m["output_tokens"])


def _print_offload(o: dict, output_tokens: int) -> None:
    gib = 2**30
    b, hbm = o["bytes_moved"], o["tiers"]["hbm_bytes"]
    p = o["policies"]
    table(f"expert offloading: {p['residency']} / prefetch {p['prefetch']} / on miss {p['on_miss']}", ["metric", "value"], [
        ["hit rate", f"{o['hit_rate']:.1%} of {o['accesses']:,} expert uses"],
        ["HBM: weights / expert slots / KV", f"{hbm['non_expert_weights'] / gib:.1f} / {hbm['expert_cache'] / gib:.1f} / "
                                             f"{hbm['kv_cache'] / gib:.1f} GiB ({o['tiers']['slots_per_layer']} slots per layer)"],
        ["prefetched (used)", f"{o['prefetched']:,} ({o['prefetch_precision']:.0%})"],
        ["copied on a miss (full / low precision)", f"{o['demand_copies']['full_precision']:,} / {o['demand_copies']['low_precision']:,}"],
        ["run on the CPU", f"{o['cpu_experts']:,} experts, {o['cpu_busy_s']:,.2f} s"],
        ["PCIe host to device", f"{(b['pcie_h2d_expert_weights'] + b['pcie_h2d_low_precision_weights']) / gib:,.1f} GiB of "
                                f"weights ({o['pcie_h2d_utilisation']:.0%} busy)"],
        ["SSD read / DRAM read by the CPU", f"{b['ssd_read'] / gib:,.1f} / {b['host_dram_read_by_cpu'] / gib:,.1f} GiB"],
        ["stall waiting for experts", f"{o['stall_s']:,.2f} s ({o['stall_s_per_output_token'] * 1e3:,.1f} ms per output token)"],
    ])
