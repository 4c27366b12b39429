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
# # Adapting a lightweight VLM (PaliGemma) for radiology VQA
#
# Sun and Shourya {cite}`sun2025paligemmarad` fine-tune PaliGemma-3B {cite}`beyer2024paligemma`, a
# SigLIP vision tower plus a Gemma-2B language model, to answer open and closed radiology
# questions. The paper is a recipe more than a model: LoRA on both towers, a two-stage
# curriculum (SLAKE first), datamixes built from captions by a language model, filtering and
# *annealing*, an evaluation that admits the weakness of n-gram metrics, and attention
# saliency as a diagnostic. This chapter runs every step with the library package
# `medvqa_lib.papers.paligemma`: `config` (the plan of each profile), `model` (PaliGemma and
# LoRA), `losses` (the objective and Eq. 1), `data` (collator and datamixes), `synthetic_qa`
# (QA from captions), `pipeline` (training and evaluation) and `saliency` (Eq. 2 and rollout).
# Every number below comes from this run; the paper's numbers appear beside ours, labelled
# *reported*.
#
# **Colab and the gated model.** The `gpu` profile loads `google/paligemma-3b-mix-448`. Accept
# its licence on the Hugging Face Hub, then either set `HF_TOKEN` (Colab: *Secrets*, then
# `os.environ["HF_TOKEN"] = userdata.get("HF_TOKEN")`) or run `huggingface_hub.login()` before
# the model cell. On a 16 GB GPU set `load_in_4bit = True` (needs `bitsandbytes`).

# %% tags=["hide-cell"]
# On Colab: install the book's library (skipped everywhere else).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "medvqa-lib[offline] @ git+https://github.com/medvqa-book/medvqa-book"],
                   check=True)

# %% tags=["parameters", "hide-cell"]
# Parameters (papermill overrides these). None keeps the plan's value (see
# medvqa_lib.papers.paligemma.config.PLANS); `overrides` takes any other PaliGemmaStudy field,
# and `model` a dict of PaliGemmaSpec fields, e.g. {"lr": 1e-4, "model": {"image_size": 224}}.
profile = "gpu"  # "smoke" (CI), "cpu" (laptop, ~20 min), "gpu" (the paper's model and args)
data_dir = None  # folder with vqa_rad/ and slake/; None → $MEDVQA_DATA_DIR
seed = 0
seeds = None  # seeds of Tables 1-2, e.g. [0, 1]
model_source = None  # gpu: a Hub id or local folder (default google/paligemma-3b-mix-448)
load_in_4bit = None  # gpu: 4-bit loading for a 16 GB GPU (bitsandbytes)
vision_lora = None  # "equivalent" (o/up/down → out_proj/fc1/fc2) or "literal" (q/k/v only)
stage1_epochs = None  # SLAKE (the paper: 5)
stage2_epochs = None  # each datamix
max_train = None  # cap on training questions per stage
max_eval = None  # cap on test questions per evaluation
datamixes = None  # e.g. ["target", "captions-qa", "captions-qa+anneal"]
qa_backend = None  # "rule" (offline), "hf:<model>", "openai:<model>@<url>" (ollama: llama3.1)
adapter_control = None  # tiny model: also fine-tune every weight once (None: on for smoke/cpu)
bootstrap_resamples = None
overrides = {}  # any other study field (lr, batch_size, scaling_fractions, saliency_layer, ...)

# %%
from medvqa_lib.notebook import setup

ctx = setup(profile, seed, data_dir=data_dir, chapter="paligemma", bootstrap_resamples=bootstrap_resamples)

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from medvqa_lib import plots
from medvqa_lib.data.suite import cap, chapter_suite
from medvqa_lib.io import atomic_write_text
from medvqa_lib.notebook import show_code
from medvqa_lib.papers.paligemma import data as pgdata
from medvqa_lib.papers.paligemma import losses, saliency
from medvqa_lib.papers.paligemma import model as pgmodel
from medvqa_lib.papers.paligemma import pipeline as pg
from medvqa_lib.papers.paligemma.config import study_plan
from medvqa_lib.papers.paligemma.synthetic_qa import CurationCounts, QAGenerator, anneal_set, curate

