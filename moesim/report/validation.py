"""Figures and markdown of a predicted-vs-measured comparison (``moesim validate``).

Takes plain arrays per family (``{family: (measured_s, predicted_s, size, size_label)}``) and
error lines as dicts (``moesim.validate.compare.Summary.to_dict``), so it does not depend on
the validate package.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moesim.report.figures import _save, plt


def _grid(count: int):
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def scatter(series: dict[str, tuple], path: str | Path, *, title: str = "") -> Path:
    """Predicted against measured time, log-log, one panel per family, with the y = x line and
    +-20% bands."""
    fig, axes = _grid(len(series))
    for ax, (family, (measured, predicted, _size, _label)) in zip(axes, series.items()):
        ms, ps = np.asarray(measured) * 1e3, np.asarray(predicted) * 1e3
        ax.scatter(ms, ps, s=4, alpha=0.35, color="tab:blue", edgecolors="none")
        low, high = min(ms.min(), ps.min()), max(ms.max(), ps.max())
        line = np.array([low, high])
        ax.plot(line, line, color="black", linewidth=0.8)
        ax.plot(line, line * 1.2, color="gray", linewidth=0.6, linestyle="--")
        ax.plot(line, line / 1.2, color="gray", linewidth=0.6, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        ax.set_title(f"{family} ({ms.size} rows)", fontsize=9)
        ax.grid(alpha=0.3, which="both", linewidth=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def error_vs_size(series: dict[str, tuple], path: str | Path, *, title: str = "") -> Path:
    """Signed error (predicted / measured - 1) against each family's swept size, with the
    median per power-of-two size bin."""
    fig, axes = _grid(len(series))
    for ax, (family, (measured, predicted, size, label)) in zip(axes, series.items()):
        error = np.asarray(predicted) / np.asarray(measured) - 1.0
        size = np.maximum(np.asarray(size, dtype=np.float64), 1.0)
        ax.scatter(size, error * 100, s=4, alpha=0.3, color="tab:orange", edgecolors="none")
        bins = np.floor(np.log2(size))
        centres = np.unique(bins)
        ax.plot(2.0 ** centres, [np.median(error[bins == b]) * 100 for b in centres], color="black", linewidth=1,
                label="median")
        ax.axhline(0, color="gray", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-100, 150)
        ax.set_xlabel(label)
        ax.set_ylabel("error (%)")
        ax.set_title(family, fontsize=9)
        ax.grid(alpha=0.3, linewidth=0.3)
        ax.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def _pct(v) -> str:
    return "" if v is None else f"{v:.1%}"


def error_table_markdown(lines: list[dict], *, regimes: bool = True) -> str:
    """The error table as markdown: one row per family (with its target and whether it is met)
    and, if ``regimes``, one per regime under it."""
    out = ["| family | regime | rows | median abs. error | p90 abs. error | median bias | target (median / p90) | met |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for line in lines:
        if line["regime"] != "all" and not regimes:
            continue
        target = (f"{line['target_median']:.0%} / {line['target_p90']:.0%}" if line.get("target_median") is not None
                  else ("" if line["regime"] != "all" else "none set"))
        met = {True: "yes", False: "**no**", None: ""}[line.get("met")]
        name = f"**{line['family']}**" if line["regime"] == "all" else ""
        out.append(f"| {name} | {line['regime']} | {line['rows']} | {_pct(line['median_ape'])} | {_pct(line['p90_ape'])} "
                   f"| {line['median_bias']:+.1%} | {target} | {met} |")
    return "\n".join(out)


def replace_section(text: str, begin: str, end: str, body: str, heading: str) -> str:
    """``text`` with the part between the ``begin`` and ``end`` marker lines replaced by
    ``body``; without the markers, the section (``heading``, markers, body) is appended."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip() + f"\n\n{heading}\n\n{block}\n"
