"""transformers on an untrusted checkpoint, in a limited child process, never in the bot's own.

A checkpoint's tokenizer and model are untrusted input: loading them runs transformers' and the tokenizer library's
parsers on files anyone can publish (a tokenizer that allocates or loops without end, a config that makes
transformers build a gigantic model). As :mod:`converters.formats.chat` does for templates, that work runs in a child
(``python -I -m converters.formats.hfchild``, started by :func:`converters.core.proc.run`: no secrets in its environment,
its own process group, dies with the bot) with CPU-time, memory and wall-clock limits, offline
(``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: nothing it does can fetch code or files), answering one JSON
request on stdin with one JSON answer on stdout.

Two kinds of request:

- ``tokenizer``: load the tokenizer once, answer a batch of queries (encode texts, pieces of ids, the vocabulary,
  a chat template rendered by transformers) and its facts (special tokens, ids, template). :func:`tokenizer`
  returns a :class:`SourceTokenizer` holding the answers, which the checks use like a transformers tokenizer; a
  checkpoint's tokenizer is kept (by the identity of its files) so that the checks of one job start one child,
  not one per check or per text.
- ``compare``: the BF16 reference against the source model (:func:`converters.ladder.evaluate.compare_here`).

The memory limit is ``RLIMIT_DATA`` (:class:`ChildLimits`), not ``RLIMIT_AS``: torch reserves address space it
never uses (a thread's malloc arena and stack, CUDA's reservation; the address space of a process that imported
torch grows from 0.8 to 2.7 GB with 64 threads while its resident memory stays at 230 MB), and transformers maps
the safetensors files read-only, which counts against the address space but is not memory the process allocates.
``RLIMIT_DATA`` counts the private writable memory (heap, anonymous maps: tensors, numpy arrays, Python objects),
which is what a runaway load or run uses: an allocation beyond it fails (``MemoryError``, torch's "can't allocate
memory") instead of the kernel's OOM killer choosing a process of the machine.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core.errors import InputError, ToolError
from converters.core.proc import ResourceLimits, run

log = logging.getLogger(__name__)

MODULE = "converters.formats.hfchild"
# Every child that runs transformers or huggingface_hub code: no download of code or files, whatever it reads
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1"}
MAX_ANSWER_BYTES = 256 << 20  # a vocabulary of a few hundred thousand tokens is a few MB of JSON


@dataclasses.dataclass(frozen=True)
class ChildLimits(ResourceLimits):
    """:class:`~converters.core.proc.ResourceLimits` (CPU time, written-file bytes: set by the program's supervisor
    before it starts) plus ``data_bytes`` (``RLIMIT_DATA``, see the module notes), which the child sets on itself
    first thing, before it reads the request's files or imports transformers or torch."""

    data_bytes: int | None = None


# What one tokenizer child may use. Loading converts a sentencepiece-only tokenizer to a fast one (tens of seconds
# for a large vocabulary on a slow CPU); it writes no file (limit 0: a write kills it).
TOKENIZER_LIMITS = ChildLimits(cpu_seconds=600, data_bytes=6 << 30, file_bytes=0)
TOKENIZER_SECONDS = 900.0


