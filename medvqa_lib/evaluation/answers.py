"""Answer vocabularies for classification-style VQA heads, built from training data only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation.guards import ensure_splits
from medvqa_lib.evaluation.normalize import normalize_answer

__all__ = ["UNK", "AnswerVocabulary", "coverage"]

UNK = "<unk>"
_DEFAULT_SPLITS = ("train", "val")


@dataclass
class AnswerVocabulary:
    """Normalised answers ordered by training frequency (then alphabetically).

    Index ``i < len(vocab)`` is ``answers[i]``; unseen answers encode to
    ``unk_index == len(vocab)``, so a head needs ``num_classes = len(vocab) + 1`` outputs.
    """

    answers: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.answers)) != len(self.answers):
            raise DataError("answer vocabulary contains duplicate answers")
        self.index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Any],
        min_count: int = 1,
        *,
        splits: Iterable[str] = _DEFAULT_SPLITS,
    ) -> AnswerVocabulary:
        """Answers seen at least ``min_count`` times; refuses test-split samples."""
        splits = set(splits)
        if "test" in splits:
            raise ConfigError("an answer vocabulary may not be built from the test split")
        samples = list(samples)
        ensure_splits(samples, splits, "building the answer vocabulary")
        counts = Counter(normalize_answer(s.answer) for s in samples)
        kept = sorted(
            ((a, n) for a, n in counts.items() if n >= min_count), key=lambda x: (-x[1], x[0])
        )
        return cls(answers=[a for a, _ in kept], counts=dict(kept))

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return normalize_answer(answer) in self.index

    @property
    def unk_index(self) -> int:
        """Index given to answers outside the vocabulary."""
        return len(self.answers)

    @property
    def num_classes(self) -> int:
        """Number of head outputs including the unknown class."""
        return len(self.answers) + 1

    def encode(self, answer: Any) -> int:
        """Index of the normalised answer, or :attr:`unk_index`."""
        return self.index.get(normalize_answer(answer), self.unk_index)

    def decode(self, i: int) -> str:
        """The answer at index ``i`` (:data:`UNK` for :attr:`unk_index`)."""
        i = int(i)
        if i == self.unk_index:
            return UNK
        if not 0 <= i < len(self.answers):
            raise IndexError(f"answer index {i} out of range 0..{self.unk_index}")
        return self.answers[i]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (see :meth:`from_dict`)."""
        return {"answers": list(self.answers), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnswerVocabulary:
        """Rebuild a vocabulary saved with :meth:`to_dict`."""
        return cls(answers=list(data["answers"]), counts=dict(data.get("counts", {})))


def coverage(vocab: AnswerVocabulary, samples: Sequence[Any]) -> float:
    """Fraction (0-1) of samples whose normalised answer is in ``vocab``; NaN if none."""
    samples = list(samples)
    if not samples:
        return float("nan")
    return sum(normalize_answer(s.answer) in vocab.index for s in samples) / len(samples)
