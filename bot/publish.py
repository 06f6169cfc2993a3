"""Publishing one work directory to the Hub: plan, then execute, in one atomic commit.

``plan_publish`` reads ``ladder.json`` and ``report.json``, asks the Hub what the target repo holds, and
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
entry is missing or not ``passed`` is never uploaded; the token is checked (``whoami``) before any
upload starts, and never appears in a file, a log line or an error.
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
from typing import Any

from bot import card as card_mod
from converters.errors import CheckFailed, ConfigError, GgufbotError, HubError, HubNotFound, InputError
from converters.records import TMP_MARK, sha256_file

log = logging.getLogger(__name__)

DEFAULT_REPO_TEMPLATE = "{org}/{model}-GGUF"
PUBLICATION_SCHEMA = 1
CHART_NAME = "size-vs-kld.png"


@dataclasses.dataclass(frozen=True)
class PublishOptions:
    repo_id: str | None = None  # explicit target; else from the template
    repo_template: str = DEFAULT_REPO_TEMPLATE
    namespace: str | None = None  # {org}; default: the token's user
    private: bool = False
    quantized_by: str | None = None  # default: the namespace
    gate_like_source: bool = True  # a gated source gets a gated repo (set before any file lands)


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


def load_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path.name} not found in {path.parent.name}/: run the earlier stages first") from None
    except ValueError as e:
        raise InputError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise InputError(f"{path.name} must hold a JSON object")
    return d


def repo_name(template: str, *, org: str, model: str, author: str | None = None) -> str:
    """``{org}`` (target namespace), ``{model}`` (model name), ``{author}`` (the source repo's owner)."""
    try:
        name = template.format(org=org, model=model, author=author or org)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"bad repo name template {template!r}: {e}; use {{org}}, {{model}}, {{author}}",
                          key="target.repo_template") from None
    if "/" not in name:  # a template without the namespace, like settings' "{model}-GGUF"
        name = f"{org}/{name}"
    return name


def _safe_local(workdir: Path, rel: str) -> Path:
    if not rel or TMP_MARK in rel or rel.startswith("/") or ".." in Path(rel).parts or "\\" in rel:
        raise InputError(f"refusing to publish {rel!r}: not a finished file inside the work directory")
    p = workdir / rel
    if not p.is_file():
        raise InputError(f"{rel} is listed in ladder.json but missing from the work directory")
    return p


def collect_files(workdir: Path, ladder: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Path]:
    """Repo path -> local file for everything published except README.md and report.json."""
    out: dict[str, Path] = {}
    for f in card_mod.published_files(ladder, report):
        for part in f.get("parts") or [f["path"]]:
            out[part] = _safe_local(workdir, part)
    im = ladder.get("imatrix") or {}
    for key in ("gguf", "dat"):
        if im.get(key) and (workdir / im[key]).is_file():
            out[im[key]] = _safe_local(workdir, im[key])
    chart = chart_name(report)
    if (workdir / chart).is_file():
        out[chart] = _safe_local(workdir, chart)
    return out


def chart_name(report: Mapping[str, Any]) -> str:
    c = report.get("chart")
    return c if isinstance(c, str) and c else CHART_NAME


