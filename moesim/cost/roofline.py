"""The roofline: the time of one kernel from its FLOP and bytes on one device.

A kernel takes ``launch + max(compute, memory)``, where ``compute`` is FLOP over the peak
reached at that shape and ``memory`` is bytes over the bandwidth reached plus a fixed memory
latency. Every efficiency is a field of the device profile (``efficiency:``), so calibrating a
device means editing its YAML, not this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from moesim.dtypes import dtype_bytes

@dataclass
class OpCost:
    """Predicted time of one operator and what bounds it.

    Times are seconds; ``flops`` FLOP and ``bytes`` bytes moved to or from device memory.
    ``parts`` holds the kernels an operator is made of (a MoE layer: router, permute, two
    grouped GEMMs, ...), each an ``OpCost`` itself.
    """

    name: str
    time: float
    compute_time: float = 0.0
    memory_time: float = 0.0
    launch_time: float = 0.0
    comm_time: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    parts: list[OpCost] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def bound(self) -> str:
        """'compute', 'memory', 'communication' or 'launch': the largest of the four terms."""
        terms = {
            "compute": self.compute_time,
            "memory": self.memory_time,
            "communication": self.comm_time,
            "launch": self.launch_time,
        }
        return max(terms, key=terms.get)

    def to_dict(self) -> dict:
        out = {
            "name": self.name,
            "time_s": self.time,
            "compute_s": self.compute_time,
            "memory_s": self.memory_time,
            "launch_s": self.launch_time,
            "comm_s": self.comm_time,
            "flops": self.flops,
            "bytes": self.bytes,
            "bound": self.bound,
        }
        if self.info:
            out["info"] = self.info
        if self.parts:
            out["parts"] = [p.to_dict() for p in self.parts]
        return out


def combine(name: str, parts: list[OpCost], **info) -> OpCost:
    """An operator made of kernels that run one after another."""
    return OpCost(
        name=name,
        time=sum(p.time for p in parts),
        compute_time=sum(p.compute_time for p in parts),
        memory_time=sum(p.memory_time for p in parts),
        launch_time=sum(p.launch_time for p in parts),
        comm_time=sum(p.comm_time for p in parts),
        flops=sum(p.flops for p in parts),
        bytes=sum(p.bytes for p in parts),
        parts=parts,
        info=info,
    )


def only_where(cost: OpCost, where) -> OpCost:
    """``cost`` on the elements ``where`` holds, nothing (no launch either) on the others: for
    arrays of sizes, a kernel that only some of them run (a scalar ``where``: ``cost`` as it is)."""
    if np.ndim(where) == 0:
        return cost
    for name in ("time", "compute_time", "memory_time", "launch_time", "comm_time", "flops", "bytes"):
        value = getattr(cost, name)
        if isinstance(value, np.ndarray) or value:  # (a field that is 0 is 0 everywhere)
            setattr(cost, name, np.where(where, value, 0.0))
    return cost


@numba.njit(inline="always", cache=True)
def roofline(flops: float, bytes_moved: float, rate: float, bandwidth: float, latency: float, p: float):
    """``(compute, memory, body)`` seconds of one kernel: ``flops`` FLOP at ``rate`` FLOP/s and
    ``bytes_moved`` bytes at ``bandwidth`` B/s plus ``latency`` s, overlapped by the softened
    roofline ``(compute^p + memory^p)^(1/p)``; a kernel with only one of the two takes that one."""
    compute = flops / rate if flops > 0 else 0.0
    memory = bytes_moved / bandwidth + latency if bytes_moved > 0 else 0.0
    if compute > 0 and memory > 0:
        # The profiles' corners are whole numbers (2-4): powers by multiplication and a
        # square / cube root cost a fraction of three pow calls (the simulator makes millions).
        if p == 3.0:
            return compute, memory, np.cbrt(compute * compute * compute + memory * memory * memory)
        if p == 2.0:
            return compute, memory, math.sqrt(compute * compute + memory * memory)
        if p == 4.0:
            c2, m2 = compute * compute, memory * memory
            return compute, memory, math.sqrt(math.sqrt(c2 * c2 + m2 * m2))
        return compute, memory, (compute**p + memory**p) ** (1.0 / p)
    return compute, memory, compute + memory


@numba.njit(cache=True)
def _roofline_many(flops, bytes_moved, rate, bandwidth, latency, p):
    compute, memory, body = np.empty(flops.size), np.empty(flops.size), np.empty(flops.size)
    for i in range(flops.size):
        compute[i], memory[i], body[i] = roofline(flops[i], bytes_moved[i], rate[i], bandwidth[i], latency, p)
    return compute, memory, body


def _shape(x) -> tuple:
    # (np.shape of a Python number costs an array: microseconds on every small-array kernel)
    return x.shape if isinstance(x, np.ndarray) else np.shape(x) if isinstance(x, (list, tuple)) else ()


def _filled(x, shape: tuple) -> np.ndarray:
    """``x`` broadcast to ``shape`` as a new float64 array (``np.broadcast_arrays`` and a copy
    cost twice as much on the few-element arrays the simulator passes)."""
    if _shape(x) == shape:
        return np.array(x, dtype=np.float64)
    out = np.empty(shape)
    out[...] = x
    return out


def _scalar(x) -> bool:
    # Python numbers first: np.ndim of one costs a failed attribute look-up and an array
    return isinstance(x, (float, int)) or np.ndim(x) == 0


def kernel(
    device,
    name: str,
    flops: float,
    bytes_moved: float,
    dtype: str = "bf16",
    *,
    compute_efficiency: float | None = None,
    memory_efficiency: float = 1.0,
    launches: int = 1,
) -> OpCost:
    """One kernel's time on ``device`` (an Accelerator or Cpu spec). ``flops``, ``bytes_moved``
    and the efficiencies may be NumPy arrays: the times are then arrays of the same shape.

    ``compute_efficiency`` overrides the device's large-GEMM efficiency for kernels that
    cannot reach it (shape effects are computed by the caller and passed in here);
    ``memory_efficiency`` scales the device's streaming efficiency the same way.
    """
    eff = device.efficiency
    peak = device.peak_flops(dtype)
    c_eff = eff.compute_for(dtype) if compute_efficiency is None else compute_efficiency
    bandwidth = device.memory.bandwidth * eff.memory * memory_efficiency
    launch = launches * device.launch_overhead
    if not all(_scalar(x) for x in (flops, bytes_moved, c_eff, bandwidth)):
        # Arrays: one kernel per element (the simulator costs every rank of a step at once).
        shape = np.broadcast_shapes(*(_shape(x) for x in (flops, bytes_moved, c_eff, bandwidth)))
        flops, bytes_moved, rate, bandwidth = (_filled(x, shape) for x in (flops, bytes_moved, peak * c_eff, bandwidth))
        compute, memory, body = _roofline_many(flops.ravel(), bytes_moved.ravel(), rate.ravel(), bandwidth.ravel(),
                                               float(eff.memory_latency), float(eff.roofline_p))
        compute, memory, body = (x.reshape(flops.shape) for x in (compute, memory, body))
    else:
        compute, memory, body = roofline(float(flops), float(bytes_moved), float(peak * c_eff), float(bandwidth),
                                         float(eff.memory_latency), float(eff.roofline_p))
    return OpCost(
        name=name,
        time=launch + body,
        compute_time=compute,
        memory_time=memory,
        launch_time=launch,
        flops=flops,
        bytes=bytes_moved,
    )


def elementwise(device, name: str, elements: float, dtype: str = "bf16", *, reads: int = 1, writes: int = 1, flops_per_element: float = 1.0) -> OpCost:
    """A memory-bound kernel (norm, activation, residual add, copy) over ``elements`` values
    read ``reads`` times and written ``writes`` times."""
    # Vector units, not tensor cores, do this arithmetic: rate it at the fp32 peak.
    bytes_moved = elements * dtype_bytes(dtype) * (reads + writes)
    return kernel(device, name, elements * flops_per_element, bytes_moved, "fp32", compute_efficiency=1.0)
