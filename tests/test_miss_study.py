"""The MISS chapter's experiment helpers, image de-duplication in VQA batches, CPU bf16 paths."""

import pandas as pd
import pytest
import torch

from medvqa_lib.config import get_profile
from medvqa_lib.data.dataset import VQACollator, group_by_image
from medvqa_lib.data.schema import CaptionSample
from medvqa_lib.data.synthetic import load_synthetic_vqa
from medvqa_lib.experiments.corpus import subset
from medvqa_lib.experiments.generative import GroupedVQADataset, ImageCache, predict
from medvqa_lib.experiments.tables import compare_to_prior, seed_mean_scores
from medvqa_lib.nn import attention
from medvqa_lib.papers.miss.config import MISSConfig, study_plan
from medvqa_lib.papers.miss.model import build_miss
from medvqa_lib.papers.miss.pipeline import retrieval_recall, transcap_pool
from medvqa_lib.text import minilm_dir, select_text_backbone

pytestmark = pytest.mark.skipif(minilm_dir() is None, reason="the WordPiece vocabulary ships with MiniLM")
SYN = dict(n_images=30, image_size=64, seed=0)


@pytest.fixture(scope="module")
def tiny():
    backbone = select_text_backbone("tiny", verbose=False)
    torch.manual_seed(0)
    model = build_miss(MISSConfig.from_profile("smoke"), backbone).eval()
    return model, backbone.tokenizer


# ----------------------------------------------------------------------------- grouping


