"""The hardware catalog: profiles in ``hwprofiles/`` found by name or alias.

``hwprofiles/devices/*.yaml`` hold GPUs, NPUs, CPUs and SSDs, ``links/*.yaml`` interconnects and
``clusters/*.yaml`` whole machines. A user may add a folder of their own profiles with the
``MOESIM_HWPROFILES`` environment variable (``os.pathsep``-separated); theirs win on a clash.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from moesim.errors import InputError, UnknownNameError, from_validation
from moesim.files import data_dir, load_yaml
from moesim.hardware.specs import Cluster, Device, Link

_DEVICE = TypeAdapter(Device)


def _roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("MOESIM_HWPROFILES", "").split(os.pathsep) if p]
    return [data_dir("hwprofiles"), *extra]


def _read(path: Path, kind: str):
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise InputError("expected a mapping of fields at the top level", source=str(path))
    try:
        if kind == "devices":
            return _DEVICE.validate_python(raw)
        return (Link if kind == "links" else Cluster).model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, str(path), tags=("gpu", "npu", "cpu", "ssd")) from None


@lru_cache(maxsize=None)
def _index(kind: str, roots: tuple[Path, ...]) -> dict[str, object]:
    """Name and alias (lower case) -> spec, for one kind of profile."""
    found: dict[str, object] = {}
    for root in roots:
        for path in sorted((root / kind).glob("*.yaml")):
            spec = _read(path, kind)
            for key in (spec.name, *spec.aliases):
                found[key.lower()] = spec
    return found


def _lookup(kind: str, label: str, name: str, field: str | None):
    table = _index(kind, tuple(_roots()))
    spec = table.get(name.lower())
    if spec is None:
        raise UnknownNameError(label, name, {s.name for s in table.values()}, field=field)
    return spec


def device(name: str, *, field: str | None = None):
    """A device profile (:class:`Accelerator`, :class:`Cpu` or :class:`Ssd`) by name or alias."""
    return _lookup("devices", "device", name, field)


def link(name: str, *, field: str | None = None) -> Link:
    """A link profile by name or alias."""
    return _lookup("links", "link", name, field)


def cluster(name: str, *, field: str | None = None) -> Cluster:
    """A cluster profile by name or alias."""
    return _lookup("clusters", "cluster", name, field)


def _unique(kind: str) -> list:
    seen: dict[str, object] = {}
    for spec in _index(kind, tuple(_roots())).values():
        seen.setdefault(spec.name, spec)
    return sorted(seen.values(), key=lambda s: s.name)


def devices() -> list:
    return _unique("devices")


def links() -> list[Link]:
    return _unique("links")


def clusters() -> list[Cluster]:
    return _unique("clusters")
