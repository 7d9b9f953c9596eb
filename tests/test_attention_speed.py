"""The attention cost model's compiled paths against the NumPy expressions they must equal bit
for bit: decode over arrays (`moesim.cost.attention._decode_many`, one element loop) against the
NumPy path scalars still take, and the prefill tiles (`_prefill_tiles`) against their NumPy
formulation."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cost import attention
from moesim.cost.attention import decode_attention_time, mla_decode_time
from moesim.hardware.catalog import device

FIELDS = ("time", "compute_time", "memory_time", "launch_time", "flops", "bytes")
# h100-sxm has FlashAttention-3's decode grid, prefill tiles and fp8 dequantisation; the others the older model
DEVICES = ("h100-sxm", "a100-sxm", "mi300x", "l40s")
# (kind, heads, KV heads or kv_lora rank, head dim or rope dim, window): Mixtral's GQA, MHA, GPT-OSS's
# sliding window, DeepSeek-V3's MLA at TP 1 and 8
SHAPES = [("gqa", 32, 8, 128, None), ("mha", 16, 16, 64, None), ("gqa", 64, 8, 64, 128),
          ("mla", 128, 512, 64, None), ("mla", 16, 512, 64, None)]


def _decode(dev, shape, batch, kv, kv_dtype):
    kind, heads, second, third, window = shape
    if kind == "mla":
        return mla_decode_time(dev, batch, kv, heads, second, third, kv_dtype=kv_dtype)
    return decode_attention_time(dev, batch, kv, heads, second, third, window=window, kv_dtype=kv_dtype)


@pytest.mark.parametrize("name", DEVICES)
def test_compiled_decode_equals_numpy_bit_for_bit(name, monkeypatch):
    dev = device(name)
    rng = np.random.default_rng(3)
    arrays = [(rng.integers(1, 513, n), rng.integers(1, 32769, n)) for n in (1, 64, 128)]
    keys = np.concatenate([np.arange(1, 300), [2047, 2048, 2049, 32767, 32768]])
    arrays += [(np.ones_like(keys), keys), (np.full_like(keys, 40), keys),
               (np.array([0, 4, 512]), np.array([0, 100, 1])),  # a replica with no sequences
               (rng.random(20) * 300, rng.random(20) * 9000)]  # float arrays (averages)
    for shape in SHAPES:
        for kv_dtype in ("bf16", "fp8"):
            for batch, kv in arrays:
                fast = _decode(dev, shape, batch, kv, kv_dtype)
                with monkeypatch.context() as m:
                    m.setattr(attention, "_compiled", lambda *_: False)
                    reference = _decode(dev, shape, batch, kv, kv_dtype)
                for field in FIELDS:
                    assert np.array_equal(getattr(fast, field), getattr(reference, field)), (shape, kv_dtype, field)


def _tiled_numpy(dev, batch, seq, heads, kv_heads, dims, window, context, peak_share, fp8):
    """`_tiled_prefill_time` as NumPy arrays computed it before the compiled loop (seconds)."""
    eff = dev.efficiency
    tile = eff.prefill_tile
    rows = eff.prefill_rows.get(str(dims // 2), tile)
    group = max(1, heads // max(kv_heads, 1))
    packed = group > 1 and seq < rows
    per_tile = max(1, rows // group) if packed else rows
    units = kv_heads if packed else heads
    start = np.arange(0, seq, per_tile) + context
    end = np.minimum(start + per_tile, context + seq)
    first = np.maximum(0, start - window) if window else np.zeros_like(start)
    blocks = -(-end // tile) - first // tile
    used = np.minimum(rows, -(-(end - start) * (group if packed else 1) // 64) * 64)
    sm_rate = dev.peak_flops("bf16") * peak_share / dev.compute_units
    tile_time = (np.maximum(2.0 * used * tile * dims * blocks / sm_rate, blocks * used * tile * eff.prefill_pair)
                 + blocks * (eff.prefill_fp8_block if fp8 else 0.0))
    ctas = batch * units * len(start)
    average = (batch * units * float(tile_time.sum()) + ctas * eff.prefill_cta) / dev.compute_units
    return max(average, float(tile_time.max()))


def test_compiled_prefill_tiles_equal_numpy_bit_for_bit():
    dev = device("h100-sxm")
    share = dev.efficiency.attention_prefill
    # packed GQA, MLA's un-absorbed heads, head dim 64's deeper tiles under a sliding window; the last
    # chunk has more tiles than the compiled pairwise sum takes (NumPy adds them)
    for heads, kv_heads, dims, window in ((32, 8, 256, None), (128, 128, 320, None), (64, 8, 128, 128)):
        for seq in (2, 15, 16, 100, 128, 191, 192, 193, 1000, 2048, 262_145):
            for context in (0, 7, 4095, 30000):
                for batch, fp8 in ((1, False), (3, True)):
                    args = (dev, batch, seq, heads, kv_heads, dims, window, context, share, fp8)
                    assert attention._tiled_prefill_time(*args) == _tiled_numpy(*args)