def publication_block(ladder: Mapping[str, Any], files: Mapping[str, Path]) -> dict[str, Any]:
    """What identifies a publication: equal blocks mean nothing to publish."""
    src = ladder.get("source") or {}
    # ladder.json already holds the sha256 of each quant (of part 1 when split): not hashed again
    known = {(f.get("path"), f.get("size")): f.get("sha256") for f in ladder.get("files", []) if f.get("sha256")}
    return {
        "schema": PUBLICATION_SCHEMA,
        "source": {"repo": src.get("repo"), "revision": src.get("revision")},
        "toolchain": (ladder.get("toolchain") or {}).get("version"),
        "ladder": [f["type"] for f in ladder.get("files", [])],
        "files": {p: {"size": f.stat().st_size, "sha256": known.get((p, f.stat().st_size)) or sha256_file(f)}
                  for p, f in sorted(files.items())},
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


def _remote_state(hub: Any, repo_id: str) -> tuple[bool, str | None, dict | None, dict[str, str | None], list[str]]:
    """(exists, head sha, publication block, {path: lfs sha256}, files) of the target repo."""
    try:
        info = hub.model_info(repo_id)
    except HubNotFound:
        return False, None, None, {}, []
    files = [s.rfilename for s in info.siblings]
    lfs = {s.rfilename: s.lfs_sha256 for s in info.siblings}
    pub = None
    if "report.json" in files:
        text = hub.read_text(repo_id, "report.json", revision=info.sha)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            pub = json.loads(text or "").get("publication")
    return True, info.sha, pub, lfs, files


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


def _source_facts(hub: Any, ladder: Mapping[str, Any], gguf_files: list[Path] = ()) -> card_mod.SourceFacts:
    src = ladder.get("source") or {}
    kw: dict[str, Any] = {"repo": src.get("repo"), "revision": src.get("revision"), "license": src.get("license")}
    if src.get("repo"):
        rec = None
        for rev in dict.fromkeys((src.get("revision"), None)):
            try:
                rec = hub.model_info(src["repo"], revision=rev)
                break
            except HubNotFound:
                continue
        if rec is None:
            log.warning("source %s not found on the Hub; the card uses local facts only", src["repo"])
        if rec is not None:
            kw.update(card_data=rec.card_data, gated=rec.gated, pipeline_tag=rec.pipeline_tag,
                      license=src.get("license") or rec.license)
    path = src.get("path")
    facts = card_mod.SourceFacts.from_checkpoint(Path(path) if path else None, **kw)
    want_template = facts.chat_template is None and src.get("has_chat_template") is not False
    if (facts.n_layer is None or want_template) and gguf_files:
        # the checkpoint is gone (or had no config): the quants carry the same facts in their header
        extra = card_mod.SourceFacts.facts_from_gguf(gguf_files[0])
        if not want_template:
            extra.pop("chat_template", None)
        missing = {k: v for k, v in extra.items() if getattr(facts, k) is None}
        if missing:
            facts = dataclasses.replace(facts, **missing)
    return facts


def plan_publish(workdir: Path, hub: Any, options: PublishOptions, *, staging: Path,
                 now: dt.datetime | None = None, variant: Mapping[str, Any] | None = None) -> PublishPlan:
    """Decide what to publish; writes README.md and report.json into ``staging``; no Hub writes.
    ``variant`` (a variant's variant.json) makes the card describe a pruned/healed variant of the source."""
    workdir = Path(workdir)
    ladder = load_json(workdir / "ladder.json")
    report = load_json(workdir / "report.json")
    if report.get("publishable") is False:
        why = "; ".join(str(r) for r in report.get("reasons", []) if r) or "see report.json"
        raise CheckFailed("publish", f"report.json says the model is not publishable ({why})")
    if "publishable" not in report:
        raise CheckFailed("publish", "report.json has no verdict ('publishable'); run evaluate and verify first")
    files = collect_files(workdir, ladder, report)
    if not any(p.endswith(".gguf") and p not in ((ladder.get("imatrix") or {}).get("gguf"),) for p in files):
        raise CheckFailed("publish", "no quant passed the quality gate; nothing to publish")

    user = hub.whoami()  # a bad token fails here, before anything is uploaded
    org = options.namespace or user
    model = ladder.get("model_name") or workdir.name
    author = ((ladder.get("source") or {}).get("repo") or "").split("/")[0] or None
    repo_id = options.repo_id or repo_name(options.repo_template, org=org, model=model, author=author)

    pub = publication_block(ladder, files)
    exists, head, old_pub, remote_lfs, remote_files = _remote_state(hub, repo_id)
    if exists and _same(old_pub, pub, remote_lfs):
        return PublishPlan(repo_id, "none", True, options.private, False, {}, (), "", "", head, pub, ())

    ggufs = [files[f["path"]] for f in card_mod.published_files(ladder, report) if f["path"] in files]
    facts = _source_facts(hub, ladder, ggufs)
    news = tuple(whats_new(old_pub, pub)) if exists else ()
    now = now or dt.datetime.now(dt.timezone.utc)
    settings = card_mod.CardSettings(repo_id=repo_id, quantized_by=options.quantized_by or org,
                                     hub_url=hub.endpoint)
    # the card shows each quant's real size on disk (all parts of a split file)
    card_ladder = dict(ladder)
    card_ladder["files"] = [{**f, "total_size": sum(files[p].stat().st_size for p in (f.get("parts") or [f["path"]])
                                                     if p in files)} for f in ladder.get("files", [])]
    chart = chart_name(report)
    ctx = card_mod.build_context(card_ladder, report, facts, settings, whats_new=news, date=now.date(),
                                 chart=chart if chart in files else None, variant=variant)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "README.md").write_text(card_mod.render(ctx), encoding="utf-8")
    published_report = dict(report)
    published_report["publication"] = {**pub, "published_at": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    (staging / "report.json").write_text(json.dumps(published_report, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")

    additions = dict(files)
    additions["README.md"] = staging / "README.md"
    additions["report.json"] = staging / "report.json"
    old_files = set((old_pub or {}).get("files") or {})
    deletions = tuple(sorted(p for p in remote_files if p not in additions and (
        p in old_files or p.endswith(".gguf") or p.endswith("-imatrix.dat"))))
    types = ", ".join(t for t in pub["ladder"] if any(f["type"] == t for f in card_mod.published_files(ladder, report)))
    src = ladder.get("source") or {}
    rev = (src.get("revision") or "")[:12]
    if exists and old_pub:
        message = f"Update {model} GGUF: " + "; ".join(news)
    else:
        message = f"Add {model} GGUF ({types})"
    description = (f"Source: {src.get('repo') or model}" + (f"@{rev}" if rev else "")
                   + f"; llama.cpp {pub['toolchain']}.")
    gated = facts.gated if options.gate_like_source and facts.gated else False
    return PublishPlan(repo_id, "update" if exists else "create", exists, options.private, gated, additions,
                       deletions, message[:200], description, head, pub, news,
                       {p: f.stat().st_size for p, f in additions.items()})


def execute(plan: PublishPlan, hub: Any) -> PublishResult:
    url = f"{hub.endpoint}/{plan.repo_id}"
    if plan.action == "none":
        log.info("publish %s: already up to date, no commit", plan.repo_id)
        return PublishResult(plan.repo_id, "none", None, url)
    created = False
    parent = plan.parent_commit
    if not plan.repo_exists:
        hub.create_repo(plan.repo_id, private=plan.private, exist_ok=False)
        created = True
        try:
            if plan.gated:
                hub.set_gated(plan.repo_id, plan.gated if isinstance(plan.gated, str) else "auto")
            parent = hub.model_info(plan.repo_id).sha
        except GgufbotError:
            _remove_new_repo(hub, plan.repo_id)
            raise
    log.info("publish %s: %s, %d files up, %d deleted", plan.repo_id, plan.action, len(plan.additions),
             len(plan.deletions))
    try:
        sha = hub.commit(plan.repo_id, additions=plan.additions, deletions=list(plan.deletions),
                         message=plan.message, description=plan.description, parent_commit=parent)
    except GgufbotError as e:
        if isinstance(e, HubError) and e.status == 412:
            # the branch moved: maybe our own commit landed and only its answer was lost
            exists, head, pub, lfs, _files = _remote_state(hub, plan.repo_id)
            if exists and _same(pub, plan.publication, lfs):
                log.info("publish %s: commit %s already holds this publication (answer was lost)", plan.repo_id,
                         (head or "")[:12])
                return PublishResult(plan.repo_id, plan.action, head, url)
        if created:
            _remove_new_repo(hub, plan.repo_id)
        if isinstance(e, HubError):
            raise type(e)(f"publishing {plan.repo_id} failed, the repo is unchanged: {e}", status=e.status,
                          request_id=e.request_id, retry_after=e.retry_after) from None
        raise
    log.info("publish %s: commit %s", plan.repo_id, (sha or "")[:12])
    return PublishResult(plan.repo_id, plan.action, sha, url)


def _remove_new_repo(hub: Any, repo_id: str) -> None:
    """A repo created by this run whose first commit failed is removed: no empty half-published repo."""
    try:
        hub.delete_repo(repo_id, missing_ok=True)
    except GgufbotError as e:
        log.warning("could not remove the empty repo %s after a failed publish: %s", repo_id, e.short())


@contextlib.contextmanager
def _staging_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ggufbot-publish-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def publish(workdir: Path, hub: Any, options: PublishOptions = PublishOptions(), *, dry_run: bool = False,
            now: dt.datetime | None = None) -> tuple[PublishPlan, PublishResult | None]:
    """Plan and (unless ``dry_run``) execute; returns the plan and the result (None for a dry run)."""
    with _staging_dir() as staging:
        plan = plan_publish(workdir, hub, options, staging=staging, now=now)
        if dry_run:
            return plan, None
        return plan, execute(plan, hub)
