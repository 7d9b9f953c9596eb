"""The placement MILP: experts and replicas onto nodes and GPUs, as balanced as the better of
EPLB's two plans, with less inter-node traffic and migration (HiGHS through highspy).

Decomposed per layer, then node before GPU, as large EP placements are in practice (the full
GPU-level model of DeepSeek-V3 has ~18,000 binaries a layer):

1. **Node stage, a MILP per layer.** Integer ``a[e, n]`` replicas of expert ``e`` on node ``n``
   (at most one per GPU), binary ``h[e, n]`` (``e`` present on ``n``), continuous ``y[e, n]``
   tokens of ``e`` served on ``n`` (an expert's tokens split freely over the nodes that hold
   it). Hard: every expert placed and its tokens served, every node's slots filled, a replica
   no heavier than the better EPLB plan's straggler ``cap``, each node's load within
   ``gpus_per_node * (mean + slack * (cap - mean))`` (the rest of EPLB's excess is left to the
   GPU stage). Objective: inter-node traffic, plus migration. With routing groups
   (group-limited routing, DeepSeek-V3) traffic is ``sum z[g, n] * P(token picks g)``, with
   ``z[g, n] >= h[e, n]`` for the experts of group ``g``: a token reaches every node its chosen
   groups are spread over. Without groups it is minus the most co-activated pairs kept on one
   node (``w[p, n] <= h[e, n], h[f, n]``) per token. Migration: minus expert-node pairs kept
   from the current placement, per expert. A cut (a group spans at least as many nodes as its
   load needs node capacities) lifts the LP bound. The start keeps groups whole (groups packed
   onto nodes, tokens of overloaded nodes moved to replicas on the lightest ones); without
   groups it is EPLB's plan. Each expert may sit only where a start puts it or on the
   ``candidates`` least-loaded nodes, so presolve shrinks the model to what one second solves.
2. **GPU stage, per node.** Replicas packed heaviest first onto the node's GPUs (never two of an
   expert on one GPU) and improved by swapping replicas off the most loaded GPU, then an LP
   splits each expert's tokens over all its replicas in the layer to minimise the most loaded
   GPU; when that straggler is above ``cap``, a small MILP per node (replica-to-GPU binaries,
   tokens, the node's straggler minimised) replaces the packing. A layer still above ``cap`` is
   tried again with a quarter of the slack, then keeps EPLB's placement, so the plan is never
   less balanced than EPLB's, layer by layer.

The node stage's status, objective, best bound and relative gap are kept per layer; the plan
reports the sums and the worst gap. The time limit is shared out over the layers as it goes.
"""

from __future__ import annotations

import time

import highspy
import numpy as np

