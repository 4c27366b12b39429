# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MISS: a joint text–multimodal encoder, TransCap captions and generative answers
#
# MISS {cite}`chen2024miss` treats medical VQA as *generation*: the model writes its answer
# token by token instead of picking one from a list of training answers. It changes the
# BLIP/ALBEF recipe {cite}`li2022blip,li2021albef` in two ways.
#
# 1. **One encoder for text and image–text.** The *Joint Text-Multimodal* (JTM) encoder is a
#    single BERT stack with cross-attention to the image in every layer. With cross-attention
#    switched off it is a text encoder (for image–text contrast); with it on, a multimodal
#    encoder (for image–text matching and for encoding the question).
# 2. **TransCap.** Image–text pairs are scarce in medicine, while images with *labels* (organ,
#    lesion, class, boxes) are not. TransCap turns each labelled image into an attribute
#    dictionary, asks a language model for several phrasings of each attribute, and samples a new
#    caption from the dictionary every time the image is seen.
#
# This chapter builds the model from the library (`medvqa_lib.papers.miss`: the model in
# `model.py`, its objectives in `losses.py`, every profile-dependent size in `config.py`), pre-trains it with
# its three objectives, fine-tunes it on VQA-RAD and SLAKE (or the built-in synthetic data), and
# regenerates the paper's Tables 1–3 and Figure 5, next to the question-only prior of the
# {doc}`data chapter <00_data_and_evaluation>`. Every number below comes from this run; the
# paper's numbers appear beside ours, labelled *reported*.

# %% tags=["hide-cell"]
# On Colab: install the book's library (skipped everywhere else).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "medvqa-lib[offline] @ git+https://github.com/medvqa-book/medvqa-book"],
                   check=True)

# %% tags=["parameters", "hide-cell"]
# Parameters (papermill overrides these). None keeps the plan's value for the profile
# (medvqa_lib.papers.miss.config.PLANS, applied by study_plan).
profile = "gpu"  # "smoke" (CI), "cpu" (laptop, ~20 min), "gpu" (the paper's schedule)
data_dir = None  # folder with vqa_rad/ and slake/ (and roco/); None → $MEDVQA_DATA_DIR
seed = 0
seeds = None  # fine-tuning seeds of Tables 1-2, e.g. [0, 1, 2]
image_size = None  # pre-training image size (the paper: 224; fine-tuning 480 on gpu)
decoder_objective = "mlm"  # "mlm": the paper's Eq. 5; "lm": causal LM, as the public code
pretrain_epochs = None
finetune_epochs = None  # dict per dataset, e.g. {"vqa-rad": 3, "slake": 2}
finetune_lr = None
pairs = None  # image-caption pairs in the pre-training corpus
transcap_fractions = None  # shares of the TransCap pool, increasing, e.g. [0.33, 0.67, 1.0]
caption_backend = "rule"  # "rule" (offline), "hf:<model>", "openai:<model>@<url>"
num_beams = 3  # the paper's code: beam search, 3 beams, at most 10 new tokens
untie_decoder = None  # True: a separate answer decoder for VQA, as the public code
run_ablations = True
bootstrap_resamples = None
# anything else of the study, e.g. {"model": {"vision_depth": 4, "text_depth": 3},
# "pretrain": {"lr": 5e-5}, "finetune": {"batch_size": 32, "max_new_tokens": 10}, "ablation_epochs": 1}
overrides = {}

# %%
from medvqa_lib.notebook import setup

ctx = setup(profile, seed, data_dir=data_dir, chapter="miss", bootstrap_resamples=bootstrap_resamples)

# %%
import json

import pandas as pd
from IPython.display import display

from medvqa_lib import plots
from medvqa_lib.data.suite import chapter_suite
from medvqa_lib.io import atomic_write_text
from medvqa_lib.notebook import show_code
from medvqa_lib.papers.miss import losses
from medvqa_lib.papers.miss.config import study_plan
from medvqa_lib.text import select_text_backbone

plots.use_book_style()
study = study_plan(
    ctx.profile, ctx.out_dir / "runs", overrides,
    model=dict(image_size=image_size, decoder_objective=decoder_objective),
    pretrain=dict(epochs=pretrain_epochs), finetune=dict(lr=finetune_lr, num_beams=num_beams),
    seeds=seeds, finetune_epochs=finetune_epochs, pairs=pairs, transcap_fractions=transcap_fractions,
    untie_decoder=untie_decoder)
