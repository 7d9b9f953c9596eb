"""vLLM's ``benchmarks/kernels/benchmark_moe.py``: its printed kernel times and its tuned
Triton configs.

Benchmark mode prints the parsed arguments, then two lines per batch size::

    Namespace(model='mistralai/Mixtral-8x7B-Instruct-v0.1', tp_size=2, enable_expert_parallel=False, dtype='auto', ...)
    Batch size: 64, config: {'BLOCK_SIZE_M': 16, 'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3}
    Kernel time: 123.45 us

"Kernel time" is the mean over 100 CUDA-graph replays of 10 back-to-back ``fused_topk`` +
``fused_experts`` calls, in MICROSECONDS per call: the layer after the router GEMM (the gating
logits are given), with each token's experts the top-k of i.i.d. Gaussian logits, so the
per-expert counts are random and only balanced on average. The output does not print the
model's shape, so :func:`moe_rows` takes it from the caller.

``--tune`` writes ``E={E},N={N},device_name={name}[,dtype={dtype}][,block_shape=[bn,bk]].json``
(vLLM ``get_config_file_name``): ``N`` is the per-shard intermediate size (``w2.shape[2]``),
spaces in the device name are underscores, and the file maps each batch size (a string key) to
a Triton config, with a ``triton_version`` key in recent releases.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from moesim.errors import InputError
from moesim.files import load_json, read_text
from moesim.validate.tables import Table, table_from_rows

_CONFIG_NAME = re.compile(r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+?)"
                          r"(?:,dtype=(?P<dtype>[^,]+?))?(?:,block_shape=\[(?P<bn>\d+),(?P<bk>\d+)\])?\.json$")
# benchmark_moe --dtype -> the aiconfigurator moe_dtype of the same kernel variant.
_MOE_DTYPE = {"auto": "bfloat16", "fp8": "fp8", "fp8_w8a8": "fp8", "int8_w8a16": "int8_wo"}
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


@dataclass(frozen=True)
class KernelTime:
    """One benchmarked batch size: ``batch_size`` tokens, the Triton ``config`` used and
    ``kernel_time_us`` (microseconds per fused MoE call)."""

    batch_size: int
    config: dict
    kernel_time_us: float


@dataclass
class BenchmarkRun:
    """A benchmark_moe.py run: its arguments (``model``, ``tp_size``, ``dtype`` ...; empty if
    the ``Namespace(...)`` line was not captured) and the timed batch sizes in printed order."""

    args: dict
    times: list[KernelTime]
    source: str = ""


@dataclass
class TunedConfigs:
    """A tuned-config file: ``num_experts`` (E, per EP rank), ``shard_inter`` (N, per-shard
    intermediate size), ``device_name``, ``dtype`` (None for bf16/fp16), ``block_shape``
    ([block_n, block_k] or None) and ``configs``: batch size -> Triton config."""

    num_experts: int
    shard_inter: int
    device_name: str
    dtype: str | None
    block_shape: list[int] | None
    configs: dict[int, dict]
    triton_version: str | None = None
    extra: dict = field(default_factory=dict)


def _namespace(line: str, source: str, number: int) -> dict:
    try:
        call = ast.parse(line.strip(), mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError):
        raise InputError("cannot read the Namespace(...) arguments line", source=source, field=f"line {number}") from None


def parse_benchmark_output(text: str, source: str = "") -> BenchmarkRun:
    """Parse benchmark_moe.py's printed output (other lines, e.g. Ray's and vLLM's logs, are
    skipped). A ``Batch size`` line without its ``Kernel time`` raises InputError."""
    args: dict = {}
    times: list[KernelTime] = []
    pending: tuple[int, dict, int] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("Namespace("):
            args = _namespace(stripped, source, number)
        elif found := re.match(r"Batch size:\s*(\d+),\s*config:\s*(\{.*\})\s*$", stripped):
            if pending is not None:
                raise InputError(f"batch size {pending[0]} has no 'Kernel time' line", source=source, field=f"line {pending[2]}")
            try:
                config = ast.literal_eval(found.group(2))
            except (SyntaxError, ValueError):
                raise InputError("cannot read the config dict", source=source, field=f"line {number}") from None
            pending = (int(found.group(1)), config, number)
        elif found := re.match(r"Kernel time:\s*([0-9.eE+-]+)\s*us\s*$", stripped):
            if pending is None:
                raise InputError("'Kernel time' without a 'Batch size' line before it", source=source, field=f"line {number}")
            times.append(KernelTime(pending[0], pending[1], float(found.group(1))))
            pending = None
    if pending is not None:
        raise InputError(f"batch size {pending[0]} has no 'Kernel time' line (truncated output?)", source=source,
                         field=f"line {pending[2]}")
    if not times:
        raise InputError("no 'Batch size: ..., config: ...' / 'Kernel time: ... us' lines found", source=source)
    return BenchmarkRun(args, times, source)


def read_benchmark_output(path: str | Path) -> BenchmarkRun:
    """Read a file holding benchmark_moe.py's printed output."""
    return parse_benchmark_output(read_text(path), str(path))


