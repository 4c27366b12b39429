"""Phrase banks, caption sampling and the TransCap caption sets.

A caption is composed at pre-training time by randomly sampling the attribute contents of an
image's dictionary (Sect. 3.4): the class (chest X-rays) or pathology (SLAKE) is always
stated, every other attribute is included with probability ``p_include``, each with a random
phrasing from its bank, in one of a few sentence orders.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medvqa_lib.data.schema import CaptionSample, LabelledImage
from medvqa_lib.errors import DataError
from medvqa_lib.transcap.attributes import attribute_dict, format_attributes
from medvqa_lib.transcap.backends import CaptionBackend, RuleBackend, resolve_backend
from medvqa_lib.transcap.checker import check_caption, contradicted_attributes
from medvqa_lib.transcap.phrases import (
    NONE,
    bank_entries,
    entry_context,
    join_words,
    rule_phrasings,
    value_key,
)

Banks = dict[tuple[str, str], list[str]]
P_INCLUDE = 0.7
MAX_TRIES = 20
_SUBJECTS = ["this image", "the image", "this study", "the scan"]
_VERBS = ["shows", "reveals", "demonstrates", "contains", "displays"]


# ----------------------------------------------------------------------------- report


@dataclass
class TransCapReport:
    """Counts of one TransCap run, per attribute where it applies."""

    images: int = 0
    captions: int = 0
    phrasings: Counter = field(default_factory=Counter)  # accepted into the banks
    rejected_malformed: Counter = field(default_factory=Counter)  # unparseable model lines
    rejected_checker: Counter = field(default_factory=Counter)  # phrasings contradicting a value
    fallbacks: Counter = field(default_factory=Counter)  # banks refilled from the rule phrasings
    captions_dropped: Counter = field(default_factory=Counter)  # captions the checker refused

    @property
    def dropped_total(self) -> int:
        """Sampled captions dropped by the checker (a caption counts once)."""
        return int(self.captions_dropped["_total"])

    def drop(self, problems: list[str]) -> None:
        """Count one dropped caption under each attribute it contradicts."""
        self.captions_dropped["_total"] += 1
        for attr in contradicted_attributes(problems):
            self.captions_dropped[attr] += 1

    def table(self):
        """A ``pandas.DataFrame`` with one row per attribute."""
        import pandas as pd

        counters = {"phrasings": self.phrasings, "rejected_malformed": self.rejected_malformed,
                    "rejected_checker": self.rejected_checker, "fallbacks": self.fallbacks,
                    "captions_dropped": self.captions_dropped}
        attrs = sorted({k for c in counters.values() for k in c if k != "_total"})
        rows = [{"attribute": a, **{name: int(c[a]) for name, c in counters.items()}}
                for a in attrs]
        return pd.DataFrame(rows, columns=["attribute", *counters])

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers and per-attribute dicts (JSON-ready)."""
        return {"images": self.images, "captions": self.captions,
                "phrasings": dict(self.phrasings),
                "rejected_malformed": dict(self.rejected_malformed),
                "rejected_checker": dict(self.rejected_checker),
                "fallbacks": dict(self.fallbacks),
                "captions_dropped": {k: v for k, v in self.captions_dropped.items()
                                     if k != "_total"},
                "captions_dropped_total": self.dropped_total}


# ----------------------------------------------------------------------------- banks


def _checked(attribute: str, value: Any, phrases: Iterable[str]) -> tuple[list[str], int]:
    context = entry_context(attribute, value)
    unique = list(dict.fromkeys(phrases))
    kept = [p for p in unique if p and not check_caption(p, context)]
    return kept, len(unique) - len(kept)


def build_banks(dicts: Iterable[dict[str, Any]], backend: CaptionBackend | str | None = None,
                n_phrasings: int = 5, report: TransCapReport | None = None) -> Banks:
    """Phrase banks ``{(attribute, value key): phrasings}`` for every value in ``dicts``.

    Phrasings that contradict their own value are dropped; a bank left empty is refilled
    from the rule phrasings (counted in ``report.fallbacks``).
    """
    backend = resolve_backend(backend)
    report = report if report is not None else TransCapReport()
    banks: Banks = {}
    for attrs in dicts:
        for attribute, value in bank_entries(attrs):
            key = (attribute, value_key(value))
            if key in banks:
                continue
            before = backend.rejected[attribute]
            kept, bad = _checked(attribute, value, backend.phrasings(attribute, value, n_phrasings))
            report.rejected_malformed[attribute] += backend.rejected[attribute] - before
            report.rejected_checker[attribute] += bad
            if not kept and not isinstance(backend, RuleBackend):
                report.fallbacks[attribute] += 1
                kept, _ = _checked(attribute, value, rule_phrasings(attribute, value)[:n_phrasings])
            if not kept:
                raise DataError(f"no usable phrasing for {attribute} = {value_key(value)!r}")
            report.phrasings[attribute] += len(kept)
            banks[key] = kept
    return banks


