"""Typed hardware specifications: devices, links and clusters.

Profiles are YAML files under ``hwprofiles/``; each number in them carries its public source in
a comment. Quantities may be written with units ("3.35 TB/s", "80 GiB", "989 TFLOPS", "5 us");
the models below store them in SI base units (bytes, bytes/s, FLOP/s, seconds, watts).
Peak FLOP/s are dense (without 2:4 sparsity).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from moesim import units

Bytes = Annotated[float, BeforeValidator(units.bytes_), Field(ge=0)]
Bandwidth = Annotated[float, BeforeValidator(units.bandwidth), Field(gt=0)]
FlopRate = Annotated[float, BeforeValidator(units.flops), Field(gt=0)]
Seconds = Annotated[float, BeforeValidator(units.seconds), Field(ge=0)]
Watts = Annotated[float, BeforeValidator(units.watts), Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]

DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp6", "fp4", "int4")
Dtype = Literal["fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp6", "fp4", "int4"]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Memory(Spec):
    """Main memory of a device: HBM for an accelerator, DRAM for a CPU."""

    capacity: Bytes
    bandwidth: Bandwidth
    kind: str = Field("", description="HBM3, HBM3e, GDDR6X, DDR5-4800 ...")


class Efficiency(Spec):
    """How close real kernels get to the roofline on this device.

    ``compute`` is the fraction of peak FLOP/s a large, well-shaped GEMM reaches, per dtype
    (``default`` for the rest); ``memory`` the fraction of peak bandwidth a streaming kernel
    reaches. ``tile_m`` x ``tile_n`` is the output tile one compute unit works on, which sets
    wave quantisation; ``k_half`` is the reduction depth at which a GEMM reaches half its
    large-k efficiency (pipeline fill). ``moe_tile_m`` is the block of tokens a grouped MoE GEMM
    pads each expert's rows to; ``moe_compute`` the fraction of peak a grouped MoE GEMM reaches
    (lower than a dense GEMM: ragged groups, fused gathers).
    ``moe_memory`` is the fraction of ``memory`` a grouped MoE kernel variant streams its weights
    at (weight-only int4 kernels dequantise on the fly and fall well short).
    ``moe_empty_block`` is the device time a grouped-GEMM thread block costs when its rows belong
    to another rank's experts (vLLM-style EP launches its grid over every routed slot), s.
    ``memory_latency`` is the fixed time a memory-bound kernel takes beyond bytes/bandwidth
    (ramp-up and tail of the memory pipeline), s.
    ``roofline_p`` softens the roofline's corner: time = (compute^p + memory^p)^(1/p), so a kernel
    near its ridge point is slower than either bound alone (p -> infinity is the hard max).
    """

    compute: dict[str, Fraction] = Field(default_factory=lambda: {"default": 0.7})
    moe_compute: dict[str, Fraction] = Field(default_factory=lambda: {"default": 0.5})
    memory: Fraction = 0.8
    moe_memory: dict[str, Fraction] = Field(default_factory=dict)
    memory_latency: Seconds = 2e-6
    moe_empty_block: Seconds = 0.0
    moe_small_batch: dict[str, float] = Field(default_factory=dict, description="grouped MoE kernel variant -> the "
                                              "routed slots per local expert at or below which it runs a small-batch "
                                              "kernel (vLLM's CUDA moe_wna16 GEMM for int4 weight-only: 6)")
    moe_small_memory: dict[str, Fraction] = Field(default_factory=dict, description="that small-batch kernel's weight "
                                                  "stream, as a fraction of ``memory``")
    moe_small_compute: dict[str, Fraction] = Field(default_factory=dict, description="that small-batch kernel's "
                                                   "compute rate, a fraction of peak, on its rows as they are (it has no "
                                                   "row blocks: its time grows with every row)")
    moe_row_block: dict[str, int] = Field(default_factory=dict, description="grouped MoE kernel variant -> the row "
                                          "block its kernel keeps whatever the rows per expert (absent: the rows per "
                                          "expert rounded up to a power of two, 16 .. moe_tile_m)")
    moe_reads_all: list[str] = Field(default_factory=list, description="grouped MoE kernel variants that read every "
                                     "local expert's weights, whichever experts have rows (vLLM's Triton moe_wna16 "
                                     "kernel for int4 weight-only)")
    moe_unaligned: dict[str, float] = Field(default_factory=dict, description="grouped MoE GEMMs, per kernel variant "
                                            "or dtype: how many times slower a weight whose rows or columns are not a "
                                            "multiple of 16 elements runs (absent: 1)")
    moe_inflight_half: dict[str, float] = Field(default_factory=dict, description="grouped MoE GEMMs, per kernel "
                                                "variant or dtype ('default' for the rest): the weight stream reaches "
                                                "x / (x + this) of its rate, x = output tiles x weight bytes per element "
                                                "(the bytes a grid keeps in flight); absent or 0: always the full rate")
    roofline_p: float = Field(4.0, ge=1.0)
    attention_prefill: Fraction = Field(0.6, description="fraction of bf16 peak flash-attention prefill reaches")
    attention_decode: Fraction = Field(0.8, description="fraction of ``memory`` decode attention streams KV at")
    mla_prefill: Fraction = Field(0.3, description="fraction of bf16 peak un-absorbed MLA prefill reaches")
    attention_overhead: Seconds = Field(
        5e-6, description="fixed time of the kernels around attention (KV-cache write, metadata), s"
    )
    variant_overhead: dict[str, Seconds] = Field(
        default_factory=dict,
        description="fixed time a kernel variant adds per call (extra scale / quantisation kernels), s",
    )
    tile_m: int = Field(128, gt=0)
    tile_n: int = Field(128, gt=0)
    k_half: float = Field(128.0, ge=0)
    moe_tile_m: int = Field(64, gt=0)
    moe_tile_k: int = Field(0, ge=0, description="grouped MoE GEMMs: the reduction block; k is computed in whole blocks "
                            "(an expert-TP shard shorter than a block pays for the block); 0: no padding")
    gemm_tiles: list[tuple[int, int]] = Field(default_factory=list, description="output tiles (m, n) a dense GEMM "
                                              "library picks among, with split-K, for the fastest; empty: one "
                                              "power-of-two tile clamped at tile_m x tile_n (the older model)")
    tile_overhead: float = Field(0.0, ge=0, description="a gemm_tiles tile of TM x TN runs at 1 / (1 + tile_overhead "
                                 "* (1/TM + 1/TN)) of the rate per compute unit, relative to the largest listed tile "
                                 "(operand loads per multiply-add), elements")
    k_step: dict[str, Seconds] = Field(default_factory=dict, description="gemm_tiles model, by kernel variant or "
                                       "dtype: the least time one tile takes per 128-deep step of its reduction (the "
                                       "serial chain of its main loop, which a few tiles over a deep k cannot hide), s")
    no_split_k: list[str] = Field(default_factory=list, description="GEMM kernel variants or dtypes whose kernels "
                                  "never split the reduction (each tile runs all of k)")
    row_align: dict[str, int] = Field(default_factory=dict, description="GEMM kernel variant -> the multiple of rows "
                                      "(m) its kernel takes as they are; other m first copy the activations into a "
                                      "padded buffer (one more pass over them)")
    # Figures moesim.cost.attention and .collectives read when present (zero or an empty table
    # keeps the plain roofline / alpha-beta model); docs/cost-model.md says what each means.
    decode_per_sequence: Seconds = Field(0.0, description="decode attention: time per work unit, one (sequence, "
                                         "KV head) or one MLA (sequence, 64-head tile): its first key block, block "
                                         "table, split-K reduce, s")
    decode_per_dim: Seconds = Field(0.0, description="decode attention (not MLA): time per work unit per element of "
                                    "the head dim, on top of decode_per_sequence (a head dim of 128 loads and "
                                    "reduces twice the bytes per key block of 64), s")
    decode_block: Seconds = Field(0.0, description="decode attention (not MLA): time one CTA takes per key block of "
                                  "128 (FlashAttention-3's decode loop), which sets the step when few CTAs split a long "
                                  "cache; 0: the older model, the stream shared by the busy units, s")
    decode_max_splits: int = Field(16, gt=0, description="decode attention with decode_block: most splits of one "
                                   "(sequence, KV head)'s keys (vLLM caps FlashAttention's at 16 for its CUDA graphs)")
    kv_dequant: dict[str, float] = Field(default_factory=dict, description="attention over a quantised KV cache, "
                                         "by kernel and KV dtype ('fp8', 'mla_fp8'): seconds per cached element "
                                         "dequantised; '<key>_call': seconds per call")
    mla_prefill_token: Seconds = Field(0.0, description="un-absorbed MLA prefill: time per (query token, head) "
                                       "beyond the attention FLOP (latent up-projection and layout), s")
    mla_prefill_latent: Seconds = Field(0.0, description="un-absorbed MLA prefill: time per query token shared by "
                                        "all its heads (the work on the compressed latent), s")
    mla_decode: Fraction | None = Field(None, description="fraction of bf16 peak absorbed MLA decode reaches "
                                        "(default: attention_prefill)")
    decode_compute: Fraction | None = Field(None, description="fraction of bf16 peak decode attention's arithmetic "
                                            "reaches (default: attention_prefill)")
    prefill_tile: int = Field(0, ge=0, description="prefill attention: query rows of one flash-attention CTA tile "
                              "(keys in blocks of as many); prompts shorter than a tile pack a KV head's query "
                              "heads into one tile; 0: the plain FLOP model")
    prefill_rows: dict[str, int] = Field(default_factory=dict, description="prefill attention with prefill_tile: "
                                         "query rows of one CTA by head dim ('64'), where they differ from "
                                         "prefill_tile (FlashAttention-3 tiles a head dim of 64 192 rows deep)")
    prefill_cta: Seconds = Field(0.0, description="prefill attention with prefill_tile: fixed time of one CTA on "
                                 "its compute unit (prologue, epilogue, scheduling), s")
    prefill_pair: Seconds = Field(0.0, description="prefill attention with prefill_tile: a CTA's time per (query, key) "
                                  "score of its tiles beyond the tensor-core FLOP (the softmax's exponentials), s")
    prefill_fp8_block: Seconds = Field(0.0, description="prefill attention with prefill_tile over an fp8 KV cache: a "
                                       "CTA's extra time per key block (rescale, V transpose), s")
    nccl_launch: dict[str, Seconds] = Field(default_factory=dict, description="NCCL fixed cost per collective, "
                                            "by protocol (ll, simple), s")
    nccl_step: dict[str, Seconds] = Field(default_factory=dict, description="NCCL latency per ring step, by protocol, s")
    nccl_bus: dict[str, Fraction] = Field(default_factory=dict, description="Simple-protocol bus bandwidth over the "
                                          "ring's link bandwidth, by group size ('2', '4', '8')")
    nccl_ll_bus: Fraction = Field(0.5, description="LL protocol bandwidth over Simple's")
    nccl_op: dict[str, float] = Field(default_factory=dict, description="bus bandwidth multiplier per collective "
                                      "(all_reduce with NVLS, all_to_all)")
    deepep: dict[str, float] = Field(default_factory=dict, description="DeepEP kernel figures: '<mode>_<phase>_floor' "
                                     "(s), '<mode>_<phase>_rate' (B/s per SM for normal, per local expert for ll), "
                                     "'<mode>_<phase>_cap' (B/s), '<mode>_<phase>_token' (copies per token), "
                                     "'ll_expert' (s per expert)")

    def compute_for(self, *names: str) -> float:
        """Efficiency for the first of ``names`` the profile lists (a kernel variant such as
        'fp8_block' before its dtype 'fp8'), else ``default``."""
        return _first(self.compute, names, 0.7)

    def moe_compute_for(self, *names: str) -> float:
        return _first(self.moe_compute, names, 0.5)

    def moe_memory_for(self, *names: str) -> float:
        return _first(self.moe_memory, names, 1.0) if self.moe_memory else 1.0

    def moe_inflight_half_for(self, *names: str) -> float:
        return _first(self.moe_inflight_half, names, 0.0)

    def moe_unaligned_for(self, *names: str) -> float:
        return _first(self.moe_unaligned, names, 1.0)


def _first(table: dict[str, float], names: tuple[str, ...], fallback: float) -> float:
    for name in names:
        if name in table:
            return table[name]
    return table.get("default", fallback)


class Accelerator(Spec):
    """A GPU or NPU."""

    kind: Literal["gpu", "npu"]
    name: str
    full_name: str
    vendor: str
    aliases: list[str] = Field(default_factory=list)
    compute_units: int = Field(gt=0, description="SMs, CUs, AI cores or TensorCores")
    flops: dict[Dtype, FlopRate]
    memory: Memory
    cache: Bytes = Field(description="last-level on-chip cache (L2 / LLC), bytes")
    launch_overhead: Seconds = Field(description="fixed cost of one kernel launch, s")
    power: Watts
    price_per_hour: float = Field(ge=0, description="on-demand cloud price, $ per device-hour")
    efficiency: Efficiency = Field(default_factory=Efficiency)

    @model_validator(mode="after")
    def _needs_a_matmul_dtype(self):
        if not ({"bf16", "fp16"} & set(self.flops)):
            raise ValueError("flops must give at least bf16 or fp16")
        return self

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; a dtype the hardware lacks runs at the nearest wider
        one it has (int4/fp4 weights are dequantised to the activation dtype)."""
        for candidate in _FALLBACK.get(dtype, (dtype,)):
            if candidate in self.flops:
                return self.flops[candidate]
        return self.flops.get("bf16") or self.flops["fp16"]


