"""MISS's objectives (medvqa_lib.papers.miss.losses) on hand-checked values."""

import math

import pytest
import torch

from medvqa_lib.papers.miss import losses


def identity(h):
    return h


def test_itc_targets_spread_over_every_caption_of_the_same_image():
    ids = torch.tensor([1, 2, 1])
    queued = torch.tensor([2, -1])
    t = losses.itc_targets(ids, queued)
    assert t.tolist() == [[0.5, 0.0, 0.5, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5, 0.0], [0.5, 0.0, 0.5, 0.0, 0.0]]
    assert losses.itc_targets(None, queued) is None
    assert losses.itc_targets(torch.tensor([4, 5]), torch.empty(0, dtype=torch.long)).tolist() == [[1.0, 0.0],
                                                                                                    [0.0, 1.0]]


def test_itm_loss_labels_the_first_rows_matched():
    logits = torch.tensor([[0.0, 10.0], [10.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    right = math.log1p(math.exp(-10))  # cross-entropy of a 10-logit margin on the right class
    assert losses.itm_loss(logits, n_matched=1).item() == pytest.approx(right, rel=1e-4)
    assert losses.itm_loss(logits, n_matched=3).item() == pytest.approx((right + 2 * (10 + right)) / 3, rel=1e-5)
    assert losses.itm_loss(torch.zeros(6, 2), n_matched=2).item() == pytest.approx(math.log(2))


def test_lm_loss_predicts_the_next_token_and_skips_padding():
    hidden = torch.zeros(1, 4, 4)  # uniform at position 0, certain of token 3 at position 1
    hidden[0, 1, 3] = 100.0
    labels = torch.tensor([[-100, 2, 3, -100]])  # position 2 would predict padding: ignored
    assert losses.lm_loss(hidden, labels, identity).item() == pytest.approx(math.log(4) / 2)


def test_mlm_loss_predicts_each_masked_token_at_its_own_position():
    hidden = torch.zeros(1, 3, 4)
    hidden[0, 1, 2] = 100.0
    assert losses.mlm_loss(hidden, torch.tensor([[-100, 2, -100]]), identity).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.mlm_loss(hidden, torch.tensor([[1, -100, -100]]), identity).item() == pytest.approx(math.log(4))


def test_a_batch_without_labels_gives_zero_loss_with_a_gradient():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss = losses.mlm_loss(hidden, torch.full((2, 3), -100), identity)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and torch.equal(hidden.grad, torch.zeros_like(hidden))
