"""The question-only prior: the baseline every image model has to beat.

It never looks at the image. With ``key="question_type"`` it answers every question
with the majority training answer of its (question_type, answer_type); with
``key="question"`` it first looks up the exact normalised question text. Unseen keys
back off to the majority answer of the answer type, then to the global majority.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from medvqa_lib.errors import DataError, MedVQAError, unknown_name
from medvqa_lib.evaluation.guards import ensure_splits
from medvqa_lib.evaluation.normalize import normalize_answer

__all__ = ["QuestionOnlyPrior", "majority"]

_KEYS = ("question_type", "question")
FIT_SPLITS = frozenset({"train", "val"})


def majority(answers: Iterable[str]) -> tuple[str, int]:
    """The most frequent answer and its count; ties go to the alphabetically first."""
    counts = Counter(answers)
    if not counts:
        raise DataError("cannot take the majority of no answers")
    answer, count = min(counts.items(), key=lambda item: (-item[1], item[0]))
    return answer, count


class QuestionOnlyPrior:
    """Majority-answer baseline keyed on question type (or question text), no image.

    ``min_count``: with ``key="question"``, a question text is used only if it occurred
    at least this many times in training; rarer questions back off to the question type.
    """

    def __init__(self, key: str = "question_type", min_count: int = 1) -> None:
        if key not in _KEYS:
            raise unknown_name("prior key", key, _KEYS)
        self.key = key
        self.min_count = int(min_count)
        self.by_question: dict[tuple[str, str], str] = {}
        self.by_type: dict[tuple[str, str], str] = {}
        self.by_answer_type: dict[str, str] = {}
        self.global_answer: str | None = None

    @staticmethod
    def _question_key(sample: Any) -> tuple[str, str]:
        return normalize_answer(sample.question), str(sample.answer_type)

    @staticmethod
    def _type_key(sample: Any) -> tuple[str, str]:
        return str(sample.question_type), str(sample.answer_type)

    def fit(self, train_samples: Sequence[Any]) -> QuestionOnlyPrior:
        """Learn the majority tables; refuses test samples. Returns ``self``."""
        train_samples = list(train_samples)
        ensure_splits(train_samples, FIT_SPLITS, "fitting the question-only prior")
        if not train_samples:
            raise DataError("cannot fit the question-only prior on no samples")
        answers = [normalize_answer(s.answer) for s in train_samples]
        self.by_type = self._majorities(train_samples, answers, self._type_key)
        self.by_answer_type = self._majorities(train_samples, answers, lambda s: str(s.answer_type))
        self.global_answer = majority(answers)[0]
        self.by_question = {}
        if self.key == "question":
            self.by_question = self._majorities(
                train_samples, answers, self._question_key, self.min_count
            )
        return self

    @staticmethod
    def _majorities(
        samples: Sequence[Any],
        answers: Sequence[str],
        key_of: Callable[[Any], Hashable],
        min_count: int = 1,
    ) -> dict[Hashable, str]:
        groups: dict[Hashable, list[str]] = defaultdict(list)
        for sample, answer in zip(samples, answers, strict=True):
            groups[key_of(sample)].append(answer)
        return {k: majority(v)[0] for k, v in groups.items() if len(v) >= min_count}

    def _lookup(self, sample: Any) -> tuple[str, str]:
        if self.global_answer is None:
            raise MedVQAError("QuestionOnlyPrior is not fitted; call fit(train_samples) first")
        if self.key == "question":
            answer = self.by_question.get(self._question_key(sample))
            if answer is not None:
                return answer, "question"
        answer = self.by_type.get(self._type_key(sample))
        if answer is not None:
            return answer, "question_type"
        answer = self.by_answer_type.get(str(sample.answer_type))
        if answer is not None:
            return answer, "answer_type"
        return self.global_answer, "global"

    def predict(self, samples: Iterable[Any]) -> dict[str, str]:
        """``{qid: normalised majority answer}`` for each sample."""
        return {str(s.qid): self._lookup(s)[0] for s in samples}

    def predict_levels(self, samples: Iterable[Any]) -> dict[str, str]:
        """``{qid: level}`` naming the table that answered: question, question_type,
        answer_type or global (shows how often the prior had to back off)."""
        return {str(s.qid): self._lookup(s)[1] for s in samples}
