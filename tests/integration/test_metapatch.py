"""Metadata-patch jobs through the test Hub: a scripted tiny llama (it passes the gate like a real model) is
published by a full job; then upstream revisions arrive:

1. only the chat template changes: the job is a metadata patch; the published GGUF's template changed, its tensor
   data is byte-identical, the checks pass again, the KLD figures are kept, one commit says what's new;
2. only the end token changes (tokenizer_config.json's ``eos_token``): patched the same way, the EOS id changed;
3. the vocabulary changes: tokens added to the tokenizer only (the patch is refused on the way: the full job), or
   with the embeddings resized (a full job at once); the kind and its reason are recorded;
4. a revision that only adds an ``auto_map`` to ``tokenizer_config.json`` is a patch, and the patch job passes the same
   gate as a full job (issue 19): refused at ``inspect`` with the full job's reason, before the pinned converter's
   ``--vocab-only`` (which loads some architectures' tokenizers with ``trust_remote_code=True``) reads a file, and
   nothing is published. Last: the refused revision stays on the source's main branch.

And the file level: a split file stays split (part 2 is copied as it is, part 1 gets the new keys).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.model import jobstate as J
from bot.hub.client import Hub
from bot.service.runner import Runner
from bot.model.settings import from_mapping
from bot.state.store import Store
from bot.model.revisions import fingerprint
from converters.formats import gguf_meta
from converters.patch import metapatch
from tests.bot_fixtures import checkpoint_files, scripted_model
from tests.hub_fixtures import TEST_TOKEN, TEST_USER, default_tokens
from tests.models import tiny_random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.llama]

SOURCE = "acme/Tiny-Chat"
TARGET = f"{TEST_USER}/Tiny-Chat-GGUF"
Q8 = "Tiny-Chat-Q8_0.gguf"


class World:
    def __init__(self, hub_server, tmp: Path, toolchain, cal: Path, ev: Path):
        self.server, self.tmp = hub_server, tmp
        self.settings = from_mapping({
            "data_dir": str(tmp / "data"), "sources": [{"author": "acme"}],
            "limits": {"max_model_gb": 1.0, "min_free_disk_gb": 0.0},
            "quantize": {"ladder": "Q8_0", "calibration_text": str(cal), "evaluation_text": str(ev),
                         "calibration_chunks": 2, "evaluation_chunks": 2, "ctx": 128}},
            env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**13)
        self.store = Store(self.settings.database_url)
        self.hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url, sleep=lambda s: None)
        self.runner = Runner(self.settings, self.store, self.hub, worker_id="w1", toolchain=toolchain)
        self.now = 1.0

    def run(self, sha: str):
        self.now += 10
        jid = self.store.enqueue(SOURCE, sha, reason="test", now=self.now,
                                 fingerprint=fingerprint(self.hub.model_info(SOURCE, revision=sha)))
        out = self.runner.run_one(now=self.now)
        return out, self.store.job(jid)

    def published(self, name: str, dest: str) -> Path:
        p = self.tmp / dest
        p.write_bytes(self.server.files(TARGET)[name])
        return p

    def report(self) -> dict:
        return json.loads(self.server.files(TARGET)["report.json"])


@pytest.fixture(scope="module")
def world(hub_server_session, tmp_path_factory, toolchain, calibration_text, eval_text):
    hub_server_session.reset(valid_tokens=default_tokens())
    tmp = tmp_path_factory.mktemp("metapatch")
    tiny = tiny_random_checkpoint("llama")
    ckpt = scripted_model(tiny, tmp / "ckpt", chat_template=(tiny / "chat_template.jinja").read_text())
    w = World(hub_server_session, tmp, toolchain, calibration_text, eval_text)
    w.ckpt = ckpt
    sha = hub_server_session.add_model(SOURCE, checkpoint_files(ckpt),
                                       config=json.loads((ckpt / "config.json").read_text()),
                                       card_data={"license": "apache-2.0"}, pipeline_tag="text-generation",
                                       safetensors_params=13_500_000)
    out, job = w.run(sha)
    assert out.status == J.Status.PUBLISHED, job
    assert job.result["kind"] == "full" and "no earlier publication" in job.result["kind_reason"]
    w.first = w.published(Q8, "first.gguf")
    w.first_report = w.report()
    yield w
    w.store.close()


def commits(world: World) -> list:
    return [c for c in world.server.commits(TARGET) if c.parent is not None]


def test_template_only_revision_is_patched(world: World) -> None:
    tpl = (world.ckpt / "chat_template.jinja").read_text() + "{#- fixed upstream -#}\n"
    sha = world.server.add_commit(SOURCE, {"chat_template.jinja": tpl}, message="fix the chat template")
    before = len(commits(world))
    out, job = world.run(sha)
    assert out.status == J.Status.PUBLISHED, job
    assert job.result["kind"] == "patch" and "chat template" in job.result["kind_reason"]
    assert "metadata patch" in job.result["kind_reason"]
    events = [e for e in world.store.events(job_id=job.id, limit=100) if e["kind"] == "job.kind"]
    assert events and events[0]["data"]["kind"] == "patch"
    stages = {e["message"].split()[0] for e in world.store.events(job_id=job.id, limit=200)
              if e["kind"] in ("stage.end", "stage.skip")}
    assert not stages & {"convert", "calibrate", "quantize", "evaluate"}  # nothing made again

    new = world.published(Q8, "template.gguf")
    assert gguf_meta.read(new).get(gguf_meta.CHAT_TEMPLATE) == tpl
    assert gguf_meta.read(world.first).get(gguf_meta.CHAT_TEMPLATE) != tpl
    assert metapatch.tensor_data_sha256(new) == metapatch.tensor_data_sha256(world.first)
    assert new.read_bytes() != world.first.read_bytes()

    rep, old = world.report(), world.first_report
    for name in ("tokenizer", "chat_template", "special_tokens", "end_of_reply", "generation", "weights_unchanged"):
        assert rep["checks"][name]["status"] == "passed", (name, rep["checks"][name])
    assert rep["checks"]["weights_unchanged"]["tensor_data_sha256"][Q8] == metapatch.tensor_data_sha256(new)
    [f] = rep["files"]
    assert f["status"] == "passed" and f["kld_mean"] == old["files"][0]["kld_mean"]
    assert f["checks"]["generation"]["status"] == "passed" and f["checks"]["metadata"]["status"] == "passed"
    assert rep["patch"]["from_revision"] == old["source"]["revision"] and rep["source"]["revision"] == sha
    assert rep["patch"]["keys_changed"] == ["tokenizer.chat_template"]
    assert rep["publication"]["source"]["revision"] == sha

    line = f"chat template updated upstream (commit {sha[:7]})"
    assert len(commits(world)) == before + 1  # one commit
    assert line in commits(world)[-1].summary
    assert line in world.server.files(TARGET)["README.md"].decode()


def test_eos_only_revision_is_patched(world: World) -> None:
    cfg = json.loads((world.ckpt / "tokenizer_config.json").read_text())
    old_eos = gguf_meta.read(world.first).get(gguf_meta.K.Tokenizer.EOS_ID)
    cfg["eos_token"] = "<|endoftext|>"
    sha = world.server.add_commit(SOURCE, {"tokenizer_config.json": json.dumps(cfg, indent=1)}, message="fix eos")
    out, job = world.run(sha)
    assert out.status == J.Status.PUBLISHED, job
    assert job.result["kind"] == "patch" and "special tokens" in job.result["kind_reason"]
    new = world.published(Q8, "eos.gguf")
    meta = gguf_meta.read(new)
    assert meta.get(gguf_meta.K.Tokenizer.EOS_ID) == 0 != old_eos
    assert metapatch.tensor_data_sha256(new) == metapatch.tensor_data_sha256(world.first)
    rep = world.report()
    assert rep["checks"]["special_tokens"]["status"] == "passed", rep["checks"]["special_tokens"]
    assert rep["checks"]["end_of_reply"]["status"] == "passed", rep["checks"]["end_of_reply"]
    assert rep["patch"]["keys_changed"] == ["tokenizer.ggml.eos_token_id"]
    assert f"special tokens updated upstream (commit {sha[:7]})" in commits(world)[-1].summary


def _added_tokens(tok: dict, first_id: int, n: int) -> list[str]:
    names = [f"<|extra_{i}|>" for i in range(n)]
    for i, t in enumerate(names):
        tok["added_tokens"].append({"id": first_id + i, "content": t, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    return names


@pytest.fixture
def full_runs_stopped(monkeypatch):
    """The full job's stages are not run again here (the full path is every other test's): a full spec reaching
    ``run_job`` is recorded and stopped (the job goes back to the queue); a patch spec runs for real."""
    from bot.jobs import run as run_mod
    from converters.core.errors import Cancelled

    real, seen = run_mod.run_job, []

    def spy(spec, *a, **kw):
        seen.append("patch" if spec.patch is not None else "full")
        if spec.patch is None:
            raise Cancelled("stopped before the full job's stages (test)")
        return real(spec, *a, **kw)

    monkeypatch.setattr(run_mod, "run_job", spy)
    return seen


def _kind_events(world: World, jid: int) -> list[dict]:
    return [e["data"] for e in reversed(world.store.events(job_id=jid, limit=100)) if e["kind"] == "job.kind"]


def test_vocabulary_change_takes_the_full_path(world: World, full_runs_stopped) -> None:
    """Tokens added to the tokenizer only: the patch is tried, refused (the vocabulary no longer fits), and the
    job runs in full, with the reason recorded; with the embeddings resized too, it is a full job at once."""
    tok = json.loads((world.ckpt / "tokenizer.json").read_text())
    cfg = json.loads((world.ckpt / "config.json").read_text())
    n = cfg["vocab_size"]
    _added_tokens(tok, n, 8)
    sha = world.server.add_commit(SOURCE, {"tokenizer.json": json.dumps(tok)}, message="more tokens")
    out, job = world.run(sha)
    assert out.status == J.Status.QUEUED and full_runs_stopped == ["patch", "full"]
    first, then = _kind_events(world, job.id)
    assert first["kind"] == "patch" and then["kind"] == "full"
    assert "metadata patch refused" in then["reason"] and "vocabulary" in then["reason"]
    wd = Path(job.workdir)
    assert json.loads((wd / "kind.json").read_text())["kind"] == "full"  # a resumed job stays full
    assert not (wd / metapatch.BASE_DIR).exists()  # what the patch downloaded is gone
    J.operator_cancel(world.store, job.id, now=world.now)

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(world.ckpt / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        weights[name] = torch.cat([w, torch.zeros(8, w.shape[1], dtype=w.dtype)])
    resized = world.tmp / "resized.safetensors"
    save_file(weights, str(resized), metadata={"format": "pt"})
    full_runs_stopped.clear()
    sha = world.server.add_commit(SOURCE, {"config.json": json.dumps({**cfg, "vocab_size": n + 8}),
                                           "model.safetensors": resized}, message="resize the embeddings")
    out, job = world.run(sha)
    assert out.status == J.Status.QUEUED and full_runs_stopped == ["full"]
    [kind] = _kind_events(world, job.id)
    assert kind["kind"] == "full" and "weights changed (model.safetensors)" in kind["reason"]
    J.operator_cancel(world.store, job.id, now=world.now)


def test_a_split_file_stays_split(world: World, toolchain, tmp_path: Path) -> None:
    """Part 1 gets the new tokenizer keys, the other parts are copied as they are; tensor data unchanged."""
    from converters.core.proc import run

    split = tmp_path / "split"
    split.mkdir()
    run([toolchain.program("llama-gguf-split"), "--split", "--split-max-tensors", "8", world.first,
         split / "Tiny-Q8_0"], timeout=300)
    parts = sorted(split.glob("*.gguf"))
    assert len(parts) >= 2
    src = tmp_path / "src"
    shutil.copytree(world.ckpt, src, ignore=shutil.ignore_patterns("*.safetensors"))
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    vocab, _ = metapatch.vocab_only(src, tmp_path, toolchain=toolchain)
    out = tmp_path / "out"
    done = [metapatch.rewrite(p, out / p.name, vocab) for p in parts]
    assert [d.rewritten for d in done] == [True] + [False] * (len(parts) - 1)
    assert all(d.data_sha256 == d.source_data_sha256 for d in done)
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in parts[1:])
    assert gguf_meta.read(out / parts[0].name).get(gguf_meta.CHAT_TEMPLATE).startswith("{% for m in messages")
    assert gguf_meta.read(out / parts[0].name).get("split.count") == len(parts)


def test_a_tokenizer_auto_map_revision_is_refused_by_the_patch_job(world: World) -> None:
    # on the files of the last published revision (the tests above left other revisions on main), only auto_map
    base = max(world.store.jobs([J.Status.PUBLISHED], repo=SOURCE), key=lambda j: j.id).revision
    files, head = world.server.files(SOURCE, revision=base), world.server.files(SOURCE)
    cfg = json.loads(files["tokenizer_config.json"])
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    sha = world.server.add_commit(SOURCE, {**{n: b for n, b in files.items() if head.get(n) != b},
                                           "tokenizer_config.json": json.dumps(cfg, indent=1)},
                                  deletions=[n for n in head if n not in files], message="tokenizer code")
    before = len(commits(world))
    out, job = world.run(sha)
    kinds = [e["data"] for e in world.store.events(job_id=job.id, limit=100) if e["kind"] == "job.kind"]
    assert kinds and kinds[-1]["kind"] == "patch"  # only tokenizer settings changed: a patch job
    assert out.status == J.Status.FAILED, job
    assert job.error_type == "UnsupportedModel"
    assert "needs trust_remote_code (tokenizer_config.json has auto_map)" in job.error_message
    stages = {e["message"].split()[0] for e in world.store.events(job_id=job.id, limit=200)
              if e["kind"] in ("stage.start", "stage.end", "stage.skip")}
    assert "vocab" not in stages and "patch" not in stages
    wd = Path(job.workdir)
    assert not (wd / metapatch.VOCAB_FILE).exists()  # the converter never read the files
    assert len(commits(world)) == before  # nothing published
    assert "auto_map" not in world.server.files(TARGET).get("README.md", b"").decode()
