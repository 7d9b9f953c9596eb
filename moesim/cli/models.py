"""``moesim models list|show``: model presets and HF config.json ingestion."""

from __future__ import annotations

from moesim import units
from moesim.cli.output import add_json_options, emit_json, table
from moesim.models import kv_bytes_per_token, list_presets, load_model, param_counts, weight_bytes


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "models", help="list model presets, show a model's architecture and sizes", formatter_class=formatter,
        epilog="examples:\n  moesim models list\n  moesim models show deepseek-v3\n  moesim models show path/to/config.json",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    listing = verbs.add_parser("list", help="list presets", formatter_class=formatter, epilog="example:\n  moesim models list --json")
    add_json_options(listing)
    listing.set_defaults(func=_list)
    show = verbs.add_parser("show", help="show one model", formatter_class=formatter,
                            epilog="examples:\n  moesim models show mixtral-8x7b\n  moesim models show ./config.json --json")
    show.add_argument("model", help="preset name or path to an HF config.json (or its folder)")
    add_json_options(show)
    show.set_defaults(func=_show)


def _summary(arch) -> dict:
    counts = param_counts(arch)
    moe = arch.moe
    return {
        "name": arch.name,
        "family": arch.family,
        "layers": arch.num_layers,
        "moe_layers": len(arch.moe_layers),
        "hidden": arch.hidden,
        "experts": moe.num_experts if moe else 0,
        "top_k": moe.top_k if moe else 0,
        "shared_experts": moe.num_shared_experts if moe else 0,
        "expert_inter": moe.expert_inter if moe else 0,
        "attention": arch.attention.kind,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "published_total": arch.published_total,
        "published_active": arch.published_active,
        "weight_bytes_bf16": weight_bytes(arch, "bf16")["total"],
        "kv_bytes_per_token_bf16": kv_bytes_per_token(arch, "bf16"),
    }


def _list(args) -> int:
    rows = [_summary(load_model(name)) for name in list_presets()]
    if args.json or args.output_file:
        emit_json(rows, args.output_file)
        return 0
    table(
        "model presets",
        ["name", "layers (MoE)", "experts / top-k", "shared", "attention", "total", "active", "bf16 weights", "KV / token"],
        [[r["name"], f"{r['layers']} ({r['moe_layers']})", f"{r['experts']} / {r['top_k']}", str(r["shared_experts"]), r["attention"],
          units.fmt_count(r["total_params"]), units.fmt_count(r["active_params"]), units.fmt_bytes(r["weight_bytes_bf16"]),
          units.fmt_bytes(r["kv_bytes_per_token_bf16"])] for r in rows],
        right={5, 6, 7, 8},
    )
    return 0


def _show(args) -> int:
    arch = load_model(args.model)
    summary = _summary(arch)
    counts = param_counts(arch)
    if args.json or args.output_file:
        emit_json(summary | {"breakdown": counts["breakdown"], "source": arch.source}, args.output_file)
        return 0
    att = arch.attention
    rows = [
        ["family", arch.family],
        ["layers", f"{arch.num_layers} ({summary['moe_layers']} MoE)"],
        ["hidden", str(arch.hidden)],
        ["attention", f"{att.kind}, {att.num_heads} heads / {att.num_kv_heads} KV heads, head dim {att.head_dim}"],
        ["experts", f"{summary['experts']} routed (top-{summary['top_k']}), {summary['shared_experts']} shared, FFN {summary['expert_inter']}"],
        ["parameters", f"{units.fmt_count(counts['total'])} total, {units.fmt_count(counts['active'])} active"],
    ]
    if arch.published_total:
        rows.append(["published", f"{units.fmt_count(arch.published_total)} total, {units.fmt_count(arch.published_active or 0)} active"])
    for dtype in ("bf16", "fp8", "int4"):
        rows.append([f"weights {dtype}", units.fmt_bytes(weight_bytes(arch, dtype)["total"])])
    rows.append(["KV cache / token", units.fmt_bytes(kv_bytes_per_token(arch, "bf16")) + " (bf16)"])
    rows.append(["source", arch.source])
    table(arch.name, ["", ""], rows)
    table("parameters by part", ["part", "parameters"],
          [[k, units.fmt_count(v)] for k, v in counts["breakdown"].items()], right={1})
    return 0
