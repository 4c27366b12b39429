"""Atomic writes: the target is the old file or the new one, and no temp files remain."""

from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch

from medvqa_lib.io import (
    atomic_dir,
    atomic_output,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    replace_dir,
)


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_land_whole_and_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "sub" / "c.json", {"x": [1, 2], "p": tmp_path, "t": (1,)})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"x": [1, 2], "p": str(tmp_path), "t": [1]}
    assert names(tmp_path) == ["a.bin", "b.txt", "sub"] and names(tmp_path / "sub") == ["c.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_failing_serializer_keeps_existing_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"ok": 1}
    assert names(tmp_path) == ["state.json"]


def test_safetensors_failure_keeps_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    atomic_save_safetensors({"a": torch.ones(2)}, target, metadata={"epoch": 1})
    before = target.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="mid-write"):
        atomic_save_safetensors({"a": torch.zeros(2)}, target)
    assert target.read_bytes() == before and names(tmp_path) == ["w.safetensors"]


def test_safetensors_shared_tensors_and_metadata(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    path = atomic_save_safetensors({"w": w, "tied": w, "view": w.t()}, tmp_path / "s.safetensors",
                                   metadata={"epoch": 3})
    loaded = safetensors.torch.load_file(str(path))
    assert torch.equal(loaded["tied"], w) and torch.equal(loaded["view"], w.t())
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"epoch": "3"}


def test_torch_save_is_weights_only_loadable(tmp_path):
    atomic_torch_save({"t": torch.ones(2), "n": 3, "s": "x", "l": [1.5, None]}, tmp_path / "x.pt")
    obj = torch.load(tmp_path / "x.pt", weights_only=True)
    assert obj["n"] == 3 and obj["l"] == [1.5, None] and torch.equal(obj["t"], torch.ones(2))


def test_atomic_dir_and_replace_dir_recovery(tmp_path):
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(ValueError), atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "f").write_text("2")
        raise ValueError
    assert (tmp_path / "ck" / "f").read_text() == "1" and names(tmp_path) == ["ck"]
    # a swap cut short after the old folder was set aside: the next swap still succeeds
    (tmp_path / "ck").rename(tmp_path / "ck.old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("3")
    replace_dir(new, tmp_path / "ck")
    assert (tmp_path / "ck" / "f").read_text() == "3" and names(tmp_path) == ["ck"]
