"""moesim.validate: measured-table reader, calibration split and fit, predicted-vs-measured
error table, and ``moesim validate``."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.cost.gemm import gemm_time
from moesim.errors import InputError
from moesim.hardware import catalog
from moesim.validate import calibrate
from moesim.validate.compare import TARGETS, predict, summarise
from moesim.validate.tables import read_folder, read_table

DEVICE = "NVIDIA H100 80GB HBM3"


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _gemm_rows(device, shapes, dtype="bfloat16") -> list[list]:
    """Rows in the gemm table's schema whose latency (ms) is the cost model's own prediction."""
    return [[dtype, m, n, k, gemm_time(device, m, n, k, dtype).time * 1e3] for m, n, k in shapes]


@pytest.fixture
def folder(tmp_path) -> Path:
    device = catalog.device("h100-sxm")
    shapes = [(m, n, k) for m in (1, 16, 256, 4096) for n in (1024, 4096, 14336) for k in (2048, 4096, 7168)]
    _write(tmp_path / "gemm_vllm_0.19.0_gemm_perf.csv.gz", ["gemm_dtype", "m", "n", "k", "latency"], _gemm_rows(device, shapes))
    _write(tmp_path / "comm_sglang_0.5.12_wideep_deepep_ll_perf.csv.gz",
           ["hidden_size", "num_token", "num_topk", "num_experts", "combine_avg_t_us", "combine_bandwidth_gbps",
            "dispatch_avg_t_us", "dispatch_bandwidth_gbps"],
           [[7168, 128, 8, 256, 60.5, 240.0, 40.25, 180.0]])
    constants = {"framework": "VLLM", "device": DEVICE, "op_name": "gemm", "kernel_source": "vllm_default"}
    (tmp_path / "tables.json").write_text(json.dumps({
        "gemm_vllm_0.19.0_gemm_perf": {"rows": len(shapes), "constant_columns": constants,
                                       "columns": ["gemm_dtype", "m", "n", "k", "latency"]},
        "comm_sglang_0.5.12_wideep_deepep_ll_perf": {"constant_columns": {"device": DEVICE, "node_num": "1"}}}))
    (tmp_path / "README.md").write_text("converted from commit 095f58a51c4ca8e61b66ec108d86f223f8d559ce\n")
    return tmp_path


# -- reader ----------------------------------------------------------------------------------

def test_folder_is_read_into_families_with_constants_and_seconds(folder):
    tables = {t.family.name: t for t in read_folder(folder)}
    assert set(tables) == {"gemm", "deepep_ll"}
    gemm = tables["gemm"]
    assert len(gemm) == 36 and gemm.device == DEVICE
    assert gemm.get("op_name")[0] == "gemm"  # a constant from tables.json, broadcast
    raw = np.array([float(r["latency"]) for r in csv.DictReader(gzip.open(gemm.path, "rt"))])
    assert np.allclose(gemm.seconds["latency"], raw * 1e-3)  # latency is milliseconds
    ll = tables["deepep_ll"]
    assert ll.seconds["dispatch"][0] == pytest.approx(40.25e-6)  # *_us columns are microseconds
    assert ll.seconds["combine"][0] == pytest.approx(60.5e-6)


def test_unknown_table_file_and_bad_values_are_input_errors(tmp_path):
    _write(tmp_path / "my_timings.csv", ["a", "latency"], [[1, 2.0]])
    with pytest.raises(InputError, match="not a known measured table"):
        read_folder(tmp_path)
    bad = _write(tmp_path / "gemm_perf.csv", ["gemm_dtype", "m", "n", "k", "latency"], [["bfloat16", 1, 2, 3, -1.0]])
    with pytest.raises(InputError, match="positive times") as info:
        read_table(bad)
    assert "gemm_perf.csv" in str(info.value) and "line 2" in str(info.value)
    short = _write(tmp_path / "x_gemm_perf.csv", ["gemm_dtype", "m", "n", "k"], [["bfloat16", 1, 2, 3]])
    with pytest.raises(InputError, match="latency"):
        read_table(short, family="gemm")
    with pytest.raises(InputError, match="not a folder"):
        read_folder(tmp_path / "missing")


def test_parquet_without_pyarrow_says_to_install_it(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed: the error path cannot be shown")
    except ImportError:
        pass
    path = tmp_path / "gemm_vllm_0.19.0_gemm_perf.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(InputError, match="pip install pyarrow"):
        read_table(path)


def test_parquet_table_reads_like_csv(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: Parquet tables cannot be read")
    import pyarrow.parquet as pq

    path = tmp_path / "gemm_vllm_0.19.0_gemm_perf.parquet"
    pq.write_table(pa.table({"gemm_dtype": ["bfloat16"], "m": [8], "n": [4096], "k": [4096], "latency": [0.02]}), path)
    table = read_table(path)
    assert table.family.name == "gemm" and table.seconds["latency"][0] == pytest.approx(2e-5)


# -- split -----------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_holds_out_whole_shapes(folder):
    gemm = next(t for t in read_folder(folder) if t.family.name == "gemm")
    calib, test = calibrate.split(gemm, 0.4)
    assert len(calib) + len(test) == len(gemm) and len(calib) and len(test)
    shapes = lambda t: {(n, k) for n, k in zip(t.get("n"), t.get("k"))}  # noqa: E731
    assert not shapes(calib) & shapes(test)
    # the same rows in another order split the same way
    order = np.random.default_rng(3).permutation(len(gemm))
    calib2, test2 = calibrate.split(gemm.take(order), 0.4)
    rows = lambda t: sorted(zip(t.get("m"), t.get("n"), t.get("k")))  # noqa: E731
    assert rows(calib2) == rows(calib) and rows(test2) == rows(test)
    with pytest.raises(InputError):
        calibrate.split(gemm, 1.5)


def test_sample_is_deterministic_and_in_table_order(folder):
    gemm = next(t for t in read_folder(folder) if t.family.name == "gemm")
    first, second = calibrate.sample(gemm, 5, seed=2), calibrate.sample(gemm, 5, seed=2)
    assert len(first) == 5 and np.array_equal(first.seconds["latency"], second.seconds["latency"])
    assert list(first.get("m")) == sorted(first.get("m"), key=list(gemm.get("m")).index) or len(set(gemm.get("m"))) > 1
    assert calibrate.sample(gemm, 0) is gemm


# -- fit -------------------------------------------------------------------------------------

def test_fit_recovers_known_efficiency_from_rows_the_cost_model_made(tmp_path):
    base = catalog.device("h100-sxm")
    truth = calibrate.with_values(base, {("efficiency", "compute", "bf16"): 0.62, ("efficiency", "memory"): 0.7})
    # a shallow reduction (k = 256) too, so pipeline fill (k_half) is told apart from compute efficiency
    shapes = [(m, n, k) for m in (1, 8, 64, 512, 2048, 8192) for n, k in ((4096, 4096), (14336, 4096), (1024, 7168),
                                                                          (4096, 256))]
    _write(tmp_path / "gemm_vllm_0.19.0_gemm_perf.csv", ["gemm_dtype", "m", "n", "k", "latency"], _gemm_rows(truth, shapes))
    table = read_folder(tmp_path)
    fitted, record = calibrate.fit(base, table)
    # launch overhead, memory latency and k_half trade off on these rows: the loss gets near,
    # not exactly to, zero, while the two figures that made the rows come back within 3%
    assert record["loss_after"] < 0.02 < 0.1 < record["loss_before"]
    assert fitted.efficiency.compute["bf16"] == pytest.approx(0.62, rel=0.03)
    assert fitted.efficiency.memory == pytest.approx(0.7, rel=0.03)
    # the written profile loads back as a device, with the data it came from in its header
    path = calibrate.write_profile(calibrate.rounded(fitted), tmp_path / "out" / "h100-calibrated.yaml",
                                   base_name="h100-sxm", source={"folder": str(tmp_path), "commit": "abc", **record})
    loaded = calibrate.load_device(str(path))
    assert loaded.efficiency.compute["bf16"] == pytest.approx(0.62, rel=0.03)
    text = path.read_text()
    assert "gemm_vllm_0.19.0_gemm_perf: 24 calibration rows used" in text and "upstream commit abc" in text


# -- command ---------------------------------------------------------------------------------

def test_cli_fit_writes_calibrated_profile_and_errors_atomically(tmp_path, capsys, monkeypatch):
    """--fit on a small table the cost model made with a lower bf16 compute efficiency than the
    profile's: the calibrated profile and errors.json go through atomic_write, the record lists
    every fitted figure before and after, and the profile loads back."""
    from moesim.cli import validate as command

    base = catalog.device("h100-sxm")
    truth = calibrate.with_values(base, {("efficiency", "compute", "bf16"): 0.5})
    shapes = [(m, n, k) for m in (1, 64, 1024, 4096) for n in (1024, 2048, 4096, 14336) for k in (1024, 4096, 7168)]
    folder = tmp_path / "measured"
    folder.mkdir()
    _write(folder / "gemm_vllm_0.19.0_gemm_perf.csv", ["gemm_dtype", "m", "n", "k", "latency"], _gemm_rows(truth, shapes))
    written = []

    def recording(path, data):
        written.append(Path(path).name)
        return atomic_write(path, data)

    atomic_write = command.atomic_write
    monkeypatch.setattr(command, "atomic_write", recording)
    monkeypatch.setattr(calibrate, "atomic_write", recording)
    out = tmp_path / "out"
    assert main(["validate", "--measured", str(folder), "--device", "h100-sxm", "--fit", "--only", "gemm",
                 "--fit-sample", "50", "--sample", "50", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    fit = result["fit"]
    assert {"h100-sxm-calibrated.yaml", "errors.json"} <= set(written)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert json.loads((out / "errors.json").read_text())["fit"]["figures"] == fit["figures"]
    compute = fit["figures"]["efficiency.compute.bf16"]
    assert compute["before"] == base.efficiency.compute["bf16"] and compute["after"] == pytest.approx(0.5, rel=0.05)
    assert all(set(v) == {"before", "after"} for v in fit["figures"].values())
    assert fit["loss_after"] < fit["loss_before"] and fit["fitted_is_better"]
    assert sum(fit["rows"].values()) <= 50
    profile = calibrate.load_device(fit["profile_path"])
    assert profile.efficiency.compute["bf16"] == pytest.approx(0.5, rel=0.05)
    gemm = next(e for e in fit["errors"] if e["family"] == "GEMM" and e["regime"] == "all")
    assert gemm["rows"] <= 50 and gemm["median_ape"] < 0.02



def test_cli_bad_folder_and_unknown_device_exit_2(tmp_path, folder, capsys):
    assert main(["validate", "--measured", str(tmp_path / "nope"), "--device", "h100-sxm"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["validate", "--measured", str(folder), "--device", "h100-sxmm"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_cli_prints_table_and_writes_report_and_markdown_section(folder, tmp_path, capsys):
    doc = tmp_path / "docs" / "validation.md"
    doc.parent.mkdir()
    doc.write_text("# Validation\n\n## Offloading\n\nkeep me\n")
    out = tmp_path / "out"
    assert main(["validate", "--measured", str(folder), "--device", "h100-sxm", "--out", str(out),
                 "--markdown", str(doc), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    gemm = next(e for e in result["profile"]["errors"] if e["family"] == "GEMM" and e["regime"] == "all")
    assert gemm["median_ape"] < 1e-9  # the rows are the model's own predictions
    assert (out / "errors.json").is_file() and (out / "h100-sxm-scatter.png").stat().st_size > 1000
    with gzip.open(out / "predictions.csv.gz", "rt") as handle:
        assert next(csv.DictReader(handle))["family"] in ("GEMM", "DeepEP")
    text = doc.read_text()
    assert "keep me" in text and text.count("<!-- moesim validate: begin -->") == 1
    # regenerating replaces the section rather than appending another
    assert main(["validate", "--measured", str(folder), "--device", "h100-sxm", "--markdown", str(doc), "--json"]) == 0
    assert doc.read_text().count("<!-- moesim validate: begin -->") == 1


# -- real measurements -----------------------------------------------------------------------

# Whether the current h100-sxm profile meets each target on the whole test split (see
# docs/validation.md); a family marked False is an expected failure with the measured figure as
# its reason, and strict, so a family that starts meeting its target must be moved here.
MEETS = {"MoE layer": True, "GEMM": True, "attention prefill": True, "attention decode": True,
         "MLA prefill": True, "MLA decode": True, "NCCL": True, "DeepEP": True}


@pytest.fixture(scope="module")
def h100_errors(shared_dir):
    folder = shared_dir / "data" / "aiconfigurator" / "h100_sxm"
    if not folder.is_dir():
        pytest.skip("../shared/data/aiconfigurator/h100_sxm not found")
    # the whole test split (a few seconds): a sample's p90 wanders by a few points
    tables = [calibrate.split(t)[1] for t in read_folder(folder) if t.family.name != "moe_deepep"]
    return {s.family: s for s in summarise(predict(tables, catalog.device("h100-sxm"))) if s.regime == "all"}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_h100_test_split_error_against_target(h100_errors, family, request):
    line = h100_errors[family]
    median, p90 = line.target
    if not MEETS[family]:
        request.applymarker(pytest.mark.xfail(
            strict=True, reason=f"{family}: median {line.median:.1%} / p90 {line.p90:.1%} against {median:.0%} / {p90:.0%}"))
    assert line.median <= median and line.p90 <= p90, f"median {line.median:.1%}, p90 {line.p90:.1%}"
