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
# # M2I2: masked image and language modelling, matching, contrast, and a generative decoder
#
# M2I2 {cite}`li2023m2i2` pre-trains a vision–language model on image–caption pairs with four
# self-supervised objectives at once — **M**asked image modelling, **M**asked language modelling,
# **I**mage–text matching and **I**mage–text contrast — and then fine-tunes it to *write* answers
# to medical questions with an answer decoder. Its layout follows ALBEF {cite}`li2021albef`: a ViT
# for the image, a BERT stack whose lower half encodes text and whose upper half fuses text with
# the image through cross-attention. What M2I2 adds is the image side of masked modelling: an
# MAE-style decoder that rebuilds masked image patches from the visible ones.
#
# This chapter builds the model from the library (`medvqa_lib.papers.m2i2.model`), pre-trains it with all
# four objectives and with each of the ablations of the paper's Table 4, fine-tunes it on VQA-RAD
# and SLAKE (PathVQA where it is given; the built-in synthetic data otherwise), and regenerates
# Tables 1–4 and Figure 3 next to the question-only prior of the
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
# Parameters (papermill overrides these). None keeps the profile's plan
# (medvqa_lib/papers/m2i2/config.py, PLANS); `overrides` takes any other study_plan key.
profile = "gpu"  # "smoke" (CI), "cpu" (2-core laptop, ~20 min), "gpu" (the paper's schedule)
data_dir = None  # folder with vqa_rad/ and slake/ (pathvqa/, roco/); None → $MEDVQA_DATA_DIR
seed = 0
seeds = None  # fine-tuning seeds of Tables 1-3, e.g. [0, 1, 2]
datasets = None  # real datasets to load, e.g. ["vqa-rad", "slake", "pathvqa"]
pairs = None  # image-caption pairs in the pre-training corpus
image_size = None  # pre-training image size (the paper: 256)
finetune_image_size = None  # fine-tuning image size (the paper: 384)
mask_ratio = None  # share of image patches masked for MIM (the paper: 0.15)
shared_masked_pass = None  # True: one masked image pass feeds all four objectives
pretrain_epochs = None
finetune_epochs = None  # dict per dataset, e.g. {"vqa-rad": 3, "slake": 1}
num_beams = None  # beams of answer generation (1: greedy)
rank_k = None  # rank mode: candidates kept after the first-token pre-selection
run_ablations = True
run_rank_mode = True
bootstrap_resamples = None
# everything else, e.g. {"model": {"vision_depth": 2}, "finetune": {"lr": 1e-4}, "ablation_epochs": 1}
overrides = {}

# %%
import time

from medvqa_lib.notebook import setup

chapter_start = time.perf_counter()
ctx = setup(profile, seed, data_dir=data_dir, chapter="m2i2", bootstrap_resamples=bootstrap_resamples)

# %%
import json

import pandas as pd
import torch
from IPython.display import display

from medvqa_lib import plots
from medvqa_lib.data.suite import cap, chapter_suite
from medvqa_lib.io import atomic_write_text
from medvqa_lib.notebook import show_code
from medvqa_lib.papers.m2i2 import losses
from medvqa_lib.papers.m2i2.config import FULL, schedule_note, study_plan
from medvqa_lib.text import select_text_backbone

plots.use_book_style()
out = ctx.out_dir
knobs = {"seeds": seeds, "datasets": datasets, "pairs": pairs, "finetune_epochs": finetune_epochs,
         "rank_k": rank_k, **overrides}
study = study_plan(
    ctx.profile, out / "runs", **{
        **knobs,
        "model": {"image_size": image_size, "finetune_image_size": finetune_image_size,
                  "mask_ratio": mask_ratio, "shared_masked_pass": shared_masked_pass,
                  **overrides.get("model", {})},
        "pretrain": {"epochs": pretrain_epochs, **overrides.get("pretrain", {})},
        "finetune": {"num_beams": num_beams, **overrides.get("finetune", {})}})