backbone = select_text_backbone(study.model.text_backbone)
tokenizer = backbone.tokenizer

suite = chapter_suite(ctx)
ablation_set = study.ablation_dataset if study.ablation_dataset in suite else next(iter(suite))
print("VQA datasets:", ", ".join(f"{k} ({len(v['train'])} train / {len(v['val'])} val / "
                                 f"{len(v['test'])} test)" for k, v in suite.items()))
print("ablations on:", ablation_set)

# %% [markdown]
# ## The model
#
# A ViT encodes the image $I$ into patch states $V$ with a leading [CLS] state $v_{cls}$. The
# JTM encoder reads text $T$; in **text mode** it skips cross-attention and gives $t_{cls}$, in
# **multimodal mode** every layer runs self-attention → cross-attention to $V$ → feed-forward.
# The **decoder** is the same stack with causal self-attention; as in BLIP it shares every
# weight with the encoder except self-attention. In each multimodal layer the text states
# $W$ query the image states through cross-attention (Eq. 1 of the paper),
#
# $$\mathrm{CrossAttention}(Q, K, V) = \mathrm{softmax}\Big(\frac{QK^\top}{\sqrt d} + B\Big)V,
# \qquad Q = W W_q,\; K = V_{img} W_k,\; V = V_{img} W_v,$$
#
# with $B$ the additive mask ($-\infty$ on padding). The library's attention block (shared by
# every model of the book) computes it; `self.q` and `self.kv` are the projections:

# %%
from medvqa_lib.nn import Attention

show_code(Attention.forward)

# %% [markdown]
# For VQA (Sec. 3.5) the question is encoded in multimodal mode and the decoder generates the
# answer while attending to the question's states; fine-tuning minimises the answer's
# language-modelling loss $\mathcal{L}_{LM}$:
#
# $$Q_{enc} = \mathrm{JTM}(Q, V), \qquad p(A\mid Q, I) = \prod_{t} p\big(a_t \mid a_{<t}, Q_{enc}\big),
# \qquad \mathcal{L}_{LM} = -\log p(A \mid Q, I).$$
#
# The baseline *w/o JTM* is ALBEF's layout: the first half of the layers is a text encoder, the
# second half (with cross-attention) a multimodal encoder.

# %%
from medvqa_lib.papers.miss.model import MISS, build_miss

show_code(MISS.encode_question, MISS.forward_vqa, losses.lm_loss)

# %% [markdown]
# The model at this profile's size:

# %%
probe = build_miss(study.model, backbone)
n_params = sum(p.numel() for p in probe.parameters())
n_train = sum(p.numel() for n, p in probe.named_parameters() if p.requires_grad and not n.endswith("_m"))
pd.DataFrame({
    "image encoder": f"ViT, {study.model.vision_depth} layers × {study.model.vision_width}, "
                     f"patch {study.model.patch_size}, {study.model.image_size} px",
    "JTM encoder / decoder": f"{probe.depth} layers from {study.model.text_backbone} "
                             f"(cross-attention fresh); decoder shares all but self-attention",
    "pre-training decoder loss": study.model.decoder_objective,
    "parameters": f"{n_params / 1e6:.1f} M (incl. momentum copies)",
}, index=["MISS"]).T

# %% [markdown]
# ## Pre-training objectives
#
# The three losses below are the functions of `medvqa_lib.papers.miss.losses` (and the shared
# `medvqa_lib.nn.itc_loss`), shown under their equations; `MISS.forward_pretrain` calls them and
# sums them.
#
# **Image–text contrast (ITC, Eqs. 2–3).** With momentum encoders (an exponential moving average
# of the online weights, momentum 0.995) whose features also fill queues of earlier batches, the
# similarity $s(I,T) = g_v(v_{cls})^\top g'_t(t'_{cls})/\tau$ gives softmax-normalised
# image→text and text→image probabilities $p^{i2t}, p^{t2i}$ over the batch and the queue, and
#
# $$\mathcal{L}_{itc} = \tfrac12\, \mathbb{E}\big[H(y^{i2t}, p^{i2t}) + H(y^{t2i}, p^{t2i})\big],$$
#
# where $y$ is one-hot on the paired item (captions of the same image count as positives).
# The temperature $\tau$ is learned (initial 0.07).

# %%
from medvqa_lib.nn import itc_loss

show_code(itc_loss, losses.itc_targets)