# ----------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _bank(banks: Banks, attribute: str, value: Any) -> list[str]:
    key = (attribute, value_key(value))
    if key not in banks:
        raise DataError(f"no phrase bank for {attribute} = {key[1]!r}; build the banks from "
                        "the same dictionaries")
    return banks[key]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _subject(attrs: dict[str, Any], banks: Banks, rng: np.random.Generator, p: float) -> str:
    if "modality" in attrs and rng.random() < p:
        subject = _pick(rng, _bank(banks, "modality", attrs["modality"]))
    else:
        subject = _pick(rng, _SUBJECTS)
    region = attrs.get("location")
    if isinstance(region, str) and rng.random() < p:
        subject += " " + _pick(rng, _bank(banks, "location", region))
    if attrs.get("plane") and rng.random() < p:
        subject += ", " + _pick(rng, _bank(banks, "plane", attrs["plane"])) + ","
    return subject


def _cxr_detail(nums: int, count: str | None, where: str | None,
                rng: np.random.Generator) -> str:
    verb = "is" if nums == 1 else "are"
    if count and nums == 0:
        return _pick(rng, [f"It shows {count}.", f"{_cap(count)} can be seen."])
    if count:
        options = [f"There {verb} {count}{' ' + where if where else ''}.",
                   f"{_cap(count)} {verb} seen{' ' + where if where else ''}."]
        if where:
            options.append(f"{_cap(where)}, {count} can be seen.")
        return _pick(rng, options)
    return f"{'The opacity is' if nums == 1 else 'Opacities are'} seen {where}."


def _compose_cxr(attrs: dict[str, Any], banks: Banks, rng: np.random.Generator,
                 p: float) -> str:
    subject = _subject(attrs, banks, rng, p)
    predicate = _pick(rng, _bank(banks, "class", attrs["class"]))
    nums = int(attrs.get("nums", 0))
    count = _pick(rng, _bank(banks, "nums", nums)) if "nums" in attrs and rng.random() < p else None
    zones = attrs.get("location") or []
    where = _pick(rng, _bank(banks, "location", zones)) if zones and rng.random() < p else None
    main = f"{_cap(subject)} {predicate}"
    if not (count or where):
        return main + "."
    style = int(rng.integers(3))
    if style == 0:
        tail = f", with {count}{' ' + where if where else ''}" if count else f" {where}"
        return f"{main}{tail}."
    detail = _cxr_detail(nums, count, where, rng)
    return f"{main}. {detail}" if style == 1 else f"{detail} {main}."


def _compose_region(attrs: dict[str, Any], banks: Banks, rng: np.random.Generator,
                    p: float) -> str:
    subject = _subject(attrs, banks, rng, p)
    diseases = list(attrs.get("pathology", []))
    if diseases:
        order = [diseases[i] for i in rng.permutation(len(diseases))]
        nps = [_pick(rng, _bank(banks, "pathology", d)) for d in order]
        predicate = f"{_pick(rng, _VERBS)} {join_words(nps)}"
    else:
        predicate = _pick(rng, _bank(banks, "pathology", NONE))
    main = f"{_cap(subject)} {predicate}."
    organs = list(attrs.get("organ", []))
    if not organs or rng.random() >= p:
        return main
    k = int(rng.integers(1, len(organs) + 1))
    chosen = [organs[i] for i in rng.permutation(len(organs))[:k]]
    listed = join_words([_pick(rng, _bank(banks, "organ", o)) for o in chosen])
    before = [f"{_cap(listed)} {'is' if k == 1 else 'are'} visible.",
              f"The field of view includes {listed}."]
    if rng.random() < 0.5:
        return f"{_pick(rng, before)} {main}"
    return f"{main} {_pick(rng, [*before, f'It also shows {listed}.'])}"


def sample_caption(attrs: dict[str, Any], banks: Banks, rng: np.random.Generator,
                   p_include: float = P_INCLUDE) -> str:
    """One caption from a random subset and order of the dictionary's phrasings."""
    if "class" in attrs:
        return _compose_cxr(attrs, banks, rng, p_include)
    if "pathology" in attrs:
        return _compose_region(attrs, banks, rng, p_include)
    raise DataError(f"cannot caption a dictionary without 'class' or 'pathology': {attrs}")


