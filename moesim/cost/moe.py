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
from collections import namedtuple

import numba
import numpy as np

from moesim.cost.gemm import gemm_time
from moesim.cost.roofline import OpCost, combine, roofline
from moesim.dtypes import canonical_dtype, dtype_bytes, weight_bytes_per_param

# The device numbers the compiled MoE loop reads (one tuple per device and expert dtype).
_MoeDevice = namedtuple("_MoeDevice", "launch p latency stream vector_rate moe_rate moe_stream tile_m tile_n k_half units "
                                      "empty_block weight_bytes act_bytes")

_PARTS = ("topk", "align", "gate_up", "activation", "down", "combine")
_FIELDS = ("time", "compute_time", "memory_time", "launch_time", "flops", "bytes")


def _moe_device(device, dtype: str) -> _MoeDevice:
    eff = device.efficiency
    variant = dtype.lower()
    canon = canonical_dtype(variant)
    act = "bf16" if canon in ("int4", "fp4", "int3", "int2") else canon  # weight-only formats compute in bf16
    stream = device.memory.bandwidth * eff.memory
    return _MoeDevice(
        float(device.launch_overhead), float(eff.roofline_p), float(eff.memory_latency), float(stream),
        # element-wise kernels run on the vector units: the fp32 peak, as roofline.elementwise rates them
        float(device.peak_flops("fp32")),
        float(device.peak_flops(act) * eff.moe_compute_for(variant, canon)),
        float(stream * eff.moe_memory_for(variant, canon)),
        float(eff.moe_tile_m), float(eff.tile_n), float(eff.k_half), float(device.compute_units), float(eff.moe_empty_block),
        float(weight_bytes_per_param(variant)), float(dtype_bytes(act)))


@numba.njit(inline="always", cache=True)
def _tile_edge(size, largest, smallest):
    """:func:`moesim.cost.gemm._tile`: the next power of two, clamped."""
    mantissa, exponent = math.frexp(max(math.ceil(size), 1.0))  # size = mantissa * 2**exponent, mantissa in [0.5, 1)
    return min(max(math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent), smallest), largest)


@numba.njit(inline="always", cache=True)
def _vector_kernel(flops, bytes_moved, d, out):
    """A kernel on the vector units at full rate (top-k, sort, element-wise): writes its
    :data:`_FIELDS` into ``out``."""
    compute, memory, body = roofline(flops, bytes_moved, d.vector_rate, d.stream, d.latency, d.p)
    out[0], out[1], out[2], out[3], out[4], out[5] = d.launch + body, compute, memory, d.launch, flops, bytes_moved


@numba.njit(inline="always", cache=True)
def _grouped_core(rows, foreign, n, k, in_bytes, out_bytes, d, out):
    """One grouped GEMM: expert ``e`` multiplies ``rows[e]`` token rows ``[rows[e], k]`` by its
    own ``[k, n]`` weight, each expert's rows padded to the row block. Experts with no rows cost
    nothing (their weights are not read); ``foreign`` rows routed to other ranks' experts cost an
    empty block per row block. Writes :data:`_FIELDS` (flops: useful work; padding only costs
    time) into ``out``; returns (experts with rows, rows, row block)."""
    active, total = 0, 0.0
    for r in rows:
        if r > 0:
            active += 1
            total += r
    out[:] = 0.0
    if active == 0:
        return 0.0, 0.0, 0.0
    block_m = _tile_edge(math.ceil(total / active), d.tile_m, 16.0)
    n_blocks = math.ceil(n / _tile_edge(n, d.tile_n, 32.0))
    row_blocks = 0.0
    for r in rows:
        row_blocks += math.ceil(r / block_m)
    n_tiles = row_blocks * n_blocks
    waves = max(math.ceil(n_tiles / d.units), 1.0)
    shape_eff = max(n_tiles, 1.0) / (waves * d.units) * (k / (k + d.k_half))
    flops = 2.0 * row_blocks * block_m * n * k
    bytes_moved = active * n * k * d.weight_bytes + total * (k * in_bytes + n * out_bytes)
    compute, memory, body = roofline(flops, bytes_moved, d.moe_rate * shape_eff, d.moe_stream, d.latency, d.p)
    empty = math.ceil(foreign / block_m) * n_blocks * d.empty_block
    out[0], out[1], out[2], out[3] = d.launch + body + empty, compute, memory, d.launch + empty
    out[4], out[5] = 2.0 * total * n * k, bytes_moved
    return float(active), total, block_m


