"""A metadata-patch job passes the same gate as a full job (issue 19): a revision that only adds an ``auto_map`` to
``tokenizer_config.json`` is classified as a patch, and the patch job refuses it at ``inspect`` -- with the full
job's reason, before the pinned converter's ``--vocab-only`` (which loads some architectures' tokenizers with
``trust_remote_code=True``) reads a file -- and publishes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.model import jobstate as J
from converters.patch import metapatch
from tests.bot_fixtures import checkpoint_files, scripted_model
from tests.hub_fixtures import default_tokens
from tests.integration.test_metapatch import SOURCE, TARGET, World, commits
from tests.models import tiny_random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.llama]


@pytest.fixture(scope="module")
def world(hub_server_session, tmp_path_factory, toolchain, calibration_text, eval_text):
    hub_server_session.reset(valid_tokens=default_tokens())
    tmp = tmp_path_factory.mktemp("patch-gate")
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
    yield w
    w.store.close()


def test_a_tokenizer_auto_map_revision_is_refused_by_the_patch_job(world: World) -> None:
    cfg = json.loads((world.ckpt / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    sha = world.server.add_commit(SOURCE, {"tokenizer_config.json": json.dumps(cfg, indent=1)},
                                  message="tokenizer code")
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
