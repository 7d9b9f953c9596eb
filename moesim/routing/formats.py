"""Reading and writing routing traces in the formats other tools produce.

- ``npz``: moesim's native trace (:mod:`moesim.routing.trace`).
- ``sglang``: SGLang's expert-distribution recorder dumps (``/dump_expert_distribution_record``),
  torch files: ``stat`` mode holds ``logical_count`` ``[steps, layers, experts]`` (or
  ``[layers, experts]``); ``per_token`` mode holds ``records``, each with
  ``topk_ids_of_layer`` ``[layers, tokens, k]``. SGLang counts dense layers too (their rows stay
  empty); they are dropped and the kept layer numbers go into the metadata. Read only when
  PyTorch is installed.
- ``exflow``: ExFlow-style ``trace.npy``: expert ids ``[tokens, layers]`` (top-1) or
  ``[tokens, layers, k]``, read memory-mapped.
- ``csv``: per-step counts in long form, one row per (step, layer, expert): ``step,layer,expert,count``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.files import atomic_write
from moesim.routing.trace import Trace, load_trace, save_trace, validate

FORMATS = ("npz", "sglang", "exflow", "csv")


def guess_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    return {".npz": "npz", ".pt": "sglang", ".pth": "sglang", ".npy": "exflow", ".csv": "csv"}.get(suffix, "")


def _torch(path: Path):
    try:
        import torch
    except ImportError:
        raise InputError("reading SGLang .pt dumps needs PyTorch; install it (pip install torch) or convert the dump "
                         "where PyTorch is installed", source=str(path)) from None
    return torch


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def read_sglang(path: Path, num_experts: int | None = None, *, physical: bool = False) -> Trace:
    """An SGLang dump; with ``physical`` the per-token ids are physical slots (redundant
    experts included), mapped to logical experts through the dump's
    ``last_physical_to_logical_map``."""
    torch = _torch(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InputError(f"not a readable SGLang dump ({exc.__class__.__name__})", source=str(path)) from None
    if not isinstance(data, dict):
        raise InputError("expected a dict with 'logical_count' (stat mode) or 'records' (per_token mode)", source=str(path))
    if "logical_count" in data:
        counts = _numpy(data["logical_count"]).astype(np.int64)
        if counts.ndim == 2:
            counts = counts[None]
        if counts.ndim != 3:
            raise InputError(f"logical_count has shape {counts.shape}; expected [steps, layers, experts]", source=str(path),
                             field="logical_count")
        kept = np.flatnonzero(counts.sum(axis=(0, 2)) > 0)
        return Trace(num_experts=counts.shape[2], counts=counts[:, kept],
                     metadata={"source": f"sglang stat dump {path.name}", "sglang_layers": kept.tolist()})
    if "records" in data:
        parts = []
        for index, record in enumerate(data["records"]):
            if "topk_ids_of_layer" not in record:
                raise InputError("a record has no 'topk_ids_of_layer' (is this a per_token dump?)", source=str(path),
                                 field=f"records[{index}]")
            ids = _numpy(record["topk_ids_of_layer"])
            if ids.ndim != 3:
                raise InputError(f"topk_ids_of_layer has shape {ids.shape}; expected [layers, tokens, k]", source=str(path),
                                 field=f"records[{index}].topk_ids_of_layer")
            if ids.shape[1]:
                parts.append(ids.transpose(1, 0, 2))
        if not parts:
            raise InputError("the dump holds no tokens", source=str(path), field="records")
        ids = np.concatenate(parts).astype(np.int64)
        if physical:
            if "last_physical_to_logical_map" not in data:
                raise InputError("physical ids need 'last_physical_to_logical_map' in the dump", source=str(path))
            p2l = _numpy(data["last_physical_to_logical_map"]).astype(np.int64)
            if p2l.ndim != 2 or p2l.shape[0] != ids.shape[1] or ids.max() >= p2l.shape[1]:
                raise InputError(f"last_physical_to_logical_map {p2l.shape} does not fit ids of {ids.shape[1]} layers",
                                 source=str(path), field="last_physical_to_logical_map")
            ids = np.where(ids >= 0, np.take_along_axis(p2l[None, :, :].repeat(ids.shape[0], 0), np.maximum(ids, 0), axis=2), -1)
        kept = np.flatnonzero(np.any(ids != 0, axis=(0, 2)))
        experts = num_experts
        if experts is None and "last_physical_to_logical_map" in data:
            experts = int(_numpy(data["last_physical_to_logical_map"]).max()) + 1
        experts = experts or int(ids.max()) + 1
        return Trace(num_experts=experts, topk_ids=ids[:, kept].astype(np.int16),
                     metadata={"source": f"sglang per_token dump {path.name}", "sglang_layers": kept.tolist()})
    raise InputError("expected 'logical_count' (stat mode) or 'records' (per_token mode)", source=str(path))


def read_exflow(path: Path, num_experts: int | None = None) -> Trace:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable .npy array ({exc.__class__.__name__})", source=str(path)) from None
    if ids.ndim == 2:
        ids = ids[:, :, None]
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"expected integer expert ids [tokens, layers] or [tokens, layers, k]; got {ids.dtype} {ids.shape}",
                         source=str(path))
    experts = num_experts or int(ids.max()) + 1
    return Trace(num_experts=experts, topk_ids=np.asarray(ids, dtype=np.int16), metadata={"source": f"exflow {path.name}"})


def read_counts_csv(path: Path, num_experts: int | None = None) -> Trace:
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"step", "layer", "expert", "count"} - set(reader.fieldnames or ())
            if missing:
                raise InputError(f"missing columns {', '.join(sorted(missing))}; expected step,layer,expert,count",
                                 source=str(path))
            rows = np.array([[int(r["step"]), int(r["layer"]), int(r["expert"]), int(r["count"])] for r in reader],
                            dtype=np.int64).reshape(-1, 4)
    except ValueError as exc:
        raise InputError(f"a value is not an integer ({exc})", source=str(path)) from None
    if rows.size == 0:
        raise InputError("no rows", source=str(path))
    if rows.min() < 0:
        raise InputError("negative step, layer, expert or count", source=str(path))
    experts = num_experts or int(rows[:, 2].max()) + 1
    counts = np.zeros((rows[:, 0].max() + 1, rows[:, 1].max() + 1, experts), dtype=np.int64)
    if rows[:, 2].max() >= experts:
        raise InputError(f"expert id {rows[:, 2].max()} out of range for {experts} experts", source=str(path))
    np.add.at(counts, (rows[:, 0], rows[:, 1], rows[:, 2]), rows[:, 3])
    return Trace(num_experts=experts, counts=counts, metadata={"source": f"csv {path.name}"})


def read_trace(path: str | Path, fmt: str = "", num_experts: int | None = None, *, physical: bool = False) -> Trace:
    """Read a trace in ``fmt`` (guessed from the suffix when empty); ``physical`` applies to
    SGLang per-token dumps (see :func:`read_sglang`)."""
    path = Path(path)
    fmt = fmt or guess_format(path)
    if not path.is_file():
        raise InputError("file not found", source=str(path))
    readers = {"npz": lambda p, e: load_trace(p), "sglang": lambda p, e: read_sglang(p, e, physical=physical),
               "exflow": read_exflow, "csv": read_counts_csv}
    if fmt not in readers:
        raise InputError(f"cannot tell the format; give --from with one of {', '.join(FORMATS)}", source=str(path))
    trace = readers[fmt](path, num_experts)
    if num_experts is not None and trace.num_experts != num_experts:
        raise InputError(f"the trace has {trace.num_experts} experts; --experts says {num_experts}", source=str(path))
    validate(trace, str(path))
    return trace


def write_trace(path: str | Path, trace: Trace, fmt: str = "", *, batch: int | None = None) -> Path:
    """Write ``trace`` as ``fmt`` (guessed from the suffix when empty). Writing counts from a
    token-level trace aggregates it over steps of ``batch`` tokens."""
    path = Path(path)
    fmt = fmt or guess_format(path)
    if fmt == "npz":
        return save_trace(path, trace)
    if fmt == "csv":
        loads = trace.loads(batch)
        out = io.StringIO()
        out.write("step,layer,expert,count\n")
        for (step, layer, expert), count in np.ndenumerate(loads):
            if count:
                out.write(f"{step},{layer},{expert},{count}\n")
        return atomic_write(path, out.getvalue())
    if fmt == "exflow":
        if trace.topk_ids is None:
            raise InputError("ExFlow traces are token level; this trace holds counts", source=str(path))
        ids = np.asarray(trace.topk_ids)
        buffer = io.BytesIO()
        np.save(buffer, ids[:, :, 0] if ids.shape[2] == 1 else ids)
        return atomic_write(path, buffer.getvalue())
    raise InputError(f"cannot write format {fmt or '(unknown)'}; use one of npz, csv, exflow", source=str(path))
