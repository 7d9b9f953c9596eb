"""Measure host-to-device and device-to-host copies, from pinned and from pageable host memory.

aiconfigurator has no table of these; the columns follow its style: ``direction`` (``h2d`` /
``d2h``), ``pinned`` (1: page-locked host buffer, copied by a DMA engine directly; 0: pageable,
which the driver stages through its own pinned buffer), ``message_size`` (BYTES), ``latency``
(ms), with the constant columns of the other tables. They are compared with the device's PCIe /
host link (e.g. H100 host-to-device ~35 GB/s, nvbandwidth #24).

The table goes to ``<out>/transfers/copy_torch_<version>_memcpy_perf.csv`` (a sub-folder, as
``moesim validate --measured DIR`` reads only the aiconfigurator families in DIR), with
``copy_trace.json``.

    python validation/collect/collect_copy.py --out validation/measured/h100-sxm
    python validation/collect/collect_copy.py --dry-run --out /tmp/copy-check
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_common as common  # noqa: E402

GPU_SIZES = [1 << s for s in range(12, 31, 2)]  # 4 KiB .. 1 GiB
DRY_SIZES = [1 << 12, 1 << 16]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", help="bytes per copy (default 4 KiB .. 1 GiB, x4 steps)")
    args = p.parse_args(argv)
    env = common.setup(args)
    sizes = args.sizes or (DRY_SIZES if env.dry_run else GPU_SIZES)
    # a dry run has no device: 'device' memory is a second host buffer, and pinning needs CUDA
    can_pin = env.cuda
    rows = []
    trace = env.out / "copy_trace.json"
    with common.profiled(env, trace) as prof:
        for size in sizes:
            device_buffer = torch.empty(size, dtype=torch.uint8, device=env.device)
            for pinned in ((False, True) if can_pin else (False,)):
                host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
                for direction in ("h2d", "d2h"):
                    src, dst = (host, device_buffer) if direction == "h2d" else (device_buffer, host)
                    call = lambda: dst.copy_(src, non_blocking=pinned)  # noqa: E731
                    seconds = common.time_call(call, env)
                    if prof is not None:
                        common.traced_calls(env, call, f"copy {direction} pinned={int(pinned)} bytes={size}")
                    rows.append(common.constants(env, "memcpy", "torch_copy")
                                | {"direction": direction, "pinned": int(pinned), "message_size": size,
                                   "latency": seconds * 1e3})
    table = common.write_table(env.out / "transfers" / common.table_path(env, "copy", "memcpy").name, rows)
    return {"table": table, "trace": trace if env.trace else None}


if __name__ == "__main__":
    for kind, path in main().items():
        print(f"{kind}: {path}")
