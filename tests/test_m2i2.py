"""M2I2: patch masking, the losses (Eqs. 1-5), decoder initialisation, rank mode and the shared recipes."""

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig

from medvqa_lib import text
from medvqa_lib.config import get_profile
from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation import normalize_answer
from medvqa_lib.nn import (
    SpecialIds,
    interpolate_pos_embed,
    masked_count,
    patchify,
    random_patch_mask,
    unpatchify,
)
from medvqa_lib.papers.m2i2 import losses
from medvqa_lib.papers.m2i2.config import M2I2Config
from medvqa_lib.papers.m2i2.losses import mim_loss
from medvqa_lib.papers.m2i2.model import M2I2, build_m2i2, load_pretrained_for_finetune
from medvqa_lib.papers.m2i2.rank import (
    candidate_answers,
    predict_ranked,
    rank_answers,
    with_test_answers,
)
from medvqa_lib.training import seed_everything

pytestmark = pytest.mark.skipif(text.minilm_dir() is None, reason="the WordPiece vocabulary ships with MiniLM")
SYN = dict(n_images=40, image_size=64, seed=0)


@pytest.fixture(scope="module")
def tok():
    return text.select_text_backbone("tiny", verbose=False).tokenizer


def small(tok, *, depth: int = 2, seed: int = 0, image_size: int = 32, **overrides) -> M2I2:
    """An M2I2 with a tiny random text stack of ``depth`` layers (64-d) and a 32 px ViT."""
    torch.manual_seed(seed)
    sizes = dict(image_size=image_size, vision_width=64, vision_heads=4, mae_width=32, embed_dim=32,
                 queue_size=16)
    cfg = M2I2Config.from_profile("smoke", **{**sizes, **overrides})
    tcfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=depth,
                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    model = M2I2(cfg, tcfg, SpecialIds.from_tokenizer(tok))
    model.tokenizer = tok
    return model


def captions(tok, n: int = 4, size: int = 32) -> dict:
    texts = ["a chest x-ray with a nodule", "a normal brain mri", "liver ct with a large lesion",
             "an x-ray of the hand", "an abdominal ct", "a knee mri scan"][:n]
    b = tok(texts, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(n, 3, size, size, generator=g), "caption_ids": b["input_ids"],
            "caption_mask": b["attention_mask"], "image_ids": [f"img{i % 3}" for i in range(n)]}


def vqa_batch(tok, questions, answers, images) -> dict:
    q = tok(questions, padding=True, return_tensors="pt")
    a = tok(answers, padding=True, return_tensors="pt")
    return {"images": images, "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
            "answer_ids": a["input_ids"], "answer_mask": a["attention_mask"]}


def with_grad(model, prefixes) -> set[str]:
    """Names (up to the first dot) of parameter groups among ``prefixes`` that got a gradient."""
    got = set()
    for name, p in model.named_parameters():
        root = name.split(".")[0]
        if root in prefixes and p.grad is not None and p.grad.abs().sum() > 0:
            got.add(root)
    return got


# ----------------------------------------------------------------------------- config


def test_profiles():
    smoke, cpu, gpu = (M2I2Config.from_profile(p) for p in ("smoke", "cpu", "gpu"))
    assert (smoke.image_size, smoke.text_backbone) == (64, "tiny")
    assert cpu.image_size <= 128 and cpu.text_backbone == "minilm" and cpu.vision_width == 384
    assert (gpu.image_size, gpu.finetune_image_size, gpu.vision_width, gpu.vision_depth) == (256, 384, 768, 12)
    assert (gpu.mae_depth, gpu.mae_width, gpu.queue_size, gpu.embed_dim, gpu.temp) == (8, 512, 65535, 256, 0.07)
    assert gpu.text_backbone == "bert-base-uncased" and gpu.mask_ratio == gpu.mlm_probability == 0.15
    assert cpu.use_mim and cpu.use_itc and not cpu.shared_masked_pass and not cpu.norm_pix_loss
    # a Profile brings its text backbone; the model's image size is the plan's, never the
    # profile's (that one sizes the synthetic images only)
    assert M2I2Config.from_profile(get_profile("gpu")).image_size == 256
    assert M2I2Config.from_profile(get_profile("gpu")).text_backbone == get_profile("gpu").text_backbone
    assert M2I2Config.from_profile(get_profile("cpu", synthetic_image_size=64)).image_size == cpu.image_size == 96
    with pytest.raises(ValueError, match="mask_ratio"):
        M2I2Config(mask_ratio=0.0)
    with pytest.raises(ConfigError, match="unknown profile 'tpu': there is no M2I2 plan for it; choose one of smoke, cpu, gpu"):
        M2I2Config.from_profile("tpu")


