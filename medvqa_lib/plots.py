"""Figures shared by the chapters (matplotlib + seaborn, one function per figure)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from medvqa_lib.data.schema import VQASample


def use_book_style() -> None:
    """One plotting style for the whole book."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def plot_question_types(counts: pd.DataFrame, split: str = "train") -> plt.Figure:
    """Bar chart of questions per type (closed/open stacked by hue), one panel per dataset.

    ``counts`` is :func:`medvqa_lib.data.stats.question_type_counts`.
    """
    data = counts[counts["split"] == split]
    datasets = list(dict.fromkeys(data["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        sub = data[data["dataset"] == name]
        order = sub.groupby("question_type")["count"].sum().sort_values(ascending=False).index
        sns.barplot(sub, y="question_type", x="count", hue="answer_type", order=order,
                    hue_order=["closed", "open"], ax=ax)
        ax.set_title(f"{name} ({split})")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_answer_long_tail(freqs: dict[str, pd.Series]) -> plt.Figure:
    """Rank–frequency of answers (log–log) per dataset, with the top-10 share annotated."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in freqs.items():
        counts = series.to_numpy()
        share = 100.0 * counts[:10].sum() / counts.sum()
        ax.loglog(np.arange(1, len(counts) + 1), counts, marker=".", lw=1,
                  label=f"{name}: {len(counts)} answers, top-10 = {share:.0f}% of questions")
    ax.set_xlabel("answer rank")
    ax.set_ylabel("questions with this answer")
    ax.legend(fontsize=8)
    ax.set_title("The answer long tail")
    return fig


def show_samples(samples: list[VQASample], n: int = 8, ncols: int = 4, seed: int = 0,
                 predictions: dict[str, str] | None = None) -> plt.Figure:
    """A grid of images with their question, answer (and a prediction, if given)."""
    rng = np.random.default_rng(seed)
    chosen = [samples[i] for i in rng.choice(len(samples), size=min(n, len(samples)), replace=False)]
    nrows = int(np.ceil(len(chosen) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), chosen, strict=False):
        ax.imshow(s.load_image(), cmap="gray")
        text = f"Q: {s.question}\nA: {s.answer} ({s.answer_type})"
        if predictions is not None:
            text += f"\nPred: {predictions.get(s.qid, '—')}"
        ax.set_title("\n".join(textwrap.wrap(text, 34, replace_whitespace=False)), fontsize=8,
                     loc="left")
    fig.tight_layout()
    return fig


def plot_accuracy_by_group(table: pd.DataFrame, value: str = "overall_acc",
                           title: str = "") -> plt.Figure:
    """Horizontal bars of an accuracy column per group (index), with n in the labels."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(table) + 1.2))
    labels = [f"{idx} (n={int(n)})" for idx, n in zip(table.index, table["n"], strict=True)]
    ax.barh(labels, table[value])
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{value} (%)")
    ax.invert_yaxis()
    ax.set_title(title)
    return fig


def read_step_log(out_dir: str | Path) -> pd.DataFrame:
    """The per-step records of a training run's ``metrics.jsonl`` (one row per logged step)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no training log at {path}: was the run written to another out_dir?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame([r for r in rows if r.get("kind") == "step"])


def plot_training_curves(runs: dict[str, str | Path], keys: list[str], title: str = "",
                         smooth: int = 1) -> plt.Figure:
    """One panel per loss in ``keys`` (e.g. ``loss_itc``), one line per run, against the step.
    ``smooth`` > 1 applies a centred rolling mean over that many logged points."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
    for label, out_dir in runs.items():
        log = read_step_log(out_dir)
        for ax, key in zip(axes[0], keys, strict=True):
            if key in log:
                values = log[key].rolling(smooth, center=True, min_periods=1).mean()
                ax.plot(log["step"], values, label=label, lw=1.3)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.set_title(key.removeprefix("loss_").upper() if key != "loss" else "total loss")
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, y=1.03)
    fig.tight_layout()
    return fig


def plot_validation_curves(curves: pd.DataFrame) -> plt.Figure:
    """Closed and open validation accuracy per epoch, one panel per dataset, one line per seed.

    ``curves`` has columns ``dataset``, ``seed``, ``epoch``, ``closed`` and ``open`` (%).
    """
    datasets = list(dict.fromkeys(curves["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.3), squeeze=False)
    long = curves.melt(id_vars=["dataset", "seed", "epoch"], value_vars=["closed", "open"],
                       var_name="questions", value_name="accuracy")
    for ax, name in zip(axes[0], datasets, strict=True):
        sns.lineplot(long[long["dataset"] == name], x="epoch", y="accuracy", hue="questions",
                     units="seed", estimator=None, marker="o", ax=ax)
        ax.set_title(f"{name}: validation")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig
