"""Fit the presets' routing profiles to published routing statistics.

    python validation/fit_routing_profiles.py            # fit, write, print the table
    python validation/fit_routing_profiles.py --check    # fit and compare with the bundled files

Reads validation/routing/published.yaml (each number with its paper and table), fits each
model's ``skew`` and ``locality`` (one value for every layer) to its SRP at segment length 16
and its SCH at a cache of twice the active experts with 16 tokens of lookahead (Liang et al.,
arXiv:2505.16056) -- for Mixtral-8x7B also to the mean repetition rates of Jiang et al.,
arXiv:2401.04088 Table 5 -- then measures the statistics it was not fitted to (SCH at
lookahead 4, 64 and 256; OLMoE's SRP at other segment lengths; Mixtral's per-layer repetition
rates) on a fresh trace of the fitted profile. Writes
moesim/routing/profiles/<preset>.yaml atomically; presets that borrow a relative's fit get its
parameters and say so. Deterministic: the same inputs give the same files.

The fit runs on four MoE layers of each model's router shape: the parameters are the same at
every layer, and the statistics are means over layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from moesim.files import atomic_write, load_yaml
from moesim.models.presets import load_model
from moesim.routing import stats
from moesim.routing.fit import Targets, fit, measure
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import PROFILES_DIR, model_profile

HERE = Path(__file__).parent
FIT_TOKENS = 20_000
CHECK_TOKENS = 40_000
FIT_LAYERS = 4


def _midpoint(value) -> float:
    return float(np.mean(value)) / 100.0


def _fit_one(name: str, entry: dict, published: dict) -> dict:
    arch = load_model(name)
    shape = model_profile(arch).model_copy(update={"num_layers": FIT_LAYERS, "skew": 0.5, "locality": 0.2, "affinity": 0.0,
                                                   "source": "", "fitted_to": {}})
    segment, rho = published["fit_segment"], published["fit_cache_multiple"]
    sch = {int(m): _midpoint(v) for m, v in entry["sch"].items()}
    table5 = entry.get("mixtral_table5", {})
    targets = Targets(srp={segment: entry["srp"] / 100.0}, sch={rho: sch[segment]}, sch_future=segment,
                      first_choice_repeat=_midpoint([r["first"] for r in table5.values()]) if table5 else None,
                      overlap_rate=_midpoint([r["first_or_second"] for r in table5.values()]) if table5 else None)
    result = fit(shape, targets, tokens=FIT_TOKENS, seed=0)
    profile = result.profile
    records = {key: {"target": round(target, 4), "achieved": round(achieved, 4)} for key, target, achieved in result.table()}
    ids = generate_tokens(profile, CHECK_TOKENS, seed=1)
    E = profile.num_experts
    for m, target in sorted(sch.items()):
        if m == segment:
            continue
        got = measure(ids, E, Targets(sch={rho: target}, sch_future=m))
        key = next(iter(got))
        records[key] = {"target": round(target, 4), "achieved": round(got[key], 4), "held_out": True}
    for m, value in sorted(entry.get("srp_by_segment", {}).items()):
        if int(m) == segment:
            continue
        got = float(np.mean(stats.srp(ids, E, int(m))))
        records[f"srp@{m}"] = {"target": round(value / 100.0, 4), "achieved": round(got, 4), "held_out": True}
    if table5:
        full = profile.model_copy(update={"num_layers": len(arch.moe_layers)})
        full_ids = generate_tokens(full, CHECK_TOKENS, seed=1)
        first, overlap = stats.first_choice_repeat(full_ids), stats.overlap_rate(full_ids)
        for layer, rates in sorted(table5.items()):
            records[f"first_choice_repeat@L{layer}"] = {"target": round(_midpoint(rates["first"]), 4),
                                                        "achieved": round(float(first[int(layer)]), 4), "held_out": True}
            records[f"overlap_rate@L{layer}"] = {"target": round(_midpoint(rates["first_or_second"]), 4),
                                                 "achieved": round(float(overlap[int(layer)]), 4), "held_out": True}
    cite = published["sources"]["lrc"]
    source = f"fitted to {entry['lrc_name']} in {cite}"
    if table5:
        source += f" and to the layer and domain means of {published['sources']['mixtral_table5']}"
    return {"skew": round(float(profile.skew), 4), "locality": round(float(profile.locality), 4), "seq_len": profile.seq_len,
            "source": source, "fitted_to": records}


def _render(name: str, data: dict) -> str:
    head = ("# Routing profile of the moesim preset '%s'. Written by validation/fit_routing_profiles.py\n"
            "# from validation/routing/published.yaml; edit those, not this file.\n" % name)
    return head + yaml.safe_dump(data, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the bundled profiles instead of writing them")
    args = parser.parse_args(argv)
    published = load_yaml(HERE / "routing" / "published.yaml")
    fitted: dict[str, dict] = {}
    for name, entry in published["models"].items():
        fitted[name] = _fit_one(name, entry, published)
    for name, borrow in published["borrowed"].items():
        base = fitted[borrow["from"]]
        fitted[name] = {"skew": base["skew"], "locality": base["locality"], "seq_len": base["seq_len"],
                        "source": f"not measured: borrows the fit of {borrow['from']} ({borrow['why']})"}
    stale = []
    print("| preset | skew | locality | statistic | target | achieved | |")
    print("|---|---|---|---|---|---|---|")
    for name, data in fitted.items():
        text = _render(name, data)
        path = PROFILES_DIR / f"{name}.yaml"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            atomic_write(path, text)
        rows = data.get("fitted_to") or {"(borrowed)": None}
        for i, (stat, rec) in enumerate(rows.items()):
            lead = f"| {name} | {data['skew']:.3f} | {data['locality']:.3f} |" if i == 0 else "| | | |"
            if rec is None:
                print(f"{lead} {data['source']} | | | |")
            else:
                kind = "held out" if rec.get("held_out") else "fitted"
                print(f"{lead} {stat} | {rec['target']:.3f} | {rec['achieved']:.3f} | {kind} |")
    if stale:
        print(f"stale bundled profiles (re-run without --check): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
