"""Expert placement planners: which physical slot of which GPU holds which expert, and how each
expert's tokens split over its replicas.

Every planner has one shape (``planner.plan(problem) -> PlacementPlan``) and is found by name in
:data:`PLANNERS`:

- ``contiguous``: experts ``g*E/G ...`` on GPU ``g`` (vLLM and SGLang's default), no replicas;
- ``round_robin``: expert ``e`` on GPU ``e % G``, no replicas;
- ``greedy``: redundant slots to the heaviest experts per replica, replicas onto the lightest
  GPU with room (longest-processing-time first), ignoring nodes;
- ``eplb``, ``eplb_hierarchical``, ``eplb_global``: DeepSeek's EPLB (:mod:`moesim.plan.eplb`);
- ``ilp``: the MILP of :mod:`moesim.plan.ilp`: balance, inter-node traffic and migration.

A plan is scored by :func:`evaluate` on the same loads and co-activation: the most loaded GPU
over the mean (the straggler), the inter-node bytes per token of the dispatch (a token is sent
once to every remote node that holds one of its experts, as DeepEP's node-limited dispatch does),
and the expert bytes migrated from the current placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.errors import InputError
from moesim.plan.eplb import rebalance_experts, replica_counts


@dataclass
class PlacementProblem:
    """What a placement is planned from.

    ``loads``: tokens per expert ``[layers, experts]`` (from a trace or its statistics);
    ``gpus`` in ``nodes`` nodes (consecutive GPUs share a node); ``slots``: physical expert slots
    in all (experts plus redundant replicas), the same number on every GPU; ``groups``: expert
    groups of group-limited routing (EPLB keeps them on nodes); ``trace``: token-level routing
    ``[tokens, layers, k]`` for co-activation (optional: without it traffic is not scored);
    ``current``: the placement now ``[layers, slots]`` (optional: migration is then measured from
    it); ``expert_bytes``: one expert's weights; ``token_bytes``: one token's hidden state as
    dispatched."""

    loads: np.ndarray
    gpus: int
    nodes: int
    slots: int
    groups: int = 1
    trace: np.ndarray | None = None
    current: np.ndarray | None = None
    expert_bytes: float = 0.0
    token_bytes: float = 0.0

    def __post_init__(self):
        self.loads = np.asarray(self.loads, dtype=np.float64)
        if self.loads.ndim != 2:
            raise InputError(f"expert loads must be [layers, experts]; got shape {self.loads.shape}", field="loads")
        experts = self.loads.shape[1]
        if self.slots < experts:
            raise InputError(f"{self.slots} expert slots cannot hold {experts} experts: every expert needs a slot "
                             f"(slots >= experts)", field="slots")
        if self.gpus <= 0 or self.slots % self.gpus:
            raise InputError(f"{self.slots} slots do not split evenly over {self.gpus} GPUs", field="slots")
        if self.nodes <= 0 or self.gpus % self.nodes:
            raise InputError(f"{self.gpus} GPUs do not split evenly over {self.nodes} nodes", field="nodes")
        if self.groups <= 0 or experts % self.groups:
            raise InputError(f"{self.groups} expert groups do not divide {experts} experts", field="groups")
        if self.current is not None and np.shape(self.current) != (self.loads.shape[0], self.slots):
            raise InputError(f"current placement has shape {np.shape(self.current)}; expected "
                             f"({self.loads.shape[0]}, {self.slots})", field="current")

    @property
    def layers(self) -> int:
        return self.loads.shape[0]

    @property
    def experts(self) -> int:
        return self.loads.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        return self.slots // self.gpus


@dataclass
class PlacementPlan:
    """A placement: ``phy2log`` ``[layers, slots]`` (slot ``p`` on GPU ``p // slots_per_gpu``,
    SGLang's ``physical_to_logical_map``) and ``weight`` ``[layers, slots]``, each slot's share of
    its expert's tokens. ``solver`` holds the solver's status, objective, bound and gap when a
    solver made it."""

    method: str
    phy2log: np.ndarray
    weight: np.ndarray
    solver: dict = field(default_factory=dict)


def equal_weights(phy2log: np.ndarray, experts: int) -> np.ndarray:
    """Each replica an equal share of its expert's tokens."""
    return 1.0 / np.take_along_axis(replica_counts(phy2log, experts), phy2log, axis=1)


class Contiguous:
    name = "contiguous"

    def plan(self, problem: PlacementProblem) -> PlacementPlan:
        _no_redundancy(problem, self.name)
        phy2log = np.tile(np.arange(problem.experts), (problem.layers, 1))
        return PlacementPlan(self.name, phy2log, np.ones(phy2log.shape))


class RoundRobin:
    name = "round_robin"

    def plan(self, problem: PlacementProblem) -> PlacementPlan:
        _no_redundancy(problem, self.name)
        G, per = problem.gpus, problem.slots_per_gpu
        order = np.array([g + G * s for g in range(G) for s in range(per)])
        phy2log = np.tile(order, (problem.layers, 1))
        return PlacementPlan(self.name, phy2log, np.ones(phy2log.shape))


class Greedy:
    """Longest-processing-time packing over all GPUs, blind to nodes (EPLB's global policy
    differs only in filling each GPU to exactly its slots; this one does too, so the two differ
    in replication: here a replica goes to the expert with the largest remaining load)."""

    name = "greedy"

    def plan(self, problem: PlacementProblem) -> PlacementPlan:
        E, G, per = problem.experts, problem.gpus, problem.slots_per_gpu
        phy2log = np.empty((problem.layers, problem.slots), dtype=np.int64)
        for layer, load in enumerate(problem.loads):
            count = np.ones(E, dtype=np.int64)
            for _ in range(problem.slots - E):
                count[np.argmax(load / count)] += 1
            replicas = np.repeat(np.arange(E), count)
            share = load[replicas] / count[replicas]
            gpu_load, filled = np.zeros(G), np.zeros(G, dtype=np.int64)
            row = np.empty(problem.slots, dtype=np.int64)
            for r in np.argsort(-share, kind="stable"):
                room = np.flatnonzero(filled < per)
                g = room[np.argmin(gpu_load[room])]
                row[g * per + filled[g]] = replicas[r]
                gpu_load[g] += share[r]
                filled[g] += 1
            phy2log[layer] = row
        return PlacementPlan(self.name, phy2log, equal_weights(phy2log, E))


class Eplb:
    """DeepSeek EPLB: hierarchical when the expert groups divide over the nodes, else global."""

    name = "eplb"
    policy = "auto"

    def plan(self, problem: PlacementProblem) -> PlacementPlan:
        groups, nodes = problem.groups, problem.nodes
        if self.policy == "global" or (self.policy == "auto" and groups % nodes):
            groups, nodes = 1, 1
        elif self.policy == "hierarchical" and groups % nodes:
            # the hierarchical policy packs whole groups onto nodes; a model without routing
            # groups gets one group per node (moesim's choice) so the policy still applies
            groups = nodes
        phy2log, _, _ = rebalance_experts(problem.loads, problem.slots, groups, nodes, problem.gpus)
        return PlacementPlan(self.name, phy2log, equal_weights(phy2log, problem.experts))


class EplbHierarchical(Eplb):
    name, policy = "eplb_hierarchical", "hierarchical"


class EplbGlobal(Eplb):
    name, policy = "eplb_global", "global"


def _no_redundancy(problem: PlacementProblem, name: str) -> None:
    if problem.slots != problem.experts:
        raise InputError(f"the {name} placement has no redundant experts: slots must equal experts "
                         f"({problem.experts}); got {problem.slots}", field="slots")


def node_of_slot(problem: PlacementProblem) -> np.ndarray:
    """``[slots]``: the node of each physical slot."""
    return np.arange(problem.slots) // problem.slots_per_gpu // (problem.gpus // problem.nodes)


def gpu_loads(problem: PlacementProblem, plan: PlacementPlan) -> np.ndarray:
    """Tokens each GPU computes ``[layers, gpus]``."""
    per_slot = np.take_along_axis(problem.loads, plan.phy2log, axis=1) * plan.weight
    return per_slot.reshape(problem.layers, problem.gpus, -1).sum(axis=2)


def inter_node_tokens(problem: PlacementProblem, phy2log: np.ndarray) -> np.ndarray:
    """Mean remote nodes a token's dispatch reaches, per layer ``[layers]``: token ``t`` comes
    from GPU ``t % gpus`` (data-parallel attention spreads tokens evenly) and reaches every
    other node holding one of its experts; an expert with a replica on the token's own node is
    served there."""
    trace = problem.trace
    tokens = trace.shape[0]
    node = node_of_slot(problem)
    source = (np.arange(tokens) % problem.gpus) // (problem.gpus // problem.nodes)
    out = np.zeros(problem.layers)
    for layer in range(problem.layers):
        # held[e, n]: expert e has a replica on node n
        held = np.zeros((problem.experts, problem.nodes), dtype=bool)
        held[phy2log[layer], node] = True
        ids = trace[:, layer, :].astype(np.int64)
        chose = ids >= 0  # -1: a slot that chose no expert (dropped, null expert)
        ids = np.where(chose, ids, 0)
        local = held[ids, source[:, None]]  # [tokens, k]
        # a remote expert's node: its first holder (the dispatch picks one replica)
        first = np.argmax(held, axis=1)
        remote = np.where(local | ~chose, -1, first[ids])
        reached = np.zeros((tokens, problem.nodes), dtype=bool)
        rows = np.repeat(np.arange(tokens), ids.shape[1])
        keep = remote.ravel() >= 0
        reached[rows[keep], remote.ravel()[keep]] = True
        out[layer] = reached.sum() / tokens
    return out


def migrated_bytes(problem: PlacementProblem, phy2log: np.ndarray) -> float:
    """Expert weights that must move from the current placement: every (GPU, expert) pair the
    new placement has and the current one lacks loads one expert's weights."""
    if problem.current is None:
        return 0.0
    gpu = np.arange(problem.slots) // problem.slots_per_gpu
    moved = 0
    for layer in range(problem.layers):
        new = set(zip(gpu, phy2log[layer]))
        old = set(zip(gpu, np.asarray(problem.current)[layer]))
        moved += len(new - old)
    return moved * problem.expert_bytes


def evaluate(problem: PlacementProblem, plan: PlacementPlan) -> dict:
    """The plan's figures: ``imbalance`` (most loaded GPU over the mean, averaged over layers),
    ``worst_imbalance`` (the worst layer), ``inter_node_bytes_per_token`` (summed over layers;
    ``None`` without a trace), ``migrated_bytes``."""
    loads = gpu_loads(problem, plan)
    ratio = loads.max(axis=1) / np.maximum(loads.mean(axis=1), 1e-300)
    traffic = None
    if problem.trace is not None:
        traffic = float(inter_node_tokens(problem, plan.phy2log).sum() * problem.token_bytes)
    return {"imbalance": float(ratio.mean()), "worst_imbalance": float(ratio.max()),
            "inter_node_bytes_per_token": traffic, "migrated_bytes": migrated_bytes(problem, plan.phy2log)}


def planners() -> dict:
    """Every placement planner by name."""
    from moesim.plan.ilp import Ilp  # the MILP module builds on this one's problem and plan types

    return {cls.name: cls for cls in (Contiguous, RoundRobin, Greedy, Eplb, EplbHierarchical, EplbGlobal, Ilp)}
