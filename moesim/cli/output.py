"""What every command shares: printing tables, JSON to stdout or a file written atomically."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from moesim.files import atomic_write

console = Console(highlight=False)


def table(title: str, columns: list[str], rows: list[list[str]], *, right: set[int] | None = None) -> None:
    """Print a rich table; columns whose index is in ``right`` are right-aligned (numbers)."""
    out = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, name in enumerate(columns):
        out.add_column(name, justify="right" if right and i in right else "left")
    for row in rows:
        out.add_row(*row)
    console.print(out)


def emit_json(data, path: str | None = None) -> None:
    """Write ``data`` as JSON to ``path`` (atomically) or to stdout."""
    text = json.dumps(data, indent=2, sort_keys=False, default=float) + "\n"
    if path:
        atomic_write(path, text)
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def add_json_options(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("-o", "--output-file", metavar="FILE", help="write the JSON result to FILE (atomically)")
