"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes to a temporary file in the target's folder, flushes it to disk and
``os.replace``-s it over the target. If the serializer raises, the temporary file is
removed and an existing target is left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_dir",
    "replace_dir",
]

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync(path: Path, directory: bool = False) -> None:
    if directory and os.name == "nt":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically becomes ``path``.

    >>> with atomic_output("model.bin") as tmp:   # doctest: +SKIP
    ...     torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (serialized before the target is touched)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def atomic_save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a state dict as safetensors atomically.

    Tensors that share memory (tied weights) are stored as separate copies, so the
    file loads back with ``safetensors.torch.load_file`` into every original name.
    To store tied weights once, use :func:`medvqa_lib.training.save_model_weights`.
    """
    from safetensors.torch import save_file

    seen: set[tuple[str, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (str(t.device), t.untyped_storage().data_ptr())
        shared = t.numel() > 0 and key in seen
        tensors[name] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
        if t.numel():
            seen.add(key)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst``.

    The old folder is first renamed to ``<dst>.old`` and removed last, so after a crash
    one complete version survives (see :func:`medvqa_lib.training.checkpoint.resolve_dir`).
    """
    src, dst = Path(src), Path(dst)
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        if dst.exists():
            shutil.rmtree(old)
        else:  # a previous swap was cut short: keep the surviving copy as dst
            os.replace(old, dst)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync(dst.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)
    return dst
