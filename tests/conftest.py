"""Session-wide fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.shared import built_once

pytest_plugins = ["tests.hub_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# keep the ggufbot cache (toolchain build, model fixtures) shared between test runs
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def calibration_text(shared_data: Path) -> Path:
    return shared_data / "groups_merged.txt"


@pytest.fixture(scope="session")
def eval_text(shared_data: Path) -> Path:
    return shared_data / "wiki.test.raw"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from tests.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def toolchain():
    from converters.llama import toolchain as tc_mod

    return tc_mod.find(required=True)


# The SmolLM2 ladder used by integration tests of several layers: built once per session.
SMOL_LADDER = "Q8_0,Q4_K_M,IQ4_XS,Q2_K"
SMOL_CAL_CHUNKS = 8
SMOL_CAL_CTX = 256


def build_smol_ladder(out: Path, checkpoint: Path, calibration: Path, toolchain, *, jobs: int = 2, hooks=None):
    """The SmolLM2 ladder through the job runner: a local checkpoint named after its Hub repo."""
    from bot.jobs.job import JobSpec, Source, run_job
    from converters.llama.calibrate import TextFile
    from converters.core.hooks import NULL_HOOKS
    from converters.ladder.job import CheckpointRules
    from converters.ladder.pipeline import LadderOptions

    spec = JobSpec(source=Source(repo="HuggingFaceTB/SmolLM2-135M-Instruct", path=checkpoint),
                   model_name=checkpoint.name,
                   ladder=LadderOptions(ladder=SMOL_LADDER, calibration=TextFile.of(calibration),
                                        calibration_chunks=SMOL_CAL_CHUNKS, ctx=SMOL_CAL_CTX, jobs=jobs),
                   rules=CheckpointRules(check_architecture=True))
    return run_job(spec, out, hooks or NULL_HOOKS, toolchain=toolchain).ladder


@pytest.fixture(scope="session")
def smol_workdir(tmp_path_factory, smollm2, calibration_text, toolchain) -> Path:
    """A finished work dir: SmolLM2 -> BF16 -> imatrix -> Q8_0, Q4_K_M, IQ4_XS, Q2_K (ladder.json inside), built once
    per test run (:func:`tests.shared.built_once`: once for all pytest-xdist workers too); read-only."""
    return built_once(tmp_path_factory, "smol-ladder",
                      lambda out: build_smol_ladder(out, smollm2, calibration_text, toolchain))


@pytest.fixture
def quick_render_limit(monkeypatch):
    """A looping chat template is stopped by the sandbox's CPU-time limit (3 s in the product, far above what a real
    template needs); in-process tests that render one on purpose lower it to 1 s (the renderer's start is ~0.15 s
    of CPU): the same limit, kind and reason, two seconds sooner each time."""
    import dataclasses

    from converters.formats import chat

    monkeypatch.setattr(chat, "RENDER_LIMITS", dataclasses.replace(chat.RENDER_LIMITS, cpu_seconds=1))
