"""Final-answer extraction and numeric comparison for math word problems.

Protocol
--------
:func:`extract_final_number` reads a model's (or a reference's) final answer from free text:

1. the number right after the first ``####`` that is directly followed by one (GSM8K's answer
   line ``#### 72``; only spaces may come between, so a markdown heading ``#### Step 1`` is
   not an answer). What follows that number is ignored, as in lm-evaluation-harness's strict
   GSM8K match;
2. otherwise the first number after the last "answer is" / "answer:" (case-insensitive);
3. otherwise the last number anywhere in the text;
4. otherwise ``None``.

A number is an optional sign (``-`` or the Unicode minus, glued to the digits or to a ``$``,
and not glued to a preceding word or digit: ``pages 10-20`` reads ``10`` and ``20``, and
``12 - 7`` reads ``12`` and ``7``), an optional ``$``, digits with
optional thousands commas (``1,200`` but not ``12,5``) and an optional decimal part; currency
signs, units, ``%`` and trailing punctuation are ignored (``"$1,200.50 dollars."`` -> ``1200.5``).
Numbers are returned normalised by :func:`normalize_number`: no commas, no ``+``, no trailing
zeros (``"12.0"`` -> ``"12"``, ``"-0"`` -> ``"0"``).

:func:`numbers_equal` compares two answers numerically, by exact decimal equality after
normalisation: ``"12"`` equals ``"12.0"``, ``"1,200"`` equals ``"1200"``, ``"-3"`` does not
equal ``"3"``, and nothing equals ``None`` (no answer found). Fractions such as ``3/4`` are
not evaluated (they read as two numbers).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# sign (not after a word char / digit / dot), optional $, integer with optional thousands
# groups, or a bare decimal fraction, then an optional decimal part.
_NUMBER = re.compile(
    r"(?<![\w.])(?:(?P<sign>[-−])\$?|\$(?P<sign2>[-−])?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)
_MARKER_THEN = re.compile(r"####[ \t]*")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def normalize_number(text: str | int | float | Decimal | None) -> str | None:
    """Canonical string of a number (``"1,200.50"`` -> ``"1200.5"``), or ``None`` if not a number."""
    if text is None:
        return None
    if isinstance(text, (int, float, Decimal)):
        value = Decimal(str(text))
    else:
        s = text.strip().replace(",", "").replace("$", "").replace("−", "-").replace(" ", "")
        s = s.rstrip(".")
        if s.startswith("+"):
            s = s[1:]
        if not s:
            return None
        try:
            value = Decimal(s)
        except InvalidOperation:
            return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _as_text(m: re.Match[str]) -> str:
    return ("-" if m.group("sign") or m.group("sign2") else "") + m.group("num")


def _numbers(text: str) -> list[str]:
    return [_as_text(m) for m in _NUMBER.finditer(text)]


def extract_final_number(text: str | None) -> str | None:
    """The final answer in ``text`` as a normalised number string, or ``None`` (see module docstring)."""
    if not text:
        return None
    for marker in _MARKER_THEN.finditer(text):
        m = _NUMBER.match(text, marker.end())
        if m:
            return normalize_number(_as_text(m))
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        after = _numbers(text[matches[-1].end() :])
        if after:
            return normalize_number(after[0])
    found = _numbers(text)
    return normalize_number(found[-1]) if found else None


def numbers_equal(a: str | int | float | None, b: str | int | float | None) -> bool:
    """Whether two answers are the same number (``"12" == "12.0"``, ``"1,200" == "1200"``)."""
    na, nb = normalize_number(a), normalize_number(b)
    if na is None or nb is None:
        return False
    return Decimal(na) == Decimal(nb)


__all__ = ["extract_final_number", "normalize_number", "numbers_equal"]
