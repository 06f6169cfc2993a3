"""Per-tensor quantization errors: the measurements the tuner and the memory-budget files solve with.

A tensor's quantized bytes depend only on its data, its type and its importance-matrix entry (llama-quantize
quantizes each tensor on its own with ``ggml_quantize_chunk``; ``tests/integration/test_tune_cheap.py`` checks that
the same tensor at the same type is byte-identical in two ladder files and in a ``--pure`` file). So:

1. **From the ladder's own files.** The stock files of a ladder already hold many (tensor, type) pairs. Each
   reference tensor is dequantized once and compared with every file that holds it in a wanted type
   (:func:`errors_from_files`).
2. **The missing pairs, packed.** What no file holds is quantized by ``llama-quantize --pure`` with a
   ``--tensor-type-file`` that gives every tensor one of its missing types (tensors with nothing missing are
   copied in the reference's own type, the cheapest "quantization"; the file type is Q8_0, as an unquantized
   file type makes llama-quantize copy every tensor and ignore the overrides); a tensor with ``k`` missing types needs ``k``
   such runs, so the number of runs is the largest ``k``, not the number of types (:func:`quantize_missing`).
   A pair llama.cpp does not honour (a fallback for a row length) is recorded as unavailable.
3. **Cached** (:class:`ErrorCache`) by (reference, imatrix, calibration text, toolchain, tensor, type, rows, seed):
   size points, re-runs and the memory-budget files reuse every pair.

Where ggufbot's own measuring program builds (:mod:`converters.llama.native`: ggml's quantizer and dequantizer, the
same code llama-quantize runs, compiled from the toolchain's tree), 1 and 2 are replaced by one run of it over every
missing pair (:func:`quantize_native`): each reference tensor is read once, each wanted type quantized and
dequantized in memory on **sampled rows** (:func:`sample_rows`: at most ``rows`` rows per tensor, drawn with
``seed``, each weighed by the inverse of its chance to be drawn, so the sum estimates the whole tensor's error without
bias; the token embedding's most frequent rows are always measured). A row is quantized on its own (llama-quantize
quantizes row by row with the imatrix entry of the row's matrix), so a measured row's error is exactly its error in a
llama-quantize file. No file is written and no dequantization runs in Python.

The error is the importance-weighted squared error ``sum_col imp[col] * sum_row (w - q)^2`` with ``imp = in_sum2 /
counts`` from the imatrix: the expected squared change of the tensor's output per token of the calibration text.
``token_embd`` has no imatrix entry (llama-imatrix collects matrix products of ``blk.*`` only; a token embedding is
a lookup): its rows are weighed by the token frequencies of the calibration text instead (:func:`token_frequencies`),
which is the same quantity for a lookup: the expected squared change of the embedding's output per token. Any other
tensor without an entry weighs its columns alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.core import proc
from converters.core import names, records
from converters.core.errors import ParseError
from converters.core.proc import run
from converters.formats import gguf_meta
from converters.ladder import layout
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

METHOD = 2  # bump when the error definition changes: old cache entries are then ignored
TOKEN_EMBD = layout.TOKEN_EMBD  # no imatrix entry: its rows are weighted by token frequency
# the packed runs' file type: llama-quantize applies --tensor-type overrides only when quantizing (an unquantized
# file type copies every tensor); tensors with nothing to measure are overridden back to the reference's type
PACK_FTYPE = "Q8_0"


# --------------------------------------------------------------------------------------------------
# Weights of the error
# --------------------------------------------------------------------------------------------------
def _imatrix_entries(imatrix: Path, dtype: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor of an imatrix GGUF: its ``in_sum2`` as (matrices, columns) and its ``counts`` per matrix, in
    ``dtype`` (entries without counts left out)."""
    ts = tensors(imatrix)
    sums = {t.name[:-len(".in_sum2")]: t for t in ts if t.name.endswith(".in_sum2")}
    counts = {t.name[:-len(".counts")]: t for t in ts if t.name.endswith(".counts")}
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None:
            continue
        v = np.asarray(s.data, dtype=dtype).reshape(-1, int(s.shape[0]))
        out[name] = (v, np.asarray(c.data, dtype=dtype).reshape(-1)[: v.shape[0]])
    return out


def read_importance(imatrix: Path | None) -> dict[str, np.ndarray]:
    """The imatrix GGUF's mean squared activation per input column: ``in_sum2 / counts`` per tensor."""
    if imatrix is None:
        return {}
    return {name: (v / np.where(n > 0, n, 1.0)[:, None]).mean(axis=0)
            for name, (v, n) in _imatrix_entries(imatrix, np.float64).items()}


