"""``moesim estimate``: fit, per-layer times, step times, throughput and bottleneck."""

from __future__ import annotations

from moesim import units
from moesim.cli.output import add_json_options, console, emit_json, table
from moesim.cost.estimate import Workload, estimate
from moesim.cost.layout import make_layout
from moesim.dtypes import canonical_dtype
from moesim.errors import InputError
from moesim.hardware import catalog
from moesim.hardware.specs import Accelerator
from moesim.models import load_model
from moesim.scenario.schema import load_scenario


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "estimate", help="will it fit, how fast: analytical estimate of a model on a cluster", formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim estimate --scenario mixtral-8x7b-h100x2\n"
                "  moesim estimate --model mixtral-8x7b --cluster dgx-h100 --tp 2 --ep 4 --batch 64 --prompt 2048 --output 256\n"
                "  moesim estimate --model deepseek-v3 --cluster h100-8node --dp 64 --ep 64 --dtype fp8 \\\n"
                "      --expert-dtype fp8_block --batch 4096 --prompt 1024 --output 1024 --routing power_law:1.2 --json\n"
                "\noptions given on the command line override the scenario's."),
    )
    parser.add_argument("--scenario", help="bundled scenario name or path to a scenario YAML")
    parser.add_argument("--model", help="preset name or path to an HF config.json")
    parser.add_argument("--cluster", help="cluster profile name, e.g. dgx-h100")
    parser.add_argument("--tp", type=int, help="attention tensor parallelism (default 1)")
    parser.add_argument("--ep", type=int, help="expert parallelism (default 1)")
    parser.add_argument("--dp", type=int, help="attention data parallelism (default EP x expert TP / TP)")
    parser.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    parser.add_argument("--expert-tp", type=int, help="expert tensor parallelism (default 1 with EP, else TP)")
    parser.add_argument("--batch", type=int, help="concurrent sequences in all")
    parser.add_argument("--prompt", type=int, help="prompt tokens per sequence")
    parser.add_argument("--output", type=int, help="generated tokens per sequence")
    parser.add_argument("--dtype", help="weight dtype: bf16, fp8, int4 ... (default: the checkpoint's; fp32 ones in bf16)")
    parser.add_argument("--expert-dtype", help="expert weight dtype or kernel variant (default --dtype)")
    parser.add_argument("--kv-dtype", help="KV-cache dtype: bf16, fp16 or fp8 (default bf16)")
    parser.add_argument("--routing", help="balanced, power_law:ALPHA or a .npz trace (default balanced)")
    parser.add_argument("--seed", type=int, help="seed of the routing draw, >= 0 (default 0)")
    add_json_options(parser)
    parser.set_defaults(func=run)


# Token counts beyond this overflow the int64 routing counts (tokens x top-k x layers).
MAX_TOKENS = 10**12


def _settings(args) -> dict:
    """Scenario values overlaid by whatever the command line gives."""
    values: dict = {"tp": 1, "ep": 1, "dp": None, "pp": 1, "expert_tp": None, "dtype": None, "expert_dtype": None,
                    "kv_dtype": None, "routing": "balanced", "seed": 0, "source": "command line"}
    if args.scenario:
        scenario, path = load_scenario(args.scenario)
        workload = scenario.workload
        prompt, output = workload.mean_lengths() if workload.arrivals != "trace" else (None, None)
        # an open-loop workload is estimated at the scheduler's full batch; a fitted routing
        # profile is simulated only, so the estimate prints that it used balanced routing
        batch = workload.batch or scenario.scheduler.max_running * (scenario.parallel.dp or 1)
        routing = "balanced" if scenario.routing.distribution == "profile" else scenario.routing.distribution
        values.update(model=scenario.model, cluster=scenario.cluster, **scenario.parallel.model_dump(),
                      batch=batch, prompt=prompt, output=output,
                      routing=routing, seed=scenario.routing.seed, dtype=scenario.dtypes.weights,
                      expert_dtype=scenario.dtypes.experts, kv_dtype=scenario.dtypes.kv_cache, source=str(path))
    for key in ("model", "cluster", "tp", "ep", "dp", "pp", "expert_tp", "batch", "prompt", "output", "dtype",
                "expert_dtype", "kv_dtype", "routing", "seed"):
        given = getattr(args, key)
        if given is not None:
            values[key] = given
    for key in ("model", "cluster", "batch", "prompt", "output"):
        if values.get(key) is None:
            raise InputError("is required (or give --scenario)", field=f"--{key}")
    for key in ("batch", "prompt", "output"):
        if not 1 <= values[key] <= MAX_TOKENS:
            raise InputError(f"must be between 1 and {MAX_TOKENS:.0e}, got {values[key]}", field=f"--{key}")
    if values["seed"] < 0:
        raise InputError(f"must be >= 0, got {values['seed']}", field="--seed")
    return values


