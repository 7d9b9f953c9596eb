"""The placement MILP: experts and replicas onto nodes and GPUs, weighing balance, inter-node
traffic and migration (solved with HiGHS through highspy).

Decomposed per layer, then node before GPU, as large EP placements are in practice (the full
GPU-level model of DeepSeek-V3 has ~18,000 binaries a layer):

1. **Node stage, a MILP per layer.** Integer ``a[e, n]`` replicas of expert ``e`` on node ``n``
   (at most one per GPU), binary ``h[e, n]`` (``e`` present on ``n``), continuous ``y[e, n]``
   tokens of ``e`` served on ``n`` (an expert's tokens split freely over the nodes that hold
   it), ``U`` the node load per GPU, and ``w[p, n]`` for the most co-activated expert pairs
   ``p = (e, f)`` (1 when both sit on ``n``). Constraints: every expert placed, every node's
   slots filled, ``y`` only where held, each replica at most EPLB's straggler load, node load
   per GPU ``<= U <=`` EPLB's straggler.
   Objective, each term in its own unit and weighted: ``U`` over the mean GPU load
   (``balance``), minus co-activated pairs kept on one node per token (each saves the token a
   trip to one more node: ``traffic``), minus expert-node pairs kept from the current placement
   per expert (``migration``). The better balanced of EPLB's two plans is the warm start and
   sets the bound; each layer gets an equal share of the time limit.
2. **GPU stage, per node.** The node's replicas, each an equal share of its node's tokens of the
   expert, packed onto the node's GPUs heaviest first (EPLB's balanced packing). A layer whose
   packed straggler comes out above EPLB's keeps EPLB's placement, so the plan is never less
   balanced than EPLB's, layer by layer.

The solver's status, objective, best bound and relative gap are kept per layer; the plan reports
the sums and the worst gap.
"""

from __future__ import annotations

import time

import highspy
import numpy as np

from moesim.plan.eplb import balanced_packing
from moesim.plan.placement import (EplbGlobal, EplbHierarchical, PlacementPlan, PlacementProblem, equal_weights, gpu_loads,
                                   node_of_slot)


