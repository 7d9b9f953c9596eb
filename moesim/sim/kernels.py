"""Compiled inner loops of a simulated step (Numba), each with a plain reference kept for tests.

:func:`two_microbatch_end`: the end of DeepSeek's two-micro-batch overlap over a step's MoE
layers, the loop :meth:`moesim.sim.step.StepModel._two_microbatch` runs in Python when it also
records spans (the reference); :func:`segment_maxima`: the slowest replica's compute before each
MoE layer; :func:`scaled_floor`: a micro-batch's share of a step's counts; :func:`rank_slots` and
:func:`exchange_maxima`: the expert-parallel layers' per-rank slots and all-to-all maxima;
:func:`busy_seconds`: a step's compute seconds per replica and per rank;
:func:`schedule` and :func:`advance`: a serving step's scheduler and its advance of the sequences
(:class:`moesim.sim.engine._Group`); :func:`token_sources`: a step's routed slots from a token-level trace.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moesim.routing.stream import _pairwise_sum


@numba.njit(cache=True)
def two_microbatch_end(segs: np.ndarray, xs: np.ndarray, dispatch: np.ndarray, combine: np.ndarray) -> float:
    """Seconds until both micro-batches have left the last MoE layer. Arguments ``[2, layers]``:
    each half's compute before the layer's dispatch (the slowest replica), its experts (the
    slowest rank), its dispatch and its combine. One compute and one communication stream;
    a half's dispatch waits for its compute, its experts for its dispatch, its next layer for
    its combine."""
    comp = comm = 0.0
    done0 = done1 = 0.0  # each half's last combine
    for m in range(segs.shape[1]):
        start = max(comp, done0)
        comp = start + segs[0, m]
        comm = max(comm, comp) + dispatch[0, m]
        end0 = comm
        start = max(comp, done1)
        comp = start + segs[1, m]
        comm = max(comm, comp) + dispatch[1, m]
        end1 = comm
        comp = max(comp, end0) + xs[0, m]
        comm = max(comm, comp) + combine[0, m]
        done0 = comm
        comp = max(comp, end1) + xs[1, m]
        comm = max(comm, comp) + combine[1, m]
        done1 = comm
    return max(comp, comm)


@numba.njit(cache=True)
def scaled_floor(counts: np.ndarray, share: float, offset: float, out: np.ndarray) -> None:
    """``out[:] = np.floor(counts * share + offset)`` over 1-D arrays (whole counts in and out),
    with NumPy's roundings (a product, then a sum, neither fused); one pass instead of NumPy's
    four over a step's ~15,000 counts."""
    for i in range(counts.size):
        out[i] = math.floor(counts[i] * share + offset)


@numba.njit(cache=True)
def segment_maxima(compute: np.ndarray, shared: np.ndarray, starts: np.ndarray, stop: int) -> np.ndarray:
    """``[loads, segments]``: for each load, the largest over replicas of ``compute + shared``
    ``[loads, layers, replicas]`` summed over each segment of layers (segment ``m`` from
    ``starts[m]`` to the next start, the last to ``stop``), in one pass instead of NumPy's sum,
    segment sums and maxima."""
    n, _, R = compute.shape
    out = np.empty((n, starts.size))
    for i in range(n):
        for m in range(starts.size):
            end = starts[m + 1] if m + 1 < starts.size else stop
            largest = -np.inf
            for r in range(R):
                total = 0.0
                for l in range(starts[m], end):
                    total += compute[i, l, r] + shared[i, l, r]
                largest = max(largest, total)
            out[i, m] = largest
    return out


