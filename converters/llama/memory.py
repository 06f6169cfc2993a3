"""What a GGUF file needs in memory at a context: predicted from its architecture, measured by loading it.

**Predicted** (:func:`kv_bytes`, :func:`compute_bytes`), the way the pinned llama.cpp sizes its buffers:

- The KV cache holds, for every layer with attention, ``cells x n_head_kv(layer) x (key_length + value_length)``
  elements of the KV type (f16 by default; ``q8_0`` stores 34 bytes per 32 elements). ``cells`` is the context padded
  to 256. A sliding-window layer caches only ``min(cells, pad256(window + n_ubatch))`` cells
  (``llama-kv-cache-iswa.cpp``); which layers slide comes from ``attention.sliding_window_pattern`` when the file
  has it, else from the architecture's default pattern in llama.cpp (:data:`SWA_PATTERNS`: gemma2 every other layer,
  gemma3 five of six, ...). An MLA model (``key_length_mla`` and ``value_length_mla`` present: DeepSeek-V2/V3,
  Kimi...) caches the compressed latent only: K of ``key_length`` (= kv_lora_rank + rope dims) per layer, no V.
  Grouped-query attention is in ``n_head_kv``. Recurrent state (Mamba, RWKV layers) is not modelled: the load
  measures it.
- The compute buffer is estimated from the largest activations of one micro-batch (n_ubatch = 512 tokens): the
  logits (``n_vocab``), the feed-forward and attention activations in f32, plus the attention scores of one head
  group when flash attention is off; :func:`compute_bytes` documents the terms. It is an estimate: the fit stage
  uses what llama.cpp reports on a real load instead whenever one ran.

**Measured** (:func:`measure`): ``llama-completion`` loads the file at the context (``-c``, flash attention on
llama.cpp's default ``auto``, ``--fit off`` so that llama.cpp does not change the context it was given,
``--no-repack``: the CPU backend otherwise keeps a second, repacked copy of Q4_0/Q4_K/IQ4_NL/... weights beside the
mapped file -- 7 % more on SmolLM2's Q4_K_M, and nothing a GPU allocates -- so the weights count their file bytes, as
on a GPU), generates
one token, and its log lines ``<buffer> model|KV|compute|output|RS buffer size = X MiB`` are summed per kind
(:func:`parse_buffers`); ``n_ctx = N`` confirms the context it used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core import proc
from converters.core.errors import InputError, ParseError
from converters.formats import gguf_meta
from converters.llama import toolchain as tc_mod
from converters.llama import verify

CELL_PAD = 256  # llama.cpp pads the context (and a sliding-window cache) to a multiple of 256 cells
N_UBATCH = 512  # llama.cpp's default micro-batch
KV_TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")
# arch -> (pattern, dense_first, default window): llama.cpp's ``load_swa_pattern(ml, n, dense_first)`` per model
# (src/models/*.cpp of the pinned tree); the window is the file's ``sliding_window`` unless only the default exists
SWA_PATTERNS: Mapping[str, tuple[int, bool, int | None]] = {
    "gemma2": (2, False, 4096), "gemma3": (6, False, None), "gemma-embedding": (6, False, None),
    "gemma3n": (5, False, None), "cohere2": (4, False, None), "cohere2moe": (4, True, None),
    "exaone4": (4, False, 4096), "exaone-moe": (4, False, 128), "llama4": (4, False, 8192),
    "olmo2": (4, False, None), "openai-moe": (2, False, None), "afmoe": (4, False, None),
    "smallthinker": (4, True, 4096), "plamo3": (8, False, None), "mellum": (4, False, None),
}
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
_N_CTX = re.compile(r"llama_context:\s*n_ctx\s*=\s*(\d+)")
LOG_VERBOSITY = "4"  # llama.cpp prints the buffer sizes at verbosity 4 ("trace"); the default 3 hides them


@dataclasses.dataclass(frozen=True)
class Attention:
    """The architecture facts a KV-cache size needs (from :meth:`converters.formats.gguf_meta.GgufMeta.kv_hparams`)."""

    arch: str
    n_layer: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer (0: the layer has no attention)
    key_length: int
    value_length: int
    mla: bool = False
    window: int = 0  # sliding window in tokens (0: none)
    swa_layers: tuple[bool, ...] = ()  # per layer: a sliding-window layer
    n_embd: int = 0
    n_ff: int = 0
    n_vocab: int = 0
    n_ctx_train: int | None = None

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> "Attention":
        n_layer = hp.get("n_layer")
        if not isinstance(n_layer, int) or n_layer <= 0:
            raise InputError("the GGUF names no block count: its KV cache cannot be sized")
        heads = _per_layer(hp.get("n_head"), n_layer, "head_count")
        kv = _per_layer(hp.get("n_head_kv"), n_layer, "head_count_kv") if hp.get("n_head_kv") is not None else heads
        n_embd = int(hp.get("n_embd") or 0)
        head = max(heads) if heads else 0
        k_len = int(hp.get("key_length") or (n_embd // head if head else 0))
        v_len = int(hp.get("value_length") or k_len)
        if k_len <= 0:
            raise InputError("the GGUF names no key length or head count: its KV cache cannot be sized")
        mla = bool(hp.get("key_length_mla")) and bool(hp.get("value_length_mla"))
        window, swa = _sliding(hp, n_layer)
        return cls(arch=str(hp.get("arch") or ""), n_layer=n_layer, n_head=heads, n_head_kv=kv, key_length=k_len,
                   value_length=v_len, mla=mla, window=window, swa_layers=swa, n_embd=n_embd,
                   n_ff=int(hp.get("n_ff") or 0), n_vocab=int(hp.get("n_vocab") or 0),
                   n_ctx_train=hp.get("n_ctx_train"))

    @classmethod
    def read(cls, path: Path) -> "Attention":
        return cls.from_hparams(gguf_meta.read(path).kv_hparams())

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "n_layer": self.n_layer, "n_head_kv": sorted(set(self.n_head_kv)),
                "key_length": self.key_length, "value_length": 0 if self.mla else self.value_length, "mla": self.mla,
                "window": self.window, "swa_layers": sum(self.swa_layers)}


def _per_layer(v: Any, n_layer: int, what: str) -> tuple[int, ...]:
    if isinstance(v, list):
        if len(v) != n_layer:
            raise InputError(f"{what} lists {len(v)} layers, the model has {n_layer}")
        return tuple(int(x) for x in v)
    if v is None:
        raise InputError(f"the GGUF has no {what}: its KV cache cannot be sized")
    return (int(v),) * n_layer


def _sliding(hp: Mapping[str, Any], n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """(window, per-layer flags) as llama.cpp's ``load_swa_pattern`` sets them; no sliding window for an
    architecture llama.cpp does not give one (phi3 turns its own off)."""
    arch = str(hp.get("arch") or "")
    default = SWA_PATTERNS.get(arch)
    if default is None:
        return 0, (False,) * n_layer
    n_pattern, dense_first, default_window = default
    window = int(hp.get("sliding_window") or default_window or 0)
    if window <= 0:
        return 0, (False,) * n_layer
    pattern = hp.get("sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) >= n_layer:
        return window, tuple(bool(x) for x in pattern[:n_layer])
    if isinstance(pattern, int):
        n_pattern = pattern
    if dense_first:
        flags = tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    else:
        flags = tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
    return window, flags


def pad_cells(n: int, to: int = CELL_PAD) -> int:
    """``n`` rounded up to whole KV cells of 256 (how llama.cpp pads a context)."""
    return -(-n // to) * to


def type_bytes(kv_type: str, elements: int) -> int:
    """Bytes of ``elements`` values of a KV type (whole blocks)."""
    sizes = gguf_meta.quant_sizes()
    key = kv_type.upper()
    if key not in sizes or kv_type.lower() not in KV_TYPES:
        raise InputError(f"unknown KV cache type {kv_type!r}; known: {', '.join(KV_TYPES)}")
    blk, size = sizes[key]
    return -(-elements // blk) * size


def cells(a: Attention, ctx: int, layer: int, *, ubatch: int = N_UBATCH) -> int:
    """KV cells layer ``layer`` allocates at context ``ctx``."""
    full = pad_cells(ctx)
    if a.window and a.swa_layers and a.swa_layers[layer]:
        return min(full, pad_cells(a.window + ubatch))
    return full


def kv_bytes(a: Attention, ctx: int, kv_type: str = "f16", *, ubatch: int = N_UBATCH) -> int:
    """The KV cache llama.cpp allocates for one sequence at context ``ctx`` (see the module doc)."""
    total = 0
    for il in range(a.n_layer):
        heads = a.n_head_kv[il]
        if heads <= 0:
            continue
        n = cells(a, ctx, il, ubatch=ubatch)
        total += n * type_bytes(kv_type, heads * a.key_length)
        if not a.mla:
            total += n * type_bytes(kv_type, heads * a.value_length)
    return total


def kv_bytes_per_token(a: Attention, kv_type: str = "f16") -> int:
    """KV bytes one more token of context costs (the layers that do not slide)."""
    return sum(type_bytes(kv_type, h * a.key_length) + (0 if a.mla else type_bytes(kv_type, h * a.value_length))
               for il, h in enumerate(a.n_head_kv) if h > 0 and not (a.window and a.swa_layers[il]))


def compute_bytes(a: Attention, ctx: int, *, ubatch: int = N_UBATCH, flash_attn: bool = True) -> int:
    """An estimate of llama.cpp's compute buffer: the graph allocator reuses memory between nodes, so what it
    reserves is about the largest live set of one micro-batch of ``t = min(ctx, ubatch)`` tokens in f32 -- the
    logits (``n_vocab`` wide; without flash attention, the attention scores of all heads over the cache when they are
    larger) next to one feed-forward and two embedding widths. Measured on SmolLM2-135M (49k vocabulary): 98.25 MiB
    reported, 101.25 MiB estimated, the same at 1k, 4k, 8k and 32k tokens of context. A real load replaces it."""
    t = min(pad_cells(ctx), ubatch)
    widest = a.n_vocab if flash_attn else max(a.n_vocab, max(a.n_head) * pad_cells(ctx))
    return 4 * t * (widest + a.n_ff + 2 * max(a.n_embd, max(a.n_head) * a.key_length))


# --------------------------------------------------------------------------------------------------
# Measured
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Buffers:
    """What llama.cpp reported when it loaded a file: bytes per buffer kind (summed over devices), the context."""

    ctx: int
    model: int
    kv: int
    compute: int
    output: int
    other: int = 0  # recurrent state (RS) buffers
    devices: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.model + self.kv + self.compute + self.output + self.other

    @property
    def overhead(self) -> int:
        """Everything but the weights."""
        return self.total - self.model

    def to_json(self) -> dict[str, Any]:
        return {"ctx": self.ctx, "model": self.model, "kv": self.kv, "compute": self.compute, "output": self.output,
                "other": self.other, "total": self.total, "devices": list(self.devices)}


def parse_buffers(text: str) -> Buffers:
    """The buffer sizes and the context of a llama.cpp load log; ParseError when it reports no model buffer."""
    kinds: dict[str, float] = {}
    devices: list[str] = []
    for dev, kind, mib in _BUFFER.findall(text):
        kinds[kind] = kinds.get(kind, 0.0) + float(mib)
        if dev not in devices:
            devices.append(dev)
    if "model" not in kinds:
        raise ParseError("llama.cpp printed no model buffer size: " + text[-300:].strip())
    ctxs = _N_CTX.findall(text)

    def b(kind: str) -> int:
        return int(round(kinds.get(kind, 0.0) * (1 << 20)))

    return Buffers(ctx=int(ctxs[-1]) if ctxs else 0, model=b("model"), kv=b("KV"), compute=b("compute"),
                   output=b("output"), other=b("RS"), devices=tuple(devices))


def load_argv(tc: tc_mod.Toolchain, gguf: Path, ctx: int, *, kv_type: str = "f16",
              threads: int | None = None) -> list[Any]:
    argv: list[Any] = [tc.program("llama-completion"), "-m", gguf, "-c", str(ctx), "-n", "1", "-p", "Hello",
                       "-no-cnv", "--no-warmup", "--no-display-prompt", "--temp", "0", "--seed", "1",
                       "--fit", "off", "--no-repack", "-ctk", kv_type, "-ctv", kv_type, "-lv", LOG_VERBOSITY]
    if threads:
        argv += ["-t", str(threads)]
    return argv


def measure(tc: tc_mod.Toolchain, gguf: Path, ctx: int, *, kv_type: str = "f16", threads: int | None = None,
            timeout: float | None = None) -> Buffers:
    """Load ``gguf`` at ``ctx`` with llama.cpp and read the buffers it reports (its templates sandboxed first, as
    every llama-completion run)."""
    verify.require_sandboxed_templates(gguf)
    res = proc.run(load_argv(tc, gguf, ctx, kv_type=kv_type, threads=threads), timeout=timeout)
    out = parse_buffers(res.stderr + "\n" + res.stdout)
    if out.ctx and out.ctx < ctx:
        raise ParseError(f"llama.cpp loaded {gguf.name} at {out.ctx} tokens of context, not the {ctx} asked")
    return out


def stock_overhead(measured: Sequence[Buffers]) -> int:
    """The largest non-weight memory among loads at one context (the KV, compute and output buffers differ little
    between layouts; the largest is the safe one)."""
    return max((b.overhead for b in measured), default=0)