# ----------------------------------------------------------------------------- MIM


def test_patch_masking_ratio_and_complement():
    keep, mask = random_patch_mask(5, 64, 0.15, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 64) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [round(0.15 * 64)] * 5 == [10] * 5
    assert keep.shape == (5, 54) and bool((keep.diff(dim=1) > 0).all())  # sorted, no repeats
    visible = torch.zeros_like(mask).scatter(1, keep, True)
    assert torch.equal(visible, ~mask)  # keep and mask partition the patches
    assert len({tuple(r) for r in mask.int().tolist()}) == 5  # each image its own draw
    # MAE's convention: the N - n patches with the lowest noise stay visible
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, noise.argsort(1)[:, :54].sort(1).values)
    assert bool((noise.masked_fill(mask, -1.0).amax(1) < noise.masked_fill(~mask, 2.0).amin(1)).all())
    assert [masked_count(16, r) for r in (0.0, 0.01, 0.15, 0.5, 0.99)] == [0, 1, 2, 8, 15]


def test_masked_set_is_exactly_the_reconstructed_set(tok):
    m = small(tok, mask_ratio=0.25).train()
    images = torch.randn(3, 3, 32, 32)
    out = m.forward_mim(images)
    n = m.num_patches
    assert n == 4 and out.mask.sum(1).tolist() == [1, 1, 1]
    assert out.latent.shape == (3, 1 + 3, 64)  # the encoder saw [CLS] + the visible patches only
    visible = torch.zeros_like(out.mask).scatter(1, out.keep, True)
    assert torch.equal(visible, ~out.mask)
    # the loss depends on the prediction of the masked patches, and of those only
    (grad,) = torch.autograd.grad(out.loss, out.pred)
    assert torch.equal(grad.abs().sum(-1) > 0, out.mask)
    # masked encoding of all patches is the ViT's own forward
    all_patches = torch.arange(n).repeat(3, 1)
    assert torch.allclose(m.encode_image(images, all_patches), m.visual_encoder.forward_features(images), atol=1e-5)


def test_mim_loss_hand_checked():
    # one image, four patches of two values; patches 1 and 3 are masked
    target = torch.tensor([[[1.0, 1.0], [1.0, 3.0], [5.0, 5.0], [2.0, 0.0]]])
    pred = torch.zeros_like(target)
    mask = torch.tensor([[False, True, False, True]])
    # patch 1: ((0-1)^2 + (0-3)^2) / 2 = 5;  patch 3: ((0-2)^2 + 0^2) / 2 = 2;  mean = 3.5
    assert mim_loss(pred, target, mask).item() == pytest.approx(3.5)
    # the unmasked patches do not count, whatever they predict
    assert mim_loss(pred + torch.tensor([[[9.0], [0.0], [9.0], [0.0]]]), target, mask).item() == pytest.approx(3.5)
    # normalised targets: patch [1, 3] has mean 2 and unbiased variance 2, so it becomes
    # [-1, 1] / sqrt(2 + 1e-6); patch [2, 0] becomes [1, -1] / sqrt(2 + 1e-6). Against a zero
    # prediction each value's squared error is 1 / (2 + 1e-6), and so is each patch's mean
    assert mim_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)
    # a perfect prediction of the normalised patch scores 0
    perfect = torch.tensor([[[0.0, 0.0], [-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]]]) / math.sqrt(2 + 1e-6)
    assert mim_loss(perfect, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-10)


