"""From a scenario file to a simulated run: model, cluster, groups, requests, routing.

:func:`build` turns a validated :class:`~moesim.scenario.schema.Scenario` into a
:class:`Simulation` (every object the engine needs, each checked with an error that names the
scenario file and field); :meth:`Simulation.run` runs it and returns the log and its metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path


from moesim.cost.estimate import FRAMEWORK_RESERVE, Workload, default_dtypes, memory_per_device
from moesim.cost.layout import Layout, make_layout
from pydantic import ValidationError

from moesim.errors import InputError, MoesimError, from_validation
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, route, topology
from moesim.models import kv_bytes
from moesim.models.arch import ModelArch
from moesim.models.presets import load_model
from moesim.routing.profile import RoutingProfile, model_profile
from moesim.files import load_yaml
from moesim.scenario.plan import apply_plan
from moesim.scenario.schema import Parallel, Scenario
from moesim.sim.dispatch import DISPATCH
from moesim.sim.engine import GroupConfig, RunLog, run
from moesim.sim.metrics import summarize
from moesim.sim.placement import make_placement
from moesim.sim.routing import routing_source
from moesim.sim.step import StepModel
from moesim.sim.workload import Requests


@dataclass
class Simulation:
    scenario: Scenario
    source: Path
    arch: ModelArch
    cluster: object
    groups: list[GroupConfig]
    requests: Requests
    profile: RoutingProfile | None
    memory: dict[str, dict[str, float]]
    link: tuple[float, float] | None  # disaggregation: KV path bandwidth (B/s) and latency (s)
    offload: Callable | None = None  # expert offloading: makes a fresh (OffloadStepModel, routing source) per run

    def run(self) -> tuple[RunLog, dict]:
        r = self.requests
        scn = self.scenario

        def routing_for(group: GroupConfig):
            if self.profile is None:
                return None
            index = self.groups.index(group)
            return routing_source(scn.routing.distribution, scn.routing.level, self.profile, seed=scn.routing.seed + index,
                                  prompt=r.prompt, output=r.output, base_dir=self.source.parent)

        groups, offloaded = self.groups, None
        if self.offload is not None:
            offloaded, source = self.offload()
            groups = [replace(self.groups[0], model=offloaded)]
            routing_for = lambda group: source  # noqa: E731
        log = run(groups, r.arrival, r.prompt, r.output, routing_for, link=self.link,
                  detail_steps=set(scn.outputs.timeline_steps))
        metrics = summarize(log, self)
        if offloaded is not None:
            metrics["offload"] = offloaded.report(metrics["simulated_s"], metrics["output_tokens"])
        return log, metrics


def _layout(arch: ModelArch, parallel: Parallel, field: str, source: str) -> Layout:
    try:
        return make_layout(arch, **parallel.model_dump())
    except MoesimError as exc:
        raise InputError(exc.message, source=source, field=f"{field}.{(exc.field or '--tp').lstrip('-').replace('-', '_')}") from None


def _profile(scn: Scenario, arch: ModelArch, base: Path) -> RoutingProfile | None:
    if not arch.is_moe:
        return None
    if scn.routing.profile is None:
        return model_profile(arch)
    path = Path(scn.routing.profile)
    path = path if path.is_absolute() else base / path
    if path.suffix in (".yaml", ".yml"):
        fitted = load_yaml(path)
        shape = model_profile(arch).model_dump()
        keys = ("skew", "locality", "affinity", "seq_len", "source", "algorithm", "n_group", "topk_group")
        try:
            return RoutingProfile.model_validate(shape | {k: fitted[k] for k in keys if k in fitted})
        except ValidationError as exc:
            raise from_validation(exc, str(path)) from None
    other = model_profile(load_model(scn.routing.profile))
    own = model_profile(arch)
    return own.model_copy(update={k: getattr(other, k) for k in ("skew", "locality", "affinity", "seq_len", "source")
                                  if not isinstance(getattr(other, k), list)})


def _requests(scn: Scenario, path: Path, requests: int | None) -> Requests:
    """The workload's requests (the first ``requests`` of them when given)."""
    try:
        reqs = scn.workload.make_requests(scn.routing.seed, path.parent)
    except MoesimError as exc:
        raise InputError(exc.message, source=exc.source or str(path), field=exc.field or "workload") from None
    if requests is not None:
        reqs = Requests(reqs.arrival[:requests], reqs.prompt[:requests], reqs.output[:requests])
    return reqs


