"""A real job publishes early (issue 20): the pipeline stage announces each file's final verdict (``FILE_READY``),
the early publisher uploads it and commits Q4_K_M first, on its own, with the rest still coming; the publish stage
makes the last commit, which is the publication a single commit would make. Q4_K_M's verdict is final only once the
ladder's curve around it is measured (two files below it, the one above): on this four-type ladder, at the last
measurement.

The shared SmolLM2 ladder (``smol_workdir``: Q8_0, Q4_K_M, IQ4_XS, Q2_K) is copied, so its conversion, imatrix and
quants are found done; the job measures the four files (2 chunks of 256 tokens) and publishes to the local Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.jobs.job import JobSpec, PublishTarget, Source, run_job, stages_for
from bot.model.retry import RetryPolicy
from bot.publish.commit import publish
from bot.publish.early import EarlyOptions, file_states
from converters.core.hooks import PROGRESS, Event, Hooks
from converters.ladder.job import CheckpointRules, EvalSettings
from converters.ladder.pipeline import LadderOptions
from converters.llama.calibrate import TextFile
from tests.conftest import SMOL_CAL_CHUNKS, SMOL_CAL_CTX, SMOL_LADDER
from tests.hub_fixtures import TEST_ORG
from tests.hubserver import HubServer

pytestmark = [pytest.mark.slow, pytest.mark.llama]

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET = f"{TEST_ORG}/SmolLM2-135M-Instruct-GGUF"


def test_a_job_commits_q4_k_m_first_once_its_curve_is_measured(hub_server: HubServer, smol_workdir: Path,
                                                                 smollm2: Path, calibration_text: Path,
                                                                 eval_text: Path, toolchain, tmp_path: Path) -> None:
    wd = tmp_path / "job"
    shutil.copytree(smol_workdir, wd, ignore=shutil.ignore_patterns("report.json", "records/evaluate*",
                                                                    "size-vs-kld.png"))
    spec = JobSpec(source=Source(repo=SOURCE, path=smollm2), model_name=smollm2.name,
                   ladder=LadderOptions(ladder=SMOL_LADDER, calibration=TextFile.of(calibration_text),
                                        calibration_chunks=SMOL_CAL_CHUNKS, ctx=SMOL_CAL_CTX, jobs=2,
                                        order=EarlyOptions().order),
                   evaluation=EvalSettings(TextFile.of(eval_text), chunks=2),
                   publish=PublishTarget(namespace=TEST_ORG, early=EarlyOptions()),
                   rules=CheckpointRules(check_architecture=True))
    hub = Hub(retry=RetryPolicy(max_attempts=3, base=0.01, cap=0.01), sleep=lambda s: None)
    assert [s.name for s in stages_for(spec, hub)][:3] == ["early-publish", "inspect", "convert"]
    hooks = _Verdicts()
    res = run_job(spec, wd, hooks, toolchain=toolchain, hub=hub)
    assert res.published is not None and res.published.repo_id == TARGET
    commits = [c for c in hub_server.commits(TARGET) if c.parent is not None]
    assert len(commits) >= 2, [c.summary for c in commits]
    first = hub_server.files(TARGET, revision=commits[0].sha)
    assert {p for p in first if p.endswith(".gguf") and "imatrix" not in p} == {"SmolLM2-135M-Instruct-Q4_K_M.gguf"}
    assert json.loads(first["report.json"])["pending"]
    # measured in the order Q4_K_M (the publish order), Q8_0, IQ4_XS, Q2_K (its curve neighbours), each held
    # ("measured") until two files below it (or all the ladder has there) and one above it are measured: Q8_0 is
    # settled by IQ4_XS's measurement, Q4_K_M and IQ4_XS by Q2_K's
    verdicts = hooks.verdicts()
    assert verdicts[0] == ("Q4_K_M", "measured"), verdicts
    assert hooks.final() == ["Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K"], verdicts
    _plan, again = publish(wd, hub, publish_options())
    assert again is not None and again.action == "none"  # the last commit is the whole ladder
    assert set(file_states(wd).values()) == {"published"}


def publish_options():
    from bot.publish.commit import PublishOptions

    return PublishOptions(namespace=TEST_ORG)


class _Verdicts(Hooks):
    """The pipeline stage's per-file verdicts in the order it reported them (its per-file progress: ``file``,
    ``state``): ``measured`` for a held file, then ``passed`` / ``failed`` once final."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def progress(self, event: Event) -> None:
        t, state = event.data.get("file"), event.data.get("state")
        if event.kind == PROGRESS and state in ("measured", "passed", "failed") and (str(t), state) not in self.seen:
            self.seen.append((str(t), str(state)))

    def verdicts(self) -> list[tuple[str, str]]:
        return list(self.seen)

    def final(self) -> list[str]:
        return [t for t, state in self.seen if state != "measured"]
