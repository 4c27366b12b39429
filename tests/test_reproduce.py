"""The runner's pieces, without executing notebooks (see test_book.py for that)."""

import nbformat
import pytest

from medvqa_lib import execute
from medvqa_lib import reproduce as rp
from medvqa_lib.errors import UnknownNameError


def test_toc_lists_the_chapters_in_book_order():
    notebooks = rp.toc_notebooks()
    assert notebooks, "book/_toc.yml lists no notebook"
    assert notebooks[0].name == "00_data_and_evaluation.ipynb"
    for nb in notebooks:
        assert nb.exists(), f"{nb} is in the toc but missing"
        assert nb.with_suffix(".py").exists(), f"{nb} has no paired py:percent script"


def test_every_chapter_has_parameters_cell_and_kernelspec():
    for path in rp.toc_notebooks():
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
        assert "hide-cell" in tagged[0].metadata["tags"]
        assert "profile =" in tagged[0].source and "data_dir =" in tagged[0].source


def test_select_notebooks_by_substring():
    notebooks = rp.toc_notebooks()
    assert rp.select_notebooks(notebooks, "DATA") == [notebooks[0]]
    assert rp.select_notebooks(notebooks, None) == notebooks
    with pytest.raises(UnknownNameError, match="unknown chapter 'nope'"):
        rp.select_notebooks(notebooks, "nope")


def test_injected_parameters_cell_is_hidden(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("x = 1")]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    execute.hide_injected_parameters(path)
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].metadata["tags"] == ["injected-parameters", "hide-cell"]
    assert "tags" not in cells[1].metadata


def test_unknown_profile_exits_2(capsys):
    assert rp.main(["reproduce", "--profile", "huge", "--no-build"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err


def test_missing_data_folder_exits_2(capsys, tmp_path):
    assert rp.main(["reproduce", "--profile", "smoke", "--data", str(tmp_path / "x"), "--no-build"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_failing_notebook_is_reported_and_run_goes_on(tmp_path):
    bad = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                             "display_name": "Python 3"}})
    bad.cells = [nbformat.v4.new_code_cell("profile = 'x'\ndata_dir = None", metadata={"tags": ["parameters"]}),
                 nbformat.v4.new_code_cell("raise ValueError('boom')")]
    src = tmp_path / "bad.ipynb"
    nbformat.write(bad, src)
    run = execute.execute_notebook(src, tmp_path / "out" / "bad.ipynb", {"profile": "smoke"})
    assert not run.ok and "ValueError: boom" in run.error
    assert (tmp_path / "out" / "bad.ipynb").exists()


def test_kernels_run_over_ipc_without_the_tcp_warning(tmp_path, capfd):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print('x is', x)")]
    src = tmp_path / "tiny.ipynb"
    nbformat.write(nb, src)
    run = execute.execute_notebook(src, tmp_path / "out" / "tiny.ipynb", {"x": 5})
    assert run.ok, run.error
    assert "x is 5" in (tmp_path / "out" / "tiny.ipynb").read_text()
    assert "without encryption" not in capfd.readouterr().err
    assert not list(tmp_path.glob("*ipc*"))
