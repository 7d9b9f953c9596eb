"""The offload-policy MILP: which experts live in HBM, where misses run, what is prefetched,
and how many sequences decode together, on one GPU with a CPU, host DRAM and an SSD.

In the spirit of MoE-Lightning (Cao et al., arXiv:2411.11217): a performance model of the
CPU-GPU-I/O pipeline of one decode step, layer by layer, whose resources (GPU compute, the PCIe
copy engine, the CPU, DRAM and SSD bandwidth) each bound the step, and a mixed-integer program
over the policy. Per MoE layer ``m`` and expert ``e``:

- ``x[m, e]`` binary: the expert is pinned in HBM (``residency: static`` with that list);
- ``y[m, e]`` in [0, 1]: the share of its misses run on the CPU; the rest are copied over PCIe
  and computed on the GPU;
- per layer, continuous times: ``S`` (router done), ``W`` (the layer's demand copies start:
  after the router and after the copy engine's earlier work), ``L`` (copy engine free after this
  layer's demand copies and the next layer's prefetch copies, queued FIFO), ``F`` (layer done:
  after the GPU's hits, prefetched and copied experts, and the CPU's experts; and after their
  sum shared over at most two sides, since one expert runs on one side only).

The routing statistics are expectations over the steps of a token-level trace cut into
``batch`` streams: ``u`` the chance the expert is used in a step, its tokens when used, and for a
prefetcher ``r`` (guessed and used: a prefetch hit) and ``v`` (guessed, not used: a wasted copy).
Capacities are hard: the pinned experts plus ``batch`` sequences' KV cache fit the HBM left
after the non-expert weights, every expert's home copy fits DRAM + SSD; bandwidths bound the
step: PCIe through the copy-engine timeline, DRAM and SSD through their bytes per step.

The batch size and the prefetcher are enumerated (each changes every coefficient); each
candidate is one MILP, minimising the step's seconds. ``latency`` picks the lowest time per
output token of one sequence (one sequence decoding alone); ``throughput`` the most tokens/s.
Solved with HiGHS through PuLP (CBC when HiGHS is missing); status, bound and gap are kept.

This module imports no simulator: the caller passes the hardware's numbers and the trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pulp

from moesim.errors import InputError
from moesim.plan.solver import pulp_solver
from moesim.routing.trace import tokens_per_expert

GIB = 2**30
OBJECTIVES = ("latency", "throughput")
# relative optimality gap each MILP is solved to: the CPU / GPU balancing of fractional pins
# leaves a weak LP bound, and closing the last 0.2% costs 10-100x the time (Mixtral, 32 x 8)
GAP = 2e-3


@dataclass(frozen=True)
class Prefetcher:
    """A prefetch policy the deployment can run: ``none``, ``speculative`` (``top_n`` guesses
    per token, each used expert recognised with probability ``accuracy``) or ``pregated``."""

    name: str = "none"
    top_n: int | None = None
    accuracy: float = 1.0


@dataclass
class OffloadProblem:
    """What the planner needs, in SI units. ``trace`` ``[tokens, layers, k]`` (-1: no expert).
    ``layer_s`` / ``tail_s``: per candidate batch size, a decode step's non-expert seconds per
    MoE layer (attention, router, shared experts, framework overhead) and after the last one.
    ``gpu_expert_s[n]`` / ``cpu_expert_s[n]``: one expert's seconds with ``n`` tokens, weights in
    HBM / in DRAM (``cpu_expert_s`` empty: no CPU experts). ``hbm_room``: HBM bytes for expert
    slots and KV cache together; ``hbm_limit``: a cap on the slots' bytes."""

    trace: np.ndarray
    experts: int
    expert_bytes: float
    hbm_room: float
    kv_bytes_per_sequence: float
    dram_bytes: float
    ssd_bytes: float
    h2d: float
    d2h: float
    link_latency: float
    ssd_read: float  # 0: no SSD
    ssd_latency: float
    dram_bandwidth: float
    hidden: int
    gpu_expert_s: np.ndarray
    cpu_expert_s: np.ndarray
    layer_s: dict[int, float]
    tail_s: dict[int, float]
    prefetchers: tuple[Prefetcher, ...] = (Prefetcher(),)
    hbm_limit: float | None = None
    seed: int = 0
    source: str = ""


