"""The cost model's structural terms: NCCL protocols, DeepEP kernel floors and rates, decode
attention work units, fp8 KV dequantisation. Each is checked against its own definition and
against the plain model it falls back to when a profile lacks the figures."""

import numpy as np
import pytest

from moesim.cost.attention import decode_attention_time, mla_decode_time
from moesim.cost.collectives import all_gather_time, all_reduce_time, all_to_all_time, bus_share, uniform_matrix
from moesim.cost.moe import moe_layer_time
from moesim.dtypes import weight_bytes_per_param
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, topology
from moesim.routing.counts import balanced_counts


@pytest.fixture(scope="module")
def node():
    graph = topology("dgx-h100")
    return graph, accelerators(graph)


def _without(device, *fields):
    """``device`` with the named efficiency figures back at their defaults (the plain model)."""
    eff = device.efficiency.model_dump()
    defaults = type(device.efficiency)().model_dump()
    return device.model_copy(update={"efficiency": type(device.efficiency)(**{**eff, **{f: defaults[f] for f in fields}})})


def test_bus_share_interpolates_in_log2_of_the_group_and_clamps():
    shares = {"2": 0.5, "8": 0.8}
    assert bus_share(shares, 2) == pytest.approx(0.5)
    assert bus_share(shares, 4) == pytest.approx(0.65)  # half way in log2
    assert bus_share(shares, 64) == pytest.approx(0.8)


def test_nccl_takes_the_cheaper_protocol(node):
    graph, accs = node
    h100 = catalog.device("h100-sxm")
    eff = h100.efficiency
    group = accs[:8]
    small = all_gather_time(graph, group, 1024).time
    ll_floor = eff.nccl_launch["ll"] + 7 * eff.nccl_step["ll"]
    assert ll_floor <= small < ll_floor + 1e-6  # LL: its latency, a few bytes
    big = 512 * 2**20
    bandwidth = graph.edges[group[0], "n0.switch"]["bandwidth"]
    simple = (eff.nccl_launch["simple"] + 7 * eff.nccl_step["simple"]
              + 7 / 8 * big / (bandwidth * bus_share(eff.nccl_bus, 8) * eff.nccl_op.get("all_gather", 1.0)))
    assert all_gather_time(graph, group, big).time == pytest.approx(simple)
    sizes = 2.0 ** np.arange(8, 30)
    times = [all_reduce_time(graph, group, s).time for s in sizes]
    assert all(b >= a for a, b in zip(times, times[1:]))


def test_nccl_figures_apply_inside_one_node_and_default_to_the_ring(node):
    graph, accs = node
    plain = _without(catalog.device("h100-sxm"), "nccl_bus")
    group = accs[:4]
    bandwidth = graph.edges[group[0], "n0.switch"]["bandwidth"]
    latency = graph.edges[group[0], "n0.switch"]["latency"] * 2
    expected = 3 / 4 * 2**20 / bandwidth + 3 * latency
    assert all_gather_time(graph, group, 2**20, device=plain).time == pytest.approx(expected)
    two = topology("h100-2node")
    across = accelerators(two)[::8]  # one GPU per node: the NCCL figures are for one node
    assert all_reduce_time(two, across, 2**20).time == all_reduce_time(two, across, 2**20, device=plain).time


def test_deepep_floor_rate_and_sms(node):
    graph, accs = node
    h100 = catalog.device("h100-sxm")
    figures = h100.efficiency.deepep
    matrix = uniform_matrix(8, 0.0)
    floor = all_to_all_time(graph, accs, matrix + 1.0, kernel="deepep_normal_dispatch", sms=8).time
    assert floor == pytest.approx(figures["normal_dispatch_floor"], rel=1e-3)
    big = uniform_matrix(8, 8 * 2**20 * 7168 / 4)
    slow, fast = (all_to_all_time(graph, accs, big, kernel="deepep_normal_dispatch", sms=s).time for s in (4, 24))
    assert slow > 2 * fast  # SM-bound: six times the SMs
    assert all_to_all_time(graph, accs, big, kernel="deepep_normal_dispatch", sms=4, token_bytes=2**20).time > slow
    raw = all_to_all_time(graph, accs, big).time  # the links alone, as before
    assert fast > raw
    ll = all_to_all_time(graph, accs, matrix + 1.0, kernel="deepep_ll_combine", experts=256).time
    assert ll == pytest.approx(figures["ll_combine_floor"] + 256 * figures["ll_expert"], rel=1e-3)
    with pytest.raises(Exception, match="unknown all-to-all kernel"):
        all_to_all_time(graph, accs, big, kernel="deepep")