_FALLBACK = {
    "fp4": ("fp4", "fp8", "int8", "bf16", "fp16"),
    "int4": ("int4", "int8", "fp8", "bf16", "fp16"),
    "int3": ("bf16", "fp16"),  # HQQ 3- and 2-bit weights are dequantised against bf16 activations
    "int2": ("bf16", "fp16"),
    "fp6": ("fp6", "fp8", "bf16", "fp16"),
    "fp8": ("fp8", "bf16", "fp16"),
    "int8": ("int8", "fp8", "bf16", "fp16"),
    "bf16": ("bf16", "fp16"),
    "fp16": ("fp16", "bf16"),
    "tf32": ("tf32", "fp32"),
}


class Cpu(Spec):
    """A host CPU (one socket) with its DRAM."""

    kind: Literal["cpu"]
    name: str
    full_name: str
    vendor: str
    aliases: list[str] = Field(default_factory=list)
    cores: int = Field(gt=0)
    clock: Annotated[float, BeforeValidator(lambda v: units.parse(v, "frequency"))]
    flops: dict[Dtype, FlopRate] = Field(description="vector (AVX-512 / AVX2) peak per socket")
    matrix_flops: dict[Dtype, FlopRate] = Field(
        default_factory=dict, description="matrix-engine (AMX) peak per socket, where it exists"
    )
    memory: Memory
    dram_channels: int = Field(gt=0)
    cache: Bytes
    power: Watts
    price_per_hour: float = Field(0.0, ge=0)
    launch_overhead: Seconds = Field(0.0, description="cost of dispatching one operator, s")
    efficiency: Efficiency = Field(default_factory=lambda: Efficiency(compute={"default": 0.5}, memory=0.7))

    @property
    def compute_units(self) -> int:
        return self.cores

    def peak_flops(self, dtype: str) -> float:
        """Best of the matrix engine and the vector units for ``dtype``."""
        options = [table[c] for table in (self.matrix_flops, self.flops) for c in _FALLBACK.get(dtype, (dtype,)) if c in table]
        return max(options) if options else self.flops.get("fp32", min(self.flops.values()))


