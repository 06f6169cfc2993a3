"""One job spec, one runner of stages: ``run_job(spec, workdir, hooks, toolchain=..., hub=...)``.

A :class:`JobSpec` is frozen and built once: :meth:`JobSpec.from_settings` for the bot, from the command
line by ``ggufbot convert`` and ``ggufbot variant``. :func:`run_job` turns it into a tuple of stage objects
and runs them with :func:`converters.ladder.job.run_stages` (mergekit's shape: options -> plan -> executor):

    fetch (Hub) | prune, distill (a variant) -> inspect -> convert -> calibrate -> quantize -> evaluate
        -> publish -> variant:<recipe> ...

The file stages live in ``converters/ladder/job.py`` and ``converters/variants/recipes.py`` (``converters/`` never imports
``bot/``); this module adds the stages that need the Hub (fetch, publish) and ``variant:<recipe>``, which is
itself a ``run_job`` of a derived spec whose first stages prune and heal the teacher instead of fetching. A
failing variant is recorded in the result; it never fails the main job (a stop request still stops it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.hub.client import Hub, ModelRecord
from bot.jobs import patch as patch_mod
from bot.jobs import variants as bot_variants
from bot.model import jobstate as J
from bot.model.rules import fetch_refusal, weight_bytes
from bot.model.settings import Settings
from bot.publish import commit as publish
from bot.publish.early import EarlyOptions, EarlyPublisher
from bot.publish.target import TargetPolicy
from converters.formats import checkpoint as ckpt_mod
from converters.core import names, quants, records
from converters.core.records import StageRecord
from converters.variants import recipes as variants_mod
from converters.llama.calibrate import TextFile
from converters.llama.toolchain import Toolchain
from converters.core.errors import Cancelled, CheckFailed, DiskSpaceError, UnsupportedModel
from converters.core.hooks import LINE, Event, Hooks
from converters.ladder.job import (FILE_READY, CheckpointRules, EvalSettings, JobContext, ToolLimits, ladder_stages,
                                  run_stages)
from converters.ladder.tune import tuned_name
from converters.ladder.pipeline import LadderOptions, model_name_for
from converters.ladder.speed import SpeedOptions
from converters.core.report import Report
from converters.core.stages import DISK_MARGIN, Produced, RecordedStage, Stage, StateKey, free_bytes
from converters.core.workdir import Ladder, WorkDir

log = logging.getLogger(__name__)

# What a bot job needs on disk beyond the source weights: a 16-bit reference (~1x) and the ladder (~4.5x for
# the default ladder), so about 6x the source; the planner checks its own exact estimate again before writing.
DISK_FACTOR = 6.0


class LazyText:
    """A text resolved on first use: the bot downloads its calibration and evaluation texts only when a stage
    reads them (after the fetch, as a stage of the job), not when the spec is built."""

    def __init__(self, resolve: Callable[[], TextFile]) -> None:
        self._resolve = resolve
        self._text: TextFile | None = None

    def __getattr__(self, name: str) -> Any:
        if self._text is None:
            self._text = self._resolve()
        return getattr(self._text, name)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the checkpoint comes from: a local folder (``path``), or the Hub (``repo`` at ``revision``)."""

    repo: str | None = None
    revision: str | None = None
    path: Path | None = None  # a local checkpoint: nothing is fetched (``repo`` may still name it, for the card)


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """How the fetch stage downloads: which files, what must fit on disk, which rules to check again."""

    patterns: tuple[str, ...] = ckpt_mod.RESULT_PATTERNS
    need_bytes: Callable[[ModelRecord], int] | None = None  # bytes that must be free, from the Hub's model info
    check: Callable[[ModelRecord], None] | None = None  # raises UnsupportedModel for a refused model
    max_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class PublishTarget:
    """Where a finished ladder goes: an explicit repo id, or a namespace and template."""

    repo_id: str | None = None
    namespace: str | None = None
    template: str | None = None  # the main repo: ``{model}-GGUF``; a variant: ``{org}/{model}-{variant}-GGUF``
    private: bool = False
    policy: TargetPolicy = TargetPolicy()  # another model's repo at that name: rename or fail; adopted repos
    early: EarlyOptions | None = None  # publish each group as soon as it passed (bot.publish.early); None: one commit