def coactivation_pairs(trace_layer: np.ndarray, experts: int, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``most`` expert pairs chosen together by the most tokens in one layer
    (``trace_layer``: ``[tokens, k]``): ``[pairs, 2]`` expert ids and ``[pairs]`` token counts."""
    ids = trace_layer.astype(np.int64)
    first, second = np.triu_indices(ids.shape[1], 1)
    a, b = ids[:, first].ravel(), ids[:, second].ravel()
    chosen = (a >= 0) & (b >= 0)  # -1: a slot that chose no expert (dropped, null expert)
    lo, hi = np.minimum(a, b)[chosen], np.maximum(a, b)[chosen]
    counts = np.bincount(lo * experts + hi, minlength=experts * experts)
    top = np.argsort(-counts, kind="stable")[:most]
    top = top[counts[top] > 0]
    return np.stack([top // experts, top % experts], axis=1), counts[top].astype(np.float64)


class Ilp:
    """The placement MILP (see the module docstring). ``balance``, ``traffic`` and ``migration``
    weigh the objective's terms; ``pairs`` co-activated pairs a layer enter the model;
    ``time_limit`` seconds in all."""

    name = "ilp"

    def __init__(self, balance: float = 1.0, traffic: float = 1.0, migration: float = 0.1, pairs: int = 64,
                 time_limit: float = 45.0, seed: int = 0):
        self.balance, self.traffic, self.migration = balance, traffic, migration
        self.pairs, self.time_limit, self.seed = pairs, time_limit, seed

    def plan(self, problem: PlacementProblem) -> PlacementPlan:
        start = time.perf_counter()
        warm = _best_eplb(problem)
        L, N = problem.layers, problem.nodes
        gpn, per = problem.gpus // N, problem.slots_per_gpu
        node = node_of_slot(problem)
        phy2log = np.empty_like(warm.phy2log)
        weight = np.empty(warm.phy2log.shape)
        layers = []
        for layer in range(L):
            left = self.time_limit - (time.perf_counter() - start)
            budget = max(left / (L - layer), 0.05)
            replicas, share, info = self._node_stage(problem, layer, warm, node, budget)
            layers.append(info)
            row = []
            for n in range(N):
                held = np.flatnonzero(replicas[n])
                items = np.repeat(held, replicas[n, held])
                load = np.repeat(share[n, held] / replicas[n, held], replicas[n, held])
                gpu, position = balanced_packing(load[None, :], gpn)
                slot = (gpu[0] * per + position[0])
                ordered = np.empty_like(items)
                ordered[slot] = items
                row.append(ordered)
            candidate = np.concatenate(row)
            candidate_weight = split_tokens(problem.loads[layer], candidate, problem.gpus)
            straggler = (problem.loads[layer][candidate] * candidate_weight).reshape(problem.gpus, -1).sum(axis=1).max()
            warm_straggler = (problem.loads[layer][warm.phy2log[layer]] * warm.weight[layer]).reshape(problem.gpus, -1).sum(axis=1).max()
            if straggler > warm_straggler * (1 + 1e-9):
                candidate, candidate_weight = warm.phy2log[layer], warm.weight[layer]
                info["kept_eplb"] = True
            phy2log[layer], weight[layer] = candidate, candidate_weight
        solver = {
            "solver": f"HiGHS {highspy.Highs().version()}" if hasattr(highspy.Highs, "version") else "HiGHS",
            "status": sorted({info["status"] for info in layers}),
            "objective": float(sum(info["objective"] for info in layers)),
            "bound": float(sum(info["bound"] for info in layers)),
            "worst_gap": float(max(info["gap"] for info in layers)),
            "layers_kept_eplb": sum(bool(info.get("kept_eplb")) for info in layers),
            "seconds": time.perf_counter() - start,
        }
        solver["gap"] = _gap(solver["objective"], solver["bound"])
        return PlacementPlan(self.name, phy2log, weight, solver)

    def _node_stage(self, problem: PlacementProblem, layer: int, warm: PlacementPlan, node: np.ndarray, budget: float):
        E, N, gpn = problem.experts, problem.nodes, problem.gpus // problem.nodes
        S = problem.slots // N
        load = problem.loads[layer]
        mean_gpu = max(load.sum() / problem.gpus, 1e-300)
        # EPLB's straggler bounds every replica and every node: the result is never less balanced
        warm_gpu = (load[warm.phy2log[layer]] * warm.weight[layer]).reshape(problem.gpus, -1).sum(axis=1)
        cap = warm_gpu.max() * (1 + 1e-9)
        if problem.trace is not None and self.traffic > 0:
            pairs, together = coactivation_pairs(problem.trace[:, layer, :], E, self.pairs)
        else:
            pairs, together = np.zeros((0, 2), dtype=np.int64), np.zeros(0)
        P = len(pairs)
        EN = E * N
        ia, ih, iy, iu, iw = 0, EN, 2 * EN, 3 * EN, 3 * EN + 1  # column blocks
        ncol = iw + P * N
        cost = np.zeros(ncol)
        cost[iu] = self.balance / mean_gpu
        tokens = problem.trace.shape[0] if problem.trace is not None else 1
        if P:
            cost[iw:] = -self.traffic * np.repeat(together, N) / tokens
        if problem.current is not None and self.migration > 0:
            kept = np.zeros((E, N))
            kept[np.asarray(problem.current)[layer], node] = 1.0
            cost[ih:ih + EN] -= self.migration * kept.ravel() / E
        lower = np.zeros(ncol)
        upper = np.concatenate([np.full(EN, float(gpn)), np.ones(EN), np.repeat(load, N), [cap], np.ones(P * N)])
        rows = _Rows()
        e_of = np.repeat(np.arange(E), N)
        cell = np.arange(EN)
        for e in range(E):  # every expert placed; its tokens all served
            rows.add(ia + e * N + np.arange(N), np.ones(N), 1.0, np.inf)
            rows.add(iy + e * N + np.arange(N), np.ones(N), load[e], load[e])
        for n in range(N):  # slots filled; node load per GPU under U
            rows.add(ia + np.arange(E) * N + n, np.ones(E), S, S)
            rows.add(np.concatenate([iy + np.arange(E) * N + n, [iu]]), np.concatenate([np.ones(E), [-gpn]]), -np.inf, 0.0)
        rows.add_each(np.stack([ih + cell, ia + cell], 1), np.tile([1.0, -1.0], (EN, 1)), -np.inf, 0.0)  # h <= a
        rows.add_each(np.stack([ia + cell, ih + cell], 1), np.tile([1.0, -float(gpn)], (EN, 1)), -np.inf, 0.0)  # a <= gpn h
        rows.add_each(np.stack([iy + cell, ih + cell], 1), np.stack([np.ones(EN), -load[e_of]], 1), -np.inf, 0.0)  # y only where held
        rows.add_each(np.stack([iy + cell, ia + cell], 1), np.tile([1.0, -cap], (EN, 1)), -np.inf, 0.0)  # replica <= cap
        if P:
            pn = np.arange(P * N)
            p_of, n_p = pn // N, pn % N
            for side in (0, 1):
                rows.add_each(np.stack([iw + pn, ih + pairs[p_of, side] * N + n_p], 1), np.tile([1.0, -1.0], (P * N, 1)), -np.inf, 0.0)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(budget))
        h.setOptionValue("random_seed", self.seed)
        h.setOptionValue("threads", 1)
        h.addCols(ncol, cost, lower, upper, 0, np.array([], dtype=np.int32), np.array([], dtype=np.int32), np.array([]))
        rows.load(h)
        integer = np.zeros(ncol, dtype=np.int32)
        integer[: 2 * EN] = 1  # a integer, h binary (bounds 0..1)
        h.changeColsIntegrality(ncol, np.arange(ncol, dtype=np.int32), integer)
        start = _warm_start(problem, layer, warm, node, ncol, pairs, (ia, ih, iy, iu, iw), gpn)
        h.setSolution(start)
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        values = np.asarray(h.getSolution().col_value)
        info = h.getInfo()
        has_solution = values.size == ncol and info.primal_solution_status == 2
        if not has_solution:  # the time ran out before the warm start was accepted: keep EPLB's
            values = np.asarray(start.col_value)
        objective = float(cost @ values)
        bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else objective
        replicas = np.rint(values[ia:ia + EN]).astype(np.int64).reshape(E, N).T  # [N, E]
        share = values[iy:iy + EN].reshape(E, N).T * (replicas > 0)
        return replicas, share, {"status": status, "objective": objective, "bound": bound, "gap": _gap(objective, bound)}


def split_tokens(load: np.ndarray, phy2log_row: np.ndarray, gpus: int) -> np.ndarray:
    """Each slot's share of its expert's tokens ``[slots]`` that minimises the most loaded GPU,
    for one layer's placement (an LP: an expert's tokens split freely over its replicas)."""
    slots = phy2log_row.size
    per = slots // gpus
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # columns: tokens of each slot, then the straggler T
    cost = np.zeros(slots + 1)
    cost[-1] = 1.0
    h.addCols(slots + 1, cost, np.zeros(slots + 1), np.concatenate([load[phy2log_row], [np.inf]]).clip(max=highspy.kHighsInf),
              0, np.array([], dtype=np.int32), np.array([], dtype=np.int32), np.array([]))
    rows = _Rows()
    for e in np.unique(phy2log_row):
        held = np.flatnonzero(phy2log_row == e)
        rows.add(held, np.ones(held.size), load[e], load[e])
    for g in range(gpus):
        rows.add(np.concatenate([np.arange(g * per, (g + 1) * per), [slots]]), np.concatenate([np.ones(per), [-1.0]]), -np.inf, 0.0)
    rows.load(h)
    h.run()
    tokens = np.asarray(h.getSolution().col_value)[:slots]
    total = load[phy2log_row]
    return np.where(total > 0, tokens / np.maximum(total, 1e-300), equal_weights(phy2log_row[None, :], load.size)[0])


def _best_eplb(problem: PlacementProblem) -> PlacementPlan:
    """Per layer, the better balanced of EPLB's two policies: the warm start and the bound on
    every replica's load."""
    plans = [EplbHierarchical().plan(problem), EplbGlobal().plan(problem)]
    stragglers = np.stack([gpu_loads(problem, plan).max(axis=1) for plan in plans])  # [2, layers]
    pick = stragglers.argmin(axis=0)[:, None]
    return PlacementPlan("eplb", np.where(pick == 0, plans[0].phy2log, plans[1].phy2log),
                         np.where(pick == 0, plans[0].weight, plans[1].weight))


