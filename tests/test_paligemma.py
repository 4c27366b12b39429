"""The PaliGemma model: LoRA targets, the answer-only loss (mask and value), hub errors, saliency."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medvqa_lib.errors import HubUnavailableError
from medvqa_lib.papers.paligemma.config import LM_TARGETS, study_plan
from medvqa_lib.papers.paligemma.data import VQACollator
from medvqa_lib.papers.paligemma.losses import answer_mask, answer_only_loss, answer_token_nll
from medvqa_lib.papers.paligemma.model import (
    PaliGemmaVQA,
    apply_lora,
    build_tiny,
    load_hub_model,
    lora_target_names,
    patch_grid,
    trainable_share,
)
from medvqa_lib.papers.paligemma.saliency import (
    patch_to_tokens,
    raw_attention_map,
    rollout,
    to_grid,
)

TEXTS = ["answer en is there a lesion in the left lung", "yes", "no", "left lung",
         "answer en what organ is shown", "chest", "brain"] * 5


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    spec = study_plan("smoke", model={"image_size": 32, "patch_size": 8}).spec
    model, processor = build_tiny(spec, TEXTS)
    return spec, model, processor


def _image(value: int = 0) -> Image.Image:
    return Image.new("RGB", (40, 40), (value, value, value))


def test_lora_lands_on_exactly_the_named_modules_of_both_towers(tiny):
    spec, model, _ = tiny
    torch.manual_seed(0)
    peft_model = apply_lora(build_tiny(spec, TEXTS)[0], spec)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})))
    vision = [n for n in adapted if ".vision_tower." in n]
    language = [n for n in adapted if ".language_model." in n]
    assert len(adapted) == len(vision) + len(language)  # nothing outside the two towers
    depth_v, depth_t = spec.vision_depth, spec.text_depth
    assert sorted({n.rsplit(".", 1)[1] for n in vision}) == ["fc1", "fc2", "k_proj", "out_proj",
                                                              "q_proj", "v_proj"]
    assert sorted({n.rsplit(".", 1)[1] for n in language}) == sorted(LM_TARGETS)
    assert len(vision) == 6 * depth_v and len(language) == 6 * depth_t
    assert not any("gate_proj" in n or "multi_modal_projector" in n for n in adapted)
    # only the adapters train, with the paper's rank
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    a = next(m for n, m in peft_model.named_modules() if n.endswith("language_model.layers.0.self_attn.q_proj"))
    assert a.r["default"] == 12 and a.lora_alpha["default"] == 32
    share = trainable_share(peft_model)
    assert 0 < share["share_pct"] < 100


def test_literal_vision_mapping_keeps_only_qkv(tiny):
    _, model, _ = tiny
    names = lora_target_names(model, "literal")
    leaves = {n.rsplit(".", 1)[1] for n in names if ".vision_tower." in n}
    assert leaves == {"q_proj", "k_proj", "v_proj"}


def test_loss_mask_covers_only_answer_tokens(tiny):
    _, _, processor = tiny
    batch = VQACollator(processor)([
        {"image": _image(), "question": "is there a lesion in the left lung", "answer": "yes"},
        {"image": _image(9), "question": "what organ", "answer": "left lung"},
    ])
    tok = processor.tokenizer
    for row in range(2):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = ids[labels != -100].tolist()
        answer = ["yes", "left lung"][row]
        assert kept == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # the image tokens, <bos>, the prompt and the padding are all masked
        assert (labels[ids == processor.image_token_id] == -100).all()
        assert (labels[ids == tok.pad_token_id] == -100).all()
        assert (batch["token_type_ids"][row].bool() == (labels != -100)).all()


def test_answer_only_loss_is_the_models_own_loss_bit_for_bit(tiny):
    _, model, processor = tiny
    batch = VQACollator(processor)([
        {"image": _image(), "question": "is there a lesion in the left lung", "answer": "yes"},
        {"image": _image(9), "question": "what organ", "answer": "left lung"},
    ])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}
    torch.manual_seed(0)
    hf = model(**inputs, labels=batch["labels"])  # Hugging Face's causal-LM loss
    ours = answer_only_loss(hf.logits, batch["labels"])
    assert torch.equal(ours, hf.loss)
    vqa_loss = PaliGemmaVQA(model, processor)(batch)["loss"]  # the forward calls answer_only_loss
    assert torch.equal(vqa_loss, hf.loss)
    # the per-question sums over the same mask give the same mean
    per_row, counts = answer_token_nll(hf.logits, batch["labels"])
    mask = answer_mask(batch["labels"])
    assert counts.tolist() == mask.sum(1).tolist() == [2, 3]  # "yes" + <eos>, "left lung" + <eos>
    assert torch.allclose(per_row.sum() / counts.sum(), hf.loss, atol=1e-6)


def test_forward_loss_and_generation_run(tiny):
    spec, model, processor = tiny
    vqa = PaliGemmaVQA(model, processor)
    batch = VQACollator(processor)([{"image": _image(), "question": "what organ", "answer": "chest"}])
    loss = vqa(batch)["loss"]
    assert torch.isfinite(loss)
    answers = vqa.answer([_image()], ["what organ"], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert vqa.grid == patch_grid(model.config) == spec.image_size // spec.patch_size


def test_hub_unreachable_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    spec = study_plan("gpu").spec
    with pytest.raises(HubUnavailableError, match="HF_TOKEN"):
        load_hub_model(spec)


def test_rollout_equals_hand_computation():
    a1 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.1, 0.9]]])  # 2 heads
    a2 = torch.tensor([[[0.2, 0.8], [0.0, 1.0]], [[0.6, 0.4], [0.4, 0.6]]])
    # mean fusion: layer 1 → [[1, 0], [.3, .7]]; + I, rows / sum → [[1, 0], [.15, .85]]
    l1 = torch.tensor([[1.0, 0.0], [0.15, 0.85]])
    # layer 2 → [[.4, .6], [.2, .8]]; + I → [[1.4, .6], [.2, 1.8]] / 2 → [[.7, .3], [.1, .9]]
    l2 = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    assert torch.allclose(rollout([a1, a2], "mean"), l2 @ l1, atol=1e-6)
    # max fusion of layer 2: [[.6, .8], [.4, 1]] + I → [[1.6, .8], [.4, 2]] rows / 2.4
    l2max = torch.tensor([[1.6, 0.8], [0.4, 2.0]]) / 2.4
    l1max = torch.tensor([[2.0, 0.0], [0.5, 1.9]])
    l1max = l1max / l1max.sum(1, keepdim=True)
    assert torch.allclose(rollout([a1, a2], "max"), l2max @ l1max, atol=1e-6)
    # discarding a quarter of a 2x2 layer drops its weakest entry (0.1): + I → [[1.9, 0], [.3, 1.7]]
    one = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])
    assert torch.allclose(rollout([one], "mean", discard_ratio=0.25),
                          torch.tensor([[1.0, 0.0], [0.15, 0.85]]), atol=1e-6)


def test_raw_attention_and_patch_queries():
    att = torch.zeros(2, 5, 5)
    att[1, 3, :2] = torch.tensor([0.2, 0.6])
    att[1, 4, :2] = torch.tensor([0.4, 0.0])
    assert torch.allclose(raw_attention_map(att, 1, [3, 4], [0, 1]), torch.tensor([0.3, 0.3]))
    values, top = patch_to_tokens(att, 1, patch=1, tokens=[3, 4], k=1)
    assert values.tolist() == pytest.approx([0.6, 0.0]) and top == [0]
    assert to_grid(torch.arange(4.0), 2).shape == (2, 2)
    with pytest.raises(ValueError):
        to_grid(torch.arange(5.0), 2)


def test_the_tokenizer_is_the_same_in_every_process():
    """Same texts, same ids: two fresh interpreters (different hash seeds) build one vocabulary."""
    import subprocess
    import sys

    code = ("from medvqa_lib.papers.paligemma.model import train_tokenizer as t; "
            "texts = ['answer en is the liver normal', 'no', 'yes', 'caption en axial ct of the liver', "
            "'caption en chest x-ray, left lung nodule', 'answer en which lung']; "
            "v = t(texts, 80).get_vocab(); print(sorted(v.items(), key=lambda kv: kv[1]))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2)]
    assert runs[0] == runs[1] and "liver" in runs[0]
    from medvqa_lib.papers.paligemma.model import train_tokenizer

    tok = train_tokenizer(["the liver", "the lung", "a liver"], 40)
    assert tok.tokenize("the lunge") == ["the", "lung", "##e"]  # whole words, then pieces
    assert len(tok) <= 40