def speed_options(s: Settings) -> SpeedOptions:
    """``[evaluate] speed*`` as the speed stage's options."""
    e = s.evaluate
    return SpeedOptions(scope=e.speed, prompt=e.speed_prompt, generate=e.speed_generate,
                        repetitions=e.speed_repetitions, rounds=e.speed_rounds, threads=e.speed_threads or None)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    source: Source
    model_name: str
    ladder: LadderOptions
    evaluation: EvalSettings | None = None
    variants: tuple[variants_mod.Recipe, ...] = ()
    publish: PublishTarget | None = None  # None: not published
    variant_publish: PublishTarget | None = None
    fetch: FetchPolicy = FetchPolicy()
    rules: CheckpointRules = CheckpointRules()
    variant_of: variants_mod.VariantOf | None = None  # set on the derived spec of a variant
    limits: ToolLimits = ToolLimits()  # how long any one program may run
    patch: patch_mod.PatchBase | None = None  # a metadata patch of that publication instead of the ladder stages
    whats_new: tuple[str, ...] = ()  # the published card's what's-new lines (default: what the publication changed)

    @classmethod
    def from_settings(cls, settings: Settings, repo: str, revision: str, *, calibration: TextFile | LazyText | None,
                      evaluation: TextFile | LazyText, namespace: Callable[[], str] | str | None = None) -> "JobSpec":
        """The bot's job for ``repo@revision``; publishing when the settings allow it and a token is set."""
        s, q = settings, settings.quantize

        def check(info: ModelRecord) -> None:
            d = fetch_refusal(info, s)  # the safety rules again, on the exact revision fetched
            if d is not None:
                raise UnsupportedModel(d.reason, repo=repo)

        def need(info: ModelRecord) -> int:
            # each variant keeps its checkpoint, reference and ladder beside the teacher's until the cleanup
            return int((weight_bytes(info) or 0) * DISK_FACTOR * (1 + len(q.variants))
                       + s.limits.min_free_disk_gb * 1e9)

        publishing = s.target.publish and bool(s.token)
        policy = TargetPolicy(on_collision=s.target.on_collision, adopt=tuple(s.target.adopt))
        early = EarlyOptions(order=s.publish.order, groups=s.publish.groups) if s.publish.early else None
        ns = namespace if isinstance(namespace, str) else None
        return cls(
            source=Source(repo=repo, revision=revision), model_name=model_name_for(repo),
            ladder=LadderOptions(ladder=q.ladder, outtype=q.outtype, calibration=calibration,
                                 calibration_chunks=q.calibration_chunks, ctx=q.ctx,
                                 split_max_bytes=int(q.split_max_gb * 1e9), jobs=q.jobs,
                                 tune=tuple(q.tune), tune_seconds=q.tune_seconds, tune_confirm=q.tune_confirm,
                                 order=s.publish.order,
                                 first_group=s.publish.groups[0] if s.publish.groups else 1,
                                 fit=tuple(q.fit), fit_kv_type=q.fit_kv_type),
            evaluation=EvalSettings(evaluation, chunks=q.evaluation_chunks, precision=s.evaluate.precision,
                                    min_chunks=s.evaluate.min_chunks, name_text=True, require_publishable=True,
                                    require_source_check=q.require_source_check, speed=speed_options(s)),
            variants=variants_mod.parse_list(q.variants),
            publish=PublishTarget(namespace=ns, template=s.target.repo_template, private=s.target.private,
                                  policy=policy, early=early) if publishing else None,
            variant_publish=PublishTarget(namespace=ns, template=s.target.variant_repo_template,
                                          private=s.target.private, policy=policy) if publishing else None,
            fetch=FetchPolicy(patterns=ckpt_mod.RESULT_PATTERNS, need_bytes=need, check=check,
                              max_bytes=s.max_model_bytes or None),
            # an architecture (or a vision tower) the pinned converter cannot convert is refused at inspect with
            # that reason, as `ggufbot convert` does, not left to fail inside the converter
            rules=CheckpointRules(check_architecture=True),
            limits=ToolLimits.from_settings(s.limits))

    def for_variant(self, recipe: variants_mod.Recipe, teacher_dir: Path, teacher_workdir: Path) -> "JobSpec":
        """The spec of one variant of this job: prune/heal the teacher, the same ladder, evaluation against the
        teacher's logits, publishing to the variant template."""
        v = variants_mod.VariantOf(recipe, teacher_dir, self.model_name, self.ladder.calibration.path
                                   if self.ladder.calibration else teacher_dir, teacher_workdir, self.source.repo)
        o = self.ladder
        ev = self.evaluation
        return JobSpec(
            source=Source(repo=self.source.repo, revision=self.source.revision),
            model_name=variants_mod.model_name(self.model_name, recipe),
            ladder=LadderOptions(ladder=o.ladder, imatrix=o.imatrix, calibration=o.calibration,
                                 calibration_chunks=o.calibration_chunks, ctx=o.ctx),
            evaluation=dataclasses.replace(ev, name_text=False, require_publishable=False) if ev else None,
            publish=self.variant_publish, variant_of=v, limits=self.limits)