def test_mlm_itm_total_and_answer_losses_hand_checked():
    # Eq. 2 / Eq. 3: mean cross-entropy; two rows with p(correct) = 1/2 and 1/4
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]))
    expected = (math.log(2) + math.log(4)) / 2
    assert losses.mlm_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected)
    assert losses.itm_loss(logits[:, :2].log_softmax(-1), torch.tensor([1, 0])).item() == pytest.approx(
        (math.log(3) + math.log(2)) / 2)  # softmax of [1/2, 1/4] -> [2/3, 1/3]; of [1/4, 1/4] -> 1/2
    # Eq. 4: the plain sum of the terms present
    terms = {"loss_mim": torch.tensor(0.5), "loss_itc": torch.tensor(2.0), "loss_itm": torch.tensor(0.25)}
    assert losses.pretraining_loss(terms).item() == 2.75
    # Eq. 5: summed over an answer's tokens, averaged over the answers: three tokens of two answers
    ll = losses.answer_loss(logits[[0, 1, 0]], torch.tensor([0, 2, 1]), batch_size=2)
    assert ll.item() == pytest.approx((math.log(2) + math.log(2) + math.log(4)) / 2)


def test_the_model_calls_the_paper_losses(tok, monkeypatch):
    import medvqa_lib.papers.m2i2.model as model_module

    called: list[str] = []
    for name in ("mim_loss", "mlm_loss", "itm_loss", "itc_loss", "pretraining_loss", "answer_loss"):
        fn = getattr(losses, name)
        monkeypatch.setattr(model_module, name, lambda *a, _fn=fn, _n=name, **k: called.append(_n) or _fn(*a, **k))
    m = small(tok).train()
    out = m(captions(tok))
    assert sorted(called) == ["itc_loss", "itm_loss", "mim_loss", "mlm_loss", "pretraining_loss"]
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("loss_mim", "loss_mlm", "loss_itm",
                                                                           "loss_itc")), rel=1e-6)
    called.clear()
    m(vqa_batch(tok, ["is it normal?"], ["yes"], torch.randn(1, 3, 32, 32)))
    assert called == ["answer_loss"]


def test_norm_pix_option_changes_the_target(tok):
    images = torch.randn(2, 3, 32, 32) * 3 + 5
    losses = {}
    for norm in (False, True):
        m = small(tok, norm_pix_loss=norm, mask_ratio=0.5)
        torch.manual_seed(1)
        losses[norm] = m.forward_mim(images).loss.item()
    # raw pixels around 5 with std 3 vs unit-variance patches: very different errors
    assert losses[False] > 10 and losses[True] < 3


def test_patchify_order_and_roundtrip():
    x = torch.randn(2, 3, 48, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 9, 16 * 16 * 3)
    assert torch.equal(unpatchify(p, 16), x)
    # patch 4 is grid row 1, column 1; its values ordered (row, column, channel)
    assert torch.equal(p[1, 4], x[1, :, 16:32, 16:32].permute(1, 2, 0).flatten())


# ----------------------------------------------------------------------------- fine-tuning set-up


