"""End to end: execute every chapter at the smoke profile with papermill and build the book."""

import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from medvqa_lib import reproduce as rp

REPO = rp.REPO_ROOT


def _copy_book(dst: Path) -> Path:
    for name in ("book", "notebooks"):
        shutil.copytree(REPO / name, dst / name)
    for name in ("_config.yml", "references.bib"):
        shutil.copy2(REPO / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    root = _copy_book(tmp_path_factory.mktemp("book"))
    status = rp.reproduce("smoke", "synthetic", root=root, build=True)
    return root, status


@pytest.mark.slow
def test_smoke_profile_executes_every_chapter_and_builds(built_book):
    root, status = built_book
    report = json.loads((root / "_build" / "reproduce_report.json").read_text())
    failed = [r for r in report["runs"] if not r["ok"]]
    assert not failed, f"chapters failed: {failed}"
    assert status == 0 and report["book_built"]
    assert len(report["runs"]) == len(rp.toc_notebooks(root))
    assert (root / "_build" / "html" / "index.html").exists()


@pytest.mark.slow
def test_data_chapter_page_has_tables_and_figures(built_book):
    root, _ = built_book
    html = (root / "_build" / "html" / "notebooks" / "00_data_and_evaluation.html").read_text()
    assert html.count("<img") >= 3, "the data chapter should show its figures"
    assert "overall_acc" in html and "closed_acc" in html
    executed = nbformat.read(root / "_build" / "executed" / "notebooks" / "00_data_and_evaluation.ipynb", 4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "hide-cell" in injected[0].metadata["tags"]
    assert "profile = \"smoke\"" in injected[0].source
    results = root / "_build" / "results" / "smoke" / "data_and_evaluation"
    assert (results / "prior_baseline.csv").exists()


@pytest.mark.realdata
def test_data_chapter_on_real_data(tmp_path):
    data = os.environ.get("MEDVQA_DATA_DIR")
    if not data or not Path(data, "vqa_rad").is_dir():
        pytest.skip("real data not found: set MEDVQA_DATA_DIR=/path/to/shared/data")
    root = _copy_book(tmp_path)
    assert rp.reproduce("smoke", data, only="data", root=root, build=False) == 0
    results = root / "_build" / "results" / "smoke" / "data_and_evaluation"
    stats = (results / "split_statistics.csv").read_text()
    assert "vqa-rad,test,203,451" in stats and "slake,test,96,1061" in stats


@pytest.mark.slow
def test_chapters_put_each_equation_next_to_its_code(built_book):
    root, _ = built_book
    html = (root / "_build" / "html" / "notebooks" / "02_m2i2.html").read_text()
    assert "medvqa_lib.papers.m2i2.losses.mim_loss" in html and "masked patches" in html
    assert "medvqa_lib.papers.m2i2.mae.MAEDecoder" in html  # the decoder's source, shown on the page
