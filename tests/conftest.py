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


def _own_cores() -> None:
    """Under pytest-xdist, each worker (and every program it starts, which inherits it) runs on its own share of the
    cores: the product gives its programs as many threads as it has cores (``converters.core.proc.cpus``, from the
    CPU affinity), so two workers never run 2 x cores threads that spin in their barriers waiting for each other."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count::count])


_own_cores()


# The longest test files, longest first (from ``--durations`` of a suite run in two workers): collected first, so the
# workers start them first and the many short files fill the gaps at the end. pytest-xdist (``-n 2 --dist loadfile``:
# a file's tests stay in one worker, with its module fixtures) would re-sort the files by their number of tests,
# which starts the long files (few tests each) last, one worker then running alone for minutes: the Makefile passes
# ``--no-loadscope-reorder``. A file missing here only runs later; refresh the list when it drifts.
LONGEST_FIRST = (
    "e2e/test_boxes.py", "integration/test_gate_damage.py", "e2e/test_follow_llama.py", "e2e/test_bot.py",
    "integration/test_pipeline.py", "e2e/test_kill_resume.py", "integration/test_evaluate.py", "e2e/test_hostile.py",
    "integration/test_runner_variants.py", "integration/test_tune_cheap.py", "integration/test_distill.py",
    "integration/test_evaluate_sequential.py", "integration/test_metapatch.py", "integration/test_evaluate_identity.py",
    "integration/test_fit.py", "integration/test_ladder.py", "integration/test_resume.py",
    "integration/test_job_early_publish.py", "integration/test_vlm.py", "integration/test_convert_cli.py",
    "integration/test_variant_publish.py", "integration/test_verify.py", "integration/test_prune.py",
    "unit/test_tool_limits.py", "unit/test_hfchild.py", "integration/test_signals.py", "integration/test_tune.py",
    "integration/test_children.py", "integration/test_hfmodel_threads.py", "integration/test_two_templates.py",
    "integration/test_runner_stuck.py", "integration/test_hostile_template.py", "e2e/test_kill_early_publish.py",
    "integration/test_web.py", "integration/test_bench.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (:data:`LONGEST_FIRST`), each file's tests in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests_dir = Path(__file__).parent

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, int]:
        i, item = pair
        try:
            rel = item.path.relative_to(tests_dir).as_posix()
        except ValueError:
            rel = ""
        return rank.get(rel, len(rank)), i

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


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