def _gap(objective: float, bound: float) -> float:
    return abs(objective - bound) / max(abs(objective), 1e-9)


def _warm_start(problem, layer, warm, node, ncol, pairs, blocks, gpn) -> highspy.HighsSolution:
    """EPLB's plan in the node stage's columns."""
    ia, ih, iy, iu, iw = blocks
    E, N = problem.experts, problem.nodes
    load = problem.loads[layer]
    a = np.zeros((E, N))
    np.add.at(a, (warm.phy2log[layer], node), 1.0)
    y = np.zeros((E, N))
    np.add.at(y, (warm.phy2log[layer], node), load[warm.phy2log[layer]] * warm.weight[layer])
    held = (a > 0).astype(np.float64)
    values = np.zeros(ncol)
    values[ia:ia + E * N], values[ih:ih + E * N], values[iy:iy + E * N] = a.ravel(), held.ravel(), y.ravel()
    values[iu] = y.sum(axis=0).max() / gpn
    if len(pairs):
        values[iw:] = np.minimum(held[pairs[:, 0]], held[pairs[:, 1]]).ravel()
    solution = highspy.HighsSolution()
    solution.col_value = values.tolist()
    solution.value_valid = True
    return solution


class _Rows:
    """Constraint rows gathered as CSR arrays, then passed to HiGHS in one call."""

    def __init__(self):
        self.index, self.value, self.lower, self.upper, self.starts = [], [], [], [], [0]

    def add(self, index, value, lower, upper):
        self.index.append(np.asarray(index, dtype=np.int32))
        self.value.append(np.asarray(value, dtype=np.float64))
        self.lower.append(lower)
        self.upper.append(upper)
        self.starts.append(self.starts[-1] + len(index))

    def add_each(self, index, value, lower, upper):
        """Many rows of the same width: ``index`` and ``value`` ``[rows, width]``."""
        n, width = index.shape
        self.index.append(index.astype(np.int32).ravel())
        self.value.append(value.astype(np.float64).ravel())
        self.lower += [lower] * n
        self.upper += [upper] * n
        self.starts += list(self.starts[-1] + width * np.arange(1, n + 1))

    def load(self, h: highspy.Highs) -> None:
        index, value = np.concatenate(self.index), np.concatenate(self.value)
        inf = highspy.kHighsInf
        lower = np.clip(np.array(self.lower, dtype=np.float64), -inf, inf)
        upper = np.clip(np.array(self.upper, dtype=np.float64), -inf, inf)
        h.addRows(len(self.lower), lower, upper, index.size, np.array(self.starts[:-1], dtype=np.int32), index, value)