plots.use_book_style()
out = ctx.out_dir
study = study_plan(ctx.profile, ctx.out_dir, **{
    "seeds": seeds, "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs, "max_train": max_train,
    "max_eval": max_eval, "datamixes": datamixes, "qa_backend": qa_backend, **overrides,
    "model": {"source": model_source, "load_in_4bit": load_in_4bit, "vision_lora": vision_lora,
              **overrides.get("model", {})}})

suite = chapter_suite(ctx)
stage1_name = "slake" if "slake" in suite else next(iter(suite))
target_name = "vqa-rad" if "vqa-rad" in suite else next(iter(suite))


def sized(name, split, limit):
    return cap(suite[name][split], limit, ctx.seed)


stage1 = {s: sized(stage1_name, s, study.max_train if s == "train" else study.max_eval) for s in suite[stage1_name]}
target = {s: sized(target_name, s, study.max_train if s == "train" else study.max_eval) for s in suite[target_name]}
print(f"stage 1: {stage1_name} · target: {target_name} · "
      + " · ".join(f"{k}: {len(v['train'])} train / {len(v['val'])} val / {len(v['test'])} test"
                   for k, v in {stage1_name: stage1, target_name: target}.items()))

# %% [markdown]
# ## Datamixes from captions (Section 4.1)
#
# The paper turns image–caption corpora (ROCO v2, MedPix 2.0) into QA with llama3.1, filters
# by pathology relevance, de-duplicates, checks answerability, and *anneals*: a small set of
# high-quality pairs is spliced into the final stage. Offline, the captions are the synthetic
# generator's *training* captions, the QA generator is the rule backend (the same interface
# takes a local Hugging Face model or an OpenAI-compatible endpoint such as ollama), and the
# annealing set is a small slice of the target's human-written training questions about its
# most common pathologies. The counts below are this run's.

# %%
from medvqa_lib.data.synthetic import load_synthetic_captions

captions = [c for c in load_synthetic_captions(n_images=ctx.profile.synthetic_images,
                                               image_size=ctx.profile.synthetic_image_size, seed=ctx.seed)
            if c.split == "train"]
generator = QAGenerator(study.qa_backend, cache_dir=out / "qa_cache", prompt=study.qa_prompt)
caption_counts, anneal_counts = CurationCounts(), CurationCounts()
caption_counts.add("training captions", len(captions))
generated = generator.samples(captions)
captions_qa = cap(curate(generated, caption_counts), study.max_train, ctx.seed)
caption_counts.add("captions-qa (capped)", len(captions_qa))
anneal, pathology_freq = anneal_set(target["train"], study.anneal_size, seed=ctx.seed, counts=anneal_counts)
print(f"QA backend: {generator.backend.name} · malformed pairs rejected: {dict(generator.rejected) or 0}"
      f" · cache hits: {generator.hits}")
parts = {"target": target["train"], "captions-qa": captions_qa, "anneal": anneal}
flow = pd.DataFrame([{"pipeline": "captions → QA (Fig. 6)", "step": k, "items": v}
                     for k, v in caption_counts.steps]
                    + [{"pipeline": "annealing set (Fig. 5)", "step": k, "items": v}
                       for k, v in anneal_counts.steps])
atomic_write_text(out / "data_flow.csv", flow.to_csv(index=False))
display(pd.DataFrame([{"question": s.question, "answer": s.answer, "caption": s.extra["caption"]}
                      for s in captions_qa[:6]]))

# %% [markdown]
# Figures 5–6 as data-flow charts of the counts above, and the pathology counts that pick the
# annealing set:

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for ax, (name, part) in zip(axes[:2], flow.groupby("pipeline", sort=False), strict=True):
    ax.barh(part["step"][::-1], part["items"][::-1], color="tab:blue")
    for y, v in enumerate(part["items"][::-1]):
        ax.text(v, y, f" {v}", va="center")
    ax.set_title(name)
