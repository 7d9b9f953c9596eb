"""Attention core time (the fused attention kernel, without the QKV / output projections).

Prefill (context) attention is compute-bound for long prompts: causal FLOP are
``4 * batch * heads * head_dim * sum_i min(i + 1, window)``: QK^T and PV each 2 FLOP per
multiply-add, over the keys each query sees. Decode attention is memory-bound: every step reads
the whole KV cache of each sequence.

Multi-head latent attention (DeepSeek-V2/V3) keeps one compressed latent of
``kv_lora_rank + qk_rope_head_dim`` per token shared by all heads. Decode runs "absorbed" (the
up-projections folded into the query and output), so each head attends over the latent:
QK over ``kv_lora + rope`` and PV over ``kv_lora``. Prefill runs un-absorbed, with per-head
keys of ``qk_nope + qk_rope`` and values of ``v_head_dim``.
"""

from __future__ import annotations

import numba
import numpy as np

from moesim.cost.roofline import OpCost, kernel, roofline
from moesim.dtypes import dtype_bytes
from moesim.routing.stream import PAIRWISE_MAX, _pairwise_sum

_MLA_HEAD_TILE = 64
_KEY_BLOCK = 128  # keys per block of flash-attention's decode loop (FlashAttention-3 on Hopper)


def _keys_seen(seq: int, window: int | None, block: int = 128) -> float:
    """Query-key pairs a causal prompt of ``seq`` tokens computes. Flash-attention works in
    key blocks of ``block``, so a sliding window of ``window`` costs about ``window + block``
    keys per query, not ``window``."""
    span = (window + block) if window else seq
    if seq <= 0:
        return 0.0
    if span >= seq:
        return seq * (seq + 1) / 2.0
    return span * (span + 1) / 2.0 + (seq - span) * span


def prefill_attention_time(
    device,
    batch: int,
    seq: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    window: int | None = None,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    v_head_dim: int | None = None,
    efficiency: float | None = None,
    context: int = 0,
    tiles: bool = True,
    name: str = "attention_prefill",
) -> OpCost:
    """Causal self-attention over ``batch`` prompts of ``seq`` tokens (heads already divided by
    TP). ``v_head_dim`` differs from ``head_dim`` in un-absorbed MLA. A chunk of a longer prompt
    (chunked prefill) sits after ``context`` tokens already in the cache: its queries also see
    those keys, which are read from the cache. ``tiles=False`` keeps the plain FLOP model where
    the profile has ``prefill_tile`` (a kernel whose tiles are not FlashAttention's). An fp8
    ``kv_dtype`` costs the tiled kernel ``prefill_fp8_block`` per key block."""
    v_dim = v_head_dim or head_dim
    eff = device.efficiency
    if tiles and eff.prefill_tile and seq == 1 and v_dim == head_dim:
        # vLLM classes a one-token query as a decode and FlashAttention runs it on the decode grid
        # (one CTA per (sequence, KV head), keys split): the measured one-token prompts cost what
        # a decode step over the same keys does, not a prefill tile
        cost = decode_attention_time(device, batch, context + 1, num_heads, num_kv_heads, head_dim, window=window,
                                     kv_dtype=kv_dtype, name=name)
        cost.info = {"batch": batch, "seq": seq, "context": context, "heads": num_heads, "kv_heads": num_kv_heads,
                     "window": window}
        return cost
    pairs = batch * num_heads * (_keys_seen(context + seq, window) - _keys_seen(context, window))
    flops = 2.0 * pairs * (head_dim + v_dim)
    size = dtype_bytes(dtype)
    tokens = batch * seq
    keys = batch * (context + seq)
    bytes_moved = size * (tokens * num_heads * (head_dim + v_dim) + keys * num_kv_heads * (head_dim + v_dim))
    peak_share = eff.attention_prefill if efficiency is None else efficiency
    if tiles and eff.prefill_tile and flops > 0:
        busy = _tiled_prefill_time(device, batch, seq, num_heads, num_kv_heads, head_dim + v_dim, window, context,
                                   peak_share, "fp8" in kv_dtype.lower())
        share = flops / (device.peak_flops("bf16") * busy)
    else:
        share = peak_share * _fill(device, batch * num_heads, seq)
    cost = kernel(device, name, flops, bytes_moved, "bf16", compute_efficiency=share)
    _add_overhead(device, cost)
    cost.info = {"batch": batch, "seq": seq, "context": context, "heads": num_heads, "kv_heads": num_kv_heads, "window": window}
    return cost