class ChildFailed(Exception):
    """The child stopped without an answer: a limit (``kind``: time, cpu, memory) or a crash."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def call(request: Mapping[str, Any], *, limits: ChildLimits, timeout: float, cwd: Path | None = None
         ) -> dict[str, Any]:
    """One request to a new child; its JSON answer (an ``error`` key when the work itself failed). Raises
    :class:`ChildFailed` when the child hit a limit or died."""
    argv = [sys.executable, "-I", "-m", MODULE]
    request = {**request, "data_bytes": limits.data_bytes}
    try:
        res = run(argv, stdin=json.dumps(request).encode(), timeout=timeout, limits=limits, env=OFFLINE_ENV,
                  keep_output=MAX_ANSWER_BYTES, cwd=cwd)
    except ToolError as e:
        raise _failure(e, limits, timeout) from None
    try:
        answer = json.loads(res.stdout)
    except ValueError:
        raise ChildFailed("crash", f"the child's answer was not readable: {res.stdout[-200:]!r}") from None
    if not isinstance(answer, dict):
        raise ChildFailed("crash", "the child's answer was not a JSON object")
    if answer.get("error") == "memory":  # a MemoryError the child caught: its limit, like one that killed it
        raise ChildFailed("memory", f"it needed more than {(limits.data_bytes or 0) >> 20} MB")
    return answer


def _failure(e: ToolError, limits: ChildLimits, timeout: float) -> ChildFailed:
    if e.timed_out:
        return ChildFailed("time", f"it took longer than {timeout:.0f} s")
    if e.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and limits.cpu_seconds is not None:
        return ChildFailed("cpu", f"it used more than {limits.cpu_seconds} s of CPU time")
    tail = e.stderr_tail.strip().splitlines()
    if any("MemoryError" in ln or "can't allocate memory" in ln or "bad_alloc" in ln for ln in tail):
        return ChildFailed("memory", f"it needed more than {(limits.data_bytes or 0) >> 20} MB")
    return ChildFailed("crash", f"it died ({e.short()})")


# --------------------------------------------------------------------------------------------------
# The tokenizer service
# --------------------------------------------------------------------------------------------------


def _encode_key(text: str, special: bool) -> tuple[str, str, bool]:
    return ("encode", text, bool(special))


class SourceTokenizer:
    """A checkpoint's transformers tokenizer as the checks use it, answered by a limited child: the facts (special
    tokens and ids, the chat template) and the queries asked when it was loaded are here; anything else asked later
    (another text, the vocabulary, a rendered chat) is one more child for that query.

    Supports what the project calls: ``tok(text, add_special_tokens=...)["input_ids"]``, ``encode``,
    ``convert_ids_to_tokens``, ``get_vocab``, ``apply_chat_template(..., tokenize=False)``, ``bos_token``,
    ``eos_token``, ``bos_token_id``, ``eos_token_id``, ``special_tokens_map``, ``all_special_tokens``,
    ``chat_template``, ``len(tok)``."""

    def __init__(self, checkpoint: Path, facts: Mapping[str, Any], answers: Mapping[Any, Any]):
        self.checkpoint = Path(checkpoint)
        self.facts = dict(facts)
        self._answers: dict[Any, Any] = dict(answers)
        self._lock = threading.Lock()
        self.children = 1  # children started for this tokenizer (the load included)

    # facts -----------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> Any:
        return self.facts.get("chat_template")

    @property
    def bos_token(self) -> str | None:
        return self.facts.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.facts.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.facts.get("bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        return self.facts.get("eos_token_id")

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        return dict(self.facts.get("special_tokens_map") or {})

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self.facts.get("all_special_tokens") or [])

    @property
    def name_or_path(self) -> str:
        return str(self.checkpoint)

    def __len__(self) -> int:
        return int(self.facts.get("length") or 0)

    def __repr__(self) -> str:
        return f"SourceTokenizer({self.checkpoint}, {self.facts.get('class')}, {len(self)} tokens)"

    # queries ---------------------------------------------------------------------------------------
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._get([_encode_query(text, add_special_tokens)])[0]["ids"])

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        one = isinstance(ids, int)
        wanted = [int(ids)] if one else [int(i) for i in ids]
        missing = [i for i in wanted if ("piece", i) not in self._answers]
        if missing:
            self._ask([{"op": "pieces", "ids": missing}])
        pieces = [self._answers[("piece", i)] for i in wanted]
        return pieces[0] if one else pieces

    def get_vocab(self) -> dict[str, int]:
        return dict(self._get([{"op": "vocab"}])[0])

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("SourceTokenizer renders chat templates as text only (tokenize=False)")
        q = {"op": "chat", "conversation": [dict(m) for m in conversation],
             "add_generation_prompt": bool(add_generation_prompt)}
        answer = self._get([q])[0]
        if "error" in answer:
            raise InputError(f"the source's chat template does not render in transformers: {answer['error']}")
        return answer["text"]

    def prefetch(self, texts: Iterable[str]) -> None:
        """Encode ``texts`` (with and without special tokens) in one child unless all are answered already."""
        self._get([q for t in texts for q in (_encode_query(t, False), _encode_query(t, True))])

    # plumbing --------------------------------------------------------------------------------------
    def _get(self, queries: Sequence[dict[str, Any]]) -> list[Any]:
        missing = [q for q in queries if _query_key(q) not in self._answers]
        if missing:
            self._ask(missing)
        return [self._answers[_query_key(q)] for q in queries]

    def _ask(self, queries: list[dict[str, Any]]) -> None:
        log.debug("tokenizer of %s: %d more queries in a child", self.checkpoint, len(queries))
        _facts, answers = _tokenizer_child(self.checkpoint, queries, special_sample=False)
        with self._lock:
            self._answers.update(answers)
            self.children += 1


def _encode_query(text: str, special: bool) -> dict[str, Any]:
    return {"op": "encode", "text": text, "special": bool(special)}


def _query_key(q: Mapping[str, Any]) -> Any:
    op = q["op"]
    if op == "encode":
        return _encode_key(q["text"], q["special"])
    if op == "vocab":
        return ("vocab",)
    if op == "chat":
        return ("chat", json.dumps(q["conversation"], sort_keys=True), q["add_generation_prompt"])
    raise ValueError(f"no single key for query {op!r}")


def _tokenizer_child(checkpoint: Path, queries: list[dict[str, Any]], *, special_sample: bool
                     ) -> tuple[dict[str, Any], dict[Any, Any]]:
    request = {"op": "tokenizer", "checkpoint": str(Path(checkpoint).resolve()), "queries": queries,
               "special_sample": special_sample}
    try:
        answer = call(request, limits=TOKENIZER_LIMITS, timeout=TOKENIZER_SECONDS)
    except ChildFailed as e:
        raise InputError(f"cannot load the source tokenizer from {checkpoint}: the tokenizer did not load within "
                         f"its limits ({e.message})") from None
    if "error" in answer:
        raise InputError(str(answer.get("message") or answer["error"]))
    answers: dict[Any, Any] = {}
    for q, a in zip(answer.get("queries") or queries, answer["answers"]):
        if q["op"] == "pieces":
            answers.update({("piece", i): p for i, p in zip(q["ids"], a)})
            continue
        answers[_query_key(q)] = a
        if q["op"] == "encode":  # the pieces of every id seen, for a mismatch's message
            answers.update({("piece", i): p for i, p in zip(a["ids"], a["pieces"])})
    return answer["facts"], answers


_CACHE: collections.OrderedDict[Any, SourceTokenizer] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 8


def _identity(checkpoint: Path) -> tuple[Any, ...]:
    """The checkpoint folder and every file in it (name, size, mtime, inode): a changed file is another tokenizer."""
    root = Path(checkpoint).resolve()
    files = []
    for p in sorted(root.iterdir()):
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return (str(root), tuple(files))


def tokenizer(checkpoint: str | Path, texts: Iterable[str] = ()) -> SourceTokenizer:
    """The tokenizer of a local checkpoint, loaded in a limited child, with ``texts`` encoded (with and without
    special tokens) and a sample of its special tokens written into text (:func:`converters.llama.verify.special_sample`)
    encoded too. Kept by the identity of the checkpoint's files: the next call for the same files starts no child
    when its texts were answered. Raises :class:`~converters.core.errors.InputError` when it does not load."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise InputError(f"cannot load the source tokenizer from {checkpoint}: no such folder")
    texts = list(dict.fromkeys(texts))
    key = _identity(root)
    with _CACHE_LOCK:
        tok = _CACHE.get(key)
        if tok is not None:
            _CACHE.move_to_end(key)
    if tok is None:
        queries = [q for t in texts for q in (_encode_query(t, False), _encode_query(t, True))]
        facts, answers = _tokenizer_child(root, queries, special_sample=True)
        tok = SourceTokenizer(root, facts, answers)
        with _CACHE_LOCK:
            _CACHE[key] = tok
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    elif texts:
        tok.prefetch(texts)
    return tok


