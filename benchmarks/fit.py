"""Benchmark: memory-budget files (converters/ladder/fit.py) against the largest stock file that fits the same budget.

On the SmolLM2-135M-Instruct checkpoint (tests/models.py), in one work dir: the stock ladder and its imatrix
(groups_merged.txt); then each budget is what llama.cpp reports for a stock size point loaded at --ctx tokens
(weights + KV cache + compute and output buffers), rounded up to the next MB -- by default the Q4_K_M and Q3_K_M
files at 4k; then the same job with those budgets: the fit stage (baseline found by loading, layout solved, file
built and loaded at the context, largest context confirmed) and the evaluation of stock and fit files together on
WikiText-2 test (disjoint from the calibration text). Types that match the source's own grid (Q4_1, Q5_1: SmolLM2's
weights are rebuilt from a Q4_1 file) are excluded from the candidates unless --include-grid.

Prints JSON: per budget, the baseline and the fit file side by side (bytes, measured memory at the context, mean KLD
± error, same top token, PPL ratio, predicted vs measured KLD), whether the fit file loads within the budget, whether
it is not worse than the baseline (mean KLD at most the baseline's plus the combined error) and whether the gate
published it, the largest context that fits, and the seconds of the fit stage.

usage: python benchmarks/fit.py [--points Q4_K_M,Q3_K_M] [--ctx 4096] [--ladder Q8_0,Q4_K_M,Q3_K_M,Q2_K]
                                [--calibration-chunks 32] [--calibration-ctx 512] [--eval-chunks 32] [--include-grid] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.jobs.job import JobSpec, Source, run_job  # noqa: E402
from converters.core import records  # noqa: E402
from converters.core.hooks import NULL_HOOKS  # noqa: E402
from converters.ladder import budget, layout  # noqa: E402
from converters.ladder.job import EvalSettings  # noqa: E402
from converters.ladder.pipeline import LadderOptions  # noqa: E402
from converters.llama import memory, toolchain  # noqa: E402
from converters.llama.calibrate import TextFile  # noqa: E402
from tests.models import smollm2_checkpoint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
GRID_TYPES = ("Q4_1", "Q5_1")


def _figures(f: dict | None) -> dict:
    if not f:
        return {}
    return {"bytes": f["size"], "kld_mean": f["kld_mean"], "kld_mean_err": f["kld_mean_err"],
            "kld_p99": f.get("kld_p99"), "same_top_p": f["same_top_p"], "same_top_p_err": f["same_top_p_err"],
            "ppl_ratio": f["ppl_ratio"], "status": f["status"], "reasons": f["reasons"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="Q4_K_M,Q3_K_M", help="stock files whose measured memory sets a budget")
    ap.add_argument("--ctx", type=int, default=4096, help="the budgets' context")
    ap.add_argument("--ladder", default="Q8_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--calibration-chunks", type=int, default=32)
    ap.add_argument("--calibration-ctx", type=int, default=512, help="tokens per calibration chunk (and probe)")
    ap.add_argument("--eval-chunks", type=int, default=32)
    ap.add_argument("--include-grid", action="store_true", help="keep Q4_1/Q5_1 among the candidates")
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: a temporary one, removed)")
    args = ap.parse_args()
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    tc = toolchain.find(required=True)
    ck = smollm2_checkpoint()
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-fit-")
        out = Path(tmp.name) / "work"
    candidates = tuple(t for t in layout.DEFAULT_CANDIDATES if args.include_grid or t not in GRID_TYPES)
    base = LadderOptions(ladder=args.ladder, calibration=TextFile.of(DATA / "groups_merged.txt"),
                         calibration_chunks=args.calibration_chunks, ctx=args.calibration_ctx,
                         tune_candidates=candidates)
    source = Source(repo="HuggingFaceTB/SmolLM2-135M-Instruct", path=ck)
    t0 = time.monotonic()
    run_job(JobSpec(source=source, model_name=ck.name, ladder=base), out, NULL_HOOKS, toolchain=tc)
    ladder = json.loads((out / "ladder.json").read_text())
    stock = {f["type"]: f for f in ladder["files"]}
    budgets, stock_memory = [], {}
    for p in points:
        got = memory.measure(tc, out / stock[p]["path"], args.ctx)
        stock_memory[p] = got.to_json()
        budgets.append(f"{math.ceil(got.total / 1e6)}MB@{args.ctx // 1024}k" if args.ctx % 1024 == 0
                       else f"{math.ceil(got.total / 1e6)}MB@{args.ctx}")
    t1 = time.monotonic()
    spec = JobSpec(source=source, model_name=ck.name, ladder=dataclasses.replace(base, fit=tuple(budgets)),
                   evaluation=EvalSettings(TextFile.of(DATA / "wiki.test.raw"), chunks=args.eval_chunks,
                                           require_source_check=False))
    run_job(spec, out, NULL_HOOKS, toolchain=tc)
    fit_wall = time.monotonic() - t1
    report = json.loads((out / "report.json").read_text())
    rec = records.load(out, "fit")
    rf = {f["type"]: f for f in report["files"]}
    result = {}
    for p, text in zip(points, budgets):
        b = budget.parse(text)
        info = (rec.extra["budgets"].get(b.label) if rec else None) or {}
        base_f, fit_f = _figures(rf.get(info.get("baseline"))), _figures(rf.get(b.type))
        row = {"budget": text, "budget_bytes": b.bytes, "ctx": b.ctx, "set_by": p, "set_by_memory": stock_memory[p],
               "baseline": info.get("baseline"), "baseline_figures": base_f,
               "baseline_memory": info.get("baseline_memory"), "fit_status": info.get("status"),
               "fit_reason": info.get("reason"), "fit_figures": fit_f, "fit_memory": info.get("memory"),
               "weight_budget": info.get("weight_budget"), "types": info.get("types"),
               "predicted_kld": info.get("predicted_kld"), "baseline_predicted_kld": info.get("baseline_predicted_kld"),
               "max_ctx": info.get("max_ctx"), "max_ctx_memory": (info.get("max_ctx_memory") or {}).get("total"),
               "stock_loads": [{"type": s["type"], "total": s["memory"]["total"], "fits": s["fits"]}
                               for s in info.get("stock_loads", [])], "seconds": info.get("seconds")}
        if base_f and fit_f:
            err = math.hypot(base_f["kld_mean_err"], fit_f["kld_mean_err"])
            row["kld_change"] = round(fit_f["kld_mean"] / base_f["kld_mean"] - 1, 4) if base_f["kld_mean"] else None
            row["combined_err"] = err
            row["not_worse"] = fit_f["kld_mean"] <= base_f["kld_mean"] + err
            row["better_by_2_err"] = base_f["kld_mean"] - fit_f["kld_mean"] > 2 * err
            row["published"] = fit_f["status"] == "passed"
        mem = (info.get("memory") or {}).get("total")
        row["loads_within_budget"] = isinstance(mem, int) and mem <= b.bytes and (info.get("memory") or {}).get(
            "ctx") == b.ctx
        result[text] = row
    print(json.dumps({
        "model": ck.name, "ladder": args.ladder, "calibration": "groups_merged.txt", "evaluation": "wiki.test.raw",
        "calibration_chunks": args.calibration_chunks, "calibration_ctx": args.calibration_ctx, "eval_chunks": args.eval_chunks, "ctx": args.ctx,
        "candidates": list(candidates), "grid_types_excluded": not args.include_grid,
        "margin": {"fraction": budget.MARGIN_FRACTION, "bytes": budget.MARGIN_BYTES},
        "budgets": result, "fit_stage_seconds": rec.seconds if rec else None,
        "fit_stage_detail": rec.extra.get("seconds") if rec else None,
        "fit_job_wall_seconds": round(fit_wall, 1), "wall_seconds": round(time.monotonic() - t0, 1),
    }, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
