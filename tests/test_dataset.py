"""VQADataset / CaptionDataset, the image transform and the collators."""

from __future__ import annotations

import torch
from conftest import write_image
from PIL import Image
from torch.utils.data import DataLoader

from medvqa_lib.data import (
    CaptionCollator,
    CaptionDataset,
    VQACollator,
    VQADataset,
    default_image_transform,
)
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.data.vqa_rad import load_vqa_rad


def _samples(tmp_path, n=3):
    out = []
    for i in range(n):
        path = write_image(tmp_path / f"im{i}.png", size=(30 + i, 20), color=50 * i)
        out.append(VQASample(
            qid=f"q{i}", image_id=f"im{i}", image=path,
            question="is there a mass in the left lung " * (i + 1), answer=["yes", "no", "left upper lobe"][i % 3],
            answer_type="closed" if i < 2 else "open", question_type="presence",
        ))
    return out


def test_transform_shapes_and_range():
    image = Image.new("RGB", (50, 40), (255, 0, 128))
    for train in (True, False):
        x = default_image_transform(32, train)(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
    x = default_image_transform(16, False)(image)
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))


def test_dataset_items(tmp_path):
    samples = _samples(tmp_path)
    plain = VQADataset(samples)
    assert len(plain) == 3 and isinstance(plain[0]["image"], Image.Image)
    assert plain[0]["image"].mode == "RGB"
    item = VQADataset(samples, default_image_transform(24, train=False))[2]
    assert item["image"].shape == (3, 24, 24)
    assert {k: item[k] for k in ("qid", "answer", "answer_type", "question_type")} == {
        "qid": "q2", "answer": "left upper lobe", "answer_type": "open",
        "question_type": "presence"}


def test_collator_pads_to_longest_and_truncates(tmp_path, minilm_tokenizer):
    ds = VQADataset(_samples(tmp_path), default_image_transform(24, train=True))
    batch = VQACollator(minilm_tokenizer, max_question_len=12, max_answer_len=4)([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 24, 24)
    q, qm = batch["question_ids"], batch["question_mask"]
    assert q.shape == qm.shape and q.shape[0] == 2 and q.shape[1] == 12  # truncated at 12
    short = VQACollator(minilm_tokenizer)([ds[0]])["question_ids"]
    assert short.shape[1] == 10  # [CLS] + 8 words + [SEP], no padding for a single question
    assert batch["answer_ids"].shape == (2, 3) and batch["answer_mask"].all()
    assert batch["closed"].tolist() == [True, True]
    assert batch["qids"] == ["q0", "q1"] and batch["answers"] == ["yes", "no"]


def test_collator_padding_mask_and_prefix(tmp_path, minilm_tokenizer):
    ds = VQADataset(_samples(tmp_path), default_image_transform(16, train=False))
    loader = DataLoader(ds, batch_size=3, collate_fn=VQACollator(minilm_tokenizer,
                                                                 max_question_len=64))
    batch = next(iter(loader))
    mask = batch["question_mask"]
    assert mask.shape[1] == mask.sum(dim=1).max() and mask[0].sum() < mask[2].sum()
    assert (batch["question_ids"][mask == 0] == minilm_tokenizer.pad_token_id).all()
    assert batch["answer_mask"].sum(dim=1).tolist() == [3, 3, 5]
    assert batch["closed"].tolist() == [True, True, False]
    prefixed = VQACollator(minilm_tokenizer, answer_prefix="answer: ")([ds[0]])
    assert prefixed["answer_ids"].shape[1] == 5  # [CLS] answer : yes [SEP]
    assert prefixed["answers"] == ["yes"]


def test_collator_keeps_pil_images_as_a_list(tmp_path, minilm_tokenizer):
    ds = VQADataset(_samples(tmp_path, 2))
    batch = VQACollator(minilm_tokenizer)([ds[0], ds[1]])
    assert isinstance(batch["images"], list) and len(batch["images"]) == 2


def test_caption_dataset_and_collator(tmp_path, minilm_tokenizer):
    path = write_image(tmp_path / "c.png")
    samples = [CaptionSample(image_id="c", image=path, caption="axial ct of the abdomen"),
               CaptionSample(image_id="c", image=path, caption="chest x-ray")]
    ds = CaptionDataset(samples, default_image_transform(20, train=True))
    batch = CaptionCollator(minilm_tokenizer, max_caption_len=8)([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 20, 20)
    assert batch["caption_ids"].shape == batch["caption_mask"].shape
    assert batch["caption_mask"][1].sum() < batch["caption_mask"][0].sum()
    assert batch["image_ids"] == ["c", "c"]


def test_dataset_over_loaded_samples(fake_vqa_rad):
    ds = VQADataset(load_vqa_rad("test", fake_vqa_rad), default_image_transform(16, train=False))
    assert ds[1]["image"].shape == (3, 16, 16) and ds[1]["qid"] == "102"
