"""The main fine-tuning runs of a chapter, kept on disk for the comparison chapter.

Each paper chapter writes its main runs (every dataset and seed) with :func:`save_runs`:
one CSV row per (run, test question) with the prediction, its scores and the run's cost.
:func:`load_runs` reads them back, so that one chapter can compare methods on exactly the
same test questions without re-training them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medvqa_lib.errors import DataError
from medvqa_lib.io import atomic_output

__all__ = ["RUN_COLUMNS", "load_runs", "runs_frame", "save_runs"]

#: per-run columns repeated on each of the run's question rows
RUN_COLUMNS: tuple[str, ...] = ("method", "label", "dataset", "seed", "train_time_s", "train_samples_per_s",
                                "n_params", "n_trainable", "peak_memory_mb", "device", "best_epoch")
_QUESTION_COLUMNS = ("qid", "image_id", "answer_type", "question_type", "organ", "question", "answer",
                     "prediction", "exact", "recall")


def _run_values(method: str, record: Any) -> dict[str, Any]:
    train = getattr(record, "train", None)
    return {"method": method, "label": record.label, "dataset": record.dataset, "seed": int(record.seed),
            "train_time_s": getattr(train, "time_s", float("nan")),
            "train_samples_per_s": getattr(train, "samples_per_s", float("nan")),
            "n_params": getattr(train, "n_params", None), "n_trainable": getattr(train, "n_trainable", None),
            "peak_memory_mb": getattr(train, "peak_memory_mb", None), "device": getattr(train, "device", ""),
            "best_epoch": getattr(train, "best_epoch", None)}


def runs_frame(method: str, records: Sequence[Any], samples: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per (run, test question) of ``records`` (objects with ``label``, ``dataset``,
    ``seed``, ``scored`` and optionally ``train``, a :class:`~medvqa_lib.training.TrainResult`).
    ``samples`` (qid -> :class:`~medvqa_lib.data.VQASample`) adds each question's text, type
    and organ where the scored table lacks them."""
    if not records:
        raise ValueError(f"no runs of {method} to store")
    frames = []
    for rec in records:
        scored = rec.scored.copy()
        for col in ("question_type", "organ", "question", "answer"):
            if col not in scored and samples is not None:
                scored[col] = [getattr(samples.get(q), col, None) for q in scored["qid"]]
        for key, value in _run_values(method, rec).items():
            scored[key] = value
        frames.append(scored)
    frame = pd.concat(frames, ignore_index=True)
    keep = [c for c in (*RUN_COLUMNS, *_QUESTION_COLUMNS) if c in frame]
    return frame[keep]


def save_runs(method: str, records: Sequence[Any], path: str | Path,
              samples: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`runs_frame` to ``path`` (CSV, atomically) and return the path."""
    frame = runs_frame(method, records, samples)
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def load_runs(path: str | Path) -> pd.DataFrame:
    """The runs written by :func:`save_runs`; a clear error when the file is missing or is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no stored runs at {path}: run the chapter that writes them first "
                        "(python -m medvqa_lib reproduce --only <chapter>)")
    try:
        frame = pd.read_csv(path, dtype={"qid": str, "image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a stored-runs CSV ({exc}); delete it and re-run its chapter") from exc
    missing = [c for c in ("method", "dataset", "seed", "qid", "answer_type", "exact") if c not in frame]
    if missing:
        raise DataError(f"{path} lacks the columns {missing}; delete it and re-run its chapter")
    frame["exact"] = frame["exact"].astype(bool)
    return frame
