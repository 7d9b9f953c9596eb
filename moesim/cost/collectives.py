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


class AllToAll:
    """The all-to-all cost of one group, wired once: :meth:`times` then costs many byte matrices
    (every layer of a simulated step) in one NumPy pass.

    Rank ``i`` sends ``matrix[i, j]`` bytes to rank ``j``. Each rank's scale-up traffic (sent or
    received, whichever is larger) goes over its NVLink / mesh capacity and its scale-out
    traffic over the NIC, in parallel; on a mesh one heavy pair can saturate its own link. The
    slowest rank sets the time.
    """

    def __init__(self, graph, group: list[str], algorithm: str = "flat"):
        _check(group)
        if algorithm not in ("flat", "hierarchical"):
            raise InputError(f"unknown all-to-all algorithm {algorithm!r}; expected flat or hierarchical")
        self.group, self.algorithm = group, algorithm
        n = self.ranks = len(group)
        node = np.array([_node_of(graph, g) for g in group])
        self.same = node[:, None] == node[None, :]
        self.off = ~np.eye(n, dtype=bool)
        self.local = self.same.sum(axis=1)
        self.node_members = self.same.astype(np.float64)  # [i, j]: j shares i's node
        peers_local = [j for j in range(n) if j != 0 and self.same[0, j]]
        peers_remote = [j for j in range(n) if not self.same[0, j]]
        local_route = route(graph, group[0], group[peers_local[0]]) if peers_local else None
        remote_route = route(graph, group[0], group[peers_remote[0]]) if peers_remote else None
        self.capacity = self.pair = None
        self.latency = 0.0
        if local_route:
            node_mates = [[group[j] for j in range(n) if self.same[i, j]] for i in range(n)]
            self.capacity = np.array([max(local_route.bandwidth, _mesh_bandwidth(graph, group[i], node_mates[i])) for i in range(n)])
            pair = np.array([[graph.edges[group[i], group[j]]["bandwidth"] if graph.has_edge(group[i], group[j]) else np.inf
                              for j in range(n)] for i in range(n)])
            self.pair = None if np.isinf(pair[self.same & self.off]).all() else pair
            self.latency = max(self.latency, local_route.latency)
        self.nic = None
        if remote_route:
            self.nic = remote_route.bandwidth
            self.latency = max(self.latency, remote_route.latency * (2 if algorithm == "hierarchical" else 1))

    def rank_times(self, matrix: np.ndarray) -> np.ndarray:
        """Seconds each rank's traffic takes, ``[..., ranks]``, for matrices ``[..., ranks, ranks]``
        (without the latency)."""
        matrix = np.asarray(matrix, dtype=np.float64)
        intra = np.where(self.same & self.off, matrix, 0.0)
        inter = np.where(~self.same, matrix, 0.0)
        times = self._link_times(intra.sum(axis=-1), intra.sum(axis=-2), inter.sum(axis=-1), inter.sum(axis=-2))
        if self.pair is not None:
            times = np.maximum(times, (intra / self.pair).max(axis=-1))
        return times

    def rank_times_outer(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """:meth:`rank_times` of the matrices ``src[..., i] * dst[..., j]`` (every source sends
        its share of each destination's bytes), without forming them."""
        src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
        if self.pair is not None:
            return self.rank_times(src[..., :, None] * dst[..., None, :])
        mates = (self.same & self.off).astype(np.float64)
        others = (~self.same).astype(np.float64)
        return self._link_times(src * (dst @ mates), dst * (src @ mates), src * (dst @ others), dst * (src @ others))

    def _link_times(self, intra_send, intra_recv, inter_send, inter_recv) -> np.ndarray:
        """Each rank's seconds from its bytes sent and received inside and across nodes: the
        larger direction over the scale-up capacity and over the NIC, in parallel."""
        if self.algorithm == "hierarchical":
            # RDMA lands on the destination node's peer with the sender's local index, which
            # forwards over NVLink the share meant for its node-mates: a node's inter-node
            # receive is spread over all its NICs, and crosses scale-up once more.
            forwarded = inter_recv * (1 - 1 / self.local)
            intra_send = intra_send + forwarded
            intra_recv = intra_recv + forwarded
            inter_recv = (inter_recv @ self.node_members) / self.local
        times = np.zeros(np.broadcast_shapes(intra_send.shape, intra_recv.shape))
        if self.capacity is not None:
            times = np.maximum(times, np.maximum(intra_send, intra_recv) / self.capacity)
        if self.nic is not None:
            times = np.maximum(times, np.maximum(inter_send, inter_recv) / self.nic)
        return times

    def times(self, matrix: np.ndarray) -> np.ndarray:
        """Seconds of the all-to-all for each matrix of ``[..., ranks, ranks]``."""
        matrix = np.asarray(matrix, dtype=np.float64)
        sent = np.where(self.off, matrix, 0.0).sum(axis=(-2, -1))
        return self.rank_times(matrix).max(axis=-1) + np.where(sent > 0, self.latency, 0.0)


def all_to_all_time(graph, group: list[str], bytes_matrix: np.ndarray, *, algorithm: str = "flat") -> OpCost:
    """All-to-all where rank ``i`` sends ``bytes_matrix[i, j]`` bytes to rank ``j`` (see
    :class:`AllToAll`).

    Returns the time of the slowest rank; ``info`` names it and its bytes sent inside and
    across nodes.
    """
    model = AllToAll(graph, group, algorithm)
    matrix = np.asarray(bytes_matrix, dtype=np.float64)
    n = len(group)
    if matrix.shape != (n, n):
        raise InputError(f"all-to-all byte matrix has shape {matrix.shape}; expected ({n}, {n}) for {n} ranks")
    per_rank = model.rank_times(matrix)
    slowest = int(per_rank.argmax())
    seconds = float(model.times(matrix))
    intra = np.where(model.same & model.off, matrix, 0.0)
    inter = np.where(~model.same, matrix, 0.0)
    return _cost(
        "all_to_all", seconds, float(matrix[model.off].sum()), algorithm=algorithm, ranks=n, slowest_rank=slowest,
        slowest_intra_bytes=float(max(intra[slowest].sum(), intra[:, slowest].sum())),
        slowest_inter_bytes=float(max(inter[slowest].sum(), inter[:, slowest].sum())),
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
