"""Append one result row (with date, machine and versions) to a CSV, atomically."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, row: dict) -> Path:
    """Append ``row`` to ``results/<name>.csv`` and return the path."""
    import torch

    from medvqa_lib.io import atomic_write_text

    full = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
            "cpus": os.cpu_count(), "torch": torch.__version__, **row}
    path = RESULTS / f"{name}.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []
    fields = list(rows[0]) if rows else []
    fields += [k for k in full if k not in fields]  # new columns go last; old rows leave them empty
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows([*rows, full])
    atomic_write_text(path, buf.getvalue())
    return path