backbone = select_text_backbone(study.model.text_backbone)
tokenizer = backbone.tokenizer

suite = chapter_suite(ctx, study.datasets)  # the real datasets, else the synthetic radiology
limits = study.split_limits(ctx.profile)  # caps on questions per split (smoke only)
suite = {name: {split: cap(samples, limits[split], ctx.seed) for split, samples in splits.items()}
         for name, splits in suite.items()}
print("VQA datasets:", ", ".join(f"{k} ({len(v['train'])} train / {len(v['val'])} val / "
                                 f"{len(v['test'])} test)" for k, v in suite.items()))
print("fine-tuning seeds:", list(study.seeds), "· schedules:", schedule_note(study))

# %% [markdown]
# ## The model
#
# An image $I$ is cut into 16 × 16 patches and encoded by a ViT into states $V$ with a leading
# [CLS] state $v_{cls}$. A caption or question $T$ passes through the **text encoder** (the
# lower half of a BERT stack, giving $t_{cls}$) and then the **multimodal encoder** (the upper
# half), whose every layer runs self-attention → cross-attention to $V$ → feed-forward. Two
# decoders sit on top:
#
# * the **image decoder** (pre-training only) is MAE's light transformer: it takes the encoded
#   *visible* patches, puts a learned mask token at every masked position, and regresses the
#   pixels of all patches;
# * the **answer decoder** (fine-tuning) has as many layers as the multimodal encoder, with causal
#   self-attention and cross-attention to the multimodal states of the question. It starts as a
#   copy of the multimodal layers, embeddings and masked-LM head ("with the pre-trained BERT
#   weights", Sec. 2.3).
#
# The `gpu` profile uses the paper's sizes (ViT-B/16 at 256 px, BERT-base split 6 + 6 when the Hub
# is reachable, an 8-block 512-wide MAE decoder); the `cpu` and `smoke` profiles shrink every part.

# %%
from medvqa_lib.papers.m2i2.model import build_m2i2

probe = build_m2i2(study.model, backbone)
n_params = sum(p.numel() for p in probe.parameters())
c = study.model
pd.DataFrame({
    "image encoder": f"ViT, {c.vision_depth} layers × {c.vision_width}, patch {c.patch_size}, "
                     f"{c.image_size} px pre-training → {study.finetune_image_size} px fine-tuning",
    "text / multimodal encoder": f"{probe.n_text_layers} + {probe.depth - probe.n_text_layers} layers "
                                 f"from {c.text_backbone} (cross-attention fresh)",
    "image decoder (MIM)": f"{c.mae_depth} blocks × {c.mae_width}, mask ratio {c.mask_ratio:.0%}",
    "answer decoder": f"{probe.depth - probe.n_text_layers} layers, copied from the multimodal encoder",
    "image pass of ITC/ITM/MLM": "the masked one (shared)" if c.shared_masked_pass
                                 else "unmasked; MIM has its own masked pass",
    "parameters (pre-training)": f"{n_params / 1e6:.1f} M (incl. momentum copies)",
}, index=["M2I2"]).T

# %% [markdown]
# ## Pre-training objectives
#
# **Masked image modelling (Eq. 1).** A share $r$ of each image's $N$ patches ($r$ = 15 %) is
# masked at random; the ViT sees only the visible ones, and the image decoder predicts the pixels
# $\hat P_i$ of every patch. Only the $n = \mathrm{round}(rN)$ masked patches enter the loss:
#
# $$\mathcal{L}_{mim} = \frac{1}{n}\sum_{i=1}^{n} \big\lVert P_i - \hat P_i \big\rVert^2,$$
#
# where, as in MAE, a patch's squared error is the mean over its pixel values. The loss, and the
# image decoder that predicts $\hat P$ from the visible patches (a learned mask token at every
# masked position, fixed 2-D sine-cosine positions, a linear head on each patch):

# %%
from medvqa_lib.papers.m2i2.mae import MAEDecoder

