"""From a scenario with an ``offload:`` section to a simulated run on one GPU.

Checks the section (policy names, one GPU, token-level routing, sizes against the tiers), lays
the model out over HBM / host DRAM / SSD (:func:`moesim.sim.tiers.plan_tiers`) and returns a
:class:`~moesim.scenario.build.Simulation` whose run builds a fresh
:class:`~moesim.sim.offload.OffloadStepModel` (cache, prefetcher, routing trace) each time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.cost.offload import expert_bytes, host_cpu, host_link, ssd_read_rate
from moesim.dtypes import canonical_dtype
from moesim.errors import InputError, MoesimError, UnknownNameError
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, topology
from moesim.models import kv_bytes
from moesim.routing.trace import tokens_per_expert
from moesim.scenario.schema import Scenario
from moesim.sim.cache import RESIDENCY
from moesim.sim.dispatch import Dispatch
from moesim.sim.engine import GroupConfig
from moesim.sim.miss import ON_MISS
from moesim.sim.offload import FutureUses, OffloadStepModel
from moesim.sim.prefetch import PREFETCH
from moesim.sim.routing import routing_source
from moesim.sim.step import StepModel
from moesim.sim.tiers import plan_tiers


# The hand-set policies of the offloading systems moesim models, as ``offload:`` fields: what the
# benchmark, the cache-size sweep and the offload MILP's check compare. Low-precision copies are
# HQQ 2-bit like the bundled Mixtral experts, so a miss loads the same kind of weights and kernel.
POLICY_PRESETS = {
    "static (popular per layer)": {"residency": "static", "prefetch": "none", "on_miss": "wait"},
    "LRU": {"residency": "lru", "prefetch": "none", "on_miss": "wait"},
    "LFU": {"residency": "lfu", "prefetch": "none", "on_miss": "wait"},
    "Belady (oracle)": {"residency": "belady", "prefetch": "none", "on_miss": "wait"},
    "LRU + pre-gated": {"residency": "lru", "prefetch": "pregated", "accuracy": 1.0, "on_miss": "wait"},
    "LRU + speculative top-2": {"residency": "lru", "prefetch": "speculative", "top_n": 2, "accuracy": 0.8, "on_miss": "wait"},
    "LRU + affinity (Fate-like)": {"residency": "lru", "prefetch": "affinity", "on_miss": "wait"},
    "LRU + activation (MoE-Infinity-like)": {"residency": "lru", "prefetch": "activation", "on_miss": "wait"},
    "LRU + low precision on a miss (HOBBIT-like)": {"residency": "lru", "prefetch": "none", "on_miss": "low_precision",
                                                   "low_precision_dtype": "int2_hqq"},
    "static + CPU on a miss": {"residency": "static", "prefetch": "none", "on_miss": "cpu"},
    "static + hybrid CPU / GPU (Fiddler-like)": {"residency": "static", "scope": "global", "prefetch": "none",
                                                 "on_miss": "hybrid"},
    "LRU + speculative + hybrid (HybriMoE-like)": {"residency": "lru", "prefetch": "speculative", "top_n": 2,
                                                   "accuracy": 0.8, "on_miss": "hybrid"},
    "whole layers (naive)": {"residency": "static", "scope": "layers", "prefetch": "none", "on_miss": "whole_layer"},
}

def _pinned(off, layers: int, experts: int, source: str) -> np.ndarray:
    """``offload.pinned`` as a ``[layers, experts]`` mask, checked against the model."""
    if off.residency != "static":
        raise InputError(f"pinned lists the experts kept in HBM by residency: static, not {off.residency}", source=source,
                         field="offload.pinned")
    if len(off.pinned) != layers:
        raise InputError(f"{len(off.pinned)} lists; the model has {layers} MoE layers", source=source, field="offload.pinned")
    mask = np.zeros((layers, experts), dtype=bool)
    for m, ids in enumerate(off.pinned):
        if any(e >= experts for e in ids):
            raise InputError(f"layer {m} lists expert {max(ids)}; a layer has {experts} experts", source=source,
                             field=f"offload.pinned[{m}]")
        mask[m, ids] = True
    return mask


def build_offloaded(scn: Scenario, path: Path, arch, cluster, *, dtype: str, expert_dtype: str, kv_dtype: str,
                    requests: int | None):
    from moesim.scenario.build import (  # build imports this module lazily
        Simulation,
        _layout,
        _profile,
        _requests,
    )

    source = str(path)
    off = scn.offload
    for field, name, known in (("residency", off.residency, RESIDENCY), ("prefetch", off.prefetch, PREFETCH),
                               ("on_miss", off.on_miss, ON_MISS)):
        if name not in known:
            raise UnknownNameError(f"{field} policy", name, known, source=source, field=f"offload.{field}")
    if off.on_miss == "cpu" and off.residency != "static" and off.prefetch == "none":
        raise InputError(f"on_miss: cpu runs misses on the CPU without copying them, so the {off.residency} cache would "
                         "stay empty; use residency: static, a prefetcher, or on_miss: hybrid", source=source,
                         field="offload.on_miss")
    if not arch.is_moe:
        raise InputError(f"{arch.name} has no routed experts to offload", source=source, field="offload")
    if scn.disaggregation:
        raise InputError("expert offloading runs on one GPU; remove disaggregation", source=source, field="offload")
    layout = _layout(arch, scn.parallel, "parallel", source)
    if layout.devices != 1:
        raise InputError(f"expert offloading runs on one GPU; the layout uses {layout.devices}", source=source,
                         field="parallel")
    if scn.routing.level != "token" or scn.routing.distribution != "profile":
        raise InputError("expert offloading follows every token's experts: set routing.distribution: profile and "
                         "routing.level: token", source=source, field="routing.level")
    low_dtype = None
    if off.on_miss == "low_precision":
        try:
            canonical_dtype(off.low_precision_dtype)
            low_dtype = off.low_precision_dtype.lower()  # a kernel variant (int2_hqq) keeps its name
        except MoesimError as exc:
            raise InputError(exc.message, source=source, field="offload.low_precision_dtype") from None
    graph = topology(cluster)
    device_name = accelerators(graph)[0]
    node = cluster.node
    link = host_link(catalog.link(node.host_link, field="node.host_link"), off.host_memory)
    cpu_spec = catalog.device(node.cpus.device)
    sockets = off.cpu_sockets or node.cpus.count
    if sockets > node.cpus.count:
        raise InputError(f"{sockets} CPU sockets; cluster {cluster.name} has {node.cpus.count}", source=source,
                         field="offload.cpu_sockets")
    cpu = host_cpu(cpu_spec, sockets)
    ssd, ssd_capacity = None, 0.0
    if node.ssds and node.ssd_link:
        drive = catalog.device(node.ssds.device)
        rate, latency = ssd_read_rate(drive, catalog.link(node.ssd_link))
        ssd, ssd_capacity = (rate * node.ssds.count, latency), drive.capacity * node.ssds.count
    reqs = _requests(scn, path, requests)
    profile = _profile(scn, arch, path.parent)
    E, k = arch.moe.num_experts, arch.moe.top_k
    M = len(arch.moe_layers)
    sched = scn.scheduler

    def make_source():
        return routing_source("profile", "token", profile, seed=scn.routing.seed, prompt=reqs.prompt, output=reqs.output)

    trace = make_source()
    popularity = tokens_per_expert(trace.ids, E, trace.ids.shape[0])[0].astype(np.float64)  # uses per (layer, expert)
    device = catalog.device(graph.nodes[device_name]["spec"].name)
    longest = int((reqs.prompt + reqs.output).max())
    slots, cache_memory, pinned = off.cache_experts, off.cache_memory, None
    if off.pinned is not None:  # explicit HBM experts (moesim plan offload): they size the slots
        pinned = _pinned(off, M, E, source)
        one = expert_bytes(arch.hidden, arch.moe.expert_inter, arch.moe.gated, expert_dtype)
        # a hair above the bytes, so the tier plan's floor division gives back the count
        slots, cache_memory = None, float(pinned.sum()) * one * (1 + 1e-12)
    tiers = plan_tiers(arch, dtype=dtype, expert_dtype=expert_dtype, kv_dtype=kv_dtype, low_dtype=low_dtype,
                       hbm_capacity=device.memory.capacity, memory_fraction=sched.kv_memory_fraction, reserve=off.reserve,
                       host_capacity=node.host_memory * cluster.nodes, ssd_capacity=ssd_capacity, slots=slots,
                       cache_memory=cache_memory, prompt_tokens=sched.max_batched_tokens, block_size=sched.block_size,
                       longest_request=longest, popularity=popularity, source=source)
    if tiers.on_ssd.any() and ssd is None:
        raise InputError("the experts do not fit in host DRAM and the cluster has no SSD", source=source, field="cluster")
    try:
        base = StepModel(arch, cluster, layout, [device_name], dtype=dtype, expert_dtype=expert_dtype, kv_dtype=kv_dtype,
                         placement=None, dispatch=Dispatch())
    except MoesimError as exc:
        raise InputError(exc.message, source=source, field=exc.field) from None
    # the rows each request computes: its prompt, then every output token but the last
    end = np.cumsum(reqs.prompt + reqs.output).astype(np.int64) - 1

    def fresh():
        src = make_source()
        residency = RESIDENCY[off.residency](M, E, tiers.slots, popularity, scope=off.scope, budget=tiers.budget,
                                             pinned=pinned)
        prefetch = PREFETCH[off.prefetch](layers=M, experts=E, top_k=k, popularity=popularity, top_n=off.top_n,
                                          accuracy=off.accuracy, seed=scn.routing.seed, trace=src.ids,
                                          profile_tokens=off.profile_tokens)
        future = FutureUses(src.ids, end, E) if off.residency == "belady" else None
        model = OffloadStepModel(base, tiers=tiers, residency=residency, prefetch=prefetch, on_miss=ON_MISS[off.on_miss](),
                                 link=link, ssd=ssd, cpu=cpu, expert_dtype=expert_dtype, low_dtype=low_dtype, routing=src,
                                 future=future, layer_overhead=off.layer_overhead)
        return model, src

    hbm = tiers.hbm
    memory = {"serve": {"capacity": hbm["capacity"],
                        "weights": hbm["non_expert_weights"] + hbm["expert_cache"] + hbm["buffers"],
                        "activations": hbm["activations"], "reserved": hbm["reserved"],
                        "kv_per_token": kv_bytes(arch, 1, kv_dtype), "kv_blocks": tiers.kv_blocks}}
    group = GroupConfig(name="serve", model=base, role="both", kv_blocks=tiers.kv_blocks, block_size=sched.block_size,
                        max_running=sched.max_running, max_batched_tokens=sched.max_batched_tokens,
                        chunked_prefill=sched.chunked_prefill, kv_bytes_per_token=kv_bytes(arch, 1, kv_dtype))
    return Simulation(scn, path, arch, cluster, [group], reqs, profile, memory, None, offload=fresh)
