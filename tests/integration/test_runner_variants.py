"""The runner builds and publishes variants after the main ladder: real llama.cpp, real SQLite, local Hub server.

One job on the SmolLM2 fixture with ``quantize.variants = ["prune-99-layers", "prune-4-layers"]`` (lean
versions of the recipes: few calibration chunks, ladder Q8_0 only, two evaluation chunks):

- the main ladder is published first; the impossible recipe then fails and is recorded (event, the job's result,
  ``ggufbot status``) without failing or touching the published ladder;
- ``prune-4-layers`` reuses the job's work dir as the teacher's (its BF16 reference and report), is measured
  against the teacher's logits and published to ``{org}/{model}-{variant}-GGUF`` with a card that says what
  it is, read back with ``huggingface_hub.ModelCard``;
- the work dir (teacher and variants) is removed only at the end; the variant's report and variant.json are kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bot import cli
from bot.model import jobstate as J
from bot.hub.client import Hub
from bot.service.runner import Runner
from bot.model.settings import from_mapping
from bot.state.store import Store
from converters.variants import prune
from converters.variants import recipes as variants
from tests.bot_fixtures import checkpoint_files
from tests.hub_fixtures import TEST_TOKEN, TEST_USER
from tests.hubserver import _validate_front_matter
from tests.integration.variant_fixtures import CALIB_SAMPLES, CALIB_SEQ_LEN

pytestmark = [pytest.mark.slow, pytest.mark.llama]

SOURCE = "smol-labs/SmolLM2-135M-Instruct"
MODEL = "SmolLM2-135M-Instruct"
TARGET = f"{TEST_USER}/{MODEL}-GGUF"
VARIANT_TARGET = f"{TEST_USER}/{MODEL}-prune-4-layers-GGUF"


@pytest.fixture
def lean_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's prune-4-layers with few calibration chunks, and a recipe that cannot work on 30 layers."""
    base = variants.get("prune-4-layers")
    monkeypatch.setitem(variants.RECIPES, "prune-4-layers", dataclasses.replace(base, prune=dataclasses.replace(
        base.prune, calib_samples=CALIB_SAMPLES, calib_seq_len=CALIB_SEQ_LEN)))
    monkeypatch.setitem(variants.RECIPES, "prune-99-layers", variants.Recipe(
        "prune-99-layers", "more layers than the model has", prune.PruneSpec(layers=99, calib_samples=2,
                                                                              calib_seq_len=32)))


def test_runner_publishes_the_ladder_then_its_variants(hub_server, lean_recipes, tmp_path: Path, smollm2: Path,
                                                        calibration_text: Path, eval_text: Path, toolchain,
                                                        capsys) -> None:
    from huggingface_hub import ModelCard

    cfg = json.loads((smollm2 / "config.json").read_text())
    hub_server.add_model(SOURCE, checkpoint_files(smollm2), config=cfg, safetensors_params=134_515_008,
                         card_data={"license": "apache-2.0", "pipeline_tag": "text-generation"},
                         pipeline_tag="text-generation", library_name="transformers")
    raw = {"data_dir": str(tmp_path / "data"), "sources": [{"author": "smol-labs"}],
           "limits": {"max_model_gb": 1.0, "min_free_disk_gb": 0.0},
           "quantize": {"ladder": "Q8_0", "calibration_text": str(calibration_text),
                        "evaluation_text": str(eval_text), "calibration_chunks": 2, "evaluation_chunks": 2,
                        "ctx": 256, "variants": ["prune-99-layers", "prune-4-layers"]}}
    settings = from_mapping(raw, env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**13)
    store = Store(settings.database_url)
    hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url)
    jid = store.enqueue(SOURCE, hub_server.head(SOURCE), reason="test", now=1)
    out = Runner(settings, store, hub, worker_id="w1", toolchain=toolchain).run_one(now=2)

    job = store.job(jid)
    assert out.status == J.Status.PUBLISHED == job.status, (job.stage, job.error_type, job.error_message)
    assert job.target_repo == TARGET
    [done_event] = store.events(job_id=jid, kind="job.published")
    assert "prune-99-layers FAILED" in done_event["message"] and VARIANT_TARGET in done_event["message"]
    bad, good = job.result["variants"]
    # the impossible recipe failed with its reason; the main ladder stays published, the next variant ran
    assert (bad["recipe"], bad["status"]) == ("prune-99-layers", "failed")
    assert "99" in bad["error_message"] and "30" in bad["error_message"]
    failed_events = store.events(job_id=jid, kind="variant.failed")
    assert len(failed_events) == 1 and "prune-99-layers" in failed_events[0]["message"]
    assert {"README.md", f"{MODEL}-Q8_0.gguf"} <= set(hub_server.files(TARGET))
    assert sum(1 for c in hub_server.commits(TARGET) if c.parent is not None) == 1

    assert (good["recipe"], good["status"], good["target_repo"]) == ("prune-4-layers", "published", VARIANT_TARGET)
    assert good["layers"] == [30, 26] and good["parameters"][1] < good["parameters"][0]
    assert good["kld_vs_teacher"] > 0  # four layers fewer: measurably different from the teacher
    files = hub_server.files(VARIANT_TARGET)
    assert {"README.md", "report.json", "variant.json", f"{MODEL}-prune-4-layers-Q8_0.gguf"} <= set(files)
    readme = files["README.md"].decode()
    assert _validate_front_matter(readme) == []
    card = ModelCard(readme)
    assert card.data.base_model == SOURCE and card.data.base_model_relation == "finetune"
    assert "pruned" in card.data.tags and "GGUF quantizations of" not in readme
    assert f"A pruned variant of [{SOURCE}](" in readme and "Not healed" in readme
    assert "| Decoder layers | 30 | 26 |" in readme
    # the variant's quality against the teacher next to the teacher's own Q8_0, measured on the same tokens
    published = json.loads(files["variant.json"])
    ev = published["evaluation"]
    teacher_q8 = ev["teacher_files"]["Q8_0"]["kld_mean"]
    assert ev["files"]["Q8_0"]["kld_mean"] > teacher_q8
    assert f"| Q8_0 | {ev['files']['Q8_0']['kld_mean']:.4f} |" in readme and f"| {teacher_q8:.4f} |" in readme
    main_report = json.loads(hub_server.files(TARGET)["report.json"])
    assert ev["chunks"] == main_report["evaluation"]["chunks"]
    assert str(tmp_path) not in readme and str(tmp_path) not in files["variant.json"].decode()

    # the work dir (teacher and variants) is gone; the variant's report and variant.json are kept
    assert not any(settings.work_dir.glob(f"job-{jid}-*"))
    kept = {Path(k).relative_to(settings.keep_dir).as_posix().split("/", 2)[-1] for k in job.result["kept"]}
    assert {"variants/prune-4-layers/report.json", "variants/prune-4-layers/variant.json"} <= kept
    assert {a["kind"] for a in store.artifacts(jid)} >= {"gguf", "variant-gguf"}

    # ggufbot status shows both variants, the failure with its reason
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{settings.data_dir}"\n[quantize]\nvariants = ["prune-4-layers"]\n')
    assert cli.main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert f"variant prune-4-layers: published -> {VARIANT_TARGET}" in text
    assert "variant prune-99-layers: FAILED: " in text
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["status"] for v in data["published"][0]["variants"]] == ["failed", "published"]
