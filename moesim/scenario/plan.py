"""Plans and scenarios, both ways: the inputs of the placement planner taken from a scenario, and
a plan file applied to a scenario.

- :func:`placement_setup` reads a scenario's model, cluster, layout and routing into a
  :class:`~moesim.plan.placement.PlacementProblem` (EP ranks are the GPUs, nodes are the cluster
  nodes the EP group spans, loads and co-activation come from a token-level trace generated with
  the scenario's routing profile and seed, or read from a file), checking that the placement can
  exist at all (slots per GPU, expert memory per GPU);
- :func:`plan_placement` runs a planner on it and returns the recommendation that ``moesim plan
  placement`` writes: the decision (docs/planning.md, "The plan file"), the figures of the plan
  and of EPLB's two policies on the same loads, the inputs' fingerprints and the solver's status;
- :func:`apply_plan` makes a scenario run a plan: a placement plan becomes its expert placement,
  a layout plan its parallel layout and batch limits, an offload plan its offload policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.cost.estimate import FRAMEWORK_RESERVE, Workload, default_dtypes, memory_per_device
from moesim.cost.layout import Layout, make_layout
from moesim.cost.moe import expert_times
from moesim.dtypes import canonical_dtype, dtype_bytes, weight_bytes_per_param
from moesim.errors import InputError, MoesimError, UnknownNameError
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, topology
from moesim.models.arch import ModelArch
from moesim.models.presets import load_model
from moesim.plan.placement import PlacementPlan, PlacementProblem, equal_weights, evaluate, planners
from moesim.plan.recommend import Recommendation, fingerprint, read_plan
from moesim.routing.formats import read_trace
from moesim.routing.generate import generate_tokens
from moesim.routing.trace import tokens_per_expert
from moesim.scenario.schema import Offload, Parallel, Scenario
from moesim.sim.placement import read_placement

# the plans a placement is compared with in every placement recommendation
BASELINES = ("eplb_hierarchical", "eplb_global")


@dataclass
class PlacementSetup:
    """Everything a placement is planned and scored from. ``step_tokens``: tokens of the decode
    step the expert time is costed for (``max_running`` sequences on every DP replica)."""

    scenario: Scenario
    arch: ModelArch
    layout: Layout
    device: object
    expert_dtype: str
    problem: PlacementProblem
    inputs: dict
    step_tokens: int
    current_source: str


def placement_setup(scn: Scenario, path: Path, *, redundant: int = 0, tokens: int = 4096, trace: str | None = None,
                    current: str | None = None) -> PlacementSetup:
    """The placement problem of a scenario with ``redundant`` extra expert slots in all.

    Routing: a token-level trace of ``tokens`` tokens drawn from the scenario's routing profile
    with its seed, or the ``trace`` file (any format ``moesim trace convert`` reads; a
    count-level one gives loads but no co-activation, so traffic is not scored). ``current``: the
    placement migration is counted from (a plan file or a ``physical_to_logical_map`` file);
    default the engines' start-up layout, slot ``p`` holding expert ``p % experts``."""
    source = str(path)
    try:
        arch = load_model(scn.model)
    except MoesimError as exc:
        raise InputError(exc.message, source=source, field="model") from None
    if not arch.is_moe:
        raise InputError(f"{arch.name} has no routed experts to place", source=source, field="model")
    if scn.disaggregation is not None:
        raise InputError("plan the placement of each group of a disaggregated scenario from a scenario of that group alone",
                         source=source, field="disaggregation")
    try:
        layout = make_layout(arch, **scn.parallel.model_dump())
    except MoesimError as exc:
        raise InputError(exc.message, source=source, field="parallel") from None
    if layout.ep < 2:
        raise InputError("the layout has no expert parallelism (ep: 1): there is nothing to place", source=source,
                         field="parallel.ep")
    if tokens < 1:
        raise InputError(f"must be >= 1, got {tokens}", field="--tokens")
    cluster = catalog.cluster(scn.cluster, field="cluster")
    graph = topology(cluster)
    devices = accelerators(graph)
    if layout.devices > len(devices):
        raise InputError(f"the layout needs {layout.devices} devices; cluster {cluster.name} has {len(devices)}",
                         source=source, field="parallel")
    stage = devices[: layout.stage_devices]
    ep_group = stage[:: layout.expert_tp]
    nodes = len({graph.nodes[d]["node"] for d in ep_group})
    moe = arch.moe
    experts, gpus, slots = moe.num_experts, layout.ep, moe.num_experts + redundant
    if redundant < 0:
        raise InputError(f"{redundant} redundant slots leave {slots} slots for {experts} experts: every expert needs a "
                         "slot (slots >= experts)", field="--redundant")
    if slots % gpus:
        fit = (-experts) % gpus
        raise InputError(f"{experts} experts + {redundant} redundant = {slots} slots do not split evenly over the {gpus} "
                         f"EP ranks (every GPU holds the same number of slots): e.g. --redundant {fit} or {fit + gpus}",
                         field="--redundant")
    weights, expert_default = default_dtypes(arch)
    dtype = scn.dtypes.weights or weights
    expert_dtype = scn.dtypes.experts or (expert_default if dtype == weights else dtype)
    device = graph.nodes[ep_group[0]]["spec"]
    per_expert = (3 if moe.gated else 2) * arch.hidden * moe.expert_inter * weight_bytes_per_param(expert_dtype) / layout.expert_tp
    _check_memory(arch, layout, device, dtype, expert_dtype, scn.dtypes.kv_cache or "bf16", slots, per_expert)
    ids, loads, trace_info = _routing(scn, path, arch, tokens, trace)
    dispatch_bytes = dtype_bytes("fp8" if canonical_dtype(expert_dtype) == "fp8" else "bf16")
    current_map, current_source = _current(current, experts, gpus, len(arch.moe_layers), slots)
    groups = moe.n_group if moe.n_group > 1 and experts % moe.n_group == 0 else 1
    problem = PlacementProblem(loads, gpus=gpus, nodes=nodes, slots=slots, groups=groups, trace=ids, current=current_map,
                               expert_bytes=per_expert, token_bytes=arch.hidden * dispatch_bytes)
    inputs = {
        "scenario": {"name": scn.name, "fingerprint": fingerprint(scn.model_dump(exclude={"plan"}))},
        "model": {"name": arch.name, "fingerprint": fingerprint(dataclasses.asdict(arch))},
        "cluster": {"name": cluster.name, "fingerprint": fingerprint(cluster.model_dump())},
        "layout": layout.to_dict() | {"ep_gpus": gpus, "nodes": nodes, "fingerprint": fingerprint(layout.to_dict(), nodes)},
        "trace": trace_info,
        "current": {"source": current_source, "fingerprint": fingerprint(current_map)},
        "redundant": redundant,
        "seed": scn.routing.seed,
        "dtypes": {"experts": expert_dtype, "dispatch_bytes_per_element": dispatch_bytes},
    }
    step_tokens = scn.scheduler.max_running * layout.dp
    return PlacementSetup(scn, arch, layout, device, expert_dtype, problem, inputs, step_tokens, current_source)


