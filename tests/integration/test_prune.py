"""Depth and width pruning on real checkpoints: the result loads in transformers and goes through llama.cpp."""

from __future__ import annotations

import json

import pytest

from converters.formats import gguf_meta
from converters.formats import hfmodel
from converters.variants import prune
from converters.variants import recipes as variants
from converters.core.errors import ConfigError, UnknownName, UnsupportedModel
from converters.core.workdir import WorkDir
from tests.integration.variant_fixtures import CALIB_SAMPLES, CALIB_SEQ_LEN, pruned_smollm2


@pytest.fixture(scope="module")
def variant4(tmp_path_factory, smollm2, calibration_text, toolchain):
    return pruned_smollm2(tmp_path_factory, smollm2, calibration_text, toolchain)


@pytest.mark.slow
@pytest.mark.llama
def test_prune_4_of_30_layers_loads_converts_and_quantizes(variant4, smollm2):
    import torch
    import gguf
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    info, ck = variant4.info, variant4.checkpoint
    p = info["prune"]
    assert p["layers_before"] == 30 and p["layers_after"] == 26
    assert len(p["removed_layers"]) == 4 and len(set(p["removed_layers"])) == 4
    assert p["calibration"] == {"name": "groups_merged.txt", "samples": CALIB_SAMPLES, "seq_len": CALIB_SEQ_LEN}
    # the removed layers are the four with the lowest measured block influence
    scores = p["scores"]
    assert max(scores[i] for i in p["removed_layers"]) <= min(
        s for i, s in enumerate(scores) if i not in p["removed_layers"])
    assert info["variant"]["parameters"] < info["teacher"]["parameters"]
    assert info["variant"]["bytes"] < info["teacher"]["bytes"]

    # a valid HF checkpoint: config, renumbered tensors, tokenizer and chat template, no remote code
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 26
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (ck / name).is_file(), name
    assert not list(ck.glob("*.py"))
    names = prune.tensor_names(ck)
    idx = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert idx == set(range(26))
    # kept layers are the teacher's, weight for weight, under their new numbers
    kept = p["kept_layers"]
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as a, safe_open(str(ck / "model.safetensors"), "pt") as b:
        for new in (0, 13, 25):
            key = "mlp.down_proj.weight"
            assert torch.equal(a.get_tensor(f"model.layers.{kept[new]}.{key}"), b.get_tensor(f"model.layers.{new}.{key}"))

    model = AutoModelForCausalLM.from_pretrained(str(ck), trust_remote_code=False, use_safetensors=True)
    assert model.config.num_hidden_layers == 26 and len(model.model.layers) == 26
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 504, 3458, 314]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()

    # the same ladder pipeline converted and quantized it
    lad = variant4.ladder
    assert lad["model_name"] == "SmolLM2-135M-Instruct-prune-4-layers"
    assert [f["type"] for f in lad["files"]] == ["Q4_K_M"]
    for rel in (lad["reference"]["path"], lad["files"][0]["path"]):
        assert gguf_meta.read(variant4.out / rel).model_int(gguf.Keys.LLM.BLOCK_COUNT) == 26
    assert (variant4.out / lad["files"][0]["path"]).stat().st_size < (variant4.out / lad["reference"]["path"]).stat().st_size
    info = WorkDir(variant4.out).variant()
    assert info is not None and info.recipe.name == "prune-4-layers"


@pytest.mark.slow
def test_width_and_depth_pruning_of_a_model_with_layer_types(tmp_path, calibration_text):
    """gemma3 has a per-layer ``layer_types`` list; width pruning keeps every layer but shrinks the MLP."""
    import torch

    from tests.models import tiny_random_checkpoint

    src = tiny_random_checkpoint("gemma3")
    cfg = json.loads((src / "config.json").read_text())
    spec = prune.PruneSpec(layers=1, calib_samples=2, calib_seq_len=32)
    res = prune.prune(src, tmp_path / "depth", spec, calibration_text)
    new_cfg = json.loads((tmp_path / "depth" / "config.json").read_text())
    assert new_cfg["num_hidden_layers"] == 1
    if isinstance(cfg.get("layer_types"), list):
        assert new_cfg["layer_types"] == [cfg["layer_types"][i] for i in res.kept_layers]

    wres = prune.prune(src, tmp_path / "width", prune.PruneSpec(method="width", fraction=0.25, calib_samples=2,
                                                                 calib_seq_len=32), calibration_text)
    assert wres.intermediate_before == 512 and wres.intermediate_after == 384
    assert wres.parameters_after == wres.parameters_before - 2 * 3 * 128 * 256
    for d in ("depth", "width"):
        model = hfmodel.load_causal_lm(tmp_path / d)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_bad_input_is_a_clear_error(tmp_path, smollm2, calibration_text, capsys):
    from bot.cli import main

    # more layers than exist: refused before any model is loaded
    with pytest.raises(ConfigError, match="only 30"):
        prune.prune(smollm2, tmp_path / "x", prune.PruneSpec(layers=31), calibration_text)
    with pytest.raises(ConfigError, match="only 30"):
        prune.prune(smollm2, tmp_path / "x", prune.PruneSpec(layers=30), calibration_text)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnknownName, match="unknown variant recipe 'prune-everything'"):
        variants.get("prune-everything")

    # the same through the command line: exit code 1 and a one-line reason
    rc = main(["variant", str(smollm2), "--recipe", "prune-everything", "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert rc == 1 and "unknown variant recipe 'prune-everything'" in err and "prune-25pct-kd" in err
    rc = main(["variant", str(smollm2), "--recipe", "prune-4-layers", "--out", str(tmp_path / "v"), "--dry-run"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["layers"] == 30

    # a checkpoint whose MLP is not llama-style cannot be width-pruned
    from tests.models import tiny_random_checkpoint

    with pytest.raises(UnsupportedModel):
        prune.prune(tiny_random_checkpoint("phi3"), tmp_path / "w",
                    prune.PruneSpec(method="width", fraction=0.5, calib_samples=1, calib_seq_len=8), calibration_text)
