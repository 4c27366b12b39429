# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The four methods side by side
#
# The previous chapters each reproduced one paper: MISS {cite}`chen2024miss`, M2I2
# {cite}`li2023m2i2`, CMDPI {cite}`he2025cmdpi` and PaliGemma with LoRA {cite}`sun2025paligemmarad`.
# Each paper reports its numbers under its own conditions — its own splits, answer scoring and,
# sometimes, checkpoint selection. This chapter puts the methods on one footing: the same test
# questions, the same answer normalisation, the epoch chosen on validation data only, every
# accuracy a mean ± standard deviation over the seeds each chapter ran, next to the question-only
# prior of the {doc}`data chapter <00_data_and_evaluation>`.
#
# Nothing is re-trained for the main comparison: the chapter reads the runs the paper chapters
# stored (`main_runs.csv` in each chapter's results folder), so every number below is about the
# very predictions those chapters made. It then asks four questions of them: which differences
# the test data can support (paired bootstrap), what each method costs, how accuracy grows with
# pre-training data (measured here, with short runs), and which questions defeat most methods.

# %% tags=["hide-cell"]
# On Colab: install the book's library (skipped everywhere else).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "medvqa-lib[offline] @ git+https://github.com/medvqa-book/medvqa-book"],
                   check=True)

# %% tags=["parameters", "hide-cell"]
# Parameters (papermill overrides these). None keeps the plan's value
# (medvqa_lib.papers.comparison.study, PLANS); `overrides` sets any other field of the plan,
# e.g. {"efficiency_pairs": 400, "efficiency_train": 800, "throughput_steps": 5}.
profile = "gpu"  # "smoke" (CI), "cpu" (2-core laptop: ~15 min of its own, plus missing chapters), "gpu"
data_dir = None  # folder with vqa_rad/ and slake/; None → $MEDVQA_DATA_DIR
seed = 0
methods = None  # e.g. ["MISS", "CMDPI"] (None: all four)
run_missing = None  # execute a paper chapter whose stored runs are missing (None: the plan's, True)
hardest_k = None  # questions in the error-analysis list (20)
min_group = None  # smallest question type / organ group in the heat map
measure_efficiency = True  # the data-efficiency runs (the longest part of the chapter)
efficiency_fractions = None  # shares of each pre-training corpus, e.g. [0.0, 0.5, 1.0]
efficiency_train = None  # training questions of each data-efficiency run
bootstrap_resamples = None
overrides = {}  # any other field of the comparison plan

# %%
import time

from medvqa_lib.notebook import setup

chapter_start = time.perf_counter()
ctx = setup(profile, seed, data_dir=data_dir, chapter="comparison", bootstrap_resamples=bootstrap_resamples)
prof = ctx.profile

# %%
import pandas as pd
from IPython.display import Markdown, display

from medvqa_lib import plots
from medvqa_lib.data.suite import chapter_suite
from medvqa_lib.io import atomic_write_text
from medvqa_lib.papers.comparison import study as cs
from medvqa_lib.papers.comparison.config import study_plan

plots.use_book_style()
out = ctx.out_dir
plan = study_plan(prof, methods=methods, run_missing=run_missing, hardest_k=hardest_k, min_group=min_group,
                  efficiency_fractions=efficiency_fractions, efficiency_train=efficiency_train,
                  bootstrap_resamples=bootstrap_resamples, **overrides)
suite = chapter_suite(ctx)  # the real data when given, else the synthetic radiology the chapters used
print("VQA datasets:", ", ".join(f"{k} ({len(v['test'])} test questions)" for k, v in suite.items()))

# %% [markdown]
# ## The stored runs
#
# Each paper chapter wrote one row per (run, test question): the method, dataset and seed, the
# prediction, whether it matches the reference after normalisation (`exact`) and the share of
# reference tokens it contains (`recall`), plus the run's cost. When a chapter's file is missing
# (this chapter run on its own), that chapter is executed first at the same profile and data —
# as long as the chapter takes. The prior is fitted here on each training split.

