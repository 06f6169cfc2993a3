"""Speed is part of quality: prompt and generation tokens/s of the ladder's files (llama-bench), measured before
the evaluation so that its gate can withhold a tuned or fit file slower than its baseline.

What is measured (:class:`SpeedOptions`, settings ``[evaluate] speed*``): ``scope = "all"``: every file of the
ladder (the card shows tokens/s for each); ``"tuned"``: only the files judged against a baseline (tuned files,
memory-budget files) and their baselines; ``"off"``. Each file runs ``llama-bench -p PROMPT -n GENERATE -r
REPETITIONS`` (:mod:`converters.llama.bench`) with the threads this process may use, on the backend of the build
(the CPU here; the device llama-bench names is recorded).

Pairs are interleaved: on a shared or thermally throttled machine the throughput drifts over minutes, so a
candidate and its baseline are run alternately, ``ROUNDS`` times each, the order swapped every round (B A, A B,
B A...), so that drift hits both about equally instead of whichever ran second. The ratio ``candidate / baseline``
is taken per round (both measured minutes apart at most) and its error is the larger of the spread of the
per-round ratios (standard error over rounds) and the error propagated from the samples' standard errors, so that
neither a lucky round count nor a quiet spell understates it. The gate's rule is in
:func:`converters.ladder.evaluate.paired.compare` (more than 5 % slower beyond 2 errors: withheld).

The results go to ``speed.json`` (per file: its content hash, tokens/s ± error of both tests, device, threads, and for
a candidate the ratios to its baseline), recorded as the ``speed`` stage (a re-run with the same files and settings
is free); :func:`attach` copies them into the evaluation's results, so report.json carries them and the card shows
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from converters.core import names, proc, records
from converters.core.errors import InputError, ParseError, ToolchainError, ToolError
from converters.core.hooks import END, SKIP, Hooks
from converters.core.report import FileResult
from converters.core.workdir import Ladder, LadderFile, WorkDir
from converters.ladder import layout
from converters.llama import bench
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

STAGE = "speed"
SCOPES = ("all", "tuned", "off")
SPEED_KEY = "speed"  # FileResult.extra key (converters.ladder.evaluate.paired reads it)
BASELINE_KEY = "baseline"  # a ladder file's extra: the type it is judged against (a memory-budget file's)


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    scope: str = "tuned"
    prompt: int = 512
    generate: int = 128
    repetitions: int = 3  # llama-bench -r: runs of each test in one process
    rounds: int = 2  # interleaved runs of each file of a pair (each of ``repetitions``)
    threads: int | None = None  # None: every thread this process may use

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise InputError(f"speed scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        if min(self.prompt, self.generate, self.repetitions, self.rounds) < 1:
            raise InputError("speed prompt, generate, repetitions and rounds must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def baseline_name(type_name: str, extra: Mapping[str, Any]) -> tuple[str, bool] | None:
    """The type a file is judged against and whether it must not be larger: a tuned file's stock type (no larger);
    a memory-budget file's baseline, the largest stock file that fits its budget (``extra["fit"]["baseline"]``),
    or what ``extra["baseline"]`` names (either may be larger: the budget bounds it). None: a stock file."""
    if layout.is_tuned(type_name):
        return layout.stock_of(type_name), True
    fit = extra.get("fit")
    b = (fit.get("baseline") if isinstance(fit, Mapping) else None) or extra.get(BASELINE_KEY)
    return (str(b), False) if b else None


def baseline_of(f: LadderFile) -> str | None:
    b = baseline_name(f.type, f.extra)
    return b[0] if b is not None else None


def plan(ladder: Ladder, scope: str) -> tuple[dict[str, str], list[str]]:
    """``({candidate: baseline}, [single files])`` to measure: pairs whose baseline is in the ladder, and the other
    files when ``scope`` is "all"."""
    types = {f.type for f in ladder.files}
    pairs = {f.type: b for f in ladder.files if (b := baseline_of(f)) is not None and b in types}
    if scope == "off":
        return {}, []
    paired_types = set(pairs) | set(pairs.values())
    singles = [f.type for f in ladder.files if f.type not in paired_types] if scope == "all" else []
    return pairs, singles


@dataclasses.dataclass
class _Samples:
    pp: list[bench.Throughput] = dataclasses.field(default_factory=list)  # one per run
    tg: list[bench.Throughput] = dataclasses.field(default_factory=list)
    run: bench.BenchRun | None = None


def ratio(cand: Sequence[bench.Throughput], base: Sequence[bench.Throughput]) -> tuple[float, float]:
    """``candidate / baseline`` from interleaved runs (round i of each): mean of the per-round ratios, and the larger
    of their standard error and the error propagated from the pooled samples (module doc)."""
    per_round = [c.mean / b.mean for c, b in zip(cand, base)]
    r = math.fsum(per_round) / len(per_round)
    spread = 0.0
    if len(per_round) > 1:
        spread = math.sqrt(math.fsum((x - r) ** 2 for x in per_round) / (len(per_round) - 1) / len(per_round))
    c_all = bench.Throughput(tuple(x for t in cand for x in t.samples))
    b_all = bench.Throughput(tuple(x for t in base for x in t.samples))
    pooled = r * math.hypot(c_all.err / c_all.mean, b_all.err / b_all.mean)
    return r, max(spread, pooled)


def _summary(s: _Samples) -> dict[str, Any]:
    assert s.run is not None
    pp = bench.Throughput(tuple(x for t in s.pp for x in t.samples))
    tg = bench.Throughput(tuple(x for t in s.tg for x in t.samples))
    return {"pp": pp.to_json(), "tg": tg.to_json(), "prompt": s.run.prompt, "generate": s.run.generate,
            "device": s.run.device, "backend": s.run.backend, "threads": s.run.threads}


def measure(workdir: Path, ladder: Ladder, options: SpeedOptions, *, toolchain: Toolchain,
            step: Callable[[str, int, int], None] | None = None,
            timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Run llama-bench on the files :func:`plan` names (pairs interleaved); per type, what ``speed.json`` holds.
    A file llama-bench cannot run gets ``{"error": ...}`` (its candidate is then withheld by the gate)."""
    pairs, singles = plan(ladder, options.scope)
    by_type = {f.type: f for f in ladder.files}
    samples: dict[str, _Samples] = {}
    errors: dict[str, str] = {}
    # (type, round) runs in order: each pair's rounds alternate, the order swapped every round
    runs: list[tuple[str, int]] = []
    for cand, base in pairs.items():
        for r in range(options.rounds):
            runs += [(base, r), (cand, r)] if r % 2 == 0 else [(cand, r), (base, r)]
    runs += [(t, 0) for t in singles]
    for i, (qtype, _r) in enumerate(runs):
        if qtype in errors:
            continue
        if step is not None:
            step(f"llama-bench {qtype}", i, len(runs))
        try:
            res = bench.run(toolchain, workdir / by_type[qtype].path, prompt=options.prompt, generate=options.generate,
                            repetitions=options.repetitions, n_threads=options.threads, timeout=timeout)
        except (ToolError, ParseError, ToolchainError) as e:  # a build without llama-bench: no figures either
            errors[qtype] = e.short() if isinstance(e, ToolError) else str(e)
            log.warning("speed: %s: %s", qtype, errors[qtype])
            continue
        s = samples.setdefault(qtype, _Samples())
        s.pp.append(res.pp)
        s.tg.append(res.tg)
        s.run = res
    out: dict[str, dict[str, Any]] = {}
    for qtype in [*pairs.values(), *pairs, *singles]:
        f = by_type[qtype]
        entry: dict[str, Any] = {"sha256": f.sha256}
        if qtype in errors or qtype not in samples:
            entry["error"] = errors.get(qtype, "not measured")
        else:
            entry.update(_summary(samples[qtype]))
        out[qtype] = entry
    for cand, base in pairs.items():
        if "error" in out[cand] or "error" in out[base]:
            continue
        vs: dict[str, Any] = {"baseline": base, "rounds": options.rounds}
        for what in ("pp", "tg"):
            rr, err = ratio(getattr(samples[cand], what), getattr(samples[base], what))
            vs[what] = {"ratio": round(rr, 5), "ratio_err": round(err, 5)}
        out[cand]["vs"] = vs
    return out


