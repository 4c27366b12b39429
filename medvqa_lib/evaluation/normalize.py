"""Answer normalisation in the style of the official VQA evaluation.

Both the reference answer and the model output go through :func:`normalize_answer`
before any exact-match or token-recall comparison, so that "The CT.", "ct" and
" CT " all count as the same answer.

Canonical forms chosen here:

* case: everything lower-cased ("CT" -> "ct", "MRI" -> "mri");
* x-ray: "X-Ray", "x ray", "X RAY", "xray" -> ``"xray"`` ("x-rays" -> ``"xrays"``);
* numbers: number words "zero" ... "twenty" -> digits; decimal points inside numbers are
  kept ("2.5"), thousands separators are dropped ("1,000" -> "1000"), "50 %" -> "50%";
* contractions: written with the apostrophe ("isnt" -> "isn't", "dont" -> "don't");
* articles "a", "an", "the" are dropped;
* any other punctuation or symbol (hyphens, slashes, commas, brackets, quotes, ...)
  becomes a space; a period that is not part of a number is deleted ("e.g." -> "eg");
* whitespace collapsed to single spaces, no leading/trailing space.

Unlike the official VQA script, "none" is *not* mapped to "0": in medical answers
"none" usually means "no finding", not a count.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

__all__ = ["normalize_answer", "normalized_tokens"]

_ARTICLES = frozenset({"a", "an", "the"})

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
}

_NEGATIONS = ("is are was were do does did has have had could would should must need").split()
_CONTRACTIONS = {f"{w}nt": f"{w}n't" for w in _NEGATIONS}
_CONTRACTIONS.update(
    {
        "cant": "can't",
        "wont": "won't",
        "thats": "that's",
        "theres": "there's",
        "whats": "what's",
    }
)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
_KEEP_SYMBOLS = frozenset("'%.")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A period is deleted unless it is followed by a digit and not preceded by a letter
# ("2.5" and ".5" keep it; "yes.", "e.g." and "v.2" lose it).
_STRAY_PERIOD = re.compile(r"\.(?!\d)|(?<=[^\W\d_])\.")
_SPACE_PERCENT = re.compile(r"(?<=\d)\s+%")


def _to_text(value: Any) -> str:
    """``str(value)``, with ``None`` and float NaN mapped to ``""``."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value if isinstance(value, str) else str(value)


def _symbols_to_space(text: str) -> str:
    """Replace punctuation and symbol characters (except ``' % .``) by spaces."""
    return "".join(
        " " if ch not in _KEEP_SYMBOLS and unicodedata.category(ch)[0] in "PS" else ch
        for ch in text
    )


def _merge_xray(tokens: list[str]) -> list[str]:
    """Join the pair ``x`` + ``ray``/``rays`` into one token ``xray``/``xrays``."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "x" and i + 1 < len(tokens) and tokens[i + 1] in ("ray", "rays"):
            out.append("x" + tokens[i + 1])
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def _map_token(token: str) -> str:
    token = token.strip("'")
    token = _CONTRACTIONS.get(token, token)
    return _NUMBER_WORDS.get(token, token)


def normalize_answer(text: Any) -> str:
    """Normalise an answer or prediction for exact-match comparison.

    Non-strings are converted with ``str`` (``None`` and NaN become ``""``).

    >>> normalize_answer("The CT.")
    'ct'
    >>> normalize_answer("X-Ray") == normalize_answer("x ray") == normalize_answer("XRAY")
    True
    >>> normalize_answer("Two lesions, left-side")
    '2 lesions left side'
    >>> normalize_answer("2.5 cm")
    '2.5 cm'
    >>> normalize_answer("It isnt an MRI!")
    "it isn't mri"
    >>> normalize_answer(3)
    '3'
    """
    text = unicodedata.normalize("NFKC", _to_text(text)).lower().translate(_APOSTROPHES)
    text = _THOUSANDS.sub("", text)
    text = _STRAY_PERIOD.sub("", text)
    text = _SPACE_PERCENT.sub("%", text)
    text = _symbols_to_space(text)
    tokens = _merge_xray([_map_token(t) for t in text.split()])
    return " ".join(t for t in tokens if t and t not in _ARTICLES)


def normalized_tokens(text: Any) -> list[str]:
    """The whitespace tokens of :func:`normalize_answer` (``[]`` for an empty answer)."""
    return normalize_answer(text).split()
