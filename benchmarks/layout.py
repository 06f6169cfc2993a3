"""Benchmark: per-tensor tuned files (converters/ladder/tune.py) vs llama.cpp's stock mixes at the same byte budget.

On the SmolLM2-135M-Instruct checkpoint (tests/models.py), in one run: the ladder (stock files), the imatrix on the
calibration text (groups_merged.txt), tuning of each size point (probes on the calibration text), and the
evaluation of stock and tuned files together on WikiText-2 test (disjoint from the calibration text). Prints JSON:
per size point stock/tuned bytes, mean KLD ± error, same top token ± error, PPL ratio, the relative KLD change,
the target and whether it is met, and the seconds: tuning vs the stock files' own quantize + evaluate time.

Targets (issue 12): tuned KLD at least 15 % lower than Q4_K_M's, 25 % lower than Q3_K_M's and Q2_K's, at no more
bytes; tuning time at most 2x the stock files' quantize + evaluate time.

usage: python benchmarks/layout.py [--points Q4_K_M,Q3_K_M,Q2_K] [--calibration-chunks 32] [--eval-chunks 32]
                                   [--ctx 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.jobs.job import JobSpec, Source, run_job  # noqa: E402
from converters.core import records
from converters.llama import toolchain
from converters.llama.calibrate import TextFile  # noqa: E402
from converters.core.hooks import NULL_HOOKS  # noqa: E402
from converters.ladder.job import EvalSettings  # noqa: E402
from converters.ladder.pipeline import LadderOptions  # noqa: E402
from tests.models import smollm2_checkpoint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TARGETS = {"Q4_K_M": 0.15, "Q3_K_M": 0.25, "Q2_K": 0.25}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--calibration-chunks", type=int, default=32)
    ap.add_argument("--eval-chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: a temporary one, removed)")
    args = ap.parse_args()
    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    tc = toolchain.find(required=True)
    ck = smollm2_checkpoint()
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-layout-")
        out = Path(tmp.name) / "work"
    from converters.ladder import tune as tune_mod

    spec = JobSpec(source=Source(repo="HuggingFaceTB/SmolLM2-135M-Instruct", path=ck), model_name=ck.name,
                   ladder=LadderOptions(ladder=",".join(points), calibration=TextFile.of(DATA / "groups_merged.txt"),
                                        calibration_chunks=args.calibration_chunks, ctx=args.ctx, tune=points,
                                        tune_seconds=24 * 3600),
                   evaluation=EvalSettings(TextFile.of(DATA / "wiki.test.raw"), chunks=args.eval_chunks,
                                           require_source_check=False))
    t0 = time.monotonic()
    run_job(spec, out, NULL_HOOKS, toolchain=tc)
    wall = time.monotonic() - t0
    ladder = json.loads((out / "ladder.json").read_text())
    report = json.loads((out / "report.json").read_text())
    tune_rec = records.load(out, "tune")
    lf = {f["type"]: f for f in ladder["files"]}
    rf = {f["type"]: f for f in report["files"]}

    def figures(t: str) -> dict:
        f = rf.get(t)
        if f is None:
            return {}
        return {"bytes": f["size"], "kld_mean": f["kld_mean"], "kld_mean_err": f["kld_mean_err"],
                "same_top_p": f["same_top_p"], "same_top_p_err": f["same_top_p_err"], "ppl_ratio": f["ppl_ratio"],
                "status": f["status"], "reasons": f["reasons"]}

    stock_seconds = 0.0
    result = {}
    for p in points:
        s, t = figures(p), figures(f"{p}-tuned")
        q_s = lf.get(p, {}).get("seconds") or 0.0
        e_s = sum((rf.get(p) or {}).get("seconds", {}).values())
        stock_seconds += q_s + e_s
        row = {"stock": s, "tuned": t, "stock_quantize_evaluate_seconds": round(q_s + e_s, 1),
               "tune_point": (tune_rec.extra["points"].get(p) if tune_rec else None), "target_kld_drop": TARGETS.get(p)}
        if s and t and s["kld_mean"]:
            drop = 1 - t["kld_mean"] / s["kld_mean"]
            row["kld_drop"] = round(drop, 4)
            row["bytes_ratio"] = round(t["bytes"] / s["bytes"], 5)
            row["target_met"] = drop >= TARGETS.get(p, 0) and t["bytes"] <= s["bytes"]
        result[p] = row
    tuning = tune_rec.seconds if tune_rec else None
    print(json.dumps({
        "model": ck.name, "calibration": "groups_merged.txt", "evaluation": "wiki.test.raw",
        "calibration_chunks": args.calibration_chunks, "eval_chunks": args.eval_chunks, "ctx": args.ctx,
        "probe_chunks": tune_mod.DEFAULT_PROBE_CHUNKS, "points": result,
        "scales": tune_rec.extra.get("scales") if tune_rec else None,
        "probes": tune_rec.extra.get("probes") if tune_rec else None,
        "tuning_seconds": tuning, "tuning_detail": tune_rec.extra.get("seconds") if tune_rec else None,
        "stock_quantize_evaluate_seconds": round(stock_seconds, 1),
        "tuning_cost_ratio": round(tuning / stock_seconds, 3) if tuning and stock_seconds else None,
        "cost_target_met": bool(tuning and stock_seconds and tuning <= 2 * stock_seconds),
        "wall_seconds": round(wall, 1),
    }, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
