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

Inside one node, when the device profile has NCCL figures (``efficiency.nccl_*``), a collective
is costed as NCCL's own tuner costs it (src/graph/tuning.cc: a base latency per algorithm and
protocol, a latency per step, a bus bandwidth per protocol) and the cheaper protocol wins:

    t = min over p in (LL, Simple) of  launch[p] + steps * step[p] + bus_bytes / (B * bus(n) * op * share[p])

``bus_bytes`` is the algorithm's traffic per rank (``2 (n-1)/n S`` for all-reduce, ``(n-1)/n S``
for all-gather, reduce-scatter and all-to-all), ``steps`` its ring steps (``2 (n-1)`` or ``n - 1``),
``bus(n)`` the share of the ring's link bandwidth NCCL's Simple protocol reaches with ``n`` ranks
(fewer ranks drive fewer NVLink channels at once: 2 H100s reach about 250 GB/s of bus
bandwidth, 8 about 330), ``op`` a per-collective factor (all-reduce inside an NVSwitch node runs
NVLS, in-switch reduction) and ``share[LL]`` the LL protocol's share of Simple's bandwidth (half
of each 8-byte store is a flag). Small messages take LL's low latency, large ones Simple's
bandwidth, as NCCL picks.

DeepEP dispatch / combine (:func:`all_to_all_time` with a DeepEP ``kernel``) are not NCCL: they
are kernels that copy tokens over NVLink with a fixed share of the SMs, so a call costs a kernel
floor (launch, barrier, layout notification) plus its bytes at the lower of the link's rate and
the copying SMs' rate (normal mode: SMs x rate per SM; low-latency mode: local experts x rate
per expert, as each expert's tokens are received by one warp group, under a cap per mode), plus
a cost per token
(each token read or reduced once, whatever its destinations) and, in low-latency mode, per
expert.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numba
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


def _ring_time(graph, members: list[str], nbytes: float, passes: int, *, op: str = "", device=None) -> float:
    """``passes`` ring sweeps (1: gather or scatter, 2: all-reduce) of an ``nbytes`` buffer; NCCL's
    protocol model (module docstring) inside one node when the device profile has its figures.
    ``nbytes`` may be an array: the seconds are then an array over it (0 where it is empty)."""
    n = len(members)
    many = np.ndim(nbytes) > 0
    if n < 2 or (not many and nbytes <= 0):
        return 0.0
    bandwidth, latency = _ring(graph, members)
    eff = _nccl_figures(graph, members, device)
    if eff is not None:
        seconds = _nccl_time(eff, op, n, passes * (n - 1) / n * nbytes, bandwidth, passes * (n - 1))
    else:
        seconds = passes * ((n - 1) / n * nbytes / bandwidth + (n - 1) * latency)
    return np.where(np.greater(nbytes, 0), seconds, 0.0) if many else float(seconds)


def _efficiency(graph, member: str, device=None):
    """``device``'s efficiency figures, by default those of ``member``'s own profile (None without one)."""
    spec = device if device is not None else graph.nodes[member].get("spec")
    return getattr(spec, "efficiency", None)


def _nccl_figures(graph, group: list[str], device=None):
    """The device's efficiency figures when they hold NCCL's and ``group`` is inside one node."""
    eff = _efficiency(graph, group[0], device)
    if eff is None or not eff.nccl_bus or len({_node_of(graph, g) for g in group}) > 1:
        return None
    return eff


def bus_share(shares: dict[str, float], ranks) -> np.ndarray:
    """A figure given per group size (``{'2': .., '8': ..}``) at ``ranks``: linear in log2 of the
    group size between the sizes listed, the nearest one outside them."""
    sizes = np.array(sorted(float(k) for k in shares))
    values = np.array([shares[k] for k in sorted(shares, key=float)])
    return np.interp(np.log2(np.maximum(ranks, 2)), np.log2(sizes), values)


def _nccl_time(eff, op: str, ranks, bus_bytes, bandwidth, steps):
    """The cheaper of NCCL's LL and Simple protocols (module docstring); arrays broadcast."""
    rate = bandwidth * bus_share(eff.nccl_bus, ranks) * eff.nccl_op.get(op, 1.0)
    launch, step = eff.nccl_launch, eff.nccl_step
    simple = launch.get("simple", 0.0) + steps * step.get("simple", 0.0) + bus_bytes / rate
    ll = launch.get("ll", 0.0) + steps * step.get("ll", 0.0) + bus_bytes / (rate * eff.nccl_ll_bus)
    return np.minimum(simple, ll)


