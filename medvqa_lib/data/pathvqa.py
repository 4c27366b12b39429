"""PathVQA (He et al., 2020): pathology questions, from the Hub or a local copy of it.

The Hub copy ``flaviagiammarino/path-vqa`` (train 19,654 / validation 6,259 / test 6,719)
has only ``image``, ``question`` and ``answer``: ``answer_type`` is inferred (``"closed"`` for
yes/no answers, as in the PathVQA paper, else ``"open"``) and ``question_type`` is
``"other"``. A copy without a validation split gets one carved out of train by question with a
fixed seed, as for VQA-RAD. Train/val questions that repeat a test (image, question) pair are
dropped by default.

Offline, download the copy's parquet files elsewhere and put them under
``<root>/pathvqa/`` (any depth, named ``train-*.parquet``, ``validation-*.parquet``,
``test-*.parquet`` as on the Hub).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medvqa_lib.data.registry import normalize_split, optional_local_folder
from medvqa_lib.data.registry import verify_images as _verify_images
from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import DataError

HUB_ID = "flaviagiammarino/path-vqa"
FOLDER = "pathvqa"
PARQUET_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def _parquet_files(folder: Path, hub_split: str) -> list[Path]:
    return sorted(folder.rglob(f"{hub_split}-*.parquet")) + sorted(folder.rglob(f"{hub_split}.parquet"))


def _load_parquet(folder: Path, hub_split: str) -> Any | None:
    files = _parquet_files(folder, hub_split)
    if not files:
        return None
    import datasets

    return datasets.load_dataset("parquet", data_files={hub_split: [str(f) for f in files]},
                                 split=hub_split)


def _local_reader(folder: Path):
    if not _parquet_files(folder, "train") or not _parquet_files(folder, "test"):
        raise DataError(f"no PathVQA parquet files in {folder}: expected train-*.parquet and "
                        "test-*.parquet (and optionally validation-*.parquet), as in the Hub "
                        f"copy {HUB_ID}")

    def read(hub_split: str) -> Any | None:
        return _load_parquet(folder, hub_split)

    return read


def load_pathvqa(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    drop_test_duplicates: bool = True,
    verify_images: bool = False,
) -> list[VQASample]:
    """PathVQA ``train``/``val``/``test``: from ``<root>/pathvqa/`` if ``root`` is given,
    else from the Hub copy ``flaviagiammarino/path-vqa``.

    Images are kept in memory as encoded bytes (one object per distinct image).
    """
    split = normalize_split(split)
    folder = optional_local_folder(root, FOLDER)
    options = {"dataset": "pathvqa", "val_fraction": val_fraction, "seed": seed,
               "drop_test_duplicates": drop_test_duplicates}
    if folder is not None:
        from medvqa_lib.data.hub import vqa_from_tables

        samples = vqa_from_tables(_local_reader(folder), split, **options)
    else:
        from medvqa_lib.data.hub import load_hub_vqa

        samples = load_hub_vqa(HUB_ID, split, **options)
    if verify_images:
        _verify_images(samples, "PathVQA")
    return samples
