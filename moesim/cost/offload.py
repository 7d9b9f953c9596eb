"""Costs of expert offloading: moving weights between memory tiers, and experts on the CPU.

Tiers are a GPU's HBM, the host's DRAM and an NVMe SSD. Weights reach HBM over the GPU's PCIe
link on its copy engines (one per direction): from pinned host memory at the measured DMA rate,
from pageable memory at the lower rate of a copy staged through a pinned bounce buffer (the link
profile's ``h2d_pinned`` / ``h2d_pageable``). When both directions carry data at once each keeps
``duplex_efficiency`` of its rate (the link profile's measured figure). Weights on the SSD first
cross the NVMe link into DRAM, pipelined with the PCIe copy.

An expert run on the CPU (kTransformers, Fiddler, llama.cpp's ``--n-cpu-moe``) is a roofline
kernel on the host: its weights stream from DRAM at the sockets' bandwidth, its FLOP run at the
best of the matrix engine (AMX) and the vector units (AVX-512 / AVX2) for the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from moesim.cost.roofline import kernel
from moesim.dtypes import canonical_dtype, weight_bytes_per_param
from moesim.hardware.specs import Cpu, Link, Ssd


@dataclass(frozen=True)
class HostLink:
    """The PCIe path between a GPU and its host: ``h2d`` / ``d2h`` bytes/s for the chosen host
    memory kind, ``latency`` s per copy, ``duplex`` the share of its rate each direction keeps
    while the other runs."""

    h2d: float
    d2h: float
    latency: float
    duplex: float


def host_link(link: Link, memory: str = "pinned") -> HostLink:
    """The copy rates of ``link`` for ``pinned`` or ``pageable`` host memory. A link without
    measured copy rates runs at its bandwidth times its efficiency; pageable copies without a
    figure of their own at half the pinned rate (CUDA C++ Best Practices Guide, "Pinned Memory":
    pageable copies stage through a pinned buffer)."""
    if memory not in ("pinned", "pageable"):
        raise ValueError(f"host memory must be pinned or pageable, not {memory!r}")
    rate = link.bandwidth * link.efficiency
    h2d = link.h2d_pinned or rate
    d2h = link.d2h_pinned or rate
    if memory == "pageable":
        h2d = link.h2d_pageable or h2d / 2
        d2h = link.d2h_pageable or d2h / 2
    return HostLink(h2d=h2d, d2h=d2h, latency=link.latency, duplex=link.duplex_efficiency)


def ssd_read_rate(ssd: Ssd, link: Link) -> tuple[float, float]:
    """Bytes/s and latency (s) of reading weights from ``ssd`` over ``link`` into DRAM."""
    return min(ssd.read_bandwidth, link.bandwidth * link.efficiency), ssd.latency + link.latency


@numba.njit(cache=True)
def two_flows(a_bytes: float, b_bytes: float, a_rate: float, b_rate: float, duplex: float) -> tuple[float, float]:
    """Seconds until each of two transfers that start together in opposite directions of one
    link is done: both run at ``duplex`` times their rate while both run, then the survivor
    at its full rate (the fluid model of a full-duplex link whose directions contend)."""
    if a_bytes <= 0 or b_bytes <= 0:
        return (a_bytes / a_rate if a_bytes > 0 else 0.0), (b_bytes / b_rate if b_bytes > 0 else 0.0)
    ta, tb = a_bytes / (a_rate * duplex), b_bytes / (b_rate * duplex)
    if ta <= tb:
        return ta, ta + (b_bytes - ta * b_rate * duplex) / b_rate
    return tb + (a_bytes - tb * a_rate * duplex) / a_rate, tb


def expert_params(hidden: int, inter: int, gated: bool) -> int:
    """Weights of one routed expert: gate, up and down projections (no gate when not gated)."""
    return (3 if gated else 2) * hidden * inter


def expert_bytes(hidden: int, inter: int, gated: bool, dtype: str) -> float:
    """Bytes one expert's weights take in ``dtype``, block scales included."""
    return expert_params(hidden, inter, gated) * weight_bytes_per_param(dtype)


def host_cpu(cpu: Cpu, sockets: int) -> Cpu:
    """One CPU spec standing for ``sockets`` sockets working on one expert together: their
    FLOP/s and DRAM bandwidth add up (weights are split over the NUMA nodes, each socket
    streaming its own share, as kTransformers' dual-socket mode does)."""
    if sockets == 1:
        return cpu
    scale = {k: v * sockets for k, v in cpu.flops.items()}
    matrix = {k: v * sockets for k, v in cpu.matrix_flops.items()}
    memory = cpu.memory.model_copy(update={"bandwidth": cpu.memory.bandwidth * sockets,
                                           "capacity": cpu.memory.capacity * sockets})
    return cpu.model_copy(update={"flops": scale, "matrix_flops": matrix, "memory": memory, "cores": cpu.cores * sockets})


def cpu_expert_times(cpu: Cpu, rows: np.ndarray, *, hidden: int, inter: int, dtype: str, gated: bool = True,
                     ssd_rate: np.ndarray | float | None = None) -> np.ndarray:
    """Seconds the host ``cpu`` takes for the experts of ``rows`` (``[..., experts]`` tokens per
    expert, 0 = not run), summed over the last axis: the experts run one after another, each
    using every core. Each expert reads its weights once (``dtype``, scales included) and its
    rows' activations (bf16); where ``ssd_rate`` (bytes/s, per expert or one figure) is given
    the weights stream from the SSD instead and the read takes at least bytes / ssd_rate."""
    rows = np.asarray(rows, dtype=np.float64)
    wbytes = expert_bytes(hidden, inter, gated, dtype)
    flops = 2.0 * rows * expert_params(hidden, inter, gated)
    act = rows * (2 * hidden + (2 if gated else 1) * inter) * 2.0
    name = canonical_dtype(dtype)
    # Quantised weights are dequantised into the matrix engine's int8 / bf16 tiles (kTransformers'
    # AMX kernels, llama.cpp's Q4_K x Q8_K dot products): rate them at the int8 peak where the CPU
    # has one, else at bf16 / fp32.
    compute_dtype = name if name in ("bf16", "fp16", "fp32", "int8", "fp8") else "int8"
    eff = cpu.efficiency
    # the profile's MoE-kernel efficiencies, as the GPU's grouped GEMMs read theirs
    cost = kernel(cpu, "cpu_expert", flops, np.where(rows > 0, wbytes + act, 0.0), compute_dtype,
                  compute_efficiency=eff.moe_compute_for(dtype.lower(), name),
                  memory_efficiency=eff.moe_memory_for(dtype.lower(), name))
    seconds = np.where(rows > 0, cost.time, 0.0)
    if ssd_rate is not None:
        seconds = np.where(rows > 0, np.maximum(seconds, wbytes / np.asarray(ssd_rate, dtype=np.float64)), 0.0)
    return seconds.sum(axis=-1)
