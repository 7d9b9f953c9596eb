"""Pipeline stages: which contiguous run of layers each pipeline stage holds.

The partition is an ILP (PuLP, solved by HiGHS; CBC when HiGHS is missing): layers go to stages
in order, every stage gets at least one layer, each stage's weights and KV cache fit its
devices' memory, and the objective is the slowest stage's time, which sets a pipeline's pace
(with ``pp`` micro-batches in flight a token advances once per ``pp`` x slowest stage).

The balance is not a matter of counting layers: MoE and dense layers cost different times and
bytes (DeepSeek-V3's first three layers are dense), the first stage also holds the token
embedding and the last the LM head (time and bytes), and every stage but the last sends its
activations on to the next.

Formulation: ``z[l, s] = 1`` when layer ``l`` sits in stage ``s`` or an earlier one. ``z`` falls
(non-strictly) along the layers and rises along the stages, so each stage's layers
``x[l, s] = z[l, s] - z[l, s-1]`` are one contiguous run; constraints bound each stage's memory
and time by the budget and by ``T``, and ``T`` is minimised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pulp

from moesim.errors import InputError
from moesim.plan.solver import pulp_solver


@dataclass
class StageProblem:
    """Per layer, on one device of the stage that holds it: ``layer_time`` (s) and
    ``layer_memory`` (bytes: weights and KV cache). ``first_time`` / ``first_memory``: what the
    first stage adds (the embedding), ``last_time`` / ``last_memory`` what the last adds (LM
    head, final norm), ``stage_memory``: what every stage holds regardless of its layers
    (activations, framework reserve), ``hop_time``: a stage's send to the next (s),
    ``memory_budget``: bytes a device may use."""

    layer_time: np.ndarray
    layer_memory: np.ndarray
    stages: int
    memory_budget: float
    first_time: float = 0.0
    first_memory: float = 0.0
    last_time: float = 0.0
    last_memory: float = 0.0
    stage_memory: float = 0.0
    hop_time: float = 0.0

    @property
    def layers(self) -> int:
        return len(self.layer_time)

    def fixed(self, s: int) -> tuple[float, float]:
        """(time, memory) stage ``s`` has whatever layers it holds."""
        last = s == self.stages - 1
        time = (self.first_time if s == 0 else 0.0) + (self.last_time if last else self.hop_time)
        memory = self.stage_memory + (self.first_memory if s == 0 else 0.0) + (self.last_memory if last else 0.0)
        return time, memory


@dataclass
class StagePartition:
    """``stages``: ``[first_layer, end_layer)`` per stage; ``stage_time`` (s) and
    ``stage_memory`` (bytes per device) of each; ``status``: the solver's word (``Optimal``,
    ``Time limit reached``, ``even split``...); ``gap``: relative distance to the solver's
    bound (0 = proven optimal)."""

    stages: list[tuple[int, int]]
    stage_time: list[float]
    stage_memory: list[float]
    status: str
    solver: str = ""
    bound: float | None = None
    gap: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def slowest(self) -> float:
        """The slowest stage's time (s): the pipeline's pace."""
        return max(self.stage_time)

    @property
    def fits(self) -> bool:
        return bool(self.stage_memory) and all(np.isfinite(self.stage_memory))


def even_split(layers: int, stages: int) -> list[tuple[int, int]]:
    """Megatron-Core's default: ``layers / stages`` each, the first stages one more when it does
    not divide."""
    if not 1 <= stages <= layers:
        raise InputError(f"cannot cut {layers} layers into {stages} pipeline stages", field="--pp")
    base, extra = divmod(layers, stages)
    bounds, first = [], 0
    for s in range(stages):
        end = first + base + (1 if s < extra else 0)
        bounds.append((first, end))
        first = end
    return bounds


def stage_loads(problem: StageProblem, stages: list[tuple[int, int]]) -> tuple[list[float], list[float]]:
    """Time (s) and memory (bytes per device) of each stage of a partition."""
    times, memories = [], []
    for s, (a, b) in enumerate(stages):
        time, memory = problem.fixed(s)
        times.append(time + float(problem.layer_time[a:b].sum()))
        memories.append(memory + float(problem.layer_memory[a:b].sum()))
    return times, memories


def evaluate_split(problem: StageProblem, stages: list[tuple[int, int]], status: str = "even split") -> StagePartition:
    times, memories = stage_loads(problem, stages)
    return StagePartition(stages, times, memories, status)


def solve_stages(problem: StageProblem, *, time_limit: float = 10.0) -> StagePartition | None:
    """The partition minimising the slowest stage with every stage's memory within budget, or
    ``None`` when no contiguous partition fits memory (the solver proves it infeasible)."""
    L, S = problem.layers, problem.stages
    if not 1 <= S <= L:
        raise InputError(f"cannot cut {L} layers into {S} pipeline stages", field="--pp")
    if S == 1:
        part = evaluate_split(problem, [(0, L)], "single stage")
        return part if part.stage_memory[0] <= problem.memory_budget else None
    t = np.asarray(problem.layer_time, dtype=float)
    m = np.asarray(problem.layer_memory, dtype=float)
    # scaled to O(1) so HiGHS's tolerances mean the same on every model size
    t_unit = max(float(t.max()), problem.last_time, problem.first_time, problem.hop_time, 1e-12)
    m_unit = max(float(m.max()), 1.0)
    lp = pulp.LpProblem("pipeline_stages", pulp.LpMinimize)
    z = {(l, s): lp.add_variable(f"z_{l}_{s}", cat="Binary") for l in range(L) for s in range(S - 1)}

    def Z(l: int, s: int):
        return 0 if s < 0 else (1 if s == S - 1 else z[l, s])

    T = lp.add_variable("slowest", lowBound=0)
    lp += T
    lp += z[0, 0] == 1  # the first layer opens the first stage
    lp += z[L - 1, S - 2] == 0  # and the last closes the last
    for s in range(S - 1):
        for l in range(L - 1):
            lp += z[l, s] >= z[l + 1, s]
        if s < S - 2:
            for l in range(L):
                lp += z[l, s] <= z[l, s + 1]
    for s in range(S):
        x = [Z(l, s) - Z(l, s - 1) for l in range(L)]
        fixed_time, fixed_memory = problem.fixed(s)
        lp += pulp.lpSum(x) >= 1, f"nonempty_{s}"
        lp += pulp.lpSum(float(t[l] / t_unit) * x[l] for l in range(L)) + fixed_time / t_unit <= T, f"time_{s}"
        lp += (pulp.lpSum(float(m[l] / m_unit) * x[l] for l in range(L))
               <= (problem.memory_budget - fixed_memory) / m_unit), f"memory_{s}"
    solver = pulp_solver(time_limit, seed=0)
    lp.solve(solver)
    status = pulp.LpStatus[lp.status]
    if status == "Infeasible":
        return None
    if status not in ("Optimal", "Not Solved") or z[0, 0].value() is None:
        raise RuntimeError(f"pipeline-stage ILP ended with status {status}")
    bounds, first = [], 0
    for s in range(S - 1):
        end = int(sum(round(z[l, s].value()) for l in range(L)))
        bounds.append((first, end))
        first = end
    bounds.append((first, L))
    part = evaluate_split(problem, bounds, status)
    part.solver, part.bound, part.gap = _report(lp, solver, t_unit, part.slowest)
    return part


def _report(lp, solver, t_unit: float, objective: float) -> tuple[str, float | None, float | None]:
    """Solver name, dual bound (s) and relative gap, as far as the solver says."""
    model = getattr(lp, "solverModel", None)
    if model is not None and hasattr(model, "getInfo"):
        info = model.getInfo()
        bound = float(info.mip_dual_bound) * t_unit
        gap = max(0.0, (objective - bound) / objective) if objective > 0 else 0.0
        # below HiGHS's default relative gap tolerance (1e-4) the solve counts as optimal
        return f"HiGHS {model.version()} (PuLP)", bound, (0.0 if gap < 1e-4 else gap)
    optimal = pulp.LpStatus[lp.status] == "Optimal"
    return f"{solver.name} (PuLP)", objective if optimal else None, 0.0 if optimal else None
