"""llama-perplexity and llama-tokenize for the evaluation: argv, runs, output parsers, and the base-logits file.

``llama-perplexity --kl-divergence-base`` stores the reference (BF16) model's log-probabilities over the
evaluation text once; ``--kl-divergence`` then scores each quant against that file (each quant is read once).
The output is parsed into :class:`~converters.core.report.KldStats`; output that cannot be parsed raises
:class:`~converters.core.errors.ParseError` (a figure is never a silent 0).

Per-chunk means (``KldStats.chunk_kld``, what the chunk-based standard error and paired differences are computed
from). llama-perplexity prints, per chunk, the *running* mean KLD with 5 decimals; its final summary has the mean
to 6. Two ways to get each chunk's mean:

- differencing the running means of one run over all chunks (``chunk_i = i*m_i - (i-1)*m_(i-1)``): the rounding
  of the printed means (up to 5e-6 each) grows with ``i``, so chunk i carries up to about ``i * 1e-5``;
- views (:meth:`BaseLogits.write_view`): a base-logits file holding chunks ``[a, b)`` only, streamed from the
  job's base file, scored by its own run: exact per batch (its 6-decimal summary), differenced only within the
  batch, at one model load per batch.

The evaluation uses views (:mod:`.sequential`): it must stop scoring a file part-way anyway (a run over every
chunk cannot stop early and keep its summary), and a batch of a few chunks keeps the differencing error near
1e-5 however long the text, where one run over hundreds of chunks would bury a Q8_0-size KLD of 1e-3 in rounding.
:func:`chunk_klds` differences a run's table (within a batch, or the whole run for callers that score every
chunk at once) and shifts the series onto the exact final mean. Measured on SmolLM2-135M's Q8_0 (ctx 512, 16
chunks, mean KLD 0.0042, chunk means spread 15 % of it; each chunk's exact mean from a one-chunk view): the
series differenced over one 16-chunk run is off by up to 9.9e-5 (rms 4.9e-5, 7.7e-5 over the last quarter, and
growing with the chunk's place); over two 8-chunk views, by up to 3.5e-5 (rms 1.7e-5). The chunk-based standard
error was 1.56e-4 exact, 1.59e-4 and 1.58e-4 from the two series, 7.2e-5 per token as llama.cpp prints it. A view
costs one model load: 16 one-chunk runs took 683 s against 487 s for one 16-chunk run (13 s a load on a 2-core box
loaded twenty times over), two 8-chunk runs 451 s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters.core import proc
from converters.llama import gpu
from converters.llama import toolchain as tc_mod
from converters.core.errors import InputError, ParseError
from converters.core.report import KldStats

log = logging.getLogger(__package__)  # the package's name, as before the split (log lines name it)

KLD_TIMEOUT = 48 * 3600
TOKENIZE_TIMEOUT = 1800


# --------------------------------------------------------------------------------------------------
# Parsing llama-perplexity's output
# --------------------------------------------------------------------------------------------------

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
_PM = _NUM + r"\s*±\s*" + _NUM

_KLD_FIELDS: tuple[tuple[str, str, int], ...] = (
    # (regex, figure names, how many numbers)
    (r"Mean PPL\(Q\)\s*:\s*" + _PM, "ppl ppl_err", 2),
    (r"Mean PPL\(base\)\s*:\s*" + _PM, "ppl_base ppl_base_err", 2),
    (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _PM, "ln_ppl_ratio ln_ppl_ratio_err", 2),
    (r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _PM, "ppl_ratio ppl_ratio_err", 2),
    (r"Mean PPL\(Q\)-PPL\(base\)\s*:\s*" + _PM, "ppl_diff ppl_diff_err", 2),
    (r"Mean\s+KLD:\s*" + _PM, "kld_mean kld_mean_err", 2),
    (r"Maximum KLD:\s*" + _NUM, "kld_max", 1),
    (r"99\.9%\s+KLD:\s*" + _NUM, "kld_p999", 1),
    (r"99\.0%\s+KLD:\s*" + _NUM, "kld_p99", 1),
    (r"Median\s+KLD:\s*" + _NUM, "kld_median", 1),
    (r"Mean\s+Δp:\s*" + _PM + r"\s*%", "dp_mean dp_mean_err", 2),
    (r"RMS Δp\s*:\s*" + _PM + r"\s*%", "rms_dp rms_dp_err", 2),
    (r"Same top p:\s*" + _PM + r"\s*%", "same_top_p same_top_p_err", 2),
)
_PERCENT = {"dp_mean", "dp_mean_err", "rms_dp", "rms_dp_err", "same_top_p", "same_top_p_err"}


def _float(s: str) -> float:
    return float(s.lower().lstrip("+"))


def parse_kld_output(text: str) -> KldStats:
    """The final statistics of ``llama-perplexity --kl-divergence`` (stdout and stderr together)."""
    if "====== KL divergence statistics ======" not in text:
        errors = [ln for ln in text.splitlines() if re.search(r"\b(error|failed|inconsistent)\b", ln, re.I)]
        hint = errors[-1].strip() if errors else "no statistics block (fewer than 100 tokens scored?)"
        raise ParseError(f"llama-perplexity --kl-divergence printed no KL divergence statistics: {hint}")
    values: dict[str, Any] = {}
    for pattern, names, _n in _KLD_FIELDS:
        m = re.search(pattern, text, re.I)
        if not m:
            raise ParseError(f"llama-perplexity output has no {names.split()[0]!r} line (pattern {pattern!r})")
        for name, raw in zip(names.split(), m.groups()):
            v = _float(raw)
            if name in _PERCENT:
                v = round(v / 100.0, 12) if math.isfinite(v) else v / 100.0
            values[name] = v
    m = re.search(r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*" + _NUM + r"\s*%", text, re.I)
    values["ppl_correlation"] = round(_float(m.group(1)) / 100.0, 12) if m else None
    chunk_rows = re.findall(r"^\s*(\d+)\s+" + _PM, text, re.M | re.I)
    if not chunk_rows:
        raise ParseError("llama-perplexity output has no per-chunk table")
    values["chunks"] = int(chunk_rows[-1][0])
    values["kld_mean_err_token"] = values["kld_mean_err"]
    series = chunk_klds(text, values["kld_mean"])
    if series and len(series) != values["chunks"]:
        raise ParseError(f"llama-perplexity's per-chunk table has {len(series)} KLD rows for {values['chunks']} "
                         "chunks")
    ln_ratio = chunk_means(text, values["ln_ppl_ratio"], column=3)
    return KldStats(**values, chunk_kld=series, chunk_ln_ppl_ratio=ln_ratio).with_chunk_error()


_CHUNK_ROW = re.compile(r"^\s*(\d+)\s+" + _PM + r"\s+" + _PM + r"\s+" + _PM, re.M | re.I)


def chunk_klds(text: str, final_mean: float) -> tuple[float, ...]:
    """The mean KLD of each chunk, from the per-chunk table's running means (``%10.5lf``): chunk i (1-based) is
    ``i*m_i - (i-1)*m_(i-1)``, then every value is shifted by the same amount so that their mean is the final
    ``Mean KLD`` (printed to 6 decimals). Each printed running mean is rounded by up to 5e-6, so chunk i carries
    an error of up to about ``i * 1e-5``: exact enough over a batch of a few chunks (how the sequential
    evaluation runs it, :mod:`.sequential`), not over hundreds of chunks at a KLD of 1e-3."""
    return chunk_means(text, final_mean, column=5)


def chunk_means(text: str, final_mean: float, *, column: int) -> tuple[float, ...]:
    """Each chunk's mean of a running mean the per-chunk table prints (``column`` of :data:`_CHUNK_ROW`'s groups:
    3 ``ln(PPL(Q)/PPL(base))``, 5 KLD), differenced and shifted onto ``final_mean`` as :func:`chunk_klds` says."""
    running = [(int(m[0]), _float(m[column])) for m in _CHUNK_ROW.findall(text)]
    if not running:
        return ()
    if [i for i, _ in running] != list(range(1, len(running) + 1)):
        raise ParseError("llama-perplexity's per-chunk table is not in chunk order")
    out, prev = [], 0.0
    for i, m in running:
        out.append(i * m - (i - 1) * prev)
        prev = m
    shift = final_mean - running[-1][1]  # the series' mean is exactly the last running mean
    return tuple(x + shift for x in out)


_QUANTILE_LINES = ((0.0, r"Minimum KLD"), (0.001, r"0\.1%\s+KLD"), (0.01, r"1\.0%\s+KLD"),
                   (0.05, r"5\.0%\s+KLD"), (0.1, r"10\.0%\s+KLD"), (0.5, r"Median\s+KLD"),
                   (0.9, r"90\.0%\s+KLD"), (0.95, r"95\.0%\s+KLD"), (0.99, r"99\.0%\s+KLD"),
                   (0.999, r"99\.9%\s+KLD"), (1.0, r"Maximum KLD"))


def parse_kld_quantiles(text: str) -> dict[float, float]:
    """The per-token KLD percentiles llama-perplexity prints ({fraction: value}, 0 the minimum, 1 the maximum)."""
    out = {}
    for level, label in _QUANTILE_LINES:
        m = re.search(r"^\s*" + label + r":\s*" + _NUM, text, re.M | re.I)
        if not m:
            raise ParseError(f"llama-perplexity output has no {label.replace(chr(92), '')!r} line")
        out[level] = _float(m.group(1))
    return out


def parse_base_output(text: str) -> tuple[float, float]:
    """PPL ± error of the reference from ``llama-perplexity --kl-divergence-base`` (its final estimate)."""
    m = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, text, re.I)
    if not m:
        errors = [ln for ln in text.splitlines() if re.search(r"\b(error|failed|need at least)\b", ln, re.I)]
        hint = errors[-1].strip() if errors else "no final estimate"
        raise ParseError(f"llama-perplexity --kl-divergence-base did not finish: {hint}")
    return _float(m.group(1)), _float(m.group(2))


# --------------------------------------------------------------------------------------------------
# The base-logits file (format written by tools/perplexity/perplexity.cpp)
# --------------------------------------------------------------------------------------------------
# "_logits_" | n_ctx u32 | n_vocab i32 | n_chunk i32 | tokens i32[n_chunk*n_ctx] |
# per chunk, per scored position (n_ctx - 1 - n_ctx/2 of them): nv = 2*((n_vocab+1)/2) + 4 uint16, the
# first four holding two float32 (scale, min_log_prob), then log p_i = scale * q_i + min_log_prob.

LOGITS_MAGIC = b"_logits_"


def scored_per_chunk(ctx: int) -> int:
    return ctx - 1 - ctx // 2


def base_logits_bytes(n_vocab: int, ctx: int, chunks: int) -> int:
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 8 + 12 + 4 * ctx * chunks + chunks * scored_per_chunk(ctx) * nv * 2


@dataclasses.dataclass(frozen=True)
class BaseLogits:
    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def nv(self) -> int:
        return 2 * ((self.n_vocab + 1) // 2) + 4

    @property
    def header_bytes(self) -> int:
        return 20 + 4 * self.n_ctx * self.n_chunk

    @classmethod
    def open(cls, path: Path) -> "BaseLogits":
        import numpy as np

        with open(path, "rb") as f:
            head = f.read(20)
        if len(head) < 20 or head[:8] != LOGITS_MAGIC:
            raise InputError(f"{path.name} is not a llama.cpp base-logits file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(head[8:20], dtype="<i4"))
        bl = cls(path, n_ctx, n_vocab, n_chunk)
        expected = base_logits_bytes(n_vocab, n_ctx, n_chunk)
        if path.stat().st_size != expected:
            raise InputError(f"{path.name}: {path.stat().st_size} bytes, expected {expected} for "
                             f"{n_chunk} chunks of {n_ctx} tokens and {n_vocab} vocabulary entries")
        return bl

    def tokens(self, chunk: int):
        import numpy as np

        return np.fromfile(self.path, dtype="<i4", count=self.n_ctx, offset=20 + 4 * self.n_ctx * chunk)

    def log_probs(self, chunk: int):
        """float64 [scored positions, n_vocab] log-probabilities of the reference for one chunk."""
        import numpy as np

        rows = scored_per_chunk(self.n_ctx)
        off = self.header_bytes + chunk * rows * self.nv * 2
        q = np.fromfile(self.path, dtype="<u2", count=rows * self.nv, offset=off).reshape(rows, self.nv)
        head = np.ascontiguousarray(q[:, :4]).view("<f4").reshape(rows, 2).astype(np.float64)
        return head[:, :1] * q[:, 4:4 + self.n_vocab].astype(np.float64) + head[:, 1:2]

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk's stored log-probabilities."""
        return scored_per_chunk(self.n_ctx) * self.nv * 2

    def write_view(self, out: Path, start: int, stop: int) -> "BaseLogits":
        """A base-logits file holding chunks ``[start, stop)`` of this one (llama-perplexity then scores exactly
        those chunks), copied in blocks: neither file is ever held in memory."""
        if not 0 <= start < stop <= self.n_chunk:
            raise InputError(f"chunks [{start}, {stop}) are not within the {self.n_chunk} chunks of {self.path.name}")
        n = stop - start
        with open(self.path, "rb") as src, open(out, "wb") as dst:
            dst.write(LOGITS_MAGIC + struct.pack("<Iii", self.n_ctx, self.n_vocab, n))
            _copy_range(src, dst, 20 + 4 * self.n_ctx * start, 4 * self.n_ctx * n)
            _copy_range(src, dst, self.header_bytes + start * self.chunk_bytes, n * self.chunk_bytes)
        return BaseLogits.open(out)


