"""Where bundled data lives, reading YAML/JSON with clear errors, and atomic writes."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from moesim.errors import InputError

_PACKAGE = Path(__file__).resolve().parent
_UMASK = os.umask(0)  # read once (setting it is the only way to read it), then put back
os.umask(_UMASK)


def data_dir(name: str) -> Path:
    """The bundled folder ``name`` ("hwprofiles" or "scenarios").

    An installed wheel carries it as ``moesim/_data/<name>``; a source checkout (or an editable
    install) has it at the top of the repository, beside the package.
    """
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled folder {name!r} not found beside the moesim package")


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError("file not found", source=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc.__class__.__name__}", source=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise InputError(f"malformed YAML: {problem}", source=str(path), field=where) from None


def read_text(path: str | Path) -> str:
    """A text file's contents (gzip-compressed when the name ends in ``.gz``); a missing,
    unreadable or truncated file raises InputError naming it."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes()).decode()
        return path.read_text()
    except FileNotFoundError:
        raise InputError("file not found", source=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc.__class__.__name__}", source=str(path)) from None
    except (OSError, EOFError) as exc:  # gzip: not gzip data, or cut short
        raise InputError(f"cannot decompress: {exc.__class__.__name__} (truncated or not gzip)", source=str(path)) from None


def load_json(path: str | Path) -> Any:
    """Parse a JSON file (``.gz``: compressed); a syntax error names the file, line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc.msg}", source=str(path), field=f"line {exc.lineno}, column {exc.colno}") from None


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    a reader never sees a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; expected a file name to write", source=str(path))
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise InputError(f"cannot write here ({exc.strerror or exc.__class__.__name__})", source=str(path)) from None
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
