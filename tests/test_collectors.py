"""The GPU collectors in validation/collect, run in --dry-run on the CPU: each writes its table
(read back through moesim.validate.tables when it recognises the family, else csv) and a
torch.profiler trace (read back through moesim.validate.kineto); the MoE run is replayed."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.hardware.catalog import device
from moesim.routing.counts import balanced_counts
from moesim.validate import kineto
from moesim.validate.replay import format_replay, replay

COLLECT = Path(__file__).resolve().parents[1] / "validation" / "collect"

try:
    from moesim.validate.tables import read_table
except ImportError:  # the table reader is another part of issue 7
    read_table = None


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"collector_{name}", COLLECT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check_table(path: Path, family: str, columns: set[str]) -> list[dict]:
    rows = _rows(path)
    assert rows and columns <= set(rows[0]) and all(float(r["latency"]) > 0 for r in rows)
    assert {r["device"] for r in rows} == {"cpu (dry run)"}
    if read_table is not None and family:
        table = read_table(path)
        assert table.family.name == family and len(table) == len(rows)
        assert np.allclose(table.seconds["latency"], [float(r["latency"]) * 1e-3 for r in rows])
    return rows


def _check_trace(path: Path, label: str, calls: int) -> list[kineto.Span]:
    trace = kineto.load_trace(path)
    assert kineto.device_work(trace) == ([], False)  # no GPU: no kernels, and nothing pretends otherwise
    spans = kineto.annotation_spans(trace, label)
    assert len(spans) == calls and all(s.on_cpu and s.busy > 0 for s in spans)
    return spans


def test_collect_gemm(tmp_path):
    out = _script("collect_gemm").main(["--dry-run", "--out", str(tmp_path)])
    rows = _check_table(out["table"], "gemm", {"gemm_dtype", "m", "n", "k", "latency", "framework", "version", "op_name"})
    assert [(r["m"], r["n"], r["k"]) for r in rows] == [("1", "64", "32"), ("8", "64", "32")]
    _check_trace(out["trace"], r"^gemm m=", 2 * 3)


def test_collect_attention(tmp_path):
    out = _script("collect_attention").main(["--dry-run", "--out", str(tmp_path)])
    _check_table(out["prefill"], "attention_prefill", {"batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim",
                                                       "kv_cache_dtype", "window_size"})
    decode = _check_table(out["decode"], "attention_decode", {"batch_size", "step", "num_heads", "num_key_value_heads"})
    assert decode[0]["step"] == "32" and decode[0]["isl"] == "1"
    _check_trace(out["trace"], r"^(prefill|decode) ", 2 * 3)


def test_collect_copy(tmp_path):
    out = _script("collect_copy").main(["--dry-run", "--out", str(tmp_path)])
    rows = _check_table(out["table"], "", {"direction", "pinned", "message_size"})
    assert out["table"].parent.name == "transfers"
    assert [(r["direction"], r["pinned"]) for r in rows[:2]] == [("h2d", "0"), ("d2h", "0")]
    _check_trace(out["trace"], r"^copy ", 2 * 2 * 3)


def test_collect_nccl(tmp_path):
    out = _script("collect_nccl").main(["--dry-run", "--out", str(tmp_path), "--ops", "all_reduce", "alltoall"])
    rows = _check_table(out["table"], "nccl", {"op_name", "nccl_dtype", "num_gpus", "message_size"})
    assert [(r["op_name"], r["message_size"], r["num_gpus"]) for r in rows] == [
        ("all_reduce", "512", "1"), ("all_reduce", "8192", "1"), ("alltoall", "512", "1"), ("alltoall", "8192", "1")]
    _check_trace(out["trace"], r"^(all_reduce|alltoall) ", 4 * 3)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    return _script("collect_moe").main(["--dry-run", "--out", str(out), "--routing", "balanced", "power_law:1.2", "profile",
                                        "--ep", "1", "2"])


def test_collect_moe_and_replay(moe_run):
    out = moe_run
    columns = {"num_tokens", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size", "moe_ep_size",
               "distribution", "moe_dtype"}
    rows = _check_table(out["table"], "moe", columns)
    assert {r["distribution"] for r in rows} == {"balanced", "power_law_1.2"}
    rows += _check_table(out["profile_table"], "moe", columns)
    assert out["profile_table"].parent.name == "routing_profile" and rows[-1]["distribution"] == "profile_mixtral-8x7b"
    cases = json.loads(out["cases"].read_text())["cases"]
    assert len(cases) == len(rows) == 2 * 3 * 2
    first = cases[0]
    assert first["tokens_per_expert"] == balanced_counts(4, 8, 2).tolist()
    assert all(sum(c["tokens_per_expert"]) == c["num_tokens"] * c["topk"] for c in cases)
    _check_trace(out["trace"], r"^moe case=", len(cases) * 3)

    result = replay(out["trace"], device("h100-sxm"))
    assert len(result.rows) == len(cases) and result.on_cpu
    assert all(r.calls == 3 and r.measured > 0 and r.predicted > 0 for r in result.rows)
    lines = format_replay(result)
    assert lines[1].startswith("DRY RUN") and lines[-1].startswith(f"{len(cases)} cases")


def test_expert_ids_follow_counts():
    collector = _script("collect_moe")
    ids = collector.expert_ids("power_law:1.2", 64, 8, 2, ep=2, seed=0, model="mixtral-8x7b", layer=0)
    assert ids.shape == (64, 2) and (ids[:, 0] != ids[:, 1]).all()  # no token picks an expert twice
    assert np.bincount(ids.ravel(), minlength=8).sum() == 128


def test_replay_errors(tmp_path):
    trace = tmp_path / "moe_trace.json"
    trace.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(InputError, match="moe_cases.json: file not found"):
        replay(trace, device("h100-sxm"))
    case = {"label": "moe case=0 tokens=4 ep=1 routing=balanced", "num_tokens": 4, "hidden_size": 64, "inter_size": 128,
            "topk": 2, "num_experts": 8, "moe_ep_size": 1, "moe_dtype": "bfloat16", "tokens_per_expert": [1] * 8}
    (tmp_path / "moe_cases.json").write_text(json.dumps({"cases": [case]}))
    with pytest.raises(InputError, match="no annotated calls named 'moe case=0"):
        replay(trace, device("h100-sxm"))
    (tmp_path / "moe_cases.json").write_text(json.dumps({"cases": [dict(case, tokens_per_expert=[1, 2])]}))
    with pytest.raises(InputError, match=r"cases\[0\]: tokens_per_expert has 2 entries"):
        replay(trace, device("h100-sxm"))


def test_cli_replay(moe_run, capsys):
    from moesim.cli import main

    assert main(["validate", "--replay", str(moe_run["trace"]), "--device", "h100-sxm", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["on_cpu"] is True and report["summary"]["cases"] == len(report["cases"]) == 12
    assert main(["validate", "--device", "h100-sxm"]) == 2  # neither --measured nor --replay
