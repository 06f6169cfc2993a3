"""Vision-language models: the multimodal projector (``mmproj``) converted and checked beside the text ladder.

A checkpoint with a vision tower (``vision_config`` in config.json) whose architecture the pinned converter
exports with ``--mmproj`` (:func:`converters.formats.checkpoint.supported_projectors`) gets its projector converted once,
during the convert stage: ``mmproj-<Model>-F16.gguf`` and ``mmproj-<Model>-Q8_0.gguf`` (the converter's own
``--outtype q8_0``; when it cannot write Q8_0 for this model, F16 alone, with the reason in the stage record).
The text ladder is made as for any model. ``ladder.json`` lists the files under ``projectors``.

The evaluation loads each projector with the pinned ``llama-mtmd-cli``, a text model of the ladder and a generated
test image (:func:`test_png`), and requires the image embeddings it computes to be finite and not all equal
(:func:`projector_check`: the ``projector`` check of ``report.json``). ``llama-mtmd-cli`` writes the embeddings
to the file named by ``MTMD_DEBUG_EMBEDDINGS`` (``[int32 n_tokens][int32 n_embd][float32 ...]``, tools/mtmd/clip.cpp).
"""

from __future__ import annotations

import logging
import math
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.core import artifacts, names
from converters.core import records
from converters.formats.checkpoint import Checkpoint
from converters.core.errors import ToolError, UnsupportedModel
from converters.core.hooks import NULL_HOOKS, Hooks
from converters.core.report import Check
from converters.core.stages import StageOutcome
from converters.core.proc import run
from converters.llama.convert import converter_reason
from converters.llama.toolchain import Toolchain
from converters.llama.verify import tool_error_reason
from converters.core.workdir import ProjectorFile

log = logging.getLogger(__name__)

STAGE = "projector"  # the stage record's name (records/projector.json); the work runs in the convert stage
CHECK = artifacts.PROJECTOR_CHECK  # the report.json check (the artifact catalogue gates publishing on it)
TYPES = ("F16", "Q8_0")  # F16 always; Q8_0 where the converter writes it for this model
CHECK_TIMEOUT = 900
CHECK_PROMPT = "Describe this image."
CHECK_N_PREDICT = 8
IMAGE_SIZE = (96, 64)  # width, height of the test image: not square, so the image is resized and padded


def projector_name(model_name: str, qtype: str) -> str:
    return names.projector(model_name, qtype)


# --------------------------------------------------------------------------------------------------
# Convert
# --------------------------------------------------------------------------------------------------
def convert_projector(ckpt: Checkpoint, workdir: Path, model_name: str, *, toolchain: Toolchain,
                      timeout: float | None = None, hooks: Hooks = NULL_HOOKS, stage: str = "convert") -> StageOutcome:
    """Convert the projector of a vision-language checkpoint (F16, then Q8_0); skipped when its record matches.
    UnsupportedModel when the converter cannot export this vision tower; ``stage``: where its output lines go."""
    inputs = {"checkpoint": ckpt.fingerprint(workdir), "types": list(TYPES), "toolchain": toolchain.version}
    done = records.complete(workdir, STAGE, inputs)
    if done is not None:
        log.info("projector: %s already converted, skipped", ", ".join(o.path for o in done.outputs))
        return StageOutcome(STAGE, done, skipped=True)
    started = time.monotonic()
    outputs: list[Path] = []
    refused: dict[str, str] = {}
    for qtype in TYPES:
        final = workdir / projector_name(model_name, qtype)
        log.info("projector: %s -> %s", ckpt.path, final.name)
        try:
            with records.atomic_output(final) as tmp:
                argv = [sys.executable, str(toolchain.converter), str(ckpt.path), "--mmproj", "--outtype",
                        qtype.lower(), "--outfile", str(tmp)]
                run(argv, timeout=timeout, env=toolchain.python_env(), on_line=hooks.tool_lines(stage))
        except ToolError as e:
            if qtype == TYPES[0]:
                reason = converter_reason(e.stderr_tail)
                if reason:
                    raise UnsupportedModel(f"vision projector: {reason}") from e
                raise
            refused[qtype] = _last_line(e)  # the F16 projector is enough to publish
            log.warning("projector: no %s projector: %s", qtype, refused[qtype])
            continue
        outputs.append(final)
    seconds = time.monotonic() - started
    rec = records.save(workdir, STAGE, inputs, outputs, seconds, toolchain.version,
                       extra={"architecture": ckpt.architecture, "types": [p.name for p in outputs],
                              "refused": refused})
    log.info("projector: done in %.1f s (%s)", seconds, ", ".join(p.name for p in outputs))
    return StageOutcome(STAGE, rec, skipped=False)


