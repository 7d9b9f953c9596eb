"""moesim's native routing trace: an uncompressed ``.npz`` with a metadata record.

Members:

- ``topk_ids``: int16 ``[tokens, layers, k]``, expert ids, -1 for no expert (token level), or
- ``counts``: int32 ``[steps, layers, experts]`` tokens per expert per step (count level);
- ``metadata``: a JSON string: format version, model, layers, experts, k, seed, the generator
  parameters or the source a trace was converted from.

The archive is stored uncompressed so that each array can be memory-mapped straight out of the
zip file: a trace larger than memory is read lazily, page by page.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from moesim.errors import InputError
from moesim.files import atomic_write

FORMAT_VERSION = 1


@dataclass
class Trace:
    """A routing trace: token-level ``topk_ids`` or count-level ``counts`` (one of the two),
    over ``num_experts`` experts per layer."""

    num_experts: int
    topk_ids: np.ndarray | None = None
    counts: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.topk_ids is None) == (self.counts is None):
            raise ValueError("a trace holds exactly one of topk_ids and counts")

    @property
    def level(self) -> str:
        return "token" if self.topk_ids is not None else "count"

    @property
    def num_layers(self) -> int:
        return (self.topk_ids if self.topk_ids is not None else self.counts).shape[1]

    @property
    def top_k(self) -> int:
        if self.topk_ids is not None:
            return self.topk_ids.shape[2]
        return int(self.metadata.get("top_k", 0))

    def loads(self, batch: int | None = None) -> np.ndarray:
        """Count-level loads ``[steps, layers, experts]``: the counts as stored, or a token-level
        trace aggregated over steps of ``batch`` tokens (default: the whole trace as one step)."""
        if self.counts is not None:
            return np.asarray(self.counts)
        ids = self.topk_ids
        # an empty trace is no steps (not a division by zero)
        return tokens_per_expert(np.asarray(ids), self.num_experts, batch or max(ids.shape[0], 1))


def tokens_per_expert(ids: np.ndarray, num_experts: int, batch: int) -> np.ndarray:
    """Aggregate a token-level trace into count-level loads ``[steps, layers, experts]`` over
    steps of ``batch`` consecutive tokens (the last, partial step is dropped)."""
    tokens, layers, k = ids.shape
    steps = tokens // batch
    counts = np.zeros((steps, layers, num_experts), dtype=np.int64)
    _count_choices(np.asarray(ids), batch, counts)
    return counts


@numba.njit(cache=True)
def _count_choices(ids, batch, counts):
    """Adds each token's expert choices ``ids`` ``[tokens, layers, k]`` (-1: none) to
    ``counts[token // batch, layer, expert]`` for the whole steps ``counts`` holds (a compiled
    loop: the sample the count stream measures is ~10^7 choices)."""
    layers, k = ids.shape[1], ids.shape[2]
    for step in range(counts.shape[0]):
        for token in range(step * batch, (step + 1) * batch):
            for layer in range(layers):
                for j in range(k):
                    expert = ids[token, layer, j]
                    if expert >= 0:
                        counts[step, layer, expert] += 1


def save_trace(path: str | Path, trace: Trace) -> Path:
    """Write ``trace`` as a native ``.npz`` (atomically)."""
    meta = dict(trace.metadata)
    meta.update(format="moesim-trace", version=FORMAT_VERSION, level=trace.level, num_experts=trace.num_experts,
                num_layers=trace.num_layers)
    if trace.topk_ids is not None:
        meta["top_k"] = trace.top_k
    buffer = io.BytesIO()
    arrays = {"metadata": np.array(json.dumps(meta, sort_keys=True))}
    if trace.topk_ids is not None:
        arrays["topk_ids"] = np.ascontiguousarray(trace.topk_ids, dtype=np.int16)
    else:
        arrays["counts"] = np.ascontiguousarray(trace.counts, dtype=np.int32)
    np.savez(buffer, **arrays)
    return atomic_write(path, buffer.getvalue())


def _mapped_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Memory-map the ``.npy`` member ``name`` of an uncompressed zip."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(name) as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        raw.seek(start)
        version = np.lib.format.read_magic(raw)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(raw)
        offset = raw.tell()
    if dtype.hasobject:
        raise InputError(f"member {name!r} holds Python objects; refusing to unpickle", source=str(path))
    if not shape or int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def load_trace(path: str | Path) -> Trace:
    """Read a native trace, memory-mapping its arrays; malformed files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError("trace file not found", source=str(path))
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "metadata.npy" not in names:
                raise InputError("not a moesim trace: no 'metadata' record (convert it with 'moesim trace convert')",
                                 source=str(path))
            with archive.open("metadata.npy") as handle:
                meta = json.loads(str(np.lib.format.read_array(handle, allow_pickle=False)))
            ids = _mapped_member(path, archive, "topk_ids.npy") if "topk_ids.npy" in names else None
            counts = _mapped_member(path, archive, "counts.npy") if "counts.npy" in names else None
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise InputError(f"not a readable .npz trace ({exc.__class__.__name__}: {exc})", source=str(path)) from None
    experts = meta.get("num_experts")
    if not isinstance(experts, int) or experts < 1:
        raise InputError("metadata.num_experts must be a positive integer", source=str(path), field="metadata.num_experts")
    if (ids is None) == (counts is None):
        raise InputError("a trace holds exactly one of 'topk_ids' and 'counts'", source=str(path))
    trace = Trace(num_experts=experts, topk_ids=ids, counts=counts, metadata=meta)
    validate(trace, str(path))
    return trace


def validate(trace: Trace, source: str) -> None:
    """Shapes and ranges: ids in [-1, experts), counts non-negative with ``experts`` columns."""
    if trace.topk_ids is not None:
        ids = trace.topk_ids
        if ids.ndim != 3:
            raise InputError(f"topk_ids has shape {ids.shape}; expected [tokens, layers, k]", source=source, field="topk_ids")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < -1 or high >= trace.num_experts:
                raise InputError(f"topk_ids holds expert ids in [{low}, {high}]; expected -1 or [0, {trace.num_experts})",
                                 source=source, field="topk_ids")
    else:
        counts = trace.counts
        if counts.ndim != 3 or counts.shape[2] != trace.num_experts:
            raise InputError(f"counts has shape {counts.shape}; expected [steps, layers, {trace.num_experts}]",
                             source=source, field="counts")
        if counts.size and int(counts.min()) < 0:
            raise InputError("counts holds negative values", source=source, field="counts")
