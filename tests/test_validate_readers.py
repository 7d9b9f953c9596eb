"""Readers of measured data: each on a small file in the real tool's layout, and each on a
corrupt or truncated file."""

from __future__ import annotations

import gzip
import json
import re
import sqlite3

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from moesim.validate import kineto, nccl_tests, nsys, vllm_moe
from moesim.validate.busy import busy_time, merge_intervals

# --------------------------------------------------------------------------------------------
# nccl-tests: lines printed with the printf formats of src/util.cu


def _nccl_line(size, count, dtype, redop, root, groups):
    line = "%12i  %12i  %8s  %6s  %6s" % (size, count, dtype, redop, "%6i" % root)
    for time, algbw, busbw, wrong in groups:
        line += "  %7s  %6s  %6s  %6g" % ("%.2f" % time, "%.2f" % algbw, "%.2f" % busbw, wrong)
    return line


def _nccl_text(op="all_reduce", dtype="half", redop="sum", ngpus=8, factor=2 * 7 / 8, times=((22.46, 22.12), (27.83, 27.50), (36.20, 35.87))):
    width = {"half": 2, "float": 4, "int8": 1}[dtype]
    head = ["# nccl-tests version 2.17.1 nccl-headers=22703 nccl-library=22703",
            f"# Collective test starting: {op}_perf",
            f"# nThread 1 nGpus {ngpus} minBytes 1048576 maxBytes 4194304 step: 2(factor) warmup iters: 5 iters: 20 "
            "agg iters: 1 validation: 1 graph: 0 unalign: 0", "#", "# Using devices"]
    head += ["#  Rank %2d Group %2d Pid %6d on %10s device %2d [%04x:%02x:%02x] %s" % (r, 0, 4242, "node-001", r, 0, 0x18 + r, 0, "NVIDIA H100 80GB HBM3")
             for r in range(ngpus)]
    head += ["#", "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          " % ("", "", "", "", ""),
             "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s " % ("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong"),
             "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s " % ("(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "")]
    rows = []
    for i, (oop, ip) in enumerate(times):
        size = 1048576 << i
        groups = [(t, size / t / 1e3, size / t / 1e3 * factor, 0) for t in (oop, ip)]
        rows.append(_nccl_line(size, size // width, dtype, redop, -1, groups))
    tail = ["# Out of bounds values : 0 OK", "# Avg bus bandwidth    : 139.565 ", "#", f"# Collective test concluded: {op}_perf", ""]
    return "\n".join(head + rows + tail)


def test_nccl_text_all_columns(tmp_path):
    path = tmp_path / "all_reduce.txt"
    path.write_text(_nccl_text())
    run = nccl_tests.read_nccl_tests(path)
    assert run.op_name == "all_reduce" and run.num_gpus == 8 and len(run.rows) == 3
    first = run.rows[0]
    assert (first.size, first.count, first.type, first.redop, first.root) == (1048576, 524288, "half", "sum", -1)
    assert first.out_of_place == nccl_tests.Timing(22.46, 46.69, 81.70, 0.0)
    assert first.in_place.time_us == 22.12 and first.in_place.busbw == pytest.approx(82.95, abs=0.01)
    rows = nccl_tests.table_rows(run)
    assert rows[2] == {"op_name": "all_reduce", "nccl_dtype": "half", "num_gpus": 8, "message_size": 2097152,
                       "latency": pytest.approx(0.0362)}
    assert nccl_tests.table_rows(run, placement="in_place")[0]["latency"] == pytest.approx(0.02212)


def test_nccl_text_older_layout_and_no_check(tmp_path):
    """nccl-tests before 2.14: no root column, 'error' for '#wrong', N/A without -c, no name."""
    lines = ["# nThread 1 nGpus 4 minBytes 8 maxBytes 16 step: 2(factor) warmup iters: 5 iters: 20 validation: 0",
             "#", "# Using devices"] + [f"#   Rank  {r} Pid   1000 on     host device  {r} [0x1{r}] NVIDIA A100-SXM4-80GB" for r in range(4)]
    lines += ["#", "#                                                     out-of-place                       in-place          ",
              "#       size         count      type   redop     time   algbw   busbw  error     time   algbw   busbw  error",
              "#        (B)    (elements)                       (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)       ",
              "           8             2     float     sum    12.71    0.00    0.00    N/A    12.37    0.00    0.00    N/A",
              "          16             4     float     sum    12.66    0.00    0.00    N/A    12.50    0.00    0.00    N/A"]
    path = tmp_path / "out.log"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="collective"):
        nccl_tests.table_rows(nccl_tests.read_nccl_tests(path))
    run = nccl_tests.read_nccl_tests(path, op_name="all_reduce")
    assert run.num_gpus == 4 and run.rows[1].out_of_place == nccl_tests.Timing(12.66, 0.0, 0.0, None)
    assert nccl_tests.table_rows(run)[1]["message_size"] == 4


def _nccl_json_report():
    """An alltoall_perf -J report of two sizes over 8 GPUs."""
    sizes = [1048576, 2097152]
    results = [{"size": s, "count": s // 2, "type": "half", "redop": "none", "root": "    -1",
                "out_of_place": {"time": 30.5 + i, "alg_bw": s / (30.5 + i) / 1e3, "bus_bw": s / (30.5 + i) / 1e3 * 7 / 8, "nwrong": 0.0},
                "in_place": {"time": 30.0 + i, "alg_bw": 1.0, "bus_bw": 1.0, "nwrong": 0.0},
                "actual_iterations": 20, "experiment_name": ""} for i, s in enumerate(sizes)]
    report = {"version": 2, "start_time": "2025-06-01 10:00:00", "args": ["./build/alltoall_perf", "-b", "1M", "-e", "2M", "-g", "8", "-d", "half", "-J", "a2a.json"],
              "env": ["PATH=/usr/bin"], "nccl_version": 22703,
              "config": {"nthreads": 1, "ngpus": 8, "minimum_bytes": 1048576, "maximum_bytes": 2097152, "step_factor": 2,
                         "warmup_iters": 5, "iterations": 20, "aggregated_iterations": 1, "validation": 1, "graph": 0,
                         "blocking_collectives": "false", "per_iter_timing": "false", "parallel_init": "false",
                         "devices": [{"rank": r, "group": 0, "pid": 9, "hostname": "node", "device": r, "device_hex": "0000:18:00",
                                      "device_info": "NVIDIA H100 80GB HBM3"} for r in range(8)]},
              "results": results, "out_of_bounds": {"count": 0, "okay": "true"},
              "average_bus_bandwidth": {"bandwidth": 30.1, "okay": "unchecked"}, "errors": [], "end_time": "2025-06-01 10:00:05"}
    return report


def test_nccl_json(tmp_path):
    path = tmp_path / "a2a.json"
    path.write_text(json.dumps(_nccl_json_report()))
    run = nccl_tests.read_nccl_tests(path)
    assert run.op_name == "alltoall" and run.num_gpus == 8 and run.rows[0].root == -1
    assert nccl_tests.table_rows(run) == [
        {"op_name": "alltoall", "nccl_dtype": "half", "num_gpus": 8, "message_size": 524288, "latency": pytest.approx(0.0305)},
        {"op_name": "alltoall", "nccl_dtype": "half", "num_gpus": 8, "message_size": 1048576, "latency": pytest.approx(0.0315)}]


def test_nccl_corrupt(tmp_path):
    text = _nccl_text()
    cut = text[: text.index("     2097152") + 40]  # the run died in the middle of a row
    path = tmp_path / "cut.txt"
    path.write_text(cut)
    with pytest.raises(InputError, match=r"cut.txt: line \d+: results row has"):
        nccl_tests.read_nccl_tests(path)
    path.write_text(text.split("#       size")[0])
    with pytest.raises(InputError, match="no nccl-tests results header"):
        nccl_tests.read_nccl_tests(path)
    path = tmp_path / "cut.json"
    path.write_text('{"version": 2, "results": [{"size": 8, "count"')
    with pytest.raises(InputError, match="malformed JSON"):
        nccl_tests.read_nccl_tests(path)
    path.write_text(json.dumps({"results": [{"size": 8}]}))
    with pytest.raises(InputError, match=r"results\[0\]"):
        nccl_tests.read_nccl_tests(path)


# --------------------------------------------------------------------------------------------
# Kineto Chrome trace, as libkineto's ChromeTraceLogger lays it out


def _kineto_trace():
    base = 1_700_000_000_000_000  # baseTimeNanoseconds; ts below are us relative to it
    events = [
        {"name": "process_name", "ph": "M", "ts": 0.0, "pid": 0, "tid": 0, "args": {"name": "python"}},
        {"name": "process_labels", "ph": "M", "ts": 0.0, "pid": 0, "tid": 0, "args": {"labels": "GPU 0"}},
        {"name": "thread_name", "ph": "M", "ts": 0.0, "pid": 0, "tid": 7, "args": {"name": "stream 7"}},
    ]
    kernel_args = lambda corr, stream: {"External id": corr + 100, "queued": 0, "device": 0, "context": 1, "stream": stream,
                                       "correlation": corr, "registers per thread": 128, "shared memory": 0,
                                       "blocks per SM": 1.0, "warps per SM": 4.0, "grid": [132, 1, 1], "block": [128, 1, 1],
                                       "est. achieved occupancy %": 6}
    for it, t0 in enumerate((1000.0, 2000.0)):
        events.append({"ph": "X", "cat": "user_annotation", "name": f"moe_layer it={it}", "pid": 4242, "tid": 4242,
                       "ts": t0, "dur": 50.0, "args": {"External id": 10 + it, "Record function id": 0, "Ev Idx": it}})
        for k, (launch, start, dur, stream) in enumerate(((5.0, 60.0, 20.0, 7), (10.0, 70.0, 25.0, 13), (20.0, 100.0, 10.0, 7))):
            corr = 1000 * it + k
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 4242, "tid": 4242,
                           "ts": t0 + launch, "dur": 4.0, "args": {"External id": corr + 100, "cbid": 211, "correlation": corr}})
            events.append({"ph": "X", "cat": "kernel", "name": f"fused_moe_kernel_{k}", "pid": 0, "tid": stream,
                           "ts": t0 + start, "dur": dur, "args": kernel_args(corr, stream)})
            events.append({"ph": "f", "id": corr, "pid": 0, "tid": stream, "ts": t0 + start, "cat": "ac2g", "name": "ac2g", "bp": "e"})
        events.append({"ph": "X", "cat": "gpu_user_annotation", "name": f"moe_layer it={it}", "pid": 0, "tid": 7,
                       "ts": t0 + 60.0 - 0.001, "dur": 50.002, "args": {"External id": 10 + it}})
    return {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": "NVIDIA H100 80GB HBM3", "totalGlobalMem": 85045477376,
                                                      "computeMajor": 9, "computeMinor": 0, "numSms": 132}],
            "distributedInfo": {"backend": "nccl", "rank": 0, "world_size": 1},
            "displayTimeUnit": "ms", "baseTimeNanoseconds": base, "traceEvents": events, "traceName": "trace.json"}