class Ssd(Spec):
    """An NVMe SSD."""

    kind: Literal["ssd"]
    name: str
    full_name: str
    vendor: str
    aliases: list[str] = Field(default_factory=list)
    capacity: Bytes
    read_bandwidth: Bandwidth
    write_bandwidth: Bandwidth
    latency: Seconds
    interface: str
    power: Watts
    price_per_hour: float = Field(0.0, ge=0)


Device = Annotated[Accelerator | Cpu | Ssd, Field(discriminator="kind")]


class Link(Spec):
    """A kind of interconnect, as one device's port to it.

    ``bandwidth`` is per direction, per device (e.g. NVLink 4: 450 GB/s each way per H100);
    full duplex unless ``duplex_efficiency`` says how much each direction keeps when both run.
    PCIe links may give host-to-device and device-to-host rates for pinned and pageable
    memory separately, as measured copy engines reach them.
    """

    kind: Literal["nvlink", "pcie", "infiniband", "roce", "hccs", "ici", "ethernet", "nvme", "upi", "xgmi"]
    name: str
    full_name: str
    aliases: list[str] = Field(default_factory=list)
    bandwidth: Bandwidth
    latency: Seconds
    efficiency: Fraction = Field(0.85, description="fraction of bandwidth large transfers reach")
    duplex_efficiency: Fraction = 1.0
    switched: bool = Field(False, description="devices meet through a switch (NVSwitch, IB switch)")
    h2d_pinned: Bandwidth | None = None
    d2h_pinned: Bandwidth | None = None
    h2d_pageable: Bandwidth | None = None
    d2h_pageable: Bandwidth | None = None


class DeviceGroup(Spec):
    device: str
    count: int = Field(gt=0)


class Node(Spec):
    """One server: accelerators, host CPUs with DRAM, SSDs, and the links between them."""

    accelerators: DeviceGroup | None = None
    cpus: DeviceGroup
    host_memory: Bytes = Field(description="DRAM installed in the node, all sockets, bytes")
    ssds: DeviceGroup | None = None
    scale_up: str | None = Field(None, description="link among the node's accelerators (NVLink, HCCS, ICI)")
    host_link: str = Field(description="accelerator <-> host link (PCIe)")
    ssd_link: str | None = None
    nic: str | None = Field(None, description="scale-out link (InfiniBand, RoCE)")
    nics: int = Field(0, ge=0, description="scale-out ports per node")


class Cluster(Spec):
    name: str
    full_name: str
    aliases: list[str] = Field(default_factory=list)
    nodes: int = Field(1, gt=0)
    node: Node
    price_per_hour: float | None = Field(
        None, ge=0, description="whole-cluster $ per hour when quoted as such; else summed from devices"
    )
