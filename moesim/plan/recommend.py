"""A recommendation: what a planner decided, what the cost model predicts for it, what it was
computed from, and how far the solver's answer may be from the best.

Every ``moesim plan`` command writes one as ``plan.yaml`` (schema in docs/planning.md, "The plan
file"); a scenario can name such a file and ``moesim simulate`` then runs the decision. The
``inputs`` record carries a fingerprint of each input (model, cluster, trace, workload), so a
plan read back can be checked against the scenario it is applied to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from moesim import __version__
from moesim.errors import InputError, from_validation
from moesim.files import atomic_write, load_yaml

KINDS = ("placement", "layout", "offload")
SCHEMA_VERSION = 1


@dataclass
class Recommendation:
    """``kind``: one of :data:`KINDS`. ``decision``: what to deploy (plain YAML values; arrays as
    nested lists). ``predicted``: the figures the cost model or simulator gives for it, with their
    units in the key (``tpot_s``, ``tokens_per_s``, ``imbalance``). ``inputs``: what the plan was
    computed from, each entry with a ``fingerprint`` (:func:`fingerprint`). ``solver``: ``name``,
    ``status``, ``objective``, ``bound``, ``gap`` (relative, 0 = proven optimal), ``seconds``;
    empty for a plan no solver made."""

    kind: str
    decision: dict
    predicted: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)


class _PlanFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    kind: Literal["placement", "layout", "offload"]
    moesim_version: str
    decision: dict[str, Any]
    predicted: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    solver: dict[str, Any] = {}


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of arrays, dicts, strings and numbers (``sha256:`` and 16 hex digits):
    the same inputs give the same fingerprint on every machine."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        else:
            digest.update(json.dumps(_plain(part), sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """NumPy values and arrays to plain Python, recursively, for YAML and JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Dumper(yaml.SafeDumper):
    """Lists of numbers on one line each (a ``phy2log`` row stays one row), the rest block style."""


def _represent_list(dumper, data):
    flow = all(isinstance(v, (int, float, str, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def write_plan(path: str | Path, rec: Recommendation) -> Path:
    """Write ``rec`` as a plan file, atomically; returns the path."""
    if rec.kind not in KINDS:
        raise ValueError(f"unknown recommendation kind {rec.kind!r}")
    # no timestamp: the same inputs give the same file, byte for byte
    body = {"schema_version": SCHEMA_VERSION, "moesim_version": __version__, **_plain(asdict(rec))}
    header = (f"# moesim {rec.kind} plan (schema: docs/planning.md, 'The plan file').\n"
              "# decision: what to deploy; predicted: the model's figures for it; inputs: what it was\n"
              "# computed from, with fingerprints; solver: status and optimality gap.\n")
    text = yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return atomic_write(path, header + text)


def read_plan(path: str | Path, kind: str | None = None) -> Recommendation:
    """Read a plan file; a malformed one, or one of another ``kind``, names the file and field."""
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise InputError("expected a moesim plan file (a mapping with schema_version, kind, decision)", source=str(path))
    try:
        plan = _PlanFile.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, str(path)) from None
    if kind is not None and plan.kind != kind:
        raise InputError(f"is a {plan.kind} plan; expected a {kind} plan", source=str(path), field="kind")
    return Recommendation(plan.kind, plan.decision, plan.predicted, plan.inputs, plan.solver)