top = pd.Series(dict(pathology_freq.most_common(8)), dtype=float)
axes[2].bar(top.index.astype(str), top.to_numpy(), color="tab:red")
axes[2].set_title(f"pathologies in {target_name} training QA")
axes[2].tick_params(axis="x", rotation=45)
fig.tight_layout()

# %% [markdown]
# ## The model and LoRA
#
# PaliGemma encodes the image with SigLIP into $N = (S/p)^2$ patch tokens, projects them to
# the language model's width, and prepends them to the prompt ``<bos>answer en <question>\n``.
# Image and prompt form a *prefix* with full attention; the answer is generated causally after
# it. Fine-tuning minimises the loss on the answer tokens only, which the processor marks by
# passing the answer as its `suffix` (`token_type_ids` = 1, `labels` ≠ −100 only there):
#
# $$\mathcal{L} = -\sum_{t \in \text{answer}} \log p_\theta\big(y_t \mid y_{<t}, \text{image}, \text{prompt}\big).$$
#
# In code, the mask is the labels: the model's forward calls `answer_only_loss`, the mean of
# this sum over the batch's answer tokens; the validation loss of Figures 7–8 is the same sum
# per question (`answer_token_nll`).

# %%
show_code(losses.answer_mask, losses.answer_only_loss, losses.answer_token_nll)

# %% [markdown]
# LoRA replaces each targeted weight $W$ by $W + \tfrac{\alpha}{r} BA$ with $r = 12$,
# $\alpha = 32$; only $A$ and $B$ train. On `smoke`/`cpu` the model is a tiny PaliGemma built
# from a config with a tokenizer trained on this run's training text, first trained in full on
# captions as a stand-in for PaliGemma's pre-training; on `gpu` it is the Hub checkpoint.
# The adapted modules are named per tower (see the closing notes on SigLIP's names):

# %%
show_code(pgmodel.lora_target_names, pgmodel.apply_lora)

# %%
import copy

from medvqa_lib.experiments.images import ImageCache

texts = [f"answer en {s.question}" for s in stage1["train"] + target["train"] + captions_qa] + \
        [str(s.answer) for s in stage1["train"] + target["train"] + captions_qa] + \
        [f"caption en {c.caption}" for c in captions]
vqa = pgmodel.build_model(study, texts)
cache = ImageCache(study.spec.image_size)
base_result = pg.pretrain_base(vqa, captions, study, cache, study.run_dir("base"), ctx.seed)
if base_result is not None:
    print("stand-in base pre-training:", base_result.cost_line())
targets = pgmodel.lora_target_names(vqa.model, study.spec.vision_lora)
if adapter_control is None:
    adapter_control = study.spec.is_tiny
full_base = copy.deepcopy(vqa) if adapter_control else None  # the base before adapters, for the control
share = pgmodel.add_adapters(vqa, study)
base_adapters = vqa.trainable_state()
print(f"LoRA r={study.spec.lora_r}, alpha={study.spec.lora_alpha}, vision mapping "
      f"'{study.spec.vision_lora}': {len(targets)} modules · trainable {share['trainable']:,} of "
      f"{share['total']:,} parameters ({share['share_pct']:.2f} %)")
pd.DataFrame({"tower": ["vision" if ".vision_tower." in n else "language" for n in targets],
              "module": [n.rsplit(".", 1)[1] for n in targets]}).value_counts().unstack(0).fillna(0).astype(int)

# %% [markdown]
# ## Stage 1: SLAKE
#
# Stage 1 trains the adapters on SLAKE (five epochs in the paper) and saves them; the
# checkpoint is a safetensors file written atomically. The epoch with the lowest validation
# answer loss is kept.

# %%
stage1_ckpt = study.run_dir("stage1") / "adapters.safetensors"
pgmodel.reset_adapters(vqa, ctx.seed)
stage1_result = pg.train_stage(vqa, stage1["train"], stage1["val"], study, cache, study.stage1_epochs,
                               study.run_dir("stage1"), ctx.seed)
