"""A cluster as a directed networkx graph: who is wired to whom, how fast, how far.

Nodes (``n0.acc3`` is accelerator 3 of node 0):

- ``nN.accJ``: accelerators, attribute ``spec`` (an Accelerator);
- ``nN.host``: the host CPUs and their DRAM as one memory tier (``capacity`` bytes,
  ``bandwidth`` bytes/s summed over sockets, ``spec`` one socket's Cpu);
- ``nN.ssdK``: NVMe drives (``spec`` an Ssd);
- ``nN.switch``: the scale-up switch (NVSwitch) when the scale-up link is switched;
- ``fabric``: the scale-out network (an IB / RoCE switch fabric), when there is more than one
  node or the node has NICs.

Every edge carries ``bandwidth`` (bytes/s one way, as large transfers reach it: the link's
figure times its efficiency, or the measured pinned copy rate for PCIe), ``latency`` (s),
``link`` (the profile name) and ``kind``. Links are full duplex, so each direction is its own
edge; PCIe host-to-device and device-to-host edges differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import networkx as nx

from moesim.errors import InputError
from moesim.hardware import catalog
from moesim.hardware.specs import Cluster, Link


@dataclass(frozen=True)
class Route:
    """A path between two graph nodes: the bottleneck ``bandwidth`` (bytes/s), the summed
    ``latency`` (s) and the links crossed."""

    nodes: tuple[str, ...]
    bandwidth: float
    latency: float
    links: tuple[str, ...]

    def time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` along this route, alone on it."""
        return self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0


# Routes are chosen for the time of a transfer of this size, so a fast link wins over a
# slightly lower-latency slow one (NVSwitch over PCIe through the host).
_ROUTE_PROBE_BYTES = 2**20


def _edge(graph: nx.DiGraph, a: str, b: str, bandwidth: float, latency: float, link: str, kind: str) -> None:
    graph.add_edge(a, b, bandwidth=bandwidth, latency=latency, link=link, kind=kind,
                   cost=latency + _ROUTE_PROBE_BYTES / bandwidth)


def _duplex(graph: nx.DiGraph, a: str, b: str, link: Link, forward: float | None = None, backward: float | None = None) -> None:
    rate = link.bandwidth * link.efficiency
    # A switched link's latency is end to end, device to device: each half carries half.
    latency = link.latency / 2 if link.switched else link.latency
    _edge(graph, a, b, forward or rate, latency, link.name, link.kind)
    _edge(graph, b, a, backward or rate, latency, link.name, link.kind)


def accelerator_name(node: int, index: int) -> str:
    return f"n{node}.acc{index}"


@lru_cache(maxsize=64)
def _build(name: str) -> nx.DiGraph:
    return build(catalog.cluster(name))


def topology(cluster: Cluster | str) -> nx.DiGraph:
    """The graph of a cluster (a spec, or a profile name; built graphs of named clusters are
    cached, so treat them as read-only)."""
    return _build(cluster) if isinstance(cluster, str) else build(cluster)


