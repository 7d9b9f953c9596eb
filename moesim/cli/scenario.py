"""``moesim scenario list|schema``: the bundled scenarios and the scenario file's JSON Schema."""

from __future__ import annotations

import json

from moesim.cli.output import add_json_options, console, emit_json, table
from moesim.files import atomic_write
from moesim.scenario.schema import Scenario, bundled_scenarios, load_scenario


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "scenario", help="list the bundled scenarios, export the scenario JSON Schema", formatter_class=formatter,
        epilog="examples:\n  moesim scenario list\n  moesim scenario schema -o scenario.schema.json",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    listing = verbs.add_parser("list", help="list the bundled scenarios", formatter_class=formatter,
                               epilog="example:\n  moesim scenario list --json")
    add_json_options(listing)
    listing.set_defaults(func=_list)
    schema = verbs.add_parser("schema", help="print or write the JSON Schema of scenario files (for editors)",
                              formatter_class=formatter,
                              epilog=("example:\n  moesim scenario schema -o scenario.schema.json\n"
                                      "  (VS Code: map it to scenarios/*.yaml under yaml.schemas)"))
    schema.add_argument("-o", "--output", help="write the schema here instead of printing it")
    schema.set_defaults(func=_schema)


def _list(args) -> int:
    rows = []
    for name in bundled_scenarios():
        scenario, _ = load_scenario(name)
        rows.append({"name": name, "model": scenario.model, "cluster": scenario.cluster,
                     "arrivals": scenario.workload.arrivals, "description": scenario.description})
    if args.json:
        emit_json(rows)
        return 0
    table("bundled scenarios", ["name", "model", "cluster", "arrivals", "description"],
          [[r[k] for k in ("name", "model", "cluster", "arrivals", "description")] for r in rows])
    return 0


def _schema(args) -> int:
    text = json.dumps(Scenario.model_json_schema(), indent=2) + "\n"
    if args.output:
        atomic_write(args.output, text)
        console.print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0