def save(workdir: Path, options: SpeedOptions, figures: Mapping[str, Mapping[str, Any]], seconds: float) -> Path:
    """Write ``speed.json`` with ``figures``, keeping the entries of an earlier call with the same options (a pipeline
    that measures pair by pair, as each candidate is made, calls :func:`measure` on a ladder of the pair and this
    after each; the figures of the same content are replaced)."""
    path = workdir / names.SPEED
    files: dict[str, Any] = {}
    before = 0.0
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(path.read_text())
            if data.get("options") == options.to_json():
                files, before = dict(data.get("files") or {}), float(data.get("seconds") or 0.0)
    files.update({k: dict(v) for k, v in figures.items()})
    records.write_json_atomic(path, {"options": options.to_json(), "seconds": round(before + seconds, 3),
                                     "files": files})
    return path


def entry(workdir: Path, type_name: str) -> dict[str, Any] | None:
    """``speed.json``'s entry of one file (None: none), what a file's evaluation record is keyed on."""
    path = workdir / names.SPEED
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError, OSError):
        e = (json.loads(path.read_text()).get("files") or {}).get(type_name)
        return dict(e) if isinstance(e, Mapping) else None
    return None


def attach(workdir: Path, files: Sequence[FileResult]) -> bool:
    """Copy ``speed.json``'s figures into the results of the same content (``extra["speed"]``); True when the speed
    of judged files was asked for (the gate then withholds a candidate without it)."""
    path = workdir / names.SPEED
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    measured = data.get("files") or {}
    for f in files:
        entry = measured.get(f.type)
        if isinstance(entry, Mapping) and entry.get("sha256") == f.sha256 and "error" not in entry:
            f.extra[SPEED_KEY] = {k: v for k, v in entry.items() if k != "sha256"}
        else:
            f.extra.pop(SPEED_KEY, None)
    return (data.get("options") or {}).get("scope") in ("all", "tuned")


