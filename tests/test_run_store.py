"""Stored main runs: one row per (run, test question), read back unchanged; clear errors."""

from types import SimpleNamespace

import pandas as pd
import pytest

from medvqa_lib.errors import DataError
from medvqa_lib.experiments.run_store import load_runs, runs_frame, save_runs


def _run(seed: int, exact: list[bool]) -> SimpleNamespace:
    scored = pd.DataFrame({"qid": ["q1", "q2", "q3"], "image_id": ["i1", "i1", "i2"],
                           "answer_type": ["closed", "open", "open"], "prediction": ["yes", "lung", "ct"],
                           "exact": exact, "recall": [float(x) for x in exact]})
    train = SimpleNamespace(time_s=12.5 + seed, samples_per_s=40.0, n_params=1000, n_trainable=10,
                            peak_memory_mb=None, device="cpu", best_epoch=2)
    return SimpleNamespace(label="M", dataset="slake", seed=seed, scored=scored, train=train)


def test_runs_round_trip_with_question_fields_and_costs(tmp_path):
    samples = {q: SimpleNamespace(question_type=t, organ=o, question=f"{q}?", answer="a")
               for q, t, o in (("q1", "presence", "lung"), ("q2", "organ", "lung"), ("q3", "modality", "brain"))}
    path = save_runs("M2I2", [_run(0, [True, False, True]), _run(1, [False, False, True])],
                     tmp_path / "main_runs.csv", samples)
    back = load_runs(path)
    assert len(back) == 6 and set(back["seed"]) == {0, 1} and set(back["method"]) == {"M2I2"}
    assert back.groupby("seed")["exact"].sum().to_dict() == {0: 2, 1: 1}
    assert back.loc[back["qid"] == "q3", "organ"].tolist() == ["brain", "brain"]
    assert back.loc[back["seed"] == 1, "train_time_s"].iloc[0] == 13.5
    assert back["exact"].dtype == bool and back["qid"].tolist()[:3] == ["q1", "q2", "q3"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left


def test_no_runs_and_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no runs of X"):
        runs_frame("X", [])
    with pytest.raises(DataError, match="run the chapter"):
        load_runs(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="lacks the columns"):
        load_runs(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="not a stored-runs CSV"):
        load_runs(empty)
