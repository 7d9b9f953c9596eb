"""``moesim plan placement``: plan where each expert lives for a scenario, write plan.yaml; and
``moesim plan export``: write a plan in the files and flags frameworks read."""

from __future__ import annotations

from pathlib import Path

from moesim.cli.output import console, table
from moesim.errors import InputError
from moesim.plan.export import FORMATS, SUFFIX, write_all, write_export
from moesim.plan.placement import planners
from moesim.plan.recommend import read_plan, write_plan
from moesim.scenario.plan import placement_setup, plan_placement
from moesim.scenario.schema import load_scenario

METHODS = ("ilp", "eplb", "eplb_global", "eplb_hierarchical", "greedy", "contiguous", "round_robin")


def register(verbs, formatter) -> None:
    p = verbs.add_parser(
        "placement", help="place experts and replicas on the GPUs of a scenario (ILP, EPLB, greedy, ...)",
        formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim plan placement --scenario deepseek-v3-decode-ep64 --redundant 64 -o plan.yaml\n"
                "  moesim plan placement --scenario s.yaml --method eplb --trace recorded.npz -o plan.yaml --export out/\n"
                "  moesim simulate --scenario s.yaml --plan plan.yaml\n"
                "the plan file's schema: docs/planning.md, 'The plan file'."),
    )
    p.add_argument("--scenario", required=True, help="bundled scenario name or path: model, cluster, layout, routing")
    p.add_argument("--method", default="ilp", choices=METHODS, help="planner (default ilp)")
    p.add_argument("--redundant", type=int, default=0, help="redundant expert slots in all, over every GPU (default 0)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="tokens of the routing trace drawn from the scenario's routing profile (default 4096)")
    p.add_argument("--trace", help="plan from this routing trace instead (any format 'moesim trace convert' reads)")
    p.add_argument("--current", metavar="PLAN|JSON",
                   help="the placement now, migration is counted from it (default: slot p holds expert p %% experts)")
    p.add_argument("--time-limit", type=float, help="ilp: seconds in all (default: the planner's)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (YAML)")
    p.add_argument("--export", metavar="DIR", help="also write every export (SGLang, vllm-ascend, .npz, flags) here")
    p.set_defaults(func=_placement)

    e = verbs.add_parser(
        "export", help="write a plan as SGLang / vllm-ascend JSON, EPLB arrays or launch flags", formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim plan export plan.yaml --format sglang -o expert_location.json\n"
                "  moesim plan export plan.yaml --format flags -o launch.sh"),
    )
    e.add_argument("plan", help="a plan file written by 'moesim plan'")
    e.add_argument("--format", required=True, choices=FORMATS, help="sglang (--init-expert-location JSON), vllm-ascend "
                   "(expert map JSON), npz (EPLB's phy2log / log2phy / logcnt), flags (vLLM, SGLang, Megatron-Core)")
    e.add_argument("-o", "--output", help="file to write (default: the plan's name with the format's suffix)")
    e.set_defaults(func=_export)


def _placement(args) -> int:
    if args.method not in planners():
        raise InputError(f"unknown method {args.method!r}", field="--method")
    scenario, path = load_scenario(args.scenario)
    setup = placement_setup(scenario, path, redundant=args.redundant, tokens=args.tokens, trace=args.trace,
                            current=args.current)
    p = setup.problem
    console.print(f"planning {p.layers} MoE layers x {p.experts} experts onto {p.slots} slots of {p.gpus} GPUs in "
                  f"{p.nodes} node{'s' if p.nodes > 1 else ''} ({args.method}) ...")
    rec, scored = plan_placement(setup, args.method, time_limit=args.time_limit)
    seconds = scored.pop("_seconds")
    files = [write_plan(args.output, rec)]
    skipped = []
    if args.export:
        written, skipped = write_all(rec, args.export)
        files += written
    rows = []
    for name, s in scored.items():
        traffic = s["inter_node_bytes_per_token"]
        rows.append([name + (" (plan)" if name == args.method else ""), f"{s['imbalance']:.3f}", f"{s['worst_imbalance']:.3f}",
                     "-" if traffic is None else f"{traffic / 1e3:,.1f}", f"{s['migrated_bytes'] / 2**30:,.1f}",
                     f"{s['expert_s_per_layer'] * 1e6:,.1f}"])
    table(f"{scenario.name}: placement ({rec.inputs['trace']['source']}); expert time of the most loaded GPU per MoE "
          f"layer in a step of {setup.step_tokens:,} tokens",
          ["method", "max/mean", "worst", "KB/token", "moved GiB", "expert us"], rows, right={1, 2, 3, 4, 5})
    console.print("max/mean: most loaded GPU over the mean (mean over layers; worst: the worst layer); KB/token: "
                  "inter-node dispatch bytes per token, all layers; moved: expert weights migrated from the current placement")
    if rec.solver:
        s = rec.solver
        console.print(f"solver {s.get('solver', '')}: status {s.get('status')}, gap {s.get('gap', 0):.2%}"
                      + (f", {seconds:.1f} s" if seconds is not None else ""))
    for reason in skipped:
        console.print(f"not exported: {reason}")
    console.print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _export(args) -> int:
    rec = read_plan(args.plan)
    out = Path(args.output) if args.output else Path(args.plan).with_suffix(SUFFIX[args.format])
    if out.resolve() == Path(args.plan).resolve():
        raise InputError("would overwrite the plan itself; give another -o", field="--output")
    console.print(f"wrote {write_export(rec, args.format, out)}")
    return 0
