"""Issue 19.1: the chat template that is checked is the one that goes into the GGUF.

Every template a converter or a runtime may pick (``tokenizer_config.json``'s ``chat_template`` as a string or a list
of named ones, ``chat_template.jinja``, ``chat_template.json``, ``additional_chat_templates/*.jinja``) is rendered in
the sandbox at inspect; every ``tokenizer.chat_template*`` key of a GGUF is rendered before a llama.cpp program
loads the file. No llama.cpp here: the GGUFs are metadata-only files written with gguf-py, and the "program" that
must never start is a script that leaves a canary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import pytest

from converters.formats import chat
from converters.formats import gguf_meta
from converters.ladder import job
from converters.ladder import pipeline
from converters.core import records
from converters.llama import verify
from converters.core.errors import UnsupportedModel
from converters.core.hooks import NULL_HOOKS
from converters.core.report import FAILED
from converters.llama.toolchain import Toolchain
from tests.bot_fixtures import SMALL_LAYER, safetensors_bytes

HARMLESS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% if a < 0 %}x{% endif %}{% endfor %}{% endfor %}"
# renders the sample conversations at once, loops only when it is given tools (as llama.cpp gives it at load)
LOOPS_WITH_TOOLS = "{% if tools %}" + LOOPS + "{% endif %}" + HARMLESS
ESCAPES = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8,
       "intermediate_size": [16, 16], "vocab_size": 16}
BUDGET = 3 * chat.RENDER_SECONDS  # a refusal costs a few renderings, never one per probe and template at the limit
pytestmark = pytest.mark.usefixtures("quick_render_limit")  # looping templates stop sooner


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "_PASSED", set(), raising=False)  # each test renders as a new process would
    monkeypatch.setattr(verify, "_REFUSED", {}, raising=False)


def checkpoint(root: Path, files: dict[str, object]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(CFG))
    (root / "model.safetensors").write_bytes(safetensors_bytes(SMALL_LAYER))
    (root / "tokenizer.json").write_text("{}")
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def run_inspect(root: Path, tmp: Path) -> job.JobContext:
    ctx = job.JobContext(tmp / "work", None, NULL_HOOKS, "M", checkpoint_dir=root)
    job.run_stages([job.InspectStage(pipeline.LadderOptions(ladder="Q8_0", imatrix=False))], ctx)
    return ctx


# ------------------------------------------------------------------------------------------ the candidates
NAMED = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]


@pytest.mark.parametrize(("files", "expected"), [
    ({}, []),
    ({"tokenizer_config.json": {"chat_template": "TOK"}}, [("tokenizer_config.json chat_template", "TOK")]),
    ({"tokenizer_config.json": {"chat_template": NAMED}},
     [("tokenizer_config.json chat_template 'default'", "D"), ("tokenizer_config.json chat_template 'tool_use'", "T")]),
    # the two-templates repo: both, the converter's choice first
    ({"chat_template.jinja": "JINJA", "tokenizer_config.json": {"chat_template": "TOK"}},
     [("tokenizer_config.json chat_template", "TOK"), ("chat_template.jinja", "JINJA")]),
    ({"chat_template.jinja": "JINJA", "additional_chat_templates/tool_use.jinja": "TOOLS"},
     [("chat_template.jinja", "JINJA"), ("additional_chat_templates/tool_use.jinja", "TOOLS")]),
    ({"chat_template.json": {"chat_template": "JSON"}, "tokenizer_config.json": {"chat_template": "JSON"}},
     [("tokenizer_config.json chat_template", "JSON")]),  # one text, listed once
    ({"chat_template.json": {"chat_template": NAMED[1:]}}, [("chat_template.json chat_template 'tool_use'", "T")]),
    ({"chat_template.jinja": " \n", "tokenizer_config.json": {"chat_template": 42}}, []),
])
def test_every_template_a_converter_or_runtime_may_pick(tmp_path: Path, files: dict, expected: list) -> None:
    assert chat.template_candidates(checkpoint(tmp_path / "ck", files)) == expected


# ------------------------------------------------------------------------------------------ inspect
@pytest.mark.parametrize(("files", "named"), [
    # the issue's repo: transformers (and find_template) use the harmless .jinja, gguf-py the looping one
    ({"chat_template.jinja": HARMLESS, "tokenizer_config.json": {"chat_template": LOOPS}},
     "tokenizer_config.json chat_template"),
    ({"chat_template.jinja": HARMLESS, "additional_chat_templates/tool_use.jinja": LOOPS},
     "additional_chat_templates/tool_use.jinja"),
    ({"tokenizer_config.json": {"chat_template": [{"name": "default", "template": HARMLESS},
                                                  {"name": "rag", "template": LOOPS}]}},
     "tokenizer_config.json chat_template 'rag'"),
    ({"chat_template.json": {"chat_template": ESCAPES}, "tokenizer_config.json": {}}, "chat_template.json"),
    ({"chat_template.jinja": LOOPS_WITH_TOOLS}, "chat_template.jinja"),
])
def test_inspect_refuses_a_hostile_template_wherever_it_is(tmp_path: Path, files: dict, named: str) -> None:
    root = checkpoint(tmp_path / "ck", files)
    t0 = time.monotonic()
    with pytest.raises(UnsupportedModel) as e:
        run_inspect(root, tmp_path)
    assert named in str(e.value), e.value
    assert "within the sandbox's limits" in str(e.value) or "tries to leave the sandbox" in str(e.value)
    assert time.monotonic() - t0 < BUDGET
    assert not (tmp_path / "work" / "plan.json").exists()  # refused before the work dir is prepared


def test_inspect_passes_harmless_templates(tmp_path: Path) -> None:
    root = checkpoint(tmp_path / "ck", {"chat_template.jinja": HARMLESS,
                                        "additional_chat_templates/tool_use.jinja": "{{ raise_exception('x') }}",
                                        "tokenizer_config.json": {"chat_template": HARMLESS + " "}})
    ctx = run_inspect(root, tmp_path)
    assert ctx.plan is not None


# ------------------------------------------------------------------------------------------ the GGUF's templates
def write_gguf(path: Path, templates: dict[str, str]) -> Path:
    """A metadata-only GGUF with a vocabulary and these ``tokenizer.chat_template*`` keys."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, text in templates.items():
        w.add_string(key, text)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_meta_reads_every_template_key(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "m.gguf", {"tokenizer.chat_template": "D", "tokenizer.chat_template.tool_use": "T"})
    assert gguf_meta.read(f).chat_templates() == {"tokenizer.chat_template": "D",
                                                  "tokenizer.chat_template.tool_use": "T"}
    assert verify.GgufFacts.read(f).chat_templates["tokenizer.chat_template.tool_use"] == "T"


