"""Model architectures: presets, HF config.json ingestion, parameter and memory counts."""

from moesim.models.arch import ModelArch
from moesim.models.counts import activation_bytes, kv_bytes, kv_bytes_per_token, param_counts, weight_bytes
from moesim.models.hf import from_hf_config
from moesim.models.presets import list_presets, load_model

__all__ = [
    "ModelArch",
    "activation_bytes",
    "from_hf_config",
    "kv_bytes",
    "kv_bytes_per_token",
    "list_presets",
    "load_model",
    "param_counts",
    "weight_bytes",
]