class _Ctx(Protocol):
    """What the stage reads of the job's run state (``converters.ladder.job.JobContext``)."""

    workdir: Path
    toolchain: Toolchain | None
    hooks: Hooks
    ladder: Ladder | None

    def tool_timeout(self) -> float | None: ...


@dataclasses.dataclass(frozen=True)
class SpeedStage:
    """After quantize and tune, before evaluate: ``speed.json`` for the files of ``options.scope``."""

    options: SpeedOptions
    name: str = STAGE
    quiet: bool = False

    def run(self, ctx: _Ctx) -> None:
        wd = WorkDir(ctx.workdir)
        if ctx.toolchain is None or ctx.ladder is None:
            raise RuntimeError("speed runs after quantize")
        ladder = ctx.ladder
        out = wd.path / names.SPEED
        if self.options.scope == "off":
            out.unlink(missing_ok=True)
            return
        inputs = {"files": {f.type: f.sha256 for f in ladder.files}, "options": self.options.to_json(),
                  "toolchain": ctx.toolchain.version, "threads": self.options.threads or proc.cpus()}
        rec = records.complete(wd.path, STAGE, inputs)
        if rec is not None:
            ctx.hooks.emit(self.name, SKIP, data={"seconds": rec.seconds})
            return
        t0 = time.monotonic()
        figures = measure(wd.path, ladder, self.options, toolchain=ctx.toolchain, timeout=ctx.tool_timeout(),
                          step=lambda text, done, total: ctx.hooks.step(self.name, done, total, text))
        seconds = time.monotonic() - t0
        out.unlink(missing_ok=True)  # the whole ladder: nothing of an earlier run is kept
        save(wd.path, self.options, figures, seconds)
        rec = records.save(wd.path, STAGE, inputs, [out], seconds, ctx.toolchain.version,
                           extra={"measured": sorted(figures)})
        ctx.hooks.emit(self.name, END, data={"seconds": rec.seconds})