# %%
results_root = out.parent
notebooks = ctx.book_root / "notebooks" if ctx.book_root else None
runner = ((lambda m: cs.run_chapter(m, prof.name, ctx.data_root, results_root, notebooks))
          if plan.run_missing and notebooks else None)
stored = cs.load_method_runs(results_root, plan.methods, runner=runner)
runs = pd.concat([cs.prior_runs(suite), stored], ignore_index=True)
overview = (stored.groupby(["method", "dataset"], sort=False)
            .agg(seeds=("seed", "nunique"), questions=("qid", "nunique"), device=("device", "first")))
atomic_write_text(out / "stored_runs.csv", overview.to_csv())
overview

# %% [markdown]
# PaliGemma's chapter tests a capped number of questions on the small profiles, and the M2I2
# chapter caps its splits on `smoke`; a method's row below counts the questions it answered, and
# every paired comparison uses only the questions both methods answered.

# %% [markdown]
# ## The main table
#
# Closed and open accuracy are exact match after normalisation; *open recall* is the share of
# the reference answer's tokens found in the generated answer (a looser score that favours long
# answers); overall is exact match over all questions. VQA-RAD appears twice, as in the M2I2
# paper: on the free-form test questions ("free") and on all of them, paraphrases included
# ("free+para"). Mean ± standard deviation over the seeds each chapter ran.

# %%
sets = cs.test_sets(suite)
table = cs.main_table(runs, sets)
atomic_write_text(out / "main_table.csv", table.to_csv())
cs.readable_table(table)

# %% [markdown]
# ### Beside the papers' own numbers
#
# Each paper's number for its method, labelled *reported*, next to this book's measurement on
# the same dataset and test set, and the difference (measured − reported, percentage points). A
# reported row whose dataset was not loaded here stays "n/a". The papers differ among
# themselves in how they score open answers (MISS judged them by hand; CMDPI does not say) and
# the book's scale is smaller on the `cpu` profile, so a gap measures the whole setting, not the
# method alone.

# %%
vs_reported = cs.reported_table(table)
atomic_write_text(out / "reported_vs_measured.csv", vs_reported.to_csv())
vs_reported

# %% [markdown]
# ## Which differences does the data support?
#
# For each pair of methods, a paired bootstrap over the test questions both answered: a
# method's score on a question is its exact match averaged over its seeds, the questions are
# resampled with replacement, and the 95 % interval of the difference in accuracy is read from
# the resamples {cite}`efron1993bootstrap`. The verdict names the better method only when the
# whole interval lies on one side of zero; otherwise the data does not show a difference
# either way (which is not evidence that there is none).

# %%
pairs = {}
for (dataset, subset), qids in sets.items():
    pairs[(dataset, subset)] = cs.pairwise_bootstrap(runs, dataset, qids=qids, n_resamples=plan.bootstrap_resamples,
                                                     seed=seed)
pairwise = pd.concat(pairs, names=["dataset", "test set"]).droplevel(-1)
atomic_write_text(out / "pairwise_bootstrap.csv", pairwise.to_csv())
with pd.option_context("display.max_rows", 200):
    display(pairwise[pairwise["questions"] == "all"])

# %% [markdown]
# The same comparisons for closed and open questions separately are in
# `pairwise_bootstrap.csv`. In words:

# %%
lines = []
for (dataset, subset), g in pairwise[pairwise["questions"] == "all"].groupby(level=[0, 1], sort=False):
    shown = []
    for r in g.to_dict(orient="records"):
        winner = r["verdict"].removesuffix(" better")
        if winner in (r["A"], r["B"]):
            loser = r["B"] if winner == r["A"] else r["A"]
            shown.append(f"{winner} > {loser} (+{abs(r['A − B (pp)']):.1f} pp, n={r['n']})")
    lines.append(f"* **{dataset}, {subset}**: " + ("; ".join(shown) if shown else
                                                   "no pair of methods differs beyond the 95 % interval."))
Markdown("\n".join(lines))

