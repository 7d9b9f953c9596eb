"""GEMM tile choice and k-step floor, FlashAttention-3 prefill tiles, the decode head-dim term,
and family-restricted calibration: each against its own definition and against the plain model
a profile without the figures keeps."""

import numpy as np
import pytest

from moesim.cost.attention import decode_attention_time, prefill_attention_time
from moesim.cost.gemm import gemm_time, plan
from moesim.hardware import catalog
from moesim.validate import calibrate
from moesim.validate.tables import read_folder


def _with(device, **figures):
    return device.model_copy(update={"efficiency": device.efficiency.model_copy(update=figures)})


@pytest.fixture(scope="module")
def h100():
    return catalog.device("h100-sxm")


def test_profile_without_tiles_keeps_the_power_of_two_tile(h100):
    plain = _with(h100, gemm_tiles=[], k_step={}, no_split_k=[])
    cost = gemm_time(plain, 8192, 128, 1536)
    assert cost.info["tile"] == (128, 128) and cost.info["split_k"] == 2  # 64 tiles, split to fill 132 SMs


def test_plan_takes_the_fastest_candidate(h100):
    m, n, k = 8192, 128, 1536
    flops, nbytes = 2.0 * m * n * k, 2.0 * (m * k + k * n + m * n)
    rate = h100.peak_flops("bf16") * h100.efficiency.compute_for("bf16")
    chosen = gemm_time(h100, m, n, k)
    # a shorter list (keeping the largest tile, the rates' reference) offers a subset of the
    # candidates: none of them is faster, and one of them is the choice
    big = max(h100.efficiency.gemm_tiles, key=lambda t: t[0] * t[1])
    subsets = [gemm_time(_with(h100, gemm_tiles=[tile, big]), m, n, k).time for tile in h100.efficiency.gemm_tiles]
    assert chosen.time == pytest.approx(min(subsets), rel=1e-12)
    tm, tn, split, shape = plan(h100, m, n, k, flops, nbytes, rate)
    assert (tm, tn) == chosen.info["tile"] and split == chosen.info["split_k"] and 0 < shape <= 1


def test_one_tile_deep_reduction_is_set_by_the_k_step(h100):
    """m = 1, n = 128 is one tile; a kernel that never splits k takes k / 128 steps."""
    step = h100.efficiency.k_step["fp8_block"]
    assert "fp8_block" in h100.efficiency.no_split_k
    short, deep = (gemm_time(h100, 1, 128, k, "fp8_block") for k in (16384, 65536))
    assert deep.info["split_k"] == 1
    assert deep.time - short.time == pytest.approx((65536 - 16384) / 128 * step, rel=0.05)
    # bf16 (cuBLAS) splits the same reduction and is far faster
    assert gemm_time(h100, 1, 128, 65536).info["split_k"] > 1


def test_split_reduction_runs_a_reduce_kernel_of_its_own(h100):
    """cuBLAS reduces split-K partial sums in a second kernel: a split GEMM is the GEMM plus a
    `splitk_reduce` kernel that reads the fp32 partials and writes the bf16 output, so a
    one-tile GEMM with a deep k costs at least two launches."""
    cost = gemm_time(h100, 1, 128, 65536)
    split = cost.info["split_k"]
    assert split > 1
    reduce = cost.parts[-1]
    assert reduce.name == "splitk_reduce" and reduce.bytes == 128 * (4 * split + 2)
    assert cost.time == pytest.approx(sum(p.time for p in cost.parts), rel=1e-12)
    assert cost.time > 2 * h100.launch_overhead
    # unsplit GEMMs are one kernel, as before
    assert gemm_time(h100, 8192, 8192, 8192).info["split_k"] == 1
    assert not gemm_time(h100, 8192, 8192, 8192).parts


def test_unaligned_rows_of_block_fp8_cost_one_more_pass(h100):
    """Block-scaled fp8 takes m in multiples of `row_align` (4 on H100) as it is; other m copy
    the activations into a padded buffer first: one more memory pass over the m x k inputs."""
    assert h100.efficiency.row_align == {"fp8_block": 4}
    n, k = 4096, 4096
    aligned, unaligned = gemm_time(h100, 16, n, k, "fp8_block"), gemm_time(h100, 17, n, k, "fp8_block")
    assert [p.name for p in aligned.parts] == ["quantize", "gemm"]
    assert [p.name for p in unaligned.parts] == ["quantize", "pad", "gemm"]
    assert unaligned.parts[1].bytes == 17 * k * 2 * 2
    assert unaligned.time - aligned.time > h100.launch_overhead
    # per-tensor fp8 lists no alignment: m = 17 is one quantisation and one GEMM
    assert [p.name for p in gemm_time(h100, 17, n, k, "fp8").parts] == ["quantize", "gemm"]


