"""A metadata patch's files pass a full job's inspect before the converter reads them (issue 19): the patch stages
start with ``inspect``, which refuses what ``checkpoint.inspect`` and the template refusal refuse for a full job --
an ``auto_map`` in ``tokenizer_config.json`` (the pinned converter's ``--vocab-only`` loads some architectures'
tokenizers with ``trust_remote_code=True``), an architecture the converter does not know, a template that loops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.patch import metapatch
from converters.core.errors import UnsupportedModel
from converters.core.hooks import NULL_HOOKS
from converters.ladder.job import JobContext, run_stages
from tests.models import tiny_random_checkpoint

LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% if a < 0 %}x{% endif %}{% endfor %}{% endfor %}"
pytestmark = pytest.mark.usefixtures("quick_render_limit")  # looping templates stop sooner


@pytest.fixture
def meta(tmp_path: Path) -> Path:
    """What the patch fetch downloads of a revision: config, tokenizer and template files, no weights."""
    src = tiny_random_checkpoint("llama")
    out = tmp_path / "source"
    out.mkdir()
    for p in src.iterdir():
        if p.is_file() and ".safetensors" not in p.name:
            shutil.copy2(p, out / p.name)
    return out


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _run(meta: Path, tmp_path: Path, **kw) -> JobContext:
    ctx = JobContext(workdir=tmp_path / "work", toolchain=None, hooks=NULL_HOOKS, model_name="Tiny",
                     checkpoint_dir=meta)
    ctx.workdir.mkdir(exist_ok=True)
    return run_stages(metapatch.patch_stages(**kw), ctx)


def test_the_patch_stages_start_with_a_full_inspect() -> None:
    assert [s.name for s in metapatch.patch_stages()] == ["inspect", "vocab", "patch", "recheck"]


def test_a_tokenizer_auto_map_is_refused_before_the_converter_runs(meta: Path, tmp_path: Path) -> None:
    _edit(meta / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    with pytest.raises(UnsupportedModel, match=r"trust_remote_code \(tokenizer_config.json has auto_map\)"):
        _run(meta, tmp_path)
    work = tmp_path / "work"
    assert not (work / metapatch.VOCAB_FILE).exists() and not (work / metapatch.INSPECT_VIEW).exists()


def test_a_looping_template_is_refused_before_the_converter_runs(meta: Path, tmp_path: Path) -> None:
    (meta / "chat_template.jinja").write_text(LOOPS)
    with pytest.raises(UnsupportedModel, match="chat template"):
        _run(meta, tmp_path)
    assert not (tmp_path / "work" / metapatch.VOCAB_FILE).exists()


def test_inspect_sees_the_new_files_as_a_full_job_does(meta: Path, tmp_path: Path) -> None:
    ck = metapatch.inspect_files(meta, tmp_path, supported=frozenset({"LlamaForCausalLM"}))
    assert ck.architecture == "LlamaForCausalLM" and ck.tokenizer_files == ("tokenizer.json",)
    assert ck.chat_template == (meta / "chat_template.jinja").read_text()
    assert not (tmp_path / metapatch.INSPECT_VIEW).exists()
    with pytest.raises(UnsupportedModel, match="not supported by the pinned llama.cpp converter"):
        metapatch.inspect_files(meta, tmp_path, supported=frozenset({"Qwen2ForCausalLM"}))
    _edit(meta / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    with pytest.raises(UnsupportedModel, match=r"config.json has auto_map"):
        metapatch.inspect_files(meta, tmp_path)
