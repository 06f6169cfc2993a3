"""Inspect and validate a local Hugging Face checkpoint before anything is converted.

Refuses what must never be loaded (pickle-only weights, models that need remote code) and what cannot
work (missing or malformed config, unsupported architecture, corrupt safetensors, no tokenizer), each
with a one-line reason. Reads only JSON and safetensors headers: nothing here executes model code.

The refusals that file names or a config alone show (:func:`weights_refusal`, :func:`remote_code_refusal`) are
pure functions on names and mappings, so that the bot's acceptance rules (``bot.model.rules``) apply the very same
rules to a Hub record before anything is downloaded.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from converters.formats import chat
from converters.core import records
from converters.core.errors import InputError, UnsupportedModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bits per element of every dtype the official safetensors loader knows (its ``Dtype::bitsize``): F4 and F6_* pack
# several elements in a byte. A name outside this table is refused, as the official loader refuses it.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_USIZE_MAX = 2**64 - 1  # the official loader's sizes and offsets are 64-bit; a product beyond it is an overflow
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("tokenizer.tiktoken",))
# Files whose change changes the GGUF result (weights, config, tokenizer, chat template): the watcher
# re-queues a new revision only when one of these changed, and stage records fingerprint exactly these.
RESULT_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.tiktoken", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
    # named templates beside chat_template.jinja: the converter writes them as tokenizer.chat_template.<name>
    "additional_chat_templates/*.jinja",
)
# What a Hub fetch downloads: the result files plus the model card, for the licence.
FETCH_PATTERNS = RESULT_PATTERNS + ("README.md",)
MAX_HEADER_BYTES = 100 << 20


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    architecture: str
    model_type: str | None
    weight_files: tuple[Path, ...]
    weight_bytes: int
    parameters: int
    dtypes: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    chat_template: str | None
    license: str | None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def vision(self) -> bool:
        """A vision-language model: its projector is converted beside the text ladder."""
        return is_vision_language(self.config)

    def estimate_gguf_bytes(self, bits_per_weight: float) -> int:
        """Approximate size of a GGUF of this model at the given bits per weight."""
        return int(self.parameters * bits_per_weight / 8) + 16 * 1024 * 1024

    def fingerprint(self, cache_dir: Path | None = None) -> dict[str, Any]:
        """Identity of the checkpoint for stage records: every relevant file's size and full sha256 (cached in
        ``cache_dir``'s records by size + mtime + inode; a fetched file's is the Hub's LFS sha256)."""
        return {"architecture": self.architecture, "files": files_fingerprint(self.path, cache_dir)}


def files_fingerprint(path: Path, cache_dir: Path | None = None) -> list[dict[str, Any]] | None:
    """Name, size and full sha256 of every file of the checkpoint folder that changes the GGUF result (None when
    the folder is gone)."""
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and is_result_file(p.name))
    extra = sorted(p for p in (path / "additional_chat_templates").glob("*.jinja") if p.is_file())
    return ([records.fingerprint_file(p, cache_dir) for p in files]
            + [{**records.fingerprint_file(p, cache_dir), "name": f"{p.parent.name}/{p.name}"} for p in extra])


def is_result_file(name: str) -> bool:
    """Whether a file (a name in a repo or a folder; matched on its base name) changes the GGUF result."""
    base = name.rsplit("/", 1)[-1]
    return any(fnmatchcase(name if "/" in pat else base, pat) for pat in RESULT_PATTERNS)


# --------------------------------------------------------------------------------------------------
# Refusals seen from file names or a config alone (a local folder or a Hub record)
# --------------------------------------------------------------------------------------------------

PICKLE_ONLY, NO_SAFETENSORS, REMOTE_CODE = "pickle_only", "no_safetensors", "remote_code"


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a model is refused: ``code`` (a decision code) and the ``names`` that show it (the pickle weight files
    for ``pickle_only``, the ``auto_map`` keys for ``remote_code``)."""

    code: str
    names: tuple[str, ...] = ()

    def reason(self, config_file: str = "config") -> str:
        """The converter's one-line reason (``convert`` of a folder or a Hub repo)."""
        if self.code == PICKLE_ONLY:
            shown = f" ({', '.join(sorted(self.names)[:3])})" if self.names else ""
            return f"only pickle weights{shown}; refused: pickle can run code"
        if self.code == REMOTE_CODE:
            return f"needs trust_remote_code ({config_file} has auto_map); refused: remote code is never run"
        return "no safetensors weights"


