"""The bot's settings: one TOML file plus environment variables, validated at start, frozen after load.

Where values come from, later ones winning:

1. built-in defaults (below): a SQLite database under the data directory, a short list of major open-model
   organisations' new ``text-generation`` releases (:data:`DEFAULT_AUTHORS`), a model-size limit derived from
   the free disk, and the token's own namespace as the publishing target;
2. the TOML file (``--config PATH`` or ``$GGUFBOT_CONFIG``), see ``deploy/ggufbot.example.toml``;
3. environment variables ``GGUFBOT_<SECTION>__<KEY>`` (double underscore), e.g.
   ``GGUFBOT_TARGET__NAMESPACE=me`` or ``GGUFBOT_LIMITS__CONCURRENCY=2``; top-level keys as
   ``GGUFBOT__DATA_DIR``. Lists are comma-separated. Other ``GGUFBOT_*`` variables (``GGUFBOT_CACHE``,
   ``GGUFBOT_CUDA``, ``GGUFBOT_CONFIG``) belong to other parts and are not read here.

An unknown key or a value of the wrong type is a :class:`ConfigError` that names the key
(``limits.concurrency: expected an integer, got 'two'``). The Hub token is read from ``HF_TOKEN`` (or the file
named by ``hub.token_file``, or systemd's credential ``$CREDENTIALS_DIRECTORY/hf_token``); it is never printed: it is excluded from ``repr`` and from :meth:`Settings.describe`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shutil
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot.model.repo_names import REPO_ID, repo_name
from converters.core import quants
from bot.model.toolchain_settings import ToolchainSettings
from converters.core.errors import ConfigError
from converters.ladder import budget as budget_mod
from converters.ladder import tune as tune_mod
from converters.variants import recipes as variants_mod

ENV_PREFIX = "GGUFBOT_"

# The built-in watch list: major organisations that publish open text-generation models. Only their new
# releases (within ``lookback_days`` on the first poll) are considered; filters still apply.
DEFAULT_AUTHORS: tuple[str, ...] = (
    "meta-llama",
    "mistralai",
    "Qwen",
    "google",
    "microsoft",
    "deepseek-ai",
    "allenai",
    "HuggingFaceTB",
    "ibm-granite",
)

# Auto size limit: one job holds the source, a 16-bit reference and the ladder (roughly 6x the source
# size for the default ladder), so a model may use at most this fraction of the free disk.
AUTO_SIZE_FRACTION = 1 / 6


@dataclasses.dataclass(frozen=True)
class Source:
    """One watch source: an author/org, a search term and/or Hub filters (tags)."""

    author: str | None = None
    search: str | None = None
    filters: tuple[str, ...] = ()
    pipeline_tag: str | None = "text-generation"
    lookback_days: float = 7.0
    name: str = ""

    @property
    def key(self) -> str:
        """Stable identity of the source in the state store (holds its last-seen mark)."""
        if self.name:
            return self.name
        parts = []
        if self.author:
            parts.append(f"author={self.author}")
        if self.search:
            parts.append(f"search={self.search}")
        if self.filters:
            parts.append("filters=" + ",".join(self.filters))
        if self.pipeline_tag:
            parts.append(f"pipeline_tag={self.pipeline_tag}")
        return ";".join(parts)


@dataclasses.dataclass(frozen=True)
class HubSettings:
    endpoint: str | None = None  # default: $HF_ENDPOINT, else the client's default
    token_file: str | None = None  # default: $HF_TOKEN
    poll_workers: int = 4  # sources listed concurrently during a poll


@dataclasses.dataclass(frozen=True)
class Filters:
    min_params: int | None = None
    max_params: int | None = None
    licenses_allow: tuple[str, ...] = ()  # empty: any licence not denied
    licenses_deny: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()  # fnmatch patterns on "owner/name", case-insensitive
    skip_gated: bool = False  # true: skip every gated model; false: skip only those the token cannot read
    skip_quantized: bool = True  # repos that are already GGUF, GPTQ, AWQ, MLX... are skipped


@dataclasses.dataclass(frozen=True)
class Target:
    namespace: str | None = None  # default: the token's own (whoami)
    repo_template: str = "{model}-GGUF"
    variant_repo_template: str = "{org}/{model}-{variant}-GGUF"  # where each variant of quantize.variants goes
    publish: bool = True
    private: bool = False
    on_collision: str = "rename"  # the repo is another model's: "rename" ({author}_{model}) or "fail"
    adopt: tuple[str, ...] = ()  # repos without the ggufbot marker that may be written to (same source only)


@dataclasses.dataclass(frozen=True)
class Publish:
    """How a job's ladder reaches the Hub (``[publish]``).

    ``early`` (default true): each file is uploaded (pre-uploaded: not yet visible) as soon as it has passed the
    gate, while the others are still being made, and the ladder is published in commits along ``order``: the
    first commit holds the first ``groups[0]`` types of the publish order with the card, the imatrix and the
    report so far, the next one the next ``groups[1]`` types, ...; the last commit the rest of the ladder. Each
    commit is atomic, and its card and report.json describe exactly the files in the repo then (and name the
    ones still coming). ``early = false``: today's single commit of the finished ladder.

    ``order``: the publish order, most downloaded first; types of the ladder not listed follow in ladder order
    (the pipeline also makes and measures the files in this order). ``groups``: how many entries of ``order``
    each early commit adds (the ones the ladder has; the types after them go with the last commit). The default ``[1, 3]`` makes three commits: Q4_K_M alone (the file most people
    download, out as early as possible), then Q8_0, Q6_K and Q5_K_M together, then the long tail with the chart.
    Fewer, larger commits keep the repo's history and its watchers' notifications short and each commit carries
    the card and report once; ``[1, 1, 1, 1]`` gives each popular file its own commit."""

    early: bool = True
    order: tuple[str, ...] = ("Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M")
    groups: tuple[int, ...] = (1, 3)


@dataclasses.dataclass(frozen=True)
class Quantize:
    ladder: str = "default"
    outtype: str = "bf16"
    variants: tuple[str, ...] = ()  # recipe names (converters.variants.recipes); empty: no variants (the default)
    calibration_text: str | None = None  # file, URL or hf://datasets/...; default: the pipeline's
    evaluation_text: str | None = None
    calibration_chunks: int | None = None
    evaluation_chunks: int | None = None
    require_source_check: bool = True  # false: publish even when the BF16-vs-source comparison could not run
    ctx: int = 512
    split_max_gb: float = 45.0
    jobs: int = 1
    # size points to tune per tensor (converters.ladder.tune), e.g. ["Q4_K_M"]; "default": those of Q4_K_M, Q3_K_M and
    # Q2_K the ladder has; empty: off
    tune: tuple[str, ...] = ("default",)
    tune_seconds: float = 3600.0  # time budget of all tuning measurements, probes and solves of one job
    # true: each plan is confirmed on the calibration text before it is kept (shrunk toward stock once, else dropped;
    # about 3x the cost); false: no calibration run, each plan is built once and judged by the evaluation's gate alone
    tune_confirm: bool = False
    # memory budgets "SIZE@CONTEXT" (GB/MB decimal, GiB/MiB binary, k = 1024 tokens), e.g. ["8GB@8k", "16GB@32k"]:
    # each gets <Model>-fit-16GB-32k.gguf, the best predicted file whose weights + KV cache + buffers fit
    # (converters.ladder.fit); empty: off
    fit: tuple[str, ...] = ()
    fit_kv_type: str = "f16"  # KV cache type the fit files are sized and measured with: f16 (llama.cpp's default) or q8_0


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """The sequential evaluation (``converters.ladder.evaluate.sequential``): each file's chunks are scored until its
    mean KLD's standard error (from chunk means) is at most ``precision`` of the mean, or the gate's verdict on it
    cannot change any more; at least ``min_chunks``, at most ``quantize.evaluation_chunks`` (default 64).

    Speed (``converters.ladder.speed``): llama-bench tokens/s on this box's backend, shown on the card per file with
    the device; a tuned or memory-budget file more than 5 % slower than its baseline (beyond the error) is
    withheld."""

    precision: float = 0.05  # 0: every file on evaluation_chunks chunks (fixed, as before)
    min_chunks: int = 8
    speed: str = "tuned"  # "all": every file; "tuned": tuned/fit files and their baselines only; "off"
    speed_prompt: int = 512  # tokens of the prompt-processing test (llama-bench -p)
    speed_generate: int = 128  # tokens of the generation test (llama-bench -n)
    speed_repetitions: int = 3  # runs of each test per llama-bench process (-r)
    speed_rounds: int = 2  # interleaved llama-bench processes per file of a compared pair (ABAB)
    speed_threads: int = 0  # llama-bench -t; 0: every thread the process may use (a busy shared box: fewer, see README)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_model_gb: float | None = None  # default: AUTO_SIZE_FRACTION of the free disk under data_dir
    min_free_disk_gb: float = 5.0  # a job does not start with less free than this plus its estimate
    concurrency: int = 1
    max_attempts: int = 4
    # How long one program may run, from its work (converters.ladder.job.ToolLimits): tool_min_seconds, plus
    tool_seconds_per_gb: float = 600.0  # converter, llama-quantize, llama-gguf-split: per GB of the file read
    tool_min_seconds: float = 120.0  # every program (was a 1800 s minimum for any program)
    tool_load_seconds_per_gb: float = 30.0  # llama-imatrix, llama-perplexity, llama-completion: loading, per GB
    tool_eval_seconds_per_token_gb: float = 0.25  # llama-imatrix, llama-perplexity: per token of text per GB
    tool_generate_seconds_per_token_gb: float = 3.0  # llama-completion: per generated token per GB (at least 1 GB)


@dataclasses.dataclass(frozen=True)
class Schedule:
    poll_minutes: float = 30.0
    dispatch_seconds: float = 5.0
    housekeeping_minutes: float = 10.0
    heartbeat_seconds: float = 15.0
    stale_after_seconds: float = 300.0
    stuck_after_seconds: float = 3600.0  # a running job whose progress has not moved this long is stuck
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 3600.0


@dataclasses.dataclass(frozen=True)
class Requeue:
    on_toolchain_change: bool = False  # re-quantize published models when the llama.cpp version changes
    on_revision_change: bool = True  # re-quantize when weights/config/tokenizer/template change upstream


@dataclasses.dataclass(frozen=True)
class Web:
    """The status page, its JSON API, ``/metrics`` and the Hub webhook (``bot.web.site``)."""

    listen: str = ""  # "HOST:PORT" (e.g. "127.0.0.1:8080") for ``ggufbot run`` and ``serve``; "" = off
    admin_token_file: str | None = None  # the retry/cancel buttons need this token; unset: they are refused
    webhook_secret_file: str | None = None  # the Hub webhook's secret; unset: POST /webhooks/hub is refused


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """What one box can run, when jobs go through procrastinate (a PostgreSQL ``database_url``; ``bot.queue.box``)."""

    max_model_gb: float | None = None  # largest model this box takes; None: no limit of its own
    gpu: bool = False  # a GPU box: it also takes the big queue (models over big_model_gb)
    big_model_gb: float = 30.0  # the scheduler sends models over this size to the big queue


SECTIONS: dict[str, type] = {
    "hub": HubSettings,
    "filters": Filters,
    "target": Target,
    "quantize": Quantize,
    "publish": Publish,
    "evaluate": Evaluate,
    "limits": Limits,
    "schedule": Schedule,
    "requeue": Requeue,
    "web": Web,
    "worker": WorkerSettings,
    "toolchain": ToolchainSettings,
}
TOP_LEVEL = ("data_dir", "database_url", "sources")


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    sources: tuple[Source, ...]
    hub: HubSettings = HubSettings()
    filters: Filters = Filters()
    target: Target = Target()
    quantize: Quantize = Quantize()
    publish: Publish = Publish()
    evaluate: Evaluate = Evaluate()
    limits: Limits = Limits()
    schedule: Schedule = Schedule()
    requeue: Requeue = Requeue()
    web: Web = Web()
    worker: WorkerSettings = WorkerSettings()
    toolchain: ToolchainSettings = ToolchainSettings()
    token: str | None = dataclasses.field(default=None, repr=False, compare=False)
    config_path: Path | None = None
    max_model_bytes: int = 0  # resolved: the explicit limit, or the share of the free disk

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def keep_dir(self) -> Path:
        """Where a published job's report and imatrix are kept after its work directory is removed."""
        return self.data_dir / "kept"

    @property
    def will_publish(self) -> bool:
        return self.target.publish and bool(self.token)

    def excluded(self, repo_id: str) -> str | None:
        """The exclude pattern that matches ``repo_id``, if any."""
        low = repo_id.lower()
        for pat in self.filters.exclude_patterns:
            if fnmatch.fnmatchcase(low, pat.lower()):
                return pat
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for ``status``/logs, without the token."""
        d = _jsonable(dataclasses.asdict(self))
        d.pop("token", None)
        d["token_set"] = bool(self.token)
        return d


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "ggufbot"


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the TOML file at ``path`` (or ``$GGUFBOT_CONFIG``) and ``env``."""
    env = os.environ if env is None else env
    if path is None and env.get("GGUFBOT_CONFIG"):
        path = env["GGUFBOT_CONFIG"]
    raw: dict[str, Any] = {}
    config_path: Path | None = None
    if path is not None:
        config_path = Path(path).expanduser()
        try:
            raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_path} is not valid TOML: {e}") from None
    raw = _merge_env(raw, env)
    return from_mapping(raw, env=env, config_path=config_path)


