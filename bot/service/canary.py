"""The canary of a new llama.cpp build: a small reference model converted, quantized and evaluated with the new build
and with the build in use, and the two compared before the bot switches (bot/service/follow.py).

The canary model is a Hub repo (``[toolchain] canary_repo``) fetched like any model; its job is the bot's own
(:meth:`bot.jobs.job.JobSpec.from_settings`) with the canary's ladder and evaluation chunks, never published. The
build in use is measured once per (build, model revision, ladder, chunks) and its figures cached beside the canary
work directories; only the new build runs on every release.

What a canary checks (:func:`compare`):
- the new build's report is publishable (the BF16-vs-source comparison, tokenizer, template and the other checks the
  gate reads pass: a converter that damages weights or the tokenizer fails here);
- every check that passed with the build in use passes with the new one (same tokenizer and template checks);
- every quant type passed the gate with both, and its mean KLD to the reference is the same within
  ``canary_tolerance`` combined standard errors (plus a floor of :data:`KLD_FLOOR` for files that are near-lossless).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from bot.jobs import texts
from bot.jobs.job import JobSpec, LazyText, run_job
from bot.hub.client import Hub
from bot.model.settings import Settings
from converters.core.errors import GgufbotError
from converters.core.hooks import Hooks

log = logging.getLogger(__name__)

KLD_FLOOR = 1e-3  # KLD differences below this are noise whatever the error estimate says
FIGURES = "canary-figures.json"


@dataclasses.dataclass(frozen=True)
class Figures:
    """What one build measured on the canary model."""

    build: str
    revision: str | None
    publishable: bool
    reasons: tuple[str, ...]
    checks: dict[str, str]  # check name -> passed / failed / skipped
    files: dict[str, dict[str, Any]]  # quant type -> status, kld_mean, kld_mean_err
    error: str | None = None  # the canary job itself failed (conversion crashed...)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Figures":
        return cls(build=d["build"], revision=d.get("revision"), publishable=bool(d.get("publishable")),
                   reasons=tuple(d.get("reasons") or ()), checks=dict(d.get("checks") or {}),
                   files=dict(d.get("files") or {}), error=d.get("error"))


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]

    def summary(self) -> str:
        return "passed" if self.passed else "failed: " + "; ".join(self.reasons)


def compare(new: Figures, current: Figures, tolerance: float) -> Verdict:
    """Is the new build as good as the one in use on the canary model? (the reasons when not)"""
    why: list[str] = []
    if new.error:
        why.append(f"the canary job failed: {new.error}")
        return Verdict(False, tuple(why))
    if not new.publishable:
        why.append("the canary's report is not publishable: " + ("; ".join(new.reasons) or "no reason given"))
    for name, status in sorted(current.checks.items()):
        if status != "failed" and new.checks.get(name) == "failed":
            why.append(f"check {name} passed with {current.build} and fails with {new.build}")
    for qtype, cur in sorted(current.files.items()):
        got = new.files.get(qtype)
        if got is None:
            why.append(f"{qtype} was not measured")
            continue
        if cur.get("status") == "passed" and got.get("status") != "passed":
            why.append(f"{qtype} failed the gate")
        a, b = got.get("kld_mean"), cur.get("kld_mean")
        if a is None or b is None:
            continue
        err = math.hypot(got.get("kld_mean_err") or 0.0, cur.get("kld_mean_err") or 0.0)
        if abs(a - b) > tolerance * err + KLD_FLOOR:
            why.append(f"{qtype} mean KLD {a:.5f} vs {b:.5f} with the build in use (more than {tolerance:g} "
                       f"standard errors of {err:.5f} apart)")
    return Verdict(not why, tuple(why))


def figures_of(report: Any, build: str, revision: str | None) -> Figures:
    files = {}
    for f in report.files:
        st = f.stats
        files[f.type] = {"status": f.status, "kld_mean": st.kld_mean if st else None,
                         "kld_mean_err": st.kld_mean_err if st else None}
    checks = {name: c.status for name, c in report.checks.items()}
    return Figures(build=build, revision=revision, publishable=bool(report.publishable),
                   reasons=tuple(report.reasons), checks=checks, files=files)


class Canary:
    """Runs the canary job of one build into ``root/<build>/`` and caches its figures there."""

    def __init__(self, settings: Settings, hub: Hub, root: Path) -> None:
        self.settings = settings
        self.hub = hub
        self.root = root
        self._texts: dict[str, Any] = {}

    def spec(self, revision: str) -> JobSpec:
        s, t = self.settings, self.settings.toolchain
        assert t.canary_repo is not None
        q = dataclasses.replace(s.quantize, ladder=t.canary_ladder, variants=(), tune=(), fit=(), jobs=1,
                                evaluation_chunks=t.canary_chunks,
                                calibration_chunks=min(s.quantize.calibration_chunks or t.canary_chunks,
                                                       t.canary_chunks))
        s2 = dataclasses.replace(s, quantize=q, target=dataclasses.replace(s.target, publish=False))
        spec = JobSpec.from_settings(s2, t.canary_repo, revision,
                                     calibration=LazyText(lambda: self._text(q.calibration_text, "calibration")),
                                     evaluation=LazyText(lambda: self._text(q.evaluation_text, "evaluation")))
        assert spec.evaluation is not None
        # a report that is not publishable is a verdict here, not an error
        return dataclasses.replace(spec, publish=None, variant_publish=None,
                                   evaluation=dataclasses.replace(spec.evaluation, require_publishable=False))

    def measure(self, build: Any, toolchain: Any, revision: str, *, cached: bool) -> Figures:
        """The build's figures on the canary model at ``revision`` (``cached``: reuse earlier figures of the same
        build, revision, ladder and chunks)."""
        t = self.settings.toolchain
        d = self.root / build.name
        key = {"revision": revision, "ladder": t.canary_ladder, "chunks": t.canary_chunks, "repo": t.canary_repo}
        cache = d / FIGURES
        if cached and cache.exists():
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return Figures.from_json(data["figures"])
        work = d / "work"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        log.info("canary: %s on %s@%s", build.name, t.canary_repo, revision[:12])
        try:
            res = run_job(self.spec(revision), work, Hooks(), toolchain=toolchain, hub=self.hub)
        except GgufbotError as e:
            figs = Figures(build=build.name, revision=revision, publishable=False, reasons=(), checks={}, files={},
                           error=f"{type(e).__name__}: {e.short()}")
        else:
            if res.report is None:
                figs = Figures(build=build.name, revision=revision, publishable=False, reasons=(), checks={},
                               files={}, error="no report")
            else:
                figs = figures_of(res.report, build.name, revision)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cache.write_text(json.dumps({"key": key, "figures": figs.to_json()}, indent=2))
        return figs

    def _text(self, spec: str | None, kind: str) -> Any:
        spec = spec or (texts.DEFAULT_CALIBRATION if kind == "calibration" else texts.DEFAULT_EVALUATION)
        if spec not in self._texts:
            self._texts[spec] = texts.resolve_text(spec, hub=self.hub)
        return self._texts[spec]
