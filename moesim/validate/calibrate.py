"""Calibration of a device profile's efficiency figures from measured tables.

Rows are split into a calibration and a test part by a hash of their *shape* (the family's
:attr:`~moesim.validate.tables.Family.shape` columns: a GEMM's ``n, k``, a MoE layer's
model shape and parallel layout, an attention's head layout), so a test shape was never seen by
the fit, whatever its token count. The split depends on the values only: the same table gives
the same split in any row order, on any machine.

The fit is a coordinate search over the device's efficiency figures
(:data:`PARAMETERS`): each figure in turn is scaled over a grid of factors and the best value
kept, with the grid narrowing each sweep. The objective is the mean over families, and within a family
over its regimes, of the median and p90 absolute percentage error ``|predicted / measured - 1|``
(the figures the targets are set on), so a family with many rows (GEMM) does not drown one with
few (MLA), and a regime with many rows one with few.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydantic import TypeAdapter, ValidationError

from moesim.errors import InputError, from_validation
from moesim.files import atomic_write, load_yaml
from moesim.hardware import catalog
from moesim.hardware.specs import Device
from moesim.hardware.topology import topology
from moesim.validate.compare import PREDICTORS, Cases, Summary, node_cluster
from moesim.validate.tables import Table

TEST_FRACTION = 0.3
# Families whose kernels the device's efficiency figures set.
KERNEL_FAMILIES = ("moe", "gemm", "attention_prefill", "attention_decode", "mla_prefill", "mla_decode")
# Collectives inside one node: NCCL's protocol figures and DeepEP's kernel figures are the
# device's too (the link's bandwidth stays its spec-sheet figure).
COMM_FAMILIES = ("nccl", "deepep_ll", "deepep_normal")
_KERNELS = frozenset(KERNEL_FAMILIES)
_ALL = _KERNELS | frozenset(COMM_FAMILIES)
_ATTENTION = frozenset({"attention_prefill", "attention_decode", "mla_prefill", "mla_decode"})


def shape_fraction(table: Table) -> np.ndarray:
    """Each row's shape hashed to a number in [0, 1): rows of one shape share it."""
    columns = [table.get(c) for c in table.family.shape]
    out = np.empty(len(table))
    seen: dict[tuple, float] = {}
    for i in range(len(table)):
        key = tuple(str(c[i]) for c in columns)
        if key not in seen:
            digest = hashlib.blake2b(f"{table.family.name}|{'|'.join(key)}".encode(), digest_size=8).digest()
            seen[key] = int.from_bytes(digest, "big") / 2.0**64
        out[i] = seen[key]
    return out


