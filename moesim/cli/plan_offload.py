"""``moesim plan offload``: the offload-policy MILP (:mod:`moesim.plan.offload`) for a scenario
with an ``offload:`` section; prints the policy and its predicted speed, writes plan.yaml.

The planner's numbers come from the same objects the simulator runs: the scenario is built with
no expert in HBM, and its tier plan (HBM left after the non-expert weights), PCIe, SSD and CPU
rates, the step model's non-expert time per layer and the routing trace (the scenario's profile
and seed) are read off it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from moesim.cli.output import console, table
from moesim.cost.moe import expert_times
from moesim.cost.offload import cpu_expert_times
from moesim.errors import InputError
from moesim.plan.offload import OBJECTIVES, OffloadProblem, Prefetcher, plan_offload
from moesim.plan.recommend import Recommendation, fingerprint, write_plan
from moesim.scenario.build import build
from moesim.scenario.schema import Scenario, load_scenario
from moesim.sim.step import StepLoad
from moesim.units import bytes_

MAX_BATCH = 256  # largest max_running candidate


def register(verbs, formatter) -> None:
    parser = verbs.add_parser(
        "offload", help="choose the offload policy (HBM experts, CPU misses, prefetch, batch) with a MILP",
        formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim plan offload --scenario mixtral-8x7b-offload-t4 -o plan.yaml\n"
                "  moesim plan offload --scenario mixtral-8x7b-fiddler --objective throughput --hbm '8 GiB' -o plan.yaml\n"
                "  moesim simulate --scenario mixtral-8x7b-offload-t4 --plan plan.yaml\n"
                "the scenario needs an offload: section (one GPU, token-level profile routing)."),
    )
    parser.add_argument("--scenario", required=True, help="bundled scenario name or path to a scenario YAML")
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency",
                        help="latency: least time per output token of one sequence; throughput: most tokens/s")
    parser.add_argument("--hbm", help="at most this much HBM for pinned experts, e.g. '8 GiB' (default: all that is left "
                                      "after the weights, buffers and the batch's KV cache)")
    parser.add_argument("--no-cpu", action="store_true", help="never run experts on the CPU")
    parser.add_argument("--time-limit", type=float, default=30.0, help="solver seconds in all (default 30)")
    parser.add_argument("-o", "--out", default="plan.yaml", help="plan file to write (default plan.yaml)")
    parser.set_defaults(func=_plan)


def _batches(requests: int) -> list[int]:
    """max_running candidates: powers of two up to the workload's requests, and that number."""
    top = min(requests, MAX_BATCH)
    return sorted({2**i for i in range(int(math.log2(top)) + 1)} | {top})


