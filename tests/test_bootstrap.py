"""Bootstrap intervals, paired comparisons and mean ± std over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation import (
    MEASURED,
    REPORTED,
    aggregate_seeds,
    bootstrap_ci,
    format_mean_std,
    paired_bootstrap,
    reported_row,
    results_table,
    summarize,
    summarize_with_ci,
)


def scored_frame(exact, answer_types=None, qids=None) -> pd.DataFrame:
    n = len(exact)
    return pd.DataFrame(
        {
            "qid": qids if qids is not None else [f"q{i}" for i in range(n)],
            "answer_type": answer_types or ["closed" if i % 2 else "open" for i in range(n)],
            "question_type": ["presence" if i % 3 else "organ" for i in range(n)],
            "exact": np.asarray(exact, dtype=bool),
            "recall": np.asarray(exact, dtype=float),
        }
    )


def coin(n, p, seed):
    return np.random.default_rng(seed).random(n) < p


def test_deterministic_for_seed():
    values = coin(200, 0.7, 1)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_interval_contains_point():
    values = coin(300, 0.6, 2).astype(float)
    point, low, high = bootstrap_ci(values)
    assert point == pytest.approx(values.mean())
    assert low < point < high


def test_width_shrinks_with_more_data():
    _, low_small, high_small = bootstrap_ci(coin(50, 0.7, 5))
    _, low_big, high_big = bootstrap_ci(coin(5000, 0.7, 5))
    assert high_big - low_big < (high_small - low_small) / 3


def test_degenerate_and_empty():
    assert bootstrap_ci(np.ones(20)) == (1.0, 1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    with pytest.raises(ConfigError):
        bootstrap_ci([1, 0], confidence=95)
    with pytest.raises(DataError):
        bootstrap_ci([1.0, float("nan")])


def test_statistic_without_axis_matches_vectorised():
    values = np.random.default_rng(0).normal(size=60)
    fast = bootstrap_ci(values, statistic=np.median, n_resamples=200)
    slow = bootstrap_ci(values, statistic=lambda x: float(np.median(x)), n_resamples=200)
    assert fast == pytest.approx(slow)


def test_summarize_with_ci_matches_summarize():
    scored = scored_frame(coin(120, 0.65, 7))
    plain = summarize(scored, by="question_type")
    with_ci = summarize_with_ci(scored, by="question_type", n_resamples=300)
    for name in ("closed_acc", "open_acc", "open_recall", "overall_acc"):
        assert np.allclose(with_ci[name], plain[name])
        assert (with_ci[f"{name}_low"] <= with_ci[name]).all()
        assert (with_ci[name] <= with_ci[f"{name}_high"]).all()
    assert list(with_ci["n"]) == list(plain["n"])


def test_paired_bootstrap_sign():
    rng = np.random.default_rng(11)
    truth_b = rng.random(400) < 0.55
    truth_a = truth_b | (rng.random(400) < 0.3)  # a is right wherever b is, and more
    a, b = scored_frame(truth_a), scored_frame(truth_b)
    better = paired_bootstrap(a, b)
    assert better["delta"] == pytest.approx(100 * (truth_a.mean() - truth_b.mean()))
    assert 0 < better["low"] <= better["delta"] <= better["high"]
    assert better["p_value"] < 0.01
    assert better["n"] == 400
    worse = paired_bootstrap(b, a)
    assert worse["delta"] == pytest.approx(-better["delta"])
    assert worse["high"] < 0


def test_paired_bootstrap_identical_and_order():
    a = scored_frame(coin(100, 0.5, 3))
    same = paired_bootstrap(a, a.copy())
    assert (same["delta"], same["low"], same["high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    b = scored_frame(coin(100, 0.5, 4))
    shuffled = b.sample(frac=1.0, random_state=0)
    assert paired_bootstrap(a, b, seed=2) == paired_bootstrap(a, shuffled, seed=2)


def test_paired_bootstrap_answer_type_and_errors():
    a = scored_frame([1, 1, 0, 0], answer_types=["closed", "closed", "open", "open"])
    b = scored_frame([0, 0, 1, 1], answer_types=["closed", "closed", "open", "open"])
    assert paired_bootstrap(a, b, answer_type="closed")["delta"] == pytest.approx(100.0)
    assert paired_bootstrap(a, b, answer_type="open")["delta"] == pytest.approx(-100.0)
    with pytest.raises(DataError, match="different questions"):
        paired_bootstrap(a, b.iloc[:3])
    with pytest.raises(DataError, match="duplicate"):
        paired_bootstrap(pd.concat([a, a]), b)


# --- aggregating seeds --------------------------------------------------------------


def test_aggregate_by_hand():
    seeds = [
        {"closed_acc": 70.0, "open_acc": 50.0},
        {"closed_acc": 72.0, "open_acc": 50.0},
        {"closed_acc": 74.0, "open_acc": 56.0},
    ]
    out = aggregate_seeds(seeds).iloc[0]
    assert out["closed_acc_mean"] == pytest.approx(72.0)
    assert out["closed_acc_std"] == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    assert out["open_acc_mean"] == pytest.approx(52.0)
    assert out["open_acc_std"] == pytest.approx(math.sqrt(12.0))  # sqrt((4 + 4 + 16) / 2)
    assert out["n_seeds"] == 3


def test_aggregate_one_seed_and_groups():
    one = aggregate_seeds([{"overall_acc": 61.0}]).iloc[0]
    assert one["overall_acc_mean"] == 61.0
    assert math.isnan(one["overall_acc_std"])
    tables = [
        pd.DataFrame({"question_type": ["organ", "plane"], "overall_acc": [60.0, 80.0]}),
        pd.DataFrame({"question_type": ["plane", "organ"], "overall_acc": [90.0, 70.0]}),
    ]
    grouped = aggregate_seeds(tables).set_index("question_type")
    assert grouped.loc["organ", "overall_acc_mean"] == pytest.approx(65.0)
    assert grouped.loc["plane", "overall_acc_mean"] == pytest.approx(85.0)
    assert grouped.loc["plane", "overall_acc_std"] == pytest.approx(math.sqrt(50.0))
    with pytest.raises(DataError):
        aggregate_seeds([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(DataError):
        aggregate_seeds([])


def test_format_mean_std():
    assert format_mean_std(71.234, 0.84) == "71.2 ± 0.8"
    assert format_mean_std(71.25, 0.5, digits=2) == "71.25 ± 0.50"
    assert format_mean_std(71.2, float("nan")) == "71.2"
    assert format_mean_std(float("nan"), 1.0) == "n/a"


def test_results_table_labels_sources():
    measured = aggregate_seeds(
        [
            {"closed_acc": 80.0, "open_acc": 60.0, "overall_acc": 72.0},
            {"closed_acc": 82.0, "open_acc": 62.0, "overall_acc": 74.0},
        ]
    )
    table = results_table(
        {
            "MISS (3 seeds)": measured,
            "prior": pd.DataFrame(
                [{"dataset": "vqa-rad", "closed_acc": 60.0, "overall_acc": 50.0}]
            ),
            "MISS": reported_row("MISS (paper)", "vqa-rad", 83.5, 71.8, 78.9, note="Table 2"),
        }
    ).set_index("label")
    assert table.loc["MISS (3 seeds)", "source"] == MEASURED
    assert table.loc["MISS (3 seeds)", "closed"] == pytest.approx(81.0)
    assert table.loc["MISS (3 seeds)", "closed_std"] == pytest.approx(math.sqrt(2.0))
    assert table.loc["MISS (3 seeds)", "n_seeds"] == 2
    assert table.loc["prior", "source"] == MEASURED
    assert math.isnan(table.loc["prior", "open"])
    assert table.loc["MISS", "source"] == REPORTED
    assert table.loc["MISS", "paper"] == "MISS (paper)"
    assert table.loc["MISS", "note"] == "Table 2"
    assert table.loc["MISS", "overall"] == pytest.approx(78.9)


def test_reported_row_checks():
    row = reported_row("X", "slake", 80.0, None, 75.0)
    assert row.loc[0, "source"] == REPORTED
    assert math.isnan(row.loc[0, "open_acc"])
    with pytest.raises(ConfigError):
        reported_row("X", "slake", 0.8, 120.0, 0.7)
    with pytest.raises(DataError, match="source"):
        results_table({"bad": pd.DataFrame([{"closed_acc": 1.0, "source": "guess"}])})