def all_reduce_time(graph, group: list[str], nbytes: float, *, algorithm: str = "auto", device=None) -> OpCost:
    """All-reduce of an ``nbytes`` buffer held by every rank of ``group`` (``device``: the profile
    whose NCCL figures apply, by default the group's own); an array of sizes gives an array of
    times."""
    _check(group)
    nodes = _groups_by_node(graph, group)
    if algorithm == "auto":
        algorithm = "hierarchical" if len(nodes) > 1 else "ring"
    if algorithm == "ring" or len(nodes) == 1:
        return _cost("all_reduce", _ring_time(graph, group, nbytes, 2, op="all_reduce", device=device), nbytes,
                     algorithm="ring", ranks=len(group))
    if algorithm != "hierarchical":
        raise InputError(f"unknown all-reduce algorithm {algorithm!r}; expected ring, hierarchical or auto")
    local = max(len(m) for m in nodes.values())
    intra = [_ring_time(graph, m, nbytes, 1, op="all_gather", device=device) for m in nodes.values()]
    intra = np.max(intra, axis=0) if np.ndim(nbytes) else max(intra)
    leaders = [m[0] for m in nodes.values()]
    inter = _ring_time(graph, leaders, nbytes / local, 2)
    return _cost("all_reduce", 2 * intra + inter, nbytes, algorithm="hierarchical", ranks=len(group), nodes=len(nodes))


def all_gather_time(graph, group: list[str], nbytes: float, *, device=None) -> OpCost:
    """All-gather whose gathered output is ``nbytes`` on every rank."""
    _check(group)
    return _cost("all_gather", _ring_time(graph, group, nbytes, 1, op="all_gather", device=device), nbytes,
                 algorithm="ring", ranks=len(group))


def reduce_scatter_time(graph, group: list[str], nbytes: float, *, device=None) -> OpCost:
    """Reduce-scatter of an ``nbytes`` input on every rank."""
    _check(group)
    return _cost("reduce_scatter", _ring_time(graph, group, nbytes, 1, op="reduce_scatter", device=device), nbytes,
                 algorithm="ring", ranks=len(group))


KERNELS = (None, "nccl", "deepep_normal_dispatch", "deepep_normal_combine", "deepep_ll_dispatch", "deepep_ll_combine")


