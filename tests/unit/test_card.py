"""The model card: context building (pure), rendering, metadata read back by huggingface_hub's ModelCard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.publish import card, source_card
from converters.core.report import Report
from converters.core.workdir import Ladder, WorkDir
from tests.hubserver import _validate_front_matter
from tests.workdirs import CHATML, make_workdir

HUB = "http://hub.test"


def _inputs(tmp_path: Path, **kw) -> tuple[Ladder, Report, Path]:
    wd = make_workdir(tmp_path, **kw)
    return WorkDir(wd).ladder(), WorkDir(wd).report(), wd


def _facts(wd: Path, ladder: Ladder, **kw) -> source_card.SourceFacts:
    src = ladder.source
    return source_card.SourceFacts.from_checkpoint(Path(src.path), repo=src.repo, revision=src.revision, **kw)


SETTINGS = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url=HUB)


@pytest.mark.parametrize("n_layer, n_ctx, n_kv, head_dim, expected", [
    (30, 4096, 3, 64, 2 * 30 * 4096 * 3 * 64 * 2),  # SmolLM2-135M shapes
    (32, 32768, 8, 128, 2 * 32 * 32768 * 8 * 128 * 2),  # Llama-3-8B shapes: 4 GiB at 32k
    (1, 1, 1, 1, 4),
])
def test_kv_cache_bytes(n_layer, n_ctx, n_kv, head_dim, expected) -> None:
    assert card.kv_cache_bytes(n_layer, n_ctx, n_kv, head_dim) == expected


def test_llama3_8b_kv_cache_is_4_gib_at_32k() -> None:
    assert card.kv_cache_bytes(32, 32768, 8, 128) == 4 * 1024**3


@pytest.mark.parametrize("config, expected", [
    ({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576},
     {"n_layer": 30, "n_kv_heads": 3, "head_dim": 64, "n_ctx_train": None}),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "max_position_embeddings": 128},
     {"n_layer": 2, "n_kv_heads": 4, "head_dim": 16, "n_ctx_train": 128}),  # no GQA: kv heads = heads
    ({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                      "head_dim": 256, "hidden_size": 1024}},
     {"n_layer": 4, "n_kv_heads": 2, "head_dim": 256, "n_ctx_train": None}),  # explicit head_dim wins
])
def test_shapes_from_config(config, expected) -> None:
    assert source_card.SourceFacts.shapes_from_config(config) == expected


def test_context_metadata_and_files(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path, types=("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"), failed=("Q3_K_M",),
                                 split=("Q8_0",))
    facts = _facts(wd, ladder, card_data={"license": "other", "license_name": "tiny-license",
                                          "license_link": "LICENSE", "language": ["en", "fr"],
                                          "extra_gated_prompt": "Agree to the terms",
                                          "extra_gated_fields": {"Company": "text"}, "unrelated": 1},
                   pipeline_tag="text-generation", gated="manual")
    ctx = card.build_context(ladder, report, facts, SETTINGS)
    meta = ctx["metadata"]
    assert meta["base_model"] == "acme/Tiny-Instruct"
    assert meta["base_model_relation"] == "quantized"
    # the source's relative link, in our repo, would name a file we do not have: it points at the source's file
    assert (meta["license"], meta["license_name"], meta["license_link"]) == \
        ("other", "tiny-license", f"{HUB}/acme/Tiny-Instruct/blob/{'a' * 40}/LICENSE")
    assert meta["language"] == ["en", "fr"]
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["gguf", "imatrix", "llama.cpp", "quantized", "ggufbot"]
    assert meta["quantized_by"] == "team"
    assert meta["extra_gated_prompt"] == "Agree to the terms"
    assert meta["extra_gated_fields"] == {"Company": "text"}
    assert "unrelated" not in meta
    types = [f["type"] for f in ctx["files"]]
    assert "Q3_K_M" not in types  # failed the gate
    sizes = [f["size"] for f in ctx["files"]]
    assert sizes == sorted(sizes, reverse=True)
    q8 = next(f for f in ctx["files"] if f["type"] == "Q8_0")
    assert q8["split"] and q8["include"] == "Tiny-Instruct-Q8_0/*" and q8["n_parts"] == 2
    q4 = next(f for f in ctx["files"] if f["type"] == "Q4_K_M")
    assert q4["include"] == "Tiny-Instruct-Q4_K_M.gguf"
    assert q4["kld"] == "0.0200 ± 0.0010" and q4["same_top_p"] == "90.00 % ± 0.20 %" and q4["ppl_ratio"] == "1.0200"
    kv4k = card.kv_cache_bytes(30, 4096, 3, 64)
    assert q4["memory"][0] == card.human_bytes(q4["size"] + kv4k)
    assert ctx["run_type"] == "Q4_K_M"
    assert ctx["revision_url"] == f"{HUB}/acme/Tiny-Instruct/tree/{'a' * 40}"


def test_base_model_without_chat_template_says_so(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path, chat_template=None)
    text = card.render(card.build_context(ladder, report, _facts(wd, ladder), SETTINGS))
    assert "base model without a chat template" in text
    assert "{prompt}" not in text


def test_prompt_format_rendered_from_the_chat_template(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path)
    text = card.render(card.build_context(ladder, report, _facts(wd, ladder), SETTINGS))
    assert "<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant" in text


@pytest.mark.parametrize("template, expect", [
    (CHATML, "<|im_start|>user\n{prompt}<|im_end|>"),
    # a template that refuses system messages falls back to a user-only conversation
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
     "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", "[INST] {prompt} [/INST]"),
    ("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}", '"{prompt}"'),
    # untrusted code cannot escape the sandbox: no example instead of an exploit
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}", None),
    ("{% for m in messages %}{{ messages.append(m) }}{% endfor %}", None),  # immutable sandbox
    ("{% for %}", None),  # syntax error
    (None, None),
])
def test_render_chat_example(template, expect) -> None:
    out = source_card.render_chat_example(template, "<s>", "</s>")
    if expect is None:
        assert out is None
    else:
        assert out is not None and expect in out


def test_card_parses_with_modelcard_and_passes_yaml_validation(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    ladder, report, wd = _inputs(tmp_path)
    facts = _facts(wd, ladder, card_data={"license": "apache-2.0", "language": "en"}, pipeline_tag="text-generation")
    text = card.render(card.build_context(ladder, report, facts, SETTINGS, card.CardExtras(whats_new=["rebuilt from x"])))
    assert _validate_front_matter(text) == []
    mc = ModelCard(text)
    d = mc.data.to_dict()
    assert d["base_model"] == "acme/Tiny-Instruct"
    assert d["base_model_relation"] == "quantized"
    assert d["license"] == "apache-2.0"
    assert d["language"] == "en"
    assert d["quantized_by"] == "team"
    assert "gguf" in d["tags"] and "imatrix" in d["tags"]
    assert "What's new" in mc.text and "rebuilt from x" in mc.text


def test_card_content_sections(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path, split=("Q8_0",))
    text = card.render(card.build_context(ladder, report, _facts(wd, ladder), SETTINGS,
                                         card.CardExtras(chart="size-vs-kld.png")))
    repo = SETTINGS.repo_id
    assert f'hf download {repo} --include "Tiny-Instruct-Q4_K_M.gguf" --local-dir .' in text
    assert f'hf download {repo} --include "Tiny-Instruct-Q8_0/*" --local-dir .' in text
    assert f"llama-cli -hf {repo}:Q4_K_M" in text
    assert f"llama-server -hf {repo}:Q4_K_M" in text
    assert f"ollama run hf.co/{repo}:Q4_K_M" in text
    assert "![Size against mean KL divergence](size-vs-kld.png)" in text
    assert "[report.json](report.json)" in text
    assert "`Tiny-Instruct-imatrix.gguf`" in text and "`Tiny-Instruct-imatrix.dat`" in text
    assert f"[groups_merged.txt]({HUB}/datasets/acme/calib/blob/main/groups_merged.txt)" in text
    assert "Which file should I choose?" in text and "Memory at 32k context" in text
    assert "| bf16 vs source | passed |" in text
    assert str(tmp_path) not in text  # no path of this machine on the card
    assert "What's new" not in text


def test_calibration_from_a_local_path_is_named_but_not_linked(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path)
    assert ladder.imatrix is not None and ladder.imatrix.calibration is not None
    local = dataclasses.replace(ladder.imatrix.calibration, source=str(tmp_path / "secret" / "calib.txt"))
    ladder = dataclasses.replace(ladder, imatrix=dataclasses.replace(ladder.imatrix, calibration=local))
    text = card.render(card.build_context(ladder, report, _facts(wd, ladder), SETTINGS))
    assert "`groups_merged.txt`" in text and "secret" not in text


def test_evaluation_and_skipped_checks_are_shown(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path, chat_template=None)
    text = card.render(card.build_context(ladder, report, _facts(wd, ladder), SETTINGS))
    assert "Figures measured on `wiki.test.raw` (65,536 tokens scored, 128 chunks of 512)" in text
    assert "BF16 perplexity 9.870 ± 0.050" in text
    assert "| chat template | skipped | no chat template |" in text


def test_non_finite_figures_show_as_missing(tmp_path: Path) -> None:
    ladder, report, wd = _inputs(tmp_path)
    wire = report.to_json()
    wire["files"][0].update(kld_mean="nan", same_top_p=None, ppl_ratio="inf")
    report = Report.from_json(wire)
    ctx = card.build_context(ladder, report, _facts(wd, ladder), SETTINGS)
    q8 = next(f for f in ctx["files"] if f["type"] == "Q8_0")
    assert (q8["kld"], q8["same_top_p"], q8["ppl_ratio"]) == ("—", "—", "inf")


def test_facts_from_a_gguf_header(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(30)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_embedding_length(576)
    w.add_context_length(8192)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    facts = source_card.SourceFacts.facts_from_gguf(path)
    assert facts == {"n_layer": 30, "n_kv_heads": 3, "head_dim": 64, "n_ctx_train": 8192, "chat_template": CHATML}
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF not really")
    assert source_card.SourceFacts.facts_from_gguf(junk) == {}
