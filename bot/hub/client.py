"""The Hub adapter: the only module of the project that imports ``huggingface_hub``.

Everything the bot needs from the Hub goes through :class:`Hub`: typed records out
(:class:`bot.model.record.ModelRecord`, parsed once here, unknown fields kept in ``extra``), project errors out
(``HubError`` / ``HubAuthError`` / ``HubNotFound`` from ``converters.core.errors``), retries decided by a
:class:`bot.model.retry.RetryPolicy`.

Retries are not multiplied. The client (huggingface_hub 2.4) already retries, with its own backoff
(5 retries, 1-8 s sleeps, 408/429/5xx and network errors), every request it sends through
``http_backoff``: paginated listings (``/api/models``, ``/tree/``), ``preupload``, the LFS batch / upload /
verify requests, and the ``HEAD`` of a file download. It does *not* retry ``whoami``, ``model_info``,
``create_repo``, repo settings, ``validate-yaml``, the final commit ``POST`` of ``create_commit``, nor
file ``GET``s on 5xx. :func:`client_retried` encodes that list: a failure of a request the client already
retried is raised at once, every other transient failure is retried here by the policy.

The token is never logged and never put into an error message (``_redact`` is applied to every
message that leaves this module).
"""

from __future__ import annotations

import copy
import glob
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import httpx2
import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelInfo, WebhookInfo
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import filter_repo_objects

from bot.model import metrics
from bot.model.record import ModelRecord, Sibling, Webhook
from bot.model.retry import RetryPolicy
from converters.core import records
from converters.core.errors import CheckFailed, HubAuthError, HubError, HubNotFound, HubUnreachable, UnsupportedModel

log = logging.getLogger(__name__)
T = TypeVar("T")


def _one_handler() -> None:
    """huggingface_hub puts a stderr handler of its own on its logger *and* lets the records propagate: under a
    program that configures logging (``ggufbot run``) every Hub warning came out twice. Its records now go to the
    root handlers only (with nothing configured, Python's last-resort handler still prints warnings)."""
    hf_log = logging.getLogger(huggingface_hub.__name__)
    for handler in list(hf_log.handlers):
        if type(handler) is logging.StreamHandler:
            hf_log.removeHandler(handler)


_one_handler()

DEFAULT_TIMEOUT = 120.0  # seconds per socket operation; the client's own default is no timeout at all
_installed_timeout: list[float | None] = []  # the timeout of the client factory installed by this module


def _install_timeout(seconds: float | None) -> None:
    """Give the client's shared HTTP session a timeout (huggingface_hub 2.4 defaults to none: a hung Hub
    would hang the bot). Process-wide, like the session itself; changed only when a Hub asks for another."""
    if _installed_timeout and _installed_timeout[0] == seconds:
        return
    from huggingface_hub.utils._http import hf_request_event_hook

    timeout = httpx2.Timeout(seconds, connect=min(seconds, 15.0)) if seconds else None

    def factory() -> httpx2.Client:
        return _FailFastClient(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
                               timeout=timeout)

    huggingface_hub.set_client_factory(factory)
    _installed_timeout[:] = [seconds]


class _ConnectFailed(httpx2.TransportError):
    """A connection to the Hub could not be made. Deliberately not a ``NetworkError``/``TimeoutException``:
    huggingface_hub's ``http_backoff`` then neither retries it five times with sleeps (about 23 s per request
    while the Hub is down) nor calls ``close_session()``, whose reset of the shared client races with
    ``get_session()`` in the other polling threads (which then got ``None`` as a client:
    ``AttributeError: 'NoneType' object has no attribute 'request'``)."""

    def __init__(self, reason: str, request: Any) -> None:
        super().__init__(reason, request=request)
        self.reason = reason


