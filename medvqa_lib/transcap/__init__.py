"""TransCap (MISS, Sect. 3.4): image-caption pairs from single-modality attribute labels.

1. :func:`attribute_dict` turns a labelled image into the paper's attribute dictionary
   (RSNA-style chest X-rays: ``modality, plane, class, nums, location``; SLAKE detection:
   ``modality, location, organ, pathology``); :func:`load_rsna_csv` reads the RSNA CSV.
2. A caption backend (:class:`RuleBackend`, :class:`HFTextGenerationBackend`,
   :class:`OpenAIChatBackend`, optionally wrapped in :class:`CachedBackend`) gives alternative
   phrasings for every attribute value; :func:`build_banks` keeps those consistent with it.
3. :func:`check_caption` lists the contradictions between a caption and its dictionary.
4. :func:`sample_caption` composes a caption from random attribute phrasings;
   :class:`TransCapCaptions` resamples one per access and epoch; :func:`build_captions` makes a
   fixed set with a :class:`TransCapReport`; :func:`examples_table` reproduces Fig. 3.
"""

from medvqa_lib.transcap.attributes import (
    ATTRIBUTE_KEYS,
    CLASSES,
    CXR_KEYS,
    NO_OPACITY,
    ZONES,
    attribute_dict,
    box_location,
    format_attributes,
    load_rsna_csv,
    pretraining_items,
)
from medvqa_lib.transcap.backends import (
    BACKENDS,
    CachedBackend,
    CaptionBackend,
    CaptionBackendError,
    HFTextGenerationBackend,
    LLMBackend,
    OpenAIChatBackend,
    RuleBackend,
    attribute_prompt,
    load_prompt,
    make_backend,
    parse_phrasings,
)
from medvqa_lib.transcap.captions import (
    Banks,
    TransCapCaptions,
    TransCapReport,
    build_banks,
    build_captions,
    examples_table,
    sample_caption,
)
from medvqa_lib.transcap.checker import check_caption
from medvqa_lib.transcap.phrases import rule_phrasings

__all__ = [
    "ATTRIBUTE_KEYS",
    "BACKENDS",
    "CLASSES",
    "CXR_KEYS",
    "NO_OPACITY",
    "ZONES",
    "Banks",
    "CachedBackend",
    "CaptionBackend",
    "CaptionBackendError",
    "HFTextGenerationBackend",
    "LLMBackend",
    "OpenAIChatBackend",
    "RuleBackend",
    "TransCapCaptions",
    "TransCapReport",
    "attribute_dict",
    "attribute_prompt",
    "box_location",
    "build_banks",
    "build_captions",
    "check_caption",
    "examples_table",
    "format_attributes",
    "load_prompt",
    "load_rsna_csv",
    "make_backend",
    "parse_phrasings",
    "pretraining_items",
    "rule_phrasings",
    "sample_caption",
]
