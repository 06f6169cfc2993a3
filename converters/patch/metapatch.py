"""Metadata patch: the published GGUFs written again with new tokenizer and chat-template metadata, their tensor
data copied byte for byte.

When an upstream revision changes only the chat template, the special tokens, the generation config or the
tokenizer files, the quants do not need to be made again: the pinned converter's ``--vocab-only`` mode turns
the new revision's config and tokenizer files into the ``tokenizer.*`` keys (:func:`vocab_only`), and
:func:`rewrite` writes each file again with gguf-py's ``GGUFWriter``: every other key and every tensor info as
they were, the ``tokenizer.*`` keys of the vocab-only file instead of the old ones, then the old file's tensor
data section copied unchanged. The sha256 of the tensor data (the bytes after the header) is taken of both
files and must be equal: that is what the report shows as proof that the weights did not change. The later
parts of a split file carry no metadata of their own (``llama-gguf-split`` writes the keys into part 1 only):
they are kept as they are, so a split file stays split.

A patch is refused (:class:`~converters.core.errors.PatchRefused`, the job then runs in full) when the token list
changes length, the vocabulary size changes, or an architecture key of the vocab-only file differs from the
published file's (:func:`refusal`).

Before any program reads the new revision's files, they pass the checks a full job's ``inspect`` stage runs
(:func:`inspect_files`: ``checkpoint.inspect`` -- remote code in ``config.json`` or ``tokenizer_config.json``,
the architecture and vision tower against the pinned converter, absurd config sizes, a tokenizer -- and the
chat-template refusal): the converter's ``--vocab-only`` loads the tokenizer with ``trust_remote_code=True`` for
several architectures, so a revision that only adds an ``auto_map`` to ``tokenizer_config.json`` must be refused
as it is for a full job.

The stages (``inspect``, ``vocab``, ``patch``, ``recheck``) work on the published files and the earlier
``ladder.json`` and ``report.json`` the bot put in ``<workdir>/published`` (``ctx.get(PATCH_INPUT)``, a
:class:`PatchInput`), and leave a work directory that publishes like any other: the patched files, ``ladder.json``
and ``report.json`` (KLD figures kept, the cheap checks run again, a ``weights_unchanged`` check with the
tensor-data hashes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core import names
from converters.formats import chat
from converters.formats import gguf_meta
from converters.ladder import evaluate
from converters.core import records
from converters.llama import verify
from converters.formats import checkpoint as checkpoint_mod
from converters.core.errors import CheckFailed, InputError, PatchRefused, ToolError, UnsupportedModel
from converters.core.hooks import END, SKIP
from converters.core.report import FAILED, PASSED, Check, FileResult, Report
from converters.core.proc import run
from converters.llama.toolchain import Toolchain
from converters.core.stages import Stage, StateKey
from converters.core.workdir import Ladder, WorkDir
from converters.ladder.job import JobContext

log = logging.getLogger(__name__)

TOKENIZER = gguf_meta.TOKENIZER_NAMESPACE
TOKENS = gguf_meta.K.Tokenizer.LIST
VOCAB_FILE = names.VOCAB
BASE_DIR = names.PUBLISHED_DIR  # the earlier publication's files, ladder.json and report.json
INSPECT_STAGE = "inspect"
INSPECT_VIEW = "inspect-view"  # the new revision's files and a stand-in for the unchanged weights, while inspected
WEIGHTS_STAND_IN = "weights-unchanged.safetensors"  # a valid safetensors file without tensors
VOCAB_STAGE = "vocab"
PATCH_STAGE = "patch"
CHECK_STAGE = "recheck"


@dataclasses.dataclass(frozen=True)
class PatchInput:
    """What the bot hands the file stages: where the earlier publication is, and what changed upstream."""

    base_dir: Path  # published files, their ladder.json and report.json
    revision: str  # the new upstream revision
    base_revision: str  # the revision the published files were made from
    changed_files: tuple[str, ...]
    what: tuple[str, ...]  # "chat template", "special tokens", ... (for the card's what's-new line)


# What the patch stages hand to later ones (converters.core.stages.StateKey)
PATCH_INPUT: StateKey[PatchInput] = StateKey("patch")  # the bot's patch fetch (bot.jobs.patch.PatchFetchStage)
VOCAB: StateKey[Path] = StateKey("vocab")  # VocabStage: the vocab-only GGUF
PATCHED: StateKey[dict[str, Any]] = StateKey("patched")  # PatchStage: its record's extra (parts, keys)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def inspect_files(checkpoint_dir: Path, workdir: Path, *, supported: frozenset[str] | None = None,
                  projectors: frozenset[str] | None = None) -> checkpoint_mod.Checkpoint:
    """A full job's ``inspect`` on the new revision's config, tokenizer and template files (raises
    :class:`~converters.core.errors.UnsupportedModel` with its reason): ``checkpoint.inspect`` on a folder of those files
    and a stand-in weight file without tensors (the weights are the published files', which the patch does not
    change and the earlier job inspected), then the chat-template refusal."""
    view = workdir / INSPECT_VIEW
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    try:
        for p in sorted(Path(checkpoint_dir).iterdir()):
            if p.is_file() and p.name != WEIGHTS_STAND_IN:
                _link_or_copy(p, view / p.name)
        header = b"{}"
        (view / WEIGHTS_STAND_IN).write_bytes(len(header).to_bytes(8, "little") + header)
        ckpt = checkpoint_mod.inspect(view, supported=supported, projectors=projectors)
        tok_cfg = chat.tokenizer_settings(view)  # every template the converter or a runtime may pick, as at inspect
        refused = verify.templates_refusal(chat.template_candidates(view, tok_cfg), tok_cfg)
        if refused is not None:
            raise UnsupportedModel(refused)
        return dataclasses.replace(ckpt, path=Path(checkpoint_dir), weight_files=(), weight_bytes=0, parameters=0)
    finally:
        shutil.rmtree(view, ignore_errors=True)


def vocab_only(checkpoint_dir: Path, workdir: Path, *, toolchain: Toolchain, timeout: float | None = None,
               on_line: Any = None) -> tuple[Path, bool]:
    """``convert_hf_to_gguf.py --vocab-only`` on a folder of config and tokenizer files (no weights needed):
    ``(path, skipped)``; skipped when its record matches the same files and converter."""
    inputs = {"checkpoint": checkpoint_mod.files_fingerprint(checkpoint_dir, workdir), "toolchain": toolchain.version}
    done = records.complete(workdir, VOCAB_STAGE, inputs)
    if done is not None:
        return workdir / done.outputs[0].path, True
    final = workdir / VOCAB_FILE
    t0 = time.monotonic()
    with records.atomic_output(final) as tmp:
        argv = [sys.executable, str(toolchain.converter), str(checkpoint_dir), "--vocab-only", "--outfile", str(tmp)]
        try:
            run(argv, timeout=timeout, env=toolchain.python_env(), on_line=on_line)
        except ToolError as e:
            raise PatchRefused(f"the converter cannot write the new revision's vocabulary: "
                               f"{verify.tool_error_reason(e)}") from e
    records.save(workdir, VOCAB_STAGE, inputs, [final], time.monotonic() - t0, toolchain.version)
    return final, False


def refusal(vocab: gguf_meta.GgufMeta, published: gguf_meta.GgufMeta) -> str | None:
    """Why the new metadata cannot be patched into ``published`` (None: it can): another architecture, a token
    list of another length, another vocabulary size, or any architecture key with another value."""
    if vocab.arch != published.arch:
        return f"the architecture would change ({published.arch} -> {vocab.arch})"
    old_n, new_n = len(published.get(TOKENS) or ()), len(vocab.get(TOKENS) or ())
    if old_n != new_n:
        return f"the token list changes length ({old_n} -> {new_n} tokens)"
    prefix = vocab.arch + "."
    for key in sorted(vocab.values):
        if key.startswith(prefix) and key in published.values and published.values[key] != vocab.values[key]:
            return f"architecture key {key} would change ({published.values[key]!r} -> {vocab.values[key]!r})"
    return None


def changed_keys(vocab: gguf_meta.GgufMeta, published: gguf_meta.GgufMeta) -> list[str]:
    """The ``tokenizer.*`` keys the patch adds, removes or changes."""
    keys = {k for k in (*vocab.values, *published.values) if k.startswith(TOKENIZER)}
    return sorted(k for k in keys if vocab.values.get(k) != published.values.get(k))


def tensor_data_sha256(path: Path) -> str:
    """sha256 of a GGUF file's tensor data: every byte after the header and its alignment padding."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(gguf_meta.data_offset(path))
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class PatchedPart:
    path: Path
    rewritten: bool  # False: a later part of a split file, copied as it is
    data_sha256: str  # of the written file's tensor data
    source_data_sha256: str  # of the published file's


