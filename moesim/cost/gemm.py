"""Dense GEMM time: ``[m, k] x [k, n]`` on one device.

Shape effects modelled (all parameters in the device profile's ``efficiency``):
- wave quantisation: the output is cut into tiles, one per compute unit at a time; a last,
  partly filled wave wastes the idle units. Small dimensions get smaller tiles, as cuBLAS and
  CUTLASS heuristics pick them (never below 16 x 32).
- pipeline fill: a short reduction (``k``) cannot hide the load latency; efficiency
  ``k / (k + k_half)``.
- roofline: memory-bound shapes (small ``m``, decode) take weight bytes over bandwidth.
"""

from __future__ import annotations

import math

from moesim.cost.roofline import OpCost, combine, elementwise, kernel
from moesim.dtypes import canonical_dtype, dtype_bytes


def _tile(size: int, largest: int, smallest: int) -> int:
    """The tile edge a heuristic picks for a dimension: the next power of two, clamped."""
    return max(smallest, min(largest, 1 << max(0, math.ceil(math.log2(max(size, 1))))))


# A split-K slice needs at least this much reduction depth to be worth its partial sums.
_SPLIT_K_MIN_DEPTH = 512


def tiles(device, m: int, n: int) -> int:
    """Output tiles of an ``m x n`` GEMM at the tile size a heuristic picks."""
    eff = device.efficiency
    return math.ceil(m / _tile(m, eff.tile_m, 16)) * math.ceil(n / _tile(n, eff.tile_n, 32))


def split_k(device, m: int, n: int, k: int) -> int:
    """How many slices the reduction is cut into when the output alone cannot fill the device
    (cuBLAS and CUTLASS split-K / stream-K)."""
    count = tiles(device, m, n)
    if count >= device.compute_units:
        return 1
    return max(1, min(device.compute_units // count, k // _SPLIT_K_MIN_DEPTH))


def wave_efficiency(work_items: int, units: int) -> float:
    """Fraction of ``units`` busy, averaged over the waves that run ``work_items``."""
    waves = math.ceil(work_items / units)
    return work_items / (waves * units)


def gemm_time(
    device,
    m: int,
    n: int,
    k: int,
    dtype: str = "bf16",
    *,
    out_dtype: str | None = None,
    name: str = "gemm",
) -> OpCost:
    """Time of ``C[m, n] = A[m, k] @ B[k, n]`` with A and B in ``dtype``.

    The output is bf16 unless ``out_dtype`` says otherwise (fp8 GEMMs write bf16 in every
    serving engine); int4 / fp4 weights are dequantised on the fly against bf16 activations.
    """
    variant = dtype.lower()
    dtype = canonical_dtype(dtype)
    out_dtype = canonical_dtype(out_dtype or ("bf16" if dtype in ("fp8", "int8", "int4", "fp4", "fp6") else dtype))
    # int4 is weight-only (W4A16) everywhere; fp4 runs natively where the tensor cores take it
    weight_only = dtype == "int4" or (dtype == "fp4" and "fp4" not in device.flops)
    act_dtype = "bf16" if weight_only else dtype
    flops = 2.0 * m * n * k
    bytes_moved = m * k * dtype_bytes(act_dtype) + k * n * dtype_bytes(dtype) + m * n * dtype_bytes(out_dtype)
    eff = device.efficiency
    split = split_k(device, m, n, k)
    depth = k / split
    shape_eff = wave_efficiency(tiles(device, m, n) * split, device.compute_units) * (depth / (depth + eff.k_half))
    if split > 1:  # fp32 partial sums written and reduced
        bytes_moved += 2 * m * n * 4 * split
    cost = kernel(
        device, name, flops, bytes_moved, act_dtype,
        compute_efficiency=eff.compute_for(variant, act_dtype) * shape_eff,
    )
    cost.info = {"m": m, "n": n, "k": k, "dtype": variant, "split_k": split}
    if dtype in ("fp8", "int8") and not weight_only:
        # Activations are quantised on the fly (per tensor, per token or per 128-block) by a
        # kernel of their own before the GEMM.
        quant = elementwise(device, "quantize", m * k, "bf16", reads=1, writes=1)
        quant.time += eff.variant_overhead.get(variant, 0.0)
        quant.launch_time += eff.variant_overhead.get(variant, 0.0)
        return combine(name, [quant, cost], **cost.info)
    return cost
