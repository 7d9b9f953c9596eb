"""Measure dense GEMMs ``[m, k] x [k, n]`` (torch.matmul) on this GPU.

Writes ``gemm_torch_<version>_gemm_perf.csv`` in aiconfigurator's GEMM columns (``gemm_dtype``,
``m``, ``n``, ``k``, ``latency`` ms) and ``gemm_trace.json``. The default ``(n, k)`` pairs are
the projections of Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 (attention and dense MLP); ``m``
sweeps tokens from 1 to 16384.

    python validation/collect/collect_gemm.py --out validation/measured/h100-sxm
    python validation/collect/collect_gemm.py --dry-run --out /tmp/gemm-check
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_common as common  # noqa: E402

GPU_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# (n, k): Mixtral-8x7B q/o (4096, 4096) and kv (1024, 4096), Qwen3-30B-A3B qkv (5120, 2048),
# DeepSeek-V3 dense MLP gate+up (36864, 7168) and down (7168, 18432)
GPU_NK = [(4096, 4096), (1024, 4096), (5120, 2048), (36864, 7168), (7168, 18432)]
DRY_M, DRY_NK = [1, 8], [(64, 32)]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", help=f"rows (tokens) per case (default {GPU_M})")
    p.add_argument("--nk", nargs="+", help="n,k pairs, e.g. 4096,4096 (default: model projections)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bfloat16")
    args = p.parse_args(argv)
    env = common.setup(args)
    ms = args.m or (DRY_M if env.dry_run else GPU_M)
    nks = [tuple(int(v) for v in pair.split(",")) for pair in args.nk] if args.nk else (DRY_NK if env.dry_run else GPU_NK)
    dtype = common.DTYPES[args.dtype]
    rows = []
    trace = env.out / "gemm_trace.json"
    with common.profiled(env, trace) as prof:
        for n, k in nks:
            b = torch.randn(k, n, device=env.device, dtype=dtype)
            for m in ms:
                a = torch.randn(m, k, device=env.device, dtype=dtype)
                out = torch.empty(m, n, device=env.device, dtype=dtype)
                call = lambda: torch.matmul(a, b, out=out)  # noqa: E731
                seconds = common.time_call(call, env)
                if prof is not None:
                    common.traced_calls(env, call, f"gemm m={m} n={n} k={k}")
                rows.append(common.constants(env, "gemm", "torch_matmul")
                            | {"gemm_dtype": args.dtype, "m": m, "n": n, "k": k, "latency": seconds * 1e3})
    table = common.write_table(common.table_path(env, "gemm", "gemm"), rows)
    return {"table": table, "trace": trace if env.trace else None}


if __name__ == "__main__":
    for kind, path in main().items():
        print(f"{kind}: {path}")