def _check_memory(arch, layout, device, dtype, expert_dtype, kv_dtype, slots, per_expert) -> None:
    """Every GPU's expert slots and the rest of its weights must fit its HBM (the KV cache then
    gets what is left; ``moesim simulate`` checks that part)."""
    budget = memory_per_device(arch, layout, Workload(batch=layout.dp, prompt=1, output=0), device, dtype, expert_dtype, kv_dtype)
    layers = len(arch.moe_layers)
    routed = arch.moe.num_experts / layout.ep * per_expert * layers  # what memory_per_device counts
    slots_bytes = slots // layout.ep * per_expert * layers
    need = budget["weights"] - routed + slots_bytes + FRAMEWORK_RESERVE
    capacity = device.memory.capacity
    if need > capacity:
        gib = 2**30
        raise InputError(f"expert memory: {slots // layout.ep} slots x {layers} layers x {per_expert / 2**20:,.1f} MiB = "
                         f"{slots_bytes / gib:,.1f} GiB of experts per GPU plus {(budget['weights'] - routed) / gib:,.1f} GiB "
                         f"of other weights and {FRAMEWORK_RESERVE / gib:.1f} GiB reserved exceed the "
                         f"{capacity / gib:,.0f} GiB of a {device.name}: fewer redundant slots or more GPUs",
                         field="--redundant")


def _routing(scn: Scenario, path: Path, arch: ModelArch, tokens: int, trace: str | None):
    """Token-level choices (or ``None``), loads ``[layers, experts]`` and the trace's record."""
    experts, layers = arch.moe.num_experts, len(arch.moe_layers)
    if trace is not None:
        read = read_trace(trace)
        if read.num_experts != experts or read.num_layers != layers:
            raise InputError(f"the trace has {read.num_layers} layers x {read.num_experts} experts; {arch.name} has "
                             f"{layers} MoE layers x {experts} experts", source=trace, field="--trace")
        ids = None if read.topk_ids is None else np.asarray(read.topk_ids)
        loads = read.loads().sum(axis=0).astype(np.float64)
        info = {"source": str(trace), "level": read.level, "fingerprint": fingerprint(ids if ids is not None else loads)}
        return ids, loads, info
    from moesim.scenario.build import _profile  # the builder's reading of routing.profile; build imports this module

    profile = _profile(scn, arch, path.parent)
    ids = generate_tokens(profile, tokens, seed=scn.routing.seed)
    info = {"source": f"generated: routing profile {profile.name}", "level": "token", "tokens": tokens,
            "seed": scn.routing.seed, "fingerprint": fingerprint(ids)}
    return ids, tokens_per_expert(ids, experts, ids.shape[0])[0].astype(np.float64), info