@dataclasses.dataclass(frozen=True)
class Published:
    repo_id: str
    url: str | None  # the commit's URL (the repo's when nothing changed)
    action: str  # create | update | none
    commit: str | None = None
    repo_url: str | None = None


@dataclasses.dataclass(frozen=True)
class VariantOutcome:
    recipe: str
    entry: dict[str, Any]  # the job result's entry: status, figures, target repo or error
    workdir: Path
    ladder: Ladder | None = None
    url: str | None = None


@dataclasses.dataclass(frozen=True)
class JobResult:
    ladder: Ladder
    report: Report | None
    published: Published | None
    variants: tuple[VariantOutcome, ...]
    checkpoint_dir: Path | None


# What the bot's stages hand to run_job's result (converters.core.stages.StateKey)
PUBLISHED: StateKey[Published] = StateKey("published")  # PublishStage
EARLY: StateKey[EarlyPublisher] = StateKey("early_publisher")  # EarlyPublishStage -> PublishStage, run_job
VARIANTS: StateKey[list[VariantOutcome]] = StateKey("variants")  # each VariantStage, in order


# ------------------------------------------------------------------------------------------ bot stages
@dataclasses.dataclass(frozen=True)
class FetchStage(RecordedStage[JobContext]):
    """Download the files that matter from the Hub into ``<workdir>/source`` (skipped when its record and the
    files are still there); checks the rules again on the exact revision and that it fits on disk."""

    source: Source
    policy: FetchPolicy
    hub: Hub
    name: str = "fetch"
    quiet: bool = True

    def run(self, ctx: JobContext) -> None:
        ctx.checkpoint_dir = ctx.workdir / names.SOURCE_DIR
        super().run(ctx)

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        return {"repo": self.source.repo, "revision": self.source.revision, "patterns": list(self.policy.patterns)}

    def intact(self, ctx: JobContext, rec: StageRecord) -> bool:
        return fetched_intact(ctx.workdir, ctx.workdir / names.SOURCE_DIR, rec.extra.get("files"))

    def event_data(self, rec: StageRecord) -> dict[str, Any]:
        return {"quiet": True}

    def done_text(self, ctx: JobContext, rec: StageRecord) -> str:
        files = rec.extra["files"]
        total = sum(f["size"] for f in files.values())
        return f"fetch done: {len(files)} files, {total / 1e6:.1f} MB"

    def produce(self, ctx: JobContext) -> Produced:
        src = ctx.workdir / names.SOURCE_DIR
        info = self._checked_info(ctx)
        self.policy_download(ctx, info, src)
        files = fetched_identities(ctx.workdir, src, info)
        if not any(n.endswith(".safetensors") for n in files):
            raise UnsupportedModel("no safetensors weights were downloaded", repo=self.source.repo)
        return Produced([], {"files": files})

    def _checked_info(self, ctx: JobContext) -> ModelRecord:
        info = self.hub.model_info(self.source.repo, revision=self.source.revision)
        if self.policy.check is not None:
            self.policy.check(info)
        need = self.policy.need_bytes(info) if self.policy.need_bytes is not None else 0
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        free = free_bytes(ctx.workdir)
        if need > free:
            raise DiskSpaceError(str(ctx.workdir), need, free)
        return info

    def policy_download(self, ctx: JobContext, info: ModelRecord, dest: Path) -> None:
        wanted = sum(s.size or 0 for s in info.siblings
                     if any(fnmatch.fnmatch(s.rfilename, pat) for pat in self.policy.patterns))
        ctx.hooks.emit(self.name, LINE, text=f"{self.source.repo}@{self.source.revision} ({wanted / 1e9:.2f} GB)")
        self.hub.download_snapshot(self.source.repo, self.source.revision, dest,
                                   allow_patterns=list(self.policy.patterns), max_bytes=self.policy.max_bytes)


