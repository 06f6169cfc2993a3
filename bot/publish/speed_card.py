"""The card's speed table: prompt and generation tokens/s of each published file, with the device they were measured
on (``report.json`` ``files[].speed``, written by ``converters.ladder.speed`` through the evaluation). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.publish import markdown
from converters.core import artifacts
from converters.core.report import Report
from converters.core.workdir import Ladder

SPEED_KEY = "speed"


def _rate(figure: Any) -> str:
    if not isinstance(figure, Mapping) or figure.get("tokens_per_s") is None:
        return "n/a"
    err = figure.get("err")
    return f"{figure['tokens_per_s']:.1f} ± {err:.1f}" if err else f"{figure['tokens_per_s']:.1f}"


def _versus(speed: Mapping[str, Any]) -> str:
    vs = speed.get("vs")
    if not isinstance(vs, Mapping):
        return ""
    parts = [f"{what} {100 * (r['ratio'] - 1):+.1f} ± {100 * r['ratio_err']:.1f} %" for what in ("pp", "tg")
             if isinstance(r := vs.get(what), Mapping) and r.get("ratio") is not None]
    return f"vs {vs.get('baseline')}: " + ", ".join(parts) if parts else ""


def speed_section(ladder: Ladder, report: Report) -> dict[str, Any] | None:
    """Rows for the published files that were measured (None: none was). One device for the table when every
    file was measured on the same one, else a device column."""
    rows = []
    for f, r in artifacts.passed_quants(ladder, report):
        speed = r.extra.get(SPEED_KEY)
        if not isinstance(speed, Mapping):
            continue
        rows.append({"type": f.type, "file": f.path, "pp": _rate(speed.get("pp")), "tg": _rate(speed.get("tg")),
                     "device": markdown.cell(str(speed.get("device") or "unknown device")),
                     "versus": _versus(speed), "prompt": speed.get("prompt"), "generate": speed.get("generate"),
                     "threads": speed.get("threads"), "runs": (speed.get("tg") or {}).get("runs")})
    if not rows:
        return None
    devices = {r["device"] for r in rows}
    first = rows[0]
    return {"rows": rows, "device": first["device"] if len(devices) == 1 else None, "threads": first["threads"],
            "prompt": first["prompt"], "generate": first["generate"], "runs": first["runs"]}