# %% [markdown]
# **Image–text matching (ITM, Eq. 4).** A binary head on the multimodal [ENC] state decides
# whether image and text belong together,
#
# $$\mathcal{L}_{itm} = \mathbb{E}\, H(L, P_{IT});$$
#
# each image gets a *hard* negative text and each text a hard negative image, drawn in the batch
# with probability growing with their ITC similarity (never the positive itself).

# %%
show_code(losses.itm_loss)

# %% [markdown]
# **Masked language modelling (Eq. 5).** 15 % of the caption's tokens are selected; 80 % of those
# become [MASK], 10 % a random token, 10 % stay. The decoder, attending to the image, predicts
# the selected tokens:
#
# $$\mathcal{L}_{mlm} = -\,\mathbb{E}\sum_{t \in \mathcal{M}} \log p\big(w_t \mid \tilde T, V\big).$$
#
# The total loss is $\mathcal{L}_{itc} + \mathcal{L}_{itm} + \mathcal{L}_{mlm}$ (with
# `decoder_objective="lm"`, $\mathcal{L}_{LM}$ of the unmasked caption replaces
# $\mathcal{L}_{mlm}$). Each term is a tested function of the library (`tests/test_miss_losses.py`,
# `tests/test_miss.py`, `tests/test_blocks.py`).

# %%
from medvqa_lib.nn import mask_tokens

show_code(mask_tokens, losses.mlm_loss)

# %% [markdown]
# ## TransCap: captions from labelled images
#
# The pool of labelled single-modality images is SLAKE's own organ and lesion boxes for
# *training* images when SLAKE is given (never a test image), and otherwise the synthetic
# RSNA-like chest X-rays. Each image becomes an attribute dictionary; a caption backend writes
# several phrasings for each attribute value; a checker drops any phrasing or caption that
# contradicts the dictionary. Below, the paper's Figure 3 for this pool.

# %%
from medvqa_lib.experiments.corpus import caption_pairs, subset
from medvqa_lib.papers.miss.pipeline import transcap_pool
from medvqa_lib.transcap import TransCapCaptions, examples_table

pool, pool_source = transcap_pool(ctx.profile, suite if ctx.real else {}, ctx.data_root, ctx.seed)
transcap = TransCapCaptions(pool, backend=caption_backend, seed=ctx.seed)
print(f"TransCap pool: {len(pool)} images from {pool_source}; backend: {caption_backend}")
fig3 = examples_table(pool, k=4, backend=caption_backend, seed=ctx.seed)
atomic_write_text(ctx.out_dir / "transcap_examples.csv", fig3.to_csv(index=False))
with pd.option_context("display.max_colwidth", 200):
    display(fig3)

# %% [markdown]
# Every access re-samples the caption, so each epoch sees new wording of the same facts. What
# the checker refused while building the phrase banks and sampling:

# %%
for i in range(min(len(transcap), 200)):
    transcap[i]
report = transcap.report.table()
atomic_write_text(ctx.out_dir / "transcap_report.csv", report.to_csv(index=False))
print(f"captions dropped by the checker so far: {transcap.report.dropped_total}")
report

# %% [markdown]
# ## Pre-training runs
#
# The paper pre-trains on 38,800 ROCO image–caption pairs and adds TransCap captions in growing
# amounts (Table 3). Here the pairs are ROCO when a `roco/` folder is given (or the Hub on the
# `gpu` profile), else the synthetic generator's captions, a labelled stand-in. Each variant
# below is pre-trained from the same initialisation (MiniLM or BERT text weights, a fresh ViT
# unless pretrained weights are reachable) with the same schedule.

# %%
from medvqa_lib.experiments.generative import CaptionMix, ImageCache
from medvqa_lib.papers.miss.pipeline import pretrain_variant

pairs_data, pairs_source = caption_pairs(ctx.profile, study.pairs, ctx.seed, ctx.data_root, hub=ctx.hub)
cache = ImageCache(study.model.image_size)
fractions = sorted(set(study.transcap_fractions))
variants = {"w/o TransCap": (study.model, 0.0)}
if run_ablations:
    variants.update({f"JTM + TransCap ({f:.0%})": (study.model, f) for f in fractions[:-1]})
variants[f"JTM + TransCap ({fractions[-1]:.0%})"] = (study.model, fractions[-1])
if run_ablations:
    variants["w/o JTM"] = (study.model.replace(jtm=False), fractions[-1])
full_label = f"JTM + TransCap ({fractions[-1]:.0%})"