_COPY_BLOCK = 16 << 20


def _copy_range(src: Any, dst: Any, offset: int, length: int) -> None:
    src.seek(offset)
    while length > 0:
        block = src.read(min(_COPY_BLOCK, length))
        if not block:
            raise InputError(f"{Path(src.name).name} ends before byte {offset + length}")
        dst.write(block)
        length -= len(block)



# --------------------------------------------------------------------------------------------------
# Running llama-perplexity
# --------------------------------------------------------------------------------------------------


def _perplexity_argv(tc: tc_mod.Toolchain, model: Path, threads: int | None) -> list[Any]:
    argv: list[Any] = [tc.program("llama-perplexity"), "-m", model]
    if threads:
        argv += ["-t", str(threads)]
    return argv + gpu.offload_args(tc, model)  # a CUDA toolchain: the layers that fit on the GPU (docs/PIPELINE.md)


def _run_parsed(argv: list[Any], parse: Callable[[str], Any]) -> tuple[Any, float]:
    """Run and parse; a run whose output cannot be parsed is repeated once before ParseError is raised.

    (llama.cpp prints through a logging thread; a lost final block would otherwise fail a good file.)
    """
    seconds = 0.0
    for attempt in (1, 2):
        res = proc.run(argv, timeout=KLD_TIMEOUT)
        seconds += res.seconds
        try:
            return parse(res.stdout + "\n" + res.stderr), seconds
        except ParseError as e:
            if attempt == 2:
                raise
            log.warning("evaluate: %s; running %s once more", e, Path(str(argv[0])).name)
    raise AssertionError("unreachable")