def test_decoder_initialised_from_the_multimodal_layers(tok):
    m = small(tok, depth=4)  # layers 0-1: text encoder, 2-3: multimodal encoder
    assert m.n_text_layers == 2 and len(m.text_decoder.layers) == 2
    assert [layer.cross_attn is None for layer in m.text_encoder.layers] == [True, True, False, False]
    enc, dec = m.text_encoder.layers, m.text_decoder.layers
    for i in range(2):
        for block in ("self_attn", "cross_attn", "ffn"):
            own, src = getattr(dec[i], block).state_dict(), getattr(enc[2 + i], block).state_dict()
            assert own.keys() == src.keys()
            assert all(torch.equal(own[k], src[k]) for k in own)
        assert not torch.equal(dec[i].self_attn.attn.qkv.weight, enc[i].self_attn.attn.qkv.weight)
        assert dec[i].causal and not enc[2 + i].causal and dec[i].ffn is not enc[2 + i].ffn
    assert torch.equal(m.text_decoder.embeddings.word.weight, m.text_encoder.embeddings.word.weight)
    assert m.text_decoder.embeddings is not m.text_encoder.embeddings
    assert m.lm_head.decoder.weight is m.text_decoder.embeddings.word.weight
    assert torch.equal(m.lm_head.dense.weight, m.mlm_head.dense.weight)

    # after pre-training: the decoder follows the pre-trained multimodal layers
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for k in sd:
        if k.startswith("text_encoder.layers.3."):
            sd[k] += 1.0
    ft = small(tok, depth=4, seed=1)
    load_pretrained_for_finetune(ft, sd, new_image_size=32)
    assert torch.equal(ft.text_decoder.layers[1].cross_attn.attn.q.weight, sd["text_encoder.layers.3.cross_attn.attn.q.weight"])
    assert torch.equal(ft.text_decoder.layers[0].ffn.fc1.weight, sd["text_encoder.layers.2.ffn.fc1.weight"])
    kept = small(tok, depth=4, seed=2)
    load_pretrained_for_finetune(kept, sd, new_image_size=32, init_decoder=False)
    assert torch.equal(kept.text_decoder.layers[1].ffn.fc1.weight, sd["text_decoder.layers.1.ffn.fc1.weight"])


def test_image_and_text_widths_may_differ(tok):
    """E.g. ViT-B (768) with the offline MiniLM (384): only the decoder's cross-attention key/value
    matrix cannot come from the multimodal layers (it reads question states, not image tokens)."""
    m = small(tok, vision_width=96).train()
    left = m.init_answer_decoder()
    assert left == ["text_decoder.layers.0.cross_attn.attn.kv.weight"]  # (2*64, 96) vs (2*64, 64)
    assert torch.equal(m.text_decoder.layers[0].cross_attn.attn.q.weight, m.text_encoder.layers[1].cross_attn.attn.q.weight)
    assert all(torch.isfinite(v) for v in m(captions(tok)).values())
    b = vqa_batch(tok, ["is it normal?"], ["yes"], torch.randn(1, 3, 32, 32))
    assert torch.isfinite(m(b)["loss"]) and len(m.generate(b["images"], b["question_ids"], b["question_mask"])) == 1


def test_pos_embed_interpolated_at_finetune_size(tok):
    m = small(tok, image_size=32)  # 2 x 2 patches
    sd = m.state_dict()
    ft = small(tok, image_size=32, seed=1, queue_size=8)
    report = load_pretrained_for_finetune(ft, sd, new_image_size=48)  # 3 x 3 patches
    assert ft.config.image_size == 48 and ft.num_patches == 9
    assert ft.visual_encoder.pos_embed.shape == ft.visual_encoder_m.pos_embed.shape == (1, 1 + 9, 64)
    expected = interpolate_pos_embed({"pos_embed": sd["visual_encoder.pos_embed"]}, 48, 16)["pos_embed"]
    assert torch.allclose(ft.visual_encoder.pos_embed, expected)
    assert torch.equal(ft.visual_encoder.pos_embed[:, 0], sd["visual_encoder.pos_embed"][:, 0])  # [CLS] kept
    assert "visual_encoder.pos_embed" in report["loaded"] and "image_queue.data" in report["skipped"]
    b = vqa_batch(tok, ["is it normal?"], ["yes"], torch.randn(1, 3, 48, 48))
    assert torch.isfinite(ft(b)["loss"])
    assert ft.forward_mim(b["images"]).pred.shape == (1, 9, 16 * 16 * 3)  # the MAE decoder follows