def build(cluster: Cluster) -> nx.DiGraph:
    """Build the graph of ``cluster`` (see the module docstring for its nodes and edges)."""
    node = cluster.node
    graph = nx.DiGraph(name=cluster.name)
    for role, group, kinds in (("accelerators", node.accelerators, ("gpu", "npu")), ("cpus", node.cpus, ("cpu",)),
                               ("ssds", node.ssds, ("ssd",))):
        if group is not None and catalog.device(group.device, field=f"node.{role}.device").kind not in kinds:
            raise InputError(f"{group.device!r} is a {catalog.device(group.device).kind}; expected a {' or '.join(kinds)}",
                             source=cluster.name, field=f"node.{role}.device")
    cpu = catalog.device(node.cpus.device, field="node.cpus.device")
    host_link = catalog.link(node.host_link, field="node.host_link")
    acc_spec = catalog.device(node.accelerators.device, field="node.accelerators.device") if node.accelerators else None
    accs = node.accelerators.count if node.accelerators else 0
    scale_up = catalog.link(node.scale_up, field="node.scale_up") if node.scale_up else None
    nic = catalog.link(node.nic, field="node.nic") if node.nic else None
    ssd = catalog.device(node.ssds.device, field="node.ssds.device") if node.ssds else None
    ssd_link = catalog.link(node.ssd_link, field="node.ssd_link") if node.ssd_link else None
    if ssd and not ssd_link:
        raise InputError("a node with SSDs needs ssd_link", source=cluster.name, field="node.ssd_link")
    if cluster.nodes > 1 and not nic:
        raise InputError("a cluster of several nodes needs a scale-out nic", source=cluster.name, field="node.nic")
    if nic and node.nics == 0:
        raise InputError("nic is set but nics is 0", source=cluster.name, field="node.nics")
    if nic:
        graph.add_node("fabric", kind="fabric")
    for n in range(cluster.nodes):
        host = f"n{n}.host"
        graph.add_node(
            host, kind="host", node=n, spec=cpu, sockets=node.cpus.count,
            capacity=node.host_memory, bandwidth=cpu.memory.bandwidth * node.cpus.count,
        )
        for s in range(node.ssds.count if node.ssds else 0):
            name = f"n{n}.ssd{s}"
            graph.add_node(name, kind="ssd", node=n, spec=ssd, capacity=ssd.capacity)
            read = min(ssd.read_bandwidth, ssd_link.bandwidth * ssd_link.efficiency)
            write = min(ssd.write_bandwidth, ssd_link.bandwidth * ssd_link.efficiency)
            _edge(graph, name, host, read, ssd.latency + ssd_link.latency, ssd_link.name, "nvme")
            _edge(graph, host, name, write, ssd.latency + ssd_link.latency, ssd_link.name, "nvme")
        names = [accelerator_name(n, j) for j in range(accs)]
        for name in names:
            graph.add_node(name, kind="accelerator", node=n, spec=acc_spec, capacity=acc_spec.memory.capacity)
            _duplex(graph, host, name, host_link, forward=host_link.h2d_pinned, backward=host_link.d2h_pinned)
        if scale_up and accs > 1:
            if scale_up.switched:
                switch = f"n{n}.switch"
                graph.add_node(switch, kind="switch", node=n)
                for name in names:
                    _duplex(graph, name, switch, scale_up)
            else:
                # A direct mesh (HCCS, xGMI, TPU ICI within a slice): each device's ports are
                # shared out over its peers.
                share = scale_up.bandwidth * scale_up.efficiency / (accs - 1)
                for i, a in enumerate(names):
                    for b in names[i + 1 :]:
                        _duplex(graph, a, b, scale_up, forward=share, backward=share)
        if nic:
            # NICs sit beside the accelerators (GPUDirect RDMA): each accelerator reaches the
            # fabric through its share of the node's ports; a node without accelerators
            # reaches it from the host.
            ports = names or [host]
            share = node.nics * nic.bandwidth * nic.efficiency / len(ports)
            for name in ports:
                _duplex(graph, name, "fabric", nic, forward=share, backward=share)
    return graph


def accelerators(graph: nx.DiGraph) -> list[str]:
    """Accelerator nodes in rank order (node-major)."""
    return [n for n, d in graph.nodes(data=True) if d.get("kind") == "accelerator"]


def route(graph: nx.DiGraph, src: str, dst: str) -> Route:
    """The quickest path from ``src`` to ``dst`` for a 1 MiB transfer, with its bottleneck
    bandwidth and summed latency."""
    for name in (src, dst):
        if name not in graph:
            raise InputError(f"no device {name!r} in cluster {graph.graph.get('name')!r}")
    if src == dst:
        return Route((src,), float("inf"), 0.0, ())
    try:
        nodes = nx.shortest_path(graph, src, dst, weight="cost")
    except nx.NetworkXNoPath:
        raise InputError(f"no path from {src} to {dst} in cluster {graph.graph.get('name')!r}") from None
    edges = [graph.edges[a, b] for a, b in zip(nodes, nodes[1:])]
    return Route(
        tuple(nodes),
        min(e["bandwidth"] for e in edges),
        sum(e["latency"] for e in edges),
        tuple(e["link"] for e in edges),
    )
