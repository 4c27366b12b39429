"""Checkpoint files: safetensors weights, weights-only trainer state, RNG snapshots."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from medvqa_lib.training import (
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_model_weights,
    resolve_dir,
    rng_state,
    save_checkpoint,
    save_model_weights,
    seed_everything,
    set_rng_state,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, batch):
        ids, target = batch
        logits = self.out(self.norm(self.emb(ids)))
        return {"loss": nn.functional.cross_entropy(logits, target)}


def test_tied_weights_round_trip(tmp_path):
    seed_everything(0)
    src = Tied()
    path = save_model_weights(src, tmp_path / "m.safetensors", {"note": "x"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["note"] == "x"
    assert len(keys) == 3 and not {"emb.weight", "out.weight"} <= keys  # stored once
    seed_everything(1)
    dst = load_model_weights(Tied(), path)
    assert dst.out.weight is dst.emb.weight
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_trainer_checkpoint_files(tmp_path):
    seed_everything(0)
    ds = torch.utils.data.TensorDataset(torch.randint(0, 10, (12,)), torch.randint(0, 10, (12,)))
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, out_dir=tmp_path, progress=False,
                      select_metric="train_loss")
    Trainer(Tied(), cfg, ds).fit()
    last, best = tmp_path / "last", tmp_path / "best"
    assert sorted(p.name for p in last.iterdir()) == ["config.json", "model.safetensors", "trainer_state.pt"]
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        assert "norm.weight" in f.keys()
    state = torch.load(last / "trainer_state.pt", weights_only=True)  # no pickled code needed
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 2, 0)
    assert {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(state)
    assert json.loads((last / "config.json").read_text())["train_config"]["batch_size"] == 4
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp leftovers
    model = Tied()
    loaded_state, meta = load_checkpoint(last, model)
    assert loaded_state["step"] == 6 and meta["epoch"] == 2


def test_rng_state_survives_weights_only_load(tmp_path):
    seed_everything(3)
    random.gauss(0, 1)  # leave a cached gaussian in the python state
    np.random.standard_normal()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
                torch.rand(4))
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
           torch.rand(4))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_checkpoint_folder_swap_and_recovery(tmp_path):
    m = nn.Linear(2, 2)
    ckpt = tmp_path / "last"
    save_checkpoint(ckpt, m, {"step": 1}, {"v": 1})
    save_checkpoint(ckpt, m, {"step": 2}, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert json.loads((ckpt / "config.json").read_text()) == {"v": 2}
    ckpt.rename(tmp_path / "last.old")  # a crash between the two renames of a swap
    assert resolve_dir(ckpt) == tmp_path / "last.old"
    state, meta = load_checkpoint(ckpt, nn.Linear(2, 2))
    assert state == {"step": 2} and meta == {"v": 2}
    save_checkpoint(ckpt, m, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert resolve_dir(tmp_path / "none") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none", m)


def test_failed_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    m = nn.Linear(2, 2)
    save_checkpoint(tmp_path / "last", m, {"step": 1})

    class Unsaveable:
        pass

    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises
        save_checkpoint(tmp_path / "last", m, {"step": 2, "bad": Unsaveable, "f": lambda: 0})
    state, _ = load_checkpoint(tmp_path / "last", m)
    assert state == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
