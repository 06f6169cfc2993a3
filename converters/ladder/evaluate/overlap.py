"""Does the evaluation text overlap the calibration text? Word n-gram (shingle) overlap, streamed and hashed.

A quant calibrated on a text (its importance matrix) and judged on the same text looks better than it is. Equal
files are caught by their sha256; this catches the rest: a text that embeds passages of the other (a shared
Wikipedia article, a copied paragraph), however the files differ around them.

The method: both texts are read in blocks (:data:`BLOCK_BYTES`, so a large text is never held whole), cut into words
(lower-cased runs of letters and digits: punctuation, spacing and WikiText's `` @-@ `` escapes do not hide a copy),
and every run of :data:`N_WORDS` consecutive words is hashed to 64 bits (each word's hash mixed with splitmix64,
then a polynomial over the run, vectorised with numpy). The overlap is the share of a text's distinct shingles that the
other text has too, taken both ways (a short calibration text copied whole into a long evaluation text is 100 % of
the calibration side); :func:`check` refuses above :data:`MAX_FRACTION`.

Why 13 words: that is the n of the contamination studies of GPT-3 and its successors (13-gram collisions between
independent English texts are rare: shared idioms and boilerplate are shorter), and words rather than tokens keep
the check independent of the model's tokenizer, so it runs before any program. Why 1 %: the evaluation's figures
are means over its tokens, so text seen in calibration can bias them by at most its share; under 1 % that is well
inside the paired errors the gate asks for, while one copied page of a short text (the case to catch) is far above
it. Collisions of the 64-bit hashes are negligible at these sizes (~1e-10 for a million shingles each side).

Memory: 8 bytes per distinct shingle of each text (about 8 bytes per word: 10 MB of text, ~15 MB).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from converters.core.errors import InputError

N_WORDS = 13
MAX_FRACTION = 0.01
BLOCK_BYTES = 4 << 20
_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)


@dataclasses.dataclass(frozen=True)
class Overlap:
    """Distinct shingles of each text and how many both have; ``fraction`` is the larger share of the two."""

    n: int
    eval_shingles: int
    calibration_shingles: int
    shared: int
    seconds: float

    @property
    def eval_fraction(self) -> float:
        return self.shared / self.eval_shingles if self.eval_shingles else 0.0

    @property
    def calibration_fraction(self) -> float:
        return self.shared / self.calibration_shingles if self.calibration_shingles else 0.0

    @property
    def fraction(self) -> float:
        return max(self.eval_fraction, self.calibration_fraction)

    def to_json(self) -> dict[str, float | int]:
        return {"n_words": self.n, "eval_shingles": self.eval_shingles,
                "calibration_shingles": self.calibration_shingles, "shared": self.shared,
                "eval_fraction": round(self.eval_fraction, 6),
                "calibration_fraction": round(self.calibration_fraction, 6), "seconds": round(self.seconds, 3)}


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _MULT
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort and a mask: faster here than ``np.unique``'s hash table)."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def _blocks(path: Path) -> Iterator[str]:
    """The text in blocks that end on a word boundary (the word cut by a block's end is carried to the next)."""
    carry = ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        while block := fh.read(BLOCK_BYTES):
            text = carry + block
            cut = len(text)
            while cut > 0 and (text[cut - 1].isalnum() or text[cut - 1] == "_"):
                cut -= 1
            if cut == 0:  # one huge word: keep reading
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut]
    if carry:
        yield carry


def shingles(path: Path, n: int = N_WORDS) -> np.ndarray:
    """The distinct 64-bit hashes of every run of ``n`` words of the text at ``path`` (sorted). A word's hash is
    Python's string hash (salted per process: hashes of texts compared in one process agree, which is all the check
    needs) mixed with splitmix64; a run's is a polynomial over its words' (one vector pass per word position)."""
    powers = [np.uint64(pow(0x100000001B3, n - 1 - k, 1 << 64)) for k in range(n)]
    tail = np.zeros(0, dtype=np.uint64)
    parts = []
    with np.errstate(over="ignore"):
        for block in _blocks(path):
            words = _WORD.findall(block.lower())
            ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
            seq = np.concatenate([tail, _splitmix(ids)])
            runs = len(seq) - n + 1
            if runs > 0:
                acc = seq[:runs] * powers[0]
                for k in range(1, n):
                    acc += seq[k:k + runs] * powers[k]
                parts.append(_distinct(acc))
            tail = seq[len(seq) - (n - 1):] if n > 1 else seq[:0]
    return _distinct(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def measure(eval_text: Path, calibration_text: Path, n: int = N_WORDS) -> Overlap:
    """The shingle overlap of the two texts (see the module doc)."""
    t0 = time.monotonic()
    ev = shingles(eval_text, n)
    cal = shingles(calibration_text, n)
    shared = int(np.isin(ev, cal, assume_unique=True).sum()) if len(ev) and len(cal) else 0
    return Overlap(n, len(ev), len(cal), shared, time.monotonic() - t0)


def check(eval_text: Path, calibration_text: Path, *, n: int = N_WORDS, max_fraction: float = MAX_FRACTION) -> Overlap:
    """Raise :class:`InputError` when the texts share more than ``max_fraction`` of either's distinct ``n``-word runs;
    return the measured overlap otherwise (the report records it)."""
    o = measure(eval_text, calibration_text, n)
    if o.fraction > max_fraction:
        raise InputError(
            f"the evaluation text {eval_text.name} overlaps the calibration text {calibration_text.name}: "
            f"{o.eval_fraction:.1%} of the evaluation text's {n}-word runs and {o.calibration_fraction:.1%} of the "
            f"calibration text's are in both (at most {max_fraction:.0%} allowed); a quant must not be judged on "
            "the text it was calibrated on")
    return o
