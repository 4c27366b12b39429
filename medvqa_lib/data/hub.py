"""Offline-aware access to datasets on the Hugging Face Hub.

Nothing here waits on the network for long: with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
set, a dataset that is not in the local cache fails at once; otherwise one short socket
probe (about 3 s) decides whether the Hub is reachable before any download starts. Every
failure is a :class:`HubUnavailableError` naming the dataset and the fix. Remote code is
never executed (no ``trust_remote_code``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medvqa_lib.data.question_types import infer_answer_type
from medvqa_lib.data.registry import (
    DATA_ENV,
    carve_validation,
    drop_repeats,
    normalize_split,
    question_key,
)
from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import HubUnavailableError

log = logging.getLogger(__name__)

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
_PROBE_TTL_S = 60.0
_probe_cache: dict[str, tuple[float, bool]] = {}

#: split names as the Hub copies spell them
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}


# ----------------------------------------------------------------------------- environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    return any(_truthy(os.environ.get(var)) for var in OFFLINE_VARS)


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    return Path(os.environ.get("HF_HUB_CACHE", _hf_home() / "hub")).expanduser()


def _cache_folders(repo_id: str) -> list[Path]:
    hub = hub_cache_dir()
    sets = Path(os.environ.get("HF_DATASETS_CACHE", _hf_home() / "datasets")).expanduser()
    return [hub / f"datasets--{repo_id.replace('/', '--')}", sets / repo_id.replace("/", "___")]


def is_cached(repo_id: str) -> bool:
    """Whether a copy of dataset ``repo_id`` is in the local Hugging Face caches."""
    return any(folder.is_dir() for folder in _cache_folders(repo_id))


def medvqa_cache_dir() -> Path:
    """Where this library keeps files it derives from Hub downloads (``$MEDVQA_CACHE_DIR``,
    default ``~/.cache/medvqa_lib``)."""
    default = Path.home() / ".cache" / "medvqa_lib"
    return Path(os.environ.get("MEDVQA_CACHE_DIR", default)).expanduser()


# ----------------------------------------------------------------------------- reachability


def _probe_target() -> tuple[str, int]:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _probe(host: str, port: int, timeout: float) -> bool:
    """One TCP connection attempt, bounded in time even if name resolution stalls."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def hub_reachable(timeout: float = PROBE_TIMEOUT_S, *, refresh: bool = False) -> bool:
    """Whether the Hub answers on its HTTPS port (False at once in offline mode).

    The answer is remembered for a minute; ``refresh=True`` probes again.
    """
    if offline_mode():
        return False
    host, port = _probe_target()
    key = f"{host}:{port}"
    cached = _probe_cache.get(key)
    if cached and not refresh and time.monotonic() - cached[0] < _PROBE_TTL_S:
        return cached[1]
    ok = _probe(host, port, timeout)
    _probe_cache[key] = (time.monotonic(), ok)
    return ok


def _unavailable(repo_id: str, why: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"Hugging Face dataset {repo_id!r} is not available: {why}. Fix: connect to the "
        f"internet, or download it elsewhere and point {DATA_ENV} / root= at a local copy."
    )


def ensure_hub(repo_id: str) -> None:
    """Raise :class:`HubUnavailableError` unless ``repo_id`` can be loaded now."""
    if offline_mode():
        if not is_cached(repo_id):
            raise _unavailable(repo_id, "offline mode is set (HF_HUB_OFFLINE / "
                                        "HF_DATASETS_OFFLINE) and there is no cached copy")
        return
    if not hub_reachable():
        host, port = _probe_target()
        hint = " (a cached copy exists: set HF_HUB_OFFLINE=1 to use it)" if is_cached(repo_id) else ""
        raise _unavailable(repo_id, f"{host}:{port} cannot be reached{hint}")


