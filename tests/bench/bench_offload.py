"""Benchmark: the expert-offloading simulator's speed under each policy.

    python tests/bench/bench_offload.py [--tokens 2000]

Mixtral-8x7B on one RTX A5000 (the bundled mixtral-8x7b-offload-a5000 scenario: 2-bit HQQ
experts, token-level routing from Mixtral's profile), one request decoding ``--tokens`` tokens
after a one-token prompt, an expert cache of 2x the active experts per layer (4 of 8), no
eager-framework overhead (``layer_overhead`` 0), under every residency, prefetch and miss policy. Prints, per policy, the wall time per simulated
token, the simulated tokens/s and hit rate, and the total wall time. Target (issue 5): all
policies together under 30 s on the shared 2-core machine. Numba compiles on the first run of a
policy's kernels; a warm-up run of 20 tokens per policy comes first and is not timed.
"""

from __future__ import annotations

import argparse
import time

from moesim.scenario.build import build
from moesim.scenario.offload import POLICY_PRESETS as POLICIES
from moesim.scenario.schema import load_scenario

def _simulation(scn, path, policy: dict, tokens: int):
    raw = scn.model_dump()
    raw["offload"] = raw["offload"] | {"cache_experts": 4, "top_n": None, "accuracy": 1.0, "layer_overhead": 0.0} | policy
    raw["workload"] = {"arrivals": "batch", "batch": 1, "prompt": 1, "output": tokens}
    raw["outputs"] = {"perfetto": False, "figures": False, "timeline_steps": []}
    return build(scn.model_validate(raw), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="decoded tokens per policy (default 2000)")
    args = parser.parse_args()
    scn, path = load_scenario("mixtral-8x7b-offload-a5000")
    for policy in POLICIES.values():
        _simulation(scn, path, policy, 20).run()
    print(f"{'policy':<44}{'wall s':>8}{'us / token':>12}{'sim tok/s':>11}{'hit rate':>10}")
    total = 0.0
    for name, policy in POLICIES.items():
        sim = _simulation(scn, path, policy, args.tokens)
        start = time.perf_counter()
        _, metrics = sim.run()
        wall = time.perf_counter() - start
        total += wall
        print(f"{name:<44}{wall:>8.2f}{wall / args.tokens * 1e6:>12.0f}{metrics['throughput']['output_tokens_per_s']:>11.2f}"
              f"{metrics['offload']['hit_rate']:>10.3f}")
    print(f"{'all policies':<44}{total:>8.2f}   (target: under 30 s)")


if __name__ == "__main__":
    main()
