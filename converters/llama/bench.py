"""llama-bench: prompt-processing and generation speed of one GGUF file (argv, run, output parser).

One run is ``llama-bench -m FILE -p PROMPT -n GENERATE -r REPETITIONS -t THREADS -o json``: two tests, ``ppPROMPT``
(a batch of PROMPT tokens: prompt processing) and ``tgGENERATE`` (GENERATE tokens one at a time: generation), each
repeated REPETITIONS times in the same process (llama-bench also runs one warm-up of each, not counted). Its
standard output is a JSON array, one object per test, with the per-repetition throughputs (``samples_ts``,
tokens/s), the build, the backend and the device names; it is parsed once here into :class:`BenchRun` (unknown
fields are ignored). What runs the file is recorded as :attr:`BenchRun.device`: the GPU names when llama-bench
reports any, else the CPU's (``cpu_info``), with the backend (``CPU``, ``CUDA``...).

The comparison of two files on a noisy machine (interleaved runs) is :mod:`converters.ladder.speed`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.core import proc
from converters.core.errors import ParseError
from converters.llama.toolchain import Toolchain

PROGRAM = "llama-bench"


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Tokens per second of one test over its repetitions (``samples``), mean and standard error of the mean."""

    samples: tuple[float, ...]

    @property
    def mean(self) -> float:
        return math.fsum(self.samples) / len(self.samples)

    @property
    def err(self) -> float:
        n = len(self.samples)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(math.fsum((x - m) ** 2 for x in self.samples) / (n - 1) / n)

    def merged(self, other: "Throughput") -> "Throughput":
        return Throughput(self.samples + other.samples)

    def to_json(self) -> dict[str, Any]:
        return {"tokens_per_s": round(self.mean, 3), "err": round(self.err, 3), "runs": len(self.samples)}


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """One llama-bench run of one file."""

    prompt: int  # tokens of the prompt-processing test
    generate: int  # tokens of the generation test
    pp: Throughput
    tg: Throughput
    threads: int
    backend: str  # llama-bench's "backends", e.g. "CPU" or "CUDA"
    device: str  # the GPU names, or the CPU's
    build: str  # build commit / number llama-bench reports
    seconds: float = 0.0


def argv(tc: Toolchain, model: Path, *, prompt: int, generate: int, repetitions: int,
         n_threads: int | None = None) -> list[str]:
    return [str(tc.program(PROGRAM)), "-m", str(model), "-p", str(prompt), "-n", str(generate),
            "-r", str(repetitions), "-t", str(n_threads or proc.cpus()), "-o", "json"]


def parse(text: str) -> BenchRun:
    """llama-bench's ``-o json`` output (its standard output): the ``pp`` and ``tg`` tests of one file."""
    start = text.find("[")
    try:
        rows = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as e:
        raise ParseError(f"llama-bench printed no JSON array: {e}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ParseError("llama-bench printed no test results")
    pp = [r for r in rows if int(r.get("n_prompt") or 0) > 0 and int(r.get("n_gen") or 0) == 0]
    tg = [r for r in rows if int(r.get("n_gen") or 0) > 0 and int(r.get("n_prompt") or 0) == 0]
    if len(pp) != 1 or len(tg) != 1:
        raise ParseError(f"llama-bench printed {len(pp)} prompt and {len(tg)} generation tests, expected one each")
    return BenchRun(prompt=int(pp[0]["n_prompt"]), generate=int(tg[0]["n_gen"]), pp=_throughput(pp[0]),
                    tg=_throughput(tg[0]), threads=int(pp[0].get("n_threads") or 0),
                    backend=str(pp[0].get("backends") or pp[0].get("backend") or ""), device=_device(pp[0]),
                    build=str(pp[0].get("build_commit") or ""))


def _throughput(row: dict[str, Any]) -> Throughput:
    samples = row.get("samples_ts")
    if not isinstance(samples, Sequence) or not samples:
        avg = row.get("avg_ts")
        if avg is None:
            raise ParseError("llama-bench result without samples_ts or avg_ts")
        samples = [avg]
    values = tuple(float(x) for x in samples)
    if not all(math.isfinite(x) and x > 0 for x in values):
        raise ParseError(f"llama-bench reported throughputs that are not positive numbers: {values}")
    return Throughput(values)


def _device(row: dict[str, Any]) -> str:
    gpu = str(row.get("gpu_info") or "").strip()
    cpu = str(row.get("cpu_info") or "").strip()
    backend = str(row.get("backends") or "").strip()
    name = gpu or cpu or "unknown device"
    return f"{name} ({backend})" if backend else name


def run(tc: Toolchain, model: Path, *, prompt: int = 512, generate: int = 128, repetitions: int = 3,
        n_threads: int | None = None, timeout: float | None = None) -> BenchRun:
    """One llama-bench run of ``model`` through :func:`converters.core.proc.run` (the stage's limits apply)."""
    res = proc.run(argv(tc, model, prompt=prompt, generate=generate, repetitions=repetitions, n_threads=n_threads),
                   timeout=timeout, cwd=model.parent)
    out = parse(res.stdout)
    return dataclasses.replace(out, seconds=res.seconds)
