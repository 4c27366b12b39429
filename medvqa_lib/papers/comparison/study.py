"""The comparison chapter: the four methods side by side on the runs their chapters made.

Each paper chapter stores its main fine-tuning runs (:mod:`medvqa_lib.experiments.run_store`); this
module reads them back and compares the methods on exactly those test questions:

* :func:`load_method_runs` — the stored runs of every method (running a missing chapter first
  when asked to), plus :func:`prior_runs`, the question-only prior in the same format;
* :func:`main_table` — closed / open (exact, recall) / overall as mean ± std over seeds, per
  dataset and test set (VQA-RAD "free" and "free+para"), next to :data:`REPORTED` numbers;
* :func:`pairwise_bootstrap` — paired bootstrap between methods on the questions both answered;
* :func:`group_accuracy` and :func:`hardest_questions` — error analysis;
* :func:`cost_table` — parameters, training time and throughput of the stored runs.

Data efficiency (accuracy against the amount of pre-training data) lives in
:mod:`medvqa_lib.papers.comparison.efficiency`, the throughput measurement in
:mod:`medvqa_lib.papers.comparison.throughput`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvqa_lib.errors import DataError, unknown_name
from medvqa_lib.evaluation import (
    QuestionOnlyPrior,
    format_mean_std,
    paired_bootstrap,
    score_predictions,
)
from medvqa_lib.experiments.run_store import load_runs
from medvqa_lib.papers.comparison.config import CHAPTERS, METHODS, PRIOR

__all__ = ["REPORTED", "runs_path",
           "load_method_runs", "run_chapter", "prior_runs", "test_sets", "seed_scores", "main_table",
           "readable_table", "reported_table", "question_means", "pairwise_bootstrap", "group_accuracy",
           "heatmap_figure", "hardest_questions", "hardest_figure", "cost_table"]

_METRICS = ("closed", "open", "open_recall", "overall")


# ----------------------------------------------------------------------------- stored runs


def runs_path(results_root: str | Path, method: str) -> Path:
    """Where ``method``'s chapter stores its main runs under ``results_root``."""
    if method not in CHAPTERS:
        raise unknown_name("method", method, CHAPTERS)
    return Path(results_root) / CHAPTERS[method][0] / "main_runs.csv"


def run_chapter(method: str, profile: str, data_root: Path | None, results_root: str | Path,
                notebooks: Path, timeout_s: int | None = None) -> Path:
    """Execute ``method``'s chapter from the folder ``notebooks`` with papermill (same profile
    and data) so that it writes its stored runs under ``results_root``; returns their path."""
    from medvqa_lib.execute import execute_notebook

    stem = CHAPTERS[method][1]
    src = Path(notebooks) / f"{stem}.ipynb"
    if not src.is_file():
        raise DataError(f"{runs_path(results_root, method)} is missing and the chapter {src} is not "
                        f"here to run; run it first (python -m medvqa_lib reproduce --only {stem})")
    dst = Path(results_root).parent.parent / "executed" / "notebooks" / f"{stem}.ipynb"
    data = str(data_root) if data_root is not None else "synthetic"
    print(f"{method}: no stored runs at {runs_path(results_root, method)}; executing {stem} "
          f"(profile={profile}, data={data}) — this takes as long as that chapter")
    run = execute_notebook(src, dst, {"profile": profile, "data_dir": data}, timeout_s,
                           env={"MEDVQA_OUTPUT_DIR": str(results_root)})
    if not run.ok:
        raise DataError(f"executing {stem} failed ({run.error}); see {dst}")
    return runs_path(results_root, method)


def load_method_runs(results_root: str | Path, methods: Sequence[str] = METHODS,
                     runner: Callable[[str], Any] | None = None) -> pd.DataFrame:
    """The stored runs of ``methods`` under ``results_root``, one frame. A missing file is
    produced by ``runner(method)`` when given (e.g. :func:`run_chapter`), else it is an error
    that names the chapter to run. Each file must hold its own method's runs."""
    frames = []
    for method in methods:
        path = runs_path(results_root, method)
        if not path.is_file() and runner is not None:
            runner(method)
        frame = load_runs(path)
        found = set(frame["method"].astype(str))
        if found != {method}:
            raise DataError(f"{path} holds runs of {sorted(found)}, expected only {method!r}")
        frames.append(frame)
    if not frames:
        raise ValueError("no methods to load")
    return pd.concat(frames, ignore_index=True)


