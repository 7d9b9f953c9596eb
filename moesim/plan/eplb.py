"""DeepSeek's expert-parallelism load balancer (EPLB), reimplemented from its published
description (github.com/deepseek-ai/EPLB, README and the DeepSeek-V3 report, section 3.4).

EPLB replicates the heaviest experts into redundant slots and packs the physical experts onto
GPUs so that every GPU gets the same number of slots and as even a load as a greedy packing
finds. It ignores traffic between GPUs, memory and migration: the ILP planner weighs those.

Two policies, as in the original:

- hierarchical (when the expert groups divide evenly over the nodes): pack whole expert groups
  onto nodes (so group-limited routing keeps each token's traffic on few nodes), replicate
  inside each node, then pack each node's replicas onto its GPUs;
- global: replicate over all experts and pack the replicas onto all GPUs.

Ties go to the lowest index everywhere (the heaviest item first, the lightest pack first), which
reproduces the README example exactly (a test shows it).
"""

from __future__ import annotations

import numpy as np

from moesim.errors import InputError


def balanced_packing(weight: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Put the ``n`` items of each row of ``weight`` (``[rows, n]``) into ``packs`` packs of
    ``n / packs`` items each: heaviest item first, into the lightest pack with room. Returns the
    pack of each item and its position inside the pack, both ``[rows, n]``."""
    rows, n = weight.shape
    per_pack = n // packs
    pack = np.empty((rows, n), dtype=np.int64)
    position = np.empty((rows, n), dtype=np.int64)
    if per_pack == 1:
        pack[:] = np.arange(n)
        position[:] = 0
        return pack, position
    for row in range(rows):
        load = np.zeros(packs)
        count = np.zeros(packs, dtype=np.int64)
        for item in np.argsort(-weight[row], kind="stable"):
            open_packs = np.flatnonzero(count < per_pack)
            target = open_packs[np.argmin(load[open_packs])]
            pack[row, item], position[row, item] = target, count[target]
            load[target] += weight[row, item]
            count[target] += 1
    return pack, position


def replicate_experts(weight: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``slots`` physical slots to the ``E`` experts of each row (``[rows, E]`` loads): one
    each, then every redundant slot to the expert with the largest load per replica. Returns
    ``phy2log`` ``[rows, slots]``, each slot's replica index, and the replica count per expert
    ``[rows, E]``."""
    rows, experts = weight.shape
    phy2log = np.empty((rows, slots), dtype=np.int64)
    phy2log[:, :experts] = np.arange(experts)
    replica = np.zeros((rows, slots), dtype=np.int64)
    count = np.ones((rows, experts), dtype=np.int64)
    index = np.arange(rows)
    for slot in range(experts, slots):
        heaviest = np.argmax(weight / count, axis=1)
        phy2log[:, slot] = heaviest
        replica[:, slot] = count[index, heaviest]
        count[index, heaviest] += 1
    return phy2log, replica, count


def _inverse(permutation: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(permutation)
    np.put_along_axis(inverse, permutation, np.arange(permutation.shape[1])[None, :].repeat(permutation.shape[0], 0), axis=1)
    return inverse


def _hierarchical(weight: np.ndarray, slots: int, groups: int, nodes: int, gpus: int) -> tuple[np.ndarray, np.ndarray]:
    layers, experts = weight.shape
    group_size = experts // groups
    slots_per_node = slots // nodes
    gpus_per_node = gpus // nodes
    # 1. whole groups onto nodes; experts renumbered so each node's experts are contiguous
    group_load = weight.reshape(layers, groups, group_size).sum(axis=2)
    group_pack, group_position = balanced_packing(group_load, nodes)
    log2mlog = ((group_pack * (groups // nodes) + group_position) * group_size)[:, :, None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(layers, experts)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node, every node a row of its own
    node_weight = np.take_along_axis(weight, mlog2log, axis=1).reshape(layers * nodes, experts // nodes)
    phy2mlog, _, count = replicate_experts(node_weight, slots_per_node)
    # 3. each node's replicas onto its GPUs, by load per replica
    replica_load = np.take_along_axis(node_weight / count, phy2mlog, axis=1)
    gpu, position = balanced_packing(replica_load, gpus_per_node)
    phy2pphy = gpu * (slots_per_node // gpus_per_node) + position
    pphy2mlog = np.take_along_axis(phy2mlog, _inverse(phy2pphy), axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, nodes, -1) + (np.arange(nodes) * (experts // nodes))[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    return phy2log, replica_counts(phy2log, experts)


def replica_counts(phy2log: np.ndarray, experts: int) -> np.ndarray:
    """Replicas of each expert ``[layers, experts]`` in a placement ``phy2log`` ``[layers, slots]``."""
    return np.stack([np.bincount(row, minlength=experts) for row in phy2log])


def log2phy_map(phy2log: np.ndarray, count: np.ndarray) -> np.ndarray:
    """EPLB's ``log2phy`` ``[layers, experts, most replicas]``: each expert's slots in order,
    padded with -1; ``count`` the replicas per expert ``[layers, experts]``."""
    layers, experts = count.shape
    log2phy = np.full((layers, experts, int(count.max())), -1, dtype=np.int64)
    for layer in range(layers):
        seen = np.zeros(experts, dtype=np.int64)
        for slot, expert in enumerate(phy2log[layer]):
            log2phy[layer, expert, seen[expert]] = slot
            seen[expert] += 1
    return log2phy


def rebalance_experts(weight: np.ndarray, slots: int, groups: int, nodes: int, gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB: ``weight`` ``[layers, experts]`` loads, ``slots`` physical experts in all (experts
    plus redundant ones), ``groups`` expert groups (group-limited routing; 1 if none), ``nodes``
    and ``gpus`` in the EP group. Hierarchical when the groups divide evenly over the nodes,
    global otherwise. Returns ``phy2log`` ``[layers, slots]`` (slot ``p`` on GPU
    ``p // (slots / gpus)``), ``log2phy`` ``[layers, experts, most replicas]`` (-1 padded) and the
    replica count per expert ``[layers, experts]``."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise InputError(f"expert loads must be [layers, experts]; got shape {weight.shape}", field="weight")
    layers, experts = weight.shape
    if slots < experts:
        raise InputError(f"{slots} slots cannot hold {experts} experts: need at least one slot per expert", field="slots")
    for name, value, total in (("gpus", gpus, slots), ("nodes", nodes, gpus), ("groups", groups, experts)):
        if value <= 0 or total % value:
            raise InputError(f"{name} = {value} must divide {total} evenly", field=name)
    if groups % nodes == 0:
        phy2log, count = _hierarchical(weight, slots, groups, nodes, gpus)
    else:
        phy2log, count = _hierarchical(weight, slots, 1, 1, gpus)
    return phy2log, log2phy_map(phy2log, count), count
