"""Stage calibrate: an importance matrix (imatrix) from calibration text with llama-imatrix.

Keeps the GGUF form (what llama-quantize reads) and also writes the legacy ``.dat`` form, which
ik_llama.cpp users need.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from converters.core import proc
from converters.core import names
from converters.formats import gguf_meta
from converters.core import records
from converters.core.errors import InputError, ToolError
from converters.core.hooks import NULL_HOOKS, PROGRESS, Event, Hooks
from converters.core.stages import StageOutcome
from converters.core.proc import run
from converters.llama import gpu
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)
STAGE = "calibrate"
LLAMA_BATCH = 2048  # llama-imatrix's default batch: longer chunks are decoded in pieces


@dataclasses.dataclass(frozen=True)
class TextFile:
    """A text used for calibration or evaluation, with where it came from."""

    path: Path
    name: str
    source: str  # the path, URL or hf:// spec the user gave
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path, source: str | None = None, name: str | None = None) -> "TextFile":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"text file not found: {path}")
        return cls(path=path, name=name or path.name, source=source or path.name,
                   sha256=records.sha256_file(path), bytes=path.stat().st_size)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "bytes": self.bytes}


def imatrix_names(model_name: str) -> tuple[str, str]:
    return names.imatrix(model_name)


@dataclasses.dataclass(frozen=True)
class CalibrateOptions:
    """How llama-imatrix runs: chunks of the text (None: all), context length, threads, extra arguments, timeout."""

    chunks: int | None = None
    ctx: int = 512
    threads: int | None = None
    extra_args: tuple[str, ...] = ()
    timeout: float | None = None


def calibrate(reference: Path, workdir: Path, model_name: str, text: TextFile, *, toolchain: Toolchain,
              options: CalibrateOptions = CalibrateOptions(), hooks: Hooks = NULL_HOOKS) -> StageOutcome:
    chunks, ctx, threads, extra_args, timeout = (options.chunks, options.ctx, options.threads, options.extra_args,
                                                 options.timeout)
    if ctx < 8:
        raise InputError(f"calibration context {ctx} is too small")
    if chunks is not None and chunks < 1:
        raise InputError(f"calibration chunks must be at least 1 (got {chunks})")
    # a token is at least one byte of text: fewer than 2*ctx bytes can never fill one chunk
    if text.bytes < 2 * ctx:
        raise InputError(f"calibration text {text.name} is too short: {text.bytes} bytes cannot make one chunk of {ctx} tokens")
    inputs = {"reference": records.content_sha256(reference, workdir),
              "text": text.sha256, "chunks": chunks, "ctx": ctx, "extra": list(extra_args),
              "toolchain": toolchain.version}
    done = records.complete(workdir, STAGE, inputs)
    if done is not None:
        log.info("calibrate: imatrix already computed, skipped")
        return StageOutcome(STAGE, done, skipped=True)
    gguf_name, dat_name = imatrix_names(model_name)
    final_gguf, final_dat = workdir / gguf_name, workdir / dat_name
    started = time.monotonic()
    threads = threads or proc.cpus()
    log.info("calibrate: llama-imatrix on %s (%s chunks of %d)", text.name, chunks or "all", ctx)
    with records.atomic_output(final_gguf) as tmp:
        # run from the text's folder with its bare name: llama-imatrix records the name as the dataset, and
        # published files must say "groups_merged.txt", not a path of this machine
        argv = [toolchain.program("llama-imatrix"), "-m", reference.resolve(), "-f", text.path.name, "-o", tmp.resolve(),
                "--output-format", "gguf", "-c", str(ctx), "-t", str(threads), "-ofreq", "1000000", *extra_args,
                *gpu.offload_args(toolchain, reference)]  # a CUDA toolchain: the layers that fit on the GPU
        if ctx > LLAMA_BATCH:  # its perplexity would keep every logit of a chunk: keep the memory, lose the counter
            argv.append("--no-ppl")
        if chunks is not None:
            argv += ["--chunks", str(chunks)]
        try:
            res = run(argv, timeout=timeout, on_line=ImatrixProgress(hooks), cwd=text.path.absolute().parent)
        except ToolError as e:
            m = re.search(r"tokenizes to only (\d+) tokens", e.stderr_tail)
            if m:
                raise InputError(f"calibration text {text.name} is too short: {m.group(1)} tokens, one chunk of "
                                 f"{ctx} needs {2 * ctx}") from e
            if why := _non_finite(e, reference):
                raise InputError(why) from e
            raise
    n_chunks = _computed_chunks(res.stderr + res.stdout)
    with records.atomic_output(final_dat) as tmp:
        run([toolchain.program("llama-imatrix"), "-m", reference, "--in-file", final_gguf, "--output-format", "dat",
             "-o", tmp],
            timeout=timeout)
    seconds = time.monotonic() - started
    rec = records.save(workdir, STAGE, inputs, [final_gguf, final_dat], seconds, toolchain.version,
                       extra={"text": text.describe(), "chunks_requested": chunks, "chunks": n_chunks, "ctx": ctx})
    log.info("calibrate: done in %.1f s (%s chunks)", seconds, n_chunks)
    return StageOutcome(STAGE, rec, skipped=False)


def _non_finite(error: ToolError, reference: Path) -> str | None:
    """Why llama-imatrix failed, when non-finite numbers are the cause: None when they are not.

    It prints ``non-finite values detected in <tensor>`` and exits at once, and its logger (a thread of its own)
    can lose that line. So the reference's tensor data is scanned for NaN/inf (only here, after a failure): bad
    weights are named; with finite weights, the printed line means the activations overflowed."""
    if error.timed_out or error.returncode != 1:
        return None
    try:
        bad = gguf_meta.non_finite_tensors(reference)
    except InputError:
        bad = []
    if bad:
        shown = ", ".join(f"{name} ({n} values)" for name, n in bad[:3])
        if len(bad) > 3:
            shown += f" and {len(bad) - 3} more"
        return f"the model's tensor data is non-finite (NaN/inf) in {len(bad)} tensor(s): {shown}"
    if m := re.search(r"non-finite values detected in (\S+)", error.stderr_tail):
        return (f"llama-imatrix found non-finite activations in {m.group(1)}: the weights are finite, the model "
                "overflows on the calibration text")
    return None


def _computed_chunks(output: str) -> int | None:
    m = re.search(r"computing over (\d+) chunks", output)
    return int(m.group(1)) if m else None


class ImatrixProgress:
    """``llama-imatrix``'s output as progress events: ``chunk i/n`` with an ETA from the time the chunks so far took.

    The pinned program prints ``computing over 222 chunks, n_ctx=512, batch_size=2048, n_seq=4`` once, then, per
    pass of ``n_seq`` chunks, the running perplexity of each chunk as ``[1]12.3456,[2]11.2345,`` (flushed, no newline
    until the end; :func:`converters.core.proc.run` passes such pieces on). Without a perplexity (``--no-ppl``) only
    the first pass's ``2.07 seconds per pass - ETA`` is there to count."""

    def __init__(self, hooks: Hooks, clock: Callable[[], float] = time.monotonic) -> None:
        self.hooks, self.clock = hooks, clock
        self.total = self.per_pass = self.shown = 0
        self.started = 0.0

    def __call__(self, line: str) -> None:
        if m := re.search(r"computing over (\d+) chunks,.* n_seq=(\d+)", line):
            self.total, self.per_pass, self.started = int(m.group(1)), max(1, int(m.group(2))), self.clock()
            self._event(0, None)
        elif not self.total:
            return
        elif done := [int(i) for i in re.findall(r"\[(\d+)\][-+\w.]*,", line)]:
            done_now = max(done)
            elapsed = self.clock() - self.started
            self._event(done_now, elapsed / done_now * (self.total - done_now))
        elif m := re.search(r"([\d.]+) seconds per pass", line):  # after the first pass, the counter or not
            passes = -(-self.total // self.per_pass)
            self._event(min(self.per_pass, self.total), float(m.group(1)) * (passes - 1))

    def _event(self, done: int, eta: float | None) -> None:
        if done and done <= self.shown:
            return  # a pass's counter after its "seconds per pass" line: nothing new
        self.shown = done
        self.hooks.progress(Event(STAGE, PROGRESS, done=done, total=self.total, text="chunk",
                                  data={"eta_seconds": None if eta is None else round(eta, 1)}))
