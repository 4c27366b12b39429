"""Training: one loop for every chapter, checkpoints, seeding and device helpers."""

from medvqa_lib.training.checkpoint import (
    load_checkpoint,
    load_model_weights,
    load_trainer_state,
    resolve_dir,
    save_checkpoint,
    save_model_weights,
    unwrap_model,
)
from medvqa_lib.training.device import (
    autocast_context,
    cpu_has_native_bf16,
    keep_freed_memory,
    move_to_device,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    resolve_precision,
    setup_distributed,
)
from medvqa_lib.training.loop import Trainer, default_param_groups
from medvqa_lib.training.seed import rng_state, seed_everything, set_rng_state
from medvqa_lib.training.settings import SCHEDULES, TrainConfig, TrainResult

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "autocast_context",
    "default_param_groups",
    "load_checkpoint",
    "load_model_weights",
    "load_trainer_state",
    "move_to_device",
    "peak_memory_mb",
    "pick_device",
    "reset_peak_memory",
    "resolve_dir",
    "cpu_has_native_bf16",
    "keep_freed_memory",
    "resolve_precision",
    "rng_state",
    "save_checkpoint",
    "save_model_weights",
    "seed_everything",
    "set_rng_state",
    "setup_distributed",
    "unwrap_model",
]