def split(table: Table, test_fraction: float = TEST_FRACTION) -> tuple[Table, Table]:
    """(calibration rows, test rows) of ``table``; whole shapes go to one side."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test fraction must be between 0 and 1, got {test_fraction}", field="--test-fraction")
    test = shape_fraction(table) < test_fraction
    return table.take(np.flatnonzero(~test)), table.take(np.flatnonzero(test))


def sample(table: Table, rows: int, seed: int = 0) -> Table:
    """At most ``rows`` rows of ``table`` picked at random from ``seed`` (all when ``rows`` is 0
    or the table is smaller), in table order."""
    if rows <= 0 or len(table) <= rows:
        return table
    pick = np.sort(np.random.default_rng(seed).choice(len(table), size=rows, replace=False))
    return table.take(pick)


@dataclass(frozen=True)
class Parameter:
    """One fitted figure: its path in the profile (``("efficiency", "compute", "bf16")``), the
    families whose prediction it changes, and its allowed range (SI units)."""

    path: tuple[str, ...]
    families: frozenset[str]
    low: float
    high: float
    choices: tuple[float, ...] = ()  # a discrete figure (roofline_p: the compiled fast paths)

    @property
    def name(self) -> str:
        return ".".join(self.path)


def parameters(device, tables: list[Table]) -> list[Parameter]:
    """The figures of ``device`` the tables can inform (per-dtype keys only for dtypes the
    tables hold and the profile lists)."""
    eff = device.efficiency
    families = {t.family.name for t in tables} & _ALL
    out = [
        Parameter(("launch_overhead",), _KERNELS, 0.2e-6, 10e-6),
        Parameter(("efficiency", "memory"), _KERNELS, 0.3, 1.0),
        Parameter(("efficiency", "memory_latency"), _KERNELS, 0.0, 10e-6),
        Parameter(("efficiency", "roofline_p"), _KERNELS, 2.0, 4.0, (2.0, 3.0, 4.0)),
        Parameter(("efficiency", "k_half"), frozenset({"gemm", "moe"}), 0.0, 512.0),
        Parameter(("efficiency", "attention_prefill"), frozenset({"attention_prefill"}) | (
            frozenset() if eff.decode_compute is not None else frozenset({"attention_decode"})) | (
            frozenset() if eff.mla_decode is not None else frozenset({"mla_decode"})), 0.05, 1.0),
        Parameter(("efficiency", "attention_decode"), frozenset({"attention_decode", "mla_decode"}), 0.05, 1.0),
        Parameter(("efficiency", "mla_prefill"), frozenset({"mla_prefill"}), 0.02, 1.0),
        Parameter(("efficiency", "attention_overhead"), _ATTENTION, 0.0, 30e-6),
    ]
    gemm_keys = _keys(tables, "gemm", "gemm_dtype", eff.compute)
    moe_keys = _keys(tables, "moe", "moe_dtype", eff.moe_compute)
    out += [Parameter(("efficiency", "compute", k), frozenset({"gemm"}), 0.05, 1.0) for k in gemm_keys]
    out += [Parameter(("efficiency", "moe_compute", k), frozenset({"moe"}), 0.02, 1.0) for k in moe_keys]
    out += [Parameter(("efficiency", "moe_memory", k), frozenset({"moe"}), 0.05, 1.0)
            for k in _keys(tables, "moe", "moe_dtype", eff.moe_memory) if k != "default"]
    out += [Parameter(("efficiency", "variant_overhead", k), frozenset({"gemm"}), 0.0, 50e-6)
            for k in sorted(eff.variant_overhead) if k in _dtypes(tables, "gemm", "gemm_dtype")]
    if _dtypes(tables, "moe", "moe_ep_size") - {"1", "1.0"}:
        out.append(Parameter(("efficiency", "moe_empty_block"), frozenset({"moe"}), 0.0, 200e-9))
    out += [Parameter(("efficiency", "moe_inflight_half", k), frozenset({"moe"}), 0.0, 4096.0)
            for k in _keys(tables, "moe", "moe_dtype", eff.moe_inflight_half)]
    out += [Parameter(("efficiency", "moe_unaligned", k), frozenset({"moe"}), 1.0, 50.0)
            for k in _keys(tables, "moe", "moe_dtype", eff.moe_unaligned)]
    out += [Parameter(("efficiency", table, k), frozenset({"moe"}), 0.002, 1.0)
            for table in ("moe_small_memory", "moe_small_compute") for k in sorted(getattr(eff, table))
            if k in _dtypes(tables, "moe", "moe_dtype")]
    if eff.gemm_tiles:
        out.append(Parameter(("efficiency", "tile_overhead"), frozenset({"gemm"}), 0.0, 512.0))
        out += [Parameter(("efficiency", "k_step", k), frozenset({"gemm"}), 0.0, 2e-6) for k in gemm_keys
                if k in eff.k_step]
    out += _attention_parameters(eff)
    out += _comm_parameters(eff)
    return [p for p in out if p.families & families]


# Allowed ranges of DeepEP's figures by the last part of their key (s, B/s, copies per token).
_DEEPEP_RANGES = {"floor": (0.0, 100e-6), "rate": (1e9, 1e12), "cap": (1e10, 1e12), "token": (0.0, 4.0),
                  "expert": (0.0, 1e-7)}


def _attention_parameters(eff) -> list[Parameter]:
    """Decode work-unit cost, MLA decode compute share, KV dequantisation (per element, per call)."""
    decode = frozenset({"attention_decode", "mla_decode"})
    out = [Parameter(("efficiency", "decode_per_sequence"), decode, 0.0, 200e-9),
           Parameter(("efficiency", "mla_prefill_token"), frozenset({"mla_prefill"}), 0.0, 10e-9),
           Parameter(("efficiency", "mla_prefill_latent"), frozenset({"mla_prefill"}), 0.0, 50e-9),
           Parameter(("efficiency", "decode_per_dim"), frozenset({"attention_decode"}), 0.0, 2e-9)]
    if eff.decode_block:
        out.append(Parameter(("efficiency", "decode_block"), frozenset({"attention_decode"}), 0.0, 5e-6))
    if eff.prefill_tile:
        out.append(Parameter(("efficiency", "prefill_cta"), frozenset({"attention_prefill"}), 0.0, 10e-6))
        out.append(Parameter(("efficiency", "prefill_pair"), frozenset({"attention_prefill"}), 0.0, 1e-9))
        out.append(Parameter(("efficiency", "prefill_fp8_block"), frozenset({"attention_prefill"}), 0.0, 5e-6))
    if eff.decode_compute is not None:
        out.append(Parameter(("efficiency", "decode_compute"),
                             decode if eff.mla_decode is None else frozenset({"attention_decode"}), 0.05, 1.0))
    if eff.mla_decode is not None:
        out.append(Parameter(("efficiency", "mla_decode"), frozenset({"mla_decode"}), 0.05, 1.0))
    for key in sorted(eff.kv_dequant):
        families = (frozenset({"mla_decode", "mla_prefill"}) if key.startswith("mla") else
                    frozenset({"attention_decode"}))
        if key.endswith("_call"):
            out.append(Parameter(("efficiency", "kv_dequant", key), families, 0.0, 30e-6))
        else:
            out.append(Parameter(("efficiency", "kv_dequant", key), families & frozenset({"mla_decode", "attention_decode"}),
                                 0.0, 1e-10))
    return out


def _comm_parameters(eff) -> list[Parameter]:
    """NCCL and DeepEP figures the profile lists (a profile without them keeps the links'
    alpha-beta model, and nothing is fitted)."""
    nccl = frozenset({"nccl"})
    out = []
    if eff.nccl_bus:
        out += [Parameter(("efficiency", "nccl_launch", k), nccl, 0.0, 50e-6) for k in sorted(eff.nccl_launch)]
        out += [Parameter(("efficiency", "nccl_step", k), nccl, 0.0, 5e-6) for k in sorted(eff.nccl_step)]
        out += [Parameter(("efficiency", "nccl_bus", k), nccl, 0.2, 1.0) for k in sorted(eff.nccl_bus)]
        out.append(Parameter(("efficiency", "nccl_ll_bus"), nccl, 0.1, 1.0))
        out += [Parameter(("efficiency", "nccl_op", k), nccl, 0.5, 2.0) for k in sorted(eff.nccl_op)]
    for key in sorted(eff.deepep):
        family = frozenset({"deepep_ll" if key.startswith("ll") else "deepep_normal"})
        out.append(Parameter(("efficiency", "deepep", key), family, *_DEEPEP_RANGES[key.rsplit("_", 1)[-1]]))
    return out


def _dtypes(tables: list[Table], family: str, column: str) -> set[str]:
    return {str(v) for t in tables if t.family.name == family for v in set(t.get(column).tolist())}


def _keys(tables: list[Table], family: str, column: str, table: dict) -> list[str]:
    """Profile keys the rows' dtypes read (a kernel variant's own key, else its dtype's)."""
    from moesim.dtypes import canonical_dtype

    keys = set()
    for variant in _dtypes(tables, family, column):
        for name in (variant.lower(), canonical_dtype(variant)):
            if name in table:
                keys.add(name)
                break
        else:
            if "default" in table:
                keys.add("default")
    return sorted(keys)


