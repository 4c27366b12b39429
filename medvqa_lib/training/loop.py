"""The training loop every chapter trains through.

Model contract
    ``outputs = model(batch)``, where ``batch`` is what ``collate_fn`` returns with every
    tensor (also inside dicts, lists and tuples) moved to the training device. ``outputs``
    is a mapping with a scalar ``"loss"``; further scalar entries named ``"loss_*"`` are
    averaged and logged (as ``train_loss_*`` per epoch). A bare loss tensor is accepted too.
    Models that take keyword arguments (Hugging Face) are driven with
    ``forward_fn=lambda model, batch: model(**batch)``.

Model selection
    ``evaluate_fn(model) -> dict[str, float]`` runs (in eval mode, under ``torch.no_grad``)
    every ``eval_every_epochs`` epochs and after the last one; its metrics join the epoch record, and the epoch that is best by
    ``select_metric`` (``select_mode`` "max" or "min") is saved to ``<out_dir>/best/``. It
    must score *validation* data: the test split is kept for the final report. A function
    carrying the attribute ``split == "test"`` is refused with a :class:`ConfigError`.

Reproducibility
    The same seed gives the same data order (each epoch's permutation comes from a
    ``torch.Generator`` seeded from the seed and the epoch), the same dropout masks and the
    same history. ``<out_dir>/last/`` is written after every epoch and every
    ``save_every_steps`` optimizer steps; ``fit(resume=True)`` restores weights, optimizer,
    scheduler, grad scaler, counters and RNG states, skips the batches already done, and on
    the CPU ends with exactly the weights and history of an uninterrupted run (with loader
    workers, provided the dataset's ``__getitem__`` draws no random numbers).

Outputs
    ``<out_dir>/metrics.jsonl`` gets one JSON line per log step (``"kind": "step"``) and per
    epoch (``"kind": "epoch"``, the history record plus timing); ``<out_dir>/last/`` and
    ``<out_dir>/best/`` are checkpoint folders (see :mod:`medvqa_lib.training.checkpoint`).
    ``TrainResult.history`` holds no timings, so two runs with one seed compare equal.

Several GPUs
    ``torchrun --nproc_per_node=N train.py`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the
    trainer then joins the process group (NCCL on CUDA, gloo on the CPU), wraps the model
    in ``DistributedDataParallel`` and shards each epoch with ``DistributedSampler``.
    ``batch_size`` is per process; ``evaluate_fn`` runs on every rank; only rank 0 writes
    checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from medvqa_lib.errors import ConfigError
from medvqa_lib.io import atomic_write_text
from medvqa_lib.training.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    load_model_weights,
    load_trainer_state,
    resolve_dir,
    save_checkpoint,
    unwrap_model,
)
from medvqa_lib.training.device import (
    autocast_context,
    keep_freed_memory,
    move_to_device,
    peak_memory_mb,
    reset_peak_memory,
    resolve_precision,
    setup_distributed,
)
from medvqa_lib.training.seed import rng_state, seed_everything, set_rng_state
from medvqa_lib.training.settings import TrainConfig, TrainResult

__all__ = ["Trainer", "default_param_groups"]


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-d tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _count_samples(batch: Any, items: int) -> int:
    """Training samples in a batch: its questions when it lists ``qids`` (a batch item may be
    a group of questions), else its number of dataset items."""
    if isinstance(batch, Mapping) and isinstance(batch.get("qids"), list):
        return len(batch["qids"])
    return items


def _call_model(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def _as_outputs(out: Any) -> Mapping[str, Any]:
    if torch.is_tensor(out):
        return {"loss": out}
    if isinstance(out, Mapping) and out.get("loss") is not None:
        return out
    raise TypeError(
        f"the model returned {type(out).__name__}; it must return a dict with a scalar 'loss' "
        "(and optional scalar 'loss_*' entries)"
    )


class _Meter:
    """Sums of the scalar losses, kept on the device until read (one sync per read)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.sums, self.count = device, {}, 0

    def add(self, outputs: Mapping[str, Any]) -> None:
        for k, v in outputs.items():
            if k == "loss" or k.startswith("loss_"):
                v = torch.as_tensor(v.detach() if torch.is_tensor(v) else v, device=self.device)
                v = v.float().mean()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def pop_means(self, world_size: int = 1) -> dict[str, float]:
        keys = sorted(self.sums)
        means = {}
        if keys:
            vec = torch.stack([self.sums[k] for k in keys]) / self.count
            if world_size > 1:
                dist.all_reduce(vec)
                vec = vec / world_size
            means = dict(zip(keys, vec.tolist(), strict=True))
        self.sums, self.count = {}, 0
        return means

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "sums": {k: float(v) for k, v in self.sums.items()}}

    def load(self, state: Mapping[str, Any]) -> None:
        self.count = state["count"]
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state["sums"].items()}