@numba.njit(inline="always", cache=True)
def _moe_rank(local, foreign, t, num_experts, hidden, shard, top_k, gated, d, parts, info):
    """The kernels after the router of one MoE layer on one rank, from ``local`` token rows per
    local expert, ``foreign`` rows of other ranks' experts and ``t`` tokens: writes each part's
    :data:`_FIELDS` into ``parts`` ``[parts, fields]`` and the grouped GEMMs' (experts, rows,
    row block) into ``info`` ``[2, 3]``."""
    parts[:] = 0.0
    slots = t * top_k
    rows = local.sum()
    _vector_kernel(2.0 * t * num_experts, 4.0 * t * num_experts, d, parts[0])  # fp32 scores read once
    _vector_kernel(slots, 16.0 * slots, d, parts[1])  # sort: an id and a position read and written per slot
    up_n = 2 * shard if gated else shard
    info[0, 0], info[0, 1], info[0, 2] = _grouped_core(local, foreign, up_n, hidden, d.act_bytes, 2.0, d, parts[2])
    if rows > 0:  # SiLU(gate) x up in bf16: both halves read when gated
        elements = rows * shard
        _vector_kernel(4.0 * elements, 2.0 * elements * (3.0 if gated else 2.0), d, parts[3])
    info[1, 0], info[1, 1], info[1, 2] = _grouped_core(local, foreign, hidden, shard, 2.0, 2.0, d, parts[4])
    # unpermute: each token's top_k bf16 outputs read, weighted and summed
    _vector_kernel(top_k * t * hidden, 2.0 * t * hidden * (top_k + 1), d, parts[5])


@numba.njit(cache=True)
def _moe_core(local, foreign, tokens, num_experts, hidden, shard, top_k, gated, d):
    """:func:`_moe_rank` for each of a batch of ranks (``local`` ``[ranks, local experts]``,
    ``foreign`` and ``tokens`` ``[ranks]``): ``[ranks, parts, fields]`` and ``[ranks, 2, 3]``."""
    ranks = local.shape[0]
    parts = np.zeros((ranks, len(_PARTS), len(_FIELDS)))
    info = np.zeros((ranks, 2, 3))
    for i in range(ranks):
        _moe_rank(local[i], foreign[i], tokens[i], num_experts, hidden, shard, top_k, gated, d, parts[i], info[i])
    return parts, info


@numba.njit(cache=True)
def _moe_times(local, tokens, num_experts, hidden, shard, top_k, gated, d):
    """Seconds of :func:`_moe_rank` for each rank (nothing foreign), without the breakdown."""
    ranks = local.shape[0]
    times = np.empty(ranks)
    parts, info = np.empty((len(_PARTS), len(_FIELDS))), np.empty((2, 3))
    for i in range(ranks):
        _moe_rank(local[i], 0.0, tokens[i], num_experts, hidden, shard, top_k, gated, d, parts, info)
        times[i] = parts[:, 0].sum()
    return times


def _moe_parts(device, local: np.ndarray, foreign: np.ndarray, tokens: np.ndarray, *, num_experts: int, hidden: int,
               shard: int, top_k: int, dtype: str, gated: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_moe_core` on one device for an expert dtype (``local``: ``[ranks, local experts]``)."""
    return _moe_core(np.ascontiguousarray(local, dtype=np.float64), np.asarray(foreign, dtype=np.float64),
                     np.asarray(tokens, dtype=np.float64), float(num_experts), float(hidden), float(shard), float(top_k),
                     bool(gated), _moe_device(device, dtype))


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
    fields, info = _moe_parts(device, local[None, :], [counts.sum() - local.sum()], [tokens], num_experts=num_experts,
                              hidden=hidden, shard=inter // expert_tp, top_k=top_k, dtype=dtype, gated=gated)
    grouped = {"gate_up": info[0, 0], "down": info[0, 1]}
    for name, values in zip(_PARTS, fields[0]):
        extra = grouped.get(name)
        parts.append(OpCost(name=name, **dict(zip(_FIELDS, values.tolist())),
                            info={} if extra is None else dict(zip(("experts", "rows", "block_m"), map(int, extra)))))
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
    times = _moe_times(np.ascontiguousarray(flat, dtype=np.float64), np.ascontiguousarray(tokens), float(flat.shape[1]),
                       float(hidden), float(inter // expert_tp), float(top_k), bool(gated), _moe_device(device, dtype))
    return times.reshape(local.shape[:-1])