def value(device, path: tuple[str, ...]) -> float:
    node = device.model_dump()
    for key in path:
        node = node[key]
    return float(node)


def with_values(device, values: dict[tuple[str, ...], float]):
    """A copy of ``device`` with the figures at ``values``' paths replaced."""
    data = device.model_dump()
    for path, v in values.items():
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = v
    return type(device).model_validate(data)


def _family_loss(cases: list[Cases]) -> float:
    """Mean over regimes of (median + p90) / 2 of the absolute percentage error: the figures
    the targets are set on (a log error would weigh the rows the model predicts far too fast,
    which a figure cannot fix, above the typical row)."""
    ratio = np.concatenate([c.predicted / c.measured - 1.0 for c in cases])
    regime = np.concatenate([c.regime for c in cases])
    losses = []
    for r in np.unique(regime):
        error = np.abs(ratio[regime == r])
        losses.append((np.median(error) + np.percentile(error, 90)) / 2)
    return float(np.mean(losses))


class Objective:
    """The fit's loss over a fixed set of calibration rows; predictions of the families a
    figure does not touch are reused."""

    def __init__(self, tables: list[Table], draws: int = 3, graph=None):
        self.tables = [t for t in tables if t.family.name in _ALL and len(t)]
        if graph is None:  # collectives run on the device's own node, without a graph none are fitted
            self.tables = [t for t in self.tables if t.family.name in _KERNELS]
        self.graph = graph
        self.draws = draws
        self.counts: dict = {}  # routing draws, shared across evaluations
        self.losses: dict[str, float] = {}
        self.evaluations = 0

    def family_losses(self, device, families=None) -> dict[str, float]:
        wanted = {t.family.name for t in self.tables} if families is None else set(families)
        groups: dict[str, list[Cases]] = {}
        for table in self.tables:
            if table.family.name in wanted:
                groups.setdefault(table.family.name, []).extend(
                    PREDICTORS[table.family.name](table, device, None, draws=self.draws, counts_cache=self.counts)
                    if table.family.name == "moe" else PREDICTORS[table.family.name](table, device, self.graph))
        self.evaluations += 1
        return {f: _family_loss(c) for f, c in groups.items()}

    def __call__(self, device, families=None) -> float:
        losses = dict(self.losses)
        losses.update(self.family_losses(device, families))
        return float(np.mean(list(losses.values()))), losses


