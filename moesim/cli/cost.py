"""``moesim cost moe|gemm|attention|collective|transfer``: ask the cost model one question."""

from __future__ import annotations

import argparse

from moesim import units
from moesim.cli.output import add_json_options, console, emit_json, table
from moesim.cost.attention import decode_attention_time, mla_decode_time, mla_prefill_time, prefill_attention_time
from moesim.cost.collectives import all_gather_time, all_reduce_time, all_to_all_time, reduce_scatter_time, transfer_time, uniform_matrix
from moesim.cost.gemm import gemm_time
from moesim.cost.moe import moe_layer_time
from moesim.cost.roofline import OpCost
from moesim.dtypes import canonical_dtype
from moesim.errors import InputError
from moesim.hardware import catalog
from moesim.hardware.specs import Accelerator, Cpu
from moesim.hardware.topology import accelerators, topology
from moesim.routing.counts import parse_routing


def _size(text: str) -> float:
    try:
        value = units.bytes_(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    if not 0 < value < 2**62:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive and finite")
    return value


def _dtype(text: str) -> str:
    try:
        canonical_dtype(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "cost", help="predicted time of one operator, with its breakdown", formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim cost moe --device h100-sxm --dtype bf16 --tokens 128 --hidden 4096 --inter 14336 \\\n"
                "      --topk 2 --experts 8 --ep 1 --routing power_law:1.2\n"
                "  moesim cost gemm --device h100-sxm -m 4096 -n 4096 -k 4096\n"
                "  moesim cost collective --cluster dgx-h100 --op all_reduce --ranks 8 --size 256MiB\n"
                "  moesim cost transfer --cluster dgx-h100 --src n0.host --dst n0.acc0 --size 1GiB"),
    )
    ops = parser.add_subparsers(dest="op", metavar="OP")
    ops.required = True

    def device_parser(name, help_text, example):
        p = ops.add_parser(name, help=help_text, formatter_class=formatter, epilog=f"example:\n  {example}")
        p.add_argument("--device", required=True, help="device profile name, e.g. h100-sxm")
        p.add_argument("--dtype", type=_dtype, default="bf16", help="bf16, fp8, fp8_block, int4_wo ... (default bf16)")
        add_json_options(p)
        return p

    moe = device_parser("moe", "one MoE layer from per-expert token counts",
                        "moesim cost moe --device h100-sxm --tokens 128 --hidden 4096 --inter 14336 --topk 2 --experts 8 --ep 2")
    moe.add_argument("--tokens", type=int, required=True, help="tokens entering the layer on this rank")
    moe.add_argument("--hidden", type=int, required=True)
    moe.add_argument("--inter", type=int, required=True, help="one expert's intermediate size")
    moe.add_argument("--topk", type=int, required=True)
    moe.add_argument("--experts", type=int, required=True)
    moe.add_argument("--ep", type=int, default=1, help="expert-parallel ranks; rank 0 (the heaviest) is costed")
    moe.add_argument("--expert-tp", type=int, default=1, help="expert tensor parallelism (shards the intermediate size)")
    moe.add_argument("--routing", default="balanced", help="balanced, power_law:ALPHA or a .npz trace (default balanced)")
    moe.add_argument("--seed", type=int, default=0)
    moe.add_argument("--no-router", action="store_true", help="leave out the router GEMM (as measured tables do)")
    moe.set_defaults(func=_moe)

    gemm = device_parser("gemm", "a dense GEMM [m,k] x [k,n]", "moesim cost gemm --device h100-sxm -m 1 -n 14336 -k 4096")
    gemm.add_argument("-m", type=int, required=True)
    gemm.add_argument("-n", type=int, required=True)
    gemm.add_argument("-k", type=int, required=True)
    gemm.set_defaults(func=_gemm)

    att = device_parser("attention", "prefill or decode attention (MHA / GQA / MLA)",
                        "moesim cost attention --device h100-sxm --phase decode --batch 64 --kv-len 4096 --heads 32 --kv-heads 8")
    att.add_argument("--phase", choices=["prefill", "decode"], required=True)
    att.add_argument("--batch", type=int, required=True)
    att.add_argument("--seq", type=int, default=0, help="prompt tokens (prefill)")
    att.add_argument("--kv-len", type=int, default=0, help="cached tokens (decode)")
    att.add_argument("--heads", type=int, required=True, help="query heads on this device")
    att.add_argument("--kv-heads", type=int, default=0, help="KV heads on this device (GQA / MHA)")
    att.add_argument("--head-dim", type=int, default=128)
    att.add_argument("--window", type=int, default=0, help="sliding window (0 = full attention)")
    att.add_argument("--kind", choices=["gqa", "mla"], default="gqa", help="mla: DeepSeek latent attention (kv_lora 512, rope 64)")
    att.add_argument("--kv-dtype", default="bf16")
    att.set_defaults(func=_attention)

    coll = ops.add_parser("collective", help="a collective over a cluster's devices", formatter_class=formatter,
                          epilog="example:\n  moesim cost collective --cluster h100-2node --op all_to_all --ranks 16 --size 64MiB")
    coll.add_argument("--cluster", required=True)
    coll.add_argument("--op", choices=["all_reduce", "all_gather", "reduce_scatter", "all_to_all"], required=True)
    coll.add_argument("--ranks", type=int, required=True, help="the first N accelerators of the cluster")
    coll.add_argument("--size", type=_size, required=True, help="buffer size per rank, e.g. 64MiB (all_to_all: split evenly)")
    coll.add_argument("--algorithm", default=None, help="all_reduce: ring | hierarchical | auto; all_to_all: flat | hierarchical")
    add_json_options(coll)
    coll.set_defaults(func=_collective)

    tr = ops.add_parser("transfer", help="move bytes between tiers / devices", formatter_class=formatter,
                        epilog="example:\n  moesim cost transfer --cluster rtx4090-xeon --src n0.ssd0 --dst n0.acc0 --size 352MiB")
    tr.add_argument("--cluster", required=True)
    tr.add_argument("--src", required=True, help="graph node: nN.accJ (HBM), nN.host (DRAM), nN.ssdK (NVMe)")
    tr.add_argument("--dst", required=True)
    tr.add_argument("--size", type=_size, required=True)
    add_json_options(tr)
    tr.set_defaults(func=_transfer)


