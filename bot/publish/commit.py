"""Publishing one work directory to the Hub: plan, then execute, in one atomic commit.

``plan_publish`` reads the work directory's ladder and report (:class:`converters.core.workdir.WorkDir`), asks the Hub what the target repo holds, and
returns a :class:`PublishPlan`: the files to upload (quants that passed the gate, imatrix files, chart,
report.json, README.md), the files to delete, and whether anything needs doing at all. ``execute``
carries a plan out: create the repo if needed, then *one* commit with ``parent_commit`` set, so a
failure anywhere (upload, validation, commit) leaves the repo as it was, and a concurrent change makes
the commit fail instead of being overwritten.

Idempotency: the published ``report.json`` carries a ``publication`` block (source repo and revision,
llama.cpp version, the ladder, every file's size and sha256, the card template's digest). When the
repo's block equals the one we would publish, and the repo's LFS files still have those hashes, no
commit is made. Anything else is an update, with a "What's new" line in the card.

Safety: nothing is published when ``report.json`` says ``publishable: false``; a file whose report
entry is missing or not ``passed`` is never uploaded, nor one whose sha256 is not the one the evaluation
measured (``report.json`` ``file_hashes``: quants, imatrix, projectors and the chart); the bytes uploaded are the
bytes verified (:meth:`bot.hub.client.Hub.commit` compares the sha256 of what it sends with the plan's and refuses a file
changed between the check and the upload); another model's repo is never written to (:mod:`bot.publish.target`
reads the target first: a different source or no ggufbot marker means the disambiguated name, or a failure);
the token is checked (``whoami``) before any upload starts, and never appears in a file, a log line or an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.model.repo_names import repo_name
from bot.publish import card as card_mod
from bot.publish.source_card import SourceFacts
from bot.publish import target as target_mod
from bot.publish.target import Identity, RemoteRepo, TargetPolicy
from converters.core.errors import CheckFailed, GgufbotError, HubError, HubNotFound, InputError
from converters.core import artifacts, records
from converters.core.records import TMP_MARK, content_sha256
from converters.core.report import PASSED, Report
from converters.core.workdir import CHART_FILE, REPORT_FILE, Ladder, VariantInfo, WorkDir

if TYPE_CHECKING:
    from bot.hub.client import Hub, Preuploaded

log = logging.getLogger(__name__)

DEFAULT_REPO_TEMPLATE = "{org}/{model}-GGUF"
DEFAULT_VARIANT_TEMPLATE = "{org}/{model}-{variant}-GGUF"
PUBLICATION_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class PublishOptions:
    repo_id: str | None = None  # explicit target (never renamed); else from the template
    repo_template: str | None = None  # None: DEFAULT_REPO_TEMPLATE (a variant: DEFAULT_VARIANT_TEMPLATE)
    namespace: str | None = None  # {org}; default: the token's user
    private: bool = False
    quantized_by: str | None = None  # default: the namespace
    gate_like_source: bool = True  # a gated source gets a gated repo (set before any file lands)
    policy: TargetPolicy = TargetPolicy()
    whats_new: tuple[str, ...] = ()  # an update's what's-new lines (card and commit); default: computed


@dataclasses.dataclass(frozen=True)
class PublishPlan:
    repo_id: str
    action: str  # "create" | "update" | "none"
    repo_exists: bool
    private: bool
    gated: bool | str
    additions: dict[str, Path]
    deletions: tuple[str, ...]
    message: str
    description: str
    parent_commit: str | None
    publication: dict[str, Any]
    whats_new: tuple[str, ...]
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # sha256 of each addition, as verified
    workdir: Path | None = None  # where the repos this publication creates are recorded (see created_repos)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for ``--dry-run`` and logs (paths relative to nothing of this machine)."""
        return {
            "repo_id": self.repo_id,
            "action": self.action,
            "repo_exists": self.repo_exists,
            "private": self.private,
            "gated": self.gated,
            "upload": dict(sorted(self.sizes.items())),
            "delete": list(self.deletions),
            "message": self.message,
            "whats_new": list(self.whats_new),
        }


