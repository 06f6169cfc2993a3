"""The pipeline comparison of ``benchmarks/ladder.py --pipeline`` (issue 20): one run of the bot's job with the
pipeline stage and early publishing against the serial plain-llama.cpp job, both publishing to a local Hub server
(tests/hubserver.py, the real huggingface_hub client) whose LFS uplink is throttled.

Serial baseline, each program run back to back by this script: convert_hf_to_gguf.py, llama-imatrix (+ .dat),
llama-quantize per type, llama-perplexity --kl-divergence-base then --kl-divergence per type at the fixed chunk
count (today's evaluation), then one upload of the files (huggingface_hub upload_folder: one commit).

The uplink (``--upload-mbps``, default :func:`scaled_uplink_mbps`): the upload-to-compute ratio of an 8 B ladder
on a home uplink, with compute proportional to the parameter count on the same box (quantize and evaluation both
read every weight once per file / per token). An 8 B ladder of 12 files is about 60 GB (the issue's figure); at
:data:`HOME_UPLINK_MBPS` that is ``60e9 * 8 / 50e6 = 9600 s`` of upload. Its compute is ``8.03e9 / P`` times this
model's (P parameters), so this model's ladder should take ``9600 s * P / 8.03e9`` to upload (SmolLM2-135M:
``9600 * 134.5e6 / 8.03e9 = 161 s``): the uplink is its ladder's bytes (the plan's estimate) over that time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HOME_UPLINK_MBPS = 50.0  # assumption: a home uplink (the issue: 60 GB in "two hours and more")
LADDER_8B_BYTES = 60e9  # the size of a 12-file ladder of an 8 B model
PARAMS_8B = 8.03e9
TOKEN = "hf_benchmarktoken0123456789"
USER, ORG = "bench", "bench-org"
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def upload_seconds_8b_equivalent(parameters: int) -> float:
    """Seconds this model's ladder should take to upload to keep the 8 B ladder's upload-to-compute ratio."""
    return LADDER_8B_BYTES * 8 / (HOME_UPLINK_MBPS * 1e6) * parameters / PARAMS_8B


def scaled_uplink_mbps(ladder_bytes: int, parameters: int) -> float:
    return ladder_bytes * 8 / 1e6 / upload_seconds_8b_equivalent(parameters)


class Watcher:
    """Polls the server for the moment each file of ``repo`` is first visible (a commit made it public)."""

    def __init__(self, hub: Any, repo: str, t0: float) -> None:
        self.hub, self.repo, self.t0 = hub, repo, t0
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(0.2)

    def poll(self) -> None:
        try:
            names = list(self.hub.files(self.repo)) if self.hub.repo(self.repo) is not None else []
        except Exception:  # noqa: BLE001 - a repo being created
            names = []
        now = time.monotonic() - self.t0
        for n in names:
            self.seen.setdefault(n, round(now, 2))

    def __enter__(self) -> "Watcher":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.poll()


def _program(tc: Any, name: str) -> str:
    return str(tc.program(name))


def run_serial(tc: Any, ck_dir: Path, out: Path, cal: Path, ev: Path, types: list[Any], args: Any, hub: Any,
               repo: str) -> dict[str, Any]:
    """The serial job of plain llama.cpp commands, then one upload."""
    from converters.core import proc
    from converters.ladder import evaluate

    threads = str(os.cpu_count() or 1)
    sec: dict[str, float] = defaultdict(float)
    spans: list[tuple[str, float, float]] = []  # (resource, start, end)
    t0 = time.monotonic()

    def timed(stage: str, argv: list[Any], resource: str = "cpu", **kw: Any) -> Any:
        s = time.monotonic()
        res = proc.run(argv, **kw)
        e = time.monotonic()
        sec[stage] += e - s
        spans.append((resource, s - t0, e - t0))
        return res

    ref = out / "model-BF16.gguf"
    timed("convert", [sys.executable, tc.converter, ck_dir, "--outtype", "bf16", "--outfile", ref], env=tc.python_env())
    imat = out / "model-imatrix.gguf"
    timed("calibrate", [_program(tc, "llama-imatrix"), "-m", ref, "-f", cal, "-o", imat, "--output-format", "gguf",
                        "-c", str(args.ctx), "-t", threads, "-ofreq", "1000000", "--chunks", str(args.chunks)])
    timed("calibrate", [_program(tc, "llama-imatrix"), "-m", ref, "--in-file", imat, "--output-format", "dat",
                        "-o", out / "model-imatrix.dat"])
    for q in types:
        timed("quantize", [_program(tc, "llama-quantize"), "--imatrix", imat, ref, out / f"model-{q.name}.gguf",
                           q.base_name, threads])
    base = out / "base.kld"
    timed("evaluate", [_program(tc, "llama-perplexity"), "-m", ref, "-f", ev, "-c", "512", "--chunks",
                       str(args.eval_chunks), "--kl-divergence-base", base, "-t", threads])
    klds = {}
    for q in types:
        res = timed("evaluate", [_program(tc, "llama-perplexity"), "-m", out / f"model-{q.name}.gguf", "-c", "512",
                                 "--kl-divergence-base", base, "--kl-divergence", "-t", threads])
        st = evaluate.parse_kld_output(res.stdout + "\n" + res.stderr)
        cv = (statistics.stdev(st.chunk_kld) / st.kld_mean if st.chunk_kld and len(st.chunk_kld) > 1 and st.kld_mean
              else None)  # the spread of its chunk means: the chunks a target precision needs, (cv / target)^2
        klds[q.name] = {"chunks": st.chunks, "kld_mean": st.kld_mean, "kld_mean_err": st.kld_mean_err,
                        "chunk_cv": round(cv, 4) if cv is not None else None}
    base.unlink()
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    s = time.monotonic()
    api.upload_folder(repo_id=repo, folder_path=out, allow_patterns=["*.gguf", "*.dat"],
                      commit_message="the whole ladder")
    sec["upload"] = time.monotonic() - s
    spans.append(("network", s - t0, time.monotonic() - t0))
    total = time.monotonic() - t0
    return {"seconds": {k: round(v, 2) for k, v in sec.items()}, "total_seconds": round(total, 2),
            "first_published_seconds": round(total, 2), "busy": _busy(spans, total), "evaluation": klds}


def _busy(spans: list[tuple[str, float, float]], total: float) -> dict[str, float]:
    from converters.core.schedule import covered

    return {r: round(covered([(s, e) for rr, s, e in spans if rr == r], 0, total) / total, 3)
            for r in sorted({r for r, _, _ in spans})}


def run_pipeline(tc: Any, ck_dir: Path, out: Path, cal: Path, ev: Path, args: Any, hub: Any, repo: str,
                 ladder: str) -> dict[str, Any]:
    """The bot's job (fetch-less: a local checkpoint named after its Hub repo) with the pipeline stage, publishing."""
    from bot.hub.client import Hub
    from bot.jobs.job import JobSpec, PublishTarget, Source, run_job
    from bot.publish.early import EarlyOptions
    from converters.core.hooks import PROGRESS, Event, Hooks
    from converters.ladder.job import CheckpointRules, EvalSettings
    from converters.ladder.pipeline import LadderOptions
    from converters.llama.calibrate import TextFile

    events: list[tuple[float, Event]] = []
    t0 = time.monotonic()

    class Timer(Hooks):
        def progress(self, event: Event) -> None:
            events.append((time.monotonic() - t0, event))

    spec = JobSpec(source=Source(repo=SOURCE, path=ck_dir), model_name=ck_dir.name,
                   ladder=LadderOptions(ladder=ladder, calibration=TextFile.of(cal), calibration_chunks=args.chunks,
                                        ctx=args.ctx, cpu_units=args.cpu_units),
                   evaluation=EvalSettings(TextFile.of(ev), chunks=args.eval_chunks, name_text=True,
                                           **({"min_chunks": args.eval_min_chunks} if args.eval_min_chunks else {})),
                   publish=PublishTarget(repo_id=repo, early=EarlyOptions()),
                   rules=CheckpointRules(check_architecture=True))
    with Watcher(hub, repo, t0) as seen:
        result = run_job(spec, out, Timer(), toolchain=tc, hub=Hub())
    total = time.monotonic() - t0
    spans, stages, starts = [], {}, {}
    open_tasks: dict[str, tuple[str, float]] = {}
    for at, e in events:
        if e.kind == "start":
            starts[e.stage] = at
        elif e.kind in ("end", "skip") and e.stage in starts:
            stages[e.stage] = round(at - starts[e.stage], 2)
            if e.stage in ("convert", "calibrate"):
                spans.append(("cpu", starts[e.stage], at))
        elif e.kind == PROGRESS and e.data.get("task"):
            if e.data.get("phase") == "start":
                open_tasks[e.data["task"]] = (e.data["resource"], at)
            elif e.data["task"] in open_tasks:
                res, s = open_tasks.pop(e.data["task"])
                spans.append((res, s, at))
    for s, e, _ in hub.upload_spans:
        spans.append(("network", s - t0, e - t0))
    report = result.report
    files = {}
    for f in report.files if report is not None else []:
        st = f.stats
        files[f.type] = {"status": f.status, "chunks": st.chunks if st else None, "stop": f.stop,
                         "kld_mean": st.kld_mean if st else None, "kld_mean_err": st.kld_mean_err if st else None,
                         "published_at_seconds": next((v for k, v in seen.seen.items() if k.endswith(f"-{f.type}.gguf")
                                                       or f"-{f.type}/" in k), None)}
    return {"total_seconds": round(total, 2), "stages_seconds": stages, "busy": _busy(spans, total),
            "files": files, "published_at_seconds": dict(sorted(seen.seen.items(), key=lambda kv: kv[1])),
            "commits": sum(1 for c in hub.commits(repo) if c.parent is not None)}