def _connect_reason(e: BaseException) -> str:
    """A fixed, host-free word for why a connection could not be made."""
    import socket
    import ssl

    if isinstance(e, httpx2.ConnectTimeout):
        return "connection timed out"
    seen: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and len(seen) < 10:
        seen.append(x)
        x = x.__cause__ or x.__context__
    for x in seen:
        if isinstance(x, socket.gaierror):
            return "name not resolved"
        if isinstance(x, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(x, ConnectionRefusedError):
            return "connection refused"
    text = " ".join(str(x) for x in seen).lower()
    for needle, reason in (("refused", "connection refused"), ("name or service", "name not resolved"),
                           ("name resolution", "name not resolved"), ("nodename", "name not resolved"),
                           ("network is unreachable", "network unreachable"), ("no route", "network unreachable"),
                           ("ssl", "TLS handshake failed"), ("certificate", "TLS handshake failed")):
        if needle in text:
            return reason
    return "connection failed"


class _FailFastClient(httpx2.Client):
    """The client's shared session: a connection that cannot be made raises :class:`_ConnectFailed` at once."""

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            return super().send(request, **kwargs)
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
            raise _ConnectFailed(_connect_reason(e), request) from e


def webhook_from_info(info: WebhookInfo) -> Webhook:
    """Turn the client's ``WebhookInfo`` into the project's record (never its secret)."""
    return Webhook(id=str(info.id), url=info.url, watched=tuple((w.type, w.name) for w in info.watched),
                   domains=tuple(info.domains or ()), disabled=bool(info.disabled))


_KNOWN_INFO_ATTRS = {
    "id", "sha", "created_at", "last_modified", "private", "gated", "disabled", "tags", "pipeline_tag",
    "library_name", "card_data", "config", "siblings", "safetensors", "downloads", "likes",
    # aliases and fields of no interest that the client sets itself
    "lastModified", "cardData", "transformersInfo", "transformers_info", "modelId", "_id",
}


def record_from_info(info: ModelInfo) -> ModelRecord:
    """Turn the client's ``ModelInfo`` into the project's record (the one place that reads it)."""
    card = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
    tags = tuple(info.tags or ())
    lic = card.get("license") if isinstance(card.get("license"), str) else None
    if lic is None:
        lic = next((t.split(":", 1)[1] for t in tags if t.startswith("license:")), None)
    siblings = tuple(
        Sibling(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in (info.siblings or ())
    )
    st = getattr(info, "safetensors", None)
    extra = {k: v for k, v in vars(info).items() if k not in _KNOWN_INFO_ATTRS and v is not None}
    return ModelRecord(
        id=info.id,
        sha=info.sha,
        created_at=info.created_at,
        last_modified=info.last_modified,
        private=bool(info.private),
        gated=info.gated if isinstance(info.gated, str) else bool(info.gated),
        disabled=bool(info.disabled),
        tags=tags,
        pipeline_tag=info.pipeline_tag,
        library_name=info.library_name,
        license=lic,
        card_data=card,
        config=dict(info.config or {}),
        siblings=siblings,
        safetensors_total=st.total if st is not None else None,
        downloads=int(info.downloads or 0),
        likes=int(info.likes or 0),
        extra=extra,
    )


def safe_relative_path(name: str) -> bool:
    """True when a repo file name is a plain relative POSIX path that stays inside its destination."""
    if not name or "\\" in name or "\0" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return False
    parts = PurePosixPath(name).parts
    return all(p not in ("", ".", "..") for p in parts) and not name.endswith("/")


def client_retried(method: str | None, url: str | None, status: int | None) -> bool:
    """Whether huggingface_hub 2.4 already retried this failed request with its own backoff."""
    if not url:
        return False
    path = unquote(urlsplit(url).path)
    if "/preupload/" in path or ".git/info/lfs/" in path:
        return True
    if re.fullmatch(r"/api/(models|datasets|spaces)", path) or re.search(r"^/api/(models|datasets|spaces)/.+/tree/", path):
        return True
    if "/resolve/" in path:
        return method == "HEAD" or status in (408, 429)
    if path.startswith("/api/"):
        return False  # whoami, info, create, settings, validate-yaml, commit, paths-info: not retried
    return True  # LFS transfer hrefs (upload / verify) go through http_backoff


class Hub:
    """A Hub client for the bot. ``sleep`` is injectable so tests do not wait for backoff delays."""

    def __init__(self, token: str | None = None, endpoint: str | None = None, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, timeout: float | None = DEFAULT_TIMEOUT):
        self._token = token
        self._secret = token or huggingface_hub.get_token()  # only ever used to redact messages
        self.endpoint = (endpoint or huggingface_hub.constants.ENDPOINT).rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._api = HfApi(endpoint=self.endpoint, token=token, library_name="ggufbot")
        self.timeout = timeout
        _install_timeout(timeout)

    def __repr__(self) -> str:  # never show the token
        return f"Hub(endpoint={self.endpoint!r})"

    # ------------------------------------------------------------------ calls
    def whoami(self) -> str:
        d = self._call("whoami", lambda: self._api.whoami())
        return str(d["name"])

    def list_models(self, *, author: str | None = None, search: str | None = None, filters: Iterable[str] = (),
                    pipeline_tag: str | None = None, sort: str = "lastModified",
                    limit: int | None = None) -> Iterator[ModelRecord]:
        """Models in descending ``sort`` order; pages are fetched lazily as the iterator is consumed."""
        flt = list(filters) or None
        it = self._call("list_models", lambda: iter(self._api.list_models(
            author=author, search=search, filter=flt, pipeline_tag=pipeline_tag, sort=sort, limit=limit,  # type: ignore[arg-type]
            full=True, cardData=True, fetch_config=True)))
        while True:
            try:
                info = next(it)
            except StopIteration:
                return
            except Exception as e:  # a later page failed: the client already retried it
                raise self._convert(e, "list_models") from None
            yield record_from_info(info)

    def model_info(self, repo_id: str, revision: str | None = None) -> ModelRecord:
        info = self._call(f"model_info {repo_id}",
                          lambda: self._api.model_info(repo_id, revision=revision, files_metadata=True,
                                                       timeout=self.timeout))
        return record_from_info(info)

    def repo_exists(self, repo_id: str) -> bool:
        return bool(self._call(f"repo_exists {repo_id}", lambda: self._api.repo_exists(repo_id)))

    def create_repo(self, repo_id: str, *, private: bool = False, exist_ok: bool = True) -> str:
        url = self._call(f"create_repo {repo_id}",
                         lambda: self._api.create_repo(repo_id, private=private, exist_ok=exist_ok))
        return str(url)

    def delete_repo(self, repo_id: str, *, missing_ok: bool = True) -> None:
        self._call(f"delete_repo {repo_id}", lambda: self._api.delete_repo(repo_id, missing_ok=missing_ok))

    def set_gated(self, repo_id: str, gated: bool | str) -> None:
        """Gate a repo ("auto" / "manual") or open it (False)."""
        self._call(f"update_repo_settings {repo_id}",
                   lambda: self._api.update_repo_settings(repo_id, gated=gated))  # type: ignore[arg-type]

    def preupload(self, repo_id: str, additions: Mapping[str, Path], expected_sha256: Mapping[str, str]) -> dict[
            str, "Preuploaded"]:
        """Upload the content of ``additions`` (path in repo -> local file) before the commit that will add them
        (``preupload_lfs_files``: Xet when the client and the Hub support it, else LFS); nothing becomes visible. What
        the Hub already holds (uploaded by an interrupted run) is not sent again: the client asks the server first
        (LFS batch API; Xet deduplicates by chunk). :meth:`commit`'s hash rule holds (CheckFailed otherwise); the
        handles returned go to :meth:`commit` (``preuploaded``), which commits them without reading the file again."""
        for p in additions:
            if not safe_relative_path(p):
                raise HubError(f"refusing to upload the unsafe path {p!r}", status=400)
        adds, guards = _upload_operations(additions, expected_sha256)
        self._call(f"upload {repo_id}", lambda: self._api.preupload_lfs_files(repo_id, additions=adds))
        _check_uploaded(adds, guards, expected_sha256)
        metrics.published(sum(op.upload_info.size for op in adds))
        return {op.path_in_repo: Preuploaded(op.path_in_repo, op.upload_info.sha256.hex(), op.upload_info.size, op,
                                             guards.get(op.path_in_repo)) for op in adds}

    def commit(self, repo_id: str, *, additions: dict[str, Path], deletions: list[str], message: str,
               description: str = "", parent_commit: str | None = None,
               expected_sha256: Mapping[str, str] | None = None,
               preuploaded: Mapping[str, "Preuploaded"] | None = None) -> str | None:
        """One atomic commit of ``additions`` (path in repo -> local file) and ``deletions``; its sha.

        With ``parent_commit`` the Hub refuses the commit (412) if the branch moved meanwhile, so a
        retry after a lost answer can never commit twice.

        The bytes sent are the bytes hashed (:func:`_upload_operations`): a file up to ``INLINE_MAX`` is read once and
        sent from memory; a larger one is uploaded (LFS or Xet) before the commit, and the sha256 the client computed
        from what it read (hf_xet while chunking the upload, the LFS path just before it) must be unchanged, as must
        the file's stat key (size, mtime, ctime, inode) from before that hash to after the upload. ``expected_sha256``
        (path in repo -> sha256, what publishing verified) must be what is sent. Otherwise CheckFailed, and no
        commit is made.

        ``preuploaded`` (:meth:`preupload`'s): committed from that upload when its sha256 is the expected one and its
        file's stat key unchanged since (else CheckFailed).
        """
        for p in list(additions) + list(deletions):
            if not safe_relative_path(p):
                raise HubError(f"refusing to commit the unsafe path {p!r}", status=400)
        if not additions and not deletions:
            return None
        done = {rel: up for rel, up in (preuploaded or {}).items() if rel in additions}
        _check_preuploaded(done, additions, expected_sha256)
        adds, guards = _upload_operations({k: v for k, v in additions.items() if k not in done}, expected_sha256)
        if "README.md" in additions:  # the card's metadata is checked before any upload (create_commit checks first too)
            card = Path(additions["README.md"]).read_text(encoding="utf-8")
            self._call(f"validate README.md of {repo_id}", lambda: self._api._validate_yaml(card))
        self._call(f"upload {repo_id}", lambda: self._api.preupload_lfs_files(repo_id, additions=adds))
        _check_uploaded(adds, guards, expected_sha256)
        _check_preuploaded(done, additions, expected_sha256)  # still untouched after the other uploads
        ops: list[Any] = [*adds, *(up.operation() for up in done.values()),
                          *(CommitOperationDelete(path_in_repo=p) for p in deletions)]

        def attempt() -> str:
            info = self._api.create_commit(repo_id, operations=ops, commit_message=message,
                                           commit_description=description, parent_commit=parent_commit)
            return str(info.oid)

        # without a parent guard, a commit whose answer was lost (timeout, dropped connection) may have
        # landed: it is not sent again
        sha = self._call(f"commit {repo_id}", attempt, retry_lost_commit=parent_commit is not None)
        metrics.published(sum(op.upload_info.size for op in adds))
        return sha

    # ------------------------------------------------------------------ webhooks
    def create_webhook(self, url: str, watched: Iterable[tuple[str, str]], *, secret: str | None) -> Webhook:
        """A webhook calling ``url`` on changes of the ``watched`` (type, name) items (repo domain)."""
        items = [{"type": t, "name": n} for t, n in watched]
        info = self._call("create_webhook", lambda: self._api.create_webhook(url=url, watched=items,
                                                                              domains=["repo"], secret=secret))
        return webhook_from_info(info)

    def list_webhooks(self) -> list[Webhook]:
        return [webhook_from_info(i) for i in self._call("list_webhooks", lambda: self._api.list_webhooks())]

    def delete_webhook(self, webhook_id: str) -> None:
        self._call(f"delete_webhook {webhook_id}", lambda: self._api.delete_webhook(webhook_id))

    def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
        return list(self._call(f"list_repo_files {repo_id}",
                               lambda: self._api.list_repo_files(repo_id, revision=revision)))

    def read_text(self, repo_id: str, filename: str, revision: str | None = None) -> str | None:
        """A small text file of a repo, or None when the file does not exist (a missing repo raises)."""
        with tempfile.TemporaryDirectory(prefix="ggufbot-read-") as tmp:
            try:
                p = self.download_file(repo_id, filename, revision=revision, dest_dir=Path(tmp))
            except HubNotFound as e:
                if getattr(e, "entry_missing", False):
                    return None
                raise
            return p.read_text(encoding="utf-8")

    def download_file(self, repo_id: str, filename: str, *, revision: str | None = None, repo_type: str = "model",
                      dest_dir: Path | None = None) -> Path:
        if not safe_relative_path(filename):
            raise UnsupportedModel(f"unsafe file name {filename!r}", repo=repo_id)
        path = self._call(f"download {repo_id}/{filename}", lambda: self._api.hf_hub_download(
            repo_id, filename, revision=revision, repo_type=repo_type,
            local_dir=str(dest_dir) if dest_dir is not None else None))
        return Path(path)

    def download_snapshot(self, repo_id: str, revision: str | None, dest: Path,
                          allow_patterns: Iterable[str] | str | None = None, max_bytes: int | None = None) -> Path:
        """Download a repo at ``revision`` into ``dest``; names and total size are checked first."""
        info = self.model_info(repo_id, revision)
        names = [s.rfilename for s in info.siblings]
        bad = [n for n in names if not safe_relative_path(n)]
        if bad:
            raise UnsupportedModel(f"unsafe file name(s) in repo: {', '.join(map(repr, bad[:5]))}", repo=repo_id)
        pats = [allow_patterns] if isinstance(allow_patterns, str) else (list(allow_patterns) if allow_patterns else None)
        chosen = list(filter_repo_objects(names, allow_patterns=pats))
        dest = Path(dest)
        root = dest.resolve()
        for n in chosen:
            if not (root / n).resolve().is_relative_to(root):
                raise UnsupportedModel(f"file name {n!r} escapes the destination directory", repo=repo_id)
        total = sum(s.size or 0 for s in info.siblings if s.rfilename in set(chosen))
        if max_bytes is not None:
            if any(s.size is None for s in info.siblings if s.rfilename in set(chosen)):
                raise HubError(f"{repo_id}: the Hub did not report file sizes; cannot check the size limit",
                               status=502)
            if total > max_bytes:
                raise UnsupportedModel(f"files total {total / 1e9:.2f} GB, over the limit of {max_bytes / 1e9:.2f} GB",
                                       repo=repo_id)
        if not chosen:
            dest.mkdir(parents=True, exist_ok=True)
            return dest
        sha = info.sha or revision
        exact = [glob.escape(n) for n in chosen]
        self._call(f"snapshot {repo_id}@{sha}", lambda: self._api.snapshot_download(
            repo_id, revision=sha, local_dir=str(dest), allow_patterns=exact))
        _check_downloaded(repo_id, info, dest, chosen)
        log.info("downloaded %s@%s: %d files, %d bytes", repo_id, (sha or "")[:12], len(chosen), total)
        metrics.fetched(total)
        return dest

    # ------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn: Callable[[], T], *, retry_lost_commit: bool = True) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - converted below, nothing escapes unconverted
                err = self._convert(e, what)
                if isinstance(err, HubUnreachable):
                    raise err from None  # an outage: the caller stops, nothing to gain from retrying here
                method, url, status = _request_of(e)
                if client_retried(method, url, status):
                    raise err from None
                if not retry_lost_commit and status is None and url and "/commit/" in urlsplit(url).path:
                    raise err from None
                delay = self.retry.decide(err, attempt)
                if delay is None:
                    raise err from None
                log.warning("hub: %s failed (%s); retry %d/%d in %.1fs", what, err.short(), attempt,
                            self.retry.max_attempts - 1, delay)
                self._sleep(delay)

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)

    def _convert(self, e: BaseException, what: str) -> HubError:
        if isinstance(e, (HubError, UnsupportedModel)):
            return e  # type: ignore[return-value]
        err = self._convert_new(e, what)
        metrics.hub_error(err.status)
        return err

    def _convert_new(self, e: BaseException, what: str) -> HubError:
        http = _find_cause(e, hf_errors.HfHubHTTPError)
        if http is not None:
            return self._from_http(http, what)
        if isinstance(e, hf_errors.LocalTokenNotFoundError):
            return HubAuthError(f"{what}: no Hub token; set HF_TOKEN (a token with write access for publishing)",
                                status=401)
        down = _find_cause(e, _ConnectFailed)
        if down is not None:
            return HubUnreachable(what, down.reason)
        net = _find_cause(e, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError,
                              TimeoutError, ConnectionError))
        if net is not None:
            kind = "timed out" if isinstance(net, (httpx2.TimeoutException, TimeoutError)) else "connection failed"
            return HubError(self._redact(f"{what}: {kind} ({type(net).__name__}: {net})"), status=None)
        if isinstance(e, ValueError) and ('"errors"' in str(e) or "metadata" in str(e).lower()):
            return HubError(self._redact(f"{what}: the Hub rejected the model card metadata: {_first_line(e)}"),
                            status=400)
        if isinstance(e, ValueError):
            return HubError(self._redact(f"{what}: {e}"), status=400)
        # not the client's exception text: a reason and a log line say what failed, the traceback is for -v
        log.debug("hub: %s: unexpected %s from the client", what, type(e).__name__, exc_info=e)
        return HubError(f"{what}: unexpected failure in the Hub client", status=None)

    def _from_http(self, e: Any, what: str) -> HubError:
        resp = e.response
        status = resp.status_code if resp is not None else None
        headers = resp.headers if resp is not None else {}
        rid = getattr(e, "request_id", None)
        retry_after = _retry_after(headers.get("Retry-After"))
        server_msg = getattr(e, "server_message", None) or headers.get("X-Error-Message") or ""
        detail = f" ({server_msg.strip()})" if server_msg and server_msg.strip() else ""
        rid_txt = f" [request id {rid}]" if rid else ""
        err: HubError
        if isinstance(e, hf_errors.GatedRepoError):
            err = HubAuthError(f"{what}: the repo is gated and this token's user has not been granted access; "
                               f"accept its conditions on the Hub{rid_txt}", status=status, request_id=rid)
        elif status == 401 and "invalid" in (server_msg + str(e)).lower():
            err = HubAuthError(f"{what}: the Hub rejected the token (401: invalid or expired); set a valid HF_TOKEN"
                               f"{rid_txt}", status=401, request_id=rid)
        elif isinstance(e, hf_errors.RepositoryNotFoundError) or (status == 404 and headers.get("X-Error-Code") == "RepoNotFound"):
            err = HubNotFound(f"{what}: repository not found (or private without access){rid_txt}", status=status,
                              request_id=rid)
        elif isinstance(e, hf_errors.RevisionNotFoundError):
            err = HubNotFound(f"{what}: revision not found{rid_txt}", status=status, request_id=rid)
        elif isinstance(e, hf_errors.EntryNotFoundError):
            err = HubNotFound(f"{what}: file not found{rid_txt}", status=status, request_id=rid)
            err.entry_missing = True  # type: ignore[attr-defined]
        elif status == 401:
            err = HubAuthError(f"{what}: not authorised (401){detail}; check HF_TOKEN{rid_txt}", status=401,
                               request_id=rid)
        elif status == 403:
            err = HubAuthError(f"{what}: forbidden (403){detail}: the token has no access to this repo or "
                               f"namespace (a write token is needed to publish){rid_txt}", status=403, request_id=rid)
        elif status == 404:
            err = HubNotFound(f"{what}: not found (404){detail}{rid_txt}", status=404, request_id=rid)
        elif status == 400 and resp is not None and resp.request is not None and \
                str(resp.request.url).rstrip("/").endswith("/api/validate-yaml"):
            err = HubError(f"{what}: the Hub rejected the model card metadata (README.md){detail}{rid_txt}",
                           status=400, request_id=rid)
        else:
            err = HubError(f"{what}: the Hub answered {status}{detail}{rid_txt}", status=status, request_id=rid,
                           retry_after=retry_after)
        err.args = (self._redact(str(err)),)
        return err


