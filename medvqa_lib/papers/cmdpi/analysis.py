"""The CMDPI chapter's analyses: the answer set's ceiling, accuracy per group, the case study
(Figure 12), the bar charts of the ablations and sweeps (Figures 6-8, 13-15), the t-SNE of the
answer heads (Figure 9) and a consistency check of the reported numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medvqa_lib.data.schema import VQASample
from medvqa_lib.evaluation import summarize
from medvqa_lib.experiments.runs import RunRecord
from medvqa_lib.papers.cmdpi.answers import answer_coverage, build_answer_vocab

__all__ = ["case_study", "implied_overall", "per_group", "tsne_figure", "unseen_answers", "variant_bars"]


def unseen_answers(suite: Mapping[str, Mapping[str, Sequence[VQASample]]]) -> pd.DataFrame:
    """Per dataset and answer type: test questions, the share whose answer never occurs among
    the training answers (FFN_A cannot output it) and the resulting accuracy ceiling (%)."""
    rows = []
    for name, splits in suite.items():
        vocab = build_answer_vocab(splits["train"])
        test = list(splits["test"])
        ceiling = answer_coverage(vocab, test)
        for kind in ("closed", "open", "overall"):
            n = sum(1 for s in test if kind == "overall" or s.answer_type == kind)
            rows.append({"dataset": name, "questions": kind, "n": n, "training answers": len(vocab),
                         "unseen answer (%)": round(100 * (1 - ceiling[kind]), 1) if n else float("nan"),
                         "ceiling (%)": round(100 * ceiling[kind], 1) if n else float("nan")})
    return pd.DataFrame(rows).set_index(["dataset", "questions"])


def per_group(records: Mapping[str, Sequence[RunRecord]], by: str, min_n: int = 1) -> pd.DataFrame:
    """Accuracy (%) per ``by`` group (``"organ"``, ``"question_type"``) for each variant, mean
    over its seeds: one row per group, one column per variant, plus the group's size ``n``."""
    cols, sizes = {}, None
    for label, recs in records.items():
        parts = [summarize(r.scored, by=by).set_index(by) for r in recs]
        cols[label] = sum(p["overall_acc"] for p in parts) / len(parts)
        sizes = parts[0]["n"]
    if sizes is None:
        return pd.DataFrame()
    table = pd.DataFrame(cols)
    table.insert(0, "n", sizes)
    return table[table["n"] >= min_n].sort_values("n", ascending=False).round(1)


def case_study(records: Mapping[str, RunRecord], samples: Sequence[VQASample], k: int = 6,
               seed: int = 0) -> tuple[pd.DataFrame, list[VQASample]]:
    """Figure 12: up to ``k`` test questions where the variants disagree — first those the first
    variant (the full model) answers right and another variant wrong, then the reverse, then
    any others — with every variant's answer and the ground truth."""
    labels = list(records)
    preds = {lab: rec.predictions for lab, rec in records.items()}
    by_qid = {s.qid: s for s in samples}
    rng = np.random.default_rng(seed)
    right = {lab: set(rec.scored.loc[rec.scored["exact"].astype(bool), "qid"].astype(str))
             for lab, rec in records.items()}
    full, others = labels[0], labels[1:]
    tiers = [
        [q for q in by_qid if q in right[full] and any(q not in right[o] for o in others)],
        [q for q in by_qid if q not in right[full] and any(q in right[o] for o in others)],
        [q for q in by_qid if q not in right[full]],
    ]
    chosen: list[str] = []
    for tier in tiers:
        tier = [q for q in tier if q not in chosen]
        for i in rng.permutation(len(tier)):
            if len(chosen) >= k:
                break
            chosen.append(tier[i])
    rows = []
    for q in chosen:
        s = by_qid[q]
        row = {"qid": q, "question": s.question, "answer type": s.answer_type}
        for lab in labels:
            row[lab] = f"{preds[lab].get(q, '—')} {'✓' if q in right[lab] else '✗'}"
        row["ground truth"] = s.answer
        rows.append(row)
    return pd.DataFrame(rows), [by_qid[q] for q in chosen]


def variant_bars(table: pd.DataFrame, title: str, note: str = ""):
    """Grouped bars (closed / open / overall accuracy) per variant, as the paper's Figures 6-8
    and 13-15; ``note`` goes under the title (e.g. "one seed, VQA-RAD test, cpu profile")."""
    import matplotlib.pyplot as plt

    metrics = [m for m in ("open", "closed", "overall") if m in table]
    x = np.arange(len(table))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(table) + 1.5), 3.4))
    for i, m in enumerate(metrics):
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, table[m], width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    finite = table[metrics].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size:
        ax.set_ylim(max(0.0, finite.min() - 10), min(100.0, finite.max() + 8))
    ax.legend(fontsize=8, ncol=len(metrics), loc="lower right")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    return fig


def tsne_figure(heads: Mapping[str, np.ndarray], groups: Sequence[str], seed: int = 0, title: str = ""):
    """Figure 9: a 2-d t-SNE of the answer heads of each model (one panel each), points
    coloured by ``groups`` (the question type of each row)."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    kinds = sorted(set(groups))
    cmap = plt.get_cmap("tab20", max(len(kinds), 1))
    fig, axes = plt.subplots(1, len(heads), figsize=(4.6 * len(heads), 4.2), squeeze=False)
    for ax, (label, h) in zip(axes[0], heads.items(), strict=True):
        n = len(h)
        emb = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca",
                   random_state=seed).fit_transform(np.asarray(h, dtype=np.float32))
        for k, kind in enumerate(kinds):
            sel = np.array([g == kind for g in groups])
            ax.scatter(emb[sel, 0], emb[sel, 1], s=7, color=cmap(k), label=kind, alpha=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, y=1.02, fontsize=10)
    fig.tight_layout()
    return fig


def implied_overall(closed: float, open_: float, n_closed: int, n_open: int) -> float:
    """The overall accuracy that closed and open accuracies imply on a test set of that make-up."""
    return (closed * n_closed + open_ * n_open) / (n_closed + n_open)