def _compute_device(name: str):
    spec = catalog.device(name, field="--device")
    if not isinstance(spec, (Accelerator, Cpu)):
        raise InputError(f"{name!r} is an SSD; the cost model needs a GPU, NPU or CPU", field="--device")
    return spec


def _report(cost: OpCost, args, title: str) -> int:
    if args.json or args.output_file:
        emit_json(cost.to_dict(), args.output_file)
        return 0
    console.print(f"[bold]{title}[/bold]: {units.fmt_time(cost.time)} ({cost.bound}-bound)")
    rows = []
    for part in cost.parts or [cost]:
        rows.append([part.name, units.fmt_time(part.time), units.fmt_time(part.compute_time), units.fmt_time(part.memory_time),
                     units.fmt_time(part.launch_time), units.fmt_time(part.comm_time), part.bound])
    table("breakdown", ["kernel", "time", "compute", "memory", "launch", "comm", "bound"], rows, right={1, 2, 3, 4, 5})
    if cost.info:
        console.print(", ".join(f"{k}={v}" for k, v in cost.info.items() if not isinstance(v, (list, dict))))
    return 0


def _moe(args) -> int:
    device = _compute_device(args.device)
    for name in ("tokens", "hidden", "inter", "topk", "experts", "ep", "expert_tp"):
        if not 1 <= getattr(args, name) <= 10**12:
            raise InputError("must be between 1 and 1e12", field=f"--{name.replace('_', '-')}")
    if args.seed < 0:
        raise InputError("must be >= 0", field="--seed")
    if args.topk > args.experts:
        raise InputError(f"top-k {args.topk} exceeds the {args.experts} experts", field="--topk")
    if args.experts % args.ep:
        raise InputError(f"EP {args.ep} does not divide {args.experts} experts", field="--ep")
    if args.inter % args.expert_tp:
        raise InputError(f"expert TP {args.expert_tp} does not divide intermediate size {args.inter}", field="--expert-tp")
    counts = parse_routing(args.routing, args.tokens, args.experts, args.topk, ep=args.ep, seed=args.seed)
    cost = moe_layer_time(device, counts, tokens=args.tokens, hidden=args.hidden, inter=args.inter, top_k=args.topk,
                          dtype=args.dtype, ep=args.ep, expert_tp=args.expert_tp, router=not args.no_router)
    return _report(cost, args, f"MoE layer on {device.name}, rank 0 of EP {args.ep}")


