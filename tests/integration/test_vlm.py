"""A vision-language model end to end with the real llama.cpp tools and the local Hub server: a tiny random
Gemma 3 (text + SigLIP vision tower, tests/vlm_models.py) gets its text ladder and its projector (F16 and Q8_0),
the projector loads in llama-mtmd-cli with a quant of the ladder and gives finite image embeddings, and the
published repo and card carry it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.llama import mmproj
from converters.core.workdir import WorkDir
from tests.vlm_models import IMAGE_TOKENS, VLM_NAME, tiny_gemma3_vlm_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.llama]


def _spec(src: Path):
    from bot.jobs.job import JobSpec, Source
    from converters.ladder.job import CheckpointRules
    from converters.ladder.pipeline import LadderOptions

    return JobSpec(source=Source(path=src), model_name=VLM_NAME,
                   ladder=LadderOptions(ladder="Q4_K_M", imatrix=False),
                   rules=CheckpointRules(check_architecture=True))


@pytest.fixture(scope="module")
def vlm_workdir(tmp_path_factory, eval_text, toolchain) -> Path:
    """The job's ladder stages, then the evaluation with short settings (the same code the job's evaluate stage
    runs; its transformers comparison and generations on a random model only cost time here)."""
    from bot.jobs.job import run_job
    from converters.ladder import evaluate
    from converters.core.hooks import NULL_HOOKS

    root = tmp_path_factory.mktemp("vlm")
    src = root / VLM_NAME
    shutil.copytree(tiny_gemma3_vlm_checkpoint(), src)
    short_eval = root / "eval.txt"
    short_eval.write_text(eval_text.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out = root / "work"
    run_job(_spec(src), out, NULL_HOOKS, toolchain=toolchain)
    evaluate.run(out, evaluate.EvalOptions(eval_text=short_eval, chunks=2, ctx=128, hf_compare_chunks=1, threads=2,
                                           require_source_check=False), toolchain=toolchain)
    return out


def test_ladder_and_projector_are_converted(vlm_workdir: Path) -> None:
    ladder = WorkDir(vlm_workdir).ladder()
    assert ladder.types == ("Q4_K_M",)
    assert [(p.type, p.path) for p in ladder.projectors] == [
        ("F16", f"mmproj-{VLM_NAME}-F16.gguf"), ("Q8_0", f"mmproj-{VLM_NAME}-Q8_0.gguf")]
    from gguf import GGUFReader, GGUFValueType, Keys

    for p in ladder.projectors:
        path = vlm_workdir / p.path
        assert path.stat().st_size == p.size
        reader = GGUFReader(path)
        arch = reader.fields[Keys.General.ARCHITECTURE]
        assert arch.types == [GGUFValueType.STRING] and bytes(arch.parts[-1]).decode() == "clip"
        # the text model's tensors stay out of the projector, the vision tower's out of the text model
        assert not any(t.name.startswith(("blk.", "token_embd")) for t in reader.tensors)
    text = GGUFReader(vlm_workdir / ladder.file("Q4_K_M").path)
    assert not any(t.name.startswith(("v.", "mm.")) for t in text.tensors)


def test_projector_loads_in_llama_mtmd_cli_with_finite_embeddings(vlm_workdir: Path) -> None:
    report = json.loads((vlm_workdir / "report.json").read_text())
    check = report["checks"][mmproj.CHECK]
    assert check["status"] == "passed", check["detail"]
    assert check["text_model"] == f"{VLM_NAME}-Q4_K_M.gguf"
    assert [f["path"] for f in check["files"]] == [f"mmproj-{VLM_NAME}-F16.gguf", f"mmproj-{VLM_NAME}-Q8_0.gguf"]
    for f in check["files"]:
        assert (f["status"], f["n_tokens"], f["n_embd"], f["non_finite"]) == ("passed", IMAGE_TOKENS, 256, 0)
        assert f["std"] > 0
    q8 = check["files"][1]
    assert q8["compared_with"] == f"mmproj-{VLM_NAME}-F16.gguf" and 0 < q8["rel_rms_diff"] < 0.05
    assert not any("projector" in r for r in report["reasons"])  # a random text model fails its own checks
    assert set(report["file_hashes"]) >= {f["path"] for f in check["files"]}


def test_a_file_that_is_no_projector_fails_the_check(vlm_workdir: Path, toolchain, tmp_path: Path) -> None:
    text_model = vlm_workdir / f"{VLM_NAME}-Q4_K_M.gguf"
    check = mmproj.projector_check(toolchain, text_model, [text_model], tmp_path, threads=2)
    assert check.status == "failed" and check.detail.startswith(f"{VLM_NAME}-Q4_K_M.gguf: llama-mtmd-cli cannot use it")


def test_a_second_run_converts_nothing_again(vlm_workdir: Path, toolchain) -> None:
    from bot.jobs.job import run_job
    from converters.core.hooks import NULL_HOOKS

    before = {p.name: p.stat().st_mtime_ns for p in vlm_workdir.glob("*.gguf")}
    run_job(_spec(vlm_workdir.parent / VLM_NAME), vlm_workdir, NULL_HOOKS, toolchain=toolchain)
    assert {p.name: p.stat().st_mtime_ns for p in vlm_workdir.glob("*.gguf")} == before


def test_published_repo_and_card_carry_the_projector(vlm_workdir: Path, hub_server, tmp_path: Path) -> None:
    """Publishing does not read GGUF contents: a work dir of placeholder quants that passed the gate (the random
    model's text cannot pass it) with the real projector files and the real projector check added."""
    from bot.hub.client import Hub
    from bot.publish.commit import PublishOptions, publish
    from bot.model.retry import RetryPolicy
    from converters.core.report import Check
    from converters.core.workdir import Ladder
    from tests.hub_fixtures import TEST_ORG
    from tests.workdirs import make_workdir

    wd = WorkDir(make_workdir(tmp_path, model=VLM_NAME, source_repo=None))
    real = WorkDir(vlm_workdir).ladder()
    for p in real.projectors:
        shutil.copy2(vlm_workdir / p.path, wd.path / p.path)
    ladder = Ladder.from_json({**wd.ladder().to_json(), "projectors": [p.to_json() for p in real.projectors]})
    wd.write_ladder(ladder)
    report = wd.report()
    report.checks[mmproj.CHECK] = Check.from_json(WorkDir(vlm_workdir).report().checks[mmproj.CHECK].to_json())
    report.file_hashes.update(wd.content(ladder))  # the chart keeps its entry
    wd.write_report(report)

    hub = Hub(token=None, retry=RetryPolicy(max_attempts=2, base=0.1, cap=0.2), sleep=lambda s: None)
    _, res = publish(wd.path, hub, PublishOptions(namespace=TEST_ORG))
    assert res is not None and res.action == "create"
    files = hub_server.files(res.repo_id)
    for qtype in mmproj.TYPES:
        name = mmproj.projector_name(VLM_NAME, qtype)
        assert files[name] == (vlm_workdir / name).read_bytes()
    readme = files["README.md"].decode()
    assert "## Images: the vision projector" in readme
    assert (f"llama-mtmd-cli -m {VLM_NAME}-Q4_K_M.gguf --mmproj mmproj-{VLM_NAME}-F16.gguf --image photo.jpg"
            in readme)
    assert f"llama-server -m {VLM_NAME}-Q4_K_M.gguf --mmproj mmproj-{VLM_NAME}-F16.gguf" in readme
    assert "| projector | passed |" in readme
    published = json.loads(files["report.json"])
    assert published["checks"][mmproj.CHECK]["files"][0]["n_tokens"] == IMAGE_TOKENS