# ----------------------------------------------------------------------------- losses and gradients


@pytest.mark.parametrize("overrides", [{}, {"shared_masked_pass": True}, {"use_mim": False},
                                       {"use_itc": False}])
def test_pretrain_losses_and_gradients(tok, overrides):
    m = small(tok, depth=2, **overrides).train()
    out = m(captions(tok))
    expected = {"loss", "loss_mlm", "loss_itm"}
    expected |= {"loss_mim"} if m.config.use_mim else set()
    expected |= {"loss_itc"} if m.config.use_itc else set()
    assert set(out) == expected and all(torch.isfinite(v) for v in out.values())
    assert out["loss"].item() == pytest.approx(sum(v.item() for k, v in out.items() if k != "loss"), rel=1e-5)
    out["loss"].backward()
    online = {"visual_encoder", "text_encoder", "itm_head", "mlm_head", "mae_decoder", "vision_proj",
              "text_proj", "temp"}
    if not m.config.use_itc:
        online -= {"vision_proj", "text_proj", "temp"}
    if not m.config.use_mim:
        online -= {"mae_decoder"}
    roots = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert with_grad(m, roots) == online
    for name, p in m.named_parameters():  # momentum models are frozen, the answer decoder idle
        if name.split(".")[0].endswith("_m"):
            assert not p.requires_grad and p.grad is None, name
        if name.startswith(("text_decoder.", "lm_head.")):
            assert p.grad is None, name
    for layer in m.text_encoder.layers:  # every layer, text and multimodal, learns
        assert layer.ffn.fc1.weight.grad.abs().sum() > 0


def test_vqa_loss_and_gradients(tok):
    m = small(tok, depth=2).train()
    b = vqa_batch(tok, ["is there a nodule?", "which organ is shown?"], ["yes", "the left lung"],
                  torch.randn(2, 3, 32, 32))
    out = m(b)
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    roots = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert with_grad(m, roots) == {"visual_encoder", "text_encoder", "text_decoder", "lm_head"}
    assert m.text_encoder.layers[1].cross_attn.attn.kv.weight.grad.abs().sum() > 0
    # each image once (``image_index``) gives the same loss as one image row per question
    m.eval()
    dup = vqa_batch(tok, ["is there a nodule?", "which organ?", "is it normal?"], ["yes", "liver", "no"],
                    b["images"][[0, 1, 0]])
    once = {**dup, "images": b["images"], "image_index": torch.tensor([0, 1, 0])}
    assert m(once)["loss"].item() == pytest.approx(m(dup)["loss"].item(), rel=1e-5)


def test_shared_masked_pass_feeds_masked_features_to_itm_and_mlm(tok):
    for shared, online_calls, image_tokens in ((False, 2, {1 + 4, 1 + 3}), (True, 1, {1 + 3})):
        m = small(tok, shared_masked_pass=shared, mask_ratio=0.25).train()
        calls: list[int] = []
        kv_lengths: set[int] = set()  # image tokens seen by cross-attention and the MAE decoder
        m.visual_encoder.patch_embed.register_forward_hook(lambda *_, c=calls: c.append(1))
        for module in (m.text_encoder.layers[1].cross_attn.attn.kv, m.mae_decoder.embed):
            module.register_forward_hook(lambda _m, inp, _o, s=kv_lengths: s.add(inp[0].shape[1]))
        m(captions(tok))
        assert len(calls) == online_calls and kv_lengths == image_tokens


def test_queue_and_momentum_update_only_in_training(tok):
    m = small(tok).train()
    batch = captions(tok)
    m(batch)
    assert int(m.image_queue.ptr) == 4 and len(m.text_queue.get()) == 4
    before = m.image_queue.data.clone()
    m.eval()(batch)
    assert torch.equal(before, m.image_queue.data) and not m.visual_encoder_m.training


