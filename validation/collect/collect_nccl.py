"""Measure NCCL all-reduce, all-gather and all-to-all with torch.distributed (one process per
GPU, started by torchrun).

Sizes follow nccl-tests: ``message_size`` is in ELEMENTS of the buffer nccl-tests' ``size``
column describes (all-reduce: the buffer; all-gather: the gathered output; all-to-all: each
rank's whole send buffer), ``nccl_dtype`` is nccl-tests' type name (``half``, ``bfloat16``,
``int8``), ``latency`` ms is rank 0's median sample of back-to-back calls (the ranks start
together after a barrier; like nccl-tests without ``-z``, no barrier inside the timing). Rank 0 writes
``comm_nccl_<nccl version>_nccl_perf.csv`` (aiconfigurator's NCCL columns) and
``nccl_trace.json``.

    torchrun --nproc-per-node 8 validation/collect/collect_nccl.py --out validation/measured/h100-sxm
    python validation/collect/collect_nccl.py --dry-run --out /tmp/nccl-check   # gloo, one CPU process
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_common as common  # noqa: E402

NCCL_TYPES = {"half": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32, "int8": torch.int8}
GPU_SIZES = [1 << s for s in range(10, 31)]  # 1 KiB .. 1 GiB (bytes), as aiconfigurator's sweep
DRY_SIZES = [1 << 10, 1 << 14]
OPS = ("all_reduce", "all_gather", "alltoall")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(env: common.Env) -> tuple[int, int]:
    if env.dry_run and "RANK" not in os.environ:  # one process, gloo on the CPU
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    else:
        dist.init_process_group("gloo" if env.dry_run else "nccl")
    if env.cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        env.device = torch.device("cuda", local)
        torch.cuda.set_device(env.device)
        env.device_name = torch.cuda.get_device_name(env.device)
    return dist.get_rank(), dist.get_world_size()


def _collective(op: str, nbytes: int, dtype, world: int, device):
    """A callable running ``op`` on buffers sized as nccl-tests sizes them, and the element
    count of that size."""
    width = torch.tensor([], dtype=dtype).element_size()
    count = max(nbytes // width // world * world, world)
    if op == "all_reduce":
        buf = torch.ones(count, dtype=dtype, device=device)
        return (lambda: dist.all_reduce(buf)), count
    if op == "all_gather":
        out = torch.empty(count, dtype=dtype, device=device)
        part = torch.ones(count // world, dtype=dtype, device=device)
        return (lambda: dist.all_gather_into_tensor(out, part)), count
    send = torch.ones(count, dtype=dtype, device=device)
    recv = torch.empty_like(send)
    return (lambda: dist.all_to_all_single(recv, send)), count


def _nccl_version(env: common.Env) -> str:
    if env.cuda:
        return ".".join(str(v) for v in torch.cuda.nccl.version())
    return "gloo"


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--dtype", choices=sorted(NCCL_TYPES), default="half")
    p.add_argument("--sizes", type=int, nargs="+", help="bytes per collective (default 1 KiB .. 1 GiB, x2 steps)")
    args = p.parse_args(argv)
    env = common.setup(args)
    rank, world = _init(env)
    try:
        sizes = args.sizes or (DRY_SIZES if env.dry_run else GPU_SIZES)
        dtype = NCCL_TYPES[args.dtype]

        rows = []
        trace = env.out / "nccl_trace.json"
        env.trace = env.trace and rank == 0
        with common.profiled(env, trace) as prof:
            for op in args.ops:
                for nbytes in sizes:
                    fn, count = _collective(op, nbytes, dtype, world, env.device)
                    dist.barrier()  # start together; the calls then run back to back, as nccl-tests times them
                    seconds = common.time_call(fn, env)
                    if prof is not None:
                        common.traced_calls(env, fn, f"{op} bytes={count * dtype.itemsize} ranks={world}")
                    rows.append(common.constants(env, op, "NCCL" if env.cuda else "gloo")
                                | {"op_name": op, "nccl_dtype": args.dtype, "num_gpus": world, "message_size": count,
                                   "latency": seconds * 1e3})
        out = {}
        if rank == 0:
            out["table"] = common.write_table(common.table_path(env, "comm", "nccl", "nccl", _nccl_version(env)), rows)
            out["trace"] = trace if env.trace else None
        return out
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    for kind, path in main().items():
        print(f"{kind}: {path}")
