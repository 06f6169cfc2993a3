"""Fixtures of the bot's tests: Hub content (one acceptable new release and one repo for each reason to skip), the
end-to-end tests' settings (:func:`bot_config`), a corpus of hostile releases (:func:`populate_hostile`, with
canaries that hostile code would create, and :func:`scripted_model`, a tiny checkpoint that passes the gate), an
in-memory stand-in for the Hub adapter's read side (:class:`FakeHub`, for unit tests) and a throw-away PostgreSQL
schema for the store tests."""

from __future__ import annotations

import contextlib
import dataclasses
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

from bot.model.record import ModelRecord, Sibling
from converters.core.errors import HubNotFound
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


def bot_config(path: Path, *, data_dir: Path, author: str, calibration: Path, evaluation: Path,
               ladder: str = "Q8_0,Q4_K_M", limits: str = "", schedule: str = "stale_after_seconds = 5",
               more: str = "") -> Path:
    """Write the bot's settings for an end-to-end test to ``path``: one watched author, tiny calibration and
    evaluation budgets, a fast schedule. ``limits``/``schedule``: more lines for those sections; ``more``: more
    sections."""
    path.write_text(f"""
data_dir = "{data_dir}"

[[sources]]
author = "{author}"
lookback_days = 2

[limits]
max_model_gb = 1.0
min_free_disk_gb = 0.1
{limits}

[quantize]
ladder = "{ladder}"
calibration_text = "{calibration}"
evaluation_text = "{evaluation}"
calibration_chunks = 2
evaluation_chunks = 2
ctx = 256
tune = []

[schedule]
poll_minutes = 60
dispatch_seconds = 0.5
heartbeat_seconds = 1
retry_base_seconds = 1
{schedule}
{more}
""")
    return path


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
    """The read side of :class:`bot.hub.client.Hub` in memory: commits of model repos (records and file contents), a
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


# --------------------------------------------------------------------------------------------------
# A corpus of hostile releases (tests/e2e/test_hostile.py): each tries one way to subvert, stall or fool the
# bot; the ones that carry code try to create a file in a canary folder, which must stay empty.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hostile:
    """One hostile release: what it tries, where the bot stops it (``decision``: skipped by the watcher before
    anything is downloaded, with ``code``; ``job``: its job fails in ``stage``; ``contained``: published, with
    what it injects made inert) and a piece of the stored reason (``reason``)."""

    name: str
    tries: str
    stopped_by: str  # decision | job | contained
    reason: str
    code: str | None = None  # the decision code (stopped_by == "decision")
    stage: str | None = None  # the stage its job fails in (stopped_by == "job")
    never_served: tuple[str, ...] = ()  # payload files of the repo that must never be downloaded


def canary_code(canary: Path, case: str) -> str:
    """Python that creates ``canary/case``: what a hostile ``.py`` or pickle runs if anything ever runs it."""
    return f"import pathlib\npathlib.Path({str(canary / case)!r}).write_text('ran')\n"


class _Exec:
    """Pickles into a call of ``exec(code)``: unpickling it runs the code (it is never unpickled)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


def shell_canary(canary: Path) -> str:
    """A shell substitution that creates ``canary/shell``: in a config string, it runs only if a shell string is built."""
    return f"$(touch {canary / 'shell'})"


def canary_pickle(canary: Path, case: str) -> bytes:
    import pickle

    return pickle.dumps({"state_dict": _Exec(canary_code(canary, case))}, protocol=2)


