"""The serving simulator: requests arrive, serving groups batch and step them, in SimPy.

Each serving group (one, or a prefill and a decode group under prefill-decode disaggregation)
is a SimPy process that loops: admit waiting requests (continuous batching, FCFS per DP
replica, while the replica has free KV-cache blocks and sequence slots), schedule a step (every
running decode sequence adds a token; prompt chunks fill the rest of the token budget: chunked
prefill), cost it with :class:`moesim.sim.step.StepModel`, hold for its duration, then advance
the sequences. A decode sequence that needs a KV block when none is free preempts the replica's
newest sequence, which frees its blocks and is recomputed later (vLLM's recompute preemption).

Under disaggregation a request's KV cache moves from the prefill group to the decode group when
its prompt is done, as a transfer over :class:`moesim.sim.resources.SharedLink` (the NICs
between the groups: concurrent transfers share their bandwidth) using one of the source's copy
engines.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.sim.kernels import advance, schedule
from moesim.sim.resources import SharedLink
from moesim.sim.step import StepLoad, StepModel

@dataclass
class GroupConfig:
    """One serving group: its step model, role (``both``, ``prefill`` or ``decode``) and
    scheduler limits per DP replica."""

    name: str
    model: StepModel
    role: str
    kv_blocks: int  # per replica
    block_size: int = 16
    max_running: int = 256
    max_batched_tokens: int = 8192
    chunked_prefill: bool = True
    kv_bytes_per_token: float = 0.0  # whole request, all layers (disaggregated transfer size)


@dataclass
class RunLog:
    """What a run recorded: one row per request and per step, device busy seconds."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    preemptions: np.ndarray
    steps: dict[str, list] = field(default_factory=lambda: {k: [] for k in (
        "group", "start", "duration", "decode_tokens", "prefill_tokens", "running", "waiting", "kv_used_blocks",
        "slots", "dropped")})
    busy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # group -> attention / experts / comm
    rank_slots: dict[str, np.ndarray] = field(default_factory=dict)
    spans: list = field(default_factory=list)  # (group, step, device, stream, name, start, end)
    counters: list = field(default_factory=list)  # (time, group, name, {series: value})
    transfers: list = field(default_factory=list)  # (request, start, end, bytes)