@dataclasses.dataclass(frozen=True)
class PublishResult:
    repo_id: str
    action: str
    commit: str | None
    url: str


@dataclasses.dataclass(frozen=True)
class Early:
    """One commit of an early publication (:mod:`bot.publish.early`): the quant types it publishes (with those of
    the earlier commits; None: every passed one), the types still coming (empty: the full publication, the same
    plan as a single commit's), and the repo's publication before the job's first commit (what's new compares
    with it, not with the job's own earlier commits)."""

    types: frozenset[str] | None = None
    coming: tuple[str, ...] = ()
    base: Mapping[str, Any] | None = None


def early_view(report: Report, early: Early) -> Report:
    """``report`` as an early commit publishes it: the results of the types it does not publish yet are left out
    (failed ones stay: the card names them withheld), ``pending`` names the types still coming, and no chart (it
    plots files not in the repo yet; the last commit adds it)."""
    if early.types is None and not early.coming:
        return report
    keep = [f for f in report.files if f.status != PASSED or early.types is None or f.type in early.types]
    gone = {p for f in report.files if f not in keep for p in [f.path, *(str(x.get("path")) for x in f.parts)]}
    view = dataclasses.replace(report, files=keep, chart=None if early.coming else report.chart,
                               file_hashes={k: v for k, v in report.file_hashes.items() if k not in gone},
                               pending=list(early.coming), held=[])
    return view


def _safe_local(workdir: WorkDir, rel: str) -> Path:
    if not rel or TMP_MARK in rel or rel.startswith("/") or ".." in Path(rel).parts or "\\" in rel:
        raise InputError(f"refusing to publish {rel!r}: not a finished file inside the work directory")
    p = workdir.file(rel)
    if not p.is_file():
        raise InputError(f"{rel} is listed in ladder.json but missing from the work directory")
    return p


def collect_files(workdir: Path | WorkDir, ladder: Ladder, report: Report) -> dict[str, Path]:
    """Repo path -> local file for everything published except README.md and report.json."""
    wd = WorkDir(workdir)
    return {rel: _safe_local(wd, rel)
            for _kind, rel in artifacts.published_files(ladder, report, lambda rel: (wd.path / rel).is_file())}


def chart_name(report: Report) -> str:
    c = report.chart
    return c if isinstance(c, str) and c else CHART_FILE


def publication_block(ladder: Ladder, files: Mapping[str, Path], hashes: Mapping[str, str]) -> dict[str, Any]:
    """What identifies a publication: equal blocks mean nothing to publish. ``hashes``: each file's sha256, as
    checked against the measured one (:func:`verified_hashes`)."""
    return {
        "schema": PUBLICATION_SCHEMA,
        "source": {"repo": ladder.source.repo, "revision": ladder.source.revision},
        "toolchain": ladder.toolchain.version,
        "ladder": list(ladder.types),
        "files": {p: {"size": f.stat().st_size, "sha256": hashes[p]} for p, f in sorted(files.items())},
        "card_template": card_mod.template_digest(),
    }


