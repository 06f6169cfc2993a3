"""What a new upstream revision changed decides the job: weights or model config -> the full job; only the chat
template, special tokens, generation config or tokenizer files -> a metadata patch; and the patch is refused
when the vocabulary or an architecture key would change."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.jobs.patch import FULL, PATCH, PatchBase, classify, json_keys_changed
from converters.formats.gguf_meta import GgufMeta
from converters.patch.metapatch import changed_keys, refusal


@pytest.mark.parametrize("changed,keys,kind,words", [
    (["chat_template.jinja"], {}, PATCH, "chat template"),
    (["tokenizer_config.json"], {"tokenizer_config.json": {"chat_template"}}, PATCH, "chat template"),
    (["tokenizer_config.json"], {"tokenizer_config.json": {"eos_token"}}, PATCH, "special tokens"),
    (["generation_config.json"], {"generation_config.json": {"eos_token_id"}}, PATCH, "end tokens"),
    (["config.json", "generation_config.json"], {"config.json": {"eos_token_id", "transformers_version"},
                                                 "generation_config.json": {"eos_token_id"}}, PATCH, "special tokens"),
    (["tokenizer.json", "tokenizer_config.json"], {"tokenizer_config.json": None}, PATCH, "tokenizer"),
    (["model.safetensors"], {}, FULL, "weights changed"),
    (["model-00001-of-00002.safetensors", "chat_template.jinja"], {}, FULL, "weights changed"),
    (["config.json"], {"config.json": {"vocab_size"}}, FULL, "vocab_size"),
    (["config.json"], {"config.json": {"rope_theta", "eos_token_id"}}, FULL, "rope_theta"),
    (["config.json"], {"config.json": None}, FULL, "not comparable"),
    (["preprocessor_config.json"], {}, FULL, "does not cover"),
    ([], {}, FULL, "no result-changing file"),
])
def test_classify(changed, keys, kind, words) -> None:
    c = classify(changed, keys)
    assert c.kind == kind and words in c.reason, c
    if kind == PATCH:
        assert c.what and words.split()[0] in " ".join(c.what)


def test_whats_new_line() -> None:
    base = PatchBase("me/M-GGUF", "a" * 40, Path("ladder.json"), ("chat_template.jinja",), ("chat template",))
    assert base.whats_new("abc1234def") == "chat template updated upstream (commit abc1234)"
    two = PatchBase("me/M-GGUF", "a" * 40, Path("l"), (), ("chat template", "special tokens"))
    assert two.whats_new("0123456789") == "chat template and special tokens updated upstream (commit 0123456)"


def test_json_keys_changed() -> None:
    assert json_keys_changed('{"a": 1, "b": 2}', '{"a": 1, "b": 3, "c": 0}') == {"b", "c"}
    assert json_keys_changed(None, '{"a": 1}') is None
    assert json_keys_changed("[1]", "[2]") is None


def meta(**values) -> GgufMeta:
    return GgufMeta(path=Path("x.gguf"), values={"general.architecture": "llama", **values}, data_offset=0,
                    tensor_count=0)


def test_refusal_on_vocabulary_and_architecture_changes() -> None:
    old = meta(**{"tokenizer.ggml.tokens": ["a", "b"], "llama.block_count": 2, "tokenizer.chat_template": "x"})
    same = meta(**{"tokenizer.ggml.tokens": ["a", "c"], "llama.block_count": 2, "tokenizer.chat_template": "y"})
    assert refusal(same, old) is None
    assert changed_keys(same, old) == ["tokenizer.chat_template", "tokenizer.ggml.tokens"]
    longer = meta(**{"tokenizer.ggml.tokens": ["a", "b", "c"], "llama.block_count": 2})
    assert "2 -> 3 tokens" in refusal(longer, old)
    arch = meta(**{"tokenizer.ggml.tokens": ["a", "b"], "llama.block_count": 3})
    assert "llama.block_count" in refusal(arch, old)
    other = GgufMeta(path=Path("y"), values={"general.architecture": "gemma3", "tokenizer.ggml.tokens": ["a", "b"]},
                     data_offset=0, tensor_count=0)
    assert "architecture would change" in refusal(other, old)


# --------------------------------------------------------------------------------------------------
# The runner's decision for a job (bot.jobs.patch.choose): an in-memory Hub, the earlier job's kept ladder.json
# --------------------------------------------------------------------------------------------------


class Jobs:
    def __init__(self, *jobs) -> None:
        self.rows = list(jobs)

    def jobs(self, statuses=None, repo=None, limit=1000, newest_first=False):
        return [j for j in self.rows if (repo is None or j.repo == repo)
                and (statuses is None or j.status in statuses)]


def _published_job(tmp_path: Path, hub, repo: str, sha: str, toolchain: str = "tc 1"):
    from types import SimpleNamespace

    from bot.model import jobstate as J
    from bot.model.revisions import fingerprint
    from converters.core.workdir import Ladder, ReferenceFile, ToolchainInfo, WorkDir

    keep = tmp_path / "keep"
    keep.mkdir(exist_ok=True)
    WorkDir(keep).write_ladder(Ladder(reference=ReferenceFile(path="M-BF16.gguf"), toolchain=ToolchainInfo(
        version=toolchain)))
    return SimpleNamespace(id=1, repo=repo, revision=sha, status=J.Status.PUBLISHED, target_repo="me/M-GGUF",
                           fingerprint=fingerprint(hub.model_info(repo, sha)),
                           result={"kept": [str(keep / "ladder.json")]})


def test_choose_patch_or_full(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bot.jobs.patch import choose
    from tests.bot_fixtures import FakeHub

    hub, repo = FakeHub(), "acme/M"
    v1 = hub.commit(repo, {"model.safetensors": b"w1", "config.json": '{"a": 1, "eos_token_id": 2}',
                           "chat_template.jinja": "t1", "tokenizer_config.json": '{"eos_token": "x"}'})
    prev = _published_job(tmp_path, hub, repo, v1)

    def decide(sha, *, store=None, toolchain="tc 1"):
        job = SimpleNamespace(id=2, repo=repo, revision=sha)
        return choose(job, store or Jobs(prev), hub, workdir=tmp_path / "w", toolchain_version=toolchain)

    c, base = decide(v1, store=Jobs())
    assert (c.kind, base) == (FULL, None) and "no earlier publication" in c.reason
    c, _ = decide(v1)
    assert c.kind == FULL and "again" in c.reason
    v2 = hub.commit(repo, {"chat_template.jinja": "t2 longer"})
    c, base = decide(v2)
    assert c.kind == PATCH and base.target_repo == "me/M-GGUF" and base.base_revision == v1
    assert base.whats_new(v2) == f"chat template updated upstream (commit {v2[:7]})"
    c, _ = decide(v2, toolchain="tc 2")
    assert c.kind == FULL and "tc 1" in c.reason
    v3 = hub.commit(repo, {"config.json": '{"a": 1, "eos_token_id": 7}', "tokenizer_config.json": '{"eos_token": "y"}'})
    c, base = decide(v3)
    assert c.kind == PATCH and base.what == ("chat template", "special tokens")  # both, since v1 (published)
    v4 = hub.commit(repo, {"config.json": '{"a": 2, "eos_token_id": 7}'})
    c, _ = decide(v4)
    assert c.kind == FULL and "config.json: a" in c.reason
    v5 = hub.commit(repo, {"model.safetensors": b"w2"})
    c, _ = decide(v5)
    assert c.kind == FULL and "weights changed" in c.reason
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "kind.json").write_text('{"kind": "full", "reason": "metadata patch refused: x"}')
    c, _ = decide(v2)
    assert c.kind == FULL and "refused" in c.reason  # a resumed job that fell back stays full
