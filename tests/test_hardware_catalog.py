"""The bundled hardware catalog: every profile loads, every name a cluster uses resolves, every
number is sourced, and a few facts are checked against their datasheets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moesim.errors import UnknownNameError
from moesim.files import data_dir
from moesim.hardware import catalog
from moesim.hardware.specs import Accelerator, Cpu, Ssd

PROFILES = data_dir("hwprofiles")

REQUIRED_DEVICES = [
    # the templates
    "h100-sxm", "xeon-8480", "nvme-gen4",
    # GPUs
    "a100-sxm", "h100-pcie", "h200-sxm", "b200", "l40s", "l4", "t4", "rtx-4090", "rtx-a5000",
    "rtx-2080", "mi300x",
    # NPUs
    "ascend-910b", "ascend-300i-duo", "tpu-v5p", "gaudi3",
    # CPUs
    "xeon-6454s", "epyc-9654", "desktop-ddr4", "desktop-ddr5", "kunpeng-920", "epyc-7742", "xeon-8570",
    # SSDs
    "nvme-gen5",
]

REQUIRED_LINKS = [
    "nvlink4", "pcie-gen5-x16", "ib-ndr",
    "nvlink3", "nvlink5", "pcie-gen4-x16", "pcie-gen3-x16", "pcie-gen4-x4", "pcie-gen5-x4", "ib-hdr",
    "roce-200g", "roce-400g", "hccs", "ici-v5p", "infinity-fabric", "gaudi3-roce",
]

REQUIRED_CLUSTERS = [
    "dgx-h100", "dgx-a100", "hgx-h200", "dgx-b200", "h100-pcie-x8", "l40s-x8", "mi300x-x8", "gaudi3-x8",
    "h100-2node", "h100-4node", "h100-16node", "h100-32node", "ascend-800i-a2", "tpu-v5p-slice",
    "rtx4090-xeon", "t4-vm", "rtx-a5000-workstation", "rtx2080-desktop",
]

NPUS = ["ascend-910b", "ascend-300i-duo", "tpu-v5p", "gaudi3"]
CPUS = ["xeon-6454s", "epyc-9654", "desktop-ddr4", "desktop-ddr5", "kunpeng-920", "epyc-7742", "xeon-8570"]

YAML_FILES = sorted(PROFILES.glob("*/*.yaml"))


def test_every_profile_loads():
    assert len(catalog.devices()) >= len(REQUIRED_DEVICES)
    assert len(catalog.links()) >= len(REQUIRED_LINKS)
    assert len(catalog.clusters()) >= len(REQUIRED_CLUSTERS)


def test_every_yaml_file_is_a_profile():
    """Each file is found under its own name (file name = profile name)."""
    for path in YAML_FILES:
        kind = path.parent.name
        lookup = {"devices": catalog.device, "links": catalog.link, "clusters": catalog.cluster}[kind]
        assert lookup(path.stem).name == path.stem, path


@pytest.mark.parametrize("name", REQUIRED_DEVICES)
def test_required_device_exists(name):
    assert catalog.device(name).name == name


@pytest.mark.parametrize("name", REQUIRED_LINKS)
def test_required_link_exists(name):
    assert catalog.link(name).name == name


@pytest.mark.parametrize("name", REQUIRED_CLUSTERS)
def test_required_cluster_exists(name):
    assert catalog.cluster(name).name == name


@pytest.mark.parametrize("name", NPUS)
def test_npus_are_npus(name):
    spec = catalog.device(name)
    assert isinstance(spec, Accelerator) and spec.kind == "npu"


@pytest.mark.parametrize("name", CPUS)
def test_cpus_are_cpus(name):
    spec = catalog.device(name)
    assert isinstance(spec, Cpu) and spec.cores > 0 and spec.memory.bandwidth > 0


@pytest.mark.parametrize("cluster", [c.name for c in catalog.clusters()])
def test_cluster_references_resolve(cluster):
    spec = catalog.cluster(cluster)
    node = spec.node
    if node.accelerators:
        assert isinstance(catalog.device(node.accelerators.device), Accelerator)
    assert isinstance(catalog.device(node.cpus.device), Cpu)
    # every node has an NVMe so device <-> host <-> SSD paths exist
    assert node.ssds is not None and node.ssd_link is not None
    assert isinstance(catalog.device(node.ssds.device), Ssd)
    for link in (node.scale_up, node.host_link, node.ssd_link, node.nic):
        if link is not None:
            catalog.link(link)
    assert node.host_memory > 0
    if spec.nodes > 1:
        assert node.nic is not None and node.nics > 0


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_file_cites_its_sources(path: Path):
    text = path.read_text()
    # "# Sources:" (dgx-h100, the first template, says "# Source:")
    assert re.search(r"^#\s*Sources?:", text, re.MULTILINE), f"{path} has no 'Sources:' header"
    tags = re.findall(r"#.*\[[A-Z0-9]+\]", text)
    assert tags or path.parent.name == "clusters", f"{path} has no [TAG] source comment"


@pytest.mark.parametrize("path", sorted(PROFILES.glob("devices/*.yaml")), ids=lambda p: p.name)
def test_device_files_have_a_sources_block(path: Path):
    assert "# Sources:" in path.read_text()


# ---- spot facts, each against its datasheet --------------------------------------------------


def test_h100_bf16():
    assert catalog.device("h100-sxm").flops["bf16"] == pytest.approx(989.4e12)


def test_h200_capacity_is_141_gb():
    capacity = catalog.device("h200-sxm").memory.capacity
    assert 141e9 <= capacity <= 141 * 2**30


def test_mi300x_capacity_is_192_gb():
    capacity = catalog.device("mi300x").memory.capacity
    assert 192e9 <= capacity <= 192 * 2**30


def test_t4_capacity_is_16_gb():
    capacity = catalog.device("t4").memory.capacity
    assert 16e9 <= capacity <= 16 * 2**30


def test_b200_has_fp4_and_fp6():
    b200 = catalog.device("b200")
    assert b200.flops["fp4"] == pytest.approx(2 * b200.flops["fp8"])
    assert "fp6" in b200.flops


def test_only_b200_has_fp4():
    with_fp4 = [d.name for d in catalog.devices() if isinstance(d, Accelerator) and "fp4" in d.flops]
    assert with_fp4 == ["b200"]


def test_tpu_v5p_is_an_npu():
    assert catalog.device("tpu-v5p").kind == "npu"


def test_int4_where_datasheets_list_it():
    for name in ("t4", "a100-sxm", "rtx-a5000"):
        spec = catalog.device(name)
        assert spec.flops["int4"] == pytest.approx(2 * spec.flops["int8"]), name


def test_turing_has_no_bf16_and_falls_back_to_fp16():
    t4 = catalog.device("t4")
    assert "bf16" not in t4.flops
    assert t4.peak_flops("bf16") == t4.flops["fp16"]


def test_desktop_memory_bandwidths():
    assert catalog.device("desktop-ddr4").memory.bandwidth == pytest.approx(51.2e9)
    assert catalog.device("desktop-ddr5").memory.bandwidth == pytest.approx(89.6e9)


def test_link_facts():
    assert catalog.link("nvlink3").bandwidth == pytest.approx(300e9)
    assert catalog.link("nvlink5").bandwidth == pytest.approx(900e9)
    assert catalog.link("ici-v5p").bandwidth == pytest.approx(4800e9 / 8)
    assert catalog.link("infinity-fabric").kind == "xgmi"
    gen4 = catalog.link("pcie-gen4-x16")
    assert gen4.h2d_pageable < gen4.h2d_pinned < gen4.bandwidth


def test_peak_flops_are_plausible():
    """Dense peaks, not sparse: nothing in the catalog beats B200's dense FP4."""
    top = catalog.device("b200").flops["fp4"]
    for spec in catalog.devices():
        if isinstance(spec, (Accelerator, Cpu)):
            assert max(spec.flops.values()) <= top, spec.name


