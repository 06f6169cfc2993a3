"""``ggufbot convert`` and ``ggufbot doctor`` (``ggufbot toolchain ...``: bot/commands/toolchain.py)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.commands import add_sequential_flags, deprecated_alias, figures
from converters.formats import checkpoint as ckpt_mod
from converters.ladder import pipeline
from converters.ladder import speed as speed_mod
from converters.core import quants
from converters.llama import toolchain
from converters.core.errors import ConfigError, InputError, ToolError, UnsupportedModel
from converters.core.report import PASSED
from converters.core.stages import free_bytes
from converters.core.workdir import Ladder, WorkDir

if TYPE_CHECKING:
    from bot.jobs.job import JobSpec
    from bot.model.record import ModelRecord


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="checkpoint (folder or Hub repo id) -> BF16 GGUF -> imatrix -> quant ladder",
                       description="Convert, calibrate and quantize one model; then evaluate unless --no-eval.")
    p.add_argument("source", help="a local checkpoint folder or a Hub repo id (ORG/NAME[@REVISION])")
    p.add_argument("--out", required=True, type=Path, help="work directory for this model")
    p.add_argument("--ladder", default="default",
                   help=f"comma list of quant types or a preset ({', '.join(quants.LADDERS)}); default: default")
    p.add_argument("--calibration", help="calibration text: FILE, URL or hf://datasets/OWNER/NAME/PATH "
                   "(default: the GGUF-my-repo calibration file, fetched once and cached)")
    p.add_argument("--calibration-chunks", type=int, default=None, metavar="N",
                   help="chunks of the calibration text for the imatrix (default: all of the text)")
    deprecated_alias(p, "--chunks", "--calibration-chunks", type=int)
    p.add_argument("--ctx", type=int, default=512, metavar="N",
                   help="tokens per calibration chunk (default 512; the evaluation scores chunks of 512)")
    p.add_argument("--no-imatrix", action="store_true", help="quantize without an importance matrix")
    p.add_argument("--outtype", default="bf16", choices=["bf16", "f16", "f32"], help="reference GGUF type")
    p.add_argument("--jobs", type=int, default=1, help="quant types to build in parallel (default 1)")
    p.add_argument("--split-max-size", default="45G", help="split files larger than this (e.g. 45G, 500M)")
    p.add_argument("--tune", default="", metavar="TYPE,...",
                   help="size points that also get a per-tensor tuned file <Model>-<TYPE>-tuned.gguf (e.g. Q4_K_M,Q2_K; "
                        "'default': Q4_K_M, Q3_K_M and Q2_K where the ladder has them, the bot's default)")
    p.add_argument("--tune-seconds", type=float, default=3600.0, metavar="S",
                   help="time budget of tuning (measurements, probes, solves; default 3600)")
    confirm = p.add_mutually_exclusive_group()
    confirm.add_argument("--tune-confirm", action="store_true",
                         help="each tuned plan must first beat its stock file on the calibration text (calibration "
                              "runs, about 3x the cost); by default each plan is built once and judged by the "
                              "evaluation's gate alone")
    confirm.add_argument("--tune-no-confirm", action="store_true", help="the default: no calibration run")
    p.add_argument("--fit", action="append", default=[], metavar="SIZE@CTX",
                   help="a memory budget (repeatable), e.g. 16GB@32k: also build <Model>-fit-16GB-32k.gguf, the best "
                        "file whose weights, KV cache and buffers fit it (GB/MB decimal, GiB/MiB binary, k = 1024)")
    p.add_argument("--fit-kv-type", default="f16", choices=["f16", "q8_0"],
                   help="KV cache type the --fit files are sized with (default f16)")
    p.add_argument("--speed", default="tuned", choices=speed_mod.SCOPES,
                   help="llama-bench tokens/s on this box (the card shows them): 'tuned' (default) for the --tune and "
                        "--fit files and their stock baselines (one more than 5 %% slower is withheld), 'all' for every "
                        "file, 'off'")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation and checks")
    p.add_argument("--eval-text", help="evaluation text: FILE, URL or hf://... (never the calibration text)")
    p.add_argument("--eval-chunks", type=int, default=None, metavar="N",
                   help="most chunks of the evaluation text a file is scored on (default 64)")
    add_sequential_flags(p)
    p.add_argument("--publish", action="store_true",
                   help="publish the result to the Hub (the quants that passed the gate, one commit)")
    p.add_argument("--repo", help="with --publish: target repo ORG/NAME (default: {namespace}/{model}-GGUF)")
    p.add_argument("--private", action="store_true", help="with --publish: create the repo private")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, types, sizes, disk) and stop")
    p.add_argument("--json", action="store_true", help="print ladder.json (or the plan) as JSON")
    p.set_defaults(func=cmd_convert)

    d = sub.add_parser("doctor", help="print what is installed and what is missing")
    d.set_defaults(func=cmd_doctor)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ConfigError(f"bad size {text!r}; use e.g. 45G or 500M", key="split-max-size")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)])


def _split_source(source: str, revision: str | None) -> tuple[str, str | None]:
    if "@" in source and not Path(source).exists():
        repo, rev = source.rsplit("@", 1)
        return repo, revision or rev
    return source, revision


def _hub_info(repo: str, revision: str | None):
    """Model facts from the Hub, refusing pickle-only and remote-code repos before anything is downloaded."""
    from bot.model import rules
    from bot.hub.client import Hub

    hub = Hub()
    info = hub.model_info(repo, revision)
    why = rules.convert_refusal(info)
    if why is not None:
        raise UnsupportedModel(why, repo=repo)
    return hub, info


def _hub_checkpoint_facts(info, supported) -> ckpt_mod.Checkpoint:
    """A Checkpoint built from Hub metadata alone, for --dry-run (nothing is downloaded)."""
    cfg = dict(info.config or {})
    archs = cfg.get("architectures") or []
    if not archs:
        raise UnsupportedModel("the Hub lists no architecture for this model", repo=info.id)
    if supported is not None and archs[0] not in supported:
        raise UnsupportedModel(f"architecture {archs[0]} is not supported by the pinned llama.cpp converter", repo=info.id)
    weights = [s for s in info.siblings if s.rfilename.endswith(".safetensors")]
    weight_bytes = sum(s.size or 0 for s in weights)
    params = info.safetensors_total or weight_bytes // 2
    return ckpt_mod.Checkpoint(
        path=Path(f"hf://{info.id}"), config=cfg, architecture=archs[0], model_type=cfg.get("model_type"),
        weight_files=(), weight_bytes=weight_bytes, parameters=params, dtypes=(), tokenizer_files=(),
        chat_template=None, license=info.license)


def _texts(args: argparse.Namespace, imatrix: bool) -> tuple[Any, Any]:
    """The calibration text (with an imatrix) and the evaluation text (unless --no-eval or --dry-run)."""
    from bot.jobs.texts import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, resolve_text, same_text

    cal = resolve_text(args.calibration or DEFAULT_CALIBRATION) if imatrix else None
    if args.no_eval or args.dry_run:
        return cal, None
    eval_text = resolve_text(args.eval_text or DEFAULT_EVALUATION)
    if cal is not None and same_text(cal, eval_text):
        raise InputError("the evaluation text is the calibration text: a quant must not be judged on the text "
                         "it was calibrated on")
    return cal, eval_text


def _speed(args: argparse.Namespace) -> speed_mod.SpeedOptions | None:
    """``--speed`` as the speed stage's options: none when nothing is in its scope (a ladder of stock files only,
    scope 'tuned'), so a plain convert makes no speed run and no speed.json, as before."""
    if args.speed == "all" or (args.speed == "tuned" and (_tune_points(args) or args.fit)):
        return speed_mod.SpeedOptions(scope=args.speed)
    return None


def _tune_points(args: argparse.Namespace) -> tuple[str, ...]:
    """``--tune`` as the size points of this ladder (``default`` resolved)."""
    from converters.ladder import tune

    return tune.point_names([t.strip() for t in args.tune.split(",") if t.strip()], args.ladder)


def convert_spec(args: argparse.Namespace, source: Any, model_name: str) -> Any:
    """The job of ``ggufbot convert``, from its arguments."""
    from bot.jobs.job import FetchPolicy, JobSpec, PublishTarget, cli_disk_need
    from converters.ladder.job import CheckpointRules, EvalSettings

    ladder = quants.parse_ladder(args.ladder)
    imatrix = not args.no_imatrix
    cal, eval_text = _texts(args, imatrix)
    return JobSpec(
        source=source, model_name=model_name,
        ladder=pipeline.LadderOptions(ladder=tuple(q.name for q in ladder), outtype=args.outtype, imatrix=imatrix,
                                      calibration=cal, calibration_chunks=args.calibration_chunks, ctx=args.ctx,
                                      split_max_bytes=parse_size(args.split_max_size), jobs=args.jobs,
                                      tune=_tune_points(args),
                                      tune_seconds=args.tune_seconds, tune_confirm=args.tune_confirm,
                                      fit=tuple(args.fit),
                                      fit_kv_type=args.fit_kv_type),
        evaluation=EvalSettings(eval_text, chunks=args.eval_chunks, precision=args.eval_precision,
                                min_chunks=args.eval_min_chunks, speed=_speed(args)) if eval_text is not None else None,
        publish=PublishTarget(repo_id=args.repo, private=args.private) if args.publish else None,
        fetch=FetchPolicy(patterns=ckpt_mod.FETCH_PATTERNS, need_bytes=cli_disk_need),
        rules=CheckpointRules(check_architecture=True))


def _dry_run(args: argparse.Namespace, spec: JobSpec, info: ModelRecord | None, tc: toolchain.Toolchain) -> int:
    supported = ckpt_mod.supported_architectures(tc.root)
    if spec.source.path is None:
        ck = _hub_checkpoint_facts(info, supported)
    else:
        ck = ckpt_mod.inspect(spec.source.path, supported=supported,
                              projectors=ckpt_mod.supported_projectors(tc.root))
    p = pipeline.plan(ck, args.out, model_name=spec.model_name, options=spec.ladder,
                      source_repo=spec.source.repo, source_revision=spec.source.revision)
    print(json.dumps(p.to_json(), indent=2) if args.json else p.describe())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from bot.commands import cli_hooks
    from bot.jobs.job import Source, run_job

    if args.publish and args.no_eval:
        raise InputError("--publish needs the evaluation: a file is published only after it passed the gate")
    out: Path = args.out
    source, revision = _split_source(args.source, args.revision)
    local = Path(source).expanduser()
    tc = toolchain.find(required=True)
    assert tc is not None
    started = time.monotonic()
    hub = info = None
    if local.is_dir():
        src = Source(path=local)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        hub, info = _hub_info(source, revision)
        src = Source(repo=source, revision=info.sha)
    else:
        raise InputError(f"source {source!r} is neither a folder nor a Hub repo id (ORG/NAME)")
    spec = convert_spec(args, src, pipeline.model_name_for(src.repo or str(local.resolve())))
    if args.dry_run:
        return _dry_run(args, spec, info, tc)
    if hub is None and args.publish:
        from bot.hub.client import Hub

        hub = Hub()
    with cli_hooks() as hooks:
        result = run_job(spec, out, hooks, toolchain=tc, hub=hub)
    if args.json:
        print(json.dumps(result.ladder.to_json(), indent=2))
    else:
        _print_ladder(result.ladder, out, time.monotonic() - started)
    res = result.published
    if res is not None:
        print(f"{res.repo_id}: {'up to date, no commit' if res.action == 'none' else f'{res.action}d, commit {res.commit}'}"
              f" ({res.repo_url})")
    return 0


def _print_ladder(ladder: Ladder, out: Path, seconds: float) -> None:
    """The files, largest first, with what the evaluation measured and, for a refused file, why."""
    wd = WorkDir(out)
    results = {f.type: f for f in wd.report().files} if wd.has_report() else {}
    print(f"{ladder.model_name}: {len(ladder.files)} files in {out} ({seconds:.0f} s)")
    print(f"{'type':<10} {'size':>10} {'bpw':>6}  {'status':<7} {'mean KLD':>18} {'same top token':>16}  file")
    for f in sorted(ladder.files, key=lambda f: -f.size):
        r = results.get(f.type)
        kld, top, _ = figures(r.stats if r else None)
        print(f"{f.type:<10} {f.size / 1e6:>8.1f}MB {f.bpw or 0:>6.2f}  {r.status if r else '-':<7} {kld:>18} "
              f"{top:>16}  {f.path}" + (f" (+{len(f.parts) - 1} parts)" if len(f.parts) > 1 else ""))
        for reason in (r.reasons if r and r.status != PASSED else ()):
            print(f"    - {reason}")
    if ladder.imatrix:
        print(f"imatrix    {ladder.imatrix.gguf}, {ladder.imatrix.dat}")
    if ladder.projectors:  # a vision-language model: its projector files and their check
        check = wd.report().checks.get("projector") if wd.has_report() else None
        print(f"projector  {', '.join(p.path for p in ladder.projectors)}"
              + (f"  ({check.status}: {check.detail})" if check else ""))


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cmd_doctor(args: argparse.Namespace) -> int:
    problems = []
    rows: list[tuple[str, str]] = [("python", platform.python_version())]
    for pkg in ("huggingface_hub", "transformers", "torch", "gguf", "safetensors", "jinja2", "apscheduler",
                "sqlalchemy"):
        v = _version(pkg)
        rows.append((pkg, v or "MISSING"))
        if v is None:
            problems.append(f"python package {pkg} is not installed")
    no_compiler = []  # a problem only while llama.cpp is not built (a runtime image carries no compiler)
    for prog in ("cmake", "ninja", "cc", "c++"):
        path = shutil.which(prog)
        rows.append((prog, "found" if path else "missing"))
        if path is None and prog in ("cmake", "cc", "c++"):
            no_compiler.append(f"{prog} is needed to build llama.cpp")
    rows.append(("nvcc", "found" if shutil.which("nvcc") else "not found"))
    gpus = _gpu_rows(rows, problems)
    tc = None
    try:
        tc = toolchain.find(required=False)
    except Exception as e:  # a broken LLAMA_CPP_DIR is reported, not raised
        problems.append(str(e))
    if tc is None:
        rows.append(("llama.cpp", f"not built (pinned {toolchain.PINNED_PACKAGE} {toolchain.PINNED_VERSION})"))
        problems.append("llama.cpp is not built: run 'ggufbot toolchain install'")
        problems += no_compiler
    else:
        rows.append(("llama.cpp", f"{tc.version}, {'CUDA' if tc.cuda else 'CPU'}, {tc.origin}"))
        for m in tc.missing():
            problems.append(f"llama.cpp program missing: {m}")
        _cuda_build_rows(tc, gpus, rows, problems)
    cache = toolchain.cache_root()
    rows.append(("cache", str(cache)))
    rows.append(("free disk (cache)", f"{free_bytes(cache) / 1e9:.1f} GB"))
    rows.append(("free disk (here)", f"{free_bytes(Path.cwd()) / 1e9:.1f} GB"))
    rows.append(("HF token", "set" if (os.environ.get("HF_TOKEN") or _token_file()) else "not set (no publishing)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if problems:
        print("\nmissing:")
        for pr in problems:
            print(f"  - {pr}")
        return 1
    print("\nall set")
    return 0


def _gpu_rows(rows: list[tuple[str, str]], problems: list[str]) -> list[toolchain.Gpu] | None:
    """One "GPU n" row per GPU nvidia-smi lists, with its VRAM; None when nvidia-smi failed."""
    try:
        gpus = toolchain.gpus()
    except ToolError as e:
        rows.append(("GPU", f"none: {e}"))
        return None
    if not gpus:
        rows.append(("GPU", "none (no nvidia-smi)" if shutil.which("nvidia-smi") is None else "none listed"))
    for i, g in enumerate(gpus):
        rows.append((f"GPU {i}", f"{g.name}, VRAM {g.vram_mib / 1024:.1f} GiB ({g.free_mib / 1024:.1f} GiB free), "
                                  f"driver {g.driver}"))
    return gpus


def _cuda_build_rows(tc: toolchain.Toolchain, gpus: list[toolchain.Gpu] | None, rows: list[tuple[str, str]],
                     problems: list[str]) -> None:
    """The "CUDA build" row (the CUDA architectures it was built for) and a CUDA build without a GPU as a problem."""
    if not tc.cuda:
        note = "; a GPU is visible: GGUFBOT_CUDA=1 ggufbot toolchain install builds for it" if gpus else ""
        rows.append(("CUDA build", f"no (CPU){note}"))
        return
    archs = next((a.split("=", 1)[1] for a in _build_info(tc).get("cmake_args", [])
                  if a.startswith("-DCMAKE_CUDA_ARCHITECTURES=")), "CMake's default")
    rows.append(("CUDA build", f"yes, compute capabilities {archs}"))
    if not gpus:
        problems.append("llama.cpp is a CUDA build but no GPU is usable (a container needs the GPU: --gpus all, "
                        "or the compose file's device reservation)")


def _build_info(tc: toolchain.Toolchain) -> dict[str, Any]:
    try:
        return json.loads((tc.bin_dir.parent / "toolchain.json").read_text())
    except (OSError, ValueError):
        return {}


def _token_file() -> bool:
    """A token file: hub.token_file given by the environment, systemd's credential, or huggingface_hub's own."""
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    files = [Path(home) / "token", Path(os.environ.get("GGUFBOT_HUB__TOKEN_FILE") or "/nonexistent")]
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        files.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / "hf_token")
    return any(f.is_file() for f in files)
