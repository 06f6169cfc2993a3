"""Benchmark the evaluation of a ladder: the sequential evaluation against today's fixed chunk count.

    python -m benchmarks.evaluate --workdir DIR [--eval-text FILE] [--chunks N] [--ctx N] [--threads N]
                                  [--precision F] [--min-chunks N]
    python -m benchmarks.evaluate                  # builds the SmolLM2 default ladder (12 types) first

Evaluates the ladder twice, in one run: fixed (every file on ``--chunks`` chunks, ``precision = 0``: the
evaluation as it was) and sequential (``--precision``, ``--min-chunks``, at most ``--chunks``). Prints JSON: per
file, the chunks each run scored, why the sequential one stopped, the mean KLD and its chunk-based relative
error (standard error from chunk means / mean) in both runs, and both verdicts; the ladder's total chunks and
KL-divergence seconds in both runs and their ratios; whether every verdict is the same; how many times each
model file was opened by a llama.cpp program (the base logits once per run); and, for scale, one plain
``llama-perplexity`` run of the reference over the same chunks.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from converters.core.report import Report, mean_err
from converters.ladder import evaluate
from converters.core import proc
from converters.llama import toolchain as tc_mod


def build_smol_ladder(out: Path, tc: tc_mod.Toolchain, calibration: Path, ladder: str = "default") -> Path:
    from converters.formats import checkpoint as ck_mod
    from converters.ladder import pipeline
    from converters.llama.calibrate import TextFile
    from tests.models import smollm2_checkpoint

    ckpt = smollm2_checkpoint()
    ck = ck_mod.inspect(ckpt, supported=ck_mod.supported_architectures(tc.root))
    from bot.jobs.job import JobSpec, Source, run_job
    from converters.core.hooks import NULL_HOOKS

    spec = JobSpec(source=Source(repo="HuggingFaceTB/SmolLM2-135M-Instruct", path=ck.path), model_name=ckpt.name,
                   ladder=pipeline.LadderOptions(ladder=ladder, calibration=TextFile.of(calibration),
                                                 calibration_chunks=8, ctx=256, jobs=1))
    run_job(spec, out, NULL_HOOKS, toolchain=tc)
    return out


def _evaluate(wd: Path, args: argparse.Namespace, tc: tc_mod.Toolchain, precision: float,
              opened: collections.Counter[str]) -> tuple[Report, float]:
    """One whole evaluation (no record reused), counting the llama.cpp runs per model file."""
    for rec in (wd / "records").glob("evaluate*.json"):
        rec.unlink()  # measure a real run, not a skip
    real_run = proc.run

    def counting_run(argv, **kw):
        a = [str(x) for x in argv]
        if "-m" in a:
            opened[f"{Path(a[0]).name} {Path(a[a.index('-m') + 1]).name}"] += 1
        return real_run(argv, **kw)

    proc.run = counting_run  # type: ignore[assignment]
    started = time.monotonic()
    try:
        report = evaluate.run(wd, evaluate.EvalOptions(
            eval_text=args.eval_text, calibration_text=args.calibration_text, chunks=args.chunks, ctx=args.ctx,
            threads=args.threads, precision=precision, min_chunks=args.min_chunks), toolchain=tc)
    finally:
        proc.run = real_run  # type: ignore[assignment]
    return report, time.monotonic() - started


def _rel_err(f) -> float | None:
    me = mean_err(f.stats.chunk_kld) if f.stats is not None else None
    return round(me[1] / me[0], 4) if me is not None and me[0] > 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="a finished work dir (default: build the SmolLM2 default ladder)")
    data = REPO.parent / "shared" / "data"
    ap.add_argument("--eval-text", type=Path, default=data / "wiki.test.raw")
    ap.add_argument("--calibration-text", type=Path, default=data / "groups_merged.txt")
    ap.add_argument("--chunks", type=int, default=evaluate.DEFAULT_CHUNKS, help="the fixed count, and the cap")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", type=float, default=evaluate.PRECISION)
    ap.add_argument("--min-chunks", type=int, default=evaluate.MIN_CHUNKS)
    args = ap.parse_args(argv)

    tc = tc_mod.find(required=True)
    assert tc is not None
    tmp = None
    wd = args.workdir
    if wd is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-evaluate-")
        wd = build_smol_ladder(Path(tmp.name) / "work", tc, args.calibration_text)
    ladder = json.loads((wd / "ladder.json").read_text())
    reference = wd / ladder["reference"]["path"]

    # one plain perplexity run of the reference over the same text: the cost of reading the model once
    argv_plain = [tc.program("llama-perplexity"), "-m", reference, "-f", args.eval_text, "-c", str(args.ctx),
                  "--chunks", str(args.chunks)] + (["-t", str(args.threads)] if args.threads else [])
    plain = proc.run(argv_plain, timeout=evaluate.KLD_TIMEOUT).seconds

    runs: dict[str, collections.Counter[str]] = {"fixed": collections.Counter(), "sequential": collections.Counter()}
    fixed, fixed_s = _evaluate(wd, args, tc, 0.0, runs["fixed"])
    seq, seq_s = _evaluate(wd, args, tc, args.precision, runs["sequential"])
    files = {}
    for f in fixed.files:
        g = seq.file(f.type)
        files[f.type] = {
            "fixed": {"chunks": f.chunks, "kld_mean": f.stats.kld_mean if f.stats else None, "rel_err": _rel_err(f),
                      "rel_err_per_token": round(f.stats.kld_mean_err_token / f.stats.kld_mean, 4)
                      if f.stats and f.stats.kld_mean_err_token and f.stats.kld_mean else None,
                      "kld_seconds": round(f.seconds.get("kld", 0.0), 2), "status": f.status},
            "sequential": {"chunks": g.chunks, "stop": g.stop, "batches": g.extra.get("kld_batches"),
                           "kld_mean": g.stats.kld_mean if g.stats else None, "rel_err": _rel_err(g),
                           "kld_seconds": round(g.seconds.get("kld", 0.0), 2), "status": g.status},
        }
    total_fixed = sum(f.chunks or 0 for f in fixed.files)
    total_seq = sum(f.chunks or 0 for f in seq.files)
    rel = {k: [v[k]["rel_err"] for v in files.values() if v[k]["rel_err"] is not None] for k in ("fixed", "sequential")}
    out = {
        "model": seq.model_name, "ladder": [f.type for f in seq.files],
        "ctx": args.ctx, "chunks_cap": args.chunks, "precision": args.precision, "min_chunks": args.min_chunks,
        "z": evaluate.Z_VERDICT, "threads": args.threads,
        "files": files,
        "total_chunks": {"fixed": total_fixed, "sequential": total_seq,
                         "ratio": round(total_seq / total_fixed, 3) if total_fixed else None},
        "kld_seconds": {"fixed": round(fixed.seconds.get("kld", 0.0), 1), "sequential": round(seq.seconds.get("kld", 0.0), 1),
                        "ratio": round(seq.seconds.get("kld", 0.0) / fixed.seconds["kld"], 3)
                        if fixed.seconds.get("kld") else None},
        "evaluation_seconds": {"fixed": round(fixed_s, 1), "sequential": round(seq_s, 1)},
        "rel_err": {k: {"max": max(v) if v else None, "median": statistics.median(v) if v else None}
                    for k, v in rel.items()},
        "files_at_or_below_target": {k: sum(x <= args.precision for x in v) for k, v in rel.items()},
        "verdicts": {f.type: [f.status, seq.file(f.type).status] for f in fixed.files},
        "verdicts_identical": all(f.status == seq.file(f.type).status and f.reasons == seq.file(f.type).reasons
                                  for f in fixed.files),
        "base_logits_runs": {k: v.get(f"llama-perplexity {reference.name}", 0) for k, v in runs.items()},
        "plain_perplexity_seconds": round(plain, 2),
        "publishable": [fixed.publishable, seq.publishable],
    }
    print(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