def test_prefill_tiles_pack_the_query_heads_of_a_kv_head_for_short_prompts(h100):
    eff = h100.efficiency
    assert eff.prefill_tile == 128
    # 16-token prompts: a CTA per (sequence, KV head) whatever the query heads over 8 KV heads; it computes
    # its packed rows (16 tokens x 4 or 8 heads) in whole 64-row warpgroup MMAs
    ctas = 256 * 8
    sm_rate = h100.peak_flops("bf16") * eff.attention_prefill / h100.compute_units
    for heads, rows in ((32, 64), (64, 128)):
        block = max(2.0 * rows * 128 * 256 / sm_rate, rows * 128 * eff.prefill_pair)
        compute = ctas * (block + eff.prefill_cta) / h100.compute_units
        assert prefill_attention_time(h100, 256, 16, heads, 8, 128).compute_time == pytest.approx(compute, rel=1e-9)
    # an fp8 cache adds its cost per key block of each CTA
    bf16 = prefill_attention_time(h100, 256, 16, 32, 8, 128)
    fp8 = prefill_attention_time(h100, 256, 16, 32, 8, 128, kv_dtype="fp8")
    assert fp8.compute_time - bf16.compute_time == pytest.approx(ctas * eff.prefill_fp8_block / h100.compute_units)
    # a head dim of 64 runs 192-row tiles: 256 tokens of one head are two CTAs of two key blocks each, the
    # longer one its first 192 rows (the second computes its 64 valid rows)
    rows = eff.prefill_rows["64"]
    assert rows == 192
    block = max(2.0 * rows * 128 * 128 / sm_rate, rows * 128 * eff.prefill_pair)
    assert prefill_attention_time(h100, 1, 256, 1, 1, 64).compute_time == pytest.approx(2 * block)
    # head dim 64 is bound by its softmax, 128 by its tensor cores
    assert rows * 128 * eff.prefill_pair > 2.0 * rows * 128 * 128 / sm_rate
    assert 128 * 128 * eff.prefill_pair < 2.0 * 128 * 128 * 256 / sm_rate


def test_one_token_prompts_cost_a_decode_step(h100):
    for args, window in (((256, 1, 32, 8, 128), None), ((4, 1, 64, 64, 64), 128)):
        step = decode_attention_time(h100, *args, window=window, kv_dtype="fp8").time
        assert prefill_attention_time(h100, *args, window=window, kv_dtype="fp8").time == pytest.approx(step)
    # after a cached context its one query sees the context too
    assert prefill_attention_time(h100, 8, 1, 32, 8, 128, context=4095).time == pytest.approx(
        decode_attention_time(h100, 8, 4096, 32, 8, 128).time)


def test_prefill_tiles_off_is_the_flop_model(h100):
    plain = _with(h100, prefill_tile=0)
    for args in ((1, 4096, 32, 8, 128), (8, 300, 16, 16, 64)):
        assert prefill_attention_time(h100, *args, tiles=False).time == pytest.approx(
            prefill_attention_time(plain, *args).time)


def test_long_prompt_prefill_is_its_causal_blocks_at_the_fitted_share(h100):
    eff = h100.efficiency
    seq, heads = 16384, 32
    tiles = seq // 128
    blocks = tiles * (tiles + 1) / 2  # tile j runs j + 1 key blocks
    expected = heads * blocks * 2.0 * 128 * 128 * 256 / (h100.peak_flops("bf16") * eff.attention_prefill)
    expected += heads * tiles * eff.prefill_cta / h100.compute_units  # head dim 128: the softmax hides
    assert prefill_attention_time(h100, 1, seq, heads, 8, 128).compute_time == pytest.approx(expected, rel=1e-9)


def test_decode_unit_cost_grows_with_the_head_dim(h100):
    eff = h100.efficiency
    assert eff.decode_per_dim > 0
    t64 = decode_attention_time(h100, 2048, 1, 32, 8, 64)
    t128 = decode_attention_time(h100, 2048, 1, 32, 8, 128)
    plain = _with(h100, decode_per_dim=0.0)
    extra = 2048 * 8 * 128 * eff.decode_per_dim
    # the units' work overlaps the (short) KV stream as compute does: the extra is the term to 1%
    assert t128.time - decode_attention_time(plain, 2048, 1, 32, 8, 128).time == pytest.approx(extra, rel=0.01)
    assert t128.time > t64.time


def test_fa3_decode_splits_follow_the_wave_heuristic_under_vllms_cap(h100):
    from moesim.cost.attention import _fa3_splits

    sms = h100.compute_units
    # one group: the fewest splits within 85% of the best wave efficiency under the cap of 16 (14 / 132 >=
    # 0.85 * 16 / 132), never more than the key blocks; groups filling 80% of the SMs are not split
    assert _fa3_splits(1, 1024, sms, 16) == 14
    assert _fa3_splits(1, 2, sms, 16) == 2
    assert _fa3_splits(1, 1, sms, 16) == 1
    assert _fa3_splits(106, 1024, sms, 16) == 1
    many = _fa3_splits(np.array([1, 2, 106]), np.array([1024, 1024, 1024]), sms, 16)
    assert many.tolist() == [14, 14, 1]