@dataclass
class OffloadPolicy:
    """The chosen policy: ``pinned`` experts per MoE layer, ``on_miss`` (wait / cpu / hybrid),
    the prefetcher, ``batch`` (max_running); ``predicted`` figures, ``solver`` record, and every
    candidate's result."""

    pinned: list[list[int]]
    on_miss: str
    prefetcher: Prefetcher
    batch: int
    predicted: dict
    solver: dict
    candidates: list[dict] = field(default_factory=list)

    def decision(self, expert_bytes: float, *, host_memory: str = "pinned", cpu_sockets: int | None = None) -> dict:
        """The scenario's ``offload:`` fields (plus ``max_running``) that deploy this policy."""
        count = sum(len(p) for p in self.pinned)
        pre = self.prefetcher
        return {"residency": "static", "scope": "layer", "pinned": self.pinned, "cache_experts": None,
                "cache_memory": float(count * expert_bytes), "prefetch": pre.name, "top_n": pre.top_n,
                "accuracy": float(pre.accuracy), "on_miss": self.on_miss, "host_memory": host_memory,
                "cpu_sockets": cpu_sockets, "max_running": int(self.batch)}


# -- routing statistics ------------------------------------------------------------------------


def step_statistics(trace: np.ndarray, experts: int, batch: int, prefetcher: Prefetcher, seed: int = 0,
                    max_steps: int = 4096) -> dict[str, np.ndarray]:
    """Per ``[layer, expert]`` expectations over decode steps of ``batch`` tokens, one from each
    of ``batch`` streams (the trace cut into equal consecutive parts): ``used`` (chance the expert
    is needed in a step), ``tokens`` (its tokens when needed), ``prefetch_hit`` (guessed by the
    prefetcher for its layer and needed) and ``prefetch_waste`` (guessed, not needed)."""
    tokens, layers, _ = trace.shape
    steps = tokens // batch
    if steps < 1:
        raise InputError(f"the routing trace has {tokens} tokens, fewer than a batch of {batch}", field="routing")
    ids = trace[: steps * batch].reshape(batch, steps, layers, -1).transpose(1, 0, 2, 3)
    if steps > max_steps:  # evenly spaced steps: the statistics of a long trace in bounded time
        ids = ids[np.linspace(0, steps - 1, max_steps).astype(np.int64)]
    n = ids.shape[0]
    step = np.broadcast_to(np.arange(n)[:, None, None, None], ids.shape)
    layer = np.broadcast_to(np.arange(layers)[None, None, :, None], ids.shape)
    ok = ids >= 0
    counts = np.bincount((step[ok] * layers + layer[ok]) * experts + ids[ok],
                         minlength=n * layers * experts).reshape(n, layers, experts)
    need = counts > 0
    used = need.mean(axis=0)
    mean_tokens = counts.sum(axis=0) / np.maximum(need.sum(axis=0), 1)
    hit = np.zeros((layers, experts))
    waste = np.zeros((layers, experts))
    if prefetcher.name != "none" and layers > 1:
        # the guess for layer m: every needed expert recognised with probability `accuracy`, the
        # remaining guesses by the layer's popularity (ranks in [0, 1), most popular highest)
        popularity = counts.sum(axis=0)
        prior = np.argsort(np.argsort(popularity, axis=1, kind="stable"), axis=1, kind="stable") / experts
        rng = np.random.default_rng([seed, 0x0FF1])
        known = need[:, 1:] & (rng.random(need[:, 1:].shape) < prefetcher.accuracy)
        score = known * 2.0 + prior[None, 1:]
        rank = np.argsort(np.argsort(-score, axis=2, kind="stable"), axis=2, kind="stable")
        if prefetcher.name == "pregated":  # as many guesses as the step's busiest layer needs
            guesses = np.maximum(need.sum(axis=2).max(axis=1), 1)[:, None, None]
        else:
            guesses = min(experts, (prefetcher.top_n or ids.shape[-1]) * batch)
        guessed = rank < guesses
        hit[1:] = (guessed & need[:, 1:]).mean(axis=0)
        waste[1:] = (guessed & ~need[:, 1:]).mean(axis=0)
    return {"used": used, "tokens": mean_tokens, "prefetch_hit": hit, "prefetch_waste": waste}


