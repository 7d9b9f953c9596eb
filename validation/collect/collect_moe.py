"""Measure one MoE layer (router output -> experts -> combine) on this GPU.

The per-expert token counts come from moesim's own generators, so the measured rows and
moesim's predictions see the same routing:

- ``balanced``: :func:`moesim.routing.counts.balanced_counts` (aiconfigurator's balanced rows);
- ``power_law:ALPHA``: :func:`moesim.routing.counts.power_law_counts`, aiconfigurator's
  power-law draw (heaviest EP rank first);
- ``profile`` / ``profile:PRESET``: token-level choices drawn from moesim's routing profile of
  the model (``moesim/routing/profiles``), one MoE layer (``--layer``).

Each token's top-k expert ids are laid out so every expert gets exactly its count (slot ``i``
of the expert-sorted list goes to token ``i % tokens``, which never gives a token the same
expert twice because no count exceeds the token count); router weights are a softmax of random
logits. The layer is vLLM's ``fused_experts`` (Triton fused MoE, as aiconfigurator measured)
when vLLM is installed and the device is a GPU, else a PyTorch loop over the experts
(``--impl``). Under ``--ep N`` the layer is EP rank 0's: it receives every token and computes
only its ``E / N`` experts (vLLM-style EP, as the aiconfigurator table).

Writes ``moe_<framework>_<version>_moe_perf.csv`` (aiconfigurator MoE columns, latency ms; the
rows of routing profiles in ``routing_profile/`` beside it),
``moe_trace.json`` (torch.profiler; each case's calls are ``record_function`` ranges named by
the case, and NVTX ranges of the same names on a GPU, so a run under ``nsys profile -t
cuda,nvtx ... --no-trace`` can be replayed from its SQLite export instead) and ``moe_cases.json`` (shape, routing and tokens per expert of each case, for
``moesim.validate.replay``).

    python validation/collect/collect_moe.py --model mixtral-8x7b --out validation/measured/h100-sxm
    python validation/collect/collect_moe.py --dry-run --out /tmp/moe-check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_common as common  # noqa: E402

from moesim.files import atomic_write  # noqa: E402
from moesim.models.presets import load_model  # noqa: E402
from moesim.routing.counts import balanced_counts, power_law_alpha, power_law_counts  # noqa: E402
from moesim.routing.generate import generate_tokens  # noqa: E402
from moesim.routing.profile import model_profile  # noqa: E402

GPU_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
DRY_TOKENS = [4, 16]
CASES_FILE = "moe_cases.json"
TRACE_FILE = "moe_trace.json"


def distribution_name(spec: str, model: str) -> str:
    """The ``distribution`` column for a routing spec: aiconfigurator's names for its own
    draws (``balanced``, ``power_law_1.2``), ``profile_<model>`` for a routing profile."""
    if spec == "balanced":
        return "balanced"
    if spec.startswith("power_law"):
        return f"power_law_{power_law_alpha(spec, field='--routing'):g}"
    return f"profile_{spec.partition(':')[2] or model}"


def expert_ids(spec: str, tokens: int, num_experts: int, top_k: int, *, ep: int, seed: int, model: str,
               layer: int) -> np.ndarray:
    """``[tokens, top_k]`` expert ids whose per-expert counts follow the routing ``spec``."""
    if spec.startswith("profile"):
        arch = load_model(spec.partition(":")[2] or model)
        profile = model_profile(arch)
        if (profile.num_experts, profile.top_k) != (num_experts, top_k):
            sys.exit(f"routing profile of {arch.name} has {profile.num_experts} experts, top-{profile.top_k}; "
                     f"the layer has {num_experts}, top-{top_k}")
        ids = generate_tokens(profile, tokens, seed)[:, layer % profile.num_layers, :].astype(np.int64)
        if (ids < 0).any():
            sys.exit(f"the routing profile of {arch.name} drops tokens; this collector needs every slot routed")
        return ids
    if spec == "balanced":
        counts = balanced_counts(tokens, num_experts, top_k)
    elif spec.startswith("power_law"):
        counts = power_law_counts(tokens, num_experts, top_k, power_law_alpha(spec), ep=ep,
                                  rng=np.random.default_rng(seed))
    else:
        sys.exit(f"unknown routing {spec!r}: expected balanced, power_law:ALPHA or profile[:PRESET]")
    flat = np.repeat(np.arange(num_experts), counts)
    return flat.reshape(top_k, tokens).T.copy()  # slot i -> token i % tokens, choice i // tokens


def torch_layer(x, w13, w2, ids, weights, local: range, num_experts: int):
    """The MoE layer in plain PyTorch: slots sorted by expert, each local expert's rows through
    gate+up, SiLU(gate) * up and down, weighted and summed back per token."""
    tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync per call, as a loop MoE has
    rows = x[token_of]
    out_rows = torch.zeros_like(rows)
    start = sum(counts[: local.start])
    inter = w2.shape[2]
    for e in local:
        count = counts[e]
        if count:
            h = rows[start : start + count] @ w13[e - local.start].T
            out_rows[start : start + count] = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e - local.start].T
            start += count
    weighted = out_rows * weights.reshape(-1)[order, None].to(out_rows.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, weighted)


def vllm_layer():
    """vLLM's ``fused_experts`` when vLLM is importable, else None."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception:  # vLLM absent or built for another torch: fall back to the loop
        return None
    return fused_experts


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="mixtral-8x7b", help="moesim preset giving the layer's shape (default mixtral-8x7b)")
    p.add_argument("--hidden", type=int, help="override the hidden size")
    p.add_argument("--inter", type=int, help="override one expert's intermediate size")
    p.add_argument("--tokens", type=int, nargs="+", help=f"tokens per case (default {GPU_TOKENS})")
    p.add_argument("--routing", nargs="+", default=["balanced", "power_law:1.01", "power_law:1.2"],
                   help="balanced, power_law:ALPHA, profile[:PRESET]")
    p.add_argument("--ep", type=int, nargs="+", default=[1], help="expert-parallel sizes (the layer of EP rank 0)")
    p.add_argument("--layer", type=int, default=0, help="MoE layer of the routing profile")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bfloat16")
    p.add_argument("--impl", choices=["auto", "vllm", "torch"], default="auto")
    args = p.parse_args(argv)
    env = common.setup(args)
    arch = load_model(args.model)
    if arch.moe is None:
        sys.exit(f"{arch.name} has no MoE layers")
    hidden = args.hidden or (64 if env.dry_run else arch.hidden)
    inter = args.inter or (128 if env.dry_run else arch.moe.expert_inter)
    experts, top_k = arch.moe.num_experts, arch.moe.top_k
    token_counts = args.tokens or (DRY_TOKENS if env.dry_run else GPU_TOKENS)
    dtype = common.DTYPES[args.dtype]
    fused = None if args.impl == "torch" or not env.cuda else vllm_layer()
    if args.impl == "vllm" and fused is None:
        sys.exit("--impl vllm needs vLLM installed and a CUDA device")
    if fused is not None:
        import vllm
        framework, version, source = "vllm", vllm.__version__, "vllm_fused_moe"
    else:
        framework, version, source = "torch", torch.__version__.split("+")[0], "torch_moe_loop"

    rows, cases = [], []
    trace_path = env.out / TRACE_FILE
    with common.profiled(env, trace_path) as prof:
        for ep in args.ep:
            if experts % ep:
                sys.exit(f"EP {ep} does not divide {experts} experts")
            local = range(0, experts // ep)
            g = torch.Generator(device="cpu").manual_seed(env.seed)
            w13 = (torch.randn(len(local), 2 * inter, hidden, generator=g) * hidden**-0.5).to(env.device, dtype)
            w2 = (torch.randn(len(local), hidden, inter, generator=g) * inter**-0.5).to(env.device, dtype)
            expert_map = None
            if ep > 1 and fused is not None:
                expert_map = torch.full((experts,), -1, dtype=torch.int32, device=env.device)
                expert_map[: len(local)] = torch.arange(len(local), dtype=torch.int32, device=env.device)
            for spec in args.routing:
                for tokens in token_counts:
                    ids_np = expert_ids(spec, tokens, experts, top_k, ep=ep, seed=env.seed, model=arch.name, layer=args.layer)
                    x = (torch.randn(tokens, hidden, generator=g)).to(env.device, dtype)
                    ids = torch.from_numpy(ids_np).to(env.device)
                    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1).to(env.device)
                    if fused is not None:
                        ids32 = ids.to(torch.int32)
                        extra = {"global_num_experts": experts, "expert_map": expert_map} if expert_map is not None else {}
                        call = lambda: fused(x, w13, w2, weights, ids32, **extra)  # noqa: E731
                    else:
                        call = lambda: torch_layer(x, w13, w2, ids, weights, local, experts)  # noqa: E731
                    seconds = common.time_call(call, env)
                    distribution = distribution_name(spec, arch.name)
                    label = f"moe case={len(cases)} tokens={tokens} ep={ep} routing={distribution}"
                    if prof is not None or env.cuda:  # NVTX ranges for a run under nsys profile --no-trace too
                        common.traced_calls(env, call, label)
                    row = common.constants(env, "moe", source) | {
                        "framework": framework, "version": version, "moe_dtype": args.dtype, "num_tokens": tokens,
                        "hidden_size": hidden, "inter_size": inter, "topk": top_k, "num_experts": experts,
                        "moe_tp_size": 1, "moe_ep_size": ep, "distribution": distribution, "latency": seconds * 1e3}
                    rows.append(row)
                    counts = np.bincount(ids_np.reshape(-1), minlength=experts)
                    cases.append({"label": label, **{k: row[k] for k in ("num_tokens", "hidden_size", "inter_size", "topk",
                                                                          "num_experts", "moe_tp_size", "moe_ep_size",
                                                                          "moe_dtype", "distribution", "kernel_source")},
                                  "tokens_per_expert": counts.tolist(), "latency_ms": row["latency"]})
    # rows drawn from a routing profile have no aiconfigurator distribution name: their exact
    # counts live in moe_cases.json, so their table goes to a sub-folder 'moesim validate
    # --measured DIR' does not read (the replay reads them)
    path = common.table_path(env, "moe", "moe", framework, version)
    standard = [r for r in rows if not r["distribution"].startswith("profile_")]
    profiled_rows = [r for r in rows if r["distribution"].startswith("profile_")]
    table = common.write_table(path, standard) if standard else None
    profile_table = common.write_table(env.out / "routing_profile" / path.name, profiled_rows) if profiled_rows else None
    sidecar = atomic_write(env.out / CASES_FILE, json.dumps(
        {"device": env.device_name, "dry_run": env.dry_run, "model": arch.name, "trace": TRACE_FILE if env.trace else None,
         "cases": cases}, indent=1))
    return {"table": table, "profile_table": profile_table, "trace": trace_path if env.trace else None, "cases": sidecar}


if __name__ == "__main__":
    for kind, path in main().items():
        print(f"{kind}: {path}")
