"""Running a bot job of either kind: the policy over :func:`bot.jobs.job.run_job`.

:func:`run_for_job` asks :func:`bot.jobs.patch.choose` whether the job is a full one or a metadata patch of the
published files, records the decision (a ``job.kind`` event), runs the job, and when the patch is refused on the
way, marks the work directory (``kind.json``) and runs the full job there. ``bot.jobs.patch`` only provides the
patch's stages and the decision; ``bot.jobs.job`` composes the stages of a spec; this module sits above both.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bot.hub.client import Hub
from bot.jobs.job import JobResult, JobSpec, run_job
from bot.jobs.patch import FULL, KIND_FILE, Classification, choose
from bot.state.store import Job, StateStore
from converters.core import records
from converters.core.errors import PatchRefused
from converters.core.hooks import Hooks
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)


def run_for_job(spec: JobSpec, job: Job, workdir: Path, hooks: Hooks, *, store: StateStore, hub: Hub,
                toolchain: Toolchain | None, clock: Callable[[], float] = time.time) -> tuple[JobResult, Classification]:
    """Decide the kind of ``job``, record it, run it; a refused patch falls back to the full job (recorded)."""
    cls, base = choose(job, store, hub, workdir=Path(workdir), toolchain_version=getattr(toolchain, "version", None))
    store.event("job.kind", f"{cls.kind} job: {cls.reason}", now=clock(), job_id=job.id, repo=job.repo,
                data={"kind": cls.kind, "reason": cls.reason, "changed": list(cls.changed)})
    log.info("job %d %s: %s job (%s)", job.id, job.repo, cls.kind, cls.reason)
    if base is None:
        return run_job(spec, workdir, hooks, toolchain=toolchain, hub=hub), cls
    try:
        target = dataclasses.replace(spec.publish, repo_id=base.target_repo) if spec.publish is not None else None
        patch_spec = dataclasses.replace(spec, patch=base, variants=(), publish=target,
                                         whats_new=(base.whats_new(job.revision),))
        return run_job(patch_spec, workdir, hooks, toolchain=toolchain, hub=hub), cls
    except PatchRefused as e:
        why = f"metadata patch refused: {e.reason}; running the full job"
        log.warning("job %d %s: %s", job.id, job.repo, why)
        store.event("job.kind", f"full job: {why}", now=clock(), job_id=job.id, repo=job.repo,
                    data={"kind": FULL, "reason": why, "changed": list(cls.changed)})
        _reset(Path(workdir))
        records.write_json_atomic(Path(workdir) / KIND_FILE, {"kind": FULL, "reason": why})
        full = Classification(FULL, why, cls.changed)
        return run_job(spec, workdir, hooks, toolchain=toolchain, hub=hub), full


def _reset(workdir: Path) -> None:
    """Remove what the refused patch wrote (its downloads, patched files and records) before the full job."""
    for p in list(workdir.iterdir()) if workdir.is_dir() else ():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
