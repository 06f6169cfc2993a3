"""Issue 19.1, end to end: the two-templates repo (a harmless ``chat_template.jinja``, the one transformers renders, and
a looping ``chat_template`` in ``tokenizer_config.json``, the one the pinned converter's gguf-py writes into the GGUF).

- ``ggufbot convert`` of it fails within 60 s with one ``error:`` line naming the template, nothing written;
- the bot's job (``bot.jobs.job.run_job`` with the bot's rules) is refused with the same reason;
- a template that reaches the BF16 reference without being seen at inspect (a converter that adds its own) is
  refused right after the convert stage, before any llama.cpp program: the reference is the last file written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.jobs.job import JobSpec, Source, run_job
from converters.formats import chat
from converters.core import records
from converters.core.errors import UnsupportedModel
from converters.core.hooks import NULL_HOOKS
from converters.ladder.job import CheckpointRules, TEMPLATES_RECORD
from converters.ladder.pipeline import LadderOptions

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("quick_render_limit")]

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% if a < 0 %}x{% endif %}{% endfor %}{% endfor %}"
REASON = "its chat template (tokenizer_config.json chat_template) does not render within the sandbox's limits"


def two_templates(src: Path, dest: Path) -> Path:
    """``src`` (its weights linked, not copied) with the looping template added to tokenizer_config.json."""
    dest.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".safetensors"):
            os.symlink(f, dest / f.name)
        else:
            (dest / f.name).write_bytes(f.read_bytes())
    assert (dest / chat.JINJA_FILE).is_file()  # the harmless one transformers (and the old check) use
    cfg = json.loads((dest / chat.TOKENIZER_CONFIG).read_text())
    (dest / chat.TOKENIZER_CONFIG).write_text(json.dumps({**cfg, "chat_template": LOOPS}))
    return dest


def test_convert_of_the_two_templates_repo_fails_within_60_s(smollm2: Path, toolchain, tmp_path: Path) -> None:
    src = two_templates(smollm2, tmp_path / "SmolLM2-two-templates")
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "bot.cli", "convert", str(src), "--out", str(out), "--ladder", "Q8_0",
                          "--no-imatrix", "--no-eval"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    took = time.monotonic() - t0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1, res.stderr[-2000:]
    assert len(errors) == 1 and REASON in errors[0], res.stderr[-2000:]
    assert took < 60, took
    print(f"convert of the two-templates repo failed in {took:.1f} s: {errors[0][:160]}")
    assert not list(out.rglob("*.gguf")) and records.load(out, "convert") is None  # nothing converted


def test_the_bots_job_is_refused_with_that_reason(tiny_llama: Path, toolchain, tmp_path: Path) -> None:
    src = two_templates(tiny_llama, tmp_path / "Tiny-two-templates")
    spec = JobSpec(source=Source(repo="lab/Tiny-two-templates", revision="0" * 40, path=src), model_name="Tiny",
                   ladder=LadderOptions(ladder="Q8_0", imatrix=False), rules=CheckpointRules(check_architecture=True))
    with pytest.raises(UnsupportedModel, match=r"tokenizer_config\.json chat_template.*sandbox's limits"):
        run_job(spec, tmp_path / "work", NULL_HOOKS, toolchain=toolchain)
    assert not list((tmp_path / "work").rglob("*.gguf"))


def test_a_template_unseen_at_inspect_is_refused_after_convert(tiny_llama: Path, toolchain, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the converter added a template of its own (some families do): inspect sees none, the reference has the
    looping one; the job stops at the convert stage, naming the GGUF key, and no later stage ran."""
    src = two_templates(tiny_llama, tmp_path / "Tiny-converter-template")
    monkeypatch.setattr(chat, "template_candidates", lambda *a, **k: [])
    spec = JobSpec(source=Source(path=src), model_name="Tiny",
                   ladder=LadderOptions(ladder="Q8_0", imatrix=False))
    work = tmp_path / "work"
    with pytest.raises(UnsupportedModel, match=r"the GGUF's chat template tokenizer\.chat_template does not render"):
        run_job(spec, work, NULL_HOOKS, toolchain=toolchain)
    assert [p.name for p in work.glob("*.gguf")] == ["Tiny-BF16.gguf"]
    assert records.load(work, "convert") is not None and records.load(work, TEMPLATES_RECORD) is None
    assert sorted(p.stem for p in (work / records.RECORDS_DIR).glob("*.json")
                  if p.name != records.HASH_CACHE_FILE) == ["convert"]


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    from tests.models import tiny_random_checkpoint

    return tiny_random_checkpoint("llama")