def _last_line(e: ToolError) -> str:
    lines = [ln.strip() for ln in e.stderr_tail.splitlines() if ln.strip()]
    return (lines[-1] if lines else e.short())[:300]


def projector_files(rec: records.StageRecord | None) -> tuple[ProjectorFile, ...]:
    """The ``ladder.json`` entries of a projector stage record (none for a text-only model)."""
    if rec is None:
        return ()
    out = []
    for o in rec.outputs:
        qtype = Path(o.path).name.removesuffix(".gguf").rsplit("-", 1)[-1]
        out.append(ProjectorFile(type=qtype, path=o.path, size=o.size, sha256=o.sha256))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------------------
def test_png(width: int = IMAGE_SIZE[0], height: int = IMAGE_SIZE[1]) -> bytes:
    """A small RGB PNG (colour gradients with a diagonal stripe), written by hand: no image library needed."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type: none
        for x in range(width):
            stripe = 255 if abs(x - y) < 4 else 0
            row += bytes((x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), stripe))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
            + chunk(b"IEND", b""))


def load_embeddings(path: Path) -> Any:
    """The ``n_tokens x n_embd`` array of an ``MTMD_DEBUG_EMBEDDINGS`` dump (float64); ValueError when malformed."""
    import numpy as np

    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError("the embeddings file is too short")
    n_tokens, n_embd = struct.unpack("<ii", data[:8])
    if n_tokens <= 0 or n_embd <= 0 or len(data) != 8 + 4 * n_tokens * n_embd:
        raise ValueError(f"the embeddings file does not hold {n_tokens} x {n_embd} floats")
    return np.frombuffer(data, dtype="<f4", offset=8).astype(np.float64).reshape(n_tokens, n_embd)


def read_embeddings(path: Path) -> dict[str, Any]:
    """Shape and statistics of an ``MTMD_DEBUG_EMBEDDINGS`` dump; ``non_finite``: how many values are NaN/inf."""
    return embedding_stats(load_embeddings(path))


def embedding_stats(emb: Any) -> dict[str, Any]:
    import numpy as np

    n_tokens, n_embd = emb.shape
    values = emb.reshape(-1)
    finite = values[np.isfinite(values)]
    stats = {"n_tokens": n_tokens, "n_embd": n_embd, "non_finite": int(values.size - finite.size)}
    if finite.size:
        stats.update(mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()),
                     max=float(finite.max()))
    return stats


def check_one(tc: Toolchain, text_model: Path, projector: Path, image: Path, scratch: Path, *,
              threads: int | None = None) -> dict[str, Any]:
    """Load ``projector`` with ``text_model`` in ``llama-mtmd-cli``, describe ``image``; the result as a dict:
    ``status`` passed/failed, ``detail``, the embeddings' shape and statistics, the seconds."""
    dump = scratch / f"{projector.name}.embd"
    dump.unlink(missing_ok=True)
    argv: list[Any] = [tc.program("llama-mtmd-cli"), "-m", text_model, "--mmproj", projector, "--image", image,
                       "-p", CHECK_PROMPT, "-n", str(CHECK_N_PREDICT), "--temp", "0", "--seed", "1", "-c", "2048"]
    if threads:
        argv += ["-t", str(threads)]
    out: dict[str, Any] = {"path": projector.name, "text_model": text_model.name}
    t0 = time.monotonic()
    try:
        res = run(argv, timeout=CHECK_TIMEOUT, env={"MTMD_DEBUG_EMBEDDINGS": str(dump)}, keep_output=200_000)
    except ToolError as e:
        out.update(status="failed", detail=f"llama-mtmd-cli cannot use it: {tool_error_reason(e)}",
                   seconds=round(time.monotonic() - t0, 3))
        return out
    out["seconds"] = round(res.seconds, 3)
    out["output"] = res.stdout.strip()[-200:]
    try:
        emb = load_embeddings(dump)
    except (OSError, ValueError) as e:
        out.update(status="failed", detail=f"llama-mtmd-cli wrote no image embeddings to check ({e})")
        return out
    finally:
        dump.unlink(missing_ok=True)
    stats = embedding_stats(emb)
    out.update(stats, _embeddings=emb)
    if stats["non_finite"]:
        out.update(status="failed", detail=f"{stats['non_finite']} of {stats['n_tokens'] * stats['n_embd']} image "
                                           "embedding values are not finite")
    elif not all(math.isfinite(out.get(k, math.nan)) for k in ("mean", "std")):
        out.update(status="failed", detail="the image embeddings' statistics are not finite")
    elif out["std"] == 0.0:  # a broken projector (or weights never trained): the image makes no difference
        out.update(status="failed", detail=f"all {stats['n_tokens'] * stats['n_embd']} image embedding values are "
                                           f"the same ({out['mean']:.4g})")
    else:
        out.update(status="passed", detail=f"{stats['n_tokens']} image tokens x {stats['n_embd']}, all finite "
                                           f"(mean {stats['mean']:.4g}, std {stats['std']:.4g})")
    return out


