"""Publishing a variant work directory as its own repo, with a card that says what the variant is.

The ladder, report and file upload are the normal publishing path (:mod:`bot.publish.commit`: one atomic commit,
no commit when nothing changed). The card knows variants natively (:func:`bot.publish.card.build_context` with the
``variant`` block from ``variant.json``: recipe, layers / parameters / size before and after, how it was
healed, the quality measured against the teacher next to the teacher's own quants of the same type; its
``base_model`` is the source and ``base_model_relation`` is ``finetune``), and a ``variant.json`` without
local paths is published beside it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from bot.hub.client import Hub
from bot.publish import commit as publish_mod
from converters.core.errors import InputError
from converters.core.workdir import VARIANT_FILE, VariantInfo, WorkDir

log = logging.getLogger(__name__)


def public_info(info: VariantInfo) -> dict[str, Any]:
    """variant.json as published: the same figures, without paths of this machine."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in ("path", "cache_dir")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(info.to_json())


def publish_variant(workdir: Path, hub: Hub, options: publish_mod.PublishOptions = publish_mod.PublishOptions(), *,
                    dry_run: bool = False,
                    now: dt.datetime | None = None) -> publish_mod.PublishResult | publish_mod.PublishPlan:
    """Publish a variant work dir to ``{org}/{model}-{variant}-GGUF`` (``options.repo_template``, or
    ``options.repo_id``) in one commit; another model's repo there is never touched (bot.publish.target)."""
    wd = WorkDir(workdir)
    info = wd.variant()
    if info is None:
        raise InputError(f"{wd.path} has no {VARIANT_FILE}: it is not a variant work directory")
    with publish_mod.staging_dir() as staging:
        plan = publish_mod.plan_publish(wd, hub, options, staging=staging, now=now, variant=info)
        if plan.action != "none":
            vj = staging / VARIANT_FILE
            vj.write_text(json.dumps(public_info(info), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            plan = publish_mod.with_made_file(plan, VARIANT_FILE, vj)
        if dry_run:
            return plan
        return publish_mod.execute(plan, hub)