def from_mapping(raw: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                 config_path: Path | None = None, free_disk: int | None = None) -> Settings:
    """Validate a parsed config (TOML shape) into :class:`Settings`. ``free_disk`` overrides the disk probe."""
    env = os.environ if env is None else env
    unknown = sorted(set(raw) - set(TOP_LEVEL) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted([*TOP_LEVEL, *SECTIONS]))})",
                          key=unknown[0])
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table, got {value!r}", key=name)
        sections[name] = _build(cls, value, prefix=name)

    data_dir = Path(_typed("data_dir", raw.get("data_dir"), str | None) or default_data_dir()).expanduser()
    database_url = _typed("database_url", raw.get("database_url"), str | None) or f"sqlite:///{data_dir / 'ggufbot.db'}"
    if not re.match(r"^[a-z0-9+]+://", database_url):
        raise ConfigError(f"database_url: expected a SQLAlchemy URL such as sqlite:///path or "
                          f"postgresql+psycopg://host/db, got {database_url!r}", key="database_url")

    sources = _sources(raw.get("sources"))
    token = _token(sections["hub"], env)
    settings = Settings(data_dir=data_dir, database_url=database_url, sources=sources, token=token,
                        config_path=config_path, **sections)
    _check(settings)
    return dataclasses.replace(settings, max_model_bytes=_size_limit(settings, free_disk))


