"""``moesim plan layout``: search TP / DP / PP / EP / expert TP, micro-batches and batch size for
a scenario's model, cluster and workload; rank with the cost model, verify the best few in the
simulator, print the ranking and write plan.yaml."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from moesim import units
from moesim.cli.output import console, table
from moesim.errors import InputError, MoesimError
from moesim.hardware import catalog
from moesim.hardware.specs import Accelerator
from moesim.models import load_model
from moesim.plan.layout import Candidate, Engine, LayoutSearch, Shape, Targets, explain_infeasible
from moesim.plan.recommend import Recommendation, fingerprint, write_plan
from moesim.scenario.build import build
from moesim.scenario.schema import Parallel, WorkloadSpec, load_scenario

NOT_SIMULATED_PP = "not verified (no PP in the simulator)"


def register(verbs, formatter) -> None:
    p = verbs.add_parser(
        "layout", help="search the parallel layout, micro-batches and batch size; rank, verify, write plan.yaml",
        formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim plan layout --scenario mixtral-8x7b-h100x2 --devices 8 --tpot-slo 50ms -o plan.yaml\n"
                "  moesim plan layout --scenario deepseek-v3-decode-ep64 --ttft-slo 2s --tpot-slo 0.1 --verify 0 -o plan.yaml\n"
                "ranks by generated tokens/s per device (so $ per million tokens); the plan file's schema:\n"
                "docs/planning.md, 'The plan file'; the search: 'Parallel layout'."),
    )
    p.add_argument("--scenario", required=True, help="bundled scenario name or path: model, cluster, workload, dtypes")
    p.add_argument("--devices", type=int, help="devices the layout may use (default: every accelerator of the cluster)")
    p.add_argument("--ttft-slo", help="time-to-first-token target, e.g. 500ms or 0.5 (seconds)")
    p.add_argument("--tpot-slo", help="time-per-output-token target, e.g. 50ms or 0.05 (seconds)")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table (default 10)")
    p.add_argument("--verify", type=int, default=3, help="simulate the best K candidates (default 3; 0: none)")
    p.add_argument("--verify-requests", type=int, default=1024,
                   help="at most this many requests per verification (default 1024); each serves one full batch of "
                        "the candidate (max_running x DP requests at once, lengths as the scenario's workload)")
    p.add_argument("--price-per-device-hour", type=float, metavar="USD",
                   help="$ per device-hour (default: the device profile's on-demand list price)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (YAML)")
    p.set_defaults(func=_layout)


def _positive(value: int, option: str) -> None:
    if value < 0:
        raise InputError(f"must be >= 0, got {value}", field=option)


def _target(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        value = units.seconds(text)
    except InputError as exc:
        raise InputError(exc.message, field=option) from None
    if not value > 0:
        raise InputError(f"must be a positive time, got {text!r}", field=option)
    return value


def _layout(args) -> int:
    for option in ("top", "verify"):
        _positive(getattr(args, option), "--" + option.replace("_", "-"))
    if args.verify_requests < 1:
        raise InputError(f"must be a positive number of requests, got {args.verify_requests}", field="--verify-requests")
    if args.price_per_device_hour is not None and not args.price_per_device_hour >= 0:
        raise InputError(f"must be >= 0, got {args.price_per_device_hour}", field="--price-per-device-hour")
    targets = Targets(ttft=_target(args.ttft_slo, "--ttft-slo"), tpot=_target(args.tpot_slo, "--tpot-slo"))
    scn, path = load_scenario(args.scenario)
    if scn.offload is not None:
        raise InputError("an offloading scenario serves one GPU; plan it with 'moesim plan offload'", source=str(path),
                         field="offload")
    try:
        arch = load_model(scn.model)
    except MoesimError as exc:
        raise InputError(exc.message, source=str(path), field="model") from None
    cluster = catalog.cluster(scn.cluster, field="cluster")
    acc = cluster.node.accelerators
    if acc is None or not isinstance(catalog.device(acc.device), Accelerator):
        raise InputError(f"cluster {cluster.name} has no accelerators to serve on", source=str(path), field="cluster")
    device = catalog.device(acc.device)
    total = acc.count * cluster.nodes
    devices = total if args.devices is None else args.devices
    if not 1 <= devices <= total:
        raise InputError(f"must be between 1 and the {total} devices of cluster {cluster.name}, got {devices}",
                         field="--devices")
    try:
        reqs = scn.workload.make_requests(scn.routing.seed, path.parent)
    except MoesimError as exc:
        raise InputError(exc.message, source=exc.source or str(path), field=exc.field or "workload") from None
    shape = Shape(prompt=max(1, int(round(float(np.mean(reqs.prompt))))), output=max(1, int(round(float(np.mean(reqs.output))))),
                  batch=scn.workload.batch if scn.workload.arrivals == "batch" else None,
                  # a fitted routing profile is simulated only; the cost model takes balanced routing
                  routing="balanced" if scn.routing.distribution == "profile" else scn.routing.distribution,
                  seed=scn.routing.seed)
    sched, dt = scn.scheduler, scn.dtypes
    engine = Engine(max_batched_tokens=sched.max_batched_tokens, kv_memory_fraction=sched.kv_memory_fraction,
                    dtype=dt.weights, expert_dtype=dt.experts, kv_dtype=dt.kv_cache)
    search = LayoutSearch(arch, cluster, device, shape, engine, targets, price_per_device_hour=args.price_per_device_hour)
    console.print(f"searching layouts of {arch.name} on up to {devices} x {device.name} of {cluster.name} for "
                  f"{shape.prompt} + {shape.output} tokens per request ...")
    start = time.perf_counter()
    with console.status("costing candidates"):
        result = search.run(devices, acc.count)
    seconds = time.perf_counter() - start
    if not result.ranked:
        raise explain_infeasible(result, arch, cluster.name, devices, targets)
    ranked = result.ranked
    for c in ranked[: args.verify]:
        c.verified = _verify(scn, path, c, args.verify_requests, shape)
        if targets.tpot is not None and c.verified.get("status") == "simulated":
            c.verified["tpot_p50_within_target"] = c.verified["tpot_p50_s"] <= targets.tpot
    _print(scn.name, ranked[: max(args.top, args.verify)], devices, targets)
    rec = _recommendation(scn, arch, cluster, shape, engine, targets, devices, search, result, args)
    write_plan(args.output, rec)
    c = ranked[0]
    if c.verified.get("tpot_p50_within_target") is False:
        console.print(f"[yellow]warning:[/yellow] simulated, the best candidate's p50 TPOT is "
                      f"{_ms(c.verified['tpot_p50_s'])} ms, above the {_ms(targets.tpot)} ms target the cost model "
                      "predicts it meets")
    console.print(f"best: {c.label()}, max_running {c.max_running}, {c.tokens_per_s_per_device:,.0f} tokens/s per device; "
                  f"{result.counts['feasible']} of {result.counts['configurations']} configurations feasible, "
                  f"{result.counts['points_costed']} points costed, {result.counts['stage_ilps']} stage ILPs in "
                  f"{seconds:.1f} s; wrote {args.output}")
    return 0


def _verify(scn, path, c: Candidate, limit: int, shape: Shape) -> dict:
    """Serve one full batch of the candidate (its ``max_running`` x DP sequences, at most
    ``limit``, all present at once, lengths drawn as the scenario's workload draws them: the
    steady full batch the cost model's throughput describes) with its layout and scheduler in
    the simulator; its figures, or why it was not simulated."""
    if c.layout.pp > 1:
        return {"status": NOT_SIMULATED_PP}
    lay = c.layout
    wl = scn.workload
    n = min(c.max_running * lay.dp, limit, shape.batch or limit)
    if wl.arrivals != "batch":
        prompt, output = (wl.prompt, wl.output) if wl.arrivals != "trace" else (shape.prompt, shape.output)
        wl = WorkloadSpec(arrivals="batch", batch=n, prompt=prompt, output=output)
    candidate = scn.model_copy(update={
        "parallel": Parallel(tp=lay.tp, ep=lay.ep, dp=lay.dp, pp=lay.pp, expert_tp=lay.expert_tp),
        "scheduler": scn.scheduler.model_copy(update={"max_running": c.max_running,
                                                      "max_batched_tokens": c.max_batched_tokens}),
        "policies": scn.policies.model_copy(update={"overlap": c.overlap}),
        "workload": wl, "disaggregation": None, "plan": None,
    })
    try:
        _, m = build(candidate, path, requests=n).run()
    except MoesimError as exc:
        return {"status": f"not verified ({exc.message})"}
    lat, tput = m["latency_s"], m["throughput"]
    return {"status": "simulated", "requests": m["requests"],
            "tokens_per_s_per_device": tput["output_tokens_per_s_per_device"],
            "ttft_p50_s": lat["ttft"]["p50"], "ttft_p99_s": lat["ttft"]["p99"],
            "tpot_p50_s": lat["tpot"]["p50"], "tpot_p99_s": lat["tpot"]["p99"]}


def _ms(value: float) -> str:
    return f"{value * 1e3:,.1f}"


def _print(name: str, rows: list[Candidate], devices: int, targets: Targets) -> None:
    out = []
    for i, c in enumerate(rows, 1):
        v = c.verified
        sim = ([f"{v['tokens_per_s_per_device']:,.0f}", _ms(v["tpot_p50_s"])] if v.get("status") == "simulated"
               else ["no PP" if v.get("status") == NOT_SIMULATED_PP else ("-" if not v else "failed"), ""])
        out.append([str(i), c.label(), str(c.micro_batches), str(c.max_running), f"{c.tokens_per_s_per_device:,.0f}",
                    _ms(c.ttft), _ms(c.tpot), f"{c.memory['used'] / 2**30:,.1f}", f"{c.usd_per_million_tokens:,.2f}", *sim])
    slo = ", ".join(f"{k.upper()} <= {_ms(v)} ms" for k, v in (("ttft", targets.ttft), ("tpot", targets.tpot)) if v)
    table(f"{name}: layouts on up to {devices} devices, best first{f' ({slo})' if slo else ''}",
          ["#", "layout", "mb", "batch", "tok/s/dev", "TTFT ms", "TPOT ms", "GiB/dev", "$/M tok", "sim tok/s/dev",
           "sim TPOT ms"], out, right={0, 2, 3, 4, 5, 6, 7, 8, 9, 10})
    console.print("batch: max_running per DP replica; mb: micro-batches (PP stages, or 2 with two-batch overlap TBO); "
                  "TTFT: one prompt in the chunked-prefill budget, no queueing; $/M tok: per million generated tokens; "
                  "sim: simulated (p50 TPOT), 'no PP': the simulator has no pipeline parallelism")


def _row(rank: int, c: Candidate) -> dict:
    m = c.metrics()
    return {"rank": rank, "layout": c.label(), "devices": c.layout.devices, "micro_batches": c.micro_batches,
            "max_running": c.max_running, "stages": [list(s) for s in c.stages],
            **{k: m[k] for k in ("tokens_per_s_per_device", "ttft_s", "tpot_s", "usd_per_million_tokens")},
            "memory_per_device_bytes": c.memory["used"], "simulated": c.verified or {"status": "not verified (below --verify)"}}


def _recommendation(scn, arch, cluster, shape, engine, targets, devices, search, result, args) -> Recommendation:
    best = result.ranked[0]
    keep = result.ranked[: max(args.top, args.verify)]
    predicted = {"cost_model": best.metrics(), "simulated": best.verified or {"status": "not verified (--verify 0)"},
                 "ranked": [_row(i, c) for i, c in enumerate(keep, 1)]}
    workload = dataclasses.asdict(shape)
    inputs = {
        "scenario": {"name": scn.name, "fingerprint": fingerprint(scn.model_dump(exclude={"plan"}))},
        "model": {"name": arch.name, "fingerprint": fingerprint(dataclasses.asdict(arch))},
        "cluster": {"name": cluster.name, "devices": devices, "fingerprint": fingerprint(cluster.model_dump())},
        "workload": workload | {"fingerprint": fingerprint(workload)},
        "engine": dataclasses.asdict(engine),
        "targets": {"ttft_s": targets.ttft, "tpot_s": targets.tpot},
        "price_per_device_hour_usd": search.price,
        "verify_requests": args.verify_requests,
    }
    solver = {"search": {"name": "exhaustive layouts, batch by bisection", **result.counts}}
    if best.partition is not None:
        p, even = best.partition, best.even
        solver.update(name=p.solver, status=p.status, objective=p.slowest, bound=p.bound, gap=p.gap,
                      even_split_objective=even.slowest, even_split_fits=best.even_fits,
                      improvement_over_even=1 - p.slowest / even.slowest)
    else:
        solver.update(name="none (pp = 1: no stage partition)", status="complete search")
    return Recommendation("layout", best.decision(devices), predicted, inputs, solver)