def test_kineto_kernels_busy_and_spans(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_kineto_trace(), indent=2))
    trace = kineto.load_trace(path)
    work, on_cpu = kineto.device_work(trace)
    assert len(work) == 6 and not on_cpu and trace.metadata["schemaVersion"] == 1
    # per iteration: [60, 80) U [70, 95) U [100, 110) = 35 + 10 us busy, out of 55 us of durations
    assert kineto.busy_by_device(work) == {0: pytest.approx(90.0)}
    gpu_spans = kineto.annotation_spans(trace, r"^moe_layer")
    assert [s.name for s in gpu_spans] == ["moe_layer it=0", "moe_layer it=1"]
    assert [len(s.work) for s in gpu_spans] == [3, 3] and gpu_spans[1].busy == pytest.approx(45.0)
    table = kineto.kernel_table(work)
    assert table["stream"].tolist() == [7, 13, 7, 7, 13, 7] and table["dur_us"].sum() == pytest.approx(110.0)
    # without the GPU ranges, the CPU ranges find their kernels through the launch correlation ids
    data = _kineto_trace()
    data["traceEvents"] = [e for e in data["traceEvents"] if e.get("cat") != "gpu_user_annotation"]
    path_gz = tmp_path / "trace.pt.trace.json.gz"
    path_gz.write_bytes(gzip.compress(json.dumps(data).encode()))
    cpu_spans = kineto.annotation_spans(kineto.load_trace(path_gz), "moe_layer")
    assert [s.busy for s in cpu_spans] == [pytest.approx(45.0)] * 2
    assert cpu_spans[0].end < cpu_spans[0].work[-1].end  # kernels run after the CPU range closed