class AllToAll:
    """The all-to-all cost of one group, wired once: :meth:`times` then costs many byte matrices
    (every layer of a simulated step) in one NumPy pass.

    Rank ``i`` sends ``matrix[i, j]`` bytes to rank ``j``. Each rank's scale-up traffic (sent or
    received, whichever is larger) goes over its NVLink / mesh capacity and its scale-out
    traffic over the NIC, in parallel; on a mesh one heavy pair can saturate its own link. The
    slowest rank sets the time.
    """

    def __init__(self, graph, group: list[str], algorithm: str = "flat", *, kernel: str | None = None, device=None,
                 sms: int = 0, experts: int = 0):
        _check(group)
        if algorithm not in ("flat", "hierarchical"):
            raise InputError(f"unknown all-to-all algorithm {algorithm!r}; expected flat or hierarchical")
        if kernel not in KERNELS:
            raise InputError(f"unknown all-to-all kernel {kernel!r}; expected one of {', '.join(map(str, KERNELS))}")
        self.group, self.algorithm = group, algorithm
        n = self.ranks = len(group)
        node = np.array([_node_of(graph, g) for g in group])
        self.same = node[:, None] == node[None, :]
        self.off = ~np.eye(n, dtype=bool)
        self.local = self.same.sum(axis=1)
        self.node_members = self.same.astype(np.float64)  # [i, j]: j shares i's node
        # 0/1 masks of rank_times_outer's products, built once: it runs four times a simulated step
        self.mates = (self.same & self.off).astype(np.float64)
        self.others = (~self.same).astype(np.float64)
        self.node_index = np.unique(node, return_inverse=True)[1].reshape(-1).astype(np.int64)  # each rank's node: 0, 1, ...
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
        self.ll, self.token_cost = None, 0.0
        self._rank_one_shares = None  # rank_times_rank_one's last shares: (key, rows, their node sums)
        if kernel is not None and self.capacity is not None and self.nic is None:
            self._kernel_figures(graph, kernel, device, sms, experts)

    def _kernel_figures(self, graph, kernel: str, device, sms: int, experts: int) -> None:
        """Rate and floor of one node's all-to-all as ``kernel`` runs it (module docstring):
        ``capacity`` becomes the rate a rank's bytes move at, ``latency`` the fixed cost."""
        eff = _efficiency(graph, self.group[0], device)
        n = self.ranks
        if kernel == "nccl":
            if eff is None or not eff.nccl_bus:
                return
            share = bus_share(eff.nccl_bus, n) * eff.nccl_op.get("all_to_all", 1.0)
            self.capacity = self.capacity * share
            self.pair = None if self.pair is None else self.pair * share
            self.latency = eff.nccl_launch.get("simple", 0.0) + (n - 1) * eff.nccl_step.get("simple", 0.0)
            # LL: lower latency, a share of the bandwidth; times() takes the cheaper
            self.ll = (eff.nccl_launch.get("ll", 0.0) + (n - 1) * eff.nccl_step.get("ll", 0.0), eff.nccl_ll_bus)
            return
        figures = eff.deepep if eff is not None else {}
        mode, phase = kernel.split("_")[1:]
        if not figures or f"{mode}_{phase}_rate" not in figures:
            return
        if mode == "normal":
            rate = figures[f"normal_{phase}_rate"] * max(sms, 1)
        else:
            rate = figures[f"ll_{phase}_rate"] * max(experts // n, 1)
        rate = min(rate, figures.get(f"{mode}_{phase}_cap", np.inf))
        self.capacity = np.minimum(self.capacity, rate)
        self.pair = None if self.pair is None else np.minimum(self.pair, rate)
        self.latency = figures.get(f"{mode}_{phase}_floor", 0.0) + (figures.get("ll_expert", 0.0) * experts
                                                                        if mode == "ll" else 0.0)
        # each token is also read (dispatch) or reduced (combine) once, whatever its destinations
        self.token_cost = figures.get(f"{mode}_{phase}_token", 0.0) / rate

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
        mates, others = self.mates, self.others
        return self._link_times(src * (dst @ mates), dst * (src @ mates), src * (dst @ others), dst * (src @ others))

    @cached_property
    def _rank_one_links(self) -> tuple:
        """The figures :func:`_rank_one_runs` reads, worked out once (the simulator calls it every
        step), in node order: the ranks gathered so (``None`` when each node's ranks already are
        one run, nodes ascending), where each node's run starts (one past the end last), ranks per
        node, the share of a rank's inter-node receive it forwards (0 flat), scale-up capacity per
        rank and the NIC's (B/s; infinite where there is no such link: a finite time over it is 0,
        as without the link); and the masks of the node sums, stacked for one matrix product."""
        order = np.argsort(self.node_index, kind="stable")  # stable: ascending rank order inside a node
        node = self.node_index[order]
        # unsigned: Numba then indexes without the negative-index wraparound, which made LLVM
        # scatter the stores of a node's slice
        start = np.flatnonzero(np.r_[True, node[1:] != node[:-1], True]).astype(np.uint64)
        local = self.local[order].astype(np.float64)
        forward = 1 - 1 / local if self.algorithm == "hierarchical" else np.zeros(self.ranks)
        capacity = np.full(self.ranks, np.inf) if self.capacity is None else self.capacity[order].astype(np.float64)
        nic = np.inf if self.nic is None else float(self.nic)
        moved = None if (order == np.arange(self.ranks)).all() else order
        return moved, start, np.diff(start).astype(np.float64), forward, capacity, nic, np.stack([self.mates, self.others])

    def rank_times_rank_one(self, share: np.ndarray, counts: np.ndarray, bytes_out: float,
                            bytes_back: float) -> tuple[np.ndarray, np.ndarray]:
        """Each rank's seconds ``[loads, rows, ranks]`` of two all-to-alls per row of ``counts``
        ``[loads, rows, ranks]`` (whole numbers: slots each rank computes): the dispatch, where
        source ``i`` sends ``share[load, i]`` of each destination's slots at ``bytes_out`` a slot
        (:meth:`rank_times_outer` of ``share * bytes_out`` and ``counts``), and the combine that
        returns them at ``bytes_back`` a slot (``counts * bytes_back`` and ``share``). Compiled
        without a mesh's per-pair limit, and then equal to those calls bit for bit: sums of whole
        numbers are exact in any order, and the fractions are added in ascending rank order,
        as the matrix products add them."""
        share, counts = np.asarray(share, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        if self.pair is not None or counts.shape[1] < 2:  # (one row: NumPy adds a vector product in another order)
            dispatch = np.stack([self.rank_times_outer(s[None, :] * bytes_out, c) for s, c in zip(share, counts)])
            combine = np.stack([self.rank_times_outer(c * bytes_back, s[None, :]) for s, c in zip(share, counts)])
            return dispatch, combine
        order, start, size, forward, capacity, nic, masks = self._rank_one_links
        key = (share.tobytes(), float(bytes_out))
        if self._rank_one_shares is not None and self._rank_one_shares[0] == key:
            rows, sums = self._rank_one_shares[1:]  # a step's shares often repeat the last step's (same batches)
        else:
            # each load's two rows, share * bytes_out (the dispatch's sources) and share (the
            # combine's destinations), C order whatever the caller's (an F-ordered share made the
            # kernel gather its rows); then rank_times_outer's vector-matrix products of them (so
            # the same roundings: BLAS adds a product's terms in its own order), all in one call:
            # [loads, 2, 1, 1, ranks] @ [2, ranks, ranks] is a vector-matrix product per (load,
            # row, mask), each as np.matmul(row, mask) runs it
            rows = np.empty((len(share), 2, self.ranks))
            np.multiply(share, bytes_out, out=rows[:, 0])
            rows[:, 1] = share
            sums = np.matmul(rows[:, :, None, None, :], masks).reshape(len(share), 4, self.ranks)
            if order is not None:
                rows, sums = rows[:, :, order], sums[:, :, order]
            self._rank_one_shares = (key, rows, sums)
        if order is not None:
            counts = counts[:, :, order]
        dispatch, combine = np.empty(counts.shape), np.empty(counts.shape)  # C order, as callers sum them along rows
        _rank_one_runs(rows, np.ascontiguousarray(counts), float(bytes_back), sums, start, size, forward, capacity, nic,
                       self.algorithm == "hierarchical", dispatch, combine)
        if order is not None:  # back into rank order
            dispatch[..., order], combine[..., order] = dispatch.copy(), combine.copy()
        return dispatch, combine

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
        body = self.rank_times(matrix).max(axis=-1)
        seconds = body + self.latency
        if self.ll is not None:  # NCCL: the LL protocol when it is cheaper
            seconds = np.minimum(seconds, self.ll[0] + body / self.ll[1])
        return np.where(sent > 0, seconds, 0.0)


@numba.njit(cache=True, error_model="numpy")
def _rank_one_runs(shares, counts, bytes_back, sums, start, size, forward, capacity, nic, hierarchical, dispatch, combine):
    """:meth:`AllToAll.rank_times_rank_one` without a per-pair limit, ranks in node order (each
    node's one contiguous run from ``start[r]`` to ``start[r + 1]``, ``size[r]`` ranks), into
    ``dispatch`` and ``combine`` (s). ``shares`` ``[loads, 2, ranks]``: ``share * bytes_out`` and
    ``share``; ``sums`` ``[loads, 4, ranks]``: the two summed over each rank's node-mates and
    over the other nodes' ranks (NumPy's products, so the same roundings); ``forward``,
    ``capacity`` and ``nic`` as ``AllToAll._rank_one_links``.

    A row's node sums run first, each over its node's slice in a register (whole numbers are
    exact in any order; the combine's bytes and the received fractions are added in ascending
    rank order from 0.0, as the matrix products add them); then each rank's time is a loop
    of loads, arithmetic and selects into one store, which LLVM vectorises (the divisions
    included; IEEE divisions round the same in vector lanes). A flat all-to-all forwards
    nothing (``forward`` 0: ``x + 0.0 * y`` is ``x``) and reads the rank's own receive."""
    loads, rows, n = counts.shape
    runs = size.size
    back = np.empty(n)
    inside, back_inside = np.empty(n), np.empty(n)  # slots and bytes back of the rank's node
    received, back_received = np.empty(n), np.empty(n)  # hierarchical: the node's inter-node receive over its ranks
    for g in range(loads):
        src, dst = shares[g, 0], shares[g, 1]
        mates, others, back_mates, back_others = sums[g, 0], sums[g, 1], sums[g, 2], sums[g, 3]
        for m in range(rows):
            c = counts[g, m]
            total, back_total = 0.0, 0.0  # added node by node, as the sum of per-node slots was
            for r in range(runs):
                per_node, back_per_node, node_received = 0.0, 0.0, 0.0
                for j in range(start[r], start[r + 1]):
                    back[j] = c[j] * bytes_back
                    per_node += c[j]
                    back_per_node += back[j]
                    node_received += c[j] * others[j]
                node_received /= size[r]
                for j in range(start[r], start[r + 1]):
                    inside[j], back_inside[j], received[j] = per_node, back_per_node, node_received
                total += per_node
                back_total += back_per_node
            if hierarchical:  # the combine's receive needs every node's bytes back first
                for r in range(runs):
                    node_received = 0.0
                    for j in range(start[r], start[r + 1]):
                        node_received += dst[j] * (back_total - back_inside[j])
                    node_received /= size[r]
                    for j in range(start[r], start[r + 1]):
                        back_received[j] = node_received
            # dispatch: src = share * bytes_out (one row), dst = counts
            out = dispatch[g, m]
            for i in range(n):
                inter_recv = c[i] * others[i]
                forwarded = inter_recv * forward[i]
                intra = max(src[i] * (inside[i] - c[i]) + forwarded, c[i] * mates[i] + forwarded)
                out[i] = _link_time(intra, src[i] * (total - inside[i]), received[i] if hierarchical else inter_recv,
                                    capacity[i], nic)
            # combine: src = counts * bytes_back, dst = share (one row)
            out = combine[g, m]
            for i in range(n):
                inter_recv = dst[i] * (back_total - back_inside[i])
                forwarded = inter_recv * forward[i]
                intra = max(back[i] * back_mates[i] + forwarded, dst[i] * (back_inside[i] - back[i]) + forwarded)
                out[i] = _link_time(intra, back[i] * back_others[i], back_received[i] if hierarchical else inter_recv,
                                    capacity[i], nic)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _link_time(intra, inter_send, inter_recv, capacity, nic):
    """:meth:`AllToAll._link_times` of one rank (s): its larger scale-up direction ``intra``
    (bytes, forwarding added) over ``capacity`` and its larger inter-node direction over ``nic``
    (B/s), in parallel; a time over an infinite capacity is 0, a NaN one fails the ``> 0`` test
    (0, as without the link). Selects, not branches."""
    scale_up = intra / capacity
    scale_up = scale_up if scale_up > 0.0 else 0.0
    scale_out = (inter_send if inter_send >= inter_recv else inter_recv) / nic
    scale_out = scale_out if scale_out > 0.0 else 0.0
    return scale_up if scale_up >= scale_out else scale_out  # max(0, scale-up, scale-out), first of equals as max() keeps


def all_to_all_time(graph, group: list[str], bytes_matrix: np.ndarray, *, algorithm: str = "flat",
                    kernel: str | None = None, device=None, sms: int = 0, experts: int = 0,
                    token_bytes: float = 0.0) -> OpCost:
    """All-to-all where rank ``i`` sends ``bytes_matrix[i, j]`` bytes to rank ``j`` (see
    :class:`AllToAll`). ``kernel`` names the implementation inside one node (:data:`KERNELS`):
    None rates the bytes at the links' speed with one hop of latency; 'nccl' is NCCL's grouped
    send / receive; 'deepep_normal_dispatch' ... are DeepEP's kernels run with ``sms`` SMs
    (normal mode) over ``experts`` experts (low-latency mode); ``token_bytes`` are the bytes of
    the tokens one rank sends (tokens x hidden x element size), which a DeepEP kernel reads or
    reduces once per token besides its copies to each destination.

    Returns the time of the slowest rank; ``info`` names it and its bytes sent inside and
    across nodes.
    """
    model = AllToAll(graph, group, algorithm, kernel=kernel, device=device, sms=sms, experts=experts)
    token_time = model.token_cost * token_bytes
    matrix = np.asarray(bytes_matrix, dtype=np.float64)
    n = len(group)
    if matrix.shape != (n, n):
        raise InputError(f"all-to-all byte matrix has shape {matrix.shape}; expected ({n}, {n}) for {n} ranks")
    per_rank = model.rank_times(matrix)
    slowest = int(per_rank.argmax())
    seconds = float(model.times(matrix)) + token_time
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
