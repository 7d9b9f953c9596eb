"""One step of a serving group: every layer of one forward pass, every rank at once.

A serving group is the devices that step together: ``tp * dp`` devices of one pipeline stage,
the MoE layers as ``ep`` expert-parallel ranks. A step runs every layer for the group's batch:
each DP replica's decode tokens and prompt chunks (chunked prefill) through attention, then at
each MoE layer the router, the dispatch all-to-all with the per-pair byte matrix from the routing
counts and the placement, the routed experts on each rank from its own slots, the combine
all-to-all, and the shared experts.

The all-to-all is a barrier: no rank's experts start before every source has sent, and the next
layer waits for the combine. So a step is a closed-form recurrence over per-rank NumPy arrays
``[layers, ranks]``: between two MoE layers each replica runs its own attention and dense layers,
the slowest one opens the dispatch, the slowest expert rank closes the combine (the straggler
sets the step). This is exactly what stepping a discrete-event engine per layer and per
synchronisation point would give, without one event per layer and rank.

Overlap policies (``OVERLAP``):

- ``none``: attention, dispatch, experts, combine in sequence;
- ``shared_expert``: the shared experts run on the compute stream while dispatch is in flight;
- ``two_microbatch``: DeepSeek's two-batch overlap: the batch is cut in two halves and one
  half's all-to-all runs while the other half computes (two streams, per-layer dependencies).

Every operator is costed by :class:`moesim.cost.estimate.LayerCosting`, so a balanced decode step
equals ``moesim estimate``'s decode step (a test shows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.cost.collectives import AllToAll
from moesim.cost.estimate import LayerCosting, Workload
from moesim.cost.gemm import gemm_time
from moesim.cost.moe import expert_times
from moesim.cost.roofline import OpCost
from moesim.cost.layout import Layout
from moesim.dtypes import dtype_bytes, weight_bytes_per_param
from moesim.errors import InputError
from moesim.models.arch import ModelArch
from moesim.sim.dispatch import Dispatch
from moesim.sim.kernels import busy_seconds, exchange_maxima, rank_slots, scaled_floor, segment_maxima, two_microbatch_end
from moesim.sim.placement import Placement

OVERLAP = ("none", "shared_expert", "two_microbatch")


@dataclass
class StepLoad:
    """What one step computes. Per DP replica: ``decode`` sequences adding a token over ``kv``
    cached tokens on average, ``prefill`` prompt tokens in ``chunks`` of (replica, tokens,
    context). ``counts``: routed slots per logical expert ``[moe layers, experts]`` of the whole
    group; ``source``: the same per replica ``[replicas, moe layers, experts]`` when known
    (token-level routing), else each replica sends in proportion to its tokens."""

    decode: np.ndarray
    kv: np.ndarray
    prefill: np.ndarray
    chunks: list[tuple[int, int, int]]
    counts: np.ndarray
    source: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        return self.decode + self.prefill

    def half(self, first: bool) -> StepLoad:
        """One of two micro-batches: the sequences of each replica cut in two."""
        decode = (self.decode + 1) // 2 if first else self.decode // 2
        chunks = self.chunks[0::2] if first else self.chunks[1::2]
        prefill = np.zeros_like(self.prefill)
        for replica, tokens, _ in chunks:
            prefill[replica] += tokens
        share = float((decode.sum() + prefill.sum()) / max(int(self.decode.sum() + self.prefill.sum()), 1))
        counts = _scaled(self.counts, share, 0.5 if first else 0.0)
        source = None if self.source is None else _scaled(self.source, share, 0.0)
        return StepLoad(decode, self.kv, prefill, chunks, counts, source)


def _scaled(counts: np.ndarray, share: float, offset: float) -> np.ndarray:
    """``np.floor(counts * share + offset)`` as int64 counts, compiled (:func:`scaled_floor`)."""
    counts = np.ascontiguousarray(counts)
    out = np.empty(counts.shape, dtype=np.int64)
    scaled_floor(counts.reshape(-1), share, offset, out.reshape(-1))
    return out


@dataclass
class StepCost:
    """Seconds of one step and where they went. Per-device arrays are over the group's devices."""

    duration: float
    attention: np.ndarray  # compute seconds outside the routed experts (attention, dense, shared, head)
    experts: np.ndarray  # routed-expert seconds
    comm: np.ndarray  # all-to-all (or gather / scatter) seconds the device's links are busy
    slots: int  # routed slots (computed + dropped)
    dropped: int
    rank_slots: np.ndarray  # [ep ranks] slots received, summed over layers
    spans: list = field(default_factory=list)  # (device, stream, name, start, end) when asked


