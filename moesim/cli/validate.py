"""``moesim validate``: the cost model against measured kernel and collective timings."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np

from moesim.cli.output import console, emit_json, table
from moesim.errors import InputError
from moesim.files import atomic_write
from moesim.report import validation as figures
from moesim.models import load_model
from moesim.validate import calibrate, nccl_tests, vllm_moe
from moesim.validate.compare import Cases, predict, summarise
from moesim.validate.replay import format_replay, replay
from moesim.validate.tables import FAMILIES, Table, read_folder

BEGIN = "<!-- moesim validate: begin -->"
END = "<!-- moesim validate: end -->"
HEADING = "## Cost model against measured H100 timings"


def register(sub, formatter) -> None:
    p = sub.add_parser(
        "validate", formatter_class=formatter,
        help="compare the cost model with measured timings; calibrate a device profile",
        description="Predict every row of a folder of measured tables (aiconfigurator's schema: moe, gemm, attention, "
                    "mla, nccl, DeepEP) with the cost model, on the test split (whole shapes held out by a hash), and "
                    "print the median and p90 absolute error per operator family and regime. Output files of "
                    "nccl-tests (--nccl-tests) and of vLLM's benchmark_moe.py (--benchmark-moe) are read as nccl and moe "
                    "rows and compared whole (no profile was fitted on them; with --fit they are split like the tables). --fit first fits the "
                    "device's efficiency figures on the calibration split and writes the calibrated profile.",
        epilog="examples:\n"
               "  moesim validate --measured ../shared/data/aiconfigurator/h100_sxm --device h100-sxm\n"
               "  moesim validate --measured DIR --device h100-sxm --fit --out validation/out\n"
               "  moesim validate --measured DIR --device h200-sxm --efficiency-from h100-sxm\n"
               "  moesim validate --measured DIR --device h100-sxm --markdown docs/validation.md\n"
               "  moesim validate --nccl-tests all_reduce_perf.txt all_gather.json --device h100-sxm\n"
               "  moesim validate --benchmark-moe mixtral_tp2.log --moe-shape mixtral-8x7b --device h100-sxm",
    )
    p.add_argument("--measured", metavar="DIR", help="folder of measured tables (.csv.gz / .csv / .parquet)")
    p.add_argument("--nccl-tests", nargs="+", default=[], metavar="FILE", help="nccl-tests output (printed text or -J "
                   "JSON) of all_reduce_perf, all_gather_perf, reduce_scatter_perf or alltoall_perf, compared as nccl rows")
    p.add_argument("--gpus", type=int, metavar="N", help="GPU count of the --nccl-tests runs (default: the '#  Rank' "
                   "lines / the JSON's device list)")
    p.add_argument("--benchmark-moe", nargs="+", default=[], metavar="FILE", help="printed output of vLLM's "
                   "benchmarks/kernels/benchmark_moe.py, compared as moe rows (routing 'random': top-k of Gaussian logits)")
    p.add_argument("--moe-shape", metavar="SHAPE", help="the --benchmark-moe model's HIDDEN,INTER,TOPK,EXPERTS (INTER: "
                   "one expert's full intermediate size), or a model preset / config.json to take them from")
    p.add_argument("--replay", metavar="TRACE", help="instead: replay a collect_moe.py torch.profiler trace, or the nsys "
                   "SQLite export (.sqlite) of a run of it under nsys profile (moe_cases.json beside it), and compare "
                   "each MoE layer's measured time with the cost model's")
    p.add_argument("--device", required=True, help="device profile name, or a profile YAML file")
    p.add_argument("--efficiency-from", metavar="DEVICE", help="carry another profile's efficiency figures and launch "
                   "overhead over (cross-device prediction: --device's spec sheet, this device's calibration)")
    p.add_argument("--cluster", help="cluster profile for the collectives (default: the catalog's node of --device)")
    p.add_argument("--only", metavar="FAMILIES", help=f"comma-separated table families ({', '.join(f.name for f in FAMILIES)}); default: all")
    p.add_argument("--fit", action="store_true", help="fit the efficiency figures on the calibration split first")
    p.add_argument("--out", metavar="DIR", help="write errors.json, report.md, figures (and the calibrated profile)")
    p.add_argument("--markdown", metavar="FILE", help="replace the validate section of FILE (e.g. docs/validation.md), "
                   "figures beside it")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="at most N test rows per table (default: all)")
    p.add_argument("--fit-sample", type=int, default=600, metavar="N", help="calibration rows per table for --fit")
    p.add_argument("--test-fraction", type=float, default=calibrate.TEST_FRACTION, help="share of shapes held out")
    p.add_argument("--json", action="store_true", help="print the error table as JSON")
    p.set_defaults(func=run)


def _families(only: str | None) -> set[str] | None:
    if not only:
        return {f.name for f in FAMILIES}
    names = {n.strip() for n in only.split(",") if n.strip()}
    known = {f.name for f in FAMILIES}
    unknown = sorted(names - known)
    if unknown:
        raise InputError(f"unknown table family {unknown[0]!r}; expected some of {', '.join(sorted(known))}", field="--only")
    return names


def _moe_shape(spec: str | None) -> dict[str, int]:
    """--moe-shape as benchmark_moe rows need it: four numbers, or a model's routed-expert block."""
    if not spec:
        raise InputError("benchmark_moe.py does not print the model's shape: give --moe-shape HIDDEN,INTER,TOPK,EXPERTS "
                         "or a model preset", field="--moe-shape")
    keys = ("hidden_size", "inter_size", "topk", "num_experts")
    parts = spec.split(",")
    if len(parts) > 1:
        if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise InputError(f"expected four positive whole numbers HIDDEN,INTER,TOPK,EXPERTS, got {spec!r}",
                             field="--moe-shape")
        return dict(zip(keys, map(int, parts)))
    arch = load_model(spec)
    if arch.moe is None:
        raise InputError(f"{arch.name} has no routed experts", field="--moe-shape")
    return dict(zip(keys, (arch.hidden, arch.moe.expert_inter, arch.moe.top_k, arch.moe.num_experts)))