def test_kineto_cpu_fallback(tmp_path):
    events = [{"ph": "X", "cat": "user_annotation", "name": "moe", "pid": 1, "tid": 1, "ts": 0.0, "dur": 100.0, "args": {}},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 10.0, "dur": 30.0, "args": {}},
              {"ph": "X", "cat": "cpu_op", "name": "aten::resolve_conj", "pid": 1, "tid": 1, "ts": 12.0, "dur": 1.0, "args": {}},
              {"ph": "X", "cat": "cpu_op", "name": "aten::silu", "pid": 1, "tid": 1, "ts": 50.0, "dur": 5.0, "args": {}},
              {"ph": "X", "cat": "cpu_op", "name": "aten::add", "pid": 1, "tid": 1, "ts": 150.0, "dur": 5.0, "args": {}}]
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": events}))
    trace = kineto.load_trace(path)
    assert kineto.device_work(trace) == ([], False)
    (span,) = kineto.annotation_spans(trace, "moe")
    assert span.on_cpu and len(span.work) == 3 and span.busy == pytest.approx(35.0)


def test_kineto_corrupt(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(_kineto_trace())[:500])
    with pytest.raises(InputError, match="cut.json: line 1, column .*: malformed JSON"):
        kineto.load_trace(path)
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "kernel", "name": "k", "ts": "soon"}]}))
    with pytest.raises(InputError, match=r"traceEvents\[0\].*numeric 'ts'"):
        kineto.load_trace(path)
    path.write_text(json.dumps({"events": []}))
    with pytest.raises(InputError, match="not a Chrome trace"):
        kineto.load_trace(path)
    gz = tmp_path / "cut.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(_kineto_trace()).encode())[:200])
    with pytest.raises(InputError, match="cannot decompress"):
        kineto.load_trace(gz)