def _check_downloaded(repo_id: str, info: ModelRecord, dest: Path, names: Iterable[str]) -> None:
    """Each downloaded file the listing gives an LFS sha256 is hashed here and must have it: the listing's hash is
    compared, never assumed. A file that differs is removed (a new download fetches it again) and HubError raised."""
    bad = []
    for name in names:
        sib = info.sibling(name)
        if sib is None or not sib.lfs_sha256:
            continue
        p = dest / name
        if records.content_sha256(p) != sib.lfs_sha256:  # kept in memory: the fetch's own identity costs a stat
            bad.append(name)
            p.unlink(missing_ok=True)
    if bad:
        raise HubError(f"download {repo_id}@{(info.sha or '')[:12]}: the sha256 of {', '.join(bad)} is not the one "
                       "the Hub lists; removed, to be downloaded again", status=None)


INLINE_MAX = 10 * 1024 * 1024  # a file up to this size is read into memory and sent from there (the Hub's limit
# for a regular git file: anything larger goes through LFS or Xet)


def _upload_operations(additions: Mapping[str, Path], expected: Mapping[str, str] | None) -> tuple[
        list[CommitOperationAdd], dict[str, tuple[Path, list[int]]]]:
    """The add operations, and for each file sent from its path, the path and its stat key before any read.

    A small file's bytes are read once and checked here; a large one is left for the client to hash and upload
    (hf_xet hashes while it uploads; the LFS path hashes just before) and checked by :func:`_check_uploaded`."""
    ops, guards = [], {}
    for rel, f in additions.items():
        f = Path(f)
        if expected is not None and rel not in expected:
            raise CheckFailed("publish", f"refusing to upload {rel}: no verified sha256 for it")
        key = records.stat_key(f)
        if key[0] <= INLINE_MAX:
            data = f.read_bytes()
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data))
        else:
            guards[rel] = (f, key)
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)))
    if expected is not None:
        _compare(ops, expected, only=lambda rel: rel not in guards)
    return ops, guards