def run(args) -> int:
    s = _settings(args)
    arch = load_model(s["model"])
    cluster = catalog.cluster(s["cluster"], field="--cluster")
    acc = cluster.node.accelerators
    if acc is None or not isinstance(catalog.device(acc.device), Accelerator):
        raise InputError(f"cluster {cluster.name} has no accelerators to serve on", field="--cluster")
    layout = make_layout(arch, tp=s["tp"], ep=s["ep"], dp=s["dp"], pp=s["pp"], expert_tp=s["expert_tp"],
                         devices_available=acc.count * cluster.nodes, cluster=cluster.name)
    workload = Workload(batch=s["batch"], prompt=s["prompt"], output=s["output"], routing=s["routing"], seed=s["seed"])
    for key in ("dtype", "expert_dtype", "kv_dtype"):
        if s[key] is not None:
            _check_dtype(s[key], f"--{key.replace('_', '-')}")
    result = estimate(arch, cluster, layout, workload, dtype=s["dtype"], expert_dtype=s["expert_dtype"], kv_dtype=s["kv_dtype"])
    if args.json or args.output_file:
        emit_json(result.to_dict(), args.output_file)
        return 0
    _print(result)
    return 0


def _check_dtype(value: str, field: str) -> None:
    try:
        canonical_dtype(value)
    except InputError as exc:
        raise InputError(exc.message, field=field) from None


def _print(r) -> None:
    lay = r.layout
    console.print(
        f"[bold]{r.model}[/bold] on [bold]{r.cluster}[/bold] ({r.extras['device']}): {lay.devices} devices = "
        f"TP {lay.tp} x DP {lay.dp} x PP {lay.pp}; MoE EP {lay.ep} x expert TP {lay.expert_tp}; "
        f"weights {r.dtype}, experts {r.expert_dtype}, KV {r.kv_dtype}; routing {r.workload.routing}"
    )
    m = r.memory
    verdict = "[green]fits[/green]" if r.fits else "[red]does NOT fit[/red]"
    table(f"memory per device ({verdict})", ["weights", "KV cache", "activations", "reserved", "free", "capacity"],
          [[units.fmt_bytes(m[k]) for k in ("weights", "kv_cache", "activations", "reserved", "free", "capacity")]],
          right=set(range(6)))
    rows = []
    for kind, n in r.layer_counts.items():
        p, d = r.prefill_layers[kind], r.decode_layers.get(kind)
        rows.append([kind, str(n), units.fmt_time(p.time), p.bound, units.fmt_time(d.time) if d else "-", d.bound if d else ""])
    table("per-layer time on one device", ["layer", "count", "prefill", "bound", "decode", "bound"], rows, right={1, 2, 4})
    kind = next((k for k in r.decode_layers if k.startswith("moe")), next(iter(r.decode_layers)))
    prefill = {p.name: p for p in r.prefill_layers[kind].parts}
    decode = {p.name: p for p in r.decode_layers[kind].parts}
    ops = []
    for name in list(prefill) + [n for n in decode if n not in prefill]:
        row = [name]
        for phase in (prefill, decode):
            op = phase.get(name)
            row += [units.fmt_time(op.time), op.bound] if op else ["-", ""]
        ops.append(row)
    table(f"operators of one '{kind}' layer", ["operator", "prefill", "bound", "decode", "bound"], ops, right={1, 3})
    b = r.per_replica_batch
    table(
        "steps",
        ["phase", "step", "tokens/s", "tokens/s/device", "bottleneck"],
        [["prefill", units.fmt_time(r.prefill_step), f"{r.prefill_tokens_per_s:,.0f}",
          f"{r.prefill_tokens_per_s / lay.devices:,.0f}", r.bottleneck("prefill")],
         ["decode", units.fmt_time(r.decode_step), f"{r.decode_tokens_per_s:,.0f}",
          f"{r.decode_tokens_per_s / lay.devices:,.0f}", r.bottleneck("decode")]],
        right={1, 2, 3},
    )
    cost = r.extras["price_per_hour"]
    per_million = cost / 3600 / r.decode_tokens_per_s * 1e6 if r.decode_tokens_per_s else float("nan")
    console.print(
        f"TTFT {units.fmt_time(r.ttft)}, TPOT {units.fmt_time(r.tpot)}, end-to-end {units.fmt_time(r.e2e_latency)} "
        f"for {r.workload.prompt} + {r.workload.output} tokens ({b} sequences per DP replica"
        f"{f', micro-batches of {r.micro_batch}' if lay.pp > 1 else ''}); "
        f"${cost:.2f}/h, ${per_million:.2f} per million generated tokens"
    )
