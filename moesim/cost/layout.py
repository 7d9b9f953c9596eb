"""Parallel layouts: how a model's work is cut over devices, and whether the cut is possible.

Conventions (those of vLLM / SGLang serving with expert parallelism):

- attention runs tensor-parallel over ``tp`` devices, replicated ``dp`` times (data-parallel
  attention), in ``pp`` pipeline stages: ``devices = tp * dp * pp``;
- inside a stage the MoE layers use the same ``tp * dp`` devices, as ``ep`` expert-parallel
  ranks each cutting its experts ``expert_tp`` ways: ``ep * expert_tp == tp * dp``;
- when ``dp`` is not given it is ``ep * expert_tp / tp`` (at least 1), and ``expert_tp`` defaults
  to 1 when EP is used, else to ``tp`` (experts sharded like the dense layers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moesim.errors import LayoutError
from moesim.models.arch import ModelArch


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    expert_tp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def stage_devices(self) -> int:
        """Devices of one pipeline stage (the MoE group)."""
        return self.tp * self.dp

    def to_dict(self) -> dict:
        return asdict(self) | {"devices": self.devices}


def make_layout(
    arch: ModelArch,
    *,
    tp: int = 1,
    ep: int = 1,
    dp: int | None = None,
    pp: int = 1,
    expert_tp: int | None = None,
    devices_available: int | None = None,
    cluster: str = "",
) -> Layout:
    """Complete and check a layout for ``arch``; raises :class:`LayoutError` naming the option
    at fault."""
    for name, value in (("--tp", tp), ("--ep", ep), ("--pp", pp), ("--dp", dp), ("--expert-tp", expert_tp)):
        if value is not None and value < 1:
            raise LayoutError(f"must be a positive integer, got {value}", field=name)
    if expert_tp is None:
        expert_tp = 1 if ep > 1 else tp
    if dp is None:
        dp = max(1, (ep * expert_tp) // tp)
    layout = Layout(tp=tp, dp=dp, pp=pp, ep=ep, expert_tp=expert_tp)
    att = arch.attention
    if att.num_heads % tp:
        raise LayoutError(f"TP {tp} does not divide the {att.num_heads} attention heads of {arch.name}", field="--tp")
    kv = att.num_kv_heads
    if att.kind != "mla" and (kv % tp if tp <= kv else tp % kv):
        raise LayoutError(f"TP {tp} is neither a divisor nor a multiple of the {kv} KV heads of {arch.name}", field="--tp")
    if pp > arch.num_layers:
        raise LayoutError(f"PP {pp} exceeds the {arch.num_layers} layers of {arch.name}", field="--pp")
    if arch.moe is not None:
        if arch.moe.num_experts % ep:
            raise LayoutError(f"EP {ep} does not divide the {arch.moe.num_experts} experts of {arch.name}", field="--ep")
        if arch.moe.expert_inter % expert_tp:
            raise LayoutError(
                f"expert TP {expert_tp} does not divide the expert intermediate size {arch.moe.expert_inter}", field="--expert-tp"
            )
        if ep * expert_tp != tp * dp:
            raise LayoutError(
                f"EP {ep} x expert TP {expert_tp} = {ep * expert_tp} must equal TP {tp} x DP {dp} = {tp * dp} "
                "(the MoE layers use the attention's devices)",
                field="--ep",
            )
    elif ep > 1:
        raise LayoutError(f"{arch.name} has no experts; EP must be 1", field="--ep")
    if devices_available is not None and layout.devices > devices_available:
        raise LayoutError(
            f"layout needs {layout.devices} devices (TP {tp} x DP {dp} x PP {pp}); cluster {cluster} has {devices_available}",
            field="--tp",
        )
    return layout
