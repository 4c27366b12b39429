"""The comparison chapter's helpers on hand-made stored runs: seed statistics, paired bootstrap
between methods on shared questions, error analysis, loading errors, plan, and throughput."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from medvqa_lib.config import get_profile
from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.experiments.run_store import save_runs
from medvqa_lib.papers.comparison import config as cc
from medvqa_lib.papers.comparison import study as cs


def _rows(method: str, dataset: str, seed: int, correct: dict[str, bool], types: dict[str, str] | None = None,
          organ: str = "chest") -> list[dict]:
    return [{"method": method, "label": method, "dataset": dataset, "seed": seed, "train_time_s": 10.0 + seed,
             "train_samples_per_s": 5.0, "n_params": 2_000_000, "n_trainable": 1_000_000, "peak_memory_mb": None,
             "device": "cpu", "best_epoch": 1, "qid": q, "image_id": f"img-{q}",
             "answer_type": (types or {}).get(q, "closed"), "question_type": "presence" if q < "q5" else "size",
             "organ": organ, "question": f"question {q}?", "answer": "yes", "prediction": "yes" if ok else "no",
             "exact": ok, "recall": float(ok)} for q, ok in correct.items()]


QIDS = [f"q{i}" for i in range(10)]


@pytest.fixture
def runs() -> pd.DataFrame:
    """A: right on q0-q5 in seed 0, q0-q7 in seed 1; B: right on q0-q3 (both seeds); C: only
    q0-q4 answered (a capped test set), right on q0."""
    rows = []
    rows += _rows("A", "ds", 0, {q: i < 6 for i, q in enumerate(QIDS)})
    rows += _rows("A", "ds", 1, {q: i < 8 for i, q in enumerate(QIDS)})
    rows += _rows("B", "ds", 0, {q: i < 4 for i, q in enumerate(QIDS)})
    rows += _rows("B", "ds", 1, {q: i < 4 for i, q in enumerate(QIDS)})
    rows += _rows("C", "ds", 0, {q: i == 0 for i, q in enumerate(QIDS[:5])})
    return pd.DataFrame(rows)


def test_main_table_mean_and_std_over_seeds(runs):
    table = cs.main_table(runs, {("ds", "all"): set(QIDS)})
    a = table.loc[("ds", "all", "A")]
    assert a["overall"] == pytest.approx(70.0)  # (60 + 80) / 2
    assert a["overall_std"] == pytest.approx(math.sqrt(((60 - 70) ** 2 + (80 - 70) ** 2) / 1))
    b = table.loc[("ds", "all", "B")]
    assert b["overall"] == pytest.approx(40.0) and b["overall_std"] == pytest.approx(0.0)
    c = table.loc[("ds", "all", "C")]
    assert c["n"] == 5 and c["seeds"] == 1 and math.isnan(c["overall_std"])
    assert math.isnan(a["open"])  # no open questions
    sub = cs.main_table(runs, {("ds", "first"): {"q0", "q1"}})
    assert sub.loc[("ds", "first", "B"), "overall"] == pytest.approx(100.0)


def test_readable_table_and_reported_difference(runs):
    table = cs.main_table(runs, {("ds", "all"): set(QIDS)})
    text = cs.readable_table(table)
    assert text.loc[("ds", "all", "A"), "overall"] == "70.0 ± 14.1"
    assert text.loc[("ds", "all", "C"), "overall"] == "20.0"
    reported = pd.DataFrame([{"method": "A", "dataset": "ds", "test set": "all", "closed": 75.0, "open": None,
                              "overall": 65.0, "source": "paper"},
                             {"method": "B", "dataset": "other", "test set": "all", "closed": 1.0, "open": 1.0,
                              "overall": 1.0, "source": "paper"}])
    vs = cs.reported_table(table, reported)
    assert vs.loc[("A", "ds", "all"), "overall Δ"] == pytest.approx(5.0)
    assert vs.loc[("A", "ds", "all"), "closed Δ"] == pytest.approx(-5.0)
    assert math.isnan(vs.loc[("B", "other", "all"), "overall measured"])


def test_builtin_reported_numbers_are_labelled():
    assert set(cs.REPORTED["method"]) == set(cc.METHODS)
    assert cs.REPORTED["source"].str.contains("paper").all()
    m2i2 = cs.REPORTED[(cs.REPORTED["method"] == "M2I2") & (cs.REPORTED["test set"] == "free")]
    assert m2i2["overall"].tolist() == [73.7]


def test_bootstrap_sign_when_a_is_right_wherever_b_is_wrong():
    qids = [f"q{i}" for i in range(40)]
    rows = _rows("A", "ds", 0, dict.fromkeys(qids, True)) + _rows("B", "ds", 0, {q: i < 20 for i, q in
                                                                                   enumerate(qids)})
    table = cs.pairwise_bootstrap(pd.DataFrame(rows), "ds", n_resamples=300, answer_types=(None,))
    r = table.iloc[0]
    assert (r["A"], r["B"], r["n"]) == ("A", "B", 40)
    assert r["A − B (pp)"] == pytest.approx(50.0)
    assert 0 < r["low"] <= 50 <= r["high"]
    assert r["verdict"] == "A better"
    flipped = cs.pairwise_bootstrap(pd.DataFrame(rows), "ds", methods=["B", "A"], n_resamples=300,
                                    answer_types=(None,)).iloc[0]
    assert flipped["A − B (pp)"] == pytest.approx(-50.0) and flipped["verdict"] == "A better"


def test_bootstrap_intersects_questions_and_reports_n(runs):
    table = cs.pairwise_bootstrap(runs, "ds", n_resamples=200, answer_types=(None,)).set_index(["A", "B"])
    assert table.loc[("A", "B"), "n"] == 10
    assert table.loc[("A", "C"), "n"] == 5 and table.loc[("B", "C"), "n"] == 5
    # on q0-q4: A's seed mean is 1 everywhere, C is right on q0 only → +80 pp
    assert table.loc[("A", "C"), "A − B (pp)"] == pytest.approx(80.0)
    assert cs.pairwise_bootstrap(runs, "ds", qids={"q0", "q1", "q2"}, n_resamples=50,
                                 answer_types=(None,)).set_index(["A", "B"]).loc[("A", "B"), "n"] == 3


def test_equal_methods_are_not_told_apart():
    qids = [f"q{i}" for i in range(30)]
    same = {q: i % 2 == 0 for i, q in enumerate(qids)}
    table = cs.pairwise_bootstrap(pd.DataFrame(_rows("A", "ds", 0, same) + _rows("B", "ds", 0, same)), "ds",
                                  n_resamples=100, answer_types=(None,))
    assert table.iloc[0]["verdict"] == "no difference shown"


def test_question_means_average_seeds(runs):
    means = cs.question_means(runs, "A", "ds").set_index("qid")["exact"]
    assert means["q0"] == 1.0 and means["q6"] == 0.5 and means["q9"] == 0.0
    with pytest.raises(DataError, match="no stored runs"):
        cs.question_means(runs, "A", "nowhere")


def test_hardest_questions_ranking(runs):
    hard = cs.hardest_questions(runs, k=3)
    # q8, q9: wrong for A (0/2 seeds), B; not answered by C → 2 wrong; q4: wrong for B and C,
    # A right → 2 wrong but mean accuracy 1/3; q8/q9 have mean 0 → first
    assert hard["qid"].tolist()[:2] == ["q8", "q9"]
    assert hard.loc[0, "methods wrong"] == 2 and hard.loc[0, "methods answering"] == 2
    assert hard.loc[0, "C"] == "—"
    assert hard.loc[0, "A"].endswith("✗")
    assert len(cs.hardest_questions(runs, k=100)) == 10
    with pytest.raises(KeyError, match="unknown method"):
        cs.hardest_questions(runs, methods=["A", "Z"])


def test_group_accuracy_matrix(runs):
    table = cs.group_accuracy(runs, "question_type")
    assert table.loc[("ds", "presence"), "B"] == pytest.approx(80.0)  # q0-q4: right on q0-q3
    assert table.loc[("ds", "size"), "B"] == pytest.approx(0.0)
    assert table.loc[("ds", "size"), "A"] == pytest.approx(100 * (1 + 0.5 + 0.5 + 0 + 0) / 5)
    assert math.isnan(table.loc[("ds", "size"), "C"])
    assert table.loc[("ds", "presence"), "n"] == 5
    assert cs.group_accuracy(runs, "question_type", min_n=6).empty
    with pytest.raises(DataError, match="no column"):
        cs.group_accuracy(runs, "colour")


def test_cost_table(runs):
    cost = cs.cost_table(runs)
    assert cost.loc[("A", "ds"), "train time (s)"] == pytest.approx(10.5)
    assert cost.loc[("A", "ds"), "params (M)"] == 2.0 and cost.loc[("A", "ds"), "device"] == "cpu"
    speed = pd.DataFrame([{"method": "A", "train_samples_per_s": 12.0, "answers_per_s": 30.0}])
    assert cs.cost_table(runs, speed).loc[("A", "ds"), "benchmark answers/s"] == 30.0


class _Run:
    def __init__(self, method: str, frame: pd.DataFrame) -> None:
        self.label, self.dataset, self.seed = method, "ds", 0
        self.scored = frame


def test_load_method_runs_errors(tmp_path, runs):
    with pytest.raises(DataError, match="reproduce --only"):
        cs.load_method_runs(tmp_path, ["MISS"])
    with pytest.raises(KeyError, match="unknown method"):
        cs.runs_path(tmp_path, "BLIP")
    bad = cs.runs_path(tmp_path, "MISS")
    bad.parent.mkdir(parents=True)
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="lacks the columns"):
        cs.load_method_runs(tmp_path, ["MISS"])
    scored = runs[runs["method"] == "B"].drop(columns=["method", "label", "dataset", "seed"])
    save_runs("CMDPI", [_Run("CMDPI", scored)], cs.runs_path(tmp_path, "M2I2"))
    with pytest.raises(DataError, match="expected only 'M2I2'"):
        cs.load_method_runs(tmp_path, ["M2I2"])


def test_load_method_runs_calls_the_runner_for_a_missing_file(tmp_path, runs):
    scored = runs[(runs["method"] == "B") & (runs["seed"] == 0)].drop(columns=["method", "label", "dataset", "seed"])
    called = []

    def runner(method: str) -> None:
        called.append(method)
        save_runs(method, [_Run(method, scored)], cs.runs_path(tmp_path, method))

    loaded = cs.load_method_runs(tmp_path, ["CMDPI"], runner=runner)
    assert called == ["CMDPI"] and len(loaded) == 10 and set(loaded["method"]) == {"CMDPI"}
    cs.load_method_runs(tmp_path, ["CMDPI"], runner=runner)
    assert called == ["CMDPI"]  # present now: not run again


def test_plan_checks_its_knobs():
    plan = cc.study_plan(get_profile("smoke"))
    assert plan.methods == cc.METHODS and len(plan.efficiency_fractions) >= 3
    assert cc.study_plan(get_profile("cpu"), efficiency_train=10).efficiency_train == 10
    with pytest.raises(KeyError, match="unknown method"):
        cc.study_plan(get_profile("smoke"), methods=["MISS", "BLIP"])
    with pytest.raises(ConfigError, match="unknown comparison parameter.*valid ones are.*efficiency_train"):
        cc.study_plan(get_profile("smoke"), epochs=3)
    assert cc.study_plan("cpu", hardest_k=None).hardest_k == cc.PLANS["cpu"]["hardest_k"]  # None: the plan's
    with pytest.raises(ConfigError, match="efficiency_fractions"):
        cc.study_plan(get_profile("smoke"), efficiency_fractions=[0.0, 1.0])


def test_efficiency_estimate_fits_the_cpu_budget():
    from medvqa_lib.papers.comparison.efficiency import estimate_seconds

    est = estimate_seconds(cc.study_plan(get_profile("cpu")))
    assert set(est) == {*cc.METHODS, "total"} and 0 < est["total"] <= 15 * 60


def test_throughput_on_the_smoke_model():
    from medvqa_lib.papers.comparison.throughput import method_throughput

    r = method_throughput("M2I2", "smoke", steps=1, batch_size=4, answers=4, count_flops=True)
    assert r.train_samples_per_s > 0 and r.answers_per_s > 0
    assert r.n_params >= r.n_trainable > 0 and r.device in ("cpu", "cuda", "mps")
    assert r.train_tflops is not None and r.train_tflops > 0
    with pytest.raises(KeyError, match="unknown method"):
        method_throughput("BLIP", "smoke")


def test_benchmark_records_keep_the_latest_row_per_method_and_device(tmp_path):
    from medvqa_lib.errors import DataError
    from medvqa_lib.papers.comparison.throughput import benchmark_records

    assert benchmark_records("cpu", tmp_path) is None
    (tmp_path / "method_throughput_cpu.csv").write_text(
        "date,method,device,train_samples_per_s\n2026-01-02,MISS,cpu,5.0\n2026-01-01,MISS,cpu,4.0\n"
        "2026-01-01,MISS,cuda,90.0\n2026-01-03,CMDPI,cpu,7.0\n")
    got = benchmark_records("cpu", tmp_path).set_index(["method", "device"])["train_samples_per_s"].to_dict()
    assert got == {("MISS", "cpu"): 5.0, ("MISS", "cuda"): 90.0, ("CMDPI", "cpu"): 7.0}
    (tmp_path / "method_throughput_gpu.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a method_throughput CSV"):
        benchmark_records("gpu", tmp_path)
