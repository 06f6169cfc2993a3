"""``ggufbot evaluate DIR``: measure, check and gate every quant of a finished work directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bot.commands import add_sequential_flags, deprecated_alias, figures
from converters.core.errors import InputError
from converters.core.hooks import PROGRESS, Event, Hooks
from converters.core.workdir import LADDER_FILE, WorkDir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure (KLD, PPL) and check every quant of a work dir; write report.json",
                       description="Measure every quant of DIR/ladder.json against the reference with llama.cpp, "
                                   "compare the reference with the source checkpoint, check tokenizer, chat "
                                   "template, special tokens and generation, gate each file and write "
                                   "DIR/report.json and DIR/size-vs-kld.png.")
    p.add_argument("dir", type=Path, help="work directory with ladder.json")
    p.add_argument("--eval-text", help="evaluation text: FILE, URL or hf://... (default: WikiText-2 test split; "
                   "never the calibration text)")
    p.add_argument("--eval-chunks", type=int, default=None, metavar="N",
                   help="most chunks of the evaluation text a file is scored on (default 64)")
    deprecated_alias(p, "--chunks", "--eval-chunks", type=int)
    add_sequential_flags(p)
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per evaluation chunk (default 512)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all)")
    p.add_argument("--source", type=Path, default=None,
                   help="source checkpoint folder (default: ladder.json source.path)")
    p.add_argument("--reference-logits", type=Path, default=None,
                   help="measure against this base-logits file (a teacher's BF16) instead of the own reference")
    p.add_argument("--ceiling", action="append", default=[], metavar="TYPE=KLD",
                   help="mean-KLD ceiling for a quant type (or default=KLD); repeatable")
    p.add_argument("--hf-compare-max-memory-gb", type=float, default=None, metavar="GB",
                   help="RAM for the source model in the transformers comparison; the rest of its weights go to "
                        "disk (default: 3/4 of the available memory)")
    p.add_argument("--allow-unchecked-source", action="store_true",
                   help="publishable even when the BF16-vs-source comparison could not run (the card says so)")
    p.add_argument("--hf-compare-chunks", type=int, default=2, help="chunks for the transformers comparison")
    p.add_argument("--json", action="store_true", help="print report.json")
    p.set_defaults(func=cmd_evaluate)


def parse_ceilings(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip() if name.strip() == "default" else name.strip().upper()] = float(value)
        except ValueError:
            raise InputError(f"bad --ceiling {item!r}; use TYPE=KLD, e.g. Q4_K_M=0.1") from None
    return out


class _StepLines(Hooks):
    """``[evaluate] kld Q4_K_M (3/7)``: one stderr line per step of the evaluation."""

    def progress(self, event: Event) -> None:
        if event.kind == PROGRESS:
            print(f"[evaluate] {event.text} ({event.done}/{event.total})", file=sys.stderr, flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bot.jobs.texts import DEFAULT_EVALUATION, resolve_text
    from converters.ladder import evaluate

    if not WorkDir(args.dir).has_ladder():
        raise InputError(f"{args.dir} has no {LADDER_FILE}: run 'ggufbot convert' first")
    text = resolve_text(args.eval_text or DEFAULT_EVALUATION)

    options = evaluate.EvalOptions(
        eval_text=text.path, eval_text_name=text.name, eval_text_source=text.source, chunks=args.eval_chunks,
        ctx=args.ctx, threads=args.threads, source_dir=args.source, reference_logits=args.reference_logits,
        hf_compare_max_memory=int(args.hf_compare_max_memory_gb * 1e9) if args.hf_compare_max_memory_gb else None,
        hf_compare_chunks=args.hf_compare_chunks, require_source_check=not args.allow_unchecked_source,
        ceilings=parse_ceilings(args.ceiling) or None, precision=args.eval_precision,
        min_chunks=args.eval_min_chunks)
    from bot.commands import TtyHooks, cli_hooks

    with cli_hooks() as hooks:  # bars on a terminal, else one line per step
        report = evaluate.run(args.dir, options, hooks=hooks if isinstance(hooks, TtyHooks) else _StepLines())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.publishable else 2
    print(f"{report.model_name}: {'publishable' if report.publishable else 'NOT publishable'}")
    for r in report.reasons:
        print(f"  {r}")
    for name, c in report.checks.items():
        print(f"  check {name:<15} {c.status:<8} {c.detail}")
    print(f"{'type':<10} {'status':<7} {'KLD':>18} {'same top p':>16} {'PPL ratio':>10} {'chunks':>7}")
    for f in report.files:
        kld, top, ratio = figures(f.stats)
        print(f"{f.type:<10} {f.status:<7} {kld:>18} {top:>16} {ratio:>10} {f.chunks or '-':>7}")
        for r in f.reasons:
            print(f"    - {r}")
    return 0 if report.publishable else 2
