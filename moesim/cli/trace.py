"""``moesim trace generate|convert|stats``: routing traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import ValidationError

from moesim.cli.output import add_json_options, console, emit_json, table
from moesim.errors import InputError, from_validation
from moesim.files import load_yaml
from moesim.models import load_model
from moesim.routing import stats
from moesim.routing.formats import FORMATS, read_trace, write_trace
from moesim.routing.generate import generate_counts, generate_tokens
from moesim.routing.profile import RoutingProfile
from moesim.routing.trace import Trace


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "trace", help="generate, convert and analyse routing traces", formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim trace generate --model mixtral-8x7b --tokens 100000 --skew 0.8 --locality 0.3 -o mixtral.npz\n"
                "  moesim trace generate --model deepseek-v3 --steps 500 --batch 4096 -o dsv3-counts.npz\n"
                "  moesim trace stats mixtral.npz --figures out/\n"
                "  moesim trace convert expert_distribution.pt dsv3.npz"),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    gen = verbs.add_parser("generate", help="draw a synthetic trace from a routing profile", formatter_class=formatter,
                           epilog="example:\n  moesim trace generate --model qwen3-30b-a3b --tokens 20000 --locality 0.4 -o q.npz")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model preset or config.json: experts, top-k and MoE layers come from it")
    source.add_argument("--profile", help="a routing profile YAML (fields of moesim.routing.profile.RoutingProfile)")
    gen.add_argument("--tokens", type=int, help="token-level trace of this many tokens")
    gen.add_argument("--steps", type=int, help="count-level trace of this many steps (with --batch)")
    gen.add_argument("--batch", type=int, default=1024, help="tokens per step for count-level traces (default 1024)")
    for name, help_text in (("skew", "Zipf exponent of expert popularity"), ("locality", "probability of repeating the previous token's choice"),
                            ("affinity", "probability of following the previous layer's expert"), ("drift", "popularity drift per interval")):
        gen.add_argument(f"--{name}", type=float, help=help_text)
    gen.add_argument("--domains", type=int, help="number of workload domains")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("-o", "--output", required=True, help="output trace (.npz, .csv or .npy)")
    gen.set_defaults(func=_generate)

    conv = verbs.add_parser("convert", help="convert between trace formats", formatter_class=formatter,
                            epilog="example:\n  moesim trace convert trace.npy trace.npz --experts 8")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--from", dest="src_format", choices=FORMATS, help="input format (default: from the suffix)")
    conv.add_argument("--to", dest="dst_format", choices=["npz", "csv", "exflow"], help="output format (default: from the suffix)")
    conv.add_argument("--experts", type=int, help="experts per layer (default: from the file)")
    conv.add_argument("--batch", type=int, help="tokens per step when writing counts from a token-level trace")
    conv.set_defaults(func=_convert)

    st = verbs.add_parser("stats", help="load balance, locality, cache hit rates, affinity", formatter_class=formatter,
                          epilog="example:\n  moesim trace stats mixtral.npz --ep 8 --figures out/ --json")
    st.add_argument("trace")
    st.add_argument("--from", dest="src_format", choices=FORMATS, help="input format (default: from the suffix)")
    st.add_argument("--experts", type=int, help="experts per layer (default: from the file)")
    st.add_argument("--batch", type=int, default=1024, help="tokens per step for load statistics (default 1024)")
    st.add_argument("--ep", type=int, default=8, help="EP size for SGLang's balancedness (default 8)")
    st.add_argument("--multiples", default="1,1.5,2,3,4", help="cache sizes as multiples of the active experts")
    st.add_argument("--segment", type=int, default=16, help="segment length for SRP and lookahead for SCH (default 16)")
    st.add_argument("--figures", metavar="DIR", help="write a load heatmap and hit-rate curves as PNG here")
    add_json_options(st)
    st.set_defaults(func=_stats)


def _profile(args) -> RoutingProfile:
    overrides = {k: getattr(args, k) for k in ("skew", "locality", "affinity", "drift", "domains") if getattr(args, k) is not None}
    if args.profile:
        raw = load_yaml(args.profile)
        if not isinstance(raw, dict):
            raise InputError("expected a mapping of profile fields", source=args.profile)
        source, data = args.profile, raw | overrides
    else:
        arch = load_model(args.model)
        if not arch.is_moe:
            raise InputError(f"{arch.name} has no MoE layers", field="--model")
        moe = arch.moe
        data = {"name": arch.name, "num_experts": moe.num_experts, "top_k": moe.top_k, "num_layers": len(arch.moe_layers),
                "num_shared": moe.num_shared_experts, "source": f"shape of {arch.name}"}
        if moe.n_group > 1 and moe.topk_group < moe.n_group:
            data |= {"algorithm": "group_limited", "n_group": moe.n_group, "topk_group": moe.topk_group}
        source, data = "--model", data | overrides
    try:
        return RoutingProfile.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc, source) from None


def _generate(args) -> int:
    if (args.tokens is None) == (args.steps is None):
        raise InputError("give exactly one of --tokens (token level) and --steps (count level)", field="--tokens")
    for name in ("tokens", "steps", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"must be at least 1, got {value}", field=f"--{name}")
    profile = _profile(args)
    meta = {"seed": args.seed, "generator": profile.metadata(), "model": profile.name}
    if args.tokens:
        trace = Trace(num_experts=profile.num_experts, topk_ids=generate_tokens(profile, args.tokens, args.seed), metadata=meta)
    else:
        meta["batch"] = args.batch
        meta["top_k"] = profile.top_k
        trace = Trace(num_experts=profile.num_experts, counts=generate_counts(profile, args.steps, args.batch, args.seed), metadata=meta)
    write_trace(args.output, trace, batch=args.batch)
    console.print(f"wrote {args.output}: {trace.level}-level, {trace.num_layers} layers x {profile.num_experts} experts")
    return 0


def _convert(args) -> int:
    trace = read_trace(args.input, args.src_format or "", args.experts)
    write_trace(args.output, trace, args.dst_format or "", batch=args.batch)
    console.print(f"wrote {args.output}: {trace.level}-level, {trace.num_layers} layers x {trace.num_experts} experts")
    return 0


def _multiples(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"cannot read {text!r}: expected numbers separated by commas", field="--multiples") from None
    if not values or min(values) <= 0:
        raise InputError("expected positive multiples, e.g. 1,2,4", field="--multiples")
    return values


def _stats(args) -> int:
    trace = read_trace(args.trace, args.src_format or "", args.experts)
    if trace.num_experts % args.ep:
        raise InputError(f"EP {args.ep} does not divide {trace.num_experts} experts", field="--ep")
    result, curves = stats.summary(trace, batch=args.batch, ep=args.ep, multiples=_multiples(args.multiples), segment=args.segment)
    if args.figures:
        from moesim.report.figures import hit_rate_figure, load_heatmap

        folder = Path(args.figures)
        load_heatmap(trace.loads(args.batch), folder / "load_heatmap.png", title=Path(args.trace).name)
        if curves:
            hit_rate_figure(curves, trace.top_k, folder / "hit_rate.png", title=Path(args.trace).name)
        result["figures"] = sorted(str(p) for p in folder.glob("*.png"))
    if args.json or args.output_file:
        emit_json(result, args.output_file)
        return 0
    mean = lambda values: f"{np.mean(values):.3g}"
    rows = [["imbalance (max / mean), mean over layers", mean(result["imbalance"])],
            [f"balancedness at EP {args.ep}", mean(result["balancedness"])],
            ["top expert's share, mean over layers", mean(result["popularity_top_share"])]]
    if "srp" in result:
        rows += [[f"SRP, segments of {args.segment}", mean(result["srp"])],
                 ["repeat rate (a choice of the previous token)", mean(result["repeat_rate"])],
                 ["cross-layer mutual information (bits)", mean(result["affinity_mutual_information_bits"]) if result["affinity_mutual_information_bits"] else "-"]]
    k_text = f"top-{trace.top_k}" if trace.top_k else "top-k unknown"
    table(f"{Path(args.trace).name}: {trace.level}-level, {trace.num_layers} layers x {trace.num_experts} experts, {k_text}",
          ["statistic", "value"], rows, right={1})
    if "cache_sizes" in result:
        k = trace.top_k
        table("hit rate of a per-layer expert cache (mean over layers)",
              ["cache (experts)", "x active", "LRU", "LFU", "Belady", f"SCH ({args.segment} ahead)"],
              [[str(c), f"{c / k:.3g}"] + [f"{result[f'hit_rate_{p}'][str(c)]:.3f}" for p in ("lru", "lfu", "belady", "sch")]
               for c in result["cache_sizes"]], right={0, 1, 2, 3, 4, 5})
    if args.figures:
        console.print("figures: " + ", ".join(result["figures"]))
    return 0