pgmodel.save_adapters(vqa, stage1_ckpt, {"dataset": stage1_name, "epochs": study.stage1_epochs})
print("stage 1:", stage1_result.cost_line())
stage1_scored = pg.evaluate(vqa, stage1["test"], cache, study, ctx.seed)

# %% [markdown]
# ## Stage 2: datamixes, without and with the pre-stage (Tables 1–2)
#
# Each datamix run starts either from fresh adapters (*no pre-stage*, Table 1) or from the
# stage-1 file (Table 2); a `+anneal` mix ends with a stage on the mix plus the annealing set.
# All runs are tested on the target's test questions: accuracy is exact match after
# normalisation, ROUGE-1/2/L and BLEU are per question (mean ± std over questions, as the
# paper's ±), accuracies are mean ± std over seeds; *consistent acc* applies the consistency
# rule (a correct answer loses its point when ≥ 3 of 5 sampled answers differ from it).

# %%
records = []
for prestage in (False, True):
    for mix in study.datamixes:
        main, extra = pgdata.load_datamix(mix, parts, study.max_train)
        for s in study.seeds:
            vqa.load_state_dict(base_adapters, strict=False)
            pgmodel.reset_adapters(vqa, s)
            if prestage:
                pgmodel.load_adapters(vqa, stage1_ckpt)
            run_dir = study.run_dir(f"{'pre' if prestage else 'nopre'}_{mix}_seed{s}")
            result = pg.train_stage(vqa, main, target["val"], study, cache, study.stage2_epochs, run_dir, s)
            history = [dict(h, stage="main") for h in result.history]
            if extra and study.anneal_epochs:
                annealed = pg.train_stage(vqa, main + extra, target["val"], study, cache,
                                          study.anneal_epochs, run_dir / "anneal", s)
                history += [dict(h, stage="anneal", epoch=h["epoch"] + result.epochs) for h in annealed.history]
            scored = pg.evaluate(vqa, target["test"], cache, study, s)
            records.append({"prestage": prestage, "mix": mix, "seed": s, "scored": scored,
                            "result": result, "history": history, "n_train": len(main) + len(extra)})
            acc = scored.groupby("answer_type")["exact"].mean().mul(100).round(1).to_dict()
            print(f"{'pre-stage' if prestage else 'no pre-stage':<13} {mix:<20} seed {s}: {acc} · "
                  f"{result.time_s:.0f} s · {result.samples_per_s:.1f} samples/s")

# %%
REPORTED_T1 = {"MedPix v2.0": ["0.311 ± 0.255", "0.167 ± 0.082", "0.308 ± 0.125", "0.055 ± 0.111", "34/200"],
               "ROCO v2.0": ["0.325 ± 0.132", "0.179 ± 0.124", "0.278 ± 0.120", "0.059 ± 0.090", "63/200"],
               "ROCO v2.0 + MedPix v2.0": ["0.334 ± 0.122", "0.181 ± 0.124", "0.304 ± 0.180",
                                           "0.077 ± 0.065", "71/200"]}
tables = {}
for prestage in (False, True):
    cols = {mix: pg.table_row([r["scored"] for r in records if r["prestage"] == prestage and r["mix"] == mix])
            for mix in study.datamixes}
    if prestage:
        cols = {f"{stage1_name} (stage 1 only, its test)": pg.table_row([stage1_scored]), **cols}
    tables["with SLAKE pre-stage (Table 2)" if prestage else "no pre-stage (Table 1)"] = pd.DataFrame(cols)
table12 = pd.concat(tables, names=["setting", "metric"])
atomic_write_text(out / "table1_2.csv", table12.to_csv())
display(table12)
print("REPORTED, the paper's Table 1 (no pre-stage; ROUGE/BLEU as fractions, accuracy of 200):")
display(pd.DataFrame(REPORTED_T1, index=["rouge-s", "rouge-m", "rouge-l", "Bleu", "Accuracy"]))
print("REPORTED, the paper's Table 2 (with pre-stage): SLAKE accuracy 68/100; PMC-VQA 0.31046; "
      "the other cells are '?' in the paper.")

