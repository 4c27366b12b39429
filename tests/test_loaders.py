"""Loaders on tiny fake copies of VQA-RAD and SLAKE: field mapping, splits, errors, hub guard."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from conftest import VQA_RAD_TEST_REPEAT, write_image, write_json
from PIL import Image

from medvqa_lib.data import hub, question_types
from medvqa_lib.data.captions import load_caption_folder, load_roco_captions
from medvqa_lib.data.pathvqa import load_pathvqa
from medvqa_lib.data.registry import available_datasets, check_images, data_root, load_vqa
from medvqa_lib.data.schema import QUESTION_TYPES
from medvqa_lib.data.slake import (
    load_slake,
    load_slake_detection,
    load_slake_hub,
    slake_report,
)
from medvqa_lib.data.vqa_rad import (
    load_vqa_rad,
    load_vqa_rad_hub,
    vqa_rad_report,
    vqa_rad_subset,
)
from medvqa_lib.errors import ConfigError, DataError, HubUnavailableError, UnknownNameError


def _by_qid(samples):
    return {s.qid: s for s in samples}


def _pairs(samples):
    return {(s.image_id, s.question.lower()) for s in samples}


# ----------------------------------------------------------------------------- question types


def test_every_mapping_lands_in_the_shared_vocabulary():
    assert set(question_types.VQA_RAD_CODES.values()) <= set(QUESTION_TYPES)
    assert set(question_types.SLAKE_CONTENT_TYPES.values()) <= set(QUESTION_TYPES)
    assert question_types.vqa_rad_question_types("PRES, POS") == ["presence", "position"]
    assert question_types.vqa_rad_question_type("ATRIB") == "attribute"
    assert question_types.vqa_rad_question_type("Other") == "other"
    assert question_types.vqa_rad_question_type("NEWCODE") == "other"
    assert question_types.slake_question_type("KG") == "knowledge"
    assert question_types.infer_answer_type(" Yes ") == "closed"
    assert question_types.infer_answer_type("liver") == "open"


# ----------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_field_mapping_and_quirks(fake_vqa_rad):
    train = _by_qid(load_vqa_rad("train", fake_vqa_rad, val_fraction=0.0))
    first = train["1"]
    assert (first.answer, first.answer_type, first.question_type) == ("yes", "closed", "presence")
    assert first.extra["raw_answer"] == "Yes" and first.organ == "chest"
    assert first.image == fake_vqa_rad / "vqa_rad" / "images" / "synpic1.jpg"
    assert first.image_id == "synpic1" and first.dataset == "vqa-rad" and first.split == "train"
    combo = train["2"]
    assert combo.answer == "4" and combo.extra["raw_answer"] == 4  # JSON integer answer
    assert combo.answer_type == "open" and combo.question_type == "position"
    assert combo.extra["question_types"] == ["position", "presence"]
    assert combo.extra["raw_question_type"] == "POS, PRES" and combo.extra["phrase_type"] == "para"
    spaced = train["3"]
    assert spaced.answer_type == "closed" and spaced.organ == "abdomen"  # "CLOSED ", ABD
    assert train["6"].question_type == "quantity" and train["6"].organ == "head"
    assert all(s.question_type in QUESTION_TYPES for s in train.values())


def test_vqa_rad_val_is_deterministic_disjoint_and_free_of_test_questions(fake_vqa_rad):
    splits = {s: load_vqa_rad(s, fake_vqa_rad, val_fraction=0.25, seed=3)
              for s in ("train", "val", "test")}
    again = load_vqa_rad("val", fake_vqa_rad, val_fraction=0.25, seed=3)
    assert [s.qid for s in again] == [s.qid for s in splits["val"]]
    assert splits["val"] and all(s.split == "val" for s in splits["val"])
    qids = [{s.qid for s in v} for v in splits.values()]
    assert not (qids[0] & qids[1] or qids[0] & qids[2] or qids[1] & qids[2])
    assert not _pairs(splits["train"]) & _pairs(splits["val"])  # repeats stay on one side
    test_pairs = _pairs(splits["test"])
    assert not (_pairs(splits["train"]) | _pairs(splits["val"])) & test_pairs
    assert len(splits["train"]) + len(splits["val"]) == 39 - 1
    other = load_vqa_rad("val", fake_vqa_rad, val_fraction=0.25, seed=4)
    assert {s.qid for s in other} != {s.qid for s in splits["val"]}


def test_vqa_rad_test_duplicates_kept_only_when_asked(fake_vqa_rad):
    kept = load_vqa_rad("train", fake_vqa_rad, val_fraction=0.0, drop_test_duplicates=False)
    image, question = VQA_RAD_TEST_REPEAT
    assert any(s.extra["image_name"] == image and s.question == question for s in kept)
    report = vqa_rad_report(fake_vqa_rad, val_fraction=0.0)
    assert report["test_repeats_in_train"] == 1 and report["dropped_test_repeats"] == 1
    assert report["train"] == 38 and report["test"] == 3 and report["test_free"] == 2


def test_vqa_rad_subsets(fake_vqa_rad):
    test = load_vqa_rad("test", fake_vqa_rad)
    assert [s.qid for s in vqa_rad_subset(test, "free")] == ["101", "102"]
    assert len(vqa_rad_subset(test, "free+para")) == 3
    with pytest.raises(UnknownNameError, match="free, free\\+para"):
        vqa_rad_subset(test, "para")


def test_bad_val_fraction(fake_vqa_rad):
    with pytest.raises(ConfigError, match="val_fraction"):
        load_vqa_rad("train", fake_vqa_rad, val_fraction=1.5)


# ----------------------------------------------------------------------------- SLAKE


def test_slake_field_mapping(fake_slake):
    train = load_slake("train", fake_slake)
    assert {s.extra["q_lang"] for s in train} == {"en"} and len(train) == 9
    organ, count, kg = train[:3]
    assert organ.question_type == "organ" and organ.answer == "liver"
    assert organ.organ == "abdomen" and organ.extra["location"] == "Abdomen"
    assert organ.modality == "ct" and organ.image_id == "xmlab0"
    assert count.answer == "2" and count.extra["raw_answer"] == 2
    assert count.organ == "chest_lung" and count.modality == "x-ray"
    assert kg.question_type == "knowledge" and kg.extra["base_type"] == "kvqa"
    assert kg.extra["triple"] == ["vhead", "_", "_"] and kg.modality == "mri"
    assert {s.split for s in load_slake("validate", fake_slake)} == {"val"}


def test_slake_drops_questions_about_test_images_when_chinese_is_loaded(fake_slake):
    test_images = {s.image_id for lang in ("en", "zh")
                   for s in load_slake("test", fake_slake, lang=lang)}
    zh = load_slake("train", fake_slake, lang="zh")
    assert {s.extra["q_lang"] for s in zh} == {"zh"}
    assert {s.image_id for s in zh} == {"xmlab0"}  # xmlab4 (an English test image) dropped
    both = load_slake("train", fake_slake, lang="all")
    assert not {s.image_id for s in both} & test_images
    assert {s.image_id for s in load_slake("val", fake_slake, lang="zh")} == {"xmlab5"}
    en = load_slake("train", fake_slake, lang="en")
    assert "xmlab3" in {s.image_id for s in en}  # English-only: the English test is disjoint
    report = slake_report(fake_slake, lang="all")
    assert report["train_dropped_test_images"] == 6  # xmlab3 (en) + xmlab4 (zh), 3 each
    assert report["val_dropped_test_images"] == 3 and report["test_dropped_test_images"] == 0
    assert slake_report(fake_slake, lang="zh")["train_dropped_test_images"] == 3


def test_slake_language_choices(fake_slake):
    with pytest.raises(UnknownNameError, match="all, en, zh"):
        load_slake("train", fake_slake, lang="fr")


def test_slake_detection_limited_to_the_split(fake_slake):
    train = load_slake_detection("train", fake_slake)
    assert [x.image_id for x in train] == ["xmlab0", "xmlab1", "xmlab3"]
    first = train[0].attributes
    assert first["labels"] == ["Liver", "Liver Cancer"]
    assert first["boxes"] == [[1.0, 2.0, 10.0, 12.0], [3.0, 4.0, 2.0, 2.0]]
    assert first["organs"] == ["Liver"] and first["diseases"] == ["Liver Cancer"]
    assert first["modality"] == "ct" and first["organ"] == "abdomen"
    assert first["location"] == "Abdomen"
    assert train[1].attributes["labels"] == []
    assert all(x.split == "train" for x in train)
    assert [x.image_id for x in load_slake_detection(root=fake_slake)] == [x.image_id for x in train]
    test = load_slake_detection("test", fake_slake)
    assert [x.image_id for x in test] == ["xmlab4"]
    assert test[0].attributes["diseases"] == ["Brain Edema"]


def test_slake_detection_bad_box(fake_slake):
    write_json(fake_slake / "slake" / "imgs" / "xmlab1" / "detection.json", [{"Liver": [1, 2]}])
    with pytest.raises(DataError, match="xmlab1.*Liver"):
        load_slake_detection("train", fake_slake)


# ----------------------------------------------------------------------------- registry


def test_load_vqa_dispatch_and_available(fake_data_root):
    assert len(load_vqa("vqa-rad", "test", root=fake_data_root)) == 3
    assert load_vqa("slake", "validation", root=fake_data_root, lang="zh")
    assert available_datasets(fake_data_root) == ["vqa-rad", "slake"]
    with pytest.raises(ConfigError, match="slake"):
        load_vqa("slake-hub", "test", root=fake_data_root)


def test_available_datasets_without_root():
    assert available_datasets(None) == []


def test_unknown_dataset_and_split_list_choices(fake_data_root):
    with pytest.raises(UnknownNameError, match="pathvqa.*slake.*synthetic.*vqa-rad"):
        load_vqa("vqa-med", "train", root=fake_data_root)
    with pytest.raises(UnknownNameError, match="test, train, val"):
        load_vqa("vqa-rad", "dev2", root=fake_data_root)
    with pytest.raises(UnknownNameError, match="test, train, val"):
        load_slake("holdout", fake_data_root)


# ----------------------------------------------------------------------------- errors


def test_missing_data_root_names_the_layout_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDVQA_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no data folder given: pass root=") as err:
        load_vqa_rad("train")
    assert "vqa_rad/trainset.json" in str(err.value) and "slake/train.json" in str(err.value)
    assert "data_dir" in str(err.value) and "MEDVQA_DATA_DIR" in str(err.value)
    with pytest.raises(DataError, match="nowhere does not exist"):
        data_root(tmp_path / "nowhere")


def test_loaders_take_a_path_and_never_read_the_environment(monkeypatch, fake_vqa_rad):
    monkeypatch.setenv("MEDVQA_DATA_DIR", str(fake_vqa_rad))
    assert data_root(fake_vqa_rad) == fake_vqa_rad
    assert len(load_vqa_rad("test", fake_vqa_rad)) == 3
    with pytest.raises(DataError, match="no data folder given"):
        load_vqa_rad("test")  # the variable is setup()'s business, not the loader's
    assert available_datasets(None) == []


@pytest.mark.parametrize("dataset, file", [("vqa-rad", "vqa_rad/testset.json"), ("slake", "slake/test.json")])
def test_an_empty_split_is_an_error_naming_the_file(fake_data_root, dataset, file):
    (fake_data_root / file).write_text("[]")
    with pytest.raises(DataError, match=f"{file}.*holds no records") as err:
        load_vqa(dataset, "test", root=fake_data_root)
    assert "Re-download" in str(err.value)


def test_missing_dataset_folder(fake_vqa_rad):
    with pytest.raises(DataError, match="slake.*train.json"):
        load_slake("train", fake_vqa_rad)


def test_missing_file_names_path_and_layout(fake_vqa_rad):
    (fake_vqa_rad / "vqa_rad" / "testset.json").unlink()
    with pytest.raises(DataError, match="testset.json") as err:
        load_vqa_rad("test", fake_vqa_rad)
    assert "Expected layout" in str(err.value) and "images/" in str(err.value)


def test_malformed_json_names_line_and_fix(fake_slake):
    path = fake_slake / "slake" / "validate.json"
    path.write_text('[\n {"qid": 1,\n  "img_name": oops}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"validate.json at line 3, column") as err:
        load_slake("val", fake_slake)
    assert "re-download the file" in str(err.value)


def test_missing_field_names_file_record_and_field(fake_vqa_rad):
    path = fake_vqa_rad / "vqa_rad" / "testset.json"
    records = __import__("json").loads(path.read_text())
    del records[1]["phrase_type"]
    write_json(path, records)
    with pytest.raises(DataError, match="testset.json: record 1 lacks the required field 'phrase_type'"):
        load_vqa_rad("test", fake_vqa_rad)


def test_non_list_top_level(fake_slake):
    write_json(fake_slake / "slake" / "test.json", {"questions": []})
    with pytest.raises(DataError, match="expected a JSON list.*dict"):
        load_slake("test", fake_slake)


def test_corrupt_and_missing_images(fake_vqa_rad):
    images = fake_vqa_rad / "vqa_rad" / "images"
    (images / "synpic2.jpg").write_bytes(b"not a jpeg")
    (images / "synpic3.jpg").unlink()
    test = _by_qid(load_vqa_rad("test", fake_vqa_rad))
    assert test["102"].load_image().size == (24, 20)
    with pytest.raises(DataError, match="corrupt or unreadable image.*synpic2.jpg"):
        test["103"].load_image()
    with pytest.raises(DataError, match="image file not found.*synpic3.jpg"):
        test["101"].load_image()
    assert check_images(test.values()) == [str(images / "synpic3.jpg")]
    with pytest.raises(DataError, match="1 image file\\(s\\) missing.*synpic3.jpg"):
        load_vqa_rad("test", fake_vqa_rad, verify_images=True)


def test_verify_images_passes_when_all_exist(fake_slake):
    assert load_slake("test", fake_slake, verify_images=True)


# ----------------------------------------------------------------------------- hub guard


@pytest.mark.parametrize("load, name", [
    (lambda: load_pathvqa("train"), "flaviagiammarino/path-vqa"),
    (lambda: load_vqa("vqa-rad-hub", "test"), "flaviagiammarino/vqa-rad"),
    (lambda: load_slake_hub("train"), "BoKelvin/SLAKE"),
    (lambda: load_roco_captions("val"), "mdwiratathya/ROCO-radiology"),
])
def test_hub_offline_fails_at_once_naming_the_dataset(no_hub, load, name):
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as err:
        load()
    assert time.perf_counter() - start < 1.0
    assert name in str(err.value) and "MEDVQA_DATA_DIR" in str(err.value)


def test_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_probe", lambda host, port, timeout: False)
    monkeypatch.setattr(hub, "_probe_cache", {})
    with pytest.raises(HubUnavailableError, match="some/dataset.*connect to the internet"):
        hub.load_hub_dataset("some/dataset", "train")
    assert hub.hub_reachable() is False


def test_probe_is_bounded_in_time(monkeypatch):
    def stall(*args, **kwargs):
        time.sleep(3)
        raise OSError("name resolution stalled")

    monkeypatch.setattr(hub.socket, "create_connection", stall)
    start = time.perf_counter()
    assert hub._probe("example.invalid", 443, timeout=0.2) is False
    assert time.perf_counter() - start < 2.0


def test_offline_with_cached_copy_goes_to_datasets(monkeypatch, no_hub, tmp_path):
    (tmp_path / "hf_home" / "hub" / "datasets--me--cached").mkdir(parents=True)
    calls = []
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "ok")
    assert hub.load_hub_dataset("me/cached", "test") == "ok"
    assert calls == [(("me/cached",), {"split": "test"})]


def test_broken_download_becomes_hub_error(monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)

    def broken(*args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(HubUnavailableError, match="me/x.*connection reset"):
        hub.load_hub_dataset("me/x", "train")


def test_remote_code_is_refused():
    with pytest.raises(ValueError, match="trust_remote_code"):
        hub.load_hub_dataset("me/x", "train", trust_remote_code=True)


# ----------------------------------------------------------------------------- hub conversion


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _table(rows):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    data = {"image": [{"bytes": _png(c), "path": None} for c, _, _ in rows],
            "question": [q for _, q, _ in rows], "answer": [a for _, _, a in rows]}
    return datasets.Dataset.from_dict(data, features=features)


HUB_TRAIN = [(c % 3, f"question {c}?", "yes" if c % 2 else "Liver") for c in range(30)]
HUB_TEST = [(0, "question 0?", "liver"), (1, "is it new?", "no")]


def _fake_hub(monkeypatch, tables):
    def fake(repo_id, split, **kw):
        if split not in tables:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(tables)}.')
        return tables[split]

    monkeypatch.setattr(hub, "load_hub_dataset", fake)


def test_hub_copy_without_validation(monkeypatch):
    _fake_hub(monkeypatch, {"train": _table(HUB_TRAIN), "test": _table(HUB_TEST)})
    train = load_vqa_rad_hub("train", val_fraction=0.2)
    val = load_vqa_rad_hub("val", val_fraction=0.2)
    test = load_vqa_rad_hub("test")
    assert len(train) + len(val) == 29  # "question 0?" on image 0 is a test question
    assert len(val) == 6 and {s.split for s in val} == {"val"}
    assert not {s.qid for s in train} & {s.qid for s in val}
    assert {s.answer_type for s in test} == {"open", "closed"}
    assert {s.question_type for s in train} == {"other"} and train[0].dataset == "vqa-rad-hub"
    assert test[0].image_id == next(s for s in train + val if s.question == "question 3?").image_id
    assert test[0].load_image().size == (8, 8)


def test_hub_copy_with_validation(monkeypatch):
    tables = {"train": _table(HUB_TRAIN), "validation": _table(HUB_TEST[1:]),
              "test": _table(HUB_TEST[:1])}
    _fake_hub(monkeypatch, tables)
    assert len(load_pathvqa("train")) == 29
    assert [s.question for s in load_pathvqa("val")] == ["is it new?"]


def test_pathvqa_local_parquet_copy(tmp_path):
    folder = tmp_path / "data" / "pathvqa" / "data"
    folder.mkdir(parents=True)
    _table(HUB_TRAIN).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    _table(HUB_TEST).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    root = tmp_path / "data"
    val = load_vqa("pathvqa", "val", root=root, val_fraction=0.2)
    assert len(val) == 6 and val[0].dataset == "pathvqa"
    assert len(load_vqa("pathvqa", "test", root=root)) == 2
    (folder / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(DataError, match="test-\\*.parquet"):
        load_vqa("pathvqa", "test", root=root)


# ----------------------------------------------------------------------------- captions


def test_caption_folder_csv_and_json(tmp_path):
    folder = tmp_path / "roco"
    write_image(folder / "images" / "a.png")
    (folder / "train.csv").write_text('image,caption\nimages/a.png,"CT of the chest, axial."\n')
    write_json(folder / "validation.json", [{"image": "images/a.png", "caption": " MRI brain "}])
    train = load_caption_folder(folder, "train")
    assert train[0].caption == "CT of the chest, axial." and train[0].image_id == "a"
    assert train[0].load_image().size == (24, 20)
    assert load_roco_captions("val", tmp_path)[0].caption == "MRI brain"
    (folder / "test.csv").write_text("path,text\nx,y\n")
    with pytest.raises(DataError, match="missing column"):
        load_caption_folder(folder, "test")
    write_json(folder / "test.json", [{"image": "x.png"}])
    (folder / "test.csv").unlink()
    with pytest.raises(DataError, match="record 0 lacks the required field 'caption'"):
        load_caption_folder(folder, "test")


def test_caption_folder_missing_split(tmp_path):
    with pytest.raises(DataError, match="no caption file for split 'test'"):
        load_caption_folder(Path(tmp_path), "test")
