"""Exports of a recommendation in the files and flags serving and training frameworks read.

- ``sglang``: the JSON of SGLang's ``--init-expert-location``: exactly one key,
  ``physical_to_logical_map`` ``[num_hidden_layers][num_physical]`` (SGLang's
  ``ExpertLocationMetadata.init_by_mapping`` takes the file's keys as arguments, so any other key
  is an error). Its rows count every decoder layer, dense ones too (``num_layers`` is the
  config's ``num_hidden_layers``); a dense layer's row is the start-up map ``p % experts``.
  ``--ep-num-redundant-experts`` must equal slots minus experts.
- ``vllm-ascend``: the static expert map of vllm-ascend (``expert_map_path``):
  ``{"moe_layer_count": L, "layer_list": [{"layer_id": i, "device_count": D, "device_list":
  [{"device_id": d, "device_expert": [logical ids]}]}]}``, MoE layers counted from 0, the same
  number of experts on every device, no expert twice on one device (its loader indexes a
  device's experts by id).
- ``npz``: EPLB's arrays as ``rebalance_experts`` returns them: ``phy2log`` ``[L, slots]``,
  ``log2phy`` ``[L, experts, most replicas]`` padded with -1, ``logcnt`` ``[L, experts]``; plus
  ``weight`` ``[L, slots]``, each slot's share of its expert's tokens.
- ``flags``: launch flags for vLLM, SGLang and Megatron-Core (and llama.cpp for an offload plan)
  from a placement, layout or offload plan.
"""

from __future__ import annotations

import io
import json
import shlex
import zipfile
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.files import atomic_write
from moesim.plan.eplb import log2phy_map, replica_counts
from moesim.plan.recommend import Recommendation

FORMATS = ("sglang", "vllm-ascend", "npz", "flags")
SUFFIX = {"sglang": ".json", "vllm-ascend": ".json", "npz": ".npz", "flags": ".sh"}


def _placement(rec: Recommendation, fmt: str) -> tuple[np.ndarray, dict]:
    if rec.kind != "placement":
        raise InputError(f"the {fmt} export needs a placement plan; this is a {rec.kind} plan", field="--format")
    d = rec.decision
    phy2log = np.asarray(d["phy2log"], dtype=np.int64)
    if phy2log.ndim != 2 or phy2log.shape[1] % int(d["gpus"]):
        raise InputError(f"phy2log of shape {phy2log.shape} does not split over {d['gpus']} GPUs", field="decision.phy2log")
    return phy2log, d


def sglang_location(rec: Recommendation) -> dict:
    """SGLang's ``--init-expert-location`` JSON (see the module docstring)."""
    phy2log, d = _placement(rec, "sglang")
    experts, slots = int(d["experts"]), phy2log.shape[1]
    layer_ids = d.get("layer_ids") or list(range(phy2log.shape[0]))
    hidden_layers = int(d.get("num_hidden_layers") or max(layer_ids) + 1)
    rows = np.tile(np.arange(slots) % experts, (hidden_layers, 1))
    rows[np.asarray(layer_ids)] = phy2log
    return {"physical_to_logical_map": rows.tolist()}


def vllm_ascend_map(rec: Recommendation) -> dict:
    """vllm-ascend's static expert map (see the module docstring)."""
    phy2log, d = _placement(rec, "vllm-ascend")
    gpus = int(d["gpus"])
    per = phy2log.shape[1] // gpus
    layers = []
    for layer, row in enumerate(phy2log):
        devices = []
        for g in range(gpus):
            held = row[g * per:(g + 1) * per]
            if np.unique(held).size != held.size:
                raise InputError(f"MoE layer {layer}: device {g} holds expert {int(np.argmax(np.bincount(held)))} "
                                 "twice, which vllm-ascend's expert map cannot express", field="decision.phy2log")
            devices.append({"device_id": g, "device_expert": held.tolist()})
        layers.append({"layer_id": layer, "device_count": gpus, "device_list": devices})
    return {"moe_layer_count": int(phy2log.shape[0]), "layer_list": layers}


def eplb_arrays(rec: Recommendation) -> dict[str, np.ndarray]:
    """EPLB's ``phy2log``, ``log2phy`` (-1 padded) and ``logcnt``, and the slots' ``weight``."""
    phy2log, d = _placement(rec, "npz")
    experts = int(d["experts"])
    logcnt = replica_counts(phy2log, experts)
    log2phy = log2phy_map(phy2log, logcnt)
    weight = np.asarray(d.get("weight", 1.0 / np.take_along_axis(logcnt, phy2log, axis=1)), dtype=np.float64)
    return {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt, "weight": weight}


# -- launch flags ---------------------------------------------------------------------------------