def test_busy_union():
    starts, ends = merge_intervals([5, 0, 1, 20, 10], [8, 2, 3, 25, 12])
    assert starts.tolist() == [0, 5, 10, 20] and ends.tolist() == [3, 8, 12, 25]
    assert busy_time([0, 0, 1], [10, 5, 2]) == 10 and busy_time([], []) == 0


# --------------------------------------------------------------------------------------------
# Nsight Systems SQLite export (schema of nsys 2023-2025 exports, columns as documented)

_NSYS_SCHEMA = """
CREATE TABLE StringIds (id INTEGER NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL,
  contextId INTEGER NOT NULL, greenContextId INTEGER, streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER,
  demangledName INTEGER NOT NULL, shortName INTEGER NOT NULL, mangledName INTEGER, launchType INTEGER, cacheConfig INTEGER,
  registersPerThread INTEGER NOT NULL, gridX INTEGER NOT NULL, gridY INTEGER NOT NULL, gridZ INTEGER NOT NULL,
  blockX INTEGER NOT NULL, blockY INTEGER NOT NULL, blockZ INTEGER NOT NULL, staticSharedMemory INTEGER NOT NULL,
  dynamicSharedMemory INTEGER NOT NULL, localMemoryPerThread INTEGER NOT NULL, localMemoryTotal INTEGER NOT NULL,
  gridId INTEGER NOT NULL, sharedMemoryExecuted INTEGER, graphNodeId INTEGER, sharedMemoryLimitConfig INTEGER);
CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER NOT NULL, end INTEGER NOT NULL, eventClass INTEGER NOT NULL,
  globalTid INTEGER, correlationId INTEGER, nameId INTEGER NOT NULL, returnValue INTEGER NOT NULL, callchainId INTEGER);
CREATE TABLE NVTX_EVENTS (start INTEGER NOT NULL, end INTEGER, eventType INTEGER NOT NULL, rangeId INTEGER, category INTEGER,
  color INTEGER, text TEXT, globalTid INTEGER, endGlobalTid INTEGER, textId INTEGER, domainId INTEGER, uint64Value INTEGER,
  int64Value INTEGER, doubleValue REAL, uint32Value INTEGER, int32Value INTEGER, floatValue REAL, jsonTextId INTEGER, jsonText TEXT);
"""


_NSYS_TID = 281474976710657


