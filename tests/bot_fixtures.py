"""Fixtures of the bot's tests: Hub content (one acceptable new release and one repo for each reason to skip), an
in-memory stand-in for the Hub adapter's read side (:class:`FakeHub`, for unit tests) and a throw-away PostgreSQL
schema for the store tests."""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from bot.hub import ModelRecord, Sibling
from converters.errors import HubNotFound
from tests.hubserver import HubServer

PG_BASE = os.environ.get("GGUFBOT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

SMALL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
FAKE_WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # never downloaded: skipped before any fetch

# repo name -> the decision code the watcher must record for it
EXPECTED_SKIPS = {
    "Gated-1B": "gated",
    "Remote-1B": "remote_code",
    "Pickle-1B": "pickle_only",
    "Packed-1B": "quantized",
    "Huge-70B": "too_large",
    "Escape-1B": "unsafe_filename",
}


def checkpoint_files(path: Path) -> dict[str, Path]:
    """The files of a local checkpoint folder, as the server's ``files`` mapping (README.md left out)."""
    return {p.name: p for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != "README.md"}


def populate(hub: HubServer, author: str, release_name: str, release_files: Mapping[str, Any], *,
             release_config: dict | None = None, release_params: int = 134_515_008) -> dict[str, str]:
    """Add the accepted release and the six repos that must be skipped; return repo id -> expected code."""
    card = {"license": "apache-2.0", "pipeline_tag": "text-generation", "library_name": "transformers"}
    tg = {"pipeline_tag": "text-generation", "library_name": "transformers"}
    small = {"config.json": json.dumps(SMALL_CONFIG), "model.safetensors": FAKE_WEIGHTS, "tokenizer.json": "{}"}
    hub.add_model(f"{author}/{release_name}", dict(release_files), card_data=card, config=release_config or SMALL_CONFIG,
                  safetensors_params=release_params, **tg)
    hub.add_model(f"{author}/Gated-1B", small, card_data=card, gated="manual", config=SMALL_CONFIG,
                  safetensors_params=1_000_000, **tg)
    remote_cfg = {**SMALL_CONFIG, "auto_map": {"AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}}
    hub.add_model(f"{author}/Remote-1B", {**small, "config.json": json.dumps(remote_cfg),
                                          "modeling_remote.py": "import os\n"},
                  card_data=card, config=remote_cfg, safetensors_params=1_000_000, **tg)
    hub.add_model(f"{author}/Pickle-1B", {"config.json": json.dumps(SMALL_CONFIG), "pytorch_model.bin": b"\x80\x04pickle"},
                  card_data=card, config=SMALL_CONFIG, **tg)
    hub.add_model(f"{author}/Packed-1B", {"config.json": json.dumps(SMALL_CONFIG), "packed-Q4_K_M.gguf": b"GGUF\x03"},
                  card_data=card, config=SMALL_CONFIG, **tg)
    hub.add_model(f"{author}/Huge-70B", small, card_data=card, config=SMALL_CONFIG, safetensors_params=70_000_000_000,
                  **tg)
    hub.add_model(f"{author}/Escape-1B", {**small, "../../escape.sh": "#!/bin/sh\n"}, card_data=card,
                  config=SMALL_CONFIG, safetensors_params=1_000_000, **tg)
    return {f"{author}/{k}": v for k, v in EXPECTED_SKIPS.items()}


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """A database URL on a fresh schema of the test PostgreSQL server, dropped afterwards (the test is skipped
    when the server is not reachable)."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_BASE)
    try:
        with admin.begin() as c:
            c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable: {e.orig}")
    try:
        sep = "&" if "?" in PG_BASE else "?"
        yield f"{PG_BASE}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# --------------------------------------------------------------------------------------------------
# Model records and an in-memory Hub (unit tests)
# --------------------------------------------------------------------------------------------------

GB = 1_000_000_000
GOOD_FILES = (("config.json", 700, None), ("model.safetensors", 2 * GB, "a" * 64), ("tokenizer.json", 2000, None))
T0 = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)


def model_record(files: Iterable[tuple[str, int | None, str | None]] = GOOD_FILES, **kw: Any) -> ModelRecord:
    """A Hub record of a plain, acceptable release (``files``: name, size, LFS sha256); ``kw`` overrides fields."""
    base: dict[str, Any] = dict(
        id="acme/Model-1B-Instruct", sha="1" * 40, created_at=T0 - dt.timedelta(days=19), last_modified=T0,
        private=False, gated=False, disabled=False, tags=("transformers", "safetensors", "license:apache-2.0"),
        pipeline_tag="text-generation", library_name="transformers", license="apache-2.0",
        card_data={"license": "apache-2.0"}, config={"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        siblings=tuple(Sibling(n, s, h) for n, s, h in files), safetensors_total=1_000_000_000, downloads=0,
        likes=0, extra={})
    base.update(kw)
    return ModelRecord(**base)


class FakeHub:
    """The read side of :class:`bot.hub.Hub` in memory: commits of model repos (records and file contents), a
    log of the calls (``calls``: (method, repo)) and errors to raise (``errors``: method -> error, or
    (method, repo) -> error). Each commit is a minute newer than the last, starting a day before :data:`T0`; a
    new repo has a million parameters."""

    def __init__(self) -> None:
        self.heads: dict[str, ModelRecord] = {}
        self.commits: dict[tuple[str, str], ModelRecord] = {}
        self.contents: dict[tuple[str, str], dict[str, bytes]] = {}
        self.errors: dict[Any, BaseException] = {}
        self.calls: list[tuple[str, str]] = []
        self._shas = itertools.count(1)
        self._clock = T0 - dt.timedelta(days=1)

    def commit(self, repo: str, files: Mapping[str, bytes | str] | None = None, **fields: Any) -> str:
        """A new commit of ``repo``: ``files`` added or replaced (``.safetensors`` as LFS files); ``fields``
        change the record (tags, config, gated...). Returns its sha."""
        old = self.heads.get(repo)
        content = dict(self.contents[(repo, old.sha)]) if old else {}
        content.update({k: v.encode() if isinstance(v, str) else v for k, v in (files or {}).items()})
        sha = f"{next(self._shas):040x}"
        self._clock += dt.timedelta(minutes=1)
        meta = [(n, len(b), hashlib.sha256(b).hexdigest() if n.endswith(".safetensors") else None)
                for n, b in sorted(content.items())]
        kept = {f: getattr(old, f) for f in ("tags", "config", "gated", "pipeline_tag", "safetensors_total")} \
            if old else {"safetensors_total": 1_000_000}
        rec = model_record(meta, id=repo, sha=sha, last_modified=self._clock, **{**kept, **fields})
        self.heads[repo], self.commits[(repo, sha)], self.contents[(repo, sha)] = rec, rec, content
        return sha

    def _call(self, method: str, repo: str) -> None:
        self.calls.append((method, repo))
        err = self.errors.get((method, repo)) or self.errors.get(method)
        if err is not None:
            raise err

    def requests(self, method: str) -> list[str]:
        return [r for m, r in self.calls if m == method]

    def whoami(self) -> str:
        self._call("whoami", "")
        return "tester"

    def list_models(self, *, author: str | None = None, search: str | None = None, filters: Iterable[str] = (),
                    pipeline_tag: str | None = None, sort: str = "lastModified",
                    limit: int | None = None) -> Iterator[ModelRecord]:
        self._call("list_models", author or "")
        recs = [r for r in self.heads.values() if author is None or r.author == author]
        yield from sorted(recs, key=lambda r: r.last_modified, reverse=True)

    def model_info(self, repo_id: str, revision: str | None = None) -> ModelRecord:
        self._call("model_info", repo_id)
        rec = self.heads.get(repo_id) if revision is None else self.commits.get((repo_id, revision))
        if rec is None:
            raise HubNotFound(f"model_info {repo_id}: repository not found (or private without access)", status=404)
        return rec

    def read_text(self, repo_id: str, filename: str, revision: str | None = None) -> str | None:
        self._call("read_text", repo_id)
        sha = revision or self.model_info(repo_id).sha
        data = self.contents.get((repo_id, sha), {}).get(filename)
        return None if data is None else data.decode()

    def download_snapshot(self, repo_id: str, revision: str | None, dest: Path,
                          allow_patterns: Iterable[str] | None = None, max_bytes: int | None = None) -> Path:
        self._call("download_snapshot", repo_id)
        rec = self.model_info(repo_id, revision)
        pats = list(allow_patterns or ["*"])
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.contents[(repo_id, rec.sha)].items():
            if any(fnmatch.fnmatch(name, p) for p in pats):
                (dest / name).write_bytes(data)
        return dest
