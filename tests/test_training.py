"""The training loop: determinism, resume, model selection, accumulation, schedules, config."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from medvqa_lib.errors import ConfigError
from medvqa_lib.training import (
    TrainConfig,
    Trainer,
    autocast_context,
    cpu_has_native_bf16,
    load_trainer_state,
    peak_memory_mb,
    pick_device,
    resolve_precision,
    seed_everything,
)
from medvqa_lib.training.device import move_to_device
from medvqa_lib.training.loop import _progress_on

REPO = Path(__file__).resolve().parents[1]


def make_data(n: int = 26, seed: int = 123) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def collate(items):
    xs, ys = zip(*items, strict=True)
    return {"x": torch.stack(xs), "y": torch.stack(ys), "note": "kept as is"}


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))

    def forward(self, batch):
        assert batch["note"] == "kept as is"
        ce = F.cross_entropy(self.net(batch["x"]), batch["y"])
        reg = 1e-3 * self.net[0].weight.pow(2).sum()
        return {"loss": ce + reg, "loss_ce": ce, "loss_reg": reg}


def validation(ds: TensorDataset):
    def evaluate(model: nn.Module) -> dict[str, float]:
        logits = model.net(ds.tensors[0])
        return {
            "val_loss": F.cross_entropy(logits, ds.tensors[1]).item(),
            "val_acc": (logits.argmax(1) == ds.tensors[1]).float().mean().item(),
        }

    evaluate.split = "validation"
    return evaluate


TRAIN, VAL = make_data(26, 1), make_data(20, 2)
BASE = dict(epochs=3, batch_size=4, grad_accum_steps=2, lr=1e-2, log_every=1, progress=False,
            select_metric="val_acc", warmup_steps=2, precision="fp32")


def run(out_dir, model_seed: int = 0, resume: bool = False, on_step=None, **overrides):
    seed_everything(model_seed)
    model = MLP()
    cfg = TrainConfig(**{**BASE, "out_dir": out_dir, **overrides})
    trainer = Trainer(model, cfg, TRAIN, collate, evaluate_fn=validation(VAL), on_step=on_step)
    return model, trainer, trainer.fit(resume=resume)


def log_lines(out_dir) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    drop = ("time_s", "samples_per_s")
    return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in lines]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_same_seed_same_history_and_weights(tmp_path):
    m1, _, r1 = run(tmp_path / "a")
    m2, _, r2 = run(tmp_path / "b")
    assert r1.history == r2.history and len(r1.history) == 3
    assert log_lines(tmp_path / "a") == log_lines(tmp_path / "b")
    assert_same_weights(m1, m2)
    assert {"train_loss", "train_loss_ce", "train_loss_reg", "val_loss", "val_acc"} <= set(r1.history[0])
    _, _, r3 = run(tmp_path / "c", seed=1)
    assert r3.history != r1.history


@pytest.mark.parametrize("kill_at", [5, 7])  # 4 steps/epoch: resumes from step 4 (epoch end) / 6
def test_resume_after_kill_equals_uninterrupted(tmp_path, kill_at):
    ref_model, _, ref = run(tmp_path / "ref", save_every_steps=3)

    def kill(trainer):
        if trainer.step == kill_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", save_every_steps=3, on_step=kill)
    saved = load_trainer_state(tmp_path / "cut" / "last" / "trainer_state.pt")
    assert (saved["step"], saved["batch_in_epoch"]) == ((4, 0) if kill_at == 5 else (6, 4))
    torch.manual_seed(999)  # disturb the global RNG; resume must restore it
    model, trainer, res = run(tmp_path / "cut", model_seed=42, resume=True, save_every_steps=3)
    assert_same_weights(ref_model, model)
    assert res.history == ref.history
    assert (res.best_epoch, res.best_metric, res.steps) == (ref.best_epoch, ref.best_metric, 12)
    assert log_lines(tmp_path / "cut") == log_lines(tmp_path / "ref")
    # a finished run resumes to the same result without training
    _, _, again = run(tmp_path / "cut", model_seed=7, resume=True, save_every_steps=3)
    assert again.history == ref.history and again.steps == 12


def test_resume_refuses_a_changed_batch_size(tmp_path):
    run(tmp_path, epochs=1)
    with pytest.raises(ConfigError, match="batch_size"):
        run(tmp_path, resume=True, epochs=1, batch_size=2)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    _, _, a = run(tmp_path / "a", epochs=1)
    _, _, b = run(tmp_path / "b", epochs=1, resume=True)
    assert a.history == b.history


@pytest.mark.parametrize(
    "metric, mode, values, best",
    [("val_acc", None, [0.5, 0.9, 0.7], 2), ("val_loss", None, [0.5, 0.6, 0.2], 3),
     ("val_score", "min", [0.3, 0.3, 0.4], 1)],
)
def test_best_checkpoint_is_the_best_epoch(tmp_path, metric, mode, values, best):
    snapshots = []

    def scripted(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {metric: values[len(snapshots) - 1]}

    seed_everything(0)
    model = MLP()
    cfg = TrainConfig(**{**BASE, "out_dir": tmp_path, "select_metric": metric, "select_mode": mode})
    trainer = Trainer(model, cfg, TRAIN, collate, evaluate_fn=scripted)
    res = trainer.fit()
    assert (res.best_epoch, res.best_metric) == (best, values[best - 1])
    assert [h[metric] for h in res.history] == values
    trainer.load_best()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[best - 1][k])
    meta = json.loads((tmp_path / "best" / "config.json").read_text())
    assert meta["best_epoch"] == best and meta["train_config"]["select_metric"] == metric


def test_eval_every_epochs_and_missing_metric(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(1)
        return {"val_acc": 0.5}

    seed_everything(0)
    cfg = TrainConfig(**{**BASE, "out_dir": tmp_path, "epochs": 3, "eval_every_epochs": 2})
    res = Trainer(MLP(), cfg, TRAIN, collate, evaluate_fn=evaluate).fit()
    assert len(calls) == 2 and "val_acc" not in res.history[0] and res.best_epoch == 2
    cfg = cfg.replace(select_metric="val_f1")
    with pytest.raises(ConfigError, match="select_metric"):
        Trainer(MLP(), cfg, TRAIN, collate, evaluate_fn=evaluate).fit()


def test_test_split_guard():
    def on_test(model):
        return {"val_acc": 1.0}

    on_test.split = "test"
    with pytest.raises(ConfigError, match="validation"):
        Trainer(MLP(), TrainConfig(progress=False), TRAIN, collate, evaluate_fn=on_test)


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": F.mse_loss(self.lin(x).squeeze(1), y)}


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    g = torch.Generator().manual_seed(5)
    ds = TensorDataset(torch.randn(36, 8, generator=g), torch.randn(36, generator=g))
    weights = []
    for bs, accum in ((8, 1), (4, 2)):
        seed_everything(0)
        model = Linear()
        cfg = TrainConfig(epochs=2, batch_size=bs, grad_accum_steps=accum, lr=0.05, weight_decay=0.0, precision="fp32",
                          schedule="constant", max_grad_norm=None, progress=False,
                          select_metric="train_loss", out_dir=tmp_path / f"{bs}")
        trainer = Trainer(model, cfg, ds)
        assert trainer.steps_per_epoch == 5  # 36 = 4 x 8 + 4: the last step has one micro-batch
        trainer.fit()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_matches_hand_computed_lr(tmp_path, schedule):
    lrs = []
    seed_everything(0)
    model = Linear()
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(40, 8, generator=g), torch.randn(40, generator=g))
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, warmup_steps=3, schedule=schedule,
                      progress=False, out_dir=tmp_path, select_metric="train_loss")
    trainer = Trainer(model, cfg, ds, on_step=lambda t: lrs.append(t.last_lr))
    trainer.fit()
    total, warm = 10, 3
    assert len(lrs) == total
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.1 / 3)
    assert lrs[warm] == pytest.approx(0.1)  # first step after warm-up uses the full lr
    frac = (6 - warm) / (total - warm)
    expected = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    assert lrs[6] == pytest.approx(0.1 * expected)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_warmup_ratio_and_max_steps(tmp_path):
    seed_everything(0)
    cfg = TrainConfig(**{**BASE, "out_dir": tmp_path, "warmup_steps": None, "warmup_ratio": 0.2,
                         "epochs": 10, "max_steps": 5})
    trainer = Trainer(MLP(), cfg, TRAIN, collate, evaluate_fn=validation(VAL))
    assert (trainer.total_steps, trainer.warmup_steps, trainer.epochs) == (5, 1, 2)
    res = trainer.fit()
    assert res.steps == 5 and [h["step"] for h in res.history] == [4, 5]


def test_result_and_cost_line(tmp_path):
    _, trainer, res = run(tmp_path, epochs=1)
    n = sum(p.numel() for p in trainer.raw_model.parameters())
    assert (res.n_params, res.n_trainable, res.device, res.peak_memory_mb) == (n, n, "cpu", None)
    assert res.samples_per_s > 0 and res.time_s > 0
    line = res.cost_line()
    assert line.startswith(f"{n} params ({n} trainable) · 1 epoch · ") and line.endswith("samples/s · cpu")
    with pytest.raises(ConfigError, match="resume=True"):
        trainer.fit()  # a second fresh fit would reuse a moved optimizer and schedule


def test_weight_decay_groups_and_frozen_params(tmp_path):
    seed_everything(0)
    model = MLP()
    model.net[0].requires_grad_(False)
    trainer = Trainer(model, TrainConfig(**{**BASE, "out_dir": tmp_path, "weight_decay": 0.1}), TRAIN, collate)
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [1, 1]  # net.3 weight / net.3 bias


@pytest.mark.parametrize(
    "field, value, words",
    [("schedule", "step", ["'cosine'", "'constant_with_warmup'"]), ("batch_size", 0, [">= 1"]),
     ("precision", "fp8", ["'bf16'"]), ("select_mode", "up", ["'max'", "'min'"]),
     ("device", "tpu", ["'cuda:N'"]), ("lr", -1.0, ["> 0"]), ("warmup_ratio", 1.5, ["[0, 1)"]),
     ("max_steps", 0, ["None or"]), ("grad_accum_steps", True, ["integer"]),
     ("seed", -3, [">= 0"]), ("progress", "yes", ["None, True or False"])],
)
def test_config_errors_name_the_field(field, value, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    msg = str(err.value)
    assert f"TrainConfig.{field}" in msg and all(w in msg for w in words), msg


def test_config_cross_field_errors():
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        TrainConfig(schedule="constant", warmup_steps=5)
    assert TrainConfig(select_metric="val_loss").mode == "min"
    assert TrainConfig(select_metric="val_acc").mode == "max"
    with pytest.raises(ConfigError, match="TrainConfig.epochs"):
        TrainConfig().replace(epochs=0)


def test_progress_default_follows_env(monkeypatch):
    monkeypatch.delenv("MEDVQA_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert _progress_on(None) and not _progress_on(False)
    monkeypatch.setenv("MEDVQA_PROGRESS", "0")
    assert not _progress_on(None) and _progress_on(True)
    monkeypatch.setenv("MEDVQA_PROGRESS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not _progress_on(None)


def test_model_contract(tmp_path):
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), "s"], "c": (3, torch.ones(1))}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["b"][1] == "s" and moved["c"][0] == 3 and isinstance(moved["c"], tuple)

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return [self.w.sum()]

    with pytest.raises(TypeError, match="'loss'"):
        Trainer(Bad(), TrainConfig(**{**BASE, "out_dir": tmp_path}), TRAIN, collate).fit()
    # keyword-argument models (Hugging Face style) through forward_fn
    seed_everything(0)
    lin = Linear()
    res = Trainer(lin, TrainConfig(**{**BASE, "out_dir": tmp_path, "epochs": 1, "grad_accum_steps": 1,
                                      "select_metric": "train_loss"}),
                  TensorDataset(torch.randn(8, 8), torch.randn(8)),
                  collate_fn=lambda items: {"batch": tuple(torch.stack(t) for t in zip(*items, strict=True))},
                  forward_fn=lambda m, b: m(**b)).fit()
    assert res.best_epoch == 1 and (tmp_path / "best" / "model.safetensors").is_file()


def test_seed_everything():
    assert seed_everything(7) == 7
    a = (np.random.rand(), torch.rand(3))
    seed_everything(7)
    b = (np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") and torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ConfigError, match="seed"):
        seed_everything(-1)


def test_device_helpers():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            pick_device("cuda")
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_precision(cpu, "bf16") == torch.bfloat16
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision(cpu, "fp8")
    assert peak_memory_mb(cpu) is None


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank of a 2-process gloo run, as torchrun would start it (forked: no re-import)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    seed_everything(0)
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(20, 8, generator=g), torch.randn(20, generator=g))
    model = Linear()
    cfg = TrainConfig(epochs=2, batch_size=3, lr=1e-2, out_dir=Path(out_dir) / "run", device="cpu",
                      progress=False, log_every=1, select_metric="train_loss")
    trainer = Trainer(model, cfg, ds)
    trainer.fit()
    assert trainer.world_size == 2 and trainer.steps_per_epoch == 4
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed and fork",
)
def test_ddp_two_cpu_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in w0:
        assert torch.equal(w0[k], w1[k])
    assert (tmp_path / "run" / "last" / "trainer_state.pt").is_file()
    steps = [rec["step"] for rec in log_lines(tmp_path / "run") if rec["kind"] == "step"]
    assert steps == list(range(1, 9))  # one writer: rank 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    _, trainer, res = run(tmp_path, precision=precision, epochs=1)
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert math.isfinite(res.history[0]["train_loss"])
    state = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # GradScaler only for fp16


def test_cpu_bf16_detection_can_be_forced(monkeypatch):
    cpu = torch.device("cpu")
    for flag, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv("MEDVQA_CPU_BF16", flag)
        cpu_has_native_bf16.cache_clear()
        assert resolve_precision(cpu, "auto") == dtype
    cpu_has_native_bf16.cache_clear()
