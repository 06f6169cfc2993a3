"""``ggufbot variant SOURCE_DIR --recipe NAME --out DIR``: a pruned (and healed) variant, through the same ladder.

Writes the pruned checkpoint (``DIR/checkpoint-pruned``) and, for recipes that heal, the distilled one
(``DIR/checkpoint-healed``), both normal HF safetensors checkpoints; then converts, calibrates and
quantizes the result into DIR like ``ggufbot convert``; then, unless ``--no-eval``, measures every quant
against the *teacher's* BF16 logits, so the figures show the loss of pruning plus quantization.
``--publish`` then publishes DIR as its own repo, by default ``{org}/{model}-{variant}-GGUF``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bot.commands import deprecated_alias
from converters.core.errors import ConfigError, InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("variant", help="prune (and heal by distillation) a checkpoint, then build its quant ladder",
                       description="Build a pruned/distilled variant of a local checkpoint following a named "
                                   "recipe, run the ladder on it and evaluate it against the original.")
    p.add_argument("source", nargs="?", type=Path, metavar="SOURCE_DIR", help="the original (teacher) checkpoint folder")
    p.add_argument("--recipe", help="variant recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--out", type=Path, help="work directory of the variant")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (overrides the recipe)")
    p.add_argument("--lr", type=float, default=None, help="distillation learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="distillation batch size")
    p.add_argument("--seq-len", type=int, default=None, help="distillation sequence length (tokens)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature")
    p.add_argument("--samples", type=int, default=None, help="distinct calibration chunks for distillation")
    p.add_argument("--seed", type=int, default=None, help="random seed for distillation")
    p.add_argument("--trainable", choices=["auto", "all", "from-cut"], default=None,
                   help="which layers distillation trains (default auto: all on a GPU, from the cut on a CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    p.add_argument("--teacher-cache", type=Path, default=None, help="directory to cache the teacher's outputs in")
    p.add_argument("--model-name", default=None, help="the teacher's model name (default: the folder name)")
    p.add_argument("--source-repo", default=None, help="the teacher's Hub repo id, for the card")
    p.add_argument("--teacher-workdir", type=Path, default=None,
                   help="the teacher's finished work dir: its BF16 GGUF is reused and its quants shown next to the "
                        "variant's on the card")
    p.add_argument("--ladder", default="default", help="comma list of quant types or a preset (default: default)")
    p.add_argument("--calibration", help="calibration text: FILE, URL or hf://... (pruning, healing and imatrix)")
    p.add_argument("--calibration-chunks", type=int, default=None, metavar="N",
                   help="chunks of the calibration text for the imatrix (default: all)")
    deprecated_alias(p, "--chunks", "--calibration-chunks", type=int)
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per calibration chunk (default 512)")
    p.add_argument("--no-imatrix", action="store_true", help="quantize without an importance matrix")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the teacher")
    p.add_argument("--eval-text", help="evaluation text: FILE, URL or hf://... (never the calibration text)")
    p.add_argument("--eval-chunks", type=int, default=None, metavar="N",
                   help="chunks of the evaluation text to score (default 64)")
    p.add_argument("--publish", action="store_true", help="publish the variant as its own repo when done")
    p.add_argument("--namespace", help="{org} of the variant repo (default: the token's user)")
    p.add_argument("--repo", help="explicit target repo ORG/NAME")
    p.add_argument("--config", type=Path, help="settings file (token, endpoint, target namespace)")
    p.add_argument("--dry-run", action="store_true", help="print the recipe and the plan; change nothing")
    p.add_argument("--json", action="store_true", help="print variant.json")
    p.set_defaults(func=cmd_variant)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "temperature": args.temperature, "samples": args.samples, "seed": args.seed,
            "trainable": args.trainable, "grad_checkpointing": args.gradient_checkpointing,
            "cache_dir": args.teacher_cache}


def cmd_variant(args: argparse.Namespace) -> int:
    from converters.variants import prune
    from converters.variants import recipes as variants

    if args.list:
        for name in variants.names():
            r = variants.get(name)
            print(f"{name:<24} {r.description}")
        return 0
    if args.recipe is None or args.source is None or args.out is None:
        raise ConfigError("give SOURCE_DIR, --recipe NAME and --out DIR (or --list)", key="recipe")
    recipe = variants.get(args.recipe).with_overrides(**_overrides(args))
    source: Path = args.source
    if not source.is_dir():
        raise InputError(f"checkpoint folder not found: {source}")
    config = prune.read_config(source)
    layers = prune.num_layers_of(config)
    if recipe.prune.method == "depth":  # a clear error before anything expensive
        prune.count_to_remove(layers, recipe.prune.layers, recipe.prune.fraction)
    if args.dry_run:
        print(json.dumps({"recipe": recipe.to_json(), "source": str(source), "layers": layers,
                          "out": str(args.out), "model_name": variants.model_name(
                              args.model_name or source.resolve().name, recipe)}, indent=2))
        return 0

    from bot.jobs.texts import DEFAULT_CALIBRATION, resolve_text, same_text
    from converters.llama import toolchain

    tc = toolchain.find(required=True)
    cal = resolve_text(args.calibration or DEFAULT_CALIBRATION)
    eval_text = None
    if not args.no_eval:
        from bot.jobs.texts import DEFAULT_EVALUATION

        eval_text = resolve_text(args.eval_text or DEFAULT_EVALUATION)
        if same_text(cal, eval_text):
            raise InputError("the evaluation text is the calibration text: a variant must not be judged on the "
                             "text it was pruned and healed on")
    started = time.monotonic()
    from bot.commands import cli_hooks, stderr
    from bot.jobs.job import JobSpec, Source, run_job
    from converters.ladder.job import EvalSettings
    from converters.ladder.pipeline import LadderOptions

    teacher_model = args.model_name or source.resolve().name
    v = variants.VariantOf(recipe, source, teacher_model, cal.path, args.teacher_workdir, args.source_repo)
    hub, target = None, None
    if args.publish:
        hub, target = _publish_target(args)
    spec = JobSpec(source=Source(repo=args.source_repo), model_name=variants.model_name(teacher_model, recipe),
                   ladder=LadderOptions(ladder=args.ladder, imatrix=not args.no_imatrix, calibration=cal,
                                        calibration_chunks=args.calibration_chunks, ctx=args.ctx),
                   evaluation=EvalSettings(eval_text, chunks=args.eval_chunks) if eval_text is not None else None,
                   publish=target, variant_of=v)
    with cli_hooks() as hooks:
        result = run_job(spec, args.out, hooks, toolchain=tc, hub=hub)
    info = variants.load_info(args.out) or {}
    if result.published is not None:
        p = result.published
        stderr(f"[publish] {p.action} {p.repo_id} ({p.repo_url})")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_summary(info, time.monotonic() - started)
    return 0


def _publish_target(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Hub client and the variant's target (``--repo``, or ``--namespace``/the settings' namespace)."""
    from bot.hub.client import Hub
    from bot.jobs.job import PublishTarget

    token = endpoint = None
    namespace = args.namespace
    if args.config is not None:
        from bot.model import settings as settings_mod

        s = settings_mod.load(args.config)
        token, endpoint = s.token, s.hub.endpoint
        namespace = namespace or s.target.namespace
    return Hub(token=token, endpoint=endpoint), PublishTarget(repo_id=args.repo, namespace=namespace)


def _print_summary(info: dict[str, Any], seconds: float) -> None:
    t, v = info["teacher"], info["variant"]
    print(f"{info.get('model_name')}: {info['recipe']['summary']}")
    print(f"  layers {t['layers']} -> {v['layers']}, parameters {t['parameters']:,} -> {v['parameters']:,}, "
          f"checkpoint {t['bytes'] / 1e6:.1f} MB -> {v['bytes'] / 1e6:.1f} MB ({seconds:.0f} s)")
    if info.get("distill"):
        d = info["distill"]
        print(f"  distillation: {d['steps']} steps, loss {d['loss_first']:.4f} -> {d['loss_last']:.4f}")
    ev = info.get("evaluation")
    if ev:
        print(f"  BF16 vs teacher: mean KLD {ev['reference_kld_mean']:.4f}")
        for typ, f in ev["files"].items():
            kld = f"{f['kld_mean']:.4f}" if f["kld_mean"] is not None else "-"
            print(f"  {typ:<10} KLD vs teacher {kld}  {f['status']}")
