"""Benchmark the evaluation of a ladder: seconds per file and for the whole ladder, against one plain run.

    python -m benchmarks.evaluate --workdir DIR [--eval-text FILE] [--chunks N] [--ctx N] [--threads N]
    python -m benchmarks.evaluate                  # builds the SmolLM2 test ladder (Q8_0,Q4_K_M,Q2_K) first

Prints JSON: the seconds of one plain ``llama-perplexity`` run over the same text and chunks (the cost of
reading one model once), the base-logits run, each file's KL-divergence run and checks, the whole
evaluation, and their ratios to the plain run; plus how many times each file was opened by a llama.cpp
program (the target: the base logits computed once, each file measured in one run).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="a finished work dir (default: build the SmolLM2 test ladder)")
    data = REPO.parent / "shared" / "data"
    ap.add_argument("--eval-text", type=Path, default=data / "wiki.test.raw")
    ap.add_argument("--calibration-text", type=Path, default=data / "groups_merged.txt")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
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

    # count how often each model file is opened by a llama.cpp program during the evaluation
    opened: collections.Counter[str] = collections.Counter()
    runs: collections.Counter[str] = collections.Counter()
    real_run = proc.run

    def counting_run(argv, **kw):
        a = [str(x) for x in argv]
        if "-m" in a:
            model = Path(a[a.index("-m") + 1]).name
            opened[model] += 1
            runs[f"{Path(a[0]).name} {model}"] += 1
        return real_run(argv, **kw)

    proc.run = counting_run  # type: ignore[assignment]
    started = time.monotonic()
    try:
        (wd / "records" / "evaluate.json").unlink(missing_ok=True)  # measure a real run, not a skip
        report = evaluate.run(wd, evaluate.EvalOptions(eval_text=args.eval_text, calibration_text=args.calibration_text,
                                                       chunks=args.chunks, ctx=args.ctx, threads=args.threads),
                              toolchain=tc)
    finally:
        proc.run = real_run  # type: ignore[assignment]
    total = time.monotonic() - started
    s = report.seconds
    files = {}
    for f in report.files:
        kld = f.seconds.get("kld")
        files[f.type] = {"kld_seconds": round(kld, 2) if kld else None,
                         "kld_ratio_to_plain": round(kld / plain, 3) if kld else None,
                         "perplexity_runs": runs.get(f"llama-perplexity {Path(f.path).name}", 0),
                         "llama_cpp_runs": opened.get(Path(f.path).name, 0),
                         "kld_mean": f.stats.kld_mean if f.stats else None}
    out = {
        "model": report.model_name,
        "chunks": args.chunks, "ctx": args.ctx, "threads": args.threads,
        "tokens_scored": report.texts["eval"].tokens_scored if report.texts.get("eval") else None,
        "plain_perplexity_seconds": round(plain, 2),
        "base_logits_seconds": round(s.get("base_logits", 0.0), 2),
        "base_logits_runs": runs.get(f"llama-perplexity {reference.name}", 0),
        "source_comparison_seconds": round(s.get("source_comparison", 0.0), 2),
        "checks_seconds": round(s.get("checks", 0.0), 2),
        "files": files,
        "ladder_seconds": round(total, 2),
        "ladder_ratio_to_plain": round(total / plain, 2),
        "kld_seconds_all_files": round(s.get("kld", 0.0), 2),
        "kld_ratio_to_plain_per_file": round(s.get("kld", 0.0) / plain / max(1, len(report.files)), 3),
        "publishable": report.publishable,
    }
    print(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
