"""Checkpoints: weights as safetensors, trainer state as a weights-only torch file.

A checkpoint is a folder::

    <dir>/model.safetensors    weights (tied tensors stored once)
    <dir>/trainer_state.pt     optimizer, scheduler, scaler, counters, RNG (optional)
    <dir>/config.json          what produced it (plain JSON)

The folder is written under a temporary name and swapped in whole, so a crash never
leaves new weights next to an old trainer state. Trainer state is read back with
``torch.load(..., weights_only=True)`` only: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvqa_lib.io import atomic_dir, atomic_output, atomic_torch_save, atomic_write_json

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "CONFIG_FILE",
    "unwrap_model",
    "save_model_weights",
    "load_model_weights",
    "save_checkpoint",
    "load_checkpoint",
    "load_trainer_state",
    "resolve_dir",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP / DataParallel / ``torch.compile`` wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model_weights(
    model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s weights to a safetensors file atomically (shared tensors once)."""
    from safetensors.torch import save_model

    meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
    with atomic_output(path) as tmp:
        save_model(unwrap_model(model), str(tmp), metadata=meta)
    return Path(path)


def load_model_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a safetensors file written by :func:`save_model_weights` into ``model``."""
    from safetensors.torch import load_model

    model = unwrap_model(model)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    load_model(model, str(path), strict=strict, device=str(device))
    return model


def load_trainer_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a ``trainer_state.pt`` with ``torch.load(weights_only=True)``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def resolve_dir(ckpt_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder for ``ckpt_dir``, or None if there is none.

    After a crash in the middle of swapping folders, the previous version survives as
    ``<dir>.old``; it is returned then.
    """
    ckpt_dir = Path(ckpt_dir)
    for cand in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".old")):
        if (cand / MODEL_FILE).is_file():
            return cand
    return None


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    model: nn.Module,
    trainer_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (see the module docstring) atomically; return its path."""
    ckpt_dir = Path(ckpt_dir)
    with atomic_dir(ckpt_dir) as tmp:
        save_model_weights(model, tmp / MODEL_FILE, {"format": "pt"})
        if trainer_state is not None:
            atomic_torch_save(trainer_state, tmp / STATE_FILE)
        atomic_write_json(tmp / CONFIG_FILE, config or {})
    return ckpt_dir


def load_checkpoint(
    ckpt_dir: str | os.PathLike, model: nn.Module, strict: bool = True
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Load the weights of a checkpoint folder into ``model``.

    Returns ``(trainer_state or None, config)``. Raises ``FileNotFoundError`` when the
    folder holds no checkpoint.
    """
    found = resolve_dir(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (expected {MODEL_FILE} there)")
    load_model_weights(model, found / MODEL_FILE, strict=strict)
    state = load_trainer_state(found / STATE_FILE) if (found / STATE_FILE).is_file() else None
    config_path = found / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return state, config
