"""Benchmark: the bot's ladder pipeline vs the same steps as a plain serial sequence of llama.cpp commands.

Runs, in one process and one run, on the SmolLM2 checkpoint (tests/models.py):
  plain     convert_hf_to_gguf.py -> llama-imatrix (+ .dat) -> llama-quantize per type, one after another
  serial    the bot's pipeline with --jobs 1
  parallel  the bot's pipeline with --jobs N (N = cores)
and prints JSON: wall seconds per stage, peak RSS of the programs, peak disk of the work dir, leftover
temporary files, and the ratios bot/plain. Targets: serial/plain <= 1.05; parallel/plain < 1 with cores.

usage: python benchmarks/ladder.py [--ladder Q8_0,Q4_K_M,IQ4_XS,Q2_K] [--chunks 16] [--ctx 512]

--pipeline (issue 20; benchmarks/ladder_pipeline.py): the bot's job with the pipeline stage and early publishing
against the serial plain-llama.cpp job (convert, imatrix, every quant, every evaluation at --eval-chunks, one upload),
both publishing to a local Hub server with a throttled uplink, on the default 12-type ladder:

  python benchmarks/ladder.py --pipeline [--upload-mbps N] [--eval-chunks 64] [--chunks 16] [--cpu-units 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.formats import checkpoint as ck_mod
from converters.ladder import pipeline
from converters.core import quants
from converters.core import records
from converters.core import proc
from converters.llama import toolchain
from converters.llama.calibrate import TextFile  # noqa: E402
from tests.models import smollm2_checkpoint  # noqa: E402


def _children_hwm_kb() -> int:
    """Largest peak RSS (VmHWM) among this process's live child processes."""
    me, best = str(os.getpid()), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
            best = max(best, int(fields["VmHWM"].split()[0]))
    return best


class DiskPeak:
    """Samples, in a thread, the size of a directory tree (.peak, bytes) and the peak RSS of the child
    processes running meanwhile (.rss_peak_kb)."""

    def __init__(self, path: Path, every: float = 0.1):
        self.path, self.every, self.peak, self.rss_peak_kb = path, every, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _size(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            self.rss_peak_kb = max(self.rss_peak_kb, _children_hwm_kb())
            self._stop.wait(self.every)

    def __enter__(self) -> "DiskPeak":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._size())


def run_plain(tc, ck_dir: Path, out: Path, cal: Path, types, chunks: int, ctx: int) -> dict:
    threads = str(os.cpu_count() or 1)
    stages = {}
    t0 = time.monotonic()
    ref = out / "model-BF16.gguf"
    proc.run([sys.executable, tc.converter, ck_dir, "--outtype", "bf16", "--outfile", ref], env=tc.python_env())
    stages["convert"] = time.monotonic() - t0
    t0 = time.monotonic()
    imat = out / "imatrix.gguf"
    proc.run([tc.program("llama-imatrix"), "-m", ref, "-f", cal, "-o", imat, "--output-format", "gguf",
                   "-c", str(ctx), "-t", threads, "--no-ppl", "-ofreq", "1000000", "--chunks", str(chunks)])
    proc.run([tc.program("llama-imatrix"), "-m", ref, "--in-file", imat, "--output-format", "dat", "-o", out / "imatrix.dat"])
    stages["calibrate"] = time.monotonic() - t0
    t0 = time.monotonic()
    for q in types:
        proc.run([tc.program("llama-quantize"), "--imatrix", imat, ref, out / f"model-{q.name}.gguf",
                       q.base_name, threads])
    stages["quantize"] = time.monotonic() - t0
    return stages


