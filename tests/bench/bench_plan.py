"""Benchmark: the placement MILP at DeepSeek-V3 scale.

    python tests/bench/bench_plan.py [--time-limit 55] [--tokens 8192]

58 MoE layers x 256 experts (8 routing groups, top-8), 64 GPUs in 8 nodes, 320 physical slots
(64 redundant: the issue's 32 redundant slots make 288, which do not split evenly over 64 GPUs,
and SGLang / EPLB need an equal count per GPU). Loads and co-activation come from a token-level
trace of the DeepSeek-V3 routing profile. Prints, for EPLB hierarchical, EPLB global and the
MILP: wall time, mean and worst max / mean GPU load, inter-node dispatch bytes per token (all
layers), and for the MILP its solver status, the gap against the best bound and how many
layers kept EPLB's placement. Target (issue 6): the whole plan in at most 60 s on a 2-core
machine, no less balanced than either EPLB policy, with less inter-node traffic than the
balanced one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moesim.models.presets import load_model
from moesim.plan.placement import PlacementProblem, evaluate, planners
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import model_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=55.0, help="the MILP's seconds in all")
    parser.add_argument("--tokens", type=int, default=8192, help="trace tokens the loads are counted on")
    args = parser.parse_args()
    arch = load_model("deepseek-v3")
    trace = generate_tokens(model_profile(arch), args.tokens, seed=0)
    layers, experts = trace.shape[1], arch.moe.num_experts
    loads = np.stack([np.bincount(trace[:, layer].ravel()[trace[:, layer].ravel() >= 0], minlength=experts)
                      for layer in range(layers)]).astype(np.float64)
    problem = PlacementProblem(loads, gpus=64, nodes=8, slots=320, groups=8, trace=trace,
                               token_bytes=arch.hidden * 1.0)  # fp8 dispatch: one byte an element
    print(f"DeepSeek-V3: {layers} layers x {experts} experts, 64 GPUs in 8 nodes, 320 slots, {args.tokens:,} tokens")
    print(f"{'method':<20}{'seconds':>9}{'imbalance':>11}{'worst':>9}{'inter-node KB/token':>21}   solver")
    registry = planners()
    for name in ("eplb_hierarchical", "eplb_global", "ilp"):
        planner = registry[name](time_limit=args.time_limit) if name == "ilp" else registry[name]()
        start = time.perf_counter()
        plan = planner.plan(problem)
        seconds = time.perf_counter() - start
        score = evaluate(problem, plan)
        solver = ""
        if plan.solver:
            s = plan.solver
            solver = (f"{'/'.join(s['status'])}, gap {s['gap']:.1%} (worst layer {s['worst_gap']:.1%}), "
                      f"{s['layers_kept_eplb']} of {layers} layers kept EPLB's")
        print(f"{name:<20}{seconds:>9.1f}{score['imbalance']:>11.4f}{score['worst_imbalance']:>9.4f}"
              f"{score['inter_node_bytes_per_token'] / 1e3:>21,.1f}   {solver}")


if __name__ == "__main__":
    main()