def _gemm_tables(device, default_dtype: str):
    """A stand-in for ``LayerCosting._gemm`` (``gemm(name, tokens, n, k, dtype=None)``) that
    costs each GEMM shape ``(name, n, k, dtype)`` for every row count up to a power of two in
    one array call of :func:`gemm_time` and reads row counts' seconds from that table (one
    element, or a gather for an array of them): a run meets thousands of row counts of the
    same few shapes, and one array call costs what two scalar ones do. Only the time is kept:
    the step model reads nothing else."""
    tables: dict = {}

    def cached(name: str, tokens, n: int, k: int, dtype: str | None = None) -> OpCost:
        key = (name, n, k, dtype)
        table = tables.get(key)
        top = int(tokens.max(initial=0)) if isinstance(tokens, np.ndarray) else tokens
        if table is None or top >= table.size:
            rows = np.maximum(np.arange(max(1024, 1 << int(top).bit_length())), 1)
            table = tables[key] = gemm_time(device, rows, n, k, dtype or default_dtype, name=name).time
        return OpCost(name, table[tokens] if isinstance(tokens, np.ndarray) else float(table[tokens]))
    return cached


class StepModel:
    """Costs steps of one serving group of ``layout`` on ``devices`` (topology node names)."""

    def __init__(self, arch: ModelArch, cluster, layout: Layout, devices: list[str], *, dtype: str, expert_dtype: str,
                 kv_dtype: str, placement: Placement | None, dispatch: Dispatch, overlap: str = "none",
                 all_to_all: str = "auto"):
        if layout.pp > 1:
            raise InputError("pipeline parallelism (pp > 1) is not simulated yet; moesim estimate costs it", field="parallel.pp")
        if any(layer.encoder for layer in arch.layers):
            raise InputError(f"{arch.name} is an encoder-decoder model; the serving simulator runs decoder-only models",
                             field="model")
        if arch.is_moe and layout.ep == 1 and layout.dp > 1 and layout.expert_tp == layout.tp:
            raise InputError("DP replicas without expert parallelism never synchronise: simulate one replica (dp: 1) "
                             "and scale, or use EP", field="parallel.dp")
        if overlap not in OVERLAP:
            raise InputError(f"unknown overlap policy {overlap!r}; expected one of {', '.join(OVERLAP)}", field="policies.overlap")
        self.arch, self.layout, self.overlap = arch, layout, overlap
        self.costing = c = LayerCosting(arch, cluster, layout, Workload(1, 1, 1), dtype, expert_dtype, kv_dtype,
                                        group_sequences=1, devices=devices)
        self.device = c.device
        # A run asks for the same GEMM shapes over and over in new combinations (every step's
        # (tokens, prompt tokens) pair per replica costs the projections anew): this model's
        # costing reads each GEMM, a pure function of its shape on the one device, from a table.
        c._gemm = _gemm_tables(c.device, c.dtype)
        self.devices = list(devices)
        self.replicas = layout.dp
        self.layers = list(arch.layers)
        self.is_moe = np.array([layer.moe for layer in self.layers])
        self.num_moe_layers = int(self.is_moe.sum())
        self.windows = sorted({layer.window or 0 for layer in self.layers})
        self.window_of = np.array([self.windows.index(layer.window or 0) for layer in self.layers])
        self.window_layers = [next(layer for layer in self.layers if (layer.window or 0) == window) for window in self.windows]
        # the layers each MoE layer's barrier closes (from the one after the previous MoE layer)
        # and the tail after the last
        ends = np.flatnonzero(self.is_moe)
        self.segment_starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if ends.size else ends
        self.tail_start = int(ends[-1]) + 1 if ends.size else 0
        self.placement, self.dispatch = placement, dispatch
        moe = arch.moe
        self.a2a = None
        if moe is not None and layout.ep > 1:
            group = c.ep_group
            algorithm = c.a2a_algorithm(group) if all_to_all == "auto" else all_to_all
            self.a2a = AllToAll(c.graph, group, algorithm)
            per_expert = (3 if moe.gated else 2) * arch.hidden * moe.expert_inter
            self.expert_bytes = per_expert * weight_bytes_per_param(expert_dtype) / layout.expert_tp
            # source EP rank i belongs to the replica of its first device; a slot goes out at the
            # dispatch's element size and comes back in bf16
            self._replica_of_rank = (np.arange(layout.ep) * layout.expert_tp) // layout.tp
            self._ranks_per_replica = max(1, layout.tp // layout.expert_tp)
            self._bytes_out = arch.hidden * c.dispatch_element_bytes
            self._bytes_back = arch.hidden * dtype_bytes("bf16")
        self._memo: dict = {}
        self._tables: dict[str, np.ndarray] = {}  # _per_replica's seconds per token count
        self.two_microbatch = overlap == "two_microbatch" and arch.is_moe
        # each device's replica, and the column of the experts' seconds it reads (its EP rank)
        self._device_replica = np.arange(len(self.devices)) // layout.tp
        self._device_experts = np.arange(len(self.devices)) // layout.expert_tp if self.a2a is not None else self._device_replica
        # what each layer adds to its attention block, per replica, from the replica's tokens:
        # column 0 nothing, then each dense FFN width, then the MoE layers' router (with the
        # shared experts beside it in the last column); one table over tokens holds them all
        # (_per_replica)
        first_of_width: dict[int, object] = {}
        for layer in self.layers:
            if not layer.moe:
                first_of_width.setdefault(layer.dense_inter, layer)
        widths = sorted(first_of_width)
        self._column_ops = [lambda t: []] + [lambda t, layer=first_of_width[inter]: c.dense_block(layer, t) for inter in widths]
        self.addend_of = np.array([1 + len(widths) if layer.moe else 1 + widths.index(layer.dense_inter) for layer in self.layers])
        self.shared_of = np.zeros(len(self.layers), dtype=np.int64)
        if arch.is_moe:
            self._column_ops += [c.moe_pre, c.moe_shared]
            self.shared_of[self.is_moe] = 2 + len(widths)

    # -- memoised pieces that depend only on token counts ---------------------------------------
    def _sum(self, key, make) -> float:
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = float(sum(op.time for op in make()))
        return value

    def _per_replica(self, name: str, tokens: np.ndarray, makes: list) -> np.ndarray:
        """``[replicas, len(makes)]``: seconds of each ``make(t)`` for each replica's ``t`` tokens
        (none: 0), read from a table over ``t`` that grows to the largest ``t`` met (doubling,
        its new rows costed in one array call of each ``make``), so a step reads its replicas in
        one gather and a run costs each shape a handful of times, not once per token count."""
        table = self._tables.get(name)
        top = int(tokens.max(initial=0))
        if table is None or table.shape[0] <= top:
            size = max(1024, 1 << top.bit_length())
            grown = np.empty((size, len(makes)))
            start = 1 if table is None else table.shape[0]
            if table is None:
                grown[0] = 0.0
            else:
                grown[:start] = table
            new = np.arange(start, size)
            for j, make in enumerate(makes):
                grown[start:, j] = sum(op.time for op in make(new))
            self._tables[name] = table = grown
        return table[tokens]

    def _decode_cores(self, decode: np.ndarray, kv: np.ndarray) -> np.ndarray:
        """``[loads, windows, replicas]``: seconds of decode attention per replica, from each
        replica's ``decode`` sequences and their mean ``kv`` cached tokens ``[loads, replicas]``;
        the cost model works element by element over arrays, so every load's replicas go in one
        call."""
        out = np.zeros((decode.shape[0], len(self.windows), decode.shape[1]))
        decoding = decode > 0
        if decoding.any():
            batch, kv = np.maximum(decode, 1), np.maximum(kv, 1)
            for w, layer in enumerate(self.window_layers):
                out[:, w] = np.where(decoding, self.costing.decode_core(layer, batch, kv).time, 0.0)
        return out

    def _attention(self, loads: list[StepLoad], tokens: np.ndarray, prefill: np.ndarray, decode: np.ndarray) -> np.ndarray:
        """``[loads, windows, replicas]``: the attention block per replica for each sliding window,
        from each replica's ``tokens`` and prompt tokens ``prefill`` ``[loads, replicas]`` and its
        decode attention ``decode`` (:meth:`_decode_cores`, added to in place)."""
        c, n = self.costing, len(loads)
        # the projections of (tokens, prompt tokens): decode-only replicas read a table over
        # tokens, the few with prompt tokens a memo of the pair
        prefilling = prefill > 0
        proj = self._per_replica("proj", np.where(prefilling, 0, tokens).reshape(-1),
                                 [lambda t: sum(c.projections(t, 0), [])]).reshape(n, -1)
        where = np.nonzero(prefilling)
        if where[0].size:
            pairs = list(zip(tokens[where].tolist(), prefill[where].tolist()))
            memo = self._memo
            new = [pair for pair in dict.fromkeys(pairs) if ("proj", *pair) not in memo]
            if new:  # costed in one array call
                t, p = np.array(new).T
                for pair, seconds in zip(new, sum(op.time for op in sum(c.projections(t, p), [])).tolist()):
                    memo[("proj", *pair)] = seconds
            proj[where] = [memo[("proj", *pair)] for pair in pairs]
        for w, (window, layer) in enumerate(zip(self.windows, self.window_layers)):
            for i, load in enumerate(loads):
                for replica, chunk, context in load.chunks:
                    decode[i, w, replica] += self._sum(("prefill", window, chunk, context),
                                                       lambda: [c.prefill_core(layer, 1, chunk, context)])
        decode += proj[:, None, :]
        return decode

    def _phases(self, load: StepLoad) -> dict:
        """Per layer and rank: compute before the barrier, shared experts, dispatch, experts,
        combine; and the tail after the last MoE layer."""
        return {key: value[0] for key, value in self._phases_many([load]).items()}

    def _phases_many(self, loads: list[StepLoad]) -> dict:
        """:meth:`_phases` of several loads (the two micro-batches of a step), each value stacked
        over the loads (``[loads, ...]``): their layers are costed in one pass, the expert-parallel
        ones as if they were one step of twice the layers."""
        c, arch, lay = self.costing, self.arch, self.layout
        M = self.num_moe_layers
        n, R = len(loads), self.replicas
        decode, prefill = np.stack([load.decode for load in loads]), np.stack([load.prefill for load in loads])
        tokens = decode + prefill
        # every layer's attention block plus its dense FFN or router, and the shared experts beside
        # MoE layers, per replica: [loads, layers, replicas]
        columns = self._per_replica("columns", tokens.reshape(-1), self._column_ops).reshape(n, R, -1).transpose(0, 2, 1)
        attention = self._attention(loads, tokens, prefill, self._decode_cores(decode, np.stack([load.kv for load in loads])))
        # the LM head runs on each decode token and on one position of each prompt chunk
        finishing = decode.copy()
        for i, load in enumerate(loads):
            for replica, _, _ in load.chunks:
                finishing[i, replica] += 1
        ph = dict(A=attention[:, self.window_of] + columns[:, self.addend_of], S=columns[:, self.shared_of],
                  head=self._per_replica("lm_head", finishing.reshape(-1), [lambda t: [c.lm_head(t)]]).reshape(n, R),
                  slots=np.array([load.counts.sum() for load in loads], dtype=np.int64))
        if not M:
            return ph | dict(X=np.zeros((n, 0, R)), D=np.zeros((n, 0)), C=np.zeros((n, 0)), comm=np.zeros((n, len(self.devices))),
                             dropped=np.zeros(n, dtype=np.int64), rank_slots=np.zeros((n, R)))
        moe = arch.moe
        kw = dict(hidden=arch.hidden, inter=moe.expert_inter, dtype=c.expert_dtype, expert_tp=lay.expert_tp, gated=moe.gated)
        if self.a2a is not None:
            return ph | self._expert_parallel(loads, tokens, kw)
        X, D, C = np.zeros((n, M, R)), np.zeros((n, M)), np.zeros((n, M))
        comm, rank_slots = np.zeros((n, len(self.devices))), np.zeros((n, R))
        for i, load in enumerate(loads):
            if lay.expert_tp > lay.tp:  # every replica computes a shard of every expert over the group's tokens
                group = int(tokens[i].sum())
                X[i] = expert_times(self.device, load.counts, tokens=max(group, 1), top_k=moe.top_k, **kw)[:, None]
                gather = self._sum(("gather", group), lambda: [c.moe_gather_scatter(group)[0]]) if group else 0.0
                scatter = self._sum(("scatter", group), lambda: [c.moe_gather_scatter(group)[1]]) if group else 0.0
                D[i], C[i] = gather, scatter
                comm[i] = M * (gather + scatter)
                rank_slots[i] = float(load.counts.sum())
            else:
                per_replica = load.source if load.source is not None else self._split(load.counts, tokens[i])
                X[i] = np.where(tokens[i][None, :] > 0, expert_times(self.device, np.moveaxis(per_replica, 0, 1),
                                                                    tokens=np.maximum(tokens[i], 1)[None, :],
                                                                    top_k=moe.top_k, **kw), 0.0)
                rank_slots[i] = per_replica.sum(axis=(1, 2))
        return ph | dict(X=X, D=D, C=C, comm=comm, dropped=np.zeros(n, dtype=np.int64), rank_slots=rank_slots)

    def _split(self, counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``[replicas, layers, experts]``: the group's counts shared out in proportion to tokens."""
        R = self.replicas
        if R == 1:
            return counts[None]
        share = tokens / max(tokens.sum(), 1)
        out = np.stack([np.floor(counts * s).astype(np.int64) for s in share])
        out[int(share.argmax())] += counts - out.sum(axis=0)
        return out

    def _expert_parallel(self, loads: list[StepLoad], tokens: np.ndarray, kw: dict) -> dict:
        """Stacked over the loads (each replica's ``tokens`` ``[loads, replicas]``): expert
        seconds ``X`` ``[loads, layers, ep]``, dispatch and combine seconds ``D``, ``C``
        ``[loads, layers]``, link-busy seconds per device ``comm``, slots ``dropped`` and slots per
        rank ``rank_slots``. The loads' layers are stacked (``[loads * layers, ...]``) so that
        placement, dispatch, expert kernels and the all-to-all run once for all of them."""
        lay = self.layout
        ep, n = lay.ep, len(loads)
        M = loads[0].counts.shape[0]
        counts = loads[0].counts if n == 1 else np.concatenate([ld.counts for ld in loads])
        if n == 1 or self.placement.phy2log.shape[0] == 1:
            physical = self.placement.split(counts)
        else:  # a per-layer placement: split each load on its own layers
            physical = np.concatenate([self.placement.split(ld.counts) for ld in loads])
        computed, dropped, moved = self.dispatch.assign(physical, ep, self.expert_bytes)
        rows = computed.reshape(n * M, ep, -1)
        X = expert_times(self.device, rows, **kw)
        recv = rank_slots(np.ascontiguousarray(rows), X)  # [n * M, ep] slots each rank computes; X zeroed without
        replica_of_rank, ranks_per_replica = self._replica_of_rank, self._ranks_per_replica
        a2a, bytes_out, bytes_back = self.a2a, self._bytes_out, self._bytes_back
        # source rank i sends its replica's share of the tokens, split over the replica's ranks: [n, ep]
        tokens = tokens.astype(np.float64)
        share = tokens[:, replica_of_rank] / ranks_per_replica / np.maximum(tokens.sum(axis=1), 1)[:, None]
        if moved is None and all(ld.source is None for ld in loads):
            # count level: source i sends share[i] of every rank's slots (a rank-one matrix)
            d_rank, c_rank = (x.reshape(n * M, ep) for x in a2a.rank_times_rank_one(share, recv.reshape(n, M, ep), bytes_out, bytes_back))
        else:
            d_rank, c_rank = np.empty_like(recv), np.empty_like(recv)
            for i, load in enumerate(loads):
                part = slice(i * M, (i + 1) * M)
                if load.source is not None:
                    per_source = np.stack([self.placement.split(src).reshape(M, ep, -1).sum(axis=2) for src in load.source], axis=1)
                    kept = np.divide(recv[part], np.maximum(per_source.sum(axis=1), 1))  # dispatch drops / moves, per destination
                    matrix = (per_source * kept[:, None, :])[:, replica_of_rank, :] / ranks_per_replica
                else:
                    matrix = share[i][None, :, None] * recv[part][:, None, :]
                dispatch = matrix * bytes_out + (moved[part] if moved is not None else 0.0)
                combine = np.swapaxes(matrix, 1, 2) * bytes_back
                d_rank[part], c_rank[part] = a2a.rank_times(dispatch), a2a.rank_times(combine)
        # a layer whose ranks compute slots is one where slots move (and pays the latency)
        D, C, busy, received = exchange_maxima(d_rank, c_rank, recv, float(a2a.latency), n)
        return dict(X=X.reshape(n, M, ep), D=D.reshape(n, M), C=C.reshape(n, M), comm=np.repeat(busy, lay.expert_tp, axis=1),
                    dropped=dropped.reshape(n, M).sum(axis=1), rank_slots=received)

    # -- the step ---------------------------------------------------------------------------
    def cost(self, load: StepLoad, *, detail: bool = False) -> StepCost:
        """The step's duration and per-device busy seconds; ``detail`` also returns the spans of
        every layer on every device (for a timeline)."""
        if self.two_microbatch:
            ph = self._phases_many([load.half(True), load.half(False)])
            duration, spans = self._two_microbatch(ph, detail)
        else:
            ph = self._phases_many([load])
            duration, spans = self._sequential({key: value[0] for key, value in ph.items()}, detail)
        attention, experts = busy_seconds(ph["A"], ph["S"], ph["head"], ph["X"])
        return StepCost(duration, attention[self._device_replica], experts[self._device_experts], ph["comm"].sum(axis=0),
                        int(ph["slots"].sum()), int(ph["dropped"].sum()), ph["rank_slots"].sum(axis=0), spans)

    def _segments(self, ph: dict, exclude_shared: bool) -> np.ndarray:
        """``[moe layers, replicas]``: compute each replica runs before each MoE layer's barrier."""
        A = ph["A"] if exclude_shared else ph["A"] + ph["S"]
        # the last segment ends at the last MoE layer: the layers after it are the tail's
        A = A[:self.tail_start]
        return np.add.reduceat(A, self.segment_starts, axis=0) if self.segment_starts.size else np.zeros((0, A.shape[1]))

    def _tail(self, ph: dict) -> np.ndarray:
        """``[..., replicas]``: the layers after the last MoE layer and the LM head."""
        return ph["A"][..., self.tail_start:, :].sum(axis=-2) + ph["head"]

    def _sequential(self, ph: dict, detail: bool):
        shared = self.overlap == "shared_expert"
        seg = self._segments(ph, shared)
        X, D, C, S = ph["X"], ph["D"], ph["C"], ph["S"][self.is_moe]
        opened = seg.max(axis=1) if seg.size else np.zeros(0)
        exchange = np.maximum(D, S.max(axis=1)) if shared and S.size else D
        per_layer = opened + exchange + (X.max(axis=1) if X.size else 0.0) + C
        tail = self._tail(ph)
        duration = float(per_layer.sum() + tail.max())
        spans = self._spans(ph, seg, exchange, tail) if detail else []
        return duration, spans

    def _spans(self, ph: dict, seg: np.ndarray, exchange: np.ndarray, tail: np.ndarray) -> list:
        lay = self.layout
        out = []
        t = 0.0
        X, D, C = ph["X"], ph["D"], ph["C"]
        per_device_x = self.a2a is not None
        for m in range(seg.shape[0]):
            out += [(d, "compute", "attention", t, t + seg[m, d // lay.tp]) for d in range(len(self.devices))]
            t += seg[m].max()
            if D[m]:
                out += [(d, "comm", "dispatch", t, t + D[m]) for d in range(len(self.devices))]
            t += exchange[m]
            for d in range(len(self.devices)):
                col = d // lay.expert_tp if per_device_x else d // lay.tp
                out.append((d, "compute", "experts", t, t + X[m, col]))
            t += X[m].max()
            if C[m]:
                out += [(d, "comm", "combine", t, t + C[m]) for d in range(len(self.devices))]
            t += C[m]
        for d in range(len(self.devices)):
            out.append((d, "compute", "attention+head", t, t + tail[d // lay.tp]))
        return out

    def _two_microbatch(self, halves: dict, detail: bool):
        """The step's duration (and spans) from both halves' :meth:`_phases_many`."""
        # each half's slowest replica before each MoE layer's dispatch, shared experts included
        segs = segment_maxima(halves["A"], halves["S"], self.segment_starts, self.tail_start)
        xs = halves["X"].max(axis=2)
        tail = self._tail(halves).max() * 2
        if not detail:  # the compiled recurrence; the loop below is its reference and records spans
            return float(two_microbatch_end(segs, xs, halves["D"], halves["C"]) + tail), []
        comp = comm = 0.0
        done = [0.0, 0.0]  # each half's last combine
        spans = []
        for m in range(segs[0].size):
            ends = []
            for i in (0, 1):
                start = max(comp, done[i])
                comp = start + segs[i][m]
                d_start = max(comm, comp)
                comm = d_start + halves["D"][i][m]
                ends.append(comm)
                spans += [(-1, "compute", f"attention mb{i}", start, comp), (-1, "comm", f"dispatch mb{i}", d_start, comm)]
            for i in (0, 1):
                start = max(comp, ends[i])
                comp = start + xs[i][m]
                c_start = max(comm, comp)
                comm = c_start + halves["C"][i][m]
                done[i] = comm
                spans += [(-1, "compute", f"experts mb{i}", start, comp), (-1, "comm", f"combine mb{i}", c_start, comm)]
        duration = float(max(comp, comm) + tail)
        spans.append((-1, "compute", "attention+head", max(comp, comm), duration))
        return duration, [(d, *s[1:]) for s in spans for d in range(len(self.devices))]
