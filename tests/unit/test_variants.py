"""Pure logic of pruning, distillation and the variant registry (no model, no llama.cpp)."""

from __future__ import annotations

import math

import pytest

from converters.variants import distill
from converters.variants import prune
from converters.variants import recipes as variants
from converters.core.errors import ConfigError, GgufbotError, InputError, UnknownName, UnsupportedModel


# ---------------------------------------------------------------------------------------------- prune
@pytest.mark.parametrize("total,layers,fraction,expected", [
    (30, 4, None, 4),
    (30, None, 0.25, 8),    # round(7.5) -> 8 (banker's rounding)
    (32, None, 0.25, 8),
    (30, 29, None, 29),
    (2, 1, None, 1),
])
def test_count_to_remove(total, layers, fraction, expected):
    assert prune.count_to_remove(total, layers, fraction) == expected


@pytest.mark.parametrize("total,layers,fraction", [
    (30, 30, None),    # nothing would remain
    (30, 31, None),    # more than exist
    (30, None, 0.01),  # rounds to nothing
    (1, 1, None),
])
def test_count_to_remove_refuses(total, layers, fraction):
    with pytest.raises(GgufbotError) as e:
        prune.count_to_remove(total, layers, fraction)
    assert isinstance(e.value, (ConfigError, InputError))
    assert str(total) in str(e.value)


@pytest.mark.parametrize("kwargs", [
    {"layers": 4, "fraction": 0.25},
    {},
    {"layers": 0},
    {"fraction": 1.0},
    {"method": "sideways", "layers": 1},
    {"importance": "vibes", "layers": 1},
    {"method": "width", "layers": 3},
])
def test_prune_spec_validation(kwargs):
    with pytest.raises(ConfigError):
        prune.PruneSpec(**kwargs)


@pytest.mark.parametrize("scores,k,expected", [
    ([0.9, 0.1, 0.5, 0.2], 2, [1, 3]),
    ([0.3, 0.3, 0.3], 1, [2]),         # ties: the deeper layer goes first
    ([0.5, 0.1], 2, [0, 1]),
])
def test_select_lowest(scores, k, expected):
    assert prune.select_lowest(scores, k) == expected


@pytest.mark.parametrize("distances,n,expected", [
    ([0.4, 0.2, 0.3], 2, [1, 2]),
    ([0.1, 0.1], 3, [1, 2, 3]),
])
def test_select_block(distances, n, expected):
    assert prune.select_block(distances, n) == expected


def test_layer_map_and_rename():
    m = prune.layer_map(6, [1, 4])
    assert m == {0: 0, 2: 1, 3: 2, 5: 3}
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight": None,
        "model.layers.3.input_layernorm.weight": "model.layers.2.input_layernorm.weight",
        "model.layers.5.mlp.down_proj.weight": "model.layers.3.mlp.down_proj.weight",
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for old, new in cases.items():
        assert prune.rename_tensor(old, "model.layers", m) == new
    with pytest.raises(ConfigError):
        prune.layer_map(6, [6])


def test_find_layer_prefix():
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.norm.weight"]
    assert prune.find_layer_prefix(keys, 4) == "model.layers"
    mm = ([f"model.language_model.layers.{i}.x" for i in range(3)]
          + [f"model.vision_tower.encoder.layers.{i}.y" for i in range(5)])
    assert prune.find_layer_prefix(mm, 3) == "model.language_model.layers"
    with pytest.raises(UnsupportedModel):
        prune.find_layer_prefix(keys, 5)


