"""Error types for user mistakes.

A :class:`MoesimError` is something the user can fix (a misspelt name, a malformed file, an
impossible layout). The CLI prints its one-line message and exits with code 2; any other
exception is a bug in moesim and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoesimError(Exception):
    """A user mistake, reported as one line naming where it is and what was expected.

    ``source`` is the file (or command-line option) the bad value came from and ``field`` the
    dotted path to it inside that source; either may be empty.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.field = field
        super().__init__(self.line())

    def line(self) -> str:
        where = ": ".join(p for p in (self.source, self.field) if p)
        return f"{where}: {self.message}" if where else self.message


class InputError(MoesimError, ValueError):
    """A value that does not parse or is out of range.

    A ``ValueError`` too, so a unit that fails to parse inside a pydantic validator is reported
    by pydantic with the path of the field it was in."""


class UnknownNameError(MoesimError):
    """A name that is not in a catalog; the message suggests the closest known names."""

    def __init__(
        self,
        kind: str,
        name: str,
        known: Iterable[str],
        *,
        source: str | None = None,
        field: str | None = None,
    ):
        known = sorted(known)
        close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = "" if close else f"; known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}"
        super().__init__(f"unknown {kind} {name!r}{hint}{listing}", source=source, field=field)
        self.name = name
        self.suggestions = close


class LayoutError(MoesimError):
    """A parallel layout that cannot be built for this model and cluster."""


def from_validation(exc, source: str | None, *, tags: tuple[str, ...] = ()) -> MoesimError:
    """Turn a pydantic ``ValidationError`` into one :class:`InputError` for its first problem.

    The field path is written dotted (``memory.bandwidth``, ``devices[0].count``) so it can be
    found in the YAML file it came from; ``tags`` are discriminator values pydantic puts in the
    path of a tagged union, which are not in the file and are dropped.
    """
    first = exc.errors()[0]
    parts: list[str] = []
    for item in first.get("loc", ()):
        if item in tags:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "extra_forbidden":
        message = "unknown field (check its spelling)"
    elif first.get("type") == "missing":
        message = "required field is missing"
    return InputError(message, source=source, field="".join(parts) or None)