# ----------------------------------------------------------------------------- loading


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the download broke off" for the HTTP clients in use."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors.append(requests.ConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def load_hub_dataset(repo_id: str, split: str, **kw: Any) -> Any:
    """``datasets.load_dataset(repo_id, split=split, **kw)`` that fails fast when offline.

    Raises :class:`HubUnavailableError` naming the dataset (and the fix) instead of hanging
    when the Hub cannot be reached. ``trust_remote_code`` is refused.
    """
    if kw.pop("trust_remote_code", False):
        raise ValueError("remote dataset code is never executed; drop trust_remote_code")
    ensure_hub(repo_id)
    import datasets

    try:
        return datasets.load_dataset(repo_id, split=split, **kw)
    except _network_errors() as e:
        raise _unavailable(repo_id, f"the download failed ({e})") from e


def hub_file(repo_id: str, filename: str) -> Path:
    """One file of a Hub *dataset* repository, downloaded into (or read from) the HF cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if offline_mode():
        cached = try_to_load_from_cache(repo_id, filename, repo_type="dataset")
        if isinstance(cached, str):
            return Path(cached)
        raise _unavailable(repo_id, f"offline mode is set and {filename} is not cached")
    ensure_hub(repo_id)
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except _network_errors() as e:
        raise _unavailable(repo_id, f"downloading {filename} failed ({e})") from e


def extract_zip_once(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` unless done before; returns ``target``."""
    done = target / ".extracted"
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    (tmp / ".extracted").write_text(str(archive))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


# ----------------------------------------------------------------------------- conversion


def hub_image_entry(value: Any, seen: dict[str, Any]) -> tuple[str, Any]:
    """``(image_id, image)`` for one undecoded ``Image`` cell; equal bytes share one object."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        digest = hashlib.sha1(value["bytes"]).hexdigest()[:16]
        image = seen.setdefault(digest, {"bytes": value["bytes"], "path": value.get("path")})
        return digest, image
    path = value.get("path") if isinstance(value, dict) else value
    return Path(str(path)).stem, str(path)


def undecoded(ds: Any, column: str = "image") -> Any:
    """``ds`` with its image column left as encoded bytes (no decoding while iterating)."""
    import datasets

    if isinstance(ds.features.get(column), datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def hub_vqa_samples(ds: Any, *, dataset: str, split: str, hub_split: str) -> list[VQASample]:
    """Rows with ``image``, ``question``, ``answer`` columns as :class:`VQASample`.

    Hub copies carry no question type or answer type: ``answer_type`` is ``"closed"`` for a
    yes/no answer, else ``"open"``; ``question_type`` is ``"other"``. ``image_id`` is a hash
    of the image bytes, so repeated images are recognised.
    """
    seen: dict[str, Any] = {}
    samples = []
    for i, row in enumerate(undecoded(ds)):
        image_id, image = hub_image_entry(row["image"], seen)
        raw_answer = row["answer"]
        answer = str(raw_answer).strip().lower()
        samples.append(VQASample(
            qid=f"{hub_split}-{i}", image_id=image_id, image=image,
            question=str(row["question"]).strip(), answer=answer,
            answer_type=infer_answer_type(answer), question_type="other",
            split=split, dataset=dataset,
            extra={"raw_answer": raw_answer, "answer_type_inferred": True},
        ))
    return samples


def _sample_key(sample: VQASample) -> tuple[str, str]:
    return question_key(sample.image_id, sample.question)


def _try_split(repo_id: str, hub_split: str) -> Any | None:
    try:
        return load_hub_dataset(repo_id, hub_split)
    except ValueError as e:  # datasets: unknown split
        if "split" not in str(e).lower():
            raise
        return None


def vqa_from_tables(
    read: Callable[[str], Any | None],
    split: str,
    *,
    dataset: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    drop_test_duplicates: bool = True,
) -> list[VQASample]:
    """One split assembled from ``read(hub_split)`` tables (``None``: the copy lacks it).

    If there is no ``validation`` table, ``val`` is carved out of ``train`` by question (fixed
    ``seed``). Train and validation questions whose ``(image, question)`` pair also occurs in
    test are dropped when ``drop_test_duplicates`` is set.
    """
    split = normalize_split(split)

    def convert(hub_split: str, as_split: str) -> list[VQASample] | None:
        table = read(hub_split)
        if table is None:
            return None
        return hub_vqa_samples(table, dataset=dataset, split=as_split, hub_split=hub_split)

    test = convert("test", "test") or []
    if split == "test":
        return test
    forbidden = {_sample_key(s) for s in test} if drop_test_duplicates else set()
    val = convert(HUB_SPLITS["val"], "val")
    if val is not None and split == "val":
        return _without(val, forbidden, dataset)
    train = _without(convert("train", "train") or [], forbidden, dataset)
    if val is not None:
        return train
    train, carved = carve_validation(train, _sample_key, val_fraction, seed)
    return train if split == "train" else [replace(s, split="val") for s in carved]


def _without(samples: list[VQASample], forbidden: set, dataset: str) -> list[VQASample]:
    kept, dropped = drop_repeats(samples, forbidden, _sample_key)
    if dropped:
        log.info("%s: dropped %d questions that repeat a test (image, question)", dataset, dropped)
    return kept


def load_hub_vqa(repo_id: str, split: str, *, dataset: str, **kw: Any) -> list[VQASample]:
    """One split of an image/question/answer Hub dataset (see :func:`vqa_from_tables`)."""

    def read(hub_split: str) -> Any | None:
        if hub_split == HUB_SPLITS["val"]:
            return _try_split(repo_id, hub_split)
        return load_hub_dataset(repo_id, hub_split)

    return vqa_from_tables(read, split, dataset=dataset, **kw)
