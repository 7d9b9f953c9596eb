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
from moesim.sim.kernels import exchange_maxima, rank_slots, scaled_floor, segment_maxima, two_microbatch_end
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
        def cut(x):
            return (x + 1) // 2 if first else x // 2
        chunks = self.chunks[0::2] if first else self.chunks[1::2]
        prefill = np.zeros_like(self.prefill)
        for replica, tokens, _ in chunks:
            prefill[replica] += tokens
        total = max(int(self.tokens.sum()), 1)
        share = (cut(self.decode) + prefill).sum() / total
        counts = _scaled(self.counts, float(share), 0.5 if first else 0.0)
        source = None if self.source is None else _scaled(self.source, float(share), 0.0)
        return StepLoad(cut(self.decode), self.kv, prefill, chunks, counts, source)


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
    one array call of :func:`gemm_time` and reads a row count's seconds from that table: a run
    meets thousands of row counts of the same few shapes, and one array call costs what two
    scalar ones do. Only the time is kept: the step model reads nothing else."""
    tables: dict = {}

    def cached(name: str, tokens, n: int, k: int, dtype: str | None = None) -> OpCost:
        if np.ndim(tokens):
            return gemm_time(device, np.maximum(tokens, 1), n, k, dtype or default_dtype, name=name)
        key = (name, n, k, dtype)
        table = tables.get(key)
        if table is None or tokens >= table.size:
            rows = np.maximum(np.arange(max(1024, 1 << int(tokens).bit_length())), 1)
            table = tables[key] = gemm_time(device, rows, n, k, dtype or default_dtype, name=name).time
        return OpCost(name, float(table[tokens]))
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
        self.windows = sorted({layer.window or 0 for layer in self.layers})
        self.window_of = np.array([self.windows.index(layer.window or 0) for layer in self.layers])
        self.window_layers = [next(layer for layer in self.layers if (layer.window or 0) == window) for window in self.windows]
        self.dense_layers = np.flatnonzero(~self.is_moe)
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
        self._memo: dict = {}
        self._tables: dict[str, np.ndarray] = {}  # _per_replica's seconds per token count

    # -- memoised pieces that depend only on token counts ---------------------------------------
    def _sum(self, key, make) -> float:
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = float(sum(op.time for op in make()))
        return value

    def _per_replica(self, name: str, tokens: np.ndarray, make) -> np.ndarray:
        """Seconds of ``make(t)`` for each replica's ``t`` tokens (none: 0), each ``t`` costed
        once and kept in an array over ``t`` (NaN: not met yet), so a step reads its replicas
        in one gather."""
        table = self._tables.get(name)
        top = int(tokens.max(initial=0))
        if table is None or table.size <= top:
            grown = np.full(max(1024, 1 << top.bit_length()), np.nan)
            grown[0] = 0.0
            if table is not None:
                grown[:table.size] = table
            self._tables[name] = table = grown
        values = table[tokens]
        missing = np.isnan(values)
        if missing.any():
            for t in np.unique(tokens[missing]).tolist():
                table[t] = float(sum(op.time for op in make(t)))
            values = table[tokens]
        return values

    def _decode_cores(self, loads: list[StepLoad]) -> np.ndarray:
        """``[loads, windows, replicas]``: seconds of decode attention per replica; the cost model
        works element by element over arrays, so every load's replicas go in one call."""
        R = self.replicas
        out = np.zeros((len(loads), len(self.windows), R))
        decode = np.concatenate([load.decode for load in loads])
        decoding = decode > 0
        if decoding.any():
            batch, kv = np.maximum(decode, 1), np.maximum(np.concatenate([load.kv for load in loads]), 1)
            for w, layer in enumerate(self.window_layers):
                out[:, w] = np.where(decoding, self.costing.decode_core(layer, batch, kv).time, 0.0).reshape(len(loads), R)
        return out

    def _attention(self, load: StepLoad, decode: np.ndarray) -> np.ndarray:
        """``[windows, replicas]``: the attention block per replica for each sliding window, from
        its decode attention ``decode`` (:meth:`_decode_cores`)."""
        c = self.costing
        tokens = load.tokens
        # the projections of (tokens, prompt tokens): decode-only replicas read a table over
        # tokens, the few with prompt tokens a memo of the pair
        prefilling = load.prefill > 0
        proj = self._per_replica("proj", np.where(prefilling, 0, tokens), lambda t: sum(c.projections(t, 0), []))
        for r in np.flatnonzero(prefilling).tolist():
            t, p = int(tokens[r]), int(load.prefill[r])
            proj[r] = self._sum(("proj", t, p), lambda: sum(c.projections(t, p), []))
        out = np.zeros_like(decode)
        for w, (window, layer) in enumerate(zip(self.windows, self.window_layers)):
            core = decode[w].copy()
            for replica, chunk, context in load.chunks:
                core[replica] += self._sum(("prefill", window, chunk, context),
                                           lambda: [c.prefill_core(layer, 1, chunk, context)])
            out[w] = proj + core
        return out

    def _phases(self, load: StepLoad) -> dict:
        """Per layer and rank: compute before the barrier, shared experts, dispatch, experts,
        combine; and the tail after the last MoE layer."""
        return self._phases_many([load])[0]

    def _phases_many(self, loads: list[StepLoad]) -> list[dict]:
        """:meth:`_phases` of several loads (the two micro-batches of a step): their expert-parallel
        layers are costed in one pass, as if they were one step of twice the layers."""
        c, arch, lay = self.costing, self.arch, self.layout
        M = int(self.is_moe.sum())
        ep = lay.ep
        kw = None
        if M:
            moe = arch.moe
            kw = dict(hidden=arch.hidden, inter=moe.expert_inter, dtype=c.expert_dtype, expert_tp=lay.expert_tp, gated=moe.gated)
        out = []
        for load, decode in zip(loads, self._decode_cores(loads)):
            tokens = load.tokens
            attention = self._attention(load, decode)  # [windows, R]
            A = attention[self.window_of]  # [layers, R]
            S = np.zeros_like(A)
            dense: dict[str, np.ndarray] = {}  # dense layers of one width cost the same
            for l in self.dense_layers:
                layer = self.layers[l]
                name = f"dense{layer.dense_inter}"
                if name not in dense:
                    dense[name] = self._per_replica(name, tokens, lambda t, layer=layer: c.dense_block(layer, t))
                A[l] += dense[name]
            X = np.zeros((M, max(ep, 1) if self.a2a is not None else self.replicas))
            D = np.zeros(M)
            C = np.zeros(M)
            comm = np.zeros(len(self.devices))
            dropped = 0
            slots = int(load.counts.sum())
            rank_slots = np.zeros(X.shape[1])
            if M:
                pre = self._per_replica("moe_pre", tokens, c.moe_pre)
                shared = self._per_replica("moe_shared", tokens, c.moe_shared)
                A[self.is_moe] += pre
                S[self.is_moe] = shared
                if self.a2a is not None:
                    pass  # below, all loads at once
                elif lay.expert_tp > lay.tp:
                    group = int(tokens.sum())
                    X = np.broadcast_to(expert_times(self.device, load.counts, tokens=max(group, 1), top_k=moe.top_k, **kw)[:, None],
                                        (M, self.replicas)).copy()
                    gather = self._sum(("gather", group), lambda: [c.moe_gather_scatter(group)[0]]) if group else 0.0
                    scatter = self._sum(("scatter", group), lambda: [c.moe_gather_scatter(group)[1]]) if group else 0.0
                    D[:], C[:] = gather, scatter
                    comm[:] = M * (gather + scatter)
                    rank_slots = np.full(self.replicas, float(load.counts.sum()))
                else:
                    per_replica = load.source if load.source is not None else self._split(load.counts, tokens)
                    X = expert_times(self.device, np.moveaxis(per_replica, 0, 1), tokens=np.maximum(tokens, 1)[None, :],
                                     top_k=moe.top_k, **kw)
                    X = np.where(tokens[None, :] > 0, X, 0.0)
                    rank_slots = per_replica.sum(axis=(1, 2)).astype(np.float64)
            finishing = np.bincount(np.array([ch[0] for ch in load.chunks], dtype=np.int64), minlength=self.replicas)
            head = self._per_replica("lm_head", load.decode + finishing,
                                     lambda t: [c.lm_head(t)])
            out.append(dict(A=A, S=S, X=X, D=D, C=C, head=head, comm=comm, dropped=dropped, slots=slots, rank_slots=rank_slots))
        if M and self.a2a is not None:
            for ph, (X, D, C, comm, dropped, rank_slots) in zip(out, self._expert_parallel(loads, kw)):
                ph.update(X=X, D=D, C=C, comm=comm, dropped=dropped, rank_slots=rank_slots)
        return out

    def _split(self, counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``[replicas, layers, experts]``: the group's counts shared out in proportion to tokens."""
        R = self.replicas
        if R == 1:
            return counts[None]
        share = tokens / max(tokens.sum(), 1)
        out = np.stack([np.floor(counts * s).astype(np.int64) for s in share])
        out[int(share.argmax())] += counts - out.sum(axis=0)
        return out

    def _expert_parallel(self, loads: list[StepLoad], kw: dict) -> list[tuple]:
        """For each load: expert seconds ``[layers, ep]``, dispatch and combine seconds
        ``[layers]``, link-busy seconds per device, slots dropped and slots per rank. The loads'
        layers are stacked (``[loads * layers, ...]``) so that placement, dispatch, expert
        kernels and the all-to-all run once for all of them."""
        lay, h = self.layout, self.arch.hidden
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
        # source EP rank i belongs to the replica of its first device
        replica_of_rank = (np.arange(ep) * lay.expert_tp) // lay.tp
        ranks_per_replica = max(1, lay.tp // lay.expert_tp)
        a2a, bytes_out, bytes_back = self.a2a, h * self.costing.dispatch_element_bytes, h * dtype_bytes("bf16")
        share = np.stack([self._source_share(ld, replica_of_rank, ranks_per_replica) for ld in loads])  # [n, ep]
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
        return [(X[i * M:(i + 1) * M], D[i * M:(i + 1) * M], C[i * M:(i + 1) * M], np.repeat(busy[i], lay.expert_tp),
                 int(dropped[i * M:(i + 1) * M].sum()), received[i]) for i in range(n)]

    @staticmethod
    def _source_share(load: StepLoad, replica_of_rank: np.ndarray, ranks_per_replica: int) -> np.ndarray:
        tokens = load.tokens.astype(np.float64)
        return tokens[replica_of_rank] / ranks_per_replica / max(tokens.sum(), 1)

    # -- the step ---------------------------------------------------------------------------
    def cost(self, load: StepLoad, *, detail: bool = False) -> StepCost:
        """The step's duration and per-device busy seconds; ``detail`` also returns the spans of
        every layer on every device (for a timeline)."""
        if self.overlap == "two_microbatch" and self.arch.is_moe:
            halves = self._phases_many([load.half(True), load.half(False)])
            duration, spans = self._two_microbatch(halves, detail)
            ph = {key: halves[0][key] + halves[1][key] for key in ("A", "S", "X", "head", "comm", "slots", "dropped", "rank_slots")}
        else:
            ph = self._phases(load)
            duration, spans = self._sequential(ph, detail)
        lay = self.layout
        rep = np.arange(len(self.devices)) // lay.tp
        attention = (ph["A"].sum(axis=0) + ph["S"].sum(axis=0) + ph["head"])[rep]
        if self.a2a is not None:
            experts = ph["X"].sum(axis=0)[np.arange(len(self.devices)) // lay.expert_tp]
        else:
            experts = ph["X"].sum(axis=0)[rep]
        return StepCost(duration, attention, experts, ph["comm"], ph["slots"], ph["dropped"], ph["rank_slots"], spans)

    def _segments(self, ph: dict, exclude_shared: bool) -> np.ndarray:
        """``[moe layers, replicas]``: compute each replica runs before each MoE layer's barrier."""
        A = ph["A"] if exclude_shared else ph["A"] + ph["S"]
        # the last segment ends at the last MoE layer: the layers after it are the tail's
        A = A[:self.tail_start]
        return np.add.reduceat(A, self.segment_starts, axis=0) if self.segment_starts.size else np.zeros((0, A.shape[1]))

    def _tail(self, ph: dict) -> np.ndarray:
        return ph["A"][self.tail_start:].sum(axis=0) + ph["head"]

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

    def _two_microbatch(self, halves: list[dict], detail: bool):
        # each half's slowest replica before each MoE layer's dispatch, shared experts included
        segs = np.stack([segment_maxima(h["A"][:self.tail_start], h["S"][:self.tail_start], self.segment_starts) for h in halves])
        xs = np.stack([h["X"].max(axis=1) for h in halves])
        tail = max(self._tail(h).max() for h in halves) * 2
        if not detail:  # the compiled recurrence; the loop below is its reference and records spans
            end = two_microbatch_end(segs, xs, np.stack([halves[0]["D"], halves[1]["D"]]),
                                     np.stack([halves[0]["C"], halves[1]["C"]]))
            return float(end + tail), []
        comp = comm = 0.0
        done = [0.0, 0.0]  # each half's last combine
        spans = []
        for m in range(segs[0].size):
            ends = []
            for i in (0, 1):
                start = max(comp, done[i])
                comp = start + segs[i][m]
                d_start = max(comm, comp)
                comm = d_start + halves[i]["D"][m]
                ends.append(comm)
                if detail:
                    spans += [(-1, "compute", f"attention mb{i}", start, comp), (-1, "comm", f"dispatch mb{i}", d_start, comm)]
            for i in (0, 1):
                start = max(comp, ends[i])
                comp = start + xs[i][m]
                c_start = max(comm, comp)
                comm = c_start + halves[i]["C"][m]
                done[i] = comm
                if detail:
                    spans += [(-1, "compute", f"experts mb{i}", start, comp), (-1, "comm", f"combine mb{i}", c_start, comm)]
        duration = float(max(comp, comm) + tail)
        if detail:
            spans.append((-1, "compute", "attention+head", max(comp, comm), duration))
            spans = [(d, *s[1:]) for s in spans for d in range(len(self.devices))]
        return duration, spans
