"""Numeric formats: element sizes, the names engines use for them, and quantisation scales."""

from __future__ import annotations

from moesim.errors import InputError

# Bytes per element of each storage type.
DTYPE_BYTES = {
    "fp64": 8.0, "fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0,
    "fp8": 1.0, "int8": 1.0, "fp6": 0.75, "fp4": 0.5, "int4": 0.5,
    "int3": 0.375, "int2": 0.25,
}

# Names the measured tables and serving engines use, and the kernel variants they stand for
# (e.g. 'fp8_block' is fp8 with 128x128 block scales, 'int4_wo' int4 weight-only).
DTYPE_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "fp8_block": "fp8", "fp8_e4m3": "fp8", "int4_wo": "int4", "int8_wo": "int8", "nvfp4": "fp4", "mxfp4": "fp4",
    # HQQ's PyTorch backend (mixtral-offloading's experts): the weights are dequantised to a
    # full fp16 matrix before each matmul; device profiles rate the variant with moe_memory
    "int2_hqq": "int2", "int3_hqq": "int3", "int4_hqq": "int4",
}

# Bytes of scale factors per weight in the block-quantised formats checkpoints ship:
# fp8  one fp32 scale per 128x128 block (DeepSeek-V3 / Kimi-K2 "weight_block_size": [128, 128]);
# fp6, fp4  one E8M0 byte per 32 weights (OCP microscaling MXFP6 / MXFP4, as GPT-OSS's experts);
# int4 one bf16 scale per group of 128 (GPTQ / AWQ / Marlin, symmetric).
# int3, int2 HQQ as mixtral-offloading quantises experts (Eliseev & Mazur, arXiv:2312.17238, sec. 4.2):
#      3-bit with groups of 64 and 8-bit scales and zeros (0.25 bit per weight); 2-bit with groups
#      of 16 "uses, on average, 2.6 bits per parameter" (0.6 bit of scales and zeros per weight).
# int8 keeps one scale per output channel: under 0.1% of the weights, left out.
SCALE_BYTES = {"fp8": 4 / (128 * 128), "fp6": 1 / 32, "fp4": 1 / 32, "int4": 2 / 128, "int3": 2 / 64, "int2": 0.6 / 8}


def canonical_dtype(dtype: str) -> str:
    """'bfloat16' -> 'bf16', 'fp8_block' -> 'fp8' and so on."""
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join([*DTYPE_BYTES, *DTYPE_ALIASES])}")
    return name


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of ``dtype``, without scale factors."""
    return DTYPE_BYTES[canonical_dtype(dtype)]


def weight_bytes_per_param(dtype: str) -> float:
    """Bytes one stored weight of ``dtype`` takes, its block scale factors included."""
    name = canonical_dtype(dtype)
    return DTYPE_BYTES[name] + SCALE_BYTES.get(name, 0.0)
