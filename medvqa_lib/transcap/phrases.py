"""Hand-written phrase banks: alternative wordings for each (attribute, value).

Each attribute plays one grammatical role in a caption (see :data:`FORMS`): ``modality`` is
the subject noun phrase, ``plane`` and the body-region ``location`` modify it, ``class`` (and
``pathology`` when no disease is present) is the predicate, ``nums`` is a noun phrase, the lung
``location`` a prepositional phrase, and ``organ``/``pathology`` elements are noun phrases
joined by the caption sampler. Every phrase states only its own value, so any combination
of phrases for one dictionary is consistent with it.
"""

from __future__ import annotations

from typing import Any

#: attributes whose list values get one bank per element (others: one bank per whole value)
ELEMENTWISE = frozenset({"organ", "pathology"})
NONE = "none"

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve")

# form, example; the example is also the first rule phrasing
FORMS: dict[str, str] = {
    "modality": "a noun phrase naming the kind of image that can start a sentence "
                "(no verb), e.g. 'this chest X-ray'",
    "plane": "a short phrase giving the imaging plane or projection that can follow the "
             "image's name, e.g. 'in the axial plane'",
    "class": "a verb phrase that completes the sentence 'This chest X-ray ...', "
             "e.g. 'shows lung opacity'",
    "nums": "a noun phrase giving the number of lung opacities that completes "
            "'The image shows ...', e.g. 'two lung opacities'",
    "location_zones": "a prepositional phrase saying where the lung opacities are, completing "
                      "'Opacities are seen ...', e.g. 'in the upper left zone'",
    "location_region": "a phrase naming the body region that follows 'This CT scan', "
                       "e.g. 'of the abdomen'",
    "organ": "a noun phrase naming this one organ or structure, completing "
             "'The image includes ...', e.g. 'the liver'",
    "pathology": "a noun phrase naming this one finding, completing 'The image shows ...', "
                 "e.g. 'a nodule'",
    "pathology_none": "a verb phrase saying that no lesion is present, completing "
                      "'This image ...', e.g. 'shows no lesion'",
}

#: what a value means, for the language-model prompt
VALUE_NOTES: dict[str, str] = {
    "Lung Opacity": "the lungs contain one or more opacities (abnormal image)",
    "Normal": "the chest X-ray is normal and has no lung opacity",
    "No Lung Opacity / Not Normal": "the image is abnormal but has no lung opacity",
    "No Lung Opacity": "there is no lung opacity (whether the image is otherwise normal "
                       "is not known)",
}

_MODALITY = {
    "CXR": ["this chest X-ray", "the chest radiograph", "this chest film", "the chest X-ray image",
            "this radiograph of the chest", "the CXR"],
    "CT": ["this CT scan", "the computed tomography image", "this CT image", "the CT slice",
           "this CT study"],
    "MRI": ["this MRI scan", "the magnetic resonance image", "this MR image", "the MRI slice",
            "this MRI study"],
    "X-ray": ["this X-ray", "the radiograph", "this X-ray image", "the plain film",
              "this radiographic image"],
}
_PLANE = {
    "PA": ["in the posteroanterior projection", "taken as a PA view", "in PA projection",
           "acquired in a posteroanterior view", "obtained as a frontal PA film"],
    "AP": ["in the anteroposterior projection", "taken as an AP view", "in AP projection",
           "acquired in an anteroposterior view", "obtained as a frontal AP film"],
}
_CLASS = {
    "Lung Opacity": ["shows lung opacity", "reveals areas of increased opacity in the lungs",
                     "demonstrates pulmonary opacification",
                     "shows abnormal opacity within the lung fields",
                     "reveals abnormal lungs with opacity",
                     "is abnormal, with lung opacity present"],
    "Normal": ["appears normal", "shows no abnormality", "shows normal lungs without opacity",
               "is unremarkable", "shows clear, healthy lungs",
               "looks normal with no lung opacity"],
    "No Lung Opacity / Not Normal": [
        "shows an abnormality but no lung opacity", "is abnormal without lung opacity",
        "reveals abnormal findings other than lung opacity",
        "is not normal, although no lung opacity is seen",
        "shows no lung opacity yet is not normal",
    ],
    "No Lung Opacity": ["shows no lung opacity", "has no opacity in the lungs",
                        "reveals no pulmonary opacity", "is free of lung opacity",
                        "shows lungs without opacity"],
}
_REGION = {
    "abdomen": ["of the abdomen", "through the abdomen", "of the abdominal region",
                "covering the abdomen"],
    "chest": ["of the chest", "of the thorax", "through the chest", "of the thoracic region"],
    "head": ["of the head", "through the head", "of the cranium", "of the head region"],
    "neck": ["of the neck", "through the neck", "of the cervical region", "covering the neck"],
    "pelvis": ["of the pelvis", "through the pelvic cavity", "of the pelvic region",
               "covering the pelvis"],
}
_DISEASE = {
    "atelectasis": ["atelectasis", "an area of atelectasis", "atelectatic change"],
    "brain edema": ["brain edema", "cerebral edema", "swelling of the brain tissue"],
    "brain enhancing tumor": ["an enhancing brain tumor", "an enhancing tumor",
                              "a contrast-enhancing tumor"],
    "brain non-enhancing tumor": ["a non-enhancing brain tumor", "a non-enhancing tumor",
                                  "a tumor without contrast enhancement"],
    "cardiomegaly": ["cardiomegaly", "an enlarged cardiac silhouette", "cardiac enlargement"],
    "effusion": ["an effusion", "a pleural effusion", "fluid in the pleural space"],
    "infiltrate": ["an infiltrate", "pulmonary infiltration", "an infiltrative process"],
    "liver cancer": ["liver cancer", "a hepatic malignancy", "a liver tumor",
                     "a malignant liver lesion"],
    "lung cancer": ["lung cancer", "a pulmonary malignancy", "a lung tumor",
                    "a malignant lung lesion"],
    "mass": ["a mass", "a mass lesion", "a space-occupying mass"],
    "nodule": ["a nodule", "a nodular lesion", "a small nodule"],
    "pneumonia": ["pneumonia", "pneumonic consolidation", "signs of pneumonia"],
    "pneumothorax": ["a pneumothorax", "air in the pleural space", "a visible pneumothorax"],
}
_NO_LESION = ["shows no lesion", "has no visible lesion", "appears free of lesions",
              "shows no focal abnormality", "contains no marked lesion"]