def fetched_identities(workdir: Path, src: Path, info: ModelRecord) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of the downloaded files. A file the Hub stores in LFS gets the sha256 of the
    Hub's listing (free: no local hashing; it becomes the file's cached content hash), the others are hashed."""
    listed = {s.rfilename: s for s in info.siblings}
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(src.rglob("*")):
        name = str(p.relative_to(src))
        if not p.is_file() or ".cache" in p.relative_to(src).parts:
            continue
        size = p.stat().st_size
        sib = listed.get(name)
        if sib is not None and sib.lfs_sha256 and sib.size == size:
            records.remember_sha256(p, sib.lfs_sha256, workdir)
        out[name] = {"size": size, "sha256": records.content_sha256(p, workdir)}
    return out


def fetched_intact(workdir: Path, src: Path, files: Any) -> bool:
    """Whether every file the fetch record lists still has its recorded content (sizes alone are not enough)."""
    if not isinstance(files, dict) or not files:
        return False
    for name, ident in files.items():
        p = src / name
        if not isinstance(ident, dict) or not p.is_file() or p.stat().st_size != ident.get("size") \
                or records.content_sha256(p, workdir) != ident.get("sha256"):
            return False
    return True


def cli_disk_need(info: ModelRecord) -> int:
    """``convert ORG/NAME``: the download plus the reference GGUF (about the same size again) must fit."""
    wanted = sum(s.size or 0 for s in info.siblings
                 if any(fnmatch.fnmatch(s.rfilename, pat) for pat in ckpt_mod.FETCH_PATTERNS))
    return int(2 * wanted * DISK_MARGIN)


def publish_options(target: PublishTarget, whats_new: tuple[str, ...] = ()) -> publish.PublishOptions:
    return publish.PublishOptions(repo_id=target.repo_id, repo_template=target.template, namespace=target.namespace,
                                  private=target.private, policy=target.policy, whats_new=whats_new)


@dataclasses.dataclass(frozen=True)
class EarlyPublishStage:
    """Before the ladder's stages: an :class:`~bot.publish.early.EarlyPublisher` whose ``ready`` is the pipeline's
    ``FILE_READY`` callback (each passed file uploaded at once, groups committed in publish order); the publish
    stage waits for it and makes the last commit."""

    target: PublishTarget
    hub: Hub
    name: str = "early-publish"
    quiet: bool = True

    def run(self, ctx: JobContext) -> None:
        assert self.target.early is not None

        def types() -> list[str]:
            p = ctx.need_plan()
            return [q.name for q in p.ladder] + [tuned_name(quants.get(t)) for t in p.tune]

        publisher = EarlyPublisher(ctx.workdir, self.hub, publish_options(self.target), self.target.early,
                                   types=types, hooks=ctx.hooks)
        ctx.put(EARLY, publisher)
        ctx.put(FILE_READY, publisher.ready)


@dataclasses.dataclass(frozen=True)
class PublishStage:
    target: PublishTarget
    hub: Hub
    variant: variants_mod.VariantOf | None = None
    name: str = "publish"
    quiet: bool = False
    whats_new: tuple[str, ...] = ()  # the card's what's-new lines instead of the computed ones

    def run(self, ctx: JobContext) -> None:
        opts = publish_options(self.target, self.whats_new)
        publisher = ctx.get(EARLY, None)
        if publisher is not None and self.variant is None:
            res = publisher.finish()
        elif self.variant is not None:
            if ctx.report is not None:
                variant_gate(ctx.report, self.variant.recipe.name)
            res = bot_variants.publish_variant(ctx.workdir, self.hub, opts)
        else:
            _plan, res = publish.publish(ctx.workdir, self.hub, opts)
        assert res is not None
        ctx.put(PUBLISHED, Published(res.repo_id, f"{res.url}/commit/{res.commit}" if res.commit else res.url,
                                     res.action, res.commit, res.url))


class NestedHooks(Hooks):
    """A variant's events inside its job: stage names become ``variant:<recipe>/<stage>``."""

    def __init__(self, parent: Hooks, outer: str) -> None:
        self.parent, self.outer = parent, outer

    def progress(self, event: Event) -> None:
        self.parent.progress(dataclasses.replace(event, stage=f"{self.outer}/{event.stage}"))

    def check_cancel(self) -> None:
        self.parent.check_cancel()

    def alive(self) -> None:
        self.parent.alive()