def _gemm(args) -> int:
    device = _compute_device(args.device)
    for name in ("m", "n", "k"):
        if getattr(args, name) < 1:
            raise InputError("must be at least 1", field=f"-{name}")
    return _report(gemm_time(device, args.m, args.n, args.k, args.dtype), args, f"GEMM [{args.m},{args.k}]x[{args.k},{args.n}] on {device.name}")


def _attention(args) -> int:
    device = _compute_device(args.device)
    for name in ("batch", "heads", "head_dim"):
        if getattr(args, name) < 1:
            raise InputError("must be at least 1", field=f"--{name.replace('_', '-')}")
    for name in ("seq", "kv_len", "kv_heads", "window"):
        if getattr(args, name) < 0:
            raise InputError("must not be negative", field=f"--{name.replace('_', '-')}")
    window = args.window or None
    if args.phase == "prefill" and args.seq < 1:
        raise InputError("prefill needs --seq >= 1", field="--seq")
    if args.phase == "decode" and args.kv_len < 1:
        raise InputError("decode needs --kv-len >= 1", field="--kv-len")
    if args.kind == "mla":
        cost = (mla_prefill_time(device, args.batch, args.seq, args.heads, 128, 64, 128, kv_dtype=args.kv_dtype)
                if args.phase == "prefill"
                else mla_decode_time(device, args.batch, args.kv_len, args.heads, 512, 64, kv_dtype=args.kv_dtype))
    else:
        kv_heads = args.kv_heads or args.heads
        cost = (prefill_attention_time(device, args.batch, args.seq, args.heads, kv_heads, args.head_dim, window=window,
                                       kv_dtype=args.kv_dtype)
                if args.phase == "prefill" else
                decode_attention_time(device, args.batch, args.kv_len, args.heads, kv_heads, args.head_dim, window=window, kv_dtype=args.kv_dtype))
    return _report(cost, args, f"{args.kind.upper()} {args.phase} attention on {device.name}")


def _collective(args) -> int:
    graph = topology(catalog.cluster(args.cluster, field="--cluster").name)
    ranks = accelerators(graph)
    if not 1 <= args.ranks <= len(ranks):
        raise InputError(f"cluster {args.cluster} has {len(ranks)} accelerators; asked for {args.ranks}", field="--ranks")
    group = ranks[: args.ranks]
    if args.op == "all_reduce":
        cost = all_reduce_time(graph, group, args.size, algorithm=args.algorithm or "auto")
    elif args.op == "all_gather":
        cost = all_gather_time(graph, group, args.size)
    elif args.op == "reduce_scatter":
        cost = reduce_scatter_time(graph, group, args.size)
    else:
        cost = all_to_all_time(graph, group, uniform_matrix(args.ranks, args.size), algorithm=args.algorithm or "flat")
    cost.info["algbw_bytes_per_s"] = args.size / cost.time if cost.time else 0.0
    return _report(cost, args, f"{args.op} of {units.fmt_bytes(args.size)} over {args.ranks} ranks of {args.cluster}")


def _transfer(args) -> int:
    graph = topology(catalog.cluster(args.cluster, field="--cluster").name)
    return _report(transfer_time(graph, args.src, args.dst, args.size), args,
                   f"{units.fmt_bytes(args.size)} {args.src} -> {args.dst} on {args.cluster}")
