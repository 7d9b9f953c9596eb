"""Request streams from a scenario's workload: arrival processes, lengths, CSV traces."""

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from moesim.scenario.schema import WorkloadSpec, load_scenario
from moesim.sim.workload import read_arrival_trace


def _gaps(spec: WorkloadSpec, seed: int = 0) -> np.ndarray:
    return np.diff(spec.make_requests(seed).arrival)


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    spec = WorkloadSpec(arrivals="poisson", rate=20.0, requests=50_000, prompt=512, output=128)
    gaps = _gaps(spec)
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.02)  # exponential: cv 1


def test_gamma_arrivals_are_burstier_at_the_same_rate():
    spec = WorkloadSpec(arrivals="gamma", rate=20.0, cv=3.0, requests=50_000, prompt=512, output=128)
    gaps = _gaps(spec)
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.08)


def test_lengths_follow_mean_cv_and_cap_and_the_seed_fixes_everything():
    spec = WorkloadSpec(arrivals="poisson", rate=5.0, requests=40_000, prompt={"mean": 1000, "cv": 0.5, "max": 100_000},
                        output={"mean": 200, "cv": 2.0, "max": 1000})
    r = spec.make_requests(7)
    assert r.prompt.mean() == pytest.approx(1000, rel=0.02)
    assert r.prompt.std() / r.prompt.mean() == pytest.approx(0.5, rel=0.05)
    assert r.output.max() == 1000 and r.output.min() >= 1
    again = spec.make_requests(7)
    assert all(np.array_equal(getattr(r, f), getattr(again, f)) for f in ("arrival", "prompt", "output"))
    assert not np.array_equal(spec.make_requests(8).arrival, r.arrival)


def test_batch_workload_arrives_at_once():
    r = WorkloadSpec(batch=64, prompt=2048, output=256).make_requests(0)
    assert len(r) == 64 and not r.arrival.any() and r.offered_rate == float("inf")


def test_incomplete_workloads_are_refused():
    with pytest.raises(ValueError, match="needs rate, requests"):
        WorkloadSpec(arrivals="poisson", prompt=1, output=1)
    with pytest.raises(ValueError, match="needs trace"):
        WorkloadSpec(arrivals="trace")


def test_csv_trace_is_read_sorted_and_relative_to_the_scenario(tmp_path):
    (tmp_path / "arrivals.csv").write_text("arrival_s,prompt_tokens,output_tokens,user\n0.5,100,10,a\n0.1,200,20,b\n")
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\nmodel: mixtral-8x7b\ncluster: dgx-h100\nworkload: {arrivals: trace, trace: arrivals.csv}\n")
    spec, path = load_scenario(str(scenario))
    r = spec.workload.make_requests(0, path.parent)
    assert r.arrival.tolist() == [0.1, 0.5] and r.prompt.tolist() == [200, 100] and r.output.tolist() == [20, 10]


@pytest.mark.parametrize("text, message", [
    ("time,prompt_tokens,output_tokens\n0,1,1\n", "missing arrival_s"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,x\n", "line 2"),
    ("arrival_s,prompt_tokens,output_tokens\n-1,1,1\n", "line 2: arrival_s must be >= 0"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no requests"),
])
def test_corrupt_csv_traces_get_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_arrival_trace(path)
    assert str(path) in info.value.line()


def test_scenario_schema_exports_json_schema(tmp_path, capsys):
    out = tmp_path / "scenario.schema.json"
    assert main(["scenario", "schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema["title"] == "Scenario" and "workload" in schema["properties"]
    assert schema["$defs"]["WorkloadSpec"]["properties"]["arrivals"]["enum"] == ["batch", "poisson", "gamma", "trace"]
    capsys.readouterr()
    assert main(["scenario", "list", "--json"]) == 0
    assert "mixtral-8x7b-h100x2" in {row["name"] for row in json.loads(capsys.readouterr().out)}


def test_a_scenario_with_an_incomplete_workload_exits_2_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: mixtral-8x7b\ncluster: dgx-h100\nworkload: {arrivals: poisson, prompt: 10, output: 10}\n")
    assert main(["estimate", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "workload" in err and "rate" in err
