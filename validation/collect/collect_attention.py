"""Measure attention, prefill and decode, with torch.nn.functional.scaled_dot_product_attention.

Prefill (``context_attention``): ``batch_size`` sequences of ``isl`` tokens attend causally to
themselves. Decode (``generation_attention``): one new token per sequence attends to ``step``
cached tokens (aiconfigurator's ``step`` is the KV length). Grouped-query attention through
``enable_gqa`` (``num_key_value_heads`` < ``num_heads``). SDPA picks its own backend (flash
or memory-efficient on a GPU), recorded as ``kernel_source`` ``torch_sdpa``.

Writes ``attention_torch_<version>_context_attention_perf.csv`` and
``attention_torch_<version>_generation_attention_perf.csv`` in aiconfigurator's columns
(``batch_size``, ``isl`` / ``step``, ``num_heads``, ``num_key_value_heads``, ``head_dim``,
``kv_cache_dtype``, ``window_size`` 0, ``latency`` ms) and ``attention_trace.json``.

    python validation/collect/collect_attention.py --out validation/measured/h100-sxm
    python validation/collect/collect_attention.py --dry-run --out /tmp/attn-check
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_common as common  # noqa: E402

# (num_heads, num_key_value_heads, head_dim): Mixtral-8x7B, Qwen3-30B-A3B, Llama-4-Scout
GPU_HEADS = [(32, 8, 128), (32, 4, 128), (40, 8, 128)]
GPU_PREFILL = [(b, s) for b in (1, 4, 16) for s in (128, 512, 2048, 8192) if b * s <= 32768]
GPU_DECODE = [(b, s) for b in (1, 8, 32, 128) for s in (128, 1024, 4096, 16384) if b * s <= 524288]
DRY_HEADS, DRY_PREFILL, DRY_DECODE = [(4, 2, 16)], [(1, 16)], [(2, 32)]


def _qkv(env, dtype, batch, q_len, kv_len, heads, kv_heads, head_dim):
    q = torch.randn(batch, heads, q_len, head_dim, device=env.device, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=env.device, dtype=dtype)
    return q, k, torch.randn_like(k)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bfloat16")
    args = p.parse_args(argv)
    env = common.setup(args)
    dtype = common.DTYPES[args.dtype]
    heads_list = DRY_HEADS if env.dry_run else GPU_HEADS
    prefill, decode = [], []
    trace = env.out / "attention_trace.json"
    with common.profiled(env, trace) as prof:
        for heads, kv_heads, head_dim in heads_list:
            shape = {"num_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}
            for batch, isl in DRY_PREFILL if env.dry_run else GPU_PREFILL:
                q, k, v = _qkv(env, dtype, batch, isl, isl, heads, kv_heads, head_dim)
                call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)  # noqa: E731
                seconds = common.time_call(call, env)
                if prof is not None:
                    common.traced_calls(env, call, f"prefill b={batch} isl={isl} h={heads}/{kv_heads}")
                prefill.append(common.constants(env, "context_attention", "torch_sdpa")
                               | {"beam_width": 1, "attn_dtype": args.dtype, "step": 0, "batch_size": batch, "isl": isl}
                               | shape | {"kv_cache_dtype": args.dtype, "window_size": 0, "latency": seconds * 1e3})
            for batch, step in DRY_DECODE if env.dry_run else GPU_DECODE:
                q, k, v = _qkv(env, dtype, batch, 1, step, heads, kv_heads, head_dim)
                call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads)  # noqa: E731
                seconds = common.time_call(call, env)
                if prof is not None:
                    common.traced_calls(env, call, f"decode b={batch} step={step} h={heads}/{kv_heads}")
                decode.append(common.constants(env, "generation_attention", "torch_sdpa")
                              | {"isl": 1, "beam_width": 1, "attn_dtype": args.dtype, "batch_size": batch} | shape
                              | {"kv_cache_dtype": args.dtype, "step": step, "window_size": 0, "latency": seconds * 1e3})
    return {"prefill": common.write_table(common.table_path(env, "attention", "context_attention"), prefill),
            "decode": common.write_table(common.table_path(env, "attention", "generation_attention"), decode),
            "trace": trace if env.trace else None}


if __name__ == "__main__":
    for kind, path in main().items():
        print(f"{kind}: {path}")
