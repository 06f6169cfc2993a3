"""Text from elsewhere (a source repo's chat template, card data, check details) made inert in the bot's Markdown.

The bot's card is rendered from a template; every piece of text that comes from the source repo passes through
here first, so that it cannot close a code fence, open a link or an image, or inject HTML:

- :func:`fence` -- a code fence longer than any backtick run in the text it encloses;
- :func:`cell` -- one line of plain text for a table cell or a sentence: Markdown punctuation backslash-escaped
  (CommonMark escapes any ASCII punctuation), pipes escaped, line breaks folded, and URL schemes, ``www.`` and
  ``@`` broken so that no autolink forms.
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"([\\`*_\[\]()<>|!~#{}&])")
_SCHEME = re.compile(r"(?i)\b(https?|ftps?|mailto|javascript|data|file|vbscript):")
_WWW = re.compile(r"(?i)\bwww\.")


def longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def fence(text: str) -> str:
    """A backtick fence that the text cannot close: at least three, one more than its longest backtick run."""
    return "`" * max(3, longest_backtick_run(text) + 1)


def cell(text: object) -> str:
    """``text`` as one line of inert Markdown (no link, image, HTML, code span or emphasis can form)."""
    out = " ".join(str(text).split())
    out = _PUNCT.sub(r"\\\1", out)
    out = _SCHEME.sub(r"\1\\:", out)
    out = _WWW.sub(r"www\\.", out)
    return out.replace("@", "\\@")
