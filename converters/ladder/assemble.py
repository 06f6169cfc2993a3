"""Building a planned layout: the tuned and memory-budget files (:mod:`converters.ladder.tune`,
:mod:`converters.ladder.fit`).

A tensor's quantized bytes depend only on its data, its type and its imatrix entry (llama-quantize quantizes row by
row with ``ggml_quantize_chunk``), so a planned file need not be quantized whole: ``ggufbot-assemble``
(:mod:`converters.llama.native`) writes what llama-quantize would write for the plan, copying each tensor that a
file of the same reference and imatrix (the ladder's stock files, the size points tuned before) already holds in its
planned type, and each row the error measurement quantized (:class:`converters.ladder.tensorerr.RowStore`), and
quantizing only the rest, with the same ggml function. ``tests/integration/test_tune_cheap.py`` checks the bytes
against llama-quantize's. Without a compiler: llama-quantize with the plan's ``--tensor-type-file``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.core import names, proc, records
from converters.core.errors import CheckFailed, ToolchainError, ToolError
from converters.core.proc import run
from converters.core.quants import QuantType
from converters.formats import gguf_meta
from converters.ladder import layout, tensorerr
from converters.llama import native as llama_native
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)


def read_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, read back with gguf-py (once per file version: the tuner and the fit stage ask
    for the stock files' types many times)."""
    return dict(_per_version("types", Path(path), tensorerr.tensor_types))