def main(args: Any) -> dict[str, Any]:
    """``--pipeline``: the JSON of one run (see the module doc)."""
    from tests.hubserver import HubServer, free_port, point_client_here

    home = Path(tempfile.mkdtemp(prefix="ggufbot-bench-hf-"))
    port = free_port()
    point_client_here(port, home, TOKEN)  # before anything imports huggingface_hub
    from converters.core import quants
    from converters.formats import checkpoint as ck_mod
    from converters.ladder import pipeline
    from converters.llama import toolchain
    from tests.bot_fixtures import checkpoint_files
    from tests.models import smollm2_checkpoint

    tc = toolchain.find(required=True)
    ck_dir = smollm2_checkpoint()
    ck = ck_mod.inspect(ck_dir)
    types = list(quants.parse_ladder(args.ladder))
    # the uplink is the link's speed, not the ladder's: from the default 12-type ladder, whatever ladder runs
    p = pipeline.plan(ck, home / "plan", model_name=ck_dir.name,
                      options=pipeline.LadderOptions(ladder="default", imatrix=False))
    ladder_bytes = sum(f.estimated_bytes for f in p.files)
    mbps = args.upload_mbps or scaled_uplink_mbps(ladder_bytes, ck.parameters)
    result: dict[str, Any] = {
        "model": ck_dir.name, "parameters": ck.parameters, "ladder": [q.name for q in types], "cores": os.cpu_count(),
        "toolchain": tc.version, "calibration_chunks": args.chunks, "ctx": args.ctx, "eval_chunks_fixed": args.eval_chunks,
        "uplink": {"mbps": round(mbps, 2), "default_rule": None if args.upload_mbps else
                   f"{LADDER_8B_BYTES / 1e9:.0f} GB 8B ladder at {HOME_UPLINK_MBPS:.0f} Mbit/s = "
                   f"{LADDER_8B_BYTES * 8 / HOME_UPLINK_MBPS / 1e6:.0f} s, x {ck.parameters / 1e6:.1f}M / "
                   f"{PARAMS_8B / 1e9:.2f}B = {upload_seconds_8b_equivalent(ck.parameters):.0f} s for the default "
                   f"ladder's {ladder_bytes / 1e9:.2f} GB (estimated)"},
    }
    base = Path(tempfile.mkdtemp(prefix="ggufbot-bench-pipeline-"))
    with HubServer(valid_tokens={TOKEN: USER}, user_orgs={USER: [ORG]}, port=port) as hub:
        hub.add_model(SOURCE, checkpoint_files(ck_dir), card_data={"license": "apache-2.0"},
                      pipeline_tag="text-generation", library_name="transformers",
                      config=json.loads((ck_dir / "config.json").read_text()), safetensors_params=ck.parameters)
        hub.upload_bytes_per_second = mbps * 1e6 / 8
        runs = ("serial", "pipeline") if not args.pipeline_only else ("pipeline",)
        for name in runs:
            out = base / name
            out.mkdir()
            hub.upload_spans.clear()
            try:
                if name == "serial":
                    result["serial"] = run_serial(tc, ck_dir, out, args.calibration, args.eval_text, types, args,
                                                  hub, f"{ORG}/serial-GGUF")
                else:
                    result["pipeline"] = run_pipeline(tc, ck_dir, out, args.calibration, args.eval_text, args, hub,
                                                      f"{ORG}/pipeline-GGUF", args.ladder)
            except Exception as e:  # noqa: BLE001 - the other run's figures are still printed
                import traceback

                traceback.print_exc()
                result[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
            result[name]["uploaded_mb"] = round(sum(b for _, _, b in hub.upload_spans) / 1e6, 1)
    pl = result["pipeline"]
    if "error" in pl or "error" in result.get("serial", {}):
        return result
    first = pl["files"].get("Q4_K_M", {}).get("published_at_seconds")
    result["first_published"] = {"type": "Q4_K_M", "seconds": first}
    if "serial" in result:
        serial = result["serial"]["total_seconds"]
        chunks_now = sum(f["chunks"] or 0 for f in pl["files"].values())
        chunks_fixed = sum(v["chunks"] for v in result["serial"]["evaluation"].values())
        result["ratios"] = {"first_published_to_serial": round(first / serial, 3) if first else None,
                            "full_ladder_to_serial": round(pl["total_seconds"] / serial, 3),
                            "evaluation_chunks_to_fixed": round(chunks_now / max(chunks_fixed, 1), 3)}
        r = result["ratios"]
        result["targets"] = {"first_published_le_0.35": r["first_published_to_serial"] is not None
                             and r["first_published_to_serial"] <= 0.35,
                             "full_ladder_le_0.8": r["full_ladder_to_serial"] <= 0.8,
                             "evaluation_chunks_le_0.5": r["evaluation_chunks_to_fixed"] <= 0.5}
        rel = [v["kld_mean_err"] / v["kld_mean"] for v in pl["files"].values() if v.get("kld_mean")]
        rel_fixed = [v["kld_mean_err"] / v["kld_mean"] for v in result["serial"]["evaluation"].values() if v["kld_mean"]]
        result["precision"] = {"median_relative_kld_err_pipeline": round(statistics.median(rel), 4) if rel else None,
                               "median_relative_kld_err_fixed": round(statistics.median(rel_fixed), 4) if rel_fixed else None}
        # Equal precision: today's evaluation scores every file on one chunk count; to give every file the target
        # relative error (the sequential evaluation's precision, 5 %) it needs the count of the file whose chunk
        # means spread most, (cv / target)^2 (cv measured on the fixed run's 64 chunks), between the floor and the
        # cap. The sequential evaluation spends what each file needs, less for files refused whatever follows.
        from converters.ladder import evaluate

        target, floor = evaluate.PRECISION, args.eval_min_chunks or evaluate.MIN_CHUNKS
        cvs = [v["chunk_cv"] for v in result["serial"]["evaluation"].values() if v.get("chunk_cv")]
        if cvs:
            per_file = min(args.eval_chunks, max(floor, math.ceil((max(cvs) / target) ** 2)))
            fixed_equal = per_file * len(result["serial"]["evaluation"])
            # what a rule that knew each file's spread beforehand would spend: each file its own need, not the
            # noisiest file's; no precision rule can do better at equal precision (it has to estimate the spread)
            oracle = sum(min(args.eval_chunks, max(floor, math.ceil((cv / target) ** 2))) for cv in cvs)
            r["evaluation_chunks_oracle_to_fixed_at_equal_precision"] = round(oracle / fixed_equal, 3)
            r["evaluation_chunks_to_fixed_at_equal_precision"] = round(chunks_now / fixed_equal, 3)
            result["precision"].update(
                target=target, fixed_chunks_per_file_for_target=per_file, fixed_chunks_for_target=fixed_equal,
                oracle_chunks_for_target=oracle,
                pipeline_chunks=chunks_now,
                pipeline_files_at_target={t: bool(v.get("kld_mean") and v["kld_mean_err"] <= target * v["kld_mean"])
                                          for t, v in pl["files"].items()},
                pipeline_stops={t: v.get("stop") for t, v in pl["files"].items()})
            result["targets"]["evaluation_chunks_le_0.5_at_equal_precision"] = (
                r["evaluation_chunks_to_fixed_at_equal_precision"] <= 0.5)
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    return result
