"""Where the data lives and one entry point for every VQA dataset.

:func:`load_vqa` picks a loader by name; :func:`data_root` finds the real-data folder; the
small helpers here (JSON reading with clear errors, validation carving, image checks) are
shared by the dataset modules.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from medvqa_lib.config import DATA_ENV
from medvqa_lib.data.schema import SPLITS, VQASample
from medvqa_lib.errors import ConfigError, DataError, unknown_name

T = TypeVar("T")

#: the layout :func:`data_root` expects (named in its errors)
EXPECTED_LAYOUT = (
    "<root>/vqa_rad/trainset.json, <root>/vqa_rad/testset.json, <root>/vqa_rad/images/; "
    "<root>/slake/train.json, <root>/slake/validate.json, <root>/slake/test.json, "
    "<root>/slake/imgs/xmlabN/source.jpg"
)

#: every name :func:`load_vqa` accepts
DATASETS: tuple[str, ...] = ("synthetic", "vqa-rad", "slake", "pathvqa", "vqa-rad-hub", "slake-hub")

#: local folder under the data root → the dataset name it holds
LOCAL_DATASETS: dict[str, tuple[str, str]] = {
    "vqa-rad": ("vqa_rad", "trainset.json"),
    "slake": ("slake", "train.json"),
    "pathvqa": ("pathvqa", ""),
}

SPLIT_ALIASES = {"validate": "val", "validation": "val", "dev": "val"}


# ----------------------------------------------------------------------------- data root


def data_root(root: str | os.PathLike | None) -> Path:
    """The real-data folder ``root`` as a :class:`Path`.

    Raises :class:`DataError` naming the expected layout when ``root`` is None or the folder
    does not exist. (A chapter's ``setup`` resolves the folder once, from its ``data_dir``
    parameter or ``$MEDVQA_DATA_DIR``; the loaders only ever take the path.)
    """
    if root is None or not str(root).strip():
        raise DataError(
            f"no data folder given: pass root=/path/to/data (expected layout: {EXPECTED_LAYOUT}); "
            f"a chapter takes it from its data_dir parameter or {DATA_ENV}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist; pass root= a folder with this layout: "
                        f"{EXPECTED_LAYOUT}")
    return path


def dataset_folder(root: str | os.PathLike | None, name: str, layout: str) -> Path:
    """``<data root>/<name>``, or a :class:`DataError` naming ``layout`` if it is missing."""
    folder = data_root(root) / name
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {folder}. Expected layout: {layout}")
    return folder


def optional_local_folder(root: str | os.PathLike | None, name: str) -> Path | None:
    """``<root>/<name>`` when ``root`` is given (it must exist), else ``None`` (meaning: use the
    Hub)."""
    if root is None:
        return None
    return dataset_folder(root, name, f"<root>/{name}/")


def available_datasets(root: str | os.PathLike | None) -> list[str]:
    """Names of the real datasets present under the data root (empty if there is none)."""
    try:
        base = data_root(root)
    except DataError:
        return []
    found = []
    for name, (folder, marker) in LOCAL_DATASETS.items():
        path = base / folder
        if path.is_dir() and (not marker or (path / marker).is_file()):
            found.append(name)
    return found


# ----------------------------------------------------------------------------- splits


def normalize_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    """``"validate"``/``"validation"`` → ``"val"``; an unknown split lists the choices."""
    name = SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    if name not in allowed:
        raise unknown_name("split", split, allowed)
    return name


def question_key(image_id: str, question: str) -> tuple[str, str]:
    """``(image, question)`` with the question lower-cased and its whitespace collapsed."""
    return image_id, re.sub(r"\s+", " ", question.strip().lower())


def carve_validation(
    items: Sequence[T], key: Callable[[T], Hashable], val_fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Split ``items`` into ``(train, val)`` by groups of equal ``key``, deterministically.

    Items sharing a key (repeated questions) land on the same side, so no validation question
    is also a training question. About ``val_fraction`` of the groups go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = sorted({key(item) for item in items}, key=repr)
    random.Random(seed).shuffle(groups)
    n_val = round(val_fraction * len(groups))
    val_keys = set(groups[:n_val])
    train = [item for item in items if key(item) not in val_keys]
    val = [item for item in items if key(item) in val_keys]
    return train, val


def drop_repeats(
    items: Sequence[T], forbidden: Iterable[Hashable], key: Callable[[T], Hashable]
) -> tuple[list[T], int]:
    """The items whose ``key`` is not in ``forbidden``, and how many were dropped."""
    banned = set(forbidden)
    kept = [item for item in items if key(item) not in banned]
    return kept, len(items) - len(kept)


# ----------------------------------------------------------------------------- JSON files


def read_json_list(path: Path, layout: str, allow_empty: bool = False) -> list[Any]:
    """A JSON file whose top level is a list, with errors that name the file and the fix.

    An empty list is an error (a split of 0 questions) unless ``allow_empty``.
    """
    if not path.is_file():
        raise DataError(f"file not found: {path}. Expected layout: {layout}")
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(
            f"malformed JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}. "
            "The file is damaged or truncated: re-download the file."
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-download the file.") from e
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of records at the top level, got "
            f"{type(data).__name__}; re-download the file."
        )
    if not data and not allow_empty:
        raise DataError(
            f"{path} holds no records (an empty JSON list): the split would load 0 questions. "
            "Re-download the file, or remove the dataset's folder to run without it."
        )
    return data


def require_fields(record: Any, fields: Iterable[str], path: Path, index: int) -> None:
    """Raise :class:`DataError` naming file, record index and field if one is missing."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index} is a {type(record).__name__}, not an object")
    for name in fields:
        if name not in record:
            raise DataError(f"{path}: record {index} lacks the required field {name!r}")