def read_imatrix(imatrix: Path | None) -> dict[str, np.ndarray]:
    """What llama-quantize quantizes with: per tensor, ``in_sum2 / counts`` of each matrix (an expert each in a 3-D
    tensor), shape (matrices, columns), float32; a matrix never counted weighs every column 1 (llama.cpp's rule)."""
    if imatrix is None:
        return {}
    return {name: np.where(n[:, None] > 0, v / np.where(n > 0, n, 1.0)[:, None], np.float32(1.0)).astype(np.float32)
            for name, (v, n) in _imatrix_entries(imatrix, np.float32).items()}


def parse_token_ids(text: str) -> list[int]:
    """The ids ``llama-tokenize --ids`` prints (a Python-style list)."""
    m = re.search(r"\[([0-9,\s]*)\]", text)
    if not m:
        raise ParseError("llama-tokenize --ids printed no list of token ids")
    return [int(x) for x in m.group(1).replace(",", " ").split()]


def frequencies(ids: Sequence[int], n_vocab: int) -> np.ndarray:
    """Relative frequency of each token id (sums to 1; ids outside the vocabulary are ignored)."""
    a = np.asarray([i for i in ids if 0 <= i < n_vocab], dtype=np.int64)
    f = np.bincount(a, minlength=n_vocab).astype(np.float64)
    return f / f.sum() if f.sum() > 0 else np.full(n_vocab, 1.0 / max(n_vocab, 1))


def token_frequencies(tc: Toolchain, reference: Path, text: Path, n_vocab: int, *,
                      timeout: float | None = None) -> np.ndarray:
    """Token frequencies of ``text`` under the reference's tokenizer (``llama-tokenize --ids``)."""
    res = run([tc.program("llama-tokenize"), "-m", reference, "-f", text, "--ids", "--log-disable"],
              timeout=timeout, keep_output=64_000_000)
    return frequencies(parse_token_ids(res.stdout), n_vocab)


def weighted_error(ref: np.ndarray, q: np.ndarray, imp: np.ndarray | None, rows: np.ndarray | None = None) -> float:
    """``sum_col imp[col] * sum_row rows[row] * (ref - q)^2`` (``imp`` and ``rows`` default to 1)."""
    col = np.zeros(ref.shape[1], dtype=np.float64)
    for i in range(0, ref.shape[0], 2048):  # in slices: a large embedding must not be copied whole in float64
        d = ref[i:i + 2048].astype(np.float64) - q[i:i + 2048]
        if rows is not None and rows.shape[0] == ref.shape[0]:
            col += np.einsum("ij,ij,i->j", d, d, rows[i:i + 2048])
        else:
            col += np.einsum("ij,ij->j", d, d)
    return float(col.sum() if imp is None or imp.shape[0] != col.shape[0] else (col * imp).sum())


@dataclasses.dataclass(frozen=True)
class Weights:
    """What an error is weighed by: per tensor the imatrix columns, and the token embedding's row frequencies."""

    importance: Mapping[str, np.ndarray]
    token_rows: np.ndarray | None = None

    def error(self, name: str, ref: np.ndarray, q: np.ndarray) -> float:
        rows = self.token_rows if name == TOKEN_EMBD and name not in self.importance else None
        return weighted_error(ref, q, self.importance.get(name), rows)


def tensors(path: Path) -> list[Any]:
    """The tensors of a GGUF file through gguf_meta's fast reader (gguf-py's stock reader spends seconds on a
    vocabulary's metadata arrays: ten times the fast one's, for every file the tuner opens)."""
    return list(gguf_meta.reader(path).tensors)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in tensors(path)}