def _check_uploaded(ops: list[CommitOperationAdd], guards: Mapping[str, tuple[Path, list[int]]],
                    expected: Mapping[str, str] | None) -> None:
    """After the upload, before the commit: each file sent from its path was not touched from before its hash to
    after its upload, was uploaded through LFS or Xet (never read again at commit time), and hashed to the
    expected sha256."""
    moved = [rel for rel, (f, key) in guards.items() if not f.is_file() or records.stat_key(f) != key]
    regular = [op.path_in_repo for op in ops if op.path_in_repo in guards and op._upload_mode != "lfs"]
    if moved or regular:
        why = "; ".join(x for x in (
            f"changed while it was uploaded: {', '.join(sorted(moved))}" if moved else "",
            f"the Hub did not take it as an LFS file: {', '.join(sorted(regular))}" if regular else "") if x)
        raise CheckFailed("publish", f"refusing to commit files that may not be the ones verified ({why})")
    if expected is not None:
        _compare(ops, expected, only=lambda rel: rel in guards)


class Preuploaded:
    """A file whose content :meth:`Hub.preupload` has sent: what the client read (sha256, size) and, for a file sent
    from its path, the path and its stat key before that read. Opaque outside this module."""

    def __init__(self, path_in_repo: str, sha256: str, size: int, op: CommitOperationAdd,
                 guard: tuple[Path, list[int]] | None) -> None:
        self.path_in_repo, self.sha256, self.size = path_in_repo, sha256, size
        self._op, self._guard = op, guard

    def untouched(self) -> bool:
        """Whether the local file is still the one uploaded (its stat key unchanged since before it was read)."""
        if self._guard is None:
            return True  # sent from memory: the bytes hashed are the bytes sent
        f, key = self._guard
        return f.is_file() and records.stat_key(f) == key

    def operation(self) -> CommitOperationAdd:
        """A fresh add operation for one more commit: already uploaded, never read again (the client refuses to
        commit one operation object twice)."""
        op = copy.copy(self._op)
        op._is_committed = False
        return op



