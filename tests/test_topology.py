import pytest

from moesim.errors import InputError
from moesim.hardware.topology import accelerators, route, topology


def test_dgx_gpus_talk_over_nvswitch_not_pcie():
    graph = topology("dgx-h100")
    accs = accelerators(graph)
    assert len(accs) == 8
    path = route(graph, accs[0], accs[5])
    assert path.links == ("nvlink4", "nvlink4")
    assert path.bandwidth == pytest.approx(450e9 * 0.85)


def test_pcie_only_box_goes_through_the_host():
    graph = topology("l40s-x8")
    accs = accelerators(graph)
    path = route(graph, accs[0], accs[1])
    assert path.nodes[1] == "n0.host"
    assert all(link.startswith("pcie") for link in path.links)


def test_multi_node_traffic_crosses_the_fabric_at_nic_speed():
    graph = topology("h100-2node")
    accs = accelerators(graph)
    assert len(accs) == 16
    path = route(graph, accs[0], accs[8])
    assert "fabric" in path.nodes
    assert path.bandwidth == pytest.approx(50e9 * 0.94)  # one NDR port per GPU


def test_memory_tiers_device_host_ssd():
    graph = topology("rtx4090-xeon")
    up = route(graph, "n0.host", "n0.acc0")
    down = route(graph, "n0.acc0", "n0.host")
    assert up.bandwidth > 0 and down.bandwidth > 0
    from_ssd = route(graph, "n0.ssd0", "n0.acc0")
    assert from_ssd.nodes == ("n0.ssd0", "n0.host", "n0.acc0")
    assert from_ssd.bandwidth <= graph.edges["n0.ssd0", "n0.host"]["bandwidth"]
    assert from_ssd.latency > up.latency  # NVMe access latency dominates


def test_pcie_directions_use_measured_pinned_rates():
    graph = topology("dgx-h100")
    assert graph.edges["n0.host", "n0.acc0"]["bandwidth"] == pytest.approx(35e9)
    assert graph.edges["n0.acc0", "n0.host"]["bandwidth"] == pytest.approx(52.8e9)


def test_every_cluster_builds_and_connects_its_accelerators():
    from moesim.hardware import catalog

    for cluster in catalog.clusters():
        graph = topology(cluster.name)
        accs = accelerators(graph)
        assert accs, cluster.name
        for other in (accs[-1], "n0.host"):
            assert route(graph, accs[0], other).bandwidth > 0


def test_unknown_graph_node_is_a_clear_error():
    with pytest.raises(InputError, match="no device 'n9.acc0'"):
        route(topology("dgx-h100"), "n0.acc0", "n9.acc0")