def on_ssd(problem: OffloadProblem, layers: int) -> np.ndarray:
    """``[layers, experts]`` True where an expert's home copy is on the SSD: DRAM keeps the most
    popular, as the simulator's tier plan does. Raises when DRAM + SSD cannot hold them."""
    total = layers * problem.experts
    in_dram = int(min(total, problem.dram_bytes // problem.expert_bytes))
    spilled = total - in_dram
    if spilled * problem.expert_bytes > problem.ssd_bytes:
        raise InputError(f"the model's {total} routed experts ({total * problem.expert_bytes / GIB:.1f} GiB) do not fit "
                         f"in host DRAM ({problem.dram_bytes / GIB:.1f} GiB) + SSD ({problem.ssd_bytes / GIB:.1f} GiB): "
                         "constraint 'DRAM + SSD capacity'", source=problem.source or None, field="cluster")
    if spilled and problem.ssd_read <= 0:
        raise InputError(f"{spilled} experts do not fit in host DRAM and the node has no SSD: constraint 'DRAM capacity'",
                         source=problem.source or None, field="cluster")
    popularity = tokens_per_expert(problem.trace, problem.experts, problem.trace.shape[0])[0].ravel().astype(np.float64)
    out = np.ones(total, dtype=bool)
    out[np.argsort(-popularity, kind="stable")[:in_dram]] = False
    return out.reshape(layers, problem.experts)


# -- one candidate -----------------------------------------------------------------------------


def _coefficients(problem: OffloadProblem, stats: dict, ssd: np.ndarray) -> dict[str, np.ndarray]:
    """Seconds per expert when used: on the GPU, on the CPU (with its activations over PCIe and a
    round trip), and the copy (from DRAM, or from the SSD pipelined with PCIe)."""
    p = problem
    grid = np.arange(p.gpu_expert_s.size)
    tok = stats["tokens"]
    gpu = np.interp(tok, grid, p.gpu_expert_s)
    copy = p.link_latency + p.expert_bytes / p.h2d
    if ssd.any():
        copy = np.where(ssd, p.link_latency + p.ssd_latency + p.expert_bytes / min(p.h2d, p.ssd_read), copy)
    copy = np.broadcast_to(copy, tok.shape)
    if p.cpu_expert_s.size:
        cpu = np.interp(tok, np.arange(p.cpu_expert_s.size), p.cpu_expert_s)
        if ssd.any():
            cpu = np.where(ssd, np.maximum(cpu, p.expert_bytes / p.ssd_read), cpu)
        act = tok * p.hidden * 2.0  # bf16 activations down and back
        cpu = cpu + 2 * p.link_latency + act / p.d2h + act / p.h2d
    else:
        cpu = np.full(tok.shape, np.inf)
    return {"gpu": gpu, "cpu": cpu, "copy": copy}


def solve_candidate(problem: OffloadProblem, batch: int, prefetcher: Prefetcher, budget: float, ssd: np.ndarray,
                    time_limit: float) -> dict:
    """One MILP: the policy for ``batch`` and ``prefetcher`` minimising the decode step's seconds
    with ``budget`` bytes of HBM for pinned experts. Returns its solution and figures."""
    p = problem
    layers, E = problem.trace.shape[1], problem.experts
    stats = step_statistics(p.trace, E, batch, prefetcher, p.seed)
    cost = _coefficients(p, stats, ssd)
    u, r, v = stats["used"], stats["prefetch_hit"], stats["prefetch_waste"]
    miss = u - r  # chance of a demand miss when not pinned
    cpu_ok = np.isfinite(cost["cpu"])
    lp = pulp.LpProblem("offload", pulp.LpMinimize)
    x, y = {}, {}
    for m in range(layers):
        for e in range(E):
            if u[m, e] > 0 or v[m, e] > 0:
                x[m, e] = pulp.LpVariable(f"x_{m}_{e}", cat="Binary")
                if cpu_ok[m, e] and miss[m, e] > 0:
                    y[m, e] = pulp.LpVariable(f"y_{m}_{e}", 0, 1)
                    lp += y[m, e] + x[m, e] <= 1, f"cpu_only_if_not_pinned_{m}_{e}"

    def Y(m, e):
        return y.get((m, e), 0)

    a, tail = p.layer_s[batch], p.tail_s[batch]
    S = [pulp.LpVariable(f"S_{m}", 0) for m in range(layers)]
    W = [pulp.LpVariable(f"W_{m}", 0) for m in range(layers)]
    L = [pulp.LpVariable(f"L_{m}", 0) for m in range(layers)]
    F = [pulp.LpVariable(f"F_{m}", 0) for m in range(layers)]
    T = pulp.LpVariable("T", 0)
    lp += T

    def layer_sum(m, term):
        return pulp.lpSum(term(m, e) for e in range(E) if (m, e) in x)

    def demand(m):  # copied on a miss: not pinned, not prefetched, not on the CPU
        return layer_sum(m, lambda m, e: miss[m, e] * cost["copy"][m, e] * (1 - x[m, e] - Y(m, e)))

    def prefetch(m):
        if m >= layers or m == 0:
            return 0
        return layer_sum(m, lambda m, e: (r[m, e] + v[m, e]) * cost["copy"][m, e] * (1 - x[m, e]))

    copied = lambda m, e: miss[m, e] * (1 - x[m, e] - Y(m, e))  # noqa: E731
    for m in range(layers):
        g = cost["gpu"]
        gpu_all = layer_sum(m, lambda m, e: u[m, e] * g[m, e] * x[m, e] + r[m, e] * g[m, e] * (1 - x[m, e])
                            + g[m, e] * copied(m, e))
        gpu_copied = layer_sum(m, lambda m, e: g[m, e] * copied(m, e))
        gpu_prefetched = layer_sum(m, lambda m, e: r[m, e] * g[m, e] * (1 - x[m, e]))
        cpu = pulp.lpSum(miss[m, e] * cost["cpu"][m, e] * y[m, e] for e in range(E) if (m, e) in y)
        lp += S[m] == (F[m - 1] if m else 0) + a, f"router_{m}"
        lp += W[m] >= S[m], f"copies_after_router_{m}"
        if m:
            lp += W[m] >= L[m - 1], f"copy_engine_fifo_{m}"
            lp += F[m] >= L[m - 1] + gpu_prefetched, f"prefetched_arrive_{m}"
        lp += L[m] >= W[m] + demand(m) + prefetch(m + 1), f"copy_engine_{m}"
        lp += F[m] >= S[m] + gpu_all, f"gpu_{m}"
        lp += F[m] >= W[m] + demand(m) + gpu_copied, f"copied_arrive_{m}"
        lp += F[m] >= S[m] + cpu, f"cpu_{m}"
        # the CPU and the GPU overlap only across different experts: a step that uses one expert
        # at the layer runs it on one side, so the sides share at most min(2, experts used) ways
        ways = min(2.0, max(float(u[m].sum()), 1.0))
        lp += F[m] >= S[m] + (cpu + demand(m) + gpu_all) * (1.0 / ways), f"cpu_gpu_overlap_{m}"
    lp += T >= F[-1] + tail, "step"
    lp += T >= L[-1], "copy_engine_steady_state"
    nbytes = p.expert_bytes
    moved = pulp.lpSum(nbytes * (copied(m, e) + (r[m, e] + v[m, e]) * (1 - x[m, e]) * (m > 0)) for m, e in x)
    cpu_read = pulp.lpSum(nbytes * miss[m, e] * y[m, e] for m, e in y)
    lp += T * p.dram_bandwidth >= moved + cpu_read, "dram_bandwidth"
    if ssd.any():
        lp += T * p.ssd_read >= pulp.lpSum(nbytes * (u[m, e] + v[m, e]) * (1 - x[m, e]) for m, e in x if ssd[m, e]), \
            "ssd_bandwidth"
    lp += pulp.lpSum(nbytes * x[k] for k in x) <= budget, "hbm_capacity"

    start = time.perf_counter()
    lp.solve(pulp_solver(time_limit, gap=GAP))
    seconds = time.perf_counter() - start
    status = pulp.LpStatus[lp.status]
    if T.value() is None:
        return {"batch": batch, "prefetcher": prefetcher, "status": status, "step_s": None}
    bound, gap = T.value(), 0.0
    model = getattr(lp, "solverModel", None)
    if model is not None and hasattr(model, "getInfo"):
        info = model.getInfo()
        bound = float(getattr(info, "mip_dual_bound", bound))
        gap = max(float(getattr(info, "mip_gap", 0.0)), 0.0)
    xv = np.zeros((layers, E), dtype=bool)
    yv = np.zeros((layers, E))
    for (m, e), var in x.items():
        xv[m, e] = (var.value() or 0) > 0.5
    for (m, e), var in y.items():
        yv[m, e] = 0.0 if xv[m, e] else min(max(var.value() or 0.0, 0.0), 1.0)
    step = float(pulp.value(T))
    return {"batch": batch, "prefetcher": prefetcher, "status": status, "step_s": step, "bound_s": min(bound, step),
            "gap": gap, "seconds": seconds, "pinned": xv, "cpu_share": yv, "stats": stats, "cost": cost,
            "variables": len(lp.variables()), "binaries": len(x)}


# -- the plan ----------------------------------------------------------------------------------


def _on_miss(sol: dict) -> str:
    """wait / cpu / hybrid from the MILP's CPU share of the expected misses."""
    miss = (sol["stats"]["used"] - sol["stats"]["prefetch_hit"]) * ~sol["pinned"]
    total = miss.sum()
    if total <= 1e-12:
        return "wait"
    share = float((miss * sol["cpu_share"]).sum() / total)
    return "wait" if share < 1e-3 else "cpu" if share > 1 - 1e-3 else "hybrid"


def _predicted(problem: OffloadProblem, sol: dict) -> dict:
    s, x, y = sol["stats"], sol["pinned"], sol["cpu_share"]
    u, r, v = s["used"], s["prefetch_hit"], s["prefetch_waste"]
    miss = (u - r) * ~x
    hits = (u * x + r * ~x).sum(axis=1)
    per_step_copies = (miss * (1 - y)).sum() + ((r + v) * ~x).sum()
    step, batch = sol["step_s"], sol["batch"]
    return {
        "tpot_s": step, "tokens_per_s": batch / step, "tokens_per_s_per_sequence": 1.0 / step,
        "hit_rate": float(hits.sum() / max(u.sum(), 1e-12)),
        "experts_in_hbm": int(x.sum()), "hbm_expert_bytes": float(x.sum() * problem.expert_bytes),
        "copies_per_step": float(per_step_copies),
        "pcie_h2d_bytes_per_step": float(per_step_copies * problem.expert_bytes),
        "cpu_experts_per_step": float((miss * y).sum()),
        "per_layer": {"experts_in_hbm": x.sum(axis=1).tolist(),
                      "hit_rate": (hits / np.maximum(u.sum(axis=1), 1e-12)).round(6).tolist(),
                      "cpu_share_of_misses": ((miss * y).sum(axis=1) / np.maximum(miss.sum(axis=1), 1e-12)).round(6).tolist()},
    }


def plan_offload(problem: OffloadProblem, objective: str = "latency", *, time_limit: float = 30.0) -> OffloadPolicy:
    """Solve every candidate (batch size x prefetcher) and return the best policy for
    ``objective``: ``latency`` (seconds per output token of one sequence) or ``throughput``
    (tokens/s of the batch). ``time_limit``: seconds in all, split over the candidates."""
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}", field="--objective")
    p = problem
    layers = p.trace.shape[1]
    src = p.source or None
    if p.hbm_room < p.kv_bytes_per_sequence:
        raise InputError(f"the HBM left after the non-expert weights, buffers, activations and reserve "
                         f"({max(p.hbm_room, 0) / GIB:.2f} GiB) does not hold one sequence's KV cache "
                         f"({p.kv_bytes_per_sequence / GIB:.2f} GiB): constraint 'HBM capacity'", source=src,
                         field="dtypes.weights")
    ssd = on_ssd(p, layers)
    batches = sorted(p.layer_s) if objective == "throughput" else [min(p.layer_s)]
    limit = np.inf if p.hbm_limit is None else p.hbm_limit
    # a hair of slack under the room: the simulator's tier plan checks the slots' bytes against it
    budgets = {b: min(limit, (p.hbm_room - b * p.kv_bytes_per_sequence) * (1 - 1e-9)) for b in batches}
    batches = [b for b in batches if budgets[b] >= 0]
    if not batches:
        raise InputError("no candidate batch size leaves HBM for its KV cache: constraint 'HBM capacity'", source=src,
                         field="scheduler.max_running")
    share = time_limit / (len(batches) * len(p.prefetchers))
    solved = [solve_candidate(p, b, pre, budgets[b], ssd, share) for b in batches for pre in p.prefetchers]
    feasible = [s for s in solved if s["step_s"] is not None]
    if not feasible:
        raise InputError(f"no candidate policy is feasible (solver: {', '.join(sorted({s['status'] for s in solved}))})",
                         source=src, field="offload")

    def per_token(s, key="step_s"):  # the objective's seconds: per output token, of a sequence or of the batch
        return s[key] / (s["batch"] if objective == "throughput" else 1)

    best = min(feasible, key=per_token)
    bound = min(per_token(s, "bound_s") for s in feasible)
    value = per_token(best)
    solver = {"name": "HiGHS (PuLP)" if "HiGHS" in pulp.listSolvers(onlyAvailable=True) else "CBC (PuLP)",
              "status": best["status"], "objective": f"{objective}: seconds per output token"
              + (" of the batch" if objective == "throughput" else " of one sequence"),
              "objective_value": value, "bound": bound, "gap": (value - bound) / value if value > 0 else 0.0,
              "candidates": len(solved), "time_limit_s": float(time_limit),
              "variables": best["variables"], "binaries": best["binaries"]}
    candidates = [{"max_running": s["batch"], "prefetch": s["prefetcher"].name, "top_n": s["prefetcher"].top_n,
                   "status": s["status"], "tpot_s": s["step_s"],
                   "tokens_per_s": None if s["step_s"] is None else s["batch"] / s["step_s"],
                   "gap": s.get("gap"), "solve_s": s.get("seconds")} for s in solved]
    return OffloadPolicy(pinned=[np.flatnonzero(row).tolist() for row in best["pinned"]], on_miss=_on_miss(best),
                         prefetcher=best["prefetcher"], batch=best["batch"], predicted=_predicted(p, best),
                         solver=solver, candidates=candidates)