def join_words(words: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def number_word(n: int) -> str:
    """``two`` for 2 (digits beyond twelve)."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _nums(n: int) -> list[str]:
    if n == 0:
        return ["no lung opacities", "no opacity in either lung", "zero opacities",
                "no opaque areas", "no focal opacity"]
    if n == 1:
        return ["one lung opacity", "a single opacity", "1 lung opacity", "one area of opacity",
                "a single opaque region", "one focal opacity"]
    w = number_word(n)
    return [f"{w} lung opacities", f"{n} opacities", f"{w} areas of opacity",
            f"{w} opaque regions", f"{w} separate opacities", f"{n} lung opacities"]


def _zones(zones: list[str]) -> list[str]:
    if not zones:
        return []
    pairs = [z.split() for z in zones]  # [level, side]
    sides = {side for _, side in pairs}
    levels = {level for level, _ in pairs}
    many = len(zones) > 1
    out = [
        f"in the {join_words(zones)} zone{'s' if many else ''}",
        "located at " + join_words([f"the {z}" for z in zones]),
        "in the " + join_words([f"{side} {level}" for level, side in pairs])
        + f" lung zone{'s' if many else ''}",
        "involving " + join_words([f"the {level} part of the {side} lung"
                                   for level, side in pairs]),
    ]
    if len(sides) == 1:
        out.append(f"confined to the {next(iter(sides))} lung")
    else:
        out.append("in both lungs")
    if len(levels) == 1:
        out.append(f"in the {next(iter(levels))} lung zone{'s' if many else ''}")
    return out


def _organ(name: str) -> list[str]:
    return [f"the {name}", f"the {name} region", f"part of the {name}"]


def _disease(name: str) -> list[str]:
    return list(_DISEASE.get(name, [name, f"signs of {name}", f"findings of {name}"]))


def rule_phrasings(attribute: str, value: Any) -> list[str]:
    """Every hand-written phrasing of ``attribute = value`` (``[]`` when there is none)."""
    if attribute == "modality":
        return list(_MODALITY.get(str(value), [f"this {value} image", f"the {value} scan"]))
    if attribute == "plane":
        v = str(value)
        return list(_PLANE.get(v.upper(), [f"in the {v.lower()} plane", f"as a {v.lower()} slice",
                                           f"in {v.lower()} section"]))
    if attribute == "class":
        return list(_CLASS[str(value)])
    if attribute == "nums":
        return _nums(int(value))
    if attribute == "location":
        if isinstance(value, (list, tuple)):
            return _zones(list(value))
        v = str(value)
        return list(_REGION.get(v, [f"of the {v}", f"through the {v}", f"covering the {v}"]))
    if attribute == "organ":
        return _organ(str(value))
    if attribute == "pathology":
        return list(_NO_LESION) if value == NONE else _disease(str(value))
    raise KeyError(f"no phrase bank for attribute {attribute!r}")


def form_of(attribute: str, value: Any) -> str:
    """The grammatical form phrases for ``attribute = value`` must take."""
    if attribute == "location":
        return FORMS["location_zones" if isinstance(value, (list, tuple)) else "location_region"]
    if attribute == "pathology" and value == NONE:
        return FORMS["pathology_none"]
    return FORMS[attribute]


# ----------------------------------------------------------------------------- bank keys


def value_key(value: Any) -> str:
    """The text form of a value used as a bank key (lists joined by ``", "``)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def bank_entries(attrs: dict[str, Any]) -> list[tuple[str, Any]]:
    """The ``(attribute, value)`` pairs whose phrase banks a dictionary needs."""
    entries: list[tuple[str, Any]] = []
    for key, value in attrs.items():
        if key in ELEMENTWISE:
            if key == "pathology" and not value:
                entries.append((key, NONE))
            entries.extend((key, v) for v in value)
        elif not (isinstance(value, (list, tuple)) and not value):
            entries.append((key, value))
    return entries


def entry_context(attribute: str, value: Any) -> dict[str, Any]:
    """The smallest dictionary a phrase for ``attribute = value`` is checked against."""
    if attribute in ELEMENTWISE:
        return {attribute: [] if value == NONE else [value]}
    return {attribute: value}
