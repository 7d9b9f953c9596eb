"""Model presets: HF ``config.json`` files shipped in ``moesim/models/presets/``, found by name.

Each preset file is the model's own config.json plus three keys of ours: ``_source`` (the
repository it comes from), ``_published`` (the vendor's total and active parameter counts,
written as quoted, e.g. "46.7B", with where they were quoted) and optionally ``_aliases``.
Keys starting with ``_`` are not part of the config.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from moesim.errors import InputError, UnknownNameError
from moesim.files import load_json
from moesim.models.arch import ModelArch
from moesim.models.hf import from_hf_config, load_config

_DIR = Path(__file__).resolve().parent / "presets"
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@lru_cache(maxsize=None)
def _index() -> dict[str, Path]:
    """Preset name and alias (lower case) -> file."""
    found: dict[str, Path] = {}
    for path in sorted(_DIR.glob("*.json")):
        found[path.stem] = path
        for alias in load_json(path).get("_aliases", []):
            found[alias.lower()] = path
    return found


def list_presets() -> list[str]:
    """Names of the bundled presets (aliases left out), sorted."""
    return sorted({path.stem for path in _index().values()})


def published_count(value: str | float | int | None) -> float | None:
    """A parameter count as vendors write it ("46.7B", "1.04T", "800M") in parameters."""
    if value is None or isinstance(value, (int, float)):
        return value
    match = re.fullmatch(r"\s*~?\s*([0-9.]+)\s*([KMBT]?)\s*", str(value))
    if not match:
        raise InputError(f"cannot read {value!r} as a parameter count, e.g. '46.7B'")
    return float(match.group(1)) * _SCALE[match.group(2)]


@lru_cache(maxsize=None)
def _preset(path: Path) -> ModelArch:
    raw = load_json(path)
    config = {key: value for key, value in raw.items() if not key.startswith("_")}
    arch = from_hf_config(config, name=path.stem, source=raw.get("_source", str(path)))
    published = raw.get("_published", {})
    # The figures as written stay in extra: their digits say how far the vendor rounded.
    return replace(arch, published_total=published_count(published.get("total")),
                   published_active=published_count(published.get("active")),
                   extra={**arch.extra, "published": published})


def load_model(name_or_path: str) -> ModelArch:
    """A model by preset name or alias (any case), or from a path to a ``config.json`` or to a
    folder holding one. An unknown name raises :class:`UnknownNameError` naming the closest."""
    path = _index().get(name_or_path.strip().lower())
    if path is not None:
        return _preset(path)
    candidate = Path(name_or_path).expanduser()
    if candidate.exists() or candidate.suffix == ".json" or "/" in name_or_path or "\\" in name_or_path:
        return from_hf_config(load_config(candidate), name=_model_name(candidate), source=str(candidate))
    raise UnknownNameError("model", name_or_path, _index().keys())


def _model_name(path: Path) -> str:
    """A model loaded from disk is named after its folder (HF snapshots keep config.json in a
    folder named for the model) or, for a loose file, after the file."""
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.name == "config.json" else path.stem
