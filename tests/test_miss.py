import pytest
import torch
from transformers import BertConfig

from medvqa_lib import text
from medvqa_lib.nn import SpecialIds, masked_positions
from medvqa_lib.papers.miss import losses
from medvqa_lib.papers.miss.config import MISSConfig
from medvqa_lib.papers.miss.model import MISS, build_miss, load_pretrained_for_finetune

pytestmark = pytest.mark.skipif(text.minilm_dir() is None, reason="the WordPiece vocabulary ships with MiniLM")


@pytest.fixture(scope="module")
def tok():
    return text.select_text_backbone("tiny", verbose=False).tokenizer


def small(tok, *, depth: int = 2, seed: int = 0, **overrides) -> MISS:
    """A MISS with a tiny random text stack of ``depth`` layers (64-d) and a 32 px ViT."""
    torch.manual_seed(seed)
    cfg = MISSConfig.from_profile("smoke", image_size=32, vision_width=64, vision_heads=4,
                                  embed_dim=32, queue_size=16, **overrides)
    tcfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=depth,
                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    model = MISS(cfg, tcfg, SpecialIds.from_tokenizer(tok))
    model.tokenizer = tok
    return model


def captions(tok, n: int = 4) -> dict:
    texts = ["a chest x-ray with a nodule", "a normal brain mri", "liver ct with a large lesion",
             "an x-ray of the hand", "an abdominal ct", "a knee mri scan"][:n]
    b = tok(texts, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "input_ids": b["input_ids"],
            "attention_mask": b["attention_mask"], "image_ids": [f"img{i % 3}" for i in range(n)]}


def vqa_batch(tok, questions, answers, images) -> dict:
    q = tok(questions, padding=True, return_tensors="pt")
    a = tok(answers, padding=True, return_tensors="pt")
    return {"images": images, "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
            "answer_ids": a["input_ids"], "answer_mask": a["attention_mask"]}


def test_profiles():
    smoke, cpu, gpu = (MISSConfig.from_profile(p) for p in ("smoke", "cpu", "gpu"))
    assert (smoke.image_size, smoke.vision_width, smoke.vision_depth, smoke.text_backbone) == (64, 128, 2, "tiny")
    assert (cpu.image_size, cpu.vision_width, cpu.vision_depth, cpu.vision_heads, cpu.text_backbone,
            cpu.text_depth, cpu.queue_size) == (96, 384, 3, 6, "minilm", 3, 1024)
    assert (gpu.image_size, gpu.finetune_image_size, gpu.vision_depth, gpu.text_backbone,
            gpu.queue_size) == (224, 480, 12, "bert-base-uncased", 57600)
    assert cpu.decoder_objective == "mlm" and cpu.jtm and cpu.momentum == 0.995 and cpu.temp == 0.07
    with pytest.raises(ValueError, match="decoder_objective"):
        MISSConfig(decoder_objective="itc")


def test_masked_positions_with_filler():
    labels = torch.tensor([[-100, 7, -100, 9], [-100, -100, -100, -100], [-100, -100, 5, -100]])
    pos, lab = masked_positions(labels)
    assert pos.tolist() == [[1, 3], [0, 0], [2, 0]]
    assert lab.tolist() == [[7, 9], [-100, -100], [5, -100]]


def test_decoder_shares_all_but_self_attention(tok):
    m = small(tok)
    enc, dec = m.text_encoder, m.text_decoder
    assert dec.embeddings is enc.embeddings
    for le, ld in zip(enc.layers, dec.layers, strict=True):
        assert ld.cross_attn is le.cross_attn and ld.ffn is le.ffn
        assert ld.self_attn is not le.self_attn and ld.causal and not le.causal
    assert m.lm_head.decoder.weight is enc.embeddings.word.weight
    enc_ids = {id(p) for p in enc.parameters()}
    dec_only = {n for n, p in dec.named_parameters(remove_duplicate=False) if id(p) not in enc_ids}
    assert dec_only and all(".self_attn." in n for n in dec_only)
    assert len(dec_only) == len([n for n, _ in enc.named_parameters() if ".self_attn." in n])


