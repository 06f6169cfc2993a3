"""Benchmark the speed measurement (converters/ladder/speed.py) on a finished ladder: what it costs and what it finds.

    python -m benchmarks.speed --workdir DIR [--pair CANDIDATE:BASELINE] [--prompt 512] [--generate 128]
                               [--repetitions 3] [--rounds 2] [--threads N]

Runs the speed stage's measurement twice: scope "tuned" (only the pair, interleaved: what a job with tuned or fit
files pays by default) and scope "all" (every file: the card's tokens/s for each), and prints JSON: seconds of each,
tokens/s ± error of each file, the pair's interleaved ratios, and the cost against the ladder's own quantize +
evaluate seconds (ladder.json / report.json). Without ``--pair`` the pair is the ladder's first tuned file and its
stock file, else its two files of the closest size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from converters.core.workdir import LadderFile, WorkDir  # noqa: E402
from converters.ladder import layout, speed  # noqa: E402
from converters.llama import bench  # noqa: E402
from converters.llama import toolchain as tc_mod  # noqa: E402


def _pair(files: list[LadderFile], asked: str | None) -> tuple[str, str]:
    if asked:
        cand, base = asked.split(":")
        return cand, base
    for f in files:
        if layout.is_tuned(f.type):
            return f.type, layout.stock_of(f.type)
    by_size = sorted(files, key=lambda f: f.size or 0)
    gaps = [(abs((a.size or 0) - (b.size or 0)), a.type, b.type) for a, b in zip(by_size, by_size[1:])]
    _, small, big = min(gaps)
    return small, big


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--pair", help="CANDIDATE:BASELINE types (default: a tuned file and its stock file)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--generate", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    tc = tc_mod.find(required=True)
    wd = WorkDir(args.workdir)
    ladder = wd.ladder()
    cand, base = _pair(list(ladder.files), args.pair)
    files = tuple(f if f.type != cand or layout.is_tuned(f.type) else
                  LadderFile.from_json({**f.to_json(), speed.BASELINE_KEY: base}) for f in ladder.files)
    ladder = type(ladder).from_json({**ladder.to_json(), "files": [f.to_json() for f in files]})
    out: dict = {"workdir": str(args.workdir.name), "pair": {"candidate": cand, "baseline": base},
                 "settings": {"prompt": args.prompt, "generate": args.generate, "repetitions": args.repetitions,
                              "rounds": args.rounds, "threads": args.threads or bench.threads()}}
    for scope in ("tuned", "all"):
        opts = speed.SpeedOptions(scope=scope, prompt=args.prompt, generate=args.generate,
                                  repetitions=args.repetitions, rounds=args.rounds, threads=args.threads)
        t0 = time.monotonic()
        figures = speed.measure(wd.path, ladder, opts, toolchain=tc)
        out[scope] = {"seconds": round(time.monotonic() - t0, 1), "files": figures}
    report = wd.report() if wd.has_report() else None
    quantize = float(ladder.seconds.get("quantize") or 0.0)
    evaluate = report.seconds.get("total") if report is not None else None  # None: the ladder was not evaluated
    out["stock_seconds"] = {"quantize": round(quantize, 1), "evaluate": round(evaluate, 1) if evaluate else None}
    stock = quantize + (evaluate or 0.0)
    for scope in ("tuned", "all"):
        out[f"{scope}_cost_ratio"] = round(out[scope]["seconds"] / stock, 3) if stock else None
    out["cost_ratio_of"] = "quantize + evaluate" if evaluate else "quantize only (no report.json)"
    out["files"] = {f.type: f.size for f in ladder.files}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