def _current(current: str | None, experts: int, gpus: int, layers: int, slots: int) -> tuple[np.ndarray, str]:
    if current is None:
        # SGLang's trivial location and vLLM's initial EPLB layout: slot p holds expert p % experts
        return np.tile(np.arange(slots) % experts, (layers, 1)), "start-up layout (slot p holds expert p % experts)"
    placement = read_placement(current, experts, gpus, layers)
    phy2log = np.broadcast_to(placement.phy2log, (layers, placement.phy2log.shape[1]))
    if phy2log.shape[1] != slots:
        raise InputError(f"the current placement has {phy2log.shape[1]} slots; this plan has {slots}", source=current,
                         field="--current")
    return np.ascontiguousarray(phy2log), str(current)


def make_planner(method: str, time_limit: float | None = None):
    """A planner by name; ``time_limit`` (seconds) goes to the MILP."""
    registry = planners()
    if method not in registry:
        raise UnknownNameError("placement method", method, registry, field="--method")
    if method == "ilp" and time_limit is not None:
        if time_limit <= 0:
            raise InputError(f"must be positive, got {time_limit}", field="--time-limit")
        return registry[method](time_limit=time_limit)
    return registry[method]()


def expert_seconds(setup: PlacementSetup, plan: PlacementPlan) -> float:
    """Seconds the most loaded GPU spends in the routed experts of one MoE layer (mean over
    layers) in a decode step of ``setup.step_tokens`` tokens, by the cost model
    (:func:`moesim.cost.moe.expert_times`): the straggler every EP rank waits for."""
    p = setup.problem
    per_slot = np.take_along_axis(p.loads, plan.phy2log, axis=1) * plan.weight
    scale = setup.step_tokens * setup.arch.moe.top_k / np.maximum(p.loads.sum(axis=1, keepdims=True), 1e-300)
    rows = (per_slot * scale).reshape(p.layers, p.gpus, p.slots_per_gpu)
    moe = setup.arch.moe
    times = expert_times(setup.device, np.rint(rows), hidden=setup.arch.hidden, inter=moe.expert_inter,
                         dtype=setup.expert_dtype, expert_tp=setup.layout.expert_tp, gated=moe.gated)
    return float(times.max(axis=1).mean())


def score(setup: PlacementSetup, plan: PlacementPlan) -> dict:
    """:func:`moesim.plan.placement.evaluate` plus :func:`expert_seconds`."""
    return evaluate(setup.problem, plan) | {"expert_s_per_layer": expert_seconds(setup, plan)}