def test_prune_config_keeps_per_layer_lists_consistent():
    cfg = {"num_hidden_layers": 4, "hidden_size": 8, "architectures": ["X"],
           "layer_types": ["sliding", "full", "sliding", "full"], "no_rope_layers": [1, 1, 0, 1],
           "mlp_only_layers": [0, 3], "rope_parameters": {"rope_theta": 1.0}}
    new = prune.prune_config(cfg, [0, 2, 3])
    assert new["num_hidden_layers"] == 3
    assert new["layer_types"] == ["sliding", "sliding", "full"]
    assert new["no_rope_layers"] == [1, 0, 1]
    assert new["mlp_only_layers"] == [0, 2]
    assert new["architectures"] == ["X"] and new["rope_parameters"] == {"rope_theta": 1.0}
    assert cfg["num_hidden_layers"] == 4  # the input is not changed


def test_prune_config_text_config_and_thresholds():
    cfg = {"architectures": ["M"], "text_config": {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"]}}
    new = prune.prune_config(cfg, [0, 2])
    assert new["text_config"]["num_hidden_layers"] == 2 and new["text_config"]["layer_types"] == ["a", "c"]
    ds = {"num_hidden_layers": 6, "first_k_dense_replace": 2}
    assert prune.prune_config(ds, [0, 1, 3, 5])["first_k_dense_replace"] == 2  # below the threshold untouched
    with pytest.raises(UnsupportedModel):
        prune.prune_config(ds, [0, 2, 3, 4, 5])  # a dense layer removed: the threshold would lie
    with pytest.raises(UnsupportedModel):
        prune.num_layers_of({"hidden_size": 3})


def test_layer_stats_formulas():
    # two layers; cos(h0,h1)=1, cos(h1,h2)=0, cos(h0,h2)=0.5, over one token
    st = prune.LayerStats(num_layers=2, cos_sum=[[1.0, 0.5], [0.0]], tokens=1, channel_act=None)
    assert st.block_influence() == [0.0, 1.0]
    ang1 = st.angular(1)
    assert ang1 == [0.0, pytest.approx(0.5)]
    assert st.angular(2) == [pytest.approx(math.acos(0.5) / math.pi)]


# ---------------------------------------------------------------------------------------------- distill
@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (10, 0.1), (7, 0.55)])
def test_lr_schedule(step, expected):
    # warm-up of 4 steps to 1.0, cosine to 0.1 at step 10
    assert distill.lr_at(step, 10, 1.0, 4, 0.1) == pytest.approx(expected, abs=1e-9)


def test_batch_schedule_seeded_and_covers_epochs():
    a = distill.batch_schedule(5, 4, 3, seed=7)
    assert a == distill.batch_schedule(5, 4, 3, seed=7)
    assert a != distill.batch_schedule(5, 4, 3, seed=8)
    flat = [i for b in a for i in b]
    assert len(flat) == 12 and sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))


@pytest.mark.parametrize("trainable,first,device,expected", [
    ("auto", 13, "cpu", 12), ("auto", 13, "cuda", 0), ("all", 13, "cpu", 0), ("from-cut", 13, "cuda", 12),
    ("from-cut", 0, "cpu", 0), ("from-cut", None, "cpu", 0), ("from-cut", 1, "cpu", 0),
])
def test_first_trainable(trainable, first, device, expected):
    assert distill.first_trainable(trainable, first, device) == expected


def test_kl_loss_is_kl_teacher_to_student():
    torch = pytest.importorskip("torch")
    t = torch.tensor([[[2.0, 0.0, -1.0]]])
    s = torch.tensor([[[0.0, 1.0, 0.0]]])
    p = torch.softmax(t, -1)
    expected = float((p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum())
    assert float(distill.kl_loss(t, s)) == pytest.approx(expected, rel=1e-6)
    assert float(distill.kl_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    # temperature: T^2 * KL of the softened distributions
    pt, ls = torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    assert float(distill.kl_loss(t, s, 2.0)) == pytest.approx(4 * float((pt.exp() * (pt - ls)).sum()), rel=1e-6)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"lr": 0}, {"temperature": -1}, {"trainable": "some"},
                                    {"seq_len": 1}, {"samples": 0}])
