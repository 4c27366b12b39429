"""The M2I2 paper's own numbers (Tables 1-4), copied as printed, and their table rows."""

from __future__ import annotations

import pandas as pd

from medvqa_lib.evaluation import reported_row

__all__ = ["REPORTED", "reported_rows"]

#: the paper's Tables 1-4 (accuracy in %: closed, open, overall), copied as printed
REPORTED: dict[str, list[tuple[str, str, float, float, float]]] = {
    # Table 1, VQA-RAD: (method, test set, closed, open, overall)
    "table1": [
        ("SAN-MEVF", "free", 74.1, 40.7, 60.8), ("BAN-MEVF", "free", 75.1, 43.9, 62.6),
        ("SAN-MMQ", "free", 73.0, 46.3, 62.3), ("BAN-MMQ", "free", 72.4, 52.0, 64.3),
        ("SAN-VQAMix", "free", 74.0, 53.8, 65.9), ("BAN-VQAMix", "free", 79.6, 56.6, 70.4),
        ("CMSA-MTPT", "free", 77.3, 56.1, 68.8), ("FITS", "free", 80.0, 61.0, 72.4),
        ("M2I2", "free", 81.6, 61.8, 73.7),
        ("MMBERT", "free+para", 77.9, 63.1, 72.0), ("PubMedCLIP", "free+para", 80.0, 60.1, 72.1),
        ("CMSA-MTPT", "free+para", 80.9, 61.5, 73.2), ("FITS", "free+para", 82.0, 68.2, 76.5),
        ("M2I2", "free+para", 83.5, 66.5, 76.8),
    ],
    # Table 2, PathVQA
    "table2": [
        ("SAN-MEVF", "", 81.0, 6.0, 43.6), ("BAN-MEVF", "", 81.4, 8.1, 44.8),
        ("SAN-MMQ", "", 83.7, 9.6, 46.8), ("BAN-MMQ", "", 82.1, 11.8, 47.1),
        ("SAN-VQAMix", "", 84.4, 12.1, 48.4), ("BAN-VQAMix", "", 83.5, 13.4, 48.6),
        ("M2I2", "", 88.0, 36.3, 62.2),
    ],
    # Table 3, SLAKE
    "table3": [
        ("VGG+SAN", "", 76.1, 70.3, 72.7), ("VGGseg+SAN", "", 75.4, 72.2, 75.4),
        ("PubMedCLIP", "", 82.5, 78.4, 80.1), ("M2I2", "", 91.1, 74.7, 81.2),
    ],
    # Table 4, ablations: (variant, dataset, closed, open, overall)
    "table4": [
        ("w/o pre-training", "vqa-rad", 70.8, 36.6, 57.1), ("w/o MIM", "vqa-rad", 74.1, 52.0, 65.3),
        ("w/o ITC", "vqa-rad", 73.5, 45.5, 62.3), ("M2I2", "vqa-rad", 81.6, 61.8, 73.7),
        ("w/o pre-training", "pathvqa", 87.4, 26.8, 57.2), ("w/o MIM", "pathvqa", 87.9, 34.8, 61.4),
        ("w/o ITC", "pathvqa", 88.0, 36.1, 62.1), ("M2I2", "pathvqa", 88.0, 36.3, 62.2),
        ("w/o pre-training", "slake", 83.2, 67.3, 73.5), ("w/o MIM", "slake", 87.0, 72.6, 78.2),
        ("w/o ITC", "slake", 86.5, 72.7, 78.1), ("M2I2", "slake", 91.1, 74.7, 81.2),
    ],
}
_TABLE_DATASET = {"table1": "vqa-rad", "table2": "pathvqa", "table3": "slake"}


def reported_rows(table: str, subset: str | None = None, dataset: str | None = None
                  ) -> dict[str, pd.DataFrame]:
    """The paper's rows of ``table`` (``"table1"`` … ``"table4"``) as :func:`reported_row`
    tables, keyed by a label that says they are reported. ``subset``: Table 1's test set
    (``"free"``/``"free+para"``); ``dataset``: Table 4's dataset."""
    if table not in REPORTED:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(REPORTED)}")
    out = {}
    number = table.removeprefix("table")
    for name, key, closed, open_, overall in REPORTED[table]:
        if table == "table4":
            if dataset is not None and key != dataset:
                continue
            ds, note = key, ""
        else:
            if subset is not None and key != subset:
                continue
            ds, note = _TABLE_DATASET[table], key
        label = f"{name}{f' ({key})' if key else ''}, reported (M2I2 paper, Table {number})"
        out[label] = reported_row(f"M2I2 paper, Table {number}: {name}", ds, closed, open_, overall, note=note)
    return out