def test_decode_is_flat_within_a_key_block_and_a_lone_sequence_walks_its_split(h100):
    eff = h100.efficiency
    assert eff.decode_block > 0
    # b = 1: one key block costs the same at 1 and 127 keys (as measured: 8.7 us), a second block adds
    # the split's combine kernel
    one, full, two = (decode_attention_time(h100, 1, k, 1, 1, 64).time for k in (1, 127, 255))
    assert full == pytest.approx(one, rel=0.02)
    assert two - full == pytest.approx(h100.launch_overhead, rel=0.2)
    # 131072 keys over 14 CTAs: the CTAs' key loop (ceil(1024 / 14) blocks), not the stream, sets the step
    long = decode_attention_time(h100, 1, 131072, 1, 1, 64)
    assert long.compute_time >= 74 * eff.decode_block
    assert long.compute_time > long.memory_time
    # a sliding window ending past it straddles two blocks: it splits like a 256-key cache
    windowed = decode_attention_time(h100, 1, 131072, 1, 1, 64, window=128).time
    assert windowed == pytest.approx(decode_attention_time(h100, 1, 128, 1, 1, 64).time + h100.launch_overhead,
                                     rel=0.02)
    # arrays (one entry per DP replica) give the scalars' times
    batch, keys = np.array([1, 64, 2048]), np.array([131072, 1000, 1])
    times = decode_attention_time(h100, batch, keys, 32, 8, 128).time
    scalars = [decode_attention_time(h100, int(b), int(k), 32, 8, 128).time for b, k in zip(batch, keys)]
    assert np.allclose(times, scalars)
    # a replica with no sequences costs the call's floor, without a 0 / 0 on the way
    with np.errstate(all="raise"):
        empty = decode_attention_time(h100, np.array([0, 4]), np.array([0, 100]), 32, 8, 128).time
    assert empty[0] == pytest.approx(h100.launch_overhead + eff.attention_overhead)


def test_family_restricted_fit_moves_only_that_familys_figures(h100, tmp_path):
    """Rows made by the model at a known tile_overhead: a gemm-only fit brings it back and leaves
    the figures other families share (launch overhead, memory, k_half) where they were."""
    truth = calibrate.with_values(h100, {("efficiency", "tile_overhead"): 40.0})
    shapes = [(m, n, k) for m in (1, 64, 200, 1000, 3000) for n, k in ((4096, 4096), (1024, 7168), (14336, 2048))]
    rows = [["bfloat16", m, n, k, gemm_time(truth, m, n, k).time * 1e3] for m, n, k in shapes]
    path = tmp_path / "gemm_vllm_0.19.0_gemm_perf.csv"
    path.write_text("gemm_dtype,m,n,k,latency\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    fitted, record = calibrate.fit(h100, read_folder(tmp_path), families={"gemm"}, sweeps=4)
    assert set(record["figures"]) <= {"efficiency.compute.bf16", "efficiency.tile_overhead", "efficiency.k_step.bf16"}
    assert fitted.efficiency.tile_overhead == pytest.approx(40.0, rel=0.1)
    for field in ("memory", "memory_latency", "k_half", "roofline_p"):
        assert getattr(fitted.efficiency, field) == getattr(h100.efficiency, field)
    assert fitted.launch_overhead == h100.launch_overhead


def test_mla_prefill_pays_its_latent_once_per_token_whatever_the_heads(h100):
    from moesim.cost.attention import mla_prefill_time

    latent = h100.efficiency.mla_prefill_latent
    assert latent > 0
    plain = _with(h100, mla_prefill_latent=0.0)
    for heads in (1, 128):
        extra = mla_prefill_time(h100, 128, 512, heads, 128, 64, 128).time - mla_prefill_time(
            plain, 128, 512, heads, 128, 64, 128).time
        assert extra == pytest.approx(128 * 512 * latent)


@pytest.mark.parametrize("name", ["h100-sxm", "l40s"])  # with a gemm_tiles list and the older one-tile model
@pytest.mark.parametrize("dtype", ["bf16", "fp8_block", "fp8", "int4"])
def test_array_of_row_counts_gives_each_scalar_call(name, dtype):
    """The simulator costs every row count of a GEMM shape in one call: each element (time,
    split, tile, bytes) is what the scalar call gives, bit for bit, the pad and split-K reduce
    kernels counted only on the rows that run them."""
    device = catalog.device(name)
    rows = np.array([1, 2, 3, 4, 5, 16, 17, 63, 64, 65, 127, 500, 1024, 2047, 4096])
    for n, k in ((1536, 7168), (128, 65536), (7168, 2048)):
        many = gemm_time(device, rows, n, k, dtype)
        for i, m in enumerate(rows.tolist()):
            one = gemm_time(device, m, n, k, dtype)
            assert many.time[i] == one.time and many.bytes[i] == one.bytes
            assert many.info["split_k"][i] == one.info["split_k"]
            assert (many.info["tile"][0][i], many.info["tile"][1][i]) == one.info["tile"]