show_code(losses.mim_loss, MAEDecoder)

# %% [markdown]
# **Masked language modelling (Eq. 2).** 15 % of the caption's tokens are selected (80 % of them
# become [MASK], 10 % a random token, 10 % stay); the multimodal encoder predicts them from the
# rest of the caption and the image:
#
# $$\mathcal{L}_{mlm} = \mathbb{E}_{(V,\hat T)\sim D}\, H\big(y^{mlm}, p^{mlm}(V, \hat T)\big).$$

# %%
show_code(losses.mlm_loss)

# %% [markdown]
# **Image–text matching (Eq. 3).** A two-way head on the multimodal [CLS] state decides whether
# image and caption belong together. Each image is paired with a *hard* negative caption from the
# batch and each caption with a hard negative image, drawn with probability growing with their
# contrastive similarity:
#
# $$\mathcal{L}_{itm} = \mathbb{E}_{(V,T)\sim D}\, H\big(y^{itm}, p^{itm}(V, T)\big).$$

# %%
show_code(losses.itm_loss)

# %% [markdown]
# **Image–text contrast.** The [CLS] states of the image and text encoders are projected to 256
# dimensions and normalised, $g_v(v_{cls})$ and $g_t(t_{cls})$. Momentum encoders, exponential
# moving averages $\theta' \leftarrow m\,\theta' + (1-m)\,\theta$ of the online weights
# ($m$ = 0.995), encode the same pairs, and their features also fill queues of earlier batches.
# With $s(I,T) = g_v(v_{cls})^\top g'_t(t'_{cls})/\tau$ softmax-normalised over the batch and the
# queue into $p^{i2t}$ (and symmetrically $p^{t2i}$),
#
# $$\mathcal{L}_{itc} = \tfrac12\,\mathbb{E}_{(I,T)\sim D}\big[H(y^{i2t}, p^{i2t}) + H(y^{t2i}, p^{t2i})\big],$$
#
# with $y$ one-hot on the paired item (captions of the same image count as positives) and a
# learned temperature $\tau$ starting at 0.07. The paper gives this loss no number; the code is
# ALBEF's, shared with the MISS chapter:

# %%
show_code(losses.itc_loss)

# %% [markdown]
# **Total (Eq. 4).**
#
# $$\mathcal{L} = \mathcal{L}_{mim} + \mathcal{L}_{mlm} + \mathcal{L}_{itm} + \mathcal{L}_{itc}.$$
#
# Each term is a tested function of the library (`medvqa_lib/papers/m2i2/losses.py`, tested in
# `tests/test_m2i2.py`): the mask covers exactly $\mathrm{round}(rN)$ patches (the $N - n$
# patches with the lowest random noise stay visible, as in MAE), the masked set is exactly the
# reconstructed set, and the MIM loss matches a hand-computed value. A Table 4 ablation drops its
# term from the sum:

# %%
show_code(losses.pretraining_loss)

# %% [markdown]
# ## Pre-training runs
#
# The paper pre-trains on the ImageCLEF 2022 caption set (83,275 training pairs). Here the pairs
# are ROCO when a `roco/` folder is given (or the Hub on the `gpu` profile), else the synthetic
# generator's captions, a labelled stand-in. Three models are pre-trained from the same
# initialisation with the same schedule: the full model, one without MIM (no image decoder) and
# one without ITC (no momentum encoders; ITM then draws its negatives uniformly from the batch).

# %%
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.papers.m2i2.config import ablation_configs
from medvqa_lib.papers.m2i2.pipeline import pretrain_variant, pretraining_corpus

corpus, held_out, corpus_source = pretraining_corpus(ctx.profile, study.pairs, ctx.seed, ctx.data_root,
                                                     hub=ctx.hub, n_held_out=2)
pre_cache = ImageCache(study.model.image_size)
ft_cache = pre_cache if study.finetune_image_size == study.model.image_size else ImageCache(
    study.finetune_image_size)
