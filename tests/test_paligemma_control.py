"""The adapter control table: accuracies and paired intervals on hand-made answers."""

import pandas as pd

from medvqa_lib.papers.paligemma.pipeline import adapter_control


def _scored(exact_closed: list[float], exact_open: list[float]) -> pd.DataFrame:
    n_c, n_o = len(exact_closed), len(exact_open)
    return pd.DataFrame({"qid": [f"c{i}" for i in range(n_c)] + [f"o{i}" for i in range(n_o)],
                         "answer_type": ["closed"] * n_c + ["open"] * n_o,
                         "exact": exact_closed + exact_open})


def test_full_beats_prior_and_lora_only_where_it_answers_more():
    full = _scored([1, 1, 1, 1], [1, 1, 0, 0])
    lora = _scored([1, 1, 0, 0], [1, 1, 0, 0])  # a mean over seeds may be fractional too
    prior = _scored([1, 0, 0, 0], [0.0, 0.0, 0.0, 0.0])
    table = adapter_control(full, lora, prior, n_resamples=200, seed=0)
    assert list(table.index) == ["closed", "open"] and table["n"].tolist() == [4, 4]
    assert table.loc["closed", ["full fine-tuning (%)", "LoRA (%)", "prior (%)"]].tolist() == [100.0, 50.0, 25.0]
    assert table.loc["closed", "full − prior (pp)"] == 75.0 and table.loc["closed", "full − LoRA (pp)"] == 50.0
    # open: full and LoRA answer exactly the same questions: the difference and its interval are 0
    assert table.loc["open", "full − LoRA (pp)"] == 0.0 and table.loc["open", "full − LoRA 95% CI"] == "[0.0, 0.0]"
    assert table.loc["open", "full − prior (pp)"] == 50.0


def test_answer_types_without_questions_are_left_out():
    closed_only = _scored([1, 0], [])
    table = adapter_control(closed_only, closed_only, closed_only, n_resamples=50)
    assert list(table.index) == ["closed"] and table.loc["closed", "full − prior (pp)"] == 0.0