def build(layout_: layout.Layout, q: QuantType, reference: Path, workdir: Path, out: Path, *, toolchain: Toolchain,
          imatrix: Path | None, threads: int | None = None, timeout: float | None = None,
          type_file: Path | None = None, template: Path | None = None, files: Sequence[Path] = (),
          store: tensorerr.RowStore | None = None) -> Path:
    """Write the layout's file; check its types and size against the plan.

    With ``template`` (a file llama-quantize wrote from ``reference`` as ``q`` with ``imatrix``: the size point's
    stock file) and ggufbot's own programs built: ``ggufbot-assemble`` writes what llama-quantize would write for the
    layout, copying every tensor that the template or one of ``files`` (same reference and imatrix) holds in its
    planned type and quantizing only the rest (:func:`assemble`; the rows ``store`` holds in a tensor's planned type
    are copied too). Otherwise llama-quantize with the layout's
    ``--tensor-type-file`` (written to ``type_file``, default the size point's)."""
    tdir = workdir / names.TUNE_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    tmp = records.tmp_path_for(out)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = None
        if template is not None:
            try:
                program = llama_native.assemble_program(toolchain)
            except (ToolchainError, ToolError) as e:
                log.warning("tune: %s cannot be built (%s); building with llama-quantize", llama_native.ASSEMBLE, e)
        if program is not None and template is not None:
            counts = assemble(program, layout_.types, reference, template, files, tmp, imatrix=imatrix,
                              threads=threads, timeout=timeout, scratch=tdir / "scratch", store=store)
            log.info("%s: %d tensors copied, %d quantized (%d rows; %d rows copied from the measurements)", out.name,
                     counts["copied"], counts["quantized"], counts["rows_quantized"], counts["rows_reused"])
        else:
            tf = type_file or workdir / names.tensor_types(q.name)
            layout.write_tensor_type_file(tf, layout_.types)
            argv: list[Any] = [toolchain.program("llama-quantize")]
            if imatrix is not None:
                argv += ["--imatrix", os.path.relpath(imatrix, workdir)]
            argv += ["--tensor-type-file", os.path.abspath(tf), os.path.abspath(reference), os.path.abspath(tmp),
                     q.base_name, str(threads or proc.cpus())]
            run(argv, timeout=timeout, cwd=workdir)
        got = read_types(tmp)
        wrong = {n: (t, got.get(n)) for n, t in layout_.types.items() if got.get(n) != t}
        if wrong:
            raise CheckFailed("tune", f"{len(wrong)} tensor(s) not of the planned type, e.g. "
                              + ", ".join(f"{n}: {a} planned, {b} written" for n, (a, b) in list(wrong.items())[:3]))
        if tmp.stat().st_size > layout_.budget + 1024:
            raise CheckFailed("tune", f"{out.name} is {tmp.stat().st_size} bytes, over the budget of "
                              f"{layout_.budget + 1024}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def assemble(program: Path, types: Mapping[str, str], reference: Path, template: Path, files: Sequence[Path],
             out: Path, *, imatrix: Path | None, scratch: Path, threads: int | None = None,
             timeout: float | None = None, store: tensorerr.RowStore | None = None) -> dict[str, int]:
    """Write ``out`` with ``ggufbot-assemble``: the template's metadata and tensors, each tensor named in ``types``
    in that type (the others as in the template), copied from the first of the template and ``files`` that holds it
    in that type, else quantized from ``reference`` with its ``imatrix`` entry (the rows ``store`` holds in that type
    copied from it); returns how many tensors were copied and quantized, and the rows quantized and reused."""
    mark = _holder(template)[1]  # a file quantized with another imatrix (or none) holds other bytes
    holders = [template, *[f for f in files if f != template and _holder(f)[1] == mark]]
    held = [_holder(f)[0] for f in holders]
    imat = tensorerr.read_imatrix(imatrix)
    ref = {t.name: t for t in tensorerr.tensors(reference)}
    scratch.mkdir(parents=True, exist_ok=True)
    plan, wfile = scratch / "assemble-plan.txt", scratch / "assemble-weights.f32"
    lines, floats, reused = [], 0, 0
    with open(wfile, "wb") as wf:
        for name, tpl_type in held[0].items():
            want = types.get(name, tpl_type)
            source = next((k for k, h in enumerate(held) if h.get(name) == want), -1)
            imat_off = -1
            if source < 0:
                shape = [int(x) for x in ref[name].shape]
                im = imat.get(name)
                if im is not None and im.size == shape[0] * (int(np.prod(shape[2:])) if len(shape) > 2 else 1):
                    wf.write(np.ascontiguousarray(im, dtype="<f4").tobytes())
                    imat_off, floats = floats, floats + im.size
            line = f"{name} {want} {source} {imat_off}"
            done = store.get(name, want) if store is not None and source < 0 else None
            if done is not None:
                line += " {} {} {}".format(*done)
                reused += done[2]
            lines.append(line)
    plan.write_text("\n".join(lines) + "\n")
    try:
        rows = (store.bytes_path, store.rows_path) if store is not None else ("-", "-")
        res = run([program, reference, template, plan, wfile, out, str(threads or proc.cpus()), *rows, *holders],
                  timeout=timeout, keep_output=16_000_000)
    finally:
        plan.unlink(missing_ok=True)
        wfile.unlink(missing_ok=True)
    done = [line.split() for line in res.stdout.splitlines() if len(line.split()) == 4]
    return {"copied": sum(d[2] == "copied" for d in done), "quantized": sum(d[2] == "quantized" for d in done),
            "rows_quantized": sum(int(d[3]) for d in done), "rows_reused": reused}


_BY_VERSION: dict[tuple[Any, ...], Any] = {}
_BY_VERSION_LOCK = threading.Lock()


def _per_version(kind: str, path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, once per version of the file (:func:`converters.core.records.stat_key`: size, mtime, ctime,
    inode, device); the last 64 answers are kept."""
    key = (kind, str(path), *records.stat_key(path))
    with _BY_VERSION_LOCK:
        if key in _BY_VERSION:
            return _BY_VERSION[key]
    value = read(path)
    with _BY_VERSION_LOCK:
        _BY_VERSION[key] = value
        while len(_BY_VERSION) > 64:
            _BY_VERSION.pop(next(iter(_BY_VERSION)))
    return value


def _imatrix_keys(path: Path) -> dict[str, Any]:
    return {k: v for k, v in gguf_meta.read(path).values.items() if k.startswith("quantize.imatrix.")}


def _holder(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """A file's tensor types and its ``quantize.imatrix.*`` metadata, read once per file version (a build reads every
    stock file; each read parses the vocabulary's metadata)."""
    return read_types(path), _per_version("imatrix", path, _imatrix_keys)
