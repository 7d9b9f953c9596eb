"""Dense GEMM time: ``[m, k] x [k, n]`` on one device.

Shape effects modelled (all parameters in the device profile's ``efficiency``):
- tile choice and wave quantisation: the output is cut into tiles, one per compute unit at a
  time; a last, partly filled wave wastes the idle units. A profile listing ``gemm_tiles`` picks,
  as cuBLAS and CUTLASS heuristics do, the fastest of those tile shapes and of split-K depths
  (a smaller tile fills more units but loads more operand bytes per multiply-add:
  ``tile_overhead``). Without the list, one power-of-two tile clamped at ``tile_m x tile_n``.
  Small dimensions get smaller tiles either way (never below 16 x 32).
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


def plan(device, m: int, n: int, k: int, flops: float, bytes_moved: float, rate: float,
         variant: str = "bf16", dtype: str = "bf16", out_bytes: float = 2.0) -> tuple[int, int, int, float]:
    """``(tile_m, tile_n, split, shape efficiency)`` of the fastest ``gemm_tiles`` tile and
    split-K depth for a GEMM of ``flops`` FLOP and ``bytes_moved`` bytes, ``rate`` FLOP/s being
    its large-GEMM rate: each candidate is timed by the device's roofline. A split reduction
    writes fp32 partial sums, which a second kernel reads and reduces into the ``out_bytes``
    output (cuBLAS's split-K reduce kernel: one more launch, which is why one-tile GEMMs with a
    deep k flatten at about two launches rather than one). A tile takes at least ``k_step`` per
    128-deep step of its share of the reduction, wave after wave."""
    eff = device.efficiency
    step = eff.k_step.get(variant, eff.k_step.get(dtype, 0.0))
    splits = variant not in eff.no_split_k and dtype not in eff.no_split_k
    units = device.compute_units
    bandwidth = device.memory.bandwidth * eff.memory
    k_half, latency, p, overhead = eff.k_half, eff.memory_latency, eff.roofline_p, eff.tile_overhead
    # a tile's rate per compute unit relative to the largest listed tile's
    big_m, big_n = max(eff.gemm_tiles, key=lambda t: t[0] * t[1])
    big_rate = 1.0 + overhead * (1.0 / big_m + 1.0 / big_n)
    edge_m, edge_n = _tile(m, 1 << 30, 16), _tile(n, 1 << 30, 32)
    best = None
    for top_m, top_n in eff.gemm_tiles:
        tm, tn = min(top_m, edge_m), min(top_n, edge_n)
        rows, cols = -(-m // tm), -(-n // tn)
        count = rows * cols
        # work in padded tiles, over the units of the waves it takes
        fill = m * n / (rows * tm * cols * tn) * big_rate / (1.0 + overhead * (1.0 / tm + 1.0 / tn))
        split = 1
        while True:
            depth = k / split
            waves = math.ceil(count * split / units)
            shape_eff = fill * count * split / (waves * units) * depth / (depth + k_half)
            chain = waves * math.ceil(depth / 128) * step
            if chain * rate * shape_eff > flops:
                shape_eff = flops / (rate * chain)
            extra = m * n * 4 * split if split > 1 else 0  # fp32 partial sums written
            # the roofline's softened corner, in plain floats (a compiled call per candidate costs more)
            compute, memory = flops / (rate * shape_eff), (bytes_moved + extra) / bandwidth + latency
            body = (compute**p + memory**p) ** (1.0 / p)
            if split > 1:  # the partial sums reduced by a kernel of its own
                body += device.launch_overhead + (extra + m * n * out_bytes) / bandwidth + latency
            if best is None or body < best[0]:
                best = (body, tm, tn, split, shape_eff)
            split *= 2
            if not splits or count * split > 2 * units or k / split < _SPLIT_K_MIN_DEPTH:
                break
    return best[1], best[2], best[3], best[4]


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
    compute = eff.compute_for(variant, act_dtype)
    kernels = []
    if dtype in ("fp8", "int8") and not weight_only:
        # Activations are quantised on the fly (per tensor, per token or per 128-block) by a
        # kernel of their own before the GEMM.
        quant = elementwise(device, "quantize", m * k, "bf16", reads=1, writes=1)
        quant.time += eff.variant_overhead.get(variant, 0.0)
        quant.launch_time += eff.variant_overhead.get(variant, 0.0)
        kernels.append(quant)
        align = eff.row_align.get(variant, 1)
        if m % align:  # rows the kernel cannot take as they are: copied into a padded buffer first
            kernels.append(elementwise(device, "pad", m * k, "bf16", reads=1, writes=1))
    if eff.gemm_tiles:
        tile_m, tile_n, split, shape_eff = plan(device, m, n, k, flops, bytes_moved,
                                                device.peak_flops(act_dtype) * compute, variant, act_dtype,
                                                dtype_bytes(out_dtype))
    else:
        tile_m, tile_n = _tile(m, eff.tile_m, 16), _tile(n, eff.tile_n, 32)
        split = split_k(device, m, n, k)
        depth = k / split
        shape_eff = wave_efficiency(tiles(device, m, n) * split, device.compute_units) * (depth / (depth + eff.k_half))
    if split > 1 and eff.gemm_tiles:  # fp32 partial sums written here, reduced by a kernel of their own
        bytes_moved += m * n * 4 * split
    elif split > 1:  # the older model: partial sums written and read back inside the GEMM's time
        bytes_moved += 2 * m * n * 4 * split
    cost = kernel(device, name, flops, bytes_moved, act_dtype, compute_efficiency=compute * shape_eff)
    info = {"m": m, "n": n, "k": k, "dtype": variant, "split_k": split, "tile": (tile_m, tile_n)}
    cost.info = info
    kernels.append(cost)
    if split > 1 and eff.gemm_tiles:
        kernels.append(kernel(device, "splitk_reduce", m * n * split, m * n * (4 * split + dtype_bytes(out_dtype)),
                              "fp32", compute_efficiency=1.0))
    return combine(name, kernels, **info) if len(kernels) > 1 else cost
