"""The scenario schema (pydantic) and loading a scenario by name or path.

A scenario names a model (preset or config.json path), a cluster profile, a parallel layout,
a workload and the dtypes. Bundled scenarios live in ``scenarios/`` and are found by name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moesim.errors import InputError, UnknownNameError, from_validation
from moesim.files import data_dir, load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parallel(_Strict):
    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    dp: int | None = Field(None, ge=1)
    pp: int = Field(1, ge=1)
    expert_tp: int | None = Field(None, ge=1)


class WorkloadSpec(_Strict):
    batch: int = Field(ge=1, description="concurrent sequences, all DP replicas together")
    prompt: int = Field(ge=1, description="prompt tokens per sequence")
    output: int = Field(ge=1, description="generated tokens per sequence")


class Routing(_Strict):
    distribution: str = Field("balanced", description="balanced, power_law:ALPHA or a .npz trace path")
    seed: int = Field(0, ge=0)


class Dtypes(_Strict):
    weights: str | None = Field(None, description="default: the checkpoint's (fp32 checkpoints in bf16)")
    experts: str | None = None
    kv_cache: str | None = None


class Scenario(_Strict):
    name: str
    description: str = ""
    model: str
    cluster: str
    parallel: Parallel = Parallel()
    workload: WorkloadSpec
    routing: Routing = Routing()
    dtypes: Dtypes = Dtypes()


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
