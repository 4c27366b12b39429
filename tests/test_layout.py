"""The layout keeps its promises: one home per paper, no imports sideways or upwards, the data
folder read from the environment in one place, files small enough to read in one sitting, and
every function a chapter shows under an equation still exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "medvqa_lib"
PAPERS = ("miss", "m2i2", "cmdpi", "paligemma")
#: floors of the library, lowest first: a module may import its own floor or lower ones
FLOORS = [
    {"errors", "io", "config"},
    {"evaluation", "training", "text", "plots", "data", "nn", "transcap", "execute", "notebook"},
    {"experiments"},
    {"papers"},
    {"reproduce", "__main__"},
]


def _modules() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("medvqa_lib")}


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(FLOORS):
        if top.removesuffix(".py") in names:
            return i
    return -1


@pytest.mark.parametrize("paper", PAPERS)
def test_a_paper_package_imports_no_other_paper(paper):
    others = {f"medvqa_lib.papers.{p}" for p in (*PAPERS, "comparison") if p != paper}
    for path in (LIB / "papers" / paper).glob("*.py"):
        bad = {m for m in _imports(path) if any(m == o or m.startswith(o + ".") for o in others)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_nothing_imports_upward():
    for path in _modules():
        rel = path.relative_to(LIB).with_suffix("")
        mine = _floor("medvqa_lib." + ".".join(rel.parts))
        if mine < 0:
            continue
        for module in _imports(path):
            theirs = _floor(module)
            assert theirs <= mine, f"{path.relative_to(ROOT)} (floor {mine}) imports {module} (floor {theirs})"


def test_the_data_folder_variable_is_read_in_one_place():
    readers = [p.relative_to(ROOT).as_posix() for p in _modules()
               if re.search(r"environ(\.get)?\(?\[?[\"']MEDVQA_DATA_DIR|getenv\([\"']MEDVQA_DATA_DIR|environ\.get\(DATA_ENV",
                            p.read_text())]
    assert readers == ["medvqa_lib/config.py"]


def test_no_library_file_is_over_about_600_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > 620}
    assert not long, f"split these files: {long}"


def _shown_functions() -> list[tuple[str, str]]:
    shown = []
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        for call in re.findall(r"show_code\(([^)]*)\)", nb.read_text()):
            shown += [(nb.name, name.strip()) for name in call.split(",") if name.strip()]
    return shown


def test_the_chapters_show_the_code_of_their_equations():
    chapters = {nb for nb, _ in _shown_functions()}
    assert {"01_miss.py", "02_m2i2.py", "03_cmdpi.py", "04_paligemma.py"} <= chapters


def _imported_names(source: str) -> dict[str, str]:
    """alias -> the dotted path it names, for every ``medvqa_lib`` import of a chapter."""
    names = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medvqa_lib"):
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            names.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("medvqa_lib")})
    return names


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("notebook, name", _shown_functions())
def test_every_shown_function_exists(notebook, name):
    """``show_code(losses.mim_loss)`` in a chapter: the name must resolve through the chapter's
    own imports (``from medvqa_lib.papers.m2i2 import losses``) to a function or class."""
    head, _, rest = name.partition(".")
    imported = _imported_names((ROOT / "notebooks" / notebook).read_text())
    assert head in imported, f"{notebook}: show_code({name}): {head} is not imported from medvqa_lib"
    try:
        obj = _resolve(".".join(filter(None, (imported[head], rest))))
    except (AttributeError, ModuleNotFoundError) as err:
        raise AssertionError(f"{notebook}: show_code({name}) no longer exists ({err})") from err
    assert callable(obj)
