"""The card's "Which file fits your GPU" table: per memory budget (``[quantize] fit``), the largest stock file that
fits it and the fit file built for it, each with its measured mean KLD and the memory llama.cpp reported when it
loaded the file at the budget's context (``ladder.json`` ``extra.fit``, written by ``converters.ladder.fit``; the
figures from ``report.json``). Only published files are listed: a withheld fit file is in the card's withheld table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.core import artifacts
from converters.core.report import Report
from converters.core.workdir import Ladder
from converters.ladder import budget


def _kld(r: Any) -> str:
    fig = r.figures()
    x, err = fig.get("kld_mean"), fig.get("kld_mean_err")
    if not isinstance(x, (int, float)):
        return "—"
    return f"{x:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")


def _memory(m: Any) -> str:
    total = m.get("total") if isinstance(m, Mapping) else None
    return budget.human(total) if isinstance(total, (int, float)) else "—"


def fit_rows(ladder: Ladder, report: Report) -> list[dict[str, Any]]:
    """Rows of the table, budget by budget (smallest first): the stock baseline, then the fit file when published."""
    info = ladder.extra.get("fit")
    budgets = info.get("budgets") if isinstance(info, Mapping) else None
    if not isinstance(budgets, Mapping):
        return []
    passed = {f.type: (f, r) for f, r in artifacts.passed_quants(ladder, report)}
    rows = []
    for b in sorted((v for v in budgets.values() if isinstance(v, Mapping)),
                    key=lambda v: (int(v.get("budget_bytes") or 0), int(v.get("ctx") or 0))):
        common = {"budget": str(b.get("budget")), "budget_h": budget.human(int(b.get("budget_bytes") or 0)),
                  "ctx": f"{int(b.get('ctx') or 0):,}"}
        base = passed.get(str(b.get("baseline") or ""))
        if base is not None:
            rows.append({**common, "file": base[0].path, "type": base[0].type, "kld": _kld(base[1]),
                         "memory": _memory(b.get("baseline_memory")), "max_ctx": "—"})
        fit = passed.get(str(b.get("type") or ""))
        if fit is not None:
            rows.append({**common, "file": fit[0].path, "type": fit[0].type, "kld": _kld(fit[1]),
                         "memory": _memory(b.get("memory")),
                         "max_ctx": f"{int(b['max_ctx']):,}" if b.get("max_ctx") else "—"})
    return rows