def test_decode_work_unit_cost_grows_with_sequences_and_kv_heads():
    h100 = catalog.device("h100-sxm")
    per_unit = h100.efficiency.decode_per_sequence
    assert per_unit > 0
    plain = _without(h100, "decode_per_sequence")
    # the units' work overlaps the KV stream as compute does (softened roofline): at batch 2048 it is
    # the step and adds its whole cost, at batch 64 less than that but still some
    for batch, kv_heads, share in ((64, 1, 0.3), (2048, 8, 0.98)):
        with_units = decode_attention_time(h100, batch, 1, 32, kv_heads, 128).time
        without = decode_attention_time(plain, batch, 1, 32, kv_heads, 128).time
        assert share * batch * kv_heads * per_unit <= with_units - without <= batch * kv_heads * per_unit * 1.001
    batch = np.array([1, 256, 2048])
    times = decode_attention_time(h100, batch, np.array([1, 1, 1]), 32, 8, 128).time
    assert np.all(np.diff(times) > 0)


def test_fp8_kv_mla_decode_is_slower_than_bf16_on_h100_as_measured():
    h100 = catalog.device("h100-sxm")
    bf16 = mla_decode_time(h100, 64, 32767, 16, 512, 64).time
    fp8 = mla_decode_time(h100, 64, 32767, 16, 512, 64, kv_dtype="fp8").time
    assert fp8 > 2 * bf16  # measured 4.4 ms against 0.81 ms (aiconfigurator generation_mla table)
    plain = _without(h100, "kv_dequant")
    assert mla_decode_time(plain, 64, 32767, 16, 512, 64, kv_dtype="fp8").time < bf16  # bytes alone: faster


