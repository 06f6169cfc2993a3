"""Benchmark: what pruning costs and what healing buys back, measured against the teacher, at Q4_K_M.

Builds, from one source checkpoint (default: the SmolLM2-135M-Instruct test fixture):
  teacher Q4_K_M, pruned-unhealed Q4_K_M, pruned-healed Q4_K_M (recipe default: prune-4-layers-kd),
and measures each against the teacher's BF16 logits on held-out WikiText-2 with llama-perplexity.
Prints JSON: parameters, file size, mean KLD and same-top-p against the teacher, seconds spent.

    .venv/bin/python -m benchmarks.variants [--recipe prune-4-layers-kd] [--steps 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def _ladder(ck_dir: Path, out: Path, name: str, tc: Any, qtype: str) -> tuple[dict[str, Any], float]:
    from bot.jobs.job import JobSpec, Source, run_job
    from converters.ladder import pipeline
    from converters.core.hooks import NULL_HOOKS

    t0 = time.monotonic()
    spec = JobSpec(source=Source(path=Path(ck_dir)), model_name=name,
                   ladder=pipeline.LadderOptions(ladder=qtype, imatrix=False))
    return run_job(spec, out, NULL_HOOKS, toolchain=tc).ladder.to_json(), time.monotonic() - t0


def _measure(tc: Any, gguf: Path, base: Path, ctx: int) -> dict[str, Any]:
    from converters.ladder import evaluate

    stats, secs = evaluate.run_kld(tc, gguf, base, ctx=ctx)
    return {"kld_mean": stats.kld_mean, "kld_mean_err": stats.kld_mean_err, "same_top_p": stats.same_top_p,
            "same_top_p_err": stats.same_top_p_err, "ppl": stats.ppl, "eval_seconds": round(secs, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=None, help="teacher checkpoint (default: SmolLM2 fixture)")
    ap.add_argument("--recipe", default="prune-4-layers-kd")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--ctx", type=int, default=256, help="evaluation context")
    ap.add_argument("--chunks", type=int, default=16, help="evaluation chunks")
    ap.add_argument("--calibration", type=Path, default=SHARED / "groups_merged.txt")
    ap.add_argument("--eval-text", type=Path, default=SHARED / "wiki.test.raw")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    from converters.ladder import evaluate
    from converters.variants import prune
    from converters.llama import toolchain
    from converters.variants import recipes as variants

    tc = toolchain.find(required=True)
    if args.source is None:
        from tests.models import smollm2_checkpoint

        args.source = smollm2_checkpoint()
    recipe = variants.get(args.recipe)
    if not recipe.heals:
        raise SystemExit(f"recipe {recipe.name} does not heal; pick one that does (e.g. prune-4-layers-kd)")
    recipe = recipe.with_overrides(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                                   samples=args.samples, lr=args.lr)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-variants-"))
    out.mkdir(parents=True, exist_ok=True)
    name = args.source.resolve().name
    total = time.monotonic()

    teacher_lad, t_secs = _ladder(args.source, out / "teacher", name, tc, args.type)
    teacher_ref = out / "teacher" / teacher_lad["reference"]["path"]
    t0 = time.monotonic()
    base = out / "teacher-base-logits.kld"
    base.unlink(missing_ok=True)
    evaluate.run_base(tc, teacher_ref, args.eval_text, base, ctx=args.ctx, chunks=args.chunks)
    base_secs = time.monotonic() - t0

    vdir = out / "variant"
    info = variants.make_checkpoint(args.source, vdir, recipe, args.calibration,
                                    teacher_model=Path(args.source).resolve().name)
    paths = variants.VariantPaths(vdir)
    rows: dict[str, Any] = {}

    def row(label: str, ck: Path, lad: dict[str, Any], wd: Path, seconds: float) -> None:
        f = lad["files"][0]
        rows[label] = {"parameters": prune.count_parameters(ck), "type": f["type"], "file_size": f["size"],
                       **_measure(tc, wd / f["path"], base, args.ctx), "seconds": round(seconds, 1)}

    row("teacher", args.source, teacher_lad, out / "teacher", t_secs)
    un_lad, un_secs = _ladder(paths.pruned, out / "unhealed", f"{name}-pruned", tc, args.type)
    row("pruned_unhealed", paths.pruned, un_lad, out / "unhealed", info["prune"]["seconds"] + un_secs)
    he_lad, he_secs = _ladder(paths.healed, out / "healed", f"{name}-{recipe.name}", tc, args.type)
    row("pruned_healed", paths.healed, he_lad, out / "healed",
        info["prune"]["seconds"] + info["distill"]["seconds"] + he_secs)

    result = {
        "benchmark": "variants",
        "source": name,
        "recipe": recipe.to_json()["summary"],
        "recipe_name": recipe.name,
        "removed_layers": info["prune"]["removed_layers"],
        "distill": {k: info["distill"][k] for k in ("steps", "seconds", "loss_first", "loss_last", "mode",
                                                    "first_trainable_layer", "trainable_parameters", "tokens")},
        "evaluation": {"text": args.eval_text.name, "ctx": args.ctx, "chunks": args.chunks,
                       "against": "teacher BF16 logits", "base_logits_seconds": round(base_secs, 1)},
        "results": rows,
        "seconds_total": round(time.monotonic() - total, 1),
        "torch_threads": __import__("torch").get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