# ----------------------------------------------------------------------------- datasets


class TransCapCaptions(Sequence):
    """Image-caption pairs whose caption is sampled afresh on every access.

    ``captions[i]`` is deterministic for ``(seed, epoch, i)``; :meth:`set_epoch` gives every
    epoch different wording. Captions that contradict their dictionary are dropped and
    redrawn (counted in ``report.captions_dropped``). Torch-free and picklable (only the
    phrase banks are kept, not the backend).
    """

    def __init__(self, items: Sequence[LabelledImage], *,
                 backend: CaptionBackend | str | None = None, banks: Banks | None = None,
                 n_phrasings: int = 5, seed: int = 0, epoch: int = 0,
                 p_include: float = P_INCLUDE, max_tries: int = MAX_TRIES) -> None:
        self.items = list(items)
        self.dicts = [attribute_dict(item) for item in self.items]
        self.report = TransCapReport(images=len(self.items))
        if banks is None:
            banks = build_banks(self.dicts, backend, n_phrasings, self.report)
        self.banks = banks
        self.seed, self.epoch = int(seed), int(epoch)
        self.p_include, self.max_tries = p_include, max_tries

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Use the wording of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def caption(self, index: int, epoch: int | None = None, avoid: Iterable[str] = ()) -> str:
        """The caption of image ``index`` in ``epoch`` (checked; ``avoid`` redraws repeats)."""
        attrs = self.dicts[index]
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        avoid = set(avoid)
        fallback = None
        for _ in range(self.max_tries):
            text = sample_caption(attrs, self.banks, rng, self.p_include)
            problems = check_caption(text, attrs)
            if problems:
                self.report.drop(problems)
            elif text not in avoid:
                return text
            else:
                fallback = text
        return fallback if fallback is not None else self._safe_caption(index)

    def _safe_caption(self, index: int) -> str:
        attrs = self.dicts[index]
        if "class" in attrs:
            text = f"This image {rule_phrasings('class', attrs['class'])[0]}."
        elif attrs.get("pathology"):
            nps = [rule_phrasings("pathology", d)[0] for d in attrs["pathology"]]
            text = f"This image shows {join_words(nps)}."
        else:
            text = f"This image {rule_phrasings('pathology', NONE)[0]}."
        problems = check_caption(text, attrs)
        if problems:
            raise DataError(f"no consistent caption for {self.items[index].image_id!r}: {problems}")
        return text

    def __getitem__(self, index: int) -> CaptionSample:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"indices must be integers, not {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self._sample(int(index), self.caption(int(index)), self.epoch)

    def _sample(self, index: int, text: str, epoch: int) -> CaptionSample:
        item = self.items[index]
        extra = {"attributes": self.dicts[index], "source": "transcap", "epoch": epoch}
        return CaptionSample(item.image_id, item.image, text, item.split, item.dataset, extra)


def build_captions(items: Sequence[LabelledImage], backend: CaptionBackend | str | None = None,
                   n_phrasings: int = 5, captions_per_image: int = 1,
                   seed: int = 0) -> tuple[list[CaptionSample], TransCapReport]:
    """``captions_per_image`` checked captions per image (distinct where the banks allow)."""
    data = TransCapCaptions(items, backend=backend, n_phrasings=n_phrasings, seed=seed)
    out: list[CaptionSample] = []
    for i in range(len(data)):
        made: list[str] = []
        for j in range(captions_per_image):
            made.append(data.caption(i, epoch=j, avoid=made))
            out.append(data._sample(i, made[-1], j))
    data.report.captions = len(out)
    return out, data.report


def examples_table(items: Sequence[LabelledImage], k: int = 3,
                   backend: CaptionBackend | str | None = None, seed: int = 0):
    """Fig. 3 as a table: ``image_id``, ``attributes`` (compact) and ``caption`` of ``k`` images.

    Images with distinct classes (or pathologies) are taken first, in input order.
    """
    import pandas as pd

    dicts = [attribute_dict(item) for item in items]
    heads = [value_key(d.get("class", d.get("pathology"))) for d in dicts]
    first = list({h: i for i, h in reversed(list(enumerate(heads)))}.values())
    order = sorted(first) + [i for i in range(len(items)) if i not in set(first)]
    chosen = [items[i] for i in order[:k]]
    captions, _ = build_captions(chosen, backend=backend, seed=seed)
    rows = [{"image_id": c.image_id, "attributes": format_attributes(c.extra["attributes"]),
             "caption": c.caption} for c in captions]
    return pd.DataFrame(rows, columns=["image_id", "attributes", "caption"])
