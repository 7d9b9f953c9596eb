"""Time of one MoE layer on one device, from the tokens each of its experts received.

The layer is the sequence of kernels a fused MoE implementation (vLLM / SGLang ``fused_moe``,
Megatron grouped GEMM) runs on an expert-parallel rank:

1. router GEMM ``[tokens, hidden] x [hidden, experts]`` (optional: measured tables start
   after it),
2. top-k over the router scores,
3. sort / align: token slots grouped by expert and padded to the GEMM's row block,
4. gate+up grouped GEMM over the *local* experts that received tokens: only their weights are
   read, and each expert's rows are padded to the row block,
5. the gated activation (SiLU x up),
6. down grouped GEMM,
7. weighted sum of each token's ``top_k`` outputs (unpermute).

Under expert parallelism the rank receives every routed slot but computes only the slots of its
own experts; the slots of foreign experts still cost sort and early-exit work, which the device
profile's ``moe_empty_block`` carries. ``expert_tp`` shards every expert's intermediate size.
"""

from __future__ import annotations

import math

import numpy as np

from moesim.cost.gemm import _tile, gemm_time, wave_efficiency
from moesim.cost.roofline import OpCost, combine, elementwise, kernel
from moesim.dtypes import canonical_dtype, dtype_bytes, weight_bytes_per_param

def grouped_gemm(
    device,
    name: str,
    rows: np.ndarray,
    n: int,
    k: int,
    dtype: str,
    *,
    in_bytes: float,
    out_bytes: float,
    foreign_rows: int = 0,
) -> OpCost:
    """One grouped GEMM: expert ``e`` multiplies ``rows[e]`` token rows ``[rows[e], k]`` by its
    own ``[k, n]`` weight. Experts with no rows cost nothing (their weights are not read);
    ``foreign_rows`` routed to other ranks' experts cost an empty block per row block."""
    variant = dtype.lower()
    active = rows[rows > 0]
    if active.size == 0:
        return OpCost(name=name, time=0.0)
    eff = device.efficiency
    block_m = _tile(int(np.ceil(active.mean())), eff.moe_tile_m, 16)
    padded = np.ceil(active / block_m) * block_m
    block_n = _tile(n, eff.tile_n, 32)
    tiles = int((padded / block_m).sum()) * math.ceil(n / block_n)
    shape_eff = wave_efficiency(tiles, device.compute_units) * (k / (k + eff.k_half))
    act_dtype = "bf16" if canonical_dtype(variant) in ("int4", "fp4") else canonical_dtype(variant)
    flops = 2.0 * float(padded.sum()) * n * k
    bytes_moved = active.size * n * k * weight_bytes_per_param(variant) + float(active.sum()) * (k * in_bytes + n * out_bytes)
    cost = kernel(
        device, name, flops, bytes_moved, act_dtype,
        compute_efficiency=eff.moe_compute_for(variant, canonical_dtype(variant)) * shape_eff,
        memory_efficiency=eff.moe_memory_for(variant, canonical_dtype(variant)),
    )
    empty = math.ceil(foreign_rows / block_m) * math.ceil(n / block_n) * eff.moe_empty_block
    cost.time += empty
    cost.launch_time += empty
    cost.flops = 2.0 * float(active.sum()) * n * k  # useful work; padding only costs time
    cost.info = {"experts": int(active.size), "rows": int(active.sum()), "block_m": block_m}
    return cost


def moe_layer_time(
    device,
    tokens_per_expert: np.ndarray,
    *,
    tokens: int,
    hidden: int,
    inter: int,
    top_k: int,
    dtype: str = "bf16",
    ep: int = 1,
    ep_rank: int = 0,
    expert_tp: int = 1,
    gated: bool = True,
    router: bool = True,
) -> OpCost:
    """Time of one MoE layer on EP rank ``ep_rank``.

    ``tokens_per_expert`` has one entry per (global) expert; experts are laid out contiguously,
    ``num_experts / ep`` per rank. ``tokens`` is how many tokens this rank's layer receives
    (all of them for vLLM-style EP, where every rank sees the batch). ``inter`` is the full
    intermediate size of one expert, cut by ``expert_tp``. ``dtype`` is the expert weight dtype
    or kernel variant ('bf16', 'fp8', 'fp8_block', 'int4_wo').
    """
    counts = np.asarray(tokens_per_expert, dtype=np.int64)
    num_experts = counts.size
    if num_experts % ep:
        raise ValueError(f"EP {ep} does not divide {num_experts} experts")
    if inter % expert_tp:
        raise ValueError(f"expert TP {expert_tp} does not divide intermediate size {inter}")
    per_rank = num_experts // ep
    local = counts[ep_rank * per_rank : (ep_rank + 1) * per_rank]
    shard = inter // expert_tp
    act = canonical_dtype(dtype)
    act = "bf16" if act in ("int4", "fp4") else act
    a_bytes = dtype_bytes(act)
    slots = tokens * top_k
    up_n = 2 * shard if gated else shard
    parts: list[OpCost] = []
    if router:
        parts.append(gemm_time(device, tokens, num_experts, hidden, "bf16", name="router"))
    parts.append(elementwise(device, "topk", tokens * num_experts, "fp32", reads=1, writes=0, flops_per_element=2))
    # Sorting slots by expert: an id and a position read and written per slot.
    parts.append(kernel(device, "align", slots, slots * 16.0, "fp32", compute_efficiency=1.0))
    rows = int(local.sum())
    foreign = int(counts.sum()) - rows
    parts.append(grouped_gemm(device, "gate_up", local, up_n, hidden, dtype, in_bytes=a_bytes, out_bytes=2.0, foreign_rows=foreign))
    if rows:
        parts.append(elementwise(device, "activation", rows * shard, "bf16", reads=2 if gated else 1, writes=1, flops_per_element=4))
    parts.append(grouped_gemm(device, "down", local, hidden, shard, dtype, in_bytes=2.0, out_bytes=2.0, foreign_rows=foreign))
    parts.append(elementwise(device, "combine", tokens * hidden, "bf16", reads=top_k, writes=1, flops_per_element=top_k))
    return combine(
        "moe", [p for p in parts if p.time > 0],
        tokens=tokens, local_experts=per_rank, active_local_experts=int((local > 0).sum()),
        local_slots=rows, max_expert_tokens=int(local.max()) if local.size else 0,
    )