variants = ablation_configs(study.model)
if not run_ablations:
    variants = {FULL: variants[FULL]}
pretrained, pre_results = {}, {}
for label, config in variants.items():
    pretrained[label], pre_results[label] = pretrain_variant(
        label, config, corpus, tokenizer, pre_cache, study.pretrain, backbone, seed=ctx.seed)
    print(f"{label:<10} {len(corpus):>6} pairs · {pre_results[label].cost_line()}")

# %% [markdown]
# Training curves of each objective (a variant has no curve for the objective it drops):

# %%
fig = plots.plot_training_curves({k: r.out_dir for k, r in pre_results.items()},
                                 ["loss_mim", "loss_mlm", "loss_itm", "loss_itc"], title="Pre-training",
                                 smooth=3)

# %% [markdown]
# ### What the image decoder learns: MAE reconstructions
#
# Two caption images that pre-training never saw, each with one random mask of 15 % of its patches
# (the same mask for both rows): the model as built, before pre-training, and the full model after
# it. The last column pastes the reconstruction into the masked patches only, as the loss scores
# them.

# %%
from medvqa_lib.papers.m2i2.figures import reconstruction_figure
from medvqa_lib.training import seed_everything

seed_everything(ctx.seed)
before = build_m2i2(study.model, backbone)  # the initialisation every variant starts from
after = build_m2i2(study.model, backbone)
after.load_state_dict(pretrained[FULL])
figure_images = torch.stack([pre_cache.get(p) for p in held_out or corpus[:2]])
fig = reconstruction_figure({"before pre-training": before, "after pre-training": after},
                            figure_images, seed=ctx.seed)
if not held_out:
    print("no held-out caption image: these two were seen in pre-training")
del probe, before, after

# %% [markdown]
# ## Fine-tuning and answering
#
# For VQA the question is encoded by the text and multimodal encoders attending to the unmasked
# image; the answer decoder, started from the pre-trained multimodal layers, is trained with the
# conditional language-modelling loss (Eq. 5)
#
# $$\mathcal{L}_\theta = -\sum_{j=1}^{|y|} \log P_\theta\big(y_j \mid y_{<j}, x, c\big),$$
#
# where $c$ is the fused question–image context, summed over an answer's tokens and averaged over
# the batch:

# %%
show_code(losses.answer_loss)

# %% [markdown]
# The image encoder's positional embeddings are interpolated to the fine-tuning image
# size. Answers are **generated** (greedy or beam search, as the profile says) — no answer list is
# involved. The epoch is selected on validation accuracy (greedy answers on validation questions);
# the test split is answered once, by the selected weights. Each seed starts from the same
# pre-trained weights and changes the data order and dropout.

# %%
from medvqa_lib.experiments.run_store import save_runs
from medvqa_lib.experiments.runs import finetune_and_test
from medvqa_lib.papers.m2i2.pipeline import finetune_factory

records = []
for name, splits in suite.items():
    records += finetune_and_test(FULL, finetune_factory(study.model, pretrained[FULL], backbone),
                                 {name: splits}, study.seeds, tokenizer, study.finetune_settings(name),
                                 out / "runs" / "finetune", ft_cache, image_control=True)
save_runs("M2I2", records, out / "main_runs.csv", {s.qid: s for sp in suite.values() for s in sp["test"]})
first = {r.dataset: r for r in records if r.seed == study.seeds[0]}
fig = plots.plot_training_curves({f"{r.dataset}, seed {r.seed}": r.train.out_dir for r in records}, ["loss"],
                                 title="Fine-tuning: the answer loss (Eq. 5)", smooth=3)

# %% [markdown]
# ### Table 1: VQA-RAD, "free" and "free+para" test questions
#
# The paper reports VQA-RAD twice: on the 308 free-form test questions ("free") and on all 451,
# paraphrases included ("free+para"). Both come from the same fine-tuned models here, scored on
# the two question sets. Measured rows are mean ± standard deviation over the seeds; the prior
# row is the data chapter's question-type baseline on the same questions. Open accuracy is exact
# match after normalisation (open recall: the share of reference tokens in the answer).