def _check_preuploaded(done: Mapping[str, Preuploaded], additions: Mapping[str, Path],
                       expected: Mapping[str, str] | None) -> None:
    """The rule of :func:`_check_uploaded` for files uploaded before this commit: still the same file, the upload's
    sha256 still the one expected."""
    moved = sorted(rel for rel, up in done.items() if not up.untouched()
                   or (up._guard is not None and Path(additions[rel]).absolute() != up._guard[0].absolute()))
    wrong = sorted(rel for rel, up in done.items() if expected is not None and expected.get(rel) != up.sha256)
    if moved or wrong:
        why = "; ".join(x for x in (
            f"changed since it was uploaded: {', '.join(moved)}" if moved else "",
            f"uploaded bytes are not the ones verified: {', '.join(wrong)}" if wrong else "") if x)
        raise CheckFailed("publish", f"refusing to commit files that may not be the ones verified ({why})")


def _compare(ops: list[CommitOperationAdd], expected: Mapping[str, str], only: Callable[[str], bool]) -> None:
    changed = sorted(op.path_in_repo for op in ops if only(op.path_in_repo)
                     and op.upload_info.sha256.hex() != expected[op.path_in_repo])
    if changed:
        raise CheckFailed("publish", f"refusing to commit files whose bytes are not the ones verified "
                          f"(sha256 of what was read for the upload differs): {', '.join(changed)}")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _find_cause(e: BaseException | None, types: Any) -> Any:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, types):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _request_of(e: BaseException) -> tuple[str | None, str | None, int | None]:
    http = _find_cause(e, hf_errors.HfHubHTTPError)
    if http is not None and http.response is not None:
        req = http.response.request
        return (req.method if req is not None else None, str(req.url) if req is not None else None,
                http.response.status_code)
    net = _find_cause(e, httpx2.RequestError)
    if net is not None:
        try:
            req = net.request
        except RuntimeError:
            return None, None, None
        return req.method, str(req.url), None
    return None, None, None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None
