"""Execute one notebook with papermill: parameters injected, the injected cell folded, the
kernel reached over local IPC sockets, and a failing notebook reported instead of raised."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass
class NotebookRun:
    """The outcome of executing one chapter."""

    notebook: str
    ok: bool
    seconds: float
    error: str = ""


def hide_injected_parameters(path: Path) -> None:
    """Tag papermill's injected-parameters cell ``hide-cell`` so the book folds it."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            cell["metadata"]["tags"] = [*tags, "hide-cell"]
    nbformat.write(nb, path)


def ipc_kernel_manager() -> type:
    """A Jupyter kernel manager that talks to its kernel over local IPC sockets, not TCP.

    The kernel then neither listens on a network port nor prints its warning about running
    over TCP without encryption.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IPCKernelManager


def execute_notebook(src: Path, dst: Path, parameters: dict, timeout_s: int | None = None,
                     env: Mapping[str, str] | None = None) -> NotebookRun:
    """Run one notebook with papermill; never raises for a failing notebook.

    ``env`` holds environment variables the kernel starts with (set for the run, then restored).
    """
    import papermill as pm

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(src), str(dst), parameters=parameters, kernel_name="python3",
            cwd=str(src.parent), progress_bar=False, execution_timeout=timeout_s,
            kernel_manager_class=ipc_kernel_manager(),
        )
        ok, error = True, ""
    except Exception as exc:  # a failing chapter is reported, the run goes on
        ok, error = False, _short_error(exc)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if dst.exists():
        hide_injected_parameters(dst)
    return NotebookRun(src.name, ok, time.perf_counter() - start, error)


def _short_error(exc: Exception) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", str(exc))
    return f"{name}: {value}"[:500]