def forget() -> None:
    """Drop the kept tokenizers (tests measure a cold load)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------------------------------


def _tokenizer_here(request: Mapping[str, Any]) -> dict[str, Any]:
    from converters.formats import hfmodel

    tok = hfmodel.load_tokenizer_here(Path(request["checkpoint"]))
    queries = list(request.get("queries") or [])
    if request.get("special_sample"):
        from converters.llama import verify

        sample = verify.special_sample(tok)
        if sample is not None:
            queries.append(_encode_query(sample, False))
    answers = [_answer(tok, q) for q in queries]
    special_map = {k: (v if isinstance(v, (str, list)) else str(v)) for k, v in tok.special_tokens_map.items()}
    facts = {"class": type(tok).__name__, "length": len(tok), "chat_template": getattr(tok, "chat_template", None),
             "bos_token": tok.bos_token, "eos_token": tok.eos_token, "bos_token_id": tok.bos_token_id,
             "eos_token_id": tok.eos_token_id, "special_tokens_map": special_map,
             "all_special_tokens": list(getattr(tok, "all_special_tokens", None) or []),
             "offline": _offline()}
    return {"facts": facts, "queries": queries, "answers": answers}


def _offline() -> bool:
    """Whether huggingface_hub, as transformers imported it here, refuses to reach the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _answer(tok: Any, q: Mapping[str, Any]) -> Any:
    op = q["op"]
    if op == "encode":
        ids = [int(i) for i in tok(q["text"], add_special_tokens=bool(q["special"]))["input_ids"]]
        return {"ids": ids, "pieces": tok.convert_ids_to_tokens(ids)}
    if op == "pieces":
        return tok.convert_ids_to_tokens([int(i) for i in q["ids"]])
    if op == "vocab":
        return {str(k): int(v) for k, v in tok.get_vocab().items()}
    if op == "chat":
        try:
            return {"text": tok.apply_chat_template(q["conversation"], tokenize=False,
                                                    add_generation_prompt=bool(q["add_generation_prompt"]))}
        except Exception as e:  # noqa: BLE001 - the template's own failure is the answer
            return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    raise ValueError(f"unknown tokenizer query {op!r}")


def _child() -> None:
    """``python -m converters.formats.hfchild``: one request on stdin, one JSON answer on stdout. Whatever a library prints
    goes to stderr (file descriptor 1 is the answer's alone)."""
    os.environ.update(OFFLINE_ENV)  # before transformers or huggingface_hub is imported
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.buffer.read())
    if request.get("data_bytes") is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (int(request["data_bytes"]), int(request["data_bytes"])))
    try:
        if request.get("op") == "tokenizer":
            answer = _tokenizer_here(request)
        elif request.get("op") == "compare":
            from converters.ladder import evaluate

            answer = evaluate.compare_here(request)
        else:
            answer = {"error": "request", "message": f"unknown request {request.get('op')!r}"}
    except InputError as e:
        answer = {"error": "input", "message": str(e)}
    except MemoryError:
        answer = {"error": "memory", "message": "out of memory (the child's memory limit)"}
    with os.fdopen(answer_fd, "w", encoding="utf-8") as out:
        json.dump(answer, out)


if __name__ == "__main__":
    _child()