def test_without_jtm_splits_the_text_layers(tok):
    m = small(tok, depth=4, jtm=False)
    assert [layer.cross_attn is None for layer in m.text_encoder.layers] == [True, True, False, False]
    assert m.text_encoder_m.depth == 2 and m.n_text_layers == 2
    dec = m.text_decoder.layers
    assert dec[0].cross_attn is not None and dec[3].cross_attn is m.text_encoder.layers[3].cross_attn
    out = m(captions(tok))
    assert torch.isfinite(out["loss"])
    jtm = small(tok, depth=4)
    assert all(layer.cross_attn is not None for layer in jtm.text_encoder.layers)
    assert jtm.text_encoder_m.depth == 4


@pytest.mark.parametrize("objective,jtm", [("mlm", True), ("lm", True), ("mlm", False)])
def test_pretrain_losses_and_gradients(tok, objective, jtm):
    m = small(tok, decoder_objective=objective, jtm=jtm).train()
    out = m(captions(tok))
    assert set(out) == {"loss", "loss_itc", "loss_itm", f"loss_{objective}"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    momentum = ("_m.", "visual_encoder_m", "text_encoder_m")
    for name, p in m.named_parameters():
        if any(k in name for k in momentum):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_one_pass_per_stack_and_queue_update(tok):
    m = small(tok).train()
    calls: dict[str, int] = {}
    stacks = {"visual_encoder": m.visual_encoder.patch_embed, "visual_encoder_m": m.visual_encoder_m.patch_embed,
              "text_encoder": m.text_encoder, "text_encoder_m": m.text_encoder_m, "text_decoder": m.text_decoder}
    for name, module in stacks.items():
        module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    itm_rows = []
    m.itm_head.register_forward_hook(lambda _m, inp, _o: itm_rows.append(inp[0].shape[0]))
    batch = captions(tok)
    m(batch)
    # image once (+ momentum once), text mode once, ONE multimodal pass of 3B rows, decoder once
    assert calls == {"visual_encoder": 1, "visual_encoder_m": 1, "text_encoder": 2, "text_encoder_m": 1,
                     "text_decoder": 1}
    assert itm_rows == [3 * 4]
    assert int(m.image_queue.ptr) == 4 and len(m.text_queue.get()) == 4
    before = m.image_queue.data.clone()
    m.eval()(batch)  # evaluation leaves queues and momentum models alone
    assert torch.equal(before, m.image_queue.data) and int(m.idx_queue.ptr) == 4


def test_momentum_models_follow_by_ema(tok):
    m = small(tok).train()
    with torch.no_grad():
        m.vision_proj.weight.add_(1.0)
    before = m.vision_proj_m.weight.clone()
    m(captions(tok))
    expected = 0.995 * before + 0.005 * m.vision_proj.weight.detach()
    assert torch.allclose(m.vision_proj_m.weight, expected, atol=1e-6)
    assert not m.visual_encoder_m.training and not m.text_encoder_m.training


def test_pretraining_loss_decreases(tok):
    m = small(tok).train()
    batch = captions(tok)
    queues = (m.image_queue, m.text_queue, m.idx_queue)

    def eval_loss() -> float:  # same masks and negatives, empty queues, no dropout
        counts = [q.count.clone() for q in queues]
        for q in queues:
            q.count.zero_()
        torch.manual_seed(0)
        loss = m.eval()(batch)["loss"].item()
        for q, c in zip(queues, counts, strict=True):
            q.count.copy_(c)
        m.train()
        return loss

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(15):
        loss = m(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


def test_vqa_overfit_then_generate(tok):
    m = small(tok).train()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = vqa_batch(tok, ["which lung has the nodule?"], ["the left lung"], images)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(40):
        loss = m(batch)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    args = (images, batch["question_ids"], batch["question_mask"])
    greedy = m.generate(*args, num_beams=1)
    assert tok.decode(greedy[0], skip_special_tokens=True) == "the left lung"
    assert greedy[0][-1] == tok.sep_token_id
    beam = m.generate(*args, num_beams=3)
    assert beam == greedy and m.training  # generate restores the training mode


def test_generate_greedy_equals_one_beam_and_beams_are_valid(tok):
    m = small(tok, seed=1).eval()
    images = torch.randn(3, 3, 32, 32)
    b = vqa_batch(tok, ["is this normal?", "what organ is shown?", "where is the lesion?"],
                  ["yes", "no", "x"], images)
    args = (images, b["question_ids"], b["question_mask"])
    greedy = m.generate(*args, max_new_tokens=6, num_beams=1)
    assert greedy == m.generate(*args, max_new_tokens=6, num_beams=1)  # deterministic
    one_beam = [row.tolist()[1:] for row in m._beam_search(*m.encode_question(*args), 6, 1, 1.0)]
    trimmed = [r[: r.index(tok.sep_token_id) + 1] if tok.sep_token_id in r else r for r in one_beam]
    assert trimmed == greedy
    beams = m.generate(*args, max_new_tokens=6, num_beams=3)
    assert beams == m.generate(*args, max_new_tokens=6, num_beams=3)
    for row in beams:
        assert 0 < len(row) <= 6 and all(0 <= t < tok.vocab_size for t in row)
        assert tok.sep_token_id not in row[:-1]
        assert tok.pad_token_id not in row


def test_batch_dispatch_with_collator_keys(tok):
    m = small(tok)
    batch = captions(tok)
    collated = {"images": batch["images"], "caption_ids": batch["input_ids"],
                "caption_mask": batch["attention_mask"], "image_ids": ["a", "b", "a", "c"],
                "captions": ["..."] * 4}
    assert "loss_itc" in m(collated)
    vqa = vqa_batch(tok, ["is it normal?"] * 2, ["yes", "no"], batch["images"][:2])
    assert set(m(vqa)) == {"loss"}


def test_build_from_backbone_and_finetune_resize(tok):
    cfg = MISSConfig.from_profile("smoke", image_size=32, queue_size=8)
    backbone = text.select_text_backbone("tiny", verbose=False)
    m = build_miss(cfg, backbone)
    assert m.tokenizer is backbone.tokenizer and m.depth == 2
    assert torch.equal(m.text_encoder_m.layers[0].ffn.fc1.weight, m.text_encoder.layers[0].ffn.fc1.weight)
    sd = m.state_dict()
    ft = build_miss(cfg.replace(image_size=32, queue_size=4), backbone)
    report = load_pretrained_for_finetune(ft, sd, new_image_size=48)
    assert ft.visual_encoder.pos_embed.shape == (1, 9 + 1, 128) and ft.config.image_size == 48
    assert "visual_encoder.pos_embed" in report["loaded"] and "image_queue.data" in report["skipped"]
    assert torch.equal(ft.text_encoder.layers[1].cross_attn.attn.q.weight,
                       sd["text_encoder.layers.1.cross_attn.attn.q.weight"])
    q = tok(["is it normal?"], return_tensors="pt")
    out = ft.generate(torch.randn(1, 3, 48, 48), q["input_ids"], q["attention_mask"], max_new_tokens=3)
    assert len(out[0]) <= 3


def test_pretraining_calls_the_loss_functions_of_the_paper(tok, monkeypatch):
    calls: list[str] = []
    for name in ("itc_targets", "itm_loss", "mlm_loss", "lm_loss"):
        fn = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    m = small(tok).train()
    m(captions(tok))
    assert calls == ["itc_targets", "itm_loss", "mlm_loss"]
    calls.clear()
    small(tok, decoder_objective="lm")(captions(tok))
    assert calls == ["itc_targets", "itm_loss", "lm_loss"]
    calls.clear()
    images = torch.randn(2, 3, 32, 32)
    m(vqa_batch(tok, ["is it normal?"] * 2, ["yes", "no"], images))
    assert calls == ["lm_loss"]
