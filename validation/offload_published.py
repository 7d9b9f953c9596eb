"""Simulated against published speeds of expert-offloading systems.

    python validation/offload_published.py [--markdown]

Runs every entry of validation/offload/published.yaml (a bundled scenario, with the offload
settings the entry changes) and prints simulated and published tokens/s side by side with
the ratio. Deterministic. docs/validation.md ("Offloading") holds the table this printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.files import load_yaml
from moesim.scenario.build import build
from moesim.scenario.schema import load_scenario

PUBLISHED = Path(__file__).parent / "offload" / "published.yaml"


def simulate(entry: dict) -> tuple[float, dict]:
    scn, path = load_scenario(entry["scenario"])
    raw = scn.model_dump()
    raw["offload"] = raw["offload"] | entry.get("offload", {})
    raw["outputs"] = {"perfetto": False, "figures": False, "timeline_steps": []}
    _, m = build(scn.model_validate(raw), path).run()
    lat = m["latency_s"]
    speed = 1.0 / lat["tpot"]["mean"] if entry["metric"] == "decode" else m["prompt_tokens"] / lat["ttft"]["mean"]
    return speed, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    rows = []
    for entry in load_yaml(PUBLISHED):
        speed, m = simulate(entry)
        o = m["offload"]
        bound = ">" if entry.get("bound") == "lower" else ""
        rows.append((entry["system"], entry["scenario"], entry["metric"], f"{bound}{entry['published']:g}", f"{speed:.2f}",
                     f"{speed / entry['published']:.2f}", f"{o['hit_rate']:.0%}", entry["source"]))
    if args.markdown:
        print("| system | scenario | metric | published tok/s | simulated tok/s | sim / pub | hit rate | source |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in rows:
            print(f"{row[0][:60]:<62}{row[2]:<8}{row[3]:>8}{row[4]:>9}{row[5]:>7}{row[6]:>6}")


if __name__ == "__main__":
    main()
