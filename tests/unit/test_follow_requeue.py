"""Which refused jobs a switch to a new llama.cpp build queues again (bot/service/follow.Follower.requeue_refused):
the latest job of a repo that failed because the converter did not know its architecture or its vision tower, when
the new converter knows it; nothing else."""

from __future__ import annotations

from pathlib import Path

from bot.model import jobstate as J
from bot.model.settings import from_mapping
from bot.service.follow import Follower, toolchain_line
from bot.state.memstore import MemoryStore
from converters.llama.builds import Build

ARCH = "architecture {} is not supported by the pinned llama.cpp converter"
VISION = ("vision-language model {}: the pinned llama.cpp converter cannot convert its vision tower (no --mmproj "
          "support), so its projector could not be published")


def _failed(store: MemoryStore, repo: str, message: str, etype: str = "UnsupportedModel") -> int:
    jid = store.enqueue(repo, "a" * 40, reason="new release", now=1.0)
    assert jid is not None and store.claim("w", now=2.0).id == jid
    store.transition(jid, J.Status.FAILED, now=3.0, worker_id="w", error_type=etype, error_message=message)
    return jid


def test_only_what_the_new_converter_supports_is_queued_again(tmp_path: Path) -> None:
    src = tmp_path / "build" / "src" / "conversion"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text('TEXT_MODEL_MAP = {"NewForCausalLM": "new", "VisForConditionalGeneration": "v"}\n'
                                     'MMPROJ_MODEL_MAP = {"VisForConditionalGeneration": "v"}\n')
    build = Build(name="git-x", path=tmp_path / "build", source="git", version="llama.cpp b9 (abc)", commit="abc",
                  tag="b9", flags_key="k", cuda=False, native_digest="d")
    store = MemoryStore()
    settings = from_mapping({"data_dir": str(tmp_path / "data")}, env={}, free_disk=10**12)
    _failed(store, "o/new", ARCH.format("NewForCausalLM"))
    _failed(store, "o/vis", VISION.format("VisForConditionalGeneration"))
    _failed(store, "o/other", ARCH.format("OtherForCausalLM"))  # still unknown
    _failed(store, "o/broken", "the BF16 conversion disagrees with the source model")  # not a converter refusal
    _failed(store, "o/tool", ARCH.format("NewForCausalLM"), etype="ToolError")
    ids = Follower(settings, store, hub=None).requeue_refused(build, "b9", now=10.0)
    queued = {store.job(i).repo: store.job(i).reason for i in ids}
    assert queued == {"o/new": "llama.cpp b9 supports it", "o/vis": "llama.cpp b9 supports it"}
    assert Follower(settings, store, hub=None).requeue_refused(build, "b9", now=11.0) == []  # once per release


def test_the_status_line() -> None:
    line = toolchain_line({"in_use": {"version": "llama.cpp b2 (abc1234)"}, "following": True, "newest_tag": "b3",
                           "canary": {"tag": "b3", "passed": False, "reasons": ["tokenizer check fails"]}})
    assert line == ("llama.cpp b2 (abc1234) in use; following releases, newest tag b3; canary of b3 failed: "
                    "tokenizer check fails")