def offload_problem(scn: Scenario, path: Path, *, hbm: float | None = None, cpu: bool = True
                    ) -> tuple[OffloadProblem, dict, dict]:
    """The planner's problem for a scenario, the plan's ``inputs`` record, and what the decision
    keeps from the scenario (``host_memory``, ``cpu_sockets``, ``expert_bytes``)."""
    source = str(path)
    off = scn.offload
    if off is None:
        raise InputError("plan offload needs a scenario with an offload: section (one GPU, routing.level: token)",
                         source=source, field="offload")
    if hbm is not None and hbm < 0:
        raise InputError(f"must be >= 0 bytes, got {hbm}", field="--hbm")
    raw = scn.model_dump()
    raw["plan"] = None
    # no expert in HBM and no policy that needs one: what is left is what the planner divides
    raw["offload"] = raw["offload"] | {"residency": "static", "scope": "layer", "pinned": None, "cache_experts": 0,
                                       "cache_memory": None, "prefetch": "none", "on_miss": "wait"}
    sim = build(Scenario.model_validate(raw), path)
    model, src = sim.offload()
    tiers, base, arch = model.tiers, model.base, sim.arch
    M, E, k = model.M, model.E, model.k
    reqs = sim.requests
    batches = _batches(len(reqs.prompt))
    # decode steps of B sequences at the mean context: the non-expert time per MoE layer
    context = int(reqs.prompt.mean() + reqs.output.mean() / 2)
    layer_s = {}
    for b in batches:
        cost = base.cost(StepLoad(decode=np.array([b]), kv=np.array([context]), prefill=np.array([0]), chunks=[],
                                  counts=np.zeros((M, E), dtype=np.int64)))
        layer_s[b] = cost.duration / M + off.layer_overhead
    # one expert's seconds with n tokens: the GPU's marginal expert in a grouped GEMM, the CPU's roofline
    n = np.arange(max(batches) + 1, dtype=np.float64)
    rows = np.zeros((n.size, 2, E))
    rows[:, 0, 0] = n
    rows[:, 1, :2] = n[:, None]
    pair = expert_times(base.device, rows, dtype=model.expert_dtype, tokens=np.maximum(n, 1)[:, None] * k, top_k=k,
                        **model.kw)
    gpu = np.where(n > 0, pair[:, 1] - pair[:, 0], 0.0)
    cpu_s = cpu_expert_times(model.cpu, n[:, None], dtype=model.expert_dtype, **model.kw) if cpu else np.zeros(0)
    node = sim.cluster.node
    has_ssd = bool(node.ssds and node.ssd_link)
    hbm_dict = tiers.hbm
    room = (hbm_dict["capacity"] * scn.scheduler.kv_memory_fraction - hbm_dict["non_expert_weights"] - hbm_dict["buffers"]
            - hbm_dict["activations"] - hbm_dict["reserved"])
    block = scn.scheduler.block_size
    longest = int((reqs.prompt + reqs.output).max())
    kv_seq = sim.memory["serve"]["kv_per_token"] * block * -(-longest // block)
    prefetchers = [Prefetcher()]
    if off.prefetch == "speculative":  # the deployment's predictor, at its accuracy; the depth is the choice
        prefetchers += [Prefetcher("speculative", t, off.accuracy) for t in sorted({1, k, 2 * k})]
    elif off.prefetch == "pregated":
        prefetchers.append(Prefetcher("pregated", None, off.accuracy))
    problem = OffloadProblem(
        trace=src.ids, experts=E, expert_bytes=tiers.expert_bytes, hbm_room=room, kv_bytes_per_sequence=kv_seq,
        dram_bytes=tiers.host["capacity"], ssd_bytes=tiers.ssd["capacity"] if has_ssd else 0.0, h2d=model.link.h2d,
        d2h=model.link.d2h, link_latency=model.link.latency, ssd_read=model.ssd_rate if has_ssd else 0.0,
        ssd_latency=model.ssd_latency if has_ssd else 0.0,
        dram_bandwidth=model.cpu.memory.bandwidth * model.cpu.efficiency.memory, hidden=arch.hidden,
        gpu_expert_s=gpu, cpu_expert_s=cpu_s, layer_s=layer_s, tail_s={b: 0.0 for b in batches},
        prefetchers=tuple(prefetchers), hbm_limit=hbm, seed=scn.routing.seed, source=source)
    inputs = {
        "scenario": {"name": scn.name, "fingerprint": fingerprint(scn.model_dump(exclude={"plan"}))},
        "model": {"name": arch.name, "fingerprint": fingerprint(dataclasses.asdict(arch))},
        "cluster": {"name": sim.cluster.name, "fingerprint": fingerprint(sim.cluster.model_dump())},
        "trace": {"source": f"generated: routing profile {sim.profile.name}", "level": "token", "tokens": int(src.ids.shape[0]),
                  "seed": scn.routing.seed, "fingerprint": fingerprint(src.ids)},
        "workload": {"requests": len(reqs.prompt), "fingerprint": fingerprint(reqs.prompt, reqs.output)},
        "hardware": {"expert_bytes": tiers.expert_bytes, "hbm_room_bytes": room, "kv_bytes_per_sequence": kv_seq,
                     "pcie_h2d_Bps": model.link.h2d, "dram_bytes": problem.dram_bytes, "ssd_bytes": problem.ssd_bytes,
                     "gpu_expert_s_1_token": float(gpu[1]), "cpu_expert_s_1_token": float(cpu_s[1]) if cpu else None,
                     "layer_s": {int(b): float(s) for b, s in layer_s.items()}},
        "hbm_limit_bytes": hbm, "cpu_experts": cpu,
    }
    keep = {"host_memory": off.host_memory, "cpu_sockets": off.cpu_sockets, "expert_bytes": tiers.expert_bytes}
    return problem, inputs, keep


def recommend(scn: Scenario, path: Path, *, objective: str = "latency", hbm: float | None = None, cpu: bool = True,
              time_limit: float = 30.0) -> tuple[Recommendation, object]:
    """The offload recommendation for a scenario, and the planner's policy."""
    if time_limit <= 0:
        raise InputError(f"must be positive, got {time_limit}", field="--time-limit")
    problem, inputs, keep = offload_problem(scn, path, hbm=hbm, cpu=cpu)
    policy = plan_offload(problem, objective, time_limit=time_limit)
    decision = policy.decision(keep["expert_bytes"], host_memory=keep["host_memory"], cpu_sockets=keep["cpu_sockets"])
    # solve times are printed, not stored: the same inputs give the same plan file byte for byte
    candidates = [{k: v for k, v in c.items() if k != "solve_s"} for c in policy.candidates]
    predicted = policy.predicted | {"objective": objective, "candidates": candidates}
    return Recommendation("offload", decision, predicted, inputs, policy.solver), policy


def _plan(args) -> int:
    hbm = None
    if args.hbm is not None:
        try:
            hbm = bytes_(args.hbm)
        except ValueError as exc:
            raise InputError(str(exc), field="--hbm") from None
    scn, path = load_scenario(args.scenario)
    start = time.perf_counter()
    rec, policy = recommend(scn, path, objective=args.objective, hbm=hbm, cpu=not args.no_cpu,
                            time_limit=args.time_limit)
    wall = time.perf_counter() - start
    d, p, s = rec.decision, rec.predicted, rec.solver
    per_layer = p["per_layer"]["experts_in_hbm"]
    pre = d["prefetch"] + (f" (top_n {d['top_n']}, accuracy {d['accuracy']:g})" if d["prefetch"] != "none" else "")
    table(f"offload plan for {scn.name} ({args.objective})", ["decision", "value"], [
        ["residency", f"static, {p['experts_in_hbm']} experts pinned ({p['hbm_expert_bytes'] / 2**30:.2f} GiB), "
                      f"{min(per_layer)}-{max(per_layer)} per layer"],
        ["on a miss", d["on_miss"]],
        ["prefetch", pre],
        ["max_running", str(d["max_running"])],
    ])
    table("predicted (the MILP's model)", ["metric", "value"], [
        ["TPOT", f"{p['tpot_s'] * 1e3:,.1f} ms"],
        ["tokens/s", f"{p['tokens_per_s']:,.2f}"],
        ["hit rate", f"{p['hit_rate']:.1%}"],
        ["copies / CPU experts per step", f"{p['copies_per_step']:.2f} / {p['cpu_experts_per_step']:.2f}"],
    ], right={1})
    console.print(f"solver: {s['name']}, {s['status']}, gap {s['gap']:.2%}, {s['candidates']} candidates, {wall:.1f} s")
    out = write_plan(args.out, rec)
    console.print(f"wrote {out}")
    return 0