def _parallel(rec: Recommendation) -> dict:
    d = rec.decision
    base = d.get("parallel", d) if rec.kind == "placement" else d
    out = {k: int(base.get(k) or 1) for k in ("tp", "dp", "pp", "ep", "expert_tp")}
    if rec.kind == "placement" and "parallel" not in d:
        out["ep"] = int(d["gpus"])
    return out


def _megatron_stages(stages: list, pp: int) -> list[str]:
    """Megatron-Core's flags for a pipeline split ``[[first, end), ...]`` (decoder layers): none
    when even, ``--decoder-first/last-pipeline-num-layers`` when only the ends differ, else the
    explicit ``--pipeline-model-parallel-layout`` (E embedding, t decoder layer, L loss)."""
    sizes = [int(end) - int(first) for first, end in stages]
    if len(sizes) != pp or len(set(sizes)) == 1:
        return []
    middle = sizes[1:-1]
    if len(set(middle)) <= 1:
        flags = []
        even = middle[0] if middle else None
        if even is None or sizes[0] != even:
            flags += ["--decoder-first-pipeline-num-layers", str(sizes[0])]
        if even is None or sizes[-1] != even:
            flags += ["--decoder-last-pipeline-num-layers", str(sizes[-1])]
        return flags
    parts = [f"t*{n}" for n in sizes]
    parts[0] = "E," + parts[0]
    parts[-1] += ",L"
    return ["--pipeline-model-parallel-layout", "|".join(parts)]


def launch_flags(rec: Recommendation, *, location_file: str = "expert_location.json",
                 ascend_map_file: str = "expert_map.json") -> dict[str, list[str]]:
    """Command lines per framework (``vllm``, ``sglang``, ``megatron``, ``llama.cpp``) as token
    lists; a ``#`` token starts a note on what the framework cannot express. ``MODEL`` stands for
    the checkpoint path."""
    if rec.kind == "offload":
        return _offload_flags(rec)
    p = _parallel(rec)
    d = rec.decision
    tp, dp, pp, ep, etp = p["tp"], p["dp"], p["pp"], p["ep"], p["expert_tp"]
    nodes = int(d.get("nodes") or 1)
    redundant = int(d["slots"]) - int(d["experts"]) if rec.kind == "placement" else 0

    vllm = ["vllm", "serve", "MODEL", "--tensor-parallel-size", str(tp), "--data-parallel-size", str(dp)]
    if pp > 1:
        vllm += ["--pipeline-parallel-size", str(pp)]
    if ep > 1:
        vllm += ["--enable-expert-parallel"]
    if redundant:
        vllm += ["--enable-eplb", "--eplb-config", json.dumps({"num_redundant_experts": redundant})]
    if rec.kind == "placement" and d.get("method") == "round_robin":
        vllm += ["--expert-placement-strategy", "round_robin"]
    if d.get("max_running"):
        vllm += ["--max-num-seqs", str(d["max_running"])]
    if d.get("max_batched_tokens"):
        vllm += ["--max-num-batched-tokens", str(d["max_batched_tokens"])]
    notes = []
    if ep > 1 and etp > 1:
        notes.append(f"vLLM's EP spans TP x DP with unsharded experts; expert TP {etp} is not expressible")
    if rec.kind == "placement" and d.get("method") not in ("contiguous", "round_robin"):
        notes.append("vLLM reads no placement file: EPLB rebalances online from its own start-up layout")
    vllm += [f"# {n}" for n in notes]

    sglang = ["python", "-m", "sglang.launch_server", "--model-path", "MODEL", "--tp-size", str(tp * dp)]
    if dp > 1:
        sglang += ["--dp-size", str(dp), "--enable-dp-attention"]
    if pp > 1:
        sglang += ["--pp-size", str(pp)]
    if ep > 1:
        sglang += ["--ep-size", str(ep), "--moe-a2a-backend", "deepep"]
    if nodes > 1:
        sglang += ["--nnodes", str(nodes)]
    if rec.kind == "placement":
        sglang += ["--init-expert-location", location_file]
        if redundant:
            sglang += ["--ep-num-redundant-experts", str(redundant)]
    if d.get("max_running"):
        sglang += ["--max-running-requests", str(d["max_running"])]
    if d.get("max_batched_tokens"):
        sglang += ["--chunked-prefill-size", str(d["max_batched_tokens"])]

    megatron = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                "--expert-model-parallel-size", str(ep), "--expert-tensor-parallel-size", str(etp)]
    if rec.kind == "placement":
        megatron += ["--num-experts", str(d["experts"]), "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
                     "# Megatron-Core places experts contiguously per EP rank; it reads no placement file"]
    if d.get("stages"):
        megatron += _megatron_stages(d["stages"], pp)
    if d.get("virtual_stages"):
        megatron += ["--num-virtual-stages-per-pipeline-rank", str(d["virtual_stages"])]
    if d.get("micro_batches"):
        megatron += [f"# {d['micro_batches']} micro-batches per step: set --global-batch-size = micro-batch size x "
                     f"{d['micro_batches']} x data-parallel size"]
    out = {"vllm": vllm, "sglang": sglang, "megatron": megatron}
    if rec.kind == "placement":
        out["vllm-ascend"] = ["vllm", "serve", "MODEL", "--tensor-parallel-size", str(tp), "--data-parallel-size", str(dp),
                              "--enable-expert-parallel", "--additional-config",
                              json.dumps({"eplb_config": {"expert_map_path": ascend_map_file}})]
        try:
            vllm_ascend_map(rec)
        except InputError as exc:
            out["vllm-ascend"].append(f"# no expert map for this plan: {exc.message}")
    return out


