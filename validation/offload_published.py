"""Simulated against published speeds of expert-offloading systems.

    python validation/offload_published.py [--markdown]
    python validation/offload_published.py --fit     # fit the entries marked `calibrates`

Runs every entry of validation/offload/published.yaml (a bundled scenario, with the offload
settings and scenario fields the entry changes) and prints simulated and published tokens/s
side by side with the ratio. An entry marked ``calibrates: layer_overhead`` is the one published
point the scenario's ``offload.layer_overhead`` was fitted to (``--fit`` finds the value by
bisection and prints it; the scenario files carry it); the other entries are predictions.
Deterministic. docs/validation.md ("Offloading") holds the table this printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.files import load_yaml
from moesim.scenario.build import build
from moesim.scenario.schema import load_scenario

PUBLISHED = Path(__file__).parent / "offload" / "published.yaml"


def simulate(entry: dict, offload: dict | None = None) -> tuple[float, dict]:
    scn, path = load_scenario(entry["scenario"])
    raw = scn.model_dump() | entry.get("scenario_fields", {})
    raw["offload"] = raw["offload"] | entry.get("offload", {}) | (offload or {})
    raw["outputs"] = {"perfetto": False, "figures": False, "timeline_steps": []}
    _, m = build(scn.model_validate(raw), path).run()
    lat = m["latency_s"]
    speed = 1.0 / lat["tpot"]["mean"] if entry["metric"] == "decode" else m["prompt_tokens"] / lat["ttft"]["mean"]
    return speed, m


def fit(entry: dict, setting: str) -> float:
    """The value of ``offload.<setting>`` (seconds) at which the entry's simulated speed is the
    published one: bisection, speed falls as the overhead grows."""
    low, high = 0.0, 0.1
    for _ in range(40):
        mid = (low + high) / 2
        speed, _ = simulate(entry, {setting: mid})
        low, high = (mid, high) if speed > entry["published"] else (low, mid)
    return (low + high) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--fit", action="store_true", help="fit the settings the `calibrates` entries name")
    args = parser.parse_args()
    entries = load_yaml(PUBLISHED)
    if args.fit:
        for entry in entries:
            if "calibrates" in entry:
                value = fit(entry, entry["calibrates"])
                print(f"{entry['system']}: offload.{entry['calibrates']} = {value * 1e3:.3f} ms")
        return
    rows = []
    for entry in entries:
        speed, m = simulate(entry)
        o = m["offload"]
        bound = ">" if entry.get("bound") == "lower" else ""
        role = "fit" if "calibrates" in entry else "prediction"
        rows.append((entry["system"], entry["scenario"], entry["metric"], f"{bound}{entry['published']:g}", f"{speed:.2f}",
                     f"{speed / entry['published']:.2f}", f"{o['hit_rate']:.0%}", role, entry["source"]))
    if args.markdown:
        print("| system | scenario | metric | published tok/s | simulated tok/s | sim / pub | hit rate | role | source |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in rows:
            print(f"{row[0][:60]:<62}{row[2]:<8}{row[3]:>8}{row[4]:>9}{row[5]:>7}{row[6]:>6}  {row[7]}")


if __name__ == "__main__":
    main()
