"""transformers on an untrusted checkpoint runs in a limited, offline child (converters.formats.hfchild), never in the
bot's process: the tokenizer service answers like the tokenizer itself, one child per check; the source-model
comparison gives the figures the in-process run gives; a child over its memory budget stops with the reason."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from converters.core import proc
from converters.ladder import evaluate
from converters.ladder.evaluate import source as eval_source
from converters.formats import hfchild
from converters.formats import hfmodel
from converters.llama import verify
from converters.core.errors import InputError
from converters.core.report import SKIPPED
from tests.models import tiny_random_checkpoint

TEXTS = [text for _, text in verify.TOKENIZER_SAMPLES]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_random_checkpoint("llama")


@pytest.fixture
def cold():
    hfmodel.forget()
    yield
    hfmodel.forget()


def test_the_tokenizer_service_answers_like_the_tokenizer(tiny: Path, cold) -> None:
    tok = hfmodel.load_tokenizer(tiny, texts=TEXTS)
    real = hfmodel.load_tokenizer_here(tiny)  # the reference, in the test's process
    assert not type(tok).__module__.startswith(("transformers", "tokenizers"))
    for text in TEXTS:
        for special in (False, True):
            assert tok(text, add_special_tokens=special)["input_ids"] == \
                real(text, add_special_tokens=special)["input_ids"], (text, special)
    sample = hfmodel.special_sample(tok)
    assert sample is not None and sample == hfmodel.special_sample(real)
    ids = real(sample, add_special_tokens=False)["input_ids"]
    assert tok(sample, add_special_tokens=False)["input_ids"] == ids
    assert tok.convert_ids_to_tokens(ids) == real.convert_ids_to_tokens(ids)
    for name in ("bos_token", "eos_token", "bos_token_id", "eos_token_id", "special_tokens_map",
                 "all_special_tokens", "chat_template"):
        assert getattr(tok, name) == getattr(real, name), name
    assert tok.children == 1  # the load, the texts and the special sample: one child
    assert tok.facts["offline"] is True  # HF_HUB_OFFLINE in the child: nothing it does reaches the network

    # the checks of one job share it: no second child for the same files and texts
    assert hfmodel.load_tokenizer(tiny, texts=TEXTS) is tok and tok.children == 1
    facts = dataclasses.replace(_facts(real), bos_id=real.bos_token_id, eos_id=real.eos_token_id)
    assert verify.special_tokens_check(facts, tiny).status == "passed"
    assert tok.children == 1
    # a question it was not asked at load: one more child, same answer
    conv = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(conv, add_generation_prompt=True) == \
        real.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert tok.children == 2


def _facts(real) -> verify.GgufFacts:
    return verify.GgufFacts(path=Path("x.gguf"), arch="llama", tokenizer_model="gpt2", pre="smollm",
                            tokens=tuple(f"t{i}" for i in range(len(real))), bos_id=None, eos_id=None, eot_id=None,
                            eom_id=None, add_bos=False, chat_template=None, digests={})


def test_a_changed_tokenizer_is_loaded_again(tiny: Path, tmp_path: Path, cold) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    first = hfmodel.load_tokenizer(ckpt)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    second = hfmodel.load_tokenizer(ckpt)
    assert second is not first and second.eos_token == "<|endoftext|>" != first.eos_token


def test_loading_a_tokenizer_does_not_bring_transformers_into_the_process(tiny: Path) -> None:
    code = ("import sys\nfrom converters.formats import hfmodel\n"
            f"tok = hfmodel.load_tokenizer({str(tiny)!r})\n"
            "assert tok.eos_token_id == 2, tok.eos_token_id\n"
            "print(sorted(m for m in ('transformers', 'tokenizers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_child_runs_only_an_entry_its_caller_names() -> None:
    """formats/hfchild names no module above it: the caller gives the function the child runs (a top-level function
    of a converters module, imported by name in the child); a request naming anything else runs nothing."""
    assert hfchild.entry_name(hfmodel.tokenizer_here) == "converters.formats.hfmodel:tokenizer_here"
    assert hfchild.entry_name(evaluate.compare_here).endswith(":compare_here")
    for bad in (lambda request: {}, json.loads, dataclasses.replace, hfmodel.SourceTokenizer.encode):
        with pytest.raises(ValueError, match="not a child entry"):
            hfchild.entry_name(bad)
    for name in ("os:system", "json:loads", "converters.formats.hfmodel:Path", "converters.formats.hfmodel:json",
                 "converters.formats.hfmodel:no_such_function", "converters.no_such_module:run", ""):
        res = proc.run([sys.executable, "-I", "-m", hfchild.MODULE], stdin=json.dumps({"entry": name}).encode(),
                       timeout=120, env=hfchild.OFFLINE_ENV)
        assert json.loads(res.stdout)["error"] == "request", name


def test_offline_is_read_from_the_module_transformers_loaded(monkeypatch) -> None:
    """The child's ``offline`` fact comes from huggingface_hub's constants as loaded in it, without importing
    huggingface_hub (only bot/hub does): not loaded is not proven offline."""
    monkeypatch.delitem(sys.modules, "huggingface_hub.constants", raising=False)
    assert hfchild.offline() is False and "huggingface_hub.constants" not in sys.modules
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", types.SimpleNamespace(HF_HUB_OFFLINE=False))
    assert hfchild.offline() is False
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", types.SimpleNamespace(HF_HUB_OFFLINE=True))
    assert hfchild.offline() is True


def test_a_tokenizer_over_its_memory_limit_fails_with_the_reason(tiny: Path, cold, monkeypatch) -> None:
    monkeypatch.setattr(hfmodel, "TOKENIZER_LIMITS", dataclasses.replace(hfmodel.TOKENIZER_LIMITS,
                                                                         data_bytes=64 << 20))
    with pytest.raises(InputError, match="cannot load the source tokenizer .* within its limits"):
        hfmodel.load_tokenizer(tiny)


# --------------------------------------------------------------------------------------------------
# The source-model comparison
# --------------------------------------------------------------------------------------------------

CTX = 64


def _base_logits(path: Path, n_vocab: int, seed: int = 0) -> evaluate.BaseLogits:
    """A llama.cpp base-logits file (tools/perplexity's format) with random tokens and log-probabilities."""
    rng = np.random.default_rng(seed)
    rows, nv = evaluate.scored_per_chunk(CTX), 2 * ((n_vocab + 1) // 2) + 4
    tokens = rng.integers(3, 1000, size=CTX, dtype=np.int32)
    q = rng.integers(0, 65535, size=(rows, nv), dtype=np.uint16)
    head = np.empty((rows, 2), dtype="<f4")
    head[:, 0], head[:, 1] = 20.0 / 65535, -20.0
    q[:, :4] = head.view("<u2").reshape(rows, 4)
    with open(path, "wb") as f:
        f.write(evaluate.LOGITS_MAGIC + np.array([CTX, n_vocab, 1], dtype="<i4").tobytes())
        f.write(tokens.astype("<i4").tobytes())
        f.write(q.astype("<u2").tobytes())
    return evaluate.BaseLogits.open(path)


def test_the_comparison_in_its_child_gives_the_figures_of_the_in_process_run(tiny: Path, tmp_path: Path) -> None:
    import torch

    base = _base_logits(tmp_path / "base.kld", 49152)
    spec = evaluate.CompareSpec(chunks=1, add_bos=True, bos_id=1, parameters=13_500_000, threads=1)
    check = evaluate.compare_with_source(tiny, base, spec)
    torch.set_num_threads(1)
    model = hfmodel.load_causal_lm(tiny, dtype=torch.float32).eval()
    kld, agree, total, n = eval_source._source_log_probs(model, base, spec)
    assert check.data["tokens"] == total == evaluate.scored_per_chunk(CTX) and check.data["chunks"] == n == 1
    assert check.data["top1_agreement"] == agree / total
    assert check.data["kld_mean"] == float(kld.mean()) and check.data["kld_max"] == float(kld.max())
    assert check.data["kld_mean_err"] == float(kld.std(ddof=1) / np.sqrt(len(kld)))
    assert check.data["dtype"] == "float32" and check.data["offloaded"] is False
    assert check.status == "failed" and "disagree" in check.detail  # random reference logits


def test_a_source_model_over_its_memory_budget_is_not_checked(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """The memory limit holds the whole run: a budget the model, torch and one chunk's logits cannot fit in stops
    the child, and the comparison says why instead of the bot's process growing."""
    monkeypatch.setattr(eval_source, "COMPARE_HEADROOM", 0, raising=False)  # (absent before the child)
    base = _base_logits(tmp_path / "base.kld", 49152)
    spec = evaluate.CompareSpec(chunks=1, add_bos=True, bos_id=1, parameters=13_500_000, threads=1,
                                max_memory=32 << 20, offload_dir=tmp_path / "offload")
    check = evaluate.compare_with_source(tiny, base, spec)
    assert check.status == SKIPPED
    assert check.detail.startswith("not checked: the source model could not be run within its limits"), check.detail
    assert not (tmp_path / "offload").exists()


def test_an_allocation_refused_anywhere_in_the_loader_is_reported_as_the_limit(tmp_path: Path, monkeypatch) -> None:
    """Under its memory limit the loader may fail in an import or a file read (OSError ENOMEM), not only with a
    MemoryError: the reason is the limit either way."""
    import errno

    def refuse(*a, **kw):
        try:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        except OSError as e:
            raise RuntimeError("while importing a module") from e

    monkeypatch.setattr(hfmodel, "auto_class", lambda name: type("T", (), {"from_pretrained": staticmethod(refuse)}))
    with pytest.raises(InputError, match="cannot load the source tokenizer .* within its limits"):
        hfmodel.load_tokenizer_here(tmp_path)
    monkeypatch.setattr(hfmodel, "auto_class",
                        lambda name: type("T", (), {"from_pretrained": staticmethod(lambda *a, **k: 1 / 0)}))
    with pytest.raises(InputError) as e:
        hfmodel.load_tokenizer_here(tmp_path)
    assert "within its limits" not in str(e.value)
