"""Device choice, batches to the device, mixed precision, memory, process groups."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from medvqa_lib.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "pick_device",
    "resolve_precision",
    "cpu_has_native_bf16",
    "keep_freed_memory",
    "autocast_context",
    "peak_memory_mb",
    "reset_peak_memory",
    "move_to_device",
    "setup_distributed",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(prefer: str | torch.device = "auto") -> torch.device:
    """The device to train on.

    ``"auto"`` takes CUDA, then Apple MPS, then the CPU. ``"cuda"``, ``"cuda:N"``, ``"mps"``
    and ``"cpu"`` are taken as asked, with a :class:`ConfigError` when not available.
    """
    if isinstance(prefer, torch.device):
        prefer = str(prefer)
    key = str(prefer).strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"device={prefer!r} was asked for but no CUDA GPU is usable (torch "
                f"{torch.__version__}, {build}); use device='auto' or device='cpu'"
            )
        dev = torch.device(key)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={prefer!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    if key == "mps":
        if not _mps_available():
            raise ConfigError("device='mps' was asked for but Apple MPS is not available; use 'auto'")
        return torch.device("mps")
    raise ConfigError(f"device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'; got {prefer!r}")


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``"auto"`` is bf16 on a CUDA GPU that supports it, else fp16 on CUDA; on the CPU bf16
    where the processor has native bf16 instructions (:func:`cpu_has_native_bf16`: there a
    training step of this book's models runs ~1.4x faster than in fp32), else fp32; fp32 on MPS.
    Weights and optimizer state stay fp32 in every case (autocast).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return _DTYPES[precision]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if torch.device(device).type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (x86 ``avx512_bf16`` or ``amx_bf16``;
    read from ``/proc/cpuinfo``, so False off Linux). Elsewhere bf16 is emulated and slower
    than fp32. ``MEDVQA_CPU_BF16=0``/``1`` overrides the detection."""
    forced = os.environ.get("MEDVQA_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_context(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the resolved precision (a no-op context for fp32)."""
    dtype = resolve_precision(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def keep_freed_memory() -> bool:
    """glibc (Linux): serve large blocks from the heap and never give it back to the system.

    By default glibc maps every block above 32 MB afresh and unmaps it on free, so each training
    step page-faults its large tensors (LM-head logits, attention, activations) in again; in a
    long-lived notebook process this shows up as most CPU time spent in the kernel. Returns
    whether the setting took effect (False off glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated GPU memory in MiB since the last reset; None on the CPU.

    On MPS, where torch keeps no peak, the memory the driver holds now is reported.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return None


def move_to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (through dicts, lists and tuples)."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):  # not namedtuples
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def setup_distributed(prefer: str = "auto") -> tuple[int, int, torch.device]:
    """``(world_size, rank, device)``; under ``torchrun`` also joins the process group.

    With ``WORLD_SIZE > 1`` in the environment the process group is initialised (NCCL on
    CUDA, gloo otherwise) and each process takes the GPU of its ``LOCAL_RANK``.
    """
    device = pick_device(prefer)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, rank, device