def build(scn: Scenario, path: Path, *, requests: int | None = None) -> Simulation:
    """Check and assemble everything a scenario's run needs; ``requests`` keeps only the first N."""
    source = str(path)
    if scn.plan is not None:  # relative to the scenario file, as every path in it
        scn = apply_plan(scn, scn.plan, base_dir=path.parent)
    try:
        arch = load_model(scn.model)
    except MoesimError as exc:
        raise InputError(exc.message, source=source, field="model") from None
    cluster = catalog.cluster(scn.cluster, field="cluster")
    graph = topology(cluster)
    devices = accelerators(graph)
    weights, experts = default_dtypes(arch)
    dtype = scn.dtypes.weights or weights
    expert_dtype = scn.dtypes.experts or (experts if dtype == weights else dtype)
    kv_dtype = scn.dtypes.kv_cache or "bf16"
    if scn.offload is not None:
        from moesim.scenario.offload import build_offloaded  # it builds on this module's helpers
        return build_offloaded(scn, path, arch, cluster, dtype=dtype, expert_dtype=expert_dtype, kv_dtype=kv_dtype,
                               requests=requests)
    if scn.disaggregation:
        roles = [("prefill", "prefill", _layout(arch, scn.disaggregation.prefill, "disaggregation.prefill", source)),
                 ("decode", "decode", _layout(arch, scn.disaggregation.decode, "disaggregation.decode", source))]
    else:
        roles = [("serve", "both", _layout(arch, scn.parallel, "parallel", source))]
    needed = sum(layout.devices for _, _, layout in roles)
    if needed > len(devices):
        raise InputError(f"the layout needs {needed} devices; cluster {cluster.name} has {len(devices)}", source=source,
                         field="disaggregation" if scn.disaggregation else "parallel")
    sched, pol = scn.scheduler, scn.policies
    groups, memory, first = [], {}, 0
    for name, role, layout in roles:
        members = devices[first : first + layout.devices]
        first += layout.devices
        placement = None
        if arch.is_moe and layout.ep > 1:
            placement = make_placement(scn.placement, arch.moe.num_experts, layout.ep, len(arch.moe_layers), path.parent)
        dispatch = DISPATCH[pol.dispatch](capacity_factor=pol.capacity_factor, tolerance=pol.tolerance)
        try:
            model = StepModel(arch, cluster, layout, members, dtype=dtype, expert_dtype=expert_dtype, kv_dtype=kv_dtype,
                              placement=placement, dispatch=dispatch, overlap=pol.overlap, all_to_all=pol.all_to_all)
        except MoesimError as exc:
            raise InputError(exc.message, source=source, field=exc.field) from None
        device = model.device
        budget = memory_per_device(arch, layout, Workload(batch=layout.dp, prompt=sched.max_batched_tokens, output=0), device,
                                   dtype, expert_dtype, kv_dtype)
        per_token = memory_per_device(arch, layout, Workload(batch=layout.dp, prompt=1, output=0), device, dtype, expert_dtype,
                                      kv_dtype)["kv_cache"]
        room = device.memory.capacity * sched.kv_memory_fraction - budget["weights"] - budget["activations"] - FRAMEWORK_RESERVE
        blocks = int(room // (per_token * sched.block_size)) if per_token > 0 else 0
        if blocks < 1:
            raise InputError(f"{arch.name} does not fit {layout.devices} x {device.name} with layout {layout.to_dict()}: "
                             f"weights {budget['weights'] / 2**30:.1f} GiB and activations leave no room for the KV cache "
                             f"in {sched.kv_memory_fraction:.0%} of {device.memory.capacity / 2**30:.0f} GiB",
                             source=source, field="parallel" if not scn.disaggregation else f"disaggregation.{role}")
        memory[name] = {"capacity": device.memory.capacity, "weights": budget["weights"], "activations": budget["activations"],
                        "reserved": FRAMEWORK_RESERVE, "kv_per_token": per_token, "kv_blocks": blocks}
        groups.append(GroupConfig(name=name, model=model, role=role, kv_blocks=blocks, block_size=sched.block_size,
                                  max_running=sched.max_running, max_batched_tokens=sched.max_batched_tokens,
                                  chunked_prefill=sched.chunked_prefill, kv_bytes_per_token=kv_bytes(arch, 1, kv_dtype)))
    reqs = _requests(scn, path, requests)
    for group in groups:
        longest = int((reqs.prompt + reqs.output).max())
        if -(-longest // group.block_size) > group.kv_blocks:
            raise InputError(f"the longest request ({longest} tokens) needs more KV cache than a replica of group "
                             f"{group.name} holds ({group.kv_blocks * group.block_size} tokens)", source=source, field="workload")
    link = None
    if scn.disaggregation:
        a, b = groups[0].model.devices[0], groups[1].model.devices[0]
        path_ = route(graph, a, b)
        lanes = min(len(groups[0].model.devices), len(groups[1].model.devices))
        link = (path_.bandwidth * lanes, path_.latency)
    return Simulation(scn, path, arch, cluster, groups, reqs, _profile(scn, arch, path.parent), memory, link)
