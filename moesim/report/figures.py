"""Matplotlib figures, written atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moesim.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def load_heatmap(loads: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Layer x expert heatmap of each expert's share of its layer's tokens (``loads`` is
    ``[steps, layers, experts]``)."""
    total = np.asarray(loads, dtype=np.float64).sum(axis=0)
    share = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    layers, experts = share.shape
    fig, ax = plt.subplots(figsize=(min(14, 3 + experts / 16), min(10, 2 + layers / 6)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"load share per expert {title}".strip())
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    return _save(fig, Path(path))


def hit_rate_figure(curves: dict[str, np.ndarray], top_k: int, path: str | Path, *, title: str = "") -> Path:
    """Hit rate (mean over layers) against cache size in multiples of the active experts, one
    line per policy (``curves[policy]`` is ``[layers, experts + 1]``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, curve in curves.items():
        mean = curve.mean(axis=0)
        sizes = np.arange(mean.size)
        ax.plot(sizes[1:] / top_k, mean[1:], label=policy.upper() if policy != "belady" else "Belady", marker=".")
    ax.set_xlabel("cache size (x active experts)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"expert cache hit rate {title}".strip())
    return _save(fig, Path(path))