# %% [markdown]
# **Does the adapted model beat the question-only prior?** A paired bootstrap over test
# questions of (PaliGemma − prior) accuracy, PaliGemma's accuracy on a question being its mean
# over seeds (the `target` datamix with the pre-stage; for the stage-1 set, the stage-1
# model). *Supported* when the whole 95 % interval lies above zero.

# %%
from medvqa_lib.evaluation import QuestionOnlyPrior, score_predictions
from medvqa_lib.experiments.run_store import save_runs
from medvqa_lib.experiments.runs import RunRecord
from medvqa_lib.experiments.tables import compare_to_prior, seed_mean_scores

# the runs the comparison chapter reads: the target set with the pre-stage, and the stage-1 set
best = [RunRecord("PaliGemma-LoRA", target_name, r["seed"], r["scored"], r["result"])
        for r in records if r["prestage"] and r["mix"] == study.datamixes[0]]
model_scored = {target_name: seed_mean_scores(best)}
prior_scored = {target_name: score_predictions(
    target["test"], QuestionOnlyPrior().fit(target["train"]).predict(target["test"]))}
if stage1_name != target_name:
    model_scored[stage1_name] = stage1_scored
    prior_scored[stage1_name] = score_predictions(
        stage1["test"], QuestionOnlyPrior().fit(stage1["train"]).predict(stage1["test"]))
vs_prior = compare_to_prior(model_scored, prior_scored, n_resamples=ctx.profile.bootstrap_resamples,
                            seed=ctx.seed, label="PaliGemma")
atomic_write_text(out / "paligemma_vs_prior.csv", vs_prior.to_csv())
stored = list(best)
if stage1_name != target_name:
    stored.append(RunRecord("PaliGemma-LoRA", stage1_name, ctx.seed, stage1_scored, stage1_result))
save_runs("PaliGemma-LoRA", stored, out / "main_runs.csv",
          {s.qid: s for part in (stage1, target) for s in part["test"]})
vs_prior

# %% [markdown]
# ### The adapters or the base?
#
# When the adapted model does not beat the prior, either the low-rank update is too narrow for
# what the task needs, or the base model has too little to adapt. This control separates the
# two. The same base (before adapters) is fine-tuned in full: every weight trains on the same
# data (the first datamix, without the pre-stage), with the same schedule and validation
# selection and the first seed. It is compared with the matching LoRA runs (mean over seeds)
# and with the prior on the same test questions. If full fine-tuning also stays at the prior,
# the base is the limit. If it beats both, the adapters are.

# %%
full_result = None
if full_base is not None:
    main, _ = pgdata.load_datamix(study.datamixes[0], parts, study.max_train)
    full_result = pg.train_stage(full_base, main, target["val"], study, cache, study.stage2_epochs,
                                 study.run_dir("full_control"), ctx.seed)
    full_scored = pg.evaluate(full_base, target["test"], cache, study, ctx.seed)
    lora_runs = [RunRecord("PaliGemma-LoRA", target_name, r["seed"], r["scored"], r["result"])
                 for r in records if not r["prestage"] and r["mix"] == study.datamixes[0]]
    control = pg.adapter_control(full_scored, seed_mean_scores(lora_runs), prior_scored[target_name],
                                 n_resamples=ctx.profile.bootstrap_resamples, seed=ctx.seed)
    atomic_write_text(out / "adapter_control.csv", control.to_csv())
    print(f"full fine-tuning on {target_name}:", full_result.cost_line())
    del full_base
    display(control)

# %% [markdown]
# ## Scaling law (Section 4.2, Eq. 1)
#
# $$\tilde L(X, D_f) = A \cdot X^{-\alpha} \cdot D_f^{-\beta} + E$$
#
# with $X$ the epochs and $D_f$ the fine-tuning data volume (here answer tokens). The points
# are validation answer losses per epoch of runs on growing shares of the first datamix (from
# the stage-1 adapters, first seed); Figures 7–8 split the loss into open and closed questions.
# The four parameters are fitted by least squares, which needs at least five points:

