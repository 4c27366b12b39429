"""A rule-based caption checker: does a caption contradict its attribute dictionary?

:func:`check_caption` returns one message per contradiction, each starting with the
attribute it concerns (``"nums: ..."``); an empty list means the caption is consistent.
The caption is lower-cased and cut into clauses at punctuation and at contrast words (*but*,
*although*, *yet*, ...). A term is **negated** when a cue (*no*, *not*, *without*, *free of*,
*other than*, *zero*, ...) ends at most four words before it in the same clause, or when
*not*/*absent* follows within three words. Only rules whose keys are in the dictionary run:

* ``modality`` -- the caption names another modality (CT, MRI, X-ray, ultrasound);
* ``plane`` -- it names another plane or projection (axial, coronal, sagittal, PA, AP, lateral);
* ``class`` (chest X-ray classes) -- *Lung Opacity*: normal wording (*normal*, *unremarkable*,
  *healthy*, *clear*, a negated *abnormal*/*lesion*) or a denied opacity; *Normal*: an
  affirmed opacity (*opacity*, *consolidation*, *infiltrate*, *opaque*) or abnormal wording;
  *No Lung Opacity / Not Normal*: an affirmed opacity or normal wording; *No Lung Opacity*:
  an affirmed opacity, normal or abnormal wording (neither is known);
* ``nums`` -- a count word or digit (or *no*/*zero*, *single*, *several*/*multiple*) at most
  three words before an opacity word disagrees with the number of opacities;
* ``location`` (lung zones) -- an affirmed side (*left*/*right*) or level (*upper*/*apical*,
  *lower*/*basal*) where no opacity lies, *bilateral*/*both lungs* with one side involved,
  *unilateral* with both; in a clause that denies opacity, the side and level words name
  where there is none (*no opacity at the bases*), which must hold no opacity zone. Such a
  regional denial is not a denial of opacity for the ``class`` and ``nums`` rules;
* ``organ`` -- an affirmed organ name (from a fixed list plus the dictionary's own organs,
  with an optional *left*/*right*) that is not among the dictionary's organs (an organ word
  inside an annotated disease, as *liver* in *liver cancer*, is allowed);
* ``pathology`` -- an affirmed disease word not covered by an annotated disease (*cancer*,
  *carcinoma*, *malignancy*, *mass* and *tumour* count as *tumor*), normal wording when a
  disease is annotated, abnormal wording when none is.

The rules are deliberately conservative: when in doubt a caption is flagged and dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from medvqa_lib.data.slake import DISEASE_LABELS
from medvqa_lib.transcap.attributes import ZONES

_CLAUSE_SPLIT = re.compile(
    r"[.;:!?,()\[\]/]|\b(?:but|although|though|yet|whereas|while|however|except)\b"
)
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_CUES_1 = frozenset({"no", "not", "without", "never", "none", "neither", "nor", "zero", "0",
                     "lacks", "lacking", "cannot", "isn't", "aren't", "doesn't", "excluding"})
_CUES_2 = frozenset({"free of", "absence of", "lack of", "other than", "rather than",
                     "instead of", "negative for", "rules out", "ruled out"})
_POST_CUES = frozenset({"not", "absent", "none", "excluded"})
_CUE_WINDOW = 5  # a cue ending at most 4 words before the term
_POST_WINDOW = 3

MODALITY_TERMS = {
    "x-ray": r"x-rays?|radiograph\w*|radiogram\w*|cxr|films?",
    "CT": r"ct|computed tomograph\w*|cat scan",
    "MRI": r"mri|mr|magnetic resonance",
    "ultrasound": r"ultrasound\w*|ultrasonograph\w*|sonograph\w*|sonogram\w*",
}
_MODALITY_GROUP = {"CXR": "x-ray", "X-RAY": "x-ray", "CT": "CT", "MRI": "MRI",
                   "US": "ultrasound", "ULTRASOUND": "ultrasound"}
PLANE_TERMS = {
    "AXIAL": r"axial\w*|transverse|transaxial",
    "CORONAL": r"coronal\w*",
    "SAGITTAL": r"sagittal\w*",
    "PA": r"pa|postero-?anterior\w*",
    "AP": r"ap|antero-?posterior\w*",
    "LATERAL": r"lateral",
}
OPACITY = r"opacit\w*|opacif\w*|opaque|consolidat\w*|infiltrat\w*|airspace disease"
NORMAL = r"normal(?:ly)?|unremarkable|healthy|clear"
ABNORMAL = r"abnormal\w*|lesions?|patholog\w*|diseased?"
SIDE = r"left|right"
BILATERAL = (r"bilateral\w*|both (?:\w+ )?(?:lungs?|sides?|zones?|hemithora\w*)"
             r"|(?:each|either) (?:lung|side)")
UNILATERAL = r"unilateral\w*"
LEVELS = {"upper": r"upper|apical|apex|apices|superior",
          "lower": r"lower|basal|basally|bases?|basilar|inferior"}
_COUNT_WORDS: dict[str, int | str] = {
    **{w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six",
                                   "seven", "eight", "nine", "ten", "eleven", "twelve"))},
    "no": 0, "single": 1, "solitary": 1, "lone": 1,
    "multiple": "many", "several": "many", "numerous": "many", "many": "many",
    "multifocal": "many",
}
_OPACITY_TOKEN = re.compile(r"^(?:opacit|opacif|opaque|consolidat|infiltrat)")

ORGAN_TERMS: tuple[str, ...] = (
    "liver", "spleen", "kidney", "lung", "heart", "stomach", "pancreas", "colon", "small bowel",
    "large bowel", "bowel", "intestine", "duodenum", "rectum", "bladder", "gallbladder",
    "esophagus", "oesophagus", "trachea", "spinal cord", "spine", "brain", "brainstem",
    "brain stem", "cerebellum", "eye", "optic nerve", "temporal lobe", "parotid", "mandible",
    "larynx", "femoral head", "prostate", "uterus", "aorta", "adrenal gland", "thyroid",
)
DISEASE_TERMS: tuple[str, ...] = (
    *sorted(d.lower() for d in DISEASE_LABELS),
    "tumor", "tumour", "cancer", "carcinoma", "malignancy", "neoplasm", "mass", "nodule",
    "edema", "oedema", "effusion", "pneumonia", "pneumothorax", "atelectasis", "infiltrate",
    "infiltration", "cardiomegaly", "metastasis", "metastases", "cyst", "hemorrhage",
    "haemorrhage", "fracture",
)
_SYNONYMS = {"tumour": "tumor", "cancer": "tumor", "carcinoma": "tumor", "malignancy": "tumor",
             "neoplasm": "tumor", "mass": "tumor", "oedema": "edema",
             "infiltration": "infiltrate", "metastases": "metastasis",
             "haemorrhage": "hemorrhage"}


# ----------------------------------------------------------------------------- clauses


@dataclass
class Clause:
    """One clause: its tokens and where negation cues end."""

    tokens: list[str]
    cues: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    def find(self, pattern: str) -> list[tuple[int, int, str]]:
        """``(first token, last token, text)`` of each whole-word match of ``pattern``."""
        text = self.text
        out = []
        for m in re.finditer(rf"(?<![\w'-])(?:{pattern})(?![\w'-])", text):
            start = text[: m.start()].count(" ")
            out.append((start, start + m.group().count(" "), m.group()))
        return out

    def negated(self, start: int, end: int) -> bool:
        """Whether the words ``start..end`` fall in the scope of a negation cue."""
        if any(c < start and start - c <= _CUE_WINDOW for c in self.cues):
            return True
        return any(t in _POST_CUES for t in self.tokens[end + 1: end + 1 + _POST_WINDOW])


def _normalise(text: str) -> str:
    text = text.lower().replace("\u2010", "-").replace("\u2011", "-").replace("\u2013", "-")
    return re.sub(r"\bx[\s-]?rays?\b", lambda m: "x-rays" if m.group().endswith("s") else "x-ray",
                  text)


def clauses(caption: str) -> list[Clause]:
    """The caption cut into clauses, with negation cues located."""
    out = []
    for part in _CLAUSE_SPLIT.split(_normalise(caption)):
        tokens = _TOKEN.findall(part or "")
        if not tokens:
            continue
        cues = [i for i, t in enumerate(tokens) if t in _CUES_1]
        cues += [i + 1 for i in range(len(tokens) - 1) if f"{tokens[i]} {tokens[i + 1]}" in _CUES_2]
        out.append(Clause(tokens, sorted(cues)))
    return out


def _mentions(parts: list[Clause], pattern: str, negated: bool = False) -> list[str]:
    return [text for c in parts for s, e, text in c.find(pattern) if c.negated(s, e) == negated]


def _join(values: list[Any]) -> str:
    return ", ".join(map(str, values)) or "none"


# ----------------------------------------------------------------------------- rules


def _check_modality(parts: list[Clause], value: Any) -> list[str]:
    own = _MODALITY_GROUP.get(str(value).upper())
    if own is None:
        return []
    return [f"modality: mentions {group} but the image is {value}"
            for group, pattern in MODALITY_TERMS.items()
            if group != own and _mentions(parts, pattern)]


def _check_plane(parts: list[Clause], value: Any) -> list[str]:
    own = str(value).upper()
    if own not in PLANE_TERMS:
        return []
    return [f"plane: mentions {name.lower() if len(name) > 2 else name} but the plane is {value}"
            for name, pattern in PLANE_TERMS.items()
            if name != own and _mentions(parts, pattern)]


def _normal_claim(parts: list[Clause]) -> bool:
    return bool(_mentions(parts, NORMAL) or _mentions(parts, ABNORMAL, negated=True))


def _abnormal_claim(parts: list[Clause]) -> bool:
    return bool(_mentions(parts, ABNORMAL) or _mentions(parts, NORMAL, negated=True))


def _check_class(parts: list[Clause], cls: str) -> list[str]:
    affirmed = bool(_mentions(parts, OPACITY))
    out = []
    if cls == "Lung Opacity":
        if _normal_claim(parts):
            out.append("class: normal wording on a Lung Opacity image")
        if any(_denies_opacity(c) and not _regional(c) for c in parts):
            out.append("class: denies lung opacity on a Lung Opacity image")
        return out
    if affirmed:
        out.append(f"class: affirms lung opacity on a {cls} image")
    if cls in ("Normal", "No Lung Opacity") and _abnormal_claim(parts):
        out.append(f"class: abnormal wording on a {cls} image")
    if cls != "Normal" and _normal_claim(parts):
        out.append(f"class: normal wording on a {cls} image")
    return out


def caption_counts(parts: list[Clause]) -> list[int | str]:
    """Opacity counts the caption states (``"many"`` for *several*/*multiple*)."""
    found: list[int | str] = []
    for clause in parts:
        toks = clause.tokens
        regional = _regional(clause)
        for i, tok in enumerate(toks):
            count = int(tok) if tok.isdigit() else _COUNT_WORDS.get(tok)
            if count is None or (count == 0 and regional):
                continue
            if any(_OPACITY_TOKEN.match(t) for t in toks[i + 1: i + 5]):
                found.append(count)
    return found


def _check_nums(parts: list[Clause], nums: int) -> list[str]:
    out = []
    for count in caption_counts(parts):
        if count == "many" and nums < 2:
            out.append(f"nums: says several opacities but nums is {nums}")
        elif count != "many" and count != nums:
            noun = "opacity" if count == 1 else "opacities"
            out.append(f"nums: says {count} {noun} but nums is {nums}")
    return out


def _places(clause: Clause) -> tuple[set[str], set[str], bool]:
    """Sides, levels and whether *both*/*bilateral* are named in one clause."""
    sides = {m[2] for m in clause.find(SIDE)}
    levels = {level for level, pattern in LEVELS.items() if clause.find(pattern)}
    return sides, levels, bool(clause.find(BILATERAL))


def _denies_opacity(clause: Clause) -> bool:
    return any(clause.negated(s, e) for s, e, _ in clause.find(OPACITY))


def _regional(clause: Clause) -> bool:
    """A clause that denies opacity only in a named part of the lungs."""
    sides, levels, both = _places(clause)
    return _denies_opacity(clause) and bool(sides or levels) and not both


def _check_location(parts: list[Clause], zones: list[str]) -> list[str]:
    if not zones:
        return []
    where = ", ".join(zones)
    out = []
    for clause in parts:
        sides, levels, both = _places(clause)
        if _denies_opacity(clause):  # side/level words say where there is no opacity
            denied = [z for z in ZONES if (both or not sides or z.split()[1] in sides)
                      and (not levels or z.split()[0] in levels)]
            if (sides or levels or both) and set(denied) & set(zones):
                out.append(f"location: denies opacity where one lies ({where})")
            continue
        own_sides = {z.split()[1] for z in zones}
        own_levels = {z.split()[0] for z in zones}
        out += [f"location: mentions the {s} side but the opacities are at {where}"
                for s in sorted({t for a, b, t in clause.find(SIDE) if not clause.negated(a, b)}
                                - own_sides)]
        out += [f"location: mentions the {level} zone but the opacities are at {where}"
                for level, pattern in LEVELS.items()
                if level not in own_levels and _mentions([clause], pattern)]
        if len(own_sides) < 2 and _mentions([clause], BILATERAL):
            out.append(f"location: says bilateral but the opacities are at {where}")
        if len(own_sides) == 2 and _mentions([clause], UNILATERAL):
            out.append(f"location: says unilateral but the opacities are at {where}")
    return out


def _words(name: str) -> frozenset[str]:
    out = []
    for w in name.lower().split():
        w = _SYNONYMS.get(w, w)
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return frozenset(out)


def _alternation(terms: set[str]) -> str:
    return "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))


def _check_organs(parts: list[Clause], organs: list[str], diseases: list[str]) -> list[str]:
    names = {re.sub(r"^(?:left|right) ", "", o.lower()) for o in organs}
    pattern = rf"(?:(?:left|right) )?(?:{_alternation(set(ORGAN_TERMS) | names)})(?:e?s)?"
    own = [_words(o) for o in organs]
    inside = [_words(d) for d in diseases]
    out = []
    for text in dict.fromkeys(_mentions(parts, pattern)):
        w = _words(text)
        if not any(w <= o or o <= w for o in own) and not any(w <= d for d in inside):
            out.append(f"organ: mentions the {text} but the organs are {_join(organs)}")
    return out


def _check_pathology(parts: list[Clause], diseases: list[str]) -> list[str]:
    terms = set(DISEASE_TERMS) | {d.lower() for d in diseases}
    own = [_words(d) for d in diseases]
    out = [f"pathology: mentions {text} but the findings are {_join(diseases)}"
           for text in dict.fromkeys(_mentions(parts, rf"(?:{_alternation(terms)})(?:e?s)?"))
           if not any(_words(text) <= d for d in own)]
    if diseases and _normal_claim(parts):
        out.append(f"pathology: normal wording but the findings are {_join(diseases)}")
    if not diseases and _abnormal_claim(parts):
        out.append("pathology: abnormal wording but no finding is annotated")
    return out


def check_caption(caption: str, attrs: dict[str, Any]) -> list[str]:
    """The contradictions between ``caption`` and ``attrs`` (empty when consistent)."""
    parts = clauses(caption)
    out: list[str] = []
    if "modality" in attrs:
        out += _check_modality(parts, attrs["modality"])
    if attrs.get("plane"):
        out += _check_plane(parts, attrs["plane"])
    if "class" in attrs:
        out += _check_class(parts, attrs["class"])
    if "nums" in attrs:
        out += _check_nums(parts, int(attrs["nums"]))
    if isinstance(attrs.get("location"), (list, tuple)):
        out += _check_location(parts, list(attrs["location"]))
    if "organ" in attrs:
        out += _check_organs(parts, list(attrs["organ"]), list(attrs.get("pathology", [])))
    if "pathology" in attrs:
        out += _check_pathology(parts, list(attrs["pathology"]))
    return out


def contradicted_attributes(problems: list[str]) -> list[str]:
    """The distinct attributes named by :func:`check_caption` messages."""
    return list(dict.fromkeys(p.split(":", 1)[0] for p in problems))