def test_distill_config_validation(kwargs):
    with pytest.raises(ConfigError):
        distill.DistillConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lookup():
    assert {"prune-25pct-kd", "prune-4-layers-kd", "prune-4-layers"} <= set(variants.names())
    r = variants.get("prune-4-layers-kd")
    assert r.prune.layers == 4 and r.heals
    assert not variants.get("prune-4-layers").heals
    with pytest.raises(UnknownName) as e:
        variants.get("prune-99-layers")
    assert "prune-99-layers" in str(e.value) and "prune-25pct-kd" in str(e.value)
    assert e.value.kind == "variant recipe"


def test_every_recipe_is_valid_and_described():
    for name in variants.names():
        r = variants.get(name)
        assert r.name == name and r.description
        assert "removed" in r.summary()
        assert ("distillation" in r.summary()) == r.heals
        assert r.to_json()["prune"]["method"] in prune.METHODS


def test_overrides():
    r = variants.get("prune-25pct-kd").with_overrides(steps=7, lr=None)
    assert r.distill.steps == 7 and r.distill.lr == variants.get("prune-25pct-kd").distill.lr
    assert variants.get("prune-25pct-kd").distill.steps != 7  # the registry entry is untouched
    with pytest.raises(ConfigError):
        variants.get("prune-25pct").with_overrides(steps=5)
    with pytest.raises(ConfigError):
        variants.get("prune-25pct-kd").with_overrides(nonsense=1)


@pytest.mark.parametrize("spec,expected", [
    (None, ()), ("", ()), ("prune-25pct-kd", ("prune-25pct-kd",)),
    ("prune-25pct-kd, prune-4-layers,prune-25pct-kd", ("prune-25pct-kd", "prune-4-layers")),
    (["prune-4-layers"], ("prune-4-layers",)),
])
def test_parse_list(spec, expected):
    assert tuple(r.name for r in variants.parse_list(spec)) == expected


def test_parse_list_unknown():
    with pytest.raises(UnknownName):
        variants.parse_list("prune-25pct-kd,nope")


# the variant repo name: tests/unit/test_publish_rules.py (bot.model.repo_names.repo_name)


def test_ceilings_add_the_pruning_loss():
    from types import SimpleNamespace

    ladder = SimpleNamespace(files=[SimpleNamespace(type="Q4_K_M", bpw_nominal=4.89),
                                    SimpleNamespace(type="Q8_0", bpw_nominal=8.5)])
    c = variants.ceilings_for(ladder, 0.3)
    assert c == {"Q4_K_M": pytest.approx(0.4 + 0.3), "Q8_0": pytest.approx(0.05 + 0.3)}


# ---------------------------------------------------------------------------------------------- card section
VARIANT_INFO = {
    "recipe": {"name": "prune-1-layer-kd", "summary": "removed 1 decoder layer (ShortGPT), then healed"},
    "teacher": {"model_name": "Tiny-Instruct", "repo": "acme/Tiny-Instruct", "parameters": 1000, "bytes": 2000,
                "layers": 2, "intermediate_size": 64},
    "variant": {"parameters": 600, "bytes": 1200, "layers": 1, "intermediate_size": 64},
    "prune": {"method": "depth", "removed_layers": [1], "calibration": {"name": "cal.txt", "samples": 2, "seq_len": 32}},
    "distill": {"steps": 2, "config": {"batch_size": 1, "seq_len": 32, "temperature": 1.0, "lr": 1e-3, "seed": 0},
                "loss_first": 1.5, "loss_last": 0.5, "device": "cpu", "dtype": "float32", "seconds": 3.0},
    "evaluation": {"text": "wiki.test.raw", "chunks": 2, "ctx": 128, "reference_kld_mean": 0.3,
                   "reference_same_top_p": 0.8,
                   "files": {"Q8_0": {"kld_mean": 0.31, "same_top_p": 0.79, "size": 900, "status": "passed"}},
                   "teacher_files": {"Q8_0": {"kld_mean": 0.001, "same_top_p": 0.99, "size": 1500}}},
}