def run_bot(tc, ck, out: Path, cal: Path, ladder: str, chunks: int, ctx: int, jobs: int) -> dict:
    from bot.jobs.job import JobSpec, Source, run_job
    from converters.core.hooks import Event, Hooks

    spec = JobSpec(source=Source(path=Path(ck.path)), model_name="model",
                   ladder=pipeline.LadderOptions(ladder=ladder, calibration=TextFile.of(cal), calibration_chunks=chunks,
                                                 ctx=ctx, jobs=jobs))
    stages: dict[str, float] = {}
    starts: dict[str, float] = {}

    class Timer(Hooks):
        def progress(self, event: Event) -> None:
            if event.kind == "start":
                starts[event.stage] = time.monotonic()
            elif event.kind in ("end", "skip") and event.stage in starts:
                stages[event.stage] = time.monotonic() - starts[event.stage]

    run_job(spec, out, Timer(), toolchain=tc)
    return stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ladder", default=None, help="default: Q8_0,Q4_K_M,IQ4_XS,Q2_K; with --pipeline: default")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calibration", type=Path, default=ROOT.parent / "shared" / "data" / "groups_merged.txt")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of (plain, serial, parallel), interleaved so machine load hits all alike; "
                         "the median wall time of each is reported")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--pipeline", action="store_true", help="the pipeline comparison (see the module doc)")
    ap.add_argument("--pipeline-only", action="store_true", help="with --pipeline: no serial baseline")
    ap.add_argument("--upload-mbps", type=float, default=None,
                    help="the test Hub's uplink in Mbit/s (default: an 8 B ladder's upload-to-compute ratio on a "
                         "50 Mbit/s home uplink, benchmarks/ladder_pipeline.py)")
    ap.add_argument("--eval-chunks", type=int, default=64, help="today's fixed evaluation chunks (the cap)")
    ap.add_argument("--eval-min-chunks", type=int, default=None, help="the sequential evaluation's floor (default: "
                    "the product's)")
    ap.add_argument("--eval-text", type=Path, default=ROOT.parent / "shared" / "data" / "wiki.test.raw")
    ap.add_argument("--cpu-units", type=int, default=None, help="CPU-heavy programs at once in the pipeline")
    args = ap.parse_args()
    if args.pipeline:
        from benchmarks import ladder_pipeline

        args.ladder = args.ladder or "default"
        print(json.dumps(ladder_pipeline.main(args), indent=2))
        return
    args.ladder = args.ladder or "Q8_0,Q4_K_M,IQ4_XS,Q2_K"

    tc = toolchain.find(required=True)
    ck_dir = smollm2_checkpoint()
    ck = ck_mod.inspect(ck_dir)
    types = quants.parse_ladder(args.ladder)
    cores = os.cpu_count() or 1
    base = Path(tempfile.mkdtemp(prefix="ggufbot-bench-"))
    result: dict = {"model": ck_dir.name, "parameters": ck.parameters, "ladder": [q.name for q in types],
                    "calibration_chunks": args.chunks, "ctx": args.ctx, "cores": cores, "toolchain": tc.version,
                    "runs": {}}
    walls: dict[str, list[float]] = {"plain": [], "serial": [], "parallel": []}
    try:
        for rnd in range(args.repeat):
            for name in ("plain", "serial", "parallel"):
                out = base / f"{name}-{rnd}"
                out.mkdir()
                t0 = time.monotonic()
                with DiskPeak(out) as disk:
                    if name == "plain":
                        stages = run_plain(tc, ck_dir, out, args.calibration, types, args.chunks, args.ctx)
                    else:
                        stages = run_bot(tc, ck, out, args.calibration, args.ladder, args.chunks, args.ctx,
                                         jobs=1 if name == "serial" else cores)
                wall = time.monotonic() - t0
                walls[name].append(wall)
                leftovers = [str(p.relative_to(out)) for p in out.rglob(f"{records.TMP_MARK}*")]
                prev = result["runs"].get(name, {})
                result["runs"][name] = {
                    "wall_seconds": round(statistics.median(walls[name]), 2),
                    "wall_seconds_all": [round(w, 2) for w in walls[name]],
                    "stages_seconds": {k: round(v, 2) for k, v in stages.items()},
                    "peak_rss_mb_programs": round(max(disk.rss_peak_kb / 1024, prev.get("peak_rss_mb_programs", 0)), 1),
                    "peak_disk_mb": round(max(disk.peak / 1e6, prev.get("peak_disk_mb", 0)), 1),
                    "temporary_files_left": prev.get("temporary_files_left", []) + leftovers,
                }
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        plain = result["runs"]["plain"]["wall_seconds"]
        result["ratio_serial_to_plain"] = round(result["runs"]["serial"]["wall_seconds"] / plain, 3)
        result["ratio_parallel_to_plain"] = round(result["runs"]["parallel"]["wall_seconds"] / plain, 3)
        result["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["targets"] = {"serial_overhead_ok": result["ratio_serial_to_plain"] <= 1.05,
                             "parallel_faster": result["ratio_parallel_to_plain"] < 1.0,
                             "no_temporary_files": not any(r["temporary_files_left"] for r in result["runs"].values())}
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
