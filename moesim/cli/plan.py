"""``moesim plan placement|layout|offload``: planners that write a recommendation (plan.yaml).

Each verb lives in its own module (``plan_<verb>.py``) with ``register(verbs, formatter)``;
every verb writes the same plan file (:mod:`moesim.plan.recommend`) with ``-o``, and ``export``
(in ``plan_placement.py``) writes any plan in the files and flags frameworks read.
"""

from __future__ import annotations

from moesim.cli import plan_layout, plan_offload, plan_placement

_VERBS = (plan_placement, plan_layout, plan_offload)


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "plan", help="plan expert placement, parallel layout or offloading; write plan.yaml; export it",
        formatter_class=formatter,
        epilog=("examples:\n"
                "  moesim plan placement --scenario deepseek-v3-decode-ep64 -o plan.yaml\n"
                "  moesim plan export plan.yaml --format sglang -o expert_location.json\n"
                "run 'moesim plan VERB --help' for a verb's options."),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for verb in _VERBS:
        verb.register(verbs, formatter)
