"""The simulator's fast cost paths against the references they must equal bit for bit: the
time-only MoE path (`moesim.cost.moe._moe_times`, element-wise kernels tabled per count) against
the full breakdown, and the compiled all-to-all of a count-level step
(`AllToAll.rank_times_rank_one`) against `rank_times_outer`."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cost import moe
from moesim.cost.moe import _NO_RANKS_TABLE, _moe_device, _moe_times, _moe_times_reference, _table, expert_times, moe_layer_time
from moesim.cost.collectives import AllToAll
from moesim.hardware.catalog import device
from moesim.hardware.topology import accelerators, topology

CASES = [  # (device, expert dtype, hidden, expert intermediate, gated)
    ("h100-sxm", "fp8_block", 7168, 2048, True),
    ("h200-sxm", "bf16", 4096, 1536, True),
    ("l40s", "bf16", 2048, 768, True),
    ("t4", "int4_wo", 4096, 14336, True),
    ("mi300x", "bf16", 2880, 2880, False),
]


def _both(dev, dtype, hidden, inter, gated, local, tokens, top_k):
    args = (float(local.shape[1]), float(hidden), float(inter), float(top_k), gated, _moe_device(dev, dtype))
    fast, _ = _moe_times(local, tokens, *args, _table(args, tokens.max(initial=0.0)), _NO_RANKS_TABLE)
    return fast, _moe_times_reference(local, tokens, *args)


@pytest.mark.parametrize("name,dtype,hidden,inter,gated", CASES)
def test_time_only_path_equals_breakdown_bit_for_bit(name, dtype, hidden, inter, gated):
    dev = device(name)
    rng = np.random.default_rng(7)
    for experts, mean in ((4, 60.0), (8, 3.0), (1, 500.0), (32, 0.5)):
        local = rng.poisson(mean, size=(300, experts)).astype(np.float64)
        local[::7] = 0.0  # ranks that received nothing
        slots = np.maximum(local.sum(axis=1), 1.0)
        for tokens, top_k in ((slots, 1.0), (np.ceil(slots / 3.0) + 0.5, 8.0), (slots * 4000.0, 2.0)):
            # the same table twice: filled on the first call, read on the second
            for _ in range(2):
                fast, reference = _both(dev, dtype, hidden, inter, gated, local, np.ascontiguousarray(tokens), top_k)
                assert np.array_equal(fast, reference)


def test_counts_beyond_the_table_are_costed_directly(monkeypatch):
    monkeypatch.setattr(moe, "_TABLES", {})
    monkeypatch.setattr(moe, "_TABLE_LIMIT", 1024)
    dev = device("h100-sxm")
    local = np.array([[3000.0, 0.0, 2000.0], [5.0, 0.0, 0.0]])
    fast, reference = _both(dev, "bf16", 4096, 1024, True, local, local.sum(axis=1), 1.0)
    assert np.array_equal(fast, reference)
    (table,) = moe._TABLES.values()
    assert table.shape[0] == 1024 and not np.isnan(table[5, 0]) and np.isnan(table[1023]).all()


def test_expert_times_equals_moe_layer_time_without_router():
    dev = device("h100-sxm")
    local = np.array([[7, 0, 130, 2], [0, 0, 0, 1], [64, 64, 64, 64]])
    times = expert_times(dev, local, hidden=7168, inter=2048, dtype="fp8_block")
    for row, seconds in zip(local, times):
        layer = moe_layer_time(dev, row, tokens=max(int(row.sum()), 1), hidden=7168, inter=2048, top_k=1,
                               dtype="fp8_block", router=False)
        assert seconds == pytest.approx(layer.time, rel=1e-12)


def test_whole_counts_and_own_tokens_equal_the_float_path():
    dev = device("h100-sxm")
    local = np.random.default_rng(3).poisson(40.0, size=(5, 64, 4))
    local[:, ::5] = 0
    slots = np.maximum(local.sum(axis=2), 1).astype(np.float64)
    kw = dict(hidden=7168, inter=2048, dtype="fp8_block")
    ints = expert_times(dev, local, **kw)
    floats = expert_times(dev, local.astype(np.float64), tokens=slots, **kw)
    args = (4.0, 7168.0, 2048.0, 1.0, True, _moe_device(dev, "fp8_block"))
    reference = _moe_times_reference(local.reshape(-1, 4).astype(np.float64), slots.reshape(-1), *args).reshape(5, 64)
    assert np.array_equal(ints, reference) and np.array_equal(floats, reference)


@pytest.mark.parametrize("name,dtype,hidden,inter,gated", CASES)
def test_ranks_remembered_by_experts_rows_and_row_blocks_equal_the_breakdown(name, dtype, hidden, inter, gated, monkeypatch):
    """Own tokens (expert parallelism): a rank's seconds are remembered per (experts with rows,
    rows, row blocks); a second pass reads them, ranks beyond the table are costed directly, and
    more local experts than the table holds are never remembered."""
    monkeypatch.setattr(moe, "_RANKS_TABLES", {})
    monkeypatch.setattr(moe, "_RANKS_TABLE_LIMIT", 2048)
    dev = device(name)
    rng = np.random.default_rng(11)
    for experts, mean in ((4, 30.0), (4, 700.0), (8, 5.0), (1, 3000.0), (2, 40.0), (3, 20.0), (16, 9.0)):
        local = rng.poisson(mean, size=(400, experts))
        local[::6, : experts // 2] = 0  # fewer experts with rows
        local[::9] = 0
        args = (float(experts), float(hidden), float(inter), 1.0, gated, _moe_device(dev, dtype))
        reference = _moe_times_reference(local.astype(np.float64), np.maximum(local.sum(axis=1), 1).astype(np.float64), *args)
        for _ in range(2):  # filled on the first call, read on the second
            assert np.array_equal(expert_times(dev, local, hidden=hidden, inter=inter, dtype=dtype, gated=gated), reference)
    assert all(table.shape[1] <= moe._RANKS_TABLE_EXPERTS for table in moe._RANKS_TABLES.values())
    assert not np.isnan(np.concatenate([t.ravel() for t in moe._RANKS_TABLES.values()])).all()


@pytest.mark.parametrize("update", [{"moe_tile_m": 96}, {"moe_tile_m": 8}, {"moe_tile_m": 256},
                                    {"moe_row_block": {"fp8_block": 32}}, {"moe_row_block": {"fp8_block": 48}}])
def test_own_tokens_with_other_row_blocks_equal_the_breakdown(update, monkeypatch):
    """Row blocks that are not 16 .. 64: `_own_times` shifts by any power of two and hands the
    rest (a largest or fixed block that is not a power of two) to `_moe_times`."""
    monkeypatch.setattr(moe, "_RANKS_TABLES", {})
    dev = device("h100-sxm")
    dev = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update=update)})
    local = np.random.default_rng(5).poisson(80.0, size=(500, 4))
    local[::4, :3] = 0
    local[::7] = 0
    args = (4.0, 7168.0, 2048.0, 1.0, True, _moe_device(dev, "fp8_block"))
    reference = _moe_times_reference(local.astype(np.float64), np.maximum(local.sum(axis=1), 1).astype(np.float64), *args)
    for _ in range(2):
        assert np.array_equal(expert_times(dev, local, hidden=7168, inter=2048, dtype="fp8_block"), reference)


def test_device_figures_remembered_per_object_not_per_name():
    dev = device("h100-sxm")
    slower = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update={"moe_empty_block": 1e-6})})
    assert _moe_device(dev, "bf16") is _moe_device(dev, "bf16")
    assert _moe_device(slower, "bf16").empty_block == 1e-6 != _moe_device(dev, "bf16").empty_block


@pytest.mark.parametrize("cluster,algorithm,pick", [("h100-8node", "hierarchical", "all"), ("h100-8node", "flat", "all"),
                                                    ("h100-2node", "hierarchical", "all"), ("dgx-h100", "flat", "all"),
                                                    ("l40s-x8", "flat", "all"), ("h100-8node", "hierarchical", "shuffled"),
                                                    ("h100-2node", "flat", "shuffled"), ("h100-8node", "hierarchical", "one a node")])
def test_rank_one_all_to_all_equals_the_outer_products_bit_for_bit(cluster, algorithm, pick):
    graph = topology(cluster)
    group = accelerators(graph)
    if pick == "shuffled":  # nodes' ranks not one contiguous run each: gathered into node order and back
        group = [group[i] for i in np.random.default_rng(5).permutation(len(group))]
    elif pick == "one a node":  # no scale-up links: the kernel's infinite capacity
        group = [g for g in group if g.endswith(".acc0")]
    a2a = AllToAll(graph, group, algorithm)
    rng = np.random.default_rng(3)
    n = a2a.ranks
    for call, rows in enumerate((1, 2, 58, 58)):
        if call < 3:  # the last call: the same shares again (remembered) with new counts
            tokens = rng.integers(0, 300, size=(2, n)).astype(np.float64)
            tokens[1, ::5] = 0.0  # replicas without tokens
            share = tokens / tokens.sum(axis=1, keepdims=True)
            if rows == 58:
                share = np.asfortranarray(share)  # as the step model's gather makes it
        counts = rng.integers(0, 5000, size=(2, rows, n)) * (rng.random((2, rows, n)) < 0.8)
        dispatch, combine = a2a.rank_times_rank_one(share, counts, 7168.0, 14336.0)
        for i in range(2):
            slots = counts[i].astype(np.float64)
            assert np.array_equal(dispatch[i], a2a.rank_times_outer(share[i][None, :] * 7168.0, slots))
            assert np.array_equal(combine[i], a2a.rank_times_outer(slots * 14336.0, share[i][None, :]))


def test_tile_edge_is_the_clamped_next_power_of_two():
    """`_tile_edge` doubles instead of calling frexp / ldexp: the same edges as the frexp form."""
    import math

    from moesim.cost.moe import _tile_edge

    def by_frexp(size, largest, smallest):
        mantissa, exponent = math.frexp(max(math.ceil(size), 1.0))
        return min(max(math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent), smallest), largest)

    sizes = [0.0, 0.3, 1.0, 1.5, 2.0, 3.0, 15.9, 16.0, 16.1, 63.0, 64.0, 65.0, 127.5, 4096.0, 1e7] + list(range(1, 600))
    for largest, smallest in ((64.0, 16.0), (128.0, 32.0), (96.0, 16.0), (256.0, 32.0), (16.0, 16.0)):
        for size in sizes:
            assert _tile_edge(float(size), largest, smallest) == by_frexp(float(size), largest, smallest)