def _sources(value: Any) -> tuple[Source, ...]:
    if value is None:
        return tuple(Source(author=a) for a in DEFAULT_AUTHORS)
    if not isinstance(value, list):
        raise ConfigError(f"sources: expected an array of tables ([[sources]]), got {value!r}", key="sources")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ConfigError(f"sources[{i}]: expected a table, got {item!r}", key=f"sources[{i}]")
        src = _build(Source, item, prefix=f"sources[{i}]")
        if not (src.author or src.search or src.filters):
            raise ConfigError(f"sources[{i}]: give at least one of author, search, filters", key=f"sources[{i}]")
        if src.lookback_days < 0:
            raise ConfigError(f"sources[{i}].lookback_days: must be >= 0", key=f"sources[{i}].lookback_days")
        out.append(src)
    keys = [s.key for s in out]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ConfigError(f"sources: two sources have the same identity {dup!r}; give one a name", key="sources")
    return tuple(out)


CREDENTIAL_NAME = "hf_token"  # systemd's LoadCredential=hf_token:... (deploy/ggufbot.service)


def _token(hub: HubSettings, env: Mapping[str, str]) -> str | None:
    """hub.token_file, else $HF_TOKEN, else the systemd credential ``$CREDENTIALS_DIRECTORY/hf_token``."""
    if hub.token_file:
        return read_secret_file(hub.token_file, "hub.token_file")
    token = (env.get("HF_TOKEN") or "").strip() or None
    creds = env.get("CREDENTIALS_DIRECTORY")
    if token is None and creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return read_secret_file(str(Path(creds) / CREDENTIAL_NAME), "$CREDENTIALS_DIRECTORY/" + CREDENTIAL_NAME)
    return token