def _compare_with_first(results: list[dict[str, Any]]) -> None:
    """``rel_rms_diff`` of every projector after the first (F16): the RMS of its embeddings' difference from the
    first's, over the RMS of the first's, on the same image and text model. Drops the arrays from the results."""
    import numpy as np

    arrays = [r.pop("_embeddings", None) for r in results]
    ref = arrays[0] if arrays else None
    if ref is None or not np.isfinite(ref).all():
        return
    scale = float(np.sqrt(np.mean(ref ** 2)))
    for r, emb in zip(results[1:], arrays[1:]):
        if emb is not None and emb.shape == ref.shape and np.isfinite(emb).all() and scale > 0:
            r["rel_rms_diff"] = float(np.sqrt(np.mean((emb - ref) ** 2))) / scale
            r["compared_with"] = results[0]["path"]


def projector_check(tc: Toolchain, text_model: Path, projectors: Sequence[Path], scratch: Path, *,
                    threads: int | None = None) -> Check:
    """The ``projector`` check: every projector file loads with ``text_model`` and turns a generated test image
    into finite embeddings. ``data["files"]`` holds each file's result."""
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        image = Path(d) / "test-image.png"
        image.write_bytes(test_png())
        results = [check_one(tc, text_model, p, image, Path(d), threads=threads) for p in projectors]
    _compare_with_first(results)
    failed = [r for r in results if r["status"] != "passed"]
    w, h = IMAGE_SIZE
    data = {"files": results, "text_model": text_model.name, "image": f"generated {w}x{h} PNG"}
    why = "; ".join(f"{r['path']}: {r['detail']}" for r in failed)
    if not results or results[0]["status"] != "passed":  # the F16 projector must work; a failed Q8_0 is withheld
        return Check.fail(why or "no projector file", **data)
    first = results[0]
    diffs = "".join(f"; {r['path']} differs from {r['compared_with']} by {100 * r['rel_rms_diff']:.2f} % (relative "
                    "RMS)" for r in results if "rel_rms_diff" in r)
    withheld = f"; withheld: {why}" if failed else ""
    ok = len(results) - len(failed)
    return Check.ok(f"{ok} projector file(s) load in llama-mtmd-cli with {text_model.name}; a {w}x{h} test image "
                    f"gives {first['n_tokens']} finite embeddings of {first['n_embd']}{diffs}{withheld}", **data)