def f32(t: Any) -> np.ndarray:
    return np.asarray(gguf_meta.dequantize(t), dtype=np.float32).reshape(-1, int(t.shape[0]))


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheKey:
    """What a measured error depends on, besides the tensor and the type."""

    reference: str  # sha256 of the reference GGUF
    imatrix: str | None  # sha256 of the imatrix GGUF
    calibration: str | None  # sha256 of the calibration text (the token embedding's row weights)
    toolchain: str | None  # llama.cpp build (the quantizer)
    seed: int = 0  # rows sampled with this seed
    rows: int = 0  # at most this many rows measured per tensor (sampled); 0: whole tensors

    def digest(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "method": METHOD}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ErrorCache:
    """Errors per (tensor, type) for one :class:`CacheKey`, in ``<dir>/errors-<digest>.json``.

    ``None`` marks a pair llama.cpp does not produce (a fallback): it is not measured again."""

    def __init__(self, directory: Path, key: CacheKey) -> None:
        self.key = key
        self.path = Path(directory) / names.error_cache(key.digest())
        self.errors: dict[str, dict[str, float | None]] = {}
        self.hits = 0
        if self.path.is_file():
            try:
                d = json.loads(self.path.read_text())
                if d.get("key") == dataclasses.asdict(key) and d.get("method") == METHOD:
                    self.errors = {t: dict(v) for t, v in d.get("errors", {}).items()}
            except (OSError, ValueError, AttributeError):
                self.errors = {}

    def get(self, tensor: str, qtype: str) -> float | None:
        return self.errors.get(tensor, {}).get(qtype)

    def has(self, tensor: str, qtype: str) -> bool:
        return qtype in self.errors.get(tensor, {})

    def put(self, tensor: str, qtype: str, error: float | None) -> None:
        self.errors.setdefault(tensor, {})[qtype] = error

    def missing(self, wanted: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
        out = {t: [q for q in qs if not self.has(t, q)] for t, qs in wanted.items()}
        return {t: qs for t, qs in out.items() if qs}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records.write_json_atomic(self.path, {"key": dataclasses.asdict(self.key), "method": METHOD,
                                              "errors": self.errors})

    def table(self, wanted: Mapping[str, Iterable[str]]) -> dict[str, dict[str, float]]:
        """The measured errors of the wanted pairs (unavailable pairs left out)."""
        out: dict[str, dict[str, float]] = {}
        for t, qs in wanted.items():
            row = {q: self.get(t, q) for q in qs}
            out[t] = {q: float(e) for q, e in row.items() if e is not None}
        return out


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def errors_from_files(reference: Path, files: Sequence[Path], wanted: Mapping[str, Iterable[str]],
                      weights: Weights, cache: ErrorCache) -> int:
    """Measure every wanted (tensor, type) pair that one of ``files`` holds and the cache lacks; each reference
    tensor is dequantized once. Returns the number of pairs measured."""
    need = cache.missing(wanted)
    if not need:
        return 0
    held: list[dict[str, Any]] = []
    for f in files:
        held.append({t.name: t for t in tensors(f)})
    n = 0
    for r in tensors(reference):
        types = need.get(r.name)
        if not types:
            continue
        ref = None
        for in_file in held:
            t = in_file.get(r.name)
            if t is None or t.tensor_type.name not in types or cache.has(r.name, t.tensor_type.name):
                continue
            if ref is None:
                ref = f32(r)
            cache.put(r.name, t.tensor_type.name, weights.error(r.name, ref, f32(t)))
            n += 1
    return n


def packing_rounds(missing: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """The missing pairs as rounds of one type per tensor (round ``i`` takes each tensor's ``i``-th type)."""
    rounds: list[dict[str, str]] = []
    for t, qs in missing.items():
        for i, q in enumerate(qs):
            if i == len(rounds):
                rounds.append({})
            rounds[i][t] = q
    return rounds


def quantize_missing(tc: Toolchain, reference: Path, workdir: Path, scratch: Path, wanted: Mapping[str, Iterable[str]],
                     weights: Weights, cache: ErrorCache, *, imatrix: Path | None, threads: int | None = None,
                     timeout: float | None = None) -> tuple[int, int]:
    """Quantize what the cache still lacks in packed ``llama-quantize --pure`` runs; returns (runs, pairs)."""
    missing = cache.missing(wanted)
    rounds = packing_rounds(missing)
    ref_types = tensor_types(reference)
    copy = {n: q if q in ("F32", *layout.UNQUANTIZED) else PACK_FTYPE for n, q in ref_types.items()}
    pairs = 0
    scratch.mkdir(parents=True, exist_ok=True)
    for i, plan in enumerate(rounds):
        types = {name: plan.get(name, copy[name]) for name in wanted}
        tf = scratch / f"pack-{i}.txt"
        layout.write_tensor_type_file(tf, types)
        out = scratch / f"pack-{i}.gguf"
        argv: list[Any] = [tc.program("llama-quantize")]
        if imatrix is not None:
            argv += ["--imatrix", os.path.relpath(imatrix, workdir)]
        argv += ["--pure", "--tensor-type-file", os.path.abspath(tf), os.path.abspath(reference),
                 os.path.abspath(out), PACK_FTYPE, str(threads or proc.cpus())]
        try:
            run(argv, timeout=timeout, cwd=workdir)
            got = {t.name: t for t in tensors(out)}
            ref = {t.name: t for t in tensors(reference)}
            for name, q in plan.items():
                t = got.get(name)
                if t is None or t.tensor_type.name != q:
                    cache.put(name, q, None)  # llama.cpp fell back: not a candidate
                    continue
                cache.put(name, q, weights.error(name, f32(ref[name]), f32(t)))
                pairs += 1
        finally:
            out.unlink(missing_ok=True)
            tf.unlink(missing_ok=True)
    return len(rounds), pairs


# rows measured per tensor by the native measurer (see sample_rows). On SmolLM2 (all 1166 pairs of the layout
# benchmark, token_embd aside), sampled against whole tensors: 192 rows give 0.935-1.052 of the whole error (p5-p95;
# the ratio of two types' errors in one tensor 0.958-1.041) in 16 s, 256 rows 0.958-1.055 (0.963-1.032) in 22-26 s,
# 128 rows 0.913-1.075 (0.940-1.062) in 12-19 s, whole tensors 53-63 s (2 threads)
DEFAULT_ROWS = 192


def sample_rows(name: str, n_rows: int, max_rows: int, row_weights: np.ndarray | None, seed: int
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows of a tensor to measure and the weight of each (the whole tensor's ``n_rows`` weights, zero where a
    row is not measured), or ``(None, row_weights)`` for every row. ``max_rows`` 0: every row that weighs anything.
    Rows are drawn without replacement and weighed by the inverse of their chance to be drawn (an unbiased estimate
    of the whole tensor's error); with row weights (the token embedding's token frequencies) the heaviest half of
    the rows is always measured and the rest drawn from the others, as they carry most of the error."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if row_weights is None:
        if max_rows <= 0 or n_rows <= max_rows:
            return None, None
        rows = np.sort(rng.choice(n_rows, size=max_rows, replace=False))
        w = np.zeros(n_rows, dtype=np.float32)
        w[rows] = n_rows / max_rows
        return rows.astype(np.int64), w
    base = np.asarray(row_weights, dtype=np.float64)
    nz = np.flatnonzero(base > 0)
    if max_rows <= 0 or len(nz) <= max_rows:
        return nz.astype(np.int64), base.astype(np.float32)
    order = nz[np.argsort(-base[nz], kind="stable")]
    top, rest = order[: max_rows // 2], order[max_rows // 2:]
    k = max_rows - len(top)
    drawn = rng.choice(rest, size=k, replace=False)
    w = np.zeros(n_rows, dtype=np.float64)
    w[top] = base[top]
    w[drawn] = base[drawn] * (len(rest) / k)
    return np.sort(np.concatenate([top, drawn])).astype(np.int64), w.astype(np.float32)


@dataclasses.dataclass
class RowStore:
    """The quantized bytes of the rows :func:`quantize_native` measured, kept for the builds: a tensor built in a
    measured type copies these rows (``ggufbot-assemble``) and quantizes only the others. ``bytes_path`` holds the
    rows of every pair one after another, ``rows_path`` the int64 row indices of the sampled tensors; ``entries``:
    (tensor, type) -> (offset in bytes_path, offset in rows_path in rows (-1: rows 0..n-1), rows). Lives in a scratch
    dir for one run (the error cache outlives it; a pair measured in an earlier run has no rows here). The pairs a
    stock file holds are not kept (``held``: the build copies those tensors whole): on SmolLM2's layout benchmark
    that leaves 69 of the 108 MB of measured rows (computed from the run's measurements)."""

    bytes_path: Path
    rows_path: Path
    entries: dict[tuple[str, str], tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    _rows_at: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, directory: Path) -> "RowStore":
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory / "rows.bin", directory / "rows.i64")
        for p in (store.bytes_path, store.rows_path):
            p.write_bytes(b"")
        return store

    def get(self, name: str, q: str) -> tuple[int, int, int] | None:
        return self.entries.get((name, q))

    def _add(self, new_bytes: Path, placed: Mapping[tuple[str, str], int], rows: Mapping[str, np.ndarray | None],
             n_rows: Mapping[str, int]) -> None:
        base = self.bytes_path.stat().st_size
        with open(self.bytes_path, "ab") as out, open(new_bytes, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
        with open(self.rows_path, "ab") as rf:
            for (name, q), off in placed.items():
                sel = rows.get(name)
                if sel is not None and name not in self._rows_at:
                    self._rows_at[name] = rf.tell() // 8
                    rf.write(np.ascontiguousarray(sel, dtype="<i8").tobytes())
                self.entries[(name, q)] = (base + off, self._rows_at[name] if sel is not None else -1, n_rows[name])


def quantize_native(program: Path, reference: Path, scratch: Path, wanted: Mapping[str, Iterable[str]],
                    weights: Weights, imatrix: Mapping[str, np.ndarray], cache: ErrorCache, *,
                    threads: int | None = None, timeout: float | None = None,
                    store: RowStore | None = None, held: Collection[tuple[str, str]] = ()) -> tuple[int, int]:
    """Measure every wanted pair the cache lacks with ``ggufbot-tensorerr`` (module doc), on the rows
    :func:`sample_rows` picks with the cache key's ``rows`` and ``seed``; returns (tensors read, pairs measured).
    A pair llama.cpp would not write (a row length off the type's block, an imatrix-only type without one) is
    recorded as unavailable. ``store``: the measured rows' quantized bytes are added to it, except those of the
    ``held`` (tensor, type) pairs (a file the builds copy from holds those tensors whole)."""
    missing = cache.missing(wanted)
    if not missing:
        return 0, 0
    ref = {t.name: t for t in tensors(reference)}
    scratch.mkdir(parents=True, exist_ok=True)
    wfile, rfile, req = scratch / "weights.f32", scratch / "request-rows.i64", scratch / "request.txt"
    bfile = scratch / "request-bytes.bin"
    floats, ints, lines = 0, 0, []
    chosen: dict[str, np.ndarray | None] = {}
    selected: dict[str, int] = {}
    with open(wfile, "wb") as wf, open(rfile, "wb") as rf:
        for name, qs in missing.items():
            t = ref[name]
            shape = [int(x) for x in t.shape]
            n_rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            matrices = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            imat_off = -1
            im = imatrix.get(name)
            if im is not None and im.size == shape[0] * matrices:
                wf.write(np.ascontiguousarray(im, dtype="<f4").tobytes())
                imat_off, floats = floats, floats + im.size
            row_w = weights.token_rows if name == TOKEN_EMBD and name not in weights.importance else None
            if row_w is not None and len(row_w) != n_rows:
                row_w = None
            rows, w = sample_rows(name, n_rows, cache.key.rows, row_w, cache.key.seed)
            roww_off = -1
            if w is not None:
                wf.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
                roww_off, floats = floats, floats + len(w)
            rows_off, n_sel = -1, n_rows
            if rows is not None:
                rf.write(np.ascontiguousarray(rows, dtype="<i8").tobytes())
                rows_off, ints, n_sel = ints, ints + len(rows), len(rows)
            chosen[name], selected[name] = rows, n_sel
            kinds = [f"{q}-" if store is not None and (name, q) in held else q for q in qs]
            lines.append(f"{name} {','.join(kinds)} {imat_off} {roww_off} {rows_off} {n_sel}")
    req.write_text("\n".join(lines) + "\n")
    pairs = 0
    placed: dict[tuple[str, str], int] = {}
    try:
        res = run([program, reference, req, wfile, rfile, str(threads or proc.cpus()),
                   *([bfile] if store is not None else [])], timeout=timeout, keep_output=64_000_000)
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) not in (3, 4):
                continue
            name, q, value = parts[:3]
            if value == "NA":
                cache.put(name, q, None)
            else:
                cache.put(name, q, float(value))
                pairs += 1
                if len(parts) == 4:
                    placed[(name, q)] = int(parts[3])
        if store is not None:
            store._add(bfile, placed, chosen, selected)
    finally:
        for f in (wfile, rfile, req, bfile):
            f.unlink(missing_ok=True)
    left = cache.missing({n: qs for n, qs in missing.items()})
    if left:
        n, qs = next(iter(left.items()))
        raise ParseError(f"{program.name} printed no error for {sum(map(len, left.values()))} pair(s), e.g. {n} "
                         f"{qs[0]}")
    return len(missing), pairs


def grid_types(errors: Mapping[str, Mapping[str, float]], *, share: float = 0.5) -> list[str]:
    """Quantized types that match the source's own grid: for more than ``share`` of the tensors measured with a
    larger quantized type too, the type's error is below the largest measured type's (a source rebuilt from a Q4_1 file:
    Q4_1 and Q5_1 reproduce its weights, which no real checkpoint allows)."""
    seen: dict[str, int] = {}
    beats: dict[str, int] = {}
    for row in errors.values():
        quantized = {q: e for q, e in row.items() if q in layout.QUANT_SIZES and q not in layout.UNQUANTIZED
                     and e is not None}
        if len(quantized) < 2:
            continue
        top = max(quantized, key=layout.bits_per_weight)
        for q, e in quantized.items():
            if layout.bits_per_weight(q) < layout.bits_per_weight(top):
                seen[q] = seen.get(q, 0) + 1
                beats[q] = beats.get(q, 0) + (e < quantized[top])
    return sorted(q for q, n in seen.items() if beats.get(q, 0) > share * n)