_FACTORS = (0.5, 0.7, 0.85, 0.93, 1.0, 1.07, 1.15, 1.4, 2.0)


def fit(device, tables: list[Table], *, sweeps: int = 12, draws: int = 3, progress=None, graph=None,
        families: set[str] | None = None) -> tuple[object, dict]:
    """Coordinate search of ``device``'s efficiency figures on the calibration ``tables``: at
    most ``sweeps`` passes over the figures; the grid of factors narrows (its spread halves)
    after a pass that improved nothing, and the search ends when it is finer than 1%.
    ``families`` (when given) restricts the search to the figures that change only those
    families' predictions, so refitting one family leaves the others' figures as they are.
    Returns the fitted device and a record: loss before / after, each figure's start and end
    value, and how many evaluations it took."""
    if graph is None and any(t.family.name in COMM_FAMILIES for t in tables):
        graph = topology(node_cluster(device))
    objective = Objective(tables, draws, graph)
    if not objective.tables:
        raise InputError("no kernel tables (moe, gemm, attention, mla) to calibrate from", field="--measured")
    params = parameters(device, objective.tables)
    if families is not None:
        params = [p for p in params if p.families <= set(families)]
    loss, objective.losses = objective(device)
    start_loss, start = loss, {p.name: value(device, p.path) for p in params}
    spread = 1.0
    for sweep in range(sweeps):
        improved = False
        before = {p.path: value(device, p.path) for p in params if not p.choices}
        for param in params:
            current = value(device, param.path)
            if param.choices:
                candidates = list(param.choices)
            else:
                base = current if current > 0 else (param.high - param.low) * 0.05 + param.low
                candidates = sorted({float(np.clip(base * f ** spread, param.low, param.high)) for f in _FACTORS}
                                    | ({0.0} if param.low == 0.0 else set()))
            for candidate in candidates:
                if candidate == current:
                    continue
                trial = with_values(device, {param.path: candidate})
                trial_loss, trial_losses = objective(trial, param.families)
                if trial_loss < loss - 1e-9:
                    device, loss, objective.losses, current, improved = trial, trial_loss, trial_losses, candidate, True
            if progress:
                progress(sweep, param.name, loss)
        if improved:
            # Hooke-Jeeves pattern move: figures that trade off (launch overhead against memory
            # latency) leave a valley that one-at-a-time steps descend slowly; repeat the pass's
            # whole step while it helps.
            while True:
                step = {}
                for param in params:
                    if param.path in before:
                        now = value(device, param.path)
                        step[param.path] = float(np.clip(2 * now - before[param.path], param.low, param.high))
                        before[param.path] = now
                trial = with_values(device, step)
                trial_loss, trial_losses = objective(trial)
                if not trial_loss < loss - 1e-9:
                    break
                device, loss, objective.losses = trial, trial_loss, trial_losses
        else:
            spread /= 2
            if spread < 1 / 8:  # the finest factors are then within 1% of 1
                break
    record = {
        "loss_before": start_loss, "loss_after": loss, "evaluations": objective.evaluations,
        "rows": {t.name: len(t) for t in objective.tables},
        "figures": {p.name: {"before": start[p.name], "after": value(device, p.path)} for p in params},
        "family_loss_after": dict(objective.losses),
    }
    return device, record