# %%
from medvqa_lib.evaluation import results_table
from medvqa_lib.papers.m2i2.pipeline import free_para_scores, measured_rows, prior_scores, readable
from medvqa_lib.papers.m2i2.reported import reported_rows

prior_scored = prior_scores(suite)
result_tables = {}
if "vqa-rad" in suite:
    rad = [r for r in records if r.dataset == "vqa-rad"]
    rows = {}
    for subset, scored in free_para_scores(prior_scored["vqa-rad"], suite["vqa-rad"]["test"]).items():
        rows.update(measured_rows("vqa-rad", rad, prior_scored["vqa-rad"], set(scored["qid"]), subset))
        rows.update(reported_rows("table1", subset))
    result_tables["table1"] = results_table(rows)
    display(readable(result_tables["table1"]))
else:
    print("VQA-RAD is not loaded (give data_dir or MEDVQA_DATA_DIR): the paper's Table 1, reported:")
    display(readable(results_table(reported_rows("table1"))))

# %% [markdown]
# ### Table 2: PathVQA

# %%
if "pathvqa" in suite:
    rows = measured_rows("pathvqa", [r for r in records if r.dataset == "pathvqa"], prior_scored["pathvqa"])
    rows.update(reported_rows("table2"))
    result_tables["table2"] = results_table(rows)
    display(readable(result_tables["table2"]))
else:
    print("PathVQA was not run here" + (" (this profile leaves it out: add 'pathvqa' to `datasets`)"
                                        if "pathvqa" not in study.datasets else
                                        " (no pathvqa/ folder under the data root)")
          + ". The rows below are the paper's numbers, REPORTED only; nothing was measured.")
    display(readable(results_table(reported_rows("table2"))))

# %% [markdown]
# ### Table 3: SLAKE (English)

# %%
if "slake" in suite:
    rows = measured_rows("slake", [r for r in records if r.dataset == "slake"], prior_scored["slake"])
    rows.update(reported_rows("table3"))
    result_tables["table3"] = results_table(rows)
    display(readable(result_tables["table3"]))
else:
    print("SLAKE is not loaded: the paper's Table 3, reported:")
    display(readable(results_table(reported_rows("table3"))))
for name in suite:
    if name not in ("vqa-rad", "pathvqa", "slake"):  # the synthetic stand-in
        result_tables[name] = results_table(measured_rows(name, [r for r in records if r.dataset == name],
                                                          prior_scored[name]))
        print(f"{name}:")
        display(readable(result_tables[name]))
table123 = pd.concat(result_tables, names=["table"])
atomic_write_text(out / "tables1_3.csv", table123.to_csv())

# %% [markdown]
# **Does M2I2 beat the question-only prior?** A paired bootstrap over test questions of
# (M2I2 − prior) accuracy, where M2I2's accuracy on a question is its mean over the seeds. The
# claim is *supported* when the whole 95 % interval lies above zero.

# %%
from medvqa_lib.experiments.tables import compare_to_prior, seed_mean_scores

vs_prior = compare_to_prior({name: seed_mean_scores([r for r in records if r.dataset == name])
                             for name in suite}, prior_scored, n_resamples=ctx.profile.bootstrap_resamples,
                            seed=ctx.seed, label=FULL)
atomic_write_text(out / "m2i2_vs_prior.csv", vs_prior.to_csv())
vs_prior

# %% [markdown]
# **Does the answer depend on the image?** The question-only prior sees no image, so beating it
# takes an answer that uses the image. As a control, the same fine-tuned models answer every test
# question once more about *another* test image (the images permuted in one cycle, so every image
# hands its questions to a different one). Where accuracy barely drops, the model answers from
# the question alone, and it cannot beat the prior by more than its own language prior allows.

