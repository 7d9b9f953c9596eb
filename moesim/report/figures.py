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


def step_timeline(spans: list, path: str | Path, *, title: str = "", max_devices: int = 16) -> Path:
    """Gantt chart of one recorded step: a row per device and stream (compute, comm)."""
    colors = {"attention": "tab:blue", "experts": "tab:orange", "dispatch": "tab:green", "combine": "tab:red",
              "attention+head": "tab:purple"}
    devices = sorted({s[2] for s in spans})[:max_devices]
    step = min(s[1] for s in spans)
    fig, ax = plt.subplots(figsize=(12, 1 + 0.35 * 2 * len(devices)))
    t0 = min(s[5] for s in spans if s[1] == step)
    for row, device in enumerate(devices):
        for group, st, d, stream, name, start, end in spans:
            if d != device or st != step:
                continue
            y = 2 * row + (0 if stream == "compute" else 1)
            ax.barh(y, (end - start) * 1e3, left=(start - t0) * 1e3, height=0.8,
                    color=colors.get(name.split(" ")[0], "tab:gray"))
    ax.set_yticks([2 * r + o for r in range(len(devices)) for o in (0, 1)],
                  [f"dev {d} {s}" for d in devices for s in ("compute", "comm")], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time in step (ms)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper right", fontsize=7)
    ax.set_title(f"step {step} timeline {title}".strip())
    return _save(fig, Path(path))


def device_load(rank_slots: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Routed slots each expert-parallel rank (or replica) computed over the run, against the mean."""
    slots = np.asarray(rank_slots, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(min(14, 3 + slots.size / 6), 3.5))
    ax.bar(np.arange(slots.size), slots, color="tab:orange")
    ax.axhline(slots.mean(), color="black", linestyle="--", label=f"mean (max/mean {slots.max() / max(slots.mean(), 1):.2f})")
    ax.set_xlabel("EP rank")
    ax.set_ylabel("routed slots computed")
    ax.legend()
    ax.set_title(f"per-device expert load {title}".strip())
    return _save(fig, Path(path))


def latency_cdf(latencies: dict[str, np.ndarray], path: str | Path, *, title: str = "") -> Path:
    """Empirical CDFs of TTFT, TPOT and end-to-end latency, one panel each."""
    fig, axes = plt.subplots(1, len(latencies), figsize=(4 * len(latencies), 3.2))
    for ax, (name, values) in zip(np.atleast_1d(axes), latencies.items()):
        values = np.sort(values[np.isfinite(values)])
        if values.size:
            ax.plot(values * 1e3, np.arange(1, values.size + 1) / values.size)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"latency CDF {title}".strip())
    return _save(fig, Path(path))


def cache_sweep(series: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, title: str = "",
                xlabel: str = "HBM for the expert cache (GiB)", ylabel: str = "decode tokens/s") -> Path:
    """One line per policy: ``series[name] = (x, y)``."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, (x, y)) in enumerate(series.items()):
        # the colour cycle has ten colours: later lines are dashed so none is mistaken for another
        ax.plot(x, y, marker="o", markersize=3, label=name, linestyle="-" if i < 10 else "--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))