#: progress bars by default: set once by a chapter's ``setup`` (:func:`set_progress`); None
#: (library use outside a chapter) falls back to ``$MEDVQA_PROGRESS`` / ``$TQDM_DISABLE``
_PROGRESS: bool | None = None


def set_progress(on: bool | None) -> None:
    """Show (True) or hide (False) training progress bars from now on."""
    global _PROGRESS
    _PROGRESS = on


def _progress_on(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    if _PROGRESS is not None:
        return _PROGRESS
    off = os.environ.get("MEDVQA_PROGRESS") == "0"
    return not off and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


class Trainer:
    """Train ``model`` on the map-style ``train_dataset``; the module docstring has the contracts.

    ``param_groups`` replaces the default AdamW groups (e.g. a smaller lr for a backbone);
    ``forward_fn(model, batch)`` replaces ``model(batch)``; ``on_step(trainer)`` is called
    after every optimizer step (``trainer.step``, ``trainer.epoch``, ``trainer.last_lr``).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        evaluate_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        *,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        if getattr(evaluate_fn, "split", None) == "test":
            raise ConfigError(
                "evaluate_fn scores the test split, but model selection must use validation "
                "data; pass an evaluate_fn over the validation split"
            )
        if len(train_dataset) == 0:
            raise ConfigError("train_dataset is empty")
        cfg = self.config = config
        self.train_dataset, self.collate_fn, self.evaluate_fn = train_dataset, collate_fn, evaluate_fn
        self.forward_fn, self.on_step = forward_fn or _call_model, on_step
        self.out_dir = Path(cfg.out_dir)
        self.world_size, self.rank, self.device = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.raw_model = unwrap_model(model).to(self.device)
        self.model = self.raw_model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters
            )
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse freed blocks instead of page-faulting them in each step
        self.amp_dtype = resolve_precision(self.device, cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        groups = param_groups or default_param_groups(self.raw_model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = DistributedSampler(  # also the single-process sampler (1 replica)
            train_dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
            seed=cfg.seed * 1_000_003,  # seed + epoch must not collide across seeds
        )
        self.batches_per_epoch = math.ceil(len(self.sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = cfg.warmup_steps
        self.warmup_steps = round(cfg.warmup_ratio * self.total_steps) if warmup is None else warmup
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.schedule, self.optimizer, self.warmup_steps, self.total_steps)
        self._started = False
        self._reset_state()

    # ----------------------------------------------------------------------------- state
    _COUNTERS = ("step", "epoch", "batch_in_epoch", "best_metric", "best_epoch", "history",
                 "last_lr", "samples_seen")

    def _reset_state(self) -> None:
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.samples_seen, self._time_before, self._t0 = 0, 0.0, time.perf_counter()
        self._epoch_meter, self._window = _Meter(self.device), _Meter(self.device)

    def _run_key(self) -> dict[str, int]:
        cfg = self.config
        return {"n_train": len(self.train_dataset), "batch_size": cfg.batch_size,
                "grad_accum_steps": cfg.grad_accum_steps, "world_size": self.world_size}

    def _elapsed(self) -> float:
        return self._time_before + time.perf_counter() - self._t0

    def _state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": 1, "run": self._run_key(), "time_s": self._elapsed(),
            **{k: getattr(self, k) for k in self._COUNTERS},
            "meters": {"epoch": self._epoch_meter.state(), "window": self._window.state()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rngs,
        }

    def _meta(self) -> dict[str, Any]:
        return {"train_config": self.config.to_dict(), "model_class": type(self.raw_model).__name__,
                "step": self.step, "epoch": self.epoch, "select_metric": self.config.select_metric,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def _save_last(self) -> None:
        rngs = [rng_state()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        if self.is_main:
            save_checkpoint(self.out_dir / "last", self.raw_model, self._state(rngs), self._meta())

    def _restore_last(self) -> bool:
        found = resolve_dir(self.out_dir / "last")
        if found is None or not (found / STATE_FILE).is_file():
            return False
        state = load_trainer_state(found / STATE_FILE)
        for key, value in self._run_key().items():
            if state["run"].get(key) != value:
                raise ConfigError(
                    f"cannot resume from {found}: it was trained with {key}={state['run'].get(key)!r}, "
                    f"this run has {key}={value!r}; keep the setting or use a new out_dir"
                )
        load_model_weights(self.raw_model, found / MODEL_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for key in self._COUNTERS:
            setattr(self, key, state[key])
        self._time_before = state["time_s"]
        self._epoch_meter.load(state["meters"]["epoch"])
        self._window.load(state["meters"]["window"])
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])
        if self.is_main:  # drop log lines written after this checkpoint
            path = self.out_dir / "metrics.jsonl"
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        return True

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    # ------------------------------------------------------------------------- training
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the end (or continue from ``<out_dir>/last/`` with ``resume=True``)."""
        cfg = self.config
        seed_everything(cfg.seed + self.rank, cfg.deterministic)
        self._reset_state()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and self._restore_last()):
            if self._started:  # the optimizer and scheduler have already moved
                raise ConfigError("this Trainer has trained already: use fit(resume=True) or a new Trainer")
            if self.is_main:
                atomic_write_text(self.out_dir / "metrics.jsonl", "")
        self._started = True
        self._t0 = time.perf_counter()
        reset_peak_memory(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(
            total=self.epochs * self.batches_per_epoch, unit="batch", mininterval=1.0,
            initial=self.epoch * self.batches_per_epoch + self.batch_in_epoch,
            disable=not (_progress_on(cfg.progress) and self.is_main), dynamic_ncols=True,
        )
        with bar:
            while self.epoch < self.epochs:
                bar.set_description(f"epoch {self.epoch + 1}/{self.epochs}", refresh=False)
                self._train_epoch(bar)
                self._end_epoch()
        return self.result()

    def _train_epoch(self, bar: tqdm) -> None:
        cfg, bs, accum = self.config, self.config.batch_size, self.config.grad_accum_steps
        if self.step >= self.total_steps:
            return
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.train_dataset, "set_epoch"):  # e.g. captions or groups drawn per epoch
            self.train_dataset.set_epoch(self.epoch)
        order = list(self.sampler)
        start = self.batch_in_epoch
        loader = DataLoader(
            self.train_dataset, batch_size=bs, sampler=order[start * bs:], collate_fn=self.collate_fn,
            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch),
        )
        self.model.train()
        for i, batch in enumerate(loader, start=start):
            group_start = i - i % accum
            group_size = min(accum, self.batches_per_epoch - group_start)
            boundary = i + 1 == group_start + group_size
            batch = move_to_device(batch, self.device)
            sync = boundary or self.world_size == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast_context(self.device, cfg.precision):
                    outputs = _as_outputs(self.forward_fn(self.model, batch))
                self.scaler.scale(outputs["loss"] / group_size).backward()
            self._epoch_meter.add(outputs)
            self._window.add(outputs)
            self.samples_seen += _count_samples(batch, min(bs, len(order) - i * bs)) * self.world_size
            self.batch_in_epoch = i + 1
            bar.update(1)
            if not boundary:
                continue
            self._optimizer_step()
            if self.step % cfg.log_every == 0:
                self._log_step(bar)
            every = cfg.save_every_steps
            if every and self.step % every == 0 and self.batch_in_epoch < self.batches_per_epoch:
                self._save_last()
            if self.on_step is not None:
                self.on_step(self)
            if self.step >= self.total_steps:
                break

    def _optimizer_step(self) -> None:
        if self.config.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _log_step(self, bar: tqdm) -> None:
        means = self._window.pop_means(self.world_size)
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(
                f"training loss is {means['loss']} at step {self.step}; lower lr, set "
                "max_grad_norm, or use precision='bf16' / 'fp32'"
            )
        elapsed = self._elapsed()
        speed = self.samples_seen / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{self.last_lr:.2e}", samples_s=f"{speed:.1f}", refresh=False)
        self._log({"kind": "step", "epoch": self.epoch + 1, "step": self.step, "lr": self.last_lr,
                   **means, "samples_per_s": speed, "time_s": elapsed})

    def _end_epoch(self) -> None:
        cfg, epoch = self.config, self.epoch + 1
        record: dict[str, Any] = {"epoch": epoch, "step": self.step, "lr": self.last_lr}
        record.update({f"train_{k}": v for k, v in self._epoch_meter.pop_means(self.world_size).items()})
        if self.evaluate_fn is not None and (epoch % cfg.eval_every_epochs == 0 or epoch == self.epochs):
            record.update(self._evaluate())
            if cfg.select_metric not in record:
                raise ConfigError(
                    f"TrainConfig.select_metric={cfg.select_metric!r} is not among the metrics "
                    f"evaluate_fn returned ({', '.join(sorted(record))})"
                )
        value = record.get(cfg.select_metric)
        if value is not None and self._improves(value):
            self.best_metric, self.best_epoch = float(value), epoch
            if self.is_main:
                save_checkpoint(self.out_dir / "best", self.raw_model, None, self._meta())
        self.history.append(record)
        self.epoch, self.batch_in_epoch = epoch, 0
        elapsed = self._elapsed()
        self._log({"kind": "epoch", **record, "samples_per_s": self.samples_seen / max(elapsed, 1e-9),
                   "time_s": elapsed})
        if cfg.save_last:
            self._save_last()

    def _improves(self, value: float) -> bool:
        if self.best_metric is None:
            return not math.isnan(value)
        return value > self.best_metric if self.config.mode == "max" else value < self.best_metric

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.evaluate_fn(self.raw_model)
        finally:
            self.model.train()
        try:
            return {str(k): float(v) for k, v in dict(metrics).items()}
        except (TypeError, ValueError) as e:
            raise TypeError(f"evaluate_fn must return a dict of str -> float, got {metrics!r}") from e

    # --------------------------------------------------------------------------- results
    def load_best(self) -> nn.Module:
        """Load the weights of the best epoch (``<out_dir>/best/``) into the model; return it."""
        found = resolve_dir(self.out_dir / "best")
        if found is None:
            raise FileNotFoundError(
                f"no best checkpoint in {self.out_dir / 'best'}: it is written when an epoch "
                f"record has {self.config.select_metric!r} (give an evaluate_fn that returns it)"
            )
        return load_model_weights(self.raw_model, found / MODEL_FILE)

    def result(self) -> TrainResult:
        """The :class:`TrainResult` of the run so far."""
        elapsed = self._elapsed()
        params = list(self.raw_model.parameters())
        device = str(self.device) if self.world_size == 1 else f"{self.world_size} × {self.device.type}"
        return TrainResult(
            history=[dict(r) for r in self.history], best_metric=self.best_metric,
            best_epoch=self.best_epoch, select_metric=self.config.select_metric, steps=self.step,
            epochs=self.epoch, time_s=elapsed, samples_per_s=self.samples_seen / max(elapsed, 1e-9),
            peak_memory_mb=peak_memory_mb(self.device), n_params=sum(p.numel() for p in params),
            n_trainable=sum(p.numel() for p in params if p.requires_grad), device=device,
            out_dir=self.out_dir,
        )