def rewrite(src: Path, dst: Path, vocab: Path) -> PatchedPart:
    """Write ``src`` to ``dst`` with the ``tokenizer.*`` keys of ``vocab`` and the tensor data copied unchanged."""
    r = gguf_meta.reader(src)
    names = [n for n in r.fields if not n.startswith("GGUF.")]
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not any(n.startswith(TOKENIZER) for n in names):  # a later part of a split file
        with records.atomic_output(dst) as tmp:
            shutil.copyfile(src, tmp)
        sha = tensor_data_sha256(dst)
        return PatchedPart(dst, False, sha, tensor_data_sha256(src))
    v = gguf_meta.reader(vocab)
    new_tok = [(n, f) for n, f in v.fields.items() if n.startswith(TOKENIZER)]
    fields: list[tuple[str, Any]] = []
    placed = False
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == gguf_meta.ARCHITECTURE:
            continue
        if name.startswith(TOKENIZER):
            if not placed:  # the new tokenizer block where the old one was
                fields += new_tok
                placed = True
            continue
        fields.append((name, field))
    layout = gguf_meta.tensor_layout(r)
    with records.atomic_output(dst) as tmp:
        try:
            copied = gguf_meta.write_copy(tmp, r, fields, src)
        except gguf_meta.Unwritable as e:
            raise PatchRefused(str(e)) from e
        written = gguf_meta.reader(tmp)
        if gguf_meta.tensor_layout(written) != layout:
            raise InputError(f"{dst.name}: the tensor layout changed while writing the patched file")
        del written
    out = tensor_data_sha256(dst)
    if out != copied:
        raise InputError(f"{dst.name}: the tensor data changed while writing the patched file")
    return PatchedPart(dst, True, out, copied)