# %%
from medvqa_lib.experiments.tables import image_reliance

reliance = image_reliance(records, n_resamples=ctx.profile.bootstrap_resamples, seed=ctx.seed)
atomic_write_text(out / "image_control.csv", reliance.to_csv())
reliance

# %% [markdown]
# ### Table 4: ablations
#
# On the ablation datasets (`ablation_datasets`: SLAKE on `cpu`), one seed each (the first),
# one fine-tuning schedule for all rows: without pre-training (the text stack from its
# BERT/MiniLM weights, a new image encoder), pre-trained without MIM, pre-trained without ITC,
# and the full model. When the ablation schedule is the main one (`gpu`), the full model's row is
# its first-seed run from above; on `cpu` the ablations are shorter (`ablation_epochs`,
# `ablation_train_limit`) and the full model is fine-tuned again on the same short schedule, so
# the rows differ only in pre-training. Each row gives the variant's accuracies and its change
# against the full model (overall, closed, open; percentage points) with a paired-bootstrap 95 %
# interval over the same test questions. A change whose interval contains 0 is not evidence
# either way.

# %%
from medvqa_lib.experiments.tables import ablation_table

ablation_records, ablation_tables = {}, {}
if run_ablations:
    for name in study.ablation_sets(list(suite)):
        settings, splits = study.ablation_settings(name), study.ablation_splits(suite[name], ctx.seed)
        plan = {"w/o pre-training": None, "w/o MIM": pretrained["w/o MIM"], "w/o ITC": pretrained["w/o ITC"]}
        if not study.ablation_matches_main(name):  # the full model on the ablations' schedule
            plan = {FULL: pretrained[FULL], **plan}
        runs = {}
        for label, state in plan.items():
            config = variants.get(label, study.model)
            runs[label] = finetune_and_test(label, finetune_factory(config, state, backbone),
                                            {name: splits}, study.seeds[:1], tokenizer, settings,
                                            out / "runs" / "ablations", ft_cache)[0]
        runs.setdefault(FULL, first[name])
        print(f"Table 4 on {name}: {settings.epochs} epoch(s) on {len(splits['train'])} training questions, "
              f"seed {study.seeds[0]}")
        ablation_records[name] = runs
        ablation_tables[name] = ablation_table(runs, reference=FULL, n_resamples=ctx.profile.bootstrap_resamples,
                                               seed=ctx.seed)
    if ablation_tables:
        table4 = pd.concat(ablation_tables, names=["dataset"])
        atomic_write_text(out / "table4.csv", table4.to_csv())
        display(table4)
    print("The paper's Table 4, REPORTED:")
    display(readable(results_table(reported_rows("table4"))))

# %% [markdown]
# ### Figure 3: where the answer looks
#
# Grad-CAM on the cross-attention of a multimodal layer (the third, or the last when there are
# fewer): each head's attention map from each question token to the image patches is weighted by
# the mean gradient of the answer's log-likelihood with respect to it, and the weighted sum is
# kept where positive. The answer is the model's own greedy answer. Two closed and two open test
# questions per dataset, drawn at random with the chapter's seed (not chosen by how well the model
# does on them), first seed's model.

# %%
from medvqa_lib.papers.m2i2.figures import gradcam_figure, pick_examples
from medvqa_lib.papers.m2i2.pipeline import restore_finetuned

finetuned, gradcam_rows = {}, {}
for name in suite:
    finetuned[name] = restore_finetuned(study.model, first[name], backbone)
    examples = pick_examples(suite[name]["test"], 2, 2, seed=ctx.seed)
    fig, gradcam_rows[name] = gradcam_figure(finetuned[name], examples, tokenizer, ft_cache,
                                             max_question_len=study.finetune.max_text_len)
    fig.suptitle(f"{name}: Grad-CAM of the cross-attention (the model's own answer)", y=1.02)
gradcam_table = pd.concat(gradcam_rows, names=["dataset"])
atomic_write_text(out / "figure3_questions.csv", gradcam_table.to_csv())
gradcam_table

