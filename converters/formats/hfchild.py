"""transformers on an untrusted checkpoint, in a limited child process, never in the bot's own.

A checkpoint's tokenizer and model are untrusted input: loading them runs transformers' and the tokenizer library's
parsers on files anyone can publish (a tokenizer that allocates or loops without end, a config that makes
transformers build a gigantic model). As :mod:`converters.formats.chat` does for templates, that work runs in a child
(``python -I -m converters.formats.hfchild``, started by :func:`converters.core.proc.run`: no secrets in its
environment, its own process group, dies with the bot) with CPU-time, memory and wall-clock limits, offline
(``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: nothing it does can fetch code or files), answering one JSON
request on stdin with one JSON answer on stdout.

This module is only the process: what the child does is named by its caller. :func:`call` takes the request and the
**entry**, a module-level function of a ``converters`` module that takes the request and returns the JSON answer;
the child imports that module by name and calls the function. The callers:

- the tokenizer service (:func:`converters.formats.hfmodel.load_tokenizer`: entry
  :func:`converters.formats.hfmodel.tokenizer_here`), which loads a checkpoint's tokenizer once and answers a batch
  of queries;
- the BF16 reference against the source model (:func:`converters.ladder.evaluate.compare_with_source`: entry
  :func:`converters.ladder.evaluate.compare_here`).

So this module, in the formats layer, names no module above it; an entry is given as the function itself, by the
code that calls (never taken from data), and the child runs only a function of a module of the ``converters``
package (:data:`ENTRY_PACKAGE`) that was defined there, not one imported into it.

The memory limit is ``RLIMIT_DATA`` (:class:`ChildLimits`), not ``RLIMIT_AS``: torch reserves address space it
never uses (a thread's malloc arena and stack, CUDA's reservation; the address space of a process that imported
torch grows from 0.8 to 2.7 GB with 64 threads while its resident memory stays at 230 MB), and transformers maps
the safetensors files read-only, which counts against the address space but is not memory the process allocates.
``RLIMIT_DATA`` counts the private writable memory (heap, anonymous maps: tensors, numpy arrays, Python objects),
which is what a runaway load or run uses: an allocation beyond it fails (``MemoryError``, torch's "can't allocate
memory") instead of the kernel's OOM killer choosing a process of the machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from converters.core.errors import InputError, ToolError
from converters.core.proc import ResourceLimits, run

MODULE = "converters.formats.hfchild"
# Every child that runs transformers or huggingface_hub code: no download of code or files, whatever it reads
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1"}
MAX_ANSWER_BYTES = 256 << 20  # a vocabulary of a few hundred thousand tokens is a few MB of JSON
ENTRY_PACKAGE = "converters."  # the child runs functions of this package's modules only

Entry = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ChildLimits(ResourceLimits):
    """:class:`~converters.core.proc.ResourceLimits` (CPU time, written-file bytes: set by the program's supervisor
    before it starts) plus ``data_bytes`` (``RLIMIT_DATA``, see the module notes), which the child sets on itself
    first thing, before it reads the request's files or imports transformers or torch."""

    data_bytes: int | None = None


class ChildFailed(Exception):
    """The child stopped without an answer: a limit (``kind``: time, cpu, memory) or a crash."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def entry_name(entry: Entry) -> str:
    """``module:function``, the name the child imports ``entry`` by: a function defined at the top level of a
    ``converters`` module (ValueError otherwise)."""
    module, name = getattr(entry, "__module__", "") or "", getattr(entry, "__qualname__", "") or ""
    if not module.startswith(ENTRY_PACKAGE) or not name.isidentifier():
        raise ValueError(f"not a child entry (a top-level function of a converters module): {entry!r}")
    return f"{module}:{name}"


def call(request: Mapping[str, Any], *, entry: Entry, limits: ChildLimits, timeout: float,
         cwd: Path | None = None) -> dict[str, Any]:
    """One request to a new child, which answers it with ``entry(request)``; its JSON answer (an ``error`` key when
    the work itself failed). Raises :class:`ChildFailed` when the child hit a limit or died."""
    argv = [sys.executable, "-I", "-m", MODULE]
    request = {**request, "entry": entry_name(entry), "data_bytes": limits.data_bytes}
    try:
        res = run(argv, stdin=json.dumps(request).encode(), timeout=timeout, limits=limits, env=OFFLINE_ENV,
                  keep_output=MAX_ANSWER_BYTES, cwd=cwd)
    except ToolError as e:
        raise _failure(e, limits, timeout) from None
    try:
        answer = json.loads(res.stdout)
    except ValueError:
        raise ChildFailed("crash", f"the child's answer was not readable: {res.stdout[-200:]!r}") from None
    if not isinstance(answer, dict):
        raise ChildFailed("crash", "the child's answer was not a JSON object")
    if answer.get("error") == "memory":  # a MemoryError the child caught: its limit, like one that killed it
        raise ChildFailed("memory", f"it needed more than {(limits.data_bytes or 0) >> 20} MB")
    return answer


def _failure(e: ToolError, limits: ChildLimits, timeout: float) -> ChildFailed:
    if e.timed_out:
        return ChildFailed("time", f"it took longer than {timeout:.0f} s")
    if e.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and limits.cpu_seconds is not None:
        return ChildFailed("cpu", f"it used more than {limits.cpu_seconds} s of CPU time")
    tail = e.stderr_tail.strip().splitlines()
    if any("MemoryError" in ln or "can't allocate memory" in ln or "bad_alloc" in ln for ln in tail):
        return ChildFailed("memory", f"it needed more than {(limits.data_bytes or 0) >> 20} MB")
    return ChildFailed("crash", f"it died ({e.short()})")


def offline() -> bool:
    """In a child: whether huggingface_hub, as transformers imported it here, refuses to reach the network. Read
    from the module transformers loaded (``sys.modules``), never imported here (only ``bot/hub`` imports
    huggingface_hub); False when it was not loaded, as nothing proves it offline then."""
    constants = sys.modules.get("huggingface_hub.constants")
    return constants is not None and bool(getattr(constants, "HF_HUB_OFFLINE", False))


# --------------------------------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------------------------------


def _resolve(name: str) -> Entry:
    """The entry function ``module:function`` names: a function defined in a ``converters`` module."""
    module, _, func = name.partition(":")
    if not module.startswith(ENTRY_PACKAGE) or not func.isidentifier():
        raise LookupError(f"not a child entry: {name!r}")
    fn = getattr(importlib.import_module(module), func, None)
    if not callable(fn) or getattr(fn, "__module__", None) != module:
        raise LookupError(f"not a child entry: {name!r}")
    return fn


def _child() -> None:
    """``python -m converters.formats.hfchild``: one request on stdin, one JSON answer on stdout. Whatever a library
    prints goes to stderr (file descriptor 1 is the answer's alone)."""
    os.environ.update(OFFLINE_ENV)  # before transformers or huggingface_hub is imported
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.buffer.read())
    if request.get("data_bytes") is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (int(request["data_bytes"]), int(request["data_bytes"])))
    try:
        try:
            entry = _resolve(str(request.get("entry") or ""))
        except (LookupError, ImportError) as e:
            answer = {"error": "request", "message": f"unknown request: {e}"}
        else:
            answer = entry(request)
    except InputError as e:
        answer = {"error": "input", "message": str(e)}
    except MemoryError:
        answer = {"error": "memory", "message": "out of memory (the child's memory limit)"}
    with os.fdopen(answer_fd, "w", encoding="utf-8") as out:
        json.dump(answer, out)


if __name__ == "__main__":
    _child()