def _nsys_db(path, kernels=((1_000_000, 1_020_000, 0, 7, 11, 3, 4), (1_010_000, 1_050_000, 0, 13, 12, 1, 2),
                            (2_000_000, 2_030_000, 1, 7, 21, 1, 2)), ranges=((900_000, 1_000_000, 6),),
             label="moe_layer it=0"):
    """An nsys export: ``kernels`` (start, end ns, device, stream, correlation id, demangled and
    short name ids), each launched 50 us before it starts on one thread, and NVTX ``ranges``
    (start, end ns, text id) on that thread; text id 6 is ``label``, 7 and 8 the same with
    it=1 / it=2."""
    db = sqlite3.connect(path)
    db.executescript(_NSYS_SCHEMA)
    db.executemany("INSERT INTO StringIds VALUES (?, ?)", [(1, "void fused_moe_kernel<__nv_bfloat16>(...)"), (2, "fused_moe_kernel"),
                                                          (3, "void topk_kernel<float>(...)"), (4, "topk_kernel"),
                                                          (5, "cudaLaunchKernel_v7000"), (6, label),
                                                          (7, label.replace("it=0", "it=1")), (8, label.replace("it=0", "it=2"))])
    tid = _NSYS_TID
    for start, end, dev, stream, corr, dname, sname in kernels:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL (start, end, deviceId, contextId, streamId, correlationId, globalPid, "
                   "demangledName, shortName, registersPerThread, gridX, gridY, gridZ, blockX, blockY, blockZ, staticSharedMemory, "
                   "dynamicSharedMemory, localMemoryPerThread, localMemoryTotal, gridId) VALUES "
                   "(?, ?, ?, 1, ?, ?, 281474976710656, ?, ?, 64, 132, 1, 1, 128, 1, 1, 0, 0, 0, 0, 1)",
                   (start, end, dev, stream, corr, dname, sname))
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, 1, ?, ?, 5, 0, NULL)", (start - 50_000, start - 45_000, tid, corr))
    db.executemany("INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, textId) VALUES (?, ?, 59, NULL, ?, ?)",
                   [(start, end, tid, text) for start, end, text in ranges])
    db.commit()
    db.close()


def test_nsys_kernels_and_ranges(tmp_path):
    path = tmp_path / "report.sqlite"
    _nsys_db(path)
    kernels = nsys.read_kernels(path)
    assert len(kernels) == 3 and kernels.name[0] == "void topk_kernel<float>(...)"
    assert kernels.start_ns.dtype == np.int64 and kernels.stream.tolist() == [7, 13, 7]
    assert kernels.busy_ns() == {0: 50_000.0, 1: 30_000.0}
    (layer,) = nsys.read_nvtx_ranges(path, "moe_layer")
    assert layer.text == "moe_layer it=0" and layer.end_ns == 1_000_000
    # kernels launched inside the range (by their runtime call), though they ran after it
    assert nsys.kernels_in_range(path, kernels, layer).tolist() == [0, 1]