def _offload_flags(rec: Recommendation) -> dict[str, list[str]]:
    """llama.cpp for an offload plan: whole layers' experts on the CPU (``--n-cpu-moe``) or all
    of them (``--cpu-moe``); a per-expert HBM cache has no llama.cpp equivalent."""
    d = rec.decision
    cmd = ["llama-server", "-m", "MODEL.gguf", "-ngl", "999"]
    cache = d.get("cache_experts")
    on_cpu = d.get("on_miss") in ("cpu", "hybrid")
    model = (rec.inputs.get("model") or {}).get("name") if isinstance(rec.inputs.get("model"), dict) else None
    if cache == 0 and on_cpu:
        cmd += ["--cpu-moe"]
    elif d.get("scope") == "layers" and cache is not None and model:
        from moesim.models.presets import load_model  # only an offload plan needs the model's shape

        arch = load_model(model)
        layers, experts = len(arch.moe_layers), arch.moe.num_experts
        on_gpu = min(layers, round(cache * layers / experts))
        cmd += ["--n-cpu-moe", str(layers - on_gpu)]
    else:
        cmd += ["# llama.cpp keeps whole layers' experts on the CPU or GPU; a per-expert cache "
                f"({d.get('residency', '?')}, {cache} slots a layer) has no equivalent"]
    if d.get("max_running"):
        cmd += ["--parallel", str(d["max_running"])]
    return {"llama.cpp": cmd}


def flags_text(rec: Recommendation, **files) -> str:
    """The launch flags as a shell snippet, one framework a line, notes as comments."""
    lines = [f"# launch flags for this {rec.kind} plan (moesim plan export --format flags); MODEL: the checkpoint"]
    for name, tokens in launch_flags(rec, **files).items():
        notes = [t for t in tokens if t.startswith("# ")]
        words = [t for t in tokens if not t.startswith("# ")]
        lines.append(f"# {name}" + "".join(f"\n#   {n[2:]}" for n in notes))
        lines.append(" ".join(shlex.quote(w) for w in words))
    return "\n".join(lines) + "\n"


def write_export(rec: Recommendation, fmt: str, path: str | Path) -> Path:
    """Write ``rec`` as ``fmt`` (:data:`FORMATS`) to ``path``, atomically."""
    path = Path(path)
    if fmt == "sglang":
        return atomic_write(path, json.dumps(sglang_location(rec)) + "\n")
    if fmt == "vllm-ascend":
        return atomic_write(path, json.dumps(vllm_ascend_map(rec), indent=1) + "\n")
    if fmt == "npz":
        return atomic_write(path, _npz_bytes(eplb_arrays(rec)))
    if fmt == "flags":
        siblings = {"location_file": str(path.with_name("expert_location.json")),
                    "ascend_map_file": str(path.with_name("expert_map.json"))}
        return atomic_write(path, flags_text(rec, **siblings))
    raise InputError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}", field="--format")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.load`` reads) with fixed member timestamps, so the same arrays give
    the same bytes (``np.savez`` stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def write_all(rec: Recommendation, folder: str | Path) -> tuple[list[Path], list[str]]:
    """Every export that applies to ``rec`` into ``folder``: the SGLang location, the
    vllm-ascend map and the EPLB arrays of a placement plan, and the flags. Returns the files
    written and, for each format the plan cannot be written in, why."""
    folder = Path(folder)
    written, skipped = [], []
    if rec.kind == "placement":
        for fmt, name in (("sglang", "expert_location.json"), ("vllm-ascend", "expert_map.json"), ("npz", "eplb.npz")):
            try:
                written.append(write_export(rec, fmt, folder / name))
            except InputError as exc:
                skipped.append(f"{fmt}: {exc.message}")
    written.append(write_export(rec, "flags", folder / "launch.sh"))
    return written, skipped