def read_tuned_configs(path: str | Path) -> TunedConfigs:
    """Read a tuned-config JSON; its name gives E, N, the device and the dtype."""
    path = Path(path)
    found = _CONFIG_NAME.match(path.name)
    if not found:
        raise InputError("file name must be E=<experts>,N=<inter>,device_name=<gpu>[,dtype=..][,block_shape=[n,k]].json",
                         source=str(path))
    data = load_json(path)
    if not isinstance(data, dict):
        raise InputError("expected an object mapping batch sizes to configs", source=str(path))
    configs, extra, triton = {}, {}, None
    for key, value in data.items():
        if key == "triton_version":
            triton = str(value)
        elif key.isdigit():
            if not isinstance(value, dict) or any(k not in value for k in CONFIG_KEYS):
                raise InputError(f"expected a config with {', '.join(CONFIG_KEYS)}", source=str(path), field=key)
            configs[int(key)] = value
        else:
            extra[key] = value
    if not configs:
        raise InputError("no batch-size entries", source=str(path))
    block = [int(found["bn"]), int(found["bk"])] if found["bn"] else None
    return TunedConfigs(int(found["E"]), int(found["N"]), found["device"], found["dtype"], block,
                        dict(sorted(configs.items())), triton, extra)


def moe_rows(run: BenchmarkRun, *, hidden_size: int, inter_size: int, topk: int, num_experts: int,
             moe_dtype: str | None = None, tp_size: int | None = None, expert_parallel: bool | None = None) -> list[dict]:
    """Rows in the aiconfigurator MoE table's columns: ``kernel_source``, ``moe_dtype``,
    ``num_tokens``, ``hidden_size``, ``inter_size`` (one expert's full intermediate size),
    ``topk``, ``num_experts`` (all experts), ``moe_tp_size``, ``moe_ep_size``, ``distribution``
    ('random': top-k of Gaussian logits, see the module docstring) and ``latency``
    (milliseconds). The shape is the model's (the output does not print it); TP, EP and dtype
    come from the run's arguments unless given.

    With ``--enable-expert-parallel`` the benchmark runs E / tp experts that receive every
    token's top-k (it does not drop the tokens routed to other ranks), which is what these
    rows describe with ``moe_ep_size`` = tp."""
    tp = int(tp_size if tp_size is not None else run.args.get("tp_size", 1))
    ep = bool(expert_parallel if expert_parallel is not None else run.args.get("enable_expert_parallel", False))
    if moe_dtype is None:
        flag = str(run.args.get("dtype", "auto"))
        if flag not in _MOE_DTYPE:
            raise InputError(f"unknown benchmark_moe --dtype {flag!r}; pass moe_dtype", source=run.source)
        moe_dtype = _MOE_DTYPE[flag]
    return [{"kernel_source": "vllm_fused_moe", "moe_dtype": moe_dtype, "num_tokens": t.batch_size,
             "hidden_size": hidden_size, "inter_size": inter_size, "topk": topk, "num_experts": num_experts,
             "moe_tp_size": 1 if ep else tp, "moe_ep_size": tp if ep else 1, "distribution": "random",
             "latency": t.kernel_time_us / 1e3} for t in run.times]


def read_table(path: str | Path, *, hidden_size: int, inter_size: int, topk: int, num_experts: int) -> Table:
    """A file of benchmark_moe.py's printed output as a table of the ``moe`` family (the
    model's shape given, as :func:`moe_rows` takes it); what ``moesim validate
    --benchmark-moe`` reads."""
    run = read_benchmark_output(path)
    rows = moe_rows(run, hidden_size=hidden_size, inter_size=inter_size, topk=topk, num_experts=num_experts)
    tp = rows[0]["moe_tp_size"] * rows[0]["moe_ep_size"]
    if num_experts % rows[0]["moe_ep_size"] or inter_size % rows[0]["moe_tp_size"]:
        raise InputError(f"tp_size {tp} does not divide the shape's {num_experts} experts / {inter_size} intermediate "
                         "size (wrong --moe-shape?)", source=str(path), field="tp_size")
    if topk > num_experts // rows[0]["moe_ep_size"]:
        raise InputError(f"top-k {topk} is more than the {num_experts // rows[0]['moe_ep_size']} experts of one rank",
                         source=str(path), field="topk")
    return table_from_rows(rows, "moe", path)
