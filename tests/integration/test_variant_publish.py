"""A variant publishes to the local Hub server as its own repo, with a card that says what it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.publish.commit import PublishOptions
from bot.jobs.variants import publish_variant
from converters.variants import prune
from converters.variants import recipes as variants
from converters.variants.distill import DistillConfig
from tests.hub_fixtures import TEST_ORG
from tests.hubserver import HubServer, _validate_front_matter
from tests.workdirs import make_workdir

SOURCE = "acme/Tiny-Instruct"
RECIPE = variants.Recipe("prune-1-layer-kd", "1 layer removed, healed",
                         prune.PruneSpec(layers=1, calib_samples=2, calib_seq_len=32),
                         DistillConfig(steps=2, seq_len=32, batch_size=1, samples=2, lr=1e-3))


@pytest.mark.slow
def test_variant_publishes_with_its_card(hub_server: HubServer, tmp_path: Path, calibration_text: Path) -> None:
    from huggingface_hub import ModelCard

    from tests.models import tiny_random_checkpoint

    rev = hub_server.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}'},
                               card_data={"license": "apache-2.0"}, pipeline_tag="text-generation")
    # the ladder and report of the variant are placeholders (publishing does not read GGUF bytes); the
    # variant itself (pruning, healing, variant.json) is real
    wd = make_workdir(tmp_path, model="Tiny-Instruct-prune-1-layer-kd", source_repo=SOURCE, revision=rev,
                      types=("Q8_0", "Q4_K_M"))
    info = variants.make_checkpoint(tiny_random_checkpoint("llama"), wd, RECIPE, calibration_text,
                                    teacher_model="Tiny-Instruct", source_repo=SOURCE)
    assert info["variant"]["layers"] == 1 and info["teacher"]["layers"] == 2
    hub = Hub()
    res = publish_variant(wd, hub, PublishOptions(namespace=TEST_ORG))
    target = f"{TEST_ORG}/Tiny-Instruct-prune-1-layer-kd-GGUF"
    assert res.repo_id == target and res.action == "create"
    files = hub_server.files(target)
    assert {"README.md", "report.json", "variant.json", "Tiny-Instruct-prune-1-layer-kd-Q4_K_M.gguf"} <= set(files)

    readme = files["README.md"].decode()
    assert _validate_front_matter(readme) == []
    card = ModelCard(readme)
    assert card.data.base_model == SOURCE and card.data.base_model_relation == "finetune"
    assert "## What this variant is" in readme and "`prune-1-layer-kd`" in readme
    assert f"A pruned and healed (distilled) variant of [{SOURCE}](" in readme  # not "GGUF quantizations of"
    assert "GGUF quantizations of" not in readme and "pruned" in card.data.tags
    assert "| Decoder layers | 2 | 1 |" in readme
    t, v = info["teacher"], info["variant"]
    assert f"| Parameters | {t['parameters']:,} | {v['parameters']:,} (" in readme
    assert f"Removed layers (0-based, of the teacher): {info['prune']['removed_layers'][0]}" in readme
    assert "Healed by knowledge distillation from the teacher" in readme and "2 steps of 1 × 32 tokens" in readme
    assert readme.index("## What this variant is") < readme.index("## Files")
    published = json.loads(files["variant.json"])
    assert published["recipe"]["name"] == "prune-1-layer-kd"
    assert published["variant"]["parameters"] == v["parameters"] and "path" not in published["variant"]
    for text in (readme, files["variant.json"].decode()):
        assert str(tmp_path) not in text  # no path of this machine is published

    # publishing the same again makes no commit
    again = publish_variant(wd, hub, PublishOptions(namespace=TEST_ORG))
    assert again.action == "none"
