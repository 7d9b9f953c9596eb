"""``moesim hw list|show``: the hardware catalog."""

from __future__ import annotations

from moesim import units
from moesim.cli.output import add_json_options, console, emit_json, table
from moesim.hardware import catalog
from moesim.errors import UnknownNameError
from moesim.hardware.specs import Accelerator, Cluster, Cpu
from moesim.hardware.topology import accelerators, route, topology


def register(sub, formatter) -> None:
    parser = sub.add_parser(
        "hw", help="list and show hardware profiles (devices, links, clusters)", formatter_class=formatter,
        epilog="examples:\n  moesim hw list\n  moesim hw list --kind clusters\n  moesim hw show h100-sxm\n  moesim hw show dgx-h100",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    listing = verbs.add_parser("list", help="list profiles", formatter_class=formatter, epilog="example:\n  moesim hw list --kind devices")
    listing.add_argument("--kind", choices=["devices", "links", "clusters", "all"], default="all")
    add_json_options(listing)
    listing.set_defaults(func=_list)
    show = verbs.add_parser("show", help="show one profile", formatter_class=formatter, epilog="example:\n  moesim hw show dgx-h100")
    show.add_argument("name", help="device, link or cluster name (or alias)")
    add_json_options(show)
    show.set_defaults(func=_show)


def _device_row(spec) -> list[str]:
    if isinstance(spec, Accelerator):
        peak = spec.flops.get("bf16") or spec.flops.get("fp16")
        return [spec.name, spec.kind, spec.full_name, units.fmt_bytes(spec.memory.capacity), units.fmt_bandwidth(spec.memory.bandwidth), units.fmt_flops(peak) + " bf16", f"${spec.price_per_hour:.2f}/h"]
    if isinstance(spec, Cpu):
        return [spec.name, "cpu", spec.full_name, units.fmt_bytes(spec.memory.capacity), units.fmt_bandwidth(spec.memory.bandwidth), units.fmt_flops(spec.peak_flops("bf16")) + " bf16", "-"]
    return [spec.name, "ssd", spec.full_name, units.fmt_bytes(spec.capacity), units.fmt_bandwidth(spec.read_bandwidth) + " read", "-", "-"]


def _list(args) -> int:
    kinds = ["devices", "links", "clusters"] if args.kind == "all" else [args.kind]
    if args.json or args.output_file:
        data = {k: [s.model_dump() for s in getattr(catalog, k)()] for k in kinds}
        emit_json(data, args.output_file)
        return 0
    if "devices" in kinds:
        table("devices", ["name", "kind", "full name", "memory", "bandwidth", "peak", "price"],
              [_device_row(s) for s in catalog.devices()], right={3, 4, 5, 6})
    if "links" in kinds:
        table("links", ["name", "kind", "full name", "bandwidth (each way)", "latency"],
              [[s.name, s.kind, s.full_name, units.fmt_bandwidth(s.bandwidth), units.fmt_time(s.latency)] for s in catalog.links()],
              right={3, 4})
    if "clusters" in kinds:
        rows = []
        for c in catalog.clusters():
            acc = c.node.accelerators
            rows.append([c.name, c.full_name, str(c.nodes), f"{acc.count}x {acc.device}" if acc else "-", c.node.scale_up or "PCIe", c.node.nic or "-"])
        table("clusters", ["name", "full name", "nodes", "per node", "scale-up", "scale-out"], rows, right={2})
    return 0


def _find(name: str):
    """A profile of any kind by name; the error for an unknown name lists all kinds."""
    for lookup in (catalog.device, catalog.link, catalog.cluster):
        try:
            return lookup(name)
        except UnknownNameError:
            continue
    known = [s.name for s in catalog.devices()] + [s.name for s in catalog.links()] + [s.name for s in catalog.clusters()]
    raise UnknownNameError("hardware profile", name, known, field="NAME")


def _show(args) -> int:
    spec = _find(args.name)
    if args.json or args.output_file:
        emit_json(spec.model_dump(), args.output_file)
        return 0
    if not isinstance(spec, Cluster):
        table(spec.full_name, ["field", "value"], [[k, _fmt(k, v)] for k, v in spec.model_dump().items()])
        return 0
    graph = topology(spec)
    accs = accelerators(graph)
    console.print(f"[bold]{spec.full_name}[/bold]: {spec.nodes} node(s), {len(accs)} accelerators")
    table("node", ["field", "value"], [[k, str(v)] for k, v in spec.node.model_dump().items()])
    samples = []
    if len(accs) > 1:
        samples.append((accs[0], accs[1]))
    if spec.nodes > 1:
        samples.append((accs[0], accs[len(accs) // spec.nodes]))
    if accs:
        samples += [(accs[0], "n0.host"), ("n0.host", accs[0])]
        if spec.node.ssds:
            samples.append(("n0.ssd0", accs[0]))
    rows = []
    for a, b in samples:
        r = route(graph, a, b)
        rows.append([f"{a} -> {b}", " > ".join(r.links), units.fmt_bandwidth(r.bandwidth), units.fmt_time(r.latency)])
    table("paths (bottleneck bandwidth, summed latency)", ["path", "links", "bandwidth", "latency"], rows, right={2, 3})
    return 0


_FORMAT = {
    "capacity": units.fmt_bytes, "cache": units.fmt_bytes, "bandwidth": units.fmt_bandwidth,
    "read_bandwidth": units.fmt_bandwidth, "write_bandwidth": units.fmt_bandwidth,
    "latency": units.fmt_time, "launch_overhead": units.fmt_time,
}


def _fmt(key: str, value) -> str:
    if isinstance(value, dict):
        if key in ("flops", "matrix_flops"):
            return ", ".join(f"{k} {units.fmt_flops(v)}" for k, v in value.items())
        return ", ".join(f"{k}: {_fmt(k, v)}" for k, v in value.items())
    if key in _FORMAT and isinstance(value, (int, float)):
        return _FORMAT[key](value)
    if key.endswith(("_pinned", "_pageable")) and isinstance(value, (int, float)):
        return units.fmt_bandwidth(value)
    return str(value)