# %% [markdown]
# ## Rank mode, and what a list with the test answers is worth
#
# The paper describes generation, but the authors' public code scores a list of candidate answers
# by the decoder's log-likelihood and returns the best (after keeping the $k$ candidates with the
# likeliest first token; see the {doc}`pitfalls page <../book/pitfalls>`, pitfall 1). The same
# first-seed models are scored here in that mode twice: with a list of the **training** answers
# only, and — for measurement only — with the same list plus every test answer, a list of the kind
# the pitfall describes. The paired intervals compare the two lists on the same questions.

# %%
from medvqa_lib.papers.m2i2.rank import candidate_lists, rank_mode, rank_mode_table

rank_tables = {}
if run_rank_mode:
    for name in study.rank_sets(list(suite)):
        test = suite[name]["test"]
        lists = candidate_lists(suite[name]["train"], test, leak=True)
        ranked = rank_mode(finetuned[name], test, lists, tokenizer, ft_cache, k=study.rank_k,
                           max_question_len=study.finetune.max_text_len)
        rank_tables[name] = rank_mode_table(first[name].scored, ranked, test,
                                            n_resamples=ctx.profile.bootstrap_resamples, seed=ctx.seed)
    if rank_tables:
        rank_table = pd.concat(rank_tables, names=["dataset"])
        atomic_write_text(out / "rank_mode.csv", rank_table.to_csv())
        display(rank_table)
del finetuned

# %% [markdown]
# Rank mode with the training list cannot answer a test question whose answer never occurs in
# training; adding the test answers makes those questions answerable without the model learning
# anything. The size of the change is the size of the leak for this model. The generated row is
# the chapter's measured result.

# %% [markdown]
# ## Cost
#
# Parameters, wall time and training throughput of every run of this chapter on this machine.

# %%
all_runs = records + [r for runs in ablation_records.values() for k, r in runs.items() if k != FULL]
cost = pd.DataFrame(
    [{"run": f"pre-train: {k}", "line": r.cost_line()} for k, r in pre_results.items()]
    + [{"run": f"fine-tune: {r.label} · {r.dataset} · seed {r.seed}", "line": r.train.cost_line()}
       for r in all_runs])
atomic_write_text(out / "cost.csv", cost.to_csv(index=False))


def throughput(results):
    return round(sum(r.samples_per_s * r.time_s for r in results) / max(sum(r.time_s for r in results), 1e-9), 1)


summary = {
    "profile": ctx.profile.name, "real_data": ctx.real, "datasets": list(suite),
    "seeds": list(study.seeds),
    "pretrain_samples_per_s": throughput(list(pre_results.values())),
    "finetune_samples_per_s": throughput([r.train for r in all_runs]),
    "pretrain_params_M": round(pre_results[FULL].n_params / 1e6, 1),
    "finetune_params_M": round(records[0].train.n_params / 1e6, 1),
    "chapter_wall_time_min": round((time.perf_counter() - chapter_start) / 60, 1),
}
atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
print(f"Cost: {summary['chapter_wall_time_min']} min for the whole chapter on {records[0].train.device} "
      f"({torch.get_num_threads()} threads) · pre-training {summary['pretrain_samples_per_s']} pairs/s "
      f"({summary['pretrain_params_M']} M parameters) · fine-tuning {summary['finetune_samples_per_s']} "
      f"questions/s ({summary['finetune_params_M']} M parameters)")
with pd.option_context("display.max_colwidth", 200):
    display(cost)

# %% [markdown]
# ## Closing note
#
# The numbers of this run in one place, written from the results above: test accuracy per dataset
# (mean ± std over the seeds), whether the margin over the prior is supported, the Table 4
# changes, and the cost.

# %%
from IPython.display import Markdown

from medvqa_lib.evaluation import format_mean_std
from medvqa_lib.papers.m2i2.pipeline import seed_summary