def whats_new(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    if not old:
        return []
    out = []
    o_src, n_src = old.get("source") or {}, new.get("source") or {}
    if o_src.get("revision") != n_src.get("revision"):
        out.append(f"rebuilt from source commit {str(n_src.get('revision'))[:12]} "
                   f"(was {str(o_src.get('revision'))[:12]})")
    if old.get("toolchain") != new.get("toolchain"):
        out.append(f"requantized with {new.get('toolchain')} (was {old.get('toolchain')})")
    o_files, n_files = set((old.get("files") or {})), set(new.get("files") or {})
    added = sorted(n_files - o_files)
    removed = sorted(o_files - n_files)
    if added:
        out.append("added " + ", ".join(added))
    if removed:
        out.append("removed " + ", ".join(removed))
    changed = sorted(p for p in n_files & o_files if (old["files"][p] or {}).get("sha256") != new["files"][p]["sha256"])
    if changed and not out:
        out.append("updated " + ", ".join(changed))
    if not out:
        out.append("model card updated")
    return out


def _same(pub: Mapping[str, Any] | None, new: Mapping[str, Any], remote_lfs: Mapping[str, str | None]) -> bool:
    if not pub or {k: v for k, v in pub.items() if k != "published_at"} != dict(new):
        return False
    for p, meta in new["files"].items():
        if p not in remote_lfs:
            return False
        sha = remote_lfs[p]
        if sha is not None and sha != meta["sha256"]:
            return False
    return True


def _already_there(files: Mapping[str, Path], hashes: Mapping[str, str], remote_lfs: Mapping[str, str | None]) -> bool:
    """Whether every quant and imatrix file of ``files`` is in the repo already with the same content."""
    return all(remote_lfs.get(p) == hashes[p] for p in files if p.endswith((".gguf", ".dat")))


def _source_facts(hub: Hub, ladder: Ladder, gguf_files: list[Path] = ()) -> SourceFacts:
    src = ladder.source
    kw: dict[str, Any] = {"repo": src.repo, "revision": src.revision, "license": src.license}
    if src.repo:
        rec = None
        for rev in dict.fromkeys((src.revision, None)):
            try:
                rec = hub.model_info(src.repo, revision=rev)
                break
            except HubNotFound:
                continue
        if rec is None:
            log.warning("source %s not found on the Hub; the card uses local facts only", src.repo)
        if rec is not None:
            kw.update(card_data=rec.card_data, gated=rec.gated, pipeline_tag=rec.pipeline_tag,
                      license=src.license or rec.license)
    facts = SourceFacts.from_checkpoint(Path(src.path) if src.path else None, **kw)
    want_template = facts.chat_template is None and src.has_chat_template is not False
    if (facts.n_layer is None or want_template) and gguf_files:
        # the checkpoint is gone (or had no config): the quants carry the same facts in their header
        extra = SourceFacts.facts_from_gguf(gguf_files[0])
        if not want_template:
            extra.pop("chat_template", None)
        missing = {k: v for k, v in extra.items() if getattr(facts, k) is None}
        if missing:
            facts = dataclasses.replace(facts, **missing)
    return facts


def verified_hashes(workdir: WorkDir, report: Report, files: Mapping[str, Path]) -> dict[str, str]:
    """Each file's sha256 now (re-read unless its stat key is unchanged since it was hashed), which must be the one
    the evaluation measured (``report.json`` ``file_hashes``; the chart too: the evaluation records the one it
    drew). CheckFailed names every file that changed or was never measured."""
    measured = {p: str(v.get("sha256")) for p, v in report.file_hashes.items()}
    for f in report.files:  # reports that list the hashes only per file
        measured.update({str(pt.get("path")): str(pt.get("sha256")) for pt in f.parts if pt.get("path") not in measured})
    chart = report.chart
    if chart and chart in files and chart not in measured:
        # a work dir evaluated before the chart had its entry: the evaluate stage's record hashed it when written
        rec = records.load(workdir.path, "evaluate")
        measured.update({o.path: o.sha256 for o in (rec.outputs if rec else ()) if o.path == chart})
    out, changed, unmeasured = {}, [], []
    for rel, path in sorted(files.items()):
        out[rel] = content_sha256(path, workdir.path)
        if rel not in measured:
            unmeasured.append(rel)
        elif measured[rel] != out[rel]:
            changed.append(rel)
    if changed or unmeasured:
        why = "; ".join(x for x in (
            f"changed since it was measured: {', '.join(changed)}" if changed else "",
            f"not measured (no sha256 in {REPORT_FILE}): {', '.join(unmeasured)}" if unmeasured else "") if x)
        raise CheckFailed("publish", f"refusing to publish files that are not the ones evaluated ({why}); run "
                          "`ggufbot evaluate DIR` to measure them again")
    return out


def _publishable_files(workdir: WorkDir, ladder: Ladder, report: Report) -> dict[str, Path]:
    """The files to upload; CheckFailed when the report forbids publishing or no quant passed the gate."""
    if not report.publishable:
        why = "; ".join(str(r) for r in report.reasons if r) or f"see {REPORT_FILE}"
        raise CheckFailed("publish", f"report.json says the model is not publishable ({why})")
    files = collect_files(workdir, ladder, report)
    im_gguf = ladder.imatrix.gguf if ladder.imatrix else None
    if not any(p.endswith(".gguf") and p != im_gguf for p in files):
        raise CheckFailed("publish", "no quant passed the quality gate; nothing to publish")
    return files


def _write_staging(staging: Path, card_text: str, report: Report, pub: Mapping[str, Any],
                   now: dt.datetime) -> dict[str, Path]:
    """README.md and the published report.json (with its publication block) in ``staging``."""
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "README.md").write_text(card_text, encoding="utf-8")
    published_report = report.to_json()
    published_report["publication"] = {**pub, "published_at": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    (staging / REPORT_FILE).write_text(json.dumps(published_report, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return {"README.md": staging / "README.md", REPORT_FILE: staging / REPORT_FILE}


def _card_text(hub: Hub, ladder: Ladder, report: Report, files: Mapping[str, Path], spec: "_CardSpec") -> tuple[
        str, SourceFacts]:
    """The rendered model card and the source facts it was built from."""
    published = card_mod.published_files(ladder, report)
    facts = _source_facts(hub, ladder, [files[pf.file.path] for pf in published if pf.file.path in files])
    settings = card_mod.CardSettings(repo_id=spec.repo_id, quantized_by=spec.quantized_by, hub_url=hub.endpoint)
    # the card shows each quant's real size on disk (all parts of a split file)
    sizes = {f.type: sum(files[p].stat().st_size for p in f.all_parts if p in files) for f in ladder.files}
    chart = chart_name(report)
    extras = card_mod.CardExtras(whats_new=spec.whats_new, date=spec.now.date(),
                                 chart=chart if chart in files else None, sizes=sizes, variant=spec.variant,
                                 coming=spec.coming)
    ctx = card_mod.build_context(ladder, report, facts, settings, extras)
    return card_mod.render(ctx), facts


@dataclasses.dataclass(frozen=True)
class _CardSpec:
    repo_id: str
    quantized_by: str
    whats_new: tuple[str, ...]
    now: dt.datetime
    variant: VariantInfo | None
    coming: tuple[str, ...] = ()


def plan_publish(workdir: Path | WorkDir, hub: Hub, options: PublishOptions, *, staging: Path,
                 now: dt.datetime | None = None, variant: VariantInfo | None = None,
                 early: Early | None = None) -> PublishPlan:
    """Decide what to publish; writes README.md and report.json into ``staging``; no Hub writes.
    ``variant`` (a variant's variant.json) makes the card describe a pruned/healed variant of the source.
    ``early``: one commit of an early publication (its files, the ones coming, the publication it updates)."""
    wd = WorkDir(workdir)
    ladder, report = wd.ladder(), wd.report()
    if early is not None:
        report = early_view(report, early)
    files = _publishable_files(wd, ladder, report)
    hashes = verified_hashes(wd, report, files)

    user = hub.whoami()  # a bad token fails here, before anything is uploaded
    org = options.namespace or user
    model = ladder.model_name or wd.name
    remote = _target(hub, wd, options, ladder, org, variant)
    repo_id, exists, head, old_pub = remote.repo_id, remote.exists, remote.head, remote.publication
    remote_files = remote.files

    pub = publication_block(ladder, files, hashes)
    coming = early.coming if early is not None else ()
    if coming:
        pub["pending"] = list(coming)
    if exists and (_same(old_pub, pub, remote.lfs) or (coming and _already_there(files, hashes, remote.lfs))):
        # an early commit whose quants the repo has already (a re-run, a resumed job) adds nothing
        return PublishPlan(repo_id, "none", True, options.private, False, {}, (), "", "", head, pub, (),
                           workdir=wd.path)

    since = early.base if early is not None else old_pub
    news = (tuple(options.whats_new) or tuple(whats_new(since, pub))) if exists and since else ()
    now = now or dt.datetime.now(dt.timezone.utc)
    card_text, facts = _card_text(hub, ladder, report, files,
                                  _CardSpec(repo_id, options.quantized_by or org, news, now, variant, coming))
    additions = {**files, **_write_staging(staging, card_text, report, pub, now)}
    old_files = set((old_pub or {}).get("files") or {})
    deletions = tuple(sorted(p for p in remote_files if p not in additions and (
        p in old_files or artifacts.stale_in_repo(p))))
    message, description = _commit_text(model, ladder, report, pub, news, update=exists and bool(since))
    gated = facts.gated if options.gate_like_source and facts.gated else False
    made = {p: records.sha256_file(f) for p, f in additions.items() if p not in hashes}  # the card, report.json
    return PublishPlan(repo_id, "update" if exists else "create", exists, options.private, gated, additions,
                       deletions, message[:200], description, head, pub, news,
                       {p: f.stat().st_size for p, f in additions.items()}, {**hashes, **made}, wd.path)


def with_made_file(plan: PublishPlan, path_in_repo: str, local: Path) -> PublishPlan:
    """``plan`` with one more file made for this commit (like the card): uploaded with the sha256 it has now."""
    additions = {**plan.additions, path_in_repo: local}
    return dataclasses.replace(plan, additions=additions, sizes={k: p.stat().st_size for k, p in additions.items()},
                               hashes={**plan.hashes, path_in_repo: records.sha256_file(local)})


def prepare_repo(workdir: Path | WorkDir, hub: Hub, options: PublishOptions) -> tuple[RemoteRepo, bool]:
    """The target repo as it is now (:func:`_target`: never another model's), created empty (private and gated as
    a first commit would make it) when it does not exist yet, so that files can be pre-uploaded into it before its
    first commit; True when created now (noted in the work dir, like :func:`execute` does)."""
    wd = WorkDir(workdir)
    ladder = wd.ladder()
    org = options.namespace or hub.whoami()
    remote = _target(hub, wd, options, ladder, org, None)
    if remote.exists:
        return remote, False
    hub.create_repo(remote.repo_id, private=options.private, exist_ok=False)  # 409: someone else's, never noted
    target_mod.note_created(wd.path, remote.repo_id)
    try:
        gated = _source_facts(hub, ladder).gated if options.gate_like_source else False
        if gated:
            hub.set_gated(remote.repo_id, gated if isinstance(gated, str) else "auto")
        return target_mod.read_remote(hub, remote.repo_id), True
    except GgufbotError:
        remove_new_repo(hub, remote.repo_id)
        raise


def _target(hub: Hub, wd: WorkDir, options: PublishOptions, ladder: Ladder, org: str,
            variant: VariantInfo | None) -> RemoteRepo:
    """The target repo as it is now: the template's name (or ``options.repo_id``) when it is this model's, else
    the disambiguated ``{author}_{model}`` name (bot.publish.target.choose_target)."""
    author = ladder.source.author
    model = variant.teacher_model if variant is not None else (ladder.model_name or wd.name)
    recipe = variant.recipe.name if variant is not None else None
    template = options.repo_template or (DEFAULT_VARIANT_TEMPLATE if variant is not None else DEFAULT_REPO_TEMPLATE)
    first = options.repo_id or repo_name(template, namespace=org, model=model, author=author, variant=recipe)
    alt = None
    if options.repo_id is None and author:
        alt = repo_name(template, namespace=org, model=f"{author}_{model}", author=author, variant=recipe)
    ours = Identity(ladder.source.repo, ladder.model_name or wd.name,
                    card_mod.VARIANT_RELATION if variant is not None else "quantized")
    return target_mod.choose_target(hub, (first, alt), ours, options.policy, wd.path)


def _commit_text(model: str, ladder: Ladder, report: Report, pub: Mapping[str, Any], news: tuple[str, ...], *,
                 update: bool) -> tuple[str, str]:
    """The commit's message and description."""
    published = {pf.file.type for pf in card_mod.published_files(ladder, report)}
    types = ", ".join(t for t in pub["ladder"] if t in published)
    rev = (ladder.source.revision or "")[:12]
    coming = pub.get("pending") or []
    message = f"Update {model} GGUF: " + "; ".join(news) if update else f"Add {model} GGUF ({types})"
    if coming:
        message = f"{message} ({len(coming)} more coming)" if update else \
            f"Add {model} GGUF ({types}; {', '.join(coming)} coming)"
    description = (f"Source: {ladder.source.repo or model}" + (f"@{rev}" if rev else "")
                   + f"; llama.cpp {pub['toolchain']}.")
    return message, description


def execute(plan: PublishPlan, hub: Hub, preuploaded: Mapping[str, Preuploaded] | None = None) -> PublishResult:
    """Carry ``plan`` out: create the repo if needed, then one commit with ``parent_commit``; ``preuploaded``: files
    :meth:`bot.hub.client.Hub.preupload` has sent already (committed without reading them again)."""
    url = f"{hub.endpoint}/{plan.repo_id}"
    if plan.action == "none":
        log.info("publish %s: already up to date, no commit", plan.repo_id)
        return PublishResult(plan.repo_id, "none", None, url)
    created = False
    parent = plan.parent_commit
    if not plan.repo_exists:
        hub.create_repo(plan.repo_id, private=plan.private, exist_ok=False)  # 409: someone else's, never noted
        created = True
        if plan.workdir is not None:
            target_mod.note_created(plan.workdir, plan.repo_id)
        try:
            if plan.gated:
                hub.set_gated(plan.repo_id, plan.gated if isinstance(plan.gated, str) else "auto")
            parent = hub.model_info(plan.repo_id).sha
        except GgufbotError:
            remove_new_repo(hub, plan.repo_id)
            raise
    log.info("publish %s: %s, %d files up, %d deleted", plan.repo_id, plan.action, len(plan.additions),
             len(plan.deletions))
    try:
        sha = hub.commit(plan.repo_id, additions=plan.additions, deletions=list(plan.deletions),
                         message=plan.message, description=plan.description, parent_commit=parent,
                         expected_sha256=plan.hashes, preuploaded=preuploaded)
    except GgufbotError as e:
        if isinstance(e, HubError) and e.status == 412:
            # the branch moved: maybe our own commit landed and only its answer was lost
            now = target_mod.read_remote(hub, plan.repo_id)
            if now.exists and _same(now.publication, plan.publication, now.lfs):
                log.info("publish %s: commit %s already holds this publication (answer was lost)", plan.repo_id,
                         (now.head or "")[:12])
                return PublishResult(plan.repo_id, plan.action, now.head, url)
        if created:
            remove_new_repo(hub, plan.repo_id)
        if isinstance(e, HubError):
            raise type(e)(f"publishing {plan.repo_id} failed, the repo is unchanged: {e}", status=e.status,
                          request_id=e.request_id, retry_after=e.retry_after) from None
        raise
    log.info("publish %s: commit %s", plan.repo_id, (sha or "")[:12])
    return PublishResult(plan.repo_id, plan.action, sha, url)


def remove_new_repo(hub: Hub, repo_id: str) -> None:
    """A repo created by this run whose first commit failed is removed: no empty half-published repo."""
    try:
        hub.delete_repo(repo_id, missing_ok=True)
    except GgufbotError as e:
        log.warning("could not remove the empty repo %s after a failed publish: %s", repo_id, e.short())


@contextlib.contextmanager
def staging_dir() -> Iterator[Path]:
    """A scratch folder for the files made for one commit (card, published report), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="ggufbot-publish-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def publish(workdir: Path | WorkDir, hub: Hub, options: PublishOptions = PublishOptions(), *, dry_run: bool = False,
            now: dt.datetime | None = None) -> tuple[PublishPlan, PublishResult | None]:
    """Plan and (unless ``dry_run``) execute; returns the plan and the result (None for a dry run)."""
    with staging_dir() as staging:
        plan = plan_publish(workdir, hub, options, staging=staging, now=now)
        if dry_run:
            return plan, None
        return plan, execute(plan, hub)