# -- profiles ------------------------------------------------------------------------------

_DEVICE = TypeAdapter(Device)
_SECONDS_FIELDS = {"launch_overhead", "memory_latency", "moe_empty_block", "attention_overhead", "variant_overhead",
                   "decode_per_sequence", "mla_prefill_token", "mla_prefill_latent", "nccl_launch", "nccl_step", "k_step", "prefill_cta", "decode_per_dim",
                   "decode_block", "prefill_pair", "prefill_fp8_block"}


def load_device(spec: str):
    """A device by catalog name or alias, or from a profile YAML file (a path ending .yaml)."""
    if spec.endswith((".yaml", ".yml")):
        raw = load_yaml(spec)
        if not isinstance(raw, dict):
            raise InputError("expected a mapping of fields at the top level", source=spec)
        try:
            return _DEVICE.validate_python(raw)
        except ValidationError as exc:
            raise from_validation(exc, spec, tags=("gpu", "npu", "cpu", "ssd")) from None
    return catalog.device(spec, field="--device")


def _fmt(name: str, v: float):
    if name in _SECONDS_FIELDS:
        return "0 s" if v == 0 else (f"{v * 1e9:.3g} ns" if v < 1e-6 else f"{v * 1e6:.3g} us")
    return float(f"{v:.3g}")  # 3 significant digits: DeepEP's figures span seconds to bytes/s


def rounded(device):
    """``device`` with its fitted figures rounded as :func:`write_profile` writes them (3
    significant digits), so what is evaluated is what is stored."""
    data = _profile_data(device)
    return _DEVICE.validate_python(data)


def _profile_data(device) -> dict:
    data = device.model_dump(mode="json", exclude_defaults=False)
    data["launch_overhead"] = _fmt("launch_overhead", device.launch_overhead)
    eff = {}
    for key, v in device.efficiency.model_dump().items():
        if isinstance(v, dict):
            eff[key] = {k: _fmt(key, x) for k, x in v.items()}
        elif isinstance(v, float):
            eff[key] = _fmt(key, v)
        else:
            eff[key] = v
    data["efficiency"] = eff
    return data


def shared_commit(folder: Path) -> str:
    """The upstream commit the measured tables came from, as the README beside them states
    (``commit <40 hex>``), else ''."""
    for readme in (folder / "README.md", folder.parent / "README.md"):
        if readme.is_file():
            found = re.search(r"commit\s+([0-9a-f]{40})", readme.read_text(errors="replace"))
            if found:
                return found.group(1)
    return ""


def write_profile(device, path: str | Path, *, base_name: str, source: dict) -> Path:
    """Write the calibrated profile: the device's own fields with the fitted figures, headed by
    comments naming the data they came from (``source``: tables and rows used, shared-data
    commit, split, test errors). It loads like any profile (``--device PATH`` or a folder on
    ``MOESIM_HWPROFILES``)."""
    data = _profile_data(device)
    lines = [f"# {device.full_name}: efficiency figures calibrated by `moesim validate --fit` from measured tables.",
             f"# Base profile: {base_name} (its other numbers and their sources are there).",
             f"# Measured data: {source.get('folder', '')}",
             f"#   upstream commit {source.get('commit') or 'unknown'} (ai-dynamo/aiconfigurator tables)",
             f"#   calibration split: shapes whose hash is >= {source.get('test_fraction', TEST_FRACTION)} "
             "(whole shapes held out for the test split)"]
    for name, rows in source.get("rows", {}).items():
        lines.append(f"#   {name}: {rows} calibration rows used")
    for key in ("loss_before", "loss_after"):
        if key in source:
            lines.append(f"#   {key.replace('_', ' ')} (mean over families and regimes of (median + p90) / 2 of |predicted / measured - 1|): {source[key]:.4f}")
    for line in source.get("test_errors", []):
        lines.append(f"#   test split: {line}")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return atomic_write(path, text)


def loss_of(summaries: list[Summary]) -> float:
    """A single figure of merit of a test-split table: the mean of the families' median and p90
    absolute errors, over the families that have a target."""
    lines = [s for s in summaries if s.regime == "all" and s.target is not None]
    return float(np.mean([(s.median + s.p90) / 2 for s in lines])) if lines else float("nan")
