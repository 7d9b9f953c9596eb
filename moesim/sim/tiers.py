"""Memory tiers of an offloading deployment: what lives in HBM, host DRAM and on the SSD.

One GPU serves the model (the offloading regime: batch-1 or small-batch decoding). HBM holds
the non-expert weights (attention, embeddings, norms, routers, shared experts), the expert slots
of the residency policy, staging buffers for experts in flight, activations, the framework's
reserve and the KV cache (what is left). Host DRAM holds a copy of every routed expert (so an
evicted expert is dropped, never written back), and the low-precision copies a HOBBIT-style miss
policy loads; experts that do not fit in DRAM live on the SSD, the least popular first.

Sizes are bytes. A plan that cannot fit raises an :class:`~moesim.errors.InputError` naming the
scenario field to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.cost.offload import expert_bytes
from moesim.errors import InputError
from moesim.models import kv_bytes
from moesim.models.arch import ModelArch
from moesim.models.counts import activation_bytes, weight_bytes

GIB = 2**30


@dataclass
class TierPlan:
    """Bytes per tier, the expert slots per MoE layer, and where each expert's home copy is."""

    hbm: dict[str, float]
    host: dict[str, float]
    ssd: dict[str, float]
    slots: int  # expert slots per MoE layer in HBM (caches, static per layer)
    budget: int  # experts in HBM in all (static over the whole model or whole layers)
    expert_bytes: float  # one expert, full precision (the scenario's expert dtype)
    low_bytes: float  # one expert's low-precision copy (0 when none is kept)
    on_ssd: np.ndarray  # [moe layers, experts] True where the expert's home copy is on the SSD
    kv_blocks: int

    def to_dict(self) -> dict:
        return {"hbm_bytes": self.hbm, "host_bytes": self.host, "ssd_bytes": self.ssd, "slots_per_layer": self.slots,
                "experts_in_hbm": self.budget, "expert_bytes": self.expert_bytes, "low_precision_expert_bytes": self.low_bytes,
                "experts_on_ssd": int(self.on_ssd.sum()), "kv_blocks": self.kv_blocks}


def plan_tiers(arch: ModelArch, *, dtype: str, expert_dtype: str, kv_dtype: str, low_dtype: str | None,
               hbm_capacity: float, memory_fraction: float, reserve: float, host_capacity: float, ssd_capacity: float,
               slots: int | None, cache_memory: float | None, prompt_tokens: int, block_size: int,
               longest_request: int, popularity: np.ndarray, source: str) -> TierPlan:
    """Lay the model out over the tiers. ``slots`` experts per MoE layer, or ``cache_memory``
    bytes of HBM for the expert slots, or (both ``None``) every byte the KV cache of the
    longest request leaves. ``popularity`` ``[moe layers, experts]`` orders the experts for
    the DRAM / SSD split."""
    moe = arch.moe
    layers = len(arch.moe_layers)
    one = expert_bytes(arch.hidden, moe.expert_inter, moe.gated, expert_dtype)
    low = expert_bytes(arch.hidden, moe.expert_inter, moe.gated, low_dtype) if low_dtype else 0.0
    non_expert = weight_bytes(arch, dtype, expert_dtype)["non_expert"]
    # experts in flight land in staging buffers: a layer's worth of active experts, twice, so one
    # layer's copies can run while the previous layer computes (mixtral-offloading's buffer_size)
    buffers = 2 * moe.top_k * one
    activations = activation_bytes(arch, prompt_tokens, "bf16", logit_tokens=1)
    usable = hbm_capacity * memory_fraction
    fixed = non_expert + buffers + activations + reserve
    kv_token = kv_bytes(arch, 1, kv_dtype)
    kv_needed = kv_token * block_size * -(-longest_request // block_size)
    room = usable - fixed
    if room - kv_needed < 0:
        raise InputError(f"the non-expert weights ({non_expert / GIB:.1f} GiB), staging buffers, activations and reserve "
                         f"leave no HBM for the KV cache of the longest request in {memory_fraction:.0%} of "
                         f"{hbm_capacity / GIB:.1f} GiB", source=source, field="dtypes.weights")
    total = moe.num_experts * layers
    free = room - kv_needed
    if cache_memory is not None and slots is None:
        if cache_memory > free:
            raise InputError(f"an expert cache of {cache_memory / GIB:.2f} GiB does not fit: HBM has {free / GIB:.2f} GiB "
                             f"after the non-expert weights, buffers, activations, reserve and the longest request's KV "
                             f"cache", source=source, field="offload.cache_memory")
        budget = min(int(cache_memory // one), total)
    elif slots is None:
        budget = min(int(free // one), total)
    else:
        if slots > moe.num_experts:
            raise InputError(f"{slots} expert slots per layer; a layer has {moe.num_experts} experts", source=source,
                             field="offload.cache_experts")
        budget = slots * layers
        if budget * one > free:
            raise InputError(f"{slots} experts per layer x {layers} layers ({budget * one / GIB:.2f} GiB) do not fit: HBM "
                             f"has {free / GIB:.2f} GiB after the non-expert weights, buffers, activations, reserve and "
                             f"the longest request's KV cache (at most {int(free // (one * layers))} per layer)",
                             source=source, field="offload.cache_experts")
    slots = min(budget // layers, moe.num_experts)
    cache = budget * one
    kv_room = room - cache
    blocks = int(kv_room // (kv_token * block_size)) if kv_token > 0 else 0
    # Host DRAM: every expert's home copy, most popular first, and the low-precision copies; the
    # rest goes to the SSD.
    per_expert_host = one + low
    in_dram = int(min(total, host_capacity // per_expert_host)) if per_expert_host else total
    order = np.argsort(-popularity.ravel(), kind="stable")
    on_ssd = np.ones(total, dtype=bool)
    on_ssd[order[:in_dram]] = False
    on_ssd = on_ssd.reshape(layers, moe.num_experts)
    spilled = int(on_ssd.sum())
    if spilled and spilled * per_expert_host > ssd_capacity:
        raise InputError(f"{spilled} experts ({spilled * per_expert_host / GIB:.0f} GiB) do not fit in host DRAM "
                         f"({host_capacity / GIB:.0f} GiB) and the cluster's SSDs hold {ssd_capacity / GIB:.0f} GiB",
                         source=source, field="cluster")
    hbm = {"capacity": hbm_capacity, "non_expert_weights": non_expert, "expert_cache": cache, "buffers": buffers,
           "activations": activations, "reserved": reserve, "kv_cache": blocks * block_size * kv_token}
    host = {"capacity": host_capacity, "experts": (total - spilled) * one, "low_precision_experts": (total - spilled) * low}
    ssd = {"capacity": ssd_capacity, "experts": spilled * per_expert_host}
    return TierPlan(hbm, host, ssd, slots, budget, one, low, on_ssd, blocks)