def placement_decision(setup: PlacementSetup, plan: PlacementPlan) -> dict:
    """The decision of a placement plan (docs/planning.md, "The plan file")."""
    p, lay = setup.problem, setup.layout
    return {"method": plan.method, "layers": p.layers, "experts": p.experts, "slots": p.slots, "gpus": p.gpus,
            "nodes": p.nodes, "layer_ids": [int(i) for i in setup.arch.moe_layers],
            "num_hidden_layers": setup.arch.num_layers,
            "parallel": {"tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep, "expert_tp": lay.expert_tp},
            "phy2log": np.asarray(plan.phy2log, dtype=np.int64).tolist(),
            # 9 digits: replicas' shares still sum to 1 within 1e-8, and the file stays readable
            "weight": np.round(np.asarray(plan.weight, dtype=np.float64), 9).tolist()}


def plan_placement(setup: PlacementSetup, method: str = "ilp", *, time_limit: float | None = None
                   ) -> tuple[Recommendation, dict]:
    """Plan, score the plan, EPLB's two policies and the current placement on the same loads;
    returns the recommendation and every scored plan by name (the plan first)."""
    plan = make_planner(method, time_limit).plan(setup.problem)
    scored = {method: score(setup, plan)}
    for name in BASELINES:
        if name != method:
            scored[name] = score(setup, planners()[name]().plan(setup.problem))
    current = np.asarray(setup.problem.current)
    scored["current"] = score(setup, PlacementPlan("current", current, equal_weights(current, setup.problem.experts)))
    predicted = dict(scored[method]) | {"step_tokens": setup.step_tokens,
                                        "baselines": {k: v for k, v in scored.items() if k != method}}
    # wall time is printed, not stored: the same inputs give the same plan file byte for byte
    solver = {k: v for k, v in plan.solver.items() if k != "seconds"}
    rec = Recommendation("placement", placement_decision(setup, plan), predicted, setup.inputs, solver)
    return rec, scored | {"_seconds": plan.solver.get("seconds")}


# -- applying a plan to a scenario -----------------------------------------------------------------

def apply_plan(scenario: Scenario, path: str | Path, *, base_dir: str | Path = ".") -> Scenario:
    """``scenario`` running the plan file at ``path`` (relative to ``base_dir``): a placement
    plan replaces ``placement``, a layout plan ``parallel`` and the scheduler's ``max_running``
    and ``max_batched_tokens``, an offload plan the ``offload`` fields it decides (and
    ``max_running``). The plan's shapes are checked against the scenario's model and layout."""
    path = Path(path)
    path = path if path.is_absolute() else Path(base_dir) / path
    rec = read_plan(path)
    source = str(path)
    apply = {"placement": _apply_placement, "layout": _apply_layout, "offload": _apply_offload}[rec.kind]
    return apply(scenario, rec, path, source)


def _need(decision: dict, keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in decision]
    if missing:
        raise InputError(f"the decision lacks {', '.join(missing)}", source=source, field="decision")


def _apply_placement(scn: Scenario, rec: Recommendation, path: Path, source: str) -> Scenario:
    d = rec.decision
    _need(d, ("layers", "experts", "slots", "gpus", "phy2log"), source)
    try:
        arch = load_model(scn.model)
    except MoesimError as exc:
        raise InputError(exc.message, source=scn.name, field="model") from None
    if not arch.is_moe:
        raise InputError(f"a placement plan needs a model with routed experts; {arch.name} has none", source=source)
    layers, experts = len(arch.moe_layers), arch.moe.num_experts
    if (d["layers"], d["experts"]) != (layers, experts):
        raise InputError(f"places {d['layers']} layers x {d['experts']} experts; {arch.name} has {layers} MoE layers x "
                         f"{experts} experts", source=source, field="decision.layers")
    groups = [scn.parallel] if scn.disaggregation is None else [scn.disaggregation.prefill, scn.disaggregation.decode]
    if all(parallel.ep == 1 for parallel in groups):
        raise InputError(f"places experts on {d['gpus']} EP ranks; the scenario has no expert parallelism (ep: 1)",
                         source=source, field="decision.gpus")
    for parallel in groups:
        if parallel.ep > 1 and parallel.ep != d["gpus"]:
            raise InputError(f"places experts on {d['gpus']} GPUs; the scenario's EP is {parallel.ep}", source=source,
                             field="decision.gpus")
    if np.shape(d["phy2log"]) != (layers, d["slots"]):
        raise InputError(f"phy2log has shape {np.shape(d['phy2log'])}; expected ({layers}, {d['slots']})", source=source,
                         field="decision.phy2log")
    # the simulator's placement reader takes the plan file as it is (moesim.sim.placement)
    return scn.model_copy(update={"placement": str(path.resolve())})


def _apply_layout(scn: Scenario, rec: Recommendation, path: Path, source: str) -> Scenario:
    d = rec.decision
    _need(d, ("tp", "ep", "pp"), source)
    if scn.disaggregation is not None:
        raise InputError("a layout plan sets one group's layout; the scenario is disaggregated", source=source)
    try:
        parallel = Parallel(**{k: d[k] for k in ("tp", "ep", "dp", "pp", "expert_tp") if d.get(k) is not None})
    except ValueError as exc:
        raise InputError(f"not a valid layout: {exc}", source=source, field="decision") from None
    scheduler = scn.scheduler.model_copy(update={k: int(d[k]) for k in ("max_running", "max_batched_tokens") if d.get(k)})
    return scn.model_copy(update={"parallel": parallel, "scheduler": scheduler})


def _apply_offload(scn: Scenario, rec: Recommendation, path: Path, source: str) -> Scenario:
    d = rec.decision
    fields = {k: v for k, v in d.items() if k in Offload.model_fields}
    if not fields:
        raise InputError(f"the decision sets none of the offload fields ({', '.join(Offload.model_fields)})", source=source,
                         field="decision")
    base = scn.offload.model_dump() if scn.offload is not None else {}
    try:
        offload = Offload.model_validate(base | fields)
    except ValueError as exc:
        raise InputError(f"not a valid offload policy: {exc}", source=source, field="decision") from None
    update = {"offload": offload}
    if d.get("max_running"):
        update["scheduler"] = scn.scheduler.model_copy(update={"max_running": int(d["max_running"])})
    return scn.model_copy(update=update)