# ----------------------------------------------------------------------------- answers


def test_generate_returns_token_ids(tok):
    m = small(tok, seed=1).train()
    images = torch.randn(3, 3, 32, 32)
    b = vqa_batch(tok, ["is this normal?", "what organ is shown?", "where is the lesion?"], ["a"] * 3, images)
    args = (images, b["question_ids"], b["question_mask"])
    for beams in (1, 3):
        out = m.generate(*args, max_new_tokens=5, num_beams=beams)
        assert len(out) == 3 and m.training  # training mode restored
        for row in out:
            assert 0 < len(row) <= 5 and all(0 <= t < tok.vocab_size for t in row)
            assert tok.sep_token_id not in row[:-1]
    assert m.generate(*args, max_new_tokens=5, num_beams=1) == m.generate(*args, max_new_tokens=5, num_beams=1)


def test_rank_mode_scores_are_the_answer_log_likelihoods(tok):
    m = small(tok, seed=3).eval()
    images = torch.randn(2, 3, 32, 32)
    questions = ["is there a nodule?", "which lung is affected?"]
    candidates = ["yes", "no", "the left lung", "right"]
    b = vqa_batch(tok, questions, ["x"] * 2, images)
    best, scores = rank_answers(m, b, candidates, tok, return_scores=True)
    assert scores.shape == (2, 4)
    # each score is minus the teacher-forced answer loss (Eq. 5) of that one question/answer pair
    for i in range(2):
        for j, cand in enumerate(candidates):
            one = vqa_batch(tok, [questions[i]], [cand], images[i:i + 1])
            assert scores[i, j].item() == pytest.approx(-m(one)["loss"].item(), abs=1e-4)
    assert best == [candidates[j] for j in scores.argmax(1).tolist()]
    # constructed case: make "no" by far the most likely first token -> "no" wins everywhere
    with torch.no_grad():
        m.lm_head.decoder.bias[tok.convert_tokens_to_ids("no")] += 30.0
    assert rank_answers(m, b, candidates, tok) == ["no", "no"]
    # the public code's pre-selection: k = all gives the same scores, k = 1 keeps one candidate
    _, full = rank_answers(m, b, candidates, tok, return_scores=True)
    _, all_k = rank_answers(m, b, candidates, tok, k=4, return_scores=True)
    _, top1 = rank_answers(m, b, candidates, tok, k=1, return_scores=True)
    assert torch.allclose(full, all_k)
    assert (torch.isfinite(top1).sum(1) == 1).all() and top1.argmax(1).tolist() == [1, 1]


def test_candidate_list_is_built_from_training_answers_only():
    from medvqa_lib.data.synthetic import load_synthetic_vqa

    train, test = load_synthetic_vqa("train", **SYN), load_synthetic_vqa("test", **SYN)
    cands = candidate_answers(train)
    assert cands and len(set(cands)) == len(cands)
    assert set(cands) == {normalize_answer(s.answer) for s in train}
    with pytest.raises(DataError, match="test"):
        candidate_answers(train + test[:1])
    with pytest.raises(DataError, match="test"):
        candidate_answers(test)
    with pytest.raises(ConfigError, match="test split"):
        candidate_answers(test, splits=("train", "test"))
    leaky = with_test_answers(cands, test)
    assert leaky[: len(cands)] == cands
    assert set(leaky) == set(cands) | {normalize_answer(s.answer) for s in test}


# ----------------------------------------------------------------------------- recipes and seeds


