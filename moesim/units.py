"""Parse and format physical quantities.

Inside moesim everything is SI: seconds, bytes, FLOP, bytes/s, FLOP/s, watts. Files and
command lines may say "3.35 TB/s", "80 GiB", "989 TFLOPS", "400 Gb/s" or "25 us"; this module
turns such strings into floats of the base unit and back into short human strings.

Decimal prefixes (k, M, G, T, P) are powers of 1000, binary ones (Ki, Mi, Gi, Ti) powers of
1024. A lower-case ``b`` means bits (divided by 8 into bytes), upper-case ``B`` bytes.
"""

from __future__ import annotations

import re

from moesim.errors import InputError

_DECIMAL = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*([A-Za-zµ/%$]*(?:/s)?)\s*$")

# Each quantity kind: the unit suffixes it accepts after a prefix, and their factor.
_KINDS: dict[str, dict[str, float]] = {
    "bytes": {"B": 1.0, "b": 0.125},
    "bandwidth": {"B/s": 1.0, "b/s": 0.125, "Bps": 1.0, "bps": 0.125},
    "flops": {"FLOPS": 1.0, "FLOP/s": 1.0, "OPS": 1.0, "OP/s": 1.0},
    "flop": {"FLOP": 1.0, "OP": 1.0},
    "power": {"W": 1.0},
    "frequency": {"Hz": 1.0},
}


def _split(text: str, what: str) -> tuple[float, str]:
    match = _PATTERN.match(str(text))
    if not match:
        raise InputError(f"cannot read {text!r} as {what}: expected a number and a unit, e.g. {_EXAMPLES[what]}")
    return float(match.group(1)), match.group(2)


_EXAMPLES = {
    "bytes": "'80 GiB'",
    "bandwidth": "'3.35 TB/s' or '400 Gb/s'",
    "flops": "'989 TFLOPS'",
    "flop": "'2.1 TFLOP'",
    "power": "'700 W'",
    "frequency": "'1.98 GHz'",
    "time": "'25 us'",
}


def parse(value: str | int | float, kind: str) -> float:
    """Return ``value`` in the base SI unit of ``kind``.

    ``kind`` is one of bytes, bandwidth, flops, flop, power, frequency, time. A bare number is
    taken as already being in the base unit.
    """
    if isinstance(value, bool):
        raise InputError(f"expected {kind}, got a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    number, unit = _split(value, kind)
    if unit == "":
        return number
    if kind == "time":
        if unit in _TIME:
            return number * _TIME[unit]
        raise InputError(f"cannot read {value!r} as a time: unit {unit!r} is not one of s, ms, us, ns")
    suffixes = _KINDS[kind]
    # Longest suffix first so "GB/s" is not read as "G" + "B" + junk.
    for suffix in sorted(suffixes, key=len, reverse=True):
        if unit.endswith(suffix):
            prefix = unit[: -len(suffix)]
            scale = _BINARY.get(prefix) or _DECIMAL.get(prefix)
            if scale is not None:
                return number * scale * suffixes[suffix]
    raise InputError(f"cannot read {value!r} as {kind}: expected e.g. {_EXAMPLES[kind]}")


def bytes_(value: str | int | float) -> float:
    """Bytes from '80 GiB', '50 MB', '4 KiB' or a plain number."""
    return parse(value, "bytes")


def bandwidth(value: str | int | float) -> float:
    """Bytes per second from '3.35 TB/s', '400 Gb/s' or a plain number."""
    return parse(value, "bandwidth")


def flops(value: str | int | float) -> float:
    """FLOP per second from '989 TFLOPS', '1.98 POPS' or a plain number."""
    return parse(value, "flops")


def seconds(value: str | int | float) -> float:
    """Seconds from '25 us', '1.5 ms' or a plain number."""
    return parse(value, "time")


def watts(value: str | int | float) -> float:
    """Watts from '700 W', '1 kW' or a plain number."""
    return parse(value, "power")


def _scaled(value: float, unit: str, base: float, prefixes: str, digits: int) -> str:
    if value == 0:
        return f"0 {unit}"
    magnitude = abs(value)
    for index in range(len(prefixes) - 1, -1, -1):
        factor = base**index
        if magnitude >= factor:
            return f"{value / factor:.{digits}g} {prefixes[index].strip()}{unit}"
    return f"{value:.{digits}g} {unit}"


def fmt_bytes(value: float, digits: int = 3) -> str:
    """'1.5 GiB' style (binary prefixes, as memory capacities are quoted)."""
    if value == 0:
        return "0 B"
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {unit}"
    return f"{value:.{digits}g} B"


def fmt_bandwidth(value: float, digits: int = 3) -> str:
    """'3.35 TB/s' style (decimal prefixes, as bandwidths are quoted)."""
    return _scaled(value, "B/s", 1000.0, " kMGTP", digits)


def fmt_flops(value: float, digits: int = 3) -> str:
    """'989 TFLOP/s' style."""
    return _scaled(value, "FLOP/s", 1000.0, " kMGTPE", digits)


def fmt_count(value: float, digits: int = 4) -> str:
    """'46.7 B' style for parameter and token counts."""
    for unit, factor in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{unit}"
    return f"{value:.{digits}g}"


def fmt_time(value: float, digits: int = 3) -> str:
    """'25.3 us' style, choosing s, ms, us or ns."""
    magnitude = abs(value)
    if magnitude == 0:
        return "0 s"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if magnitude >= factor:
            return f"{value / factor:.{digits}g} {unit}"
    return f"{value / 1e-9:.{digits}g} ns"