def test_nsys_replay_of_collect_moe_ranges(tmp_path, capsys):
    """`moesim validate --replay report.sqlite`: each NVTX range of a collect_moe.py case is
    timed by the union of the kernels launched in it (two overlapping ones: 60 us, 40 us)."""
    label = "moe case=0 tokens=64 ep=1 routing=balanced"
    kernels = [(1_000_000, 1_040_000, 0, 7, 11, 1, 2), (1_020_000, 1_060_000, 0, 13, 12, 3, 4),
               (2_000_000, 2_040_000, 0, 7, 21, 1, 2), (3_000_000, 3_030_000, 0, 7, 31, 1, 2)]
    path = tmp_path / "moe.sqlite"
    _nsys_db(path, kernels, ranges=((900_000, 1_000_000, 6), (1_900_000, 2_000_000, 7), (2_900_000, 3_000_000, 8)),
             label=f"{label} it=0")
    case = {"label": label, "num_tokens": 64, "hidden_size": 4096, "inter_size": 14336, "topk": 2, "num_experts": 8,
            "moe_ep_size": 1, "moe_dtype": "bfloat16", "distribution": "balanced", "tokens_per_expert": [16] * 8}
    (tmp_path / "moe_cases.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "cases": [case]}))
    assert nsys.range_busy(path, "moe case=") == [(f"{label} it=0", 60_000.0), (f"{label} it=1", 40_000.0),
                                                   (f"{label} it=2", 30_000.0)]
    assert main(["validate", "--replay", str(path), "--device", "h100-sxm", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["cases"]
    assert row["calls"] == 3 and row["measured"] == pytest.approx(40e-6) and row["on_cpu"] is False


def test_nsys_corrupt(tmp_path):
    path = tmp_path / "report.sqlite"
    path.write_bytes(b"SQLite format 2\x00" + bytes(200))
    with pytest.raises(InputError, match="report.sqlite: not an SQLite database"):
        nsys.read_kernels(path)
    empty = tmp_path / "nokernels.sqlite"
    sqlite3.connect(empty).executescript("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT);")
    with pytest.raises(InputError, match="no CUPTI_ACTIVITY_KIND_KERNEL table"):
        nsys.read_kernels(empty)
    with pytest.raises(InputError, match="file not found"):
        nsys.read_kernels(tmp_path / "missing.sqlite")


# --------------------------------------------------------------------------------------------
# vLLM benchmarks/kernels/benchmark_moe.py

_BENCH_OUT = """\
Namespace(model='mistralai/Mixtral-8x7B-Instruct-v0.1', tp_size=2, enable_expert_parallel=False, dtype='auto', use_deep_gemm=False, save_dir='./', seed=0, batch_size=None, tune=False, trust_remote_code=False, model_prefix=None)
INFO 06-01 10:00:00 [__init__.py:244] Automatically detected platform cuda.
2025-06-01 10:00:03,120\tINFO worker.py:1879 -- Started a local Ray instance.
Batch size: 1, config: {'BLOCK_SIZE_M': 16, 'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4}
Kernel time: 41.37 us
Batch size: 64, config: {'BLOCK_SIZE_M': 16, 'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3}
Kernel time: 152.80 us
"""


def test_vllm_benchmark_output(tmp_path):
    path = tmp_path / "benchmark_moe.log"
    path.write_text(_BENCH_OUT)
    run = vllm_moe.read_benchmark_output(path)
    assert run.args["tp_size"] == 2 and run.args["model"].startswith("mistralai/")
    assert [(t.batch_size, t.kernel_time_us) for t in run.times] == [(1, 41.37), (64, 152.8)]
    assert run.times[1].config["BLOCK_SIZE_K"] == 128
    rows = vllm_moe.moe_rows(run, hidden_size=4096, inter_size=14336, topk=2, num_experts=8)
    assert rows[1] == {"kernel_source": "vllm_fused_moe", "moe_dtype": "bfloat16", "num_tokens": 64, "hidden_size": 4096,
                       "inter_size": 14336, "topk": 2, "num_experts": 8, "moe_tp_size": 2, "moe_ep_size": 1,
                       "distribution": "random", "latency": pytest.approx(0.1528)}


def test_vllm_tuned_configs(tmp_path):
    path = tmp_path / "E=256,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"
    entry = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 32, "num_warps": 4, "num_stages": 3}
    path.write_text(json.dumps({"triton_version": "3.3.1", "1": entry, "4096": entry, "16": entry}, indent=4) + "\n")
    tuned = vllm_moe.read_tuned_configs(path)
    assert (tuned.num_experts, tuned.shard_inter, tuned.device_name, tuned.dtype, tuned.block_shape) == (
        256, 256, "NVIDIA_H100_80GB_HBM3", "fp8_w8a8", [128, 128])
    assert list(tuned.configs) == [1, 16, 4096] and tuned.triton_version == "3.3.1"
    plain = tmp_path / "E=8,N=7168,device_name=NVIDIA_A100-SXM4-80GB.json"
    plain.write_text(json.dumps({"1": entry}))
    assert vllm_moe.read_tuned_configs(plain).dtype is None


def test_vllm_corrupt(tmp_path):
    path = tmp_path / "cut.log"
    path.write_text(_BENCH_OUT.rsplit("Kernel time", 1)[0])
    with pytest.raises(InputError, match=r"cut.log: line 6: batch size 64 has no 'Kernel time'"):
        vllm_moe.read_benchmark_output(path)
    path.write_text("Traceback (most recent call last):\n  RuntimeError: CUDA out of memory\n")
    with pytest.raises(InputError, match="no 'Batch size"):
        vllm_moe.read_benchmark_output(path)
    bad = tmp_path / "tuned.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="file name must be E="):
        vllm_moe.read_tuned_configs(bad)
    cut = tmp_path / "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"
    cut.write_text('{"1": {"BLOCK_SIZE_M": 16, "BLOCK_SI')
    with pytest.raises(InputError, match="malformed JSON"):
        vllm_moe.read_tuned_configs(cut)
    cut.write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(InputError, match=r"1: expected a config with BLOCK_SIZE_M"):
        vllm_moe.read_tuned_configs(cut)


# --------------------------------------------------------------------------------------------
# the readers through `moesim validate`


def _errors(capsys, *args) -> dict[tuple[str, str], dict]:
    assert main(["validate", *args, "--device", "h100-sxm", "--json"]) == 0
    return {(e["family"], e["regime"]): e for e in json.loads(capsys.readouterr().out)["profile"]["errors"]}


def test_cli_nccl_tests_text_and_json_are_nccl_rows(tmp_path, capsys):
    text, report = tmp_path / "all_reduce.txt", tmp_path / "a2a.json"
    text.write_text(_nccl_text())
    report.write_text(json.dumps(_nccl_json_report()))
    errors = _errors(capsys, "--nccl-tests", str(text), str(report))
    # every row compared (no profile was fitted on them), none held out
    assert errors["NCCL", "all"]["rows"] == 5
    assert errors["NCCL", "all_reduce, 8 GPUs"]["rows"] == 3 and errors["NCCL", "all_to_all, 8 GPUs"]["rows"] == 2
    assert 0 < errors["NCCL", "all"]["median_ape"] < 1  # these made-up timings are within 2x of the model
    # --gpus overrides the count the output gives; the printed table names the family and rows
    assert main(["validate", "--nccl-tests", str(text), "--gpus", "4", "--device", "h100-sxm"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "compared: all 3 rows of the nccl-tests / benchmark_moe files" in out
    assert re.search(r"NCCL │ all │ 3 │ .* all_reduce, 4 GPUs │ 3 │", out), out


def test_cli_benchmark_moe_output_is_moe_rows(tmp_path, capsys):
    path = tmp_path / "benchmark_moe.log"
    path.write_text(_BENCH_OUT)
    errors = _errors(capsys, "--benchmark-moe", str(path), "--moe-shape", "4096,14336,2,8")
    assert errors["MoE layer", "all"]["rows"] == 2 and errors["MoE layer", "random, expert TP>1"]["rows"] == 2
    # a model preset gives the same shape (Mixtral-8x7B: hidden 4096, expert 14336, top-2 of 8)
    assert _errors(capsys, "--benchmark-moe", str(path), "--moe-shape", "mixtral-8x7b") == errors
    expert_parallel = tmp_path / "ep.log"
    expert_parallel.write_text(_BENCH_OUT.replace("enable_expert_parallel=False", "enable_expert_parallel=True"))
    errors = _errors(capsys, "--benchmark-moe", str(expert_parallel), "--moe-shape", "mixtral-8x7b")
    assert errors["MoE layer", "random, EP other"]["rows"] == 2


@pytest.mark.parametrize("case, message", [
    ("broadcast", r"broadcast_perf.txt: collective: collective 'broadcast' has no cost model"),
    ("no gpus", r"no_gpus.txt: num_gpus: the output does not give the GPU count .* give --gpus N"),
    ("no collective", r"no_collective.txt: collective: the output does not name the collective"),
    ("no shape", r"--moe-shape: benchmark_moe.py does not print the model's shape"),
    ("bad shape", r"--moe-shape: expected four positive whole numbers"),
    ("shape too small", r"benchmark_moe.log: topk: top-k 9 is more than the 8 experts"),
])
def test_cli_bad_measurement_files_exit_2_with_one_line(tmp_path, capsys, case, message):
    lines = _nccl_text().splitlines()
    bench = tmp_path / "benchmark_moe.log"
    bench.write_text(_BENCH_OUT)
    args = {
        "broadcast": ("broadcast_perf.txt", _nccl_text(op="broadcast"), []),
        "no gpus": ("no_gpus.txt", "\n".join(x for x in lines if "Rank" not in x and "nThread" not in x), []),
        "no collective": ("no_collective.txt", "\n".join(x for x in lines if "Collective test" not in x), []),
        "no shape": (None, None, ["--benchmark-moe", str(bench)]),
        "bad shape": (None, None, ["--benchmark-moe", str(bench), "--moe-shape", "4096,14336,2"]),
        "shape too small": (None, None, ["--benchmark-moe", str(bench), "--moe-shape", "4096,14336,9,8"]),
    }[case]
    name, content, extra = args
    if name:
        (tmp_path / name).write_text(content)
        extra = ["--nccl-tests", str(tmp_path / name)]
    assert main(["validate", *extra, "--device", "h100-sxm"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert re.search(message, line), line
