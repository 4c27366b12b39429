"""What one training run is told (:class:`TrainConfig`, every field validated with an error that
says what it must be) and what it reports back (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa_lib.errors import ConfigError
from medvqa_lib.training.device import PRECISIONS

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def _int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _real(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _choice(allowed: tuple) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), "one of " + ", ".join(map(repr, allowed))


_FLAG = (lambda v: isinstance(v, bool)), "True or False"
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {  # field: (check, what it must be)
    **dict.fromkeys(
        ("epochs", "batch_size", "grad_accum_steps", "log_every", "eval_every_epochs"),
        (_int(1), "an integer >= 1"),
    ),
    **dict.fromkeys(("max_steps", "save_every_steps"), (_optional(_int(1)), "None or an integer >= 1")),
    **dict.fromkeys(("seed", "num_workers"), (_int(0), "an integer >= 0")),
    "warmup_steps": (_optional(_int(0)), "None or an integer >= 0"),
    "warmup_ratio": (_real(lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "lr": (_real(lambda v: v > 0), "a number > 0"),
    "weight_decay": (_real(lambda v: v >= 0), "a number >= 0"),
    "max_grad_norm": (_optional(_real(lambda v: v > 0)), "None or a number > 0"),
    "schedule": _choice(SCHEDULES),
    "precision": _choice(PRECISIONS),
    "select_mode": _choice((None, "max", "min")),
    "device": (
        lambda v: isinstance(v, str) and bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)),
        "one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'",
    ),
    "select_metric": (lambda v: isinstance(v, str) and bool(v), "a metric name such as 'val_acc'"),
    **dict.fromkeys(("deterministic", "save_last", "find_unused_parameters"), _FLAG),
    "progress": (lambda v: v is None or isinstance(v, bool), "None, True or False"),
}


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; checked on creation (:class:`ConfigError` names the field).

    ``max_steps``, when set, is the length of training and overrides ``epochs``. Give
    ``warmup_steps`` or ``warmup_ratio`` (of all optimizer steps), not both. ``select_mode``
    None means "min" for a metric whose name contains "loss", else "max".
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_steps: int | None = None
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    deterministic: bool = True
    log_every: int = 10
    eval_every_epochs: int = 1
    select_metric: str = "val_loss"
    select_mode: str | None = None
    save_every_steps: int | None = None
    save_last: bool = True
    out_dir: str | Path = "runs/train"
    num_workers: int = 0
    progress: bool | None = None
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        for name, (ok, rule) in _RULES.items():
            if not ok(getattr(self, name)):
                self._fail(name, rule)
        if self.warmup_steps and self.warmup_ratio:
            self._fail("warmup_steps", f"None when warmup_ratio={self.warmup_ratio} is set (give one)")
        if self.schedule == "constant" and (self.warmup_steps or self.warmup_ratio):
            self._fail("schedule", "'constant_with_warmup' when a warm-up is set")

    def _fail(self, name: str, rule: str) -> None:
        raise ConfigError(f"TrainConfig.{name} must be {rule}; got {getattr(self, name)!r}")

    @property
    def mode(self) -> str:
        """The resolved ``select_mode``."""
        return self.select_mode or ("min" if "loss" in self.select_metric else "max")

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``out_dir`` as a string)."""
        return {**dataclasses.asdict(self), "out_dir": str(self.out_dir)}


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns. ``history`` holds one record per epoch."""

    history: list[dict[str, Any]]
    best_metric: float | None
    best_epoch: int | None
    select_metric: str
    steps: int
    epochs: int
    time_s: float
    samples_per_s: float
    peak_memory_mb: float | None
    n_params: int
    n_trainable: int
    device: str
    out_dir: Path = field(default_factory=Path)

    def cost_line(self) -> str:
        """One line for a chapter's cost table, e.g. ``"1.2 M params (...) · 3 epochs · ..."``."""
        parts = [
            f"{_count(self.n_params)} params ({_count(self.n_trainable)} trainable)",
            f"{self.epochs} epoch{'' if self.epochs == 1 else 's'}",
            _duration(self.time_s),
            f"{self.samples_per_s:.1f} samples/s",
            self.device,
        ]
        if self.peak_memory_mb is not None:
            parts.append(f"{self.peak_memory_mb:,.0f} MB peak")
        return " · ".join(parts)


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _duration(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