def test_group_by_image_keeps_every_question_once_in_groups_of_one_image():
    samples = load_synthetic_vqa("train", **SYN)
    groups = group_by_image(samples, 3, seed=1)
    flat = [s.qid for g in groups for s in g]
    assert sorted(flat) == sorted(s.qid for s in samples)
    assert all(len(g) <= 3 and len({s.image_id for s in g}) == 1 for g in groups)
    per_image = pd.Series([s.image_id for s in samples]).value_counts()
    assert len(groups) == sum(-(-n // 3) for n in per_image)
    assert [s.qid for g in group_by_image(samples, 3, seed=1) for s in g] == flat  # seeded
    assert [s.qid for g in group_by_image(samples, 3, seed=2) for s in g] != flat
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_by_image(samples, 0)


def test_collator_dedupes_images_and_indexes_them(tiny):
    _, tok = tiny
    img = {k: torch.full((3, 4, 4), float(i)) for i, k in enumerate("abc")}
    items = [{"image": img[k], "image_id": k, "question": "q?", "answer": "yes", "qid": str(i),
              "answer_type": "closed", "question_type": "presence"} for i, k in enumerate("abab c")
             if k != " "]
    batch = VQACollator(tok, dedupe_images=True)([items[:2], items[2:]])  # groups are flattened
    assert batch["images"].shape[0] == 3 and batch["qids"] == ["0", "1", "2", "3", "5"]
    assert batch["image_index"].tolist() == [0, 1, 0, 1, 2]
    assert torch.equal(batch["images"][batch["image_index"]][:, 0, 0, 0], torch.tensor([0., 1, 0, 1, 2]))
    with pytest.raises(ValueError, match="image_id"):
        VQACollator(tok, dedupe_images=True)([{k: v for k, v in items[0].items() if k != "image_id"}])


def test_grouped_dataset_regroups_per_epoch_and_counts_questions():
    samples = load_synthetic_vqa("train", **SYN)
    ds = GroupedVQADataset(samples, ImageCache(32), group_size=2, seed=0)
    first = [[it["qid"] for it in ds[i]] for i in range(len(ds))]
    assert sum(map(len, first)) == len(samples)
    ds.set_epoch(1)
    second = [[it["qid"] for it in ds[i]] for i in range(len(ds))]
    assert sorted(q for g in second for q in g) == sorted(q for g in first for q in g)
    assert first != second


def test_image_index_gives_the_same_loss_and_answers_as_repeated_images(tiny):
    model, tok = tiny
    samples = [s for s in load_synthetic_vqa("train", **SYN)][:12]
    cache = ImageCache(64)
    items = [{"image": cache.get(s), "image_id": s.image_id, "question": s.question, "answer": s.answer,
              "qid": s.qid, "answer_type": s.answer_type, "question_type": s.question_type} for s in samples]
    plain = VQACollator(tok)(items)
    dedup = VQACollator(tok, dedupe_images=True)(items)
    assert dedup["images"].shape[0] < plain["images"].shape[0]
    with torch.no_grad():
        a = model(plain)["loss"]
        b = model(dedup)["loss"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g1 = model.generate(plain["images"], plain["question_ids"], plain["question_mask"], 4, 1)
    g2 = model.generate(dedup["images"], dedup["question_ids"], dedup["question_mask"], 4, 1,
                        image_index=dedup["image_index"])
    assert g1 == g2


def test_predict_does_not_depend_on_batching(tiny):
    model, tok = tiny
    samples = load_synthetic_vqa("val", **SYN)[:10]
    cache = ImageCache(64)
    a = predict(model, samples, tok, cache, batch_size=3, num_beams=1, max_new_tokens=3, precision="fp32")
    b = predict(model, samples, tok, cache, batch_size=10, num_beams=1, max_new_tokens=3, precision="fp32")
    assert a == b and set(a) == {s.qid for s in samples}


# ----------------------------------------------------------------------------- CPU bf16


def test_cpu_bf16_attention_matches_fp32_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5)
    mask[1, ..., -2:] = -1e4
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- study helpers


def test_study_plan_sizes_follow_the_profile_and_overrides(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path, model={"vision_depth": 2}, finetune={"lr": 3e-5},
                      finetune_epochs={"slake": 5}, pairs=10)
    assert plan.model.vision_depth == 2 and plan.finetune.lr == 3e-5 and plan.pairs == 10
    assert plan.finetune_settings("slake").epochs == 5
    assert plan.finetune_settings("elsewhere").epochs == plan.finetune.epochs
    assert list(plan.transcap_fractions) == sorted(plan.transcap_fractions)
    gpu = study_plan(get_profile("gpu"), tmp_path)
    assert (gpu.pretrain.epochs, gpu.finetune.epochs, gpu.pretrain.lr, gpu.pretrain.weight_decay) == (
        100, 200, 2e-5, 0.05)
    assert gpu.model.image_size == 224 and gpu.model.finetune_image_size == 480


def test_subset_is_nested_and_checks_its_fraction():
    items = list(range(30))
    small, large = subset(items, 1 / 3, seed=4), subset(items, 2 / 3, seed=4)
    assert len(small) == 10 and len(large) == 20 and set(small) <= set(large)
    assert subset(items, 0.0) == [] and subset(items, 1.0) == items
    with pytest.raises(ValueError, match="fraction"):
        subset(items, 1.5)


def test_transcap_pool_never_returns_test_images():
    prof = get_profile("smoke")
    items, source = transcap_pool(prof, {}, None, seed=0)
    assert items and {i.split for i in items} == {"train"} and "synthetic" in source
    held, _ = transcap_pool(prof, {}, None, seed=0, split="val")
    assert {i.split for i in held} == {"val"}
    with pytest.raises(Exception, match="test"):
        transcap_pool(prof, {}, None, seed=0, split="test")


def _scored(exact, types):
    return pd.DataFrame({"qid": [str(i) for i in range(len(exact))], "exact": exact,
                         "recall": [float(e) for e in exact], "answer_type": types})


def test_seed_mean_scores_average_each_question_over_seeds():
    class R:  # the two fields seed_mean_scores reads
        def __init__(self, scored):
            self.scored = scored

    a = _scored([True, False, True], ["closed", "open", "open"])
    b = _scored([True, True, False], ["closed", "open", "open"])
    mean = seed_mean_scores([R(a), R(b)]).set_index("qid")["exact"]
    assert mean.tolist() == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="different test questions"):
        seed_mean_scores([R(a), R(a.iloc[:2])])


def test_compare_to_prior_supports_only_a_clear_margin():
    types = ["closed"] * 40 + ["open"] * 40
    model = _scored([True] * 40 + [i % 2 == 0 for i in range(40)], types)
    prior = _scored([i % 2 == 0 for i in range(40)] + [i % 2 == 0 for i in range(40)], types)
    table = compare_to_prior({"d": model}, {"d": prior}, n_resamples=500, label="MISS")
    assert table.loc[("d", "closed"), "MISS − prior (pp)"] == 50.0
    assert bool(table.loc[("d", "closed"), "supported"])
    assert table.loc[("d", "open"), "MISS − prior (pp)"] == 0.0
    assert not bool(table.loc[("d", "open"), "supported"])


def test_retrieval_recall_is_perfect_when_captions_name_their_image(tiny, monkeypatch):
    model, tok = tiny
    caps = [CaptionSample(f"im{i}", None, f"caption {i}") for i in range(6)]

    def fake_features(images=None, input_ids=None, attention_mask=None):
        eye = torch.eye(6)
        return eye[: images.shape[0]], eye[: input_ids.shape[0]]

    monkeypatch.setattr(model, "itc_features", fake_features)

    class Cache:
        def get(self, c):
            return torch.zeros(3, 8, 8)

    table = retrieval_recall(model, caps, tok, Cache(), ks=(1, 5))
    assert table.loc[1, "image→text R@k"] == 100.0 and table.loc[1, "text→image R@k"] == 100.0
    assert table.loc[1, "chance"] == round(100 / 6, 1)


def test_untie_decoder_copies_shared_modules_and_reties_the_head():
    model = build_miss(MISSConfig.from_profile("smoke"), select_text_backbone("tiny", verbose=False))
    enc, dec = model.text_encoder, model.text_decoder
    assert dec.embeddings is enc.embeddings and dec.layers[0].ffn is enc.layers[0].ffn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.untie_decoder()
    assert dec.embeddings is not enc.embeddings
    for le, ld in zip(enc.layers, dec.layers, strict=True):
        assert ld.ffn is not le.ffn and ld.cross_attn is not le.cross_attn
        assert torch.equal(ld.ffn.fc1.weight, le.ffn.fc1.weight)
        assert torch.equal(ld.cross_attn.attn.q.weight, le.cross_attn.attn.q.weight)
    assert model.lm_head.decoder.weight is dec.embeddings.word.weight
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # same values, more entries
    with torch.no_grad():
        dec.layers[0].ffn.fc1.weight.add_(1.0)
    assert not torch.equal(dec.layers[0].ffn.fc1.weight, enc.layers[0].ffn.fc1.weight)
    model.untie_decoder()  # idempotent


def test_run_labels_become_single_folder_names():
    from medvqa_lib.experiments.runs import slug

    assert slug("w/o JTM") == "wo_JTM"
    assert slug("JTM + TransCap (33%)") == "JTM_plus_TransCap_33pc"
    assert "/" not in slug("a/b/c") and slug("///") == "run"