def _measurement_files(args: argparse.Namespace) -> list[Table]:
    """The --nccl-tests and --benchmark-moe files as tables of the nccl and moe families."""
    if args.gpus is not None and args.gpus < 1:
        raise InputError(f"expected a positive GPU count, got {args.gpus}", field="--gpus")
    out = [nccl_tests.read_table(path, num_gpus=args.gpus) for path in args.nccl_tests]
    if args.benchmark_moe:
        shape = _moe_shape(args.moe_shape)
        out += [vllm_moe.read_table(path, **shape) for path in args.benchmark_moe]
    return out


def _series(cases: list[Cases]) -> dict[str, tuple]:
    out: dict[str, list[Cases]] = {}
    for c in cases:
        out.setdefault(c.family, []).append(c)
    return {f: (np.concatenate([c.measured for c in g]), np.concatenate([c.predicted for c in g]),
                np.concatenate([c.size for c in g]), g[0].size_label) for f, g in out.items()}


def _same_gpu(measured: str, full_name: str) -> bool:
    """Whether a table's device name ('NVIDIA H100 80GB HBM3') names this profile's GPU: every
    word of it is in the profile's full name."""
    return set(measured.lower().split()) <= set(full_name.lower().split())


def _print(title: str, lines: list[dict]) -> None:
    rows = []
    for s in lines:
        target = f"{s['target_median']:.0%}/{s['target_p90']:.0%}" if s.get("target_median") is not None else ""
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[s["met"]]
        rows.append([s["family"] if s["regime"] == "all" else "", s["regime"], str(s["rows"]), f"{s['median_ape']:.1%}",
                     f"{s['p90_ape']:.1%}", f"{s['median_bias']:+.1%}", target, met])
    table(title, ["family", "regime", "rows", "median", "p90", "bias", "target", "met"], rows, right={2, 3, 4, 5})