def safetensors_bytes(tensors: Mapping[str, tuple[str, list[int]]], *, header: Mapping[str, Any] | None = None,
                      data: bytes | None = None) -> bytes:
    """A safetensors file of zero-filled ``tensors`` (name -> (dtype, shape)); ``header`` replaces the computed
    header and ``data`` the data region (a crafted file)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    h: dict[str, Any] = {}
    off = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        h[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(dict(header) if header is not None else h).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + (data if data is not None else b"\0" * off)


def with_tensor_filled(path: Path, tensor: str, pattern: bytes) -> bytes:
    """The bytes of safetensors file ``path`` with the data of ``tensor`` overwritten by ``pattern`` repeated."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    base = 8 + n
    raw[base + start:base + end] = (pattern * ((end - start) // len(pattern) + 1))[:end - start]
    return bytes(raw)


BF16_NAN = b"\xc0\x7f"
# a few tensors of a 2-layer llama model: the shard of the small hostile repos (they never reach a converter)
SMALL_LAYER = {"model.embed_tokens.weight": ("BF16", [16, 8]), "model.layers.0.self_attn.q_proj.weight": ("BF16", [8, 8]),
               "model.layers.1.self_attn.q_proj.weight": ("BF16", [8, 8]), "model.norm.weight": ("BF16", [8])}
LOOP_TEMPLATE = ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
                 "{% for m in messages %}{{ m['content'] }}{% endfor %}")
FENCE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "```\n</code></pre>\n\n[Claim your prize](http://attacker.invalid/x) <img src=x onerror=alert(1)>\n"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FENCE_LINK = "attacker.invalid"
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
HOSTILE_LICENSE_LINK = "javascript:alert(document.cookie)"
HOSTILE_LICENSE_NAME = {"name": "<img src=x onerror=alert(1)>"}  # not text nor a list of text: dropped


def escape_template(canary: Path) -> str:
    """A template that tries to leave Jinja's sandbox and run a shell command creating the canary."""
    cmd = f"touch {canary / 'template'}"
    return ("{{ cycler.__init__.__globals__.os.popen(" + repr(cmd) + ").read() }}"
            "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}")


SCRIPT_TEXT = " Paris is a fine old city with quiet parks and narrow streets"


def scripted_model(tiny: Path, dest: Path, text: str = SCRIPT_TEXT, chat_template: str | None = None) -> Path:
    """A checkpoint in ``dest`` that writes ``text`` and then its end token, whatever the prompt: ``tiny``'s
    architecture and tokenizer (a 2-layer llama), with attention and MLP outputs zeroed so that each position sees only
    its own token, and an untied output layer that maps every token outside the text to the text's first word, each
    word to the next, the last to the end token (margins of about 16 logits after the final norm, over a little seeded
    noise: every quant type keeps them). A random model's greedy output is degenerate and its chat reply never ends, so the gate refuses it; this
    one passes it as a real model, in seconds. ``chat_template``: written as ``chat_template.jinja`` (else none)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    cfg = json.loads((tiny / "config.json").read_text())
    d, eos = cfg["hidden_size"], cfg["eos_token_id"]
    if len(set(ids)) != len(ids) or len(ids) >= d or eos in ids:
        raise ValueError(f"the text must be fewer than {d} distinct tokens without the end token: {ids}")
    w = load_file(str(tiny / "model.safetensors"))
    noise = torch.Generator().manual_seed(0)  # a little noise: quantization then changes each token's logits a bit
    emb = torch.randn(cfg["vocab_size"], d, generator=noise) * 0.02
    emb[:, 0] = 1.0  # every token: direction 0 ...
    head = torch.randn(cfg["vocab_size"], d, generator=noise) * 0.02
    head[ids[0], 0] = 1.0  # ... which predicts the first word
    for i, tok in enumerate(ids, start=1):
        emb[tok, 0], emb[tok, i] = 0.0, 1.0  # word i: direction i
        head[ids[i] if i < len(ids) else eos, i] = 1.0  # which predicts the next word, or the end
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(w[name])
        elif name.endswith("norm.weight"):
            w[name] = torch.ones_like(w[name])
    w["model.embed_tokens.weight"] = emb.to(torch.bfloat16)
    w["lm_head.weight"] = head.to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(w, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dest / name).write_bytes((tiny / name).read_bytes())
    if chat_template is not None:
        (dest / "chat_template.jinja").write_text(chat_template)
    return dest


def populate_hostile(hub: HubServer, author: str, tiny: Path, canary: Path, scratch: Path, *, namespace: str,
                     params: int = 13_500_000) -> dict[str, Hostile]:
    """Add the hostile corpus under ``author``. ``tiny``: a small random checkpoint folder (the base of every repo;
    the ones that must pass the gate are :func:`scripted_model` s of it, built in ``scratch``); ``canary``: the
    folder hostile code would write to; ``namespace``: the bot's, where the name collision's ``-GGUF`` repo already
    exists from another source. The repos are added newest first. Returns repo id -> :class:`Hostile`."""
    base = {k: v for k, v in checkpoint_files(tiny).items() if k != "chat_template.jinja"}
    cfg = json.loads((tiny / "config.json").read_text())
    tok_cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    small = {**base, "model.safetensors": safetensors_bytes(SMALL_LAYER)}
    card = {"license": "apache-2.0", "pipeline_tag": "text-generation", "library_name": "transformers"}
    now = dt.datetime.now(dt.timezone.utc)
    out: dict[str, Hostile] = {}

    def add(h: Hostile, files: Mapping[str, Any], config: Mapping[str, Any] | None = None, **kw: Any) -> None:
        hub.add_model(f"{author}/{h.name}", dict(files), card_data=kw.pop("card_data", card), config=dict(config or cfg),
                      safetensors_params=kw.pop("safetensors_params", params), pipeline_tag="text-generation",
                      library_name="transformers", last_modified=now - dt.timedelta(seconds=len(out)), **kw)
        out[f"{author}/{h.name}"] = h

    fence = scripted_model(tiny, scratch / "fence", chat_template=FENCE_TEMPLATE)
    add(Hostile("Fence-Template", "a chat template that emits a code fence, a link and HTML", "contained",
                "published with the example in a fence it cannot close"), checkpoint_files(fence),
        json.loads((fence / "config.json").read_text()))

    remote_cfg = {**cfg, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                      "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    add(Hostile("Remote-Code", "auto_map in config.json and custom .py files", "decision", "auto_map",
                code="remote_code", never_served=("modeling_evil.py", "configuration_evil.py")),
        {**small, "config.json": json.dumps(remote_cfg), "modeling_evil.py": canary_code(canary, "modeling"),
         "configuration_evil.py": canary_code(canary, "configuration")}, remote_cfg)
    # the Hub's listing shows a clean config; only the downloaded tokenizer_config.json names remote code
    add(Hostile("Remote-Tokenizer", "auto_map only in tokenizer_config.json", "job", "auto_map", stage="inspect",
                never_served=("tokenization_evil.py",)),
        {**small, "tokenizer_config.json": json.dumps({**tok_cfg, "auto_map": {
            "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}),
         "tokenization_evil.py": canary_code(canary, "tokenization")})
    add(Hostile("Pickle-Only", "pickle weights that run code when unpickled", "decision", "pickle", code="pickle_only",
                never_served=("pytorch_model.bin",)),
        {k: v for k, v in base.items() if not k.endswith(".safetensors")}
        | {"pytorch_model.bin": canary_pickle(canary, "pickle")})
    add(Hostile("WeightMap-Escape", "a shard index naming files outside the checkpoint", "job", "unsafe files",
                stage="inspect"),
        {**{k: v for k, v in small.items() if k != "model.safetensors"},
         "model-00001-of-00001.safetensors": safetensors_bytes(SMALL_LAYER),
         "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": {
             "model.embed_tokens.weight": "model-00001-of-00001.safetensors",
             "model.layers.0.self_attn.q_proj.weight": f"../../../../../..{canary}/stolen.safetensors",
             "model.norm.weight": "/etc/passwd"}})})
    crafted = {"model.embed_tokens.weight": {"dtype": ["BF16"], "shape": "16x8", "data_offsets": [-8, 1 << 40]}}
    add(Hostile("Crafted-Header", "a safetensors header with bad shapes, dtypes and offsets", "job",
                "corrupt safetensors", stage="inspect"),
        {**small, "model.safetensors": safetensors_bytes({}, header=crafted, data=b"\0" * 64)})
    add(Hostile("Declared-Huge", "a declared size over the limit", "decision", "over the size limit", code="too_large"),
        small, safetensors_params=400_000_000_000)
    absurd = {**cfg, "num_hidden_layers": 10**9, "_name_or_path": shell_canary(canary)}
    add(Hostile("Absurd-Config", "num_hidden_layers: 10**9 (and a shell substitution in a string)", "job",
                "num_hidden_layers", stage="inspect"),
        {**base, "config.json": json.dumps(absurd)}, absurd)
    add(Hostile("Loop-Template", "a chat template that loops for ever", "job", "chat template", stage="inspect"),
        {**small, "chat_template.jinja": LOOP_TEMPLATE})
    add(Hostile("Sandbox-Template", "a chat template that tries to leave the sandbox", "job", "chat template",
                stage="inspect"),
        {**small, "chat_template.jinja": escape_template(canary)})
    add(Hostile("Gated-NoAccess", "a gated repo the token cannot read", "decision", "no access", code="gated"),
        small, gated="manual")
    add(Hostile("Corrupt-Tensors", "NaN tensor data under a valid header", "job", "non-finite", stage="calibrate"),
        {**base, "model.safetensors": with_tensor_filled(tiny / "model.safetensors",
                                                          "model.layers.0.self_attn.q_proj.weight", BF16_NAN)})
    add(Hostile("Dotdot-Names", "file names with '..'", "decision", "escape", code="unsafe_filename",
                never_served=("../../escape.sh", "nested/../../model.safetensors")),
        {**small, "../../escape.sh": f"#!/bin/sh\ntouch {canary / 'dotdot'}\n",
         "nested/../../model.safetensors": safetensors_bytes(SMALL_LAYER)})
    # templates a converter or runtime may pick besides chat_template.jinja: every one is rendered in the sandbox
    add(Hostile("Two-Templates", "a harmless chat_template.jinja and a looping tokenizer_config.json chat_template",
                "job", "chat template", stage="inspect"),
        {**small, "chat_template.jinja": PLAIN_TEMPLATE,
         "tokenizer_config.json": json.dumps({**tok_cfg, "chat_template": LOOP_TEMPLATE})})
    add(Hostile("Named-Templates", "a list of named templates whose 'tool_use' one loops", "job", "chat template",
                stage="inspect"),
        {**small, "tokenizer_config.json": json.dumps({**tok_cfg, "chat_template": [
            {"name": "default", "template": PLAIN_TEMPLATE}, {"name": "tool_use", "template": LOOP_TEMPLATE}]})})
    add(Hostile("Json-Template", "a looping chat_template.json", "job", "chat template", stage="inspect"),
        {**small, "chat_template.json": json.dumps({"chat_template": LOOP_TEMPLATE})})
    add(Hostile("Extra-Template", "additional_chat_templates/*.jinja that tries to leave the sandbox", "job",
                "chat template", stage="inspect"),
        {**small, "chat_template.jinja": PLAIN_TEMPLATE,
         "additional_chat_templates/tool_use.jinja": escape_template(canary)})
    # safetensors headers the official loader refuses
    f4_lie = {"model.embed_tokens.weight": {"dtype": "F4", "shape": [10**15], "data_offsets": [0, 8]}}
    add(Hostile("F4-Size-Lie", "an F4 tensor of 10**15 elements in 8 bytes", "job", "corrupt safetensors",
                stage="inspect"),
        {**small, "model.safetensors": safetensors_bytes({}, header=f4_lie, data=b"\0" * 8)})
    gap = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [16, 8], "data_offsets": [0, 256]},
           "model.norm.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [512, 528]}}
    add(Hostile("Offset-Gap", "tensor data with a gap between two tensors", "job", "corrupt safetensors",
                stage="inspect"),
        {**small, "model.safetensors": safetensors_bytes({}, header=gap, data=b"\0" * 528)})
    meta = {"__metadata__": {"format": {"nested": ["pt"]}},
            "model.norm.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}
    add(Hostile("Metadata-Object", "a safetensors __metadata__ that is not a string map", "job",
                "corrupt safetensors", stage="inspect"),
        {**small, "model.safetensors": safetensors_bytes({}, header=meta, data=b"\0" * 16)})
    # config sizes: nested, zero and absurd
    nested = {**cfg, "thinker_config": {"text_config": {"vocab_size": 10**12}}}
    add(Hostile("Nested-Config", "thinker_config.text_config.vocab_size = 10**12", "job", "vocab_size",
                stage="inspect"), {**base, "config.json": json.dumps(nested)}, nested)
    no_heads = {**cfg, "num_attention_heads": 0}
    add(Hostile("Zero-Heads", "num_attention_heads = 0", "job", "num_attention_heads", stage="inspect"),
        {**base, "config.json": json.dumps(no_heads)}, no_heads)
    far = {**cfg, "max_position_embeddings": 10**15}
    add(Hostile("Far-Positions", "max_position_embeddings = 10**15", "job", "max_position_embeddings",
                stage="inspect"), {**base, "config.json": json.dumps(far)}, far)
    # card metadata copied from the source: only strings (or lists of strings), license_link only http(s)
    meta_model = scripted_model(tiny, scratch / "card-metadata")
    add(Hostile("Card-Metadata", "license_link javascript:, a language object, HTML in license_name", "contained",
                "published with the source's card metadata reduced to plain strings"),
        checkpoint_files(meta_model), json.loads((meta_model / "config.json").read_text()),
        card_data={**card, "license_name": HOSTILE_LICENSE_NAME,
                   "license_link": HOSTILE_LICENSE_LINK, "language": [{"code": "en"}, "fr"]})
    # the name collision: <namespace>/TinyChat-GGUF was published by the bot from another author's TinyChat
    hub.add_model(f"{namespace}/TinyChat-GGUF", {"TinyChat-Q8_0.gguf": b"GGUF\x03\x00\x00\x00 from other-lab"},
                  card_data={"base_model": "other-lab/TinyChat", "tags": ["gguf", "ggufbot"],
                             "base_model_relation": "quantized"})
    add(Hostile("TinyChat", "a name whose -GGUF repo another source already published", "job", "another model's repo",
                stage="publish"), checkpoint_files(collide := scripted_model(tiny, scratch / "collision")),
        json.loads((collide / "config.json").read_text()))
    return out