from moesim.plan.eplb import balanced_packing
from moesim.plan.solver import highs
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
    """The placement MILP (see the module docstring). ``traffic`` and ``migration`` weigh the
    objective's terms; ``pairs`` co-activated pairs a layer enter the model when the experts
    have no routing groups; ``slack`` is the share of the better EPLB plan's excess load (its
    straggler over the mean) the node stage may use, the rest kept for packing onto GPUs;
    ``time_limit`` seconds in all."""

    name = "ilp"

    def __init__(self, traffic: float = 1.0, migration: float = 0.1, pairs: int = 64, slack: float = 0.3,
                 candidates: int = 2, time_limit: float = 45.0, seed: int = 0):
        self.traffic, self.migration, self.pairs, self.slack = traffic, migration, pairs, slack
        self.candidates = candidates
        self.time_limit, self.seed = time_limit, seed

    def plan(self, problem: PlacementProblem) -> PlacementPlan:
        start = time.perf_counter()
        warm = _best_eplb(problem)
        L, N = problem.layers, problem.nodes
        node = node_of_slot(problem)
        phy2log = np.empty_like(warm.phy2log)
        weight = np.empty(warm.phy2log.shape)
        caps = gpu_loads(problem, warm).max(axis=1) * (1 + 1e-9)  # EPLB's straggler per layer
        layers = []
        for layer in range(L):
            left = self.time_limit - (time.perf_counter() - start)
            budget = max(left / (L - layer), 0.05)
            load, cap = problem.loads[layer], caps[layer]
            layer_end = time.perf_counter() + budget
            candidate, candidate_weight, straggler = None, None, np.inf
            # a layer whose GPUs cannot be packed under the cap is tried again with nodes held
            # closer to the mean (more room for the packing, a little more spreading)
            for slack in (self.slack, self.slack / 4):
                left = layer_end - time.perf_counter()
                if slack != self.slack and left < 0.2 * budget:
                    break
                replicas, share, info = self._node_stage(problem, layer, warm, node, cap, 0.25 * budget, slack)
                if replicas is None:
                    continue
                deadline = time.perf_counter() + max(layer_end - time.perf_counter(), 0.05) * (0.5 if slack == self.slack else 1.0)
                for exact in (False, True):  # packing, then the small MILPs when packing was not enough
                    rows = [_gpu_stage(replicas[n], share[n], problem.gpus // N, problem.slots_per_gpu, cap,
                                       max(deadline - time.perf_counter(), 0.01) / (N - n), self.seed, exact)
                            for n in range(N)]
                    if any(r is None for r in rows):
                        continue
                    candidate = np.concatenate(rows)
                    candidate_weight = split_tokens(load, candidate, problem.gpus)
                    straggler = (load[candidate] * candidate_weight).reshape(problem.gpus, -1).sum(axis=1).max()
                    if straggler <= cap:
                        break
                if straggler <= cap:
                    break
            layers.append(info)
            if straggler > cap:
                candidate, candidate_weight = warm.phy2log[layer], warm.weight[layer]
                info["kept_eplb"] = True
            phy2log[layer], weight[layer] = candidate, candidate_weight
        solver = {
            "solver": "HiGHS",
            "status": sorted({info["status"] for info in layers}),
            "objective": float(sum(info["objective"] for info in layers)),
            "bound": float(sum(info["bound"] for info in layers)),
            "worst_gap": float(max(info["gap"] for info in layers)),
            "layers_kept_eplb": sum(bool(info.get("kept_eplb")) for info in layers),
            "seconds": time.perf_counter() - start,
        }
        solver["gap"] = _gap(solver["objective"], solver["bound"])
        return PlacementPlan(self.name, phy2log, weight, solver)

    def _node_stage(self, problem: PlacementProblem, layer: int, warm: PlacementPlan, node: np.ndarray, cap: float,
                    budget: float, slack: float):
        """Replicas ``[nodes, experts]`` and tokens ``[nodes, experts]`` of one layer, or
        ``None`` when no placement within the loads allowed was found in time."""
        E, N, gpn = problem.experts, problem.nodes, problem.gpus // problem.nodes
        S = problem.slots // N
        load = problem.loads[layer]
        mean_gpu = load.sum() / problem.gpus
        node_cap = gpn * (mean_gpu + slack * max(cap - mean_gpu, 0.0))
        tokens = problem.trace.shape[0] if problem.trace is not None else 1
        EN = E * N
        ia, ih, iy, iz = 0, EN, 2 * EN, 3 * EN  # column blocks
        rows = _Rows()
        if problem.groups > 1:
            # z[g, n] = 1 when any expert of group g sits on node n: a token that chose group g
            # reaches every node the group is spread over, so each such pair costs the share of
            # tokens that choose g
            G, size = problem.groups, E // problem.groups
            spread = np.ones(G * N)
            if problem.trace is not None:
                ids = problem.trace[:, layer, :].astype(np.int64)
                chose = np.zeros((ids.shape[0], G), dtype=bool)
                rows_of = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
                keep = ids.ravel() >= 0
                chose[rows_of[keep], ids.ravel()[keep] // size] = True
                spread = np.repeat(chose.mean(axis=0), N)
            extra = G * N
            cell = np.arange(EN)
            g_of = cell // N // size
            rows.add_each(np.stack([ih + cell, iz + g_of * N + cell % N], 1), np.tile([1.0, -1.0], (EN, 1)), -np.inf, 0.0)  # h <= z
            traffic_cost = self.traffic * spread
            # valid cuts that lift the LP bound: a group spans at least as many nodes as its load
            # needs node caps
            need = np.maximum(np.ceil(load.reshape(G, size).sum(axis=1) / node_cap - 1e-9), 1.0)
            for g in range(G):
                rows.add(iz + g * N + np.arange(N), np.ones(N), need[g], np.inf)
        else:
            pairs, together = (coactivation_pairs(problem.trace[:, layer, :], E, self.pairs) if problem.trace is not None
                               else (np.zeros((0, 2), dtype=np.int64), np.zeros(0)))
            P = len(pairs)
            extra = P * N
            pn = np.arange(extra)
            for side in (0, 1):  # w[p, n] <= h[e, n] for both experts of the pair
                rows.add_each(np.stack([iz + pn, ih + pairs[pn // N, side] * N + pn % N], 1), np.tile([1.0, -1.0], (extra, 1)),
                              -np.inf, 0.0)
            traffic_cost = -self.traffic * np.repeat(together, N) / tokens
        ncol = iz + extra
        cost = np.zeros(ncol)
        cost[iz:] = traffic_cost
        if problem.current is not None and self.migration > 0:
            kept = np.zeros((E, N))
            kept[np.asarray(problem.current)[layer], node] = 1.0
            cost[ih:ih + EN] -= self.migration * kept.ravel() / E
        lower = np.zeros(ncol)
        upper = np.concatenate([np.full(EN, float(gpn)), np.ones(EN), np.repeat(load, N), np.ones(extra)])
        grouped = _grouped_start(problem, layer, cap, node_cap) if problem.groups > 1 else None
        eplb = _node_replicas(problem, layer, warm, node)
        if self.candidates:
            # each expert may sit only on the nodes where a start has it, or on the ``candidates``
            # nodes the starts leave least loaded: presolve drops the rest, which makes DeepSeek-V3
            # layers solvable in about a second
            allowed = eplb[0] > 0
            start_tokens = eplb[1]
            if grouped is not None:
                allowed |= grouped[0] > 0
                start_tokens = grouped[1]
            allowed[:, np.argsort(start_tokens.sum(axis=0), kind="stable")[: self.candidates]] = True
            for block in (ia, ih, iy):
                upper[block:block + EN] *= allowed.ravel()
        e_of = np.repeat(np.arange(E), N)
        cell = np.arange(EN)
        for e in range(E):  # every expert placed; its tokens all served
            rows.add(ia + e * N + np.arange(N), np.ones(N), 1.0, np.inf)
            rows.add(iy + e * N + np.arange(N), np.ones(N), load[e], load[e])
        for n in range(N):  # slots filled; node load within the cap
            rows.add(ia + np.arange(E) * N + n, np.ones(E), S, S)
            rows.add(iy + np.arange(E) * N + n, np.ones(E), -np.inf, node_cap)
        rows.add_each(np.stack([ih + cell, ia + cell], 1), np.tile([1.0, -1.0], (EN, 1)), -np.inf, 0.0)  # h <= a
        rows.add_each(np.stack([ia + cell, ih + cell], 1), np.tile([1.0, -float(gpn)], (EN, 1)), -np.inf, 0.0)  # a <= gpn h
        rows.add_each(np.stack([iy + cell, ih + cell], 1), np.stack([np.ones(EN), -load[e_of]], 1), -np.inf, 0.0)  # y only where held
        rows.add_each(np.stack([iy + cell, ia + cell], 1), np.tile([1.0, -cap], (EN, 1)), -np.inf, 0.0)  # a replica fits a GPU
        h = highs(budget, self.seed)
        h.addCols(ncol, cost, lower, upper, 0, np.array([], dtype=np.int32), np.array([], dtype=np.int32), np.array([]))
        rows.load(h)
        integer = np.zeros(ncol, dtype=np.int32)
        integer[: 2 * EN] = 1  # a integer, h binary (bounds 0..1); z, w take 0 / 1 at the optimum
        h.changeColsIntegrality(ncol, np.arange(ncol, dtype=np.int32), integer)
        blocks = (ia, ih, iy, iz)
        # HiGHS keeps one start: the group-keeping one when there is one (EPLB's spreads groups)
        h.setSolution(_start(problem, *(grouped if grouped is not None else eplb), ncol, blocks, problem.groups > 1))
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        if info.primal_solution_status != 2:
            return None, None, {"status": status, "objective": np.nan, "bound": np.nan, "gap": 1.0}
        values = np.asarray(h.getSolution().col_value)
        objective = float(cost @ values)
        bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else objective
        replicas = np.rint(values[ia:ia + EN]).astype(np.int64).reshape(E, N).T  # [N, E]
        share = values[iy:iy + EN].reshape(E, N).T * (replicas > 0)
        return replicas, share, {"status": status, "objective": objective, "bound": bound, "gap": _gap(objective, bound)}


def _gpu_stage(replicas: np.ndarray, share: np.ndarray, gpus: int, per: int, cap: float, budget: float, seed: int,
               exact: bool):
    """One node's replicas onto its GPUs: ``replicas[e]`` replicas of each held expert,
    ``share[e]`` its tokens on the node, ``per`` slots a GPU. First longest-processing-time
    packing (each replica an equal share of its expert's tokens, never two replicas of an expert
    on one GPU); when that leaves a GPU above ``cap``, a small MILP (binary ``z[e, g]``: a replica
    of ``e`` on GPU ``g``; continuous ``x[e, g]``: its tokens; the most loaded GPU minimised)
    started from it, when ``exact``. Returns the expert of each of the node's slots (GPU by
    GPU), or ``None``; the tokens are split afterwards, over the whole layer."""
    held = np.flatnonzero(replicas)
    X = held.size
    z, x = np.zeros((X, gpus)), np.zeros((X, gpus))
    filled, gpu_load = np.zeros(gpus, dtype=np.int64), np.zeros(gpus)
    items = np.repeat(np.arange(X), replicas[held])
    piece = (share[held] / replicas[held])[items]
    packed = True
    for r in np.argsort(-piece, kind="stable"):
        room = np.flatnonzero((filled < per) & (z[items[r]] == 0))
        if room.size == 0:
            packed = False
            break
        g = room[np.argmin(gpu_load[room])]
        z[items[r], g], x[items[r], g] = 1.0, piece[r]
        filled[g] += 1
        gpu_load[g] += piece[r]
    if packed:
        _swap_down(z, x, gpu_load)
    if exact and (not packed or gpu_load.max() > cap):
        solved = _gpu_milp(replicas[held], share[held], gpus, per, cap, budget, seed, (z, x, gpu_load) if packed else None)
        if solved is None:
            return None
        z, x = solved
    elif not packed:
        return None
    return np.concatenate([held[np.flatnonzero(z[:, g] > 0.5)] for g in range(gpus)])


def _swap_down(z: np.ndarray, x: np.ndarray, gpu_load: np.ndarray, rounds: int = 64) -> None:
    """Improve a packing in place (``z`` / ``x`` ``[experts, gpus]`` placement and tokens,
    ``gpu_load`` ``[gpus]``): swap a replica of the most loaded GPU with one of another GPU
    while that lowers the larger of the two, never putting two replicas of an expert on one
    GPU; the best swap first."""
    for _ in range(rounds):
        top = int(np.argmax(gpu_load))
        mine = np.flatnonzero(z[:, top] > 0.5)
        best, move = gpu_load[top], None
        for g in np.flatnonzero(np.arange(gpu_load.size) != top):
            theirs = np.flatnonzero(z[:, g] > 0.5)
            # swap replica a (on top) with b (on g): loads top - xa + xb and g + xa - xb
            xa, xb = x[mine, top][:, None], x[theirs, g][None, :]
            worse = np.maximum(gpu_load[top] - xa + xb, gpu_load[g] + xa - xb)
            legal = (z[mine, g][:, None] < 0.5) & (z[theirs, top][None, :] < 0.5)
            worse = np.where(legal, worse, np.inf)
            i, j = np.unravel_index(np.argmin(worse), worse.shape)
            if worse[i, j] < best - 1e-9:
                best, move = worse[i, j], (mine[i], theirs[j], g)
        if move is None:
            return
        a, b, g = move
        xa, xb = x[a, top], x[b, g]
        z[a, top], z[b, g], z[a, g], z[b, top] = 0.0, 0.0, 1.0, 1.0
        x[a, top], x[b, g], x[a, g], x[b, top] = 0.0, 0.0, xa, xb
        gpu_load[top] += xb - xa
        gpu_load[g] += xa - xb


def _gpu_milp(replicas, share, gpus, per, cap, budget, seed, start):
    X = replicas.size
    XG = X * gpus
    iz, ix, it = 0, XG, 2 * XG
    ncol = 2 * XG + 1
    cost = np.zeros(ncol)
    cost[it] = 1.0
    upper = np.concatenate([np.ones(XG), np.repeat(np.minimum(share, cap), gpus), [highspy.kHighsInf]])
    rows = _Rows()
    cell = np.arange(XG)
    for i in range(X):  # each replica on its own GPU; the expert's tokens all served
        rows.add(iz + i * gpus + np.arange(gpus), np.ones(gpus), replicas[i], replicas[i])
        rows.add(ix + i * gpus + np.arange(gpus), np.ones(gpus), share[i], share[i])
    for g in range(gpus):  # slots filled; load under T
        rows.add(iz + np.arange(X) * gpus + g, np.ones(X), per, per)
        rows.add(np.concatenate([ix + np.arange(X) * gpus + g, [it]]), np.concatenate([np.ones(X), [-1.0]]), -np.inf, 0.0)
    rows.add_each(np.stack([ix + cell, iz + cell], 1), np.stack([np.ones(XG), -upper[ix:ix + XG]], 1), -np.inf, 0.0)  # x only where z
    h = highs(budget, seed)
    h.setOptionValue("mip_rel_gap", 1e-4)
    h.addCols(ncol, cost, np.zeros(ncol), upper, 0, np.array([], dtype=np.int32), np.array([], dtype=np.int32), np.array([]))
    rows.load(h)
    integer = np.zeros(ncol, dtype=np.int32)
    integer[:XG] = 1
    h.changeColsIntegrality(ncol, np.arange(ncol, dtype=np.int32), integer)
    if start is not None:
        z, x, gpu_load = start
        solution = highspy.HighsSolution()
        solution.col_value = np.concatenate([z.ravel(), x.ravel(), [gpu_load.max()]]).tolist()
        solution.value_valid = True
        h.setSolution(solution)
    h.run()
    if h.getInfo().primal_solution_status != 2:
        return None
    values = np.asarray(h.getSolution().col_value)
    return np.rint(values[iz:iz + XG]).reshape(X, gpus), values[ix:ix + XG].reshape(X, gpus)


def split_tokens(load: np.ndarray, phy2log_row: np.ndarray, gpus: int) -> np.ndarray:
    """Each slot's share of its expert's tokens ``[slots]`` that minimises the most loaded GPU,
    for one layer's placement (an LP: an expert's tokens split freely over its replicas)."""
    slots = phy2log_row.size
    per = slots // gpus
    h = highs(60.0)
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


def _grouped_start(problem: PlacementProblem, layer: int, cap: float, node_cap: float):
    """A node-stage start that keeps routing groups whole where it can: groups packed onto
    nodes by load (EPLB's hierarchical first step), then tokens of the heaviest experts of
    overloaded nodes moved to new replicas on the nodes with the most room, then spare slots
    given to the experts with the largest load per replica. Returns replicas and tokens
    ``[experts, nodes]``, or ``None`` when the slots run out."""
    E, N, gpn, G = problem.experts, problem.nodes, problem.gpus // problem.nodes, problem.groups
    S, size = problem.slots // N, E // G
    load = problem.loads[layer]
    if G % N:
        return None
    pack, _ = balanced_packing(load.reshape(G, size).sum(axis=1)[None, :], N)
    home = pack[0][np.arange(E) // size]
    a = np.zeros((E, N), dtype=np.int64)
    y = np.zeros((E, N))
    a[np.arange(E), home] = np.clip(np.ceil(load / cap), 1, gpn).astype(np.int64)
    y[np.arange(E), home] = load
    for _ in range(4 * E):
        node_load = y.sum(axis=0)
        over = int(np.argmax(node_load - node_cap))
        excess = node_load[over] - node_cap
        if excess <= 1e-9:
            break
        room = np.where(a.sum(axis=0) < S, node_cap - node_load, -np.inf)
        room[over] = -np.inf
        to = int(np.argmax(room))
        if room[to] <= 1e-9:
            return None
        e = int(np.argmax(np.where(a[:, to] < gpn, y[:, over], -1.0)))
        moved = min(excess, room[to], cap * (a[e, to] + 1) - y[e, to], y[e, over])
        y[e, over] -= moved
        y[e, to] += moved
        a[e, to] += 1
        a[e, over] = max(int(np.ceil(y[e, over] / cap - 1e-9)), 0) if y[e, over] > 1e-9 else 0
        if a[:, over].sum() == 0:
            return None
    if (y.sum(axis=0) > node_cap + 1e-6).any() or (a.sum(axis=1) == 0).any() or (a.sum(axis=0) > S).any():
        return None
    for n in range(N):  # spare slots: more replicas of the heaviest per replica
        while a[:, n].sum() < S:
            per = np.where((a[:, n] > 0) & (a[:, n] < gpn), y[:, n] / np.maximum(a[:, n], 1), -1.0)
            e = int(np.argmax(per))
            if per[e] < 0:
                return None
            a[e, n] += 1
    return a, y


def _node_replicas(problem: PlacementProblem, layer: int, plan: PlacementPlan, node: np.ndarray):
    """A plan's replicas and tokens of one layer per (expert, node), ``[experts, nodes]``."""
    E, N = problem.experts, problem.nodes
    row = plan.phy2log[layer]
    a = np.zeros((E, N))
    np.add.at(a, (row, node), 1.0)
    y = np.zeros((E, N))
    np.add.at(y, (row, node), problem.loads[layer][row] * plan.weight[layer])
    return a, y


def _start(problem, a, y, ncol, blocks, grouped) -> highspy.HighsSolution:
    """Replicas and tokens ``[experts, nodes]`` as a solution of the node stage (``z`` from where
    the groups' experts sit; pair columns left at 0)."""
    ia, ih, iy, iz = blocks
    E, N = problem.experts, problem.nodes
    held = (a > 0).astype(np.float64)
    values = np.zeros(ncol)
    values[ia:ia + E * N], values[ih:ih + E * N], values[iy:iy + E * N] = np.ravel(a), held.ravel(), np.ravel(y)
    if grouped:
        values[iz:] = held.reshape(problem.groups, E // problem.groups, N).max(axis=1).ravel()
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