# %% [markdown]
# ## Cost
#
# From the stored runs: parameters (total and trainable; MISS, M2I2 and CMDPI count their
# momentum copies in the total), fine-tuning wall time (mean over seeds) and training throughput
# as each chapter measured them, peak GPU memory (none is kept on the CPU) and where the run
# happened. Beside them, a measurement made here: a few optimizer steps of each fine-tuning
# model on one batch (training samples/s) and answering questions as its chapter does (answers
# per second), with the same function that `benchmarks/method_throughput.py` runs; on a GPU it
# also gives the model FLOPs utilisation.

# %%
from medvqa_lib.papers.comparison.throughput import throughput_table

speed = throughput_table(plan.methods, prof, steps=plan.throughput_steps, batch_size=plan.throughput_batch,
                         answers=plan.throughput_answers, on_error="note", seed=seed)
atomic_write_text(out / "method_throughput.csv", speed.to_csv(index=False))
cost = cs.cost_table(stored, speed)
atomic_write_text(out / "cost.csv", cost.to_csv())
display(cost)
speed.round(3)

# %% [markdown]
# The same measurement as `benchmarks/method_throughput.py` last recorded it at this profile (its
# CSV in `benchmarks/results/`; on a GPU it carries the model FLOPs utilisation), where the
# checkout has one:

# %%
from medvqa_lib.papers.comparison.throughput import benchmark_records

recorded = benchmark_records(prof.name, ctx.book_root / "benchmarks" / "results" if ctx.book_root else None)
if recorded is None:
    print(f"no benchmarks/results/method_throughput_{prof.name}.csv here: "
          f"python benchmarks/method_throughput.py --profile {prof.name} writes it")
else:
    display(recorded[[c for c in ("method", "device", "date", "precision", "batch_size", "train_samples_per_s",
                                  "answers_per_s", "peak_memory_mb", "mfu") if c in recorded]].round(3))

# %% [markdown]
# The two training rates measure different things. The stored one is a whole fine-tuning run:
# data loading and validation passes included, and MISS and M2I2 batch several questions per
# image so that each image is encoded once (the chapters' `group_size`). The benchmark times
# the optimizer step alone and encodes every question's image anew. So the stored rate is the lower
# one for CMDPI and PaliGemma, and the higher one where questions share images. Answers
# per second differ by decoding: MISS is timed with beam search (three beams; its chapter uses
# them where validation prefers them to greedy decoding), M2I2
# greedily on the small profiles (beam search on `gpu`), PaliGemma greedily, and CMDPI picks a
# class from its training answers in a single pass.

# %% [markdown]
# ## Data efficiency
#
# The CMDPI paper's Figure 1 places methods by the amount of pre-training data against their
# accuracy, from reported numbers. Here it is measured: each method is pre-trained on a growing
# share of its own chapter's pre-training corpus (0 % = no pre-training), fine-tuned briefly on
# one dataset (SLAKE when it is loaded, else the synthetic set) with capped training questions,
# selected on validation and tested once on the same capped test questions. One seed: the
# runs are short, and a difference of a few points between two shares is within the noise of a
# single run. For PaliGemma the pre-training is the stand-in base model's caption training.

# %%
from medvqa_lib.papers.comparison.efficiency import (
    efficiency_dataset,
    efficiency_figure,
    estimate_seconds,
    run_efficiency,
)

if measure_efficiency:
    print(f"on {efficiency_dataset(suite)}; expected on 2 cores (cpu profile speeds): "
          f"{estimate_seconds(plan)['total'] / 60:.1f} min")
    t0 = time.perf_counter()
    efficiency = run_efficiency(prof, plan, suite, out / "efficiency", seed, ctx.data_root, hub=ctx.hub)
    efficiency_s = time.perf_counter() - t0
    atomic_write_text(out / "data_efficiency.csv", efficiency.to_csv(index=False))
    fig = efficiency_figure(efficiency, title=f"Accuracy vs pre-training data ({efficiency_dataset(suite)}, "
                                              f"{plan.efficiency_test} test questions, one seed)")
    display(efficiency.round(1))