def test_recipes_pretrain_finetune_predict(tok, tmp_path):
    from medvqa_lib.data.synthetic import load_synthetic_captions, load_synthetic_vqa
    from medvqa_lib.experiments.generative import (
        ImageCache,
        StageSettings,
        finetune_vqa,
        predict,
        pretrain,
    )

    backbone = text.select_text_backbone("tiny", verbose=False)
    cfg = M2I2Config.from_profile("smoke", finetune_image_size=80)
    model = build_m2i2(cfg, backbone)
    settings = StageSettings(epochs=1, batch_size=8, eval_limit=4, out_dir=tmp_path / "pre", progress=False)
    result = pretrain(model, load_synthetic_captions(**SYN)[:16], tok, ImageCache(64), settings)
    assert result.steps == 2
    assert {"train_loss_mim", "train_loss_mlm", "train_loss_itm", "train_loss_itc"} <= set(result.history[0])

    ft = build_m2i2(cfg, backbone)
    load_pretrained_for_finetune(ft, model.state_dict())  # -> 80 px (5 x 5 patches)
    train = load_synthetic_vqa("train", **SYN)[:16]
    val = load_synthetic_vqa("val", **SYN)[:4]
    cache = ImageCache(80)
    settings = StageSettings(epochs=1, batch_size=8, eval_limit=4, num_beams=1, max_new_tokens=3,
                             out_dir=tmp_path / "ft", progress=False)
    result = finetune_vqa(ft, train, val, tok, cache, settings)
    assert result.best_epoch == 1 and "val_acc" in result.history[0]
    preds = predict(ft, val, tok, cache, batch_size=4, num_beams=2, max_new_tokens=3)
    assert set(preds) == {s.qid for s in val} and all(isinstance(p, str) for p in preds.values())
    cands = candidate_answers(train)
    ranked = predict_ranked(ft, val, cands, tok, cache, batch_size=4)
    assert set(ranked) == {s.qid for s in val} and set(ranked.values()) <= set(cands)


def test_same_seed_same_losses(tok):
    def run(seed: int) -> list[float]:
        seed_everything(seed)
        m = small(tok, seed=seed).train()
        out = m(captions(tok))
        out["loss"].backward()
        return [out[k].item() for k in sorted(out)] + [m.visual_encoder.cls_token.grad.sum().item()]

    assert run(0) == run(0)
    assert run(0) != run(1)


# ----------------------------------------------------------------------------- Grad-CAM (Fig. 3)


def test_cross_attention_gradcam(tok):
    pytest.importorskip("pytorch_grad_cam")
    from medvqa_lib.papers.m2i2.gradcam import (
        AttentionProbe,
        _explicit_cross_attention,
        cross_attention_gradcam,
        default_layer,
        overlay,
    )

    m = small(tok, depth=4, image_size=48).train()
    assert default_layer(m) == 3  # the last of the two multimodal layers
    b = vqa_batch(tok, ["is there a nodule?", "which lung is affected?"], ["yes", "the left lung"],
                  torch.randn(2, 3, 48, 48))
    args = (b["images"], b["question_ids"], b["question_mask"])
    m.eval()
    sdpa = m.encode_question(*args)[0]
    seen = []
    probe = AttentionProbe()
    probe.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with _explicit_cross_attention(m, 2, probe):
        explicit = m.encode_question(*args)[0]
    assert torch.allclose(explicit, sdpa, atol=1e-5)  # the same attention, made visible
    assert seen == [(2, 4, b["question_ids"].shape[1], 1 + 9)]
    assert torch.equal(m.encode_question(*args)[0], sdpa)  # SDPA restored afterwards
    m.train()
    maps = cross_attention_gradcam(m, *args, b["answer_ids"], b["answer_mask"])
    assert maps.shape == (2, 48, 48) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert m.training and all(p.grad is None for p in m.parameters())
    own = cross_attention_gradcam(m, *args, layer=2)  # the model's own greedy answer
    assert own.shape == (2, 48, 48)
    assert overlay(b["images"][0], maps[0]).shape == (48, 48, 3)
    with pytest.raises(ValueError, match="no cross-attention"):
        cross_attention_gradcam(m, *args, layer=0)
