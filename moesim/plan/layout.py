"""Parallel-layout search: TP / DP / PP / EP / expert TP, micro-batches and batch size, ranked
with the cost model.

Every valid layout of at most ``devices`` devices (powers of two; TP inside one node, as NVLink
domains are; the layout rules of :mod:`moesim.cost.layout`) is tried with two-microbatch overlap
off and, when experts are spread by EP on one pipeline stage, on; for each, the batch
(``max_running`` sequences per DP replica) is the largest power of two (or the workload's
whole batch) whose KV cache fits and whose TTFT and TPOT meet the targets: both grow with the
batch, so it is found by bisection. Per candidate the cost model gives:

- TPOT (s): :func:`moesim.cost.estimate.estimate`'s decode step at the full batch; with
  two-microbatch overlap, the overlapped recurrence over half batches (below); with ``pp`` stages,
  ``pp`` micro-batches x the slowest stage of the stage ILP (:mod:`moesim.plan.stages`): the
  pipeline's steady pace, never below the balanced figure ``moesim estimate`` prints.
- TTFT (s): the prefill of one prompt in the scheduler's chunked-prefill budget
  (``max_batched_tokens`` per replica and step, as many prompts as fit, ``ceil(prompt / budget)``
  chunks), with no queueing: a lower bound that the simulator's verification checks.
- serving tokens/s: every sequence of a replica is prefilled once and decodes ``output`` tokens:
  ``batch x output / (output x TPOT + sequences per replica x prefill time per sequence)``
  (prefill and decode counted one after the other: a chunked-prefill engine overlaps them, so
  this is conservative). Per device, and in $ per million generated tokens from a device-hour
  price (hwprofiles, each with its public source; overridable).
- memory per device (bytes): the busiest stage's weights and KV cache for the batch, the
  activations of one chunked-prefill step and the framework reserve, against the share of HBM
  the engine may use (``kv_memory_fraction``), as the scenario builder checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from moesim.cost.collectives import transfer_time
from moesim.cost.estimate import FRAMEWORK_RESERVE, Estimate, Workload, _layer_kind, estimate, memory_per_device
from moesim.cost.layout import Layout, make_layout
from moesim.dtypes import weight_bytes_per_param
from moesim.errors import InputError, LayoutError
from moesim.hardware.specs import Cluster
from moesim.hardware.topology import accelerators, topology
from moesim.models import kv_bytes, param_counts
from moesim.models.arch import ModelArch
from moesim.plan.stages import StagePartition, StageProblem, even_split, evaluate_split, solve_stages

# max_running values tried per DP replica (vLLM's max_num_seqs default is 256, SGLang's
# cuda-graph batch sizes reach 512 and beyond)
BATCH_SIZES = tuple(2**i for i in range(11))  # 1 ... 1024

# Pipeline depths tried: serving engines pipeline over a few nodes at most (vLLM's and SGLang's
# multi-node examples use PP 2-4), and the stage ILP's proof grows quickly with the stages.
MAX_PP = 8


@dataclass(frozen=True)
class Shape:
    """The requests served: ``prompt`` and ``output`` tokens each (means); ``batch``: every
    sequence present at once (batch arrivals), or None for an open-loop stream; ``routing``: a
    :func:`moesim.routing.counts.parse_routing` spec."""

    prompt: int
    output: int
    batch: int | None = None
    routing: str = "balanced"
    seed: int = 0


@dataclass(frozen=True)
class Engine:
    """Serving-engine settings held fixed during the search."""

    max_batched_tokens: int = 8192
    kv_memory_fraction: float = 0.9
    dtype: str | None = None
    expert_dtype: str | None = None
    kv_dtype: str | None = None


@dataclass(frozen=True)
class Targets:
    """Latency targets (s); None: no target."""

    ttft: float | None = None
    tpot: float | None = None


@dataclass
class Candidate:
    layout: Layout
    overlap: str  # "none" or "two_microbatch"
    max_running: int  # sequences per DP replica
    max_batched_tokens: int
    stages: list[tuple[int, int]]
    ttft: float  # s
    tpot: float  # s
    tokens_per_s: float  # generated tokens/s of the whole layout, prefill included
    decode_tokens_per_s: float  # generated tokens/s in steady decode
    memory: dict[str, float]  # bytes per device on the busiest stage
    price_per_hour: float  # $ for the layout's devices
    partition: StagePartition | None = None  # pp > 1: the stage ILP's answer
    even: StagePartition | None = None  # pp > 1: the even split, for comparison
    verified: dict = field(default_factory=dict)  # the simulator's figures, filled by the caller

    @property
    def fits(self) -> bool:
        return self.memory["free"] >= 0

    @property
    def micro_batches(self) -> int:
        """Micro-batches in flight: ``pp`` on a pipeline, 2 with two-microbatch overlap, else 1."""
        return self.layout.pp if self.layout.pp > 1 else (2 if self.overlap == "two_microbatch" else 1)

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / self.layout.devices

    @property
    def usd_per_million_tokens(self) -> float:
        return self.price_per_hour / 3600 / self.tokens_per_s * 1e6 if self.tokens_per_s > 0 else math.inf

    def meets(self, targets: Targets) -> bool:
        return ((targets.ttft is None or self.ttft <= targets.ttft)
                and (targets.tpot is None or self.tpot <= targets.tpot))

    def label(self) -> str:
        lay = self.layout
        moe = f" EP{lay.ep}" + (f" ETP{lay.expert_tp}" if lay.expert_tp > 1 else "")
        return f"TP{lay.tp} DP{lay.dp} PP{lay.pp}{moe}" + (" TBO" if self.overlap == "two_microbatch" else "")

    def decision(self, devices_available: int) -> dict:
        """The plan file's decision: the keys launch-flag exports read, then extras."""
        lay = self.layout
        return {"tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep, "expert_tp": lay.expert_tp,
                "micro_batches": self.micro_batches, "max_running": self.max_running,
                "max_batched_tokens": self.max_batched_tokens, "stages": [list(s) for s in self.stages],
                "overlap": self.overlap, "devices": lay.devices, "replicas": devices_available // lay.devices}

    def metrics(self) -> dict:
        m = self.memory
        out = {"ttft_s": self.ttft, "tpot_s": self.tpot, "tokens_per_s": self.tokens_per_s,
               "tokens_per_s_per_device": self.tokens_per_s_per_device, "decode_tokens_per_s": self.decode_tokens_per_s,
               "usd_per_million_tokens": self.usd_per_million_tokens, "price_per_hour_usd": self.price_per_hour,
               "memory_per_device_bytes": {k: m[k] for k in ("weights", "kv_cache", "activations", "reserved", "used",
                                                              "budget", "free")}}
        if self.partition is not None:
            out["stage_time_s"] = self.partition.stage_time
            out["stage_memory_bytes"] = self.partition.stage_memory
            out["even_split"] = {"stages": [list(s) for s in self.even.stages], "slowest_stage_s": self.even.slowest,
                                 "fits": self.even_fits}
        return out

    @property
    def even_fits(self) -> bool:
        return self.even is not None and max(self.even.stage_memory) <= self.memory["budget"]


def rank_key(c: Candidate) -> tuple:
    """Best first: generated tokens/s per device (so $ per million tokens, at one device price),
    then lower TPOT, fewer devices, and the layout for a stable order."""
    lay = c.layout
    return (-c.tokens_per_s_per_device, c.tpot, lay.devices, c.overlap, lay.tp, lay.dp, lay.pp, lay.ep, c.max_running)


def _powers(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def enumerate_layouts(arch: ModelArch, devices: int, devices_per_node: int) -> tuple[list[Layout], int]:
    """Valid layouts of at most ``devices`` devices, and how many were tried."""
    tried, valid = 0, []
    for tp in _powers(min(devices, devices_per_node)):
        for pp in _powers(min(devices // tp, arch.num_layers, MAX_PP)):
            for dp in _powers(devices // (tp * pp)):
                group = tp * dp
                splits = [(ep, group // ep) for ep in _powers(group)] if arch.is_moe else [(1, None)]
                for ep, expert_tp in splits:
                    tried += 1
                    try:
                        valid.append(make_layout(arch, tp=tp, ep=ep, dp=dp, pp=pp, expert_tp=expert_tp,
                                                 devices_available=devices))
                    except LayoutError:
                        continue
    return valid, tried


@dataclass
class SearchResult:
    ranked: list[Candidate]  # feasible candidates, best first
    counts: dict[str, int]
    best_infeasible: dict[str, Candidate]  # per broken constraint, the candidate closest to meeting it


class LayoutSearch:
    """Costs candidates of ``arch`` on ``cluster`` serving ``shape`` with the cost model."""

    def __init__(self, arch: ModelArch, cluster: Cluster, device, shape: Shape, engine: Engine = Engine(),
                 targets: Targets = Targets(), *, price_per_device_hour: float | None = None, ilp_time_limit: float = 10.0):
        self.arch, self.cluster, self.device = arch, cluster, device
        self.shape, self.engine, self.targets = shape, engine, targets
        self.price = device.price_per_hour if price_per_device_hour is None else price_per_device_hour
        self.ilp_time_limit = ilp_time_limit
        self.graph = topology(cluster)
        self.ranks = accelerators(self.graph)
        self.counts = {"layouts_tried": 0, "layouts_valid": 0, "configurations": 0, "points_costed": 0,
                       "stage_ilps": 0, "feasible": 0}
        self._layer_bytes: dict = {}

    # -- memory per layer ---------------------------------------------------------------------
    def layer_weights(self, layout: Layout, dtype: str, expert_dtype: str) -> tuple[np.ndarray, float, float, float]:
        """Weight bytes per device of each layer, of the embedding, of the LM head, and the rest
        (final norms, which live with the LM head), split the way
        :func:`moesim.cost.estimate.memory_per_device` splits them."""
        key = (layout.tp, layout.ep, layout.expert_tp, layout.pp > 1, dtype, expert_dtype)
        if key in self._layer_bytes:
            return self._layer_bytes[key]
        arch = self.arch
        w, we = weight_bytes_per_param(dtype), weight_bytes_per_param(expert_dtype)
        norm = arch.hidden * (2 if arch.norm == "layernorm" else 1)  # a one-layer model's final norm

        def per_device(parts: dict) -> float:
            dense = parts["attention"] + parts["dense_ffn"] + parts["shared_experts"] + parts["norms"]
            return (dense / layout.tp + parts["router"]) * w + parts["routed_experts"] / (layout.ep * layout.expert_tp) * we

        one: dict = {}
        per_layer = []
        for layer in arch.layers:
            if layer not in one:
                parts = dict(param_counts(replace(arch, layers=(layer,), vision_params=0))["breakdown"])
                parts["norms"] -= norm
                one[layer] = per_device(parts)
            per_layer.append(one[layer])
        full = param_counts(arch)["breakdown"]
        layers = np.array(per_layer)
        rest = per_device(full) - float(layers.sum())
        embedding = full["embedding"] / layout.tp * w
        # a tied LM head is the embedding matrix; a pipeline keeps a copy on its last stage
        lm_head = (full["lm_head"] or (full["embedding"] if layout.pp > 1 else 0)) / layout.tp * w
        self._layer_bytes[key] = (layers, embedding, lm_head, rest)
        return self._layer_bytes[key]

    def layer_kv(self, layout: Layout, sequences: int, kv_dtype: str) -> np.ndarray:
        """KV-cache bytes per device of each layer for ``sequences`` sequences of a replica at
        full length (prompt + output)."""
        arch, context = self.arch, self.shape.prompt + self.shape.output
        att = arch.attention
        split = 1 if att.kind == "mla" else att.num_kv_heads / max(1, att.num_kv_heads // layout.tp)
        per = {layer: kv_bytes(replace(arch, layers=(layer,)), context, kv_dtype) for layer in set(arch.layers)}
        return np.array([per[layer] for layer in arch.layers]) * sequences / split

    # -- one candidate -----------------------------------------------------------------------
    def evaluate(self, layout: Layout, overlap: str, max_running: int, *, ilp: bool = True) -> Candidate:
        """Cost one candidate at ``max_running`` sequences per DP replica; ``ilp=False`` keeps a
        pipeline's even split instead of solving the stage ILP (a quick first screen)."""
        arch, shape, eng = self.arch, self.shape, self.engine
        self.counts["points_costed"] += 1
        per_replica = max_running
        batch = per_replica * layout.dp
        kw = {"dtype": eng.dtype, "expert_dtype": eng.expert_dtype, "kv_dtype": eng.kv_dtype}
        full = estimate(arch, self.cluster, layout, self._workload(batch, shape.prompt), **kw)
        dtype, expert_dtype, kv_dtype = full.dtype, full.expert_dtype, full.kv_dtype
        # memory: the scenario builder's accounting (activations of one chunked-prefill step)
        budget = self.device.memory.capacity * eng.kv_memory_fraction
        activations = memory_per_device(arch, layout, Workload(batch=layout.dp, prompt=eng.max_batched_tokens, output=0),
                                        self.device, dtype, expert_dtype, kv_dtype)["activations"]
        weights, embedding, lm_head, rest = self.layer_weights(layout, dtype, expert_dtype)
        kv = self.layer_kv(layout, per_replica, kv_dtype)
        problem = StageProblem(
            layer_time=np.array([full.decode_layers[_layer_kind(l)].time if not l.encoder else 0.0 for l in arch.layers]),
            layer_memory=weights + kv, stages=layout.pp, memory_budget=budget,
            first_memory=embedding, last_time=full.decode_layers["lm_head"].time, last_memory=lm_head + rest,
            stage_memory=activations + FRAMEWORK_RESERVE, hop_time=self._hop(layout, full.micro_batch))
        partition = even = None
        if layout.pp > 1:
            even = evaluate_split(problem, even_split(arch.num_layers, layout.pp))
            if ilp:
                self.counts["stage_ilps"] += 1
                partition = solve_stages(problem, time_limit=self.ilp_time_limit)
            # no partition fits memory: report the even split, which does not fit either
            chosen = partition or even
            tpot = layout.pp * chosen.slowest
        else:
            chosen = evaluate_split(problem, [(0, arch.num_layers)], "single stage")
            tpot = full.decode_step if overlap == "none" else self._two_microbatch(layout, per_replica, kw)
        busiest = int(np.argmax(chosen.stage_memory))
        a, b = chosen.stages[busiest]
        w_bytes = float(weights[a:b].sum()) + problem.fixed(busiest)[1] - problem.stage_memory
        kv_total = float(kv[a:b].sum())
        used = w_bytes + kv_total + activations + FRAMEWORK_RESERVE
        memory = {"capacity": self.device.memory.capacity, "budget": budget, "weights": w_bytes, "kv_cache": kv_total,
                  "activations": activations, "reserved": FRAMEWORK_RESERVE, "used": used, "free": budget - used}
        ttft, prefill_per_sequence = self._prefill(layout, per_replica, kw)
        decode_tps = batch / tpot
        tps = batch * shape.output / (shape.output * tpot + per_replica * prefill_per_sequence)
        return Candidate(layout, overlap, max_running, eng.max_batched_tokens, chosen.stages, ttft, tpot, tps, decode_tps, memory,
                         self.price * layout.devices, partition, even)

    def _workload(self, batch: int, prompt: int) -> Workload:
        return Workload(batch=batch, prompt=prompt, output=self.shape.output, routing=self.shape.routing, seed=self.shape.seed)

    def _hop(self, layout: Layout, micro: int) -> float:
        """One stage's activations to the next (s): ``micro`` tokens of bf16 hidden states."""
        if layout.pp == 1:
            return 0.0
        return transfer_time(self.graph, self.ranks[0], self.ranks[layout.stage_devices],
                             micro * self.arch.hidden * 2).time

    def _prefill(self, layout: Layout, per_replica: int, kw: dict) -> tuple[float, float]:
        """TTFT (s) of one prompt in the chunked-prefill budget, and the prefill time (s) each
        sequence of a replica costs."""
        prompt, budget = self.shape.prompt, self.engine.max_batched_tokens
        chunk = min(prompt, budget)
        together = max(1, min(budget // prompt, per_replica))  # prompts prefilled in one step
        chunks = -(-prompt // budget)
        pre = estimate(self.arch, self.cluster, layout, self._workload(together * layout.dp, chunk), **kw)
        return chunks * pre.prefill_step, chunks * pre.prefill_step / together

    def _two_microbatch(self, layout: Layout, per_replica: int, kw: dict) -> float:
        """Decode step (s) with DeepSeek's two-batch overlap: each half's dispatch and combine
        run while the other half computes (the recurrence moesim.sim.step runs per rank, here
        on the cost model's per-layer figures for a half batch)."""
        half_batch = max(1, per_replica // 2) * layout.dp
        half = estimate(self.arch, self.cluster, layout, self._workload(half_batch, self.shape.prompt), **kw)
        return two_microbatch_step(self.arch, half)

    # -- the search ----------------------------------------------------------------------------
    def batch_sizes(self, layout: Layout) -> list[int]:
        sizes = list(BATCH_SIZES)
        if self.shape.batch is not None:
            whole = -(-self.shape.batch // layout.dp)
            sizes = [s for s in sizes if s < whole] + [whole]
        return sizes

    def best_batch(self, layout: Layout, overlap: str) -> tuple[Candidate | None, Candidate]:
        """The candidate at the largest batch meeting memory and targets, and the smallest
        batch's candidate (to say which constraint fails when none meets them).

        Memory, TTFT and TPOT all grow with the batch, so the batch is found by bisection. A
        pipeline is screened with its even split first; the stage ILP, never slower and fitting
        whenever the even split fits, then starts there and climbs while its partition meets
        the constraints (two or three ILPs per layout instead of one per bisection step)."""
        sizes = self.batch_sizes(layout)
        screen = layout.pp > 1

        def ok(c: Candidate) -> bool:
            return c.fits and c.meets(self.targets)

        smallest = self.evaluate(layout, overlap, sizes[0], ilp=not screen)
        if not ok(smallest):
            if not screen:
                return None, smallest
            smallest = self.evaluate(layout, overlap, sizes[0])
            if not ok(smallest):
                return None, smallest
            lo, best = 0, smallest
        else:
            lo, hi, best = 0, len(sizes) - 1, smallest
            while lo < hi:
                mid = (lo + hi + 1) // 2
                c = self.evaluate(layout, overlap, sizes[mid], ilp=not screen)
                if ok(c):
                    lo, best = mid, c
                else:
                    hi = mid - 1
            if screen:
                best = self.evaluate(layout, overlap, sizes[lo])
        while screen and lo + 1 < len(sizes):
            c = self.evaluate(layout, overlap, sizes[lo + 1])
            if not ok(c):
                break
            lo, best = lo + 1, c
        return best, smallest

    def run(self, devices: int, devices_per_node: int) -> SearchResult:
        layouts, tried = enumerate_layouts(self.arch, devices, devices_per_node)
        self.counts["layouts_tried"], self.counts["layouts_valid"] = tried, len(layouts)
        feasible: list[Candidate] = []
        closest: dict[str, Candidate] = {}
        for layout in layouts:
            overlaps = ["none"] + (["two_microbatch"] if layout.ep > 1 and layout.pp == 1 else [])
            for overlap in overlaps:
                self.counts["configurations"] += 1
                best, smallest = self.best_batch(layout, overlap)
                if best is not None:
                    feasible.append(best)
                else:
                    _note_closest(closest, smallest, self.targets)
        self.counts["feasible"] = len(feasible)
        return SearchResult(sorted(feasible, key=rank_key), dict(self.counts), closest)


def _note_closest(closest: dict[str, Candidate], c: Candidate, targets: Targets) -> None:
    """Keep, per constraint, the candidate nearest to meeting it: the most free memory among
    those that do not fit, and the lowest TTFT / TPOT among those that fit."""
    if not c.fits:
        if "memory" not in closest or c.memory["free"] > closest["memory"].memory["free"]:
            closest["memory"] = c
        return
    for name, value, target in (("ttft", c.ttft, targets.ttft), ("tpot", c.tpot, targets.tpot)):
        if target is not None and value > target and (name not in closest or value < getattr(closest[name], name)):
            closest[name] = c


def explain_infeasible(result: SearchResult, arch: ModelArch, cluster: str, devices: int, targets: Targets) -> InputError:
    """Which constraint cannot hold, with the figure closest to holding it."""
    near = result.best_infeasible
    gib = 2**30
    if not any(c.fits for c in near.values()):
        c = near.get("memory")
        detail = (f"; the least short is {c.label()} at 1 sequence per replica, needing {c.memory['used'] / gib:.1f} GiB per "
                  f"device against {c.memory['budget'] / gib:.1f} GiB usable") if c else ""
        return InputError(f"{arch.name} does not fit any layout of up to {devices} devices of {cluster} "
                          f"(weights, KV cache for one sequence, activations and reserve){detail}", field="--devices")
    for name, option in (("ttft", "--ttft-slo"), ("tpot", "--tpot-slo")):
        if name in near:
            c = near[name]
            target = getattr(targets, name)
            return InputError(f"no layout of up to {devices} devices of {cluster} reaches a {name.upper()} of "
                              f"{target * 1e3:g} ms; the best is {getattr(c, name) * 1e3:.2f} ms ({c.label()}, one "
                              f"sequence per replica)", field=option)
    return InputError(f"no layout of up to {devices} devices of {cluster} fits {arch.name} and meets the targets",
                      field="--devices")


def two_microbatch_step(arch: ModelArch, half: Estimate) -> float:
    """Decode step (s) of two half batches costed by ``half``: per MoE layer both halves'
    compute (attention, router, shared experts; then experts) queue on the compute stream and
    their dispatch / combine on the communication stream, each waiting for its own half."""
    comp = comm = 0.0
    done = [0.0, 0.0]  # each half's last combine
    segment = 0.0  # compute since the last MoE layer, per half
    for layer in arch.layers:
        if layer.encoder:
            continue
        cost = half.decode_layers[_layer_kind(layer)]
        if not layer.moe:
            segment += cost.time
            continue
        parts = {p.name: p.time for p in cost.parts}
        dispatch, experts, combine = (parts.get(k, 0.0) for k in ("dispatch", "experts", "combine"))
        segment += cost.time - dispatch - experts - combine
        sent = []
        for i in (0, 1):
            comp = max(comp, done[i]) + segment
            comm = max(comm, comp) + dispatch
            sent.append(comm)
        for i in (0, 1):
            comp = max(comp, sent[i]) + experts
            comm = max(comm, comp) + combine
            done[i] = comm
        segment = 0.0
    tail = segment + half.decode_layers["lm_head"].time
    return max(comp, comm) + 2 * tail