# %%
show_code(losses.scaling_law, losses.fit_scaling_law)

# %%
tok = vqa.processor.tokenizer
main, _ = pgdata.load_datamix(study.datamixes[0], parts, study.max_train)
points = []
for frac in study.scaling_fractions:
    share_n = max(1, round(frac * len(main)))
    subset = cap(main, share_n, ctx.seed)
    n_tokens = sum(len(tok(str(s.answer), add_special_tokens=False)["input_ids"]) + 1 for s in subset)
    vqa.load_state_dict(base_adapters, strict=False)
    pgmodel.load_adapters(vqa, stage1_ckpt)
    res = pg.train_stage(vqa, subset, target["val"], study, cache, study.scaling_epochs,
                         study.run_dir(f"scaling_{frac:g}"), ctx.seed)
    points += [{"fraction": frac, "tokens": n_tokens, **h} for h in res.history]
points = pd.DataFrame(points)
atomic_write_text(out / "scaling_points.csv", points.to_csv(index=False))
fits = {}
for col in ("val_loss", "val_loss_open", "val_loss_closed"):
    try:
        fits[col] = losses.fit_scaling_law(points, loss=col)
    except (ValueError, RuntimeError) as e:
        fits[col] = {"error": str(e)[:80]}
fit_table = pd.DataFrame(fits).T
atomic_write_text(out / "scaling_fit.csv", fit_table.to_csv())
display(fit_table)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
for ax, col, title in ((axes[0], "val_loss_open", "open questions (Fig. 7)"),
                       (axes[1], "val_loss_closed", "closed questions (Fig. 8)")):
    for _, part in points.groupby("fraction"):
        ax.plot(part["epoch"], part[col], "o-", label=f"{int(part['tokens'].iloc[0])} tokens")
        if "A" in fits.get(col, {}) and fits[col]["A"] == fits[col]["A"]:
            f = fits[col]
            xs = np.linspace(part["epoch"].min(), part["epoch"].max(), 50)
            ax.plot(xs, losses.scaling_law(np.vstack([xs, np.full_like(xs, part["tokens"].iloc[0])]),
                                          f["A"], f["alpha"], f["beta"], f["E"]), "--", color="grey")
    ax.set(title=title, xlabel="epoch", ylabel="validation answer loss")
    ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## Saliency (Section 6)
#
# Raw attention (Eq. 2 of the paper) is the attention probability matrix of one head,
#
# $$A = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right),$$
#
# read with the queries of the response tokens and the keys of the image patches, averaged over
# the response (Figure 10), or with one image patch and the response tokens (Figure 11). Here
# the head is one head of the penultimate language-model layer; the patch is the one with the
# highest value, and the response tokens that attend to it most, the top 7, are underlined
# (in a decoder a patch cannot attend to later tokens, so Figure 11 is read from the patch's
# column):

# %%
show_code(saliency.raw_attention_map, saliency.patch_to_tokens)

# %% [markdown]
# Attention rollout (Figure 14) follows the attention through all layers: per layer the heads
# are fused (mean, max or min), the weakest share of entries is discarded, the identity is
# added for the residual path and the rows renormalised, $\hat A_l = \operatorname{norm}(A_l + I)$,
# and the layers multiply, $R = \hat A_L \cdots \hat A_1$:

# %%
show_code(saliency.rollout)

# %% [markdown]
# All maps use the model's own patch grid, computed from its config.
# `saliency.saliency_for(vqa, image, question)` gives the three for any image and question.

