"""The scenario schema (pydantic) and loading a scenario by name or path.

A scenario names a model (preset or config.json path), a cluster profile, a parallel layout,
a workload and the dtypes. Bundled scenarios live in ``scenarios/`` and are found by name.
"""

from __future__ import annotations

from pathlib import Path

from typing import Annotated, Literal

import numpy as np

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from moesim.errors import InputError, UnknownNameError, from_validation
from moesim.files import data_dir, load_yaml
from moesim.units import bytes_, seconds
from moesim.sim.workload import Requests, arrival_times, draw_lengths, read_arrival_trace


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parallel(_Strict):
    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    dp: int | None = Field(None, ge=1)
    pp: int = Field(1, ge=1)
    expert_tp: int | None = Field(None, ge=1)


class Lengths(_Strict):
    """Token lengths drawn per request: lognormal with this mean and coefficient of variation,
    rounded and clipped to [1, ``max``]."""

    mean: float = Field(gt=0, description="mean tokens")
    cv: float = Field(1.0, ge=0, description="standard deviation / mean (0: every request gets the mean)")
    max: int = Field(ge=1, description="longest request, tokens")


class WorkloadSpec(_Strict):
    """Requests: a fixed batch all present at time 0 (``arrivals: batch``), an open-loop arrival
    process (``poisson``, or ``gamma`` with inter-arrival coefficient of variation ``cv``: bursty
    when above 1), or a recorded ``trace`` CSV with columns arrival_s, prompt_tokens,
    output_tokens."""

    arrivals: Literal["batch", "poisson", "gamma", "trace"] = "batch"
    batch: int | None = Field(None, ge=1, description="batch arrivals: concurrent sequences, all DP replicas together")
    prompt: int | Lengths | None = Field(None, description="prompt tokens per request (a number or a distribution)")
    output: int | Lengths | None = Field(None, description="generated tokens per request (a number or a distribution)")
    rate: float | None = Field(None, gt=0, description="poisson / gamma: mean requests per second")
    cv: float = Field(1.0, gt=0, description="gamma: coefficient of variation of the inter-arrival time")
    requests: int | None = Field(None, ge=1, description="poisson / gamma: number of requests")
    trace: str | None = Field(None, description="trace: CSV path, relative to the scenario file")

    @model_validator(mode="after")
    def _complete(self):
        need = {"batch": ("batch", "prompt", "output"), "poisson": ("rate", "requests", "prompt", "output"),
                "gamma": ("rate", "requests", "prompt", "output"), "trace": ("trace",)}[self.arrivals]
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ValueError(f"arrivals '{self.arrivals}' needs {', '.join(missing)}")
        return self

    def make_requests(self, seed: int, base_dir: str | Path = ".") -> Requests:
        """The request stream; a trace path is relative to ``base_dir`` (the scenario's folder)."""
        if self.arrivals == "trace":
            trace = Path(self.trace)
            return read_arrival_trace(trace if trace.is_absolute() else Path(base_dir) / trace)
        rng = np.random.default_rng([seed, 0x5E55])
        n = self.batch if self.arrivals == "batch" else self.requests
        arrival = arrival_times(self.arrivals, n, rng, rate=self.rate, cv=self.cv)

        def lengths(spec: int | Lengths) -> np.ndarray:
            if isinstance(spec, int):
                return np.full(n, spec, dtype=np.int64)
            return draw_lengths(n, spec.mean, spec.cv, spec.max, rng)

        return Requests(arrival=arrival, prompt=lengths(self.prompt), output=lengths(self.output))

    def mean_lengths(self) -> tuple[int, int]:
        """Mean prompt and output tokens (the analytical estimate's shape)."""
        def mean(value) -> int:
            return int(round(value.mean)) if isinstance(value, Lengths) else int(value)
        if self.prompt is None or self.output is None:
            raise ValueError("the workload gives no prompt / output lengths (a trace workload)")
        return mean(self.prompt), mean(self.output)


class Routing(_Strict):
    distribution: str = Field("balanced", description="balanced, power_law:ALPHA, profile (the model's fitted routing "
                                                      "profile; simulate only) or a .npz trace path")
    seed: int = Field(0, ge=0, description="seeds routing draws and the request stream")
    level: Literal["count", "token"] = Field("count", description="simulate: count-level loads per step, or the exact "
                                                                  "choices of every token (profile routing)")
    profile: str | None = Field(None, description="simulate with distribution: profile: a preset's profile name or a "
                                                  "profile YAML (default: the model's own)")


class Dtypes(_Strict):
    weights: str | None = Field(None, description="default: the checkpoint's (fp32 checkpoints in bf16)")
    experts: str | None = None
    kv_cache: str | None = None


class Scheduler(_Strict):
    """Continuous batching per DP replica (vLLM / SGLang semantics)."""

    max_running: int = Field(256, ge=1, description="sequences running at once per DP replica (max_num_seqs)")
    max_batched_tokens: int = Field(8192, ge=1, description="new tokens per step per replica: the chunked-prefill budget")
    chunked_prefill: bool = Field(True, description="false: steps are either whole prompts or decodes")
    block_size: int = Field(16, ge=1, description="KV-cache block (page) size, tokens")
    kv_memory_fraction: float = Field(0.9, gt=0, le=1, description="share of device memory the engine may use "
                                                                    "(gpu_memory_utilization / mem_fraction_static)")


