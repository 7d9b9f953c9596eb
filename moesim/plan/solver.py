"""What every planner needs of the MILP solvers: HiGHS made quiet, seeded and single-threaded,
directly (highspy) or through PuLP.

HiGHS prints its banner on stdout when a process makes its first solver, whatever the options;
``moesim plan`` prints tables and JSON there, so the first solver is made with stdout pointed
at /dev/null.
"""

from __future__ import annotations

import functools
import os
import sys

import highspy
import pulp


@functools.cache
def quiet_banner() -> None:
    """Make the process's first HiGHS solver with stdout silenced (once)."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def highs(time_limit: float, seed: int = 0) -> highspy.Highs:
    """A quiet, single-threaded, seeded HiGHS with a time limit (seconds)."""
    quiet_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(max(time_limit, 0.01)))
    h.setOptionValue("random_seed", seed)
    h.setOptionValue("threads", 1)
    return h


def pulp_solver(time_limit: float, *, seed: int | None = None, gap: float | None = None):
    """PuLP's HiGHS (quiet, one thread, ``time_limit`` seconds, ``seed``, relative ``gap``), or
    CBC when PuLP cannot reach HiGHS; the solver's ``name`` says which."""
    options = {} if gap is None else {"gapRel": gap}
    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        quiet_banner()
        return pulp.HiGHS(msg=False, threads=1, timeLimit=time_limit, **options,
                          **({} if seed is None else {"random_seed": seed}))
    return pulp.PULP_CBC_CMD(msg=False, threads=1, timeLimit=max(int(time_limit), 1), **options)