class _Group:
    def __init__(self, env: simpy.Environment, cfg: GroupConfig, log: RunLog, routing, detail_steps: set[int]):
        self.env, self.cfg, self.log, self.routing = env, cfg, log, routing
        R = cfg.model.replicas
        self.R = R
        self.queues = [deque() for _ in range(R)]
        self.waiting = 0  # requests in the queues
        # replica r's running sequences in admission order are seqs[r, :count[r]], so a step's
        # compiled passes read and update them in place (a step can run thousands); a running
        # sequence holds at least one KV block, so a replica runs at most kv_blocks
        self.seqs = np.zeros((R, min(cfg.max_running, cfg.kv_blocks)), dtype=np.int64)
        self.count = np.zeros(R, dtype=np.int64)
        self.free = np.full(R, cfg.kv_blocks, dtype=np.int64)
        self.next_replica = 0
        self.wakeup: simpy.Event | None = None
        self.detail_steps = detail_steps
        self.step_index = 0
        self.handoff = None  # disaggregated prefill: called with each request whose prompt is done
        n = log.arrival.size
        self.target = np.zeros(n, dtype=np.int64)  # tokens to prefill before decoding
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.context = np.zeros(n, dtype=np.int64)  # tokens in this group's KV cache
        self.generated = np.zeros(n, dtype=np.int64)
        self.blocks = np.zeros(n, dtype=np.int64)
        self.replica = np.zeros(n, dtype=np.int64)
        devices = len(cfg.model.devices)
        log.busy[cfg.name] = {k: np.zeros(devices) for k in ("attention", "experts", "comm")}
        log.rank_slots[cfg.name] = 0.0

    # -- queueing ------------------------------------------------------------------------------
    def enqueue(self, request: int, prefilled: int = 0, generated: int = 0) -> None:
        """A request joins a replica's queue, round robin (SGLang's DP load balancer default)."""
        r = self.next_replica
        self.next_replica = (r + 1) % self.R
        self.replica[request] = r
        self.generated[request] = generated
        self.target[request] = self.log.prompt[request] + max(generated - 1, 0)
        self.prefilled[request] = prefilled
        self.queues[r].append(request)
        self.waiting += 1
        if self.wakeup is not None and not self.wakeup.triggered:
            self.wakeup.succeed()

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.block_size)

    def _admit(self) -> None:
        if not self.waiting:
            return
        cfg = self.cfg
        counts, free = self.count.tolist(), self.free.tolist()  # Python ints: cheaper to test one by one
        for r, queue in enumerate(self.queues):
            n = counts[r]
            while queue and n < cfg.max_running:
                request = queue[0]
                need = self._blocks_for(int(self.target[request]) + 1)
                if need > cfg.kv_blocks:
                    raise ValueError(f"request {request} needs {need} KV blocks; a replica holds {cfg.kv_blocks}")
                if need > free[r]:
                    break
                queue.popleft()
                self.waiting -= 1
                self.seqs[r, n] = request
                n += 1
                free[r] -= need
                self.blocks[request] = need
                self.context[request] = self.prefilled[request]
            counts[r] = n
        self.count[:] = counts
        self.free[:] = free

    def _preempt(self, r: int) -> bool:
        """Free the newest running sequence of replica ``r`` for recompute; False if none runs."""
        if not self.count[r]:
            return False
        self.count[r] -= 1
        request = int(self.seqs[r, self.count[r]])
        self.free[r] += self.blocks[request]
        self.blocks[request] = 0
        self.log.preemptions[request] += 1
        self.target[request] = self.log.prompt[request] + max(self.generated[request] - 1, 0)
        self.prefilled[request] = 0
        self.queues[r].appendleft(request)
        self.waiting += 1
        return True

    # -- one step ------------------------------------------------------------------------------
    def _schedule(self):
        """This step's decode sequences (replica by replica in running order), prompt chunks
        ``[n, 4]`` (replica, request, tokens, tokens already prefilled) and per replica the
        decodes, their mean cached tokens and the prompt tokens: one compiled pass over the
        running sequences (:func:`moesim.sim.kernels.schedule`), preempting where a replica
        runs short of KV blocks."""
        cfg = self.cfg
        decode_ids, decode, kv, prefill, chunks, preempted = schedule(
            self.seqs, self.count, self.free, self.prefilled, self.target, self.context, self.blocks, self.generated,
            self.log.prompt, self.log.preemptions, cfg.block_size, cfg.chunked_prefill, cfg.max_batched_tokens)
        if preempted.size:
            for r, request in preempted.tolist():
                self.queues[r].appendleft(request)
            self.waiting += preempted.shape[0]
        return decode_ids, chunks, decode, kv, prefill

    def _chunks(self, r: int, queue: list, budget: int, chunks: list) -> None:
        """Prompt chunks of replica ``r``'s prefilling sequences ``queue`` (admission order)
        within its token ``budget``, appended to ``chunks`` as (replica, sequence, tokens,
        tokens already prefilled); without chunked prefill a prompt goes whole or waits."""
        for q in queue:
            if budget <= 0:
                break
            left = int(self.target[q] - self.prefilled[q])
            take = min(left, budget) if self.cfg.chunked_prefill else (left if left <= budget or not chunks else 0)
            if take <= 0:
                break
            chunks.append((r, q, take, int(self.prefilled[q])))
            budget -= take

    def _schedule_reference(self):
        """:meth:`_schedule` one replica and one request at a time (the reference the tests
        compare it with)."""
        cfg = self.cfg
        decode_ids: list[int] = []
        chunks: list[tuple[int, int, int, int]] = []  # (replica, request, tokens, context)
        for r in range(self.R):
            running = self._running(r)
            prefilling = [q for q in running if self.prefilled[q] < self.target[q]]
            dec = [] if (prefilling and not cfg.chunked_prefill) else [q for q in running if self.prefilled[q] >= self.target[q]]
            grow = [q for q in dec if self.context[q] % cfg.block_size == 0]
            while len(grow) > self.free[r] and self._preempt(r):
                running = self._running(r)
                prefilling = [q for q in running if self.prefilled[q] < self.target[q]]
                dec = [q for q in running if self.prefilled[q] >= self.target[q]] if dec else []
                grow = [q for q in dec if self.context[q] % cfg.block_size == 0]
            for q in grow:
                self.blocks[q] += 1
            self.free[r] -= len(grow)
            self._chunks(r, prefilling, cfg.max_batched_tokens - len(dec), chunks)
            decode_ids += dec
        R, ids = self.R, np.array(decode_ids, dtype=np.int64)
        rep = self.replica[ids]
        decode = np.bincount(rep, minlength=R)
        kv_sum = np.bincount(rep, weights=self.context[ids], minlength=R)
        kv = np.ceil(kv_sum / np.maximum(decode, 1)).astype(np.int64)
        prefill = np.zeros(R, dtype=np.int64)
        for r, _, take, _ in chunks:
            prefill[r] += take
        return ids, np.array(chunks, dtype=np.int64).reshape(-1, 4), decode, kv, prefill

    def _running(self, r: int) -> list[int]:
        return self.seqs[r, :self.count[r]].tolist()

    def _load(self, decode_ids: np.ndarray, chunks: np.ndarray, decode: np.ndarray, kv: np.ndarray,
              prefill: np.ndarray) -> StepLoad:
        if self.routing is None:  # a dense model
            counts, source = np.zeros((0, 0), dtype=np.int64), None
        else:
            decodes = decode_ids.size
            counts, source = self.routing.step(self, decode_ids, chunks, decodes + int(prefill.sum()), decodes)
        return StepLoad(decode, kv, prefill, [(r, take, ctx) for r, _, take, ctx in chunks.tolist()], counts, source)

    def _advance(self, decode_ids: np.ndarray, chunks: np.ndarray, now: float) -> None:
        log = self.log
        done, handed = advance(decode_ids, chunks, self.seqs, self.count, self.free, self.blocks, self.replica,
                               self.prefilled, self.target, self.context, self.generated, log.output, log.first_token,
                               log.finish, now, self.handoff is not None)
        for q, generated in handed.tolist():
            self.handoff(q, generated)
        for q in done.tolist():
            self.finished(q)

    def _advance_reference(self, decode_ids: np.ndarray, chunks: np.ndarray, now: float) -> None:
        """:meth:`_advance` one sequence at a time (the reference the tests compare it with)."""
        log = self.log
        self.generated[decode_ids] += 1
        self.context[decode_ids] += 1
        done = decode_ids[self.generated[decode_ids] >= log.output[decode_ids]].tolist()
        for _, q, take, _ in chunks.tolist():
            self.prefilled[q] += take
            self.context[q] += take
            if self.prefilled[q] >= self.target[q]:
                self.generated[q] += 1
                if np.isnan(log.first_token[q]):
                    log.first_token[q] = now
                if self.handoff is not None and self.generated[q] < log.output[q]:
                    self._release(q)
                    self.handoff(q, int(self.generated[q]))
                elif self.generated[q] >= log.output[q]:
                    done.append(q)
        for q in done:
            self._release(q)
            log.finish[q] = now
            self.finished(q)

    def _release(self, q: int) -> None:
        r = self.replica[q]
        running = self._running(r)
        running.remove(q)
        self.count[r] -= 1
        self.seqs[r, :len(running)] = running
        self.free[r] += self.blocks[q]
        self.blocks[q] = 0

    def finished(self, request: int) -> None:  # set by the engine
        pass

    def loop(self):
        env, log, cfg = self.env, self.log, self.cfg
        while True:
            self._admit()
            batch = self._schedule()
            decode_ids, chunks = batch[0], batch[1]
            if not decode_ids.size and not chunks.size:
                self.wakeup = env.event()
                yield self.wakeup
                self.wakeup = None
                continue
            load = self._load(*batch)
            detail = self.step_index in self.detail_steps
            cost = cfg.model.cost(load, detail=detail)
            start = env.now
            yield env.timeout(cost.duration)
            steps = log.steps
            steps["group"].append(cfg.name)
            steps["start"].append(start)
            steps["duration"].append(cost.duration)
            steps["decode_tokens"].append(decode_ids.size)
            steps["prefill_tokens"].append(int(load.prefill.sum()))
            steps["running"].append(int(self.count.sum()))
            steps["waiting"].append(self.waiting)
            used = cfg.kv_blocks * self.R - int(self.free.sum())
            steps["kv_used_blocks"].append(used)
            steps["slots"].append(cost.slots)
            steps["dropped"].append(cost.dropped)
            busy = log.busy[cfg.name]
            busy["attention"] += cost.attention
            busy["experts"] += cost.experts
            busy["comm"] += cost.comm
            log.rank_slots[cfg.name] = log.rank_slots[cfg.name] + cost.rank_slots
            if detail:
                log.spans += [(cfg.name, self.step_index, d, stream, name, start + a, start + b)
                              for d, stream, name, a, b in cost.spans]
                log.counters.append((start, cfg.name, f"{cfg.name} tokens per expert (layer 0)",
                                     {f"e{e}": int(v) for e, v in enumerate(load.counts[0])} if load.counts.size else {}))
            log.counters.append((start, cfg.name, f"{cfg.name} KV blocks used", {"blocks": used}))
            self.step_index += 1
            self._advance(decode_ids, chunks, env.now)