# ---- lookup ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [("H100", "h100-sxm"), ("a100", "a100-sxm"), ("H200", "h200-sxm"), ("910b", "ascend-910b"),
     ("v5p", "tpu-v5p"), ("4090", "rtx-4090"), ("pm1743", "nvme-gen5"), ("ryzen-9-5950x", "desktop-ddr4")],
)
def test_device_alias_lookup(alias, name):
    assert catalog.device(alias).name == name


def test_link_and_cluster_alias_lookup():
    assert catalog.link("xgmi").name == "infinity-fabric"
    assert catalog.cluster("dgx-h200").name == "hgx-h200"
    assert catalog.cluster("v5p-16").name == "tpu-v5p-slice"


def test_misspelt_device_suggests_the_right_name():
    with pytest.raises(UnknownNameError) as info:
        catalog.device("h200-smx")
    assert "h200-sxm" in str(info.value)
    assert "h200-sxm" in info.value.suggestions


def test_misspelt_cluster_suggests_the_right_name():
    with pytest.raises(UnknownNameError) as info:
        catalog.cluster("dgx-a10")
    assert "dgx-a100" in str(info.value)


def test_misspelt_link_suggests_the_right_name():
    with pytest.raises(UnknownNameError) as info:
        catalog.link("nvlnk5")
    assert "nvlink5" in str(info.value)