pretrained, pre_results, corpus_sizes = {}, {}, {}
for label, (config, fraction) in variants.items():
    images = subset(pool, fraction, ctx.seed)
    captions = TransCapCaptions(images, banks=transcap.banks, seed=ctx.seed) if images else []
    corpus = CaptionMix(pairs_data, captions)
    corpus_sizes[label] = {"pairs": len(pairs_data), "TransCap images": len(images),
                           "pre-training images": len(corpus)}
    pretrained[label], pre_results[label] = pretrain_variant(label, config, corpus, tokenizer, cache,
                                                             study.pretrain, backbone, seed=ctx.seed)
    print(f"{label:<26} {len(corpus):>6} pairs · {pre_results[label].cost_line()}")

# %% [markdown]
# Training curves of the three objectives (the full model and its ablations):

# %%
obj = f"loss_{study.model.decoder_objective}"
fig = plots.plot_training_curves({k: r.out_dir for k, r in pre_results.items()},
                                 ["loss_itc", "loss_itm", obj], title="Pre-training",
                                 smooth=3)

# %% [markdown]
# ### Does ITC align images and captions?
#
# Recall@k of image→text and text→image retrieval with the ITC embeddings, on captions of
# images that pre-training never saw (TransCap captions of SLAKE *validation* images, or of
# held-out synthetic X-rays), next to chance.

# %%
from medvqa_lib.papers.miss.pipeline import finetune_factory, retrieval_recall
from medvqa_lib.transcap import build_captions

held_pool, _ = transcap_pool(ctx.profile, suite if ctx.real else {}, ctx.data_root, ctx.seed, split="val")
held_out, _ = build_captions(held_pool[:200], backend=caption_backend, seed=ctx.seed + 1)
recall = {}
for label in ("w/o TransCap", full_label):
    model = build_miss(study.model, backbone)
    model.load_state_dict(pretrained[label])
    recall[label] = retrieval_recall(model, held_out, tokenizer, cache)
fresh = build_miss(study.model, backbone)
recall["not pre-trained"] = retrieval_recall(fresh, held_out, tokenizer, cache)
recall_table = pd.concat(recall, names=["model"])
atomic_write_text(ctx.out_dir / "itc_recall.csv", recall_table.to_csv())
recall_table

# %% [markdown]
# ## Fine-tuning and answering
#
# Fine-tuning minimises the decoder's language-modelling loss on the answer given the question
# and image; the answer is then **generated** (at most 10 tokens, as in the paper's code) —
# there is no answer list anywhere. The epoch is selected on validation accuracy (greedy
# answers). The paper's code answers by beam search with 3 beams; here beam search answers the
# test only where it is at least as accurate as greedy decoding on the same validation
# questions — a small model can prefer longer, wrong answers under beam search, and the choice
# must not be made on the test. The test split is then answered once, by the selected weights,
# and the run's line says which decoding answered it. Each seed starts from the same
# pre-trained weights and changes the fine-tuning order and dropout.

# %%
from medvqa_lib.experiments.run_store import save_runs
from medvqa_lib.experiments.runs import finetune_and_test

make_full = finetune_factory(study.model, pretrained[full_label], backbone, study.untie_decoder)
records = []
for name, splits in suite.items():
    records += finetune_and_test("MISS", make_full, {name: splits}, study.seeds, tokenizer,
                                 study.finetune_settings(name), ctx.out_dir / "runs" / "finetune", cache,
                                 image_control=True)
save_runs("MISS", records, ctx.out_dir / "main_runs.csv", {s.qid: s for sp in suite.values() for s in sp["test"]})

# %% [markdown]
# The decoding each run answered the test with, and the validation accuracy (%) of each
# decoding tried on the selected epoch:

# %%
decoding = pd.DataFrame([{"dataset": r.dataset, "seed": r.seed, **r.decoding_val,
                          "test answered by": "greedy" if r.num_beams == 1 else f"beam search ({r.num_beams})"}
                         for r in records])
atomic_write_text(ctx.out_dir / "decoding_choice.csv", decoding.to_csv(index=False))
decoding.round(1)

# %% [markdown]
# Validation accuracy after each fine-tuning epoch (greedy answers on validation questions;
# the epoch with the best overall accuracy is the one tested):

# %%
curves = pd.DataFrame([{"dataset": r.dataset, "seed": r.seed, "epoch": h["epoch"],
                        "closed": h.get("val_closed"), "open": h.get("val_open")}
                       for r in records for h in r.train.history])
