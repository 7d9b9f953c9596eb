"""Miss policies: what a layer does with an expert that is not in HBM when its tokens need it.

Each policy splits a step's misses ``[layers, experts]`` into experts copied to the GPU in full
precision, copied as a low-precision copy, or run on the host CPU. Found by name in
:data:`ON_MISS`:

- ``wait``: copy the full-precision expert and wait for it (mixtral-offloading, MoE-Infinity).
- ``low_precision``: HOBBIT-like: copy the expert's low-precision copy (``low_precision_dtype``,
  a fraction of the bytes) and compute with it; it stays in the slot until evicted or replaced
  by a prefetched full-precision copy.
- ``cpu``: run the missing expert on the CPU where its weights already are (kTransformers,
  llama.cpp's ``--n-cpu-moe``): the tokens' activations go down, the outputs come back.
- ``whole_layer``: naive offloading (Hugging Face accelerate's ``device_map``, the baseline of
  mixtral-offloading): a layer with a missing expert has every expert not in HBM copied, the
  whole MoE block, used or not.
- ``hybrid``: Fiddler / HybriMoE: per layer, each missing expert goes where it finishes first,
  the CPU (its compute time) or the GPU (its copy then its compute), filling both queues
  greedily from the expert with the most tokens; a decode step's single tokens usually run on
  the CPU, a prompt's many tokens on the GPU.
"""

from __future__ import annotations

import numba
import numpy as np


class OnMiss:
    name = "wait"
    uses_cpu = False

    def split(self, miss: np.ndarray, resident: np.ndarray, cpu_seconds: np.ndarray,
              gpu_seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(full, low, cpu)`` masks over ``[layers, experts]`` of the experts to copy in full
        or low precision and to run on the CPU. ``resident``: the experts in HBM;
        ``cpu_seconds`` and ``gpu_seconds`` are each missing expert's time on the CPU, and its
        copy plus compute on the GPU."""
        none = np.zeros_like(miss)
        return miss, none, none


class LowPrecision(OnMiss):
    name = "low_precision"

    def split(self, miss, resident, cpu_seconds, gpu_seconds):
        none = np.zeros_like(miss)
        return none, miss, none


class OnCpu(OnMiss):
    name = "cpu"
    uses_cpu = True

    def split(self, miss, resident, cpu_seconds, gpu_seconds):
        none = np.zeros_like(miss)
        return none, none, miss


class WholeLayer(OnMiss):
    name = "whole_layer"

    def split(self, miss, resident, cpu_seconds, gpu_seconds):
        none = np.zeros_like(miss)
        return miss.any(axis=1, keepdims=True) & ~resident, none, none


@numba.njit(cache=True)
def _greedy(miss, cpu_seconds, gpu_seconds):
    M, E = miss.shape
    on_cpu = np.zeros((M, E), dtype=np.bool_)
    for m in range(M):
        order = np.argsort(-cpu_seconds[m])
        cpu_busy = 0.0
        gpu_busy = 0.0
        for e in order:
            if not miss[m, e]:
                continue
            if cpu_busy + cpu_seconds[m, e] <= gpu_busy + gpu_seconds[m, e]:
                cpu_busy += cpu_seconds[m, e]
                on_cpu[m, e] = True
            else:
                gpu_busy += gpu_seconds[m, e]
    return on_cpu


class Hybrid(OnMiss):
    name = "hybrid"
    uses_cpu = True

    def split(self, miss, resident, cpu_seconds, gpu_seconds):
        on_cpu = _greedy(miss, cpu_seconds, gpu_seconds)
        return miss & ~on_cpu, np.zeros_like(miss), on_cpu


ON_MISS = {cls.name: cls for cls in (OnMiss, LowPrecision, OnCpu, WholeLayer, Hybrid)}
