"""``moesim trace generate|convert|stats``: routing traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from moesim.cli.output import add_json_options, console, emit_json, table
from moesim.errors import InputError, from_validation
from moesim.files import atomic_write, load_yaml
from moesim.models import load_model
from moesim.routing import stats
from moesim.routing.fit import Targets, fit, targets_from_trace
from moesim.routing.formats import FORMATS, read_trace, write_trace
from moesim.routing.generate import generate_counts, generate_tokens
from moesim.routing.profile import RoutingProfile, model_profile
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
    conv.add_argument("--physical", action="store_true",
                      help="SGLang per-token ids are physical slots: map them to logical experts")
    conv.set_defaults(func=_convert)

    fitter = verbs.add_parser("fit", help="fit a routing profile to target statistics", formatter_class=formatter,
                           epilog=("examples:\n"
                                   "  moesim trace fit --model mixtral-8x7b --trace recorded.npz -o mixtral-profile.yaml\n"
                                   "  moesim trace fit --model mixtral-8x7b --imbalance 1.6 --batch 256 --hit-rate 2x:0.62 -o p.yaml"))
    base = fitter.add_mutually_exclusive_group(required=True)
    base.add_argument("--model", help="model preset: the profile's shape")
    base.add_argument("--profile", help="a routing profile YAML to start from")
    fitter.add_argument("--trace", help="take the targets from this recorded token-level trace")
    fitter.add_argument("--imbalance", type=float, help="target max / mean tokens per expert at --batch")
    fitter.add_argument("--batch", type=int, default=1024, help="tokens per step for the imbalance target (default 1024)")
    fitter.add_argument("--repeat-rate", type=float, help="target share of choices repeating one of the previous token's")
    fitter.add_argument("--hit-rate", action="append", default=[], metavar="SIZE:RATE",
                     help="target LRU hit rate at a cache size, in experts (4:0.6) or multiples of top-k (2x:0.6); repeatable")
    fitter.add_argument("--mutual-information", type=float, help="target cross-layer mutual information, bits")
    fitter.add_argument("--first-choice-repeat", type=float,
                        help="target share of consecutive tokens with the same first choice (Mixtral paper, Table 5)")
    fitter.add_argument("--overlap-rate", type=float, help="target share of consecutive tokens sharing an expert")
    fitter.add_argument("--srp", action="append", default=[], metavar="M:VALUE",
                        help="target SRP at segment length M (16:0.49); repeatable (Liang et al., 2025)")
    fitter.add_argument("--sch", action="append", default=[], metavar="RHO:VALUE",
                        help="target SCH at a cache of RHO x top-k experts (2:0.74), lookahead --segment; repeatable")
    fitter.add_argument("--segment", type=int, default=16, help="SCH lookahead in tokens (default 16)")
    fitter.add_argument("--tokens", type=int, default=20_000, help="tokens per evaluation trace (default 20000)")
    fitter.add_argument("--seed", type=int, default=0)
    fitter.add_argument("-o", "--output", help="write the fitted profile as YAML")
    fitter.add_argument("--json", action="store_true", help="print the fit report as JSON")
    fitter.set_defaults(func=_fit, skew=None, locality=None, affinity=None, drift=None, domains=None)

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
        source, data = "--model", model_profile(arch).model_dump() | overrides
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
    trace = read_trace(args.input, args.src_format or "", args.experts, physical=args.physical)
    write_trace(args.output, trace, args.dst_format or "", batch=args.batch)
    console.print(f"wrote {args.output}: {trace.level}-level, {trace.num_layers} layers x {trace.num_experts} experts")
    return 0


def _pairs(items: list[str], flag: str, example: str, key=float) -> dict:
    """``KEY:VALUE`` items as a mapping: ``key`` reads the key (a cache size, segment length or
    cache multiple, which must come out positive), the value is a rate in [0, 1]."""
    out = {}
    for item in items:
        raw, _, value = item.partition(":")
        try:
            parsed, rate = key(raw), float(value)
        except ValueError:
            raise InputError(f"cannot read {item!r}: expected KEY:VALUE, e.g. {example}", field=flag) from None
        if parsed <= 0 or not 0 <= rate <= 1:
            raise InputError(f"{item!r}: expected a positive key and a value in [0, 1]", field=flag)
        out[parsed] = rate
    return out


def _hit_rates(items: list[str], top_k: int) -> dict[int, float]:
    """Cache sizes in experts (``4``) or multiples of top-k (``2x``) mapped to LRU hit rates."""
    def experts(size: str) -> int:
        return round(float(size[:-1]) * top_k) if size.endswith("x") else int(size)
    return _pairs(items, "--hit-rate", "4:0.6 or 2x:0.6", experts)


def _fit(args) -> int:
    base = _profile(args)
    if args.trace:
        trace = read_trace(args.trace)
        if trace.topk_ids is None:
            raise InputError("fitting needs a token-level trace (topk_ids)", source=args.trace)
        if trace.num_experts != base.num_experts or trace.top_k != base.top_k:
            raise InputError(f"the trace routes top-{trace.top_k} of {trace.num_experts}; the profile top-{base.top_k} of "
                             f"{base.num_experts}", source=args.trace)
        sizes = tuple(_hit_rates(args.hit_rate, base.top_k)) or (2 * base.top_k,)
        targets = targets_from_trace(np.asarray(trace.topk_ids), trace.num_experts, batch=args.batch, cache_sizes=sizes)
        base = base.model_copy(update={"num_layers": trace.num_layers})
    else:
        targets = Targets(imbalance=args.imbalance, batch=args.batch, repeat_rate=args.repeat_rate,
                          hit_rate=_hit_rates(args.hit_rate, base.top_k), mutual_information=args.mutual_information,
                          first_choice_repeat=args.first_choice_repeat, overlap_rate=args.overlap_rate,
                          srp=_pairs(args.srp, "--srp", "16:0.49", int), sch=_pairs(args.sch, "--sch", "2:0.74"),
                          sch_future=args.segment)
        if not targets.values():
            raise InputError("give --trace or at least one target (--imbalance, --repeat-rate, --hit-rate, --srp, --sch, ...)",
                             field="--trace")
    result = fit(base, targets, tokens=args.tokens, seed=args.seed)
    fitted = {p: getattr(result.profile, p) for p in ("skew", "locality", "affinity")}
    report = {"profile": result.profile.model_dump(), "targets": result.targets, "achieved": result.achieved,
              "relative_error_squared": result.error, "evaluations": result.evaluations,
              "fitted_to": args.trace or "targets given on the command line"}
    if args.output:
        records = {name: {"target": target, "achieved": got} for name, target, got in result.table()}
        text = "# Routing profile fitted by 'moesim trace fit'.\n" + yaml.safe_dump(
            result.profile.model_dump() | {"source": report["fitted_to"], "fitted_to": records}, sort_keys=False)
        atomic_write(args.output, text)
    if args.json:
        emit_json(report)
        return 0
    table("fit: target vs achieved", ["statistic", "target", "achieved"],
          [[n, f"{t:.4g}", f"{a:.4g}"] for n, t, a in result.table()], right={1, 2})
    console.print("fitted " + ", ".join(f"{k} = {v:.3f}" for k, v in fitted.items())
                  + (f"; wrote {args.output}" if args.output else ""))
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
