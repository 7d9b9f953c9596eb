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

import numba
import numpy as np

from moesim.cost.roofline import OpCost, combine, elementwise, kernel, only_where
from moesim.dtypes import canonical_dtype, dtype_bytes


@numba.njit(inline="always", cache=True)
def _tile(size: int, largest: int, smallest: int) -> int:
    """The tile edge a heuristic picks for a dimension: the next power of two, clamped."""
    return max(smallest, min(largest, 1 << max(0, math.ceil(math.log2(max(size, 1))))))


# A split-K slice needs at least this much reduction depth to be worth its partial sums.
_SPLIT_K_MIN_DEPTH = 512


@numba.njit(cache=True)
def _plan_many(m, n, k, flops, bytes_moved, rate, tiles_mn, units, bandwidth, k_half, latency, p, overhead, step,
               splits, launch, out_bytes):
    """:func:`plan` for each of the rows ``m`` (``flops``, ``bytes_moved`` per row; the rest
    shared), compiled: the simulator costs every row count of a GEMM at once."""
    size = m.size
    tile_m, tile_n = np.empty(size, np.int64), np.empty(size, np.int64)
    split_of, shape_of = np.empty(size, np.int64), np.empty(size)
    # a tile's rate per compute unit relative to the largest listed tile's
    big = 0
    for i in range(tiles_mn.shape[0]):
        if tiles_mn[i, 0] * tiles_mn[i, 1] > tiles_mn[big, 0] * tiles_mn[big, 1]:
            big = i
    big_rate = 1.0 + overhead * (1.0 / tiles_mn[big, 0] + 1.0 / tiles_mn[big, 1])
    edge_n = _tile(n, 1 << 30, 32)
    for i in range(size):
        rows_i = m[i]
        edge_m = _tile(rows_i, 1 << 30, 16)
        best_body = np.inf
        for t in range(tiles_mn.shape[0]):
            tm, tn = min(tiles_mn[t, 0], edge_m), min(tiles_mn[t, 1], edge_n)
            rows, cols = -(-rows_i // tm), -(-n // tn)
            count = rows * cols
            # work in padded tiles, over the units of the waves it takes
            fill = rows_i * n / (rows * tm * cols * tn) * big_rate / (1.0 + overhead * (1.0 / tm + 1.0 / tn))
            split = 1
            while True:
                depth = k / split
                waves = math.ceil(count * split / units)
                shape_eff = fill * count * split / (waves * units) * depth / (depth + k_half)
                chain = waves * math.ceil(depth / 128) * step
                if chain * rate * shape_eff > flops[i]:
                    shape_eff = flops[i] / (rate * chain)
                extra = rows_i * n * 4 * split if split > 1 else 0  # fp32 partial sums written
                compute, memory = flops[i] / (rate * shape_eff), (bytes_moved[i] + extra) / bandwidth + latency
                body = (compute**p + memory**p) ** (1.0 / p)
                if split > 1:  # the partial sums reduced by a kernel of its own
                    body += launch + (extra + rows_i * n * out_bytes) / bandwidth + latency
                if body < best_body:
                    best_body = body
                    tile_m[i], tile_n[i], split_of[i], shape_of[i] = tm, tn, split, shape_eff
                split *= 2
                if not splits or count * split > 2 * units or k / split < _SPLIT_K_MIN_DEPTH:
                    break
    return tile_m, tile_n, split_of, shape_of


@numba.njit(cache=True)
def _plain_plan_many(m, n, k, tile_m_max, tile_n_max, units, k_half):
    """The older model's tile, split-K depth (the reduction is cut when the output's tiles
    alone cannot fill the device, as cuBLAS and CUTLASS split-K / stream-K do) and shape
    efficiency (the busy share of the units over the waves) for each of the rows ``m``."""
    size = m.size
    tile_m, tile_n = np.empty(size, np.int64), np.empty(size, np.int64)
    split_of, shape_of = np.empty(size, np.int64), np.empty(size)
    tn = _tile(n, tile_n_max, 32)
    for i in range(size):
        tm = _tile(m[i], tile_m_max, 16)
        count = math.ceil(m[i] / tm) * math.ceil(n / tn)
        split = 1 if count >= units else max(1, min(units // count, k // _SPLIT_K_MIN_DEPTH))
        depth = k / split
        work = count * split
        tile_m[i], tile_n[i], split_of[i] = tm, tn, split
        shape_of[i] = work / (math.ceil(work / units) * units) * (depth / (depth + k_half))
    return tile_m, tile_n, split_of, shape_of


def _plans(device, m: np.ndarray, n: int, k: int, flops: np.ndarray, bytes_moved: np.ndarray, rate: float,
           variant: str, dtype: str, out_bytes: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(tile_m, tile_n, split, shape efficiency)`` arrays for the rows ``m``: :func:`plan`
    with a ``gemm_tiles`` list, else the older one-tile model."""
    eff = device.efficiency
    if not eff.gemm_tiles:
        return _plain_plan_many(m, n, k, eff.tile_m, eff.tile_n, device.compute_units, float(eff.k_half))
    step = eff.k_step.get(variant, eff.k_step.get(dtype, 0.0))
    splits = variant not in eff.no_split_k and dtype not in eff.no_split_k
    return _plan_many(m, n, k, flops, bytes_moved, rate, np.array(eff.gemm_tiles, dtype=np.int64), device.compute_units,
                      device.memory.bandwidth * eff.memory, float(eff.k_half), float(eff.memory_latency),
                      float(eff.roofline_p), float(eff.tile_overhead), float(step), splits, device.launch_overhead,
                      float(out_bytes))


def plan(device, m: int, n: int, k: int, flops: float, bytes_moved: float, rate: float,
         variant: str = "bf16", dtype: str = "bf16", out_bytes: float = 2.0) -> tuple[int, int, int, float]:
    """``(tile_m, tile_n, split, shape efficiency)`` of the fastest ``gemm_tiles`` tile and
    split-K depth for a GEMM of ``flops`` FLOP and ``bytes_moved`` bytes, ``rate`` FLOP/s being
    its large-GEMM rate: each candidate is timed by the device's roofline. A split reduction
    writes fp32 partial sums, which a second kernel reads and reduces into the ``out_bytes``
    output (cuBLAS's split-K reduce kernel: one more launch, which is why one-tile GEMMs with a
    deep k flatten at about two launches rather than one). A tile takes at least ``k_step`` per
    128-deep step of its share of the reduction, wave after wave."""
    tm, tn, split, shape = _plans(device, np.array([m], dtype=np.int64), n, k, np.array([flops], dtype=np.float64),
                                  np.array([bytes_moved], dtype=np.float64), rate, variant, dtype, out_bytes)
    return int(tm[0]), int(tn[0]), int(split[0]), float(shape[0])


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
    ``m`` may be an array of row counts: the times (and the other fields) are then arrays over
    it, each element what the scalar call gives (kernels only some rows run, such as the pad
    and the split-K reduce, cost nothing on the others).
    """
    many = np.ndim(m) > 0
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
        # rows the kernel cannot take as they are: copied into a padded buffer first
        padded = m % eff.row_align.get(variant, 1) != 0
        if padded.any() if many else padded:
            kernels.append(only_where(elementwise(device, "pad", m * k, "bf16", reads=1, writes=1), padded))
    rows, flops_of, bytes_of = (np.asarray(m, dtype=np.int64).reshape(-1), np.asarray(flops, dtype=np.float64).reshape(-1),
                                np.asarray(bytes_moved, dtype=np.float64).reshape(-1)) if many else \
        (np.array([m], dtype=np.int64), np.array([float(flops)]), np.array([float(bytes_moved)]))
    tile_m, tile_n, split, shape_eff = _plans(device, rows, n, k, flops_of, bytes_of, device.peak_flops(act_dtype) * compute,
                                              variant, act_dtype, dtype_bytes(out_dtype))
    if not many:
        tile_m, tile_n, split, shape_eff = int(tile_m[0]), int(tile_n[0]), int(split[0]), float(shape_eff[0])
    reduced = split > 1
    # fp32 partial sums written here and reduced by a kernel of their own; the older model
    # writes and reads them back inside the GEMM's time
    bytes_moved = bytes_moved + (1 if eff.gemm_tiles else 2) * m * n * 4 * split * reduced
    cost = kernel(device, name, flops, bytes_moved, act_dtype, compute_efficiency=compute * shape_eff)
    info = {"m": m, "n": n, "k": k, "dtype": variant, "split_k": split, "tile": (tile_m, tile_n)}
    cost.info = info
    kernels.append(cost)
    if eff.gemm_tiles and (reduced.any() if many else reduced):
        kernels.append(only_where(kernel(device, "splitk_reduce", m * n * split, m * n * (4 * split + dtype_bytes(out_dtype)),
                                    "fp32", compute_efficiency=1.0), reduced))
    return combine(name, kernels, **info) if len(kernels) > 1 else cost