def _add_overhead(device, cost: OpCost) -> None:
    cost.time += device.efficiency.attention_overhead
    cost.launch_time += device.efficiency.attention_overhead


def _tiled_prefill_time(device, batch: int, seq: int, heads: int, kv_heads: int, dims: int, window: int | None,
                        context: int, peak_share: float, fp8: bool = False) -> float:
    """Compute seconds of a flash-attention prefill grid: CTAs of ``prefill_tile`` query rows
    (``prefill_rows`` where the head dim tiles otherwise), each running whole key blocks of
    ``prefill_tile`` keys up to its last query (causal, from its first query's window start),
    masked keys computed all the same, and its valid rows in whole 64-row warpgroup MMAs (a tile
    of 16 query rows costs half a 128-row one, as measured); ``dims`` is the QK plus PV head
    dims. A prompt shorter than a tile packs the query heads sharing a KV head into one tile
    (FlashAttention-3's packed GQA), so a CTA is one (sequence, KV head). The grid runs over
    the compute units, each CTA adding ``prefill_cta``; it takes at least its longest CTA's key
    loop (a lone CTA's fixed part overlaps the kernels around it: the short prompts sit at
    decode's floor). A key block costs a CTA the longer of its tensor-core FLOP and its softmax,
    ``prefill_pair`` per (query, key) score (the exponentials run at a fixed rate per score
    whatever the head dim, and overlap another block's MMAs: head dim 128 is tensor-core bound,
    64 softmax bound, measured 683 and 500 TFLOPS at long prompts), plus, ``fp8``,
    ``prefill_fp8_block`` (an fp8 cache's blocks are rescaled and V transposed in shared
    memory)."""
    eff = device.efficiency
    rows = eff.prefill_rows.get(str(dims // 2), eff.prefill_tile)  # query rows per CTA at this head dim
    sm_rate = device.peak_flops("bf16") * peak_share / device.compute_units
    times, total, longest, units = _prefill_tiles(seq, heads, kv_heads, dims, window or 0, context, rows,
                                                  eff.prefill_tile, sm_rate, eff.prefill_pair,
                                                  eff.prefill_fp8_block if fp8 else 0.0)
    if total != total:  # more tiles than the compiled pairwise sum covers: NumPy adds them
        total = float(times.sum())
    ctas = batch * units * times.size
    average = (batch * units * total + ctas * eff.prefill_cta) / device.compute_units
    return max(average, longest)


@numba.njit(cache=True)
def _prefill_tiles(seq, heads, kv_heads, dims, window, context, rows, tile, sm_rate, pair, fp8_block):
    """One CTA's seconds per query tile of :func:`_tiled_prefill_time` (``window`` 0: none),
    their sum in NumPy's order (NaN past ``PAIRWISE_MAX`` tiles), the longest, and the CTAs a
    tile takes per sequence (heads, or KV heads when packed). A compiled loop over the tiles,
    integer where NumPy's arrays were, so the seconds are NumPy's bit for bit at a fraction of
    the per-call cost (the simulator costs thousands of (chunk, context) pairs a run)."""
    group = max(1, heads // max(kv_heads, 1))
    packed = group > 1 and seq < rows
    per_tile = max(1, rows // group) if packed else rows  # query tokens one CTA covers
    packs = group if packed else 1
    times = np.empty(-(-seq // per_tile))
    longest = 0.0
    for i in range(times.size):
        start = i * per_tile + context  # the tile's first query, after the cached context
        end = min(start + per_tile, context + seq)  # one past its last query: its causal key end
        first = max(0, start - window) if window else 0
        blocks = -(-end // tile) - first // tile
        # rows a CTA computes: its valid query rows (times the packed heads) in whole 64-row warpgroup MMAs
        used = min(rows, -(-(end - start) * packs // 64) * 64)
        tile_flops = 2.0 * used * tile * dims * blocks  # QK^T and PV over whole (rows x tile) blocks
        # the softmax of one block overlaps the tensor cores' work on another (FlashAttention-3's ping-pong)
        times[i] = max(tile_flops / sm_rate, blocks * used * tile * pair) + blocks * fp8_block
        longest = max(longest, times[i])
    total = _pairwise_sum(times, 0, times.size) if times.size <= PAIRWISE_MAX else np.nan
    return times, total, longest, kv_heads if packed else heads


def _fill(device, heads_times_batch: int, seq: int, block: int = 128) -> float:
    """Fraction of compute units a flash-attention grid of (batch x heads x query blocks)
    keeps busy, averaged over waves."""
    blocks = heads_times_batch * max(1, -(-seq // block))
    units = device.compute_units
    waves = -(-blocks // units)
    return blocks / (waves * units)


def decode_attention_time(
    device,
    batch: int,
    kv_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    window: int | None = None,
    kv_dtype: str = "bf16",
    name: str = "attention_decode",
) -> OpCost:
    """One decode step: ``batch`` sequences, one new query token each, over ``kv_len`` cached
    tokens (capped at ``window`` for sliding layers). ``batch`` and ``kv_len`` may be arrays of
    equal shape (one decode batch each); ``time`` is then an array."""
    if _compiled(batch, kv_len):
        kv_size = dtype_bytes(kv_dtype)
        cost = _decode_many(device, name, batch, kv_len, kv_size, _kv_key("", kv_dtype), head_dim,
                            (0, num_heads, num_kv_heads, head_dim, window or 0, kv_size, 0, 0),
                            device.efficiency.decode_block > 0)
        cost.info = {"batch": batch, "kv_len": kv_len, "heads": num_heads, "kv_heads": num_kv_heads, "window": window}
        return cost
    keys = np.minimum(kv_len, window) if window else kv_len
    flops = 4.0 * batch * num_heads * keys * head_dim
    kv_bytes = batch * keys * 2 * num_kv_heads * head_dim * dtype_bytes(kv_dtype)
    q_out = batch * num_heads * head_dim * 2 * 2.0
    # key blocks a CTA walks: a sliding window ending past it straddles one block more than it fills
    blocks = -(-np.asarray(kv_len) // _KEY_BLOCK)
    if window:
        blocks = np.minimum(blocks, -(-window // _KEY_BLOCK) + 1)
    cost = _decode_kernel(device, name, flops, kv_bytes + q_out, batch * num_kv_heads, keys, head_dim=head_dim,
                          blocks=blocks)
    _add_dequant(device, cost, _kv_key("", kv_dtype), batch * keys * 2 * num_kv_heads * head_dim)
    cost.info = {"batch": batch, "kv_len": kv_len, "heads": num_heads, "kv_heads": num_kv_heads, "window": window}
    return cost


def _decode_kernel(device, name: str, flops: float, bytes_moved: float, groups: int, keys: int,
                   compute_efficiency: float | None = None, head_dim: int = 0, blocks=None) -> OpCost:
    """Decode attention streams the KV cache; with few (sequence, KV head) groups the kernel
    splits the keys (flash-decoding) but short caches still leave units idle. Each group is a
    work unit with a cost of its own (``decode_per_sequence``: its first key block, block-table
    lookups, the split-K reduction), which sets the step at large batch and short caches; it
    grows with ``head_dim`` by ``decode_per_dim`` per element (0 for MLA's head tiles).

    With ``blocks`` (key blocks per group) and a profile's ``decode_block``, the grid is
    FlashAttention-3's instead (see :func:`_fa3_splits`): each CTA walks its share of the key
    blocks at ``decode_block`` a block, the work units and blocks spread over the compute units
    overlap with the KV stream as compute does, and a split grid adds its combine kernel."""
    eff = device.efficiency
    if compute_efficiency is None:
        compute_efficiency = eff.attention_prefill if eff.decode_compute is None else eff.decode_compute
    units = groups * (eff.decode_per_sequence + head_dim * eff.decode_per_dim)
    if blocks is not None and eff.decode_block:
        sms = device.compute_units
        splits = _fa3_splits(groups, blocks, sms, eff.decode_max_splits)
        per_cta = -(-blocks // splits) * eff.decode_block
        work = units + groups * splits * per_cta / sms
        arithmetic = flops / (device.peak_flops("bf16") * compute_efficiency)
        # an empty replica (no sequences) is busy for no time: its share is 0, not 0 / 0
        busy = np.maximum(np.maximum(np.maximum(arithmetic, work), per_cta), 1e-18)
        cost = kernel(device, name, flops, bytes_moved, "bf16", compute_efficiency=flops / (device.peak_flops("bf16") * busy),
                      memory_efficiency=eff.attention_decode)
        combine = np.where(splits > 1, device.launch_overhead, 0.0)
        cost.time = cost.time + combine
        cost.launch_time = cost.launch_time + combine
        _add_overhead(device, cost)
        return cost
    # np.maximum / np.minimum: ``groups`` and ``keys`` may be arrays (one entry per DP replica)
    splits = np.maximum(1, np.minimum(-(-keys // 256), -(-device.compute_units // np.maximum(groups, 1))))
    busy = np.minimum(1.0, groups * splits / device.compute_units)
    cost = kernel(device, name, flops, bytes_moved, "bf16", compute_efficiency=compute_efficiency,
                  memory_efficiency=eff.attention_decode * np.maximum(busy, 0.05))
    _add_overhead(device, cost)
    cost.time = cost.time + units
    cost.launch_time = cost.launch_time + units
    return cost


def _fa3_splits(groups, blocks, sms: int, cap: int):
    """Splits of the keys FlashAttention-3's heuristic picks per (sequence, KV head) group:
    none when the groups nearly fill the compute units (80%), else the fewest splits (at most
    ``cap`` and one per key block) whose wave efficiency is within 85% of the best. vLLM caps
    ``cap`` for its CUDA graphs (16)."""
    groups = np.asarray(groups, dtype=np.float64)[..., None]
    limit = np.minimum(np.asarray(blocks)[..., None], cap)
    candidates = np.arange(1, cap + 1)
    waves = groups * candidates / sms
    efficiency = np.where(candidates <= limit, waves / np.maximum(np.ceil(waves), 1.0), 0.0)  # 0 groups: 0
    good = efficiency >= 0.85 * efficiency.max(axis=-1, keepdims=True)
    splits = np.argmax(good, axis=-1) + 1
    return np.where(groups[..., 0] >= 0.8 * sms, 1, splits)


def _compiled(batch, kv_len) -> bool:
    """Whether a decode call takes the compiled element loop (:func:`_decode_many`): arrays of
    one shape and one dtype of the two it is compiled for. Scalars (``moesim estimate``, the
    CLI) keep the NumPy expressions, which are the loop's reference."""
    return (type(batch) is np.ndarray and type(kv_len) is np.ndarray and batch.ndim > 0
            and batch.shape == kv_len.shape and batch.dtype == kv_len.dtype and batch.dtype in (np.int64, np.float64))


def _decode_many(device, name: str, batch: np.ndarray, kv_len: np.ndarray, kv_size: float, dequant: str,
                 head_dim: int, shape: tuple, fa3: bool, compute_efficiency: float | None = None) -> OpCost:
    """:func:`decode_attention_time` (``shape[0]`` 0) or :func:`mla_decode_time` (1) over arrays,
    one compiled pass instead of some forty NumPy calls (the simulator costs every DP replica's
    decode batch each step; NumPy's per-call cost, not the arithmetic, was the time). ``shape``:
    (kind, heads, KV heads, head dim, window, KV bytes an element, latent, kv_lora rank); ``fa3``:
    FlashAttention-3's grid (:func:`_decode_kernel` with ``blocks``). Each element runs the
    NumPy path's operations in its order and types, so the seconds are its own bit for bit."""
    eff = device.efficiency
    if compute_efficiency is None:
        compute_efficiency = eff.attention_prefill if eff.decode_compute is None else eff.decode_compute
    peak = device.peak_flops("bf16")
    figures = eff.kv_dequant
    out = _decode_loop(batch.ravel(), kv_len.ravel(), shape, fa3, compute_efficiency, peak,
                       device.compute_units, eff.decode_max_splits, eff.decode_block,
                       eff.decode_per_sequence + head_dim * eff.decode_per_dim,
                       device.memory.bandwidth * eff.memory, eff.attention_decode, float(eff.memory_latency),
                       float(eff.roofline_p), 1 * device.launch_overhead, eff.attention_overhead,
                       figures.get(dequant, 0.0), figures.get(f"{dequant}_call", 0.0))
    if batch.ndim > 1:
        out = [x.reshape(batch.shape) for x in out]
    time, compute, memory, launch, flops, bytes_moved = out
    return OpCost(name=name, time=time, compute_time=compute, memory_time=memory, launch_time=launch,
                  flops=flops, bytes=bytes_moved)


@numba.njit(cache=True)
def _decode_loop(batch, kv_len, shape, fa3, compute_efficiency, peak, sms, cap, block_time, unit_time,
                 bandwidth, stream, latency, p, launch, overhead, per_element, per_call):
    """The element loop of :func:`_decode_many`: time, compute, memory and launch seconds,
    FLOP and bytes per element."""
    kind, heads, kv_heads, head_dim, window, kv_size, latent, lora = shape
    n = batch.size
    time, compute, memory = np.empty(n), np.empty(n), np.empty(n)
    launches, flops_out, bytes_out = np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        b, kv = batch[i], kv_len[i]
        if kind == 0:
            keys = min(kv, window) if window else kv
            flops = 4.0 * b * heads * keys * head_dim
            bytes_moved = b * keys * 2 * kv_heads * head_dim * kv_size + b * heads * head_dim * 2 * 2.0
            groups = b * kv_heads
            elements = b * keys * 2 * kv_heads * head_dim
            # key blocks a CTA walks: a sliding window ending past it straddles one block more than it fills
            blocks = -(-kv // _KEY_BLOCK)
            if window:
                blocks = min(blocks, -(-window // _KEY_BLOCK) + 1)
        else:
            keys = kv
            flops = 2.0 * b * heads * kv * (latent + lora)
            bytes_moved = b * kv * latent * kv_size + b * heads * (latent + lora) * 2.0
            groups = b * -(-heads // _MLA_HEAD_TILE)
            elements = b * kv * latent
            blocks = kv
        units = groups * unit_time
        if fa3:
            splits = _fa3_split(groups, blocks, sms, cap)
            per_cta = -(-blocks // splits) * block_time
            work = units + groups * splits * per_cta / sms
            arithmetic = flops / (peak * compute_efficiency)
            busy = max(max(max(arithmetic, work), per_cta), 1e-18)
            c, m, body = roofline(flops, bytes_moved, peak * (flops / (peak * busy)), bandwidth * stream, latency, p)
            combine = launch if splits > 1 else 0.0
            time[i] = launch + body + combine + overhead
            launches[i] = launch + combine + overhead
        else:
            spread = max(1, min(-(-keys // 256), -(-sms // max(groups, 1))))  # splits of the older model
            busy = min(1.0, groups * spread / sms)
            c, m, body = roofline(flops, bytes_moved, peak * compute_efficiency, bandwidth * (stream * max(busy, 0.05)),
                                  latency, p)
            time[i] = launch + body + overhead + units
            launches[i] = launch + overhead + units
        # adding a zero dequantisation leaves the (non-negative) seconds as they are
        extra = per_element * elements + per_call
        time[i] += extra
        compute[i], memory[i], flops_out[i], bytes_out[i] = c + extra, m, flops, bytes_moved
    return time, compute, memory, launches, flops_out, bytes_out


@numba.njit(inline="always", cache=True)
def _fa3_split(groups, blocks, sms, cap):
    """:func:`_fa3_splits` of one group count."""
    g = float(groups)
    best = 0.0
    for c in range(1, cap + 1):
        waves = g * c / sms
        if c <= min(blocks, cap):
            best = max(best, waves / max(np.ceil(waves), 1.0))
    if g >= 0.8 * sms:
        return 1
    for c in range(1, cap + 1):
        waves = g * c / sms
        if (waves / max(np.ceil(waves), 1.0) if c <= min(blocks, cap) else 0.0) >= 0.85 * best:
            return c
    return 1


def _kv_key(kernel: str, kv_dtype: str) -> str:
    """``kv_dequant``'s key for a kernel family ('' or 'mla') over a KV cache of ``kv_dtype``."""
    dtype = "fp8" if "fp8" in kv_dtype.lower() else kv_dtype.lower()
    return f"{kernel}_{dtype}" if kernel else dtype


def _add_dequant(device, cost: OpCost, key: str, elements) -> None:
    """A quantised KV cache is dequantised in the kernel: ``kv_dequant[key]`` seconds per cached
    element read plus ``kv_dequant[key + '_call']`` per call (FlashMLA's fp8 path on H100 is
    bound by this, not by the bytes it saves)."""
    figures = device.efficiency.kv_dequant
    extra = figures.get(key, 0.0) * elements + figures.get(f"{key}_call", 0.0)
    if np.any(extra):
        cost.time = cost.time + extra
        cost.compute_time = cost.compute_time + extra


def mla_decode_time(
    device,
    batch: int,
    kv_len: int,
    num_heads: int,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    *,
    kv_dtype: str = "bf16",
    name: str = "mla_decode",
) -> OpCost:
    """One absorbed-MLA decode step over ``kv_len`` cached latents (heads already divided by TP);
    ``batch`` and ``kv_len`` may be arrays, as for :func:`decode_attention_time`."""
    latent = kv_lora_rank + qk_rope_head_dim
    if _compiled(batch, kv_len):
        kv_size = dtype_bytes(kv_dtype)
        cost = _decode_many(device, name, batch, kv_len, kv_size, _kv_key("mla", kv_dtype), 0,
                            (1, num_heads, 0, 0, 0, kv_size, latent, kv_lora_rank), False,
                            device.efficiency.mla_decode)
        cost.info = {"batch": batch, "kv_len": kv_len, "heads": num_heads}
        return cost
    flops = 2.0 * batch * num_heads * kv_len * (latent + kv_lora_rank)
    bytes_moved = batch * kv_len * latent * dtype_bytes(kv_dtype) + batch * num_heads * (latent + kv_lora_rank) * 2.0
    # FlashMLA tiles the heads of one sequence 64 at a time: a tile is one work unit
    units = batch * -(-num_heads // _MLA_HEAD_TILE)
    cost = _decode_kernel(device, name, flops, bytes_moved, units, kv_len, device.efficiency.mla_decode)
    _add_dequant(device, cost, _kv_key("mla", kv_dtype), batch * kv_len * latent)
    cost.info = {"batch": batch, "kv_len": kv_len, "heads": num_heads}
    return cost


def mla_prefill_time(
    device,
    batch: int,
    seq: int,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    *,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    name: str = "mla_prefill",
) -> OpCost:
    """Un-absorbed MLA prefill: per-head keys of ``nope + rope``, values of ``v_head_dim``. An fp8
    KV cache adds its per-call cost (the prompt's keys are written quantised)."""
    cost = prefill_attention_time(
        device, batch, seq, num_heads, num_heads, qk_nope_head_dim + qk_rope_head_dim,
        dtype=dtype, v_head_dim=v_head_dim, efficiency=device.efficiency.mla_prefill, tiles=False, name=name,
    )
    # per (query token, head): the latent's up-projection to per-head keys and values and its
    # layout, which the prefill kernel sequence runs before attention
    extra = device.efficiency.mla_prefill_token * batch * seq * num_heads
    # per query token whatever the heads: the work on the shared latent (measured: 65,536 tokens of one
    # head take 360 us, and each head adds about 120 us, so a third of the single head's time is not per head)
    extra = extra + device.efficiency.mla_prefill_latent * batch * seq
    cost.time += extra
    cost.compute_time += extra
    _add_dequant(device, cost, _kv_key("mla", kv_dtype), 0.0)
    return cost
