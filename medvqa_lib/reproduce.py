"""Execute every chapter with papermill, then build the HTML book with Jupyter Book.

``python -m medvqa_lib reproduce [--profile P] [--data synthetic|PATH] [--only CHAPTER]``

* chapters come from ``book/_toc.yml`` in book order (the ``.ipynb`` entries);
* each is executed with its ``parameters`` cell overridden (``profile``, ``data_dir``) into
  ``_build/executed/notebooks/`` — the source notebooks in git stay output-free;
* papermill's injected-parameters cell is tagged ``hide-cell``;
* a failing chapter is reported and the run carries on; the exit status is non-zero if any
  failed; the book is built from a staging copy (``_build/book_src``) into ``_build/html``
  with Jupyter Book's own execution off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from medvqa_lib.config import PROFILES, resolve_data_dir
from medvqa_lib.errors import ConfigError, unknown_name
from medvqa_lib.execute import NotebookRun, execute_notebook
from medvqa_lib.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOK_FILES = ("_config.yml", "references.bib")


def toc_notebooks(root: Path = REPO_ROOT) -> list[Path]:
    """The ``.ipynb`` chapters listed in ``book/_toc.yml``, in book order."""
    toc = yaml.safe_load((root / "book" / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    files.append(node[key])
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [root / f for f in files if f.endswith(".ipynb")]


def select_notebooks(notebooks: list[Path], only: str | None) -> list[Path]:
    """Filter chapters by a case-insensitive substring of their file name."""
    if not only:
        return notebooks
    chosen = [nb for nb in notebooks if only.lower() in nb.stem.lower()]
    if not chosen:
        raise unknown_name("chapter", only, [nb.stem for nb in notebooks])
    return chosen


def stage_book(executed: dict[Path, Path], root: Path, stage: Path) -> Path:
    """Copy the book pages, config and executed notebooks into ``stage``; return it."""
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(root / "book", stage / "book")
    shutil.copy2(root / "book" / "_toc.yml", stage / "_toc.yml")
    for name in BOOK_FILES:
        if (root / name).exists():
            shutil.copy2(root / name, stage / name)
    for src, out in executed.items():
        target = stage / src.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out if out.exists() else src, target)
    return stage


def build_book(stage: Path, build_root: Path) -> subprocess.CompletedProcess:
    """``jupyter-book build`` of the staging folder; HTML lands in ``build_root/html``."""
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    cmd = [exe, "build", str(stage), "--path-output", str(build_root.parent), "--builder", "html"]
    return subprocess.run(cmd, capture_output=True, text=True)


def reproduce(profile: str = "cpu", data: str | None = "synthetic", only: str | None = None,
              root: Path = REPO_ROOT, build: bool = True, timeout_s: int | None = None) -> int:
    """Execute the chapters and build the book; return the process exit status."""
    if profile not in PROFILES:
        raise unknown_name("profile", profile, PROFILES)
    data_dir = resolve_data_dir(data if data is not None else "synthetic")
    build_root = root / "_build"
    notebooks = select_notebooks(toc_notebooks(root), only)
    env_backup = dict(os.environ)
    os.environ.update({"MEDVQA_PROGRESS": "0", "TQDM_DISABLE": "1",
                       "MEDVQA_OUTPUT_DIR": str(build_root / "results" / profile),
                       "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    params = {"profile": profile, "data_dir": str(data_dir) if data_dir else "synthetic"}
    runs: list[NotebookRun] = []
    executed: dict[Path, Path] = {}
    try:
        for nb in notebooks:
            out = build_root / "executed" / nb.relative_to(root)
            print(f"▶ {nb.relative_to(root)} (profile={profile}, data={params['data_dir']})", flush=True)
            run = execute_notebook(nb, out, params, timeout_s)
            runs.append(run)
            executed[nb] = out
            status = "ok" if run.ok else f"FAILED — {run.error}"
            print(f"  {run.seconds:7.1f} s  {status}", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    failed = [r for r in runs if not r.ok]
    book_ok = True
    if build:
        executed_all = {nb: build_root / "executed" / nb.relative_to(root) for nb in toc_notebooks(root)}
        stage = stage_book(executed_all, root, build_root / "book_src")
        start = time.perf_counter()
        result = build_book(stage, build_root)
        book_ok = result.returncode == 0
        print(f"book build: {'ok' if book_ok else 'FAILED'} in {time.perf_counter() - start:.1f} s"
              f" → {build_root / 'html' / 'index.html'}")
        if not book_ok:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
    report = {"profile": profile, "data": params["data_dir"], "runs": [asdict(r) for r in runs],
              "book_built": book_ok if build else None}
    atomic_write_json(build_root / "reproduce_report.json", report)
    _print_summary(runs)
    return 1 if failed or not book_ok else 0


def _print_summary(runs: list[NotebookRun]) -> None:
    total = sum(r.seconds for r in runs)
    print("\nchapter                                   seconds  status")
    for r in runs:
        print(f"{r.notebook:<40} {r.seconds:8.1f}  {'ok' if r.ok else 'FAILED'}")
    print(f"{'total':<40} {total:8.1f}")
    for r in runs:
        if not r.ok:
            print(f"\n{r.notebook} failed: {r.error}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m medvqa_lib``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medvqa_lib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="execute every chapter with papermill and build the book")
    rep.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    rep.add_argument("--data", default="synthetic",
                     help="'synthetic' (embedded default) or a folder holding vqa_rad/ and slake/")
    rep.add_argument("--only", default=None, help="run only chapters whose file name contains this")
    rep.add_argument("--no-build", action="store_true", help="execute the chapters, skip the book build")
    rep.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    args = parser.parse_args(argv)
    try:
        return reproduce(args.profile, args.data, args.only, build=not args.no_build,
                         timeout_s=args.timeout)
    except (ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