# %% [markdown]
# ## Error analysis
#
# Accuracy per question type and per organ for every method (the prior included): each cell is
# the share of the group's questions the method answers right, averaged over its seeds. Groups
# with fewer than `min_group` questions are left out.

# %%
by_type = cs.group_accuracy(runs, "question_type", min_n=plan.min_group)
by_organ = cs.group_accuracy(runs, "organ", min_n=plan.min_group)
atomic_write_text(out / "accuracy_by_group.csv",
                  pd.concat({"question_type": by_type, "organ": by_organ}, names=["group"]).to_csv())
fig = cs.heatmap_figure({"type": by_type, "organ": by_organ},
                        title="Test accuracy (%) per question type and organ")

# %% [markdown]
# ### The questions most methods get wrong
#
# A method gets a question wrong when its answer is wrong in at least half of its seeds. The
# list ranks test questions by how many of the four methods get them wrong, then by their mean
# accuracy over the methods; each method's answer is its first seed's.

# %%
hardest = cs.hardest_questions(runs, plan.hardest_k, methods=list(plan.methods))
atomic_write_text(out / "hardest_questions.csv", hardest.to_csv(index=False))
by_qid = {str(s.qid): s for splits in suite.values() for s in splits["test"]}
fig = cs.hardest_figure(hardest, by_qid)
with pd.option_context("display.max_colwidth", 60):
    display(hardest.drop(columns=["image_id"], errors="ignore"))

# %% [markdown]
# ## Closing note
#
# The numbers of this run in one place, written from the results above.

# %%
from medvqa_lib.evaluation import format_mean_std

chapter_min = (time.perf_counter() - chapter_start) / 60
lines = [f"**{prof.name} profile**, {', '.join(suite)}{'' if ctx.real else ' (synthetic stand-in)'}; "
         f"whole chapter {chapter_min:.1f} min (reading the stored runs, bootstrap, benchmark"
         + (f", data efficiency {efficiency_s / 60:.1f} min" if measure_efficiency else "") + ")."]
for (dataset, subset), g in table.groupby(level=[0, 1], sort=False):
    cells = [f"{m} {format_mean_std(r['overall'], r['overall_std'])}" for m, r in g.droplevel([0, 1]).iterrows()]
    lines.append(f"* **{dataset}, {subset}** (overall %): " + "; ".join(cells))
ok = speed.dropna(subset=["train_samples_per_s"]) if "train_samples_per_s" in speed else speed.iloc[:0]
lines.append("* **benchmark** (" + (ok["device"].iloc[0] if len(ok) else "n/a") + "): " + "; ".join(
    f"{r['method']} {r['train_samples_per_s']:.1f} samples/s, {r['answers_per_s']:.1f} answers/s"
    for r in ok.to_dict(orient="records")) + ". The same measurement at each profile is in "
    "`benchmarks/results/method_throughput_<profile>.csv` (`python benchmarks/method_throughput.py`).")
Markdown("\n".join(lines))

# %% [markdown]
# ## What this comparison can and cannot say
#
# * **Same questions, not the same budget.** The methods share splits, normalisation and
#   validation-only selection, but each chapter sizes its own models and schedules for the
#   profile; on `cpu` they are small and short. The table ranks these runs, not the methods at
#   the papers' scale.
# * **Answer form.** CMDPI classifies over the training answers; MISS, M2I2 and PaliGemma
#   generate free text. Exact match after normalisation is the one rule for all, and it is
#   harsher on generated answers; open recall shows how much of the reference a generated answer
#   contains.
# * **Seeds.** The standard deviations are over the seeds each chapter ran: two on `cpu` (one
#   for PaliGemma's SLAKE stage, which the curriculum trains once), three on `gpu`; the `seeds`
#   parameter of each chapter raises them. The paired bootstrap is over test questions, with a
#   method's seeds averaged per question. Neither captures the variation of pre-training, which each chapter ran once.
# * **Data efficiency** runs are short and single-seed; they show the direction of the effect
#   of pre-training data at this scale, not its size at the papers'.