# %%
examples = target["test"][:3]
fig, axes = plt.subplots(len(examples), 3, figsize=(10, 3.3 * len(examples)), squeeze=False)
for row, sample in zip(axes, examples, strict=True):
    image = cache.pil(sample)
    sal = saliency.saliency_for(vqa, image, sample.question, layer=study.saliency_layer,
                                head=study.saliency_head, head_fusion=study.head_fusion,
                                discard_ratio=study.discard_ratio)
    row[0].imshow(image)
    row[0].set_title(f"Q: {sample.question[:40]}\nA: {sample.answer} · pred: {sal.answer}", fontsize=8)
    for ax, grid_map, title in ((row[1], sal.raw_map, f"raw: layer {sal.layer}, head {sal.head}"),
                                (row[2], sal.rollout_map, f"rollout ({study.head_fusion}, discard {study.discard_ratio})")):
        ax.imshow(image)
        ax.imshow(grid_map.numpy(), cmap="jet", alpha=0.5, extent=(0, image.width, image.height, 0))
        ax.set_title(f"{title}\n{grid_map.shape[0]}×{grid_map.shape[1]} patches", fontsize=8)
    for ax in row:
        ax.axis("off")
    marked = " ".join(f"_{t}_" if i in sal.top_tokens else t for i, t in enumerate(sal.tokens))
    row[0].text(0, image.height * 1.12, f"tokens on brightest patch: {marked}", fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## Cost

# %%
cost = pd.DataFrame([{"run": f"{'pre' if r['prestage'] else 'no pre'} · {r['mix']} · seed {r['seed']}",
                      "line": r["result"].cost_line()} for r in records]
                    + [{"run": "stage 1", "line": stage1_result.cost_line()}]
                    + ([{"run": "stand-in base", "line": base_result.cost_line()}] if base_result else [])
                    + ([{"run": "full fine-tuning control", "line": full_result.cost_line()}] if full_result else []))
atomic_write_text(out / "cost.csv", cost.to_csv(index=False))
all_runs = [r["result"] for r in records] + [stage1_result]
summary = {"profile": ctx.profile.name, "real_data": ctx.real, "stage1": stage1_name, "target": target_name,
           "train_samples_per_s": round(sum(r.samples_per_s * r.time_s for r in all_runs)
                                        / max(sum(r.time_s for r in all_runs), 1e-9), 2),
           "trainable_share_pct": round(share["share_pct"], 3)}
atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
with pd.option_context("display.max_colwidth", 200):
    display(cost)

# %% [markdown]
# ## Reproducing the paper: what differs
#
# * **Model.** `smoke`/`cpu` use a tiny random PaliGemma (same classes, processor and LoRA
#   targets) whose "pre-training" is a short full-parameter captioning stage on synthetic
#   captions; only `gpu` uses PaliGemma-3B-mix-448. The numbers above measure the tiny model.
# * **LoRA in the vision tower.** The paper lists `{q,k,v,o,up,down}_proj`. SigLIP has no
#   `o_proj`/`up_proj`/`down_proj`: given literally, peft adapts only q/k/v there. This chapter
#   maps the roles (`out_proj`, `fc1`, `fc2`) by default; `vision_lora="literal"` gives the
#   paper's literal behaviour. Gemma's `gate_proj` is not adapted in either.
# * **Datamixes.** ROCO-QA, MedPix ShortQA and PMC-VQA need the Hub (`gpu`); offline the mixes
#   are the target's own training QA, QA generated by rules from synthetic captions, and the
#   latter annealed with a slice of human-written training QA. The paper's human review of the
#   generated pairs is replaced by automatic answerability and relevance checks.
# * **Evaluation.** The paper's LLM judge of open answers is not used (off by default); open
#   answers are scored by exact match, ROUGE and BLEU. The paper does not say against which
#   answer the five sampled runs are compared; here it is the greedy answer being scored.
#   "rouge-s/m/l" of the paper are shown as ROUGE-1/2/L (our reading).
# * **Schedule.** `gpu` uses the appendix (lr 1e-5 constant, no weight decay, batch 6 ×
#   accumulation 16, bf16); `smoke`/`cpu` use a higher constant lr and a few epochs, because a
#   tiny model trained for minutes needs it.
