"""CMDPI: every loss on hand-checked inputs, masking, head mixup, similar pairs, switches,
gradients, determinism, a few training steps and the shared Trainer on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from medvqa_lib import text
from medvqa_lib.errors import DataError
from medvqa_lib.evaluation import exact_match
from medvqa_lib.nn import SpecialIds, itc_loss, patchify, random_patch_mask
from medvqa_lib.papers.cmdpi import config as cc
from medvqa_lib.papers.cmdpi import losses
from medvqa_lib.papers.cmdpi import model as cm
from medvqa_lib.papers.cmdpi.answers import (
    answer_coverage,
    build_answer_vocab,
    load_pretrained_for_finetune,
    remap_answer_head,
)
from medvqa_lib.papers.cmdpi.config import CMDPIConfig
from medvqa_lib.papers.cmdpi.data import (
    CMDPICollator,
    CMDPIPretrainCollator,
    CMDPIVQADataset,
    predict_samples,
)
from medvqa_lib.papers.cmdpi.losses import (
    answer_loss,
    contra_loss,
    contrastive_loss,
    deviate_features,
    difference_reconstruction_loss,
    finetune_loss,
    head_mixup,
    image_rec_loss,
    mixup_partners,
    reconstruction_loss,
    sample_lambda,
    soft_cross_entropy,
    text_rec_loss,
)
from medvqa_lib.papers.cmdpi.model import CMDPI, build_cmdpi
from medvqa_lib.papers.cmdpi.similar import SimilarImages, build_similar_images, similar_pairs

pytestmark = pytest.mark.skipif(text.minilm_dir() is None, reason="the WordPiece vocabulary ships with MiniLM")

N_PATCHES = 16  # 32 px images, 8 px patches


@pytest.fixture(scope="module")
def tok():
    return text.select_text_backbone("tiny", verbose=False).tokenizer


def small(tok, *, seed: int = 0, vocab=None, **overrides) -> CMDPI:
    """A CMDPI with a 2-layer 64-d text stack, a 32 px / 8 px-patch ViT and a 2-layer RecNet."""
    torch.manual_seed(seed)
    values = dict(image_size=32, patch_size=8, vision_width=64, vision_heads=4, dim=64, rec_heads=4,
                  num_answers=5, max_text_len=24)
    values.update(overrides)
    cfg = CMDPIConfig.from_profile("smoke", **values)
    tcfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)
    model = CMDPI(cfg, tcfg, SpecialIds.from_tokenizer(tok), vocab)
    model.tokenizer = tok
    return model


TEXTS = ["a chest x-ray with a nodule", "a normal brain mri", "is the liver enlarged?", "where is the mass?"]


def pretrain_batch(tok) -> dict:
    """Two caption rows and two VQA rows (answers 2 and 3)."""
    b = tok(TEXTS, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(4, 3, 32, 32, generator=g), "text_ids": b["input_ids"],
            "text_mask": b["attention_mask"], "answer_labels": torch.tensor([-100, -100, 2, 3]),
            "is_caption": torch.tensor([True, True, False, False])}


def finetune_batch(tok) -> dict:
    qs = ["is it normal?", "what organ is shown?", "is there a mass?", "where is the lesion?"]
    q = tok(qs, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    return {"images": images, "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
            "answer_labels": torch.tensor([0, 1, 0, 4]), "similar_images": torch.randn(4, 3, 32, 32, generator=g),
            "organs": ["chest", "head", "chest", "head"],
            "question_types": ["abnormality", "organ", "abnormality", "position"]}


def momentum_param(name: str) -> bool:
    return name.startswith(("image_encoder_m.", "text_encoder_m."))


# ----------------------------------------------------------------------------- config


def test_profiles_and_validation():
    smoke, cpu, gpu = (CMDPIConfig.from_profile(p) for p in ("smoke", "cpu", "gpu"))
    assert (smoke.image_size, smoke.text_backbone, smoke.dim) == (64, "tiny", 128)
    assert (cpu.text_backbone, cpu.image_size, cpu.dim, cpu.rec_depth) == ("minilm", 96, 192, 4)
    assert (gpu.image_size, gpu.dim, gpu.rec_depth, gpu.vit_pretrained) == (
        224, 512, 4, "vit_base_patch16_clip_224.openai")
    for c in (smoke, cpu, gpu):  # the paper's hyper-parameters in every profile
        assert (c.alpha, c.alpha_prime, c.sim_threshold, c.mix_lambda) == (0.5, 1.0, 0.75, "uniform")
        assert (c.w_img, c.w_txt, c.w_ans, c.w_mix, c.w_diff) == (1, 1, 1, 1, 1)
    assert cc.PAPER_TRAINING["finetune_lr"] == 7.5e-6 and cc.PAPER_TRAINING["batch_size"] == 32
    with pytest.raises(ValueError, match="mix_lambda"):
        CMDPIConfig(mix_lambda="gauss")
    with pytest.raises(ValueError, match="image_mask_ratio"):
        CMDPIConfig(image_mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown profile"):
        CMDPIConfig.from_profile("tpu")


# ----------------------------------------------------------------------------- ops and losses


def test_patchify_is_row_major_like_the_vit():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5] and p[0, 1].tolist() == [2, 3, 6, 7]
    assert p[0, 2].tolist() == [8, 9, 12, 13]
    rgb = torch.randn(2, 3, 8, 8)
    conv = torch.nn.Conv2d(3, 1, 4, 4, bias=False)  # a patch embedding = a dot product per patch
    w = conv.weight[0].permute(1, 2, 0).reshape(-1)  # (p, p, C) order, as patchify
    assert torch.allclose(conv(rgb).flatten(1), patchify(rgb, 4) @ w, atol=1e-5)


def test_random_patch_mask_ratio():
    torch.manual_seed(0)
    keep, masked = random_patch_mask(5, 16, 0.75)
    assert masked.sum(1).tolist() == [12] * 5 and keep.shape == (5, 4)
    for row_mask, row_keep in zip(masked, keep, strict=True):
        assert not row_mask[row_keep].any() and sorted(row_keep.tolist()) == row_keep.tolist()
    keep, masked = random_patch_mask(2, 10, 0.15)
    assert masked.sum(1).tolist() == [2, 2]  # round(1.5)
    keep, masked = random_patch_mask(2, 4, 0.0)
    assert not masked.any() and keep.tolist() == [[0, 1, 2, 3]] * 2


def test_image_rec_loss_by_hand():
    pred = torch.zeros(1, 2, 2, requires_grad=True)
    target = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])
    assert image_rec_loss(pred, target).item() == pytest.approx((1 + 9) / 2)
    mask = torch.tensor([[False, True]])
    assert image_rec_loss(pred, target, mask).item() == pytest.approx(9.0)
    moved = pred.detach().clone()
    moved[0, 0] = 5.0  # an unscored patch does not count
    assert image_rec_loss(moved, target, mask).item() == pytest.approx(9.0)
    empty = image_rec_loss(pred, target, torch.zeros(1, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    # per-patch normalisation: target [1, 3] -> [-1, 1] (unbiased var 2 -> std sqrt 2)
    t = torch.tensor([[[1.0, 3.0]]])
    want = ((1 / math.sqrt(2)) ** 2 * 2) / 2
    assert image_rec_loss(torch.zeros(1, 1, 2), t, norm_pix=True).item() == pytest.approx(want, rel=1e-4)


def test_text_and_answer_losses_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1, -100])
    want = -math.log(3 / 4)
    assert text_rec_loss(logits, labels).item() == pytest.approx(want)
    assert answer_loss(logits, labels).item() == pytest.approx(want)
    seq = torch.zeros(1, 3, 4)  # (B, M, V) with uniform logits: log 4 on labelled positions
    assert text_rec_loss(seq, torch.tensor([[2, -100, 0]])).item() == pytest.approx(math.log(4))
    none = answer_loss(logits, torch.tensor([-100, -100]))
    assert none.item() == 0.0 and none.requires_grad


def test_contra_loss_two_by_two_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    r = 1 / math.sqrt(2)  # cos(a0, b1) = cos(a1, b1); cos(a1, b0) = 0
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    row1 = -math.log(math.exp(r / tau) / (math.exp(0.0) + math.exp(r / tau)))
    assert contra_loss(a, b, tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert contra_loss(3 * a, 0.1 * b, tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)  # cosine
    assert contra_loss(a[:1], b[:1], tau).item() == pytest.approx(0.0, abs=1e-7)
    # C_inter sums both directions = twice the shared ITC loss (which averages them)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    c = contrastive_loss(x, y, None, None, 0.07, intra=False)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    assert c["c_inter"].item() == pytest.approx(2 * itc_loss(xn, yn, xn, yn, 0.07)[0].item(), rel=1e-5)


def test_contrastive_total_weights_and_momentum_side_without_gradient():
    g = torch.Generator().manual_seed(0)
    h_i, h_t = (torch.randn(4, 8, generator=g, requires_grad=True) for _ in range(2))
    h_i_m, h_t_m = (torch.randn(4, 8, generator=g, requires_grad=True) for _ in range(2))
    c = contrastive_loss(h_i, h_t, h_i_m, h_t_m, 0.07, 0.5, 1.0)
    want_intra = contra_loss(h_i, h_i_m, 0.07) + contra_loss(h_t, h_t_m, 0.07)
    assert c["c_intra"].item() == pytest.approx(want_intra.item(), rel=1e-6)
    assert c["c_total"].item() == pytest.approx(0.5 * c["c_inter"].item() + c["c_intra"].item(), rel=1e-6)
    c["c_intra"].backward()
    assert h_i.grad is not None and h_i_m.grad is None and h_t_m.grad is None
    only_intra = contrastive_loss(h_i, h_t, h_i_m, h_t_m, 0.07, inter=False)
    assert set(only_intra) == {"c_intra", "c_total"}
    assert set(contrastive_loss(h_i, h_t, None, None, 0.07, intra=False)) == {"c_inter", "c_total"}


def test_deviation_mixes_each_row_with_its_own_similar_image_only():
    h = torch.arange(12.0).view(3, 2, 2)
    s = -torch.ones(3, 2, 2)
    eps = torch.tensor([1.0, 0.25, 0.0])
    out = deviate_features(h, s, eps)
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], s[2])
    assert torch.allclose(out[1], 0.25 * h[1] + 0.75 * s[1])
    s2 = s.clone()
    s2[1] = 100.0
    changed = (deviate_features(h, s2, eps) != out).flatten(1).any(1)
    assert changed.tolist() == [False, True, False]


def test_lambda_sampling_modes():
    torch.manual_seed(0)
    u = sample_lambda(20000)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    assert sample_lambda(3, "fixed", fixed=0.3).tolist() == pytest.approx([0.3] * 3)
    beta = sample_lambda(20000, "beta", (0.2, 1.0))
    assert abs(beta.mean().item() - 0.2 / 1.2) < 0.01
    with pytest.raises(ValueError):
        sample_lambda(2, "normal")


def test_mixup_partners_share_the_group_and_are_never_self_when_possible():
    groups = [("chest", "size"), ("head", "organ"), ("chest", "size"), ("chest", "size"), ("abd", "color"),
              ("head", "organ")]
    torch.manual_seed(0)
    for _ in range(20):
        p = mixup_partners(groups).tolist()
        for i, j in enumerate(p):
            assert groups[j] == groups[i]
            assert (j != i) == (i != 4)  # the only abd/color row mixes with nothing
    p = mixup_partners(groups, valid=[True, True, True, True, True, False]).tolist()
    assert p[1] == 1 and p[5] == 5  # an invalid row is neither mixed nor a partner


def test_head_mixup_by_hand_and_targets_sum_to_one():
    heads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 2])
    h_mix, target = head_mixup(heads, labels, torch.tensor([1, 0]), torch.tensor([0.3, 1.0]), 3)
    assert torch.allclose(h_mix, torch.tensor([[0.3, 0.7], [0.0, 1.0]]))
    assert torch.allclose(target, torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.0, 1.0]]))
    torch.manual_seed(0)
    lam = torch.rand(6)
    _, t = head_mixup(torch.randn(6, 4), torch.randint(5, (6,)), torch.randperm(6), lam, 5)
    assert torch.allclose(t.sum(1), torch.ones(6))


def test_soft_cross_entropy_by_hand():
    logits = torch.zeros(1, 2)
    assert soft_cross_entropy(logits, torch.tensor([[0.3, 0.7]])).item() == pytest.approx(math.log(2))
    x = torch.tensor([[1.0, -2.0, 0.5]])
    assert soft_cross_entropy(x, F.one_hot(torch.tensor([2]), 3).float()).item() == pytest.approx(
        F.cross_entropy(x, torch.tensor([2])).item())


def test_the_sums_of_eqs_5_10_and_13_by_hand():
    l_img, l_txt, l_ans = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert reconstruction_loss(l_img, l_txt, l_ans).item() == 10.0  # L_rec = L_img + L_txt + L_ans
    assert reconstruction_loss(l_img, l_txt, l_ans, 0.5, 1.0, 0.5).item() == 1.0 + 3.0 + 2.5  # Table 3
    assert difference_reconstruction_loss(l_img, l_txt).item() == 5.0  # L_diff = L_img^d + L_txt^d
    assert finetune_loss(l_ans, l_img).item() == 7.0  # L_ft = L_mix + L_diff
    assert finetune_loss(l_ans, l_img, w_mix=0.5, w_diff=1.0).item() == 4.5  # Table 4
    assert finetune_loss(l_ans).item() == 5.0  # without difference reconstruction
    assert finetune_loss(torch.zeros((), dtype=torch.bfloat16)).dtype == torch.float32


def test_similar_pairs_respect_the_threshold_and_exclude_self():
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [2.0, 0.0]])  # cos: 0-1 .8, 0-3 1, 1-2 .6
    assert similar_pairs(feats, 0.75) == [[1, 3], [0, 3], [], [0, 1]]
    assert similar_pairs(feats, 0.5) == [[1, 3], [0, 2, 3], [1], [0, 1]]
    assert similar_pairs(feats, 0.75, max_similarity=0.95) == [[1], [0, 3], [], [1]]
    table = SimilarImages.from_features(["a", "b", "c", "d"], feats, 0.75)
    assert table.partners == {"a": ["b", "d"], "b": ["a", "d"], "c": [], "d": ["a", "b"]}
    assert table.sample("c") == "c" and table.share_with_partner() == 0.75
    torch.manual_seed(0)
    assert {table.sample("a") for _ in range(30)} == {"b", "d"}
    assert SimilarImages.from_dict(table.to_dict()) == table
    # a capped training subset: partners outside it are dropped, never sampled
    sub = table.restricted_to(["a", "b", "c"])
    assert sub.partners == {"a": ["b"], "b": ["a"], "c": []} and sub.threshold == 0.75
    assert {sub.sample("a") for _ in range(10)} == {"b"}


# ----------------------------------------------------------------------------- answer set


def test_answer_set_from_training_only_and_unseen_answers_are_wrong(tok):
    from medvqa_lib.data.schema import VQASample

    def s(i, answer, split="train", kind="open"):
        return VQASample(f"q{i}", f"im{i}", None, "q?", answer, kind, "organ", split=split)

    train = [s(0, "Liver"), s(1, "liver"), s(2, "yes", kind="closed"), s(3, "left lung")]
    vocab = build_answer_vocab(train)
    assert vocab.answers == ["liver", "left lung", "yes"]
    with pytest.raises(DataError, match="training data only"):
        build_answer_vocab(train + [s(9, "spleen", split="val")])
    test = [s(10, "spleen", "test"), s(11, "Liver", "test"), s(12, "no", "test", "closed"),
            s(13, "yes", "test", "closed")]
    assert answer_coverage(vocab, test) == {"closed": 0.5, "open": 0.5, "overall": 0.5}
    m = small(tok, vocab=vocab)
    assert m.config.num_answers == 3 and m.ffn_a.decoder.out_features == 3
    assert m.encode_answers(["LIVER", "spleen"]).tolist() == [0, -100]  # unseen -> no training target
    q = tok(["what organ?"] * 4, return_tensors="pt")
    preds = m.predict_answers({"images": torch.zeros(4, 3, 32, 32), "question_ids": q["input_ids"],
                               "question_mask": q["attention_mask"]})
    assert all(p in vocab.answers for p in preds)
    assert not any(exact_match("spleen", a) for a in vocab.answers)  # so "spleen" is always wrong


def test_remap_and_load_carry_answer_rows_by_string(tok):
    from medvqa_lib.evaluation import AnswerVocabulary

    pre = AnswerVocabulary(["yes", "no", "liver"])
    fine = AnswerVocabulary(["no", "spleen", "yes", "heart"])
    m = small(tok, vocab=pre)
    w = m.ffn_a.decoder.weight.detach().clone()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert remap_answer_head(m, fine) == 2
    assert torch.equal(m.ffn_a.decoder.weight[0], w[1]) and torch.equal(m.ffn_a.decoder.weight[2], w[0])
    assert m.config.num_answers == 4 and m.answer_vocab is fine
    fresh = small(tok, seed=5, vocab=fine)
    report = load_pretrained_for_finetune(fresh, sd, pre)
    assert report["answer_rows"] == 2 and "recnet.pos" in report["loaded"]
    assert torch.equal(fresh.ffn_a.decoder.weight[2], w[0])
    assert torch.equal(fresh.recnet.pos, sd["recnet.pos"])


# ----------------------------------------------------------------------------- the model


def test_answer_position_is_each_rows_last_text_token(tok):
    m = small(tok)
    q = tok(["is it normal?", "where exactly is the large mass located?"], padding=True, return_tensors="pt")
    pos = m.answer_positions(q["attention_mask"])
    for row, p in zip(q["input_ids"], pos.tolist(), strict=True):
        t = p - N_PATCHES  # H_o = [h, I_1..I_N, T_1..T_M]: T_t sits at N + t
        assert row[t].item() == tok.sep_token_id


def test_global_and_local_reconstruction_differ_only_in_the_head_vector(tok):
    m = small(tok).eval()
    seen = []
    m.recnet.register_forward_hook(lambda _m, args, _o: seen.append(args))
    batch = pretrain_batch(tok)
    torch.manual_seed(0)
    m(batch)
    (head, img, txt, mask), = seen
    b = 4
    assert head.shape[0] == 2 * b
    assert torch.equal(img[:b], img[b:]) and torch.equal(txt[:b], txt[b:]) and torch.equal(mask[:b], mask[b:])
    h_i = m.image_encoder(batch["images"])[:, 0]
    h_t = m.text_encoder(batch["text_ids"], batch["text_mask"])[:, 0]
    assert torch.allclose(head[:b], m.fuse(h_i, h_t), atol=1e-5)  # h_F of the unmasked input
    assert torch.equal(head[b:], m.local_head.expand(b, -1))  # the shared vector h~


def test_masked_positions_are_the_ones_scored(tok, monkeypatch):
    m = small(tok, image_mask_ratio=0.5, text_mask_ratio=0.5).train()
    record = {}

    def spy(name, fn):
        def wrapped(*a, **k):
            record[name] = out = fn(*a, **k)
            return out
        monkeypatch.setattr(cm, name, wrapped)

    spy("random_patch_mask", cm.random_patch_mask)
    spy("mask_tokens", cm.mask_tokens)
    rows = {}
    for head in ("ffn_i", "ffn_t"):
        getattr(m, head).register_forward_hook(lambda _m, a, _o, h=head: rows.setdefault(h, []).append(a[0]))
    encoder_inputs = []
    m.image_encoder.register_forward_hook(lambda _m, a, _o: encoder_inputs.append(a))
    batch = pretrain_batch(tok)
    torch.manual_seed(3)
    m(batch)
    keep, masked = record["random_patch_mask"]
    assert masked.sum().item() == 4 * N_PATCHES // 2
    _, labels = record["mask_tokens"]
    n_txt = int((labels[:, 1:] != -100).sum())
    assert n_txt > 0
    # global + local: each head runs on exactly the masked patches / tokens of both halves
    assert [r.shape[0] for r in rows["ffn_i"]] == [masked.sum().item()] * 2
    assert [r.shape[0] for r in rows["ffn_t"]] == [n_txt] * 2
    # the masked pass of the image encoder sees only the kept patches
    assert any(len(a) == 2 and torch.equal(a[1], keep) for a in encoder_inputs)
    # Eq. 5 literally (every patch / token) is the other reading
    m2 = small(tok, rec_masked_only=False)
    rows.clear()
    for head in ("ffn_i", "ffn_t"):
        getattr(m2, head).register_forward_hook(lambda _m, a, _o, h=head: rows.setdefault(h, []).append(a[0]))
    m2(batch)
    specials = torch.isin(batch["text_ids"], torch.tensor(m2.ids.specials))
    n_tokens = int(((batch["text_mask"] == 1) & ~specials).sum())
    assert rows["ffn_i"][0].shape[:2] == (4, N_PATCHES) and rows["ffn_t"][0].shape[0] == n_tokens


def test_pretrain_total_is_the_sum_of_the_objectives(tok):
    m = small(tok)
    out = m(pretrain_batch(tok))
    assert set(out) == {"loss", "loss_global", "loss_local", "loss_img", "loss_txt", "loss_ans", "loss_inter",
                        "loss_intra"}
    want = out["loss_global"] + out["loss_local"] + 0.5 * out["loss_inter"] + 1.0 * out["loss_intra"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert all(torch.isfinite(v) and v > 0 for v in out.values())


@pytest.mark.parametrize("switch,gone", [("global_rec", "loss_global"), ("local_rec", "loss_local"),
                                         ("inter_contrastive", "loss_inter"),
                                         ("intra_contrastive", "loss_intra")])
def test_pretraining_ablations_remove_their_term(tok, switch, gone):
    m = small(tok, **{switch: False})
    heads = []
    m.recnet.register_forward_hook(lambda _m, a, _o: heads.append(a[0].shape[0]))
    momentum_calls = []
    m.image_encoder_m.register_forward_hook(lambda *_: momentum_calls.append(1))
    out = m(pretrain_batch(tok))
    assert gone not in out
    parts = {"loss_global": 1.0, "loss_local": 1.0, "loss_inter": 0.5, "loss_intra": 1.0}
    want = sum(w * out[k] for k, w in parts.items() if k in out)
    assert out["loss"].item() == pytest.approx(float(want), rel=1e-5)
    assert heads == ([4] if switch in ("global_rec", "local_rec") else [8])
    assert bool(momentum_calls) == (switch != "intra_contrastive")


def test_data_routing_vqa_rows_stay_out_of_contrast_unless_contra_qa(tok):
    batch = pretrain_batch(tok)
    rows = []
    m = small(tok)
    m.image_encoder_m.register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
    m(batch)
    assert rows == [2]  # the two caption rows
    vqa_only = {**batch, "is_caption": torch.zeros(4, dtype=torch.bool)}
    out = m(vqa_only)
    assert out["loss_inter"].item() == 0.0 and out["loss_intra"].item() == 0.0 and out["loss_ans"] > 0
    qa = small(tok, contrastive_on_vqa=True)
    out = qa(vqa_only)
    assert out["loss_inter"] > 0 and out["loss_intra"] > 0
    captions_only = {**batch, "answer_labels": torch.full((4,), -100)}
    assert m(captions_only)["loss_ans"].item() == 0.0


def test_pretrain_gradients_and_frozen_momentum_encoders(tok):
    m = small(tok).train()
    m(pretrain_batch(tok))["loss"].backward()
    for name, p in m.named_parameters():
        if momentum_param(name):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_intra_contrast_reads_the_momentum_encoder_and_ema_follows(tok):
    m = small(tok).eval()
    batch = pretrain_batch(tok)
    torch.manual_seed(0)
    before = m(batch)
    with torch.no_grad():
        m.text_encoder_m.proj.weight.mul_(-1.0)
    torch.manual_seed(0)
    after = m(batch)
    assert after["loss_intra"] != before["loss_intra"]
    assert after["loss_inter"] == before["loss_inter"] and after["loss_global"] == before["loss_global"]
    m = small(tok).train()
    with torch.no_grad():
        m.image_encoder.proj.weight.add_(1.0)
    old = m.image_encoder_m.proj.weight.clone()
    m(batch)
    want = 0.995 * old + 0.005 * m.image_encoder.proj.weight.detach()
    assert torch.allclose(m.image_encoder_m.proj.weight, want, atol=1e-6)
    assert not m.image_encoder_m.training and not m.text_encoder_m.training


def test_finetune_losses_and_gradients(tok):
    m = small(tok).set_stage("finetune").train()
    out = m(finetune_batch(tok))
    assert set(out) == {"loss", "loss_diff", "loss_diff_img", "loss_diff_txt", "loss_mix"}
    assert out["loss"].item() == pytest.approx((out["loss_mix"] + out["loss_diff"]).item(), rel=1e-5)
    out["loss"].backward()
    unused = {"local_head", "image_mask_token"}
    for name, p in m.named_parameters():
        if momentum_param(name) or name in unused:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_difference_reconstruction_touches_only_the_current_sample(tok):
    m = small(tok).eval()
    b = finetune_batch(tok)
    args = (b["images"], b["question_ids"], b["question_mask"])
    eps = torch.tensor([0.3, 0.6, 0.0, 0.9])
    base = m.difference_reconstruct(*args, b["similar_images"], eps)
    assert base.shape == (4, 1 + N_PATCHES + b["question_ids"].shape[1] - 1, 64)  # [h, H_I, H_T]
    other = b["similar_images"].clone()
    other[1] = torch.randn(3, 32, 32)
    moved = m.difference_reconstruct(*args, other, eps)
    assert (moved != base).flatten(1).any(1).tolist() == [False, True, False, False]
    # eps = 1 (or the image as its own similar image) is the undeviated pass used at inference
    plain = m.difference_reconstruct(*args)
    assert torch.allclose(m.difference_reconstruct(*args, b["similar_images"], torch.ones(4)), plain, atol=1e-5)
    assert torch.allclose(m.difference_reconstruct(*args, b["images"]), plain, atol=1e-5)
    # the similar image is neither reconstructed nor answered: FFN_I sees B x N rows, targets
    # are the current images
    rows = []
    m.ffn_i.register_forward_hook(lambda _m, a, _o: rows.append(a[0]))
    captured = {}
    real = losses.image_rec_loss

    def spy(pred, target, *a, **k):
        captured["target"] = target
        return real(pred, target, *a, **k)

    losses.image_rec_loss = spy
    try:
        m.set_stage("finetune")(b)
    finally:
        losses.image_rec_loss = real
    assert [r.shape[:2] for r in rows] == [(4, N_PATCHES)]
    assert torch.equal(captured["target"], patchify(b["images"], 8))


def test_finetune_ablations_and_fixed_lambda(tok):
    b = finetune_batch(tok)
    m = small(tok, difference_reconstruction=False).set_stage("finetune")
    calls = []
    m.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    out = m({k: v for k, v in b.items() if k != "similar_images"})
    assert set(out) == {"loss", "loss_mix"} and calls == [1]  # no similar image is encoded
    with pytest.raises(ValueError, match="similar_images"):
        small(tok).set_stage("finetune")({k: v for k, v in b.items() if k != "similar_images"})
    # lambda = 1 turns head mixup into the plain answer loss of "w/o head mixup"
    mixed = small(tok, mix_lambda="fixed", mix_fixed=1.0).set_stage("finetune").eval()
    plain = small(tok, head_mixup=False).set_stage("finetune").eval()
    torch.manual_seed(0)
    a = mixed(b)
    torch.manual_seed(0)
    p = plain(b)
    assert set(p) == {"loss", "loss_ans", "loss_diff", "loss_diff_img", "loss_diff_txt"}
    assert a["loss_mix"].item() == pytest.approx(p["loss_ans"].item(), rel=1e-5)
    assert a["loss"].item() == pytest.approx(p["loss"].item(), rel=1e-5)


def test_head_mixup_in_the_forward_mixes_same_group_partners(tok, monkeypatch):
    m = small(tok, mix_lambda="fixed", mix_fixed=0.25).set_stage("finetune").eval()
    seen = {}
    real = losses.head_mixup

    def spy(heads, labels, partner, lam, k):
        seen.update(partner=partner, lam=lam)
        out = real(heads, labels, partner, lam, k)
        seen["target"] = out[1]
        return out

    monkeypatch.setattr(losses, "head_mixup", spy)
    b = finetune_batch(tok)
    m(b)
    assert seen["partner"].tolist() == [2, 1, 0, 3]  # rows 0 and 2 share (chest, abnormality)
    assert seen["lam"].tolist() == [0.25] * 4
    assert torch.allclose(seen["target"].sum(1), torch.ones(4))
    # an explicit partner with no valid answer is replaced by the row itself
    m({**b, "mix_index": torch.tensor([1, 0, 3, 2]), "answer_labels": torch.tensor([0, -100, 0, 4])})
    assert seen["partner"].tolist() == [0, 0, 3, 2]


def test_determinism_with_a_seed(tok):
    b = pretrain_batch(tok)
    m1, m2 = small(tok, seed=7), small(tok, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))
    torch.manual_seed(11)
    o1 = m1(b)
    torch.manual_seed(11)
    o2 = m2(b)
    assert all(torch.equal(o1[k], o2[k]) for k in o1)
    torch.manual_seed(12)
    assert m1(b)["loss"] != o1["loss"]  # other masks
    f = finetune_batch(tok)
    m1.set_stage("finetune")
    m2.set_stage("finetune")
    torch.manual_seed(3)
    f1 = m1(f)["loss"]
    torch.manual_seed(3)
    assert torch.equal(f1, m2(f)["loss"])


def _steps(model, batch, n, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def _eval_loss(model, batch, seed=0):
    was = model.training
    torch.manual_seed(seed)
    value = model.eval()(batch)["loss"].item()
    model.train(was)
    return value


def test_a_few_pretraining_steps_reduce_the_loss(tok):
    m = small(tok).train()
    b = pretrain_batch(tok)
    before = _eval_loss(m, b)
    _steps(m, b, 20, 3e-3)
    assert _eval_loss(m, b) < 0.75 * before


def test_a_few_finetuning_steps_fit_the_answers(tok):
    m = small(tok).train().set_stage("finetune")
    f = finetune_batch(tok)
    before = _eval_loss(m, f)
    _steps(m, f, 30, 3e-3)
    assert _eval_loss(m, f) < 0.3 * before
    assert m.predict(f["images"], f["question_ids"], f["question_mask"]).tolist() == [0, 1, 0, 4]
    assert m.training  # predict restores the mode


def test_bf16_autocast_forward(tok):
    m = small(tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(pretrain_batch(tok))["loss"])
        assert torch.isfinite(m.set_stage("finetune")(finetune_batch(tok))["loss"])


# ----------------------------------------------------------------------------- data and Trainer


SYN = dict(n_images=40, image_size=64, seed=0)


def test_builders_collators_and_the_trainer_drive_both_stages(tok, tmp_path):
    from torch.utils.data import ConcatDataset

    from medvqa_lib.data.synthetic import load_synthetic_captions, load_synthetic_vqa
    from medvqa_lib.experiments.generative import CachedCaptionDataset, CachedVQADataset, ImageCache
    from medvqa_lib.training import TrainConfig, Trainer

    train = load_synthetic_vqa("train", **SYN)[:16]
    val = load_synthetic_vqa("val", **SYN)[:6]
    vocab = build_answer_vocab(train)
    cfg = CMDPIConfig.from_profile("smoke", image_size=32, patch_size=8, max_text_len=40)
    backbone = text.select_text_backbone("tiny", verbose=False)
    torch.manual_seed(0)
    model = build_cmdpi(cfg, backbone, vocab)
    assert model.tokenizer is backbone.tokenizer and model.config.num_answers == len(vocab)
    assert torch.equal(model.text_encoder_m.proj.weight, model.text_encoder.proj.weight)
    cache = ImageCache(32)
    common = dict(batch_size=8, epochs=1, device="cpu", precision="fp32", progress=False, save_last=False)

    # pre-training on captions and questions together
    captions = load_synthetic_captions(**SYN)[:8]
    data = ConcatDataset([CachedCaptionDataset(captions, cache), CachedVQADataset(train[:8], cache)])
    collate = CMDPIPretrainCollator(backbone.tokenizer, vocab, max_text_len=40)
    mixed = collate([data[0], data[8]])
    assert mixed["is_caption"].tolist() == [True, False] and mixed["answer_labels"][0] == -100
    assert mixed["answer_labels"][1] == vocab.encode(train[0].answer)
    result = Trainer(model, TrainConfig(out_dir=tmp_path / "pre", **common), data, collate).fit()
    assert result.steps == 2
    assert {"train_loss_global", "train_loss_local", "train_loss_inter", "train_loss_intra"} <= set(result.history[0])

    # similar images from the pre-trained model, then fine-tuning
    with pytest.raises(DataError):
        build_similar_images(model, val, cache)
    similar = build_similar_images(model, train, cache, threshold=0.0)
    assert set(similar.partners) == {s.image_id for s in train}
    assert all(i not in js for i, js in similar.partners.items())
    ds = CMDPIVQADataset(train, cache, vocab, similar)
    item = ds[0]
    assert item["answer_label"] == vocab.encode(train[0].answer) and item["organ"] == train[0].organ
    batch = CMDPICollator(backbone.tokenizer)([ds[i] for i in range(4)])
    assert batch["similar_images"].shape == batch["images"].shape and len(batch["organs"]) == 4
    model.set_stage("finetune")
    result = Trainer(model, TrainConfig(out_dir=tmp_path / "ft", **common), ds, CMDPICollator(backbone.tokenizer)).fit()
    assert result.steps == 2 and {"train_loss_mix", "train_loss_diff"} <= set(result.history[0])

    preds = predict_samples(model, val, backbone.tokenizer, cache, batch_size=4)
    assert set(preds) == {s.qid for s in val} and all(p in vocab.answers for p in preds.values())