def carried_hashes(old: Report, patched: set[str]) -> dict[str, dict[str, Any]]:
    """The measured hashes of the files a patch republishes unchanged (imatrix, chart, projectors): the earlier
    report's ``file_hashes``, and for a file it lacks there (a chart published before charts were hashed) the sha256
    its ``publication`` block recorded when it was uploaded (publish compares either with the downloaded bytes)."""
    hashes = {k: dict(v) for k, v in old.file_hashes.items() if k not in patched}
    published = (old.extra.get("publication") or {}).get("files") if isinstance(old.extra, dict) else None
    for path, v in (published if isinstance(published, dict) else {}).items():
        if path not in hashes and path not in patched and isinstance(v, dict) and isinstance(v.get("sha256"), str):
            hashes[str(path)] = {"size": v.get("size"), "sha256": v["sha256"]}
    return hashes


def _folder_bytes(folder: Path) -> int:
    """What the vocab-only converter may read: the bytes of the files in ``folder`` (config and tokenizer files)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------------
# Stages (converters.core.stages' protocol: name, quiet, run(ctx))
# --------------------------------------------------------------------------------------------------


def _input(ctx: JobContext) -> PatchInput:
    info = ctx.get(PATCH_INPUT, None)
    if not isinstance(info, PatchInput):
        raise RuntimeError("no patch input: the bot's patch fetch must run first")
    return info


@dataclasses.dataclass(frozen=True)
class InspectStage:
    """The new revision's files through a full job's inspect (:func:`inspect_files`) before the converter runs."""

    check_architecture: bool = False  # as a full job's CheckpointRules: the pinned converter's architectures
    name: str = INSPECT_STAGE
    quiet: bool = True

    def run(self, ctx: JobContext) -> None:
        if ctx.checkpoint_dir is None:
            raise RuntimeError("no checkpoint folder: the patch fetch must run first")
        supported = projectors = None
        if self.check_architecture and ctx.toolchain is not None:
            supported = checkpoint_mod.supported_architectures(ctx.toolchain.root)
            projectors = checkpoint_mod.supported_projectors(ctx.toolchain.root)
        inspect_files(ctx.checkpoint_dir, ctx.workdir, supported=supported, projectors=projectors)


@dataclasses.dataclass(frozen=True)
class VocabStage:
    """The new revision's tokenizer and template metadata, by the pinned converter's ``--vocab-only``."""

    name: str = VOCAB_STAGE
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        if ctx.checkpoint_dir is None:
            raise RuntimeError("no checkpoint folder: the patch fetch must run first")
        t0 = time.monotonic()
        path, skipped = vocab_only(ctx.checkpoint_dir, ctx.workdir, toolchain=ctx.toolchain,
                                   timeout=ctx.limits.convert(_folder_bytes(ctx.checkpoint_dir)),
                                   on_line=ctx.hooks.tool_lines(self.name))
        ctx.put(VOCAB, path)
        ctx.hooks.emit(self.name, SKIP if skipped else END, data={"seconds": round(time.monotonic() - t0, 3)})


@dataclasses.dataclass(frozen=True)
class PatchStage:
    """Every published file written again with the new metadata (tensor data unchanged), then ``ladder.json``."""

    name: str = PATCH_STAGE
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        info = _input(ctx)
        base = WorkDir(info.base_dir)
        old = base.ladder()
        vocab = Path(ctx.get(VOCAB))
        present = [lf for lf in old.files if all((base.path / p).is_file() for p in lf.all_parts)]
        if not present:
            raise PatchRefused("none of the earlier ladder's files is in the published repo")
        parts = [p for lf in present for p in lf.all_parts]
        inputs = {"vocab": records.content_sha256(vocab, ctx.workdir),
                  "base": {p: records.content_sha256(base.path / p, ctx.workdir) for p in parts},
                  "revision": info.revision}
        rec = records.complete(ctx.workdir, self.name, inputs)
        if rec is None:
            t0 = time.monotonic()
            vmeta = gguf_meta.read(vocab)
            keys: list[str] = []
            for lf in present:
                m = gguf_meta.read(base.path / lf.path)
                why = refusal(vmeta, m)
                if why is not None:
                    raise PatchRefused(f"{lf.type}: {why}")
                keys = sorted(set(keys) | set(changed_keys(vmeta, m)))
            done: dict[str, dict[str, Any]] = {}
            for i, p in enumerate(parts):
                ctx.hooks.check_cancel()
                pp = rewrite(base.path / p, ctx.workdir / p, vocab)
                done[p] = {"rewritten": pp.rewritten, "tensor_data_sha256": pp.data_sha256,
                           "published_tensor_data_sha256": pp.source_data_sha256}
                ctx.hooks.step(self.name, i + 1, len(parts), p)
            rec = records.save(ctx.workdir, self.name, inputs, [ctx.workdir / p for p in parts],
                               time.monotonic() - t0, ctx.toolchain.version if ctx.toolchain else None,
                               extra={"parts": done, "keys": keys})
            ctx.hooks.emit(self.name, END, data={"seconds": rec.seconds})
        else:
            ctx.hooks.emit(self.name, SKIP, data={"seconds": rec.seconds})
        # every other published file (imatrix, chart, a projector) is republished unchanged
        published = (base.report().extra.get("publication") or {}).get("files") or {}
        others = {*published, *(old.imatrix.paths if old.imatrix else ()), str(base.report().chart or "")}
        for rel in sorted(others - set(parts)):
            safe = rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts
            if safe and (base.path / rel).is_file() and not (ctx.workdir / rel).is_file():
                _link_or_copy(base.path / rel, ctx.workdir / rel)
        ctx.put(PATCHED, rec.extra)
        ctx.ladder = _new_ladder(old, present, ctx.workdir, info, ctx.checkpoint_dir)
        WorkDir(ctx.workdir).write_ladder(ctx.ladder)


def _new_ladder(old: Ladder, present: Sequence[Any], workdir: Path, info: PatchInput,
                source_dir: Path | None) -> Ladder:
    files = []
    for lf in old.files:
        if lf not in present:
            files.append(lf)  # withheld by the earlier gate: not in the repo, listed as it was
            continue
        sizes = {p: (workdir / p).stat().st_size for p in lf.all_parts}
        hashes = {p: records.content_sha256(workdir / p, workdir) for p in lf.all_parts}
        files.append(dataclasses.replace(lf, size=sum(sizes.values()), sha256=hashes[lf.path],
                                         part_sha256=tuple(hashes[p] for p in lf.parts) if lf.parts else ()))
    src = dataclasses.replace(old.source, revision=info.revision, path=str(source_dir) if source_dir else None)
    extra = {**old.extra, "patched_from": {"revision": info.base_revision, "changed_files": list(info.changed_files)}}
    return dataclasses.replace(old, source=src, files=tuple(files), extra=extra)


@dataclasses.dataclass(frozen=True)
class RecheckStage:
    """The cheap checks again on the patched files (tokenizer parity, chat template against transformers,
    BOS/EOS/EOT, a generation per file), the KLD figures kept; writes ``report.json``. Not publishable: fails."""

    require_publishable: bool = True
    name: str = CHECK_STAGE
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        info = _input(ctx)
        assert ctx.ladder is not None and ctx.checkpoint_dir is not None
        t0 = time.monotonic()
        old = WorkDir(info.base_dir).report()
        report = recheck(WorkDir(ctx.workdir), ctx.ladder, old, ctx.checkpoint_dir, toolchain=ctx.toolchain,
                         patched=ctx.get(PATCHED, None) or {}, info=info)
        report.seconds["recheck"] = time.monotonic() - t0
        WorkDir(ctx.workdir).write_report(report)
        ctx.report = report
        ctx.hooks.emit(self.name, END, data={"seconds": round(report.seconds["recheck"], 3)})
        if self.require_publishable and not report.publishable:
            why = "; ".join(report.reasons) or "the checks failed"
            raise CheckFailed(self.name, f"the patched files are not published: {why}")


def recheck(wd: WorkDir, ladder: Ladder, old: Report, source_dir: Path, *, toolchain: Toolchain,
            patched: Mapping[str, Any], info: PatchInput) -> Report:
    """The earlier report with the cheap checks run again on the patched files and its hashes updated."""
    present = [f for f in old.files if (wd.path / f.path).is_file()]
    if not present:
        raise InputError("no patched file to check")
    first = wd.path / present[0].path
    facts = verify.GgufFacts.read(first)
    checks = {k: c for k, c in old.checks.items() if k not in ("tokenizer", "chat_template", "special_tokens",
                                                                "end_of_reply", "generation")}
    src_checks, tok = evaluate.source_checks(toolchain, first, facts, source_dir)
    checks.update(src_checks)
    prompt, is_chat = verify.prompt_for(facts, tok)
    gens: dict[Path, Any] = {}  # each file generates once (the first file's reply serves the job-level checks)

    def generate(path: Path) -> Any:
        if path not in gens:
            gens[path] = verify.generate(toolchain, path, prompt, n_predict=evaluate.N_PREDICT)
        return gens[path]

    try:
        gen = generate(first)
        checks["end_of_reply"] = verify.end_of_reply_check(gen, is_chat, evaluate.N_PREDICT)
        checks["generation"] = verify.generation_check(gen)
    except ToolError as e:
        checks["generation"] = Check.fail(f"{first.name} does not generate: {verify.tool_error_reason(e)}")
    parts = dict(patched.get("parts") or {})
    same = all(p.get("tensor_data_sha256") == p.get("published_tensor_data_sha256") for p in parts.values())
    data = {"tensor_data_sha256": {k: p.get("tensor_data_sha256") for k, p in sorted(parts.items())},
            "from_revision": info.base_revision}
    checks["weights_unchanged"] = (
        Check.ok(f"tensor data byte-identical to the files published from {info.base_revision[:12]} (sha256 of "
                 f"each file's tensor data); KLD figures kept", **data) if same and parts else
        Check.fail("the tensor data differs from the published files", **data))
    present_types = {f.type for f in present}
    old_paths = {p for f in present for p in (f.path, *(str(x.get("path")) for x in f.parts))}
    hashes = carried_hashes(old, old_paths)
    files: list[FileResult] = []
    for f in old.files:
        lf = ladder.file(f.type)
        if f.type not in present_types:
            files.append(f)
            continue
        nf = dataclasses.replace(f, checks=dict(f.checks), reasons=[], status=PASSED)
        nf.parts = [{"path": p, "size": (wd.path / p).stat().st_size,
                     "sha256": records.content_sha256(wd.path / p, wd.path)} for p in lf.all_parts]
        nf.sha256 = nf.parts[0]["sha256"]
        nf.size = sum(p["size"] for p in nf.parts)
        hashes.update({p["path"]: {"size": p["size"], "sha256": p["sha256"]} for p in nf.parts})
        path = wd.path / f.path
        try:
            nf.checks["metadata"] = verify.metadata_check(verify.GgufFacts.read(path), facts)
        except InputError as e:
            nf.checks["metadata"] = Check.fail(str(e))
        try:
            nf.checks["generation"] = verify.generation_check(generate(path))
        except ToolError as e:
            nf.checks["generation"] = Check.fail(f"llama.cpp cannot generate with it: {verify.tool_error_reason(e)}")
        files.append(nf)
    ceilings = {k: float(v) for k, v in (old.settings.get("ceilings") or {}).items() if isinstance(v, (int, float))}
    per_job = {k: v for k, v in checks.items() if k in ("chat_template", "special_tokens", "end_of_reply",
                                                        "weights_unchanged")}
    verdict = evaluate.judge(files, ceilings, job_checks=per_job)
    for f in files:
        if f.type in present_types:
            f.reasons = verdict.reasons[f.type]
            f.status = FAILED if f.reasons else PASSED
    ok, why = evaluate.publishable(checks, require_source_check=bool(old.settings.get("require_source_check", True)))
    extra = {k: v for k, v in old.extra.items() if k != "publication"}
    extra["patch"] = {"kind": "metadata", "from_revision": info.base_revision, "to_revision": info.revision,
                      "changed_files": list(info.changed_files), "what": list(info.what),
                      "keys_changed": list(patched.get("keys") or []), "weights_unchanged": same and bool(parts),
                      "tensor_data_sha256": data["tensor_data_sha256"]}
    source = {**old.source, "revision": info.revision}
    return dataclasses.replace(old, source=source, checks=checks, files=files, publishable=ok, reasons=why,
                               created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extra=extra,
                               file_hashes=hashes, notes=list(verdict.notes), seconds=dict(old.seconds))


def patch_stages(*, require_publishable: bool = True, check_architecture: bool = False
                 ) -> tuple[Stage[JobContext], ...]:
    """inspect -> vocab -> patch -> recheck (after the bot's patch fetch; before its publish)."""
    return (InspectStage(check_architecture), VocabStage(), PatchStage(), RecheckStage(require_publishable))


__all__ = ["PatchInput", "PatchedPart", "InspectStage", "inspect_files", "vocab_only", "refusal", "changed_keys",
           "tensor_data_sha256", "rewrite", "recheck", "patch_stages", "BASE_DIR", "PATCH_INPUT"]