def test_card_knows_variants_natively(tmp_path):
    """The card of a variant: its own intro line, relation ``finetune`` to the source, the variant block with
    before/after figures and the teacher's own quants next to the variant's; valid for ModelCard."""

    from huggingface_hub import ModelCard

    from bot.publish import card, source_card
    from tests.hubserver import _validate_front_matter
    from tests.workdirs import make_workdir

    wd = make_workdir(tmp_path, model="Tiny-Instruct-prune-1-layer-kd", source_repo="acme/Tiny-Instruct",
                      types=("Q8_0",))
    from converters.core.workdir import VariantInfo, WorkDir

    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    facts = source_card.SourceFacts.from_checkpoint(None, repo=ladder.source.repo, revision=ladder.source.revision)
    settings = card.CardSettings(repo_id="team/Tiny-Instruct-prune-1-layer-kd-GGUF", quantized_by="team",
                                 hub_url="http://hub.test")
    plain = card.build_context(ladder, report, facts, settings)
    ctx = card.build_context(ladder, report, facts, settings, card.CardExtras(variant=VariantInfo.from_json(VARIANT_INFO)))
    assert plain["variant"] is None and plain["metadata"]["base_model_relation"] == "quantized"
    assert ctx["metadata"]["base_model"] == "acme/Tiny-Instruct"
    assert ctx["metadata"]["base_model_relation"] == "finetune"
    assert {"pruned", "distillation"} <= set(ctx["metadata"]["tags"])
    v = ctx["variant"]
    assert (v["layers_before"], v["layers_after"], v["layers_removed"]) == (2, 1, 1)
    assert (v["params_change"], v["size_change"]) == ("-40.0%", "-40.0%")
    assert v["evaluation"]["files"][0]["teacher_kld"] == "0.0010"
    text = card.render(ctx)
    assert "GGUF quantizations of" not in text
    assert "A pruned and healed (distilled) variant of [acme/Tiny-Instruct](http://hub.test/acme/Tiny-Instruct)" in text
    assert "| Decoder layers | 2 | 1 |" in text and "| Parameters | 1,000 | 600 (-40.0%) |" in text
    assert "| Q8_0 | 0.3100 | 79.00 % | 900 B | 0.0010 | 99.00 % | 1.50 KB |" in text
    assert "2 steps of 1 × 32 tokens" in text
    assert text.index("## What this variant is") < text.index("## Prompt format")
    assert _validate_front_matter(text) == []
    mc = ModelCard(text)
    assert mc.data.base_model == "acme/Tiny-Instruct" and mc.data.base_model_relation == "finetune"
    # an unhealed variant says so, and is "pruned" without "healed"
    unhealed = {**VARIANT_INFO, "distill": None}
    text = card.render(card.build_context(ladder, report, facts, settings,
                                          card.CardExtras(variant=VariantInfo.from_json(unhealed))))
    assert "A pruned variant of" in text and "Not healed" in text and "distillation" not in text.split("---")[1]


def test_public_info_has_no_local_paths():
    from bot.jobs.variants import public_info

    from converters.core.workdir import VariantInfo

    info = VariantInfo.from_json({"recipe": {"name": "r"}, "teacher": {"path": "/x/y", "parameters": 3},
                                  "variant": {"path": "/x/z", "bytes": 1},
                                  "distill": {"config": {"cache_dir": "/c", "steps": 2}},
                                  "prune": {"removed_layers": [1]}})
    out = public_info(info)
    assert "path" not in out["teacher"] and "path" not in out["variant"] and "/x/" not in str(out)
    assert (out["teacher"]["parameters"], out["variant"]["bytes"]) == (3, 1)
    assert out["distill"]["config"] == {"steps": 2} and out["prune"]["removed_layers"] == [1]
    assert info.teacher.path == "/x/y"  # the input is not changed