atomic_write_text(ctx.out_dir / "finetune_validation.csv", curves.to_csv(index=False))
fig = plots.plot_validation_curves(curves)

# %% [markdown]
# ### Tables 1 and 2: MISS on VQA-RAD and SLAKE
#
# Mean ± standard deviation over seeds; *reported* rows are the paper's numbers (its open-ended
# accuracy was judged by hand, ours is exact match after normalisation), and the prior rows come
# from the data chapter's baseline on the same test questions.

# %%
from medvqa_lib.evaluation import (
    QuestionOnlyPrior,
    aggregate_seeds,
    reported_row,
    results_table,
    score_predictions,
    summarize,
)
from medvqa_lib.papers.miss.pipeline import REPORTED

prior_scored, tables = {}, {}
for name, splits in suite.items():
    prior = QuestionOnlyPrior(key="question_type").fit(splits["train"])
    prior_scored[name] = score_predictions(splits["test"], prior.predict(splits["test"]))
    rows = {f"MISS ({full_label}), this book, {len(study.seeds)} seeds":
            aggregate_seeds([summarize(r.scored) for r in records if r.dataset == name]),
            "question-type prior, this book": summarize(prior_scored[name])}
    for paper, c, o, a in REPORTED.get(name, []):
        rows[paper] = reported_row(paper, name, c, o, a)
    tables[name] = results_table(rows)
table12 = pd.concat(tables, names=["dataset"])
atomic_write_text(ctx.out_dir / "table1_2.csv", table12.to_csv())
table12

# %% [markdown]
# **Does MISS beat the question-only prior?** A paired bootstrap over test questions of
# (MISS − prior) accuracy, where MISS's accuracy on a question is its mean over the seeds. The
# claim is *supported* when the whole 95 % interval lies above zero.

# %%
from medvqa_lib.experiments.tables import compare_to_prior, seed_mean_scores

vs_prior = compare_to_prior({name: seed_mean_scores([r for r in records if r.dataset == name])
                             for name in suite}, prior_scored, n_resamples=ctx.profile.bootstrap_resamples,
                            seed=ctx.seed, label="MISS")
atomic_write_text(ctx.out_dir / "miss_vs_prior.csv", vs_prior.to_csv())
vs_prior

# %% [markdown]
# **Does the answer depend on the image?** The prior sees no image, so beating it takes answers
# that use the image. As a control, the same fine-tuned models answer every test question once
# more about *another* test image (the images permuted in one cycle). Where accuracy barely
# drops, the model answers from the question alone.

# %%
from medvqa_lib.experiments.tables import image_reliance

reliance = image_reliance(records, n_resamples=ctx.profile.bootstrap_resamples, seed=ctx.seed)
atomic_write_text(ctx.out_dir / "image_control.csv", reliance.to_csv())
reliance

# %% [markdown]
# ### Figure 5: generated answers
#
# Test questions with the image, the ground truth and the generated answer of the first seed's
# run. Generated answers are free text: a wrong answer may be a near miss in wording, which
# exact match counts as wrong.

# %%
first = {r.dataset: r for r in records if r.seed == study.seeds[0]}
for name, rec in first.items():
    fig = plots.show_samples(suite[name]["test"], n=8, ncols=4, seed=ctx.seed, predictions=rec.predictions)
    fig.suptitle(f"{name}: generated answers (Pred) and ground truth (A)", y=1.02)

# %% [markdown]
# ### Table 3: ablations
#
# On the ablation dataset, one seed each, one fine-tuning schedule for all rows (on the `cpu`
# profile shorter than Table 2's, printed below): without pre-training, without TransCap,
# without the JTM encoder (ALBEF layout), and with TransCap at growing amounts. The 95 % intervals are bootstrap intervals over test questions: differences smaller
# than their width are not evidence either way.

# %%
from medvqa_lib.evaluation import format_ci_table, summarize_with_ci