def run(groups: list[GroupConfig], arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray, routing_for,
        *, link: tuple[float, float] | None = None, copy_engines: int = 2, detail_steps: set[int] = frozenset({1})) -> RunLog:
    """Serve the requests on the groups (one ``both`` group, or ``prefill`` then ``decode``) and
    return the log. ``routing_for(group_config)`` gives each group its routing source;
    ``link`` is the (bandwidth B/s, latency s) of the KV path between disaggregated groups."""
    n = arrival.size
    log = RunLog(arrival=arrival, prompt=prompt, output=output, first_token=np.full(n, np.nan), finish=np.full(n, np.nan),
                 preemptions=np.zeros(n, dtype=np.int64))
    env = simpy.Environment()
    live = [_Group(env, g, log, routing_for(g), set(detail_steps)) for g in groups]
    all_done = env.event()
    remaining = [n]

    def finished(_request: int) -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            all_done.succeed()

    for g in live:
        g.finished = finished
    entry = live[0]
    if len(live) == 2:
        prefill, decode = live
        engines = simpy.Resource(env, capacity=copy_engines)
        kv_link = SharedLink(env, link[0], link[1], name="kv transfer")

        def move(request: int, generated: int):
            nbytes = groups[0].kv_bytes_per_token * (prompt[request] + generated - 1)
            with engines.request() as slot:
                yield slot
                start = env.now
                yield from kv_link.transfer(nbytes)
                log.transfers.append((request, start, env.now, nbytes))
            decode.enqueue(request, prefilled=int(prompt[request] + generated - 1), generated=generated)

        prefill.handoff = lambda request, generated: env.process(move(request, generated))

    def arrivals():
        for request in np.argsort(arrival, kind="stable"):
            if arrival[request] > env.now:
                yield env.timeout(arrival[request] - env.now)
            entry.enqueue(int(request))

    env.process(arrivals())
    for g in live:
        env.process(g.loop())
    env.run(until=all_done)
    return log