lines = [f"**{ctx.profile.name} profile**, {', '.join(suite)}{'' if ctx.real else ' (synthetic stand-in)'}; "
         f"{len(study.seeds)} seed(s); whole chapter {summary['chapter_wall_time_min']} min; "
         f"pre-training {summary['pretrain_samples_per_s']} pairs/s, fine-tuning "
         f"{summary['finetune_samples_per_s']} questions/s."]
for name in suite:
    s = seed_summary([r for r in records if r.dataset == name]).iloc[0]
    support = {q: ("supported" if vs_prior.loc[(name, q), "supported"] else "not supported")
               for q in ("closed", "open") if (name, q) in vs_prior.index}
    lines.append(f"* **{name}**: closed {format_mean_std(s['closed_acc_mean'], s['closed_acc_std'])}, "
                 f"open {format_mean_std(s['open_acc_mean'], s['open_acc_std'])} "
                 f"(margin over the prior: closed {support.get('closed', 'n/a')}, open "
                 f"{support.get('open', 'n/a')}).")
    if name in ablation_tables:
        t = ablation_tables[name]
        lines.append("  Table 4, overall vs the full model: " + "; ".join(
            f"{k} {t.loc[k, 'Δ overall (pp)']:+.1f} pp {t.loc[k, 'Δ overall 95% CI']}" for k in t.index if k != FULL))
Markdown("\n".join(lines))

# %% [markdown]
# ## Reproducing M2I2: what differs from the paper
#
# * **Pre-training data.** The paper uses the ImageCLEF 2022 caption set; this book has no loader
#   for it and uses ROCO where given, else synthetic captions. On real VQA data without a `roco/`
#   folder, the model is therefore pre-trained on synthetic images, far from VQA-RAD and SLAKE.
# * **Initial weights.** The paper's image decoder starts from ImageNet-pre-trained weights
#   (Sec. 2.1); the paper does not say where the ViT's weights come from. On the `gpu` profile the
#   ViT loads timm's MAE ViT-B/16 when the Hub is reachable; the image decoder always starts from
#   random weights here, and offline every image weight does.
# * **Which image the objectives see.** The paper's Fig. 1 feeds the unmasked portion of the image
#   to the encoders. Here ITC, ITM and MLM see the whole image and MIM has its own masked pass;
#   `shared_masked_pass=True` gives the single masked pass. The authors' code feeds masked-image
#   features to ITC/ITM/MLM and draws a second, independent mask for MIM.
# * **The momentum update.** The paper refers to MoCo's momentum update for ITC; this book uses
#   ALBEF's form of it (momentum 0.995, queues of 65,535 in `gpu`). ALBEF's momentum distillation
#   is off (the paper does not mention it).
# * **Schedules and augmentation.** The learning rate follows a cosine to 0, not to the paper's
#   1e-5 (pre-training) and 1e-6 (fine-tuning); images are resized once and cached, without the
#   paper's random crops and RandAugment.
# * **Answers and scoring.** The paper describes generation; the public code ranks an answer list
#   (pitfall 1 of the {doc}`pitfalls page <../book/pitfalls>`). The tables above score generated
#   answers by exact match after normalisation, closed/open from the datasets' answer types; rank
#   mode appears only in its own section, with a training-only list.
# * **Data and selection.** The public VQA-RAD fine-tuning config lists `testset.json` among its
#   training files (pitfall 2) and its scripts score the test set every epoch (pitfall 3). Here no
#   test question is trained on, VQA-RAD's validation split is carved from its training questions,
#   and the epoch is chosen on validation accuracy.
# * **Scale.** The `cpu` profile shrinks the image encoder (a randomly initialised 4-layer ViT at
#   96 px), uses MiniLM for the text stacks, pre-trains on a few hundred pairs for one epoch and
#   fine-tunes for a few epochs. Its numbers measure this small model, not the paper's; the `gpu`
#   profile runs the paper's sizes and schedule.