@pytest.mark.parametrize("key", ["tokenizer.chat_template", "tokenizer.chat_template.tool_use"])
def test_the_reference_is_refused_after_convert_for_any_template_key(tmp_path: Path, key: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    f = write_gguf(work / "M-BF16.gguf", {"tokenizer.chat_template": HARMLESS, key: LOOPS})
    with pytest.raises(UnsupportedModel, match=key.replace(".", r"\.") + " does not render within"):
        job.sandbox_templates(work, f)
    assert records.load(work, job.TEMPLATES_RECORD) is None


def test_a_passed_reference_is_recorded_and_not_rendered_again(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    f = write_gguf(work / "M-BF16.gguf", {"tokenizer.chat_template": HARMLESS})
    job.sandbox_templates(work, f)
    rec = records.load(work, job.TEMPLATES_RECORD)
    assert rec is not None and set(rec.inputs["templates"]) == {"tokenizer.chat_template"}
    monkeypatch.setattr(verify, "_PASSED", set())  # a resumed job in a new process
    rendered: list[str] = []
    monkeypatch.setattr(chat, "render_probes", lambda t, *a, **k: rendered.append(t) or [])
    job.sandbox_templates(work, f)
    assert rendered == []
    # a changed template is not covered by the record
    g = write_gguf(work / "M-BF16.gguf", {"tokenizer.chat_template": HARMLESS + "!"})
    job.sandbox_templates(work, g)
    assert rendered


def fake_toolchain(tmp: Path) -> tuple[Toolchain, Path]:
    """A toolchain whose programs only leave a canary: if one starts, the canary says so."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    canary = tmp / "started"
    for name in ("llama-completion", "llama-tokenize"):
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\necho $0 >> {canary}\necho '[1, 2]'\n")
        p.chmod(0o755)
    return Toolchain(root=tmp, bin_dir=bin_dir, version="test", commit=None, cuda=False, origin="test"), canary


def test_no_llama_cpp_program_starts_on_a_gguf_whose_template_loops(tmp_path: Path) -> None:
    tc, canary = fake_toolchain(tmp_path)
    f = write_gguf(tmp_path / "patched.gguf", {"tokenizer.chat_template": LOOPS})
    with pytest.raises(UnsupportedModel, match="tokenizer.chat_template does not render"):
        verify.generate(tc, f, "Hello", n_predict=4)
    with pytest.raises(UnsupportedModel, match="no llama.cpp program is started"):
        verify.llama_tokenize(tc, f, "Hello", add_bos=False, workdir=tmp_path)
    assert not canary.exists()
    good = write_gguf(tmp_path / "good.gguf", {"tokenizer.chat_template": HARMLESS})
    verify.generate(tc, good, "Hello", n_predict=4)
    assert canary.read_text().count("llama-completion") == 1  # the check is what stopped the other one


def test_the_template_check_renders_the_gguf_named_templates(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "m.gguf", {"tokenizer.chat_template": HARMLESS,
                                         "tokenizer.chat_template.tool_use": LOOPS})
    check = verify.chat_template_check(verify.GgufFacts.read(f), tmp_path)  # refused before the source is read
    assert check.status == FAILED and "tokenizer.chat_template.tool_use" in check.detail, check.detail