def prior_runs(suite: Mapping[str, Mapping[str, Sequence[Any]]]) -> pd.DataFrame:
    """The data chapter's question-type prior (fitted on each training split, answering its test
    split) in the stored-runs format: method :data:`PRIOR`, one "seed" 0, no training cost."""
    frames = []
    for name, splits in suite.items():
        prior = QuestionOnlyPrior(key="question_type").fit(splits["train"])
        scored = score_predictions(splits["test"], prior.predict(splits["test"]))
        scored = scored.assign(method=PRIOR, label=PRIOR, dataset=name, seed=0, device="cpu")
        frames.append(scored)
    frame = pd.concat(frames, ignore_index=True)
    frame["exact"] = frame["exact"].astype(bool)
    return frame


def _check_methods(runs: pd.DataFrame, methods: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(runs["method"].astype(str)))
    if methods is None:
        return present
    for m in methods:
        if m not in present:
            raise unknown_name("method", m, present)
    return list(methods)


# ----------------------------------------------------------------------------- main table


def test_sets(suite: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[tuple[str, str], set[str]]:
    """``{(dataset, test set): qids}``: VQA-RAD's "free" (free-form questions, where the phrase
    type is known) and "free+para" (all); every other dataset's whole test split ("all")."""
    from medvqa_lib.data import vqa_rad_subset

    out: dict[tuple[str, str], set[str]] = {}
    for name, splits in suite.items():
        test = list(splits["test"])
        if name == "vqa-rad":
            try:
                out[(name, "free")] = {str(s.qid) for s in vqa_rad_subset(test, "free")}
            except DataError:
                pass
            out[(name, "free+para")] = {str(s.qid) for s in test}
        else:
            out[(name, "all")] = {str(s.qid) for s in test}
    return out


def _percent(values: pd.Series) -> float:
    return float(values.astype(float).mean() * 100) if len(values) else math.nan


def seed_scores(runs: pd.DataFrame, qids: set[str] | None = None) -> pd.DataFrame:
    """Per (method, dataset, seed): closed, open (exact), open_recall and overall accuracy in %
    and the number of questions ``n``, on the questions ``qids`` (all if None)."""
    part = runs if qids is None else runs[runs["qid"].astype(str).isin(qids)]
    rows = []
    for (method, dataset, seed), g in part.groupby(["method", "dataset", "seed"], sort=False):
        closed, open_ = g[g["answer_type"] == "closed"], g[g["answer_type"] == "open"]
        rows.append({"method": method, "dataset": dataset, "seed": seed, "n": len(g),
                     "closed": _percent(closed["exact"]), "open": _percent(open_["exact"]),
                     "open_recall": _percent(open_["recall"]) if "recall" in g else math.nan,
                     "overall": _percent(g["exact"])})
    return pd.DataFrame(rows, columns=["method", "dataset", "seed", "n", *_METRICS])


def main_table(runs: pd.DataFrame, sets: Mapping[tuple[str, str], set[str]]) -> pd.DataFrame:
    """One row per (dataset, test set, method): each metric's mean and std over seeds (ddof 1;
    NaN with one seed), the seeds and the test questions the method answered (``n``)."""
    rows = []
    for (dataset, subset), qids in sets.items():
        scores = seed_scores(runs[runs["dataset"] == dataset], qids)
        for method, g in scores.groupby("method", sort=False):
            row: dict[str, Any] = {"dataset": dataset, "test set": subset, "method": method,
                                   "seeds": len(g), "n": int(g["n"].iloc[0])}
            for m in _METRICS:
                row[m] = float(g[m].mean())
                row[f"{m}_std"] = float(g[m].std(ddof=1)) if len(g) > 1 else math.nan
            rows.append(row)
    return pd.DataFrame(rows).set_index(["dataset", "test set", "method"])


def readable_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`main_table` for reading: ``mean ± std`` strings, seeds and questions."""
    out = pd.DataFrame(index=table.index)
    for m, name in zip(_METRICS, ("closed", "open", "open recall", "overall"), strict=True):
        out[name] = [format_mean_std(a, b) for a, b in zip(table[m], table[f"{m}_std"], strict=True)]
    out["seeds"], out["questions"] = table["seeds"], table["n"]
    return out


# ----------------------------------------------------------------------------- reported numbers


def _reported_rows() -> list[dict[str, Any]]:
    """Each paper's own row for its method, from the chapters' study modules."""
    from medvqa_lib.papers.cmdpi.reported import REPORTED as CMDPI_REPORTED
    from medvqa_lib.papers.m2i2.reported import REPORTED as M2I2_REPORTED
    from medvqa_lib.papers.miss.pipeline import REPORTED as MISS_REPORTED

    rows = [  # (method, dataset, test set, closed, open, overall, where)
        ("MISS", "vqa-rad", "free+para", *MISS_REPORTED["vqa-rad"][0][1:], "MISS paper, Table 1 (w/o TransCap)"),
        ("MISS", "slake", "all", *MISS_REPORTED["slake"][-1][1:], "MISS paper, Table 3 (JTM + TransCap)"),
        ("PaliGemma-LoRA", "slake", "all", math.nan, math.nan, 68.0,
         "PaliGemma paper, Table 2 (with pre-stage; 68 of 100 questions)"),
    ]
    for dataset, number in (("vqa-rad", 1), ("slake", 2)):
        c, o, a = next(r[1:] for r in CMDPI_REPORTED[dataset] if r[0] == "CMDPI")
        rows.append(("CMDPI", dataset, "free+para" if dataset == "vqa-rad" else "all", c, o, a,
                     f"CMDPI paper, Table {number}"))
    for table, dataset in (("table1", "vqa-rad"), ("table3", "slake")):
        for name, subset, c, o, a in M2I2_REPORTED[table]:
            if name == "M2I2":
                rows.append(("M2I2", dataset, subset or "all", c, o, a,
                             f"M2I2 paper, Table {table.removeprefix('table')}"))
    return [dict(zip(("method", "dataset", "test set", "closed", "open", "overall", "source"), r, strict=True))
            for r in rows]


#: each paper's own numbers for its method (accuracy in %), labelled as reported
REPORTED: pd.DataFrame = pd.DataFrame(_reported_rows())


def reported_table(table: pd.DataFrame, reported: pd.DataFrame = REPORTED) -> pd.DataFrame:
    """Measured (mean over seeds) next to reported accuracy, and measured − reported, for every
    reported row; a reported row without a measurement here keeps "n/a"."""
    rows = []
    for r in reported.to_dict(orient="records"):
        key = (r["dataset"], r["test set"], r["method"])
        row: dict[str, Any] = {"method": r["method"], "dataset": r["dataset"], "test set": r["test set"],
                               "reported in": r["source"]}
        for m in ("closed", "open", "overall"):
            measured = float(table.loc[key, m]) if key in table.index else math.nan
            row[f"{m} measured"] = round(measured, 1)
            row[f"{m} reported"] = r[m]
            row[f"{m} Δ"] = round(measured - r[m], 1)
        rows.append(row)
    return pd.DataFrame(rows).set_index(["method", "dataset", "test set"])


# ----------------------------------------------------------------------------- significance


def question_means(runs: pd.DataFrame, method: str, dataset: str) -> pd.DataFrame:
    """One row per test question of ``method`` on ``dataset``: ``exact`` and ``recall`` as the
    mean over the method's seeds (a question answered by only some seeds is dropped)."""
    part = runs[(runs["method"] == method) & (runs["dataset"] == dataset)]
    if part.empty:
        raise DataError(f"no stored runs of {method} on {dataset}")
    n_seeds = part["seed"].nunique()
    agg = {"exact": ("exact", lambda s: float(s.astype(float).mean())), "answer_type": ("answer_type", "first"),
           "n_seeds": ("seed", "nunique")}
    if "recall" in part:
        agg["recall"] = ("recall", "mean")
    out = part.assign(qid=part["qid"].astype(str)).groupby("qid", sort=True).agg(**agg).reset_index()
    return out[out["n_seeds"] == n_seeds].drop(columns="n_seeds").reset_index(drop=True)


def _verdict(a: str, b: str, low: float, high: float) -> str:
    if low > 0:
        return f"{a} better"
    if high < 0:
        return f"{b} better"
    return "no difference shown"


def pairwise_bootstrap(runs: pd.DataFrame, dataset: str, methods: Sequence[str] | None = None,
                       qids: set[str] | None = None, n_resamples: int = 1000, seed: int = 0,
                       answer_types: Sequence[str | None] = (None, "closed", "open")) -> pd.DataFrame:
    """Paired bootstrap of accuracy(A) − accuracy(B) for every pair of ``methods`` on
    ``dataset``, on the test questions both answered (within ``qids`` if given; ``n`` says how
    many), a method's accuracy on a question being its mean over seeds. ``verdict`` names the
    better method when the whole 95 % interval is on one side of zero, else "no difference shown"."""
    names = [m for m in _check_methods(runs, methods)
             if ((runs["method"] == m) & (runs["dataset"] == dataset)).any()]
    means = {m: question_means(runs, m, dataset) for m in names}
    rows = []
    for a, b in itertools.combinations(names, 2):
        common = set(means[a]["qid"]) & set(means[b]["qid"])
        if qids is not None:
            common &= set(qids)
        sa = means[a][means[a]["qid"].isin(common)]
        sb = means[b][means[b]["qid"].isin(common)]
        for kind in answer_types:
            r = paired_bootstrap(sa, sb, n_resamples=n_resamples, seed=seed, answer_type=kind)
            rows.append({"A": a, "B": b, "questions": kind or "all", "n": int(r["n"]),
                         "A (%)": _percent(sa["exact"] if kind is None else sa.loc[sa["answer_type"] == kind,
                                                                                    "exact"]),
                         "B (%)": _percent(sb["exact"] if kind is None else sb.loc[sb["answer_type"] == kind,
                                                                                    "exact"]),
                         "A − B (pp)": r["delta"], "low": r["low"], "high": r["high"],
                         "verdict": _verdict(a, b, r["low"], r["high"]) if r["n"] else "no common questions"})
    return pd.DataFrame(rows, columns=["A", "B", "questions", "n", "A (%)", "B (%)", "A − B (pp)", "low",
                                       "high", "verdict"]).round(1)


# ----------------------------------------------------------------------------- error analysis


def group_accuracy(runs: pd.DataFrame, by: str, methods: Sequence[str] | None = None,
                   min_n: int = 1) -> pd.DataFrame:
    """Accuracy (%) per (dataset, ``by`` group) for each method — its seed-mean correctness per
    question, averaged over the group's questions it answered — with the group's size ``n``
    (the most questions any method answered in it). Groups smaller than ``min_n`` are dropped."""
    if by not in runs:
        raise DataError(f"the stored runs have no column {by!r}")
    names = _check_methods(runs, methods)
    cols, sizes = {}, {}
    for m in names:
        for dataset in runs.loc[runs["method"] == m, "dataset"].unique():
            q = question_means(runs, m, dataset)
            groups = runs[(runs["method"] == m) & (runs["dataset"] == dataset)].drop_duplicates("qid")
            q = q.merge(groups[["qid", by]].astype({"qid": str}), on="qid")
            q[by] = q[by].fillna("unknown").astype(str)
            for g, part in q.groupby(by):
                cols.setdefault(m, {})[(dataset, g)] = 100 * part["exact"].mean()
                sizes[(dataset, g)] = max(sizes.get((dataset, g), 0), len(part))
    table = pd.DataFrame(cols)
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", by])
    table.insert(0, "n", pd.Series(sizes))
    table = table[table["n"] >= min_n]
    return table.sort_index().round(1)


def heatmap_figure(tables: Mapping[str, pd.DataFrame], title: str = ""):
    """One heat map of accuracy (%) — rows: groups of every table (e.g. question type, organ),
    columns: methods — with each cell's value written in it."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    parts = []
    for kind, t in tables.items():
        body = t.drop(columns="n")
        body.index = [f"{d} · {kind}: {g} (n={n})" for (d, g), n in zip(t.index, t["n"], strict=True)]
        parts.append(body)
    data = pd.concat(parts) if parts else pd.DataFrame()
    fig, ax = plt.subplots(figsize=(1.4 * max(len(data.columns), 2) + 4, 0.32 * max(len(data), 2) + 1.5))
    sns.heatmap(data.astype(float), annot=True, fmt=".0f", cmap="RdYlGn", vmin=0, vmax=100, cbar_kws={
        "label": "accuracy (%)"}, ax=ax, annot_kws={"fontsize": 7})
    ax.set_xlabel("")
    ax.tick_params(axis="y", labelsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def hardest_questions(runs: pd.DataFrame, k: int = 20, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``k`` test questions most methods get wrong: a method gets a question wrong when its
    seed-mean exact match is below one half. Ranked by methods wrong (most first), then by the
    mean accuracy over the methods (lowest first), then dataset and qid; with each method's
    answer (its first seed's) and ✗/✓."""
    names = _check_methods(runs, methods)
    part = runs[runs["method"].isin(names)].assign(qid=runs["qid"].astype(str))
    means = part.groupby(["dataset", "qid", "method"])["exact"].apply(lambda s: s.astype(float).mean())
    wide = means.unstack("method")
    info = part.drop_duplicates(["dataset", "qid"]).set_index(["dataset", "qid"])
    first = part.sort_values("seed").drop_duplicates(["dataset", "qid", "method"])
    answers = first.set_index(["dataset", "qid", "method"])["prediction"].unstack("method") \
        if "prediction" in first else None
    table = pd.DataFrame(index=wide.index)
    table["methods wrong"] = (wide < 0.5).sum(axis=1)
    table["methods answering"] = wide.notna().sum(axis=1)
    table["mean accuracy (%)"] = (100 * wide.mean(axis=1)).round(1)
    for col in ("question", "answer", "answer_type", "question_type", "organ", "image_id"):
        if col in info:
            table[col] = info[col].reindex(table.index)
    for m in names:
        if m in wide:
            marks = np.where(wide[m].isna(), "—", np.where(wide[m] >= 0.5, "✓", "✗"))
            said = answers[m].reindex(table.index).fillna("") if answers is not None and m in answers else ""
            table[m] = [f"{a} {b}".strip() if b != "—" else "—" for a, b in zip(
                said if isinstance(said, pd.Series) else [""] * len(table), marks, strict=True)]
    table = table.reset_index().sort_values(["methods wrong", "mean accuracy (%)", "dataset", "qid"],
                                            ascending=[False, True, True, True], kind="mergesort")
    return table.head(k).reset_index(drop=True)


def hardest_figure(table: pd.DataFrame, samples: Mapping[str, Any], ncols: int = 5):
    """The questions of :func:`hardest_questions` with their images (``samples``: qid →
    :class:`~medvqa_lib.data.VQASample`), question, answer and how many methods got it wrong."""
    import textwrap

    import matplotlib.pyplot as plt

    rows = [r for r in table.to_dict(orient="records") if str(r["qid"]) in samples]
    nrows = max(1, math.ceil(len(rows) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), rows, strict=False):
        s = samples[str(r["qid"])]
        ax.imshow(s.load_image(), cmap="gray")
        text = (f"Q: {s.question}\nA: {s.answer} ({s.answer_type})\n"
                f"wrong: {r['methods wrong']} of {r['methods answering']} methods")
        ax.set_title("\n".join(textwrap.wrap(text, 32, replace_whitespace=False)), fontsize=7, loc="left")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- cost


def _kind(device: Any) -> str:
    text = str(device or "").lower()
    return "gpu" if "cuda" in text or "gpu" in text else "cpu" if text else ""


def cost_table(runs: pd.DataFrame, throughput: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (method, dataset): parameters (total / trainable, M), training wall time (mean over
    seeds, s), training samples/s, peak memory (MB) and where it ran (cpu/gpu), from the stored
    runs; with ``throughput`` (:func:`~medvqa_lib.papers.comparison.throughput.throughput_table`) its
    measured training samples/s and inference answers/s per method are added."""
    per_run = runs[runs["method"] != PRIOR].drop_duplicates(["method", "dataset", "seed"])
    rows = []
    for (method, dataset), g in per_run.groupby(["method", "dataset"], sort=False):
        mem = pd.to_numeric(g.get("peak_memory_mb"), errors="coerce") if "peak_memory_mb" in g else None
        rows.append({"method": method, "dataset": dataset, "seeds": len(g),
                     "params (M)": round(float(pd.to_numeric(g["n_params"]).iloc[0]) / 1e6, 2),
                     "trainable (M)": round(float(pd.to_numeric(g["n_trainable"]).iloc[0]) / 1e6, 2),
                     "train time (s)": round(float(pd.to_numeric(g["train_time_s"]).mean()), 1),
                     "train samples/s": round(float(pd.to_numeric(g["train_samples_per_s"]).mean()), 1),
                     "peak memory (MB)": (round(float(mem.max()), 0) if mem is not None and mem.notna().any()
                                          else math.nan),
                     "device": _kind(g["device"].iloc[0])})
    table = pd.DataFrame(rows).set_index(["method", "dataset"])
    if throughput is not None and not throughput.empty:
        t = throughput.set_index("method")
        for src, dst in (("train_samples_per_s", "benchmark train samples/s"),
                         ("answers_per_s", "benchmark answers/s")):
            if src in t:
                table[dst] = [round(float(t.loc[m, src]), 1) if m in t.index else math.nan
                              for m in table.index.get_level_values(0)]
    return table
