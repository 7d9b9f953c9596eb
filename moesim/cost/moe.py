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

def _tile_array(size: np.ndarray, largest: int, smallest: int) -> np.ndarray:
    """:func:`moesim.cost.gemm._tile` over an array of sizes."""
    exponent = np.ceil(np.log2(np.maximum(size, 1)))
    return np.clip(2.0**exponent, smallest, largest)


def _grouped(device, name: str, rows: np.ndarray, n: int, k: int, dtype: str, *, in_bytes: float, out_bytes: float,
             foreign_rows: np.ndarray) -> OpCost:
    """:func:`grouped_gemm` for a batch of ranks at once: ``rows`` is ``[ranks, experts]``,
    ``foreign_rows`` ``[ranks]``; the OpCost's fields are arrays over the ranks."""
    variant = dtype.lower()
    rows = rows.astype(np.float64)
    active = (rows > 0).sum(axis=1)
    total = rows.sum(axis=1)
    eff = device.efficiency
    block_m = _tile_array(np.ceil(total / np.maximum(active, 1)), eff.moe_tile_m, 16)
    padded = np.ceil(rows / block_m[:, None]) * block_m[:, None]
    block_n = _tile(n, eff.tile_n, 32)
    n_tiles = (padded / block_m[:, None]).sum(axis=1) * math.ceil(n / block_n)
    units = device.compute_units
    waves = np.maximum(np.ceil(n_tiles / units), 1)
    shape_eff = np.maximum(n_tiles, 1) / (waves * units) * (k / (k + eff.k_half))
    act_dtype = "bf16" if canonical_dtype(variant) in ("int4", "fp4") else canonical_dtype(variant)
    flops = 2.0 * padded.sum(axis=1) * n * k
    bytes_moved = active * n * k * weight_bytes_per_param(variant) + total * (k * in_bytes + n * out_bytes)
    cost = kernel(
        device, name, flops, bytes_moved, act_dtype,
        compute_efficiency=eff.moe_compute_for(variant, canonical_dtype(variant)) * shape_eff,
        memory_efficiency=eff.moe_memory_for(variant, canonical_dtype(variant)),
    )
    empty = np.ceil(foreign_rows / block_m) * math.ceil(n / block_n) * eff.moe_empty_block
    idle = active == 0  # experts with no rows cost nothing: their weights are not read
    cost.time = np.where(idle, 0.0, cost.time + empty)
    cost.launch_time = np.where(idle, 0.0, cost.launch_time + empty)
    for field in ("compute_time", "memory_time"):
        setattr(cost, field, np.where(idle, 0.0, getattr(cost, field)))
    cost.bytes = np.where(idle, 0.0, cost.bytes)
    cost.flops = 2.0 * total * n * k  # useful work; padding only costs time
    cost.info = {"experts": active, "rows": total.astype(np.int64), "block_m": block_m.astype(np.int64)}
    return cost


def _first(cost: OpCost) -> OpCost:
    """The OpCost of the first rank of an array-valued one, with plain float fields."""
    fields = {f: float(np.asarray(getattr(cost, f)).reshape(-1)[0]) for f in
              ("time", "compute_time", "memory_time", "launch_time", "comm_time", "flops", "bytes")}
    info = {key: (np.asarray(v).reshape(-1)[0].item() if isinstance(v, np.ndarray) else v) for key, v in cost.info.items()}
    return OpCost(name=cost.name, parts=[_first(p) for p in cost.parts], info=info, **fields)


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
    cost = _grouped(device, name, np.asarray(rows)[None, :], n, k, dtype, in_bytes=in_bytes, out_bytes=out_bytes,
                    foreign_rows=np.array([foreign_rows], dtype=np.float64))
    cost = _first(cost)
    return cost if cost.time else OpCost(name=name, time=0.0)


def _moe_parts(device, local: np.ndarray, foreign: np.ndarray, tokens: np.ndarray, *, num_experts: int, hidden: int,
               shard: int, top_k: int, dtype: str, gated: bool) -> list[OpCost]:
    """The kernels after the router of one MoE layer on a batch of ranks: ``local`` is
    ``[ranks, local experts]`` token rows, ``foreign`` and ``tokens`` ``[ranks]``."""
    act = canonical_dtype(dtype)
    act = "bf16" if act in ("int4", "fp4") else act
    a_bytes = dtype_bytes(act)
    slots = tokens * top_k
    up_n = 2 * shard if gated else shard
    rows = local.sum(axis=1).astype(np.float64)
    parts = [elementwise(device, "topk", tokens * num_experts, "fp32", reads=1, writes=0, flops_per_element=2)]
    # Sorting slots by expert: an id and a position read and written per slot.
    parts.append(kernel(device, "align", slots, slots * 16.0, "fp32", compute_efficiency=1.0))
    parts.append(_grouped(device, "gate_up", local, up_n, hidden, dtype, in_bytes=a_bytes, out_bytes=2.0, foreign_rows=foreign))
    activation = elementwise(device, "activation", rows * shard, "bf16", reads=2 if gated else 1, writes=1, flops_per_element=4)
    activation.time = np.where(rows > 0, activation.time, 0.0)
    parts.append(activation)
    parts.append(_grouped(device, "down", local, hidden, shard, dtype, in_bytes=2.0, out_bytes=2.0, foreign_rows=foreign))
    parts.append(elementwise(device, "combine", tokens * hidden, "bf16", reads=top_k, writes=1, flops_per_element=top_k))
    return parts


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
    parts: list[OpCost] = []
    if router:
        parts.append(gemm_time(device, tokens, num_experts, hidden, "bf16", name="router"))
    rest = _moe_parts(device, local[None, :], np.array([float(counts.sum() - local.sum())]), np.array([float(tokens)]),
                      num_experts=num_experts, hidden=hidden, shard=inter // expert_tp, top_k=top_k, dtype=dtype, gated=gated)
    parts += [_first(p) for p in rest]
    return combine(
        "moe", [p for p in parts if p.time > 0],
        tokens=tokens, local_experts=per_rank, active_local_experts=int((local > 0).sum()),
        local_slots=int(local.sum()), max_expert_tokens=int(local.max()) if local.size else 0,
    )


def expert_times(device, local: np.ndarray, *, hidden: int, inter: int, dtype: str = "bf16", expert_tp: int = 1,
                 gated: bool = True, tokens: np.ndarray | None = None, top_k: int = 1) -> np.ndarray:
    """Seconds each of a batch of ranks spends on the routed experts it holds, from ``local``:
    ``[..., local experts]`` token rows (any leading shape), as :func:`moe_layer_time` with
    ``router=False``, which it equals element by element.

    By default each rank computes only the slots it received (DeepEP-style dispatch:
    ``tokens`` = its slots, ``top_k=1``); a rank that holds every expert and sees its own
    ``tokens`` (no expert parallelism) passes them with the model's ``top_k``."""
    local = np.asarray(local)
    flat = local.reshape(-1, local.shape[-1])
    if tokens is None:
        tokens = np.maximum(flat.sum(axis=1), 1).astype(np.float64)
    else:
        tokens = np.broadcast_to(np.asarray(tokens, dtype=np.float64), local.shape[:-1]).reshape(-1)
    parts = _moe_parts(device, flat, np.zeros(flat.shape[0]), tokens, num_experts=flat.shape[1], hidden=hidden,
                       shard=inter // expert_tp, top_k=top_k, dtype=dtype, gated=gated)
    return sum(np.broadcast_to(p.time, tokens.shape) for p in parts).reshape(local.shape[:-1])
