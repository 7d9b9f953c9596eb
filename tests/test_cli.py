"""The moesim command: help, outputs, and one clear line with exit code 2 for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from moesim.cli import main


def run(*args):
    """Run the real console entry point in a subprocess (so exit codes and stderr are real)."""
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("hw", "models", "cost", "estimate"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "args",
    [("hw",), ("hw", "list"), ("hw", "show"), ("models",), ("models", "list"), ("models", "show"), ("cost",), ("cost", "moe"),
     ("cost", "gemm"), ("cost", "attention"), ("cost", "collective"), ("cost", "transfer"), ("estimate",)],
)
def test_every_command_has_help_with_an_example(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_estimate_scenario_json_and_atomic_output(tmp_path, capsys):
    target = tmp_path / "out" / "estimate.json"
    assert main(["estimate", "--scenario", "mixtral-8x7b-h100x2", "-o", str(target)]) == 0
    data = json.loads(target.read_text())
    assert data["fits"] is True and data["layout"]["tp"] == 2
    assert data["decode"]["tokens_per_s"] > 0
    assert [p.name for p in target.parent.iterdir()] == ["estimate.json"]  # no temporary left behind


def test_estimate_table_output(capsys):
    assert main(["estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2", "--ep", "4",
                 "--batch", "64", "--prompt", "2048", "--output", "256"]) == 0
    out = capsys.readouterr().out
    for text in ("memory per device", "per-layer time", "dispatch", "decode", "bottleneck", "TTFT"):
        assert text in out


def test_cost_moe_json(capsys):
    assert main(["cost", "moe", "--device", "h100-sxm", "--dtype", "bf16", "--tokens", "128", "--hidden", "4096",
                 "--inter", "14336", "--topk", "2", "--experts", "8", "--ep", "1", "--routing", "power_law:1.2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "moe" and data["time_s"] > 0
    assert {p["name"] for p in data["parts"]} >= {"router", "gate_up", "down"}


@pytest.mark.parametrize(
    "args",
    [
        ("cost", "gemm", "--device", "h100-sxm", "-m", "1", "-n", "4096", "-k", "4096"),
        ("cost", "attention", "--device", "h100-sxm", "--phase", "decode", "--batch", "8", "--kv-len", "4096", "--heads", "32", "--kv-heads", "8"),
        ("cost", "collective", "--cluster", "h100-2node", "--op", "all_to_all", "--ranks", "16", "--size", "64MiB"),
        ("cost", "transfer", "--cluster", "rtx4090-xeon", "--src", "n0.ssd0", "--dst", "n0.acc0", "--size", "352MiB"),
        ("hw", "list"), ("hw", "show", "dgx-h100"), ("hw", "show", "h100-sxm"), ("hw", "show", "nvlink4"),
        ("models", "list"), ("models", "show", "deepseek-v3"),
    ],
)
def test_commands_run(args, capsys):
    assert main(list(args)) == 0
    assert capsys.readouterr().out.strip()


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_misspelt_device_suggests_the_closest():
    _one_line_error(run("cost", "gemm", "--device", "h100-smx", "-m", "1", "-n", "2", "-k", "3"), "--device", "did you mean 'h100-sxm'")


def test_misspelt_model_suggests_the_closest():
    _one_line_error(run("models", "show", "mixtral-8x7"), "did you mean 'mixtral-8x7b'")


def test_misspelt_cluster():
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h10", "--batch", "1", "--prompt", "1", "--output", "1"),
                    "--cluster", "dgx-h100")


def test_impossible_layout():
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "3", "--batch", "1", "--prompt", "1",
                        "--output", "1"), "--tp", "does not divide the 32 attention heads")
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--ep", "3", "--batch", "1", "--prompt", "1",
                        "--output", "1"), "--ep", "does not divide the 8 experts")


def test_units_that_do_not_parse():
    result = run("cost", "collective", "--cluster", "dgx-h100", "--op", "all_reduce", "--ranks", "8", "--size", "12 XB")
    assert result.returncode == 2 and "--size" in result.stderr and "Traceback" not in result.stderr


def test_malformed_scenario_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    _one_line_error(run("estimate", "--scenario", str(bad)), str(bad), "malformed YAML", "line")


def test_scenario_with_a_wrong_field(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: x\nmodel: mixtral-8x7b\ncluster: dgx-h100\nworkload: {batch: 0, prompt: 1, output: 1}\n")
    _one_line_error(run("estimate", "--scenario", str(bad)), str(bad), "workload.batch")
    bad.write_text("name: x\nmodel: mixtral-8x7b\ncluster: dgx-h100\nworkload: {batch: 1, prompt: 1, output: 1}\nparalel: {tp: 2}\n")
    _one_line_error(run("estimate", "--scenario", str(bad)), "paralel", "unknown field")


def test_bad_hardware_profile_names_file_and_field(tmp_path, monkeypatch):
    folder = tmp_path / "devices"
    folder.mkdir()
    (folder / "mygpu.yaml").write_text(
        "name: mygpu\nkind: gpu\nfull_name: x\nvendor: x\ncompute_units: 10\nflops: {bf16: 1 TFLOPS}\n"
        "memory: {capacity: 16 GiB, bandwidth: fast}\ncache: 1 MiB\nlaunch_overhead: 5 us\npower: 100 W\nprice_per_hour: 1\n"
    )
    result = subprocess.run([sys.executable, "-m", "moesim", "hw", "list"], capture_output=True, text=True,
                            env={**__import__("os").environ, "MOESIM_HWPROFILES": str(tmp_path)})
    _one_line_error(result, "mygpu.yaml", "memory.bandwidth", "'fast'")


def test_corrupt_trace(tmp_path):
    trace = tmp_path / "t.npz"
    trace.write_bytes(b"garbage")
    _one_line_error(run("cost", "moe", "--device", "h100-sxm", "--tokens", "8", "--hidden", "64", "--inter", "64", "--topk", "2",
                        "--experts", "8", "--routing", str(trace)), str(trace))
    np.savez(trace, topk_ids=np.full((4, 1, 2), 7))
    _one_line_error(run("cost", "moe", "--device", "h100-sxm", "--tokens", "8", "--hidden", "64", "--inter", "64", "--topk", "2",
                        "--experts", "8", "--routing", str(trace)), "no 'metadata' record")


def test_bad_config_json(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "mixtral", "hidden_size": 4096}')
    result = run("models", "show", str(config))
    assert result.returncode == 2 and "num_local_experts" in result.stderr and "Traceback" not in result.stderr
    config.write_text('{"model_type": ')
    _one_line_error(run("models", "show", str(config)), "malformed JSON")


def test_trace_generate_stats_convert(tmp_path, capsys):
    trace = tmp_path / "mix.npz"
    assert main(["trace", "generate", "--model", "mixtral-8x7b", "--tokens", "3000", "--locality", "0.3", "-o", str(trace)]) == 0
    figures = tmp_path / "figs"
    assert main(["trace", "stats", str(trace), "--figures", str(figures), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{"):])
    assert data["layers"] == 32 and data["top_k"] == 2
    assert set(data["hit_rate_belady"]) == {"2", "3", "4", "6", "8"}
    assert sorted(p.name for p in figures.iterdir()) == ["hit_rate.png", "load_heatmap.png"]
    counts = tmp_path / "ds.npz"
    assert main(["trace", "generate", "--model", "deepseek-v3", "--steps", "4", "--batch", "512", "-o", str(counts)]) == 0
    assert main(["trace", "convert", str(counts), str(tmp_path / "ds.csv")]) == 0


def test_trace_bad_input():
    _one_line_error(run("trace", "generate", "--model", "mixtral-8x7b", "--tokens", "10", "--steps", "3", "-o", "x.npz"), "--tokens")
    _one_line_error(run("trace", "generate", "--model", "mixtral-8x7b", "--tokens", "10", "--locality", "1.5", "-o", "x.npz"), "locality")
    _one_line_error(run("trace", "stats", "missing.npz"), "missing.npz", "not found")


def test_trace_fit_writes_a_profile_that_generates(tmp_path, capsys):
    recorded = tmp_path / "rec.npz"
    assert main(["trace", "generate", "--model", "olmoe-1b-7b", "--tokens", "4000", "--skew", "0.7", "--locality", "0.2",
                 "-o", str(recorded)]) == 0
    profile = tmp_path / "p.yaml"
    assert main(["trace", "fit", "--model", "olmoe-1b-7b", "--trace", str(recorded), "--tokens", "4000", "-o", str(profile)]) == 0
    assert "target vs achieved" in capsys.readouterr().out
    assert main(["trace", "generate", "--profile", str(profile), "--tokens", "500", "-o", str(tmp_path / "again.npz")]) == 0
    _one_line_error(run("trace", "fit", "--model", "olmoe-1b-7b"), "--trace")
    _one_line_error(run("trace", "fit", "--model", "olmoe-1b-7b", "--hit-rate", "big:0.5"), "--hit-rate")
    _one_line_error(run("trace", "fit", "--model", "olmoe-1b-7b", "--srp", "16:1.5"), "--srp")


def test_trace_fit_to_published_srp_and_sch(tmp_path, capsys):
    out = tmp_path / "mixtral.yaml"
    assert main(["trace", "fit", "--model", "mixtral-8x7b", "--srp", "16:0.4936", "--sch", "2:0.7417", "--tokens", "4000",
                 "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["targets"]) == {"srp@16", "sch@2k,m=16"}
    for name, target in report["targets"].items():
        assert report["achieved"][name] == pytest.approx(target, rel=0.05)
    written = yaml.safe_load(out.read_text())
    assert set(written["fitted_to"]) == {"srp@16", "sch@2k,m=16"}


def test_cost_rejects_non_positive_shapes():
    _one_line_error(run("cost", "attention", "--device", "h100-sxm", "--phase", "prefill", "--batch", "0", "--seq", "10",
                        "--heads", "8"), "--batch")
    result = run("cost", "collective", "--cluster", "dgx-h100", "--op", "all_reduce", "--ranks", "8", "--size", "0 B")
    assert result.returncode == 2 and "positive" in result.stderr and "Traceback" not in result.stderr


def test_review_edge_cases_are_one_line_errors(tmp_path):
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--batch", "4", "--prompt", "8",
                        "--output", "8", "--seed", "-1"), "--seed")
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2", "--batch", "100000000000000",
                        "--prompt", "8", "--output", "1"), "--batch")
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2", "--batch", "4", "--prompt", "8",
                        "--output", "8", "--kv-dtype", "int8"), "--kv-dtype")
    _one_line_error(run("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2", "--batch", "4", "--prompt", "8",
                        "--output", "8", "--json", "-o", str(tmp_path)), "is a folder")
    _one_line_error(run("cost", "moe", "--device", "h100-sxm", "--tokens", "8", "--hidden", "64", "--inter", "64", "--topk", "2",
                        "--experts", "8", "--routing", "power_law:nan"), "--routing")
    folder = tmp_path / "d"
    (folder / "config.json").mkdir(parents=True)
    _one_line_error(run("models", "show", str(folder)), "cannot read")
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    (clusters / "odd.yaml").write_text("name: odd\nfull_name: odd\nnode:\n  accelerators: {device: nvme-gen4, count: 2}\n"
                                       "  cpus: {device: xeon-8480, count: 1}\n  host_memory: 64 GiB\n  host_link: pcie-gen5-x16\n")
    result = subprocess.run([sys.executable, "-m", "moesim", "hw", "show", "odd"], capture_output=True, text=True,
                            env={**__import__("os").environ, "MOESIM_HWPROFILES": str(tmp_path)})
    _one_line_error(result, "node.accelerators.device", "expected a gpu or npu")
