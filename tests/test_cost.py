import numpy as np
import pytest

from moesim.cost.attention import decode_attention_time, prefill_attention_time
from moesim.cost.collectives import all_reduce_time, all_to_all_time, transfer_time, uniform_matrix
from moesim.cost.gemm import gemm_time
from moesim.cost.moe import moe_layer_time
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, topology
from moesim.routing.counts import balanced_counts, power_law_counts

H100 = catalog.device("h100-sxm")


def test_small_gemm_is_memory_bound_at_weight_bytes_over_bandwidth():
    cost = gemm_time(H100, 1, 14336, 4096)
    assert cost.bound == "memory"
    weights = 14336 * 4096 * 2
    floor = weights / H100.memory.bandwidth
    assert floor < cost.time < 2 * floor


def test_large_gemm_is_compute_bound_below_peak():
    cost = gemm_time(H100, 8192, 8192, 8192)
    assert cost.bound == "compute"
    achieved = cost.flops / cost.time
    assert 0.6 * H100.flops["bf16"] < achieved < H100.flops["bf16"]


def test_fp8_is_faster_than_bf16_when_compute_bound():
    assert gemm_time(H100, 8192, 8192, 8192, "fp8").time < gemm_time(H100, 8192, 8192, 8192, "bf16").time


def test_moe_reads_only_experts_that_got_tokens():
    counts = np.zeros(8, dtype=np.int64)
    counts[[0, 4]] = 1
    one_token = moe_layer_time(H100, counts, tokens=1, hidden=4096, inter=14336, top_k=2)
    gemms = [p for p in one_token.parts if p.name in ("gate_up", "down")]
    read = sum(p.bytes for p in gemms)
    assert read == pytest.approx(2 * 3 * 4096 * 14336 * 2, rel=0.01)  # two experts, three matrices, bf16


def test_moe_time_grows_with_tokens_and_skew_costs_more_than_balance():
    times = [moe_layer_time(H100, balanced_counts(t, 128, 8), tokens=t, hidden=2048, inter=768, top_k=8).time
             for t in (1, 16, 256, 4096)]
    assert times == sorted(times)
    balanced = moe_layer_time(H100, balanced_counts(4096, 256, 8), tokens=4096, hidden=7168, inter=2048, top_k=8, ep=8)
    skewed = moe_layer_time(H100, power_law_counts(4096, 256, 8, 1.2, ep=8), tokens=4096, hidden=7168, inter=2048, top_k=8, ep=8)
    assert skewed.time > balanced.time


def test_expert_parallelism_shrinks_the_rank_s_work():
    counts = balanced_counts(2048, 64, 8)
    one = moe_layer_time(H100, counts, tokens=2048, hidden=4096, inter=1536, top_k=8, ep=1)
    eight = moe_layer_time(H100, counts, tokens=2048, hidden=4096, inter=1536, top_k=8, ep=8)
    assert eight.time < one.time / 2


def test_attention_prefill_quadratic_and_decode_linear_in_context():
    short = prefill_attention_time(H100, 1, 4096, 32, 8, 128).time
    long = prefill_attention_time(H100, 1, 16384, 32, 8, 128).time
    assert long > 8 * short
    window = prefill_attention_time(H100, 1, 16384, 32, 8, 128, window=128).time
    assert window < long / 10
    d1 = decode_attention_time(H100, 64, 8192, 32, 8, 128).time
    d2 = decode_attention_time(H100, 64, 16384, 32, 8, 128).time
    assert 1.5 < d2 / d1 < 2.1


def test_collectives_follow_the_topology():
    graph = topology("h100-2node")
    accs = accelerators(graph)
    size = 256 * 2**20
    intra = all_reduce_time(graph, accs[:8], size)
    across = all_reduce_time(graph, accs, size)
    assert intra.info["algorithm"] == "ring" and across.info["algorithm"] == "hierarchical"
    assert across.time > intra.time
    # nccl-tests' busbw convention: 2(n-1)/n * bytes / time, below the NVLink port rate
    busbw = 2 * 7 / 8 * size / intra.time
    assert 250e9 < busbw < 450e9


def test_all_to_all_time_follows_the_per_pair_bytes():
    graph = topology("dgx-h100")
    accs = accelerators(graph)
    even = all_to_all_time(graph, accs, uniform_matrix(8, 64 * 2**20))
    hot = uniform_matrix(8, 64 * 2**20)
    hot[:, 0] *= 4  # everyone sends rank 0 four times more
    skewed = all_to_all_time(graph, accs, hot)
    assert skewed.time > 2 * even.time
    assert skewed.info["slowest_rank"] == 0
    cross = topology("h100-2node")
    wide = all_to_all_time(cross, accelerators(cross), uniform_matrix(16, 64 * 2**20))
    assert wide.time > even.time  # the NIC is 8x slower than NVLink


def test_tier_transfers():
    graph = topology("rtx4090-xeon")
    from_dram = transfer_time(graph, "n0.host", "n0.acc0", 2**30)
    from_ssd = transfer_time(graph, "n0.ssd0", "n0.acc0", 2**30)
    assert from_ssd.time > from_dram.time
    assert from_dram.info["links"][0].startswith("pcie")