ablation_rows, ablation_records = {}, {}
if run_ablations:
    splits = {ablation_set: suite[ablation_set]}
    settings = study.finetune_settings(ablation_set, ablation=True)
    same_schedule = settings.epochs == study.finetune_settings(ablation_set).epochs
    plan = {"w/o pre-training": None, **{k: pretrained[k] for k in variants}}
    for label, state in plan.items():
        config = variants[label][0] if label in variants else study.model
        if label == full_label and same_schedule and study.seeds[0] == ctx.seed:
            rec = first[ablation_set]
        else:
            rec = finetune_and_test(label, finetune_factory(config, state, backbone, study.untie_decoder),
                                    splits,
                                    [ctx.seed], tokenizer, settings, ctx.out_dir / "runs" / "ablations",
                                    cache)[0]
        ablation_records[label] = rec
        ablation_rows[label] = summarize_with_ci(rec.scored, n_resamples=ctx.profile.bootstrap_resamples,
                                                 seed=ctx.seed)
    print(f"ablations: {ablation_set}, seed {ctx.seed}, {settings.epochs} fine-tuning epoch(s) each")
    table3 = pd.concat(ablation_rows, names=["variant"]).droplevel(1)
    table3.insert(0, "pre-training images", [corpus_sizes.get(k, {}).get("pre-training images", 0)
                                              for k in table3.index])
    atomic_write_text(ctx.out_dir / "table3.csv", table3.to_csv())
    display(format_ci_table(table3))
    paper3 = pd.DataFrame(
        [("w/o pre-train", 0, 50.99, 3.82, 19.6), ("w/o TransCap", 38_800, 82.91, 81.47, 82.0),
         ("w/o JTM", 38_800, 82.82, 79.11, 80.36), ("JTM + TransCap", 50_000, 83.94, 81.87, 82.47),
         ("JTM + TransCap", 70_000, 83.94, 81.44, 82.38), ("JTM + TransCap", 90_000, 84.51, 81.19, 83.0)],
        columns=["variant", "pre-training images", "closed", "open", "overall"]).assign(source="REPORTED")
    print("The paper's Table 3 (SLAKE), reported:")
    display(paper3.set_index("variant"))

# %% [markdown]
# ## Cost
#
# Parameters, wall time and training throughput of every run of this chapter on this machine.

# %%
cost = pd.DataFrame(
    [{"run": f"pre-train: {k}", "line": r.cost_line()} for k, r in pre_results.items()]
    + [{"run": f"fine-tune: {r.label} · {r.dataset} · seed {r.seed}", "line": r.train.cost_line()}
       for r in records + [r for k, r in ablation_records.items() if k != full_label]])
atomic_write_text(ctx.out_dir / "cost.csv", cost.to_csv(index=False))
summary = {
    "profile": ctx.profile.name, "real_data": ctx.real,
    "pretrain_samples_per_s": round(sum(r.samples_per_s * r.time_s for r in pre_results.values())
                                    / max(sum(r.time_s for r in pre_results.values()), 1e-9), 2),
    "finetune_samples_per_s": round(sum(r.train.samples_per_s * r.train.time_s for r in records)
                                    / max(sum(r.train.time_s for r in records), 1e-9), 2),
}
atomic_write_text(ctx.out_dir / "summary.json", json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
with pd.option_context("display.max_colwidth", 200):
    display(cost)

# %% [markdown]
# ## Reproducing MISS: what differs from the paper
#
# * **Decoder loss in pre-training.** The paper's Eq. 5 is masked language modelling through
#   the decoder; the authors' public code trains the decoder with a plain causal LM loss, as
#   BLIP does. This chapter uses the paper's reading (`decoder_objective="mlm"`) unless the
#   parameter says `"lm"`; the tables above were produced with
#   the objective printed in the model table.
# * **Scoring.** The paper judged open answers by hand and counted closed questions as those
#   answered yes/no; the public evaluation script joins predictions to questions by list
#   position. Here closed/open come from the datasets' own answer types, matching is exact after
#   normalisation, and the join is by question id (see the {doc}`pitfalls page <../book/pitfalls>`).
# * **The answer decoder.** The paper's decoder shares everything but self-attention with the
#   JTM encoder; the public code's VQA model builds a separate decoder from the pre-trained
#   weights. This chapter keeps it shared by default; the `untie_decoder` parameter switches.
# * **Selection.** Checkpoints are chosen on validation questions (VQA-RAD's validation split
#   is carved from its training questions); the paper does not say how its checkpoint was chosen.
# * **Scale.** The `cpu` profile shrinks the image encoder (a randomly initialised ViT, fewer
#   layers, smaller images), uses MiniLM for the text stacks, a few hundred pre-training pairs
#   and a few fine-tuning epochs. Its numbers measure this small model, not the paper's; the
#   `gpu` profile runs the paper's sizes and schedule (ViT-B/16, BERT-base, 224 → 480 px,
#   100 + 200 epochs, AdamW 2e-5, weight decay 0.05, cosine).
