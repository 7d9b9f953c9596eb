"""Collective communication time over a cluster topology: alpha-beta models.

A group is a list of accelerator nodes of a topology graph (``n0.acc0`` ...). Bandwidths and
latencies come from the graph's routes, so a PCIe-only box, an NVSwitch node and a multi-node
InfiniBand cluster differ by their wiring, not by special cases.

- all-reduce, ring: ``2 (n-1)/n * S / B + 2 (n-1) * a``; hierarchical across nodes:
  reduce-scatter inside each node, all-reduce of ``S / local`` across nodes over the NICs,
  all-gather inside each node.
- all-gather / reduce-scatter, ring: ``(n-1)/n * S / B + (n-1) * a`` (``S`` the full buffer).
- all-to-all from a per-pair byte matrix: every rank sends and receives at once; NVLink and
  the NIC run in parallel, so a rank takes the longer of its scale-up and scale-out traffic
  over their bandwidths, and the slowest rank sets the time. Hierarchical all-to-all (DeepEP
  normal mode) sends inter-node bytes once over RDMA to the peer with the same local index and
  forwards them over NVLink; flat sends each pair directly.

``S`` is in bytes, ``B`` the bottleneck bandwidth of a ring step, ``a`` a step's latency plus
the link's per-step software cost.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from moesim.cost.roofline import OpCost
from moesim.errors import InputError
from moesim.hardware.topology import route


def _node_of(graph, name: str) -> int:
    return graph.nodes[name]["node"]


def _groups_by_node(graph, group: list[str]) -> dict[int, list[str]]:
    by_node: dict[int, list[str]] = defaultdict(list)
    for name in group:
        by_node[_node_of(graph, name)].append(name)
    return dict(by_node)


def _mesh_bandwidth(graph, name: str, peers: list[str]) -> float:
    """Bytes/s ``name`` can send at once over direct links to ``peers`` (a full mesh such as
    xGMI, HCCS or TPU ICI has one link per peer; a switched or PCIe node has none)."""
    return sum(graph.edges[name, p]["bandwidth"] for p in peers if p != name and graph.has_edge(name, p))


def _ring(graph, members: list[str]) -> tuple[float, float]:
    """Bottleneck bandwidth and worst step latency of a ring over ``members`` in order. On a
    full mesh the library runs one ring per link at once (NCCL / RCCL multi-ring), so a rank's
    ring bandwidth is the sum of its direct links to the other members."""
    if len(members) < 2:
        return float("inf"), 0.0
    hops = [route(graph, a, b) for a, b in zip(members, members[1:] + members[:1])]
    bandwidth = min(max(h.bandwidth, _mesh_bandwidth(graph, a, members)) for a, h in zip(members, hops))
    return bandwidth, max(h.latency for h in hops)


def _check(group: list[str]) -> None:
    if not group:
        raise InputError("a collective needs at least one device")
    if len(set(group)) != len(group):
        raise InputError("a collective group lists a device twice")


def _cost(name: str, seconds: float, nbytes: float, **info) -> OpCost:
    return OpCost(name=name, time=seconds, comm_time=seconds, bytes=nbytes, info=info)


def _ring_time(graph, members: list[str], nbytes: float, passes: int) -> float:
    """``passes`` ring sweeps (1: gather or scatter, 2: all-reduce) of an ``nbytes`` buffer."""
    n = len(members)
    if n < 2 or nbytes <= 0:
        return 0.0
    bandwidth, latency = _ring(graph, members)
    return passes * ((n - 1) / n * nbytes / bandwidth + (n - 1) * latency)


def all_reduce_time(graph, group: list[str], nbytes: float, *, algorithm: str = "auto") -> OpCost:
    """All-reduce of an ``nbytes`` buffer held by every rank of ``group``."""
    _check(group)
    nodes = _groups_by_node(graph, group)
    if algorithm == "auto":
        algorithm = "hierarchical" if len(nodes) > 1 else "ring"
    if algorithm == "ring" or len(nodes) == 1:
        return _cost("all_reduce", _ring_time(graph, group, nbytes, 2), nbytes, algorithm="ring", ranks=len(group))
    if algorithm != "hierarchical":
        raise InputError(f"unknown all-reduce algorithm {algorithm!r}; expected ring, hierarchical or auto")
    local = max(len(m) for m in nodes.values())
    intra = max(_ring_time(graph, m, nbytes, 1) for m in nodes.values())
    leaders = [m[0] for m in nodes.values()]
    inter = _ring_time(graph, leaders, nbytes / local, 2)
    return _cost("all_reduce", 2 * intra + inter, nbytes, algorithm="hierarchical", ranks=len(group), nodes=len(nodes))


def all_gather_time(graph, group: list[str], nbytes: float) -> OpCost:
    """All-gather whose gathered output is ``nbytes`` on every rank."""
    _check(group)
    return _cost("all_gather", _ring_time(graph, group, nbytes, 1), nbytes, algorithm="ring", ranks=len(group))


def reduce_scatter_time(graph, group: list[str], nbytes: float) -> OpCost:
    """Reduce-scatter of an ``nbytes`` input on every rank."""
    _check(group)
    return _cost("reduce_scatter", _ring_time(graph, group, nbytes, 1), nbytes, algorithm="ring", ranks=len(group))


def all_to_all_time(graph, group: list[str], bytes_matrix: np.ndarray, *, algorithm: str = "flat") -> OpCost:
    """All-to-all where rank ``i`` sends ``bytes_matrix[i, j]`` bytes to rank ``j``.

    Returns the time of the slowest rank; ``info`` names it and its bytes sent inside and
    across nodes.
    """
    _check(group)
    matrix = np.asarray(bytes_matrix, dtype=np.float64)
    n = len(group)
    if matrix.shape != (n, n):
        raise InputError(f"all-to-all byte matrix has shape {matrix.shape}; expected ({n}, {n}) for {n} ranks")
    if algorithm not in ("flat", "hierarchical"):
        raise InputError(f"unknown all-to-all algorithm {algorithm!r}; expected flat or hierarchical")
    node = np.array([_node_of(graph, g) for g in group])
    same = node[:, None] == node[None, :]
    off = ~np.eye(n, dtype=bool)
    intra = np.where(same & off, matrix, 0.0)
    inter = np.where(~same, matrix, 0.0)
    intra_send, intra_recv = intra.sum(axis=1), intra.sum(axis=0)
    inter_send, inter_recv = inter.sum(axis=1), inter.sum(axis=0)
    if algorithm == "hierarchical":
        # RDMA lands on the destination node's peer with the sender's local index, which
        # forwards over NVLink the share meant for its node-mates: a node's inter-node receive
        # is spread over all its NICs, and crosses scale-up once more.
        local = same.sum(axis=1)
        forwarded = inter_recv * (1 - 1 / local)
        intra_send = intra_send + forwarded
        intra_recv = intra_recv + forwarded
        node_recv = np.array([inter_recv[node == node[i]].sum() for i in range(n)])
        inter_recv = node_recv / local
    times = np.zeros(n)
    latency = 0.0
    peers_local = [j for j in range(n) if j != 0 and same[0, j]]
    peers_remote = [j for j in range(n) if not same[0, j]]
    local_route = route(graph, group[0], group[peers_local[0]]) if peers_local else None
    remote_route = route(graph, group[0], group[peers_remote[0]]) if peers_remote else None
    if local_route:
        node_mates = [[group[j] for j in range(n) if same[i, j]] for i in range(n)]
        capacity = np.array([max(local_route.bandwidth, _mesh_bandwidth(graph, group[i], node_mates[i])) for i in range(n)])
        times = np.maximum(times, np.maximum(intra_send, intra_recv) / capacity)
        # on a mesh each pair also has its own link, which one heavy pair can saturate
        pair = np.array([[graph.edges[group[i], group[j]]["bandwidth"] if graph.has_edge(group[i], group[j]) else np.inf
                          for j in range(n)] for i in range(n)])
        times = np.maximum(times, (intra / pair).max(axis=1))
        latency = max(latency, local_route.latency)
    if remote_route:
        times = np.maximum(times, np.maximum(inter_send, inter_recv) / remote_route.bandwidth)
        latency = max(latency, remote_route.latency * (2 if algorithm == "hierarchical" else 1))
    slowest = int(times.argmax())
    total = float(matrix[off].sum())
    seconds = float(times[slowest]) + (latency if total > 0 else 0.0)
    return _cost(
        "all_to_all", seconds, total, algorithm=algorithm, ranks=n, slowest_rank=slowest,
        slowest_intra_bytes=float(max(intra_send[slowest], intra_recv[slowest])),
        slowest_inter_bytes=float(max(inter_send[slowest], inter_recv[slowest])),
    )


def uniform_matrix(ranks: int, bytes_per_rank: float) -> np.ndarray:
    """The byte matrix of an all-to-all where every rank splits ``bytes_per_rank`` evenly over
    all ranks (itself included), as nccl-tests' alltoall does."""
    return np.full((ranks, ranks), bytes_per_rank / ranks)


def transfer_time(graph, src: str, dst: str, nbytes: float) -> OpCost:
    """Moving ``nbytes`` between two nodes of the topology (tiers: ``n0.acc0`` HBM,
    ``n0.host`` DRAM, ``n0.ssd0`` NVMe), alone on the path."""
    path = route(graph, src, dst)
    seconds = path.time(nbytes)
    return OpCost(
        name="transfer", time=seconds, comm_time=seconds, bytes=nbytes,
        info={"path": list(path.nodes), "links": list(path.links), "bandwidth": path.bandwidth, "latency": path.latency},
    )
