"""Each dataset's question-type codes mapped onto the shared vocabulary ``QUESTION_TYPES``.

VQA-RAD labels a question with one or more codes (``"PRES"``, ``"PRES, POS"``, plus two
misspellings in the release, ``"PRSE"`` and ``"ATRIB"``); a combined label maps to the type of
its *first* code, and the loaders keep the full list in ``extra["question_types"]``. SLAKE's
``content_type`` maps one to one. A code that is not known maps to ``"other"``.
"""

from __future__ import annotations

#: VQA-RAD ``question_type`` codes → shared type (misspellings found in the release included)
VQA_RAD_CODES: dict[str, str] = {
    "PRES": "presence",
    "PRSE": "presence",
    "POS": "position",
    "ABN": "abnormality",
    "SIZE": "size",
    "MODALITY": "modality",
    "PLANE": "plane",
    "ORGAN": "organ",
    "COUNT": "quantity",
    "COLOR": "color",
    "ATTRIB": "attribute",
    "ATRIB": "attribute",
    "OTHER": "other",
}

#: SLAKE ``content_type`` values → shared type
SLAKE_CONTENT_TYPES: dict[str, str] = {
    "organ": "organ",
    "position": "position",
    "abnormality": "abnormality",
    "kg": "knowledge",
    "modality": "modality",
    "size": "size",
    "plane": "plane",
    "quantity": "quantity",
    "color": "color",
    "shape": "shape",
}

#: answers that make a question closed-ended when a copy does not say (hub copies)
CLOSED_ANSWERS: frozenset[str] = frozenset({"yes", "no"})


def split_codes(raw: object) -> list[str]:
    """``"PRES, POS"`` → ``["PRES", "POS"]`` (upper-cased, blanks dropped)."""
    return [part.strip().upper() for part in str(raw).split(",") if part.strip()]


def vqa_rad_question_types(raw: object) -> list[str]:
    """Every shared type of a VQA-RAD label, in the label's order (unknown codes → ``"other"``)."""
    types = [VQA_RAD_CODES.get(code, "other") for code in split_codes(raw)]
    return types or ["other"]


def vqa_rad_question_type(raw: object) -> str:
    """The shared type of a VQA-RAD label: the type of its first code."""
    return vqa_rad_question_types(raw)[0]


def slake_question_type(raw: object) -> str:
    """The shared type of a SLAKE ``content_type`` (unknown → ``"other"``)."""
    return SLAKE_CONTENT_TYPES.get(str(raw).strip().lower(), "other")


def normalize_answer_type(raw: object) -> str:
    """``"CLOSED"``, ``"CLOSED "``, ``"closed"`` → ``"closed"``; anything else → ``"open"``."""
    return "closed" if str(raw).strip().lower() == "closed" else "open"


def infer_answer_type(answer: object) -> str:
    """``"closed"`` for a yes/no answer, else ``"open"`` (for copies that lack the field)."""
    return "closed" if str(answer).strip().lower() in CLOSED_ANSWERS else "open"
