"""Stage convert: a local HF checkpoint -> reference GGUF (BF16 by default, F16/F32 selectable)."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

from converters.core import names
from converters.core import records
from converters.formats.checkpoint import Checkpoint
from converters.core.errors import ToolError, UnsupportedModel
from converters.core.hooks import NULL_HOOKS, Hooks
from converters.core.stages import StageOutcome, check_disk
from converters.core.proc import run
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

OUTTYPES = {"bf16": 2, "f16": 2, "f32": 4}
STAGE = "convert"


def reference_name(model_name: str, outtype: str) -> str:
    return names.reference(model_name, outtype)


def convert(ckpt: Checkpoint, workdir: Path, model_name: str, *, toolchain: Toolchain, outtype: str = "bf16",
            timeout: float | None = None, hooks: Hooks = NULL_HOOKS) -> StageOutcome:
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise UnsupportedModel(f"unknown reference type {outtype!r}; use one of {', '.join(OUTTYPES)}")
    inputs = {"checkpoint": ckpt.fingerprint(workdir), "outtype": outtype, "toolchain": toolchain.version}
    done = records.complete(workdir, STAGE, inputs)
    if done is not None:
        log.info("convert: %s already done, skipped", done.outputs[0].path)
        return StageOutcome(STAGE, done, skipped=True)
    final = workdir / reference_name(model_name, outtype)
    check_disk(workdir, ckpt.parameters * OUTTYPES[outtype])
    started = time.monotonic()
    log.info("convert: %s -> %s", ckpt.path, final.name)
    with records.atomic_output(final) as tmp:
        argv = [sys.executable, str(toolchain.converter), str(ckpt.path), "--outtype", outtype, "--outfile", str(tmp)]
        try:
            run(argv, timeout=timeout, env=toolchain.python_env(), on_line=hooks.tool_lines(STAGE))
        except ToolError as e:
            reason = converter_reason(e.stderr_tail)
            if reason:
                raise UnsupportedModel(reason) from e
            raise
    seconds = time.monotonic() - started
    rec = records.save(workdir, STAGE, inputs, [final], seconds, toolchain.version,
                       extra={"outtype": outtype, "architecture": ckpt.architecture})
    log.info("convert: done in %.1f s (%d bytes)", seconds, final.stat().st_size)
    return StageOutcome(STAGE, rec, skipped=False)


_REASONS = (
    (re.compile(r"Architecture '?([\w.]+)'? not supported"), "architecture {0} is not supported by the converter"),
    (re.compile(r"BPE pre-tokenizer was not recognized"), "the tokenizer's pre-tokenizer is not known to the converter"),
    (re.compile(r"Model ([\w.]+) is not supported"), "model {0} is not supported by the converter"),
)


def converter_reason(stderr: str) -> str | None:
    """The one-line reason of a converter failure that means the model is not supported, or None."""
    for pat, msg in _REASONS:
        m = pat.search(stderr)
        if m:
            return msg.format(*m.groups())
    return None