def run_base(tc: tc_mod.Toolchain, model: Path, text: Path, out: Path, *, ctx: int, chunks: int,
             threads: int | None = None) -> tuple[float, float, float]:
    """Store the reference's log-probabilities in ``out``; return (PPL, PPL error, seconds)."""
    argv = _perplexity_argv(tc, model, threads) + ["-f", text, "-c", str(ctx), "--chunks", str(chunks),
                                                    "--kl-divergence-base", out]
    (ppl, err), seconds = _run_parsed(argv, parse_base_output)
    if not out.exists():
        raise ParseError("llama-perplexity did not write the base-logits file")
    return ppl, err, seconds


def run_kld(tc: tc_mod.Toolchain, model: Path, base: Path, *, ctx: int,
            threads: int | None = None) -> tuple[KldStats, float]:
    """Score ``model`` against the stored reference log-probabilities: (figures, seconds)."""
    argv = _perplexity_argv(tc, model, threads) + ["-c", str(ctx), "--kl-divergence-base", base, "--kl-divergence"]
    stats, seconds = _run_parsed(argv, parse_kld_output)
    return stats, seconds



def run_kld_batch(tc: tc_mod.Toolchain, model: Path, base: Path, *, ctx: int,
                  threads: int | None = None) -> tuple[KldStats, dict[float, float], float]:
    """:func:`run_kld` that also returns the KLD percentiles (what batches are combined with)."""
    argv = _perplexity_argv(tc, model, threads) + ["-c", str(ctx), "--kl-divergence-base", base, "--kl-divergence"]
    (stats, quantiles), seconds = _run_parsed(argv, lambda t: (parse_kld_output(t), parse_kld_quantiles(t)))
    return stats, quantiles, seconds


def count_tokens(tc: tc_mod.Toolchain, gguf: Path, text: Path) -> int:
    res = proc.run([tc.program("llama-tokenize"), "-m", gguf, "-f", text, "--ids", "--show-count", "--log-disable"],
                     timeout=TOKENIZE_TIMEOUT, keep_output=20_000)
    m = re.search(r"Total number of tokens:\s*(\d+)", res.stdout)
    if not m:
        raise ParseError("llama-tokenize printed no token count")
    return int(m.group(1))

