"""The one module that loads transformers models and tokenizers from a local checkpoint.

Always local files only, safetensors only and never remote code (``trust_remote_code=False``): a checkpoint
is untrusted input. Loading failures become the project's errors (:class:`~converters.core.errors.UnsupportedModel`
for a model, :class:`~converters.core.errors.InputError` for a tokenizer), with the loader's own exception as
``__cause__``.

:func:`load_tokenizer` loads in a limited, offline child process (:mod:`converters.formats.hfchild`, entry
:func:`tokenizer_here`) and returns a :class:`SourceTokenizer` holding its answers (a batch of queries: encode texts,
pieces of ids, the vocabulary, a chat template rendered by transformers, and the tokenizer's facts), which the checks
use like a transformers tokenizer; a checkpoint's tokenizer is kept (by the identity of its files) so that the checks
of one job start one child, not one per check or per text. :func:`load_tokenizer_here` and :func:`load_causal_lm`
load in the calling process: the children of :mod:`converters.formats.hfchild` call them, and the variant stages
(prune, distill), which train or measure the model in torch, still do.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core.errors import InputError, UnsupportedModel
from converters.formats import hfchild
from converters.formats.hfchild import ChildFailed, ChildLimits

log = logging.getLogger(__name__)

CPU = "cpu"
CUDA = "cuda"
# transformers is not thread-safe where the bot runs jobs in threads (limits.concurrency > 1): two first imports at
# once give "ImportError: cannot import name 'AutoTokenizer'", and two ``from_pretrained`` at once swap the global
# patches of its loader so that every later model of the process keeps tensors on the meta device ("Cannot copy out
# of meta tensor"). Imports and loads take this lock; running a loaded model does not.
_LOCK = threading.RLock()


def auto_class(name: str) -> Any:
    """``transformers.<name>`` (``AutoModelForCausalLM``, ``AutoTokenizer``), imported one thread at a time."""
    with _LOCK:
        import transformers

        return getattr(transformers, name)


def default_device() -> str:
    """``cuda`` when a GPU is visible to torch, else ``cpu``."""
    import torch

    return CUDA if torch.cuda.is_available() else CPU


def pick_dtype(device: str, *, parameters: int | None = None, f32_max_params: int | None = None) -> Any:
    """bfloat16 on a GPU or above ``f32_max_params`` parameters (to fit in memory), float32 otherwise (exact)."""
    import torch

    big = parameters is not None and f32_max_params is not None and parameters > f32_max_params
    return torch.bfloat16 if big or device.startswith(CUDA) else torch.float32


def dtype_name(dtype: Any) -> str:
    """``float32``, ``bfloat16``... (torch's name without the module)."""
    return str(dtype).replace("torch.", "")


def load_causal_lm(checkpoint: Path, dtype: Any = None, device: str = CPU, *,
                   offload: Offload | None = None) -> Any:
    """A causal LM from a local checkpoint (float32 unless ``dtype`` is given), moved to ``device``; with
    ``offload``, on the CPU within its memory budget, the rest of the weights on disk (accelerate)."""
    import torch

    auto_model = auto_class("AutoModelForCausalLM")
    placement: dict[str, Any] = offload.kwargs() if offload is not None else {}
    try:
        with _LOCK:
            model = auto_model.from_pretrained(
                str(checkpoint), dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True,
                local_files_only=True, **placement)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the model cannot be loaded here
        raise UnsupportedModel(f"transformers cannot load {checkpoint}: {e}") from e
    return model if offload is not None else model.to(device)


@dataclasses.dataclass(frozen=True)
class Offload:
    """Load a model that does not fit in memory: ``max_memory`` bytes of it on the CPU, the rest of its weights
    in ``folder`` on disk, read layer by layer during the forward pass (accelerate's ``device_map="auto"``)."""

    max_memory: int
    folder: Path

    def kwargs(self) -> dict[str, Any]:
        return {"device_map": "auto", "max_memory": {CPU: int(self.max_memory)}, "offload_folder": str(self.folder)}


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``; free pages where that is unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_bytes(parameters: int | None, dtype: Any) -> int | None:
    """Bytes the weights take in memory in ``dtype`` (None when the parameter count is unknown)."""
    import torch

    return None if parameters is None else parameters * torch.empty((), dtype=dtype).element_size()


def needs_offload(parameters: int | None, dtype: Any, budget: int) -> bool:
    """True when the weights (plus a quarter for activations and loading) do not fit in ``budget`` bytes."""
    need = model_bytes(parameters, dtype)
    return need is not None and need * 5 // 4 > budget


def load_tokenizer_here(checkpoint: Path) -> Any:
    """The transformers tokenizer of a local checkpoint, loaded in this process (a child's work)."""
    try:
        with _LOCK:
            return auto_class("AutoTokenizer").from_pretrained(str(checkpoint), trust_remote_code=False,
                                                               local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a missing input
        if _out_of_memory(e):  # the child's memory limit, met wherever the loader was (an import, a file, a table)
            raise InputError(f"cannot load the source tokenizer from {checkpoint}: the tokenizer did not load within "
                             f"its limits (out of memory: {e})") from e
        raise InputError(f"cannot load the source tokenizer from {checkpoint}: {e}") from e


def _out_of_memory(e: BaseException | None) -> bool:
    """``e`` or an exception it came from is a MemoryError or an allocation refused by the system (ENOMEM)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
            return True
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------------------------------
# The tokenizer service
# --------------------------------------------------------------------------------------------------

# What one tokenizer child may use. Loading converts a sentencepiece-only tokenizer to a fast one (tens of seconds
# for a large vocabulary on a slow CPU); it writes no file (limit 0: a write kills it).
TOKENIZER_LIMITS = ChildLimits(cpu_seconds=600, data_bytes=6 << 30, file_bytes=0)
TOKENIZER_SECONDS = 900.0


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
        answer = hfchild.call(request, entry=tokenizer_here, limits=TOKENIZER_LIMITS,
                              timeout=TOKENIZER_SECONDS)
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


def load_tokenizer(checkpoint: str | Path, texts: Iterable[str] = ()) -> SourceTokenizer:
    """The tokenizer of a local checkpoint, loaded in a limited child, with ``texts`` encoded (with and without
    special tokens) and a sample of its special tokens written into text (:func:`special_sample`)
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
# The tokenizer child's work
# --------------------------------------------------------------------------------------------------


def tokenizer_here(request: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer child's work (the entry :func:`load_tokenizer` gives :func:`converters.formats.hfchild.call`):
    load the checkpoint's tokenizer, answer the queries, and give its facts."""
    tok = load_tokenizer_here(Path(request["checkpoint"]))
    queries = list(request.get("queries") or [])
    if request.get("special_sample"):
        sample = special_sample(tok)
        if sample is not None:
            queries.append(_encode_query(sample, False))
    answers = [_answer(tok, q) for q in queries]
    special_map = {k: (v if isinstance(v, (str, list)) else str(v)) for k, v in tok.special_tokens_map.items()}
    facts = {"class": type(tok).__name__, "length": len(tok), "chat_template": getattr(tok, "chat_template", None),
             "bos_token": tok.bos_token, "eos_token": tok.eos_token, "bos_token_id": tok.bos_token_id,
             "eos_token_id": tok.eos_token_id, "special_tokens_map": special_map,
             "all_special_tokens": list(getattr(tok, "all_special_tokens", None) or []),
             "offline": hfchild.offline()}
    return {"facts": facts, "queries": queries, "answers": answers}


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


def special_sample(tok: Any) -> str | None:
    """A sample with the source's special tokens written into plain text."""
    specials = [t for t in (getattr(tok, "all_special_tokens", None) or []) if t]
    specials = list(dict.fromkeys(specials))[:6]
    if not specials:
        return None
    return "Start " + " and ".join(f"{s}text{i}" for i, s in enumerate(specials)) + " end" + specials[0] + "\n"


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (no-op for None)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
