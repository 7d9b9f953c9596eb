"""How decode speed changes with the HBM given to the expert cache, for each offloading policy.

    python validation/offload_cache_sweep.py [--tokens 300] [--out docs/offload_cache_sweep.png]

Mixtral-8x7B on one RTX A5000 (the bundled mixtral-8x7b-offload-a5000 scenario) with 3-bit HQQ
experts (low-precision copies in 2-bit HQQ), one request of a 16-token prompt and ``--tokens``
output tokens, token-level routing from Mixtral's profile; the expert slots per layer go from 0
to all 8, and every residency, prefetch and miss policy runs at each size, with no
eager-framework overhead (``layer_overhead`` 0: kernels back to back). Writes the figure
and a CSV of the same numbers beside it (atomically). Deterministic: the same inputs give the
same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moesim.files import atomic_write
from moesim.report.figures import cache_sweep
from moesim.scenario.build import build
from moesim.scenario.offload import POLICY_PRESETS as POLICIES
from moesim.scenario.schema import load_scenario

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--out", default="docs/offload_cache_sweep.png")
    args = parser.parse_args()
    scn, path = load_scenario("mixtral-8x7b-offload-a5000")
    series, rows = {}, ["policy,slots_per_layer,cache_gib,decode_tokens_per_s,hit_rate"]
    for name, policy in POLICIES.items():
        xs, ys = [], []
        for slots in range(9):
            raw = scn.model_dump()
            # an engine whose kernels run back to back: the scenario's fitted eager-framework overhead
            # is mixtral-offloading's, not the other systems'
            raw["offload"] = raw["offload"] | {"cache_experts": slots, "top_n": None, "accuracy": 1.0,
                                               "layer_overhead": 0.0} | policy
            raw["dtypes"] = raw["dtypes"] | {"experts": "int3_hqq"}
            raw["workload"] = {"arrivals": "batch", "batch": 1, "prompt": 16, "output": args.tokens}
            raw["outputs"] = {"perfetto": False, "figures": False, "timeline_steps": []}
            _, m = build(scn.model_validate(raw), path).run()
            gib = m["offload"]["tiers"]["hbm_bytes"]["expert_cache"] / 2**30
            speed = 1.0 / m["latency_s"]["tpot"]["mean"]
            xs.append(gib)
            ys.append(speed)
            rows.append(f"{name},{slots},{gib:.3f},{speed:.4f},{m['offload']['hit_rate']:.4f}")
        series[name] = (np.array(xs), np.array(ys))
        print(f"{name:<28}" + " ".join(f"{y:6.2f}" for y in ys))
    out = Path(args.out)
    cache_sweep(series, out, title="Mixtral-8x7B, 3-bit HQQ experts, one RTX A5000 (PCIe 4.0), batch 1")
    atomic_write(out.with_suffix(".csv"), "\n".join(rows) + "\n")
    print(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
