"""Checks that a GGUF behaves like its source checkpoint: tokenizer, chat template, special tokens, generation.

Every check returns a :class:`~converters.core.report.Check` (passed / failed / skipped, a readable detail and
its data); none raises for a failing model, only for a broken environment (no toolchain, unreadable
source). llama.cpp programs run through :func:`converters.core.proc.run`; the source side uses the HF
tokenizer (``transformers``) and, for templates, Jinja2's immutable sandbox (templates are untrusted).

Which checks run where (see ``converters.ladder.evaluate.run``):
- on the reference (BF16) GGUF: tokenizer parity, chat template, special tokens, end of a chat reply;
- on every quant: its metadata (tokenizer, template, hyperparameters) equals the reference's, and a
  short generation is not degenerate.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.formats import chat
from converters.formats import gguf_meta
from converters.formats import hfmodel
from converters.core import proc
from converters.llama import toolchain as tc_mod
from converters.core.errors import InputError, ParseError, TemplateError, ToolError, UnsupportedModel
from converters.core.report import Check

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# GGUF metadata (header only; no tensor data is touched)
# --------------------------------------------------------------------------------------------------

_TOK = gguf_meta.K.Tokenizer


@dataclasses.dataclass(frozen=True)
class GgufFacts:
    """What the checks need from a GGUF's metadata."""

    path: Path
    arch: str
    tokenizer_model: str | None
    pre: str | None
    tokens: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    chat_template: str | None
    digests: Mapping[str, str]  # key -> sha256 of the value, for the keys compared across files
    # every tokenizer.chat_template* key (the default and the named ones llama.cpp may render)
    chat_templates: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "GgufFacts":
        md = gguf_meta.read(path)
        digests = {k: hashlib.sha256(json.dumps(v, default=str, ensure_ascii=False).encode("utf-8", "surrogateescape"))
                   .hexdigest() for k, v in md.tokenizer_and_model_keys().items()}
        add_bos = md.get(_TOK.ADD_BOS)
        model = md.get(_TOK.MODEL)
        return cls(path=path, arch=md.arch, tokenizer_model=model, pre=md.get(_TOK.PRE),
                   tokens=tuple(md.get(_TOK.LIST) or ()), bos_id=md.opt_int(_TOK.BOS_ID),
                   eos_id=md.opt_int(_TOK.EOS_ID), eot_id=md.opt_int(_TOK.EOT_ID), eom_id=md.opt_int(_TOK.EOM_ID),
                   # llama.cpp's default when the key is absent: add BOS for SPM vocabularies
                   add_bos=bool(add_bos) if add_bos is not None else model == "llama",
                   chat_template=md.get(_TOK.CHAT_TEMPLATE), digests=digests, chat_templates=md.chat_templates())

    def token_text(self, i: int | None) -> str:
        if i is None or not 0 <= i < len(self.tokens):
            return "?"
        return self.tokens[i]


def metadata_check(quant: GgufFacts, reference: GgufFacts) -> Check:
    """The quant carries the reference's tokenizer, chat template and hyperparameters unchanged."""
    missing = sorted(set(reference.digests) - set(quant.digests))
    added = sorted(set(quant.digests) - set(reference.digests))
    changed = sorted(k for k in set(reference.digests) & set(quant.digests) if reference.digests[k] != quant.digests[k])
    if not (missing or added or changed):
        return Check.ok(f"tokenizer, template and {len(reference.digests)} metadata keys match the reference")
    parts = []
    if changed:
        parts.append("changed: " + ", ".join(changed[:6]))
    if missing:
        parts.append("missing: " + ", ".join(missing[:6]))
    if added:
        parts.append("added: " + ", ".join(added[:6]))
    return Check.fail("metadata differs from the reference GGUF (" + "; ".join(parts) + ")",
                      changed=changed, missing=missing, added=added)


# --------------------------------------------------------------------------------------------------
# Tokenizer parity
# --------------------------------------------------------------------------------------------------