def _replay(args: argparse.Namespace) -> int:
    result = replay(args.replay, calibrate.load_device(args.device))
    if args.json:
        emit_json({"trace": result.trace, "measured_on": result.measured_on, "device": result.device,
                   "on_cpu": result.on_cpu, "summary": result.summary(),
                   "cases": [{**vars(r), "error": r.error} for r in result.rows]})
    else:
        print("\n".join(format_replay(result)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.replay:
        return _replay(args)
    if not (args.measured or args.nccl_tests or args.benchmark_moe):
        raise InputError("give --measured DIR, --nccl-tests FILE, --benchmark-moe FILE (or --replay TRACE.json)",
                         field="--measured")
    wanted = _families(args.only)
    folder = [t for t in read_folder(args.measured) if t.family.name in wanted] if args.measured else []
    files = [t for t in _measurement_files(args) if t.family.name in wanted]
    tables = folder + files
    sources = ([str(args.measured)] if args.measured else []) + [str(t.path) for t in files]
    if not tables:
        raise InputError("no table of the families asked for", source=", ".join(sources) or None, field="--only")
    device = calibrate.load_device(args.device)
    if not hasattr(device, "efficiency") or getattr(device, "kind", "") not in ("gpu", "npu"):
        raise InputError(f"{device.name} is not an accelerator; expected a GPU or NPU profile", field="--device")
    base = device
    if args.efficiency_from:
        donor = calibrate.load_device(args.efficiency_from)
        device = device.model_copy(update={"efficiency": donor.efficiency, "launch_overhead": donor.launch_overhead})
    if args.fit and not args.out:
        raise InputError("--fit writes the calibrated profile: give --out DIR", field="--fit")
    # The shipped profiles were fitted on the calibration split of the aiconfigurator tables, so
    # only their held-out shapes test them; the user's own nccl-tests / benchmark_moe runs were
    # never fitted on and are compared whole, unless --fit is about to fit on part of them.
    splits = [calibrate.split(t, args.test_fraction) for t in folder]
    splits += [calibrate.split(t, args.test_fraction) if args.fit else (t.take(np.arange(0)), t) for t in files]
    tests = [calibrate.sample(test, args.sample) for _, test in splits]
    measured_on = sorted({t.device for t in tables if t.device})
    quiet = args.json
    say = (lambda *a: None) if quiet else (lambda text: console.print(text))

    held_out = sum(len(t) for t in tests[:len(folder)])
    compared = f"test split: {sum(len(t) for t in tests)} rows of held-out shapes"
    scope = "test split"
    if files and not args.fit:
        scope = "test split and measurement files" if folder else "measurement files"
        compared = (f"compared: {held_out} rows of held-out shapes of the tables and " if folder else "compared: ") + \
            f"all {sum(len(t) for t in files)} rows of the nccl-tests / benchmark_moe files"
    say(f"{sum(len(t) for t in tables)} measured rows in {len(tables)} tables ({', '.join(measured_on) or 'device not named'}); "
        f"{compared}")
    if not any(len(t) for t in tests):
        raise InputError(f"the test split is empty (too few shapes for --test-fraction {args.test_fraction})",
                         source=", ".join(sources))
    cases = predict(tests, device, cluster=args.cluster)
    summary = summarise(cases)
    result = {"measured": ", ".join(sources), "measured_on": measured_on, "device": device.name,
              "efficiency_from": args.efficiency_from, "test_fraction": args.test_fraction,
              "profile": {"name": "current" if not args.efficiency_from else f"efficiency of {args.efficiency_from}",
                          "errors": [s.to_dict() for s in summary]}}
    final = cases
    if args.fit:
        calib = [calibrate.sample(c, args.fit_sample, seed=1) for c, _ in splits]
        say(f"fitting {device.name}'s efficiency figures on {sum(len(c) for c in calib)} calibration rows ...")
        fitted, record = calibrate.fit(device, calib, families=wanted, progress=None if quiet else
                                       (lambda sweep, name, loss: console.print(f"  sweep {sweep + 1} {name}: loss {loss:.4f}",
                                                                                style="dim")))
        fitted = calibrate.rounded(fitted)
        fitted_cases = predict(tests, fitted, cluster=args.cluster)
        fitted_summary = summarise(fitted_cases)
        before, after = calibrate.loss_of(summary), calibrate.loss_of(fitted_summary)
        better = after < before
        profile = Path(args.out) / f"{base.name}-calibrated.yaml"
        source = {"folder": ", ".join(sources),
                  "commit": calibrate.shared_commit(Path(args.measured)) if args.measured else "",
                  "test_fraction": args.test_fraction, **record,
                  "test_errors": [f"{s.family}: median {s.median:.1%}, p90 {s.p90:.1%} (before {h.median:.1%}, {h.p90:.1%})"
                                  for s, h in zip(fitted_summary, summary) if s.regime == "all"]}
        calibrate.write_profile(fitted, profile, base_name=base.name, source=source)
        result["fit"] = {**record, "profile_path": str(profile), "test_score_before": before, "test_score_fitted": after,
                         "fitted_is_better": better, "errors": [s.to_dict() for s in fitted_summary]}
        if better:
            final = fitted_cases
    if args.json:
        emit_json(result)
    else:
        _print(f"{result['profile']['name']} profile of {device.name}: |predicted - measured| / measured, {scope}",
               result["profile"]["errors"])
        if args.fit:
            fit = result["fit"]
            _print(f"fitted profile ({fit['profile_path']}): test split", fit["errors"])
            console.print(f"test score (mean of target families' (median + p90) / 2): current {fit['test_score_before']:.1%}, "
                          f"fitted {fit['test_score_fitted']:.1%}: "
                          f"{'the fitted figures are better' if fit['fitted_is_better'] else 'the current figures stay'}")
        if measured_on and not any(_same_gpu(m, device.full_name) for m in measured_on):
            console.print(f"[yellow]note[/]: the tables were measured on {', '.join(measured_on)}, not {device.full_name}")
    if args.out:
        _write_outputs(Path(args.out), result, final, device.name)
    if args.markdown:
        _write_markdown(Path(args.markdown), result, final, args)
    return 0


def _predictions_csv(cases: list[Cases]) -> str:
    """Every compared row: family, table, regime, swept size, measured and predicted seconds."""
    lines = ["family,table,regime,size,measured_s,predicted_s"]
    for c in cases:
        for regime, size, measured, predicted in zip(c.regime, c.size, c.measured, c.predicted):
            lines.append(f"{c.family},{c.table},{regime.replace(',', ';')},{size:g},{measured:.6e},{predicted:.6e}")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, result: dict, cases: list[Cases], name: str) -> None:
    series = _series(cases)
    atomic_write(out / "errors.json", json.dumps(result, indent=2, default=float) + "\n")
    atomic_write(out / "predictions.csv.gz", gzip.compress(_predictions_csv(cases).encode(), mtime=0))
    figures.scatter(series, out / f"{name}-scatter.png", title=f"{name}: predicted vs measured (test split)")
    figures.error_vs_size(series, out / f"{name}-error-vs-size.png", title=f"{name}: error against size (test split)")
    lines = result.get("fit", {}).get("errors") if result.get("fit", {}).get("fitted_is_better") else None
    body = figures.error_table_markdown(lines or result["profile"]["errors"])
    atomic_write(out / "report.md", f"# {name}: cost model against measured timings\n\n{body}\n\n"
                 f"![scatter]({name}-scatter.png)\n\n![error vs size]({name}-error-vs-size.png)\n")
    print(f"wrote {out}/errors.json, predictions.csv.gz, report.md and figures", file=sys.stderr)


def _verdict(lines: list[dict]) -> str:
    met = [line["family"] for line in lines if line["regime"] == "all" and line["met"] is True]
    missed = [line["family"] for line in lines if line["regime"] == "all" and line["met"] is False]
    return (f"Targets met: {', '.join(met) or 'none'}. Not met: {', '.join(missed) or 'none'}. Families without a "
            "target are shown for information.")


def _fit_lines(result: dict) -> list[str]:
    fit = result.get("fit")
    if not fit:
        return []
    rows = sum(fit["rows"].values())
    return ["", f"Calibration (`--fit`): {len(fit['figures'])} efficiency figures fitted on {rows} calibration rows "
            f"(loss {fit['loss_before']:.3f} -> {fit['loss_after']:.3f}); test score, the mean over target families "
            f"of (median + p90) / 2: current {fit['test_score_before']:.1%}, fitted {fit['test_score_fitted']:.1%}, "
            f"so the {'fitted' if fit['fitted_is_better'] else 'current'} figures are the ones above."]


def _write_markdown(path: Path, result: dict, cases: list[Cases], args) -> None:
    name = result["device"]
    series = _series(cases)
    folder = path.parent
    scatter = figures.scatter(series, folder / f"validation-{name}-scatter.png",
                              title=f"{name}: predicted vs measured (test split)")
    errors = figures.error_vs_size(series, folder / f"validation-{name}-error-vs-size.png",
                                   title=f"{name}: error against size (test split)")
    fitted = result.get("fit", {}).get("fitted_is_better")
    lines = result["fit"]["errors"] if fitted else result["profile"]["errors"]
    command = " ".join(["moesim validate", *sys.argv[2:]]) if sys.argv[1:2] == ["validate"] else "moesim validate ..."
    rows = sum(line["rows"] for line in lines if line["regime"] == "all")
    body = [f"Generated by `{command}` on {date.today().isoformat()}: every row of the test split "
            f"({rows} rows; whole shapes held out by a hash of their shape columns, {result['test_fraction']:.0%} of "
            f"shapes) predicted by the cost model with the {'fitted' if fitted else 'current'} `{name}` profile and "
            f"compared with the time measured on {', '.join(result['measured_on']) or 'the device'}. Error is "
            "|predicted - measured| / measured; bias is the median of predicted / measured - 1 (> 0: the model is slow).",
            "", figures.error_table_markdown(lines), "", _verdict(lines), *_fit_lines(result), "",
            f"![predicted vs measured]({scatter.name})", "", f"![error against size]({errors.name})"]
    text = path.read_text() if path.is_file() else "# Validation\n"
    atomic_write(path, figures.replace_section(text, BEGIN, END, "\n".join(body), HEADING))
    print(f"wrote {path} (section between the moesim validate markers) and {scatter.name}, {errors.name}", file=sys.stderr)