@numba.njit(cache=True)
def rank_slots(rows: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """``[layers, ranks]``: the slots each rank computes, from ``rows`` ``[layers, ranks, local
    experts]`` (whole counts); ``experts`` (seconds, same leading shape) is zeroed in place where
    a rank has none."""
    L, R, E = rows.shape
    out = np.empty((L, R))
    for l in range(L):
        for r in range(R):
            total = 0
            for e in range(E):
                total += rows[l, r, e]
            out[l, r] = total
            if total == 0:
                experts[l, r] = 0.0
    return out


@numba.njit(cache=True)
def exchange_maxima(dispatch: np.ndarray, combine: np.ndarray, slots: np.ndarray, latency: float, loads: int):
    """From each rank's dispatch and combine seconds and slots ``[loads * layers, ranks]``: the
    layers' dispatch and combine seconds (the slowest rank, plus ``latency`` where any slot
    moves) ``[loads * layers]``, and per load the seconds each rank's links are busy and its
    slots, summed over the layers in order ``[loads, ranks]``."""
    rows, R = dispatch.shape
    M = rows // loads
    D, C = np.empty(rows), np.empty(rows)
    busy, received = np.zeros((loads, R)), np.zeros((loads, R))
    for i in range(rows):
        load = i // M
        d_max, c_max, moved = -np.inf, -np.inf, 0.0
        for r in range(R):
            d_max = max(d_max, dispatch[i, r])
            c_max = max(c_max, combine[i, r])
            moved += slots[i, r]
            busy[load, r] += dispatch[i, r] + combine[i, r]
            received[load, r] += slots[i, r]
        extra = latency if moved > 0 else 0.0
        D[i], C[i] = d_max + extra, c_max + extra
    return D, C, busy, received


@numba.njit(inline="always", cache=True)
def _starts_block(context: int, mask: int, block_size: int) -> bool:
    """Whether a sequence's next token, after ``context`` cached tokens, starts a KV block
    (``mask``: ``block_size - 1`` for a power of two, else -1 and an integer division)."""
    return (context & mask if mask >= 0 else context % block_size) == 0


@numba.njit(cache=True)
def schedule(seqs: np.ndarray, count: np.ndarray, free: np.ndarray, prefilled: np.ndarray, target: np.ndarray,
             context: np.ndarray, blocks: np.ndarray, generated: np.ndarray, prompt: np.ndarray,
             preemptions: np.ndarray, block_size: int, chunked: bool, budget: int):
    """One scheduler step over every DP replica's running sequences ``seqs[r, :count[r]]``
    (admission order), in place: a sequence whose prompt is prefilled decodes (without chunked
    prefill, only where no prompt of its replica waits); a decode token that starts a KV block
    (``context`` a multiple of ``block_size``) takes one of ``free``, else the replica's newest
    sequence is preempted for recompute (its blocks freed, its prompt and tokens so far to
    prefill again) until the rest fit; prompt chunks then fill each replica's ``budget`` tokens
    less its decodes, prompt after prompt. Returns the decode sequences (replica by replica),
    per replica their number and mean cached tokens (rounded up), the prompt tokens, the chunks ``[n, 4]`` (replica, sequence,
    tokens, tokens already prefilled) and the preempted ``[m, 2]`` (replica, sequence) in order."""
    R, width = seqs.shape
    total = 0
    for r in range(R):
        total += count[r]
    decode_ids = np.empty(total, dtype=np.int64)
    chunks = np.empty((total, 4), dtype=np.int64)
    preempted = np.empty((total, 2), dtype=np.int64)
    decode = np.zeros(R, dtype=np.int64)
    kv = np.zeros(R, dtype=np.int64)
    prefill = np.zeros(R, dtype=np.int64)
    filling = np.empty(width, dtype=np.int64)  # one replica's sequences still prefilling
    # a power-of-two block size (the usual 16) takes a mask instead of an integer division
    mask = block_size - 1 if block_size & (block_size - 1) == 0 else -1
    n_dec = n_chunks = n_pre = 0
    for r in range(R):
        # one pass takes the decodes' new blocks as it goes and gives them back when the
        # replica runs short (then preempts and passes again) or must run a whole prompt
        first = n_dec
        while True:
            n_fill = grow = kv_sum = 0
            for j in range(count[r]):
                q = seqs[r, j]
                if prefilled[q] < target[q]:
                    filling[n_fill] = q
                    n_fill += 1
                else:
                    new_block = _starts_block(context[q], mask, block_size)
                    blocks[q] += new_block
                    grow += new_block
                    decode_ids[n_dec] = q
                    n_dec += 1
                    kv_sum += context[q]
            short = grow > free[r]
            if short or (n_fill and not chunked):
                for i in range(first, n_dec):
                    q = decode_ids[i]
                    blocks[q] -= _starts_block(context[q], mask, block_size)
                n_dec = first
                grow = kv_sum = 0
            if not short:
                break
            q = seqs[r, count[r] - 1]
            count[r] -= 1
            free[r] += blocks[q]
            blocks[q] = 0
            preemptions[q] += 1
            target[q] = prompt[q] + max(generated[q] - 1, 0)
            prefilled[q] = 0
            preempted[n_pre, 0], preempted[n_pre, 1] = r, q
            n_pre += 1
        free[r] -= grow
        decodes = decode[r] = n_dec - first
        # a sum of token counts is exact in float64 well past any KV cache, so the integer sum
        # is the float sum np.bincount's weights would make
        kv[r] = np.int64(np.ceil(np.float64(kv_sum) / max(decodes, 1)))
        left_budget = budget - decodes
        for i in range(n_fill):
            q = filling[i]
            if left_budget <= 0:
                break
            left = target[q] - prefilled[q]
            if chunked:
                take = min(left, left_budget)
            else:
                take = left if left <= left_budget or n_chunks == 0 else 0
            if take <= 0:
                break
            chunks[n_chunks, 0], chunks[n_chunks, 1], chunks[n_chunks, 2], chunks[n_chunks, 3] = r, q, take, prefilled[q]
            n_chunks += 1
            prefill[r] += take
            left_budget -= take
    return decode_ids[:n_dec], decode, kv, prefill, chunks[:n_chunks], preempted[:n_pre]


@numba.njit(cache=True)
def _add_layer_sums(values: np.ndarray, out: np.ndarray) -> None:
    """Adds to ``out`` ``[columns]`` ``values`` ``[loads, layers, columns]`` summed over its loads
    (first axis), then over its layers, in NumPy's order for ``values.sum(axis=0).sum(axis=0)``:
    layer after layer onto each column (rows read in memory order), pairwise
    (:func:`_pairwise_sum`) when there is one column, a contiguous run."""
    n, L, R = values.shape
    if R == 1:
        per_layer = np.empty(L)
        for l in range(L):
            x = values[0, l, 0]
            for i in range(1, n):
                x += values[i, l, 0]
            per_layer[l] = x
        out[0] += 0.0 + _pairwise_sum(per_layer, 0, L)
        return
    total = np.zeros(R)
    for l in range(L):
        for r in range(R):
            x = values[0, l, r]
            for i in range(1, n):
                x += values[i, l, r]
            total[r] += x
    for r in range(R):
        out[r] += total[r]


@numba.njit(cache=True)
def busy_seconds(compute: np.ndarray, shared: np.ndarray, head: np.ndarray, experts: np.ndarray):
    """A step's seconds of compute outside the routed experts per replica, and of routed experts
    per rank, from its loads' (micro-batches') per-layer seconds ``compute`` and ``shared``
    ``[loads, layers, replicas]``, ``head`` ``[loads, replicas]`` and ``experts`` ``[loads, moe
    layers, ranks]``: the loads summed first, then the layers (:func:`_add_layer_sums`), in one
    pass instead of NumPy's seven, with the same additions in the same order (the same
    roundings)."""
    R = compute.shape[2]
    attention = np.zeros(R)
    _add_layer_sums(compute, attention)
    _add_layer_sums(shared, attention)
    for r in range(R):
        h = head[0, r]
        for i in range(1, head.shape[0]):
            h += head[i, r]
        attention[r] += h
    routed = np.zeros(experts.shape[2])
    _add_layer_sums(experts, routed)
    return attention, routed


@numba.njit(cache=True)
def _release(q: int, seqs: np.ndarray, count: np.ndarray, free: np.ndarray, blocks: np.ndarray, replica: np.ndarray) -> None:
    """Sequence ``q`` leaves its replica's running sequences (the rest keep their order) and
    frees its KV blocks."""
    r = replica[q]
    j = 0
    while seqs[r, j] != q:
        j += 1
    for i in range(j + 1, count[r]):
        seqs[r, i - 1] = seqs[r, i]
    count[r] -= 1
    free[r] += blocks[q]
    blocks[q] = 0


@numba.njit(cache=True)
def advance(decode_ids: np.ndarray, chunks: np.ndarray, seqs: np.ndarray, count: np.ndarray, free: np.ndarray,
            blocks: np.ndarray, replica: np.ndarray, prefilled: np.ndarray, target: np.ndarray, context: np.ndarray,
            generated: np.ndarray, output: np.ndarray, first_token: np.ndarray, finish: np.ndarray, now: float,
            handoff: bool):
    """A step's sequences advanced at time ``now`` (s), in place: each decode adds a token; each
    prompt chunk ``(replica, sequence, tokens, context)`` is prefilled and, at its prompt's end,
    yields a token (the first one sets ``first_token``). Sequences with all their ``output``
    tokens leave, ``finish`` at ``now``; with ``handoff`` (disaggregated prefill) a finished prompt
    with tokens still to generate leaves for the decode group instead. Returns the finished
    sequences (decodes first, then prompts, in step order) and the handed off ``[m, 2]``
    (sequence, tokens generated)."""
    done = np.empty(decode_ids.size + chunks.shape[0], dtype=np.int64)
    handed = np.empty((chunks.shape[0], 2), dtype=np.int64)
    n_done = n_handed = 0
    for q in decode_ids:
        generated[q] += 1
        context[q] += 1
        if generated[q] >= output[q]:
            done[n_done] = q
            n_done += 1
    for i in range(chunks.shape[0]):
        q, take = chunks[i, 1], chunks[i, 2]
        prefilled[q] += take
        context[q] += take
        if prefilled[q] >= target[q]:
            generated[q] += 1  # the prompt's last position yields the next token
            if np.isnan(first_token[q]):
                first_token[q] = now
            if handoff and generated[q] < output[q]:
                _release(q, seqs, count, free, blocks, replica)
                handed[n_handed, 0], handed[n_handed, 1] = q, generated[q]
                n_handed += 1
            elif generated[q] >= output[q]:
                done[n_done] = q
                n_done += 1
    for i in range(n_done):
        _release(done[i], seqs, count, free, blocks, replica)
        finish[done[i]] = now
    return done[:n_done], handed[:n_handed]


@numba.njit(cache=True)
def _count_token(ids: np.ndarray, row: int, r: int, source: np.ndarray, counts: np.ndarray) -> None:
    """Add trace row ``row``'s routed slots to replica ``r``'s ``source`` and to ``counts``."""
    for l in range(ids.shape[1]):
        for j in range(ids.shape[2]):
            e = ids[row, l, j]
            if e >= 0:  # null experts (-1) are not computed
                source[r, l, e] += 1
                counts[l, e] += 1


@numba.njit(cache=True)
def token_sources(ids: np.ndarray, offset: np.ndarray, context: np.ndarray, replica: np.ndarray, decode_ids: np.ndarray,
                  chunks: np.ndarray, replicas: int, experts: int):
    """A step's rows of the token-level trace ``ids`` ``[tokens, layers, top_k]`` (request ``q``'s
    token at position ``p`` is row ``offset[q] + p``, clipped to the last): each decode's next
    token (position ``context``), then each prompt chunk's ``[n, 4]`` (replica, request, tokens,
    context) tokens; and their routed slots per replica ``[replicas, layers, experts]`` and
    summed ``[layers, experts]``. Returns the slots, the summed slots, the rows and their
    requests: one pass instead of NumPy's gathers, keys and bincount."""
    last = ids.shape[0] - 1
    n = decode_ids.size
    for c in range(chunks.shape[0]):
        n += chunks[c, 2]
    rows = np.empty(n, dtype=np.int64)
    requests = np.empty(n, dtype=np.int64)
    source = np.zeros((replicas, ids.shape[1], experts), dtype=np.int64)
    counts = np.zeros((ids.shape[1], experts), dtype=np.int64)
    i = 0
    for q in decode_ids:
        rows[i], requests[i] = min(offset[q] + context[q], last), q
        _count_token(ids, rows[i], replica[q], source, counts)
        i += 1
    for c in range(chunks.shape[0]):
        r, q = chunks[c, 0], chunks[c, 1]
        for t in range(chunks[c, 2]):
            rows[i], requests[i] = min(offset[q] + chunks[c, 3] + t, last), q
            _count_token(ids, rows[i], r, source, counts)
            i += 1
    return source, counts, rows, requests
