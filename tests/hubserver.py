"""A small Hub-compatible HTTP server for the tests: the real ``huggingface_hub`` client talks to it.

It speaks the part of the Hub's HTTP API that the client (2.4.x) needs (see the team's HUB_API.md):
whoami, model listing with ``Link`` pagination, model info, tree / paths-info, resolve (HEAD/GET,
ranges), repo create / delete / settings, preupload, the LFS batch API with a basic transfer, the ndjson
commit (atomic, with ``parentCommit``), and README front-matter validation (real YAML parsing).

Test API (thread-safe)::

    with HubServer(valid_tokens={"hf_test": "alice"}, user_orgs={"alice": ["acme"]}) as hub:
        sha = hub.add_model("acme/base", {"config.json": b"{}"}, card_data={"license": "mit"})
        hub.fail_next(2, status=500, path_prefix="/api/models/acme/base/commit")
        hub.requests            # [(method, path), ...]  (no query string, never a token)
        hub.files("acme/base")  # {path: bytes} at main

Webhooks: ``/api/settings/webhooks`` (create, list, delete; ``huggingface_hub``'s ``create_webhook`` family) and
the calls themselves: every new commit made with :meth:`HubServer.add_commit` is sent, like the Hub does, to each
enabled webhook watching the repo, its owner (``user``/``org``) or the repo itself, as a ``repo.content`` payload
with the webhook's secret in ``X-Webhook-Secret``, from a background thread. :meth:`HubServer.send_webhook` sends
one by hand; ``hub.deliveries`` keeps (webhook id, repo, HTTP status or None, response body) per call.

Every error body repeats the request's token (``echo_token``), as a careless server or proxy might: the
token-redaction tests look for it in logs, the database, reports and cards. Faults are matched in the order
they were added: ``fail_next`` (an HTTP error status, optional
``Retry-After``), ``slow_next`` (sleep before answering), ``drop_next`` (close the connection without an
answer), ``corrupt_next`` (a file download answers other bytes of the same size), ``call_next`` (run a function of
the test when the request arrives, before it is answered: e.g. change a local file between the client's hashing and
its upload). ``n=None`` means forever. ``verify_lfs_sha256 = False`` makes the LFS upload store whatever bytes it
receives under the announced oid, as a storage that takes the client's word for it (a presigned PUT) would. Nothing here reads the environment; pointing the client at
``hub.url`` (``HF_ENDPOINT``) is the caller's business (see ``tests/hub_fixtures.py``).

An uplink: ``hub.upload_bytes_per_second = N`` reads the body of every LFS upload at most that fast, all uploads
sharing the one link (two at once get half each), as a home connection would; ``hub.upload_spans`` keeps when each
upload ran (monotonic seconds), for a benchmark's network busy time. None (the default): as fast as it comes.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".dat", ".png", ".jpg", ".pt", ".pth", ".onnx", ".zip", ".gz")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = b"*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
KNOWN_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1",
    "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr",
    "mpl-2.0", "odc-by", "odbl", "openmdw-1.0", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa",
    "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license",
    "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
}
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server started later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_client_here(port: int, home: str | Path, token: str) -> str:
    """Point the real ``huggingface_hub`` client at a local server on ``port``: ``HF_ENDPOINT``, ``HF_HOME``,
    ``HF_TOKEN`` and the switches of HUB_API.md (no Xet, telemetry or progress bars; no staging or offline mode).
    The client reads them when it is imported, so call this first. Returns the endpoint."""
    import os

    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    for var in ("HUGGINGFACE_CO_STAGING", "HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        os.environ.pop(var, None)
    return endpoint


def git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)  # not header + data: that copies hundreds of MB
    return h.hexdigest()


def iso(t: dt.datetime) -> str:
    """The Hub's date format: milliseconds and a ``Z``, which the client requires."""
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def front_matter(text: str) -> tuple[str | None, str]:
    """Split a README into (YAML text or None, body)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None, text
    return m.group(1), text[m.end():]


def card_text(card_data: Mapping[str, Any], body: str = "") -> str:
    return "---\n" + yaml.safe_dump(dict(card_data), sort_keys=False, allow_unicode=True) + "---\n" + body


@dataclasses.dataclass(frozen=True)
class Blob:
    """A file's bytes; its hashes are computed once (a SmolLM2 checkpoint or ladder is hundreds of MB, and every
    commit, listing and download asks for them)."""

    data: bytes
    lfs: bool

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @functools.cached_property
    def oid(self) -> str:
        return git_blob_sha1(self.data)


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    summary: str
    description: str
    date: dt.datetime


@dataclasses.dataclass
class Repo:
    repo_type: str  # "model" | "dataset" | "space"
    repo_id: str
    private: bool = False
    gated: bool | str = False
    gated_allowed: set[str] = dataclasses.field(default_factory=set)  # user names with access to a gated repo
    disabled: bool = False
    created_at: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    tags: list[str] | None = None  # None: derived from the card
    pipeline_tag: str | None = None
    library_name: str | None = None
    config: dict | None = None
    safetensors: dict | None = None
    downloads: int = 0
    likes: int = 0
    extra: dict = dataclasses.field(default_factory=dict)
    commits: list[Commit] = dataclasses.field(default_factory=list)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def head(self) -> Commit | None:
        sha = self.branches.get("main")
        return self.commit(sha) if sha else None

    def commit(self, sha: str) -> Commit | None:
        for c in self.commits:
            if c.sha == sha:
                return c
        return None

    def resolve(self, rev: str | None) -> Commit | None:
        rev = rev or "main"
        if rev in self.branches:
            return self.commit(self.branches[rev])
        if re.fullmatch(r"[0-9a-f]{40}", rev):
            return self.commit(rev)
        return None


@dataclasses.dataclass
class _Fault:
    kind: str  # "fail" | "slow" | "drop" | "drop_after" | "corrupt" | "call"
    remaining: int | None
    status: int = 500
    path_prefix: str | None = None
    method: str | None = None
    retry_after: float | None = None
    seconds: float = 0.0
    call: Any = None  # kind "call": run with no arguments when a matching request arrives

    def matches(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)


@dataclasses.dataclass
class LoggedRequest:  # logged when the request arrives; status and user are filled in when answered
    method: str
    path: str
    query: str
    status: int | None
    user: str | None


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            return  # the client gave up on a slow answer: not a server bug
        super().handle_error(request, client_address)


class HubServer:
    """A local Hub-compatible server; use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self, valid_tokens: Mapping[str, str] | None = None,
                 user_orgs: Mapping[str, Iterable[str]] | None = None, page_size: int = 50, port: int = 0):
        self.valid_tokens: dict[str, str] = dict(valid_tokens if valid_tokens is not None else {"hf_test_token": "tester"})
        self.user_orgs: dict[str, list[str]] = {k: list(v) for k, v in (user_orgs or {}).items()}
        self.page_size = page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.log: list[LoggedRequest] = []
        self.errors: list[str] = []  # tracebacks of server bugs (answered 500)
        self.echo_token = True  # error bodies repeat the request's token (redaction must catch it)
        self.verify_lfs_sha256 = True  # an LFS upload whose bytes do not hash to its oid is refused
        self.upload_bytes_per_second: float | None = None  # the uplink of LFS uploads (None: unthrottled)
        self.upload_spans: list[tuple[float, float, int]] = []  # (start, end, bytes) of each LFS upload's body
        self._link_free_at = 0.0
        self._link_lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.webhooks: dict[str, dict[str, Any]] = {}  # id -> {"owner", "url", "watched", "domains", "secret", ...}
        self.deliveries: list[tuple[str, str, int | None, str]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        self._httpd = _Server(("127.0.0.1", self.port), _make_handler(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, *, valid_tokens: Mapping[str, str] | None = None) -> None:
        """Forget every repo, fault and logged request (tokens too, when given)."""
        with self._lock:
            self.repos.clear()
            self.lfs_store.clear()
            self.log.clear()
            self.errors.clear()
            self._faults.clear()
            self.webhooks.clear()
            self.deliveries.clear()
            self.verify_lfs_sha256 = True
            self.upload_bytes_per_second = None
            self.upload_spans.clear()
            if valid_tokens is not None:
                self.valid_tokens = dict(valid_tokens)

    # ------------------------------------------------------------------ faults
    def fail_next(self, n: int | None = 1, status: int = 500, path_prefix: str | None = None,
                  retry_after: float | None = None, method: str | None = None) -> None:
        """Answer the next ``n`` matching requests (None: all) with ``status``."""
        with self._lock:
            self._faults.append(_Fault("fail", n, status=status, path_prefix=path_prefix, method=method,
                                       retry_after=retry_after))

    def slow_next(self, n: int | None = 1, seconds: float = 1.0, path_prefix: str | None = None,
                  method: str | None = None) -> None:
        """Sleep ``seconds`` before answering the next ``n`` matching requests."""
        with self._lock:
            self._faults.append(_Fault("slow", n, path_prefix=path_prefix, method=method, seconds=seconds))

    def drop_next(self, n: int | None = 1, path_prefix: str | None = None, method: str | None = None,
                  after: bool = False) -> None:
        """Close the connection without any answer for the next ``n`` matching requests.

        ``after=True``: the request is carried out first (a commit lands) and only the answer is lost.
        """
        with self._lock:
            self._faults.append(_Fault("drop_after" if after else "drop", n, path_prefix=path_prefix, method=method))

    def corrupt_next(self, n: int | None = 1, path_prefix: str | None = None) -> None:
        """Answer the next ``n`` matching file downloads (GET) with their bytes altered (same size)."""
        with self._lock:
            self._faults.append(_Fault("corrupt", n, path_prefix=path_prefix, method="GET"))

    def call_next(self, fn: Any, n: int | None = 1, path_prefix: str | None = None, method: str | None = None) -> None:
        """Run ``fn()`` when each of the next ``n`` matching requests arrives, then answer it as usual."""
        with self._lock:
            self._faults.append(_Fault("call", n, path_prefix=path_prefix, method=method, call=fn))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_faults(self, method: str, path: str) -> list[_Fault]:
        taken = []
        with self._lock:
            for f in self._faults:
                if f.matches(method, path):
                    if f.remaining is not None:
                        f.remaining -= 1
                    taken.append(f)
                    if f.kind in ("fail", "drop", "drop_after"):
                        break
            self._faults = [f for f in self._faults if f.remaining is None or f.remaining > 0]
        return taken

    # ------------------------------------------------------------------ request log
    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.method, r.path) for r in self.log]

    def count(self, method: str | None = None, path_prefix: str = "", contains: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.log if (method is None or r.method == method)
                       and r.path.startswith(path_prefix) and contains in r.path)

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # ------------------------------------------------------------------ direct content
    def add_model(self, repo_id: str, files: Mapping[str, bytes | str | Path] | None = None, *,
                  card_data: Mapping[str, Any] | None = None, card_body: str = "", gated: bool | str = False,
                  tags: Iterable[str] | None = None, created_at: dt.datetime | None = None,
                  pipeline_tag: str | None = None, library_name: str | None = None, config: dict | None = None,
                  safetensors_params: int | Mapping[str, int] | None = None, private: bool = False,
                  downloads: int = 0, likes: int = 0, disabled: bool = False, date: dt.datetime | None = None,
                  repo_type: str = "model", extra: Mapping[str, Any] | None = None,
                  message: str = "initial commit", last_modified: dt.datetime | None = None) -> str:
        """Create a repo with one commit holding ``files`` (plus README.md from ``card_data``); return its sha.

        ``lastModified`` of the repo is the date of its head commit: ``last_modified`` (or ``date``) here,
        ``date`` in :meth:`add_commit`; ``created_at`` defaults to it.
        """
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise ValueError(f"{repo_type} {repo_id} exists")
            if isinstance(safetensors_params, int):
                st = {"parameters": {"BF16": safetensors_params}, "total": safetensors_params}
            elif safetensors_params:
                st = {"parameters": dict(safetensors_params), "total": sum(safetensors_params.values())}
            else:
                st = None
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, gated=gated, disabled=disabled,
                        created_at=created_at or last_modified or date or self._now(), tags=list(tags) if tags is not None else None,
                        pipeline_tag=pipeline_tag, library_name=library_name, config=config, safetensors=st,
                        downloads=downloads, likes=likes, extra=dict(extra or {}))
            self.repos[key] = repo
            all_files: dict[str, bytes | str | Path] = {".gitattributes": GITATTRIBUTES, **(files or {})}
            if card_data is not None and "README.md" not in all_files:
                all_files["README.md"] = card_text(card_data, card_body)
            return self._new_commit(repo, {p: self._blob(p, c) for p, c in all_files.items()}, (), message, "",
                                    last_modified or date or repo.created_at)

    def add_dataset(self, repo_id: str, files: Mapping[str, bytes | str | Path] | None = None, **kw: Any) -> str:
        return self.add_model(repo_id, files, repo_type="dataset", **kw)

    def add_commit(self, repo_id: str, files: Mapping[str, bytes | str | Path] | None = None, *,
                   deletions: Iterable[str] = (), card_data: Mapping[str, Any] | None = None, card_body: str = "",
                   message: str = "update", date: dt.datetime | None = None, repo_type: str = "model",
                   **meta: Any) -> str:
        """A new revision on main: add/replace ``files``, delete ``deletions``; ``meta`` updates repo fields.
        The webhooks watching the repo are called (in the background)."""
        old = self.head(repo_id, repo_type)
        sha = self._add_commit(repo_id, files, deletions=deletions, card_data=card_data, card_body=card_body,
                               message=message, date=date, repo_type=repo_type, **meta)
        self.send_webhook(repo_id, old_sha=old, repo_type=repo_type)
        return sha

    def _add_commit(self, repo_id: str, files: Mapping[str, bytes | str | Path] | None = None, *,
                    deletions: Iterable[str] = (), card_data: Mapping[str, Any] | None = None, card_body: str = "",
                    message: str = "update", date: dt.datetime | None = None, repo_type: str = "model",
                    **meta: Any) -> str:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            adds = dict(files or {})
            if card_data is not None:
                adds["README.md"] = card_text(card_data, card_body)
            for k, v in meta.items():
                if not hasattr(repo, k):
                    raise TypeError(f"unknown repo field {k}")
                setattr(repo, k, v)
            return self._new_commit(repo, {p: self._blob(p, c) for p, c in adds.items()}, tuple(deletions),
                                    message, "", date or self._now())

    def squash(self, repo_id: str, *, message: str = "Super-squash branch 'main'", date: dt.datetime | None = None,
               repo_type: str = "model") -> str:
        """What the Hub's ``super_squash_history`` (or a force-push) does: main becomes one new commit with the
        same files, and no earlier revision of main can be read any more. Returns the new sha."""
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            head = repo.head
            if head is None:
                raise ValueError(f"{repo_id} has no commit to squash")
            kept = {sha for name, sha in repo.branches.items() if name != "main"}
            repo.commits = [c for c in repo.commits if c.sha in kept]
            del repo.branches["main"]
            return self._new_commit(repo, dict(head.files), (), message, "", date or self._now())

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def head(self, repo_id: str, repo_type: str = "model") -> str | None:
        repo = self.repo(repo_id, repo_type)
        return repo.branches.get("main") if repo else None

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        repo = self.repo(repo_id, repo_type)
        return list(repo.commits) if repo else []

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self._repo_or_raise(repo_type, repo_id)
        c = repo.resolve(revision)
        if c is None:
            raise KeyError(revision)
        return {p: b.data for p, b in c.files.items()}

    def grant_access(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        with self._lock:
            self._repo_or_raise(repo_type, repo_id).gated_allowed.add(user)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def _repo_or_raise(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"{repo_type} {repo_id} does not exist")
        return repo

    @staticmethod
    def _blob(path: str, content: bytes | str | Path) -> Blob:
        if isinstance(content, Path):
            data = content.read_bytes()
        elif isinstance(content, str):
            data = content.encode()
        else:
            data = bytes(content)
        lfs = path.endswith(LFS_SUFFIXES) or len(data) > LFS_THRESHOLD or b"\0" in data[:512]
        return Blob(data, lfs)

    def _new_commit(self, repo: Repo, adds: Mapping[str, Blob], deletions: Iterable[str], summary: str,
                    description: str, date: dt.datetime) -> str:
        head = repo.head
        files = dict(head.files) if head else {}
        for p in deletions:
            if p.endswith("/"):
                for q in [q for q in files if q.startswith(p)]:
                    del files[q]
            else:
                files.pop(p, None)
        files.update(adds)
        for b in adds.values():
            if b.lfs:
                self.lfs_store[b.sha256] = b.data
        n = next(self._counter)
        sha = hashlib.sha1(f"{repo.repo_id}\0{n}\0{summary}\0{sorted((p, b.oid) for p, b in files.items())}".encode()).hexdigest()
        repo.commits.append(Commit(sha, head.sha if head else None, files, summary, description, date))
        repo.branches["main"] = sha
        return sha

    def _user(self, headers: Mapping[str, str]) -> tuple[str | None, bool]:
        """(user, token_presented) from the Authorization header; raises 401 on an unknown token."""
        auth = headers.get("Authorization") or headers.get("authorization") or ""
        if not auth:
            return None, False
        token = auth.split(" ", 1)[1].strip() if auth.lower().startswith("bearer ") else auth.strip()
        user = self.valid_tokens.get(token)
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header",
                            headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        return user, True

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.user_orgs.get(user, []))

    def _readable(self, repo: Repo | None, user: str | None) -> Repo:
        if repo is None or (repo.private and not self._can_write(user, repo.repo_id.split("/")[0])):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if repo.disabled:
            raise _HubError(403, "Access to this resource is disabled.",
                            headers={"X-Error-Message": "Access to this resource is disabled."})
        return repo

    def _card_data(self, commit: Commit | None) -> dict | None:
        if commit is None or "README.md" not in commit.files:
            return None
        y, _ = front_matter(commit.files["README.md"].data.decode("utf-8", "replace"))
        if y is None:
            return None
        try:
            d = yaml.safe_load(y)
        except yaml.YAMLError:
            return None
        return d if isinstance(d, dict) else None

    def _info(self, repo: Repo, commit: Commit | None, *, blobs: bool, full: bool = True, config: bool = True,
              card: bool = True) -> dict:
        cd = self._card_data(commit)
        if repo.tags is not None:
            tags = list(repo.tags)
        else:
            tags = []
            if cd:
                ct = cd.get("tags") or []
                tags += [ct] if isinstance(ct, str) else [str(t) for t in ct]
                if isinstance(cd.get("license"), str):
                    tags.append(f"license:{cd['license']}")
                if commit and any(p.endswith(".gguf") for p in commit.files):
                    tags.append("gguf")
        d: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha if commit else None,
            "createdAt": iso(repo.created_at),
            "lastModified": iso(commit.date if commit else repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": repo.disabled,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "tags": tags,
            **repo.extra,
        }
        if repo.pipeline_tag:
            d["pipeline_tag"] = repo.pipeline_tag
        if repo.library_name:
            d["library_name"] = repo.library_name
        if card and cd is not None:
            d["cardData"] = cd
        if config and repo.config is not None:
            d["config"] = repo.config
        if repo.safetensors is not None:
            d["safetensors"] = repo.safetensors
        if full and commit is not None:
            sib = []
            for p in sorted(commit.files):
                b = commit.files[p]
                s: dict[str, Any] = {"rfilename": p}
                if blobs:
                    s["size"] = len(b.data)
                    s["blobId"] = b.oid
                    if b.lfs:
                        s["lfs"] = {"size": len(b.data), "sha256": b.sha256, "pointerSize": 134}
                sib.append(s)
            d["siblings"] = sib
        return d

    @staticmethod
    def _entry(path: str, b: Blob) -> dict:
        e: dict[str, Any] = {"type": "file", "oid": b.oid, "size": len(b.data), "path": path}
        if b.lfs:
            e["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": 134}
        return e

    # ------------------------------------------------------------------ request handling
    def _handle(self, h: "BaseHTTPRequestHandler", method: str) -> None:
        split = urlsplit(h.path)
        raw_path = split.path
        path = unquote(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        user: str | None = None
        status: int | None = None
        body = b""
        if "Content-Length" in h.headers and self.upload_bytes_per_second and path.startswith("/_lfs/upload/"):
            body = self._read_throttled(h.rfile, int(h.headers["Content-Length"]))
        elif "Content-Length" in h.headers:
            body = h.rfile.read(int(h.headers["Content-Length"]))
        elif "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            body = _read_chunked(h.rfile)
        entry = LoggedRequest(method, path, split.query, None, None)
        with self._lock:
            self.log.append(entry)
        drop_after = corrupt = False
        try:
            for fault in self._take_faults(method, path):
                if fault.kind == "drop_after":
                    drop_after = True
                    continue
                if fault.kind == "corrupt":
                    corrupt = True
                    continue
                if fault.kind == "call":
                    fault.call()
                    continue
                if fault.kind == "slow":
                    time.sleep(fault.seconds)
                elif fault.kind == "drop":
                    _drop_connection(h)
                    return
                else:
                    hdrs = {"Retry-After": _fmt_num(fault.retry_after)} if fault.retry_after is not None else {}
                    raise _HubError(fault.status, f"injected fault {fault.status}", headers=hdrs)
            user, _ = self._user(h.headers)
            with self._lock:
                status, headers, payload = self._route(method, path, raw_path, query, body, h.headers, user)
        except _HubError as e:
            status = e.status
            headers = {"Content-Type": "application/json", "X-Request-Id": f"req-{next(self._counter)}", **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            payload = json.dumps(e.body if e.body is not None else {"error": self._echo(e.message, h.headers)}).encode()
        except Exception as e:  # a bug of this server: answer 500 and keep it for the test to see
            import traceback

            self.errors.append(traceback.format_exc())
            status, headers = 500, {"Content-Type": "application/json"}
            payload = json.dumps({"error": f"hubserver bug: {type(e).__name__}: {e}"}).encode()
        entry.status, entry.user = status, user
        if corrupt and status in (200, 206) and payload:
            payload = bytes(b ^ 0x5A for b in payload)
        if drop_after:
            entry.status = None
            _drop_connection(h)
            return
        h.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)

    def _read_throttled(self, f: Any, size: int, piece: int = 64 * 1024) -> bytes:
        """``size`` bytes of a request body, no faster than the shared uplink allows."""
        out = bytearray()
        started = time.monotonic()
        while len(out) < size:
            data = f.read(min(piece, size - len(out)))
            if not data:
                break
            out += data
            rate = self.upload_bytes_per_second or 0
            if rate > 0:
                with self._link_lock:  # the link's next free moment: concurrent uploads queue on it
                    start = max(time.monotonic(), self._link_free_at)
                    self._link_free_at = start + len(data) / rate
                    until = self._link_free_at
                time.sleep(max(0.0, until - time.monotonic()))
        with self._lock:
            self.upload_spans.append((started, time.monotonic(), len(out)))
        return bytes(out)

    def _echo(self, message: str, headers: Any) -> str:
        """An error message that, like some misbehaving servers and proxies, repeats the request's token (when
        ``echo_token``): the client must never let it reach a log, the database, a report or a card."""
        auth = headers.get("Authorization") or ""
        token = auth.split(" ", 1)[1].strip() if auth.lower().startswith("bearer ") else auth.strip()
        return f"{message} (request made with {token})" if self.echo_token and token else message

    def _json(self, data: Any, status: int = 200, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()

    def _route(self, method: str, path: str, raw_path: str, query: dict, body: bytes, headers: Any,
               user: str | None) -> tuple[int, dict, bytes]:
        q1 = {k: v[-1] for k, v in query.items()}
        if path == "/api/whoami-v2" and method == "GET":
            if user is None:
                raise _HubError(401, "Invalid credentials in Authorization header",
                                headers={"X-Error-Message": "Invalid credentials in Authorization header"})
            orgs = [{"name": o, "type": "org"} for o in self.user_orgs.get(user, [])]
            return self._json({"type": "user", "name": user, "fullname": user, "orgs": orgs,
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), user)
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(json.loads(body or b"{}"), user)
        if path.startswith("/api/settings/webhooks"):
            return self._webhooks_api(method, path, body, user)
        m = re.fullmatch(r"/api/(models|datasets|spaces)", path)
        if m and method == "GET":
            return self._list(REPO_TYPES[m.group(1)], query, user)
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(/.*)?", path)
        if m:
            return self._repo_api(REPO_TYPES[m.group(1)], m.group(2), m.group(3) or "", method, raw_path, q1,
                                  body, headers, user)
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            return self._lfs_batch(json.loads(body or b"{}"), user, m.group(2), REPO_TYPES.get(f"{m.group(1)}", "model"))
        m = re.fullmatch(r"/_lfs/(upload|verify)/([0-9a-f]{64})", path)
        if m:
            return self._lfs_object(m.group(1), m.group(2), body)
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw_path)
        if m and method in ("GET", "HEAD"):
            rt = REPO_TYPES.get(f"{m.group(1)}", "model")
            return self._resolve(rt, unquote(m.group(2)), unquote(m.group(3)), unquote(m.group(4)), headers, user,
                                 method)
        raise _HubError(404, f"no route for {method} {path}")

    # ------------------------------------------------------------------ webhooks
    def _webhooks_api(self, method: str, path: str, body: bytes, user: str | None) -> tuple[int, dict, bytes]:
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        m = re.fullmatch(r"/api/settings/webhooks(?:/([^/]+))?", path)
        if m is None:
            raise _HubError(404, f"no route for {method} {path}")
        hook_id = m.group(1)
        if hook_id is None and method == "GET":
            return self._json([self._webhook_json(h) for h in self.webhooks.values() if h["owner"] == user])
        if hook_id is None and method == "POST":
            d = json.loads(body or b"{}")
            watched = d.get("watched")
            if not d.get("url") or not isinstance(watched, list) or not watched or \
                    any(w.get("type") not in ("user", "org", "model", "dataset", "space") for w in watched):
                raise _HubError(400, "url and watched items (type, name) are required")
            hook_id = hashlib.sha1(f"{user}\0{next(self._counter)}".encode()).hexdigest()[:24]
            self.webhooks[hook_id] = {"id": hook_id, "owner": user, "url": d["url"], "watched": watched,
                                      "domains": d.get("domains") or ["repo", "discussion"],
                                      "secret": d.get("secret"), "disabled": False}
            return self._json({"webhook": self._webhook_json(self.webhooks[hook_id])})
        hook = self.webhooks.get(hook_id or "")
        if hook is None or hook["owner"] != user:
            raise _HubError(404, "Webhook not found")
        if method == "GET":
            return self._json({"webhook": self._webhook_json(hook)})
        if method == "DELETE":
            del self.webhooks[hook["id"]]
            return self._json({})
        raise _HubError(405, f"{method} not allowed")

    @staticmethod
    def _webhook_json(h: dict[str, Any]) -> dict[str, Any]:
        return {k: h[k] for k in ("id", "url", "watched", "domains", "secret", "disabled")}

    def send_webhook(self, repo_id: str, *, old_sha: str | None = None, scope: str = "repo.content",
                     repo_type: str = "model", wait: bool = False) -> list[threading.Thread]:
        """Call every enabled webhook watching ``repo_id`` with a ``scope`` event about its current head."""
        owner = repo_id.split("/")[0]
        with self._lock:
            head = self.head(repo_id, repo_type)
            hooks = [dict(h) for h in self.webhooks.values() if not h["disabled"] and any(
                (w["type"] in ("user", "org") and w["name"] == owner) or (w["type"] == repo_type and w["name"] == repo_id)
                for w in h["watched"])]
        payload = {"event": {"action": "update", "scope": scope},
                   "repo": {"type": repo_type, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                            "private": False, "headSha": head,
                            "url": {"web": f"{self.url}/{repo_id}", "api": f"{self.url}/api/{repo_type}s/{repo_id}"}},
                   "updatedRefs": [{"ref": "refs/heads/main", "oldSha": old_sha, "newSha": head}]}
        threads = []
        for h in hooks:
            t = threading.Thread(target=self._deliver, args=(h, repo_id, {**payload, "webhook": {"id": h["id"],
                                                                                                   "version": 3}}),
                                 name="hubserver-webhook", daemon=True)
            t.start()
            threads.append(t)
        if wait:
            for t in threads:
                t.join(60)
        return threads

    def _deliver(self, hook: dict[str, Any], repo_id: str, payload: dict[str, Any]) -> None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(hook["url"], data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-Webhook-Secret": hook.get("secret") or ""})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, text = resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
        except OSError as e:
            status, text = None, f"{type(e).__name__}: {e}"
        with self._lock:
            self.deliveries.append((hook["id"], repo_id, status, text))

    def _list(self, repo_type: str, query: dict, user: str | None) -> tuple[int, dict, bytes]:
        q1 = {k: v[-1] for k, v in query.items()}
        filters = query.get("filter", [])
        items = []
        for (rt, rid), repo in self.repos.items():
            if rt != repo_type or repo.head is None:
                continue
            if repo.private and not self._can_write(user, rid.split("/")[0]):
                continue
            if q1.get("author") and rid.split("/")[0] != q1["author"]:
                continue
            if q1.get("search") and q1["search"].lower() not in rid.lower():
                continue
            if q1.get("pipeline_tag") and repo.pipeline_tag != q1["pipeline_tag"]:
                continue
            info = self._info(repo, repo.head, blobs=False, full=_true(q1.get("full")),
                              config=_true(q1.get("config")), card=_true(q1.get("cardData")))
            vocab = set(info["tags"]) | {repo.pipeline_tag, repo.library_name}
            if any(f not in vocab for f in filters):
                continue
            items.append(info)
        sort = q1.get("sort") or "lastModified"
        key = {"createdAt": "createdAt", "lastModified": "lastModified", "downloads": "downloads",
               "likes": "likes", "trendingScore": "likes"}.get(sort, "lastModified")
        items.sort(key=lambda d: (d[key], d["id"]), reverse=True)
        start = int(q1.get("cursor") or 0)
        size = self.page_size
        if q1.get("limit"):
            size = min(size, int(q1["limit"]))
        page = items[start:start + size]
        hdrs = {}
        if start + size < len(items) and not (q1.get("limit") and start + size >= int(q1["limit"])):
            params = [(k, v) for k, vs in query.items() if k != "cursor" for v in vs] + [("cursor", str(start + size))]
            hdrs["Link"] = f'<{self.url}/api/{repo_type}s?{urlencode(params)}>; rel="next"'
        return self._json(page, headers=hdrs)

    def _repo_api(self, repo_type: str, repo_id: str, rest: str, method: str, raw_path: str, q1: dict, body: bytes,
                  headers: Any, user: str | None) -> tuple[int, dict, bytes]:
        repo = self.repos.get((repo_type, repo_id))
        ns = repo_id.split("/")[0]
        if rest in ("", "/") or rest.startswith("/revision/"):
            repo = self._readable(repo, user)
            rev = unquote(rest[len("/revision/"):]) if rest.startswith("/revision/") else "main"
            commit = repo.resolve(rev)
            if commit is None:
                raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return self._json(self._info(repo, commit, blobs=_true(q1.get("blobs"))))
        m = re.fullmatch(r"/tree/([^/]+)(?:/(.*))?", rest)
        if m and method == "GET":
            repo = self._readable(repo, user)
            commit = repo.resolve(m.group(1))
            if commit is None:
                raise _HubError(404, f"Invalid rev id: {m.group(1)}", "RevisionNotFound")
            prefix = (m.group(2) or "").strip("/")
            recursive = _true(q1.get("recursive"))
            out: list[dict] = []
            dirs: set[str] = set()
            for p in sorted(commit.files):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rel = p[len(prefix) + 1:] if prefix else p
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(([prefix] if prefix else []) + parts[:i])
                    if d not in dirs and (recursive or i == 1):
                        dirs.add(d)
                        out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                    "path": d})
                if recursive or len(parts) == 1:
                    out.append(self._entry(p, commit.files[p]))
            if prefix and not out:
                raise _HubError(404, f"{prefix} does not exist", "EntryNotFound")
            return self._json(out)
        m = re.fullmatch(r"/paths-info/([^/]+)", rest)
        if m and method == "POST":
            repo = self._readable(repo, user)
            commit = repo.resolve(m.group(1))
            if commit is None:
                raise _HubError(404, "Invalid rev id", "RevisionNotFound")
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            if not paths and body.startswith(b"{"):
                paths = json.loads(body).get("paths", [])
            out = [self._entry(p, commit.files[p]) for p in paths if p in commit.files]
            dirs = {p for p in paths if any(f.startswith(p.rstrip("/") + "/") for f in commit.files)}
            out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in sorted(dirs)]
            return self._json(out)
        if rest == "/settings" and method == "PUT":
            repo = self._readable(repo, user)
            if not self._can_write(user, ns):
                raise _HubError(403, "You don't have the rights to change this repo's settings")
            d = json.loads(body or b"{}")
            if "gated" in d:
                repo.gated = d["gated"]
            if "private" in d:
                repo.private = bool(d["private"])
            if "visibility" in d:
                repo.private = d["visibility"] == "private"
            return self._json({})
        m = re.fullmatch(r"/preupload/([^/]+)", rest)
        if m and method == "POST":
            self._writable(repo, user, ns)
            d = json.loads(body or b"{}")
            files = []
            for f in d.get("files", []):
                sample = base64.b64decode(f.get("sample") or "")
                lfs = (f["path"].endswith(LFS_SUFFIXES) or int(f.get("size", 0)) > LFS_THRESHOLD
                       or b"\0" in sample)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": None})
            return self._json({"files": files, "commitOid": repo.branches.get("main") if repo else None})
        m = re.fullmatch(r"/commit/([^/]+)", rest)
        if m and method == "POST":
            repo = self._writable(repo, user, ns)
            return self._commit(repo, unquote(m.group(1)), body)
        raise _HubError(404, f"no route for {method} /api/{repo_type}s/{repo_id}{rest}")

    def _writable(self, repo: Repo | None, user: str | None, ns: str) -> Repo:
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header",
                            headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        repo = self._readable(repo, user)
        if not self._can_write(user, ns):
            raise _HubError(403, f"You don't have the rights to write to {repo.repo_id}")
        return repo

    def _validate_yaml(self, d: dict) -> tuple[int, dict, bytes]:
        errors = _validate_front_matter(d.get("content", ""))
        if errors:
            return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _create_repo(self, d: dict, user: str | None) -> tuple[int, dict, bytes]:
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header",
                            headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        name = d.get("name", "")
        ns = d.get("organization") or user
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name or ""):
            raise _HubError(400, f"invalid repo name {name!r}")
        if not self._can_write(user, ns):
            raise _HubError(403, f"You don't have the rights to create a repo under {ns}")
        repo_type = d.get("type") or "model"
        repo_id = f"{ns}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        private = bool(d.get("private")) or d.get("visibility") == "private"
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=self._now())
        self.repos[(repo_type, repo_id)] = repo
        self._new_commit(repo, {".gitattributes": Blob(GITATTRIBUTES, False)}, (), "initial commit", "", self._now())
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, d: dict, user: str | None) -> tuple[int, dict, bytes]:
        ns = d.get("organization") or user or ""
        repo_id = f"{ns}/{d.get('name')}"
        key = (d.get("type") or "model", repo_id)
        if key not in self.repos:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if not self._can_write(user, ns):
            raise _HubError(403, f"You don't have the rights to delete {repo_id}")
        del self.repos[key]
        return self._json({})

    def _lfs_batch(self, d: dict, user: str | None, repo_id: str, repo_type: str) -> tuple[int, dict, bytes]:
        self._writable(self.repos.get((repo_type, repo_id)), user, repo_id.split("/")[0])
        objs = []
        for o in d.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_store:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/upload/{oid}"},
                                    "verify": {"href": f"{self.url}/_lfs/verify/{oid}"}}
            objs.append(entry)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, json.dumps(
            {"transfer": "basic", "objects": objs}).encode()

    def _lfs_object(self, action: str, oid: str, body: bytes) -> tuple[int, dict, bytes]:
        if action == "upload":
            if self.verify_lfs_sha256 and hashlib.sha256(body).hexdigest() != oid:
                raise _HubError(400, "sha256 of the uploaded content does not match the oid")
            self.lfs_store[oid] = body
            return self._json({})
        d = json.loads(body or b"{}")
        if oid not in self.lfs_store or int(d.get("size", -1)) != len(self.lfs_store[oid]):
            raise _HubError(404, "object not found or wrong size")
        return self._json({})

    def _commit(self, repo: Repo, rev: str, body: bytes) -> tuple[int, dict, bytes]:
        if rev != "main" and rev not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "the first line must be the commit header")
        header = lines[0]["value"]
        head = repo.head
        parent = header.get("parentCommit")
        if parent is not None and (head is None or parent != head.sha):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        existing = dict(head.files) if head else {}
        adds: dict[str, Blob] = {}
        deletions: list[str] = []
        for line in lines[1:]:
            key, v = line.get("key"), line.get("value", {})
            p = v.get("path", "")
            if not p or p.startswith("/") or ".." in p.split("/") or "\\" in p:
                raise _HubError(400, f"invalid path {p!r}")
            if key == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                if p.endswith(LFS_SUFFIXES):
                    raise _HubError(400, f"{p} must be stored with LFS")
                adds[p] = Blob(data, False)
            elif key == "lfsFile":
                oid = v.get("oid")
                if oid not in self.lfs_store:
                    raise _HubError(422, f"LFS object {oid} for {p} was not uploaded")
                adds[p] = Blob(self.lfs_store[oid], True)
            elif key == "deletedFile":
                if p not in existing:
                    raise _HubError(404, f"A file with this name doesn't exist: {p}", "EntryNotFound")
                deletions.append(p)
            elif key == "deletedFolder":
                deletions.append(p.rstrip("/") + "/")
            else:
                raise _HubError(400, f"unsupported commit operation {key!r}")
        if "README.md" in adds:
            errs = _validate_front_matter(adds["README.md"].data.decode("utf-8", "replace"))
            if errs:
                raise _HubError(400, "Invalid metadata in README.md: " + "; ".join(errs))
        sha = self._new_commit(repo, adds, deletions, header.get("summary", ""), header.get("description", ""),
                               self._now())
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return self._json({"success": True, "commitOid": sha,
                           "commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{sha}", "pullRequestUrl": None})

    def _resolve(self, repo_type: str, repo_id: str, rev: str, fpath: str, headers: Any, user: str | None,
                 method: str) -> tuple[int, dict, bytes]:
        repo = self._readable(self.repos.get((repo_type, repo_id)), user)
        commit = repo.resolve(rev)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if repo.gated and fpath not in ("README.md", ".gitattributes") and user not in repo.gated_allowed \
                and not self._can_write(user, repo_id.split("/")[0]):
            raise _HubError(403, f"Access to model {repo_id} is restricted.", "GatedRepo")
        blob = commit.files.get(fpath)
        if blob is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        data = blob.data
        etag = blob.sha256 if blob.lfs else blob.oid
        hdrs = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream"}
        if blob.lfs:
            hdrs["X-Linked-Etag"] = f'"{etag}"'
            hdrs["X-Linked-Size"] = str(len(data))
        status = 200
        rng = headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data):
                raise _HubError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            hdrs["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start:end + 1]
            status = 206
        hdrs["Content-Length"] = str(len(data))
        return status, hdrs, data


def _validate_front_matter(content: str) -> list[str]:
    """Validate a README's YAML front matter roughly as the Hub does; return error messages."""
    y, _ = front_matter(content)
    if y is None:
        return [] if not content.startswith("---") else ["unterminated YAML front matter"]
    try:
        d = yaml.safe_load(y)
    except yaml.YAMLError as e:
        return [f"YAML parse error: {e}".splitlines()[0]]
    if d is None:
        return []
    if not isinstance(d, dict):
        return ["metadata must be a YAML mapping"]
    errors = []

    def str_or_list(key: str) -> None:
        v = d.get(key)
        if v is None:
            return
        if not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            errors.append(f'"{key}" must be a string or an array of strings')

    for key in ("base_model", "language", "tags", "datasets", "pipeline_tag", "library_name", "license"):
        str_or_list(key)
    lic = d.get("license")
    if isinstance(lic, str) and lic not in KNOWN_LICENSES:
        errors.append(f'"license" must be one of the known license ids or "other", got {lic!r}')
    if lic == "other" and not d.get("license_name"):
        errors.append('"license_name" is required when "license" is "other"')
    rel = d.get("base_model_relation")
    if rel is not None:
        if rel not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
        if not d.get("base_model"):
            errors.append('"base_model_relation" needs "base_model"')
    if "pipeline_tag" in d and not isinstance(d["pipeline_tag"], (str, type(None))):
        errors.append('"pipeline_tag" must be a string')
    gf = d.get("extra_gated_fields")
    if gf is not None and not isinstance(gf, dict):
        errors.append('"extra_gated_fields" must be a mapping')
    return errors


def _drop_connection(h: BaseHTTPRequestHandler) -> None:
    """Close the client's connection without an answer (the ``drop`` faults)."""
    h.close_connection = True
    try:
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_chunked(f: Any) -> bytes:
    out = bytearray()
    while True:
        size = int(f.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += f.read(size)
        f.readline()


def _true(v: str | None) -> bool:
    return v is not None and v.lower() in ("1", "true", "yes", "")


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
            pass

        def do_GET(self) -> None:
            server._handle(self, "GET")

        def do_HEAD(self) -> None:
            server._handle(self, "HEAD")

        def do_POST(self) -> None:
            server._handle(self, "POST")

        def do_PUT(self) -> None:
            server._handle(self, "PUT")

        def do_DELETE(self) -> None:
            server._handle(self, "DELETE")

    return Handler


__all__ = ["HubServer", "Blob", "Commit", "Repo", "LoggedRequest", "card_text", "front_matter", "git_blob_sha1", "iso"]

validate_front_matter = _validate_front_matter  # public name for other tests
