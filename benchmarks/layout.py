"""Benchmark: per-tensor tuned files (converters/ladder/tune.py) vs llama.cpp's stock mixes at the same byte budget.

On the SmolLM2-135M-Instruct checkpoint (tests/models.py): the ladder (stock files), the imatrix on the calibration
text (groups_merged.txt), tuning of each size point (scored on the calibration text), and the evaluation of stock
and tuned files together on WikiText-2 test (disjoint from the calibration text). Two tuning runs on the same stock
files: ``with_grid_types`` (every candidate type) and ``without_grid_types`` (the types that match the source's own
grid excluded: SmolLM2 is rebuilt from a Q4_1 file, so Q4_1/Q5_1 reproduce its weights; ``--grid auto`` finds them
from the measured errors: a type is on the grid when its error is below that of a larger type for most tensors).
No gain is quoted from the run with them.

Prints JSON: per run and size point, stock and tuned side by side: bytes, mean KLD ± error, the paired difference
(per chunk when the evaluation's figures carry per-chunk KLD, else the two errors combined; ``paired`` says which),
p99 KLD, same top token, PPL ratio, predicted vs measured KLD on the calibration text (with ``--confirm on``), pp/tg
tokens/s (llama-bench, the speed stage of the job); tuning seconds split into errors / calibration runs / solve / builds against the stock files'
quantize + evaluate seconds; and the acceptance of issue 21: tuning <= 1x stock, no size point measured worse than
stock, and (run without grid types) at least one size point better than stock by more than 2 paired standard errors.

usage: python benchmarks/layout.py [--points Q4_K_M,Q3_K_M,Q2_K] [--calibration-chunks 32] [--eval-chunks 32]
                                   [--ctx 512] [--grid auto|none|Q4_1,Q5_1] [--confirm on|off] [--speed on|off]
                                   [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.jobs.job import JobSpec, Source, run_job  # noqa: E402
from converters.core import records  # noqa: E402
from converters.core.hooks import NULL_HOOKS  # noqa: E402
from converters.core.report import paired_difference  # noqa: E402
from converters.ladder import layout, tensorerr, tune  # noqa: E402
from converters.ladder.job import EvalSettings  # noqa: E402
from converters.ladder.pipeline import LadderOptions  # noqa: E402
from converters.llama import toolchain  # noqa: E402
from converters.ladder.speed import SpeedOptions  # noqa: E402
from converters.llama.calibrate import TextFile  # noqa: E402
from tests.models import smollm2_checkpoint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
REUSED = ("records/convert.json", "records/calibrate.json", "records/inspect.json", "records/templates.json")


def _job(ck: Path, points: tuple[str, ...], args: argparse.Namespace, exclude: tuple[str, ...]) -> JobSpec:
    return JobSpec(source=Source(repo="HuggingFaceTB/SmolLM2-135M-Instruct", path=ck), model_name=ck.name,
                   ladder=LadderOptions(ladder=",".join(points), calibration=TextFile.of(DATA / "groups_merged.txt"),
                                        calibration_chunks=args.calibration_chunks, ctx=args.ctx, tune=points,
                                        tune_seconds=24 * 3600, tune_exclude=exclude,
                                        tune_confirm=args.confirm == "on"),
                   evaluation=EvalSettings(TextFile.of(DATA / "wiki.test.raw"), chunks=args.eval_chunks,
                                           require_source_check=False,
                                           speed=SpeedOptions(scope="tuned") if args.speed == "on" else None))


def _second_workdir(first: Path, second: Path) -> None:
    """The first run's reference, imatrix and stock files (hard links) and their records: only tune and evaluate
    run again."""
    second.mkdir(parents=True)
    ladder = json.loads((first / "ladder.json").read_text())
    keep = {ladder["reference"]["path"], *(p for f in ladder["files"] if not layout.is_tuned(f["type"])
                                          for p in f["parts"])}
    if ladder.get("imatrix"):
        keep |= {ladder["imatrix"]["gguf"], ladder["imatrix"].get("dat") or ""}
    for p in first.rglob("*"):
        rel = p.relative_to(first).as_posix()
        if p.is_file() and (rel in keep or rel.endswith("sha256-cache.json") or rel == "plan.json"
                            or rel in REUSED or rel.startswith("records/quantize")):
            (second / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(p, second / rel)
    # ladder.json without the tuned files: the quantize record is complete, so quantize is skipped
    ladder["files"] = [f for f in ladder["files"] if not layout.is_tuned(f["type"])]
    ladder.get("extra", {}).pop("tune", None)
    (second / "ladder.json").write_text(json.dumps(ladder))


def _paired(s: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    d = paired_difference(s.get("chunk_kld") or [], t.get("chunk_kld") or [])
    if d is not None:
        return {"gain": d[0], "err": d[1], "chunks": d[2], "paired": True}
    return {"gain": s["kld_mean"] - t["kld_mean"], "err": math.hypot(s["kld_mean_err"], t["kld_mean_err"]),
            "paired": False, "why": "no per-chunk KLD in report.json"}


def _figures(f: dict[str, Any] | None) -> dict[str, Any]:
    if f is None:
        return {}
    return {"bytes": f["size"], "kld_mean": f["kld_mean"], "kld_mean_err": f["kld_mean_err"], "kld_p99": f["kld_p99"],
            "same_top_p": f["same_top_p"], "same_top_p_err": f["same_top_p_err"], "ppl_ratio": f["ppl_ratio"],
            "status": f["status"], "reasons": f["reasons"], "chunk_kld": f.get("chunk_kld"),
            "pp_tokens_per_s": (f.get("speed") or {}).get("pp"), "tg_tokens_per_s": (f.get("speed") or {}).get("tg")}


def _summarise(out: Path, points: tuple[str, ...], wall: float) -> dict[str, Any]:
    ladder = json.loads((out / "ladder.json").read_text())
    report = json.loads((out / "report.json").read_text())
    rec = records.load(out, "tune")
    lf = {f["type"]: f for f in ladder["files"]}
    rf = {f["type"]: f for f in report["files"]}
    stock_seconds, rows = 0.0, {}
    worse, better, worse_ppl = [], [], []
    for p in points:
        s, t = _figures(rf.get(p)), _figures(rf.get(f"{p}-tuned"))
        q_s = lf.get(p, {}).get("seconds") or 0.0
        e_s = sum((rf.get(p) or {}).get("seconds", {}).values())
        stock_seconds += q_s + e_s
        info = (rec.extra["points"].get(p) if rec else None) or {}
        row: dict[str, Any] = {"stock": {k: v for k, v in s.items() if k != "chunk_kld"},
                               "tuned": {k: v for k, v in t.items() if k != "chunk_kld"},
                               "tune_status": info.get("status"), "tune_reason": info.get("reason"),
                               "calibration_predicted_kld": info.get("predicted_kld"),
                               "calibration_measured_kld": info.get("measured_kld"),
                               "calibration_stock_kld": (info.get("stock_calibration") or {}).get("kld"),
                               "rounds": info.get("rounds"),
                               "stock_quantize_evaluate_seconds": round(q_s + e_s, 1)}
        if s and t:
            pd = _paired(s, t)
            row["paired"] = pd
            row["kld_change"] = round(t["kld_mean"] / s["kld_mean"] - 1, 4) if s["kld_mean"] else None
            row["bytes_ratio"] = round(t["bytes"] / s["bytes"], 5)
            row["gain_in_paired_se"] = round(pd["gain"] / pd["err"], 2) if pd["err"] else None
            if t["kld_mean"] > s["kld_mean"] or t["bytes"] > s["bytes"]:
                worse.append(p)
            if t["ppl_ratio"] > s["ppl_ratio"]:
                worse_ppl.append(p)
            if pd["gain"] > 2 * pd["err"] and t["bytes"] <= s["bytes"]:
                better.append(p)
        rows[p] = row
    tuning = rec.seconds if rec else None
    speed = records.load(out, "speed")
    return {"points": rows, "tuning_seconds": tuning,
            # llama-bench of the tuned files and their stock files (speed scope "tuned", the default): run only because
            # there are tuned files, so a cost of tuning too, though not part of tuning_seconds (issue 21's measure)
            "speed_stage_seconds": speed.seconds if speed else None,
            "tuning_split": (rec.extra.get("seconds") if rec else None),
            "measurement_counts": (rec.extra.get("counts") if rec else None),
            "fit": rec.extra.get("fit") if rec else None, "refit": rec.extra.get("refit") if rec else None,
            "stock_quantize_evaluate_seconds": round(stock_seconds, 1),
            "tuning_cost_ratio": round(tuning / stock_seconds, 3) if tuning and stock_seconds else None,
            "cost_at_most_1x": bool(tuning is not None and stock_seconds and tuning <= stock_seconds),
            "points_worse_than_stock": worse, "points_better_by_2_paired_se": better,
            # a higher PPL ratio than the stock file's (the gate withholds it when beyond 2 paired errors)
            "points_with_a_higher_ppl_than_stock": worse_ppl,
            "points_published_tuned": [p for p in points if (rf.get(f"{p}-tuned") or {}).get("status") == "passed"],
            "wall_seconds": round(wall, 1)}


def grid_types(workdir: Path) -> list[str]:
    m = json.loads((workdir / "tune" / "measurements.json").read_text())
    return tensorerr.grid_types(m["errors"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--calibration-chunks", type=int, default=32)
    ap.add_argument("--eval-chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--grid", default="auto", help="types excluded in the second run: auto (found from the first "
                                                   "run's measured errors), none, or a list such as Q4_1,Q5_1")
    ap.add_argument("--run", choices=("both", "with", "without"), default="both",
                    help="one run only (two processes can then run side by side; 'without' needs --grid as a list)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a finished ladder work dir of the same settings: its reference, imatrix and stock files are "
                         "hard-linked, so only tune and evaluate run (the stock quantize seconds are its own)")
    ap.add_argument("--out", type=Path, default=None, help="work dirs (default: a temporary folder, removed)")
    ap.add_argument("--confirm", choices=("on", "off"), default="on",
                    help="on: each plan confirmed on the calibration text (calibration runs); off: no calibration "
                         "run, each plan built once and judged by the evaluation's gate alone")
    ap.add_argument("--speed", choices=("on", "off"), default="on",
                    help="llama-bench pp/tg of the tuned files and their stock files (the gate's speed rule)")
    args = ap.parse_args()
    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    tc = toolchain.find(required=True)
    ck = smollm2_checkpoint()
    tmp = None
    root = args.out
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-layout-")
        root = Path(tmp.name)
    first, second = root / "with-grid", root / "without-grid"
    runs: dict[str, Any] = {}
    excluded: list[str] = ([] if args.grid in ("none", "auto") else
                           [g.strip() for g in args.grid.split(",") if g.strip()])
    if args.run in ("both", "with"):
        if args.reuse is not None and not first.exists():
            _second_workdir(args.reuse, first)
        t0 = time.monotonic()
        run_job(_job(ck, points, args, ()), first, NULL_HOOKS, toolchain=tc)
        runs["with_grid_types"] = _summarise(first, points, time.monotonic() - t0)
        runs["with_grid_types"]["grid_types_found"] = grid_types(first)
        if args.grid == "auto":
            excluded = runs["with_grid_types"]["grid_types_found"]
    if args.run in ("both", "without"):
        if args.run == "without" and args.grid == "auto":
            raise SystemExit("--run without needs --grid as a list of types")
        # with --grid auto, a run whose own measurements find grid types it did not exclude is run again without
        # them too (the types measured depend on the candidates: Q4_1 may show only once Q5_1 is gone)
        for attempt in range(1, 4):
            wd = second if attempt == 1 else root / f"without-grid-{attempt}"
            if not wd.exists():
                _second_workdir(args.reuse if args.run == "without" and args.reuse else first, wd)
            t1 = time.monotonic()
            run_job(_job(ck, points, args, tuple(excluded)), wd, NULL_HOOKS, toolchain=tc)
            runs["without_grid_types"] = _summarise(wd, points, time.monotonic() - t1)
            found = grid_types(wd)
            runs["without_grid_types"].update(grid_types_found=found, excluded=list(excluded), attempt=attempt)
            if args.grid != "auto" or set(found) <= set(excluded):
                break
            excluded = sorted(set(excluded) | set(found))
    acceptance: dict[str, Any] = {
        "cost_at_most_1x": all(r["cost_at_most_1x"] for r in runs.values()),
        "no_point_worse_than_stock": not any(r["points_worse_than_stock"] for r in runs.values()),
        "quoted_from": "without_grid_types"}
    if "without_grid_types" in runs:
        acceptance["a_point_better_by_2_paired_se_without_grid_types"] = bool(
            runs["without_grid_types"]["points_better_by_2_paired_se"])
    print(json.dumps({
        "model": ck.name, "calibration": "groups_merged.txt", "evaluation": "wiki.test.raw",
        "calibration_chunks": args.calibration_chunks, "eval_chunks": args.eval_chunks, "ctx": args.ctx,
        "probe_chunks": tune.DEFAULT_PROBE_CHUNKS if args.confirm == "on" else None, "confirm": args.confirm,
        "rows_per_tensor": tensorerr.DEFAULT_ROWS, "grid_types_excluded": excluded,
        "speed": ("llama-bench pp/tg tokens/s of each tuned file and its stock file, interleaved (null: not measured)"
                  if args.speed == "on" else "off"),
        "runs": runs, "acceptance": acceptance}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
