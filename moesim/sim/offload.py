"""Expert offloading in a serving step: which experts are in HBM, what is copied, what waits.

:class:`OffloadStepModel` wraps a one-GPU :class:`~moesim.sim.step.StepModel` (the offloading
regime: batch-1 or small-batch decoding) and replaces its routed-expert time with a per-layer
expert-availability model:

1. the residency policy (:mod:`moesim.sim.cache`) judges each layer's needed experts against its
   HBM slots, after the prefetcher's (:mod:`moesim.sim.prefetch`) copies for the layer were
   placed;
2. the miss policy (:mod:`moesim.sim.miss`) sends each miss to a full- or low-precision copy or
   to the CPU;
3. a timeline over the layers: each layer's attention, router and shared experts run on the GPU;
   when the router is done the layer's demand copies and the next layer's prefetch copies queue
   on the host-to-device copy engine (FIFO, at the pinned or pageable PCIe rate, after any
   earlier copies still in flight; SSD-resident experts first cross the NVMe link, pipelined);
   the GPU computes its experts one after another as their weights arrive (the wait is the
   *stall*); CPU experts get their tokens' activations over the device-to-host engine (the two
   directions contend: :func:`moesim.cost.offload.two_flows`), run on the host
   (:func:`moesim.cost.offload.cpu_expert_times`), and send their outputs back; the layer ends
   when both sides are done.

Copies still queued when a step ends delay the next step's copies (the engine runs steps back to
back while it is busy). Every step adds to the run's offload counters: per-layer hits and
accesses, copies, bytes per tier and link, stall, CPU seconds (:meth:`OffloadStepModel.report`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from moesim.cost.moe import expert_times
from moesim.cost.offload import HostLink, cpu_expert_times, two_flows
from moesim.sim.cache import NEVER, Residency
from moesim.sim.miss import OnMiss
from moesim.sim.prefetch import Prefetch, StepRouting
from moesim.sim.step import StepCost, StepLoad, StepModel
from moesim.sim.tiers import TierPlan


@numba.njit(cache=True)
def _copy(at, nbytes, from_ssd, state, h2d_rate, latency, ssd_rate, ssd_latency):
    """Queue one copy issued at ``at`` on the H2D engine (``state[0]`` its free time; ``state[1]``
    the SSD's). Returns its start and arrival times on the engine."""
    if from_ssd:
        s0 = max(state[1], at)
        read_done = s0 + ssd_latency + nbytes / ssd_rate
        state[1] = read_done
        start = max(state[0], s0)
        end = max(start + latency + nbytes / h2d_rate, read_done + latency)
    else:
        start = max(state[0], at)
        end = start + latency + nbytes / h2d_rate
    state[0] = end
    return start, end


@numba.njit(cache=True)
def _timeline(seg, tail, pre_bytes, dem_bytes, on_ssd, gpu_need, gpu_time, share, cpu_time, cpu_rounds, act_bytes,
              h2d_rate, d2h_rate, duplex, latency, ssd_rate, ssd_latency, state, stall, cpu_wait, starts, ends, copy_start,
              arrival):
    """The step's layers in time (see the module docstring). ``state`` = [H2D free, SSD free]
    relative to the step start, updated in place; per-layer ``stall`` (GPU waiting for expert
    weights) and ``cpu_wait`` (GPU done, CPU not), and per expert the ``copy_start`` and
    ``arrival`` of its copy (0 when none) are written. Returns the step's seconds."""
    M, E = gpu_need.shape
    t = 0.0
    for e in range(E):
        if pre_bytes[0, e] > 0:
            copy_start[0, e], arrival[0, e] = _copy(0.0, pre_bytes[0, e], on_ssd[0, e], state, h2d_rate, latency, ssd_rate,
                                                    ssd_latency)
    for m in range(M):
        t += seg[m]
        r = t
        starts[m] = r
        for e in range(E):
            if dem_bytes[m, e] > 0:
                copy_start[m, e], arrival[m, e] = _copy(r, dem_bytes[m, e], on_ssd[m, e], state, h2d_rate, latency, ssd_rate,
                                                        ssd_latency)
        if m + 1 < M:
            for e in range(E):
                if pre_bytes[m + 1, e] > 0:
                    copy_start[m + 1, e], arrival[m + 1, e] = _copy(r, pre_bytes[m + 1, e], on_ssd[m + 1, e], state,
                                                                    h2d_rate, latency, ssd_rate, ssd_latency)
        cpu_done = r
        if cpu_time[m] > 0:
            # activations down while the H2D engine may still be copying: the directions contend
            queued = max(state[0] - r, 0.0) * h2d_rate
            if queued > 0:
                down, up = two_flows(act_bytes[m], queued, d2h_rate, h2d_rate, duplex)
                state[0] = r + up
            else:
                down = act_bytes[m] / d2h_rate
            cpu_end = r + latency + down + cpu_time[m]
            back = max(state[0], cpu_end)
            # outputs come back once per round of CPU work (every expert's rows)
            state[0] = back + cpu_rounds[m] * latency + act_bytes[m] / h2d_rate
            cpu_done = state[0]
        # the GPU runs its experts in the order their weights arrive
        count = 0
        for e in range(E):
            if gpu_need[m, e]:
                count += 1
        when = np.empty(count)
        part = np.empty(count)
        i = 0
        for e in range(E):
            if gpu_need[m, e]:
                when[i] = arrival[m, e]
                part[i] = share[m, e]
                i += 1
        idx = np.argsort(when)
        g = r
        for j in idx:
            g = max(g, when[j]) + gpu_time[m] * part[j]
        stall[m] = max(g - r - (gpu_time[m] if count else 0.0), 0.0)
        end = max(g, cpu_done)
        cpu_wait[m] = end - g
        ends[m] = end
        t = end
    return t + tail


class FutureUses:
    """Next uses of every (layer, expert) in the routing trace, per request: Belady's oracle.

    ``ids`` ``[rows, layers, k]``; request ``q``'s rows (the rows it will compute) end before
    ``end[q]``."""

    def __init__(self, ids: np.ndarray, end: np.ndarray, experts: int):
        rows = ids.shape[0]
        self.rows, self.experts, self.end = rows, experts, end
        r, m, _ = np.nonzero(ids >= 0)
        e = ids[ids >= 0].astype(np.int64)
        self.keys = np.unique((m.astype(np.int64) * experts + e) * (rows + 1) + r)

    def ahead(self, layer: np.ndarray, expert: np.ndarray, requests: np.ndarray, current: np.ndarray,
              inclusive: bool) -> np.ndarray:
        """Steps until the soonest use of each (``layer``, ``expert``) by any of ``requests``
        (currently at row ``current``), every request advancing a row per step; NEVER if none."""
        pair = (layer.astype(np.int64) * self.experts + expert)[:, None]
        start = current[None, :] + (0 if inclusive else 1)
        query = pair * (self.rows + 1) + start
        pos = np.minimum(np.searchsorted(self.keys, query), self.keys.size - 1)
        found = self.keys[pos]
        row = found - pair * (self.rows + 1)
        ok = (found // (self.rows + 1) == pair) & (row < self.end[requests][None, :]) & (row >= start)
        ahead = np.where(ok, row - current[None, :], NEVER)
        return ahead.min(axis=1)


@dataclass
class OffloadCounters:
    """What the run's steps added up (bytes, seconds, counts)."""

    accesses: np.ndarray  # [layers] experts needed, summed over steps
    hits: np.ndarray
    prefetched: np.ndarray  # copies the prefetcher issued
    prefetch_used: np.ndarray  # ... that the step then needed
    full_copies: np.ndarray  # demand copies, full precision
    low_copies: np.ndarray  # demand copies, low precision
    cpu_experts: np.ndarray
    stall_s: np.ndarray  # [layers]
    cpu_wait_s: np.ndarray
    bytes: dict  # per link / tier
    cpu_busy_s: float = 0.0
    gpu_expert_s: float = 0.0
    h2d_busy_s: float = 0.0
    steps: int = 0


class OffloadStepModel:
    """A one-GPU step model with offloaded experts (see the module docstring). Attributes the
    engine and the metrics read (``replicas``, ``devices``, ``layout`` ...) are the base model's."""

    def __init__(self, base: StepModel, *, tiers: TierPlan, residency: Residency, prefetch: Prefetch, on_miss: OnMiss,
                 link: HostLink, ssd: tuple[float, float] | None, cpu, expert_dtype: str, low_dtype: str | None,
                 routing, future: FutureUses | None, layer_overhead: float = 0.0):
        self.base, self.tiers, self.residency, self.prefetch, self.on_miss = base, tiers, residency, prefetch, on_miss
        self.link, self.cpu, self.expert_dtype, self.low_dtype = link, cpu, expert_dtype, low_dtype
        self.ssd_rate, self.ssd_latency = ssd if ssd else (1.0, 0.0)
        self.routing, self.future = routing, future
        self.layer_overhead = layer_overhead  # s of host-side work before each MoE layer's experts
        arch = base.arch
        moe = arch.moe
        self.M, self.E, self.k = len(arch.moe_layers), moe.num_experts, moe.top_k
        self.kw = {"hidden": arch.hidden, "inter": moe.expert_inter, "gated": moe.gated}
        self.low = np.zeros((self.M, self.E), dtype=bool)  # slots holding a low-precision copy
        self.state = np.zeros(2)  # H2D engine and SSD free times relative to the next step's start
        self.clock = 0  # steps run: the time unit of Belady's next uses
        M = self.M
        self.counters = OffloadCounters(
            *(np.zeros(M, dtype=np.int64) for _ in range(7)), np.zeros(M), np.zeros(M),
            bytes={"pcie_h2d_expert_weights": 0.0, "pcie_h2d_low_precision_weights": 0.0, "pcie_d2h_activations": 0.0,
                   "pcie_h2d_activations": 0.0, "ssd_read": 0.0, "host_dram_read_by_cpu": 0.0})
        # one expert's GPU seconds when its weights stream from HBM: the hybrid policy weighs a
        # copy plus this against the CPU's time
        self.gpu_expert_bytes_s = tiers.expert_bytes / (base.device.memory.bandwidth * base.device.efficiency.memory)

    def __getattr__(self, name):
        return getattr(self.base, name)

    # -- the step's routing ---------------------------------------------------------------------
    def _routing(self, load: StepLoad) -> tuple[StepRouting, np.ndarray]:
        src = self.routing
        ids = src.ids[src.rows].astype(np.int64)  # [n, M, k]
        counts = load.counts
        need = counts > 0
        n = ids.shape[0]
        if n == 1:
            order = ids[0]
        else:
            # each layer's experts in order of first use, token by token and slot by slot
            flat = np.transpose(ids, (1, 0, 2)).reshape(self.M, -1)
            pos = np.broadcast_to(np.arange(flat.shape[1]), flat.shape)
            first = np.full((self.M, self.E + 1), flat.shape[1], dtype=np.int64)
            rows = np.broadcast_to(np.arange(self.M)[:, None], flat.shape)
            np.minimum.at(first, (rows, np.where(flat >= 0, flat, self.E)), pos)
            first = first[:, : self.E]
            order = np.argsort(first, axis=1, kind="stable")
            order = np.where(np.take_along_axis(first, order, axis=1) < flat.shape[1], order, -1)
        return StepRouting(need, counts, ids, src.row_requests), order

    def _next_uses(self, step: StepRouting, order: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        next_use = np.zeros(order.shape, dtype=np.int64)
        pred_nuse = np.zeros(predicted.shape, dtype=np.int64)
        if self.future is None:
            return next_use, pred_nuse
        requests = np.unique(step.requests)
        current = np.array([self.routing.rows[step.requests == q].max() for q in requests], dtype=np.int64)
        m, i = np.nonzero(order >= 0)
        if m.size:
            ahead = self.future.ahead(m, order[m, i], requests, current, inclusive=False)
            next_use[m, i] = np.where(ahead >= NEVER, NEVER, self.clock + ahead)
        pm, pe = np.nonzero(predicted)
        if pm.size:
            ahead = self.future.ahead(pm, pe, requests, current, inclusive=True)
            pred_nuse[pm, pe] = np.where(ahead >= NEVER, NEVER, self.clock + ahead)
        return next_use, pred_nuse

    # -- the step -------------------------------------------------------------------------------
    def cost(self, load: StepLoad, *, detail: bool = False) -> StepCost:
        base, tiers = self.base, self.tiers
        ph = base._phases(load)
        seg = base._segments(ph, False).max(axis=1) + self.layer_overhead
        tail = float(base._tail(ph).max())
        step, order = self._routing(load)
        counts, need = step.counts, step.need
        predicted = self.prefetch.predict(step)
        next_use, pred_nuse = self._next_uses(step, order, predicted)
        was_low = self.low.copy()
        hit, fetched = self.residency.judge(order, predicted, pred_nuse)
        miss = need & ~hit
        on_ssd = tiers.on_ssd
        resident = self.residency.resident | hit
        copy_s = tiers.expert_bytes / self.link.h2d + np.where(on_ssd, tiers.expert_bytes / self.ssd_rate, 0.0)
        cpu_each = None
        if self.on_miss.uses_cpu:
            cpu_each = cpu_expert_times(self.cpu, counts[..., None], dtype=self.expert_dtype, **self.kw,
                                        ssd_rate=np.where(on_ssd, self.ssd_rate, np.inf)[..., None])
            full, low, on_cpu = self.on_miss.split(miss, resident, cpu_each, copy_s + self.gpu_expert_bytes_s)
        else:
            full, low, on_cpu = self.on_miss.split(miss, resident, np.zeros(miss.shape), copy_s)
        # every expert the GPU computes keeps (or retakes) a slot: a hit that an earlier miss of
        # the same step evicted is back once used, as in the stack pass
        self.residency.touch(order, (hit | full | low) & need if self.residency.dynamic else np.zeros_like(miss), next_use)
        resident = self.residency.resident
        # which slots now hold low-precision copies: the low copies placed, not what a
        # prefetch or a full copy replaced, nothing evicted
        self.low = (self.low & ~fetched & ~full | low) & resident
        # GPU work: hits (at the precision the slot holds), and the copied misses
        low_compute = low | (hit & was_low & ~fetched)
        gpu = (hit | full | low) & need
        tokens = max(int(load.tokens.sum()), 1)
        full_rows = np.where(gpu & ~low_compute, counts, 0)
        gpu_time = self._experts(full_rows, self.expert_dtype, tokens)
        if self.low_dtype is not None and low_compute.any():
            gpu_time = gpu_time + self._experts(np.where(low_compute, counts, 0), self.low_dtype, tokens)
        gpu_rows = np.where(gpu, counts, 0).astype(np.float64)
        share = gpu_rows / np.maximum(gpu_rows.sum(axis=1, keepdims=True), 1.0)
        cpu_rows = np.where(on_cpu, counts, 0)
        cpu_time = np.zeros(self.M)
        if on_cpu.any():
            cpu_time = np.where(on_cpu, cpu_each, 0.0).sum(axis=1)
        act = cpu_rows.sum(axis=1) * self.base.arch.hidden * 2.0  # bf16 activations, each way
        rounds = on_cpu.sum(axis=1).astype(np.float64)
        pre_bytes = np.where(fetched, tiers.expert_bytes, 0.0)
        dem_bytes = np.where(full, tiers.expert_bytes, 0.0) + np.where(low, tiers.low_bytes, 0.0)
        stall, cpu_wait, starts, ends = (np.zeros(self.M) for _ in range(4))
        copy_start, arrival = np.zeros((self.M, self.E)), np.zeros((self.M, self.E))
        duration = _timeline(seg, tail, pre_bytes, dem_bytes, on_ssd, gpu, gpu_time, share, cpu_time, rounds, act,
                             self.link.h2d, self.link.d2h, self.link.duplex, self.link.latency, self.ssd_rate,
                             self.ssd_latency, self.state, stall, cpu_wait, starts, ends, copy_start, arrival)
        h2d_busy = (pre_bytes.sum() + dem_bytes.sum() + act.sum()) / self.link.h2d
        self.state = np.maximum(self.state - duration, 0.0)
        self.clock += 1
        self.prefetch.observe(step)
        self._record(need, hit, fetched, full, low, on_cpu, stall, cpu_wait, cpu_time, gpu_time, h2d_busy, pre_bytes, act)
        attention = np.full(len(base.devices), float(ph["A"].sum() + ph["S"].sum() + ph["head"].sum()))
        spans = self._spans(seg, starts, stall, gpu_time, cpu_time, copy_start, arrival, tail, duration) if detail else []
        return StepCost(duration, attention, np.full(len(base.devices), float(gpu_time.sum())),
                        np.full(len(base.devices), float(h2d_busy)), int(counts.sum()), 0,
                        np.array([float(counts.sum())]), spans)

    def _record(self, need, hit, fetched, full, low, on_cpu, stall, cpu_wait, cpu_time, gpu_time, h2d_busy, pre_bytes,
                act) -> None:
        """Add one step to the run's counters."""
        c, tiers, on_ssd = self.counters, self.tiers, self.tiers.on_ssd
        c.steps += 1
        c.accesses += need.sum(axis=1)
        c.hits += hit.sum(axis=1)
        c.prefetched += fetched.sum(axis=1)
        c.prefetch_used += (fetched & need).sum(axis=1)
        c.full_copies += full.sum(axis=1)
        c.low_copies += low.sum(axis=1)
        c.cpu_experts += on_cpu.sum(axis=1)
        c.stall_s += stall
        c.cpu_wait_s += cpu_wait
        c.cpu_busy_s += float(cpu_time.sum())
        c.gpu_expert_s += float(gpu_time.sum())
        c.h2d_busy_s += float(h2d_busy)
        b = c.bytes
        b["pcie_h2d_expert_weights"] += float(pre_bytes.sum() + np.where(full, tiers.expert_bytes, 0.0).sum())
        b["pcie_h2d_low_precision_weights"] += float(np.where(low, tiers.low_bytes, 0.0).sum())
        b["pcie_d2h_activations"] += float(act.sum())
        b["pcie_h2d_activations"] += float(act.sum())
        b["ssd_read"] += float(np.where(on_ssd & (fetched | full), tiers.expert_bytes, 0.0).sum()
                               + np.where(on_ssd & low, tiers.low_bytes, 0.0).sum()
                               + np.where(on_ssd & on_cpu, tiers.expert_bytes, 0.0).sum())
        b["host_dram_read_by_cpu"] += float(np.where(on_cpu & ~on_ssd, tiers.expert_bytes, 0.0).sum())

    def _experts(self, rows: np.ndarray, dtype: str, tokens: int) -> np.ndarray:
        """Per-layer GPU seconds of the experts in ``rows`` ``[layers, experts]``."""
        busy = rows.sum(axis=1) > 0
        if not busy.any():
            return np.zeros(self.M)
        seconds = expert_times(self.base.device, rows, dtype=dtype, tokens=np.full(self.M, float(tokens)), top_k=self.k,
                               **self.kw)
        return np.where(busy, seconds, 0.0)

    def _spans(self, seg, starts, stall, gpu_time, cpu_time, copy_start, arrival, tail, duration) -> list:
        out = []
        for m in range(self.M):
            begin = starts[m] - seg[m]
            if self.layer_overhead:
                out.append((0, "compute", "host overhead", begin, begin + self.layer_overhead))
            out.append((0, "compute", "attention", begin + self.layer_overhead, starts[m]))
            if stall[m] > 0:
                out.append((0, "compute", "waiting for experts", starts[m], starts[m] + stall[m]))
            if gpu_time[m] > 0:
                out.append((0, "compute", "experts", starts[m] + stall[m], starts[m] + stall[m] + gpu_time[m]))
            if cpu_time[m] > 0:
                out.append((0, "host", "cpu experts", starts[m], starts[m] + cpu_time[m]))
        for m, e in zip(*np.nonzero(arrival > 0)):
            out.append((0, "comm", f"copy layer {m} expert {e}", copy_start[m, e], arrival[m, e]))
        out.append((0, "compute", "attention+head", duration - tail, duration))
        return out

    # -- what the run added up --------------------------------------------------------------
    def report(self, makespan: float, output_tokens: int) -> dict:
        c = self.counters
        acc = np.maximum(c.accesses, 1)
        return {
            "policies": {"residency": self.residency.name, "prefetch": self.prefetch.name, "on_miss": self.on_miss.name},
            "tiers": self.tiers.to_dict(),
            "hit_rate": float(c.hits.sum() / max(c.accesses.sum(), 1)),
            "hit_rate_per_layer": (c.hits / acc).tolist(),
            "accesses": int(c.accesses.sum()),
            "prefetched": int(c.prefetched.sum()),
            "prefetch_used": int(c.prefetch_used.sum()),
            "prefetch_precision": float(c.prefetch_used.sum() / max(c.prefetched.sum(), 1)),
            "demand_copies": {"full_precision": int(c.full_copies.sum()), "low_precision": int(c.low_copies.sum())},
            "cpu_experts": int(c.cpu_experts.sum()),
            "bytes_moved": dict(c.bytes),
            "stall_s": float(c.stall_s.sum()),
            "stall_s_per_layer": c.stall_s.tolist(),
            "stall_s_per_output_token": float(c.stall_s.sum() / max(output_tokens, 1)),
            "cpu_wait_s": float(c.cpu_wait_s.sum()),
            "cpu_busy_s": c.cpu_busy_s,
            "gpu_expert_s": c.gpu_expert_s,
            "pcie_h2d_utilisation": c.h2d_busy_s / makespan if makespan > 0 else 0.0,
        }