def read_secret_file(path: str, key: str) -> str | None:
    """The stripped text of a secret file named by setting ``key`` (None when empty); the secret is never in
    an error message."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {p}: {e.strerror}", key=key) from None
    return text or None


def parse_listen(value: str, key: str = "web.listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT such as 127.0.0.1:8080 (or \"\" for off), got {value!r}",
                          key=key)
    return host, int(port)


def _check(s: Settings) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}", key=key)

    if s.limits.concurrency < 1:
        bad("limits.concurrency", "must be at least 1")
    if s.limits.max_attempts < 1:
        bad("limits.max_attempts", "must be at least 1")
    if s.limits.max_model_gb is not None and s.limits.max_model_gb <= 0:
        bad("limits.max_model_gb", "must be positive")
    if s.worker.max_model_gb is not None and s.worker.max_model_gb <= 0:
        bad("worker.max_model_gb", "must be positive")
    if s.worker.big_model_gb <= 0:
        bad("worker.big_model_gb", "must be positive")
    if s.limits.min_free_disk_gb < 0:
        bad("limits.min_free_disk_gb", "must be >= 0")
    for key in ("tool_seconds_per_gb", "tool_min_seconds", "tool_load_seconds_per_gb", "tool_eval_seconds_per_token_gb",
                "tool_generate_seconds_per_token_gb"):
        if getattr(s.limits, key) <= 0:
            bad(f"limits.{key}", "must be positive")
    for key in ("poll_minutes", "dispatch_seconds", "housekeeping_minutes", "heartbeat_seconds",
                "stale_after_seconds", "stuck_after_seconds", "retry_base_seconds", "retry_max_seconds"):
        if getattr(s.schedule, key) <= 0:
            bad(f"schedule.{key}", "must be positive")
    if s.schedule.stale_after_seconds < 2 * s.schedule.heartbeat_seconds:
        bad("schedule.stale_after_seconds", "must be at least twice schedule.heartbeat_seconds")
    f = s.filters
    if f.min_params is not None and f.max_params is not None and f.min_params > f.max_params:
        bad("filters.min_params", "is larger than filters.max_params")
    if "{model}" not in s.target.repo_template or "/" in s.target.repo_template:
        bad("target.repo_template", "must contain {model} and no '/'")
    try:
        s.target.repo_template.format(model="M", author="A")
    except (KeyError, IndexError, ValueError) as e:
        bad("target.repo_template", f"only {{model}} and {{author}} may be used ({e})")
    if s.target.on_collision not in ("rename", "fail"):
        bad("target.on_collision", f"expected \"rename\" or \"fail\", got {s.target.on_collision!r}")
    for rid in s.target.adopt:
        if not REPO_ID.fullmatch(str(rid)):
            bad("target.adopt", f"not a repo id ORG/NAME: {rid!r}")
    if s.target.namespace is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s.target.namespace):
        bad("target.namespace", f"not a valid Hub namespace: {s.target.namespace!r}")
    try:
        repo_name(s.target.variant_repo_template, namespace=s.target.namespace or "org", model="Model",
                  variant="variant")
    except ConfigError as e:
        bad("target.variant_repo_template", str(e))
    try:
        variants_mod.parse_list(s.quantize.variants)
    except Exception as e:  # UnknownName lists the known recipes: name the key
        bad("quantize.variants", str(e))
    if s.quantize.outtype.lower() not in ("bf16", "f16", "f32"):
        bad("quantize.outtype", f"expected bf16, f16 or f32, got {s.quantize.outtype!r}")
    if s.quantize.ctx < 16:
        bad("quantize.ctx", "must be at least 16")
    if s.web.listen:
        parse_listen(s.web.listen)
    if s.hub.poll_workers < 1 or s.hub.poll_workers > 64:
        bad("hub.poll_workers", "must be between 1 and 64")
    try:
        quants.parse_ladder(s.quantize.ladder)
    except Exception as e:  # UnknownName: name the key
        bad("quantize.ladder", str(e))
    try:
        tune_mod.check_points(s.quantize.tune, [q.name for q in quants.parse_ladder(s.quantize.ladder)])
    except Exception as e:
        bad("quantize.tune", str(e))
    if s.quantize.tune_seconds <= 0:
        bad("quantize.tune_seconds", "must be positive")
    for name in s.publish.order:
        try:
            quants.get(name)
        except Exception as e:  # UnknownName: name the key
            bad("publish.order", str(e))
    if len(set(s.publish.order)) != len(s.publish.order):
        bad("publish.order", "names a type twice")
    if any(n < 1 for n in s.publish.groups):
        bad("publish.groups", "each group must hold at least one type")
    if not 0 <= s.evaluate.precision < 1:
        bad("evaluate.precision", "must be at least 0 (off) and below 1")
    if s.evaluate.min_chunks < 2:
        bad("evaluate.min_chunks", "must be at least 2 (a standard error needs two chunk means)")
    if s.evaluate.speed not in ("all", "tuned", "off"):
        bad("evaluate.speed", f"expected \"all\", \"tuned\" or \"off\", got {s.evaluate.speed!r}")
    for key in ("speed_prompt", "speed_generate", "speed_repetitions", "speed_rounds"):
        if getattr(s.evaluate, key) < 1:
            bad(f"evaluate.{key}", "must be at least 1")
    if s.evaluate.speed_threads < 0:
        bad("evaluate.speed_threads", "must be 0 (every thread) or more")
    try:
        budget_mod.parse_all(s.quantize.fit)
    except Exception as e:  # InputError names the syntax
        bad("quantize.fit", str(e))
    if s.quantize.fit_kv_type not in ("f16", "q8_0"):
        bad("quantize.fit_kv_type", f"expected f16 or q8_0, got {s.quantize.fit_kv_type!r}")


def _size_limit(s: Settings, free_disk: int | None) -> int:
    if s.limits.max_model_gb is not None:
        return int(s.limits.max_model_gb * 1e9)
    if free_disk is None:
        probe = s.data_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_disk = shutil.disk_usage(probe).free
    return max(0, int(free_disk * AUTO_SIZE_FRACTION))


# --------------------------------------------------------------------------------------------------
# Typed building of frozen dataclasses from mappings
# --------------------------------------------------------------------------------------------------


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(f"unknown setting {prefix}.{k} (known: {', '.join(sorted(fields))})", key=f"{prefix}.{k}")
        kwargs[k] = _typed(f"{prefix}.{k}", v, hints[k])
    return cls(**kwargs)


def _typed(key: str, v: Any, tp: Any) -> Any:
    """Check (and lightly coerce) ``v`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None or (isinstance(v, str) and v == "" and type(None) in args):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _typed(key, v, inner[0])
    if v is None:
        raise ConfigError(f"{key}: a value is required", key=key)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise ConfigError(f"{key}: expected true or false, got {v!r}", key=key)
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise ConfigError(f"{key}: expected an integer, got {v!r}", key=key)
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ConfigError(f"{key}: expected a number, got {v!r}", key=key)
    if tp is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"{key}: expected a string, got {v!r}", key=key)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"{key}: expected a list of {'integers' if item is int else 'strings'}, got {v!r}",
                              key=key)
        return tuple(v)
    raise ConfigError(f"{key}: unsupported setting type {tp}", key=key)  # pragma: no cover


def _from_env_text(key: str, text: str, tp: Any) -> Any:
    """Parse an environment variable's text by the setting's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if text.strip() == "":
            return None
        return _from_env_text(key, text, inner)
    t = text.strip()
    if tp is bool:
        low = t.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}", key=key)
    if tp is int:
        try:
            return int(t)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}", key=key) from None
    if tp is float:
        try:
            return float(t)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}", key=key) from None
    if origin is tuple:
        items = [p.strip() for p in t.split(",") if p.strip()]
        if typing.get_args(tp)[0] is int:
            return [_from_env_text(key, p, int) for p in items]
        return items
    return text


def _merge_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        rest = name[len(ENV_PREFIX):]
        if rest.startswith("_"):  # GGUFBOT__DATA_DIR: top level
            key = rest[1:].lower()
            if key not in ("data_dir", "database_url"):
                raise ConfigError(f"environment variable {name}: unknown setting {key!r}", key=key)
            out[key] = text
            continue
        section, _, key = rest.partition("__")
        section, key = section.lower(), key.lower()
        cls = SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"environment variable {name}: unknown section {section!r}", key=section)
        hints = typing.get_type_hints(cls)
        if key not in hints:
            raise ConfigError(f"environment variable {name}: unknown setting {section}.{key}", key=f"{section}.{key}")
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{section}: expected a table", key=section)
        sec[key] = _from_env_text(f"{section}.{key}", text, hints[key])
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
