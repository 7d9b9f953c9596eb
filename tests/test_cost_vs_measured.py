"""First check of the cost model against measured H100 timings (shared/data/aiconfigurator).

Reports the median and p90 absolute percentage error of the MoE layer (vLLM fused MoE, every
dtype, EP and TP size in the table) and of dense GEMMs on balanced rows, and fails when a
median is above 25%. A deterministic sample of rows keeps it quick; run with ``-s`` to see the
table. The H100 profile's efficiency figures were set against these same tables, so this is an
in-sample check: the Validation issue splits calibration and test rows.
"""

from __future__ import annotations

import csv
import gzip
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from moesim.cost.gemm import gemm_time
from moesim.cost.moe import moe_layer_time
from moesim.hardware import catalog
from moesim.routing.counts import balanced_counts, power_law_counts

LIMIT = 0.25
SAMPLE = 1200


@pytest.fixture(scope="module")
def tables(shared_dir) -> Path:
    folder = shared_dir / "data" / "aiconfigurator" / "h100_sxm"
    if not folder.is_dir():
        pytest.skip("../shared/data/aiconfigurator/h100_sxm not found")
    return folder


def _rows(path: Path, keep) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        rows = [r for r in csv.DictReader(handle) if keep(r)]
    pick = np.random.default_rng(0).choice(len(rows), size=min(SAMPLE, len(rows)), replace=False)
    return [rows[i] for i in sorted(pick)]


def _report(title: str, errors: dict[str, list[float]]) -> dict[str, float]:
    print(f"\n{title}: |predicted - measured| / measured")
    print(f"  {'group':<12}{'rows':>6}{'median':>9}{'p90':>8}")
    medians = {}
    for group, values in sorted(errors.items()):
        e = np.abs(values)
        medians[group] = float(np.median(e))
        print(f"  {group:<12}{len(e):>6}{np.median(e):>9.1%}{np.percentile(e, 90):>8.1%}")
    return medians


def test_moe_layer_median_error_on_balanced_rows(tables):
    device = catalog.device("h100-sxm")
    rows = _rows(tables / "moe_vllm_0.19.0_moe_perf.csv.gz", lambda r: r["distribution"] == "balanced")
    errors: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        tokens, experts, k = int(r["num_tokens"]), int(r["num_experts"]), int(r["topk"])
        predicted = moe_layer_time(
            device, balanced_counts(tokens, experts, k), tokens=tokens, hidden=int(r["hidden_size"]),
            inter=int(r["inter_size"]), top_k=k, dtype=r["moe_dtype"], ep=int(r["moe_ep_size"]),
            expert_tp=int(r["moe_tp_size"]), router=False,
        ).time
        error = predicted / (float(r["latency"]) * 1e-3) - 1
        errors["all"].append(error)
        errors[r["moe_dtype"]].append(error)
    medians = _report("MoE layer, balanced routing", errors)
    assert medians["all"] <= LIMIT


def test_moe_layer_on_power_law_rows_reproduces_the_table_distribution(tables):
    device = catalog.device("h100-sxm")
    rows = _rows(tables / "moe_vllm_0.19.0_moe_perf.csv.gz",
                 lambda r: r["distribution"] == "power_law_1.2" and r["moe_dtype"] == "bfloat16")[:300]
    errors: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        tokens, experts, k, ep = int(r["num_tokens"]), int(r["num_experts"]), int(r["topk"]), int(r["moe_ep_size"])
        # The table's counts were drawn at random: average the prediction over a few draws.
        times = [moe_layer_time(device, power_law_counts(tokens, experts, k, 1.2, ep=ep, rng=np.random.default_rng(s)),
                                tokens=tokens, hidden=int(r["hidden_size"]), inter=int(r["inter_size"]), top_k=k,
                                dtype="bfloat16", ep=ep, expert_tp=int(r["moe_tp_size"]), router=False).time
                 for s in range(3)]
        errors["all"].append(np.mean(times) / (float(r["latency"]) * 1e-3) - 1)
    medians = _report("MoE layer, power-law 1.2 routing (bf16)", errors)
    assert medians["all"] <= LIMIT


def test_gemm_median_error(tables):
    device = catalog.device("h100-sxm")
    rows = _rows(tables / "gemm_vllm_0.19.0_gemm_perf.csv.gz", lambda r: True)
    errors: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        predicted = gemm_time(device, int(r["m"]), int(r["n"]), int(r["k"]), r["gemm_dtype"]).time
        error = predicted / (float(r["latency"]) * 1e-3) - 1
        errors["all"].append(error)
        errors[r["gemm_dtype"]].append(error)
    medians = _report("dense GEMM", errors)
    assert medians["all"] <= LIMIT
