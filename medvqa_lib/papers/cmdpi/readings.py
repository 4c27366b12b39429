"""Readings of the paper: the choices this package makes where the CMDPI paper's text leaves one.

There is no public code; where the text leaves a choice, this package takes the reading below.

1. **One width d.** Eq. 1 gives ``H_I`` and ``H_T`` the same width d, so each encoder ends in a
   linear map from its backbone width to d (the paper's RecNet width, 512). ``h_I``/``h_T`` in
   Eqs. 6-7 are these d-dimensional head vectors; there are no extra projection heads.
2. **Eq. 4's indices** are read 1-based and inclusive over ``[h, I_1..I_N, T_1..T_M]``: image
   outputs at 1..N, text outputs at N+1..N+M (Python slices ``1:N+1`` and ``N+1:``).
   ``Ans' = FFN_A(H_o[:, -1])`` reads the *last* position of that sequence, i.e. the text's
   last token; with BERT tokenisation that is the closing [SEP] (never masked), taken per row
   at the last non-padding position. No extra answer token is added (Eq. 3's v_0 has none).
3. **Masking (rho).** The paper names one mask ratio rho without a value. The image and text
   ratios are separate settings, defaulting to MAE's 0.75 for patches and BERT's 0.15 for tokens
   (set both equal for a single rho). Images are masked MAE-style: masked patches are dropped
   from the image encoder's input and RecNet receives a learned mask vector at their slots
   (RecNet reads N image positions, Eq. 4). Text is masked BERT-style (80 % [MASK], 10 %
   random, 10 % kept). Global and local reconstruction share the same masked inputs.
4. **Scored positions.** Pre-training losses score the masked patches and masked tokens only
   (MAE/BERT practice; Eq. 5 literally compares whole outputs: ``rec_masked_only=False``
   scores every patch and every non-special token). Image targets are the input pixels as the
   model sees them (normalised to [-1, 1]), optionally per-patch normalised (``norm_pix_loss``).
5. **L_rec** of Eq. 5 is computed for the global and for the local reconstruction and the two
   are summed; ``L_ans`` exists only for rows that have an answer (VQA rows), captions have none.
   Pre-training VQA answers are classes of the same answer head (:func:`remap_answer_head` and
   :func:`load_pretrained_for_finetune` carry rows over to the fine-tuning answer set).
6. **Contrastive.** Eq. 7 exactly: in-batch negatives only (no MoCo queue), cosine
   similarity, fixed temperature tau = 0.07 (not given). ``C_inter`` is the *sum* of both
   directions. The momentum encoders (EMA, m = 0.995, not given) are copies of the image and
   text encoders including their maps to d, see the same unmasked inputs and get no gradient.
   The reported ``loss_inter``/``loss_intra`` are unscaled; the total uses alpha, alpha'.
7. **Fine-tuning text** is unmasked (Eq. 8 uses ``H_T``), so ``L_txt^d`` scores every
   non-special question token; ``L_img^d`` scores every patch of the *current* image.
8. **eps and lambda** are drawn per sample (U[0, 1]; lambda may be Beta(a, b) or fixed,
   appendix Table 5 / Figure 15).
9. **Similar images** are other *training* images whose global feature ``h_I`` (from the model
   before fine-tuning) has cosine similarity strictly above the threshold (0.75); computed once
   (:class:`SimilarImages`, serialisable). The appendix also says the threshold "filters out
   highly redundant samples", which a lower bound cannot do; an optional upper bound
   ``max_similarity`` exists, off by default. An image without a similar partner uses itself
   (no deviation). The similar image is encoded by the online encoder (with gradient) and is
   only a source of features: it is neither reconstructed nor answered — our reading of
   "feature deviation ... exclusively to the current sample, excluding the sampled similar
   image".
10. **Head-mixup partner**: another row of the same batch with the same organ and question type
    whose ``h^_D = H^d_o[:, -1]`` comes from its own difference reconstruction (the paper's
    ``H^d_o``); a row without such a partner in the batch is not mixed (``lambda`` has no
    effect). Partners can also be given explicitly (``mix_index``).
11. **Ablations.** "w/o difference reconstruction" = no deviation and no ``L_diff`` (the answer
    head reads ``RecNet(h_F, H_I, H_T)``); "w/o head mixup" = plain cross-entropy on ``h_D``.
12. **Inference** uses no deviation (eps = 1) and takes the arg-max over the training answers.
13. **Unstated sizes.** GlobalFusion = Linear(2d, d)-GELU-Linear(d, d); FFN_I/T/A =
    dense-GELU-LayerNorm-linear (BERT's prediction-head shape); RecNet has learned positional
    embeddings, 8 heads, 4d MLP, dropout 0.1 and no input LayerNorm (Eq. 3 has none).
14. **Text side.** The paper initialises both encoders from CLIP. The library's text side is
    BERT-family (``medvqa_lib.text``), so the ``gpu`` profile uses CLIP's image tower (timm
    ``vit_base_patch16_clip_224.openai``) with bert-base-uncased (or MiniLM offline) as text
    encoder; head_T is [CLS].
"""

from __future__ import annotations

__all__ = ["readings_of_the_paper"]


def readings_of_the_paper() -> str:
    """The numbered readings above (Markdown-ready), read from this module's docstring so that
    the chapter cannot drift from the code."""
    return (__doc__ or "").split("\n\n", 1)[-1].strip()