@dataclasses.dataclass(frozen=True)
class VariantStage:
    spec: JobSpec
    recipe: variants_mod.Recipe
    hub: Hub
    quiet: bool = False

    @property
    def name(self) -> str:
        return f"variant:{self.recipe.name}"

    def run(self, ctx: JobContext) -> None:
        vdir = WorkDir(ctx.workdir).variant_dir(self.recipe.name).path
        sub = self.spec.for_variant(self.recipe, ctx.checkpoint_dir or ctx.workdir, ctx.workdir)
        t0 = time.monotonic()
        entry: dict[str, Any] = {"recipe": self.recipe.name}
        outcome: VariantOutcome
        try:
            res = run_job(sub, vdir, NestedHooks(ctx.hooks, self.name), toolchain=ctx.toolchain, hub=self.hub)
            entry.update(_variant_entry(vdir, res, sub.publish is not None))
            outcome = VariantOutcome(self.recipe.name, entry, vdir, res.ladder,
                                     res.published.url if res.published else None)
        except Cancelled:
            raise
        except Exception as e:  # noqa: BLE001 - a variant never fails the main job
            etype, msg = J.error_fields(e)
            entry.update(status="failed", error_type=etype, error_message=msg)
            log.error("variant %s failed: %s: %s", self.recipe.name, etype, msg,
                      exc_info=not isinstance(e, (UnsupportedModel, CheckFailed)))
            outcome = VariantOutcome(self.recipe.name, entry, vdir)
        entry["seconds"] = round(time.monotonic() - t0, 1)
        ctx.put(VARIANTS, [*ctx.get(VARIANTS, []), outcome])


def variant_gate(report: Report | None, recipe: str, publishable: bool | None = None) -> None:
    """A variant whose evaluation is not publishable fails (its own entry only, never the main job)."""
    if publishable if publishable is not None else (report is not None and report.publishable):
        return
    why = "; ".join(str(r) for r in (report.reasons if report else [])) or "see its report.json"
    raise CheckFailed("evaluate", f"variant {recipe} is not publishable: {why}")


def _variant_entry(vdir: Path, res: JobResult, publishing: bool) -> dict[str, Any]:
    info = variants_mod.load_info(vdir) or {}
    evaluation = info.get("evaluation") or {}
    entry: dict[str, Any] = {
        "model_name": info.get("model_name"),
        "layers": [info["teacher"].get("layers"), info["variant"].get("layers")],
        "parameters": [info["teacher"].get("parameters"), info["variant"].get("parameters")],
        "kld_vs_teacher": evaluation.get("reference_kld_mean"),
    }
    if not evaluation.get("publishable"):
        variant_gate(res.report, info["recipe"]["name"], publishable=False)
    if res.published is None:
        return {**entry, "status": "converted", "workdir": str(vdir)}
    p = res.published
    return {**entry, "status": "published", "target_repo": p.repo_id, "commit": p.url, "action": p.action}


# ------------------------------------------------------------------------------------------ the job
def stages_for(spec: JobSpec, hub: Hub | None = None) -> tuple[Stage[JobContext], ...]:
    """The stage objects of ``spec``, in order."""
    out: list[Stage[JobContext]] = []
    if spec.patch is not None:
        assert spec.source.repo and spec.source.revision and hub is not None
        out += patch_mod.stages(spec.source.repo, spec.source.revision, spec.patch, hub, check=spec.fetch.check,
                                require_publishable=spec.evaluation.require_publishable
                                if spec.evaluation is not None else True,
                                check_architecture=spec.rules.check_architecture)
    elif spec.variant_of is not None:
        out += variants_mod.stages(spec.variant_of, spec.ladder, spec.evaluation)
    else:
        if spec.source.path is None:
            out.append(FetchStage(spec.source, spec.fetch, hub))
        if spec.publish is not None and spec.publish.early is not None and spec.evaluation is not None:
            assert hub is not None
            out.append(EarlyPublishStage(spec.publish, hub))
        out += ladder_stages(spec.ladder, spec.evaluation, rules=spec.rules)
    if spec.publish is not None:
        out.append(PublishStage(spec.publish, hub, spec.variant_of, whats_new=spec.whats_new))
    out += [VariantStage(spec, r, hub) for r in spec.variants]
    return tuple(out)


def run_job(spec: JobSpec, workdir: Path | WorkDir, hooks: Hooks, *, toolchain: Toolchain | None,
            hub: Hub | None = None) -> JobResult:
    """Run every stage of ``spec`` in ``workdir`` (finished stages skip themselves); ``hooks`` gets the progress
    and is asked between steps whether to stop."""
    wd = Path(WorkDir(workdir).path)
    ctx = JobContext(wd, toolchain, hooks, spec.model_name, source_repo=spec.source.repo,
                     source_revision=spec.source.revision, checkpoint_dir=spec.source.path, limits=spec.limits)
    try:
        run_stages(stages_for(spec, hub), ctx)
    except BaseException:
        if ctx.has(EARLY):  # uploads stop; a repo this run created and left empty is removed
            ctx.get(EARLY).abort()
        raise
    assert ctx.ladder is not None
    return JobResult(ladder=ctx.ladder, report=ctx.report, published=ctx.get(PUBLISHED, None),
                     variants=tuple(ctx.get(VARIANTS, ())), checkpoint_dir=ctx.checkpoint_dir)
