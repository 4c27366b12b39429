"""Dataset statistics tables: what every chapter's data looks like, per split."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from medvqa_lib.data.schema import VQASample

Suite = dict[str, dict[str, list[VQASample]]]


def split_statistics(suite: Suite) -> pd.DataFrame:
    """One row per (dataset, split): images, questions, closed/open share, types, organs, answers."""
    rows = []
    for name, splits in suite.items():
        for split, samples in splits.items():
            n = len(samples)
            closed = sum(s.answer_type == "closed" for s in samples)
            rows.append({
                "dataset": name,
                "split": split,
                "images": len({s.image_id for s in samples}),
                "questions": n,
                "closed %": 100.0 * closed / n if n else float("nan"),
                "open %": 100.0 * (n - closed) / n if n else float("nan"),
                "question types": len({s.question_type for s in samples}),
                "organs": len({s.organ for s in samples}),
                "distinct answers": len({s.answer.strip().lower() for s in samples}),
            })
    return pd.DataFrame(rows).set_index(["dataset", "split"]).round(1)


def question_type_counts(suite: Suite) -> pd.DataFrame:
    """Long table: dataset, split, question_type, answer_type, count."""
    rows = [
        {"dataset": name, "split": split, "question_type": s.question_type,
         "answer_type": s.answer_type}
        for name, splits in suite.items() for split, samples in splits.items() for s in samples
    ]
    frame = pd.DataFrame(rows)
    return frame.value_counts().rename("count").reset_index()


def organ_table(suite: Suite) -> pd.DataFrame:
    """Questions per organ/location and split, one column per (dataset, split)."""
    counts = {
        (name, split): Counter(s.organ for s in samples)
        for name, splits in suite.items() for split, samples in splits.items()
    }
    return pd.DataFrame(counts).fillna(0).astype(int).sort_index()


def unseen_answer_share(train: list[VQASample], test: list[VQASample]) -> pd.DataFrame:
    """Per answer type: share of test questions whose answer never occurs in train.

    A model that picks answers from the training answer set (a classifier head, or a ranked
    answer list built honestly from training data) cannot answer these.
    """
    from medvqa_lib.evaluation import normalize_answer

    seen = {normalize_answer(s.answer) for s in train}
    rows = []
    for kind in ("closed", "open"):
        subset = [s for s in test if s.answer_type == kind]
        unseen = sum(normalize_answer(s.answer) not in seen for s in subset)
        rows.append({"answer_type": kind, "test questions": len(subset),
                     "answer unseen in train": unseen,
                     "unseen %": 100.0 * unseen / len(subset) if subset else float("nan")})
    return pd.DataFrame(rows).set_index("answer_type").round(1)


def answer_frequencies(samples: list[VQASample]) -> pd.Series:
    """Answer counts (lower-cased), most frequent first."""
    return pd.Series(Counter(s.answer.strip().lower() for s in samples)).sort_values(ascending=False)
