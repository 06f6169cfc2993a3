"""The one boundary to the GGUF format (the only importer of gguf-py): metadata read with its ``GGUFReader``, keys
from ``gguf.Keys``, tensors, block sizes and dequantization, and the ``GGUFWriter`` copy of a file with other metadata.

No other module names a GGUF key as a string, repeats a ``general.file_type`` number or parses a GGUF
header: they call :func:`read` (a :class:`GgufMeta` of plain Python values), :func:`data_offset` or
:func:`file_type`; the per-tensor tuner reads tensors with :func:`tensors` and :func:`dequantize`, the layout
sizes them with :func:`quant_sizes`, a metadata patch writes with :func:`write_copy`.

Values are decoded as llama.cpp writes them: scalars as Python numbers/bools, strings as UTF-8 (invalid
bytes kept as surrogates, so a broken vocabulary entry is reported rather than crashing the check), arrays as
lists. :func:`read` reads only the header; tensor data is memory-mapped and touched only by the tuner
(:func:`tensors`) and :func:`non_finite_tensors`, a scan that runs when a program has already failed on a file.

Speed: stock ``GGUFReader`` builds a ``numpy.memmap`` view per array element, so a 256k-token vocabulary
takes tens of seconds to open. :class:`_HeaderReader` is ``GGUFReader`` with plain-ndarray views and one
view per numeric array (the same fields and ``contents()``), which makes it about 20 times faster; a unit
test compares it with the stock reader. :func:`read` also keeps the last few files' metadata, keyed by the file's
identity and its change time (``st_ctime_ns``, which no write or ``utime`` leaves unchanged): every llama.cpp program
start checks the file's chat templates first (``verify.require_sandboxed_templates``), and a job starts dozens.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import threading
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.core.errors import InputError

log = logging.getLogger(__name__)

K = gguf.Keys
ARCHITECTURE = K.General.ARCHITECTURE
FILE_TYPE = K.General.FILE_TYPE
CHAT_TEMPLATE = K.Tokenizer.CHAT_TEMPLATE
TOKENIZER_NAMESPACE = K.Tokenizer.MODEL.split(".")[0] + "."
_READER_FIELD_PREFIX = "GGUF."  # GGUFReader's own pseudo-fields (version, counts): not file metadata
_T = gguf.GGUFValueType


def file_type(qtype: str) -> int:
    """``general.file_type`` (llama_ftype) llama.cpp writes for the quant type ``qtype`` (``Q4_K_M``, ``BF16``)."""
    name = "ALL_F32" if qtype.upper() == "F32" else f"MOSTLY_{qtype.upper()}"
    try:
        return int(gguf.LlamaFileType[name])
    except KeyError:
        raise InputError(f"gguf-py knows no file type for {qtype!r}") from None


class _HeaderReader(gguf.GGUFReader):
    """``GGUFReader`` with plain-ndarray views (a memmap view per element is what makes it slow)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        count = int(count)
        arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        if _T(raw_type) != _T.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        itype = self._get(orig_offs, np.uint32)
        sub = _T(int(itype[0]))
        alen = self._get(orig_offs + 4, np.uint64)
        nptype = self.gguf_scalar_to_np.get(sub)
        if nptype is not None:  # numbers: one view for the whole array
            values = self._get(orig_offs + 12, nptype, int(alen[0]))
            return 12 + int(values.nbytes), [itype, alen, values], [2], [_T.ARRAY, sub]
        if sub != _T.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        parts: list[Any] = [itype, alen]
        offs = orig_offs + 12
        for _ in range(int(alen[0])):
            slen, sdata = self._get_str(offs)
            parts += [slen, sdata]
            offs += 8 + int(slen[0])
        return offs - orig_offs, parts, list(range(3, len(parts), 2)), [_T.ARRAY, sub]


def _text(part: Any) -> str:
    return bytes(part).decode("utf-8", "surrogateescape")