class Policies(_Strict):
    overlap: Literal["none", "shared_expert", "two_microbatch"] = "none"
    dispatch: Literal["static", "capacity", "reroute", "least_loaded"] = "static"
    capacity_factor: float = Field(1.25, gt=0, description="capacity / reroute: slots per physical expert over the mean")
    tolerance: float = Field(0.1, ge=0, description="least_loaded: rank load allowed above the mean before slots move")
    all_to_all: Literal["auto", "flat", "hierarchical"] = Field("auto", description="auto: hierarchical across nodes")


class Disaggregation(_Strict):
    """Prefill and decode on separate device groups: prefill on the cluster's first devices,
    decode on the next; KV caches cross the network between them."""

    prefill: Parallel
    decode: Parallel


class Offload(_Strict):
    """Expert offloading on one GPU (docs/offloading.md): the routed experts live in host DRAM
    (and on the SSD when DRAM is short), HBM keeps ``cache_experts`` slots per MoE layer (or
    ``cache_memory`` bytes of them; neither: all HBM the KV cache leaves). Policy names are
    found in moesim.sim.cache.RESIDENCY, moesim.sim.prefetch.PREFETCH and moesim.sim.miss.ON_MISS."""

    residency: str = Field("lru", description="static, lru, lfu or belady (oracle)")
    scope: Literal["layer", "global", "layers"] = Field("layer", description="static: the most popular experts of each "
                                                        "layer, of the whole model, or whole layers (llama.cpp --n-cpu-moe)")
    cache_experts: int | None = Field(None, ge=0, description="HBM expert slots per MoE layer")
    pinned: list[list[Annotated[int, Field(ge=0)]]] | None = Field(
        None, description="static: the experts kept in HBM, one list of expert ids per MoE layer (as moesim plan offload "
                          "chooses them); sizes the expert slots instead of cache_experts / cache_memory")
    cache_memory: Annotated[float, BeforeValidator(bytes_)] | None = Field(
        None, ge=0, description="HBM for the expert slots, e.g. '8 GiB' (instead of cache_experts)")
    prefetch: str = Field("none", description="none, pregated, speculative, affinity or activation")
    top_n: int | None = Field(None, ge=1, description="prefetch guesses per token (default: the model's top-k)")
    accuracy: float = Field(1.0, ge=0, le=1, description="pregated / speculative: chance a used expert is predicted")
    profile_tokens: int = Field(4096, ge=1, description="affinity: trace tokens the affinity is measured on")
    on_miss: str = Field("wait", description="wait, low_precision, cpu or hybrid")
    low_precision_dtype: str = Field("int2", description="low_precision: the dtype of the copies loaded on a miss")
    host_memory: Literal["pinned", "pageable"] = Field("pinned", description="host copies of the experts: pinned "
                                                                                "(cudaHostAlloc) or pageable")
    cpu_sockets: int | None = Field(None, ge=1, description="CPU sockets running experts (default: all of the node)")
    reserve: Annotated[float, BeforeValidator(bytes_)] = Field(
        2**30, ge=0, description="HBM the framework keeps (CUDA context, allocator slack), bytes")
    layer_overhead: Annotated[float, BeforeValidator(seconds)] = Field(
        0.0, ge=0, description="host-side time per MoE layer per step outside the kernels (an eager framework's "
                               "Python and launches; 0 for engines that launch back to back), e.g. '5 ms'")


class Outputs(_Strict):
    perfetto: bool = Field(True, description="write trace.json (ui.perfetto.dev)")
    figures: bool = Field(True, description="write PNG figures")
    timeline_steps: list[int] = Field([1], description="steps recorded layer by layer for the timeline")


class Scenario(_Strict):
    name: str
    description: str = ""
    model: str
    cluster: str
    parallel: Parallel = Parallel()
    placement: str = Field("contiguous", description="contiguous, round_robin, or a placement file "
                                                     "(physical_to_logical_map, as SGLang's --init-expert-location)")
    workload: WorkloadSpec
    routing: Routing = Routing()
    dtypes: Dtypes = Dtypes()
    scheduler: Scheduler = Scheduler()
    policies: Policies = Policies()
    disaggregation: Disaggregation | None = None
    offload: Offload | None = None
    plan: str | None = Field(None, description="a plan file written by moesim plan; its decision replaces placement "
                                               "(placement plan), parallel and scheduler (layout plan) or offload "
                                               "(offload plan)")
    outputs: Outputs = Outputs()


def bundled_scenarios() -> dict[str, Path]:
    """Name -> path of the scenarios shipped with moesim."""
    return {p.stem: p for p in sorted(data_dir("scenarios").glob("*.yaml"))}


def load_scenario(name_or_path: str) -> tuple[Scenario, Path]:
    """A scenario from a YAML path, or a bundled one by name."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        known = bundled_scenarios()
        if name_or_path not in known:
            raise UnknownNameError("scenario", name_or_path, known, field="--scenario")
        path = known[name_or_path]
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise InputError("expected a mapping of fields at the top level", source=str(path))
    try:
        return Scenario.model_validate(raw), path
    except ValidationError as exc:
        raise from_validation(exc, str(path)) from None