# ----------------------------------------------------------------------------- images


def _is_missing(image: Any) -> bool:
    if isinstance(image, (str, os.PathLike)):
        return not Path(image).is_file()
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return False
        return not (image.get("path") and Path(image["path"]).is_file())
    return image is None


def check_images(samples: Iterable[Any]) -> list[str]:
    """The distinct image paths (in order) that do not exist, for samples with path images."""
    missing: dict[str, None] = {}
    for sample in samples:
        image = sample.image
        if _is_missing(image):
            label = image.get("path") if isinstance(image, dict) else image
            missing.setdefault(str(label), None)
    return list(missing)


def verify_images(samples: Sequence[Any], dataset: str, show: int = 5) -> None:
    """Raise :class:`DataError` listing the first ``show`` missing images, if any."""
    missing = check_images(samples)
    if missing:
        head = ", ".join(missing[:show])
        more = f" (and {len(missing) - show} more)" if len(missing) > show else ""
        raise DataError(
            f"{dataset}: {len(missing)} image file(s) missing: {head}{more}. "
            "Check that the image folder was extracted next to the JSON files."
        )


# ----------------------------------------------------------------------------- dispatch


def _loader(name: str) -> Callable[..., list[VQASample]]:
    if name == "synthetic":
        from medvqa_lib.data.synthetic import load_synthetic_vqa

        return load_synthetic_vqa
    if name == "vqa-rad":
        from medvqa_lib.data.vqa_rad import load_vqa_rad

        return load_vqa_rad
    if name == "vqa-rad-hub":
        from medvqa_lib.data.vqa_rad import load_vqa_rad_hub

        return load_vqa_rad_hub
    if name == "slake":
        from medvqa_lib.data.slake import load_slake

        return load_slake
    if name == "slake-hub":
        from medvqa_lib.data.slake import load_slake_hub

        return load_slake_hub
    from medvqa_lib.data.pathvqa import load_pathvqa

    return load_pathvqa


def load_vqa(
    name: str, split: str, root: str | os.PathLike | None = None, **kw: Any
) -> list[VQASample]:
    """The ``split`` of dataset ``name`` as a list of :class:`VQASample`.

    ``name`` is one of :data:`DATASETS`. ``root`` is the real-data folder for ``"vqa-rad"``,
    ``"slake"`` and ``"pathvqa"`` (required for the first two); the ``*-hub`` names always
    read from the Hugging Face Hub and ``"synthetic"`` needs no folder. Extra keywords go to
    the dataset's loader.
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    split = normalize_split(split)
    loader = _loader(name)
    if name in LOCAL_DATASETS:
        return loader(split, root, **kw)
    if root is not None:
        raise ConfigError(
            f"{name!r} is read from the Hugging Face Hub (or generated) and takes no root; "
            f"use {name.removesuffix('-hub')!r} for a local folder"
        )
    return loader(split, **kw)
