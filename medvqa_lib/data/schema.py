"""One sample schema for every dataset in the book.

Every loader (synthetic, VQA-RAD, SLAKE, PathVQA, hub copies) returns a list of
:class:`VQASample`; every model, metric and figure reads only these fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from PIL import Image

AnswerType = Literal["closed", "open"]
Split = Literal["train", "val", "test"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
ANSWER_TYPES: tuple[str, ...] = ("closed", "open")

#: The shared question-type vocabulary (SLAKE's content types, VQA-RAD's codes mapped onto it).
QUESTION_TYPES: tuple[str, ...] = (
    "modality",
    "plane",
    "organ",
    "abnormality",
    "presence",
    "position",
    "size",
    "quantity",
    "color",
    "shape",
    "attribute",
    "knowledge",
    "other",
)


@dataclass
class VQASample:
    """One question about one image.

    ``image`` is either a path (loaded lazily by :meth:`load_image`) or an in-memory
    ``PIL.Image``; the synthetic generator and hub loaders give images, the local
    loaders give paths.
    """

    qid: str
    image_id: str
    image: Any  # str | pathlib.Path | PIL.Image.Image
    question: str
    answer: str
    answer_type: AnswerType
    question_type: str
    organ: str = "unknown"
    split: Split = "train"
    dataset: str = ""
    modality: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """Return the image as RGB ``PIL.Image`` (raises a clear error if missing/corrupt)."""
        from medvqa_lib.data.images import open_image

        return open_image(self.image)

    def to_record(self) -> dict[str, Any]:
        """A JSON/pandas-friendly dict (image given as its path or ``"<in-memory>"``)."""
        rec = asdict(self)
        if not isinstance(self.image, (str, bytes)) and not hasattr(self.image, "__fspath__"):
            rec["image"] = "<in-memory>"
        else:
            rec["image"] = str(self.image)
        return rec


@dataclass
class CaptionSample:
    """One image with one caption (pre-training data)."""

    image_id: str
    image: Any
    caption: str
    split: Split = "train"
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        from medvqa_lib.data.images import open_image

        return open_image(self.image)


@dataclass
class LabelledImage:
    """One single-modality image with attribute labels (the input of MISS's TransCap)."""

    image_id: str
    image: Any
    attributes: dict[str, Any]
    split: Split = "train"
    dataset: str = ""

    def load_image(self) -> Image.Image:
        from medvqa_lib.data.images import open_image

        return open_image(self.image)


def samples_frame(samples: list[VQASample]):
    """A ``pandas.DataFrame`` with one row per sample (no image data)."""
    import pandas as pd

    return pd.DataFrame([s.to_record() for s in samples])


def filter_samples(samples: list[VQASample], pred: Callable[[VQASample], bool]) -> list[VQASample]:
    """The samples for which ``pred`` holds (a small readability helper)."""
    return [s for s in samples if pred(s)]