def _moe(device, counts, dtype, ep=1):
    return moe_layer_time(device, counts, tokens=int(counts.sum() // 8) or 1, hidden=7168, inter=2048, top_k=8,
                          dtype=dtype, ep=ep, router=False)


def test_grouped_gemm_stream_follows_the_tiles_in_flight():
    """moe_inflight_half: one expert hit by one token streams its weights slower, per byte, than
    eight experts hit at once (few tiles cannot cover the memory latency); with the figure absent
    only the launch and the memory latency, paid once per GEMM, tell them apart."""
    h100 = catalog.device("h100-sxm")
    assert h100.efficiency.moe_inflight_half_for("bf16") > 0
    one, eight = np.zeros(256, np.int64), np.zeros(256, np.int64)
    one[0], eight[:8] = 1, 1

    def per_expert(device):
        a, b = (_moe(device, c, "bf16").parts for c in (one, eight))
        up = [p for p in a if p.name == "gate_up"][0], [p for p in b if p.name == "gate_up"][0]
        return up[0].time, up[1].time / 8

    single, shared = per_expert(h100)
    flat = h100.model_copy(update={"efficiency": h100.efficiency.model_copy(update={"moe_inflight_half": {}})})
    flat_single, flat_shared = per_expert(flat)
    # without the figure only the launch and latency, paid once, separate the two
    assert flat_single - flat_shared < 1.5 * (h100.launch_overhead + h100.efficiency.memory_latency)
    assert single / shared > 1.2 * flat_single / flat_shared


def test_fp8_moe_quantises_its_activations_twice():
    """vLLM's fp8 fused MoE quantises the tokens before the first grouped GEMM and the
    activation's output before the second: two more kernels than bf16, in the align and
    activation parts."""
    h100 = catalog.device("h100-sxm")
    counts = np.zeros(256, np.int64)
    counts[:8] = 1
    fp8 = {p.name: p for p in _moe(h100, counts, "fp8").parts}
    bf16 = {p.name: p for p in _moe(h100, counts, "bf16").parts}
    launch = h100.launch_overhead
    assert fp8["align"].launch_time == pytest.approx(bf16["align"].launch_time + launch)
    assert fp8["activation"].launch_time == pytest.approx(bf16["activation"].launch_time + launch)
    assert fp8["align"].bytes - bf16["align"].bytes == pytest.approx(3.0 * 1 * 7168)


def test_int4_small_batch_kernel_streams_at_its_own_rate():
    """vLLM runs int4 weight-only MoE on its CUDA moe_wna16 GEMM while routed slots per local
    expert stay at or below 6, on the Triton kernel above: the profile gives the two their own
    weight streams, and the switch follows the local experts (EP) as vLLM's test does."""
    h100 = catalog.device("h100-sxm")
    eff = h100.efficiency
    assert eff.moe_small_batch == {"int4_wo": 6}
    counts = np.zeros(256, np.int64)
    counts[0] = 1  # one slot on rank 0's first expert
    plain = h100.model_copy(update={"efficiency": eff.model_copy(update={"moe_small_batch": {}})})

    def gate_up(device, tokens, ep):
        cost = moe_layer_time(device, counts, tokens=tokens, hidden=7168, inter=2048, top_k=8, dtype="int4_wo", ep=ep,
                              router=False)
        return next(p for p in cost.parts if p.name == "gate_up").time

    # 1 token x 8 slots over 2 local experts (EP128): 4 slots per expert, the small-batch kernel
    assert gate_up(h100, 1, 128) != gate_up(plain, 1, 128)
    # 2 tokens: 8 slots per expert, the Triton kernel, as without the figure
    assert gate_up(h100, 2, 128) == gate_up(plain, 2, 128)


def test_unaligned_expert_shard_computes_slower():
    """An expert-TP shard that is not a multiple of 16 columns (an intermediate size of 1856
    over TP16 = 116, a measured shape) runs the grouped GEMMs `moe_unaligned` times slower in
    compute than a 16-aligned one."""
    h100 = catalog.device("h100-sxm")
    counts = balanced_counts(16384, 128, 6)

    def layer(inter):
        return moe_layer_time(h100, counts, tokens=16384, hidden=2688, inter=inter, top_k=6, dtype="fp8",
                              expert_tp=16, router=False).time

    aligned, unaligned = layer(2048), layer(1856)  # shards of 128 and 116 columns
    assert unaligned > 2.0 * aligned
    plain = h100.model_copy(update={"efficiency": h100.efficiency.model_copy(update={"moe_unaligned": {}})})
    assert moe_layer_time(plain, counts, tokens=16384, hidden=2688, inter=1856, top_k=6, dtype="fp8", expert_tp=16,
                          router=False).time < aligned


def test_int4_triton_kernel_reads_every_local_expert_in_fixed_row_blocks():
    """vLLM's Triton moe_wna16 kernel (int4 weight-only, above the small-batch threshold) reads
    every local expert's weights and keeps 64-row blocks: one expert with rows costs the bytes of
    all four local experts (EP64 of 256), and 8 or 64 rows per expert cost the same blocks."""
    h100 = catalog.device("h100-sxm")
    assert "int4_wo" in h100.efficiency.moe_reads_all and h100.efficiency.moe_row_block == {"int4_wo": 64}

    def gate_up(counts, tokens):
        cost = moe_layer_time(h100, counts, tokens=tokens, hidden=7168, inter=2048, top_k=8, dtype="int4_wo", ep=64,
                              router=False)
        return next(p for p in cost.parts if p.name == "gate_up")

    one, four = np.zeros(256, np.int64), np.zeros(256, np.int64)
    one[0], four[:4] = 8, 8  # 64 tokens x 8 slots: 32 slots per local expert, the Triton kernel
    weights = 4 * 2 * 2048 * 7168 * weight_bytes_per_param("int4_wo")
    assert gate_up(one, 64).bytes == pytest.approx(weights + 8 * (7168 * 2 + 4096 * 2))
    assert gate_up(four, 64).bytes == pytest.approx(weights + 32 * (7168 * 2 + 4096 * 2))
    eight, sixty_four = np.zeros(256, np.int64), np.zeros(256, np.int64)
    eight[:4], sixty_four[:4] = 8, 64
    assert gate_up(eight, 64).compute_time == pytest.approx(gate_up(sixty_four, 512).compute_time)


def test_int4_small_batch_kernel_time_grows_with_every_row():
    """The CUDA moe_wna16 GEMM has no row blocks: its compute grows with each row (1 to 6 rows
    per expert), where a blocked kernel pads them all to one block."""
    h100 = catalog.device("h100-sxm")
    times = []
    for rows in (2, 4, 6):
        counts = np.full(256, rows, np.int64)
        cost = moe_layer_time(h100, counts, tokens=rows * 32, hidden=7168, inter=2048, top_k=8, dtype="int4_wo",
                              router=False)
        times.append(next(p for p in cost.parts if p.name == "gate_up").compute_time)
    assert times[1] == pytest.approx(2 * times[0]) and times[2] == pytest.approx(3 * times[0])
