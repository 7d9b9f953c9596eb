"""Time of one MoE layer on one device, from the tokens each of its experts received.

The layer is the sequence of kernels a fused MoE implementation (vLLM / SGLang ``fused_moe``,
Megatron grouped GEMM) runs on an expert-parallel rank:

1. router GEMM ``[tokens, hidden] x [hidden, experts]`` (optional: measured tables start
   after it),
2. top-k over the router scores,
3. sort / align: token slots grouped by expert and padded to the GEMM's row block (fp8
   kernels: then the tokens' activations quantised to fp8),
4. gate+up grouped GEMM over the *local* experts that received tokens: only their weights are
   read, and each expert's rows are padded to the row block,
5. the gated activation (SiLU x up; fp8 kernels quantise its output),
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
from numba.np.unsafe.ndarray import to_fixed_tuple

from moesim.cost.gemm import gemm_time
from moesim.cost.roofline import OpCost, combine, roofline
from moesim.dtypes import canonical_dtype, dtype_bytes, weight_bytes_per_param

# The device numbers the compiled MoE loop reads (one tuple per device and expert dtype); all floats
# (``reads_all`` 1.0 or 0.0), so that the tuple rebuilt from an array in the loop is the same type.
_MoeDevice = namedtuple("_MoeDevice", "launch p latency stream vector_rate moe_rate moe_stream tile_m tile_n k_half units "
                                      "empty_block weight_bytes act_bytes inflight_half small_ratio small_stream unaligned "
                                      "tile_k small_rate reads_all row_block")

_DEVICE_FIGURES = len(_MoeDevice._fields)

_PARTS = ("topk", "align", "gate_up", "activation", "down", "combine")
_FIELDS = ("time", "compute_time", "memory_time", "launch_time", "flops", "bytes")


_DEVICES: dict[tuple[int, str], tuple] = {}


def _moe_device_entry(device, dtype: str) -> tuple:
    """(device, :func:`_moe_device_figures`, the figures as a float64 array), remembered per
    device object (profiles are frozen models; the entry keeps the object, so its id is not
    reused while it is remembered): the simulator asks once a step, and working the figures
    out costs more than a step's MoE layer on one GPU. The array is what :func:`_own_times`
    takes: Numba types a tuple of 22 floats field by field on every call (about 3 us), an
    array at once."""
    entry = _DEVICES.get((id(device), dtype))
    if entry is None or entry[0] is not device:
        if len(_DEVICES) >= 256:  # calibration fits make many device variants
            _DEVICES.clear()
        figures = _moe_device_figures(device, dtype)
        entry = _DEVICES[id(device), dtype] = (device, figures, np.array(figures, dtype=np.float64))
    return entry


def _moe_device(device, dtype: str) -> _MoeDevice:
    """:func:`_moe_device_figures`, remembered per device object (:func:`_moe_device_entry`)."""
    return _moe_device_entry(device, dtype)[1]


def _moe_device_figures(device, dtype: str) -> _MoeDevice:
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
        float(weight_bytes_per_param(variant)), float(dtype_bytes(act)), float(eff.moe_inflight_half_for(variant, canon)),
        float(eff.moe_small_batch.get(variant, 0.0)), float(stream * eff.moe_small_memory.get(variant, 1.0)),
        float(eff.moe_unaligned_for(variant, canon)), float(eff.moe_tile_k),
        float(device.peak_flops(act) * eff.moe_small_compute.get(variant, eff.moe_compute_for(variant, canon))),
        float(variant in eff.moe_reads_all or canon in eff.moe_reads_all), float(eff.moe_row_block.get(variant, 0)))


@numba.njit(inline="always", cache=True)
def _tile_edge(size, largest, smallest):
    """:func:`moesim.cost.gemm._tile`: the next power of two, clamped (``smallest``: a power of
    two). Doubling from ``smallest`` up to the size (or the clamp): a few multiplications cost
    less than Numba's frexp / ldexp calls, and a decode rank's few rows need none."""
    whole = np.ceil(size)
    whole = 1.0 if 1.0 > whole else whole
    if whole >= largest:
        return largest  # the next power of two is at least ``largest``
    power = smallest
    while power < whole:
        power *= 2.0
    return largest if largest < power else power


@numba.njit(inline="always", cache=True)
def _vector_fields(flops, bytes_moved, d):
    """:data:`_FIELDS` of a kernel on the vector units at full rate (top-k, sort, element-wise)."""
    compute, memory, body = roofline(flops, bytes_moved, d.vector_rate, d.stream, d.latency, d.p)
    return d.launch + body, compute, memory, d.launch, flops, bytes_moved


@numba.njit(inline="always", cache=True)
def _vector_kernel(flops, bytes_moved, d, out):
    """:func:`_vector_fields` written into ``out``."""
    out[0], out[1], out[2], out[3], out[4], out[5] = _vector_fields(flops, bytes_moved, d)


@numba.njit(inline="always", cache=True)
def _then_quantise(fields, elements, d):
    """A part's :data:`_FIELDS`, with fp8 kernels' quantisation of its ``elements`` outputs
    added (a second kernel): the tokens before the first grouped GEMM, the activation's output
    before the second."""
    if d.act_bytes != 1.0:
        return fields
    flops, bytes_moved = _quant_work(elements)
    q = _vector_fields(flops, bytes_moved, d)
    return (fields[0] + q[0], fields[1] + q[1], fields[2] + q[2], fields[3] + q[3], fields[4] + q[4],
            fields[5] + q[5])


@numba.njit(inline="always", cache=True)
def _row_blocks(local, i, tile_m, fixed):
    """The row side of a grouped GEMM over ``local[i, e]`` token rows per expert: (experts with
    rows, rows, row block, row blocks, the fewest row blocks the rows could fill). Both grouped
    GEMMs of a layer share it. The row block follows the rows per expert up to ``tile_m``, or
    is ``fixed`` (> 0) for a kernel variant that keeps one block size. (Indexed, not a row
    view, which costs two reference-count calls.)"""
    rows = local.shape[1]
    active, total = 0, 0.0
    for e in range(rows):  # selects, not branches: which experts have rows is a coin toss at decode
        r = local[i, e]
        active += r > 0
        total += r if r > 0 else 0
    if active == 0:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    block_m = fixed if fixed > 0.0 else _tile_edge(total / active, tile_m, 16.0)
    row_blocks = 0.0
    whole = np.int64(block_m)
    if whole == block_m and whole & (whole - 1) == 0:
        inverse = 1.0 / block_m  # exact for a power of two: the same quotients as dividing, without the divisions
        for e in range(rows):
            row_blocks += np.ceil(local[i, e] * inverse)
        return float(active), total, block_m, row_blocks, np.ceil(total * inverse)
    for e in range(rows):
        row_blocks += np.ceil(local[i, e] / block_m)
    return float(active), total, block_m, row_blocks, np.ceil(total / block_m)


@numba.njit(inline="always", cache=True)
def _weight_side(n, k, d):
    """The weight side of a grouped GEMM ``[k, n]``: (column blocks, the shape efficiency of
    ``k``); constant for a layer, so the batch loops take it out. A weight whose ``n`` or ``k``
    is not a multiple of 16 elements computes ``unaligned`` times slower (the measured
    expert-TP shards of 58, 84, 116, 168 and 232 columns: whole layers 2-3x slower in bf16 and
    4-10x in fp8 than the model without it)."""
    k_eff = k / (k + d.k_half)
    if d.tile_k > 0.0:  # the reduction runs in whole K blocks: a short k pays for the block
        k_eff *= k / (math.ceil(k / d.tile_k) * d.tile_k)
    if n % 16.0 != 0.0 or k % 16.0 != 0.0:
        k_eff /= d.unaligned
    return math.ceil(n / _tile_edge(n, d.tile_n, 32.0)), k_eff


@numba.njit(inline="always", cache=True)
def _grouped_fields(active, total, block_m, row_blocks, foreign, n, k, side, in_bytes, out_bytes, small, experts, d):
    """:data:`_FIELDS` of one grouped GEMM from its :func:`_row_blocks` (``active`` > 0 of
    ``experts`` local experts): each expert multiplies its rows ``[rows, k]`` by its own
    ``[k, n]`` weight, rows padded to the row block; ``foreign`` rows routed to other ranks'
    experts cost an empty block per ``tile_m`` rows, the kernel's largest row block (the
    measured EP rows show no step where the local experts' row block shrinks; flops: useful
    work; padding only costs time). The weights stream at ``x / (x + inflight_half)`` of the
    kernel's rate, ``x`` the output tiles times the weight bytes per element: each tile keeps a
    few weight blocks in flight, so a grid of few tiles (one expert hit by one token) cannot
    cover the memory latency (Little's law).

    ``small`` (:func:`_small_batch`): the variant's small-batch kernel, which computes each
    row on its own (no row blocks) at its own compute and stream rates. A variant whose kernel
    reads every local expert's weights (``reads_all``) does so whichever experts have rows."""
    n_blocks, k_eff = side
    n_tiles = row_blocks * n_blocks
    waves = max(math.ceil(n_tiles / d.units), 1.0)
    shape_eff = max(n_tiles, 1.0) / (waves * d.units) * k_eff
    if small:
        flops, rate, base = 2.0 * total * n * k, d.small_rate * k_eff, d.small_stream
        read = active
    else:
        flops, rate, base = 2.0 * row_blocks * block_m * n * k, d.moe_rate * shape_eff, d.moe_stream
        read = experts if d.reads_all else active
    bytes_moved = read * n * k * d.weight_bytes + total * (k * in_bytes + n * out_bytes)
    inflight = n_tiles * d.weight_bytes
    stream = base * inflight / (inflight + d.inflight_half)
    compute, memory, body = roofline(flops, bytes_moved, rate, stream, d.latency, d.p)
    empty = math.ceil(foreign / d.tile_m) * n_blocks * d.empty_block
    return d.launch + body + empty, compute, memory, d.launch + empty, 2.0 * total * n * k, bytes_moved


@numba.njit(inline="always", cache=True)
def _small_batch(slots, experts, d):
    """Whether ``slots`` routed slots over ``experts`` local experts run the variant's
    small-batch kernel (vLLM's CUDA ``moe_wna16`` GEMM for int4 weight-only, taken while
    slots / local experts <= 6)."""
    return d.small_ratio > 0.0 and slots <= d.small_ratio * experts


@numba.njit(inline="always", cache=True)
def _grouped_core(local, i, foreign, n, k, in_bytes, out_bytes, small, d, out):
    """One grouped GEMM (:func:`_grouped_fields`) over ``local[i, e]`` token rows per local expert;
    experts with no rows cost nothing (their weights are not read). Writes :data:`_FIELDS` into
    ``out``; returns (experts with rows, rows, row block)."""
    active, total, block_m, row_blocks, _ = _row_blocks(local, i, d.tile_m, d.row_block)
    out[:] = 0.0
    if active == 0:
        return 0.0, 0.0, 0.0
    out[0], out[1], out[2], out[3], out[4], out[5] = _grouped_fields(active, total, block_m, row_blocks, foreign, n, k,
                                                                     _weight_side(n, k, d), in_bytes, out_bytes, small,
                                                                     float(local.shape[1]), d)
    return active, total, block_m


@numba.njit(inline="always", cache=True)
def _topk_work(t, num_experts):
    return 2.0 * t * num_experts, 4.0 * t * num_experts  # fp32 scores read once


@numba.njit(inline="always", cache=True)
def _align_work(slots):
    return slots, 16.0 * slots  # sort: an id and a position read and written per slot


@numba.njit(inline="always", cache=True)
def _activation_work(rows, shard, gated):
    elements = rows * shard  # SiLU(gate) x up in bf16: both halves read when gated
    return 4.0 * elements, 2.0 * elements * (3.0 if gated else 2.0)


@numba.njit(inline="always", cache=True)
def _quant_work(elements):
    return 2.0 * elements, 3.0 * elements  # bf16 read, fp8 written (scales are a rounding error)


@numba.njit(inline="always", cache=True)
def _combine_work(t, hidden, top_k):
    return top_k * t * hidden, 2.0 * t * hidden * (top_k + 1)  # unpermute: each token's top_k bf16 outputs read, weighted, summed


@numba.njit(inline="always", cache=True)
def _moe_rank(local, i, foreign, t, num_experts, hidden, shard, top_k, gated, d, parts, info):
    """The kernels after the router of one MoE layer on rank ``i``, from ``local[i]`` token rows
    per local expert, ``foreign`` rows of other ranks' experts and ``t`` tokens: writes each part's
    :data:`_FIELDS` into ``parts`` ``[parts, fields]`` and the grouped GEMMs' (experts, rows,
    row block) into ``info`` ``[2, 3]``."""
    parts[:] = 0.0
    rows = local[i].sum()
    flops, bytes_moved = _topk_work(t, num_experts)
    _vector_kernel(flops, bytes_moved, d, parts[0])
    flops, bytes_moved = _align_work(t * top_k)
    out = parts[1]
    out[0], out[1], out[2], out[3], out[4], out[5] = _then_quantise(_vector_fields(flops, bytes_moved, d), t * hidden, d)
    up_n = 2 * shard if gated else shard
    small = _small_batch(t * top_k, local.shape[1], d)
    info[0, 0], info[0, 1], info[0, 2] = _grouped_core(local, i, foreign, up_n, hidden, d.act_bytes, 2.0, small, d, parts[2])
    if rows > 0:
        flops, bytes_moved = _activation_work(rows, shard, gated)
        out = parts[3]
        out[0], out[1], out[2], out[3], out[4], out[5] = _then_quantise(_vector_fields(flops, bytes_moved, d), rows * shard,
                                                                        d)
    info[1, 0], info[1, 1], info[1, 2] = _grouped_core(local, i, foreign, hidden, shard, 2.0, 2.0, small, d, parts[4])
    flops, bytes_moved = _combine_work(t, hidden, top_k)
    _vector_kernel(flops, bytes_moved, d, parts[5])


@numba.njit(cache=True)
def _moe_core(local, foreign, tokens, num_experts, hidden, shard, top_k, gated, d):
    """:func:`_moe_rank` for each of a batch of ranks (``local`` ``[ranks, local experts]``,
    ``foreign`` and ``tokens`` ``[ranks]``): ``[ranks, parts, fields]`` and ``[ranks, 2, 3]``."""
    ranks = local.shape[0]
    parts = np.zeros((ranks, len(_PARTS), len(_FIELDS)))
    info = np.zeros((ranks, 2, 3))
    for i in range(ranks):
        _moe_rank(local, i, foreign[i], tokens[i], num_experts, hidden, shard, top_k, gated, d, parts[i], info[i])
    return parts, info


@numba.njit(cache=True)
def _moe_times_reference(local, tokens, num_experts, hidden, shard, top_k, gated, d):
    """Seconds of :func:`_moe_rank` for each rank (nothing foreign): the full breakdown summed,
    the reference :func:`_moe_times` must equal bit for bit."""
    ranks = local.shape[0]
    times = np.empty(ranks)
    parts, info = np.empty((len(_PARTS), len(_FIELDS))), np.empty((2, 3))
    for i in range(ranks):
        _moe_rank(local, i, 0.0, tokens[i], num_experts, hidden, shard, top_k, gated, d, parts, info)
        times[i] = parts[:, 0].sum()
    return times


@numba.njit(inline="always", cache=True)
def _known(table, x, column):
    """``table[x, column]`` when ``x`` is a whole number inside the table and already filled, else NaN."""
    if x >= table.shape[0] or x != math.floor(x):
        return np.nan
    return table[np.int64(x), column]


@numba.njit(cache=True)
def _rank_seconds(active, rows, block_m, row_blocks, t, num_experts, hidden, shard, top_k, gated, experts, up_side, down_side,
                  d, table):
    """Seconds of :func:`_moe_rank` for one rank (nothing foreign) from its :func:`_row_blocks`
    and ``t`` tokens: the same sum in the same order, of the same kernel figures, the
    element-wise kernels read from (or written into) ``table`` (see :func:`_moe_times`)."""
    head, tail = _known(table, t, 0), _known(table, t, 2)
    if np.isnan(head):
        flops, bytes_moved = _topk_work(t, num_experts)
        head = 0.0 + _vector_fields(flops, bytes_moved, d)[0]  # the reference sum starts from 0.0
        flops, bytes_moved = _align_work(t * top_k)
        head += _then_quantise(_vector_fields(flops, bytes_moved, d), t * hidden, d)[0]
        flops, bytes_moved = _combine_work(t, hidden, top_k)
        tail = _vector_fields(flops, bytes_moved, d)[0]
        if t < table.shape[0] and t == math.floor(t):
            table[np.int64(t), 0], table[np.int64(t), 2] = head, tail
    seconds = head
    if active > 0:
        up_n = 2 * shard if gated else shard
        small = _small_batch(t * top_k, experts, d)
        seconds += _grouped_fields(active, rows, block_m, row_blocks, 0.0, up_n, hidden, up_side, d.act_bytes, 2.0, small,
                                   experts, d)[0]
        activation = _known(table, rows, 1)
        if np.isnan(activation):
            flops, bytes_moved = _activation_work(rows, shard, gated)
            activation = _then_quantise(_vector_fields(flops, bytes_moved, d), rows * shard, d)[0]
            if rows < table.shape[0] and rows == math.floor(rows):
                table[np.int64(rows), 1] = activation
        seconds += activation
        seconds += _grouped_fields(active, rows, block_m, row_blocks, 0.0, hidden, shard, down_side, 2.0, 2.0, small,
                                   experts, d)[0]
    return seconds + tail


@numba.njit(cache=True)
def _moe_times(local, tokens, num_experts, hidden, shard, top_k, gated, d, table, ranks_table):
    """Seconds of :func:`_moe_rank` for each rank (nothing foreign), without the breakdown: the
    same sum in the same order, of the same kernel figures. The element-wise kernels depend only
    on a rank's token count ``t`` (top-k + sort, unpermute) or rows (activation), so their
    seconds are kept in ``table`` ``[counts, 3]`` (NaN: not met yet), filled as counts appear.
    Empty ``tokens``: each rank's tokens are its rows (at least 1); a rank's seconds are then a
    function of (experts with rows, rows, row blocks) alone, kept in ``ranks_table``
    ``[rows, experts with rows - 1, row blocks beyond the fewest]`` when it has rows (an empty
    one: not kept). Returns the times and the largest token count met (the caller grows the
    tables to it)."""
    ranks = local.shape[0]
    experts = float(local.shape[1])
    times = np.empty(ranks)
    up_n = 2 * shard if gated else shard
    up_side, down_side = _weight_side(up_n, hidden, d), _weight_side(hidden, shard, d)
    own = tokens.size == 0
    keep = own and ranks_table.shape[1] >= local.shape[1]
    experts_kept = ranks_table.shape[2]
    by_rows = ranks_table.reshape(ranks_table.shape[0], ranks_table.shape[1] * experts_kept)  # no view a rank
    largest = 0.0
    idle = np.nan  # own tokens: the seconds of a rank without rows (one token), the same for all
    for i in range(ranks):
        active, rows, block_m, row_blocks, fewest = _row_blocks(local, i, d.tile_m, d.row_block)
        t = max(rows, 1.0) if own else tokens[i]
        largest = max(largest, t)
        if own and active == 0 and not np.isnan(idle):
            times[i] = idle
            continue
        beyond = 0
        if keep and active > 0:
            # the row blocks lie between the fewest the rows fill and that plus experts - 1
            beyond = np.int64(row_blocks - fewest)
            known = _known(by_rows, rows, (np.int64(active) - 1) * experts_kept + beyond)
            if not np.isnan(known):
                times[i] = known
                continue
        times[i] = _rank_seconds(active, rows, block_m, row_blocks, t, num_experts, hidden, shard, top_k, gated, experts,
                                 up_side, down_side, d, table)
        if own and active == 0:
            idle = times[i]
        if keep and active > 0 and rows < ranks_table.shape[0] and rows == math.floor(rows):
            ranks_table[np.int64(rows), np.int64(active) - 1, beyond] = times[i]
    return times, largest


_SPAN = 8  # row-block doublings :func:`_own_times` follows (16 up to 4096 rows)


@numba.njit(inline="always", cache=True)
def _table_slots(cells, width, low, span, kept, counts, slots):
    """Each rank's entry in a flattened ranks table ``[rows, experts with rows - 1, row blocks
    beyond the fewest]`` (-1: outside it) from ``cells``, ``[ranks, width]`` whole counts
    flattened, into ``slots``; returns the most rows of a rank. The row block is
    ``2 ** shift``, the smallest power from ``2 ** low`` (at most ``span`` doublings) with
    ``2 ** shift * experts with rows >= rows``: :func:`_tile_edge` of the mean rows, in whole
    numbers; a count's row blocks are ``(count + block - 1) >> shift``, its ceil (negative
    counts included). Without branches, so that the compiler vectorises the ranks (inlined
    with a constant ``width``)."""
    largest = 0
    for i in range(slots.size):
        active, rows = 0, 0
        for e in range(width):
            r = cells[i * width + e]
            active += r > 0
            rows += max(r, 0)
        shift = low
        for k in range(_SPAN):
            shift += (k < span) & (rows > (active << (low + k)))
        block = (1 << shift) - 1
        blocks = 0
        for e in range(width):
            blocks += (cells[i * width + e] + block) >> shift
        beyond = blocks - ((rows + block) >> shift)  # between 0 and experts with rows - 1
        inside = (rows < counts) & (beyond >= 0) & (beyond < kept)
        slots[i] = ((rows * kept + max(active, 1) - 1) * kept + beyond) if inside else -1
        largest = max(largest, rows)
    return largest


@numba.njit(cache=True)
def _own_times(local, num_experts, hidden, shard, top_k, gated, figures, table, ranks_table):
    """:func:`_moe_times` with each rank's own rows as its tokens, for whole counts (``local``
    int64) and a ``ranks_table`` of this many local experts: the same seconds, each rank's
    entry found without branches (about half the ranks of a decode step have rows on every
    local expert, a fifth on none, the rest between: branches on them mispredict) and read in
    a second pass; ranks not in the table then costed by :func:`_rank_seconds` and kept.
    ``ranks_table[0, 0, 0]`` (no rows, which a rank with experts never has) keeps a rank
    without rows. Kernels whose row block is not a power of two, or more than :data:`_SPAN`
    doublings, go to :func:`_moe_times`. ``figures``: the device's :class:`_MoeDevice` as an
    array (:func:`_moe_device_entry`)."""
    d = _MoeDevice(*to_fixed_tuple(figures, _DEVICE_FIGURES))
    ranks, width = local.shape
    edge = d.row_block if d.row_block > 0.0 else d.tile_m
    whole = np.int64(edge)
    top = 0  # log2 of the largest row block
    while (2 << top) <= whole:
        top += 1
    low = top if d.row_block > 0.0 else min(top, 4)  # the smallest row block: 16 (:func:`_tile_edge`), or the fixed one
    if whole != edge or whole <= 0 or whole & (whole - 1) != 0 or top - low > _SPAN or ranks_table.size == 0:
        return _moe_times(local, np.empty(0), num_experts, hidden, shard, top_k, gated, d, table, ranks_table)
    counts, kept = ranks_table.shape[0], ranks_table.shape[2]
    flat = ranks_table.reshape(-1)
    cells = local.reshape(-1)
    slots = np.empty(ranks, np.int64)
    # the widths of common expert-parallel layouts as constants: the compiler vectorises their ranks
    if width == 4:
        largest = _table_slots(cells, 4, low, top - low, kept, counts, slots)
    elif width == 8:
        largest = _table_slots(cells, 8, low, top - low, kept, counts, slots)
    elif width == 2:
        largest = _table_slots(cells, 2, low, top - low, kept, counts, slots)
    elif width == 1:
        largest = _table_slots(cells, 1, low, top - low, kept, counts, slots)
    else:
        largest = _table_slots(cells, width, low, top - low, kept, counts, slots)
    times = np.empty(ranks)
    for i in range(ranks):
        times[i] = flat[max(slots[i], 0)]  # (outside the table: replaced below)
    misses = 0
    for i in range(ranks):  # apart from the reads, so that it vectorises
        misses += (slots[i] < 0) | np.isnan(times[i])
    if misses > 0:
        experts = float(width)
        up_side, down_side = _weight_side(2 * shard if gated else shard, hidden, d), _weight_side(hidden, shard, d)
        for i in range(ranks):
            slot = slots[i]
            if slot >= 0 and not np.isnan(times[i]):
                continue
            if slot >= 0 and not np.isnan(flat[slot]):  # met earlier in this call
                times[i] = flat[slot]
                continue
            active, rows, block_m, row_blocks, _ = _row_blocks(local, i, d.tile_m, d.row_block)
            times[i] = _rank_seconds(active, rows, block_m, row_blocks, max(rows, 1.0), num_experts, hidden, shard, top_k,
                                     gated, experts, up_side, down_side, d, table)
            if slot >= 0:
                flat[slot] = times[i]
    return times, float(max(largest, 1)) if ranks > 0 else 0.0


_TABLES: dict[tuple, np.ndarray] = {}
_TABLE_LIMIT = 1 << 20  # counts beyond this are costed directly each time (8 MB a table at most, ×3)
_RANKS_TABLE_EXPERTS = 8  # ranks' seconds are kept for up to this many local experts (their square of rows)
_RANKS_TABLE_LIMIT = 1 << 16  # rows beyond this are costed each time (32 MB a table at most)


def _grown(tables: dict, key: tuple, largest: float, trail: tuple, limit: int) -> np.ndarray:
    """``tables[key]``, a NaN-filled array ``[counts, *trail]``, grown to hold counts up to
    ``largest`` (at most ``limit``). Counts first: a step's ranks read the entries of a few
    small counts, which then share cache lines (counts last put the rows of the trailing
    entries a power of two apart, all in the same cache sets)."""
    table = tables.get(key)
    need = min(int(largest) + 1, limit)
    if table is None or table.shape[0] < need:
        size = max(1024, 1 << (need - 1).bit_length())
        grown = np.full((size, *trail), np.nan)
        if table is not None:
            grown[:table.shape[0]] = table
        tables[key] = table = grown
    return table


def _table(key: tuple, largest: float) -> np.ndarray:
    """The element-wise kernels' table of :func:`_moe_times` for one (device, layer shape),
    grown to hold counts up to ``largest``."""
    return _grown(_TABLES, key, largest, (3,), _TABLE_LIMIT)


_RANKS_TABLES: dict[tuple, np.ndarray] = {}
_NO_RANKS_TABLE = np.empty((0, 0, 0))


def _ranks_table(key: tuple, largest: float) -> np.ndarray:
    """The ranks' seconds of :func:`_moe_times` (own tokens) for one (device, layer shape):
    ``[rows, experts with rows - 1, row blocks beyond the fewest]``; none for more than
    :data:`_RANKS_TABLE_EXPERTS` local experts."""
    experts = int(key[0])
    if experts > _RANKS_TABLE_EXPERTS:
        return _NO_RANKS_TABLE
    return _grown(_RANKS_TABLES, key, largest, (experts, experts), _RANKS_TABLE_LIMIT)


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
    if flat.dtype != np.int64:  # whole counts go in as they are (the compiled loop reads them exactly)
        flat = flat.astype(np.float64)
    flat = np.ascontiguousarray(flat)
    _, figures, vector = _moe_device_entry(device, dtype)
    args = (float(flat.shape[1]), float(hidden), float(inter // expert_tp), float(top_k), bool(gated), figures)
    own = tokens is None
    if own:  # each rank's own rows, counted in the loop
        table = _table(args, 0.0)
        ranks_table = _ranks_table(args, table.shape[0] - 1)
        if flat.dtype == np.int64 and ranks_table.shape[1] >= flat.shape[1]:
            times, largest = _own_times(flat, *args[:5], vector, table, ranks_table)
        else:
            times, largest = _moe_times(flat, _NO_TOKENS, *args, table, ranks_table)
    else:
        tokens = np.ascontiguousarray(np.broadcast_to(np.asarray(tokens, dtype=np.float64), local.shape[:-1]).reshape(-1))
        table = _table(args, tokens.max(initial=0.0))
        times, largest = _moe_times(flat, tokens, *args, table, _NO_RANKS_TABLE)
    if largest >= table.shape[0]:
        _table(args, largest)  # the next call finds these counts tabled
        if own:
            _ranks_table(args, largest)
    return times.reshape(local.shape[:-1])


_NO_TOKENS = np.empty(0)