def _value(field: Any) -> Any:
    """A field's value as plain Python (strings decoded leniently, arrays as lists)."""
    main = field.types[0] if field.types else None
    if main == _T.STRING:
        return _text(field.parts[-1])
    if main == _T.ARRAY and field.types[-1] == _T.STRING:
        return [_text(field.parts[i]) for i in field.data]
    return field.contents()


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return _HeaderReader(str(path))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    except (ValueError, KeyError, IndexError) as e:
        raise InputError(f"{Path(path).name} is not a readable GGUF file: {e}") from e


@dataclasses.dataclass(frozen=True)
class GgufMeta:
    """The key/value metadata of one GGUF file (for a split file: of the part read)."""

    path: Path
    values: Mapping[str, Any]
    data_offset: int
    tensor_count: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def arch(self) -> str:
        return str(self.values.get(ARCHITECTURE, ""))

    def model_value(self, key_template: str) -> Any:
        """A per-architecture value: ``key_template`` is a ``gguf.Keys.LLM``/``Attention`` key with ``{arch}``."""
        return self.values.get(key_template.format(arch=self.arch)) if self.arch else None

    def opt_int(self, key: str) -> int | None:
        v = self.values.get(key)
        return int(v) if isinstance(v, int) else None

    def model_int(self, key_template: str) -> int | None:
        """A per-architecture number, None when absent or not a single number (e.g. per-layer head counts)."""
        v = self.model_value(key_template)
        try:
            return int(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    def chat_templates(self) -> dict[str, str]:
        """Every chat template the file carries, by key: ``tokenizer.chat_template`` (the default) and each named
        ``tokenizer.chat_template.<name>`` (what llama.cpp may render: ``tool_use``, ``rerank``, ...)."""
        return {k: v for k, v in self.values.items()
                if (k == CHAT_TEMPLATE or k.startswith(CHAT_TEMPLATE + ".")) and isinstance(v, str)}

    def attention_shapes(self) -> dict[str, int | None]:
        """Layers, KV heads, head size and training context (what a KV-cache size needs)."""
        n_head = self.model_int(K.Attention.HEAD_COUNT)
        n_kv = self.model_int(K.Attention.HEAD_COUNT_KV) or n_head
        head_dim = self.model_int(K.Attention.KEY_LENGTH)
        emb = self.model_int(K.LLM.EMBEDDING_LENGTH)
        if not head_dim and emb and n_head:
            head_dim = emb // n_head
        return {"n_layer": self.model_int(K.LLM.BLOCK_COUNT), "n_kv_heads": n_kv, "head_dim": head_dim,
                "n_ctx_train": self.model_int(K.LLM.CONTEXT_LENGTH)}

    def kv_hparams(self) -> dict[str, Any]:
        """What the KV-cache size of a context depends on, as llama.cpp reads it (``converters.llama.memory``):
        layers, attention and KV heads (a number, or a list per layer), key and value head sizes, MLA's sizes
        (present on an MLA model: then only K is cached, of ``key_length``), the sliding window and its per-layer
        pattern (a number or a list of bools; absent: the architecture's default), the vocabulary, embedding and
        feed-forward sizes (the compute buffer's estimate) and the training context."""
        A, L = K.Attention, K.LLM
        vocab = self.model_int(L.VOCAB_SIZE)
        if vocab is None:
            tokens = self.values.get(K.Tokenizer.LIST)
            vocab = len(tokens) if isinstance(tokens, list) else None
        ff = self.model_value(L.FEED_FORWARD_LENGTH)
        return {"arch": self.arch, "n_layer": self.model_int(L.BLOCK_COUNT),
                "n_head": self.model_value(A.HEAD_COUNT), "n_head_kv": self.model_value(A.HEAD_COUNT_KV),
                "key_length": self.model_int(A.KEY_LENGTH), "value_length": self.model_int(A.VALUE_LENGTH),
                "key_length_mla": self.model_int(A.KEY_LENGTH_MLA),
                "value_length_mla": self.model_int(A.VALUE_LENGTH_MLA),
                "sliding_window": self.model_int(A.SLIDING_WINDOW),
                "sliding_window_pattern": self.model_value(A.SLIDING_WINDOW_PATTERN),
                "n_embd": self.model_int(L.EMBEDDING_LENGTH), "n_ff": max(ff) if isinstance(ff, list) and ff else ff,
                "n_vocab": vocab, "n_ctx_train": self.model_int(L.CONTEXT_LENGTH)}

    def tokenizer_and_model_keys(self) -> dict[str, Any]:
        """The keys every quant must share with its reference: tokenizer, template, hyperparameters, architecture."""
        arch = self.arch
        return {k: v for k, v in self.values.items()
                if k.startswith(TOKENIZER_NAMESPACE) or (bool(arch) and k.startswith(arch + ".")) or k == ARCHITECTURE}


_READ_CACHE: collections.OrderedDict[tuple[Any, ...], GgufMeta] = collections.OrderedDict()
_READ_CACHE_SIZE = 4  # a 256k-token vocabulary is tens of MB of Python objects
_READ_LOCK = threading.Lock()


def read(path: Path) -> GgufMeta:
    """Metadata of a GGUF file; :class:`~converters.core.errors.InputError` when it is missing or not a GGUF.
    Read again whenever the file was written, replaced or touched since (see the module doc)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _READ_LOCK:
        hit = _READ_CACHE.get(key)
        if hit is not None:
            _READ_CACHE.move_to_end(key)
            return hit if hit.path == path else dataclasses.replace(hit, path=path)
    reader = _open(path)
    values = {name: _value(f) for name, f in reader.fields.items() if not name.startswith(_READER_FIELD_PREFIX)}
    meta = GgufMeta(path=path, values=types.MappingProxyType(values), data_offset=int(reader.data_offset),
                    tensor_count=len(reader.tensors))
    with _READ_LOCK:
        _READ_CACHE[key] = meta
        while len(_READ_CACHE) > _READ_CACHE_SIZE:
            _READ_CACHE.popitem(last=False)
    return meta


def reader(path: Path) -> gguf.GGUFReader:
    """A fast ``GGUFReader`` of ``path`` (fields with their raw parts and types, tensor infos; data memory-mapped):
    for code that copies fields to a new file. :class:`~converters.core.errors.InputError` when it is not a GGUF."""
    return _open(Path(path))


def non_finite_tensors(path: Path, *, chunk_bytes: int = 1 << 26) -> list[tuple[str, int]]:
    """``(tensor name, how many NaN/inf values)`` of every tensor of ``path`` that holds any, in file order.

    Float tensors (F32, F16, BF16) are read in slices of about ``chunk_bytes`` from the memory map, so memory stays
    flat on a large model; quantized tensors are dequantized with gguf-py. It reads the whole file: call it to
    explain a failure, not on every run."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as T

    out = []
    for t in _open(Path(path)).tensors:
        raw = t.data
        if t.tensor_type in (T.F32, T.F16):
            flat = raw.reshape(-1)
            step = max(1, chunk_bytes // flat.itemsize)
            bad = sum(int(flat[i:i + step].size - np.isfinite(flat[i:i + step]).sum())
                      for i in range(0, flat.size, step))
        elif t.tensor_type == T.BF16:
            flat = raw.reshape(-1).view(np.uint16)
            # a BF16 value is not finite when all 8 exponent bits are set
            step = max(1, chunk_bytes // 2)
            bad = sum(int(((flat[i:i + step] & 0x7F80) == 0x7F80).sum()) for i in range(0, flat.size, step))
        else:
            try:
                values = quants.dequantize(raw, t.tensor_type)
            except NotImplementedError:
                continue  # a type gguf-py cannot decode: not judged
            bad = int(values.size - np.isfinite(values).sum())
        if bad:
            out.append((t.name, bad))
    return out


def data_offset(path: Path) -> int:
    """Bytes before the tensor data: the header (metadata and tensor infos) plus alignment padding."""
    return int(_open(Path(path)).data_offset)


# --------------------------------------------------------------------------------------------------
# Tensors and block sizes (the per-tensor tuner, the layout's exact sizes)
# --------------------------------------------------------------------------------------------------


def tensors(path: Path) -> list[Any]:
    """Every tensor of ``path`` as gguf-py's ``GGUFReader`` reads it: ``name``, ``tensor_type`` (its ``.name``
    is the ggml type name), ``shape`` (ggml order), ``n_bytes`` and ``data`` (a view of the memory-mapped file).
    Read with :class:`_HeaderReader`: the stock reader's view per vocabulary entry made this take 20 s on SmolLM2's
    BF16 file on a busy machine, 2 s with plain views (the same tensors: a unit test compares them)."""
    return list(_open(Path(path)).tensors)


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name."""
    return {t.name: t.tensor_type.name for t in tensors(path)}


def dequantize(tensor: Any) -> np.ndarray:
    """A tensor's values (of :func:`tensors`), dequantized by gguf-py."""
    from gguf.quants import dequantize as _dequantize

    return _dequantize(tensor.data, tensor.tensor_type)


def quant_sizes() -> dict[str, tuple[int, int]]:
    """ggml type name -> (elements per block, bytes per block), from gguf-py's ``GGML_QUANT_SIZES``."""
    return {t.name: gguf.GGML_QUANT_SIZES[t] for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES}


# --------------------------------------------------------------------------------------------------
# Writing a copy with other metadata (a metadata patch)
# --------------------------------------------------------------------------------------------------
_NOT_BYTES = np.dtype(np.float32)  # any dtype but uint8: add_tensor_info then takes the shape as given


class Unwritable(InputError):
    """A metadata value gguf-py's writer cannot write (a nested or an empty array)."""


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    """(value, type, array item type) of a reader field, as ``GGUFWriter.add_key_value`` takes them; strings as
    their raw bytes (a token that is not valid UTF-8 is copied as it is)."""
    main = field.types[0]
    if main == _T.STRING:
        return bytes(field.parts[-1]), main, None
    if main == _T.ARRAY:
        sub = field.types[-1]
        if len(field.types) > 2 or sub == _T.ARRAY:
            raise Unwritable(f"metadata key {field.name} is a nested array, which gguf-py cannot write")
        if not len(field.data):
            raise Unwritable(f"metadata key {field.name} is an empty array, which gguf-py cannot write")
        if sub == _T.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return list(field.contents()), main, sub
    return field.contents(), main, None


def tensor_layout(r: gguf.GGUFReader) -> list[tuple[str, int, tuple[int, ...], int, int]]:
    """(name, raw type, shape, offset in the data section, bytes) of every tensor a reader holds."""
    return [(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset) - int(r.data_offset),
             int(t.n_bytes)) for t in r.tensors]


def write_copy(dst: Path, r: gguf.GGUFReader, fields: Sequence[tuple[str, Any]], data_from: Path) -> str:
    """Write ``dst`` with ``r``'s architecture, byte order and alignment, the reader fields ``fields`` (name, field)
    in that order, every tensor info of ``r`` with its raw type (no conversion), then the tensor data of
    ``data_from`` (the file ``r`` reads) copied byte for byte; return the sha256 of the copied data.
    :class:`Unwritable` when a field cannot be written."""
    arch = r.get_field(ARCHITECTURE).contents()
    h = hashlib.sha256()
    w = gguf.GGUFWriter(dst, arch=arch, endianess=r.endianess)
    w.data_alignment = int(r.alignment)
    for name, field in fields:
        w.add_key_value(name, *_field_value(field))
    for t in r.tensors:  # numpy order (the writer reverses it back to ggml's), the raw type: no conversion
        w.add_tensor_info(t.name, [int(x) for x in reversed(t.shape)], _NOT_BYTES, int(t.n_bytes),
                          raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    with open(data_from, "rb") as f:
        f.seek(int(r.data_offset))
        while chunk := f.read(1 << 22):
            fout.write(chunk)
            h.update(chunk)
    w.close()
    return h.hexdigest()
