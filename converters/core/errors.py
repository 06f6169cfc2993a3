"""The project's one errors module: every error ggufbot raises derives from GgufbotError.

Errors carry their context as attributes so that callers (the worker, the CLI, the status page)
can decide from the type alone whether to retry, and can show the reason without parsing text.
``transient`` says whether the same operation may succeed if tried again later.
"""

from __future__ import annotations

from collections.abc import Sequence


class GgufbotError(Exception):
    """Root of every ggufbot error."""

    transient: bool = False

    def short(self) -> str:
        """One line for a CLI or a status page."""
        return str(self).splitlines()[0] if str(self) else type(self).__name__


class ConfigError(GgufbotError):
    """Settings or command-line values are wrong."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class UnsupportedModel(GgufbotError):
    """The source model cannot (or must not) be converted; ``reason`` says why."""

    def __init__(self, reason: str, repo: str | None = None):
        super().__init__(reason if repo is None else f"{repo}: {reason}")
        self.reason = reason
        self.repo = repo


class InputError(GgufbotError):
    """A file given to a stage is missing, malformed or unusable (calibration text, checkpoint...)."""


class UnknownName(GgufbotError, KeyError):
    """A name looked up in a registry (quant type, ladder preset, recipe) does not exist."""

    def __init__(self, kind: str, name: str, known: Sequence[str]):
        self.kind = kind
        self.name = name
        self.known = list(known)
        GgufbotError.__init__(self, f"unknown {kind} {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class NeedsImatrix(GgufbotError):
    """A quant type that needs an importance matrix was asked for without one."""

    def __init__(self, qtype: str):
        super().__init__(f"quant type {qtype} needs an importance matrix; run calibration or drop {qtype} from the ladder")
        self.qtype = qtype


class DiskSpaceError(GgufbotError):
    """Not enough free disk for what is about to be written. Transient: space may be freed."""

    transient = True

    def __init__(self, path: str, needed: int, free: int):
        super().__init__(
            f"not enough free disk under {path}: need about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )
        self.path = path
        self.needed = needed
        self.free = free


class ToolchainError(GgufbotError):
    """llama.cpp could not be found, fetched or built."""


class ToolError(GgufbotError):
    """A llama.cpp program (or the converter script) failed or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr_tail: str, timed_out: bool = False):
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out
        prog = self.argv[0].rsplit("/", 1)[-1] if self.argv else "?"
        what = "timed out" if timed_out else f"exited with code {returncode}"
        last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else ""
        super().__init__(f"{prog} {what}" + (f": {last}" if last else ""))

    @property
    def transient(self) -> bool:  # type: ignore[override]
        # a timeout or a kill by signal can heal on a retry; a clean non-zero exit is a real failure
        return self.timed_out or (self.returncode is not None and self.returncode < 0)


class ParseError(GgufbotError):
    """Output of a tool could not be parsed into the expected figures."""


class CheckFailed(GgufbotError):
    """A quality gate or a verification check failed; ``reason`` is shown on cards and status pages."""

    def __init__(self, check: str, reason: str):
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


class HubError(GgufbotError):
    """The Hub answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return self.status is None or self.status in (408, 429) or self.status >= 500


class HubUnreachable(HubError):
    """The Hub could not be reached at all (connection refused, name not resolved, connect timeout, TLS): an
    outage, not a failed request. Transient; never retried here (the caller stops: a poll ends, a job retries
    on its own schedule). ``reason`` is one of a few fixed words, never the client's exception text."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: Hub unreachable ({reason})", status=None)
        self.reason = reason


class HubAuthError(HubError):
    """Bad or missing token (401), or no access to a gated/private repo (403)."""

    transient = False  # type: ignore[assignment]


class HubNotFound(HubError):
    """Repo, revision or file does not exist (404)."""

    transient = False  # type: ignore[assignment]


class StateError(GgufbotError):
    """An illegal state transition or an inconsistent state store."""


class Cancelled(GgufbotError):
    """Work was stopped on request (SIGTERM, cancel); not a failure of the job."""


class Stuck(GgufbotError):
    """A job's progress has not moved for too long: its programs are killed and it is retried (transient)."""

    transient = True

    def __init__(self, stage: str, seconds: float):
        super().__init__(f"no progress for {seconds:.0f} s in {stage}: treated as stuck")
        self.stage = stage
        self.seconds = seconds


class TemplateError(GgufbotError):
    """An untrusted chat template did not render: it raised, broke a sandbox rule, or ran out of CPU time, memory
    or output size (``kind``: the Jinja error's name, or ``cpu``/``memory``/``output``/``time``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class PatchRefused(GgufbotError):
    """A metadata patch cannot stand in for a full job (the vocabulary or an architecture key would change, the
    earlier publication cannot be read); ``reason`` says why, and the job falls back to the full run."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