# (name, text). Special tokens of the source tokenizer are added at run time ("special").
TOKENIZER_SAMPLES: tuple[tuple[str, str], ...] = (
    ("prose", "The quick brown fox jumps over the lazy dog. It wasn't me, she said; we'll see what they've done!"),
    ("leading space", " Hello world"),
    ("case", "HELLO World hello WORLD iPhone McDonald's USA-based"),
    ("accents", "Ça va très bien, merci. Grüße aus Köln! El niño comió jalapeños. Ångström, façade, naïve."),
    ("cyrillic", "Съешь же ещё этих мягких французских булок, да выпей чаю."),
    ("greek", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία."),
    ("arabic", "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر"),
    ("hebrew", "דג סקרן שט בים מאוכזב ולפתע מצא חברה"),
    ("devanagari", "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम"),
    ("chinese", "我能吞下玻璃而不伤身体。北京是中华人民共和国的首都。"),
    ("japanese", "いろはにほへと ちりぬるを 東京都は日本の首都です。カタカナ"),
    ("korean", "다람쥐 헌 쳇바퀴에 타고파. 안녕하세요!"),
    ("thai", "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า"),
    ("emoji", "I ❤️ 🦙 and 🤗! 👩‍👩‍👧‍👦 🇫🇷 👍🏽 ✅ 🚀🚀🚀"),
    ("code", "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n\treturn x ** 2  # comment\n\n"
             "if __name__ == '__main__':\n    print(f(3), {'a': [1, 2]}, \"\\n\")\n"),
    ("spaces", "a  b   c    d     e\t\tf \t g" + " " * 17 + "h"),
    ("newlines", "line one\n\nline two\n\n\n\nline three\r\n\r\nend \n \n  \n"),
    ("digits", "3.14159 2718281828 1234567890 12,345.67 1e-9 0x1F 007 99% 2024-11-22 +49 (0)30 1/3"),
    ("symbols", "<html><body class=\"x\">&amp; a->b => c != d <= e; $HOME ~/.cache @user #tag`x`</body></html>"),
)

MIN_TOKEN_GB = 1.0  # a token costs at least what it costs on a 1 GB model: below, the program's own overhead rules


@dataclasses.dataclass(frozen=True)
class ProgramLimit:
    """How long a llama.cpp program that loads a model and works through tokens may run: ``floor`` seconds, plus
    ``load_seconds_per_gb`` per GB of the model file, plus per GB of the model (at least :data:`MIN_TOKEN_GB`)
    ``seconds_per_token_gb`` per generated token and ``prompt_seconds_per_token_gb`` per prompt token (a batch).
    ``converters.ladder.job.ToolLimits`` builds the one the running stage uses (:func:`limited`) from the settings."""

    floor: float = 120.0
    load_seconds_per_gb: float = 30.0
    seconds_per_token_gb: float = 3.0
    prompt_seconds_per_token_gb: float = 0.25

    def seconds(self, tokens: int, model_bytes: int, prompt_tokens: int = 0) -> float:
        gb = max(0, model_bytes) / 1e9
        per_token = max(gb, MIN_TOKEN_GB)
        return (self.floor + gb * self.load_seconds_per_gb
                + per_token * (max(0, tokens) * self.seconds_per_token_gb
                               + max(0, prompt_tokens) * self.prompt_seconds_per_token_gb))


_LIMIT: contextvars.ContextVar[ProgramLimit] = contextvars.ContextVar("ggufbot_generation_limit",
                                                                      default=ProgramLimit())


@contextlib.contextmanager
def limited(limit: ProgramLimit):  # type: ignore[no-untyped-def]
    """Generation and tokenization started in the block are limited by ``limit`` (threads: copy the context)."""
    token = _LIMIT.set(limit)
    try:
        yield limit
    finally:
        _LIMIT.reset(token)


def model_bytes(gguf: Path) -> int:
    """Bytes of a GGUF model, every part of a split file (``-00001-of-00003.gguf``) counted."""
    m = re.fullmatch(r"(.*)-\d{5}-of-(\d{5})\.gguf", gguf.name)
    if not m:
        return gguf.stat().st_size if gguf.exists() else 0
    parts = [gguf.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(2)}.gguf") for i in range(1, int(m.group(2)) + 1)]
    return sum(q.stat().st_size for q in parts if q.exists())


def tokenize_timeout() -> float:
    """llama-tokenize reads the vocabulary only (``vocab_only``): the floor."""
    return _LIMIT.get().floor


def llama_tokenize(tc: tc_mod.Toolchain, gguf: Path, text: str, *, add_bos: bool, workdir: Path) -> list[int]:
    """Token ids of ``text`` from llama.cpp's tokenizer (special tokens parsed, bytes passed verbatim)."""
    f = workdir / "sample.txt"
    f.write_bytes(text.encode("utf-8"))
    argv = [tc.program("llama-tokenize"), "-m", gguf, "-f", f, "--ids", "--no-escape"]
    if not add_bos:
        argv.append("--no-bos")
    require_sandboxed_templates(gguf)
    res = proc.run(argv, timeout=tokenize_timeout())
    return parse_ids(res.stdout)


def tool_error_reason(e: ToolError) -> str:
    """The most telling line of a failed llama.cpp run: its first error line, else the last line."""
    lines = [ln.strip() for ln in e.stderr_tail.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b", ln, re.I):
            return re.sub(r"^[\d.]+ [EWI] ", "", ln)[:300]
    return e.short()


def parse_ids(stdout: str) -> list[int]:
    m = re.search(r"\[([\d,\s]*)\]\s*$", stdout.strip())
    if not m:
        raise ParseError(f"llama-tokenize printed no id list: {stdout.strip()[-200:]!r}")
    body = m.group(1).strip()
    return [int(x) for x in body.split(",")] if body else []


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first difference between two id lists (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tokenizer_parity(tc: tc_mod.Toolchain, gguf: Path, source_dir: Path,
                     samples: Sequence[tuple[str, str]] = TOKENIZER_SAMPLES) -> Check:
    """The source's HF tokenizer and llama.cpp's tokenizer of the GGUF give the same ids on every sample."""
    tok = hfmodel.load_tokenizer(source_dir, texts=[text for _, text in samples])  # one limited child, every sample
    facts = GgufFacts.read(gguf)
    cases = [(name, text, False) for name, text in samples]
    sp = hfmodel.special_sample(tok)
    if sp is not None:
        cases.append(("special tokens", sp, False))
    # once with the tokenizer's own special-token handling: does each side add a BOS the same way?
    cases.append(("with BOS/EOS handling", samples[0][1] if samples else "Hello", True))
    n_ids = 0
    with tempfile.TemporaryDirectory(prefix="ggufbot-tok-") as td:
        for name, text, with_special in cases:
            hf_ids = list(tok(text, add_special_tokens=with_special)["input_ids"])
            try:
                gg_ids = llama_tokenize(tc, gguf, text, add_bos=with_special, workdir=Path(td))
            except ToolError as e:
                # llama.cpp's log thread may not flush before an early exit: name the suspects ourselves
                return Check.fail(f"llama.cpp cannot tokenize with this GGUF (tokenizer {facts.tokenizer_model!r}, "
                                  f"pre-tokenizer {facts.pre!r}): {tool_error_reason(e)}", sample=name, pre=facts.pre)
            n_ids += len(hf_ids)
            i = first_mismatch(hf_ids, gg_ids)
            if i is not None:
                def show(ids: Sequence[int], pieces) -> str:
                    return ", ".join(f"{t} {p!r}" for t, p in zip(ids[i:i + 3], pieces(ids[i:i + 3]))) or "(end)"

                detail = (f"sample {name!r}: first difference at token {i}: source "
                          f"[{show(hf_ids, tok.convert_ids_to_tokens)}] vs GGUF "
                          f"[{show(gg_ids, lambda ids: [facts.token_text(t) for t in ids])}]")
                if name == "with BOS/EOS handling":
                    detail += " (the GGUF's add_bos_token/add_eos_token differ from the source tokenizer)"
                return Check.fail(detail, sample=name, index=i, source_ids=hf_ids[max(0, i - 3):i + 8],
                                  gguf_ids=gg_ids[max(0, i - 3):i + 8], pre=facts.pre)
    return Check.ok(f"identical token ids on {len(cases)} samples ({n_ids} tokens: prose, {len(samples) - 1} "
                    "scripts/code/whitespace/digit samples, special tokens)", samples=len(cases), tokens=n_ids,
                    pre=facts.pre)


# --------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------

SAMPLE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And a fruit?"}),
    ({"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And a fruit?"}),
)
REPLY_QUESTION = "What is the capital of France? Answer in one short sentence."


# What the sandbox renders every template with before anything runs: the sample conversations, a lone user turn and
# a tool call with a tool list, as llama.cpp does when it loads a model for chat (its capability probes in
# common/jinja/caps.cpp render the template with each of these shapes)
_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city.",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
SANDBOX_PROBES: tuple[tuple[tuple[dict[str, Any], ...], dict[str, Any]], ...] = (
    *((conv, {}) for conv in SAMPLE_CONVERSATIONS),
    (({"role": "user", "content": "Name a colour."},), {}),
    (({"role": "user", "content": "What is the weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}),
     {"tools": [_TOOL]}),
)

_PASSED: set[str] = set()  # sha256 of the templates that rendered every probe within the limits (this process)
_REFUSED: dict[str, str] = {}  # sha256 -> why, of those that did not (a second look costs nothing)


def _digest(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8", "surrogateescape")).hexdigest()


def _sandbox_reason(template: str, context: Mapping[str, Any]) -> str | None:
    """Render ``template`` with every probe in the sandbox: why it must not run anywhere (a limit: it loops,
    allocates or recurses without end; or it reached outside the sandbox), or None. The template's own errors
    (e.g. refusing a system message) are not a reason: they are the template check's to judge."""
    digest = _digest(template)
    if digest in _PASSED:
        return None
    if digest in _REFUSED:
        return _REFUSED[digest]
    for e in chat.render_probes(template, SANDBOX_PROBES, context=context):
        if isinstance(e, TemplateError) and e.kind in chat.LIMIT_KINDS:
            _REFUSED[digest] = f"does not render within the sandbox's limits ({e})"
            return _REFUSED[digest]
        if isinstance(e, TemplateError) and e.kind == chat.SANDBOX_VIOLATION:
            _REFUSED[digest] = f"tries to leave the sandbox ({e})"
            return _REFUSED[digest]
    _PASSED.add(digest)
    return None


def templates_refusal(candidates: Sequence[tuple[str, str]], tokenizer_config: Mapping[str, Any]) -> str | None:
    """Why a checkpoint is refused for a chat template before anything is converted, naming the template; None
    when every one renders within the sandbox's limits. ``candidates``: (where, template) pairs,
    :func:`converters.formats.chat.template_candidates` (every template a converter or a runtime may pick)."""
    special = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
    for where, template in candidates:
        why = _sandbox_reason(template, special) if template else None
        if why is not None:
            return f"its chat template ({where}) {why}" if where else f"its chat template {why}"
    return None


def template_refusal(template: str | None, tokenizer_config: Mapping[str, Any]) -> str | None:
    """:func:`templates_refusal` of one template."""
    return templates_refusal([("", template)] if template else [], tokenizer_config)


def gguf_template_refusal(templates: Mapping[str, str], tokens: Sequence[str] = (), bos_id: int | None = None,
                          eos_id: int | None = None) -> str | None:
    """Why a GGUF must not be loaded by any llama.cpp program: one of its chat templates (every
    ``tokenizer.chat_template*`` key: llama.cpp renders them when it loads a model for chat) does not render within
    the sandbox's limits or tries to leave it. None when all pass."""
    def text(i: int | None) -> str:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else ""

    context = {"bos_token": text(bos_id), "eos_token": text(eos_id)}
    for key in sorted(templates, key=lambda k: (k != gguf_meta.CHAT_TEMPLATE, k)):
        why = _sandbox_reason(templates[key], context)
        if why is not None:
            return f"the GGUF's chat template {key} {why}"
    return None


def require_sandboxed_templates(gguf: Path) -> None:
    """Raise :class:`~converters.core.errors.UnsupportedModel` unless every chat template of ``gguf`` has passed the
    sandbox (rendered now if this process has not seen it pass): called before a llama.cpp program loads a GGUF."""
    md = gguf_meta.read(gguf)
    templates = md.chat_templates()
    if all(_digest(t) in _PASSED for t in templates.values()):
        return
    why = gguf_template_refusal(templates, md.get(_TOK.LIST) or (), md.opt_int(_TOK.BOS_ID), md.opt_int(_TOK.EOS_ID))
    if why is not None:
        raise UnsupportedModel(f"{Path(gguf).name}: {why}; no llama.cpp program is started on it")


def template_digests(gguf: Path) -> dict[str, str]:
    """sha256 of each chat template of ``gguf``, by key (what a record of the sandbox check is keyed by)."""
    return {k: _digest(v) for k, v in gguf_meta.read(gguf).chat_templates().items()}


def passed_templates(digests: Mapping[str, str]) -> None:
    """Note templates a record says have passed the sandbox (a resumed job need not render them again)."""
    _PASSED.update(digests.values())


def _diff_at(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _provenance(in_gguf: str, rendered: str, source_dir: Path) -> str:
    """Where the GGUF's template and transformers' come from, when they are different files of the checkpoint."""
    where = {t: w for w, t in reversed(chat.template_candidates(source_dir))}
    a, b = where.get(in_gguf), where.get(rendered)
    return f" (the GGUF carries {a}; transformers renders {b})" if a and b and a != b else ""


def chat_template_check(gguf: GgufFacts, source_dir: Path) -> Check:
    """The GGUF carries the source's chat template and renders the same prompt (a base model passes). The templates
    compared and rendered are the ones read back from the GGUF (``gguf``): the default one against what transformers
    renders, and every named one (``tokenizer.chat_template.<name>``) in the sandbox."""
    named = {k: v for k, v in gguf.chat_templates.items() if k != gguf_meta.CHAT_TEMPLATE}
    why = gguf_template_refusal(named, gguf.tokens, gguf.bos_id, gguf.eos_id)
    if why is not None:
        return Check.fail(why, has_template=True)
    tok = hfmodel.load_tokenizer(source_dir)
    src = chat.tokenizer_template(tok)
    if not src:
        if gguf.chat_template:
            return Check.fail("the GGUF has a chat template but the source has none")
        return Check.ok("no template (base model)", has_template=False)
    if not gguf.chat_template:
        return Check.fail(f"the source has a chat template but the GGUF has none ({gguf_meta.CHAT_TEMPLATE} missing)",
                          has_template=True)
    bos, eos = tok.bos_token or "", tok.eos_token or ""
    # both templates are untrusted: each is rendered by the sandboxed, limited renderer; the source's with the
    # variables transformers' apply_chat_template gives it (the tokenizer's special tokens)
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, (str, list))}
    for conv in SAMPLE_CONVERSATIONS:
        try:
            expected = chat.render(src, conv, context=special)
        except TemplateError as e:
            if e.kind in chat.LIMIT_KINDS:
                return Check.fail(f"the source's chat template does not render: {e}", has_template=True)
            continue  # e.g. the template refuses a system message: try the next conversation
        try:
            got = chat.render(gguf.chat_template, conv, bos=bos, eos=eos)
        except TemplateError as e:
            return Check.fail(f"the GGUF's chat template does not render: {e}", has_template=True)
        if got != expected:
            i = _diff_at(got, expected)
            return Check.fail(f"the GGUF's chat template renders a different prompt: first difference at character "
                              f"{i}: GGUF {got[max(0, i - 15):i + 25]!r} vs source {expected[max(0, i - 15):i + 25]!r}"
                              + _provenance(gguf.chat_template, src, source_dir), has_template=True, index=i)
        return Check.ok(f"template present and renders the same prompt as the source ({len(conv)} messages, "
                        f"{len(got)} characters)", has_template=True, same_text=gguf.chat_template == src)
    return Check.fail("the source's own chat template does not render the sample conversations", has_template=True)


# --------------------------------------------------------------------------------------------------
# Special tokens
# --------------------------------------------------------------------------------------------------

# Token texts llama.cpp treats as end of generation on its own (src/llama-vocab.cpp).
LLAMA_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})


def _ids(v: Any) -> list[int]:
    if isinstance(v, bool) or v is None:
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    return d if isinstance(d, dict) else {}


def special_tokens_check(gguf: GgufFacts, source_dir: Path, tok=None) -> Check:
    """BOS/EOS/EOT ids in the GGUF agree with the source's config, generation config and tokenizer."""
    cfg = _read_json(source_dir / "config.json")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM's ids inside
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k.endswith("_token_id")}}
    gen = _read_json(source_dir / "generation_config.json")
    tok = tok if tok is not None else hfmodel.load_tokenizer(source_dir)
    problems: list[str] = []
    n_vocab = len(gguf.tokens)
    for name, i in (("BOS", gguf.bos_id), ("EOS", gguf.eos_id), ("EOT", gguf.eot_id), ("EOM", gguf.eom_id)):
        if i is not None and n_vocab and not 0 <= i < n_vocab:
            problems.append(f"{name} id {i} is outside the vocabulary ({n_vocab} tokens)")

    bos_src = set(_ids(cfg.get("bos_token_id")) + _ids(gen.get("bos_token_id")))
    if getattr(tok, "bos_token_id", None) is not None:
        bos_src.add(int(tok.bos_token_id))
    if gguf.add_bos and gguf.bos_id is None:
        problems.append("the GGUF adds a BOS token but has no BOS id")
    if gguf.bos_id is not None and bos_src and gguf.bos_id not in bos_src:
        problems.append(f"BOS id {gguf.bos_id} ({gguf.token_text(gguf.bos_id)!r}) is not the source's "
                        f"({', '.join(str(i) for i in sorted(bos_src))})")

    eos_src = set(_ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id")))
    if getattr(tok, "eos_token_id", None) is not None:
        eos_src.add(int(tok.eos_token_id))
    if eos_src and gguf.eos_id is None and gguf.eot_id is None:
        problems.append("the GGUF has no EOS id although the source has "
                        + ", ".join(str(i) for i in sorted(eos_src)))
    elif gguf.eos_id is not None and eos_src and gguf.eos_id not in eos_src and gguf.eot_id not in eos_src:
        problems.append(f"EOS id {gguf.eos_id} ({gguf.token_text(gguf.eos_id)!r}) is none of the source's end ids "
                        f"({', '.join(str(i) for i in sorted(eos_src))})")

    # every end id the source generates with must stop llama.cpp too, or replies never end
    gguf_eog = {i for i in (gguf.eos_id, gguf.eot_id, gguf.eom_id) if i is not None}
    for i in sorted(set(_ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id")))):
        if i in gguf_eog or gguf.token_text(i) in LLAMA_EOG_TEXTS:
            continue
        problems.append(f"the source ends generation with {i} ({gguf.token_text(i)!r}) but llama.cpp will not stop "
                        "on it (not the GGUF's EOS/EOT/EOM)")
    data = {"gguf": {"bos": gguf.bos_id, "eos": gguf.eos_id, "eot": gguf.eot_id, "eom": gguf.eom_id,
                     "add_bos": gguf.add_bos},
            "source": {"bos": sorted(bos_src), "eos": sorted(eos_src)}}
    if problems:
        return Check.fail("; ".join(problems), **data)
    return Check.ok(f"BOS {gguf.bos_id} ({gguf.token_text(gguf.bos_id)!r}), EOS {gguf.eos_id} "
                    f"({gguf.token_text(gguf.eos_id)!r})" + (f", EOT {gguf.eot_id}" if gguf.eot_id is not None else "")
                    + " agree with the source", **data)


# --------------------------------------------------------------------------------------------------
# Generation: end of a chat reply, and not degenerate
# --------------------------------------------------------------------------------------------------

END_MARK = "[end of text]"
PLAIN_PROMPT = "The history of the printing press begins in"


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    ended: bool  # stopped on an end-of-generation token
    tokens: int | None  # tokens generated, as llama.cpp counts them
    seconds: float


def prompt_for(gguf: GgufFacts, tok=None) -> tuple[str, bool]:
    """The smoke-test prompt: a rendered chat turn when the GGUF has a template, else plain text."""
    if gguf.chat_template:
        bos = tok.bos_token if tok is not None and tok.bos_token else gguf.token_text(gguf.bos_id)
        eos = tok.eos_token if tok is not None and tok.eos_token else gguf.token_text(gguf.eos_id)
        for conv in ([{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": REPLY_QUESTION}],
                     [{"role": "user", "content": REPLY_QUESTION}]):
            try:
                return chat.render(gguf.chat_template, conv, bos=bos, eos=eos), True
            except TemplateError as e:  # reported by the template check
                if e.kind in chat.LIMIT_KINDS:
                    break
                continue
    return PLAIN_PROMPT, False


def generation_timeout(gguf: Path, prompt: str, n_predict: int) -> float:
    """The limit of one generation: ``n_predict`` tokens and the prompt's bytes (at most one token each), at the
    running stage's rates (:class:`ProgramLimit`) for the model's size."""
    return _LIMIT.get().seconds(n_predict, model_bytes(gguf), len(prompt.encode("utf-8", "surrogateescape")))


def generate(tc: tc_mod.Toolchain, gguf: Path, prompt: str, *, n_predict: int, threads: int | None = None,
             ctx: int = 1024, timeout: float | None = None) -> Generation:
    """Greedy generation with llama-completion; the text printed after the prompt. llama-completion renders the
    GGUF's chat template when it loads the model, so it is never started on a GGUF whose templates have not passed
    the sandbox (:func:`require_sandboxed_templates` raises ``UnsupportedModel``). ``timeout``: default
    :func:`generation_timeout`."""
    argv: list[Any] = [tc.program("llama-completion"), "-m", gguf, "-p", prompt, "-n", str(n_predict),
                       "--temp", "0", "--seed", "1", "-c", str(ctx), "-no-cnv", "--no-display-prompt",
                       "--no-escape", "--no-warmup"]
    if threads:
        argv += ["-t", str(threads)]
    require_sandboxed_templates(gguf)
    res = proc.run(argv, timeout=timeout if timeout is not None else generation_timeout(gguf, prompt, n_predict))
    text = res.stdout.rstrip()
    ended = text.endswith(END_MARK)
    if ended:
        text = text[: -len(END_MARK)]
    m = re.search(r"eval time =\s*[\d.]+ ms /\s*(\d+) runs", res.stderr + res.stdout)
    return Generation(text=text.strip("\n").rstrip(" "), ended=ended, tokens=int(m.group(1)) if m else None,
                      seconds=res.seconds)


def degenerate(text: str) -> str | None:
    """Why a generated text is degenerate (empty, garbage, one token repeated, a tiny loop), or None."""
    t = text.strip()
    if not t:
        return "empty output"
    if t.count("\ufffd") > max(2, len(t) // 10):
        return "invalid UTF-8 bytes in the output"
    words = re.findall(r"\w+|[^\w\s]", t)
    if len(words) >= 6:
        word, n = collections.Counter(words).most_common(1)[0]
        if n / len(words) > 0.5:
            return f"one token repeated: {word!r} is {n} of {len(words)} tokens"
    if len(words) >= 16 and len(set(words)) <= max(4, len(words) // 8):
        return f"a loop over {len(set(words))} distinct tokens in {len(words)}"
    if len(t) >= 24 and len(set(t)) <= 3:
        return f"only {len(set(t))} distinct characters"
    return None


def generation_check(gen: Generation) -> Check:
    why = degenerate(gen.text)
    data = {"text": gen.text[:200], "tokens": gen.tokens, "ended": gen.ended}
    if why:
        return Check.fail(f"degenerate output ({why}): {gen.text[:60]!r}", **data)
    n = gen.tokens if gen.tokens is not None else "?"
    return Check.ok(f"{n} tokens, not degenerate: {gen.text[:60]!r}", **data)


def end_of_reply_check(gen: Generation, is_chat: bool, n_predict: int) -> Check:
    if not is_chat:
        return Check.skip("base model (no chat template): no chat reply to end")
    data = {"text": gen.text[:200], "tokens": gen.tokens, "n_predict": n_predict}
    if gen.ended:
        return Check.ok(f"the chat reply ended with an end token after {gen.tokens} tokens: {gen.text[:60]!r}", **data)
    return Check.fail(f"the chat reply did not end within {n_predict} tokens: {gen.text[:60]!r}...", **data)
