import numpy as np
import pytest

from moesim.cost.estimate import Workload, estimate
from moesim.cost.layout import make_layout
from moesim.errors import LayoutError
from moesim.hardware import catalog
from moesim.models import load_model

MIXTRAL = load_model("mixtral-8x7b")
DGX = catalog.cluster("dgx-h100")


def _run(arch=MIXTRAL, cluster=DGX, routing="balanced", **layout):
    lay = make_layout(arch, devices_available=cluster.node.accelerators.count * cluster.nodes, **layout)
    return estimate(arch, cluster, lay, Workload(batch=64, prompt=2048, output=256, routing=routing))


def test_mixtral_bf16_does_not_fit_one_h100_but_fits_two():
    assert not _run(tp=1).fits
    two = _run(tp=2)
    assert two.fits
    # 46.7B parameters in bf16 split over two GPUs
    assert two.memory["weights"] == pytest.approx(46.7e9 * 2 / 2, rel=0.03)


def test_decode_of_a_memory_bound_batch_is_about_weights_over_bandwidth():
    r = _run(tp=2)
    weights_per_gpu = r.memory["weights"]
    floor = weights_per_gpu / catalog.device("h100-sxm").memory.bandwidth
    assert floor < r.tpot < 2 * floor
    assert r.bottleneck("decode") == "HBM"
    assert r.bottleneck("prefill") == "compute"


def test_more_devices_serve_more_tokens():
    tp2, tp4 = _run(tp=2), _run(tp=4)
    assert tp4.decode_tokens_per_s > tp2.decode_tokens_per_s
    assert tp4.tpot < tp2.tpot


def test_expert_parallel_layout_and_skew():
    balanced = _run(tp=2, ep=4)
    assert balanced.layout.devices == 4 and balanced.layout.dp == 2
    assert {"dispatch", "experts", "combine"} <= {p.name for p in balanced.decode_layers["moe"].parts}
    skewed = _run(tp=2, ep=4, routing="power_law:1.2")
    assert skewed.tpot > balanced.tpot


def test_deepseek_layers_dense_then_moe_with_mla():
    arch = load_model("deepseek-v3")
    cluster = catalog.cluster("h100-8node")
    lay = make_layout(arch, tp=1, dp=64, ep=64, devices_available=64)
    r = estimate(arch, cluster, lay, Workload(batch=2048, prompt=512, output=512), dtype="fp8", expert_dtype="fp8_block")
    assert r.layer_counts == {"dense": 3, "moe": 58, "lm_head": 1}
    assert "mla_decode" in {p.name for p in r.decode_layers["moe"].parts}
    assert r.fits


def test_same_inputs_same_outputs():
    a = _run(tp=2, ep=4, routing="power_law:1.2").to_dict()
    b = _run(tp=2, ep=4, routing="power_law:1.2").to_dict()
    assert a == b


@pytest.mark.parametrize(
    "layout, match",
    [
        (dict(tp=3), "TP 3 does not divide the 32 attention heads"),
        (dict(tp=1, ep=3), "EP 3 does not divide the 8 experts"),
        (dict(tp=16), "needs 16 devices"),
        (dict(tp=2, ep=4, dp=1), "must equal TP 2 x DP 1"),
        (dict(tp=0), "positive integer"),
    ],
)
def test_impossible_layouts_are_named(layout, match):
    with pytest.raises(LayoutError, match=match):
        make_layout(MIXTRAL, devices_available=8, **layout)


@pytest.mark.parametrize("model, tp", [("deepseek-v3", 1), ("deepseek-v3", 8), ("mixtral-8x7b", 2)])
def test_array_costing_equals_the_scalar_costing_element_by_element(model, tp):
    """The simulator costs many token counts in one array call (projections with and without
    prompt tokens, dense blocks, the TP all-reduce); each element must be the scalar call's
    seconds bit for bit, a kernel that an element does not run (no prompt tokens, no decode
    tokens) costing it nothing."""
    from moesim.cost.estimate import LayerCosting

    arch = load_model(model)
    lay = make_layout(arch, devices_available=8, tp=tp)
    c = LayerCosting(arch, DGX, lay, Workload(1, 1, 1), "bf16", "bf16", "bf16", group_sequences=1)
    tokens = np.array([1, 7, 64, 300, 300, 2048])
    prompt = np.array([0, 7, 0, 299, 1, 1024])
    seconds = sum(op.time for op in sum(c.projections(tokens, prompt), []))
    for t, p, s in zip(tokens.tolist(), prompt.tolist(), seconds.tolist()):
        assert s == sum(op.time for op in sum(c.projections(t, p), []))
    layer = next(layer for layer in arch.layers if not layer.moe) if any(not layer.moe for layer in arch.layers) else None
    for make in [c.moe_pre, c.moe_shared, c.lm_head] + ([lambda t: c.dense_block(layer, t)] if layer else []):
        ops = make(tokens)
        many = sum(op.time for op in (ops if isinstance(ops, list) else [ops]))
        for t, s in zip(tokens.tolist(), np.broadcast_to(many, tokens.shape).tolist()):
            one = make(t)
            assert s == sum(op.time for op in (one if isinstance(one, list) else [one]))


def test_all_reduce_of_many_sizes_equals_one_call_a_size():
    from moesim.cost.collectives import all_reduce_time
    from moesim.hardware.topology import accelerators, topology

    graph = topology("h100-2node")
    accs = accelerators(graph)
    sizes = np.array([0, 1024, 3 * 2**20, 2**30])
    for group in (accs[:2], accs[:8], accs):  # ring (NCCL's protocols inside a node), hierarchical across nodes
        times = all_reduce_time(graph, group, sizes).time
        assert times.tolist() == [all_reduce_time(graph, group, int(s)).time for s in sizes]
