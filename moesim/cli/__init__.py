"""The ``moesim`` command.

Each sub-command lives in its own module with ``register(subparsers)``, which adds its parser
with an example in the epilog and sets ``func``. A :class:`moesim.errors.MoesimError` is a user
mistake: one line on stderr, exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from moesim import __version__
from moesim.errors import MoesimError

from moesim.cli import cost, estimate, hw, models, plan, scenario, simulate, trace, validate

_COMMANDS = (hw, models, trace, cost, estimate, simulate, scenario, plan, validate)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in epilogs as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        formatter_class=Formatter,
        description="Hardware simulator and cost-model planner for Mixture-of-Experts models.",
        epilog=(
            "examples:\n"
            "  moesim estimate --scenario mixtral-8x7b-h100x2\n"
            "  moesim simulate --scenario mixtral-8x7b-h100\n"
            "  moesim cost moe --device h100-sxm --tokens 128 --hidden 4096 --inter 14336 --topk 2 --experts 8\n"
            "  moesim hw list\n"
            "  moesim models show deepseek-v3\n"
            "\nrun 'moesim COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for command in _COMMANDS:
        command.register(sub, Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except MoesimError as exc:
        print(f"moesim: error: {exc.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
