"""The size-vs-KLD chart for the model card: one point per measured file, error bars, failed files marked.

Rendering is a pure function of the report (matplotlib with the Agg backend: no display, no state kept
between calls); the PNG is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from converters.core.records import atomic_output
from converters.core.report import FAILED, Report


def points(report: Report) -> list[dict]:
    """(type, size in bytes, mean KLD, its error, failed?) of every file with finite figures."""
    out = []
    for f in report.files:
        s = f.stats
        if s is None or not (math.isfinite(s.kld_mean) and math.isfinite(s.kld_mean_err)) or f.size <= 0:
            continue
        out.append({"type": f.type, "size": f.size, "kld": s.kld_mean, "err": s.kld_mean_err,
                    "failed": f.status == FAILED})
    return out


def render(report: Report, out: Path, *, dpi: int = 110) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    pts = points(report)
    fig = Figure(figsize=(7.5, 4.6), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    scale, unit = _size_unit(max((p["size"] for p in pts), default=1))
    if pts:
        ordered = sorted(pts, key=lambda p: p["size"])
        ax.plot([p["size"] / scale for p in ordered], [max(p["kld"], 1e-6) for p in ordered], color="#9aa5b1",
                linewidth=1, zorder=1)
        for failed, color, label in ((False, "#1f6feb", "passed"), (True, "#d1242f", "failed (not published)")):
            sel = [p for p in pts if p["failed"] == failed]
            if not sel:
                continue
            ax.errorbar([p["size"] / scale for p in sel], [max(p["kld"], 1e-6) for p in sel],
                        yerr=[p["err"] for p in sel], fmt="o" if not failed else "X", color=color, ecolor=color,
                        capsize=3, markersize=6, label=label, zorder=2)
        for p in pts:
            ax.annotate(p["type"], (p["size"] / scale, max(p["kld"], 1e-6)), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        if min(p["kld"] for p in pts) > 0:
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no measured files", ha="center", va="center", transform=ax.transAxes)
    ev = report.texts.get("eval")
    ref = report.reference.get("type", "BF16")
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel(f"mean KL divergence vs {ref} (lower is better)")
    title = f"{report.model_name}: size vs quality"
    if ev is not None and ev.tokens_scored:
        title += f"\n{ev.tokens_scored} tokens of {ev.name}, ctx {ev.ctx}"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.1, y=0.1)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def _size_unit(largest: int) -> tuple[float, str]:
    if largest >= 1e9:
        return 1e9, "GB"
    if largest >= 1e6:
        return 1e6, "MB"
    return 1e3, "kB"
