"""Publishing a variant work directory as its own repo, with a card that says what the variant is.

The ladder, report and file upload are the normal publishing path (:mod:`bot.publish`: one atomic commit,
no commit when nothing changed). On top of it, the card gets a section rendered from ``variant.json``
(recipe, layers / parameters / size before and after, how it was healed, the quality measured against the
teacher next to the teacher's own quants of the same type), the card's ``base_model_relation`` says
``finetune`` rather than ``quantized``, and a ``variant.json`` without local paths is published beside it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot import card as card_mod
from bot import publish as publish_mod
from converters import variants
from converters.errors import InputError

log = logging.getLogger(__name__)

SECTION_TEMPLATE = "variant_section.md.j2"


def _change(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "-"
    return f"{(after - before) / before:+.1%}"


def _num(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"


def _pct(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return f"{x * 100 if x <= 1.0 else x:.2f} %"


def section_context(info: Mapping[str, Any], *, hub_url: str = "", reference_type: str = "BF16") -> dict[str, Any]:
    """Everything the variant section shows, from variant.json (pure)."""
    recipe = info["recipe"]
    t, v, p = info["teacher"], info["variant"], info["prune"]
    d = info.get("distill")
    ev = info.get("evaluation")
    teacher_repo = t.get("repo")
    files = []
    if ev:
        tf = ev.get("teacher_files") or {}
        for typ, f in ev.get("files", {}).items():
            other = tf.get(typ) or {}
            files.append({"type": typ, "kld": _num(f.get("kld_mean")), "same_top_p": _pct(f.get("same_top_p")),
                          "size": card_mod.human_bytes(f.get("size")) if f.get("size") else "-",
                          "teacher_kld": _num(other.get("kld_mean")), "teacher_same_top_p": _pct(other.get("same_top_p")),
                          "teacher_size": card_mod.human_bytes(other.get("size")) if other.get("size") else "-"})
    calib = (p.get("calibration") or {})
    return {
        "title": info.get("model_name") or f"{t.get('model_name')}-{recipe['name']}",
        "recipe": recipe["name"],
        "summary": recipe["summary"],
        "teacher_repo": teacher_repo,
        "teacher_url": f"{hub_url.rstrip('/')}/{teacher_repo}" if teacher_repo and hub_url else None,
        "teacher_name": t.get("model_name") or "the original model",
        "layers_before": t["layers"], "layers_after": v["layers"],
        "intermediate_before": t.get("intermediate_size"), "intermediate_after": v.get("intermediate_size"),
        "params_before": f"{t['parameters']:,}", "params_after": f"{v['parameters']:,}",
        "params_change": _change(t["parameters"], v["parameters"]),
        "size_before": card_mod.human_bytes(t["bytes"]), "size_after": card_mod.human_bytes(v["bytes"]),
        "size_change": _change(t["bytes"], v["bytes"]),
        "removed_layers": ", ".join(str(i) for i in p.get("removed_layers") or []),
        "prune_method": p.get("method"),
        "calibration": (info.get("calibration") or {}).get("name") or calib.get("name"),
        "calib_samples": calib.get("samples"), "calib_seq_len": calib.get("seq_len"),
        "distill": {
            "steps": d["steps"], "batch": d["config"]["batch_size"], "seq_len": d["config"]["seq_len"],
            "temperature": f"{d['config']['temperature']:g}", "lr": f"{d['config']['lr']:g}",
            "seed": d["config"]["seed"], "loss_first": _num(d["loss_first"]), "loss_last": _num(d["loss_last"]),
            "device": d["device"], "dtype": d["dtype"], "seconds": f"{d['seconds']:.0f}",
        } if d else None,
        "evaluation": {"text": ev.get("text"), "chunks": ev.get("chunks"), "ctx": ev.get("ctx"),
                       "reference_kld": _num(ev.get("reference_kld_mean")), "files": files,
                       "has_teacher": bool(ev.get("teacher_files"))} if ev else None,
        "reference_type": reference_type,
    }


def render_section(info: Mapping[str, Any], *, hub_url: str = "", reference_type: str = "BF16") -> str:
    ctx = section_context(info, hub_url=hub_url, reference_type=reference_type)
    return card_mod.environment().get_template(SECTION_TEMPLATE).render(**ctx)


def insert_section(card: str, section: str) -> str:
    """The card with ``section`` before its first level-2 heading after the front matter (or at the end), and
    the base model relation of a derived model."""
    card = re.sub(r"(?m)^base_model_relation: quantized$", "base_model_relation: finetune", card, count=1)
    body_start = 0
    if card.startswith("---"):
        end = card.find("\n---", 3)
        body_start = end + 4 if end >= 0 else 0
    m = re.compile(r"(?m)^## ").search(card, body_start)
    if m is None:
        return card.rstrip("\n") + "\n\n" + section
    return card[: m.start()] + section.rstrip("\n") + "\n\n" + card[m.start():]


def public_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """variant.json as published: the same figures, without paths of this machine."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in ("path", "cache_dir")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(dict(info))


def publish_variant(workdir: Path, hub: Any, *, namespace: str | None = None, repo_id: str | None = None,
                    repo_pattern: str = variants.DEFAULT_REPO_PATTERN, private: bool = False,
                    teacher_workdir: Path | None = None, dry_run: bool = False,
                    now: dt.datetime | None = None) -> publish_mod.PublishResult | publish_mod.PublishPlan:
    """Publish a variant work dir to ``{org}/{model}-{variant}-GGUF`` (or ``repo_id``) in one commit."""
    workdir = Path(workdir)
    info = variants.load_info(workdir)
    if info is None:
        raise InputError(f"{workdir} has no {variants.VARIANT_FILE}: it is not a variant work directory")
    org = namespace or hub.whoami()
    teacher_model = info["teacher"].get("model_name") or Path(info["teacher"].get("path", "model")).name
    rid = repo_id or variants.repo_id(org, teacher_model, info["recipe"]["name"], repo_pattern)
    options = publish_mod.PublishOptions(repo_id=rid, namespace=org, private=private)
    with publish_mod._staging_dir() as staging:
        plan = publish_mod.plan_publish(workdir, hub, options, staging=staging, now=now)
        if plan.action != "none":
            readme = staging / "README.md"
            ladder = json.loads((workdir / "ladder.json").read_text())
            section = render_section(info, hub_url=hub.endpoint,
                                     reference_type=(ladder.get("reference") or {}).get("type") or "BF16")
            readme.write_text(insert_section(readme.read_text(encoding="utf-8"), section), encoding="utf-8")
            vj = staging / variants.VARIANT_FILE
            vj.write_text(json.dumps(public_info(info), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            additions = {**plan.additions, variants.VARIANT_FILE: vj}
            plan = dataclasses.replace(plan, additions=additions,
                                       sizes={k: p.stat().st_size for k, p in additions.items()})
        if dry_run:
            return plan
        return publish_mod.execute(plan, hub)