def weights_refusal(names: Iterable[str]) -> Refusal | None:
    """None when some file is a safetensors weight file; else pickle-only weights (never loaded: pickle can run
    code) or no weights at all."""
    names = list(names)
    if any(n.endswith(".safetensors") for n in names):
        return None
    pickles = tuple(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    return Refusal(PICKLE_ONLY, pickles) if pickles else Refusal(NO_SAFETENSORS)


def remote_code_refusal(config: object) -> Refusal | None:
    """A config whose ``auto_map`` names the model's own code (which is never run); None otherwise."""
    auto_map = config.get("auto_map") if isinstance(config, Mapping) else None
    if not auto_map:
        return None
    return Refusal(REMOTE_CODE, tuple(sorted(auto_map)) if isinstance(auto_map, Mapping) else ())


def _converter_map(converter_root: Path, map_name: str) -> set[str] | None:
    """The keys of a ``conversion/__init__.py`` registry (``TEXT_MODEL_MAP``, ``MMPROJ_MODEL_MAP``), read from the
    source (no import, no torch); None for a converter without that package."""
    init = converter_root / "conversion" / "__init__.py"
    if not init.exists():
        return None
    names: set[str] = set()
    for node in ast.walk(ast.parse(init.read_text())):
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target == map_name and isinstance(value, ast.Dict):
            names.update(k.value for k in value.keys if isinstance(k, ast.Constant))
    return names


def supported_projectors(converter_root: Path) -> frozenset[str] | None:
    """Architectures whose multimodal projector the converter exports (``convert_hf_to_gguf.py --mmproj``): its
    ``MMPROJ_MODEL_MAP``, or in an older single-file converter the classes registered on an ``MmprojModel``."""
    names = _converter_map(converter_root, "MMPROJ_MODEL_MAP")
    if names is None:
        script = converter_root / "convert_hf_to_gguf.py"
        if not script.exists():
            return None
        names = set()
        registered = r"@ModelBase\.register\(([^)]*)\)\s*(?:@[^\n]*\s*)*class \w+\((\w+)\)"
        for m in re.finditer(registered, script.read_text()):
            if m.group(2) == "MmprojModel" or m.group(2).endswith("VisionModel"):
                names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", m.group(1)))
    return frozenset(names) or None


def is_vision_language(config: Mapping[str, Any]) -> bool:
    """A model with a vision tower next to its language model (``vision_config`` in config.json)."""
    return isinstance(config.get("vision_config"), Mapping)


def vision_refusal(arch: str, config: Mapping[str, Any], projectors: frozenset[str] | None) -> str | None:
    """Why a vision-language model cannot be converted with its projector (the converter does not export this
    architecture's vision tower), or None (not a vision-language model, or nothing known to check against)."""
    if projectors is None or not is_vision_language(config) or arch in projectors:
        return None
    return (f"vision-language model {arch}: the pinned llama.cpp converter cannot convert its vision tower "
            "(no --mmproj support), so its projector could not be published")


def supported_architectures(converter_root: Path) -> frozenset[str] | None:
    """Architectures the converter registers, read from its source (no import, no torch)."""
    init = converter_root / "conversion" / "__init__.py"
    names: set[str] = set()
    if init.exists():
        names = _converter_map(converter_root, "TEXT_MODEL_MAP") or set()
    else:
        script = converter_root / "convert_hf_to_gguf.py"
        if not script.exists():
            return None
        for m in re.finditer(r"@ModelBase\.register\(([^)]*)\)", script.read_text()):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", m.group(1)))
    return frozenset(names) or None


def safe_name(name: object) -> bool:
    """True when a file name (from a repo listing or a shard index) is a plain relative POSIX path that stays inside
    the folder it is read from: no ``..``, no absolute path, no drive, backslash or NUL."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/") \
            or re.match(r"^[A-Za-z]:", name):
        return False
    return all(p not in ("", "..") for p in name.split("/"))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_span(name: str, info: object, data_len: int) -> tuple[int, int]:
    """The checked ``(start, end)`` of one header entry, by the official loader's rules (``Metadata::validate`` of
    huggingface/safetensors): elements x bits per element must end on a byte boundary and be exactly the entry's
    bytes (a sub-byte dtype is not rounded up), without overflowing 64 bits. Raises ValueError with what is wrong."""
    if not isinstance(info, dict):
        raise ValueError(f"entry for tensor {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r} for {name!r}"[:200])
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _USIZE_MAX for d in shape):
        raise ValueError(f"shape of {name!r} is not a list of sizes: {shape!r}"[:200])
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ValueError(f"data_offsets of {name!r} are not two integers")
    start, end = offsets
    if not (0 <= start <= end <= data_len):
        raise ValueError(f"tensor {name!r} lies outside the file (negative offsets or truncated)")
    n = 1
    for d in shape:  # the official loader multiplies in order and refuses an overflow, even one before a zero
        n *= d
        if n > _USIZE_MAX:
            break
    bits = n * SAFETENSORS_DTYPE_BITS[dtype]
    if bits > _USIZE_MAX:
        raise ValueError(f"shape of {name!r} overflows: {shape!r}"[:200])
    if bits % 8:
        raise ValueError(f"tensor {name!r} ({dtype} x {n}) does not end on a byte boundary")
    if end - start != bits // 8:
        raise ValueError(f"tensor {name!r} size does not match its shape")
    return start, end


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header exactly as strictly as the official loader: every entry well-typed,
    its bytes matching its dtype and shape, the tensors tiling the data region from its first byte to the file's
    end in offset order (no gap, no overlap), ``__metadata__`` absent, null or a map of strings. Anything wrong is
    one :class:`InputError` line."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"corrupt safetensors {path.name}: file too short")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise InputError(f"corrupt safetensors {path.name}: header length {n} does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; nesting bombs recurse
            raise InputError(f"corrupt safetensors {path.name}: header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise InputError(f"corrupt safetensors {path.name}: header is not an object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InputError(f"corrupt safetensors {path.name}: __metadata__ is not a map of strings")
    data_len = size - 8 - n
    try:
        spans = sorted(_tensor_span(name, info, data_len) for name, info in header.items() if name != "__metadata__")
    except ValueError as e:
        raise InputError(f"corrupt safetensors {path.name}: {e}") from None
    covered = 0  # sorted by offsets, each tensor starts where the previous one ended: no gap, no overlap
    for start, end in spans:
        if start > covered:
            raise InputError(f"corrupt safetensors {path.name}: bytes {covered}..{start} belong to no tensor")
        if start < covered:
            raise InputError(f"corrupt safetensors {path.name}: two tensors overlap (bytes {start}..{covered})")
        covered = end
    if covered != data_len:
        raise InputError(f"corrupt safetensors {path.name}: {data_len - covered} bytes unaccounted for (truncated or padded)")
    return header


# The range each size may take wherever it appears in config.json: at the top, in every sub-config
# (``text_config``, ``vision_config``, ``thinker_config.text_config``, ``talker_config``...) and in lists of per-layer
# blocks (``block_configs[3].ffn``). A whole number, or a list of them, each within its range: a value outside is
# absurd, and the converter, transformers or the card's arithmetic would loop, allocate without end or divide by zero.
# The ranges are far outside every released model (checked against the defaults of all ~830 transformers config
# classes, which are the published checkpoints' sizes) and the same for a language model and a tower:
#   layers <= 4096 (the deepest released: 128), widths <= 2**18 / 2**20 (largest: 8192 / 32768 in the defaults,
#   ~53k FFN in Llama-3.1-405B), vocabulary <= 2**24 (largest: ~291k), experts <= 2**14 (largest: 16384, Doge's
#   tiny ones), head_dim 0..2**14 (GLM-5 declares 0: derived);
#   head counts 1..2**14: 0 heads is no attention at all and divides the card's head_dim by zero (largest: 128);
#   context lengths 0..2**32-1: GGUF's context_length is a uint32, the converter cannot write more (the longest
#   released context is Llama 4 Scout's 10,485,760 tokens).
_LAYERS, _HEADS, _CONTEXT = (0, 4096), (1, 1 << 14), (0, (1 << 32) - 1)
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": _LAYERS, "n_layer": _LAYERS, "num_layers": _LAYERS,
    "hidden_size": (0, 1 << 18), "n_embd": (0, 1 << 18), "intermediate_size": (0, 1 << 20),
    "num_attention_heads": _HEADS, "num_key_value_heads": _HEADS, "n_head": _HEADS, "num_heads": _HEADS,
    "num_kv_heads": _HEADS, "n_head_kv": _HEADS, "multi_query_group_num": _HEADS,
    "head_dim": (0, 1 << 14), "vocab_size": (0, 1 << 24), "num_experts": (0, 1 << 14), "num_local_experts": (0, 1 << 14),
    "max_position_embeddings": _CONTEXT, "n_positions": _CONTEXT, "n_ctx": _CONTEXT, "seq_length": _CONTEXT,
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")


def _config_sizes(config: Mapping[str, Any]) -> Iterable[tuple[str, str, object]]:
    """``(path, key, value)`` of every size key in the config and in every mapping or list nested in it, shallowest
    first; walked with a queue, not recursion (a parsed config may nest deeper than Python's recursion limit)."""
    queue: collections.deque[tuple[str, object]] = collections.deque([("", config)])
    while queue:
        path, node = queue.popleft()
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            where = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and k in CONFIG_BOUNDS:
                yield where, k, v
            elif isinstance(v, (Mapping, list)):
                queue.append((where, v))


def config_refusal(config: Mapping[str, Any], tensor_names: Iterable[str] = ()) -> str | None:
    """Why a config is absurd (a size, wherever it appears, that is not a whole number or a list of them within its
    :data:`CONFIG_BOUNDS` range; more language-model layers than the weights hold), or None. ``tensor_names``: the
    checkpoint's tensors."""
    for where, key, v in _config_sizes(config):
        lo, hi = CONFIG_BOUNDS[key]
        if v is not None and not all(_is_int(x) and lo <= x <= hi for x in (v if isinstance(v, list) else [v])):
            shown = where if len(where) <= 120 else f"...{where[-117:]}"
            return f"config.json {shown} = {str(v)[:40]} is not a size a model can have ({lo} to {hi})"
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    declared = next((c[k] for c in (config, text) for k in LAYER_KEYS if _is_int(c.get(k))), None)
    blocks = [int(m.group(1)) for n in tensor_names if (m := _BLOCK.search(n))]
    if blocks and declared is not None and declared > max(blocks) + 1:
        return f"config.json declares {declared} layers but the weights hold {max(blocks) + 1}"
    return None


def _check_shard_index(root: Path, index: Path) -> None:
    """Every ``weight_map`` entry of a shard index is a safe name of an existing file inside the checkpoint (checked
    like a downloaded name: no ``..``, no absolute path, no symlink out of the folder)."""
    wmap = _load_json(index, "shard index").get("weight_map", {})
    if not isinstance(wmap, dict):
        raise UnsupportedModel(f"{index.name}: weight_map is not an object")
    bad = sorted({repr(f)[:80] for f in wmap.values() if not safe_name(f)})
    if bad:
        raise UnsupportedModel(f"{index.name} names unsafe files: {', '.join(bad[:3])}")
    names = set(wmap.values())
    inside = _allowed_roots(root)
    escaping = sorted(f for f in names if not any((root / f).resolve().is_relative_to(r) for r in inside))
    if escaping:
        raise UnsupportedModel(f"{index.name} names files outside the checkpoint (symlinks): {', '.join(escaping[:3])}")
    missing = sorted(f for f in names if not (root / f).exists())
    if missing:
        raise InputError(f"shard index names missing files: {', '.join(missing[:3])}")


def _allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where a checkpoint's files may really live: the folder itself, and for a snapshot of the Hugging Face
    cache (``models--ORG--NAME/snapshots/<rev>/``, whose files are links to ``../../blobs/<hash>``) that repo's
    ``blobs`` folder, never anywhere else."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real, real.parent.parent / "blobs"
    return (real,)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return records.read_json_object(path)
    except FileNotFoundError:
        raise UnsupportedModel(f"no {path.name} ({what})") from None
    except ValueError as e:  # includes UnicodeDecodeError and records.NotAnObject ("not a JSON object")
        raise UnsupportedModel(f"malformed {path.name}: {e}") from None
    except RecursionError:  # nested deeper than the JSON parser goes
        raise UnsupportedModel(f"malformed {path.name}: nested too deeply") from None


def _card_license(path: Path) -> str | None:
    """The licence id on the model card's ``license:`` line (``apache-2.0``, ``llama3.1``, ``openrail++``), or None:
    a YAML list, mapping or any other text is not one licence id (the card copies the Hub's card data first)."""
    readme = path / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    lm = re.search(r"^license:[ \t]*(['\"]?)([A-Za-z0-9][A-Za-z0-9._+-]*)\1[ \t]*(?:#.*)?\r?$", m.group(1), re.M)
    return lm.group(2) if lm else None


def inspect(path: str | Path, *, supported: frozenset[str] | None = None,
            projectors: frozenset[str] | None = None) -> Checkpoint:
    """Validate a local checkpoint; raise UnsupportedModel / InputError with a one-line reason. A model that needs
    remote code is always refused: its code is never run, and there is no switch to allow it. ``supported``: the
    converter's text architectures; ``projectors``: those whose vision tower it exports (a vision-language model
    outside them is refused)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"checkpoint folder not found: {root}")
    inner = sorted(c.parent.name for c in root.glob("*/config.json"))
    config = _load_json(root / "config.json", f"{root.name} is not a transformers checkpoint folder"
                        + (f"; the checkpoint is probably in {root.name}/{inner[0]}" if len(inner) == 1 else ""))
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise UnsupportedModel("config.json has no 'architectures' list")
    arch = archs[0]
    tok_cfg: dict[str, Any] = {}
    if (root / "tokenizer_config.json").exists():
        tok_cfg = _load_json(root / "tokenizer_config.json", "tokenizer settings")
    for where, cfg in (("config.json", config), ("tokenizer_config.json", tok_cfg)):
        remote = remote_code_refusal(cfg)
        if remote is not None:
            raise UnsupportedModel(remote.reason(where))
    vision = vision_refusal(arch, config, projectors)
    if vision is not None:
        raise UnsupportedModel(vision)
    if supported is not None and arch not in supported:
        raise UnsupportedModel(f"architecture {arch} is not supported by the pinned llama.cpp converter")

    files = [p for p in root.iterdir() if p.is_file()]
    refused = weights_refusal(p.name for p in files)
    if refused is not None:
        raise UnsupportedModel(refused.reason())
    weights = sorted(p for p in files if p.name.endswith(".safetensors"))
    index = root / "model.safetensors.index.json"
    if index.exists():
        _check_shard_index(root, index)
    params = 0
    dtypes: set[str] = set()
    tensors: list[str] = []
    for w in weights:
        header = read_safetensors_header(w)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            params += math.prod(info["shape"])
            dtypes.add(info["dtype"])
            tensors.append(name)
    absurd = config_refusal(config, tensors)
    if absurd is not None:
        raise UnsupportedModel(absurd)

    names = {p.name for p in files}
    tok_files: tuple[str, ...] = ()
    for group in TOKENIZER_SETS:
        if all(g in names for g in group):
            tok_files = group
            break
    if not tok_files:
        raise UnsupportedModel("no tokenizer (tokenizer.json, tokenizer.model or vocab.json+merges.txt)")
    template = chat.find_template(root, tok_cfg)
    return Checkpoint(
        path=root, config=config, architecture=arch, model_type=config.get("model_type"),
        weight_files=tuple(weights), weight_bytes=sum(w.stat().st_size for w in weights), parameters=params,
        dtypes=tuple(sorted(dtypes)), tokenizer_files=tok_files, chat_template=template, license=_card_license(root),
    )
