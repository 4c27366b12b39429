"""Tables every chapter builds from its runs: seeds, the image control, the comparison with
the question-only prior and ablations, each with paired-bootstrap intervals over test questions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from medvqa_lib.evaluation import paired_bootstrap, summarize, summarize_with_ci
from medvqa_lib.experiments.runs import RunRecord


def seed_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Per (label, dataset): closed / open / open recall / overall as mean ± std over seeds."""
    rows = []
    for rec in records:
        s = summarize_with_ci(rec.scored, n_resamples=200, seed=rec.seed).iloc[0]
        rows.append({"label": rec.label, "dataset": rec.dataset, "seed": rec.seed,
                     "closed": s["closed_acc"], "open": s["open_acc"],
                     "open_recall": s["open_recall"], "overall": s["overall_acc"]})
    frame = pd.DataFrame(rows)
    agg = frame.groupby(["label", "dataset"], sort=False)[["closed", "open", "open_recall", "overall"]]
    out = agg.mean().round(1).astype(str) + " ± " + agg.std(ddof=1).round(1).fillna(0).astype(str)
    out["seeds"] = frame.groupby(["label", "dataset"], sort=False)["seed"].count()
    return out

def seed_mean_scores(records: Sequence[Any], which: str = "scored") -> pd.DataFrame:
    """One scored table whose ``exact``/``recall`` are each question's mean over the seeds
    (``which``: the records' ``scored`` or ``shuffled`` tables)."""
    if not records:
        raise ValueError("no runs to average")
    frames = [getattr(r, which).set_index("qid") for r in records]
    qids = frames[0].index
    for f in frames[1:]:
        if set(f.index) != set(qids):
            raise ValueError("runs to average cover different test questions")
    out = frames[0].copy()
    for col in ("exact", "recall"):
        if col in out:
            out[col] = sum(f.loc[qids, col].astype(float) for f in frames) / len(frames)
    return out.reset_index()

def image_reliance(records: Sequence[RunRecord], n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy with each question's own image vs with another image (runs made with
    ``image_control``; seeds averaged per question), per dataset and answer type, with the
    paired-bootstrap 95 % interval of the difference. ``uses the image`` when the whole
    interval is above zero."""
    rows = []
    for name in dict.fromkeys(r.dataset for r in records):
        runs = [r for r in records if r.dataset == name]
        if any(r.shuffled is None for r in runs):
            raise ValueError(f"runs on {name} were made without image_control=True")
        own, other = seed_mean_scores(runs), seed_mean_scores(runs, "shuffled")
        for answer_type in ("closed", "open"):
            if not (own["answer_type"] == answer_type).any():
                continue
            r = paired_bootstrap(own, other, n_resamples=n_resamples, seed=seed, answer_type=answer_type)
            mask = own["answer_type"] == answer_type
            rows.append({"dataset": name, "questions": answer_type, "n": r["n"],
                         "own image (%)": round(100 * own.loc[mask, "exact"].mean(), 1),
                         "another image (%)": round(100 * other.loc[other["answer_type"] == answer_type,
                                                                   "exact"].mean(), 1),
                         "difference (pp)": round(r["delta"], 1),
                         "95% CI": f"[{r['low']:.1f}, {r['high']:.1f}]",
                         "uses the image": bool(r["low"] > 0)})
    return pd.DataFrame(rows).set_index(["dataset", "questions"])

def compare_to_prior(model_scored: Mapping[str, pd.DataFrame], prior_scored: Mapping[str, pd.DataFrame],
                     n_resamples: int = 1000, seed: int = 0, label: str = "MISS") -> pd.DataFrame:
    """Paired bootstrap of model − prior accuracy per dataset and answer type (percentage
    points, 95 % interval, column ``"<label> − prior (pp)"``); ``supported`` when the whole
    interval is above zero."""
    rows = []
    for name, scored in model_scored.items():
        if name not in prior_scored:
            continue
        for answer_type in ("closed", "open"):
            r = paired_bootstrap(scored, prior_scored[name], n_resamples=n_resamples, seed=seed,
                                 answer_type=answer_type)
            rows.append({"dataset": name, "questions": answer_type, "n": r["n"],
                         f"{label} − prior (pp)": round(r["delta"], 1),
                         "95% CI": f"[{r['low']:.1f}, {r['high']:.1f}]",
                         "supported": bool(r["low"] > 0)})
    return pd.DataFrame(rows).set_index(["dataset", "questions"])


def ablation_table(records: Mapping[str, Any], reference: str | None = None,
                   n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy (%) of each variant (mean over its seeds) and its difference to ``reference``
    (the first variant by default) with a paired-bootstrap 95 % interval over test questions,
    overall and per answer type. A difference whose interval contains 0 is not evidence.

    ``records`` maps each variant to its runs (one :class:`RunRecord` or a list over seeds).
    """
    records = {lab: [recs] if isinstance(recs, RunRecord) else list(recs) for lab, recs in records.items()}
    labels = list(records)
    reference = reference or labels[0]
    means = {lab: seed_mean_scores(list(recs)) for lab, recs in records.items()}
    rows = []
    for lab in labels:
        s = summarize(means[lab]).iloc[0]
        row = {"variant": lab, "seeds": len(records[lab]), "closed": s["closed_acc"], "open": s["open_acc"],
               "overall": s["overall_acc"]}
        if lab != reference:
            for kind, name in ((None, "overall"), ("closed", "closed"), ("open", "open")):
                r = paired_bootstrap(means[lab], means[reference], n_resamples=n_resamples, seed=seed,
                                     answer_type=kind)
                row[f"Δ {name} (pp)"] = r["delta"]
                row[f"Δ {name} 95% CI"] = f"[{r['low']:.1f}, {r['high']:.1f}]"
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant").round(1)
